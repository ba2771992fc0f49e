r"""A convex quadratic program as an implicit layer (the paper's section 5.1).

.. math::

    y^\star(Q, q, G, h, A, b) = \arg\min_y \tfrac12 y^\top Q y + q^\top y
    \quad\text{s.t.}\quad A y = b,\; G y \le h .

The layer is the zero of the KKT residual (the paper's eq. 27)

.. math::

    F(y, \lambda, \nu) = \begin{bmatrix} Q y + q + A^\top\lambda + G^\top\nu \\
                                         A y - b \\
                                         \operatorname{diag}(\nu)(G y - h) \end{bmatrix} = 0,

written once with ``autograd.numpy``; every gradient (with respect to all of
``Q, q, G, h, A, b``) comes from :func:`nimplicit.implicit_layer` through the
implicit function theorem, no hand-derived formula.  ``Q`` enters through its
symmetric part ``(Q + Q^T)/2`` (the objective only sees that part), so the
gradient with respect to ``Q`` is symmetric.

Forward
    :func:`reference_layers.kernels.qp_pdipm.solve_qp_batch`: a Mehrotra
    primal-dual interior point method in numba, the batch looped in compiled
    code, to a relative KKT residual of ``solver_options['tol']`` (default
    ``1e-10``), on the *equilibrated* problem (objective divided by
    ``max(|Q|, |q|)``, every row of ``G`` and ``A`` by its norm; same ``y``,
    multipliers unscaled afterwards), so that its stopping test does not depend
    on the problem's units.  Failures are per instance and raise a typed error
    naming the first failing instance: :class:`InfeasibleQPError`,
    :class:`UnboundedQPError`, :class:`NonConvexQPError`,
    :class:`RankDeficientEqualityError`, :class:`QPNotConvergedError`,
    :class:`QPNumericalError`.

    Instances that stall (``MAX_ITER``/``NUMERICAL_ERROR`` above ``accept_residual``)
    are re-solved once with the objective scaled by 10, then by 0.1.  Then the
    active-set polish (:meth:`_QPLayer._polish`) solves the equality-constrained
    KKT system of the interior point's active set exactly, correcting the set
    (rows with ``nu_i < 0`` dropped, rows with ``s_i < 0`` added) until the point
    is a KKT point to rounding; inactive ``nu_i`` are then exactly 0.

Backward (``backward=``)
    ``"structured"`` (default; ``"fast"`` is its deprecated alias): the linear
    solver plugged into the implicit node factors the KKT Jacobian
    ``J = dF/d(y, lam, nu)`` once per forward point by the structured elimination
    of the kernel (:func:`kkt_jacobian_factor`, ``O((m + p) n^2 + n^3)`` per
    instance) and solves ``J z = b`` or ``J^T z = b`` for all instances in
    ``O(n^2 + (m + p) n)`` each.  It uses the Jacobian of the solution's active
    set (``s_i = 0`` on strictly active, ``nu_i = 0`` on strictly inactive
    constraints).
    ``"generic"``: the core's dense LU of the same active-set ``J``, formed from
    autograd VJPs of ``F`` and Ruiz-equilibrated (so the core's condition test is
    scale-free) -- the paper's point, slower, the same numbers; or any core
    linear solver given as ``linear_solver=``.

Weakly active constraints (:mod:`nimplicit.kkt`, shared with ``constrained_argmin_layer``)
    With the scale-free margins ``nu_bar_i = ||G_i|| nu_i / S`` (``S`` the size of
    the stationarity equation's terms) and ``s_bar_i = s_i / (||G_i|| ||y|| +
    |h_i|)``, unchanged by scaling the objective or any constraint row, a
    constraint is weakly active when ``max(nu_bar_i, s_bar_i) <= max(weak_tol,
    10 eps)``, ``eps = max_i min(nu_bar_i, s_bar_i)`` the complementarity the
    forward reached (rounding after the polish).  ``J`` is then singular and
    ``y*`` not differentiable: the complementarity rows of those constraints are
    set to zero and that instance is solved by the minimum-norm least-squares
    solution (the core's ``'lstsq'``), with an
    :class:`~nimplicit.errors.ImplicitGradientWarning`.  Both backward modes
    apply the same convention.  The layer's ``diagnostics`` report the smallest
    margin over the batch (``strict_complementarity_margin``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import warnings

import autograd.numpy as np
import numpy as onp
from autograd.builtins import tuple as atuple
from autograd.tracer import getval

from nimplicit import BatchStatus, Outcome, Solution, implicit_layer, kkt, linear_solvers
from nimplicit.errors import (EmptyInputError, InvalidInputError, InvalidOptionError,
                              NotConvergedError, ShapeError, SingularJacobianError, SolverError,
                              UnknownOptionError)

from .kernels.qp_pdipm import (KKT_JACOBIAN_FLAG_MESSAGES, QP_STATUS_MESSAGES, KKTJacobianFlag,
                               QPStatus, kkt_jacobian_factor, kkt_jacobian_solve_factored,
                               polish_active_set, solve_qp_batch)

__all__ = ["qp_layer", "make_qp_layer", "kkt_residual", "complementarity_margin",
           "QPError", "InfeasibleQPError", "UnboundedQPError", "NonConvexQPError",
           "RankDeficientEqualityError", "QPNotConvergedError", "QPNumericalError"]


# ------------------------------------------------------------------------------
# typed errors
# ------------------------------------------------------------------------------

class QPError(SolverError):
    """The forward QP solve failed for at least one instance.

    Attributes
    ----------
    instances : indices (in the batch) of the failing instances, first one first
    """

    def __init__(self, message: str, instances: Sequence[int] = ()):
        super().__init__(message)
        self.instances = list(instances)


class InfeasibleQPError(QPError):
    """The constraints ``A y = b, G y <= h`` have no common solution."""


class UnboundedQPError(QPError):
    """The objective decreases without bound on the feasible set."""


class NonConvexQPError(QPError):
    """The symmetric part of ``Q`` is not positive semidefinite."""


class RankDeficientEqualityError(QPError):
    """``A`` does not have full row rank (the multipliers ``lam`` are not unique)."""


class QPNumericalError(QPError):
    """The interior point Newton systems could not be factored."""


class QPNotConvergedError(QPError, NotConvergedError):
    """The interior point method hit ``max_iter`` (or stalled) above ``tol``."""


_STATUS_ERRORS = {
    QPStatus.PRIMAL_INFEASIBLE: InfeasibleQPError,
    QPStatus.DUAL_INFEASIBLE: UnboundedQPError,
    QPStatus.NONCONVEX: NonConvexQPError,
    QPStatus.RANK_DEFICIENT_EQUALITY: RankDeficientEqualityError,
    QPStatus.MAX_ITER: QPNotConvergedError,
    QPStatus.NUMERICAL_ERROR: QPNumericalError,
}

#: the core's per-instance outcome of each kernel status (``throw=False``)
_STATUS_OUTCOMES = {
    QPStatus.PRIMAL_INFEASIBLE: Outcome.INFEASIBLE,
    QPStatus.DUAL_INFEASIBLE: Outcome.UNBOUNDED,
    QPStatus.NONCONVEX: Outcome.NOT_CONVEX,
    QPStatus.RANK_DEFICIENT_EQUALITY: Outcome.SOLVER_FAILED,
    QPStatus.MAX_ITER: Outcome.NOT_CONVERGED,
    QPStatus.NUMERICAL_ERROR: Outcome.SOLVER_FAILED,
}


# ------------------------------------------------------------------------------
# the residual (eq. 27), for one instance or a batch, any argument broadcast
# ------------------------------------------------------------------------------

def _sym(Q):
    return 0.5 * (Q + np.swapaxes(Q, -1, -2))


def _matvec(M, v):
    """``M v`` per instance; an unbatched ``M`` (2-d) is shared by every row of ``v``."""
    if np.ndim(M) == 3:
        return np.einsum("bij,bj->bi", M, v)
    return np.dot(v, np.transpose(M))


def _rmatvec(M, v):
    """``M^T v`` per instance (``M`` shared when 2-d)."""
    if np.ndim(M) == 3:
        return np.einsum("bji,bj->bi", M, v)
    return np.dot(v, M)


def kkt_residual(sol, Q, q, G, h, A=None, b=None):
    r"""The KKT residual of eq. 27 at ``sol = (y, lam, nu)`` (or ``(y, nu)`` without equalities).

    .. math::

        F = \big(\tfrac12(Q + Q^\top) y + q + A^\top\lambda + G^\top\nu,\;
                 A y - b,\; \nu \odot (G y - h)\big)

    Written with ``autograd.numpy``: broadcasting an unbatched argument over a
    batched ``sol`` makes autograd sum its gradient over the batch.
    """
    if A is None:
        y, nu = sol
        stat = _matvec(_sym(Q), y) + q + _rmatvec(G, nu)
        return stat, nu * (_matvec(G, y) - h)
    y, lam, nu = sol
    stat = _matvec(_sym(Q), y) + q + _rmatvec(A, lam) + _rmatvec(G, nu)
    return stat, _matvec(A, y) - b, nu * (_matvec(G, y) - h)


def _residual_no_eq(sol, Q, q, G, h):
    return kkt_residual(sol, Q, q, G, h)


def _residual_eq(sol, Q, q, G, h, A, b):
    return kkt_residual(sol, Q, q, G, h, A, b)


# ------------------------------------------------------------------------------
# shapes and broadcasting
# ------------------------------------------------------------------------------

_NDIM = {"Q": 2, "q": 1, "G": 2, "h": 1, "A": 2, "b": 1}


def _batch_size(named: dict) -> Optional[int]:
    """The common batch size of the batched arguments, or None when none is batched."""
    sizes = {}
    for name, x in named.items():
        nd = np.ndim(x)
        if nd == _NDIM[name] + 1:
            sizes[name] = np.shape(x)[0]
        elif nd != _NDIM[name]:
            raise ShapeError(f"qp_layer: {name} has shape {np.shape(x)}; expected {_NDIM[name]} "
                             f"dimensions, or {_NDIM[name] + 1} with a leading batch axis")
    if len(set(sizes.values())) > 1:
        raise ShapeError(f"qp_layer: the batched arguments disagree on the batch size: "
                         f"{sizes}; give every batched argument the same leading axis")
    return next(iter(sizes.values())) if sizes else None


def _check_shapes(named: dict) -> Tuple[int, int, int]:
    core = {k: np.shape(x)[-_NDIM[k]:] for k, x in named.items()}
    n = core["q"][0]
    m = core["h"][0]
    problems = []
    if core["Q"] != (n, n):
        problems.append(f"Q is {core['Q']} per instance, expected ({n}, {n}) (n = len(q))")
    if core["G"] != (m, n):
        problems.append(f"G is {core['G']} per instance, expected ({m}, {n}) (m = len(h))")
    p = 0
    if "A" in core:
        p = core["b"][0]
        if core["A"] != (p, n):
            problems.append(f"A is {core['A']} per instance, expected ({p}, {n}) (p = len(b))")
    if problems:
        raise ShapeError("qp_layer: inconsistent shapes: " + "; ".join(problems))
    return n, m, p


def _batched(x, B: int, ndim: int) -> onp.ndarray:
    x = onp.asarray(x, dtype=float)
    if x.ndim == ndim:
        x = onp.broadcast_to(x, (B,) + x.shape)
    return onp.ascontiguousarray(x)


def _raw_batch(inputs: tuple, B: Optional[int]):
    """``Q, q, G, h, A, b`` as contiguous ``(B, ...)`` arrays (empty ``A, b`` when absent)."""
    Bb = 1 if B is None else B
    Q, q, G, h = (_batched(x, Bb, nd) for x, nd in zip(inputs[:4], (2, 1, 2, 1)))
    if len(inputs) == 6:
        A, b = _batched(inputs[4], Bb, 2), _batched(inputs[5], Bb, 1)
    else:
        A, b = onp.zeros((Bb, 0, q.shape[1])), onp.zeros((Bb, 0))
    return Q, q, G, h, A, b


def _split_solution(point_y, has_eq: bool, B: Optional[int]):
    """``(y, lam, nu)`` as ``(B, .)`` arrays from the layer's raw output."""
    parts = [onp.asarray(v, dtype=float) for v in point_y]
    if B is None:
        parts = [v[None] for v in parts]
    if has_eq:
        return tuple(parts)
    y, nu = parts
    return y, onp.zeros((y.shape[0], 0)), nu


def _margins(Q, q, G, h, A, y, lam, nu):
    r"""Scale-free margins ``(nu_bar, s_bar, s)`` per constraint (``(B, m)`` each), see
    :mod:`nimplicit.kkt`: ``nu_bar_i = ||G_i|| nu_i / S`` with
    ``S = ||Q y|| + ||q|| + ||A^T lam|| + sum_j ||G_j|| nu_j`` and
    ``s_bar_i = s_i / (||G_i|| ||y|| + |h_i|)``, ``s = h - G y``."""
    Qs = 0.5 * (Q + onp.swapaxes(Q, -1, -2))
    s = h - _bmv(G, y)
    row = onp.sqrt((G * G).sum(axis=-1))
    terms = _norm(_bmv(Qs, y)) + _norm(q) + _norm(_bmtv(A, lam))
    slack_terms = row * _norm(y)[:, None] + onp.abs(h)
    nu_bar, s_bar = kkt.normalized_margins(nu, s, row, terms, slack_terms)
    return nu_bar, s_bar, s


def complementarity_margin(Q, q, G, h, y, nu, A=None, lam=None) -> onp.ndarray:
    r"""Scale-free strict-complementarity margin ``max(nu_bar_i, s_bar_i)`` per constraint.

    ``nu_bar_i = ||G_i|| nu_i / S`` (``S = ||Q y|| + ||q|| + ||A^T lam|| +
    sum_j ||G_j|| nu_j``) and ``s_bar_i = (h_i - G_i y) / (||G_i|| ||y|| + |h_i|)``:
    unchanged by scaling the objective or any constraint row (see
    :mod:`nimplicit.kkt`).  Arrays unbatched or with a leading batch axis (the
    result then has shape ``(B, m)``); a margin ``~ 0`` is a weakly active constraint.
    """
    batched = onp.ndim(y) == 2
    Bb = onp.shape(y)[0] if batched else 1
    Qb, qb, Gb, hb, yb, nub = (_batched(x, Bb, nd) for x, nd in
                               zip((Q, q, G, h, y, nu), (2, 1, 2, 1, 1, 1)))
    if A is None:
        Ab, lamb = onp.zeros((Bb, 0, qb.shape[1])), onp.zeros((Bb, 0))
    else:
        Ab, lamb = _batched(A, Bb, 2), _batched(lam, Bb, 1)
    nu_bar, s_bar, _ = _margins(Qb, qb, Gb, hb, Ab, yb, lamb, nub)
    out = onp.maximum(nu_bar, s_bar)
    return out if batched else out[0]


# ------------------------------------------------------------------------------
# the layer
# ------------------------------------------------------------------------------

class _QPLayer:
    """Forward solver, backward linear solvers and diagnostics of one configuration."""

    def __init__(self, *, batch_size: Optional[int], has_eq: bool, backward: str,
                 linear_solver, linear_solver_options: Optional[dict], solver_options: dict,
                 weak_tol: float, warm_start, residual_tol: float, throw: bool = True):
        if backward != "generic" and (linear_solver is not None or linear_solver_options):
            raise InvalidOptionError(
                "qp_layer: linear_solver / linear_solver_options apply to backward='generic' "
                "only (the structured backward has its own factorization)")
        if linear_solver is not None:   # an unknown name or option fails now
            linear_solvers.make_solver(linear_solver, linear_solver_options)
        self.B = batch_size
        self.has_eq = has_eq
        self.throw = throw
        opts = dict(solver_options)
        self.tol = opts.pop("tol")
        self.max_iter = opts.pop("max_iter")
        self.accept_residual = opts.pop("accept_residual")
        self.polish = opts.pop("polish")
        if "kernel_polish" in opts:
            opts["polish"] = opts.pop("kernel_polish")
        self.solver_options = opts            # passed on to solve_qp_batch
        self.weak_tol = weak_tol
        self.warm_start = warm_start
        self.linear_solver = linear_solver
        self.linear_solver_options = dict(linear_solver_options or {})
        linear = (QPStructuredSolver() if backward == "structured" else
                  QPGenericSolver(base=linear_solver, base_options=linear_solver_options or None))
        self.layer = implicit_layer(
            _residual_eq if has_eq else _residual_no_eq, self._forward,
            linear_solver=linear, batch_axis=None if batch_size is None else 0,
            residual_tol=residual_tol, diagnostics=self._diagnostics, throw=throw)

    # -- forward ------------------------------------------------------------
    def _warm(self, Q, G, h, scales):
        if self.warm_start is None:
            return None
        ws = tuple(onp.asarray(v, float) for v in self.warm_start)
        if len(ws) == 2:
            y, nu = ws
            lam = None
        elif len(ws) == 3:
            y, lam, nu = ws
        else:
            raise ValueError("warm_start must be (y, nu) or (y, lam, nu), as returned with "
                             "full_output=True")
        Bb = Q.shape[0]
        y = _batched(y, Bb, 1)
        nu = _batched(nu, Bb, 1)
        lam = onp.zeros((Bb, 0)) if lam is None or lam.size == 0 else _batched(lam, Bb, 1)
        s = h - onp.einsum("bij,bj->bi", G, y)
        c, g_rows, a_rows = scales
        if lam.shape[1] != a_rows.shape[1]:
            lam = onp.zeros_like(a_rows)
        return y, lam * a_rows / c[:, None], nu * g_rows / c[:, None], s / g_rows

    def _forward(self, *inputs):
        Q, q, G, h, A, b = _raw_batch(inputs, self.B)
        # the interior point runs on the equilibrated problem (objective and every
        # constraint row of unit size): its stopping test is then scale-free
        scales = _equilibration(Q, q, G, A)
        Qn, qn, Gn, hn, An, bn = _equilibrate(Q, q, G, h, A, b, scales)
        res = solve_qp_batch(Qn, qn, Gn, hn, An, bn, max_iter=self.max_iter, tol=self.tol,
                             warm_start=self._warm(Q, G, h, scales), **self.solver_options)
        res = self._retry(res, Qn, qn, Gn, hn, An, bn)
        status = res.status.copy()
        # a stall at the problem's accuracy floor, below accept_residual, is a solution
        status[(status == QPStatus.MAX_ITER) & (res.kkt_residual <= self.accept_residual)] = 0
        bad = onp.flatnonzero(status != QPStatus.SOLVED)
        if bad.size and not self.throw:
            return self._forward_with_failures(Q, q, G, h, A, b, Qn, qn, Gn, hn, An, bn,
                                               scales, res, status)
        if bad.size:
            k = int(bad[0])
            code = QPStatus(int(status[k]))
            where = f"batch instance {k} ({bad.size} of {len(status)} failed)" if self.B is not None \
                else "the QP"
            raise _STATUS_ERRORS[code](f"qp_layer: {where}: {QP_STATUS_MESSAGES[code]}"
                                       f"{self._status_extra(code, res, k)}",
                                       [int(i) for i in bad])
        c, g_rows, a_rows = scales
        # polish in the equilibrated units too (the margins are the same in both)
        y, lam, nu = self._polish(Qn, qn, Gn, hn, An, bn, res.y, res.lam,
                                  onp.maximum(res.nu, 0.0))
        lam = lam * c[:, None] / a_rows
        nu = nu * c[:, None] / g_rows
        out = (y, lam, nu) if self.has_eq else (y, nu)
        aux = self._aux(Q, q, G, h, A, y, lam, nu)
        return Solution(tuple(v[0] for v in out) if self.B is None else out, aux=aux)

    def _status_extra(self, code, res, k: int) -> str:
        if code != QPStatus.MAX_ITER:
            return ""
        return (f" (KKT residual {res.kkt_residual[k]:.3g} after {res.iterations[k]} "
                f"iterations; tol={self.tol:g}, max_iter={self.max_iter}, "
                f"accept_residual={self.accept_residual:g})")

    def _forward_with_failures(self, Q, q, G, h, A, b, Qn, qn, Gn, hn, An, bn, scales, res,
                               status):
        """``throw=False`` with failed instances: polish the solved ones only, NaN rows for
        the failed ones, and a :class:`~nimplicit.BatchStatus` with the kernel's outcome.

        The failed instances' rows of :class:`QPAux` describe a benign problem
        (``Q = I``, ``G = 0``, ``A = [I 0]``, ``s = nu = 1``, no active or weak
        constraint), so both backward factorizations are regular there; the core
        gives those rows a zero right-hand side, hence a zero solution."""
        failed = status != QPStatus.SOLVED
        failures = {int(k): (_STATUS_OUTCOMES[QPStatus(int(status[k]))],
                             f"qp_layer: {QP_STATUS_MESSAGES[QPStatus(int(status[k]))]}"
                             f"{self._status_extra(QPStatus(int(status[k])), res, int(k))}")
                    for k in onp.flatnonzero(failed)}
        y = onp.full_like(res.y, onp.nan)
        lam = onp.full_like(res.lam, onp.nan)
        nu = onp.full_like(res.nu, onp.nan)
        ok = onp.flatnonzero(~failed)
        c, g_rows, a_rows = scales
        if ok.size:
            yk, lk, nk = self._polish(Qn[ok], qn[ok], Gn[ok], hn[ok], An[ok], bn[ok], res.y[ok],
                                      res.lam[ok], onp.maximum(res.nu[ok], 0.0))
            y[ok], lam[ok] = yk, lk * c[ok, None] / a_rows[ok]
            nu[ok] = nk * c[ok, None] / g_rows[ok]
        Qa, qa, Ga, ha, Aa = (onp.array(v, dtype=float, copy=True) for v in (Q, q, G, h, A))
        ya, la, na = y.copy(), lam.copy(), nu.copy()
        n, p = Q.shape[-1], A.shape[1]
        Qa[failed], qa[failed], Ga[failed], ha[failed] = onp.eye(n), 0.0, 0.0, 1.0
        Aa[failed], ya[failed], la[failed], na[failed] = onp.eye(p, n), 0.0, 0.0, 1.0
        with onp.errstate(invalid="ignore", divide="ignore"):
            aux = self._aux(Qa, qa, Ga, ha, Aa, ya, la, na)
        aux.weak[failed], aux.active[failed], aux.inactive[failed] = False, False, False
        aux.margin[failed] = onp.inf
        out = (y, lam, nu) if self.has_eq else (y, nu)
        report = BatchStatus.from_failures(len(status), failures)
        return Solution(tuple(v[0] for v in out) if self.B is None else out, aux=aux,
                        status=report)

    #: active-set corrections (one row each) tried by the polish before it gives up
    POLISH_STEPS = 24
    #: a polished point with a relative KKT residual below this is always kept
    POLISH_ACCEPT = 1e-13
    #: a normalised multiplier or slack above ``-POLISH_SIGN_TOL`` counts as >= 0
    #: (rounding of the exact solve of the reduced KKT system)
    POLISH_SIGN_TOL = 1e-12

    def _polish(self, Q, q, G, h, A, b, y, lam, nu):
        r"""Active-set polish, for the whole batch at once: starting from the strictly
        active set ``a`` of the interior point's solution (``nu_bar_i > s_bar_i``,
        scale-free margins of :mod:`nimplicit.kkt`; at most ``n - p`` rows, ranked by
        ``nu_bar_i / s_bar_i``), solve the active set's KKT system (below; the kernel
        eliminates the rows ``nu_i = 0`` off ``a`` and solves for ``(y, lam, nu_a)``,
        size ``n + p + |a| <= 2 n``) per instance (LU with partial pivoting, compiled:
        :func:`~reference_layers.kernels.qp_pdipm.polish_active_set`, one thread per
        chunk of the batch, no per-instance Python),

        .. math::
            \begin{bmatrix} Q & A^T & G^T \\ A & 0 & 0 \\ D_a G & 0 & -(I - D_a) \end{bmatrix}
            \begin{bmatrix} y \\ \lambda \\ \nu \end{bmatrix} =
            \begin{bmatrix} -q \\ b \\ D_a h \end{bmatrix}

        (``D_a`` the 0/1 diagonal of ``a``: ``G_a y = h_a`` and ``nu_i = 0`` off ``a``),
        then drop the row with the most negative ``nu_bar_i``, or else add the row with
        the most negative ``s_bar_i`` (to rounding, :attr:`POLISH_SIGN_TOL`), and repeat
        for the instances that changed, at most :attr:`POLISH_STEPS` times.  The result is kept when it is a KKT point
        (signs hold) with a relative KKT residual no larger than the interior point's
        (or below :attr:`POLISH_ACCEPT`).  The polished point is exact to rounding, so
        the margins (and ``weak_tol``) are judged at rounding accuracy, and finite
        differences of the layer are limited by rounding, not by ``tol``.  On the
        instances where it fails, ``nu_i`` of strictly inactive constraints (the
        interior point's ``~mu / s_i``) is set to exactly 0.
        """
        y, lam, nu = y.copy(), lam.copy(), nu.copy()
        nu_bar, s_bar, _ = _margins(Q, q, G, h, A, y, lam, nu)
        if not self.polish:
            nu[kkt.strict_sets(nu_bar, s_bar, self.weak_tol)[1]] = 0.0
            return y, lam, nu
        num_threads = self.solver_options.get("num_threads")
        y, lam, nu, done = polish_active_set(
            Q, q, G, h, A, b, y, lam, nu, nu_bar, s_bar, steps=self.POLISH_STEPS,
            accept=self.POLISH_ACCEPT, sign_tol=self.POLISH_SIGN_TOL, num_threads=num_threads)
        failed = ~done
        if failed.any():
            _, inactive = kkt.strict_sets(nu_bar[failed], s_bar[failed], self.weak_tol)
            nu[failed] = onp.where(inactive, 0.0, nu[failed])
        return y, lam, nu

    #: objective scalings tried, in turn, on instances that did not converge
    RETRY_SCALES = (10.0, 0.1)

    def _retry(self, res, Q, q, G, h, A, b):
        """Re-solve the instances that stalled (``MAX_ITER``/``NUMERICAL_ERROR``) with the
        objective scaled by ``a`` (``a Q, a q``: same ``y``, multipliers times ``a``).

        The interior point method occasionally stalls far from the solution on an
        instance that it solves in ~10 iterations once the objective is rescaled (seen
        on learned QPs with ``cond(Q) ~ 1e4``); the rescaled solution is unscaled and
        checked like any other (status, then the residual check of the core).
        """
        retry = (res.status == QPStatus.MAX_ITER) | (res.status == QPStatus.NUMERICAL_ERROR)
        retry &= res.kkt_residual > self.accept_residual
        if not retry.any():
            return res
        out = [a.copy() for a in res]
        for scale in self.RETRY_SCALES:
            idx = onp.flatnonzero(retry)
            if not idx.size:
                break
            sub = solve_qp_batch(scale * Q[idx], scale * q[idx], G[idx], h[idx], A[idx], b[idx],
                                 max_iter=self.max_iter, tol=self.tol, **self.solver_options)
            ok = sub.status == QPStatus.SOLVED
            good = idx[ok]
            out[0][good] = sub.y[ok]
            out[1][good] = sub.lam[ok] / scale
            out[2][good] = sub.nu[ok] / scale
            out[3][good] = sub.s[ok]
            out[4][good] = QPStatus.SOLVED
            out[5][good] += sub.iterations[ok]
            out[6][good] = sub.kkt_residual[ok]
            retry[good] = False
        return type(res)(*out)

    # -- the point's data (built once, by the forward) -----------------------
    def _aux(self, Q, q, G, h, A, y, lam, nu) -> "QPAux":
        nu_bar, s_bar, s = _margins(Q, q, G, h, A, y, lam, nu)
        weak = kkt.weak_mask(nu_bar, s_bar, self.weak_tol)
        active, inactive = kkt.strict_sets(nu_bar, s_bar, self.weak_tol)
        return QPAux(Q, G, A, y, nu, s, weak, active, inactive, onp.maximum(nu_bar, s_bar),
                     self.weak_tol, self.B is not None)

    # -- diagnostics -----------------------------------------------------------
    def _diagnostics(self, point):
        aux = point.aux
        margin, weak = aux.margin, aux.weak
        if margin.shape[1] == 0:
            return {}
        smallest = margin.min(axis=1)
        k = int(onp.argmin(smallest))
        value = float(smallest[k])
        ok = not weak.any()
        where = f" (batch instance {k})" if self.B is not None else ""
        why = (f"smallest scale-free margin max(nu_bar_i, s_bar_i) over the constraints{where}; "
               + ("strict complementarity holds" if ok else
                  f"a weakly active constraint (margin <= max(weak_tol={self.weak_tol:g}, 10 x the "
                  f"forward's complementarity)): the QP solution is not differentiable there "
                  f"(minimum-norm convention used)"))
        return {"strict_complementarity_margin": (value, ok, why)}


class QPAux:
    """The QP forward's byproducts at one point (all ``(B, .)``, ``B = 1`` unbatched),
    handed to the backward's :meth:`~nimplicit.linear_solvers.LinearSolver.init` and to
    the diagnostics: the data ``Q, G, A``, the solution ``y, nu``, the slacks
    ``s = h - G y``, the weakly active / strictly active / strictly inactive masks of
    :mod:`nimplicit.kkt`, the scale-free margins ``max(nu_bar_i, s_bar_i)``, and the
    layer's ``weak_tol`` and whether it is batched (for the warning's text)."""

    __slots__ = ("Q", "G", "A", "y", "nu", "s", "weak", "active", "inactive", "margin",
                 "weak_tol", "batched")

    def __init__(self, Q, G, A, y, nu, s, weak, active, inactive, margin, weak_tol, batched):
        self.Q, self.G, self.A, self.y, self.nu, self.s = Q, G, A, y, nu, s
        self.weak, self.active, self.inactive, self.margin = weak, active, inactive, margin
        self.weak_tol, self.batched = weak_tol, batched

    def __getstate__(self):
        return tuple(getattr(self, k) for k in self.__slots__)

    def __setstate__(self, state):
        for k, v in zip(self.__slots__, state):
            setattr(self, k, v)

    @property
    def n_primal_dual(self) -> int:
        """``n + p``: the offset of the complementarity rows in ``(y, lam, nu)``."""
        return self.G.shape[2] + self.A.shape[1]

    def warn_weak(self) -> None:
        kkt.warn_weak("qp_layer", self.weak, self.weak_tol, batched=self.batched)


def _check_aux(aux, who: str) -> QPAux:
    if not isinstance(aux, QPAux):
        raise SolverError(f"{who}: the forward point carries no QPAux (it is the linear solver "
                          f"of qp_layer, whose forward hands its active sets over)")
    return aux


class _BatchReshape:
    """A state whose ``solve`` takes ``b`` as ``(N,)`` or ``(B, N)`` around one on ``(B, N)``."""

    def __init__(self, inner, N: int):
        self.inner, self.N, self.exact = inner, N, inner.exact

    def solve(self, b, transpose=False):
        b = onp.asarray(b, dtype=float)
        return onp.asarray(self.inner.solve(b.reshape(-1, self.N), transpose=transpose)
                           ).reshape(b.shape)


def _exact_active_jacobian(J, active):
    """``J`` (``(B, N, N)``) with the diagonal entry ``-s_i`` of every strictly active
    constraint's complementarity row set to 0: the Jacobian of the solution's active set
    (``s_i`` is rounding there, and ``s_i / nu_i`` would perturb the gradient by up to
    ``~1e-16 / nu_bar_i``; inactive rows already have ``nu_i = 0`` exactly)."""
    J = onp.array(J, dtype=float, copy=True)
    m = active.shape[1]
    off = J.shape[-1] - m
    bi, ci = onp.nonzero(active)
    J[bi, off + ci, off + ci] = 0.0
    return J


class QPGenericSolver(linear_solvers.LinearSolver):
    """``backward='generic'``: the autograd Jacobian ``J`` of the KKT residual, formed
    once per point.  Without a weakly active constraint: ``base`` when given (any
    linear solver of the core, with ``base_options``), else the LU of the
    Ruiz-equilibrated active-set Jacobian (:func:`_exact_active_jacobian`,
    :func:`nimplicit.kkt.equilibrated_lu_state`).  With one: the minimum-norm
    convention (rows zeroed, :class:`~nimplicit.kkt.MinimumNormState`,
    ``state.exact`` False) and an :class:`~nimplicit.errors.ImplicitGradientWarning`."""

    name = "qp_generic"
    options = {"base": None, "base_options": None}

    def init(self, operator, aux=None):
        aux = _check_aux(aux, "QPGenericSolver")
        degenerate = bool(aux.weak.any())
        if not degenerate and self.opts["base"] is not None:
            return linear_solvers.make_solver(self.opts["base"],
                                              self.opts["base_options"]).init(operator, aux)
        J = operator.dense()
        N = J.shape[-1]
        J = _exact_active_jacobian(J.reshape(-1, N, N), aux.active)
        if not degenerate:
            return _BatchReshape(kkt.equilibrated_lu_state(J), N)
        aux.warn_weak()
        return kkt.MinimumNormState(J, aux.weak, aux.n_primal_dual)


def _analytic_jacobian(Q, G, A, nu, s):
    """Dense ``J = dF/d(y, lam, nu)`` per instance (for the few weakly active instances)."""
    Bk, m, n = G.shape
    p = A.shape[1]
    N = n + p + m
    J = onp.zeros((Bk, N, N))
    J[:, :n, :n] = 0.5 * (Q + onp.swapaxes(Q, -1, -2))
    J[:, :n, n:n + p] = onp.swapaxes(A, -1, -2)
    J[:, :n, n + p:] = onp.swapaxes(G, -1, -2)
    J[:, n:n + p, :n] = A
    J[:, n + p:, :n] = nu[:, :, None] * G
    J[:, n + p:, n + p:] = onp.einsum("bi,ij->bij", -s, onp.eye(m))
    return J


class _QPStructuredState:
    """Solves with the structured factorization of the KKT Jacobian (numba kernel),
    and with least squares on the weakly active instances."""

    def __init__(self, factors, weak_inst, weak_state, N: int):
        self.factors, self.weak_inst, self.weak_state, self.N = factors, weak_inst, weak_state, N
        self.exact = weak_state is None

    def solve(self, b, transpose=False):
        b = onp.asarray(b, dtype=float)
        bb = b.reshape(-1, self.N)
        z = kkt_jacobian_solve_factored(self.factors, bb, transpose=transpose)
        if self.weak_state is not None:
            z[self.weak_inst] = self.weak_state.solve(bb[self.weak_inst], transpose=transpose)
        return z.reshape(b.shape)


class QPStructuredSolver(linear_solvers.LinearSolver):
    """``backward='structured'`` (default): the numba factorization of the KKT Jacobian
    of the active set the forward decided (slack 0 on strictly active constraints,
    multiplier 0 on strictly inactive ones), built once per point from the forward's
    :class:`QPAux`; never forms ``J`` by autograd.  Instances with a weakly active
    constraint are solved by the minimum-norm convention (``state.exact`` False) with
    an :class:`~nimplicit.errors.ImplicitGradientWarning`; a singular Jacobian raises
    :class:`~nimplicit.errors.SingularJacobianError`."""

    name = "qp_structured"
    options = {}

    def init(self, operator, aux=None):
        aux = _check_aux(aux, "QPStructuredSolver")
        weak, active, inactive = aux.weak, aux.active, aux.inactive
        # weakly active constraints are not passed to the factorization as such:
        # those instances are solved by least squares
        s_f, nu_f = aux.s.copy(), aux.nu.copy()
        s_f[weak], nu_f[weak] = 1.0, 1.0
        # the active set's exact Jacobian: slack 0 on strictly active constraints
        # (h_i - G_i y is at rounding, not 0), multiplier 0 on strictly inactive ones
        s_f[active], nu_f[inactive] = 0.0, 0.0
        # degeneracy was decided by the scale-free margins: the kernel's absolute
        # test is switched off (degen_tol=0 flags only exact zeros)
        factors = kkt_jacobian_factor(aux.Q, aux.G, aux.A, s_f, nu_f, degen_tol=0.0)
        singular = onp.flatnonzero(factors.flag != KKTJacobianFlag.OK)
        if singular.size:
            k = int(singular[0])
            where = f" (batch instance {k})" if aux.batched else ""
            raise SingularJacobianError(
                f"qp_layer: the KKT Jacobian at the solution{where} is singular: "
                f"{KKT_JACOBIAN_FLAG_MESSAGES[KKTJacobianFlag(int(factors.flag[k]))]} The "
                f"gradient is not unique there; use backward='generic' to inspect J, or perturb "
                f"the data.")
        N = aux.n_primal_dual + aux.G.shape[1]
        weak_inst = onp.flatnonzero(weak.any(axis=1))
        weak_state = None
        if weak_inst.size:
            aux.warn_weak()
            k = weak_inst
            J = _analytic_jacobian(aux.Q[k], aux.G[k], aux.A[k], aux.nu[k], aux.s[k])
            weak_state = kkt.MinimumNormState(J, weak[k], aux.n_primal_dual)
        return _QPStructuredState(factors, weak_inst, weak_state, N)


def _equilibration(Q, q, G, A):
    """Scales ``(c, ||G_i||, ||A_j||)`` of the objective and the constraint rows (zeros -> 1)."""
    c = onp.maximum(onp.abs(Q).max(axis=(1, 2), initial=0.0), onp.abs(q).max(axis=1, initial=0.0))
    g_rows = onp.linalg.norm(G, axis=-1)
    a_rows = onp.linalg.norm(A, axis=-1)
    for v in (c, g_rows, a_rows):
        v[~(v > 0)] = 1.0
    return c, g_rows, a_rows


def _equilibrate(Q, q, G, h, A, b, scales):
    """The problem with objective and constraint rows divided by their scales (same ``y``)."""
    c, g_rows, a_rows = scales
    return (Q / c[:, None, None], q / c[:, None], G / g_rows[..., None], h / g_rows,
            A / a_rows[..., None], b / a_rows)


def _bmv(M, v):
    """``M v`` per instance (``(B, r, c) x (B, c)``)."""
    return (M @ v[..., None])[..., 0]


def _bmtv(M, v):
    """``M^T v`` per instance (``(B, r, c) x (B, r)``)."""
    return (v[..., None, :] @ M)[..., 0, :]


def _norm(v):
    return onp.sqrt((v * v).sum(axis=-1))


#: the keys of ``solver_options`` (forward) and their defaults
_LAYER_SOLVER_OPTIONS = {"tol": 1e-10, "max_iter": 100, "accept_residual": 1e-8,
                         "polish": True}
#: further keys passed on to :func:`~reference_layers.kernels.qp_pdipm.solve_qp_batch`
_KERNEL_SOLVER_OPTIONS = ("reg", "psd_tol", "rank_tol", "consistency_tol", "cert_radius",
                          "warm_start_margin", "allow_redundant_equalities", "refine_steps",
                          "stall_iters", "stall_res", "kernel_polish", "num_threads")
_BACKWARDS = ("structured", "generic")


def _solver_options(options: Optional[dict], deprecated: dict) -> dict:
    """Validated forward options: the layer's own plus the kernel's (``kernel_polish`` is
    the kernel's ``polish``); unknown keys raise :class:`UnknownOptionError`."""
    if options is not None and not isinstance(options, dict):
        raise InvalidOptionError(f"qp_layer: solver_options must be a dict or None, got "
                                 f"{type(options).__name__}")
    merged = dict(_LAYER_SOLVER_OPTIONS)
    for key, value in deprecated.items():
        warnings.warn(f"qp_layer: the keyword {key}= is deprecated; pass "
                      f"solver_options={{'{key}': ...}} instead", DeprecationWarning, stacklevel=4)
        merged[key] = value
    unknown = sorted(set(options or {}) - set(_LAYER_SOLVER_OPTIONS) - set(_KERNEL_SOLVER_OPTIONS))
    if unknown:
        raise UnknownOptionError(
            f"qp_layer: unknown solver_options key(s) {unknown}; allowed: "
            f"{sorted(_LAYER_SOLVER_OPTIONS) + sorted(_KERNEL_SOLVER_OPTIONS)}")
    merged.update(options or {})
    for key in ("tol", "accept_residual"):
        v = merged[key]
        if not (isinstance(v, (int, float, onp.floating)) and onp.isfinite(v) and v > 0):
            raise InvalidOptionError(f"qp_layer: solver_options['{key}'] must be a finite "
                                     f"number > 0, got {v!r}")
    if not (isinstance(merged["max_iter"], (int, onp.integer)) and merged["max_iter"] >= 1):
        raise InvalidOptionError(f"qp_layer: solver_options['max_iter'] must be an integer "
                                 f">= 1, got {merged['max_iter']!r}")
    return merged


def _backward_name(backward: str) -> str:
    if backward == "fast":
        warnings.warn("qp_layer: backward='fast' is deprecated; use backward='structured' "
                      "(the same solver)", DeprecationWarning, stacklevel=4)
        return "structured"
    if backward not in _BACKWARDS:
        raise InvalidOptionError(f"qp_layer: backward must be one of {list(_BACKWARDS)} "
                                 f"('fast' is a deprecated alias of 'structured'), got "
                                 f"{backward!r}")
    return backward


def make_qp_layer(*, batch_size: Optional[int] = None, equalities: bool = False,
                  backward: str = "structured", linear_solver=None,
                  linear_solver_options: Optional[dict] = None,
                  solver_options: Optional[dict] = None,
                  weak_tol: float = kkt.DEFAULT_WEAK_TOL, warm_start=None,
                  residual_tol: float = 1e-6, throw: bool = True, **deprecated):
    """The reusable :class:`nimplicit.implicit.ImplicitLayer` behind :func:`qp_layer` for
    one configuration; call it as ``layer(Q, q, G, h)`` or ``layer(Q, q, G, h, A, b)``
    (with ``equalities=True``) on arrays of the shapes :func:`qp_layer` takes, ``G, h``
    given (``(0, n)`` and ``(0,)`` for none); ``batch_size`` is the batch size, or
    ``None`` for unbatched arrays.

    It returns ``(y, nu)``, or ``(y, lam, nu)`` with ``equalities=True`` (always all the
    parts; :func:`qp_layer` selects), and with ``throw=False`` the pair
    ``(that tuple, status)``.  Options as in :func:`qp_layer`; the deprecated
    ``tol=``, ``max_iter=``, ``accept_residual=`` keywords still work (solver_options).
    """
    allowed = {"tol", "max_iter", "accept_residual"}
    bad = sorted(set(deprecated) - allowed)
    if bad:
        raise TypeError(f"make_qp_layer() got unexpected keyword argument(s) {bad}")
    return _QPLayer(batch_size=batch_size, has_eq=equalities, backward=_backward_name(backward),
                    linear_solver=linear_solver, linear_solver_options=linear_solver_options,
                    solver_options=_solver_options(solver_options, deprecated),
                    weak_tol=kkt.check_weak_tol(weak_tol, "qp_layer"), warm_start=warm_start,
                    residual_tol=residual_tol, throw=throw).layer


def _raw(x):
    """The value under any autograd boxes."""
    return getval(x)


def _validate_input(name: str, x) -> None:
    """Typed errors for complex, object, non-numeric arrays (never a silent cast)."""
    arr = onp.asarray(_raw(x)) if not isinstance(_raw(x), onp.ndarray) else _raw(x)
    kind = arr.dtype.kind
    if kind == "c":
        raise InvalidInputError(f"qp_layer: {name} is complex ({arr.dtype}); the QP is defined "
                                f"for real data: pass its real part explicitly (x.real) if that "
                                f"is what you mean")
    if kind not in "fiub":
        raise InvalidInputError(f"qp_layer: {name} has dtype {arr.dtype} (kind {kind!r}); pass "
                                f"a real floating point array (e.g. np.asarray(x, dtype=float))")


def qp_layer(Q, q, G=None, h=None, A=None, b=None, *, full_output: bool = False,
             backward: str = "structured", linear_solver=None,
             linear_solver_options: Optional[dict] = None, solver_options: Optional[dict] = None,
             weak_tol: float = kkt.DEFAULT_WEAK_TOL, warm_start=None,
             residual_tol: float = 1e-6, throw: bool = True, **deprecated):
    r"""The solution of a convex QP, differentiable with respect to all its data.

    .. math::

        y^\star = \arg\min_y \tfrac12 y^\top Q y + q^\top y
        \quad\text{s.t.}\quad A y = b,\; G y \le h

    defined implicitly by the KKT residual ``F(y, lam, nu) = 0`` of eq. 27 (see
    the module docstring).  Argument order as in qpth.

    Parameters
    ----------
    Q : (n, n) or (B, n, n), positive semidefinite (only its symmetric part is used)
    q : (n,) or (B, n)
    G, h : (m, n) and (m,) (or with a batch axis), inequalities ``G y <= h``;
        ``None`` (both) or ``m = 0`` for an equality-only (or unconstrained) QP.
    A, b : (p, n) and (p,) (or with a batch axis), optional equality constraints
        with full row rank ``p``.
        Any argument may carry a leading batch axis; the others are shared by
        every instance (their gradient is the sum over the batch).
    full_output : also return the multipliers: ``(y, lam, nu)``, ``lam`` of the
        equalities (``(p,)`` or ``(B, p)``; shape ``(0,)`` without equalities) and
        ``nu >= 0`` of the inequalities (``(0,)`` without).  An autograd-boxed tuple
        when any input is boxed, so ``make_vjp``/``make_jvp`` of a function returning
        it see every part.  (Replaces the deprecated ``return_duals=``.)
    backward : ``"structured"`` (default: the kernel's structured factorization of
        the KKT Jacobian) or ``"generic"`` (the core's linear solver on the autograd
        Jacobian of ``F``); ``"fast"`` is a deprecated alias of ``"structured"``.
    linear_solver, linear_solver_options : with ``backward="generic"`` only: a core
        linear solver (name or callable) and its options; default (``None``) the core's
        LU of the Ruiz-equilibrated ``J``.  Weakly active instances always use the
        minimum-norm convention.
    solver_options : forward options (unknown keys raise
        :class:`~nimplicit.errors.UnknownOptionError`): ``tol`` (relative KKT
        residual of the interior point, ``1e-10``), ``max_iter`` (``100``),
        ``accept_residual`` (a run that stalls with a KKT residual below this is
        accepted, ``1e-8``), ``polish`` (the active-set polish, ``True``), and the
        kernel's ``reg, psd_tol, rank_tol, consistency_tol, cert_radius,
        warm_start_margin, allow_redundant_equalities, refine_steps, stall_iters,
        stall_res, num_threads`` and ``kernel_polish`` (its ``polish``).  The
        deprecated keywords ``tol=``, ``max_iter=``, ``accept_residual=`` still work.
    weak_tol : relative accuracy below which a normalised multiplier or slack counts
        as zero (:mod:`nimplicit.kkt`, default ``1e-9``): a constraint with both is
        weakly active (minimum-norm gradient, an
        :class:`~nimplicit.errors.ImplicitGradientWarning`).
    warm_start : ``(y, nu)`` or ``(y, lam, nu)`` from a previous (nearby) solve.
    residual_tol : the core's check of ``F`` at the solver's output.
    throw : True (default): a failed instance raises (below).  False: return
        ``(result, status)``, ``status`` a :class:`nimplicit.BatchStatus` whose
        outcome for a failed instance is ``INFEASIBLE``, ``UNBOUNDED``,
        ``NOT_CONVEX``, ``NOT_CONVERGED`` or ``SOLVER_FAILED`` (rank-deficient
        ``A``, numerical failure), with the kernel's message; the failed rows of
        ``y, lam, nu`` are NaN and contribute nothing to any gradient; the solved
        instances' values and gradients are those of a batch without the failed ones.

    Returns
    -------
    y, or ``(y, lam, nu)`` with ``full_output=True``; with ``throw=False``,
    ``(y, status)`` or ``((y, lam, nu), status)``.

    Raises
    ------
    InfeasibleQPError, UnboundedQPError, NonConvexQPError,
    RankDeficientEqualityError, QPNotConvergedError, QPNumericalError
        per instance failures of the forward solve (``.instances`` lists them).
    nimplicit.errors.ShapeError
        inconsistent shapes or batch sizes.
    nimplicit.errors.InvalidInputError, nimplicit.errors.EmptyInputError
        complex or object arrays; a batch of 0 instances or ``n = 0``.
    nimplicit.errors.InvalidOptionError, nimplicit.errors.UnknownOptionError
        invalid option values; unknown ``solver_options`` keys.

    Examples
    --------
    >>> import autograd.numpy as np
    >>> from autograd import grad
    >>> Q, q = np.eye(2), np.array([-1.0, -1.0])
    >>> G, h = np.array([[1.0, 1.0]]), np.array([1.0])
    >>> np.round(qp_layer(Q, q, G, h), 12)
    array([0.5, 0.5])
    >>> np.round(grad(lambda h: qp_layer(Q, q, G, h).sum())(h), 12)   # d(y1 + y2)/dh
    array([1.])
    """
    if "return_duals" in deprecated:
        warnings.warn("qp_layer: return_duals= is deprecated; use full_output=",
                      DeprecationWarning, stacklevel=2)
        full_output = bool(deprecated.pop("return_duals"))
    if (A is None) != (b is None):
        raise ShapeError("qp_layer: give both A and b (equality constraints A y = b) or neither")
    if (G is None) != (h is None):
        raise ShapeError("qp_layer: give both G and h (inequality constraints G y <= h) or "
                         "neither (None for an equality-only QP)")
    for name, x in (("Q", Q), ("q", q), ("G", G), ("h", h), ("A", A), ("b", b)):
        if x is not None:
            _validate_input(name, x)
    if G is None:
        n = onp.shape(_raw(q))[-1] if onp.ndim(_raw(q)) else 0
        G, h = onp.zeros((0, n)), onp.zeros(0)
    named = {"Q": Q, "q": q, "G": G, "h": h}
    if A is not None:
        named.update(A=A, b=b)
    B = _batch_size(named)
    n, _, p = _check_shapes(named)
    if B == 0:
        raise EmptyInputError("qp_layer: the batch has 0 instances (a leading batch axis of "
                              "size 0); pass at least one instance")
    if n == 0:
        raise EmptyInputError("qp_layer: the QP has n = 0 variables (len(q) == 0); there is "
                              "nothing to solve")
    layer = make_qp_layer(batch_size=B, equalities=A is not None, backward=backward,
                          linear_solver=linear_solver,
                          linear_solver_options=linear_solver_options,
                          solver_options=solver_options, weak_tol=weak_tol,
                          warm_start=warm_start, residual_tol=residual_tol, throw=throw,
                          **deprecated)
    out = layer(Q, q, G, h) if A is None else layer(Q, q, G, h, A, b)
    status = None
    if not throw:
        out, status = out
    if A is None:
        y, nu = out
        lam = np.zeros((p,) if B is None else (B, p))
        result = atuple((y, lam, nu)) if full_output else y
    else:
        result = atuple(tuple(out)) if full_output else out[0]
    return result if status is None else (result, status)
