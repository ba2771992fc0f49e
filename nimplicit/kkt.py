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
           "weak_message", "check_weak_tol", "ruiz_scaling", "equilibrated_lu_state", "EquilibratedState",
           "MinimumNormState", "signed_margins",
           "check_kkt_point", "check_second_order", "DEFAULT_KKT_TOL", "DEFAULT_SECOND_ORDER_TOL"]

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
    ok = den > 0
    return np.where(ok, num / np.where(ok, den, 1.0), 0.0)


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


def ruiz_scaling(J: np.ndarray, sweeps: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """Row and column scalings ``(Dr, Dc)`` (``(..., N)`` each) that make every row and
    column of ``diag(Dr) J diag(Dc)`` of max-norm ~1 (Ruiz's iteration), as powers of two
    so that the scaling itself is exact.  A KKT Jacobian scaled so has a condition number
    independent of the scales of the objective and of each constraint (which scale its
    rows and columns)."""
    Dr = np.ones(J.shape[:-1])
    Dc = np.ones(J.shape[:-2] + J.shape[-1:])
    M = np.abs(J)
    for _ in range(sweeps):
        S = Dr[..., :, None] * M * Dc[..., None, :]
        r, c = S.max(axis=-1), S.max(axis=-2)
        r[~(r > 0)] = 1.0
        c[~(c > 0)] = 1.0
        Dr = Dr * np.exp2(-np.round(0.5 * np.log2(r)))
        Dc = Dc * np.exp2(-np.round(0.5 * np.log2(c)))
    return Dr, Dc


class EquilibratedState:
    r"""A :class:`~nimplicit.linear_solvers.LinearSolverState` solving with ``J`` through
    a state ``inner`` of ``\hat J = \operatorname{diag}(D_r) J \operatorname{diag}(D_c)``:
    ``J x = b`` is ``\hat J (x / D_c) = D_r b`` and ``J^T x = b`` is
    ``\hat J^T (x / D_r) = D_c b``."""

    def __init__(self, inner, Dr: np.ndarray, Dc: np.ndarray):
        self.inner, self.Dr, self.Dc = inner, Dr, Dc
        self.exact = inner.exact

    def solve(self, b: np.ndarray, transpose: bool = False) -> np.ndarray:
        b = np.asarray(b, dtype=float)
        bb = b.reshape(self.Dr.shape)
        if transpose:
            x = self.Dr * self.inner.solve(self.Dc * bb, transpose=True)
        else:
            x = self.Dc * self.inner.solve(self.Dr * bb, transpose=False)
        return x.reshape(b.shape)


def equilibrated_lu_state(J: np.ndarray, **lu_options) -> EquilibratedState:
    """The core's :class:`~nimplicit.linear_solvers.LU` state of the Ruiz-equilibrated
    ``diag(Dr) J diag(Dc)`` (:func:`ruiz_scaling`; ``J`` of shape ``(N, N)`` or
    ``(B, N, N)``), so that its condition test (``max_condition``) does not depend on the
    scales of the objective and of each constraint.  ``b`` of its ``solve`` has
    ``J``'s batch shape: ``(N,)`` or ``(B, N)``."""
    from . import linear_solvers
    J = np.asarray(J, dtype=float)
    Dr, Dc = ruiz_scaling(J)
    inner = linear_solvers.LU(**lu_options).init(
        linear_solvers.MatrixOperator(Dr[..., :, None] * J * Dc[..., None, :]))
    return EquilibratedState(inner, Dr, Dc)


class MinimumNormState:
    """The minimum-norm least-squares state (the core's
    :class:`~nimplicit.linear_solvers.Lstsq`) of ``J`` with the rows of the weakly active
    constraints zeroed (:func:`zero_weak_rows`); never exact (``J`` is singular there)."""

    exact = False

    def __init__(self, J: np.ndarray, weak: np.ndarray, offset: int):
        from . import linear_solvers
        self.N = J.shape[-1]
        self.inner = linear_solvers.Lstsq().init(
            linear_solvers.MatrixOperator(zero_weak_rows(J, weak, offset)))

    def solve(self, b: np.ndarray, transpose: bool = False) -> np.ndarray:
        b = np.asarray(b, dtype=float)
        return np.asarray(self.inner.solve(b.reshape(-1, self.N), transpose=transpose)
                          ).reshape(b.shape)


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


# ------------------------------------------------------------------------------
# checks of a forward point (issue 11 item 2)
# ------------------------------------------------------------------------------

#: default of the scale-free feasibility / sign / complementarity tolerance
DEFAULT_KKT_TOL = 1e-6
#: default relative threshold of the second-order test (the core's max_condition is 1e12)
DEFAULT_SECOND_ORDER_TOL = 1e-12


def signed_margins(nu: np.ndarray, s: np.ndarray, row_norms: np.ndarray,
                   stationarity_terms: float, slack_terms: np.ndarray):
    """Like :func:`normalized_margins` but keeping signs (negative = violated)."""
    nu = np.asarray(nu, float)
    s = np.asarray(s, float)
    S = float(stationarity_terms) + float(np.abs(row_norms * nu).sum())
    nu_bar = row_norms * nu / S if S > 0 else np.zeros_like(nu)
    s_bar = _safe_ratio(s, slack_terms) if s.size else s
    return nu_bar, s_bar


def check_kkt_point(who: str, *, eq_bar: np.ndarray, nu_bar: np.ndarray, s_bar: np.ndarray,
                    tol: float = DEFAULT_KKT_TOL) -> None:
    r"""Raise a typed error unless the normalised quantities describe a KKT point.

    ``eq_bar_j = |h_j(y)|`` relative to its terms, and the *signed* margins
    ``nu_bar, s_bar`` (:func:`signed_margins`, ``s = -g(y)``), all scale-free.

    - primal feasibility: ``eq_bar_j <= tol`` and ``s_bar_i >= -tol``
      (:class:`~nimplicit.errors.PrimalInfeasibleError`);
    - dual feasibility: ``nu_bar_i >= -tol`` (:class:`~nimplicit.errors.DualInfeasibleError`);
    - complementarity: ``min(nu_bar_i, s_bar_i) <= tol``
      (:class:`~nimplicit.errors.ComplementarityError`).
    """
    from .errors import ComplementarityError, DualInfeasibleError, PrimalInfeasibleError
    fix = " Check the forward solver (or the problem's feasibility), or pass a better y0."
    if eq_bar.size and not eq_bar.max() <= tol:
        j = int(np.argmax(eq_bar))
        raise PrimalInfeasibleError(
            f"{who}: the forward point violates equality constraint {j}: |h_j(y)| is "
            f"{eq_bar[j]:.3g} of the size of its terms (> tol={tol:g}).{fix}")
    if s_bar.size and not s_bar.min() >= -tol:
        i = int(np.argmin(s_bar))
        raise PrimalInfeasibleError(
            f"{who}: the forward point violates inequality constraint {i}: g_i(y) > 0 by "
            f"{-s_bar[i]:.3g} of the size of its terms (> tol={tol:g}); "
            f"{int((s_bar < -tol).sum())} constraint(s) violated.{fix}")
    if nu_bar.size and not nu_bar.min() >= -tol:
        i = int(np.argmin(nu_bar))
        raise DualInfeasibleError(
            f"{who}: the inequality multiplier nu_{i} is negative ({-nu_bar[i]:.3g} of the "
            f"stationarity terms, > tol={tol:g}): not a KKT point of a minimisation "
            f"(nu >= 0 for g(y) <= 0). Check the solver's sign convention or its active set.")
    if nu_bar.size:
        both = np.minimum(nu_bar, s_bar)
        if not both.max() <= tol:
            i = int(np.argmax(both))
            raise ComplementarityError(
                f"{who}: complementarity fails at inequality constraint {i}: nu_i > 0 on a "
                f"constraint that is not active (normalised nu_i = {nu_bar[i]:.3g}, slack "
                f"{s_bar[i]:.3g}, both > tol={tol:g}).{fix}")


def check_second_order(who: str, H: np.ndarray, C: Optional[np.ndarray] = None,
                       tol: float = DEFAULT_SECOND_ORDER_TOL) -> None:
    r"""Second-order sufficiency: ``Z^T H Z`` positive definite, ``Z`` a basis of the
    null space of ``C`` (the active constraints' Jacobian; ``None``: no constraints).

    Positive definite means ``lambda_min(Z^T H Z) > tol * max(|lambda(H)|)``
    (scale-free); otherwise :class:`~nimplicit.errors.NotAMinimumError`.  ``H`` may
    be a callable returning it, called only when the null space is not trivial
    (an expensive Hessian is then not formed when nothing is to be checked).
    """
    import scipy.linalg
    from .errors import NotAMinimumError
    Z = None
    if C is not None and np.size(C):
        Z = scipy.linalg.null_space(np.asarray(C, float))
        if Z.shape[1] == 0:
            return
    H = np.asarray(H() if callable(H) else H, float)
    H = 0.5 * (H + H.T)
    Hr = H if Z is None else Z.T @ H @ Z
    ev = np.linalg.eigvalsh(Hr)
    scale = float(np.abs(np.linalg.eigvalsh(H)).max(initial=0.0))
    if ev.size and ev.min() > tol * scale and scale > 0:
        return
    where = "the Hessian" if Z is None else \
        f"the reduced Hessian of the Lagrangian (on the {Z.shape[1]}-dimensional null space " \
        f"of the active constraints)"
    kind = ("a maximum or a saddle point" if ev.size and ev.min() < -tol * scale else
            "a degenerate stationary point (zero curvature in some direction)")
    raise NotAMinimumError(
        f"{who}: the forward point is not a strict local minimum: {where} has smallest "
        f"eigenvalue {ev.min():.3g} against a largest |eigenvalue| {scale:.3g} "
        f"(needs > {tol:g} x that): {kind}. The implicit gradient of an argmin is defined "
        f"at a strict minimum only; start the solver elsewhere (y0=) or check the objective.")
