r"""Oracle vectors: reference values, VJPs and JVPs of a layer, in a file that
any other implementation (PyTorch, JAX, ...) can be checked against.

File format (``.npz``, version 2)
---------------------------------
One NumPy ``.npz`` archive (no pickled objects) holding

``header``
    a 0-d unicode array whose text is a JSON object: ``format``
    (``"nimplicit-oracle"``), ``version`` (2), ``layer``, ``source``
    (``"registry"`` or ``"function"``: a user's layer), ``variant``,
    ``description``, ``conventions`` (a dict, see below), ``created`` (UTC,
    ISO 8601), ``versions``, ``seed``, ``size`` (generator keywords),
    ``argnums`` (the differentiated inputs), ``n_directions``,
    ``tolerances`` (``recommended_rtol`` and why) and ``cases``: per case its
    ``seed``, ``inputs`` (kind, shape, dtype), ``outputs`` (shapes),
    ``output_is_tuple`` and ``check``, the record of the verification of the
    *stored* arrays (see :func:`verify_case`).
``case{c}/input{i}``, ``case{c}/output{k}``
    inputs (a Python float stored 0-d) and output components.
``case{c}/cotangent{j}/output{k}`` and ``case{c}/vjp{j}/input{i}``
    cotangent ``u_j`` (standard normal, per output component) and the VJP
    ``J_i^T u_j`` for every ``i`` in ``argnums``.
``case{c}/tangent{j}/input{i}`` and ``case{c}/jvp{j}/output{k}``
    tangent ``t_j`` (standard normal times ``entry_scales``, every
    differentiated input at once; symmetric for inputs whose symmetric part
    alone enters, see ``conventions["symmetric_inputs"]``) and the JVP
    ``sum_i J_i t_{j,i}``.

No file is written unless its stored values pass :func:`verify_case`: the
JVPs against finite differences of the forward along each stored tangent, the
VJPs through :math:`\langle u, \mathrm{FD}(J d)\rangle = \langle J^\top u, d
\rangle` along directions ``d`` supported on one input at a time (every
coordinate of a small input, random ones otherwise), and the adjoint identity
:math:`\langle u_j, J t_k\rangle = \langle J^\top u_j, t_k\rangle` between
stored pairs.  :func:`compare` re-runs that check before trusting a file.

Wrapper protocol for :func:`compare`
------------------------------------
``fn(*inputs) -> output`` (a NumPy array or a tuple of them), plus optional
``vjp(inputs, cotangent) -> tuple`` (one array per entry of ``argnums``, in
that order; ``cotangent`` has the output's structure) and
``jvp(inputs, tangent) -> output tangent`` (``tangent`` is a tuple aligned
with ``argnums``), given as arguments or as attributes ``fn.vjp`` /
``fn.jvp``.  :mod:`verification.adapters` builds them from torch or JAX
functions.  Without ``jvp``, the JVP is compared through the peer's VJPs and
the stored pairs (:math:`\langle u_j, J t_k\rangle = \langle J^\top u_j, t_k
\rangle`, no finite differences of the peer); finite differences of ``fn``
only on request (``jvp_from="fd"``), with their error estimate and the
forward's noise added to the allowance.

Noise model: the same as :func:`verification.check_grad`'s.  Without a declared
``noise`` (the registry entry's, or ``conventions["noise"]`` of a user's
function), every finite difference first measures the forward's noise along its
direction (ECnoise), sizes its step from it, recognises kinks of a piecewise-linear
output, and the base allowance of 64 eps relative output noise is added on top; a
declared relative ``noise`` enters the finite differences' error model instead.
"""
from __future__ import annotations

import datetime
import inspect
import json
import platform
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from autograd import make_jvp, make_vjp
from autograd.builtins import tuple as ag_tuple
from nimplicit.errors import NimplicitError

from . import finite_differences as fdiff
from .adapters import JVPUnavailable
from .check import NOISE, _noise_error, differentiable_argnums
from .registry import get

FORMAT = "nimplicit-oracle"
VERSION = 2
#: relative tolerance of the stored-value verification when the entry sets none
VERIFY_RTOL = 1e-6
#: inputs with at most this many entries are verified column by column
COLUMNS_MAX = 6
#: random directions per larger input in the VJP verification
VJP_DIRECTIONS = 2
#: default comparison tolerance of a file when its entry recommends none
DEFAULT_COMPARE_RTOL = 1e-6
#: a reference below this fraction of its group's largest scale is zero to rounding
ZERO_REL = 1e-10


class OracleError(NimplicitError, ValueError):
    """An oracle file is malformed or does not fit the implementation compared with it."""


class OracleVerificationError(OracleError):
    """The stored VJPs/JVPs disagree with finite differences of the forward; ``check`` holds
    the per-case verification records."""

    def __init__(self, message: str, check: Optional[List[dict]] = None):
        super().__init__(message)
        self.check = check or []


# ------------------------------------------------------------------------------
# helpers: output structure, autograd wrapper
# ------------------------------------------------------------------------------

def _parts(value) -> List[np.ndarray]:
    return [np.asarray(v, dtype=float) for v in value] if isinstance(value, (tuple, list)) \
        else [np.asarray(value, dtype=float)]


def box_tuple(value):
    """``value`` as an autograd tuple when it is a plain tuple/list (of boxes), so that
    autograd traces through it; layers returning a plain tuple of boxes would otherwise
    look independent of their inputs (all-zero VJPs)."""
    return ag_tuple(value) if type(value) in (tuple, list) else value


def _sym(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + np.swapaxes(a, -1, -2))


class AutogradWrapper:
    """The wrapper protocol for an autograd-differentiable ``fn``: ``__call__``,
    ``vjp(inputs, cotangent)`` and ``jvp(inputs, tangent)`` on NumPy values.
    Plain tuple outputs are boxed (:func:`box_tuple`)."""

    def __init__(self, fn: Callable, argnums: Sequence[int]):
        self.fn, self.argnums = fn, list(argnums)

    def _of_selected(self, inputs):
        def F(sel):
            full = list(inputs)
            for k, v in zip(self.argnums, sel):
                full[k] = v
            return box_tuple(self.fn(*full))
        return F, tuple(inputs[k] for k in self.argnums)

    def __call__(self, *inputs):
        out = self.fn(*inputs)
        return tuple(_parts(out)) if isinstance(out, (tuple, list)) else np.asarray(out, float)

    def vjp(self, inputs, cotangent):
        F, sel = self._of_selected(list(inputs))
        cot = tuple(cotangent) if isinstance(cotangent, (tuple, list)) else cotangent
        g = make_vjp(F)(sel)[0](cot)
        return tuple(np.asarray(gi, dtype=float) for gi in g)

    def jvp(self, inputs, tangent):
        F, sel = self._of_selected(list(inputs))
        tangent = tuple(float(t) if isinstance(s, float) else t for s, t in zip(sel, tangent))
        out = make_jvp(F)(sel)(tangent)[1]
        return tuple(_parts(out)) if isinstance(out, (tuple, list)) else np.asarray(out, float)


def _versions() -> Dict[str, str]:
    import autograd
    import scipy

    import nimplicit
    try:
        from importlib.metadata import version
        ag = version("autograd")
    except Exception:
        ag = getattr(autograd, "__version__", "unknown")
    return {"python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "autograd": ag, "nimplicit": nimplicit.__version__}


def _dot(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> Tuple[float, float]:
    """``sum_k <a_k, b_k>`` and its rounding scale ``sum_k sum |a_k b_k|``."""
    prods = [np.asarray(x, float) * np.asarray(y, float) for x, y in zip(a, b)]
    return float(sum(p.sum() for p in prods)), float(sum(np.abs(p).sum() for p in prods))


# ------------------------------------------------------------------------------
# verification of stored values
# ------------------------------------------------------------------------------

class _Joint:
    """The forward as a function of the flattened differentiated inputs."""

    def __init__(self, fn: Callable, inputs: Sequence[Any], argnums: Sequence[int]):
        self.fn, self.inputs, self.argnums = fn, list(inputs), list(argnums)
        self.base = [np.asarray(inputs[i], dtype=float) for i in argnums]
        sizes = [b.size for b in self.base]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.z0 = np.concatenate([b.ravel() for b in self.base]) if sizes else np.zeros(0)

    def __call__(self, z):
        full = list(self.inputs)
        for n, i in enumerate(self.argnums):
            piece = z[self.offsets[n]:self.offsets[n + 1]].reshape(self.base[n].shape)
            full[i] = float(piece) if isinstance(self.inputs[i], float) else piece
        return tuple(_parts(self.fn(*full)))

    def flat(self, pieces: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(p, dtype=float).ravel() for p in pieces])

    def block(self, n: int, d: np.ndarray) -> np.ndarray:
        z = np.zeros_like(self.z0)
        z[self.offsets[n]:self.offsets[n + 1]] = np.asarray(d, dtype=float).ravel()
        return z


def _noise_model(noise) -> Any:
    """``"auto"`` (measure the forward's noise, as :func:`~verification.check_grad`
    does without ``noise=``) for ``None`` / ``"auto"``, else the declared relative
    noise as a float; :class:`OracleError` for anything else."""
    if noise is None or (isinstance(noise, str) and noise == "auto"):
        return "auto"
    try:
        value = float(noise)
    except (TypeError, ValueError):
        raise OracleError(f"noise must be None, 'auto' or a relative accuracy >= 0, got {noise!r}") \
            from None
    if not (np.isfinite(value) and value >= 0):
        raise OracleError(f"noise must be a finite relative accuracy >= 0, got {noise!r}")
    return value


def _fd(joint: _Joint, v: np.ndarray, noise, f_max: float, step: Optional[float]):
    r"""Central FD of the forward along ``v`` with its error estimate, under the
    noise model of :func:`verification.check_grad`.

    ``noise="auto"``: the finite differences measure the forward's noise along
    ``v`` (ECnoise), size the step from it and recognise kinks; on top of that
    every entry's error gets the base allowance ``2 NOISE |f|_inf / t`` of the
    checker (64 eps relative output noise on the base step ``t``).  A float
    ``noise`` is the declared relative output accuracy, put into the finite
    differences' own error model as the absolute level ``noise |f|_inf``.
    """
    if noise == "auto":
        res = fdiff.directional_derivative(joint, joint.z0, v, noise="auto", step=step)
        floor = _noise_error(SimpleNamespace(noise=NOISE, fd_step=step), f_max, joint.z0, v) \
            if joint.z0.size else 0.0
    else:
        res = fdiff.directional_derivative(joint, joint.z0, v, noise=noise * f_max, step=step)
        floor = 0.0
    return [np.asarray(x, float) for x in res.value], [np.asarray(e, float) + floor for e in res.error]


def verify_case(fn: Callable, inputs: Sequence[Any], argnums: Sequence[int], stored: dict, *,
                rtol: float = VERIFY_RTOL, noise: Optional[Any] = None,
                fd_step: Optional[float] = None, seed: int = 0) -> dict:
    r"""Check the stored values of one case against finite differences of ``fn``.

    ``stored`` has ``outputs`` (list per component), ``cotangents``/``jvps``
    (per direction, per output component) and ``tangents``/``vjps`` (per
    direction, per differentiated input, aligned with ``argnums``).  Tests:

    * output: ``|fn(inputs)_k - stored_k| <= rtol max|stored_k|`` (noise);
    * JVP ``j``: per output component ``k``,
      :math:`|\mathrm{jvp}_{jk} - \mathrm{FD}(J t_j)_k| \le e_k + r \max|\mathrm{FD}_k|`
      (``e`` the finite-difference error estimate, with the forward's noise:
      measured when ``noise`` is ``None`` or ``"auto"``, else the declared
      relative ``noise``; see :func:`_fd`);
    * VJP: per input ``i`` and direction ``d`` on that input alone (every
      coordinate for at most ``COLUMNS_MAX`` entries, else ``VJP_DIRECTIONS``
      random ones), :math:`|\langle u_j, \mathrm{FD}(J d)\rangle - \langle
      g_{ji}, d\rangle| \le \langle |u_j|, e\rangle + r \sum |u_j \, J d| + r |g_{ji}| \cdot |d|`;
    * adjoint identity between stored pairs :math:`\langle u_j, \mathrm{jvp}_k\rangle
      = \sum_i \langle g_{ji}, t_{ki}\rangle` within ``r`` times their rounding scale.

    Returns a JSON-able record: ``passed``, ``rtol``, ``noise`` (``"auto"`` or the
    declared value), ``output_rel`` and
    ``jvp_rel`` (per output component), ``vjp_rel`` (per input, keyed by its
    index), ``adjoint_rel``, ``worst`` (the failing or closest quantity) and
    ``n_fd`` (directional finite differences used).  ``*_rel`` are errors over
    the allowance-free scale; a value ``> 0`` with zero scale is ``inf``.
    """
    noise = _noise_model(noise)
    joint = _Joint(fn, inputs, argnums)
    outs = _parts(fn(*inputs))
    f_max = max((float(np.abs(o).max(initial=0.0)) for o in outs), default=0.0)
    noise_abs = (NOISE if noise == "auto" else noise) * f_max
    rec: Dict[str, Any] = {"rtol": rtol, "noise": noise, "output_rel": [], "jvp_rel": [],
                           "vjp_rel": {}, "adjoint_rel": 0.0, "n_fd": 0}
    excess: List[Tuple[float, str]] = []

    def judge(err, allowed, scale, label):
        excess.append((err / allowed if allowed > 0 else (np.inf if err > 0 else 0.0), label))
        return err / scale if scale > 0 else (np.inf if err > 0 else 0.0)

    stored_out = stored["outputs"]
    if len(outs) != len(stored_out):
        raise OracleError(f"the forward returns {len(outs)} components, the file stores "
                          f"{len(stored_out)}")
    for k, (o, s) in enumerate(zip(outs, stored_out)):
        if o.shape != s.shape:
            raise OracleError(f"output {k}: the forward returns shape {o.shape}, the file "
                              f"stores {s.shape}")
        err, scale = float(np.abs(o - s).max(initial=0.0)), float(np.abs(s).max(initial=0.0))
        rec["output_rel"].append(judge(err, rtol * scale + noise_abs, scale, f"output {k}"))

    n_out = len(outs)
    jvp_rel = [0.0] * n_out
    for j, (tan, jvp) in enumerate(zip(stored["tangents"], stored["jvps"])):
        fd, fd_err = _fd(joint, joint.flat(tan), noise, f_max, fd_step)
        rec["n_fd"] += 1
        for k in range(n_out):
            err = float(np.abs(np.asarray(jvp[k]) - fd[k]).max(initial=0.0))
            scale = float(np.abs(fd[k]).max(initial=0.0))
            allowed = float(fd_err[k].max(initial=0.0)) + rtol * scale
            jvp_rel[k] = max(jvp_rel[k], judge(err, allowed, scale, f"JVP {j}, output {k}"))
    rec["jvp_rel"] = jvp_rel

    rng = np.random.default_rng([seed, 7])
    for n, i in enumerate(argnums):
        x = joint.base[n]
        if x.size == 0:
            rec["vjp_rel"][str(i)] = 0.0
            continue
        scales = fdiff.entry_scales(x)
        if x.size <= COLUMNS_MAX:
            dirs = [np.eye(x.size)[e].reshape(x.shape) * scales for e in range(x.size)]
        else:
            dirs = [rng.standard_normal(x.shape) * scales for _ in range(VJP_DIRECTIONS)]
        worst = 0.0
        for d in dirs:
            fd, fd_err = _fd(joint, joint.block(n, d), noise, f_max, fd_step)
            rec["n_fd"] += 1
            for j, (cot, g) in enumerate(zip(stored["cotangents"], stored["vjps"])):
                lhs, lhs_scale = _dot(cot, fd)
                bound = float(sum((np.abs(np.asarray(c)) * e).sum() for c, e in zip(cot, fd_err)))
                rhs = float((np.asarray(g[n], float) * d).sum())
                rhs_scale = float(np.linalg.norm(g[n]) * np.linalg.norm(d))
                err = abs(lhs - rhs)
                allowed = bound + rtol * (lhs_scale + rhs_scale)
                worst = max(worst, judge(err, allowed, lhs_scale, f"VJP {j}, input {i}"))
        rec["vjp_rel"][str(i)] = worst

    rec["adjoint_rel"] = _adjoint_identity(stored, rtol, judge)
    worst_excess, worst_label = max(excess, default=(0.0, "nothing"))
    rec["passed"] = bool(worst_excess <= 1.0)
    rec["worst"] = {"quantity": worst_label, "error_over_allowed": float(worst_excess)}
    return _jsonable(rec)


def _adjoint_identity(stored: dict, rtol: float, judge) -> float:
    """Worst relative violation of <u_j, jvp_m> = sum_i <vjp_ji, t_mi> over stored pairs."""
    adj = 0.0
    for j, (cot, g) in enumerate(zip(stored["cotangents"], stored["vjps"])):
        for m, (tan, jvp) in enumerate(zip(stored["tangents"], stored["jvps"])):
            a, a_scale = _dot(cot, jvp)
            b, b_scale = _dot(g, tan)
            scale = a_scale + b_scale
            adj = max(adj, judge(abs(a - b), rtol * scale, scale,
                                 f"adjoint identity <u{j}, J t{m}> = <J^T u{j}, t{m}>"))
    return adj


def verify_pairs(stored: dict, rtol: float = VERIFY_RTOL) -> dict:
    """The finite-difference-free part of :func:`verify_case`: the adjoint identity
    between the stored VJP/JVP pairs (used when the reference forward is not at hand)."""
    excess: List[Tuple[float, str]] = []

    def judge(err, allowed, scale, label):
        excess.append((err / allowed if allowed > 0 else (np.inf if err > 0 else 0.0), label))
        return err / scale if scale > 0 else (np.inf if err > 0 else 0.0)
    adj = _adjoint_identity(stored, rtol, judge)
    worst_excess, worst_label = max(excess, default=(0.0, "nothing"))
    return _jsonable({"rtol": rtol, "adjoint_rel": adj, "passed": bool(worst_excess <= 1.0),
                      "worst": {"quantity": worst_label, "error_over_allowed": float(worst_excess)},
                      "method": "adjoint identity between stored pairs only (no reference forward)"})


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return "inf" if obj > 0 else "nan"
    return obj


def _stored(arrays: dict, c: int, n_directions: int, n_out: int, argnums: Sequence[int]) -> dict:
    key = lambda *p: "/".join([f"case{c}", *p])
    return {
        "outputs": [arrays[key(f"output{k}")] for k in range(n_out)],
        "cotangents": [[arrays[key(f"cotangent{j}", f"output{k}")] for k in range(n_out)]
                       for j in range(n_directions)],
        "vjps": [[arrays[key(f"vjp{j}", f"input{i}")] for i in argnums] for j in range(n_directions)],
        "tangents": [[arrays[key(f"tangent{j}", f"input{i}")] for i in argnums]
                     for j in range(n_directions)],
        "jvps": [[arrays[key(f"jvp{j}", f"output{k}")] for k in range(n_out)]
                 for j in range(n_directions)],
    }


# ------------------------------------------------------------------------------
# conventions
# ------------------------------------------------------------------------------

def normalize_conventions(conventions) -> Dict[str, Any]:
    """A conventions dict (a plain string becomes ``{"notes": text}``)."""
    if conventions is None or conventions == "":
        return {}
    if isinstance(conventions, str):
        return {"notes": conventions}
    if not isinstance(conventions, dict):
        raise OracleError(f"conventions must be a dict (or a string), got "
                          f"{type(conventions).__name__}")
    return dict(conventions)


def format_conventions(conventions: Dict[str, Any], indent: str = "  ") -> str:
    """The conventions as readable lines (printed by :func:`compare`'s report)."""
    lines = []
    for key, value in conventions.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{indent}{key}:")
            for item in value:
                lines.append(f"{indent}  - " + ", ".join(f"{k}: {v}" for k, v in item.items()))
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------

def _case_arrays(wrapper: AutogradWrapper, inputs: list, argnums: List[int], c: int,
                 n_directions: int, rng, symmetric: Sequence[int]):
    out = wrapper(*inputs)
    outs = _parts(out)
    arrays: Dict[str, np.ndarray] = {}
    stored: Dict[str, list] = {"outputs": outs, "cotangents": [], "vjps": [], "tangents": [],
                               "jvps": []}
    for i, x in enumerate(inputs):
        arrays[f"case{c}/input{i}"] = np.asarray(x)
    for k, o in enumerate(outs):
        arrays[f"case{c}/output{k}"] = o
    for j in range(n_directions):
        cot = [rng.standard_normal(o.shape) for o in outs]
        vjp = [np.asarray(g, float) for g in wrapper.vjp(inputs, tuple(cot) if isinstance(out, tuple)
                                                          else cot[0])]
        vjp = [_sym(g) if i in symmetric else g for i, g in zip(argnums, vjp)]
        tan = []
        for i in argnums:
            t = rng.standard_normal(np.shape(inputs[i])) * fdiff.entry_scales(inputs[i])
            tan.append(_sym(t) if i in symmetric else t)
        jvp = _parts(wrapper.jvp(inputs, tuple(tan)))
        for k, ck in enumerate(cot):
            arrays[f"case{c}/cotangent{j}/output{k}"] = ck
        for i, g in zip(argnums, vjp):
            arrays[f"case{c}/vjp{j}/input{i}"] = g
        for i, t in zip(argnums, tan):
            arrays[f"case{c}/tangent{j}/input{i}"] = t
        for k, d in enumerate(jvp):
            arrays[f"case{c}/jvp{j}/output{k}"] = d
        for name, value in (("cotangents", cot), ("vjps", vjp), ("tangents", tan), ("jvps", jvp)):
            stored[name].append(value)
    meta = {"inputs": [{"kind": "float" if isinstance(x, float) else "array",
                        "shape": list(np.shape(x)), "dtype": str(np.asarray(x).dtype)}
                       for x in inputs],
            "outputs": [list(o.shape) for o in outs], "output_is_tuple": isinstance(out, tuple)}
    return arrays, stored, meta


def _write(fn: Callable, instances, path: str, header: dict, *, argnums, n_directions: int,
           seeds: Sequence[int], rtol: float, noise, fd_step) -> Dict[str, Any]:
    if n_directions < 1:
        raise OracleError(f"n_directions must be >= 1, got {n_directions}")
    conventions = header["conventions"]
    symmetric = list(conventions.get("symmetric_inputs", []))
    arrays: Dict[str, np.ndarray] = {}
    argnums_all = None
    checks = []
    header["cases"] = []
    for c, (inputs, case_seed) in enumerate(zip(instances, seeds)):
        inputs = list(inputs)
        argnums = list(argnums) if argnums is not None else differentiable_argnums(inputs)
        if argnums_all is not None and argnums != argnums_all:
            raise OracleError(f"the differentiated inputs differ between cases: {argnums} vs "
                              f"{argnums_all}")
        argnums_all = argnums
        wrapper = AutogradWrapper(fn, argnums)
        rng = np.random.default_rng([case_seed, 1])
        case_arrays, stored, meta = _case_arrays(wrapper, inputs, argnums, c, n_directions, rng,
                                                 symmetric)
        check = verify_case(fn, inputs, argnums, stored, rtol=rtol, noise=noise, fd_step=fd_step,
                            seed=case_seed)
        check["method"] = ("stored JVPs vs central FD along each stored tangent; stored VJPs via "
                           "<u, FD(J d)> = <J^T u, d> along directions on one input at a time; "
                           "adjoint identity between stored pairs")
        checks.append(check)
        arrays.update(case_arrays)
        header["cases"].append({"seed": case_seed, **meta, "check": check})
    if not header["cases"]:
        raise OracleError("no cases to export: give at least one instance")
    failed = [c for c, ch in enumerate(checks) if not ch["passed"]]
    if failed:
        worst = checks[failed[0]]["worst"]
        raise OracleVerificationError(
            f"{header['layer']}: the values to be stored in case(s) {failed} disagree with finite "
            f"differences of the forward (worst: {worst['quantity']}, error {worst['error_over_allowed']:.3g}"
            f" times the allowance at rtol {rtol:g}); no file written to {path}. The layer's "
            f"derivative is wrong (or its output is a plain tuple of boxes the wrapper could not "
            f"trace), or its forward is noisier than declared: check it with check_grad.", checks)
    header["argnums"] = argnums_all
    _fill_conventions(conventions, header["cases"][0], argnums_all)
    arrays["header"] = np.array(json.dumps(header))
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return header


def _fill_conventions(conventions: dict, case: dict, argnums: Sequence[int]) -> None:
    """Describe the inputs and outputs from their shapes when the entry declares none, so
    that every file says at least what it holds (and says that it was not declared)."""
    auto = []
    if "inputs" not in conventions:
        conventions["inputs"] = [{"name": f"x{i}", "shape": s["shape"] if s["kind"] == "array"
                                  else "float", "differentiated": i in argnums}
                                 for i, s in enumerate(case["inputs"])]
        auto.append("inputs")
    if "outputs" not in conventions:
        conventions["outputs"] = [{"name": f"out{k}", "shape": shape}
                                  for k, shape in enumerate(case["outputs"])]
        auto.append("outputs")
    if auto:
        conventions["undeclared"] = (f"{' and '.join(auto)} described from the shapes only: the "
                                     f"layer declares no conventions for them")


def _base_header(name: str, description: str, conventions: dict, seed, size, n_directions: int,
                 variant: Optional[str]) -> Dict[str, Any]:
    rtol = conventions.get("recommended_rtol", DEFAULT_COMPARE_RTOL)
    return {
        "format": FORMAT, "version": VERSION, "layer": name, "variant": variant,
        "description": description, "conventions": conventions,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "seed": seed, "size": size, "n_directions": n_directions,
        "cotangents": "standard normal, per output component",
        "tangents": "standard normal times entry_scales(input), all differentiated inputs at once"
                    " (symmetrized for conventions['symmetric_inputs'])",
        "tolerances": {"recommended_rtol": rtol,
                       "recommended_rtol_reason": conventions.get(
                           "recommended_rtol_reason",
                           "default: the reference is accurate to rounding amplified by its "
                           "conditioning; an accurate peer agrees to ~1e-8, 1e-6 leaves a margin"),
                       "applies_to": "each output component, VJP input and JVP component on its "
                                     "own scale (max |reference|)"},
    }


def _resolve_size(entry, size: Optional[dict]) -> Dict[str, Any]:
    merged = dict(entry.size)
    if not size:
        return merged
    params = inspect.signature(entry.generate).parameters
    allowed = [p for p in list(params)[1:]]
    unknown = sorted(set(size) - set(allowed))
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise SizeOptionError(f"{entry.name}: unknown size key(s) {unknown}; the generator takes "
                              f"{allowed}")
    merged.update(size)
    return merged


class SizeOptionError(OracleError, TypeError):
    """An unknown ``size`` key or ``variant`` name for a registered entry."""


def export(layer: str, path: str, *, cases: int = 3, seed: int = 0, n_directions: int = 2,
           size: Optional[dict] = None, variant: Optional[str] = None) -> Dict[str, Any]:
    """Write oracle vectors of the registered ``layer`` to ``path`` (see the module doc).

    Parameters
    ----------
    layer : registry name (``nimplicit-gradcheck --list``).
    cases : number of instances, drawn with seeds ``seed, seed + 1, ...``.
    n_directions : cotangent/tangent pairs per case.
    size : generator keywords overriding the entry's ``size`` (e.g. ``{"n": 60}``
        for the regime where a peer's default settings break); unknown keys raise
        :class:`SizeOptionError`.
    variant : an alternative output of the entry (e.g. ``"primal"``: QP ``y``
        alone, for peers without duals); see the entry's ``variants``.

    The stored values are verified (:func:`verify_case`) before anything is
    written; a failure raises :class:`OracleVerificationError`.  Returns the header.
    """
    entry = get(layer)
    sz = _resolve_size(entry, size)
    conventions = normalize_conventions(entry.conventions)
    fn = entry.fn
    if variant is not None:
        variants = getattr(entry, "variants", {}) or {}
        if variant not in variants:
            raise SizeOptionError(f"{entry.name}: no variant {variant!r}; available: "
                                  f"{sorted(variants) or 'none'}")
        fn = variants[variant]
        conventions = {**conventions, **normalize_conventions(
            (getattr(entry, "variant_conventions", {}) or {}).get(variant))}
    seeds = [seed + c for c in range(cases)]
    instances = (entry.generate(np.random.default_rng(s), **sz) for s in seeds)
    header = _base_header(entry.name, entry.description, conventions, seed, sz, n_directions,
                          variant)
    header["source"] = "registry"
    rtol = entry.rtol if entry.rtol is not None else VERIFY_RTOL
    return _write(fn, instances, path, header, argnums=entry.argnums, n_directions=n_directions,
                  seeds=seeds, rtol=rtol, noise=entry.noise, fd_step=entry.fd_step)


def export_function(fn: Callable, instances: Sequence[Sequence[Any]], path: str, *, name: str,
                    argnums: Optional[Sequence[int]] = None, n_directions: int = 2,
                    conventions: Optional[dict] = None) -> Dict[str, Any]:
    """Write oracle vectors of a user's autograd-differentiable ``fn``.

    ``instances`` is a list of input tuples (one case each); ``argnums`` the
    differentiated inputs (default: every float input).  ``conventions`` (a
    dict, recorded in the header) may set ``recommended_rtol`` (with
    ``recommended_rtol_reason``), ``symmetric_inputs`` and, for a forward
    accurate only to a tolerance, ``noise`` (relative output accuracy used by
    the verification) and ``verify_rtol``.  The stored values are verified
    like :func:`export`'s.  Returns the header.
    """
    conv = normalize_conventions(conventions)
    instances = list(instances)
    header = _base_header(name, conv.get("description", ""), conv, None, None, n_directions, None)
    header["source"] = "function"
    return _write(fn, instances, path, header, argnums=argnums, n_directions=n_directions,
                  seeds=list(range(len(instances))), rtol=float(conv.get("verify_rtol", VERIFY_RTOL)),
                  noise=conv.get("noise"), fd_step=None)


# ------------------------------------------------------------------------------
# load and verify files
# ------------------------------------------------------------------------------

def load(path: str):
    """``(header, arrays)`` of an oracle file (``arrays`` a dict of NumPy arrays)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if "header" not in arrays:
        raise OracleError(f"{path} has no 'header' entry: not a nimplicit oracle file")
    header = json.loads(str(arrays.pop("header")))
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise OracleError(f"{path}: format {header.get('format')!r} version "
                          f"{header.get('version')!r}, expected {FORMAT!r} version {VERSION}; "
                          f"re-export it with this version of nimplicit")
    return header, arrays


def case_inputs(header, arrays, c: int) -> list:
    """The inputs of case ``c``, as the layer takes them (floats restored)."""
    spec = header["cases"][c]["inputs"]
    return [float(arrays[f"case{c}/input{i}"]) if s["kind"] == "float" else arrays[f"case{c}/input{i}"]
            for i, s in enumerate(spec)]


def _reference_forward(header) -> Tuple[Optional[Callable], dict]:
    """The registry's forward for a file exported from the registry, and its settings."""
    if header.get("source") != "registry":
        return None, {}
    try:
        entry = get(header["layer"])
    except KeyError:
        return None, {}
    fn = entry.fn
    if header.get("variant"):
        fn = (getattr(entry, "variants", {}) or {}).get(header["variant"])
        if fn is None:
            return None, {}
    rtol = entry.rtol if entry.rtol is not None else VERIFY_RTOL
    return fn, {"rtol": rtol, "noise": entry.noise, "fd_step": entry.fd_step}


def verify_file(path: str, fn: Optional[Callable] = None) -> List[dict]:
    """Re-check the stored values of every case of a file (:func:`verify_case`).

    The forward is the registry's (for a registered layer) or ``fn``; with
    neither (a user's file checked without its reference forward) only the
    recorded checks and the adjoint identity between stored pairs
    (:func:`verify_pairs`) are re-checked.  Raises
    :class:`OracleVerificationError` when the header records no passed check or
    a stored value fails it; returns the per-case records.
    """
    header, arrays = load(path)
    ref, settings = _reference_forward(header)
    conv = header.get("conventions", {})
    if ref is None:
        ref = fn
        settings = {"rtol": float(conv.get("verify_rtol", VERIFY_RTOL)), "noise": conv.get("noise"),
                    "fd_step": None}
    records = []
    for c, case in enumerate(header["cases"]):
        if not (case.get("check") or {}).get("passed"):
            raise OracleVerificationError(f"{path}: case {c} records no passed verification of its "
                                          f"stored values; re-export the file")
        stored = _stored(arrays, c, header["n_directions"], len(case["outputs"]), header["argnums"])
        if ref is None:
            records.append(verify_pairs(stored, settings["rtol"]))
            continue
        rec = verify_case(ref, case_inputs(header, arrays, c), header["argnums"], stored,
                          seed=case["seed"] if case["seed"] is not None else c, **settings)
        records.append(rec)
    bad = [c for c, r in enumerate(records) if not r["passed"]]
    if bad:
        raise OracleVerificationError(
            f"{path}: the stored values of case(s) {bad} fail the check against finite differences "
            f"of the forward (worst: {records[bad[0]]['worst']['quantity']}); the file is not "
            f"trustworthy: re-export it", records)
    return records


# ------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------

@dataclass
class Measure:
    """One quantity (an output component, one input's VJP, one JVP component):
    its own error ``max|got - want|``, scale ``max|want|`` and verdict."""
    quantity: str
    error: float
    scale: float
    allowed: float
    passed: bool

    @property
    def rel(self) -> float:
        if self.scale > 0:
            return self.error / self.scale
        return float("inf") if self.error > 0 else 0.0


@dataclass
class CaseComparison:
    case: int
    seed: Optional[int]
    measures: List[Measure]
    jvp_source: str
    notes: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.measures)

    def _worst(self, prefix: str) -> Optional[float]:
        rels = [m.rel for m in self.measures if m.quantity.startswith(prefix)]
        return max(rels) if rels else None

    @property
    def output_error(self) -> Optional[float]:
        return self._worst("output")

    @property
    def vjp_error(self) -> Optional[float]:
        return self._worst("VJP")

    @property
    def jvp_error(self) -> Optional[float]:
        return self._worst("JVP")

    def worst(self, prefix: str) -> Optional[Measure]:
        ms = [m for m in self.measures if m.quantity.startswith(prefix)]
        return max(ms, key=lambda m: (m.error / m.allowed if m.allowed > 0 else
                                      (np.inf if m.error > 0 else 0.0))) if ms else None


@dataclass
class OracleReport:
    """Disagreement of an implementation with a file, per case and per quantity."""
    layer: str
    cases: List[CaseComparison]
    rtol: float
    atol: float
    conventions: Dict[str, Any] = field(default_factory=dict)
    rtol_reason: str = ""
    file_check: str = ""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def worst(self, prefix: str) -> Optional[Tuple[int, Measure]]:
        best = None
        for c in self.cases:
            m = c.worst(prefix)
            if m is None:
                continue
            key = m.error / m.allowed if m.allowed > 0 else (np.inf if m.error > 0 else 0.0)
            if best is None or key > best[0]:
                best = (key, c.case, m)
        return None if best is None else (best[1], best[2])

    def to_dict(self) -> Dict[str, Any]:
        return _jsonable({"layer": self.layer, "passed": self.passed, "rtol": self.rtol,
                          "atol": self.atol, "file_check": self.file_check,
                          "cases": [{"case": c.case, "seed": c.seed, "passed": c.passed,
                                     "jvp_source": c.jvp_source, "notes": c.notes,
                                     "measures": [{"quantity": m.quantity, "error": m.error,
                                                   "scale": m.scale, "rel": m.rel,
                                                   "passed": m.passed} for m in c.measures]}
                                    for c in self.cases]})

    def summary(self) -> str:
        lines = [f"oracle {self.layer}: rtol {self.rtol:g} ({self.rtol_reason}), atol {self.atol:g}"]
        if self.file_check:
            lines.append(f"file: {self.file_check}")
        if self.conventions:
            lines.append("conventions:")
            lines.append(format_conventions({k: v for k, v in self.conventions.items()
                                             if k not in ("recommended_rtol_reason",)}))
        for c in self.cases:
            lines.append(f"case {c.case} (seed {c.seed}), JVP from {c.jvp_source}: "
                         f"{'PASS' if c.passed else 'FAIL'}")
            for m in c.measures:
                lines.append(f"    {m.quantity:<28} error {m.error:9.2e}  scale {m.scale:9.2e}  "
                             f"rel {m.rel:9.2e}  {'ok' if m.passed else 'FAIL'}")
            lines.extend(f"    note: {n}" for n in c.notes)
        for prefix, what in (("output", "output"), ("VJP", "input (VJP)"), ("JVP", "output (JVP)")):
            w = self.worst(prefix)
            if w is not None:
                lines.append(f"worst {what}: case {w[0]}, {w[1].quantity}, rel {w[1].rel:.2e}")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)

    __str__ = summary


def _measure(quantity: str, got, want, rtol: float, atol: float, allowance: float = 0.0) -> Measure:
    got = np.asarray(got, dtype=float)
    want = np.asarray(want, dtype=float)
    if got.shape != want.shape:
        raise OracleError(f"{quantity}: the implementation returned shape {got.shape}, the oracle "
                          f"has {want.shape} (see the file's conventions)")
    if not np.all(np.isfinite(got)):
        return Measure(quantity, float("inf"), float(np.abs(want).max(initial=0.0)), 0.0, False)
    err = float(np.abs(got - want).max(initial=0.0))
    scale = float(np.abs(want).max(initial=0.0))
    allowed = atol + rtol * scale + allowance
    return Measure(quantity, err, scale, allowed, bool(err <= allowed))


def _jvps_by_adjoint(vjp, inputs, st, peer_vjps, pack, argnums, symmetric, conventions,
                     rtol: float, atol: float) -> List[Measure]:
    r"""Per output component ``k``: :math:`\langle J^\top \tilde u_{jk}, t_m\rangle` from the
    peer's VJP of the cotangent ``u_j`` restricted to component ``k`` (the others zero) against
    the stored :math:`\langle u_{jk}, (J t_m)_k\rangle`: the peer's JVPs without its forward
    mode and without finite differences (one array output: the peer's VJPs of ``u_j`` are reused)."""
    n_dir, n_out = len(st["cotangents"]), len(st["outputs"])
    out = []
    for k in range(n_out):
        got, want, scales = [], [], []
        for j in range(n_dir):
            if n_out == 1:
                g = peer_vjps[j]
            else:
                cot = [c if kk == k else np.zeros_like(c) for kk, c in enumerate(st["cotangents"][j])]
                g = [_sym(np.asarray(gi, float)) if i in symmetric else np.asarray(gi, float)
                     for i, gi in zip(argnums, vjp(inputs, pack(cot)))]
            for m in range(n_dir):
                a, a_scale = _dot([st["cotangents"][j][k]], [st["jvps"][m][k]])
                got.append(_dot(g, st["tangents"][m])[0])
                want.append(a)
                scales.append(a_scale)
        err = float(np.abs(np.array(got) - np.array(want)).max(initial=0.0))
        scale = float(max(scales, default=0.0))
        allowed = atol + rtol * scale
        out.append(Measure(f"JVP output {_output_name(conventions, k)} (via VJP)", err, scale,
                           allowed, bool(err <= allowed)))
    return out


def _zero_references(measures: List[Measure], prefix: str, rtol: float, atol: float,
                     notes: List[str]) -> None:
    """A quantity whose reference is zero to rounding (``max|want| <= ZERO_REL`` times the
    largest scale of its group: e.g. the gradient in ``G`` of a QP with no active
    constraint) has no scale of its own: its relative error stays reported (``inf`` for an
    exact zero) and it is judged against ``rtol`` times the largest scale of its siblings (the
    other outputs, or the other inputs' VJPs, of the case), so that an iterative peer's
    ~1e-9 residue passes while a value of the siblings' size fails."""
    group = [m for m in measures if m.quantity.startswith(prefix)]
    sibling = max((m.scale for m in group), default=0.0)
    for m in group:
        if m.scale <= ZERO_REL * sibling and m.error > m.allowed:
            m.allowed = atol + rtol * sibling
            m.passed = bool(np.isfinite(m.error) and m.error <= m.allowed)
            notes.append(f"{m.quantity}: the reference is 0 to rounding (max {m.scale:.1e}), the "
                         f"peer's error is {m.error:.2e}; judged against rtol x {sibling:.2e} (largest {prefix} "
                         f"scale of the case): {'ok' if m.passed else 'FAIL'}")


def _input_name(conventions: dict, i: int) -> str:
    spec = conventions.get("inputs")
    if isinstance(spec, list) and i < len(spec) and isinstance(spec[i], dict) and "name" in spec[i]:
        return f"{i} ({spec[i]['name']})"
    return str(i)


def _output_name(conventions: dict, k: int) -> str:
    spec = conventions.get("outputs")
    if isinstance(spec, list) and k < len(spec) and isinstance(spec[k], dict) and "name" in spec[k]:
        return f"{k} ({spec[k]['name']})"
    return str(k)


def compare(path: str, fn: Callable, vjp: Optional[Callable] = None, jvp: Optional[Callable] = None,
            *, rtol: Optional[float] = None, atol: float = 1e-12, framework: Optional[str] = None,
            jvp_from: str = "auto", verify: bool = True, noise: Optional[float] = None,
            argnums: Optional[Sequence[int]] = None) -> OracleReport:
    r"""Check an implementation against an oracle file.

    Every output component, every differentiated input's VJP and every JVP
    component is judged on its own: ``max|got - want| <= atol + rtol
    max|want|`` with ``want`` that quantity's reference; a zero ``got`` where
    ``want`` is not zero has relative error 1 and fails.  A reference that is
    exactly zero has no scale: a non-zero peer value is reported with relative
    error ``inf`` (and a note) and judged against ``rtol`` times the largest
    scale of the same kind in the case (see :func:`_zero_references`).  ``rtol`` defaults to the file's
    ``recommended_rtol``.  Inputs in ``conventions["symmetric_inputs"]`` are
    compared through the symmetric part of the peer's VJP.

    ``framework`` (``"torch"`` or ``"jax"``) wraps ``fn``, a function of that
    framework's arrays, with :mod:`verification.adapters` (VJP and JVP then
    come from the framework).  JVPs come from ``jvp`` when given; otherwise
    (``jvp_from="auto"`` or ``"adjoint"``) from the peer's VJPs through
    :math:`\langle u_j, J t_k\rangle = \langle J^\top u_j, t_k\rangle`,
    compared with the stored :math:`\langle u_j, \mathrm{jvp}_k\rangle`; with
    ``jvp_from="fd"`` by finite differences of ``fn`` with their error estimate
    and the forward's noise in the allowance: declared (relative ``noise``) or,
    by default, measured along each tangent as :func:`~verification.check_grad` does.

    With ``verify`` (default) the file's stored values are first re-checked
    (:func:`verify_file`); a file that fails raises :class:`OracleVerificationError`.
    """
    header, arrays = load(path)
    argnums = list(header["argnums"]) if argnums is None else list(argnums)
    if framework is not None:
        from . import adapters
        fn = adapters.wrap(fn, argnums, framework=framework)
    vjp = vjp if vjp is not None else getattr(fn, "vjp", None)
    jvp = jvp if jvp is not None else getattr(fn, "jvp", None)
    if jvp_from not in ("auto", "adjoint", "fd"):
        raise OracleError(f"jvp_from must be 'auto', 'adjoint' or 'fd', got {jvp_from!r}")
    if jvp_from == "adjoint" and vjp is None:
        raise OracleError("jvp_from='adjoint' needs the peer's vjp")
    file_check = "stored values not re-checked (verify=False)"
    if verify:
        # the peer's forward is under test, not a reference: never verify the file with it
        records = verify_file(path)
        how = ("against finite differences of the reference forward" if "n_fd" in records[0]
               else "through the adjoint identity of the stored pairs (reference forward not "
                    "registered here)")
        file_check = f"stored values re-checked {how}: {len(records)} case(s) passed"
    conventions = header.get("conventions", {})
    symmetric = set(conventions.get("symmetric_inputs", []))
    tol = header.get("tolerances", {})
    rtol_reason = "given" if rtol is not None else tol.get("recommended_rtol_reason", "")
    rtol = float(rtol if rtol is not None else tol.get("recommended_rtol", DEFAULT_COMPARE_RTOL))
    results = []
    n_dir = header["n_directions"]
    for c, case in enumerate(header["cases"]):
        inputs = case_inputs(header, arrays, c)
        n_out = len(case["outputs"])
        st = _stored(arrays, c, n_dir, n_out, argnums)
        pack = (lambda parts: tuple(parts)) if case["output_is_tuple"] else (lambda parts: parts[0])
        measures: List[Measure] = []
        notes: List[str] = []
        got_out = _parts(fn(*inputs))
        if len(got_out) != n_out:
            raise OracleError(f"the implementation returned {len(got_out)} output components, the "
                              f"oracle has {n_out} (conventions: "
                              f"{conventions.get('outputs', 'not recorded')})")
        for k in range(n_out):
            measures.append(_measure(f"output {_output_name(conventions, k)}", got_out[k],
                                     st["outputs"][k], rtol, atol))
        peer_vjps = []
        if vjp is not None:
            got_by_input: Dict[int, list] = {i: [] for i in argnums}
            for j in range(n_dir):
                g = list(vjp(inputs, pack(st["cotangents"][j])))
                if len(g) != len(argnums):
                    raise OracleError(f"vjp returned {len(g)} cotangents, the oracle differentiates "
                                      f"inputs {argnums}")
                g = [_sym(np.asarray(gi, float)) if i in symmetric else np.asarray(gi, float)
                     for i, gi in zip(argnums, g)]
                peer_vjps.append(g)
                for i, gi in zip(argnums, g):
                    got_by_input[i].append(gi)
            for n, i in enumerate(argnums):
                measures.append(_measure(f"VJP input {_input_name(conventions, i)}",
                                         np.stack(got_by_input[i]),
                                         np.stack([st["vjps"][j][n] for j in range(n_dir)]),
                                         rtol, atol))
        else:
            notes.append("no vjp given: VJPs not compared")
        got = None
        if jvp is not None:
            try:
                got = [_parts(jvp(inputs, tuple(st["tangents"][j]))) for j in range(n_dir)]
            except JVPUnavailable as exc:
                notes.append(f"the peer's jvp is unavailable ({exc})")
        if got is not None:
            source = "jvp"
            for k in range(n_out):
                measures.append(_measure(f"JVP output {_output_name(conventions, k)}",
                                         np.stack([g[k] for g in got]),
                                         np.stack([st["jvps"][j][k] for j in range(n_dir)]),
                                         rtol, atol))
        elif vjp is not None and jvp_from != "fd":
            source = "adjoint identity"
            measures.extend(_jvps_by_adjoint(vjp, inputs, st, peer_vjps, pack, argnums, symmetric,
                                             conventions, rtol, atol))
            notes.append("JVPs compared through the peer's VJPs, per output component k: "
                         "<J^T (u_j on k), t_m> vs the stored <u_jk, (J t_m)_k> "
                         "(scale: sum |u_jk (J t_m)_k|)")
        else:
            source = "FD of fn"
            rel_noise = _noise_model(noise)
            joint = _Joint(fn, inputs, argnums)
            f_max = max((float(np.abs(o).max(initial=0.0)) for o in got_out), default=0.0)
            got, errs = [], []
            for j in range(n_dir):
                v, e = _fd(joint, joint.flat(st["tangents"][j]), rel_noise, f_max, None)
                got.append(v)
                errs.append(e)
            for k in range(n_out):
                allowance = max(float(e[k].max(initial=0.0)) for e in errs)
                measures.append(_measure(f"JVP output {_output_name(conventions, k)}",
                                         np.stack([g[k] for g in got]),
                                         np.stack([st["jvps"][j][k] for j in range(n_dir)]),
                                         rtol, atol, allowance))
            notes.append("JVPs by finite differences of fn (requested or no vjp), noise "
                         + ("measured along each tangent (ECnoise, as check_grad)"
                            if rel_noise == "auto" else f"{rel_noise:.1e} relative")
                         + " in the allowance")
        for prefix in ("output", "VJP", "JVP"):
            _zero_references(measures, prefix, rtol, atol, notes)
        results.append(CaseComparison(case=c, seed=case["seed"], measures=measures,
                                      jvp_source=source, notes=notes))
    return OracleReport(layer=header["layer"], cases=results, rtol=rtol, atol=atol,
                        conventions=conventions, rtol_reason=rtol_reason, file_check=file_check)
