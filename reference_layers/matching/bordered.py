"""The structured solver of the bordered eigen-KKT systems of SM and SMAC (the backward)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as spla

from nimplicit import linear_solvers
from nimplicit.errors import LinearSolveError

from .errors import DegenerateEigenvalueError

#: above this many unknowns the backward uses projected CG instead of a dense LU
KKT_DENSE_MAX = 100



def _instances(point, kind: str):
    """Per-instance (M, lam, border) at a forward point; border = [y, C_eq']."""
    M = np.asarray(point.inputs[0], float)
    parts = point.y
    y, lam = np.asarray(parts[0], float), np.asarray(parts[1], float)
    if kind == "sm":
        if M.ndim == 3:
            return [(M[b], float(lam[b]), y[b][:, None]) for b in range(M.shape[0])]
        return [(M, float(lam), y[:, None])]
    Ceq = np.asarray(point.inputs[1], float)
    return [(M, float(lam), np.concatenate([y[:, None], Ceq.T], axis=1))]


class _BorderedData:
    """Factorizations for ``K = [[M - lam I, -B], [-B', 0]]`` of one instance."""

    def __init__(self, M, lam, B, dense: bool, max_condition: float):
        self.M, self.lam, self.B = M, lam, B
        self.N, self.q = B.shape
        self.dense = dense
        if dense:
            K = np.zeros((self.N + self.q,) * 2)
            K[:self.N, :self.N] = M - lam * np.eye(self.N)
            K[:self.N, self.N:] = -B
            K[self.N:, :self.N] = -B.T
            self.lu = scipy.linalg.lu_factor(K, check_finite=False)
            anorm = np.abs(K).sum(axis=0).max()
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
        z = np.zeros(self.N)
        rnorm = np.linalg.norm(r)
        if rnorm > 0:
            # -P (M - lam I) P is positive definite on the null space of B' iff lam is simple
            op = spla.LinearOperator((self.N, self.N), dtype=float,
                                     matvec=lambda v: -self._proj(self._A(self._proj(v))))
            z, info = spla.cg(op, -r, rtol=rtol, atol=0.0, maxiter=maxiter or 10 * self.N)
            z = self._proj(z)
            res = np.linalg.norm(op.matvec(z) + r) / rnorm
            if info != 0 or not res <= 100 * rtol:
                raise LinearSolveError(
                    f"projected CG on the bordered eigen-KKT system did not converge (relative "
                    f"residual {res:.3g}, info={info}): the eigen-gap is tiny. Pass "
                    f"linear_solver='lu' (dense) or raise linear_solver_options maxiter.")
        u = u_par + z
        w = scipy.linalg.cho_solve(self.G, self.B.T @ (self._A(u) - b))
        return np.concatenate([u, w])


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
        x = np.stack([d.solve(r, rtol, maxiter) for d, r in zip(data, rhs)])
        return x.reshape(b.shape)
    return solve


def _linear_solver(kind: str, linear_solver, dense_max: int):
    if linear_solver == "auto":
        return _bordered_solver(kind, dense_max)
    return linear_solvers.get(linear_solver)

