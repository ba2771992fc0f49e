r"""The one eigen-gap test of nimplicit: is an eigenvalue simple enough to differentiate?

An eigenvector ``v`` of a symmetric matrix ``A`` with eigenvalue ``lam`` is a
differentiable function of ``A`` exactly when ``lam`` is simple; its derivative
is ``dv = -(A - lam I)^+ dA v``, whose norm grows like ``1 / gap`` with

.. math::
    \mathrm{gap} = \min_{\mu \in \sigma(A) \setminus \{\lambda\}} |\lambda - \mu| .

A test ``gap <= tol`` in absolute terms reports a degenerate eigenvalue for
``1e-150 A`` that is not there (and misses one in ``1e150 A``), so the test here
is relative to a *spectral scale* ``s`` of ``A`` that the caller supplies (the
spectral radius, or ``max|A|``; both scale with ``A``):

.. math::
    \frac{\mathrm{gap}}{s} \le \mathrm{gap\_tol}
    \;\Longrightarrow\; \texttt{DegenerateEigenvalueError}.

Scaling ``A -> c A`` (``c > 0``) scales ``lam``, every neighbour and ``s`` alike,
so the verdict is invariant.  :func:`relative_gap` computes the number and
:func:`require_simple_eigenvalue` raises the typed error with the numbers in its
message; the layers (``ncut_layer``, ``spectral_matching_layer``, ``smac_layer``)
call these instead of writing their own test.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from .errors import OptionError, SingularJacobianError

__all__ = ["DegenerateEigenvalueError", "GapToleranceError", "relative_gap",
           "require_simple_eigenvalue", "check_gap_tol", "DEFAULT_GAP_TOL"]

#: default relative gap below which an eigenvalue counts as repeated
DEFAULT_GAP_TOL = 1e-8


class DegenerateEigenvalueError(SingularJacobianError):
    """The eigenvalue the layer follows is not simple (relative to the spectral
    scale): its eigenvector, and hence the derivative, is not unique."""


class GapToleranceError(OptionError):
    """``gap_tol`` is not a finite number in ``[0, 1)`` (an :class:`~nimplicit.errors.OptionError`)."""


def check_gap_tol(gap_tol: float, name: str = "gap_tol") -> float:
    """Validate a relative gap tolerance: a finite float in ``[0, 1)``."""
    try:
        value = float(gap_tol)
    except (TypeError, ValueError):
        raise GapToleranceError(f"{name} must be a number in [0, 1), got {gap_tol!r}") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise GapToleranceError(f"{name} must be a finite number in [0, 1) (a relative gap), "
                                f"got {gap_tol!r}")
    return value


def relative_gap(lam: float, neighbours: Iterable[float], scale: float) -> float:
    r"""``min_mu |lam - mu| / scale`` over the ``neighbours`` (the other
    eigenvalues, or the nearest ones); ``inf`` when there are none.

    ``scale`` is a spectral scale of the matrix (spectral radius, ``max|A|``,
    ...), ``> 0``; a zero scale (the zero matrix) gives a gap of 0: every
    vector is an eigenvector.
    """
    others = [float(mu) for mu in neighbours if mu is not None and math.isfinite(float(mu))]
    if not others:
        return math.inf
    if not scale > 0:
        return 0.0
    return min(abs(float(lam) - mu) for mu in others) / float(scale)


def require_simple_eigenvalue(lam: float, neighbours: Iterable[float], scale: float, *,
                              gap_tol: float = DEFAULT_GAP_TOL, what: str = "the matrix",
                              where: str = "", hint: Optional[str] = None) -> float:
    r"""Raise :class:`DegenerateEigenvalueError` unless ``lam`` is simple
    relative to ``scale``; return the relative gap.

    Parameters
    ----------
    lam : the eigenvalue followed by the layer
    neighbours : the other eigenvalues (or the nearest ones: the largest
        below ``lam`` for a leading eigenvalue)
    scale : spectral scale of the matrix (``> 0``, scales with the matrix)
    gap_tol : relative tolerance, see :func:`check_gap_tol`
    what, where : names the matrix and the batch instance in the message
    hint : what the user can do, appended to the message
    """
    neighbours = list(neighbours)
    gap = relative_gap(lam, neighbours, scale)
    if gap <= gap_tol:
        near = min(neighbours, key=lambda mu: abs(float(lam) - float(mu)))
        raise DegenerateEigenvalueError(
            f"the eigenvalue {lam:.6g} of {what}{where} is not simple: its nearest neighbour is "
            f"{float(near):.6g}, a gap of {gap:.3g} relative to the spectral scale {scale:.3g} "
            f"(<= gap_tol={gap_tol:g}). Its eigenvector is not unique and has no derivative."
            + (f" {hint}" if hint else ""))
    return gap
