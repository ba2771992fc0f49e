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
    code, to a relative KKT residual of ``tol`` (default ``1e-10``).  Failures
    are per instance and raise a typed error naming the first failing
    instance: :class:`InfeasibleQPError`, :class:`UnboundedQPError`,
    :class:`NonConvexQPError`, :class:`RankDeficientEqualityError`,
    :class:`QPNotConvergedError`, :class:`QPNumericalError`.

    Instances that stall (``MAX_ITER``/``NUMERICAL_ERROR`` above ``accept_residual``)
    are re-solved once with the objective scaled by 10, then by 0.1 (same
    ``y``; the multipliers are unscaled): the kernel occasionally stalls on
    learned, ill-conditioned ``Q`` that it solves at once after rescaling.
    On strictly inactive constraints the returned ``nu_i`` (the interior
    point's ``~mu / s_i``, about ``1e-11``) is set to exactly 0.

Backward (``backward=``)
    ``"fast"`` (default): the linear solver plugged into the implicit node
    factors the KKT Jacobian ``J = dF/d(y, lam, nu)`` once per forward point by
    the structured elimination of the kernel (:func:`kkt_jacobian_factor`,
    ``O((m + p) n^2 + n^3)`` per instance) and solves ``J z = b`` or
    ``J^T z = b`` for all instances in ``O(n^2 + (m + p) n)`` each.  It uses
    the Jacobian of the solution's active set: slack ``s_i = 0`` on strictly
    active constraints (``~1e-12`` at the final iterate), which removes an
    error of ``~cond(J) * 1e-10`` from the gradient.
    ``"generic"``: the core's dense LU of ``J``, formed from autograd VJPs of
    ``F`` -- the paper's point, slower, the same numbers.

Weakly active constraints
    At a constraint with ``nu_i = 0`` and ``G_i y = h_i`` (strict
    complementarity fails) ``J`` is singular and ``y*`` is not differentiable.
    A constraint whose relative margin ``max(nu_i / (1 + |nu|_inf),
    s_i / (1 + |s|_inf))`` (``s = h - G y``) is at most ``weak_tol`` is treated
    as weakly active: its row of ``J`` is set to zero and that instance is
    solved by the minimum-norm least-squares solution (the core's
    ``'lstsq'``), with an :class:`~nimplicit.errors.ImplicitGradientWarning`.
    Both backward modes apply the same convention.  The layer's
    ``diagnostics`` report the smallest margin over the batch
    (``strict_complementarity_margin``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import autograd.numpy as np
import numpy as onp

from nimplicit import implicit_layer, linear_solvers
from nimplicit.errors import (NotConvergedError, ShapeError, SingularJacobianError,
                              SolverError, warn)

from .kernels.qp_pdipm import (KKT_JACOBIAN_FLAG_MESSAGES, QP_STATUS_MESSAGES, KKTJacobianFlag,
                               QPStatus, kkt_jacobian_factor, kkt_jacobian_solve_factored,
                               solve_qp_batch)

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


def _relative(v: onp.ndarray) -> onp.ndarray:
    """``max(v, 0) / (1 + max_i v_i)`` per instance (last axis)."""
    v = onp.maximum(onp.asarray(v, float), 0.0)
    if v.shape[-1] == 0:
        return v
    return v / (1.0 + v.max(axis=-1, keepdims=True))


def complementarity_margin(nu: onp.ndarray, s: onp.ndarray) -> onp.ndarray:
    r"""Relative strict-complementarity margin per constraint.

    .. math:: \mu_i = \max\Big(\frac{\nu_i}{1 + \|\nu\|_\infty},\;
                               \frac{s_i}{1 + \|s\|_\infty}\Big)

    for ``nu`` and the slack ``s = h - G y`` of shape ``(..., m)`` (norms per
    instance).  Strict complementarity holds when every ``mu_i`` is clearly
    positive; ``mu_i ~ 0`` is a weakly active constraint.
    """
    return onp.maximum(_relative(nu), _relative(s))


# ------------------------------------------------------------------------------
# the layer
# ------------------------------------------------------------------------------

class _QPLayer:
    """Forward solver, backward linear solvers and diagnostics of one configuration."""

    def __init__(self, *, batch_size: Optional[int], has_eq: bool, backward: str,
                 tol: float, max_iter: int, accept_residual: float, weak_tol: float,
                 warm_start, solver_options: dict, residual_tol: float, polish: bool = True):
        if backward not in ("fast", "generic"):
            raise ValueError(f"backward must be 'fast' or 'generic', got {backward!r}")
        self.B = batch_size
        self.has_eq = has_eq
        self.tol = tol
        self.max_iter = max_iter
        self.accept_residual = accept_residual
        self.weak_tol = weak_tol
        self.warm_start = warm_start
        self.solver_options = solver_options
        self.polish = polish
        linear = self._fast_solve if backward == "fast" else self._generic_solve
        self.layer = implicit_layer(
            _residual_eq if has_eq else _residual_no_eq, self._forward,
            linear_solver=linear, batch_axis=None if batch_size is None else 0,
            residual_tol=residual_tol, diagnostics=self._diagnostics)

    # -- forward ------------------------------------------------------------
    def _warm(self, Q, G, h):
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
                             "return_duals=True")
        Bb = Q.shape[0]
        y = _batched(y, Bb, 1)
        nu = _batched(nu, Bb, 1)
        lam = onp.zeros((Bb, 0)) if lam is None or lam.size == 0 else _batched(lam, Bb, 1)
        s = h - onp.einsum("bij,bj->bi", G, y)
        return y, lam, nu, s

    def _forward(self, *inputs):
        Q, q, G, h, A, b = _raw_batch(inputs, self.B)
        res = solve_qp_batch(Q, q, G, h, A, b, max_iter=self.max_iter, tol=self.tol,
                             warm_start=self._warm(Q, G, h), **self.solver_options)
        res = self._retry(res, Q, q, G, h, A, b)
        status = res.status.copy()
        # a stall at the problem's accuracy floor, below accept_residual, is a solution
        status[(status == QPStatus.MAX_ITER) & (res.kkt_residual <= self.accept_residual)] = 0
        bad = onp.flatnonzero(status != QPStatus.SOLVED)
        if bad.size:
            k = int(bad[0])
            code = QPStatus(int(status[k]))
            where = f"batch instance {k} ({bad.size} of {len(status)} failed)" if self.B is not None \
                else "the QP"
            extra = ""
            if code == QPStatus.MAX_ITER:
                extra = (f" (KKT residual {res.kkt_residual[k]:.3g} after {res.iterations[k]} "
                         f"iterations; tol={self.tol:g}, max_iter={self.max_iter}, "
                         f"accept_residual={self.accept_residual:g})")
            raise _STATUS_ERRORS[code](f"qp_layer: {where}: {QP_STATUS_MESSAGES[code]}{extra}",
                                       [int(i) for i in bad])
        nu = self._snap_inactive(res.nu, h - onp.einsum("bij,bj->bi", G, res.y))
        y, lam, nu = self._polish(Q, q, G, h, A, b, res.y, res.lam, nu)
        out = (y, lam, nu) if self.has_eq else (y, nu)
        return tuple(v[0] for v in out) if self.B is None else out

    def _polish(self, Q, q, G, h, A, b, y, lam, nu):
        r"""Active-set polish: with the strictly active set ``a`` of the interior
        point's solution, solve the equality-constrained KKT system

        .. math::
            \begin{bmatrix} Q & A^T & G_a^T \\ A & 0 & 0 \\ G_a & 0 & 0 \end{bmatrix}
            \begin{bmatrix} y \\ \lambda \\ \nu_a \end{bmatrix} =
            \begin{bmatrix} -q \\ b \\ h_a \end{bmatrix}

        per instance, and keep the result where it is a KKT point with the same
        active set (``nu_a >= 0``, inactive slacks ``>= 0``) and a smaller KKT
        residual.  The interior point stops at ``tol ~ 1e-10``; the polished point
        is exact to rounding, so finite differences of the layer (and the
        gradients' reference values) are limited by rounding, not by ``tol``.
        Instances with a weakly active constraint are left as they are.
        """
        if not self.polish:
            return y, lam, nu
        y, lam, nu = y.copy(), lam.copy(), nu.copy()
        s = h - onp.einsum("bij,bj->bi", G, y)
        active, _ = self._strict_sets(nu, s)
        weak = self._weak(nu, s)
        n, p = y.shape[1], A.shape[1]
        for k in range(len(y)):
            if weak[k].any():
                continue
            a = onp.flatnonzero(active[k])
            C = onp.concatenate([A[k], G[k][a]])
            K = onp.block([[0.5 * (Q[k] + Q[k].T), C.T], [C, onp.zeros((len(C), len(C)))]])
            rhs = onp.concatenate([-q[k], b[k], h[k][a]])
            try:
                z = onp.linalg.solve(K, rhs)
            except onp.linalg.LinAlgError:
                continue
            y_new, lam_new, nu_a = z[:n], z[n:n + p], z[n + p:]
            nu_new = onp.zeros_like(nu[k])
            nu_new[a] = nu_a
            s_new = h[k] - G[k] @ y_new
            if not (onp.all(onp.isfinite(z)) and onp.all(nu_a >= 0) and 
                    onp.all(s_new >= -1e-12 * (1 + onp.abs(h[k]).max()))):
                continue
            size = lambda sol: max(onp.abs(r).max(initial=0.0) for r in
                                   kkt_residual(sol, Q[k], q[k], G[k], h[k], A[k], b[k]))
            if size((y_new, lam_new, nu_new)) <= size((y[k], lam[k], nu[k])):
                y[k], lam[k], nu[k] = y_new, lam_new, nu_new
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

    # -- the point's data ---------------------------------------------------
    def _at(self, point):
        Q, q, G, h, A, b = _raw_batch(point.inputs, self.B)
        y, lam, nu = _split_solution(point.y, self.has_eq, self.B)
        s = h - onp.einsum("bij,bj->bi", G, y)
        return Q, G, A, y, nu, s

    def _strict_sets(self, nu, s):
        """``(active, inactive)`` masks of the strictly complementary constraints."""
        nu_rel, s_rel = _relative(nu), _relative(s)
        strict = onp.maximum(nu_rel, s_rel) > self.weak_tol
        return strict & (nu_rel > s_rel), strict & (nu_rel <= s_rel)

    def _snap_inactive(self, nu, s):
        """The interior point's ``nu_i ~ mu / s_i`` on strictly inactive constraints set to 0.

        Exact complementarity there: the Jacobian of eq. 27 at the returned point then
        has the exact row ``[0, 0, -s_i e_i]`` of the solution's active set, instead of
        one perturbed by the interior point's ``mu`` (worth ~cond(J) * 1e-10 in the gradient).
        """
        _, inactive = self._strict_sets(nu, s)
        if not inactive.any():
            return nu
        nu = nu.copy()
        nu[inactive] = 0.0
        return nu

    def _weak(self, nu, s):
        """``(B, m)`` mask of weakly active constraints."""
        return complementarity_margin(nu, s) <= self.weak_tol

    def _warn_weak(self, weak):
        inst = onp.flatnonzero(weak.any(axis=1))
        where = f"batch instance(s) {inst.tolist()[:10]}" if self.B is not None else "the QP"
        warn(f"qp_layer: {int(weak.sum())} weakly active constraint(s) in {where} (nu_i and "
             f"the slack h_i - G_i y both ~ 0; relative margin <= weak_tol={self.weak_tol:g}): "
             f"the solution is not differentiable there. Using the minimum-norm convention "
             f"(those rows of the KKT Jacobian set to zero, least-squares solve).")

    @staticmethod
    def _zero_weak_rows(J, weak, offset):
        """Zero the complementarity rows ``offset + i`` of the weakly active constraints."""
        J = J.copy()
        bi, ci = onp.nonzero(weak)
        J[bi, offset + ci, :] = 0.0
        return J

    # -- backward: generic (autograd J, core LU) -----------------------------
    def _generic_solve(self, matvec, rmatvec, b, *, transpose=False, x_size=None, cache=None,
                       point=None, **opts):
        if "qp_weak" not in cache:
            _, _, _, _, nu, s = self._at(point)
            cache["qp_weak"] = self._weak(nu, s)
        weak = cache["qp_weak"]
        if not weak.any():
            return linear_solvers.lu(matvec, rmatvec, b, transpose=transpose, x_size=x_size,
                                     cache=cache, **opts)
        if "qp_lstsq" not in cache:
            self._warn_weak(weak)
            bb = b.reshape(-1, b.shape[-1])
            mv = (lambda w: matvec(w.reshape(b.shape)).reshape(bb.shape))
            rmv = (lambda u: rmatvec(u.reshape(b.shape)).reshape(bb.shape))
            J = linear_solvers.form_jacobian(mv, rmv, bb, transpose, x_size)
            n = point.y_flat.shape[-1] - weak.shape[1]
            # the core's lstsq takes a J already in its cache instead of forming one
            cache["qp_lstsq"] = {"J": self._zero_weak_rows(J, weak, n)}
            cache["pseudo_inverse"] = True
        x = linear_solvers.lstsq(None, None, b.reshape(-1, b.shape[-1]), transpose=transpose,
                                 cache=cache["qp_lstsq"])
        return x.reshape(b.shape)

    # -- backward: fast (structured factorization of the KKT Jacobian) --------
    def _analytic_jacobian(self, Q, G, A, y, nu, s):
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

    def _fast_solve(self, matvec, rmatvec, b, *, transpose=False, x_size=None, cache=None,
                    point=None, **opts):
        if "qp_factors" not in cache:
            Q, G, A, y, nu, s = self._at(point)
            weak = self._weak(nu, s)
            # weakly active constraints are not passed to the factorization as such:
            # those instances are solved by least squares below
            s_f, nu_f = s.copy(), nu.copy()
            s_f[weak], nu_f[weak] = 1.0, 1.0
            # the active set's exact Jacobian: slack 0 on strictly active constraints
            # (h_i - G_i y is ~1e-12, not 0, at the interior point's final iterate)
            active, inactive = self._strict_sets(nu, s)
            s_f[active], nu_f[inactive] = 0.0, 0.0
            factors = kkt_jacobian_factor(Q, G, A, s_f, nu_f)
            flag = factors.flag.copy()
            singular = onp.flatnonzero(flag != KKTJacobianFlag.OK)
            if singular.size:
                k = int(singular[0])
                where = f" (batch instance {k})" if self.B is not None else ""
                raise SingularJacobianError(
                    f"qp_layer: the KKT Jacobian at the solution{where} is singular: "
                    f"{KKT_JACOBIAN_FLAG_MESSAGES[KKTJacobianFlag(int(flag[k]))]} The gradient "
                    f"is not unique there; use backward='generic' to inspect J, or perturb "
                    f"the data.")
            cache["qp_factors"] = factors
            weak_inst = onp.flatnonzero(weak.any(axis=1))
            cache["qp_weak_instances"] = weak_inst
            if weak_inst.size:
                self._warn_weak(weak)
                J = self._analytic_jacobian(Q[weak_inst], G[weak_inst], A[weak_inst],
                                            y[weak_inst], nu[weak_inst], s[weak_inst])
                # the core's lstsq takes a J already in its cache instead of forming one
                cache["qp_lstsq"] = {"J": self._zero_weak_rows(J, weak[weak_inst],
                                                               J.shape[1] - G.shape[1])}
                cache["pseudo_inverse"] = True
        bb = b.reshape(-1, b.shape[-1])
        z = kkt_jacobian_solve_factored(cache["qp_factors"], bb, transpose=transpose)
        weak_inst = cache["qp_weak_instances"]
        if weak_inst.size:
            z[weak_inst] = linear_solvers.lstsq(None, None, bb[weak_inst], transpose=transpose,
                                                cache=cache["qp_lstsq"])
        return z.reshape(b.shape)

    # -- diagnostics -----------------------------------------------------------
    def _diagnostics(self, point):
        _, _, _, _, nu, s = self._at(point)
        if nu.shape[1] == 0:
            return {}
        margins = complementarity_margin(nu, s).min(axis=1)
        k = int(onp.argmin(margins))
        value = float(margins[k])
        ok = value > self.weak_tol
        where = f" (batch instance {k})" if self.B is not None else ""
        why = (f"smallest relative margin max(nu_i, s_i) over the constraints{where}; "
               + ("strict complementarity holds" if ok else
                  f"<= weak_tol={self.weak_tol:g}: a weakly active constraint, the QP solution "
                  f"is not differentiable there (minimum-norm convention used)"))
        return {"strict_complementarity_margin": (value, ok, why)}


def make_qp_layer(*, batch_size: Optional[int] = None, equalities: bool = False,
                  backward: str = "fast", tol: float = 1e-10, max_iter: int = 100,
                  accept_residual: float = 1e-8, weak_tol: float = 1e-3, warm_start=None,
                  residual_tol: float = 1e-6, solver_options: Optional[dict] = None):
    """The :class:`nimplicit.implicit.ImplicitLayer` behind :func:`qp_layer` for one
    configuration; call it as ``layer(Q, q, G, h)`` or ``layer(Q, q, G, h, A, b)``.

    It returns ``(y, nu)`` or ``(y, lam, nu)``; see :func:`qp_layer` for the options.
    """
    return _QPLayer(batch_size=batch_size, has_eq=equalities, backward=backward, tol=tol,
                    max_iter=max_iter, accept_residual=accept_residual, weak_tol=weak_tol,
                    warm_start=warm_start, solver_options=dict(solver_options or {}),
                    residual_tol=residual_tol).layer


def qp_layer(Q, q, G, h, A=None, b=None, *, return_duals: bool = False, backward: str = "fast",
             tol: float = 1e-10, max_iter: int = 100, accept_residual: float = 1e-8,
             weak_tol: float = 1e-3, warm_start=None, residual_tol: float = 1e-6,
             solver_options: Optional[dict] = None):
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
    G : (m, n) or (B, m, n)
    h : (m,) or (B, m)
    A, b : (p, n) and (p,) (or with a batch axis), optional equality constraints
        with full row rank ``p``.
        Any argument may carry a leading batch axis; the others are shared by
        every instance (their gradient is the sum over the batch).
    return_duals : also return the multipliers ``lam`` (equalities, ``(p,)``
        or ``(B, p)``; empty without equalities) and ``nu >= 0`` (inequalities).
    backward : ``"fast"`` (reuse a structured factorization of the KKT Jacobian)
        or ``"generic"`` (the core's LU of the autograd Jacobian of ``F``).
    tol, max_iter : interior point tolerance (relative KKT residual) and iteration cap.
    accept_residual : a run that stalls at ``max_iter`` with a KKT residual
        below this is accepted; otherwise :class:`QPNotConvergedError`.
    weak_tol : constraints with relative margin
        :func:`complementarity_margin` ``<= weak_tol`` count as weakly active
        (minimum-norm gradient, :class:`~nimplicit.errors.ImplicitGradientWarning`).
    warm_start : ``(y, nu)`` or ``(y, lam, nu)`` from a previous (nearby) solve.
    residual_tol : the core's check of ``F`` at the solver's output.
    solver_options : further keywords for
        :func:`~reference_layers.kernels.qp_pdipm.solve_qp_batch`.

    Returns
    -------
    y, or ``(y, lam, nu)`` with ``return_duals=True``.

    Raises
    ------
    InfeasibleQPError, UnboundedQPError, NonConvexQPError,
    RankDeficientEqualityError, QPNotConvergedError, QPNumericalError
        per instance failures of the forward solve (``.instances`` lists them).
    nimplicit.errors.ShapeError
        inconsistent shapes or batch sizes.

    Examples
    --------
    >>> import autograd.numpy as np
    >>> from autograd import grad
    >>> Q, q = np.eye(2), np.array([-1.0, -1.0])
    >>> G, h = np.array([[1.0, 1.0]]), np.array([1.0])
    >>> qp_layer(Q, q, G, h)                            # y = (0.5, 0.5)
    >>> grad(lambda h: qp_layer(Q, q, G, h).sum())(h)   # d(y1 + y2)/dh = 1
    """
    if (A is None) != (b is None):
        raise ShapeError("qp_layer: give both A and b (equality constraints A y = b) or neither")
    named = {"Q": Q, "q": q, "G": G, "h": h}
    if A is not None:
        named.update(A=A, b=b)
    B = _batch_size(named)
    _, _, p = _check_shapes(named)
    layer = make_qp_layer(batch_size=B, equalities=A is not None, backward=backward, tol=tol,
                          max_iter=max_iter, accept_residual=accept_residual, weak_tol=weak_tol,
                          warm_start=warm_start, residual_tol=residual_tol,
                          solver_options=solver_options)
    if A is None:
        y, nu = layer(Q, q, G, h)
        if not return_duals:
            return y
        lam = np.zeros((p,) if B is None else (B, p))
        return y, lam, nu
    out = layer(Q, q, G, h, A, b)
    return out if return_duals else out[0]
