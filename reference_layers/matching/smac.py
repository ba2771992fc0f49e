r"""Spectral matching with affine constraints (SMAC, Cour, Srinivasan and Shi 2007).

The relaxation ``max y'My / y'y  s.t.  C y = d``.  With a pivot row ``k``
(``argmax |d_k|``) the constraint ``C y ∝ d`` is the homogeneous
``C_eq y = 0``, ``C_eq = C_{-k} - d_{-k} C_k / d_k``; as the ratio is
scale-invariant, its maximizer is the leading eigenvector ``y`` of ``M`` on
``null(C_eq)``, rescaled so that the output satisfies the constraint exactly:

.. math::
    x = y / t, \qquad t = \frac{d^\top C y}{d^\top d}  \quad (C y = t d),

so ``C x = d``.  (With ``d = 0`` the output is the unit ``y``.)  The implicit
residual is the KKT system (eq. 44) of ``max y'My s.t. y'y = 1, C_eq y = 0``
in ``(y, lam, mu)``:

.. math::
    F = \begin{pmatrix} M y - \lambda y - C_{eq}^\top \mu \\
                        \tfrac12 (1 - y^\top y) \\ -C_{eq}\, y \end{pmatrix} = 0 .

Rank-deficient constraints
    The output depends on ``C`` only through ``null(C_eq)`` (the projector onto
    it depends only on the row space), so ``C`` need not have full row rank:
    the standard one-to-one constraints with *all* row sums and *all* column
    sums (rank ``n + m - 1``) are accepted.  The implicit node is given a
    maximal independent subset of the rows of ``C_eq`` (chosen by pivoted QR of
    the values; it spans the same row space), so its Jacobian is nonsingular.
    The multipliers of the rows of ``C`` are then not unique (any vector of
    ``null(C')`` may be added), which is why the layer does not return them.
    Derivatives with respect to ``C`` are those along perturbations that keep
    the dependency (a generic perturbation raises the rank: another problem).

Forward: an orthonormal basis ``Z0`` of ``null(C_eq)`` (QR), the dense
``eigh`` of ``Z0' M Z0`` up to ``dense_max`` unknowns (its eigenbasis is the
backward's byproduct), else Lanczos on ``P M P`` with ``P = I - Q Q'``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import autograd.numpy as anp
import numpy as np
import scipy.linalg
from autograd.builtins import tuple as autograd_tuple
from autograd.tracer import getval, isbox

from nimplicit import Solution, implicit_layer
from nimplicit.errors import NonFiniteError, ShapeError
from nimplicit.spectral import DEFAULT_GAP_TOL, require_simple_eigenvalue

from .eigen import (DENSE_MAX, EigenData, default_tol, dense_eigendata, fix_sign, product,
                    krylov_eigendata)
from .errors import ConstraintRankError, DegenerateEigenvalueError, InfeasibleConstraintsError
from .spectral import _one_triangle, _sym_matvec, backward_solver, layer_keywords
from .validation import as_real_array, check_affinity, positive_float

#: relative singular-value threshold of the constraint rank
RANK_TOL = 1e-10


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


def _check_constraints(C: np.ndarray, d: np.ndarray, N: int) -> int:
    """Shapes, finiteness, consistency; returns the rank of ``C``."""
    if C.ndim != 2 or C.shape[1] != N or d.shape != (C.shape[0],):
        raise ShapeError(f"the constraints must be C of shape (p, {N}) and d of shape (p,), got "
                         f"C {C.shape} and d {d.shape}")
    if not (np.isfinite(C).all() and np.isfinite(d).all()):
        raise NonFiniteError("the constraints (C, d) contain NaN or Inf")
    if C.shape[0] == 0:
        return 0
    s = np.linalg.svd(C, compute_uv=False)
    if s[0] == 0:
        raise ConstraintRankError("the constraint matrix C is all zero: pass C=None for the "
                                  "default one-to-one constraints, or real constraint rows.")
    rank = int((s > RANK_TOL * s[0]).sum())
    if rank < C.shape[0]:
        sol = np.linalg.lstsq(C, d, rcond=RANK_TOL)[0]
        miss = float(np.abs(C @ sol - d).max())
        size = float(np.abs(d).max() + np.abs(C).max() * np.abs(sol).sum())
        if miss > 1e-8 * size:
            raise InfeasibleConstraintsError(
                f"the constraints C y = d are inconsistent (no y satisfies them: least-squares "
                f"misfit {miss:.3g}, relative {miss / size:.3g}). Check d against C (e.g. row "
                f"and column sums of a square assignment must agree).")
    if rank >= N:
        raise ConstraintRankError(f"the constraints have rank {rank} on {N} unknowns and leave "
                                  f"no freedom: use constraints of rank below nm.")
    return rank


def independent_rows(A: np.ndarray) -> list:
    """Indices (ascending) of a maximal linearly independent subset of the rows of
    ``A``, by column-pivoted QR of ``A'`` with the relative threshold ``RANK_TOL``."""
    if A.shape[0] == 0:
        return []
    _, R, piv = scipy.linalg.qr(A.T, mode="economic", pivoting=True)
    diag = np.abs(np.diag(R))
    rank = int((diag > RANK_TOL * diag[0]).sum()) if diag.size and diag[0] > 0 else 0
    return sorted(int(i) for i in piv[:rank])


def _smac_residual(z, M, Ceq):
    """Eq. (44) with the symmetric signs: ``(M y - lam y - C_eq' mu, (1 - y'y)/2, -C_eq y)``."""
    y, lam, mu = z
    return (anp.dot(M, y) - lam * y - anp.dot(mu, Ceq), 0.5 * (1.0 - anp.dot(y, y)),
            -anp.dot(Ceq, y))


def _smac_residual_on(M_checked: np.ndarray, symmetric: bool):
    """:func:`_smac_residual`, with ``M y`` by :func:`.spectral._sym_matvec` (one
    triangle) when ``M`` is the validated, exactly ``symmetric`` float64 ``M_checked``
    (see :func:`.spectral._sm_residual_on`)."""
    if not _one_triangle(M_checked, symmetric):
        return _smac_residual

    def residual(z, M, Ceq):
        if getval(M) is not M_checked:
            return _smac_residual(z, M, Ceq)
        y, lam, mu = z
        return (_sym_matvec(M, y) - lam * y - anp.dot(mu, Ceq), 0.5 * (1.0 - anp.dot(y, y)),
                -anp.dot(Ceq, y))
    return residual


def _null_space(Ceq: np.ndarray, full: bool):
    """``(Q, R, Z0)``: ``C_eq' = Q R`` (orthonormal ``Q``) and, when ``full``, an
    orthonormal basis ``Z0`` of ``null(C_eq)`` (else ``None``)."""
    N, q = Ceq.shape[1], Ceq.shape[0]
    if q == 0:
        return np.zeros((N, 0)), np.zeros((0, 0)), (np.eye(N) if full else None)
    if full:
        Qf, Rf = scipy.linalg.qr(Ceq.T, mode="full")
        return Qf[:, :q], Rf[:q], Qf[:, q:]
    Q, R = scipy.linalg.qr(Ceq.T, mode="economic")
    return Q, R, None


def _smac_solver(opts: dict, gap_tol: float, dense_max: int, precomputed: dict):
    def solver(M, Ceq):
        N = M.shape[0]
        store = dict(precomputed)      # the validation pass's row sums, used once
        precomputed.clear()
        checked = store.get("checked") if store.get("M") is M else None
        # exactly symmetric M (the validation pass says so): products read one triangle
        Mx = product(M, checked is not None and checked.symmetric)
        dense = opts["eig_method"] == "dense" or (opts["eig_method"] == "auto" and N <= dense_max)
        Q, R, Z0 = _null_space(Ceq, dense)
        proj = lambda v: v - Q @ (Q.T @ v)
        if dense:
            H = Z0.T @ M @ Z0
            e = dense_eigendata(0.5 * (H + H.T), basis=Z0)
        else:
            v0 = proj(np.ones(N))
            rows = None if checked is None else checked.row_sums
            start_product = proj(rows) if rows is not None and np.abs(v0 - 1).max() <= 1e-12 \
                else None
            e = krylov_eigendata(lambda v: proj(Mx(proj(v))), N,
                                 tol=default_tol(opts["tol"], N),
                                 max_iter=opts["max_iter"], start=v0, start_product=start_product)
        if not e.lam > gap_tol * e.scale:
            raise DegenerateEigenvalueError(
                f"the leading eigenvalue of M on the constraint subspace is {e.lam:.3g} <= 0 "
                f"(relative to the spectral scale {e.scale:.3g}): there is no positive matching "
                f"score to maximize. Check the affinity and the constraints.")
        require_simple_eigenvalue(e.lam, [e.lam2], e.scale, gap_tol=gap_tol,
                                  what="M on the constraint subspace C y ∝ d",
                                  hint="Break the symmetry of the problem (node affinities) or "
                                       "change the constraints.")
        y = proj(e.y)
        y = fix_sign(y / np.linalg.norm(y))
        My = Mx(y)
        mu = scipy.linalg.solve_triangular(R, Q.T @ My) if Ceq.shape[0] else np.zeros(0)
        aux = [EigenData(y, e.lam, e.lam2, e.scale, w=e.w, V=e.V, basis=e.basis,
                         krylov=e.krylov, symmetric=checked is not None and checked.symmetric)]
        return Solution((y, np.array(float(y @ My)), mu), aux=aux)
    return solver


def _smac_diagnostics(point):
    M, Ceq = (np.asarray(x, dtype=float) for x in point.inputs)
    _, _, Z0 = _null_space(Ceq, True)
    e = dense_eigendata(Z0.T @ M @ Z0)
    return {"eigen_gap": (float(e.gap), e.gap > 1e-6, "relative gap (lam1 - lam2)/max|lam| of "
                                                     "M on the constraint subspace")}


def _default_constraints(N: int, shape, C, d):
    if shape is None:
        n = int(round(np.sqrt(N)))
        if n * n != N:
            raise ShapeError(f"nm = {N} is not a square: pass shape=(n, m) or C, d")
        shape = (n, n)
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(k, (int, np.integer)) and k >= 1 for k in shape)
            or shape[0] * shape[1] != N):
        raise ShapeError(f"shape must be (n, m) with n m = {N} (the affinity's rows), got {shape!r}")
    C, d0 = one_to_one_constraints(*shape)
    return C, (d0 if d is None else d)


def smac_layer(M, C=None, d=None, *, shape: Optional[Tuple[int, int]] = None,
               full_output: bool = False, return_unit: bool = False,
               backward: Optional[str] = None, linear_solver=None,
               linear_solver_options: Optional[dict] = None,
               solver_options: Optional[dict] = None, dense_max: int = DENSE_MAX,
               gap_tol: float = DEFAULT_GAP_TOL, scale_tol: float = 1e-8,
               residual_tol: float = 1e-6, eig_method: Optional[str] = None,
               eig_tol: Optional[float] = None, eig_dense_max: Optional[int] = None,
               kkt_dense_max: Optional[int] = None):
    r"""Spectral matching with affine constraints (SMAC).

    Solves ``max_y y'My / y'y  s.t.  C y = d`` (see the module docstring):
    the leading eigenvector ``y`` of ``M`` on ``C_eq y = 0``, rescaled to
    ``x = y / t`` with ``t = d'Cy / d'd`` so that ``C x = d``.

    Parameters
    ----------
    M : array, shape (nm, nm)
        Real, symmetric, non-negative affinity.
    C, d : arrays, shapes (p, nm) and (p,), optional
        Consistent constraints of rank below ``nm``; linearly dependent rows
        are allowed (module docstring).  Default: :func:`one_to_one_constraints`
        for ``shape=(n, m)`` (default ``n = m = sqrt(nm)``).  ``d`` defaults
        to ones.
    full_output : bool
        Return ``(x, lam)`` (an autograd tuple), ``lam = y'My`` the maximal
        ratio, instead of ``x``.  The multipliers are not returned: with
        dependent rows of ``C`` they are not unique.
    return_unit : bool
        Output the unit eigenvector ``y`` instead of the rescaled ``x`` (a
        different normalization of the same output, not an extra output).
        Sign rule: ``sum(y) > 0``, or, when ``sum(y)`` is zero to within
        ``1e-6 sqrt(nm)`` (e.g. ``d = 0`` with a sum constraint), the first entry
        with ``|y_i| >= max|y| / 2`` is positive (deterministic, not decided by
        rounding).  ``x`` does not depend on the sign.
    backward, linear_solver, linear_solver_options, solver_options, dense_max, gap_tol
        As in :func:`~reference_layers.matching.spectral.spectral_matching_layer`.
    scale_tol : float
        ``|t| <= scale_tol |C|_2`` raises :class:`InfeasibleConstraintsError`.
    eig_method, eig_tol, eig_dense_max, kkt_dense_max
        Deprecated aliases (``solver_options`` and ``dense_max``).

    Returns
    -------
    x : array, shape (nm,)
        ``x = y / t`` with ``C x = d`` (or ``y`` for ``d = 0`` or ``return_unit``).

    Raises
    ------
    InfeasibleConstraintsError
        ``C y = d`` is inconsistent, or the eigenvector has ``C y = 0``
        (``|t|`` below ``scale_tol``): the ratio's supremum on ``C y = d`` is
        approached only at infinity and no maximizer exists.
    ConstraintRankError, DegenerateEigenvalueError, AffinityError, UnknownOptionError,
    InvalidOptionError
    """
    layer_name = "smac_layer"
    kw = layer_keywords(layer_name, solver_options=solver_options, dense_max=dense_max,
                        gap_tol=gap_tol, residual_tol=residual_tol, backward=backward,
                        linear_solver=linear_solver, eig_method=eig_method, eig_tol=eig_tol,
                        eig_dense_max=eig_dense_max, kkt_dense_max=kkt_dense_max)
    scale_tol = positive_float("scale_tol", scale_tol)

    Mv = as_real_array(getval(M), "the affinity M")
    if Mv is not getval(M) and not isbox(M):
        M = Mv
    store = {"M": Mv, "checked": check_affinity(Mv, batched=False)[0]}
    N = Mv.shape[0]
    if C is None:
        C, d = _default_constraints(N, shape, C, d)
    if d is None:
        d = np.ones(np.shape(getval(C))[0] if np.ndim(getval(C)) == 2 else 0)
    Cv, dv = as_real_array(getval(C), "the constraints C"), as_real_array(getval(d),
                                                                         "the constraints d")
    _check_constraints(Cv, dv, N)
    homogeneous = not np.any(dv)
    if homogeneous:
        Ceq, Ceq_v = C, Cv
    else:
        pivot = int(np.argmax(np.abs(dv)))
        Ceq = homogeneous_constraints(C, d, pivot)
        Ceq_v = homogeneous_constraints(Cv, dv, pivot)
    rows = independent_rows(Ceq_v)
    if len(rows) < Ceq_v.shape[0]:
        Ceq = Ceq[rows] if isbox(Ceq) else np.asarray(Ceq)[rows]
    solve, linear_solver_options = backward_solver(kw, "smac", linear_solver,
                                                   linear_solver_options)
    residual = _smac_residual_on(Mv, store["checked"].symmetric)
    layer = implicit_layer(residual, _smac_solver(kw.opts, kw.gap_tol, kw.dense_max, store),
                           linear_solver=solve, residual_tol=kw.residual_tol,
                           linear_solver_options=linear_solver_options,
                           diagnostics=_smac_diagnostics, name="smac",
                           finite_inputs=(0,))   # M: check_affinity counted NaN/Inf
    y, lam, _mu = layer(M, Ceq)
    if return_unit or homogeneous:
        x = y
    else:
        t = anp.dot(d, anp.dot(C, y)) / anp.dot(d, d)
        tv = float(getval(t))
        if abs(tv) <= scale_tol * np.linalg.norm(Cv, 2):
            raise InfeasibleConstraintsError(
                f"the leading eigenvector on C y ∝ d satisfies C y ~ 0 (t = {tv:.3g}), not "
                f"C y ∝ d: the maximum of y'My/y'y over C y = d is not attained (it is "
                f"approached as |y| -> infinity). Change the constraints or the affinity.")
        x = y / t
    if full_output:
        return autograd_tuple((x, lam)) if isbox(x) or isbox(lam) else (x, lam)
    return x


__all__ = ["smac_layer", "one_to_one_constraints", "homogeneous_constraints", "independent_rows"]
