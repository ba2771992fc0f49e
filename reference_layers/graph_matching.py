r"""Graph matching as a relaxed quadratic assignment problem (the paper's section 5.4).

Matching graph 1 (``n`` nodes) to graph 2 (``m`` nodes) is the QAP
``max_X vec(X)' M vec(X)`` over (partial) permutation matrices ``X``
(``n x m``), with the affinity ``M`` (``nm x nm``, symmetric, non-negative)
holding node affinities on its diagonal and edge-pair affinities off it.
Vectorization is row-major throughout: ``y[i*m + a] = X[i, a]``.

Layers
------
:func:`spectral_matching_layer` (SM, Leordeanu and Hebert 2005)
    The relaxation ``max y'My  s.t.  y'y = 1``: the leading eigenvector of
    ``M``.  Output ``y`` with ``|y| = 1`` and ``sum(y) > 0`` (the sign
    convention; a non-negative ``M`` has a non-negative Perron vector, so the
    sum is positive whenever the leading eigenvalue is simple).  The implicit
    residual is the KKT system (the paper's eq. 42) in the unknowns ``(y, lam)``,

    .. math::
        F(y, \lambda; M) = \begin{pmatrix} M y - \lambda y \\
                                           \tfrac12 (1 - y^\top y) \end{pmatrix} = 0,

    written with the factor ``-1/2`` on the norm constraint so that its
    Jacobian, the bordered matrix
    ``[[M - lam I, -y], [-y', 0]]``, is symmetric (MINRES/CG applicable).
    ``lam`` is a second output (``return_eigenvalue=True``), not eliminated.

:func:`smac_layer` (Cour, Srinivasan and Shi 2007)
    The relaxation with affine constraints ``max y'My / y'y  s.t.  C y = d``.
    With a pivot row ``k`` (``argmax |d_k|``) the constraint ``C y ∝ d`` is the
    homogeneous ``C_eq y = 0``, ``C_eq = C_{-k} - d_{-k} C_k / d_k``; as the
    ratio is scale-invariant, its maximizer is the leading eigenvector ``y``
    of ``P M P`` with ``P = I - C_eq'(C_eq C_eq')^{-1} C_eq``, rescaled so that
    the output satisfies the constraint exactly:

    .. math::
        x = y / t, \qquad t = \frac{d^\top C y}{d^\top d}  \quad (C y = t d),

    so ``C x = d``.  (With ``d = 0`` the output is the unit ``y``.)  The
    implicit residual is the KKT system (eq. 44) of
    ``max y'My s.t. y'y = 1, C_eq y = 0`` in ``(y, lam, mu)``:

    .. math::
        F = \begin{pmatrix} M y - \lambda y - C_{eq}^\top \mu \\
                            \tfrac12 (1 - y^\top y) \\ -C_{eq}\, y \end{pmatrix} = 0,

    again with a symmetric bordered Jacobian; the rescaling and ``C_eq`` are
    explicit autograd operations around the implicit node, so gradients reach
    ``M``, ``C`` and ``d``.

:func:`power_iteration_layer` (Zanfir and Sminchisescu 2018)
    ``k`` steps of ``y <- M y / |M y|`` from ``y_0 = 1/sqrt(nm)``,
    differentiated by unrolling (plain autograd): the explicit baseline.

Around them: :func:`sinkhorn` (log-domain, unrolled), :func:`sinkhorn_layer`
(the same bistochastic normalization as an implicit fixed point of the dual
potentials), :func:`voting_layer` (row softmax with temperature),
:func:`hungarian` (discretization, evaluation only) and the affinity builders
(:func:`gaussian_affinity`, :func:`assemble_affinity`, numba forward with numba
VJPs; :func:`node_affinity`, :func:`edge_features`).

Backward passes
---------------
The bordered KKT systems of SM and SMAC are solved by a structured solver that
reads ``M`` directly (never an autograd-traced product): for ``nm`` up to
``dense_max`` an LU factorization of the explicitly formed bordered matrix
(condition-checked), above it projected conjugate gradients on the
constraint null space, where ``-(M - lam I)`` is positive definite exactly when
the leading eigenvalue is simple.  Any core solver (``'lu'``, ``'minres'``,
``'gmres'``, ...) may be passed instead as ``linear_solver=``.

Ill-posed input raises typed errors: :class:`AffinityError` (not square, not
symmetric, negative entries, all zero), :class:`DegenerateEigenvalueError`
(leading eigenvalue not simple: no unique derivative),
:class:`InfeasibleConstraintsError` (``C y = d`` inconsistent, or the ratio's
maximum not attained on ``C y = d``), :class:`ConstraintRankError`
(redundant constraint rows).  The layers declare ``diagnostics=`` with the
relative eigen-gap, read by ``verification.diagnose``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import autograd.numpy as np
import numpy as onp
import scipy.linalg
import scipy.optimize
import scipy.sparse.linalg as spla
from autograd.extend import defjvp, defvjp, primitive
from autograd.scipy.special import logsumexp
from autograd.tracer import getval, isbox

from nimplicit import fixed_point_layer, implicit_layer, linear_solvers
from nimplicit.errors import (LinearSolveError, NimplicitError, NotConvergedError, ShapeError,
                              SingularJacobianError, SolverError, UnsupportedError,
                              finite_or_raise)

__all__ = [
    "spectral_matching_layer", "smac_layer", "power_iteration_layer",
    "sinkhorn", "sinkhorn_layer", "voting_layer", "hungarian", "matching_accuracy",
    "one_to_one_constraints", "homogeneous_constraints", "leading_eigenpair", "lanczos_top",
    "eigen_gap",
    "gaussian_affinity", "gaussian_affinity_reference", "assemble_affinity",
    "node_affinity", "edge_features", "full_edges",
    "AffinityError", "DegenerateEigenvalueError", "InfeasibleConstraintsError",
    "ConstraintRankError",
]

#: above this many unknowns (nm) the forward uses Lanczos instead of a dense eigh
EIG_DENSE_MAX = 100
#: above this many unknowns the backward uses projected CG instead of a dense LU
KKT_DENSE_MAX = 100


# ------------------------------------------------------------------------------
# typed errors
# ------------------------------------------------------------------------------

class AffinityError(NimplicitError, ValueError):
    """The affinity matrix is not a valid graph-matching affinity (not square,
    not symmetric, negative entries, or all zero)."""


class DegenerateEigenvalueError(SingularJacobianError):
    """The leading eigenvalue is not simple: the eigenvector, and hence its
    derivative, is not unique."""


class InfeasibleConstraintsError(SolverError):
    """``C y = d`` has no solution, or the relaxed problem has no maximizer on it."""


class ConstraintRankError(NimplicitError, ValueError):
    """The constraint rows are linearly dependent (remove the redundant rows)."""


# ------------------------------------------------------------------------------
# input checks and the eigen-solver
# ------------------------------------------------------------------------------

def _check_affinity(M: onp.ndarray, *, batched: bool, allow_negative: bool = False) -> None:
    if M.ndim != (3 if batched else 2) or M.shape[-1] != M.shape[-2]:
        want = "(B, nm, nm)" if batched else "(nm, nm)"
        raise AffinityError(f"the affinity must be a square matrix of shape {want}, got shape "
                            f"{M.shape}")
    finite_or_raise(M, "the affinity matrix")   # symmetry_stats would skip NaNs
    from .kernels.affinity import symmetry_stats
    for b, Mb in enumerate(M.reshape((-1,) + M.shape[-2:])):
        where = f" (batch instance {b})" if batched else ""
        scale, asym, low = symmetry_stats(onp.ascontiguousarray(Mb, dtype=float))
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


def lanczos_top(matvec, v0: onp.ndarray, *, tol: float = 1e-10,
                maxiter: int = 300) -> Tuple[onp.ndarray, float, float]:
    r"""Largest eigenpair of a symmetric operator by Lanczos with full
    reorthogonalization, stopped as soon as the Ritz residual
    ``|M y - theta y| = beta_k |s_k|`` is at most ``tol * |theta|``.

    Returns ``(y, theta_1, theta_2)``; ``theta_2`` is the second Ritz value, a
    lower bound of ``lam_2`` (so the gap it gives is an over-estimate, and an
    exactly repeated leading eigenvalue is seen once by a single-vector Krylov
    method: only the dense path detects exact multiplicity).
    """
    N = v0.shape[0]
    Q = onp.zeros((min(maxiter, N) + 1, N))
    Q[0] = v0 / onp.linalg.norm(v0)
    alphas, betas = [], []
    for k in range(min(maxiter, N)):
        w = onp.asarray(matvec(Q[k]), float)
        alphas.append(float(Q[k] @ w))
        for _ in range(2):   # full reorthogonalization, twice is enough
            w -= Q[:k + 1].T @ (Q[:k + 1] @ w)
        beta = float(onp.linalg.norm(w))
        T = onp.diag(alphas) + onp.diag(betas, 1) + onp.diag(betas, -1)
        theta, S = onp.linalg.eigh(T)   # tiny; cheaper than eigh_tridiagonal's LAPACK lookup
        top = theta[-1]
        if beta * abs(S[-1, -1]) <= tol * abs(top) or beta <= 1e-14 * abs(top) or k + 1 == N:
            y = Q[:k + 1].T @ S[:, -1]
            return y / onp.linalg.norm(y), float(top), float(theta[-2]) if k else -onp.inf
        betas.append(beta)
        Q[k + 1] = w / beta
    raise NotConvergedError(f"Lanczos did not reach the relative residual {tol:g} in {maxiter} "
                            f"iterations on the {N} x {N} affinity (tiny eigen-gap?); use "
                            f"eig_method='dense'.")


def leading_eigenpair(M, *, method: str = "auto", tol: float = 1e-10,
                      dense_max: int = EIG_DENSE_MAX) -> Tuple[onp.ndarray, float, float]:
    """Largest eigenvalue ``lam``, its unit eigenvector ``y`` (``sum(y) >= 0``)
    and the second largest eigenvalue ``lam2`` of a symmetric ``M`` (array, or
    anything with ``M @ v``).

    ``method='dense'`` uses ``numpy.linalg.eigh``; ``'krylov'`` Lanczos
    (:func:`lanczos_top`) started from ``M 1`` (close to the Perron vector of a
    non-negative ``M``); ``'auto'`` chooses dense up to ``dense_max`` rows.
    """
    N = M.shape[0]
    dense = method == "dense" or (method == "auto" and (N <= dense_max or N < 4))
    if dense:
        A = M if isinstance(M, onp.ndarray) else M @ onp.eye(N)
        w, V = onp.linalg.eigh(A)
        lam, y = float(w[-1]), V[:, -1].copy()
        lam2 = float(w[-2]) if N > 1 else -onp.inf
    else:
        v0 = M @ onp.ones(N)
        if not onp.any(v0):
            v0 = onp.ones(N)
        y, lam, lam2 = lanczos_top(lambda v: M @ v, v0, tol=tol)
        if lam2 == -onp.inf:
            # The start vector was already an eigenvector, so Lanczos saw one
            # eigenvalue only; estimate lam_2 as the top of M deflated by y, so
            # that a repeated leading eigenvalue is caught by the gap check.
            deflate = lambda v: v - y * (y @ v)
            r = onp.random.default_rng(0).standard_normal(N)
            _, lam2, _ = lanczos_top(lambda v: deflate(M @ deflate(v)), deflate(r), tol=1e-8)
    s = y.sum()
    if s < 0 or (s == 0 and y[onp.argmax(onp.abs(y))] < 0):
        y = -y
    return y, lam, lam2


def eigen_gap(M: onp.ndarray) -> float:
    """Relative gap ``(lam_1 - lam_2) / |lam_1|`` of a symmetric matrix (or batch:
    the smallest over the batch); zero when the leading eigenvalue is repeated."""
    M = onp.asarray(M, float)
    finite_or_raise(M, "the affinity M")
    Ms = M.reshape((-1,) + M.shape[-2:])
    gaps = []
    for Mb in Ms:
        _, lam, lam2 = leading_eigenpair(Mb)
        gaps.append((lam - lam2) / abs(lam) if lam != 0 else 0.0)
    return float(min(gaps))


def _require_gap(lam: float, lam2: float, gap_tol: float, where: str, what: str) -> None:
    if lam <= 0:
        raise DegenerateEigenvalueError(
            f"the leading eigenvalue of {what}{where} is {lam:.3g} <= 0: there is no positive "
            f"matching score to maximize. Check the affinity (and the constraints).")
    gap = (lam - lam2) / abs(lam)
    if gap <= gap_tol:
        raise DegenerateEigenvalueError(
            f"the leading eigenvalue of {what}{where} is not simple: lam_1 = {lam:.6g}, lam_2 = "
            f"{lam2:.6g}, relative gap {gap:.3g} <= gap_tol={gap_tol:g}. The leading eigenvector "
            f"is not unique and has no derivative (symmetric graphs, disconnected affinities, or "
            f"an affinity without edge terms). Break the symmetry (add node affinities) or use "
            f"power_iteration_layer, whose output is always defined.")


# ------------------------------------------------------------------------------
# the structured solver of the bordered KKT systems (SM and SMAC)
# ------------------------------------------------------------------------------

def _instances(point, kind: str):
    """Per-instance (M, lam, border) at a forward point; border = [y, C_eq']."""
    M = onp.asarray(point.inputs[0], float)
    parts = point.y
    y, lam = onp.asarray(parts[0], float), onp.asarray(parts[1], float)
    if kind == "sm":
        if M.ndim == 3:
            return [(M[b], float(lam[b]), y[b][:, None]) for b in range(M.shape[0])]
        return [(M, float(lam), y[:, None])]
    Ceq = onp.asarray(point.inputs[1], float)
    return [(M, float(lam), onp.concatenate([y[:, None], Ceq.T], axis=1))]


class _BorderedData:
    """Factorizations for ``K = [[M - lam I, -B], [-B', 0]]`` of one instance."""

    def __init__(self, M, lam, B, dense: bool, max_condition: float):
        self.M, self.lam, self.B = M, lam, B
        self.N, self.q = B.shape
        self.dense = dense
        if dense:
            K = onp.zeros((self.N + self.q,) * 2)
            K[:self.N, :self.N] = M - lam * onp.eye(self.N)
            K[:self.N, self.N:] = -B
            K[self.N:, :self.N] = -B.T
            self.lu = scipy.linalg.lu_factor(K, check_finite=False)
            anorm = onp.abs(K).sum(axis=0).max()
            rcond = scipy.linalg.lapack.dgecon(self.lu[0], anorm, norm="1")[0]
            if not rcond * max_condition >= 1.0:
                raise DegenerateEigenvalueError(
                    f"the bordered KKT matrix of the eigenproblem is singular or ill-conditioned "
                    f"(condition ~{1 / max(rcond, 1e-300):.3g}): the leading eigenvalue is "
                    f"(nearly) repeated or the constraints are (nearly) dependent.")
        else:
            self.G = scipy.linalg.cho_factor(B.T @ B)

    def _proj(self, v):
        return v - self.B @ scipy.linalg.cho_solve(self.G, self.B.T @ v)

    def _A(self, v):
        return self.M @ v - self.lam * v

    def solve(self, rhs, rtol: float, maxiter: Optional[int]):
        if self.dense:
            return scipy.linalg.lu_solve(self.lu, rhs, check_finite=False)
        b, c = rhs[:self.N], rhs[self.N:]
        u_par = -self.B @ scipy.linalg.cho_solve(self.G, c)
        r = self._proj(b - self._A(u_par))
        z = onp.zeros(self.N)
        rnorm = onp.linalg.norm(r)
        if rnorm > 0:
            # -P (M - lam I) P is positive definite on the null space of B' iff lam is simple
            op = spla.LinearOperator((self.N, self.N), dtype=float,
                                     matvec=lambda v: -self._proj(self._A(self._proj(v))))
            z, info = spla.cg(op, -r, rtol=rtol, atol=0.0, maxiter=maxiter or 10 * self.N)
            z = self._proj(z)
            res = onp.linalg.norm(op.matvec(z) + r) / rnorm
            if info != 0 or not res <= 100 * rtol:
                raise LinearSolveError(
                    f"projected CG on the bordered eigen-KKT system did not converge (relative "
                    f"residual {res:.3g}, info={info}): the eigen-gap is tiny. Pass "
                    f"linear_solver='lu' (dense) or raise linear_solver_options maxiter.")
        u = u_par + z
        w = scipy.linalg.cho_solve(self.G, self.B.T @ (self._A(u) - b))
        return onp.concatenate([u, w])


def _bordered_solver(kind: str, dense_max: int):
    """A core linear solver for the symmetric bordered KKT Jacobian (``J = J'``)."""
    def solve(matvec, rmatvec, b, *, transpose=False, x_size=None, cache=None, point=None,
              rtol: float = 1e-12, maxiter: Optional[int] = None, max_condition: float = 1e12,
              **_):
        if cache is None or "bordered" not in cache:
            data = [_BorderedData(M, lam, B, B.shape[0] <= dense_max, max_condition)
                    for M, lam, B in _instances(point, kind)]
            if cache is not None:
                cache["bordered"] = data
        else:
            data = cache["bordered"]
        rhs = b.reshape(len(data), -1)
        x = onp.stack([d.solve(r, rtol, maxiter) for d, r in zip(data, rhs)])
        return x.reshape(b.shape)
    return solve


def _linear_solver(kind: str, linear_solver, dense_max: int):
    if linear_solver == "auto":
        return _bordered_solver(kind, dense_max)
    return linear_solvers.get(linear_solver)


# ------------------------------------------------------------------------------
# spectral matching
# ------------------------------------------------------------------------------

def _sm_residual(z, M):
    """Eq. (42) with the symmetric sign: ``(M y - lam y, (1 - y'y)/2)``."""
    y, lam = z
    if np.ndim(M) == 3:
        My = np.einsum("bij,bj->bi", M, y)
        return My - lam[:, None] * y, 0.5 * (1.0 - np.sum(y * y, axis=1))
    return np.dot(M, y) - lam * y, 0.5 * (1.0 - np.dot(y, y))


def _sm_solver(eig_method: str, gap_tol: float, eig_dense_max: int, eig_tol: float):
    def solver(M):
        M = onp.asarray(M, float)
        batched = M.ndim == 3
        _check_affinity(M, batched=batched)
        ys, lams = [], []
        for b, Mb in enumerate(M.reshape((-1,) + M.shape[-2:])):
            y, lam, lam2 = leading_eigenpair(Mb, method=eig_method, dense_max=eig_dense_max,
                                             tol=eig_tol)
            _require_gap(lam, lam2, gap_tol, f" (batch instance {b})" if batched else "",
                         "the affinity M")
            ys.append(y)
            lams.append(lam)
        if batched:
            return onp.stack(ys), onp.array(lams)
        return ys[0], onp.array(lams[0])
    return solver


def _sm_diagnostics(point):
    M = onp.asarray(point.inputs[0], float)
    gap = eigen_gap(M)
    scale = float(onp.abs(M).max())
    asym = float(onp.abs(M - onp.swapaxes(M, -1, -2)).max()) / scale
    return {
        "eigen_gap": (gap, gap > 1e-6, "relative gap (lam1 - lam2)/lam1 of M; the derivative "
                                       "blows up as it tends to 0"),
        "asymmetry": (asym, asym <= 1e-10, "max|M - M'| / max|M|"),
        "min_entry": (float(M.min()) / scale, M.min() >= -1e-12 * scale,
                      "smallest entry of M relative to max|M| (must be >= 0)"),
    }


def spectral_matching_layer(M, *, return_eigenvalue: bool = False, eig_method: str = "auto",
                            eig_tol: float = 1e-10,
                            linear_solver="auto", gap_tol: float = 1e-8,
                            eig_dense_max: int = EIG_DENSE_MAX, kkt_dense_max: int = KKT_DENSE_MAX,
                            residual_tol: float = 1e-6,
                            linear_solver_options: Optional[dict] = None):
    r"""Spectral matching: the leading eigenvector of the affinity ``M``.

    Parameters
    ----------
    M : array, shape (nm, nm) or (B, nm, nm)
        Symmetric, non-negative affinity (a batch along axis 0).
    return_eigenvalue : bool
        Also return the leading eigenvalue ``lam = y' M y`` (differentiable).
    eig_method : {'auto', 'dense', 'krylov'}
        Forward eigensolver (see :func:`leading_eigenpair`).
    eig_tol : float
        Lanczos stops at ``|M y - lam y| <= eig_tol * lam``; the error of the
        implicit gradient is of order ``eig_tol * lam / (lam - lam_2)``.  The
        core's residual check (``residual_tol`` times ``1 + 1 + max|M|``) must
        allow it: loosen ``residual_tol`` with ``eig_tol`` on large graphs.
    linear_solver : 'auto' or a core solver name/callable
        ``'auto'``: the structured bordered solver (dense LU up to
        ``kkt_dense_max`` unknowns, projected CG above).  ``'minres'`` also
        works: the KKT Jacobian ``[[M - lam I, -y], [-y', 0]]`` is symmetric.
    gap_tol : float
        Raise :class:`DegenerateEigenvalueError` when
        ``(lam_1 - lam_2)/lam_1 <= gap_tol``.

    Returns
    -------
    y : array, shape (nm,) or (B, nm)
        Unit leading eigenvector with ``sum(y) > 0``; with
        ``return_eigenvalue``, the tuple ``(y, lam)``.

    Notes
    -----
    Implicit residual ``F(y, lam; M) = (M y - lam y, (1 - y'y)/2)`` (eq. 42).
    The derivative with respect to ``M`` is that of the map
    ``M -> y(M)`` on all square matrices near ``M``; for a symmetric
    parameterization ``M(theta)`` autograd's chain rule gives the right
    gradient.  Finite-difference checks must perturb ``M`` symmetrically
    (non-symmetric ``M`` is rejected by the forward check).
    """
    Mv = onp.asarray(getval(M))
    layer = implicit_layer(
        _sm_residual, _sm_solver(eig_method, gap_tol, eig_dense_max, eig_tol),
        linear_solver=_linear_solver("sm", linear_solver, kkt_dense_max),
        batch_axis=0 if Mv.ndim == 3 else None, residual_tol=residual_tol,
        linear_solver_options=linear_solver_options, diagnostics=_sm_diagnostics,
        name="spectral-matching")
    y, lam = layer(M)
    return (y, lam) if return_eigenvalue else y


# ------------------------------------------------------------------------------
# spectral matching with affine constraints (SMAC)
# ------------------------------------------------------------------------------

def one_to_one_constraints(n: int, m: int) -> Tuple[onp.ndarray, onp.ndarray]:
    r"""Full-rank one-to-one constraints ``C y = d`` on ``y = vec(X)`` (row-major).

    Rows of ``X`` sum to one (``sum_a X[i, a] = 1``, ``n`` rows) and columns sum
    to ``n/m`` (``sum_i X[i, a] = n/m``, which is 1 for ``n = m``; for
    ``n < m`` the averaged, "balanced" relaxation of "at most once").  The
    two families both sum to ``n``, so one column constraint (the last) is
    redundant and dropped: ``C`` is ``(n + m - 1) x nm`` with full row rank.
    """
    if n < 1 or m < 1:
        raise ShapeError(f"one_to_one_constraints needs n, m >= 1, got n={n}, m={m}")
    rows = onp.kron(onp.eye(n), onp.ones((1, m)))
    cols = onp.kron(onp.ones((1, n)), onp.eye(m))[:-1]
    C = onp.concatenate([rows, cols], axis=0)
    d = onp.concatenate([onp.ones(n), onp.full(m - 1, n / m)])
    return C, d


def homogeneous_constraints(C, d, pivot: int):
    r"""``C_eq = C_{-k} - d_{-k} C_k / d_k`` (``k = pivot``): ``C_eq y = 0`` iff
    ``C y`` is a multiple of ``d``.  autograd-differentiable in ``C`` and ``d``."""
    keep = [i for i in range(np.shape(C)[0]) if i != pivot]
    ratio = d[keep] / d[pivot]
    return C[keep] - ratio[:, None] * C[pivot][None, :]


def _check_constraints(C: onp.ndarray, d: onp.ndarray, N: int) -> None:
    finite_or_raise((C, d), "the constraints (C, d)")
    if C.ndim != 2 or C.shape[1] != N or d.shape != (C.shape[0],):
        raise ShapeError(f"the constraints must be C of shape (p, {N}) and d of shape (p,), got "
                         f"C {C.shape} and d {d.shape}")
    if C.shape[0] >= N:
        raise ConstraintRankError(f"{C.shape[0]} constraints on {N} unknowns leave no freedom: "
                                  f"use fewer than nm constraint rows.")
    s = onp.linalg.svd(C, compute_uv=False)
    if s[-1] <= 1e-10 * s[0]:
        sol = onp.linalg.lstsq(C, d, rcond=None)[0]
        miss = float(onp.abs(C @ sol - d).max())
        if miss > 1e-8 * (1 + onp.abs(d).max()):
            raise InfeasibleConstraintsError(
                f"the constraints C y = d are inconsistent (no y satisfies them: least-squares "
                f"misfit {miss:.3g}). Check d against C (e.g. row and column sums of a square "
                f"assignment must agree).")
        raise ConstraintRankError(
            f"the constraint matrix C ({C.shape[0]} rows) has rank {int((s > 1e-10 * s[0]).sum())}:"
            f" its rows are linearly dependent, so the multipliers are not unique. Drop the "
            f"redundant rows (one_to_one_constraints(n, m) already does for one-to-one).")


def _smac_residual(z, M, Ceq):
    """Eq. (44) with the symmetric signs: ``(M y - lam y - C_eq' mu, (1 - y'y)/2, -C_eq y)``."""
    y, lam, mu = z
    return (np.dot(M, y) - lam * y - np.dot(mu, Ceq), 0.5 * (1.0 - np.dot(y, y)),
            -np.dot(Ceq, y))


def _projector_ops(Ceq: onp.ndarray):
    """``v -> P v`` with ``P = I - C_eq'(C_eq C_eq')^{-1} C_eq``, and the Cholesky
    factor ``G`` of ``C_eq C_eq'``."""
    G = scipy.linalg.cho_factor(Ceq @ Ceq.T)
    return lambda v: v - Ceq.T @ scipy.linalg.cho_solve(G, Ceq @ v), G


def _projector_matrix(Ceq: onp.ndarray, G) -> onp.ndarray:
    """The dense ``P`` of :func:`_projector_ops`."""
    return onp.eye(Ceq.shape[1]) - Ceq.T @ scipy.linalg.cho_solve(G, Ceq)


def _smac_solver(eig_method: str, gap_tol: float, eig_dense_max: int, eig_tol: float):
    def solver(M, Ceq):
        M, Ceq = onp.asarray(M, float), onp.asarray(Ceq, float)
        N = M.shape[0]
        proj, G = _projector_ops(Ceq)
        if eig_method == "dense" or (eig_method == "auto" and N <= eig_dense_max):
            P = _projector_matrix(Ceq, G)
            PMP = P @ M @ P
            y, lam, lam2 = leading_eigenpair(0.5 * (PMP + PMP.T), method="dense")
        else:
            op = spla.LinearOperator((N, N), dtype=float, matvec=lambda v: proj(M @ proj(v)))
            y, lam, lam2 = leading_eigenpair(op, method="krylov", tol=eig_tol)
        # P M P has p zero eigenvalues on range(C_eq'): compare lam with them too
        lam2 = max(lam2, 0.0) if Ceq.shape[0] else lam2
        _require_gap(lam, lam2, gap_tol, "", "P M P (M projected onto C y ∝ d)")
        y = proj(y)
        y /= onp.linalg.norm(y)
        mu = scipy.linalg.cho_solve(G, Ceq @ (M @ y)) if Ceq.shape[0] else onp.zeros(0)
        return y, onp.array(float(y @ M @ y)), mu
    return solver


def _smac_diagnostics(point):
    M, Ceq = (onp.asarray(x, float) for x in point.inputs)
    P = _projector_matrix(Ceq, _projector_ops(Ceq)[1])
    w = onp.linalg.eigvalsh(P @ M @ P)
    lam, lam2 = w[-1], max(w[-2], 0.0)
    gap = (lam - lam2) / abs(lam) if lam else 0.0
    return {"eigen_gap": (float(gap), gap > 1e-6, "relative gap of P M P on the constraint "
                                                  "subspace (lam1 - max(lam2, 0))/lam1")}


def smac_layer(M, C=None, d=None, *, shape: Optional[Tuple[int, int]] = None,
               return_unit: bool = False, eig_method: str = "auto", eig_tol: float = 1e-10,
               linear_solver="auto",
               gap_tol: float = 1e-8, eig_dense_max: int = EIG_DENSE_MAX,
               kkt_dense_max: int = KKT_DENSE_MAX, scale_tol: float = 1e-8,
               residual_tol: float = 1e-6, linear_solver_options: Optional[dict] = None):
    r"""Spectral matching with affine constraints (SMAC).

    Solves ``max_y y'My / y'y  s.t.  C y = d`` (see the module docstring):
    the leading eigenvector ``y`` of ``P M P`` on ``C_eq y = 0``, rescaled to
    ``x = y / t`` with ``t = d'Cy / d'd`` so that ``C x = d``.

    Parameters
    ----------
    M : array, shape (nm, nm)
        Symmetric, non-negative affinity.
    C, d : arrays, shapes (p, nm) and (p,), optional
        Constraints with full row rank.  Default: :func:`one_to_one_constraints`
        for ``shape=(n, m)`` (default ``n = m = sqrt(nm)``).  ``d`` defaults
        to ones.
    return_unit : bool
        Return the unit eigenvector ``y`` (sign: ``sum(y) > 0``) instead of
        the rescaled ``x``.

    Returns
    -------
    x : array, shape (nm,)
        ``x = y / t`` with ``C x = d`` (or ``y`` for ``d = 0``).

    Raises
    ------
    InfeasibleConstraintsError
        ``C y = d`` is inconsistent, or the eigenvector has ``C y = 0``
        (``|t|`` below ``scale_tol``): the ratio's supremum on ``C y = d`` is
        approached only at infinity and no maximizer exists.
    ConstraintRankError, DegenerateEigenvalueError, AffinityError
    """
    Mv = onp.asarray(getval(M), float)
    _check_affinity(Mv, batched=False)
    N = Mv.shape[0]
    if C is None:
        if shape is None:
            n = int(round(onp.sqrt(N)))
            if n * n != N:
                raise ShapeError(f"nm = {N} is not a square: pass shape=(n, m) or C, d")
            shape = (n, n)
        if shape[0] * shape[1] != N:
            raise ShapeError(f"shape={shape} does not match the affinity's {N} rows")
        C, d0 = one_to_one_constraints(*shape)
        d = d0 if d is None else d
    if d is None:
        d = onp.ones(onp.shape(getval(C))[0])
    Cv, dv = onp.asarray(getval(C), float), onp.asarray(getval(d), float)
    _check_constraints(Cv, dv, N)
    homogeneous = not onp.any(dv)
    Ceq = C if homogeneous else homogeneous_constraints(C, d, int(onp.argmax(onp.abs(dv))))
    layer = implicit_layer(_smac_residual,
                           _smac_solver(eig_method, gap_tol, eig_dense_max, eig_tol),
                           linear_solver=_linear_solver("smac", linear_solver, kkt_dense_max),
                           residual_tol=residual_tol, linear_solver_options=linear_solver_options,
                           diagnostics=_smac_diagnostics, name="smac")
    y, _lam, _mu = layer(M, Ceq)
    if return_unit or homogeneous:
        return y
    t = np.dot(d, np.dot(C, y)) / np.dot(d, d)
    tv = float(getval(t))
    if abs(tv) <= scale_tol * onp.linalg.norm(Cv, 2):
        raise InfeasibleConstraintsError(
            f"the leading eigenvector of P M P satisfies C y ~ 0 (t = {tv:.3g}), not C y ∝ d: "
            f"the maximum of y'My/y'y over C y = d is not attained (it is approached as |y| -> "
            f"infinity). Change the constraints or the affinity.")
    return y / t


# ------------------------------------------------------------------------------
# power iteration (explicit, unrolled)
# ------------------------------------------------------------------------------

def power_iteration_layer(M, iterations: int = 10):
    r"""``iterations`` steps of ``y <- M y / |M y|`` from ``y_0 = 1/sqrt(nm)``
    (Zanfir and Sminchisescu 2018), differentiated by unrolling (autograd).

    ``M`` has shape ``(nm, nm)`` or ``(B, nm, nm)``; returns ``y`` of shape
    ``(nm,)`` or ``(B, nm)``.  No well-posedness requirement: the output is
    defined for any ``M`` with ``M y_k != 0``.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    Mv = onp.asarray(getval(M))
    if Mv.ndim not in (2, 3) or Mv.shape[-1] != Mv.shape[-2]:
        raise AffinityError(f"power_iteration_layer needs M of shape (nm, nm) or (B, nm, nm), got "
                            f"{Mv.shape}")
    N = Mv.shape[-1]
    y = onp.full(Mv.shape[:-1], 1.0 / onp.sqrt(N))
    for _ in range(iterations):
        y = np.einsum("...ij,...j->...i", M, y)
        norm = np.sqrt(np.sum(y * y, axis=-1, keepdims=True))
        if onp.any(getval(norm) == 0):
            raise AffinityError("power iteration reached M y = 0: the affinity annihilates the "
                                "iterate (all-zero M?)")
        y = y / norm
    return y


# ------------------------------------------------------------------------------
# bistochastic normalization (Sinkhorn), voting, discretization
# ------------------------------------------------------------------------------

def _marginals(shape, row_marginals, col_marginals):
    n, m = shape[-2], shape[-1]
    r = onp.ones(n) if row_marginals is None else onp.asarray(row_marginals, float)
    c = onp.full(m, n / m) if col_marginals is None else onp.asarray(col_marginals, float)
    if r.shape != (n,) or c.shape != (m,):
        raise ShapeError(f"marginals must have shapes ({n},) and ({m},), got {r.shape}, {c.shape}")
    if (r <= 0).any() or (c <= 0).any() or abs(r.sum() - c.sum()) > 1e-10 * r.sum():
        raise ValueError(f"Sinkhorn needs positive marginals with equal totals, got sum(r) = "
                         f"{r.sum():.6g}, sum(c) = {c.sum():.6g}")
    return onp.log(r), onp.log(c)


def sinkhorn(S, iterations: int = 20, tau: float = 1.0, row_marginals=None, col_marginals=None):
    r"""Unrolled log-domain Sinkhorn: ``iterations`` alternating row and column
    normalizations of ``exp(S / tau)`` (``(n, m)`` or ``(B, n, m)``); rows are
    normalized last-but-one and columns last, so the column sums are exact.

    ``log P <- log P - LSE_row(log P) + log r``, then the same over columns with
    ``log c``.  Default marginals: rows sum to 1, columns to ``n/m``.
    """
    log_r, log_c = _marginals(onp.shape(getval(S)), row_marginals, col_marginals)
    L = S / tau
    for _ in range(iterations):
        L = L - logsumexp(L, axis=-1, keepdims=True) + log_r[:, None]
        L = L - logsumexp(L, axis=-2, keepdims=True) + log_c[None, :]
    return np.exp(L)


def _sinkhorn_map(log_r, log_c):
    """The gauge-fixed map T(v) on column potentials (see :func:`sinkhorn_layer`)."""
    def row_potential(v, L):
        return log_r[:, None] - logsumexp(L + v[..., None, :], axis=-1, keepdims=True)

    def T(v, L):
        u = row_potential(v, L)
        g = log_c - logsumexp(L + u, axis=-2)
        return g - g[..., -1:]
    return T, row_potential


def sinkhorn_layer(S, tau: float = 1.0, row_marginals=None, col_marginals=None, *,
                   tol: float = 1e-13, max_iter: int = 10000):
    r"""Bistochastic normalization of ``exp(S / tau)`` as an implicit fixed point.

    With ``L = S / tau``, row potential ``u(v) = log r - LSE_a(L_{ia} + v_a)``
    and ``g(v) = log c - LSE_i(L_{ia} + u_i(v))``, Sinkhorn's iteration is
    ``v <- g(v)``; it is invariant to ``(u, v) -> (u - k, v + k)``, so the layer
    solves the gauge-fixed fixed point

    .. math::  v = T(v; L) = g(v) - g_m(v)\, \mathbf 1  \qquad (v_m = 0),

    with :func:`nimplicit.fixed_point_layer`, and returns
    ``P = exp(L + u(v) 1' + 1 v')``: rows sum to ``r``, columns to ``c``.
    The forward solver is the log-domain Sinkhorn iteration run to ``tol``;
    the backward pass is the implicit function theorem (no unrolling).
    ``S`` is ``(n, m)`` or ``(B, n, m)``.
    """
    Sv = onp.asarray(getval(S), float)
    log_r, log_c = _marginals(Sv.shape, row_marginals, col_marginals)
    T, row_potential = _sinkhorn_map(log_r, log_c)

    def solver(L):
        v = onp.zeros(L.shape[:-2] + L.shape[-1:])
        for it in range(max_iter):
            v_new = onp.asarray(T(v, L))
            if onp.abs(v_new - v).max() <= tol * (1 + onp.abs(v_new).max()):
                return v_new
            v = v_new
        raise NotConvergedError(
            f"Sinkhorn did not converge in max_iter={max_iter} iterations (change of the "
            f"potentials {onp.abs(v_new - v).max():.3g}); tau={tau} may be too small for the "
            f"score range: raise tau or max_iter.")

    layer = fixed_point_layer(T, solver=solver, batch_axis=0 if Sv.ndim == 3 else None,
                              name="sinkhorn")
    L = S / tau
    v = layer(L)
    return np.exp(L + row_potential(v, L) + v[..., None, :])


def voting_layer(X, temperature: float = 1.0):
    r"""The voting layer: a softmax over each row of the (``n x m``, or batched)
    assignment scores, ``V[i, a] = exp(X[i, a] / T) / sum_b exp(X[i, b] / T)``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    Z = X / temperature
    return np.exp(Z - logsumexp(Z, axis=-1, keepdims=True))


def hungarian(X) -> onp.ndarray:
    """Discretize scores ``X`` (``n x m`` or batched) to the (partial) permutation
    maximizing ``sum X[i, pi(i)]`` (``scipy.optimize.linear_sum_assignment``).
    Evaluation only: not differentiable."""
    X = onp.asarray(getval(X), float)
    out = onp.zeros_like(X)
    for Xb, Ob in zip(X.reshape((-1,) + X.shape[-2:]), out.reshape((-1,) + X.shape[-2:])):
        rows, cols = scipy.optimize.linear_sum_assignment(Xb, maximize=True)
        Ob[rows, cols] = 1.0
    return out


def matching_accuracy(X_pred, X_true) -> float:
    """Fraction of the ground-truth matches (ones of ``X_true``) recovered."""
    X_pred, X_true = onp.asarray(X_pred), onp.asarray(X_true)
    return float((X_pred * X_true).sum() / max(X_true.sum(), 1))


# ------------------------------------------------------------------------------
# affinity builders
# ------------------------------------------------------------------------------

def full_edges(n: int) -> onp.ndarray:
    """All ``n (n - 1)`` directed edges ``(i, j)``, ``i != j`` (both directions)."""
    i, j = onp.nonzero(~onp.eye(n, dtype=bool))
    return onp.stack([i, j], axis=1).astype(onp.int64)


def edge_features(points, edges) -> onp.ndarray:
    r"""Geometric edge features ``(length / mean length, cos theta, sin theta)``
    of the directed edges (``e x 2``) of 2-D ``points`` (``n x 2``).

    Lengths are normalized by their mean (scale invariance).  Reversing an edge
    flips the direction vector, so a Gaussian kernel on feature differences is
    the same for ``(e, f)`` and their reverses: the affinity is symmetric.
    """
    points, edges = onp.asarray(points, float), onp.asarray(edges)
    vec = points[edges[:, 1]] - points[edges[:, 0]]
    length = onp.linalg.norm(vec, axis=1)
    if (length == 0).any():
        raise ValueError("two nodes joined by an edge coincide: edge direction undefined")
    return onp.stack([length / length.mean(), vec[:, 0] / length, vec[:, 1] / length], axis=1)


def node_affinity(F1, F2, W):
    r"""Gaussian node affinity through a learnable linear map ``W`` (``d x k``):
    ``K_p[i, a] = exp(-|W' f1_i - W' f2_a|^2)`` (``n x m``; batched: leading axis)."""
    A, B = np.matmul(F1, W), np.matmul(F2, W)
    sq = (np.sum(A * A, axis=-1)[..., :, None] + np.sum(B * B, axis=-1)[..., None, :]
          - 2 * np.matmul(A, np.swapaxes(B, -1, -2)))
    return np.exp(-np.maximum(sq, 0.0))


def gaussian_affinity_reference(Kp, P1, P2, w, E1, E2):
    r"""The dense affinity of :func:`gaussian_affinity` in plain autograd.numpy
    (one instance): ``K_e = exp(-sum_t w_t (P1[e,t] - P2[f,t])^2)`` and
    ``M = diag(vec K_p) + (G1 ⊗ G2) diag(vec K_e) (H1 ⊗ H2)'``.
    Slow (materializes ``e1 e2 k`` differences) but any-order differentiable."""
    n, m = np.shape(Kp)
    diff = P1[:, None, :] - P2[None, :, :]
    Ke = np.exp(-np.sum(w * diff * diff, axis=-1))
    G1, H1 = onp.eye(n)[E1[:, 0]].T, onp.eye(n)[E1[:, 1]].T
    G2, H2 = onp.eye(m)[E2[:, 0]].T, onp.eye(m)[E2[:, 1]].T
    edge = np.dot(np.dot(onp.kron(G1, G2), np.diag(np.reshape(Ke, (-1,)))), onp.kron(H1, H2).T)
    return np.diag(np.reshape(Kp, (-1,))) + edge


class _Edges:
    """Validated edge lists with their CSR grouping, per instance."""

    def __init__(self, E1, E2, n: int, m: int):
        from .kernels import affinity as kern
        self.E1 = onp.ascontiguousarray(E1, dtype=onp.int64)
        self.E2 = onp.ascontiguousarray(E2, dtype=onp.int64)
        for E, nodes, name in ((self.E1, n, "E1"), (self.E2, m, "E2")):
            if E.ndim != 2 or E.shape[1] != 2:
                raise ShapeError(f"{name} must have shape (edges, 2), got {E.shape}")
            if E.size and (E.min() < 0 or E.max() >= nodes):
                raise ShapeError(f"{name} refers to node {int(E.max())} of a graph with {nodes} "
                                 f"nodes")
        self.order, self.ptr = kern.group_by_start(self.E1, n)


def _per_instance(x, batched):
    return list(x) if batched else [x]


def _require_shape(name: str, value, want: tuple) -> None:
    # the numba kernels do not bounds-check: a wrong shape would read past the arrays
    got = onp.shape(getval(value))
    if got != tuple(want):
        raise ShapeError(f"{name} must have shape {tuple(want)}, got {got}")


def _edges_per_instance(Kp, E1, E2) -> list:
    """One :class:`_Edges` per instance of the node affinities ``Kp`` (``(n, m)``
    or ``(B, n, m)``); edge lists without a batch axis are shared by the batch."""
    Kpv = onp.asarray(getval(Kp))
    if Kpv.ndim not in (2, 3):
        raise ShapeError(f"Kp must have shape (n, m) or (B, n, m), got {Kpv.shape}")
    n, m = Kpv.shape[-2:]
    count = Kpv.shape[0] if Kpv.ndim == 3 else 1
    E1s = E1 if Kpv.ndim == 3 and onp.ndim(E1) == 3 else [E1] * count
    E2s = E2 if Kpv.ndim == 3 and onp.ndim(E2) == 3 else [E2] * count
    if len(E1s) != count or len(E2s) != count:
        raise ShapeError(f"batched edge lists must have {count} instances like Kp, got "
                         f"{len(E1s)} (E1) and {len(E2s)} (E2)")
    return [_Edges(a, b, n, m) for a, b in zip(E1s, E2s)]


@primitive
def _gaussian_affinity(Kp, P1, P2, w, edges):
    from .kernels import affinity as kern
    batched = onp.ndim(Kp) == 3
    pairs = len(edges[0].E1) * len(edges[0].E2)
    kernel = kern.pick("gaussian_affinity_matrix", pairs)
    out = [kernel(onp.ascontiguousarray(kp, float), onp.ascontiguousarray(p1, float),
                  onp.ascontiguousarray(p2, float), onp.ascontiguousarray(w, float),
                  ed.E1, ed.E2, ed.order, ed.ptr)
           for kp, p1, p2, ed in zip(_per_instance(Kp, batched), _per_instance(P1, batched),
                                     _per_instance(P2, batched), edges)]
    return onp.stack(out) if batched else out[0]


def _first_order_only(g, *args):
    if isbox(g) or any(isbox(a) for a in args):
        raise UnsupportedError("gaussian_affinity's numba VJP is first order only; for higher "
                               "orders use gaussian_affinity_reference (autograd.numpy).")
    return onp.ascontiguousarray(g, float)


def _gaussian_vjp(which):
    def make(ans, Kp, P1, P2, w, edges):
        def vjp(g):
            from .kernels import affinity as kern
            g = _first_order_only(g, Kp, P1, P2, w)
            batched = onp.ndim(Kp) == 3
            m = onp.shape(Kp)[-1]
            pairs = len(edges[0].E1) * len(edges[0].E2)
            parts = []
            for k, (gb, p1, p2, ed) in enumerate(zip(_per_instance(g, batched),
                                                     _per_instance(P1, batched),
                                                     _per_instance(P2, batched), edges)):
                p1, p2 = onp.ascontiguousarray(p1, float), onp.ascontiguousarray(p2, float)
                wv = onp.ascontiguousarray(w, float)
                if which == "Kp":
                    parts.append(onp.diagonal(gb).reshape(onp.shape(Kp)[-2:]))
                elif which == "P1":
                    kernel = kern.pick("gaussian_affinity_vjp_p1", pairs)
                    parts.append(kernel(gb, p1, p2, wv, ed.E1, ed.E2, m))
                elif which == "P2":
                    kernel = kern.pick("gaussian_affinity_vjp_p2", pairs)
                    parts.append(kernel(gb, p1, p2, wv, ed.E1, ed.E2, m))
                else:
                    kernel = kern.pick("gaussian_affinity_vjp_w", pairs)
                    parts.append(kernel(gb, p1, p2, wv, ed.E1, ed.E2, m))
            if which == "w":
                return onp.sum(parts, axis=0)
            return onp.stack(parts) if batched else parts[0]
        return vjp
    return make


defvjp(_gaussian_affinity, _gaussian_vjp("Kp"), _gaussian_vjp("P1"), _gaussian_vjp("P2"),
       _gaussian_vjp("w"))


def _gaussian_jvp(which):
    def jvp(g, ans, Kp, P1, P2, w, edges):
        from .kernels import affinity as kern
        g = _first_order_only(g, Kp, P1, P2, w)
        batched = onp.ndim(Kp) == 3
        n, m = onp.shape(Kp)[-2:]
        if which == "Kp":
            out = [onp.diag(gb.ravel()) for gb in _per_instance(g, batched)]
            return onp.stack(out) if batched else out[0]
        pairs = len(edges[0].E1) * len(edges[0].E2)
        kernel = kern.pick("gaussian_affinity_jvp", pairs)
        wv = onp.ascontiguousarray(w, float)
        out = []
        for b, (p1, p2, ed) in enumerate(zip(_per_instance(P1, batched), _per_instance(P2, batched),
                                             edges)):
            p1, p2 = onp.ascontiguousarray(p1, float), onp.ascontiguousarray(p2, float)
            d1 = g[b] if (which == "P1" and batched) else g if which == "P1" else onp.zeros_like(p1)
            d2 = g[b] if (which == "P2" and batched) else g if which == "P2" else onp.zeros_like(p2)
            dw = g if which == "w" else onp.zeros_like(wv)
            out.append(kernel(p1, p2, wv, onp.ascontiguousarray(d1, float),
                              onp.ascontiguousarray(d2, float), onp.ascontiguousarray(dw, float),
                              ed.E1, ed.E2, ed.order, ed.ptr, n, m))
        return onp.stack(out) if batched else out[0]
    return jvp


defjvp(_gaussian_affinity, _gaussian_jvp("Kp"), _gaussian_jvp("P1"), _gaussian_jvp("P2"),
       _gaussian_jvp("w"))


def gaussian_affinity(Kp, P1, P2, w, E1, E2):
    r"""Dense affinity ``M`` (``nm x nm``, or ``(B, nm, nm)``) from node
    affinities and a Gaussian kernel on edge features, built by a numba kernel:

    .. math::
        M = \operatorname{diag}(\operatorname{vec} K_p)
            + (G_1 \otimes G_2) \operatorname{diag}(\operatorname{vec} K_e) (H_1 \otimes H_2)^\top,
        \quad K_e[e, f] = \exp\Big(-\sum_t w_t (P_1[e, t] - P_2[f, t])^2\Big).

    Parameters
    ----------
    Kp : (n, m) or (B, n, m)   node affinities (e.g. :func:`node_affinity`)
    P1, P2 : (e1, k), (e2, k) or batched   edge features (e.g. :func:`edge_features`)
    w : (k,)   kernel weights (>= 0 for a bounded kernel); shared by the batch
    E1, E2 : (e1, 2), (e2, 2) or batched   directed edges (include both
        directions of an undirected edge for a symmetric ``M``)

    Reverse- and forward-mode derivatives with respect to ``Kp``, ``P1``,
    ``P2`` and ``w`` are numba kernels (first order;
    :func:`gaussian_affinity_reference` is the any-order autograd version).
    """
    edges = _edges_per_instance(Kp, E1, E2)
    batch, k = onp.shape(getval(Kp))[:-2], onp.shape(getval(P1))[-1:]
    _require_shape("P1", P1, batch + (len(edges[0].E1),) + k)
    _require_shape("P2", P2, batch + (len(edges[0].E2),) + k)
    _require_shape("w", w, k)
    return _gaussian_affinity(Kp, P1, P2, w, edges)


@primitive
def _scatter(Kp, Ke, edges):
    from .kernels import affinity as kern
    batched = onp.ndim(Kp) == 3
    pairs = len(edges[0].E1) * len(edges[0].E2)
    kernel = kern.pick("scatter_affinity", pairs)
    out = [kernel(onp.ascontiguousarray(kp, float), onp.ascontiguousarray(ke, float),
                  ed.E1, ed.E2, ed.order, ed.ptr)
           for kp, ke, ed in zip(_per_instance(Kp, batched), _per_instance(Ke, batched), edges)]
    return onp.stack(out) if batched else out[0]


def _gather_both(G, edges, n, m):
    from .kernels import affinity as kern
    batched = onp.ndim(G) == 3
    kps, kes = [], []
    for gb, ed in zip(_per_instance(G, batched), edges):
        kernel = kern.pick("gather_affinity", len(ed.E1) * len(ed.E2))
        kp, ke = kernel(onp.ascontiguousarray(gb, float), ed.E1, ed.E2, n, m)
        kps.append(kp)
        kes.append(ke)
    return (onp.stack(kps), onp.stack(kes)) if batched else (kps[0], kes[0])


@primitive
def _gather_kp(G, edges, n, m):
    return _gather_both(G, edges, n, m)[0]


@primitive
def _gather_ke(G, edges, n, m):
    return _gather_both(G, edges, n, m)[1]


def _zeros_ke(Kp, edges):
    shape = (len(edges[0].E1), len(edges[0].E2))
    return onp.zeros((onp.shape(Kp)[0],) + shape if onp.ndim(Kp) == 3 else shape)


# scatter and the gathers are adjoint linear maps: each one's VJP is the other (any order)
defvjp(_scatter,
       lambda ans, Kp, Ke, edges: lambda g: _gather_kp(g, edges, *onp.shape(Kp)[-2:]),
       lambda ans, Kp, Ke, edges: lambda g: _gather_ke(g, edges, *onp.shape(Kp)[-2:]))
defjvp(_scatter,
       lambda g, ans, Kp, Ke, edges: _scatter(g, onp.zeros(onp.shape(Ke)), edges),
       lambda g, ans, Kp, Ke, edges: _scatter(onp.zeros(onp.shape(Kp)), g, edges))
defvjp(_gather_kp, lambda ans, G, edges, n, m: lambda g: _scatter(g, _zeros_ke(g, edges), edges))
defvjp(_gather_ke, lambda ans, G, edges, n, m:
       lambda g: _scatter(onp.zeros(onp.shape(g)[:-2] + (n, m)), g, edges))
defjvp(_gather_kp, lambda g, ans, G, edges, n, m: _gather_kp(g, edges, n, m))
defjvp(_gather_ke, lambda g, ans, G, edges, n, m: _gather_ke(g, edges, n, m))


def assemble_affinity(Kp, Ke, E1, E2):
    r"""Dense ``M = diag(vec K_p) + (G1 ⊗ G2) diag(vec K_e) (H1 ⊗ H2)'`` from any
    node affinities ``Kp`` (``n x m``) and edge affinities ``Ke`` (``e1 x e2``),
    e.g. Zanfir and Sminchisescu's bilinear ``K_e = X Λ Y'``; batched with a
    leading axis.  A numba scatter whose adjoint (the gather) is its VJP:
    differentiable in ``Kp`` and ``Ke`` to any order, both modes."""
    edges = _edges_per_instance(Kp, E1, E2)
    _require_shape("Ke", Ke, onp.shape(getval(Kp))[:-2] + (len(edges[0].E1), len(edges[0].E2)))
    return _scatter(Kp, Ke, edges)
