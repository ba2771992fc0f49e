r"""``check_grad``: autograd derivatives of any function against finite differences.

For a function ``fn(*inputs) -> array or tuple of arrays`` and each
differentiable input ``x_i`` (others held fixed), with ``J_i = d out / d x_i``
the Jacobian of the flattened output:

reverse mode (``"rev"``, VJPs)
    the dot-product test ``<J_i^T u, v> = <u, J_i v>`` along seeded random
    cotangents ``u`` and directions ``v``; for small inputs the whole Jacobian,
    its rows ``J_i^T e_k`` (or ``J_i^T u`` for large outputs) compared entry by
    entry with the finite-difference Jacobian.
forward mode (``"fwd"``, JVPs)
    ``J_i v`` entry by entry; for small inputs every column ``J_i e_j``.
second order (``order=2``)
    with the scalar reduction ``s(x) = <w, out(x)>`` (``w`` a seeded random
    linear functional) and ``h(x) = grad s(x)`` (the gradient in every
    differentiable input, concatenated), the Hessian blocks ``d h / d x_i`` are
    checked like a first-order Jacobian: ``"rev"`` uses reverse over reverse
    (``grad`` of ``grad``), ``"fwd"`` forward over reverse, and the reference is
    the finite difference of the autograd gradient ``h``.

Directions are scaled per entry, ``v_j = entry_scales(x)_j z_j`` with
``z ~ N(0, 1)``, so badly scaled inputs are probed at their own size.  Each
finite difference is a Richardson-extrapolated central difference that comes
with an error estimate ``e`` (:mod:`verification.finite_differences`); an
entry passes when

.. math::
    |AD - FD| \le e + \frac{2\,\mathrm{noise}\,\|f\|_\infty}{t}
                 + \mathrm{ad\_rtol} \max(|FD|, |AD|) + \mathrm{atol} + \mathrm{rtol}\,|FD|,

so the default tolerance comes from the finite-difference error estimate: ``e``
plus the effect of output noise of relative size ``noise`` (64 eps by default;
a forward solver is accurate to a few ulps times its conditioning) on a
difference with base step ``t``; ``ad_rtol`` = 1e-12 is the rounding
allowance of the AD side, taken norm-wise over one comparison group; ``rtol``
and ``atol`` are explicit and default to 0.

**Noisy forwards** (issue 10 item 7).  Without an explicit ``noise=``, the
finite differences first *measure* the forward's noise along every direction
from a difference table (Moré & Wild's ECnoise,
:func:`verification.finite_differences.estimate_noise`), put it in ``e``, take a
step that balances it against truncation, never shrink the step into it, and
take one-sided differences where the output is piecewise linear with a kink
inside the stencil.  A failure whose gap is within ten times the noise part of
its bound is reported as possibly caused by noise.

**Inaccurate forwards** (item 8).  The finite differences differentiate the
solver's actual output map, whose stopping error ``e(x)`` has a derivative of
its own.  :func:`forward_error` measures the relative solution error
``tau = |J^{-1} F(y)| / |y|`` of every implicit layer inside ``fn`` (one Newton
correction, a-posteriori); ``min(FORWARD_AMPLIFICATION tau, FORWARD_ALLOWANCE_MAX)``
(``1e3 tau``, at most ``1e-5``) is added to ``ad_rtol``, and the report says
whether a failing gap lies within ``1e3 tau`` (explained by the forward) or not.
:func:`verification.diagnose` gives the finer error bar of the IFT gradient itself.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from numbers import Number
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import autograd.numpy as anp
import numpy as onp
from autograd import make_jvp, make_vjp
from nimplicit.errors import (DTypeError, EmptyInputError, NimplicitError, NonFiniteError,
                              OptionError, ShapeError)

from . import finite_differences as fdiff

AD_RTOL = 1e-12
NOISE = 64 * float(onp.finfo(float).eps)
# Output noise is not aligned with a random cotangent u: its effect on <u, e> is
# bounded by NOISE_SIGMAS standard deviations, |u|_2 |e|_inf, not by |u|_1 |e|_inf.
NOISE_SIGMAS = 3.0
FULL_JACOBIAN_MAX = 8
#: The finite differences differentiate the solver's *actual* output map, whose
#: stopping error e(x) (relative size tau) has a derivative of up to about
#: (iterations / convergence rate) * tau; this factor bounds that ratio.
FORWARD_AMPLIFICATION = 1e3
#: Forward errors below this are rounding, already in the FD error model.
FORWARD_MIN = 1e-12
#: The forward allowance never exceeds this: a 1e-4 relative error stays visible.
FORWARD_ALLOWANCE_MAX = 1e-5
FULL_ROWS_MAX = 64
MODES = ("rev", "fwd")


class GradientMismatch(NimplicitError, AssertionError):
    """Autograd derivatives disagree with finite differences beyond the tolerance.

    The :class:`GradCheckReport` is attached as ``.report``.
    """

    def __init__(self, report: "GradCheckReport"):
        self.report = report
        super().__init__("gradient check failed:\n" + report.summary(failures_only=True))


# ------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------

MODE_LABELS = {(1, "rev"): "VJP", (1, "fwd"): "JVP",
               (2, "rev"): "HVP rev-over-rev", (2, "fwd"): "HVP fwd-over-rev"}


@dataclass
class CheckResult:
    """One comparison group: one input, one mode, one order.

    Attributes
    ----------
    input : index of the input in ``fn``'s argument list.
    mode : ``"rev"`` (VJP / reverse over reverse) or ``"fwd"`` (JVP / forward over reverse).
    order : 1 or 2.
    kind : ``"dot"`` (the scalar ``<u, J v>``), ``"jvp"`` (``J v`` entry by entry),
        ``"vjp"`` (``J^T u`` entry by entry), ``"jacobian"`` (every entry of ``J``).
    n_compared : number of compared numbers.
    max_abs_error : ``max |AD - FD|``.
    max_rel_error : ``max |AD - FD| / max |FD|`` (norm-wise over the group).
    worst_index : index of the entry with the largest ``|AD - FD| / tolerance``.
    worst_where : that index in words (direction, output entry, input entry).
    worst_ad, worst_fd, worst_fd_error, worst_tolerance : its values.
    fd_error : the largest finite-difference error bound in the group,
        relative to ``max(|FD|, |AD|)``.
    passed : every entry within its tolerance.
    resolvable : ``max(|FD|, |AD|)`` exceeds the FD error bound; when False the
        derivative is zero at the resolution of finite differences (e.g. the
        Hessian of a piecewise-linear map) and ``max_rel_error`` compares noise
        with noise: read ``max_abs_error`` and ``passed`` instead.
    worst_noise_error : the part of the worst entry's FD error bound due to the
        forward's noise measured by ECnoise (0 when none was measured).
    kinks : compared entries whose finite difference was one-sided because the
        forward is piecewise linear with a kink inside the stencil.
    """
    input: int
    mode: str
    order: int
    kind: str
    n_compared: int
    max_abs_error: float
    max_rel_error: float
    worst_index: Tuple[int, ...]
    worst_where: str
    worst_ad: float
    worst_fd: float
    worst_fd_error: float
    worst_tolerance: float
    fd_error: float
    passed: bool
    resolvable: bool = True
    worst_noise_error: float = 0.0
    kinks: int = 0

    @property
    def noise_suspect(self) -> bool:
        """Failed, but the forward's measured noise is at least a tenth of the
        worst gap: the mismatch may come from the noise, not the derivative."""
        gap = abs(self.worst_ad - self.worst_fd)
        return (not self.passed) and self.worst_noise_error >= 0.1 * gap and gap > 0

    @property
    def label(self) -> str:
        return MODE_LABELS[(self.order, self.mode)]


@dataclass
class GradCheckReport:
    """Result of :func:`check_grad`: one :class:`CheckResult` per input, mode and order."""
    results: List[CheckResult] = field(default_factory=list)
    n_evals: int = 0
    seconds: float = 0.0
    seed: int = 0
    rtol: float = 0.0
    atol: float = 0.0
    forward_error: float = 0.0
    forward_allowance: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def __bool__(self) -> bool:
        return self.passed

    def select(self, mode: Optional[str] = None, order: Optional[int] = None,
               input: Optional[int] = None) -> List[CheckResult]:
        return [r for r in self.results if (mode is None or r.mode == mode)
                and (order is None or r.order == order) and (input is None or r.input == input)]

    def worst_rel(self, mode: Optional[str] = None, order: Optional[int] = None) -> float:
        """Largest ``max_rel_error`` over the selected, resolvable results
        (0.0 when every selected derivative is zero at FD resolution, NaN if
        nothing is selected)."""
        sel = self.select(mode, order)
        if not sel:
            return float("nan")
        return max((r.max_rel_error for r in sel if r.resolvable), default=0.0)

    def failures(self) -> List[CheckResult]:
        return [r for r in self.results if not r.passed]

    def raise_if_failed(self) -> "GradCheckReport":
        if not self.passed:
            raise GradientMismatch(self)
        return self

    def summary(self, failures_only: bool = False) -> str:
        rows = [r for r in self.results if not (failures_only and r.passed)]
        head = (f"{'input':>5} {'check':<17} {'kind':<8} {'n':>5} {'max abs err':>11} "
                f"{'max rel err':>11} {'FD err':>9}  worst entry: AD vs FD (FD error, tolerance)")
        lines = [head]
        for r in rows:
            lines.append(
                f"{r.input:>5} {r.label:<17} {r.kind:<8} {r.n_compared:>5} {r.max_abs_error:>11.3e} "
                f"{r.max_rel_error:>11.3e} {r.fd_error:>9.1e}  {r.worst_where}: {r.worst_ad:.12g} vs "
                f"{r.worst_fd:.12g} ({r.worst_fd_error:.2g}, {r.worst_tolerance:.2g}) "
                f"{'ok' if r.passed else 'FAIL'}{'' if r.resolvable else ' (zero at FD resolution)'}"
                f"{f' [{r.kinks} one-sided at kinks]' if r.kinks else ''}")
            if r.noise_suspect:
                lines.append(
                    f"      -> noise, not the derivative, may be the cause: the forward's measured "
                    f"noise contributes {r.worst_noise_error:.2g} to the FD error bound of the worst "
                    f"entry, against a gap of {abs(r.worst_ad - r.worst_fd):.2g}; tighten the forward "
                    f"solver's tolerance, or declare its accuracy with noise= (relative to |f|)")
        if self.forward_error > FORWARD_MIN:
            lines.append(self._forward_note())
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failures())} of {len(self.results)})"
        lines.append(f"{verdict}: {self.n_evals} function evaluations for finite differences, "
                     f"{self.seconds:.2f} s, seed {self.seed}")
        return "\n".join(lines)

    __str__ = summary

    def _forward_note(self) -> str:
        """The a-posteriori error bar of the forward, and whether it explains the gaps."""
        bar = FORWARD_AMPLIFICATION * self.forward_error
        note = (f"forward solution error |J^-1 F(y)| / |y| = {self.forward_error:.2g} (a-posteriori, "
                f"from the residual): finite differences of the solver's output may differ from the "
                f"implicit gradient by up to ~{bar:.2g} relative; allowance used {self.forward_allowance:.2g}")
        failed = [r for r in self.failures() if r.resolvable]
        if failed:
            worst = max(r.max_rel_error for r in failed)
            if worst <= bar:
                note += (f"; the worst failing gap ({worst:.2g}) IS within that bar: the forward's "
                         f"accuracy, not the derivative, may be the cause (tighten the solver)")
            else:
                note += f"; the worst failing gap ({worst:.2g}) is NOT explained by it"
        return note

    def to_dict(self) -> Dict[str, Any]:
        return {"passed": self.passed, "n_evals": self.n_evals, "seconds": self.seconds,
                "forward_error": self.forward_error, "forward_allowance": self.forward_allowance,
                "seed": self.seed, "rtol": self.rtol, "atol": self.atol,
                "results": [dict(asdict(r), label=r.label, worst_index=list(r.worst_index),
                                 noise_suspect=r.noise_suspect)
                            for r in self.results]}


# ------------------------------------------------------------------------------
# structure of inputs and outputs
# ------------------------------------------------------------------------------

class OutputLayout:
    """Flattens an output (array or tuple of arrays) to one vector, traceably."""

    def __init__(self, value, names: Optional[Sequence[str]] = None):
        self.is_tuple = isinstance(value, (tuple, list))
        parts = list(value) if self.is_tuple else [value]
        self.shapes = [onp.shape(p) for p in parts]
        self.sizes = [int(onp.prod(s, dtype=int)) for s in self.shapes]
        self.offsets = onp.concatenate([[0], onp.cumsum(self.sizes)]).astype(int)
        self.size = int(self.offsets[-1])
        self.names = list(names) if names is not None else \
            [f"out[{k}]" if self.is_tuple else "out" for k in range(len(parts))]

    def flatten(self, value):
        # a traced tuple output is an autograd SequenceBox: index it, do not convert it
        parts = [value[k] for k in range(len(self.shapes))] if self.is_tuple else [value]
        shapes = [tuple(anp.shape(p)) for p in parts]
        if shapes != [tuple(s) for s in self.shapes]:
            raise ValueError(f"fn returned outputs of shapes {shapes}, earlier {self.shapes}")
        pieces = [anp.reshape(p, (-1,)) for p in parts]
        return pieces[0] if len(pieces) == 1 else anp.concatenate(pieces)

    def describe(self, flat_index: int) -> str:
        k = int(onp.searchsorted(self.offsets, flat_index, side="right") - 1)
        local = flat_index - self.offsets[k]
        shape = self.shapes[k]
        idx = onp.unravel_index(local, shape) if shape else ()
        return f"{self.names[k]}[{', '.join(str(int(i)) for i in idx)}]"


def _describe_input(i: int, shape, flat_index: int) -> str:
    idx = onp.unravel_index(flat_index, shape) if shape else ()
    return f"x{i}[{', '.join(str(int(j)) for j in idx)}]"


def differentiable_argnums(inputs: Sequence[Any]) -> List[int]:
    """Indices of the inputs that are real floating point (Python floats included)."""
    nums = []
    for k, x in enumerate(inputs):
        if isinstance(x, bool):
            continue
        if isinstance(x, float) or (isinstance(x, onp.ndarray) and x.dtype.kind == "f") or \
                isinstance(x, onp.floating):
            nums.append(k)
    return nums


def _is_scalar(x) -> bool:
    return isinstance(x, Number) and not isinstance(x, onp.ndarray)


def _as_input(x_template, value):
    """``value`` (an array) converted to the kind of ``x_template`` (float or array)."""
    if _is_scalar(x_template):
        return float(onp.asarray(value))
    return onp.asarray(value, dtype=float).reshape(onp.shape(x_template))


# ------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------

@dataclass
class _Settings:
    modes: Tuple[str, ...]
    rtol: float
    atol: float
    ad_rtol: float
    noise: float
    n_directions: int
    full_max: int
    fd_step: Optional[float]
    fd_levels: int
    auto_noise: bool = True
    forward_rtol: float = 0.0


class _Group:
    """Accumulates the compared vectors of one (input, mode, order).

    Each row holds AD values, FD values and the FD error bound (estimate plus
    output-noise allowance); :meth:`finish` adds the AD rounding allowance
    ``ad_rtol * max(|FD|, |AD|)`` (norm-wise over the group) and the explicit
    ``atol + rtol |FD|``.
    """

    def __init__(self, input: int, mode: str, order: int, kind: str):
        self.input, self.mode, self.order, self.kind = input, mode, order, kind
        self.rows: list = []

    def add(self, prefix: Tuple[int, ...], ad, fd, err, describe: Callable, extra=0.0,
            noise_err=0.0, kinks=0):
        ad = onp.atleast_1d(onp.asarray(ad, dtype=float)).ravel()
        fd = onp.atleast_1d(onp.asarray(fd, dtype=float)).ravel()
        err = onp.broadcast_to(onp.asarray(err, dtype=float) + extra, fd.shape)
        noise_err = onp.broadcast_to(onp.asarray(noise_err, dtype=float), fd.shape)
        if ad.shape != fd.shape:
            raise ValueError(f"AD and FD values of different sizes {ad.shape} vs {fd.shape}")
        self.rows.append((prefix, ad, fd, err, describe, noise_err))
        self.kinks = getattr(self, "kinks", 0) + int(kinks)

    def finish(self, cfg: _Settings) -> CheckResult:
        scale = max((float(onp.max(onp.maximum(onp.abs(fd), onp.where(onp.isfinite(ad),
                                                                      onp.abs(ad), 0.0))))
                     for _, ad, fd, _, _, _ in self.rows), default=0.0)
        best_ratio, best = -1.0, None
        max_abs, max_err, n = 0.0, 0.0, 0
        for prefix, ad, fd, err, describe, noise_err in self.rows:
            diff = onp.where(onp.isfinite(ad), onp.abs(ad - fd), onp.inf)
            tol = (err + (cfg.ad_rtol + cfg.forward_rtol) * scale + cfg.atol
                   + cfg.rtol * onp.abs(fd))
            with onp.errstate(divide="ignore", invalid="ignore"):
                ratio = onp.where(diff == 0, 0.0, diff / tol)
            k = int(onp.argmax(ratio))
            if ratio[k] > best_ratio:
                best_ratio, best = float(ratio[k]), (prefix, k, ad[k], fd[k], err[k], tol[k], describe,
                                                     noise_err[k])
            max_abs = max(max_abs, float(diff.max()))
            max_err = max(max_err, float(err.max()))
            n += ad.size
        prefix, k, ad_k, fd_k, err_k, tol_k, describe, noise_k = best
        tiny = onp.finfo(float).tiny
        return CheckResult(
            input=self.input, mode=self.mode, order=self.order, kind=self.kind, n_compared=n,
            max_abs_error=max_abs, max_rel_error=max_abs / max(scale, tiny) if max_abs else 0.0,
            worst_index=tuple(int(p) for p in prefix) + (k,), worst_where=describe(prefix, k),
            worst_ad=float(ad_k), worst_fd=float(fd_k), worst_fd_error=float(err_k),
            worst_tolerance=float(tol_k), fd_error=max_err / max(scale, tiny),
            passed=bool(best_ratio <= 1.0), resolvable=bool(scale > max_err),
            worst_noise_error=float(noise_k), kinks=int(getattr(self, "kinks", 0)))


# ------------------------------------------------------------------------------
# the checker
# ------------------------------------------------------------------------------

class _Target:
    """``fn`` seen as a function of one input ``x_i`` returning a flat vector.

    :meth:`raw` (what the finite differences call) evaluates each point at most
    once per check: ``memo`` maps ``(i, bytes of x_i)`` to the values already
    computed there, under ``name`` (``"f"``: ``fn``'s flat output, ``"h"``: the
    gradient of the order-2 reduction).  With ``joint`` (a function of the whole
    argument list returning the flat output and a function computing ``h`` by a
    backward pass), the order-1 differences trace their forward passes and keep
    them (``"vjp"``), so the order-2 differences, which visit the same points
    (coordinate directions, same steps), only run the backward there.  ``fn``
    is taken as a function of its inputs: the values are the ones a second
    evaluation would return.
    """

    def __init__(self, flat_fn: Callable, inputs: Sequence[Any], i: int,
                 memo: Optional[dict] = None, name: str = "f", joint: Optional[Callable] = None):
        self.flat_fn, self.inputs, self.i = flat_fn, list(inputs), i
        self.memo, self.name, self.joint = memo, name, joint

    def _args(self, xi) -> list:
        args = list(self.inputs)
        args[self.i] = xi
        return args

    def __call__(self, xi):
        return self.flat_fn(*self._args(xi))

    def raw(self, xi):
        if self.memo is None:
            return onp.asarray(self(xi), dtype=float)
        known = self.memo.setdefault((self.i, onp.asarray(xi, dtype=float).tobytes()), {})
        if self.name == "h" and "h" not in known and "vjp" in known:
            known["h"] = onp.asarray(known.pop("vjp")(), dtype=float)
        if self.name not in known:
            if self.joint is not None:
                f, known["vjp"] = self.joint(*self._args(xi))
                known["f"] = onp.asarray(f, dtype=float)
            else:
                known[self.name] = onp.asarray(self(xi), dtype=float)
        return known[self.name]


def _directions(rng, x, k: int) -> onp.ndarray:
    """``k`` random directions scaled per entry, shape ``(k,) + x.shape``."""
    scales = fdiff.entry_scales(onp.asarray(x, dtype=float))
    return rng.standard_normal((k,) + scales.shape) * scales


def _unit(shape, j: int) -> onp.ndarray:
    e = onp.zeros(int(onp.prod(shape, dtype=int)))
    e[j] = 1.0
    return e.reshape(shape)


def _noise_error(cfg: _Settings, f_max: float, x, v) -> float:
    r"""Finite-difference error caused by noise of relative size ``noise`` in the
    output: ``2 noise |f|_inf / t`` with ``t`` the (power-of-two) base step along
    ``v``; the factor 2 bounds the Richardson weights (``4/3 + 1/3``)."""
    scales = fdiff.entry_scales(onp.asarray(x, dtype=float))
    along = 1.0 / float(onp.max(onp.abs(onp.asarray(v, dtype=float)) / scales))
    t = (cfg.fd_step or fdiff.CENTRAL_BASE_STEP) * along
    t = math.ldexp(0.5, math.frexp(t)[1])
    return 2.0 * cfg.noise * f_max / t



def _validate_check_options(modes, order, n_directions, rtol, atol, noise, full_jacobian_max,
                            fd_levels, ad_rtol, fd_step=None) -> Tuple[tuple, int]:
    """Check :func:`check_grad`'s options; raise :class:`OptionError` naming the bad one."""
    try:
        modes = tuple(modes)
    except TypeError:
        raise OptionError(f"modes must be a non-empty subset of {MODES}, got {modes!r}") from None
    if not modes or any(m not in MODES for m in modes):
        raise OptionError(f"modes must be a non-empty subset of {MODES}, got {modes}")
    if isinstance(order, bool) or order not in (1, 2):
        raise OptionError(f"order must be 1 or 2, got {order!r}")

    def integer(name, value, low):
        if isinstance(value, bool) or not isinstance(value, (int, onp.integer)) or value < low:
            raise OptionError(f"{name} must be an integer >= {low}, got {value!r}")
        return int(value)

    n_directions = integer("n_directions", n_directions, 1)
    integer("full_jacobian_max", full_jacobian_max, 0)
    integer("fd_levels", fd_levels, 1)
    if fd_step is not None and (isinstance(fd_step, bool) or not isinstance(fd_step, Number)
                                or not math.isfinite(float(fd_step)) or float(fd_step) <= 0):
        raise OptionError(f"fd_step must be a positive finite float (or None), got {fd_step!r}")
    for name, value in (("rtol", rtol), ("atol", atol), ("noise", noise), ("ad_rtol", ad_rtol)):
        if value is None and name != "ad_rtol":
            continue
        if (isinstance(value, bool) or not isinstance(value, Number)
                or not math.isfinite(float(value)) or float(value) < 0):
            raise OptionError(f"{name} must be a finite non-negative float (or None), got {value!r}")
    return modes, n_directions


def _validate_argnums(argnums, n_inputs: int) -> List[int]:
    """Return ``argnums`` as a list of valid input positions, or raise :class:`OptionError`."""
    try:
        out = list(argnums)
    except TypeError:
        raise OptionError(f"argnums must be a sequence of input positions, got {argnums!r}") from None
    for k in out:
        if isinstance(k, bool) or not isinstance(k, (int, onp.integer)) or not -n_inputs <= k < n_inputs:
            raise OptionError(f"argnums entry {k!r} is not a position of one of the {n_inputs} inputs"
                              f" (allowed: 0..{n_inputs - 1})")
    return [int(k) % n_inputs for k in out]


def _validate_output(value) -> None:
    """fn must return finite real float arrays (complex outputs would be silently cast)."""
    parts = list(value) if isinstance(value, (tuple, list)) else [value]
    for k, p in enumerate(parts):
        arr = onp.asarray(p)
        if onp.iscomplexobj(arr) or not (onp.issubdtype(arr.dtype, onp.number) or arr.dtype == onp.bool_):
            raise DTypeError(f"fn output {k} has dtype {arr.dtype}: check_grad needs real float outputs"
                             " (split complex outputs into real and imaginary parts)")
        if not onp.all(onp.isfinite(arr)):
            raise NonFiniteError(f"fn output {k} contains NaN or Inf at the given inputs:"
                                 " check at a point where fn is finite")


def _validate_input(value, k: int) -> None:
    """Differentiated inputs must be finite real numbers."""
    arr = onp.asarray(value)
    if not (onp.issubdtype(arr.dtype, onp.number) or arr.dtype == onp.bool_) or onp.iscomplexobj(arr):
        raise DTypeError(f"input {k} must be a real float array to differentiate, got dtype {arr.dtype}")
    if not onp.all(onp.isfinite(arr)):
        raise NonFiniteError(f"input {k} contains NaN or Inf: pass finite inputs")


def check_grad(fn: Callable[..., Any], *inputs: Any, modes: Sequence[str] = MODES, order: int = 1,
               rtol: Optional[float] = None, atol: Optional[float] = None, n_directions: int = 2,
               seed: int = 0, argnums: Optional[Sequence[int]] = None, noise: Optional[float] = None,
               full_jacobian_max: int = FULL_JACOBIAN_MAX, fd_step: Optional[float] = None,
               fd_levels: int = 2, ad_rtol: float = AD_RTOL, raise_on_fail: bool = False,
               fd_cache: Optional[dict] = None) -> GradCheckReport:
    r"""Check the autograd derivatives of ``fn`` against finite differences.

    Parameters
    ----------
    fn : callable
        ``fn(*inputs)`` returning an array or a tuple of arrays, differentiable
        by autograd in the inputs listed in ``argnums``.
    *inputs : float, 0-d or n-d arrays (non-float inputs are passed through).
    modes : subset of ``("rev", "fwd")``: VJPs (reverse) and JVPs (forward); at
        order 2 reverse over reverse and forward over reverse.
    order : 1 (first derivatives) or 2 (first and second derivatives).
    rtol, atol : optional extra tolerance ``atol + rtol |FD|`` added to the
        finite-difference error bound (default 0: the tolerance is the bound).
    n_directions : random directions (and cotangents) per input, for inputs
        with more than ``full_jacobian_max`` entries.
    seed : seeds every random direction, cotangent and reduction.
    argnums : inputs to differentiate (default: every float input).
    noise : relative accuracy of ``fn``'s output.  Default ``None``: the noise is
        measured (ECnoise, per direction and output, see the module notes) on
        top of ``NOISE`` = 64 eps.  An explicit value overrides the measurement:
        a forward solver's output is accurate to a few ulps times the
        condition of its problem, not to one ulp as the finite-difference
        rounding estimate assumes, and at order 2 the differenced function is
        itself an implicit gradient.  Adds ``2 noise |f|_inf / t`` to the bound
        of every compared entry (``3 |u|_2`` times that to a contraction with a
        random cotangent ``u``).
    full_jacobian_max : inputs with at most this many entries get their whole
        Jacobian (Hessian block at order 2) compared, entry by entry.
    fd_step, fd_levels : base step and Richardson levels of the finite differences.
    ad_rtol : rounding allowance of the autograd side, relative to the largest
        compared value of the group.
    raise_on_fail : raise :class:`GradientMismatch` (holding the report) on failure.
    fd_cache : a dict shared between checks of functions with the *same forward
        values* (e.g. corrupted copies of one layer): first-order finite
        differences are then computed once.

    Returns
    -------
    GradCheckReport
        Per input, mode and order: max abs and relative error, the worst
        entry's index with its AD and FD values, the FD error estimate, pass/fail.
    """
    modes, n_directions = _validate_check_options(modes, order, n_directions, rtol, atol, noise,
                                                  full_jacobian_max, fd_levels, ad_rtol, fd_step)
    cfg = _Settings(modes=modes, rtol=0.0 if rtol is None else float(rtol),
                    atol=0.0 if atol is None else float(atol), ad_rtol=float(ad_rtol),
                    noise=NOISE if noise is None else float(noise), n_directions=int(n_directions),
                    full_max=int(full_jacobian_max), fd_step=fd_step, fd_levels=int(fd_levels),
                    auto_noise=noise is None)
    inputs = list(inputs)
    argnums = differentiable_argnums(inputs) if argnums is None else _validate_argnums(argnums, len(inputs))
    if not argnums:
        raise OptionError("fn has no float input to differentiate: pass argnums=")
    for k in argnums:
        _validate_input(inputs[k], k)
    for k in argnums:
        if not _is_scalar(inputs[k]):
            inputs[k] = onp.asarray(inputs[k], dtype=float)
    start = time.perf_counter()
    rng = onp.random.default_rng(seed)
    out0 = fn(*inputs)
    _validate_output(out0)
    layout = OutputLayout(out0)
    if layout.size == 0:
        raise EmptyInputError("fn returned no output entries: nothing to check (return a non-empty array)")
    flat_fn = lambda *args: layout.flatten(fn(*args))
    report = GradCheckReport(seed=seed, rtol=cfg.rtol, atol=cfg.atol)
    cache = fd_cache if fd_cache is not None else {}
    if ("forward_error",) not in cache:
        cache[("forward_error",)] = forward_error(fn, inputs)
    report.forward_error = cache[("forward_error",)]
    if report.forward_error > FORWARD_MIN:
        cfg.forward_rtol = min(FORWARD_AMPLIFICATION * report.forward_error, FORWARD_ALLOWANCE_MAX)
        report.forward_allowance = cfg.forward_rtol

    # the order-1 probes of every input are drawn first, then the reduction w of order 2
    # (the order in which the checks used to draw them), so that the order-1 finite
    # differences can already evaluate the order-2 gradient at their points
    probes = {i: _random_probes(rng, cfg, inputs[i], layout.size) for i in argnums}
    w = rng.standard_normal(layout.size) if order == 2 else None

    def value_and_gradient(*args):
        """``fn``'s flat output at ``args`` and a function returning ``h``, the gradient of
        ``<w, flat fn>`` in every differentiated input (concatenated), from that forward."""
        def of_selected(sel):
            full = list(args)
            for k, v in zip(argnums, sel):
                full[k] = v
            return flat_fn(*full)
        vjp, value = make_vjp(of_selected)(tuple(args[k] for k in argnums))
        return value, lambda: anp.concatenate([anp.reshape(gk, (-1,)) for gk in vjp(w)])

    def flat_gradient(*args):
        return value_and_gradient(*args)[1]()

    memo: dict = {}
    for i in argnums:
        # coordinate directions (a whole Jacobian) are the same points at both orders
        joint = value_and_gradient if order == 2 and onp.size(inputs[i]) <= cfg.full_max else None
        if joint is None:
            memo[(i, onp.asarray(inputs[i], dtype=float).tobytes())] = {
                "f": onp.asarray(layout.flatten(out0), dtype=float)}
        _check_input(report, cfg, _Target(flat_fn, inputs, i, memo, "f", joint), inputs[i], i,
                     layout, 1, probes[i], cache, ("order1", i))
    if order == 2:
        glayout = OutputLayout(tuple(onp.zeros(onp.shape(inputs[k])) for k in argnums),
                               [f"d/dx{k}" for k in argnums])
        for i in argnums:
            _check_input(report, cfg, _Target(flat_gradient, inputs, i, memo, "h"), inputs[i], i,
                         glayout, 2, _random_probes(rng, cfg, inputs[i], glayout.size), {},
                         ("order2", i))
            for key in [key for key in memo if key[0] == i]:
                del memo[key]      # the kept forward passes of input i
    report.seconds = time.perf_counter() - start
    if raise_on_fail:
        report.raise_if_failed()
    return report


def forward_error(fn: Callable[..., Any], inputs: Sequence[Any]) -> float:
    r"""A-posteriori relative error of the implicit layers' solutions inside ``fn``.

    For each layer evaluated by ``fn(*inputs)`` (``nimplicit.record_points``),
    with residual ``r = F(y, x)`` at the solver's output ``y``, the Newton
    correction ``dy = -J_{F,y}^{-1} r`` (the layer's own linear solver) is
    ``y* - y`` to first order, so ``|dy| / |y|`` estimates the forward's
    relative error (bounded by ``cond(J) |r| / (|J| |y|)``).  Returns the
    largest over the layers (0.0 when there are none or a solve fails).

    Finite differences see the solver's output map ``x -> y(x)``, whose
    derivative differs from the implicit gradient by ``de/dx`` of the stopping
    error ``e = y - y*``; ``check_grad`` allows ``FORWARD_AMPLIFICATION`` times
    this error for it (capped at ``FORWARD_ALLOWANCE_MAX``).
    """
    from nimplicit import record_points
    worst = 0.0
    try:
        with record_points() as points:
            fn(*inputs)
    except NimplicitError:
        return 0.0
    for point in points:
        try:
            if point.r != point.m or not onp.any(point.res_flat):
                continue
            dy = point.solve_raw(onp.asarray(point.res_flat, dtype=float), transpose=False)
        except (NimplicitError, ArithmeticError, ValueError, RuntimeError, TypeError):
            continue
        y_norm = float(onp.linalg.norm(point.y_flat))
        if y_norm > 0 and onp.all(onp.isfinite(dy)):
            worst = max(worst, float(onp.linalg.norm(dy)) / y_norm)
    return worst


def _fd(report: GradCheckReport, cache: dict, key, compute):
    """The finite difference ``compute()``, from ``cache`` when already there."""
    if key not in cache:
        res = compute()
        cache[key] = res
        report.n_evals += res.n_evals
    return cache[key]


def _random_probes(rng, cfg: _Settings, x, M: int):
    """The random directions ``V`` (``None``: every coordinate, the whole Jacobian) and
    cotangents ``U`` of one input's check, drawn from ``rng`` (none for an empty input)."""
    n = int(onp.size(x))
    if n == 0:
        return None, None
    if n <= cfg.full_max:
        n_u = 0 if M <= FULL_ROWS_MAX else max(cfg.n_directions, 1)
        return None, rng.standard_normal((n_u, M))
    V = _directions(rng, onp.asarray(x, dtype=float), cfg.n_directions)
    return V, rng.standard_normal((cfg.n_directions, M))


def _check_input(report: GradCheckReport, cfg: _Settings, target: _Target, x, i: int,
                 layout: OutputLayout, order: int, probes, cache: dict, key) -> None:
    shape = onp.shape(x)
    n = int(onp.prod(shape, dtype=int))
    M = layout.size
    if n == 0:
        return                       # an empty input has no derivative to check
    x_arr = onp.asarray(x, dtype=float)
    f_max = _fd(report, cache, key + ("f_max",),
                lambda: _Count(float(onp.max(onp.abs(target.raw(x)), initial=0.0)), 1)).value
    # A declared output noise also enters the finite differences' own error model,
    # which knows the steps actually taken (they shrink for entries below the floor,
    # where the base-step noise term below would underestimate the amplification).
    # Without a declared noise, the finite differences measure the forward's noise
    # along each direction (ECnoise) and size their steps and error bars from it.
    fd_noise = "auto" if cfg.auto_noise else (cfg.noise * f_max if cfg.noise > NOISE else 0.0)
    fd_kw = dict(step=cfg.fd_step, levels=cfg.fd_levels, noise=fd_noise)
    if n <= cfg.full_max:
        # the whole Jacobian J (M x n) by finite differences, column by column
        jac = _fd(report, cache, key + ("jacobian",),
                  lambda: fdiff.jacobian(target.raw, x, **fd_kw))
        J_fd = onp.asarray(jac.value, dtype=float).reshape(M, n)
        noise = onp.array([_noise_error(cfg, f_max, x_arr, _unit(shape, j)) for j in range(n)])
        J_fd_err = onp.asarray(jac.error, dtype=float).reshape(M, n)
        J_err = J_fd_err + noise[None, :]
        J_noise = _flat_or_zero(jac.noise_error, (M, n))
        J_kink = _flat_or_zero(jac.kinks, (M, n)).astype(bool)
        U = probes[1]
        n_u = U.shape[0]
        if "fwd" in cfg.modes:
            group = _Group(i, "fwd", order, "jacobian")
            for j in range(n):
                ad = make_jvp(target)(x)(_as_input(x, _unit(shape, j)))[1]
                group.add((j,), ad, J_fd[:, j], J_err[:, j],
                          lambda p, k: f"d {layout.describe(k)} / d {_describe_input(i, shape, p[0])}",
                          noise_err=J_noise[:, j], kinks=J_kink[:, j].sum())
            report.results.append(group.finish(cfg))
        if "rev" in cfg.modes:
            vjp = make_vjp(target)(x)[0]
            if n_u == 0:
                group = _Group(i, "rev", order, "jacobian")
                for k in range(M):
                    ad = vjp(_unit((M,), k))
                    group.add((k,), ad, J_fd[k], J_err[k],
                              lambda p, j: f"d {layout.describe(p[0])} / d {_describe_input(i, shape, j)}",
                              noise_err=J_noise[k], kinks=J_kink[k].sum())
            else:
                group = _Group(i, "rev", order, "vjp")
                for d, u in enumerate(U):
                    group.add((d,), vjp(u), u @ J_fd,
                              onp.abs(u) @ J_fd_err + NOISE_SIGMAS * onp.linalg.norm(u) * noise,
                              lambda p, j: f"cotangent {p[0]}, {_describe_input(i, shape, j)}",
                              noise_err=onp.abs(u) @ J_noise, kinks=J_kink.any(axis=0).sum())
            report.results.append(group.finish(cfg))
        return

    V, U = probes
    fds = [_fd(report, cache, key + ("dir", d),
               lambda v=v: fdiff.directional_derivative(target.raw, x_arr, v, **fd_kw))
           for d, v in enumerate(V)]
    noises = [_noise_error(cfg, f_max, x_arr, v) for v in V]
    if "fwd" in cfg.modes:
        group = _Group(i, "fwd", order, "jvp")
        for d, (v, res, noise) in enumerate(zip(V, fds, noises)):
            group.add((d,), make_jvp(target)(x)(v)[1], res.value,
                      onp.asarray(res.error, dtype=float).ravel() + noise,
                      lambda p, k: f"direction {p[0]}, {layout.describe(k)}",
                      noise_err=_flat_or_zero(res.noise_error, (M,)),
                      kinks=_flat_or_zero(res.kinks, (M,)).astype(bool).sum())
        report.results.append(group.finish(cfg))
    if "rev" in cfg.modes:
        vjp = make_vjp(target)(x)[0]
        group = _Group(i, "rev", order, "dot")
        for d, (u, v, res, noise) in enumerate(zip(U, V, fds, noises)):
            ad = float(onp.vdot(onp.asarray(vjp(u), dtype=float).ravel(), v.ravel()))
            fd_value = onp.asarray(res.value, dtype=float).ravel()
            fd_err = onp.abs(u) @ onp.asarray(res.error, dtype=float).ravel()
            # the dot product sums |u_k (J v)_k|: its rounding allowance is taken on that sum
            group.add((d,), ad, u @ fd_value, fd_err + NOISE_SIGMAS * onp.linalg.norm(u) * noise,
                      lambda p, k: f"<u_{p[0]}, J v_{p[0]}>",
                      extra=cfg.ad_rtol * float(onp.abs(u) @ onp.abs(fd_value)),
                      noise_err=float(onp.abs(u) @ _flat_or_zero(res.noise_error, (M,))),
                      kinks=_flat_or_zero(res.kinks, (M,)).astype(bool).sum())
        report.results.append(group.finish(cfg))


def _flat_or_zero(parts, shape) -> onp.ndarray:
    """An FDResult field (array or tuple of arrays, or None) as one array of
    ``shape`` (flattened outputs first); zeros when the field is None."""
    if parts is None:
        return onp.zeros(shape)
    pieces = parts if isinstance(parts, tuple) else (parts,)
    lead = shape[1:]
    flat = [onp.asarray(p, dtype=float).reshape((-1,) + lead) for p in pieces]
    return onp.concatenate(flat, axis=0).reshape(shape)


@dataclass
class _Count:
    """A cached value that cost ``n_evals`` evaluations (same protocol as FDResult)."""
    value: Any
    n_evals: int
