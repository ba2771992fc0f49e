r"""Shared KKT mechanisms: the residual of eq. 27, scale-free strict-complementarity
margins, weakly active (degenerate) constraints, and the minimum-norm convention.

Used by :func:`reference_layers.qp.qp_layer` and
:func:`nimplicit.front_ends.constrained_argmin_layer`, so that "weakly active"
and ``weak_tol`` mean one thing everywhere.

Scale-free margins
------------------
For ``min f(y)`` s.t. ``g_i(y) <= 0`` with multipliers ``nu_i >= 0`` and slacks
``s_i = -g_i(y) >= 0`` (for a QP ``g_i = G_i y - h_i``), with ``a_i = ||grad g_i(y)||_2``
(``||G_i||_2``):

.. math::

    \bar\nu_i = \frac{a_i\,\nu_i}{S}, \qquad
    S = \|\nabla f(y)\text{'s terms}\| + \|J_h^\top\lambda\|_2 + \sum_j a_j \nu_j,
    \qquad
    \bar s_i = \frac{s_i}{a_i \|y\|_2 + |g_i(y) + \nabla g_i^\top y|}

(for a QP ``S = ||Q y||_2 + ||q||_2 + ||A^T lam||_2 + sum_j ||G_j|| nu_j`` and the
slack's scale is ``||G_i|| ||y|| + |h_i|``, the size of the terms ``h_i - G_i y``
is made of).  ``a_i nu_i`` is the size of constraint ``i``'s force
``nu_i grad g_i`` in the stationarity equation and ``S`` the size of all its
terms, so ``nu_bar_i`` is unchanged by scaling the objective (``f -> c f``:
``nu -> c nu``) or a constraint (``g_i -> d g_i``: ``nu_i -> nu_i / d``); ``s_bar_i``
is the slack relative to the terms it is the difference of, unchanged by scaling
``g_i``.  Both are local to constraint ``i``.  A zero scale (all terms zero)
gives a zero margin.

Weakly active constraints and ``weak_tol``
-------------------------------------------
Strict complementarity holds at constraint ``i`` when one of ``nu_bar_i``,
``s_bar_i`` is clearly non-zero.  ``weak_tol`` is the relative accuracy below
which the forward cannot tell a normalised multiplier or slack from zero.  The
forward's actual accuracy is measured at the point itself by the normalised
complementarity it reached,

.. math:: \varepsilon = \max_i \min(\bar\nu_i, \bar s_i)

(rounding, ~1e-16, at an exact KKT point such as the QP's polished solution;
~sqrt(mu) at an interior point iterate), and constraint ``i`` is **weakly active**
when

.. math:: \max(\bar\nu_i, \bar s_i) \le \max(\text{weak\_tol},\; 10\,\varepsilon).

Otherwise it is strictly **active** when ``nu_bar_i > s_bar_i`` and strictly
**inactive** when not.  The default ``weak_tol = 1e-9`` sits three decades above
the rounding level of an exact KKT point with a reduced KKT matrix of condition
up to ~1e4 and far below any margin a well-posed problem has.

At a weakly active constraint ``J = dF/dz`` is singular and the solution is not
differentiable.  The convention (:func:`zero_weak_rows`): the complementarity
rows of those constraints are set to zero and the system is solved in the
minimum-norm least-squares sense, with the warning of :func:`warn_weak`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import warn

__all__ = ["DEFAULT_WEAK_TOL", "kkt_residual_parts", "normalized_margins",
           "forward_accuracy", "weak_mask", "strict_sets", "zero_weak_rows", "warn_weak",
           "weak_message", "check_weak_tol"]

#: the one default of ``weak_tol`` (see the module docstring)
DEFAULT_WEAK_TOL = 1e-9


def kkt_residual_parts(stationarity, eq_values, nu, ineq_values) -> tuple:
    r"""The residual of eq. 27 from its parts, in its one order and sign convention.

    .. math:: F = \big(\nabla_y L,\; h(y),\; \nu \odot g(y)\big), \quad g(y) \le 0

    ``eq_values`` may be ``None`` (no equalities: the part is omitted).  Works on
    autograd-boxed values (no numpy conversion).
    """
    parts = [stationarity]
    if eq_values is not None:
        parts.append(eq_values)
    parts.append(nu * ineq_values)
    return tuple(parts)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with ``0`` where ``den == 0`` (then all the terms are zero)."""
    den = np.asarray(den, float)
    out = np.zeros(np.broadcast(num, den).shape)
    ok = np.broadcast_to(den > 0, out.shape)
    np.divide(np.broadcast_to(num, out.shape), np.broadcast_to(den, out.shape), out=out,
              where=ok)
    return out


def normalized_margins(nu: np.ndarray, s: np.ndarray, row_norms: np.ndarray,
                       stationarity_terms: np.ndarray,
                       slack_terms: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    r"""The scale-free margins ``(nu_bar, s_bar)`` of the module docstring.

    Parameters
    ----------
    nu, s : (..., m) multipliers and slacks ``s = -g(y)`` (negative parts count as 0)
    row_norms : (..., m) ``a_i = ||grad g_i(y)||_2``
    stationarity_terms : (...,) size of the stationarity equation's terms other than
        the inequality forces (e.g. ``||Q y|| + ||q|| + ||A^T lam||``); the forces
        ``sum_i a_i nu_i`` are added here.
    slack_terms : (..., m) size of the terms making up ``s_i`` (``||G_i|| ||y|| + |h_i|``)
    """
    nu = np.maximum(np.asarray(nu, float), 0.0)
    s = np.maximum(np.asarray(s, float), 0.0)
    force = row_norms * nu
    S = np.asarray(stationarity_terms, float) + force.sum(axis=-1)
    nu_bar = _safe_ratio(force, S[..., None])
    s_bar = _safe_ratio(s, slack_terms)
    return nu_bar, s_bar


def forward_accuracy(nu_bar: np.ndarray, s_bar: np.ndarray) -> np.ndarray:
    r"""``eps = max_i min(nu_bar_i, s_bar_i)`` per instance: the normalised
    complementarity the forward reached (0 without constraints)."""
    if nu_bar.shape[-1] == 0:
        return np.zeros(nu_bar.shape[:-1])
    return np.minimum(nu_bar, s_bar).max(axis=-1)


def _threshold(nu_bar, s_bar, weak_tol):
    return np.maximum(weak_tol, 10.0 * forward_accuracy(nu_bar, s_bar))[..., None]


def weak_mask(nu_bar: np.ndarray, s_bar: np.ndarray, weak_tol: float) -> np.ndarray:
    r"""``max(nu_bar_i, s_bar_i) <= max(weak_tol, 10 eps)``: the weakly active constraints."""
    return np.maximum(nu_bar, s_bar) <= _threshold(nu_bar, s_bar, weak_tol)


def strict_sets(nu_bar: np.ndarray, s_bar: np.ndarray,
                weak_tol: float) -> Tuple[np.ndarray, np.ndarray]:
    """``(active, inactive)`` masks of the strictly complementary constraints."""
    strict = ~weak_mask(nu_bar, s_bar, weak_tol)
    return strict & (nu_bar > s_bar), strict & (nu_bar <= s_bar)


def check_weak_tol(weak_tol, who: str) -> float:
    """``weak_tol`` as a float in ``[0, 1)``; a typed error otherwise."""
    from .errors import InvalidOptionError
    try:
        value = float(weak_tol)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"{who}: weak_tol must be a number in [0, 1), got {weak_tol!r}") from None
    if not (0.0 <= value < 1.0):
        raise InvalidOptionError(f"{who}: weak_tol must be a finite number in [0, 1) (a relative "
                          f"accuracy, default {DEFAULT_WEAK_TOL:g}), got {weak_tol!r}")
    return value


def zero_weak_rows(J: np.ndarray, weak: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``J`` (``(B, N, N)``) with the complementarity rows ``offset + i``
    of the weakly active constraints (``weak``: ``(B, m)``) set to zero."""
    J = np.array(J, dtype=float, copy=True)
    bi, ci = np.nonzero(weak)
    J[bi, offset + ci, :] = 0.0
    return J


def weak_message(who: str, weak: np.ndarray, weak_tol: float,
                 batched: bool = False) -> str:
    """The one text of the weakly-active warning (``weak``: ``(B, m)`` or ``(m,)``)."""
    weak = np.atleast_2d(weak)
    if batched:
        inst = np.flatnonzero(weak.any(axis=1)).tolist()
        where = f"batch instance(s) {inst[:10]}{' ...' if len(inst) > 10 else ''}"
    else:
        where = f"constraint(s) {np.flatnonzero(weak[0]).tolist()[:10]}"
    return (f"{who}: {int(weak.sum())} weakly active constraint(s) in {where}: the multiplier "
            f"nu_i and the slack s_i are both indistinguishable from 0 (scale-free margins "
            f"max(nu_bar_i, s_bar_i) <= max(weak_tol={weak_tol:g}, 10 x the forward's "
            f"complementarity); see nimplicit.kkt). The solution is not differentiable there; "
            f"using the minimum-norm convention (those rows of the KKT Jacobian set to zero, "
            f"least-squares solve), one choice among many.")


def warn_weak(who: str, weak: np.ndarray, weak_tol: float, batched: bool = False) -> None:
    """Issue the :class:`~nimplicit.errors.ImplicitGradientWarning` of :func:`weak_message`."""
    warn(weak_message(who, weak, weak_tol, batched))
