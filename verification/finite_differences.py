"""Finite-difference derivatives with error estimates, for gradient checking.

Everything here is plain NumPy: the function under test is treated as a black
box that maps an array (or a Python float) to an array, a float, or a tuple of
arrays.  Each estimate comes with an elementwise error estimate, so a gradient
checker can compare an analytic derivative ``g`` against a finite-difference
estimate ``d`` with ``|g - d| <= d_err + tolerance`` rather than with an
arbitrary tolerance.

Two methods are provided:

``"central"`` (default)
    Central differences ``D(t) = (f(x + t v) - f(x - t v)) / (2 t)`` on the
    halved steps ``t, t/2, t/4, ...`` combined by Richardson extrapolation,
    which removes the ``t**2``, ``t**4``, ... terms of the error expansion.
``"complex"`` (opt-in)
    The complex step ``Im f(x + i t v) / t``, which involves no subtraction and
    is accurate to rounding for functions that are analytic and implemented
    with complex-safe operations (no ``abs``, ``.real``, comparisons, casts).

Steps are relative to the per-entry sizes ``max(|x_i|, floor)`` of ``x``
(:func:`entry_scales`), so entries of very different magnitudes are each
perturbed in proportion to their own size by :func:`jacobian` (zeros, and
by default all entries below 1, get an absolute step).  With the default
step, a few more steps are tried when the first one is questionable (see
:func:`directional_derivative`), and estimates made with different steps
are cross-checked.

Outputs keep the structure of ``f``'s output: if ``f`` returns a tuple of
arrays, ``FDResult.value`` and ``FDResult.error`` are tuples of arrays of the
corresponding shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Number
from typing import Any, Callable, Literal, Union

import numpy as np
from nimplicit.errors import DTypeError, NonFiniteError, OptionError, ShapeError

__all__ = [
    "DEFAULT_FLOOR",
    "FDResult",
    "NoiseEstimate",
    "directional_derivative",
    "entry_scales",
    "estimate_noise",
    "jacobian",
]

_EPS = float(np.finfo(np.float64).eps)

#: Default lower bound used by :func:`entry_scales`: entries smaller than this
#: in magnitude (in particular zeros) are treated as having this size, i.e.
#: get an absolute rather than a relative step.  Nonzero entries below it also
#: get a second opinion from a step proportional to themselves.
DEFAULT_FLOOR = 1.0

#: Default relative base step of the central method, ``eps**(1/3)``: it
#: balances the ``t**2`` truncation error of a single central difference
#: against the ``eps / t`` rounding error.
CENTRAL_BASE_STEP = _EPS ** (1.0 / 3.0)

#: Default relative step of the complex-step method.  There is no
#: cancellation, so the step only has to make the ``t**2`` truncation error
#: negligible while staying far from underflow.
COMPLEX_BASE_STEP = 2.0**-60

# Safety factors of the error estimate (see ``directional_derivative``).
_TRUNCATION_SAFETY = 2.0
_ROUNDING_SAFETY = 4.0

# Automatic step reduction (central method, default step only): an output
# whose error estimate exceeds this relative level and is dominated by
# truncation triggers a retry with a smaller step, at most ``_MAX_ADAPT`` times.
_ADAPT_RTOL = 1e-8
_MAX_ADAPT = 6
# Extra steps tried to settle estimates that no other step confirms.
_MAX_BISECT = 3

Output = Union[np.ndarray, tuple]
Method = Literal["central", "complex"]


@dataclass(frozen=True)
class FDResult:
    """A finite-difference estimate together with its error estimate.

    Attributes
    ----------
    value : ndarray or tuple of ndarray
        The derivative estimate.  Has the structure of the output of ``f``:
        a tuple of arrays if ``f`` returns a tuple (or list) of arrays, an
        array (possibly 0-d) otherwise.
    error : ndarray or tuple of ndarray
        Elementwise error estimate of ``value`` (same structure and shapes,
        entries ``>= 0``), meant as an upper bound on ``|value - truth|``.
        See :func:`directional_derivative` for what it does and does not
        guarantee.
    n_evals : int
        Number of evaluations of ``f`` used.
    noise : ndarray or tuple of ndarray or None
        With ``noise="auto"``: the absolute noise level of each output of ``f``
        estimated along the direction (the largest over the columns of a
        :func:`jacobian`), see :func:`estimate_noise`; else ``None``.
    noise_error : ndarray or tuple of ndarray or None
        The part of ``error`` due to that noise (``4 G noise``, ``G`` the gain of
        the step taken); ``None`` without ``noise="auto"``.
    kinks : ndarray or tuple of ndarray or None
        Boolean: outputs found piecewise linear with a kink inside the stencil,
        whose value is then a one-sided difference (see :func:`directional_derivative`).
    """

    value: Output
    error: Output
    n_evals: int
    noise: Output | None = None
    noise_error: Output | None = None
    kinks: Output | None = None


# ---------------------------------------------------------------------------
# Scales and steps
# ---------------------------------------------------------------------------


def entry_scales(x: Any, floor: float = DEFAULT_FLOOR) -> np.ndarray:
    """Per-entry typical size of ``x``.

    Computes ``s_i = max(|x_i|, floor)``.  The floor keeps entries that are
    zero (or negligibly small) from getting a zero scale, hence a zero step
    (or a zero direction component when directions are scaled by it).
    Above the floor, entries are taken at face value.

    Parameters
    ----------
    x : array_like or float
        Point at which derivatives are taken.
    floor : float, optional
        Positive lower bound of the scales (default :data:`DEFAULT_FLOOR`).

    Returns
    -------
    ndarray
        Float array of the same shape as ``x`` with entries ``>= floor``.
    """
    if not floor > 0 or not math.isfinite(floor):
        raise OptionError(f"floor must be positive and finite, got {floor!r}")
    return np.maximum(np.abs(np.asarray(x)).astype(np.float64), float(floor))


def _scale_along(v: np.ndarray, scales: np.ndarray) -> float:
    """Return ``s = 1 / max_i(|v_i| / scales_i)``.

    With ``t = base * s`` no entry moves by more than ``base * scales_i``
    along ``x + t v``; for ``v = e_i`` this is ``s = scales_i``.
    """
    ratio = float(np.max(np.abs(v) / scales))
    return 1.0 / ratio


def _pow2_floor(t: float) -> float:
    """Largest power of two ``<= t``.

    Power-of-two steps make ``t * v`` and all the halved steps exact, and for
    coordinate directions usually make ``x +- t e_i`` exact as well.
    """
    return math.ldexp(0.5, math.frexp(t)[1])


# ---------------------------------------------------------------------------
# Evaluation of f: flattening, structure checks, non-finite detection
# ---------------------------------------------------------------------------


class _NonFiniteError(NonFiniteError):
    """f returned NaN or Inf at one of the sample points."""


class _Evaluator:
    """Calls ``f`` and flattens its output into one 1-d array.

    Records the output structure on the first call and checks that later
    calls return the same structure, and counts the evaluations.
    """

    def __init__(self, f: Callable[[Any], Any], scalar_input: bool, context: str = ""):
        self.f = f
        self.scalar_input = scalar_input
        self.context = context
        self.n_evals = 0
        self.is_tuple: bool | None = None
        self.shapes: list[tuple[int, ...]] | None = None
        self.eps = _EPS

    def __call__(self, point: np.ndarray, t: float, label: str = "x + t*v") -> np.ndarray:
        # np.array also turns the numpy scalars that 0-d arithmetic returns back into 0-d arrays.
        arg = point.item() if self.scalar_input else np.array(point)
        # Stencils may leave the domain of f; non-finite results are checked
        # below, so NumPy's floating-point warnings would only be noise (or
        # errors, under warnings-as-errors filters).
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out = self.f(arg)
        self.n_evals += 1
        is_tuple = isinstance(out, (tuple, list))
        parts = [np.asarray(o) for o in out] if is_tuple else [np.asarray(out)]
        for p in parts:
            if not (np.issubdtype(p.dtype, np.number) or p.dtype == np.bool_):
                raise DTypeError(f"f must return numeric arrays, got dtype {p.dtype}")
        shapes = [p.shape for p in parts]
        if self.shapes is None:
            self.is_tuple, self.shapes = is_tuple, shapes
            # A low-precision output (float32, ...) rounds at its own epsilon.
            for p in parts:
                if np.issubdtype(p.dtype, np.inexact):
                    self.eps = max(self.eps, float(np.finfo(p.dtype).eps))
        elif is_tuple != self.is_tuple or shapes != self.shapes:
            raise ShapeError(
                "f returned outputs of inconsistent structure/shapes: "
                f"{shapes} (tuple={is_tuple}) vs {self.shapes} (tuple={self.is_tuple})"
            )
        flat = (
            np.concatenate([p.ravel() for p in parts])
            if parts
            else np.zeros(0)
        )
        if not np.iscomplexobj(flat):
            flat = flat.astype(np.float64)
        if not np.all(np.isfinite(flat)):
            raise _NonFiniteError(
                f"f returned non-finite values (NaN or Inf) at {label} with t = {t!r}"
                f"{self.context}; the finite-difference stencil left the domain of f "
                "or f overflowed (pass a smaller `step` or `floor`, or another point)"
            )
        return flat

    def unflatten(self, flat: np.ndarray, trailing: tuple[int, ...] = ()) -> Output:
        """Split a flat array (of shape ``(n_out,) + trailing``) into ``f``'s structure."""
        assert self.shapes is not None
        pieces = []
        start = 0
        for shape in self.shapes:
            size = int(np.prod(shape, dtype=np.int64))
            pieces.append(flat[start : start + size].reshape(shape + trailing))
            start += size
        return tuple(pieces) if self.is_tuple else pieces[0]


def _prepare_x(x: Any) -> tuple[np.ndarray, bool]:
    """Return ``x`` as a float64 (or complex128) array and whether it was a Python scalar."""
    scalar_input = isinstance(x, Number)
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        raise DTypeError(f"x must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.complex128 if np.iscomplexobj(arr) else np.float64)
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError("x contains non-finite (NaN or Inf) entries: pass a finite point")
    return arr, scalar_input


# ---------------------------------------------------------------------------
# Noise of f: Moré & Wild's ECnoise difference table
# ---------------------------------------------------------------------------

#: Points of the ECnoise sample ``g(k h)``, ``k = -4 .. 4``.
NOISE_POINTS = 9
#: Relative spacing of the ECnoise sample along ``v`` (in units of the scale
#: of ``x`` along ``v``): small enough that the smooth part of ``f`` has
#: negligible 3rd to 6th differences, large enough for ``f`` to move.
NOISE_STEP = 2.0**-24
# Largest relative step the noise-derived step may take.
_MAX_NOISE_STEP = 2.0**-7
# A noise estimate below this multiple of eps |f| is taken as plain rounding
# (already in the rounding model): ECnoise then adds nothing.
_NOISE_ROUNDING = 2.0


@dataclass(frozen=True)
class NoiseEstimate:
    """The noise of ``g(t) = f(x + t v)`` estimated from a difference table.

    Attributes
    ----------
    noise : ndarray
        Absolute noise level (standard deviation) of each flattened output.
    detected : ndarray of bool
        Outputs whose difference table showed noise (Moré & Wild's test
        passed); elsewhere ``noise`` is an upper bound from the table's
        highest-order levels (``f`` looked smooth or constant at spacing ``h``).
    h : float
        The spacing used (absolute, along ``v``).
    f0 : ndarray
        ``f(x)``, flattened.
    n_evals : int
    """

    noise: np.ndarray
    detected: np.ndarray
    h: float
    f0: np.ndarray
    n_evals: int


def _noise_levels(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""ECnoise on samples of shape ``(n_points, n_out)``.

    With ``Delta^k`` the ``k``-th forward differences of the samples,
    ``sigma_k = sqrt(gamma_k mean((Delta^k)^2))`` and
    ``gamma_k = (k!)^2 / (2k)!``: for i.i.d. noise of standard deviation
    ``sigma``, ``E (Delta^k)^2 = sigma^2 / gamma_k``, so every ``sigma_k``
    estimates ``sigma`` while the smooth part contributes ``O(h^k)``, which
    vanishes with ``k``.  Moré & Wild accept ``sigma_k`` when three
    consecutive levels agree within a factor 4 and ``Delta^k`` changes sign
    (noise, not a smooth trend).  Returns ``(noise, detected, bound)``, with
    ``bound = min_k sigma_k`` (``k >= 3``) used where nothing is detected.
    """
    n_pts = samples.shape[0]
    table = samples
    levels, signs = [], []
    gamma = 1.0
    for k in range(1, n_pts):
        gamma *= 0.5 * k / (2.0 * k - 1.0)
        table = np.diff(table, axis=0)
        levels.append(np.sqrt(gamma * np.mean(table**2, axis=0)))
        signs.append((table.min(axis=0) < 0) & (table.max(axis=0) > 0))
    levels_a = np.array(levels)  # (n_pts - 1, n_out), level k at index k-1
    noise = np.zeros(samples.shape[1])
    detected = np.zeros(samples.shape[1], dtype=bool)
    for k in range(n_pts - 3):
        window = levels_a[k : k + 3]
        ok = (window.max(axis=0) <= 4.0 * window.min(axis=0)) & signs[k] & ~detected
        ok &= window.min(axis=0) > 0
        noise = np.where(ok, levels_a[k], noise)
        detected |= ok
    bound = levels_a[2:].min(axis=0)
    return np.where(detected, noise, bound), detected, bound


def _estimate_noise_flat(call: "_Evaluator", x: np.ndarray, v: np.ndarray, scales: np.ndarray,
                         h: float | None = None) -> NoiseEstimate:
    s = _scale_along(v, scales)
    nz = v != 0
    if np.all(x[nz] != 0):
        # Entries below the floor may be the scale f varies on: sample at the
        # smaller of the floored and the raw scales, so that smooth variation
        # is not mistaken for noise.
        s = min(s, 1.0 / float(np.max(np.abs(v[nz]) / np.abs(x[nz]))))
    h_abs = _pow2_floor(max((NOISE_STEP if h is None else h) * s, 1e-280))
    half = NOISE_POINTS // 2
    start = call.n_evals
    samples = np.stack([call(x + (k * h_abs) * v, k * h_abs, label="x + k*h*v (noise sample)")
                        for k in range(-half, half + 1)])
    if np.iscomplexobj(samples):
        samples = samples.real
    noise, detected, _ = _noise_levels(samples)
    f0 = samples[half]
    # Plain rounding is in the rounding model already: only excess noise counts.
    rounding = _NOISE_ROUNDING * call.eps * np.max(np.abs(samples), axis=0)
    noise = np.where(noise > rounding, noise, 0.0)
    return NoiseEstimate(noise, detected & (noise > 0), h_abs, f0, call.n_evals - start)


def estimate_noise(f: Callable[[Any], Any], x: Any, v: Any, *, h: float | None = None,
                   floor: float = DEFAULT_FLOOR) -> NoiseEstimate:
    r"""Estimate the noise level of ``f`` along ``v`` at ``x`` (Moré & Wild, ECnoise).

    ``f`` is sampled at the ``9`` points ``x + k h_a v``, ``k = -4 .. 4``, with
    ``h_a = h s`` rounded down to a power of two (``s`` the scale of ``x``
    along ``v``, as for the steps of :func:`directional_derivative`, or the
    raw one from ``|x_i|`` when smaller and no entry on ``v``'s support is 0; default
    ``h = NOISE_STEP = 2**-24``).  Per output, the difference table gives
    the levels

    .. math::
        \sigma_k = \Big(\gamma_k \frac{1}{9-k}\sum_i (\Delta^k g_i)^2\Big)^{1/2},
        \qquad \gamma_k = \frac{(k!)^2}{(2k)!},

    each an estimate of the noise's standard deviation once ``k`` is large
    enough for the smooth part (``O(h_a^k |g^{(k)}|)``) to be negligible.
    The noise is the first ``sigma_k`` such that ``sigma_k, sigma_{k+1},
    sigma_{k+2}`` agree within a factor 4 and ``Delta^k`` changes sign
    (J. J. Moré and S. M. Wild, *Estimating computational noise*, SIAM J.
    Sci. Comput. 33 (2011) 1292-1314).  Where that test fails the output is
    smooth or constant at this spacing and ``min_{k>=3} sigma_k`` is
    returned as an upper bound.  Levels below ``2 eps |f|`` are rounding,
    which the finite differences model already, and are returned as 0.

    Returns
    -------
    NoiseEstimate
        ``noise`` and ``detected`` flattened over ``f``'s outputs (tuple
        outputs concatenated in order).
    """
    x_arr, scalar_input = _prepare_x(x)
    v_arr = np.asarray(v, dtype=np.float64)
    if v_arr.shape != x_arr.shape or not np.any(v_arr):
        raise ValueError("v must be a nonzero direction of x's shape")
    call = _Evaluator(f, scalar_input)
    return _estimate_noise_flat(call, x_arr, v_arr, entry_scales(x_arr, floor), h)


# ---------------------------------------------------------------------------
# Central differences + Richardson extrapolation
# ---------------------------------------------------------------------------


def _richardson_tableau(d: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Richardson tableau for central differences on steps ``t / 2**i``.

    ``T[i][k] = T[i][k-1] + (T[i][k-1] - T[i-1][k-1]) / (4**k - 1)`` removes
    the ``t**(2k)`` term; ``T[i][0] = d[i]``.
    """
    table: list[list[np.ndarray]] = []
    for i, di in enumerate(d):
        row = [di]
        for k in range(1, i + 1):
            row.append(row[k - 1] + (row[k - 1] - table[i - 1][k - 1]) / (4.0**k - 1.0))
        table.append(row)
    return table


def _richardson_weights(levels: int) -> np.ndarray:
    """Weights ``w`` with ``T[L-1][L-1] = sum_i w_i d_i`` (linear in the ``d_i``)."""
    unit = [np.eye(levels)[i] for i in range(levels)]
    return _richardson_tableau(unit)[-1][-1]


@dataclass
class _Estimate:
    """Elementwise estimate over the flattened outputs of ``f``."""

    value: np.ndarray
    truncation: np.ndarray
    rounding: np.ndarray
    # gain = sum_i |w_i| / t_i: an absolute noise n in every f value causes
    # an error of at most gain * n in ``value``.
    gain: np.ndarray
    t: np.ndarray  # base step behind each element
    # Outputs whose two samples were bitwise equal at every level: they do
    # not (visibly) depend on the direction.
    static: np.ndarray
    # Unresolved disagreement with estimates made with other steps.
    spread: np.ndarray | float = 0.0
    # Outputs with a kink inside the stencil (value is one-sided), set by _central.
    kink: np.ndarray | bool = False

    @property
    def error(self) -> np.ndarray:
        return self.truncation + self.rounding + self.spread

    def merge(self, other: "_Estimate", mask: np.ndarray) -> "_Estimate":
        """Take ``other``'s entries where ``mask`` holds."""
        names = ("value", "truncation", "rounding", "gain", "t", "static", "spread")
        return _Estimate(**{n: np.where(mask, getattr(other, n), getattr(self, n)) for n in names})


def _central_estimate(
    call: _Evaluator,
    x: np.ndarray,
    v: np.ndarray,
    scales: np.ndarray,
    t0: float,
    levels: int,
    noise: float,
) -> _Estimate:
    """Richardson-extrapolated central difference with base step ``t0``."""
    diffs: list[np.ndarray] = []
    level_noise: list[np.ndarray] = []  # bound on the rounding error of each D(t_i)
    all_zero = None
    moved = True  # did every entry on the support of v actually move?
    nz = v != 0
    for i in range(levels):
        t = t0 / 2.0**i
        tv = t * v
        xp, xm = x + tv, x - tv
        fp = call(xp, t)
        fm = call(xm, -t)
        d = (fp - fm) / (2.0 * t)
        diffs.append(d)
        zero = fp == fm
        all_zero = zero if all_zero is None else all_zero & zero
        moved = moved and bool(np.all(xp[nz] != x[nz]) and np.all(xm[nz] != x[nz]))

        # Rounding of the computed f values: each is assumed accurate to about
        # eps relative to its own magnitude.
        f_noise = call.eps * (np.abs(fp) + np.abs(fm)) / (2.0 * t)
        # The points x +- t v are rounded, so the perturbation actually applied
        # differs from +-t v by delta (known exactly).  Its effect on f is
        # grad f . delta, bounded with two proxies for |grad f|: the estimate
        # itself along v, and |f| / scale_j ("f changes by O(f) when x_j moves
        # by its typical size").  For coordinate directions with power-of-two
        # steps delta is almost always 0.
        delta = np.abs((xp - x) - tv) + np.abs((x - xm) - tv)
        if np.any(delta):
            rel = float(np.max(delta[nz] / np.abs(tv[nz]))) / 2.0
            absrep = float(np.sum(delta / scales)) / (2.0 * t)
            f_mag = np.maximum(np.abs(fp), np.abs(fm))
            arg_noise = np.abs(d) * rel + f_mag * absrep
        else:
            arg_noise = 0.0
        level_noise.append(f_noise + arg_noise)

    table = _richardson_tableau(diffs)
    value = table[-1][-1]
    truncation = _TRUNCATION_SAFETY * np.abs(table[-1][-1] - table[-1][-2])
    weights = np.abs(_richardson_weights(levels))
    gain = float(sum(w / (t0 / 2.0**i) for i, w in enumerate(weights)))
    # Rounding inside f of intermediates proportional to x (e.g. a*x + b*y)
    # perturbs f by about eps * sum_k |x_k df/dx_k|.  Along v the only slope
    # known is the estimate itself, hence the proxy
    # |value| * min_k |x_k| / |v_k|  (= |x_i df/dx_i| for v = e_i).
    cond = np.abs(value) * float(np.min(np.abs(x[nz]) / np.abs(v[nz])))
    rounding = _ROUNDING_SAFETY * (
        sum(w * n for w, n in zip(weights, level_noise))
        + call.eps * np.abs(value)
        + gain * (call.eps * cond + noise)
    )
    shape = np.shape(value)
    # Equal samples only show that f does not depend on the direction if the
    # points really differed from x in every perturbed entry.
    static = all_zero & moved
    return _Estimate(value, truncation, rounding, np.full(shape, gain), np.full(shape, t0), static)


def _consistent(a: _Estimate, b: _Estimate) -> np.ndarray:
    """Elementwise: do the error bars of ``a`` and ``b`` overlap?"""
    return np.abs(a.value - b.value) <= a.error + b.error


def _select(cands: list[_Estimate]) -> tuple[_Estimate, np.ndarray]:
    """Combine estimates of the same derivative made with different steps.

    Elementwise, an estimate is *corroborated* if its error bar overlaps
    that of another one.  The corroborated estimate with the smallest error
    is chosen, and its error is widened to cover the corroborated estimates
    it contradicts.  If no estimate is corroborated, the smallest-error one
    is chosen and widened to cover all of them, so that a disagreement that
    cannot be resolved shows up in the error instead of being hidden.

    Returns the combination and the mask of corroborated elements.
    """
    if len(cands) == 1:
        return cands[0], np.ones(np.shape(cands[0].value), dtype=bool)
    m = len(cands)
    agree = np.array([[_consistent(a, b) for b in cands] for a in cands])  # (m, m, ...)
    off_diag = ~np.eye(m, dtype=bool).reshape((m, m) + (1,) * (agree.ndim - 2))
    corroborated = np.any(agree & off_diag, axis=1)  # (m, ...)
    any_corroborated = np.any(corroborated, axis=0)
    pool = np.where(any_corroborated, corroborated, True)
    errors = np.stack([c.error for c in cands])
    values = np.stack([c.value for c in cands])
    chosen = np.argmin(np.where(pool, errors, np.inf), axis=0)[None]

    def pick(name: str) -> np.ndarray:
        stacked = np.stack([np.broadcast_to(getattr(c, name), values.shape[1:]) for c in cands])
        return np.take_along_axis(stacked, chosen, axis=0)[0]

    names = ("value", "truncation", "rounding", "gain", "t", "static")
    best = _Estimate(**{n: pick(n) for n in names})
    contradicted = pool & ~np.take_along_axis(agree, chosen[None], axis=1)[:, 0]
    overshoot = np.abs(values - best.value) + errors - best.error
    best.spread = pick("spread") + np.max(np.where(contradicted, overshoot, 0.0), axis=0)
    return best, any_corroborated


def _central(
    call: _Evaluator,
    x: np.ndarray,
    v: np.ndarray,
    scales: np.ndarray,
    step: float | None,
    levels: int,
    noise: float | np.ndarray,
    f0: np.ndarray | None = None,
) -> _Estimate:
    s = _scale_along(v, scales)

    def estimate(t: float) -> _Estimate:
        return _central_estimate(call, x, v, scales, t, levels, noise)

    if step is not None:
        return estimate(_pow2_floor(step * s))

    # Step from the raw entry sizes |x_i| (no floor), if none of them is 0.
    nz = v != 0
    raw = np.abs(x[nz])
    t_raw = 0.0
    if np.all(raw > 0):
        t_raw = _pow2_floor(CENTRAL_BASE_STEP / float(np.max(np.abs(v[nz]) / raw)))
    # Primary step: proportional to entry_scales (floored sizes), as documented.
    t_main = _pow2_floor(CENTRAL_BASE_STEP * s)
    cands: dict[float, _Estimate | None] = {}
    try:
        cands[t_main] = estimate(t_main)
    except _NonFiniteError:
        # The stencil left the domain of f, e.g. log at an entry of 1e-8
        # whose scale was raised to the floor: fall back to the raw sizes.
        if not 0.0 < t_raw < t_main:
            raise
        cands[t_main] = None
        cands[t_raw] = estimate(t_raw)  # non-finite again: ValueError

    def try_step(t_new: float) -> _Estimate | None:
        if t_new in cands:
            return None
        try:
            cands[t_new] = estimate(t_new)
        except _NonFiniteError:
            cands[t_new] = None  # a secondary step left the domain of f
        return cands[t_new]

    def select() -> tuple[_Estimate, np.ndarray]:
        return _select([c for c in cands.values() if c is not None])

    # Second opinion for nonzero entries below the floor: their own size may
    # be the scale on which f varies (or a residue: then the floored step
    # is the right one).  The cross-check below decides.
    if 0.0 < t_raw < t_main:
        try_step(t_raw)
    # Steps derived from the actual entry sizes rather than from the floor
    # (none if an entry on the support of v is 0).
    measured = set() if t_raw == 0.0 else {t_raw}
    if f0 is not None and np.any(noise):
        # A forward noisier than rounding: the step balancing the noise term
        # G noise ~ noise / t of a central difference against its truncation
        # is ~ (relative noise)**(1/3) of the scale, larger than the base step.
        rel = float(np.max(noise)) / max(float(np.max(np.abs(f0))), np.finfo(float).tiny)
        t_noise = _pow2_floor(min(rel ** (1.0 / 3.0), _MAX_NOISE_STEP) * s)
        if t_noise > t_main:
            try_step(t_noise)
    if call.eps > _EPS:
        # Lower-precision outputs (float32, ...): eps**(1/3) of the output
        # dtype balances truncation and rounding; try it as well.
        ratio = call.eps ** (1.0 / 3.0) / CENTRAL_BASE_STEP
        try_step(_pow2_floor(ratio * t_main))
        if measured:
            try_step(_pow2_floor(ratio * t_raw))
            measured.add(_pow2_floor(ratio * t_raw))
    best, corroborated = select()
    for _ in range(_MAX_BISECT):
        # An estimate that no other one confirms: try a step between its own
        # and the nearest other step, which sides with one of them.
        todo = ~corroborated
        if not np.any(todo):
            break
        k = np.unravel_index(np.argmax(np.where(todo, best.error, -1.0)), todo.shape)
        t_k = float(best.t[k])
        others = [t for t in cands if t != t_k]
        if not others:
            break
        t_near = min(others, key=lambda t: abs(math.log(t / t_k)))
        if try_step(_pow2_floor(math.sqrt(t_k * t_near))) is None:
            break
        best, corroborated = select()

    # Equal samples (a static estimate) on a stencil derived from the actual
    # entry sizes bound the derivative by the resolution of f at that step.
    # A larger, floor-based step could claim a smaller bound only by
    # assuming f smooth on its own scale, and a static floor-based estimate
    # is equally weak evidence against a measured nonzero one: in both cases
    # the best measured estimate wins if it is the less confident one.
    measured_cands = [cands[t_c] for t_c in sorted(measured) if cands.get(t_c) is not None]
    if measured_cands:
        m_best = measured_cands[0]
        for c in measured_cands[1:]:
            m_best = m_best.merge(c, c.error < m_best.error)
        unmeasured = best.t > max(measured)  # smaller steps came from shrinking
        # (Static at both steps is no disagreement: f did not move at either
        # scale, and a declared noise would only inflate the measured bound.)
        one_static = (best.static | m_best.static) & ~(best.static & m_best.static)
        override = one_static & unmeasured & (m_best.error > best.error)
        best = best.merge(m_best, override)

    # Outputs whose samples were bitwise identical at every level do not
    # (visibly) depend on the direction; they are left alone.
    frozen = best.static
    kink = np.zeros(np.shape(best.value), dtype=bool)
    if f0 is not None:
        best, kink = _kink_pass(call, x, v, t_main, f0, noise, best, levels)
        frozen = frozen | kink
    tiny = np.finfo(float).tiny
    for _ in range(_MAX_ADAPT):
        error = best.error
        target = _ADAPT_RTOL * np.abs(best.value)
        # Only truncation-dominated outputs are acted upon: the truncation
        # estimate is observed, while the rounding one is a model that can
        # miss cancellation inside f, so smaller steps are never chosen on the
        # strength of the rounding model alone being small.
        need = (error > target) & (best.truncation > best.rounding) & ~frozen
        if not np.any(need):
            break
        with np.errstate(divide="ignore", over="ignore"):
            badness = np.where(need, error / np.maximum(target, tiny), 0.0)
        k = np.unravel_index(np.argmax(badness), badness.shape)
        trunc, rnd = float(best.truncation[k]), float(best.rounding[k])
        tgt = max(float(target[k]), tiny)
        # Shrink until truncation ~ target / 8, but not beyond the step that
        # balances truncation against rounding.  The truncation estimate
        # behaves like t**(2 (levels - 1)) asymptotically, but not when the
        # step is far too large (oscillating or nearly singular f); assuming
        # t**2 shrinks more aggressively.
        factor = max((tgt / (8.0 * trunc)) ** 0.5, (rnd / (2.0 * trunc)) ** (1.0 / 3.0))
        factor = min(0.25, max(factor, 2.0**-30))
        cand = try_step(_pow2_floor(float(best.t[k]) * factor))
        if cand is None:
            break
        # Keep the smaller step where it is better, and also where the two
        # estimates contradict each other's error bars: the larger step was
        # truncation dominated, so it is the one not to be trusted.
        better = ((cand.error < error) | (~_consistent(cand, best) & need)) & ~frozen
        if not np.any(better):
            break
        best = best.merge(cand, better)
    best.kink = kink
    return best


def _kink_pass(call: _Evaluator, x: np.ndarray, v: np.ndarray, t: float, f0: np.ndarray,
               noise: float | np.ndarray, best: _Estimate, levels: int
               ) -> tuple[_Estimate, np.ndarray]:
    r"""Recognise outputs that are piecewise linear with a kink in the stencil.

    Only outputs whose error is dominated by the truncation estimate (the
    Richardson levels disagree) are examined.  With the one-sided
    differences ``D_+(tau) = (g(tau) - g(0)) / tau`` and
    ``D_-(tau) = (g(0) - g(-tau)) / tau`` at ``tau = t, t/2``, a side is
    *linear* when ``|D(t) - D(t/2)|`` is within the noise bound
    ``24 (noise + eps |g|) / t`` (the two differences' noise, safety 4).
    A smooth curved ``g`` fails that test on both sides (the differences
    differ by ``t g''/4``), so it is left to the step adaptation.  A kink at
    distance ``d`` in ``(0, t)`` on one side makes that side non-linear and
    leaves the other linear: the other side's ``D(t/2)`` is then the
    derivative, with error ``|D(t) - D(t/2)| + 16 (noise + eps |g|) / t``.
    Both sides linear with different slopes is a kink at ``x`` itself: the
    derivative does not exist, the value is their mean and the error covers
    both one-sided derivatives.  Returns the updated estimate and the mask
    of kinks found; the step is not shrunk for them.
    """
    need = (best.truncation > best.rounding) & ~best.static
    if not np.any(need):
        return best, np.zeros(np.shape(best.value), dtype=bool)
    g = {tau: call(x + tau * v, tau) for tau in (t, t / 2, -t, -t / 2)}
    d_p = {tau: (g[tau] - f0) / tau for tau in (t, t / 2)}
    d_m = {tau: (f0 - g[-tau]) / tau for tau in (t, t / 2)}
    mag = np.maximum.reduce([np.abs(f0)] + [np.abs(a) for a in g.values()])
    n = noise + call.eps * mag
    bound = 24.0 * n / t
    lin_p = np.abs(d_p[t] - d_p[t / 2]) <= bound
    lin_m = np.abs(d_m[t] - d_m[t / 2]) <= bound
    slopes_differ = np.abs(d_p[t / 2] - d_m[t / 2]) > bound
    only_p, only_m = lin_p & ~lin_m, lin_m & ~lin_p
    at_x = lin_p & lin_m & slopes_differ
    value = np.where(only_p, d_p[t / 2], np.where(only_m, d_m[t / 2],
                                                   0.5 * (d_p[t / 2] + d_m[t / 2])))
    side_err = np.where(only_p, np.abs(d_p[t] - d_p[t / 2]), np.abs(d_m[t] - d_m[t / 2]))
    err = np.where(at_x, 0.5 * np.abs(d_p[t / 2] - d_m[t / 2]), side_err) + 16.0 * n / t
    kink = need & (only_p | only_m | at_x) & (err < best.error)
    shape = np.shape(best.value)
    one_sided = _Estimate(value=value, truncation=np.zeros(shape), rounding=err,
                          gain=np.full(shape, 4.0 / t), t=np.full(shape, t / 2),
                          static=np.zeros(shape, dtype=bool))
    return best.merge(one_sided, kink), kink


# ---------------------------------------------------------------------------
# Complex step
# ---------------------------------------------------------------------------


def _complex_step(
    call: _Evaluator,
    x: np.ndarray,
    v: np.ndarray,
    scales: np.ndarray,
    step: float | None,
    levels: int,
) -> _Estimate:
    if np.iscomplexobj(x) or np.iscomplexobj(v):
        raise OptionError("method='complex' needs real x and v")
    base = COMPLEX_BASE_STEP if step is None else step
    # Keep clear of subnormal steps for entries with absurdly small scales.
    t0 = _pow2_floor(max(base * _scale_along(v, scales), 1e-280))
    estimates = []
    for i in range(levels):
        t = t0 / 2.0**i
        try:
            out = call(x + (1j * t) * v, t, label="x + i*t*v")
        except TypeError as exc:
            raise OptionError(
                "method='complex' requires f to accept complex input "
                f"(f raised TypeError: {exc}); use method='central'"
            ) from exc
        if not np.iscomplexobj(out):
            raise OptionError(
                "method='complex' requires a complex-safe f, but f returned a real "
                "output for a complex input (it discards the imaginary part, e.g. "
                "via .real, abs, astype(float) or float()); use method='central'"
            )
        estimates.append(out.imag / t)
    value = estimates[-1]
    spread = (
        np.max([np.abs(e - value) for e in estimates[:-1]], axis=0)
        if levels > 1
        else np.zeros_like(value)
    )
    shape = value.shape
    return _Estimate(
        value=value,
        truncation=_TRUNCATION_SAFETY * spread,
        rounding=_ROUNDING_SAFETY * call.eps * np.abs(value),
        gain=np.zeros(shape),  # no subtraction, so no noise amplification
        t=np.full(shape, t0 / 2.0 ** (levels - 1)),
        static=np.zeros(shape, dtype=bool),
    )


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _check_options(levels: int, method: str, step: float | None, noise: float | str) -> None:
    if method not in ("central", "complex"):
        raise OptionError(f"method must be 'central' or 'complex', got {method!r}")
    min_levels = 2 if method == "central" else 1
    if int(levels) != levels or levels < min_levels:
        raise OptionError(f"levels must be an integer >= {min_levels} for method={method!r}")
    if step is not None and not (step > 0 and math.isfinite(step)):
        raise OptionError(f"step must be positive and finite, got {step!r}")
    if isinstance(noise, str):
        if noise != "auto":
            raise OptionError(f"noise must be a non-negative float or 'auto', got {noise!r}")
    elif not (noise >= 0 and math.isfinite(noise)):
        raise OptionError(f"noise must be non-negative and finite (or 'auto'), got {noise!r}")


def _directional_flat(
    call: _Evaluator,
    x: np.ndarray,
    v: np.ndarray,
    scales: np.ndarray,
    step: float | None,
    levels: int,
    method: str,
    noise: float | str,
) -> tuple[_Estimate, np.ndarray | None]:
    """The estimate along ``v`` and, with ``noise="auto"``, the estimated noise."""
    if not np.any(v):
        out = call(x, 0.0, label="x")
        zero = np.zeros_like(out.real)
        est = _Estimate(zero, zero, zero, zero, zero, np.ones(zero.shape, dtype=bool))
        return est, (zero if noise == "auto" else None)
    if method == "complex":
        return _complex_step(call, x, v, scales, step, levels), None
    if noise != "auto":
        return _central(call, x, v, scales, step, levels, noise), None
    measured = _estimate_noise_flat(call, x, v, scales)
    est = _central(call, x, v, scales, step, levels, measured.noise, f0=measured.f0)
    return est, measured.noise


def _noise_part(est: _Estimate, noise: np.ndarray) -> np.ndarray:
    """The part of ``est.error`` due to the estimated ``noise``: ``4 G noise``."""
    return _ROUNDING_SAFETY * est.gain * noise


def directional_derivative(
    f: Callable[[Any], Any],
    x: Any,
    v: Any,
    *,
    step: float | None = None,
    levels: int = 2,
    method: Method = "central",
    floor: float = DEFAULT_FLOOR,
    noise: float | str = 0.0,
) -> FDResult:
    r"""Estimate the directional derivative ``J_f(x) @ v`` with an error estimate.

    With ``g(t) = f(x + t v)`` the result estimates ``g'(0)``.

    ``method="central"``: with ``D(t) = (g(t) - g(-t)) / (2 t)`` on the
    halved steps ``t_i = t_0 / 2**i`` (``i = 0 .. L-1``, ``L = levels``), the
    Richardson tableau

    .. math::
        T_{i,0} = D(t_i), \qquad
        T_{i,k} = T_{i,k-1} + \frac{T_{i,k-1} - T_{i-1,k-1}}{4^k - 1}

    eliminates the :math:`t^2, \ldots, t^{2(L-1)}` error terms; the result is
    :math:`T_{L-1,L-1}` (truncation error :math:`O(t_0^{2L})`), at a cost of
    ``2 L`` evaluations per step tried (see Notes: one step when the
    entries on the support of ``v`` are 0 or ``>= floor`` and ``f`` is
    smooth, usually two when some are nonzero and below ``floor``).

    ``method="complex"`` (opt-in): :math:`\operatorname{Im} g(i t_i) / t_i`
    at the smallest of ``L`` halved steps; there is no subtraction, so it is
    exact to rounding, but only if ``f`` is analytic, real for real input
    and complex-safe (no ``abs``, ``.real``, ``float()``, comparisons on the
    argument).  A real output for complex input raises ``ValueError``.

    Parameters
    ----------
    f : callable
        ``f(x)`` returning a float, an array of any shape, or a tuple/list of
        arrays.  It receives a Python scalar if ``x`` is a Python scalar,
        otherwise a fresh float64 array of ``x``'s shape.
    x : array_like or float
        The point: Python float, 0-d or n-d array (converted to float64).
    v : array_like or float
        The direction, same shape as ``x``.
    step : float, optional
        Relative base step; ``t_0 = step * s`` rounded down to a power of two,
        where ``s = 1 / max_i(|v_i| / entry_scales(x, floor)_i)`` is the scale
        of ``x`` along ``v``: no entry moves by more than
        ``step * entry_scales(x, floor)_i``, and for ``v = e_i``,
        ``step * entry_scales(x, floor)_i / 2 < t_0 <= step *
        entry_scales(x, floor)_i``.  Default ``eps**(1/3)`` (central) or
        ``2**-60`` (complex).  Passing ``step`` uses that single step, with
        none of the cross-checks and adaptation described in the Notes.
    levels : int, optional
        Number of steps / extrapolation levels: ``>= 2`` for ``"central"``,
        ``>= 1`` for ``"complex"``.  Default 2.
    method : {"central", "complex"}, optional
        Default ``"central"``.
    floor : float, optional
        Floor of :func:`entry_scales`, default :data:`DEFAULT_FLOOR`
        (``1.0``: entries below 1 in magnitude, zeros included, get an
        absolute step, plus a relative one as a second opinion if nonzero).
    noise : float or "auto", optional
        Absolute rounding-noise level of ``f``'s outputs to add to the
        built-in model (central only); use it when ``f`` computes its
        outputs as small differences of large intermediates.  Default 0.
        ``"auto"`` measures it along ``v`` first, per output, with
        :func:`estimate_noise` (9 more evaluations): the measured noise
        enters the error model, a step balancing it against truncation is
        tried as well, the step adaptation never shrinks into the noise, and
        piecewise-linear outputs with a kink inside the stencil are
        recognised (see Notes); ``FDResult.noise``, ``noise_error`` and
        ``kinks`` then say what was found.

    Returns
    -------
    FDResult
        ``value`` and ``error`` have the structure of ``f``'s output: a
        tuple of arrays if ``f`` returns a tuple or list, else one array
        (0-d for a scalar output).  ``n_evals`` counts calls of ``f``.

    Raises
    ------
    ValueError
        If ``f`` returns NaN or Inf at a sample point (the message gives
        ``t`` in ``x + t*v``), if ``method="complex"`` and ``f`` is not
        complex-safe, or on invalid arguments.

    Notes
    -----
    **Steps.**  Powers of two make ``t_i v`` exact and, for coordinate
    directions, almost always make ``x +- t_i e_j`` exact too.  With an
    explicit ``step`` only ``t_0`` above is used.  With the default step
    (central method), ``t_0`` is the primary step, and:

    * if the entries on the support of ``v`` are nonzero and some are below
      ``floor``, the *raw* step computed from ``|x_i|`` instead of
      ``entry_scales`` is tried too: a small entry may be the scale on which
      ``f`` varies, or a residue of 0 for which the floor is right;
    * if ``f`` returns NaN or Inf on the primary stencil, the raw step is
      used instead if there is one (e.g. ``log`` at ``x = 1e-8``), else
      ``ValueError`` is raised, as it is when the raw stencil fails too.
      Any other step that leaves the domain of ``f`` is dropped;
    * for float32 (or other low-precision) outputs, the steps with
      ``eps_out**(1/3)`` as base are tried too;
    * estimates from different steps are cross-checked elementwise: one is
      *corroborated* if its error bar overlaps another one's.  The
      corroborated estimate with the smallest error is returned, its error
      widened to cover any corroborated estimate it contradicts.  An
      uncorroborated result triggers up to 3 extra steps, each the geometric
      mean of its step and the nearest other one; if still uncorroborated,
      its error is widened to cover all estimates;
    * where the result comes from a floor-based step larger than the raw
      one, and either it or the best raw-step estimate is *static* (bitwise
      equal samples: the derivative is below the resolution of ``f``), the
      raw-step estimate is returned if it is the less confident one: equal
      samples on a large stencil only mean something if ``f`` is smooth on
      that scale;
    * outputs whose error exceeds ``1e-8 |value|`` and is dominated by the
      truncation part get smaller steps (aiming at that level, not past the
      step balancing truncation and rounding), up to 6 times, keeping the
      smaller step where it has the smaller error or where the two
      contradict each other.  Steps are never enlarged on the strength of the
      rounding model alone.

    **Error estimate (central).**  For one step,
    ``error = truncation + rounding`` with

    * ``truncation = 2 |T[L-1][L-1] - T[L-1][L-2]|``, the difference between
      the two highest extrapolation levels (asymptotically the error of the
      lower-order one, so an overestimate of the error of the result);
    * ``rounding = 4 (sum_i |w_i| r_i + G (eps C + noise) + eps |value|)``,
      where ``value = sum_i w_i D(t_i)`` defines the Richardson weights,
      ``G = sum_i |w_i| / t_i``, and
      ``r_i = eps (|g(t_i)| + |g(-t_i)|) / (2 t_i)`` uses the values of ``f``
      actually computed (``eps`` of the output dtype).  ``C`` accounts for
      rounding of intermediates proportional to ``x`` inside ``f``:
      ``|value| min_j |x_j| / |v_j|`` here, ``sum_k |x_k J_ik|`` in
      :func:`jacobian`.  ``r_i`` also carries a term for the rounding of the
      points ``x +- t_i v`` (zero when they are exact).

    The cross-checks above can only widen the error of the estimate returned.

    **What it guarantees.**  It is an estimate, not a rigorous bound.  It
    bounds ``|value - truth|`` when (a) ``f`` is smooth on the scale of the
    step, so that the Richardson differences are in their asymptotic
    regime, and (b) ``f``'s outputs are computed with an error of a few
    ``eps`` times their own magnitude or ``C`` (no cancellation of large
    intermediates inside ``f``; otherwise pass ``noise``).  On smooth
    functions it is typically 10 to 1000 times the actual error (the tests
    check this).  For an output that is large but hardly depends on the
    direction, it is the output's rounding noise over the step, which can
    exceed the derivative itself.  A direction ``v`` mixing entries of very
    different sizes gets a single step that is small for the large entries;
    use :func:`jacobian` (one scaled step per entry) for badly scaled ``x``.

    **Noisy f (``noise="auto"``).**  A forward that stops at a tolerance
    (an iterative solver, a bisection) returns ``g(t) = smooth(t) + e(t)``
    with ``e`` of size ``sigma`` varying on scales far below any useful step.
    ``sigma`` is measured per output by ECnoise (:func:`estimate_noise`) and
    enters ``rounding`` as the ``noise`` term (so the error bar holds
    ``4 G sigma``, ``G ~ 2 / t``).  The step ``t_n = (sigma / |f|_inf)^{1/3}
    s`` (capped at ``2**-7 s``), which balances ``sigma / t`` against a
    central difference's ``t^2`` truncation, is tried besides the base step
    when larger, and the cross-check picks the better one.  Since
    ``rounding`` now holds the noise, an output whose error is dominated by
    it is never given a smaller step (the step "collapse" that turns noise
    of ``1e-16`` into derivative errors of ``1e-4``).

    **Kinks (``noise="auto"``).**  Outputs whose Richardson levels disagree
    are tested for being piecewise linear with a kink inside the stencil by
    comparing one-sided differences at ``t_0`` and ``t_0 / 2`` on each side
    (``_kink_pass``): a side on which they agree within the noise is linear,
    and its one-sided difference is the derivative; the step is not shrunk.
    Those outputs are marked in ``FDResult.kinks``.

    **Error estimate (complex).**  ``2 max_i |E_i - E_last| + 4 eps |value|``
    with ``E_i = Im g(i t_i) / t_i``.
    """
    _check_options(levels, method, step, noise)
    x_arr, scalar_input = _prepare_x(x)
    v_arr = np.asarray(v)
    if np.iscomplexobj(v_arr):
        raise ValueError("v must be real")
    v_arr = v_arr.astype(np.float64)
    if v_arr.shape != x_arr.shape:
        raise ValueError(f"v has shape {v_arr.shape}, expected x's shape {x_arr.shape}")
    if not np.all(np.isfinite(v_arr)):
        raise ValueError("v contains non-finite entries")
    scales = entry_scales(x_arr, floor)
    call = _Evaluator(f, scalar_input)
    est, measured = _directional_flat(call, x_arr, v_arr, scales, step, int(levels), method, noise)
    if measured is None:
        return FDResult(call.unflatten(est.value), call.unflatten(est.error), call.n_evals)
    kink = np.broadcast_to(est.kink, np.shape(est.value))
    return FDResult(call.unflatten(est.value), call.unflatten(est.error), call.n_evals,
                    noise=call.unflatten(measured),
                    noise_error=call.unflatten(_noise_part(est, measured)),
                    kinks=call.unflatten(np.array(kink)))


def jacobian(
    f: Callable[[Any], Any],
    x: Any,
    *,
    step: float | None = None,
    levels: int = 2,
    method: Method = "central",
    floor: float = DEFAULT_FLOOR,
    noise: float | str = 0.0,
) -> FDResult:
    """Estimate the Jacobian of ``f`` at ``x`` column by column.

    Column ``j`` is the directional derivative along the unit coordinate
    ``e_j`` (see :func:`directional_derivative` for the formulas, the
    cross-checks and the error estimate), so its primary step is
    ``t_0 = step * entry_scales(x, floor)[j]`` rounded down to a power of
    two: each entry is perturbed relative to its own size, whatever the
    sizes of the others.  With the default ``floor = 1``, an entry of
    ``1e8`` gets ``t_0 = 2**9``, a zero ``2**-18 ~ 3.8e-6``, and an entry of
    ``1e-8`` the same ``2**-18`` plus a second opinion from the raw step
    ``2**-44 ~ 5.7e-14`` (which alone is used if the first leaves the
    domain of ``f``).  The rounding term of the error uses the row sums
    ``C_i = sum_k |x_k J_ik|`` of the estimated Jacobian.

    Parameters
    ----------
    f, x, step, levels, method, floor, noise
        As in :func:`directional_derivative`.

    Returns
    -------
    FDResult
        For each output array ``out`` of ``f``, ``value`` has shape
        ``out.shape + x.shape`` with ``value[o + j] = d out[o] / d x[j]``
        (a tuple of such arrays if ``f`` returns a tuple).  Reshaping to
        ``(out.size, x.size)`` gives the Jacobian matrix of the flattened
        map.  ``error`` has the same structure.  ``n_evals`` is the total:
        ``2 * levels * x.size`` for the central method when no entry is
        nonzero and below ``floor`` and no cross-check or adaptation is
        needed.

    Raises
    ------
    ValueError
        As in :func:`directional_derivative`; the message also names the
        coordinate ``j`` whose stencil produced non-finite values.
    """
    _check_options(levels, method, step, noise)
    x_arr, scalar_input = _prepare_x(x)
    scales = entry_scales(x_arr, floor)
    call = _Evaluator(f, scalar_input)
    n = x_arr.size
    columns: list[_Estimate] = []
    measured: list[np.ndarray | None] = []
    for j in range(n):
        index = np.unravel_index(j, x_arr.shape)
        call.context = f", v = e_{tuple(map(int, index))} (coordinate {j} of x)"
        v = np.zeros(x_arr.shape)
        v[index] = 1.0
        col, col_noise = _directional_flat(call, x_arr, v, scales, step, int(levels), method, noise)
        columns.append(col)
        measured.append(col_noise)
    call.context = ""
    if n == 0:
        out = call(x_arr, 0.0, label="x")
        value = error = np.zeros((out.size, 0))
    else:
        value = np.stack([c.value for c in columns], axis=-1)
        error = np.stack([c.error for c in columns], axis=-1)
        # Now that whole rows of J are known, refine the conditioning term
        # (see directional_derivative): each column only accounted for
        # |x_j J_ij| of C_i = sum_k |x_k J_ik|.  Outputs whose samples did not
        # change along e_j are skipped: intermediates that do not involve x_j
        # round identically in both samples and cancel.
        xj = np.abs(x_arr.reshape(-1))
        cond = np.abs(value) @ xj
        gain = np.stack([c.gain for c in columns], axis=-1)
        static = np.stack([c.static for c in columns], axis=-1)
        extra = np.where(static, 0.0, np.maximum(cond[:, None] - np.abs(value) * xj, 0.0))
        error = error + _ROUNDING_SAFETY * call.eps * gain * extra
    if noise != "auto" or n == 0:
        return FDResult(
            call.unflatten(value, x_arr.shape),
            call.unflatten(error, x_arr.shape),
            call.n_evals,
        )
    noise_cols = np.stack(measured, axis=-1)
    noise_err = np.stack([_noise_part(c, m) for c, m in zip(columns, measured)], axis=-1)
    kinks = np.stack([np.broadcast_to(c.kink, np.shape(c.value)) for c in columns], axis=-1)
    return FDResult(
        call.unflatten(value, x_arr.shape),
        call.unflatten(error, x_arr.shape),
        call.n_evals,
        noise=call.unflatten(noise_cols.max(axis=-1)),
        noise_error=call.unflatten(noise_err, x_arr.shape),
        kinks=call.unflatten(np.array(kinks), x_arr.shape),
    )
