r"""Oracle vectors: reference values, VJPs and JVPs of a registered layer, in a
file that any other implementation can be checked against.

File format (``.npz``, version 1; documented in ``docs/verification.rst``)
--------------------------------------------------------------------------
One NumPy ``.npz`` archive (no pickled objects) holding

``header``
    a 0-d unicode array whose text is a JSON object: ``format``
    (``"nimplicit-oracle"``), ``version`` (1), ``layer``, ``description``,
    ``conventions``, ``created`` (UTC, ISO 8601), ``versions`` (python, numpy,
    scipy, autograd, nimplicit), ``seed``, ``size`` (generator keywords),
    ``argnums`` (the differentiated inputs), ``n_directions``, ``tolerances``
    and ``cases``: a list with, per case, its ``seed``, ``inputs``
    (``[{"kind": "float"|"array", "shape": [...]}]``), ``outputs`` (shapes),
    ``output_is_tuple`` and ``check`` (the worst relative VJP/JVP errors of the
    exported values against finite differences of the forward solver).
``case{c}/input{i}``
    input ``i`` of case ``c`` (a Python float is stored as a 0-d array).
``case{c}/output{k}``
    output component ``k`` (``k = 0`` for a single array output).
``case{c}/cotangent{j}/output{k}`` and ``case{c}/vjp{j}/input{i}``
    random cotangent ``j`` (standard normal, per output component) and the
    VJP: the cotangent of every input ``i`` in ``argnums``.
``case{c}/tangent{j}/input{i}`` and ``case{c}/jvp{j}/output{k}``
    random tangent ``j`` (standard normal times ``entry_scales`` of the input,
    for every ``i`` in ``argnums`` at once) and the JVP
    ``sum_i J_i tangent_i``.

Wrapper protocol for :func:`compare`
------------------------------------
``fn(*inputs) -> output`` (a NumPy array or a tuple of them), plus optional
``vjp(inputs, cotangent) -> tuple`` (one array per entry of ``argnums``, in
that order; ``cotangent`` has the output's structure) and
``jvp(inputs, tangent) -> output tangent`` (``tangent`` is a tuple aligned
with ``argnums``).  They may be given as arguments or as attributes
``fn.vjp`` / ``fn.jvp``.  Without ``jvp`` the JVP is estimated by finite
differences of ``fn`` (with their error estimate added to the tolerance).
"""
from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as onp
from autograd import make_jvp, make_vjp

from . import finite_differences as fdiff
from .check import check_grad, differentiable_argnums
from .registry import get

FORMAT = "nimplicit-oracle"
VERSION = 1


class OracleError(ValueError):
    """An oracle file is malformed or does not fit the implementation compared with it."""


def _versions() -> Dict[str, str]:
    import autograd
    import scipy

    import nimplicit
    try:
        from importlib.metadata import version
        ag = version("autograd")
    except Exception:
        ag = getattr(autograd, "__version__", "unknown")
    return {"python": platform.python_version(), "numpy": onp.__version__,
            "scipy": scipy.__version__, "autograd": ag, "nimplicit": nimplicit.__version__}


def _parts(value) -> List[onp.ndarray]:
    return [onp.asarray(v, dtype=float) for v in value] if isinstance(value, (tuple, list)) \
        else [onp.asarray(value, dtype=float)]


class AutogradWrapper:
    """The wrapper protocol for an autograd-differentiable ``fn``: ``__call__``,
    ``vjp(inputs, cotangent)`` and ``jvp(inputs, tangent)`` on NumPy values."""

    def __init__(self, fn: Callable, argnums: Sequence[int]):
        self.fn, self.argnums = fn, list(argnums)

    def _of_selected(self, inputs):
        def F(sel):
            full = list(inputs)
            for k, v in zip(self.argnums, sel):
                full[k] = v
            return self.fn(*full)
        return F, tuple(inputs[k] for k in self.argnums)

    def __call__(self, *inputs):
        out = self.fn(*inputs)
        return tuple(_parts(out)) if isinstance(out, (tuple, list)) else onp.asarray(out, float)

    def vjp(self, inputs, cotangent):
        F, sel = self._of_selected(list(inputs))
        g = make_vjp(F)(sel)[0](tuple(cotangent) if isinstance(cotangent, list) else cotangent)
        return tuple(onp.asarray(gi, dtype=float) for gi in g)

    def jvp(self, inputs, tangent):
        F, sel = self._of_selected(list(inputs))
        tangent = tuple(float(t) if isinstance(s, float) else t for s, t in zip(sel, tangent))
        out = make_jvp(F)(sel)(tangent)[1]
        return tuple(_parts(out)) if isinstance(out, (tuple, list)) else onp.asarray(out, float)


def export(layer: str, path: str, *, cases: int = 3, seed: int = 0, n_directions: int = 2,
           verify: bool = True) -> Dict[str, Any]:
    """Write oracle vectors of the registered ``layer`` to ``path`` (see the module doc).

    With ``verify`` (default) each case is first checked by :func:`check_grad`
    against finite differences; a failing case raises
    :class:`verification.check.GradientMismatch` instead of being exported.
    Returns the header.
    """
    entry = get(layer)
    arrays: Dict[str, onp.ndarray] = {}
    header: Dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "layer": entry.name,
        "description": entry.description, "conventions": entry.conventions,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "seed": seed, "size": entry.size, "n_directions": n_directions,
        "cotangents": "standard normal, per output component",
        "tangents": "standard normal times entry_scales(input), all differentiated inputs at once",
        "tolerances": {"check_grad": "finite-difference error estimate (verification.check)",
                       "entry_rtol": entry.rtol, "entry_atol": entry.atol,
                       "recommended_compare_rtol": 1e-6},
        "cases": []}
    argnums_all = None
    for c in range(cases):
        case_seed = seed + c
        inputs = list(entry.generate(onp.random.default_rng(case_seed), **entry.size))
        argnums = list(entry.argnums) if entry.argnums is not None else differentiable_argnums(inputs)
        argnums_all = argnums if argnums_all is None else argnums_all
        if argnums != argnums_all:
            raise OracleError(f"the differentiated inputs differ between cases: {argnums} vs {argnums_all}")
        check = {}
        if verify:
            rep = check_grad(entry.fn, *inputs, argnums=argnums, seed=case_seed, rtol=entry.rtol,
                             atol=entry.atol, fd_step=entry.fd_step, noise=entry.noise,
                             raise_on_fail=True)
            check = {"vjp_rel": rep.worst_rel("rev", 1), "jvp_rel": rep.worst_rel("fwd", 1),
                     "passed": rep.passed}
        wrapper = AutogradWrapper(entry.fn, argnums)
        out = wrapper(*inputs)
        outs = _parts(out)
        rng = onp.random.default_rng([case_seed, 1])
        for i, x in enumerate(inputs):
            arrays[f"case{c}/input{i}"] = onp.asarray(x)
        for k, o in enumerate(outs):
            arrays[f"case{c}/output{k}"] = o
        for j in range(n_directions):
            cot = [rng.standard_normal(o.shape) for o in outs]
            vjp = wrapper.vjp(inputs, tuple(cot) if isinstance(out, tuple) else cot[0])
            for k, ck in enumerate(cot):
                arrays[f"case{c}/cotangent{j}/output{k}"] = ck
            for i, g in zip(argnums, vjp):
                arrays[f"case{c}/vjp{j}/input{i}"] = g
            tan = [rng.standard_normal(onp.shape(inputs[i])) * fdiff.entry_scales(inputs[i])
                   for i in argnums]
            jvp = _parts(wrapper.jvp(inputs, tuple(tan)))
            for i, t in zip(argnums, tan):
                arrays[f"case{c}/tangent{j}/input{i}"] = t
            for k, d in enumerate(jvp):
                arrays[f"case{c}/jvp{j}/output{k}"] = d
        header["cases"].append({
            "seed": case_seed,
            "inputs": [{"kind": "float" if isinstance(x, float) else "array",
                        "shape": list(onp.shape(x)), "dtype": str(onp.asarray(x).dtype)}
                       for x in inputs],
            "outputs": [list(o.shape) for o in outs], "output_is_tuple": isinstance(out, tuple),
            "check": check})
    header["argnums"] = argnums_all
    arrays["header"] = onp.array(json.dumps(header))
    with open(path, "wb") as fh:
        onp.savez_compressed(fh, **arrays)
    return header


def load(path: str):
    """``(header, arrays)`` of an oracle file (``arrays`` a dict of NumPy arrays)."""
    with onp.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if "header" not in arrays:
        raise OracleError(f"{path} has no 'header' entry: not a nimplicit oracle file")
    header = json.loads(str(arrays.pop("header")))
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise OracleError(f"{path}: format {header.get('format')!r} version "
                          f"{header.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    return header, arrays


def case_inputs(header, arrays, c: int) -> list:
    """The inputs of case ``c``, as the layer takes them (floats restored)."""
    spec = header["cases"][c]["inputs"]
    return [float(arrays[f"case{c}/input{i}"]) if s["kind"] == "float" else arrays[f"case{c}/input{i}"]
            for i, s in enumerate(spec)]


@dataclass
class CaseComparison:
    case: int
    seed: int
    output_error: float
    vjp_error: Optional[float]
    jvp_error: Optional[float]
    jvp_source: str
    passed: bool
    notes: List[str] = field(default_factory=list)


@dataclass
class OracleReport:
    """Per-case disagreement (norm-wise relative errors) of an implementation with a file."""
    layer: str
    cases: List[CaseComparison]
    rtol: float
    atol: float

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def summary(self) -> str:
        fmt = lambda v: "n/a" if v is None else f"{v:.2e}"
        lines = [f"oracle {self.layer}: rtol {self.rtol:g}, atol {self.atol:g}",
                 f"{'case':>4} {'seed':>6} {'output':>9} {'VJP':>9} {'JVP':>9}  JVP from"]
        for c in self.cases:
            lines.append(f"{c.case:>4} {c.seed:>6} {fmt(c.output_error):>9} {fmt(c.vjp_error):>9} "
                         f"{fmt(c.jvp_error):>9}  {c.jvp_source:<10} {'PASS' if c.passed else 'FAIL'}"
                         + "".join(f"\n      {n}" for n in c.notes))
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)

    __str__ = summary


def _disagreement(got: Sequence[onp.ndarray], want: Sequence[onp.ndarray], extra=None):
    """Norm-wise relative error and the allowance-normalised excess."""
    if len(got) != len(want):
        raise OracleError(f"expected {len(want)} arrays, the implementation returned {len(got)}")
    diffs, scale = [], 0.0
    for k, (g, w) in enumerate(zip(got, want)):
        g = onp.asarray(g, dtype=float)
        if g.shape != w.shape:
            raise OracleError(f"component {k}: shape {g.shape}, the oracle has {w.shape}")
        diffs.append(onp.abs(g - w))
        scale = max(scale, float(onp.abs(w).max(initial=0.0)))
    return diffs, scale


def compare(path: str, fn: Callable, vjp: Optional[Callable] = None, jvp: Optional[Callable] = None,
            *, rtol: float = 1e-6, atol: float = 1e-12) -> OracleReport:
    r"""Check an implementation against an oracle file.

    Per case, output, VJP (``vjp(inputs, cotangent)``) and JVP
    (``jvp(inputs, tangent)``, or finite differences of ``fn``) must agree with
    the file within ``|got - want| <= atol + rtol * max|want|`` (norm-wise per
    quantity; plus the finite-difference error when the JVP is estimated).
    Reported errors are ``max|got - want| / max|want|``.
    """
    header, arrays = load(path)
    vjp = vjp if vjp is not None else getattr(fn, "vjp", None)
    jvp = jvp if jvp is not None else getattr(fn, "jvp", None)
    argnums = header["argnums"]
    results = []
    for c, case in enumerate(header["cases"]):
        inputs = case_inputs(header, arrays, c)
        n_out = len(case["outputs"])
        pack = (lambda parts: tuple(parts)) if case["output_is_tuple"] else (lambda parts: parts[0])
        want_out = [arrays[f"case{c}/output{k}"] for k in range(n_out)]
        ok, notes = True, []

        def judge(diffs, scale, allowance=0.0):
            worst = max((float(d.max(initial=0.0)) for d in diffs), default=0.0)
            rel = worst / scale if scale > 0 else worst
            return rel, all(bool((d <= atol + rtol * scale + allowance).all()) for d in diffs)

        out_rel, good = judge(*_disagreement(_parts(fn(*inputs)), want_out))
        ok &= good
        vjp_rel = jvp_rel = None
        source = "jvp" if jvp is not None else "FD of fn"
        for j in range(header["n_directions"]):
            if vjp is not None:
                cot = [arrays[f"case{c}/cotangent{j}/output{k}"] for k in range(n_out)]
                got = vjp(inputs, pack(cot))
                want = [arrays[f"case{c}/vjp{j}/input{i}"] for i in argnums]
                rel, good = judge(*_disagreement(list(got), want))
                vjp_rel = max(vjp_rel or 0.0, rel)
                ok &= good
            tan = [arrays[f"case{c}/tangent{j}/input{i}"] for i in argnums]
            want = [arrays[f"case{c}/jvp{j}/output{k}"] for k in range(n_out)]
            if jvp is not None:
                rel, good = judge(*_disagreement(_parts(jvp(inputs, tuple(tan))), want))
            else:
                got, err = _fd_jvp(fn, inputs, argnums, tan, n_out)
                rel, good = judge(*_disagreement(got, want), allowance=float(max(
                    (e.max(initial=0.0) for e in err), default=0.0)))
            jvp_rel = max(jvp_rel or 0.0, rel)
            ok &= good
        if vjp is None:
            notes.append("no vjp given: VJPs not compared")
        results.append(CaseComparison(case=c, seed=case["seed"], output_error=out_rel,
                                      vjp_error=vjp_rel, jvp_error=jvp_rel, jvp_source=source,
                                      passed=bool(ok), notes=notes))
    return OracleReport(layer=header["layer"], cases=results, rtol=rtol, atol=atol)


def _fd_jvp(fn, inputs, argnums, tangent, n_out):
    """JVP of ``fn`` along the joint ``tangent`` by finite differences (value, error)."""
    base = [onp.asarray(inputs[i], dtype=float) for i in argnums]
    sizes = [b.size for b in base]
    offsets = onp.concatenate([[0], onp.cumsum(sizes)]).astype(int)

    def f(z):
        full = list(inputs)
        for n, i in enumerate(argnums):
            piece = z[offsets[n]:offsets[n + 1]].reshape(base[n].shape)
            full[i] = float(piece) if isinstance(inputs[i], float) else piece
        return tuple(_parts(fn(*full)))

    z0 = onp.concatenate([b.ravel() for b in base])
    v = onp.concatenate([onp.asarray(t, dtype=float).ravel() for t in tangent])
    res = fdiff.directional_derivative(f, z0, v)
    return list(res.value), list(res.error)
