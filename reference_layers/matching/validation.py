"""Input and option checks of the graph-matching layers.

:func:`check_affinity` validates an affinity in ONE streamed pass over each
instance (numba :func:`~reference_layers.kernels.affinity.affinity_scan`:
finiteness, sign, scale, the row sums that the forward eigensolver reuses, and
an exact randomized certificate of symmetry); only an instance the certificate
does not find exactly symmetric gets a second, tiled pass that measures
``max|M - M'|`` (:func:`~reference_layers.kernels.affinity.affinity_stats`).
The option helpers implement the keyword convention of the reference layers:
``solver_options`` validated against the allowed keys, ``backward`` in
``{'structured', 'generic'}`` (``'fast'`` a deprecated alias), deprecated
keyword aliases with a ``DeprecationWarning`` naming the new keyword.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional

import numpy as np

from nimplicit.errors import (InvalidOptionError, NonFiniteError, OptionError, UnknownOptionError,
                              check_backward, check_options, renamed)

from .errors import AffinityError


def as_real_array(value, what: str) -> np.ndarray:
    """``value`` as a float64 array; complex, object, string and boolean input
    raise :class:`AffinityError` (a ``ValueError``) instead of being cast."""
    arr = np.asarray(value)
    if arr.dtype.kind == "c":
        raise AffinityError(f"{what} is complex ({arr.dtype}): the graph-matching layers work on "
                            f"real affinities. Pass the real part explicitly if that is meant.")
    if arr.dtype.kind not in "fiu":
        raise AffinityError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(float, copy=False)


class CheckedAffinity:
    """What the validation pass learnt about one instance: its row sums ``M 1``
    (the forward's first Lanczos product) and whether ``M`` is exactly symmetric
    (``M == M'`` entry by entry: its products may then read one triangle)."""

    __slots__ = ("row_sums", "symmetric")

    def __init__(self, row_sums: np.ndarray, symmetric: bool):
        self.row_sums, self.symmetric = row_sums, bool(symmetric)


#: the random words of the symmetry certificate (fresh for every call, so that its bound
#: holds for every input)
_CERTIFICATE_RNG = np.random.default_rng()


def check_affinity(M: np.ndarray, *, batched: bool, allow_negative: bool = False) -> list:
    """Validate a real affinity (``(N, N)``, or ``(B, N, N)`` when ``batched``)
    and return a :class:`CheckedAffinity` per instance (row sums and exact
    symmetry, computed by the validation pass).

    Errors, in this order: non-finite entries (:class:`NonFiniteError`), all
    zero, ``max|M - M'| > 1e-10 max|M|``, ``min M < -1e-12 max|M|`` (unless
    ``allow_negative``) (:class:`AffinityError`).  One streamed pass
    (:func:`~reference_layers.kernels.affinity.affinity_scan`) gives the row sums,
    the non-finite count, whether some entry has its sign bit set, and a
    certificate of exact symmetry that always accepts an exactly symmetric ``M``
    and accepts any other with probability at most ``2**-32``.  An accepted ``M``
    without sign bits passes every test (``M == 0`` exactly when its row sums are
    0); any other gets a second, tiled pass
    (:func:`~reference_layers.kernels.affinity.affinity_stats`) that measures
    ``max|M|``, ``max|M - M'|`` and ``min M`` exactly (a nearly symmetric ``M`` is
    accepted then, with ``symmetric`` False: its products use the whole matrix)."""
    if M.ndim != (3 if batched else 2) or M.shape[-1] != M.shape[-2] or M.shape[-1] == 0:
        want = "(B, nm, nm)" if batched else "(nm, nm)"
        raise AffinityError(f"the affinity must be a non-empty square matrix of shape {want}, "
                            f"got shape {M.shape}")
    if batched and M.shape[0] == 0:
        raise AffinityError("the batch of affinities is empty (B = 0)")
    from ..kernels.affinity import affinity_scan, affinity_stats
    checked = []
    N = M.shape[-1]
    for b, Mb in enumerate(M.reshape((-1,) + M.shape[-2:])):
        where = f" (batch instance {b})" if batched else ""
        Mb = np.ascontiguousarray(Mb, dtype=float)
        words = _CERTIFICATE_RNG.integers(0, 2 ** 32, (2, N), dtype=np.uint64)
        bad, rows, certified, signed = affinity_scan(Mb, Mb.view(np.uint64), words[0],
                                                     words[1])
        if bad:
            raise NonFiniteError(f"the affinity matrix{where} contains {bad} non-finite pair(s) "
                                 f"(NaN or Inf). Check the affinity builder's inputs.")
        if certified and not signed:   # exactly symmetric, every entry >= +0
            # the tests below then need only whether M == 0 (scale: 0 or any positive)
            scale, asym, low = (1.0 if rows.any() else 0.0), 0.0, 0.0
        else:                          # measure max|M|, max|M - M'| and min M exactly
            scale, asym, low, _, _ = affinity_stats(Mb)
        if scale == 0.0:
            raise AffinityError(f"the affinity matrix is all zero{where}: every vector is a "
                                f"leading eigenvector and nothing is matched. Check the affinity "
                                f"builder (kernel bandwidths, edge lists).")
        if asym > 1e-10 * scale:
            raise AffinityError(
                f"the affinity matrix is not symmetric{where}: max|M - M'| = {asym:.3g} (max|M| = "
                f"{scale:.3g}). Graph-matching affinities are symmetric; build M with both "
                f"directions of every edge, or pass (M + M.T) / 2.")
        if not allow_negative and low < -1e-12 * scale:
            raise AffinityError(
                f"the affinity matrix has negative entries{where} (min {low:.3g}): spectral "
                f"matching needs M >= 0 (Perron-Frobenius: a non-negative leading eigenvector). "
                f"Use a non-negative kernel (e.g. exp(-distance)).")
        checked.append(CheckedAffinity(rows, asym == 0.0))
    return checked


# ------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------

def positive_float(name: str, value, *, upper: Optional[float] = None) -> float:
    """A finite float ``> 0`` (and ``< upper`` if given), else :class:`InvalidOptionError`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"{name} must be a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0 and (upper is None or v < upper)):
        rng = f"in (0, {upper:g})" if upper is not None else "> 0 and finite"
        raise InvalidOptionError(f"{name} must be {rng}, got {value!r}")
    return v


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (bools refused), else :class:`InvalidOptionError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidOptionError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def choice(name: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidOptionError(f"{name} must be one of {', '.join(map(repr, allowed))}; got "
                                 f"{value!r}")
    return value


def parse_options(solver_options: Optional[dict], defaults: Dict[str, Any],
                  checks: Dict[str, Callable[[str, Any], Any]], layer: str) -> Dict[str, Any]:
    """``defaults`` updated by ``solver_options`` (keys checked by
    :func:`nimplicit.errors.check_options`: an unknown key raises
    :class:`UnknownOptionError` naming the allowed ones); each value is then
    validated by ``checks[key](key, value)``."""
    try:
        out = check_options(solver_options, defaults, f"{layer}: solver_options")
    except OptionError as exc:
        raise UnknownOptionError(str(exc)) from None
    return {k: checks[k](k, v) for k, v in out.items()}


_MISSING = object()


def deprecated(old: str, new: str, value, current=_MISSING, *, layer: str):
    """``value`` when a deprecated keyword ``old`` was given (warned by
    :func:`nimplicit.errors.renamed`, naming ``new``), else ``current``."""
    if value is None:
        return current
    return renamed(old, new, layer, value)


def resolve_backward(backward: Optional[str], linear_solver, *, layer: str,
                     has_structured: bool = True) -> str:
    """The backward choice of the keyword convention (values checked by
    :func:`nimplicit.errors.check_backward`; ``'fast'`` warns).

    ``None`` means ``'structured'`` (where the layer has one), except that an
    explicit ``linear_solver`` other than ``'auto'`` (the old way to pick a
    core solver) means ``'generic'`` with a ``DeprecationWarning``.
    """
    if backward is None:
        if linear_solver not in (None, "auto"):
            warnings.warn(f"{layer}: choosing a core solver by linear_solver= alone is "
                          f"deprecated; pass backward='generic', linear_solver={linear_solver!r}.",
                          DeprecationWarning, stacklevel=3)
            return "generic"
        return "structured" if has_structured else "generic"
    try:
        backward = check_backward(backward, layer, structured=has_structured)
    except OptionError as exc:
        raise InvalidOptionError(str(exc)) from None
    if backward == "structured" and linear_solver not in (None, "auto"):
        raise InvalidOptionError(f"{layer}: linear_solver={linear_solver!r} is only used with "
                                 f"backward='generic' (the structured backward is the layer's "
                                 f"own solver).")
    return backward
