r"""The structured backward of SM and SMAC: the bordered eigen-KKT system.

Implemented as :class:`BorderedKKT`, a linear solver of the core's protocol:
the forward's byproducts arrive as ``aux`` of :class:`nimplicit.Solution`.

Both layers' Jacobians are ``K = [[A, -B], [-B', 0]]`` with ``A = M - lam I``
and the border ``B = [y, C_eq']`` (SM: ``B = y``), symmetric, so ``J^T = J``.
With ``B'u = -c`` split off as ``u_par = -B (B'B)^{-1} c``, the rest of ``u``
lies in ``null(B')`` where ``-A`` is positive definite exactly when ``lam`` is
simple, and the multipliers follow as ``w = (B'B)^{-1} B'(A u - b)``.  Three
ways to solve on ``null(B')``, chosen per instance:

``'eigen'``
    The forward's dense eigenbasis (its byproduct, handed over through the
    layer's store): ``u = u_par + Z (Z'(b - A u_par)) / (w_Z - lam)`` with
    ``Z`` the other eigenvectors; two matrix-vector products, no factorization.
``'lu'``
    Up to ``dense_max`` unknowns without an eigenbasis: LU of the *balanced*
    matrix ``[[A / s, -B D^{-1}], [-D^{-1} B', 0]]`` (``s`` the spectral scale,
    ``D`` the border's column norms), whose condition estimate is invariant to
    scaling ``M`` or ``C``: an absolute estimate reported a singular matrix
    for ``1e-150 M`` and SMAC at ``|M| >= 1e8``.
``'cg'``
    Above ``dense_max`` (falling back to ``'lu'`` up to ``LU_FALLBACK_MAX``
    unknowns when CG does not converge): conjugate gradients on ``-P A P`` (``P`` the projector
    onto ``null(B')``), *deflated* by the forward's Krylov data when the forward
    was Lanczos: with the non-leading Ritz vectors ``W`` (orthonormal, in
    ``null(B')``) the Lanczos relation gives ``-P A W = W diag(lam - theta) -
    beta q s'`` without a product with ``M``, and deflated CG (Saad, Yeung,
    Erhel and Guyomarc'h 2000) iterates only on the part of the spectrum the
    forward did not resolve, which removes the small eigenvalues
    ``lam - lam_2, ...`` of ``-P A P`` that slow plain CG down.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.linalg

from nimplicit.errors import LinearSolveError
from nimplicit.linear_solvers import LinearSolver, LinearSolverState

from .eigen import product
from .errors import DegenerateEigenvalueError

#: relative rounding floor of the projected CG (the projector and the products with M
#: carry errors of a few hundred eps times |b| and the spectral scale): far below the
#: forward's own accuracy (Lanczos tol 1e-10)
NOISE = 1e-13
#: above this many unknowns the backward uses projected CG instead of a dense solve
KKT_DENSE_MAX = 100
#: up to this many unknowns a projected CG that does not converge is replaced by the
#: balanced LU (O(N^3), ~1 s at 2000) instead of failing the backward
LU_FALLBACK_MAX = 2000


class BorderedSystem:
    """Solves ``K x = rhs`` for one instance (see the module docstring)."""

    def __init__(self, M, lam: float, B, *, mode: str, scale: float, eigen=None,
                 max_condition: float = 1e12):
        self.M, self.lam, self.B = M, float(lam), B
        # M @ v, on one triangle (BLAS dsymv) when the forward found M exactly symmetric
        self.Mx = product(M, eigen is not None and eigen.symmetric)
        self.N, self.q = B.shape
        self.mode = mode
        self.spectral_scale = scale if scale > 0 else float(np.abs(M).sum(axis=1).max())
        # (B'B)^{-1} B' once: q is small (1 for SM), so the projector is two GEMVs per
        # product without scipy's per-call overhead
        self.Bpinv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(B.T @ B, check_finite=False),
                                            B.T, check_finite=False)
        self.krylov = None
        self.max_condition = max_condition
        if mode == "eigen":
            Zfull = eigen.V if eigen.basis is None else eigen.basis @ eigen.V
            self.Z = Zfull[:, :-1]
            self.D = eigen.w[:-1] - self.lam
        elif mode == "lu":
            self._factor_balanced(scale, max_condition)
        elif eigen is not None and eigen.krylov is not None and eigen.krylov.W.shape[1]:
            self._deflation(eigen.krylov)

    def _deflation(self, kd) -> None:
        """``W``, ``A_p W`` and ``E = W' A_p W`` for deflated CG (``A_p = -P A P``)."""
        E = self.lam - kd.theta
        if not (E > 0).all():      # a Ritz value above lam: not a usable deflation space
            return
        W = kd.W - self.B @ (self.Bpinv @ kd.W)   # P W (= W to rounding)
        AW = W * E - kd.beta * np.outer(kd.q, kd.s)
        self.krylov = (W, AW, E)

    def _factor_balanced(self, scale: float, max_condition: float) -> None:
        s = scale if scale > 0 else 1.0
        self.s = s
        self.colnorm = np.linalg.norm(self.B, axis=0)
        Bn = self.B / self.colnorm
        N, q = self.N, self.q
        K = np.zeros((N + q, N + q))
        K[:N, :N] = self.M / s
        K[np.arange(N), np.arange(N)] -= self.lam / s
        K[:N, N:] = -Bn
        K[N:, :N] = -Bn.T
        self.lu = scipy.linalg.lu_factor(K, check_finite=False)
        anorm = np.abs(K).sum(axis=0).max()
        rcond = scipy.linalg.lapack.dgecon(self.lu[0], anorm, norm="1")[0]
        if not rcond * max_condition >= 1.0:
            raise DegenerateEigenvalueError(
                f"the balanced bordered KKT matrix of the eigenproblem is singular or "
                f"ill-conditioned (condition ~{1 / max(rcond, 1e-300):.3g}, scale-free): the "
                f"leading eigenvalue is (nearly) repeated or the constraints are (nearly) "
                f"dependent.")

    def _A(self, v):
        return self.Mx(v) - self.lam * v

    def _proj(self, v):
        return v - self.B @ (self.Bpinv @ v)

    def solve(self, rhs, rtol: float, maxiter: Optional[int]):
        N = self.N
        if self.mode == "lu":
            b_s = np.concatenate([rhs[:N] / self.s, rhs[N:] / self.colnorm])
            x = scipy.linalg.lu_solve(self.lu, b_s, check_finite=False)
            return np.concatenate([x[:N], self.s * x[N:] / self.colnorm])
        b, c = rhs[:N], rhs[N:]
        if np.any(c):
            u_par = -self.Bpinv.T @ c          # -B (B'B)^{-1} c
            Au_par = self._A(u_par)
        else:   # e.g. a cotangent of y alone: saves a product with M
            u_par = Au_par = np.zeros(N)
        r = b - Au_par
        if self.mode == "eigen":
            u = u_par + self.Z @ ((self.Z.T @ r) / self.D)
            Au = self._A(u)
        else:
            # rounding floor of the projected residual: f = P(b - A u_par) and A z are formed
            # to ~eps (|b| + s |u_par|) and ~eps s |z|, so a relative rtol below it is
            # unreachable when f is much smaller than b (b nearly in range(B))
            floor0 = NOISE * (np.linalg.norm(b) + self.spectral_scale * np.linalg.norm(u_par))
            z = self._cg(-self._proj(r), rtol, maxiter, floor0)
            Az = self._A(z)
            res = np.linalg.norm(-self._proj(Az) + self._proj(r))
            rnorm = np.linalg.norm(self._proj(r))
            floor = floor0 + NOISE * self.spectral_scale * np.linalg.norm(z)
            if rnorm and not res <= max(100 * rtol * rnorm, 10 * floor) and self.N <= LU_FALLBACK_MAX:
                # CG stalls on a small eigen-gap (or a deflation space that does not fit):
                # the balanced LU is exact and reports a truly degenerate eigenvalue itself
                self._factor_balanced(self.spectral_scale, self.max_condition)
                self.mode = "lu"
                return self.solve(rhs, rtol, maxiter)
            if rnorm and not res <= max(100 * rtol * rnorm, 10 * floor):
                raise LinearSolveError(
                    f"projected CG on the bordered eigen-KKT system did not converge (relative "
                    f"residual {res / rnorm:.3g}): the eigen-gap is tiny. Pass a larger "
                    f"dense_max (dense solve) or raise linear_solver_options maxiter.")
            u = u_par + z
            Au = Au_par + Az
        w = self.Bpinv @ (Au - b)
        return np.concatenate([u, w])

    def _cg(self, f, rtol, maxiter, floor0=0.0):
        """Solve ``-P A P z = f`` (``f`` in ``null(B')``) by CG, deflated when the
        forward's Krylov data is available; ``-P A P`` is positive definite on
        ``null(B')`` iff ``lam`` is simple."""
        fnorm = np.linalg.norm(f)
        z = np.zeros(self.N)
        if fnorm == 0:
            return z
        op = lambda v: -self._proj(self._A(v))
        if self.krylov is not None:
            W, AW, E = self.krylov
            coef = (W.T @ f) / E
            z = W @ coef
            r = f - AW @ coef
            deflate = lambda v: W @ ((AW.T @ v) / E)
        else:
            r = f.copy()
            deflate = None
        p = r - deflate(r) if deflate else r.copy()
        rr = r @ r
        eps_s = NOISE * self.spectral_scale
        for _ in range(maxiter or 10 * self.N):
            if np.sqrt(rr) <= max(rtol * fnorm, floor0 + eps_s * np.linalg.norm(z)):
                break
            Ap = op(p)
            pAp = p @ Ap
            if not pAp > NOISE * self.spectral_scale * (p @ p):
                # breakdown: at the rounding floor (accepted by the caller's true-residual
                # check) or an indefinite operator (rejected there)
                break
            alpha = rr / pAp
            z += alpha * p
            r -= alpha * Ap
            rr_new = r @ r
            p = r + (rr_new / rr) * p - (deflate(r) if deflate else 0.0)
            rr = rr_new
        return self._proj(z)


def _instances(point, kind: str):
    """Per-instance ``(M, lam, border)`` at a forward point; border = ``[y, C_eq']``."""
    M = np.asarray(point.inputs[0], dtype=float)
    y, lam = np.asarray(point.y[0], dtype=float), np.asarray(point.y[1], dtype=float)
    if kind == "sm":
        if M.ndim == 3:
            return [(M[b], float(lam[b]), y[b][:, None]) for b in range(M.shape[0])]
        return [(M, float(lam), y[:, None])]
    Ceq = np.asarray(point.inputs[1], dtype=float)
    return [(M, float(lam), np.concatenate([y[:, None], Ceq.T], axis=1))]


class _BorderedState(LinearSolverState):
    """The per-instance :class:`BorderedSystem` of one forward point (``J = J'``)."""

    exact = True

    def __init__(self, systems, rtol, maxiter):
        self.systems, self.rtol, self.maxiter = systems, rtol, maxiter

    def solve(self, b, transpose=False):
        b = np.asarray(b, dtype=float)
        rhs = b.reshape(len(self.systems), -1)
        x = np.stack([d.solve(r, self.rtol, self.maxiter) for d, r in zip(self.systems, rhs)])
        return x.reshape(b.shape)


class BorderedKKT(LinearSolver):
    """The structured solver of the bordered eigen-KKT Jacobian of SM (``kind='sm'``)
    and SMAC (``kind='smac'``), in the core's linear-solver protocol.

    ``init(operator, aux)`` reads ``M`` and the solution from ``operator.point``
    and the forward's byproducts from ``aux`` (one
    :class:`~reference_layers.matching.eigen.EigenData` per instance: the
    eigenbasis or the Krylov data), and picks per instance the ``'eigen'``,
    ``'lu'`` or ``'cg'`` solve of the module docstring.  Options: ``rtol`` and
    ``maxiter`` (CG), ``max_condition`` (LU), ``dense_max``, ``kind``.
    """

    name = "matching-bordered"
    options = {"rtol": 1e-12, "maxiter": None, "max_condition": 1e12,
               "dense_max": KKT_DENSE_MAX, "kind": "sm"}

    def init(self, operator, aux=None):
        o = self.opts
        systems = []
        for k, (M, lam, B) in enumerate(_instances(operator.point, o["kind"])):
            e = aux[k] if aux is not None else None
            if e is not None and e.V is not None:
                mode = "eigen"
            else:
                mode = "lu" if B.shape[0] <= o["dense_max"] else "cg"
            scale = e.scale if e is not None else float(np.abs(M).sum(axis=1).max())
            systems.append(BorderedSystem(M, lam, B, mode=mode, scale=scale, eigen=e,
                                          max_condition=o["max_condition"]))
        return _BorderedState(systems, o["rtol"], o["maxiter"])
