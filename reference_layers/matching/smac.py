"""Spectral matching with affine constraints (SMAC, Cour, Srinivasan and Shi 2007)."""
from __future__ import annotations

from typing import Optional, Tuple

import autograd.numpy as anp
import numpy as np
import scipy.linalg
import scipy.sparse.linalg as spla
from autograd.tracer import getval

from nimplicit import implicit_layer
from nimplicit.errors import ShapeError, finite_or_raise

from .bordered import KKT_DENSE_MAX, _linear_solver
from .eigen import EIG_DENSE_MAX, _require_gap, leading_eigenpair
from .errors import ConstraintRankError, InfeasibleConstraintsError
from .validation import _check_affinity



def one_to_one_constraints(n: int, m: int) -> Tuple[np.ndarray, np.ndarray]:
    r"""Full-rank one-to-one constraints ``C y = d`` on ``y = vec(X)`` (row-major).

    Rows of ``X`` sum to one (``sum_a X[i, a] = 1``, ``n`` rows) and columns sum
    to ``n/m`` (``sum_i X[i, a] = n/m``, which is 1 for ``n = m``; for
    ``n < m`` the averaged, "balanced" relaxation of "at most once").  The
    two families both sum to ``n``, so one column constraint (the last) is
    redundant and dropped: ``C`` is ``(n + m - 1) x nm`` with full row rank.
    """
    if n < 1 or m < 1:
        raise ShapeError(f"one_to_one_constraints needs n, m >= 1, got n={n}, m={m}")
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))[:-1]
    C = np.concatenate([rows, cols], axis=0)
    d = np.concatenate([np.ones(n), np.full(m - 1, n / m)])
    return C, d


def homogeneous_constraints(C, d, pivot: int):
    r"""``C_eq = C_{-k} - d_{-k} C_k / d_k`` (``k = pivot``): ``C_eq y = 0`` iff
    ``C y`` is a multiple of ``d``.  autograd-differentiable in ``C`` and ``d``."""
    keep = [i for i in range(anp.shape(C)[0]) if i != pivot]
    ratio = d[keep] / d[pivot]
    return C[keep] - ratio[:, None] * C[pivot][None, :]


def _check_constraints(C: np.ndarray, d: np.ndarray, N: int) -> None:
    finite_or_raise((C, d), "the constraints (C, d)")
    if C.ndim != 2 or C.shape[1] != N or d.shape != (C.shape[0],):
        raise ShapeError(f"the constraints must be C of shape (p, {N}) and d of shape (p,), got "
                         f"C {C.shape} and d {d.shape}")
    if C.shape[0] >= N:
        raise ConstraintRankError(f"{C.shape[0]} constraints on {N} unknowns leave no freedom: "
                                  f"use fewer than nm constraint rows.")
    s = np.linalg.svd(C, compute_uv=False)
    if s[-1] <= 1e-10 * s[0]:
        sol = np.linalg.lstsq(C, d, rcond=None)[0]
        miss = float(np.abs(C @ sol - d).max())
        if miss > 1e-8 * (1 + np.abs(d).max()):
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
    return (anp.dot(M, y) - lam * y - anp.dot(mu, Ceq), 0.5 * (1.0 - anp.dot(y, y)),
            -anp.dot(Ceq, y))


def _projector_ops(Ceq: np.ndarray):
    """``v -> P v`` with ``P = I - C_eq'(C_eq C_eq')^{-1} C_eq``, and the Cholesky
    factor ``G`` of ``C_eq C_eq'``."""
    G = scipy.linalg.cho_factor(Ceq @ Ceq.T)
    return lambda v: v - Ceq.T @ scipy.linalg.cho_solve(G, Ceq @ v), G


def _projector_matrix(Ceq: np.ndarray, G) -> np.ndarray:
    """The dense ``P`` of :func:`_projector_ops`."""
    return np.eye(Ceq.shape[1]) - Ceq.T @ scipy.linalg.cho_solve(G, Ceq)


def _smac_solver(eig_method: str, gap_tol: float, eig_dense_max: int, eig_tol: float):
    def solver(M, Ceq):
        M, Ceq = np.asarray(M, float), np.asarray(Ceq, float)
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
        y /= np.linalg.norm(y)
        mu = scipy.linalg.cho_solve(G, Ceq @ (M @ y)) if Ceq.shape[0] else np.zeros(0)
        return y, np.array(float(y @ M @ y)), mu
    return solver


def _smac_diagnostics(point):
    M, Ceq = (np.asarray(x, float) for x in point.inputs)
    P = _projector_matrix(Ceq, _projector_ops(Ceq)[1])
    w = np.linalg.eigvalsh(P @ M @ P)
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
    Mv = np.asarray(getval(M), float)
    _check_affinity(Mv, batched=False)
    N = Mv.shape[0]
    if C is None:
        if shape is None:
            n = int(round(np.sqrt(N)))
            if n * n != N:
                raise ShapeError(f"nm = {N} is not a square: pass shape=(n, m) or C, d")
            shape = (n, n)
        if shape[0] * shape[1] != N:
            raise ShapeError(f"shape={shape} does not match the affinity's {N} rows")
        C, d0 = one_to_one_constraints(*shape)
        d = d0 if d is None else d
    if d is None:
        d = np.ones(np.shape(getval(C))[0])
    Cv, dv = np.asarray(getval(C), float), np.asarray(getval(d), float)
    _check_constraints(Cv, dv, N)
    homogeneous = not np.any(dv)
    Ceq = C if homogeneous else homogeneous_constraints(C, d, int(np.argmax(np.abs(dv))))
    layer = implicit_layer(_smac_residual,
                           _smac_solver(eig_method, gap_tol, eig_dense_max, eig_tol),
                           linear_solver=_linear_solver("smac", linear_solver, kkt_dense_max),
                           residual_tol=residual_tol, linear_solver_options=linear_solver_options,
                           diagnostics=_smac_diagnostics, name="smac")
    y, _lam, _mu = layer(M, Ceq)
    if return_unit or homogeneous:
        return y
    t = anp.dot(d, anp.dot(C, y)) / anp.dot(d, d)
    tv = float(getval(t))
    if abs(tv) <= scale_tol * np.linalg.norm(Cv, 2):
        raise InfeasibleConstraintsError(
            f"the leading eigenvector of P M P satisfies C y ~ 0 (t = {tv:.3g}), not C y ∝ d: "
            f"the maximum of y'My/y'y over C y = d is not attained (it is approached as |y| -> "
            f"infinity). Change the constraints or the affinity.")
    return y / t

