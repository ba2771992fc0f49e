"""The forward eigensolvers of spectral matching: Lanczos and dense ``eigh``, and the gap test."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from nimplicit.errors import NotConvergedError, finite_or_raise

from .errors import DegenerateEigenvalueError

#: above this many unknowns (nm) the forward uses Lanczos instead of a dense eigh
EIG_DENSE_MAX = 100



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
    N = v0.shape[0]
    Q = np.zeros((min(maxiter, N) + 1, N))
    Q[0] = v0 / np.linalg.norm(v0)
    alphas, betas = [], []
    for k in range(min(maxiter, N)):
        w = np.asarray(matvec(Q[k]), float)
        alphas.append(float(Q[k] @ w))
        for _ in range(2):   # full reorthogonalization, twice is enough
            w -= Q[:k + 1].T @ (Q[:k + 1] @ w)
        beta = float(np.linalg.norm(w))
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, S = np.linalg.eigh(T)   # tiny; cheaper than eigh_tridiagonal's LAPACK lookup
        top = theta[-1]
        if beta * abs(S[-1, -1]) <= tol * abs(top) or beta <= 1e-14 * abs(top) or k + 1 == N:
            y = Q[:k + 1].T @ S[:, -1]
            return y / np.linalg.norm(y), float(top), float(theta[-2]) if k else -np.inf
        betas.append(beta)
        Q[k + 1] = w / beta
    raise NotConvergedError(f"Lanczos did not reach the relative residual {tol:g} in {maxiter} "
                            f"iterations on the {N} x {N} affinity (tiny eigen-gap?); use "
                            f"eig_method='dense'.")


def leading_eigenpair(M, *, method: str = "auto", tol: float = 1e-10,
                      dense_max: int = EIG_DENSE_MAX) -> Tuple[np.ndarray, float, float]:
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
        A = M if isinstance(M, np.ndarray) else M @ np.eye(N)
        w, V = np.linalg.eigh(A)
        lam, y = float(w[-1]), V[:, -1].copy()
        lam2 = float(w[-2]) if N > 1 else -np.inf
    else:
        v0 = M @ np.ones(N)
        if not np.any(v0):
            v0 = np.ones(N)
        y, lam, lam2 = lanczos_top(lambda v: M @ v, v0, tol=tol)
        if lam2 == -np.inf:
            # The start vector was already an eigenvector, so Lanczos saw one
            # eigenvalue only; estimate lam_2 as the top of M deflated by y, so
            # that a repeated leading eigenvalue is caught by the gap check.
            deflate = lambda v: v - y * (y @ v)
            r = np.random.default_rng(0).standard_normal(N)
            _, lam2, _ = lanczos_top(lambda v: deflate(M @ deflate(v)), deflate(r), tol=1e-8)
    s = y.sum()
    if s < 0 or (s == 0 and y[np.argmax(np.abs(y))] < 0):
        y = -y
    return y, lam, lam2


def eigen_gap(M: np.ndarray) -> float:
    """Relative gap ``(lam_1 - lam_2) / |lam_1|`` of a symmetric matrix (or batch:
    the smallest over the batch); zero when the leading eigenvalue is repeated."""
    M = np.asarray(M, float)
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

