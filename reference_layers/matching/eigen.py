r"""The forward eigensolvers of spectral matching: Lanczos and dense ``eigh``.

Both return an :class:`EigenData`, the forward's byproducts: the leading pair
``(y, lam)``, the next eigenvalue ``lam2`` (for the gap test), a spectral scale
``s = max |eigenvalue|`` seen (so the gap test of :mod:`nimplicit.spectral` is
relative), and what the backward can reuse: the full eigenbasis (dense) or the
Lanczos basis (Krylov).

Choice (``eig_method='auto'``, "by size and gap"): Lanczos from the row sums
``M 1`` (close to the Perron vector of a non-negative ``M``, and free: the
validation pass computes them), with an iteration budget; when the gap is small
and Lanczos would need many steps on a matrix of at most ``dense_max`` rows, the
dense ``eigh`` takes over.  ``'dense'`` and ``'krylov'`` force one of them.

Sign rule (:func:`fix_sign`): ``sum(y) > 0``; when the sum is zero to within
``SIGN_TOL sqrt(N)`` (e.g. SMAC with ``d = 0`` and a sum constraint), the first
entry with ``|y_i| >= max|y| / 2`` is made positive.  Both rules are decided
by quantities far above rounding noise, so ``y`` does not flip under tiny
perturbations (only an entry within rounding of ``max|y| / 2`` could).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from numba import njit

from nimplicit.errors import NotConvergedError, finite_or_raise
from nimplicit.spectral import relative_gap

from ..kernels.blas import gemv, gemv_t, symv, syev

#: above this many unknowns (nm) the dense paths (eigh fallback, LU backward) are not used
DENSE_MAX = 100
EIG_DENSE_MAX = DENSE_MAX   # the old name, kept for one release
#: |sum(y)| below SIGN_TOL * sqrt(N) counts as zero for the sign rule
SIGN_TOL = 1e-6
#: Lanczos steps tried before the dense fallback (auto, N <= dense_max)
AUTO_LANCZOS_STEPS = 40
EIG_METHODS = ("auto", "dense", "krylov")


class EigenData:
    """The forward's byproducts for one instance (never differentiated).

    Attributes: ``y`` (unit, signed), ``lam``, ``lam2``, ``scale`` (largest
    ``|eigenvalue|`` seen), ``w, V`` (full ``eigh`` of the matrix solved,
    ascending; dense only), ``basis`` (the orthonormal basis the matrix was
    expressed in, SMAC: ``Z0``; else ``None``), ``krylov`` (Lanczos only: a
    :class:`KrylovData`, the other Ritz pairs and the Lanczos residual vector),
    ``symmetric`` (``M`` exactly symmetric, so the backward's products may use
    :func:`product`'s one-triangle BLAS ``dsymv`` too).
    """

    __slots__ = ("y", "lam", "lam2", "scale", "w", "V", "basis", "steps", "krylov", "symmetric")

    def __init__(self, y, lam, lam2, scale, w=None, V=None, basis=None, steps=0, krylov=None,
                 symmetric=False):
        self.y, self.lam, self.lam2, self.scale = y, float(lam), float(lam2), float(scale)
        self.w, self.V, self.basis, self.steps = w, V, basis, steps
        self.krylov = krylov
        self.symmetric = bool(symmetric)   # M exactly symmetric: products may read one triangle

    @property
    def gap(self) -> float:
        return relative_gap(self.lam, [self.lam2], self.scale)


class KrylovData:
    r"""The Lanczos relation ``A Q_k' = Q_k' T_k + beta q_{k+1} e_k'`` in Ritz form:
    for the Ritz vectors ``W = Q_k' S_r`` other than the leading one (values
    ``theta_r``), ``A W = W diag(theta_r) + beta q_{k+1} s_r'`` with
    ``s_r = S[k, r]``: the backward's deflation space and its image, with no
    product with ``A``.  ``W`` is formed on first use (by the backward; a forward
    alone never pays for it) from the basis ``Q_k`` and the Ritz coefficients."""

    __slots__ = ("_Q", "_S", "_W", "theta", "s", "q", "beta")

    def __init__(self, Q, S, theta, s, q, beta):
        self._Q, self._S, self._W = Q, S, None
        self.theta, self.s, self.q, self.beta = theta, s, q, float(beta)

    @property
    def W(self) -> np.ndarray:
        if self._W is None:
            self._W = self._Q.T @ self._S
            self._Q = self._S = None
        return self._W


def fix_sign(y: np.ndarray) -> np.ndarray:
    """Apply the sign rule of the module docstring to a unit vector ``y``."""
    s = float(y.sum())
    if abs(s) > SIGN_TOL * np.sqrt(y.size):
        return y if s > 0 else -y
    big = np.abs(y)
    first = int(np.argmax(big >= 0.5 * big.max()))
    return y if y[first] > 0 else -y


def product(M: np.ndarray, symmetric: bool):
    """``v -> M @ v``; when ``M`` is exactly ``symmetric`` (and a C-contiguous
    float64 array) BLAS ``dsymv`` on its upper triangle: the same product,
    reading half of ``M`` (about 0.55x the time of ``M @ v`` at 2500 x 2500)."""
    if symmetric and M.dtype == np.float64 and M.flags.c_contiguous and M.ndim == 2:
        from scipy.linalg.blas import dsymv
        MT = M.T                  # Fortran-ordered: no copy; its lower triangle is M's upper
        return lambda v: dsymv(1.0, MT, v, lower=1)
    return lambda v: M @ v


def _lanczos(matvec, v0, tol: float, maxiter: int, w0=None):
    """Lanczos with full reorthogonalization; see :func:`lanczos_top`.

    Returns ``(y, theta_1, theta_2, theta_min, steps, krylov)`` or ``None`` when
    ``maxiter`` steps did not reach the tolerance.  ``w0 = matvec(v0 / |v0|)``
    may be passed when the caller already has it (saves one product).
    """
    N = v0.shape[0]
    kmax = min(maxiter, N)
    Q = np.empty((kmax + 1, N))
    nv0 = np.linalg.norm(v0)
    Q[0] = v0 / nv0
    alphas = np.empty(kmax)
    betas = np.empty(kmax)
    T = np.zeros((kmax, kmax))
    # the Ritz test costs an eigh of T: every step when a product with M is dearer
    every = 1 if N >= 1000 else 2
    for k in range(kmax):
        w = np.array(w0, dtype=float) if (k == 0 and w0 is not None) else \
            np.asarray(matvec(Q[k]), dtype=float)
        alphas[k] = Q[k] @ w
        wn = float(np.linalg.norm(w))
        Qk = Q[:k + 1]
        w -= Qk.T @ (Qk @ w)
        w -= Qk.T @ (Qk @ w)     # full reorthogonalization, twice is enough
        beta = float(np.linalg.norm(w))
        T[k, k] = alphas[k]
        if (k + 1) % every and k + 1 < kmax and beta > 1e-10 * wn:
            betas[k] = beta
            T[k, k + 1] = T[k + 1, k] = beta
            Q[k + 1] = w / beta
            continue
        theta, S = np.linalg.eigh(T[:k + 1, :k + 1])   # tiny; cheaper than eigh_tridiagonal
        top = theta[-1]
        spread = max(abs(top), abs(theta[0]))
        if beta * abs(S[-1, -1]) <= tol * abs(top) or beta <= 1e-14 * spread or k + 1 == N:
            return _ritz_output(Qk, theta, S, k, beta, w, N)
        betas[k] = beta
        if k + 1 < kmax:
            T[k, k + 1] = T[k + 1, k] = beta
        Q[k + 1] = w / beta
    return None


@njit(cache=True)
def _lanczos_dense_kernel(M, q0, w0, tol, kmax, every, symmetric):  # pragma: no cover - numba
    """:func:`_lanczos` on a dense ``M``, the whole loop compiled (no per-step
    Python): the same steps, the same Ritz test.  The products are BLAS calls
    (:mod:`reference_layers.kernels.blas`): ``dsymv`` (one triangle of ``M``
    read, about half the memory traffic of ``M @ q``) when ``symmetric``
    (``M`` exactly symmetric, as the validation pass found), else ``dgemv``;
    the Ritz test's eigen-decomposition is LAPACK ``dsyev``.  ``w0 = M q0``
    (or empty to compute it).  Returns ``(Q, theta, S, k, beta, w, converged)``:
    the basis ``Q[:k + 1]``, the last Ritz test's eigen-decomposition of the
    tridiagonal ``T[:k + 1, :k + 1]`` (values ``theta`` ascending, eigenvector ``r``
    in the row ``S[r]``; empty when not converged), the last ``beta`` and the
    unnormalized residual vector ``w``."""
    N = q0.shape[0]
    Q = np.empty((kmax + 1, N))
    for i in range(N):
        Q[0, i] = q0[i]
    alphas = np.zeros(kmax)
    betas = np.zeros(kmax)
    w = np.empty(N)
    c = np.empty(kmax)
    ibuf = np.empty(4, dtype=np.int32)
    dbuf = np.empty(2)
    T = np.empty(kmax * kmax)
    theta = np.empty(kmax)
    work = np.empty(3 * kmax + 2)
    beta = 0.0
    for k in range(kmax):
        if k == 0 and w0.shape[0] == N:
            for i in range(N):
                w[i] = w0[i]
        elif symmetric:
            symv(M, Q[k], w, ibuf, dbuf)
        else:
            gemv(M, Q[k], w, 1.0, 0.0, ibuf, dbuf)
        alpha = 0.0
        wn = 0.0
        for i in range(N):
            alpha += Q[k, i] * w[i]
            wn += w[i] * w[i]
        wn = np.sqrt(wn)
        Qk = Q[:k + 1]
        ck = c[:k + 1]
        for _ in range(2):          # full reorthogonalization, twice is enough
            gemv(Qk, w, ck, 1.0, 0.0, ibuf, dbuf)       # c = Qk w
            gemv_t(Qk, ck, w, -1.0, 1.0, ibuf, dbuf)    # w -= Qk' c
        beta = 0.0
        for i in range(N):
            beta += w[i] * w[i]
        beta = np.sqrt(beta)
        alphas[k] = alpha
        if (k + 1) % every != 0 and k + 1 < kmax and beta > 1e-10 * wn:
            betas[k] = beta
            for i in range(N):
                Q[k + 1, i] = w[i] / beta
            continue
        n = k + 1
        S = T[:n * n].reshape((n, n))
        for i in range(n):
            for j in range(n):
                S[i, j] = 0.0
            S[i, i] = alphas[i]
        for i in range(k):
            S[i, i + 1] = betas[i]
            S[i + 1, i] = betas[i]
        if syev(S, theta, work[:3 * n - 1], ibuf) != 0:
            raise ValueError("LAPACK dsyev failed on the Lanczos tridiagonal matrix")
        top = theta[k]
        spread = max(abs(top), abs(theta[0]))
        if beta * abs(S[k, k]) <= tol * abs(top) or beta <= 1e-14 * spread or k + 1 == N:
            return Q, theta[:n], S, k, beta, w, True
        if k + 1 < kmax:
            betas[k] = beta
        for i in range(N):
            Q[k + 1, i] = w[i] / beta
    return Q, theta[:0], T[:0].reshape((0, 0)), kmax - 1, beta, w, False


def _lanczos_dense(M, v0, tol: float, maxiter: int, w0=None, symmetric: bool = False):
    """:func:`_lanczos` for a dense ``M`` through :func:`_lanczos_dense_kernel`
    (``symmetric``: ``M`` is exactly symmetric, its products may read one triangle)."""
    N = v0.shape[0]
    kmax = min(maxiter, N)
    nv0 = np.linalg.norm(v0)
    w0 = np.empty(0) if w0 is None else np.ascontiguousarray(w0, dtype=float)
    every = 1 if N >= 1000 else 2
    Q, theta, S, k, beta, w, ok = _lanczos_dense_kernel(
        np.ascontiguousarray(M, dtype=float), v0 / nv0, w0, float(tol), kmax, every,
        bool(symmetric))
    if not ok:
        return None
    # the kernel's last Ritz test: eigenvalues of T_k ascending, eigenvector r in row S[r]
    return _ritz_output(Q[:k + 1], theta, S.T, k, beta, w, N)


def _ritz_output(Qk, theta, S, k, beta, w, N):
    """``(y, theta_1, theta_2, theta_min, steps, krylov)`` from the converged Lanczos data
    (``S``: the eigenvectors of ``T_k`` as columns; the other Ritz vectors are signed so
    that their last coefficient ``s_r`` is ``>= 0``, whichever LAPACK routine gave ``S``)."""
    y = Qk.T @ S[:, -1]
    krylov = None
    if k:
        rest = S[:, :-1] * np.where(S[-1, :-1] < 0, -1.0, 1.0)
        krylov = KrylovData(Qk, rest, theta[:-1], rest[-1].copy(),
                            w / beta if beta > 0 else np.zeros(N), beta if beta > 0 else 0.0)
    return (y / np.linalg.norm(y), float(theta[-1]), float(theta[-2]) if k else -np.inf,
            float(theta[0]), k + 1, krylov)


def lanczos_top(matvec, v0: np.ndarray, *, tol: float = 1e-10,
                maxiter: int = 300) -> Tuple[np.ndarray, float, float]:
    r"""Largest eigenpair of a symmetric operator by Lanczos with full
    reorthogonalization, stopped as soon as the Ritz residual
    ``|M y - theta y| = beta_k |s_k|`` is at most ``tol * |theta|``.

    Returns ``(y, theta_1, theta_2)``; ``theta_2`` is the second Ritz value, a
    lower bound of ``lam_2`` (so the gap it gives is an over-estimate, and an
    exactly repeated leading eigenvalue is seen once by a single-vector Krylov
    method: only the dense path detects exact multiplicity).
    """
    out = _lanczos(matvec, np.asarray(v0, dtype=float), tol, maxiter)
    if out is None:
        raise NotConvergedError(
            f"Lanczos did not reach the relative residual {tol:g} in {maxiter} iterations on the "
            f"{v0.shape[0]} x {v0.shape[0]} matrix (tiny eigen-gap?); use "
            f"solver_options={{'eig_method': 'dense'}} or raise 'max_iter'.")
    return out[:3]


def dense_eigendata(A: np.ndarray, basis: Optional[np.ndarray] = None) -> EigenData:
    """Leading eigenpair of a symmetric dense ``A`` by ``eigh`` (full basis kept)."""
    w, V = np.linalg.eigh(A)
    y = V[:, -1].copy()
    if basis is not None:
        y = basis @ y
    lam2 = float(w[-2]) if w.size > 1 else -np.inf
    scale = float(max(abs(w[0]), abs(w[-1]))) if w.size else 0.0
    return EigenData(fix_sign(y), w[-1], lam2, scale, w=w, V=V, basis=basis)


def krylov_eigendata(matvec, N: int, *, tol: float, max_iter: int, start=None,
                     start_product=None, raise_on_fail: bool = True,
                     matrix: Optional[np.ndarray] = None,
                     symmetric: bool = False) -> Optional[EigenData]:
    """Leading eigenpair by Lanczos from ``start`` (default ``1``); with the dense
    ``matrix`` (``matvec(v) = matrix @ v``) the loop runs compiled, its products
    reading one triangle when ``symmetric`` (``matrix`` exactly symmetric)."""
    if start is None:
        v0 = np.ones(N)
    else:
        v0 = np.asarray(start, dtype=float)
        if not np.any(v0):
            v0, start_product = np.ones(N), None
    w0 = None if start_product is None else start_product / np.linalg.norm(v0)
    if matrix is not None:
        out = _lanczos_dense(matrix, v0, tol, max_iter, w0=w0, symmetric=symmetric)
    else:
        out = _lanczos(matvec, v0, tol, max_iter, w0=w0)
    if out is None:
        if raise_on_fail:
            raise NotConvergedError(
                f"Lanczos did not reach the relative residual {tol:g} in max_iter={max_iter} "
                f"iterations on the {N} x {N} matrix (tiny eigen-gap?); use "
                f"solver_options={{'eig_method': 'dense'}} or raise 'max_iter'.")
        return None
    y, lam, lam2, lam_min, steps, krylov = out
    if lam2 == -np.inf and N > 1:
        # The start vector was already an eigenvector, so Lanczos saw one
        # eigenvalue only; estimate lam_2 as the top of M deflated by y, so
        # that a repeated leading eigenvalue is caught by the gap check.
        deflate = lambda v: v - y * (y @ v)
        r = np.random.default_rng(0).standard_normal(N)
        _, lam2, _ = lanczos_top(lambda v: deflate(matvec(deflate(v))), deflate(r), tol=1e-8,
                                 maxiter=max_iter)
    scale = max(abs(lam), abs(lam_min), abs(lam2) if np.isfinite(lam2) else 0.0)
    return EigenData(fix_sign(y), lam, lam2, scale, steps=steps, krylov=krylov,
                     symmetric=symmetric)


def default_tol(tol: Optional[float], N: int) -> float:
    """Lanczos' relative Ritz-residual target: ``tol``, or by default 1e-13 up to
    ``DENSE_MAX`` unknowns (small: a few more products are cheap, and the result is as
    accurate as a dense ``eigh``) and 1e-10 above."""
    if tol is not None:
        return tol
    return 1e-13 if N <= DENSE_MAX else 1e-10


def leading_eigendata(M: np.ndarray, *, method: str = "auto", tol: Optional[float] = None,
                      max_iter: int = 300, dense_max: int = DENSE_MAX,
                      row_sums: Optional[np.ndarray] = None,
                      symmetric: bool = False) -> EigenData:
    """The forward eigensolver of SM, chosen by ``method``, size and gap (module
    docstring); ``symmetric``: ``M`` is exactly symmetric (the validation pass
    says so), so Lanczos' products may read one triangle (BLAS ``dsymv``)."""
    N = M.shape[0]
    tol = default_tol(tol, N)
    if method == "dense" or N < 4:
        return dense_eigendata(M)
    matvec = lambda v: M @ v
    if method == "krylov" or N > dense_max:
        return krylov_eigendata(matvec, N, tol=tol, max_iter=max_iter, start_product=row_sums,
                                matrix=M, symmetric=symmetric)
    data = krylov_eigendata(matvec, N, tol=tol, max_iter=min(max_iter, AUTO_LANCZOS_STEPS),
                            start_product=row_sums, raise_on_fail=False, matrix=M,
                            symmetric=symmetric)
    return data if data is not None else dense_eigendata(M)


def leading_eigenpair(M, *, method: str = "auto", tol: float = 1e-10,
                      dense_max: int = DENSE_MAX) -> Tuple[np.ndarray, float, float]:
    """Largest eigenvalue ``lam``, its unit eigenvector ``y`` (sign rule of
    :func:`fix_sign`) and the second largest eigenvalue ``lam2`` of a
    symmetric ``M`` (array, or anything with ``M @ v``).

    ``method='dense'`` uses ``numpy.linalg.eigh``; ``'krylov'`` Lanczos
    (:func:`lanczos_top`) from ``1`` (whose first product ``M 1`` is close to
    the Perron vector of a non-negative ``M``); ``'auto'`` Lanczos first and,
    up to ``dense_max`` rows, the dense ``eigh`` when Lanczos needs many steps.
    """
    if not isinstance(M, np.ndarray):
        N = M.shape[0]
        if method == "dense":
            return leading_eigenpair(M @ np.eye(N), method="dense")
        data = krylov_eigendata(lambda v: M @ v, N, tol=tol, max_iter=300)
    else:
        data = leading_eigendata(M, method=method, tol=tol, dense_max=dense_max)
    return data.y, data.lam, data.lam2


def eigen_gap(M: np.ndarray) -> float:
    """Relative gap ``(lam_1 - lam_2) / max|eigenvalue|`` of a symmetric matrix
    (or batch: the smallest over the batch); zero when the leading eigenvalue
    is repeated.  Computed densely (exact multiplicity is seen)."""
    M = np.asarray(M, dtype=float)
    finite_or_raise(M, "the affinity M")
    gaps = [dense_eigendata(Mb).gap for Mb in M.reshape((-1,) + M.shape[-2:])]
    return float(min(gaps))
