r"""Batched primal-dual interior point solver for convex QPs (numba, float64).

Problem (one instance ``k`` of a batch)::

    minimize    1/2 y' Q y + q' y
    subject to  A y  = b            (p equality rows, multiplier ``lam``)
                G y <= h            (m inequality rows, multiplier ``nu >= 0``)

With the slack ``s = h - G y >= 0`` the KKT conditions are::

    r_stat = Q y + q + A' lam + G' nu = 0
    r_eq   = A y - b                  = 0
    r_ineq = G y + s - h              = 0
    r_comp = nu * s                   = 0,      nu >= 0, s >= 0.

``Q`` is replaced by its symmetric part ``(Q + Q') / 2`` everywhere (the objective
only sees that part).

Algorithm
---------
Mehrotra predictor-corrector primal-dual interior point method with an
infeasible start (CVXOPT-style initial point), one step length for primal and
dual variables (``0.99`` of the distance to the boundary).  Each Newton system

.. math::

    \begin{bmatrix} Q & A^T & G^T & 0 \\ A & 0 & 0 & 0 \\ G & 0 & 0 & I \\
                    0 & 0 & \operatorname{diag}(s) & \operatorname{diag}(\nu)
    \end{bmatrix}
    \begin{bmatrix} \Delta y \\ \Delta\lambda \\ \Delta\nu \\ \Delta s \end{bmatrix}
    = \begin{bmatrix} R_1 \\ R_2 \\ R_3 \\ R_4 \end{bmatrix}

(``R = -(r_stat, r_eq, r_ineq, r_c)``) is reduced by block elimination of
``ds`` and ``dnu`` with ``D = diag(nu / s)``::

    [K  A'] [dy  ]   [R1 + G'(D R3 - R4 / s) + rho A' R2]
    [A  0 ] [dlam] = [R2                                 ],
    dnu = D (G dy - R3) + R4 / s,      ds = (R4 - s dnu) / nu

with ``K = Q + G' D G + rho A'A``.  The term ``rho A'A`` (augmented Lagrangian
trick, exact because ``A dy = R2``; ``rho = max(1, max diag Q) / max ||a_j||^2``)
makes ``K`` positive definite whenever the KKT matrix is nonsingular, so a
positive *semi*\ definite ``Q`` (``Q = 0``: linear programs) needs no large
regularisation.  ``K + delta I`` is factored by a hand-written Cholesky
(``delta = reg (1 + max diag(Q + rho A'A))``, ``reg = 1e-13``, grown 100-fold
on a non-positive pivot) and the equality block by the Schur complement
``A K^{-1} A' = W'W`` (``W = L^{-1} A'``), also by Cholesky.  Once the
spread ``max D / min D`` exceeds ``1e4`` (and always for ``m = 0``) every solve
is followed by one step of iterative refinement on the *unreduced* system above:
its residual involves no large ``D`` entries, so refinement removes both
``delta`` and most of the accuracy lost to the ill-conditioning of ``K`` near
the solution.  Per iteration: one factorisation (``O(m n^2/2 + n^3/6 + p n^2
+ p^3/6)``) and four ``O(n^2 + m n)`` triangular/elimination solves.  After
the tolerance is met, one more (polishing) Newton step is taken and kept if it
lowers the residual.  If the residual stagnates below ``stall_res`` the best
iterate is returned with ``MAX_ITER`` (accuracy floor of the problem above
``tol``).

The batch is processed by one compiled call per thread (the kernel loops over
its instances and releases the GIL; the batch is split into contiguous chunks
over the available CPUs, ``num_threads=1`` gives a single call).  Instances never interact: each has its own
status, and workspace is reused between the instances of a thread.

Before iterating, each instance is checked for: non-finite data
(``NUMERICAL_ERROR``), ``Q`` not positive semidefinite (Cholesky of
``Q + psd_tol * max|Q_ij| * I``, ``NONCONVEX``), rank of ``A`` (modified
Gram-Schmidt with re-orthogonalisation on the rows of ``[A | b]``; a dependent
row with an inconsistent right hand side, or any dependent row unless
``allow_redundant_equalities``, gives ``RANK_DEFICIENT_EQUALITY``).

Infeasibility detection uses approximate Farkas certificates, checked at
every iteration:

* primal infeasible: the dual iterate ``(lam, nu >= 0)`` satisfies
  ``R ||A'lam + G'nu||_inf < -(b'lam + h'nu)``.  For any feasible ``y``,
  ``b'lam + h'nu >= y'(A'lam + G'nu) >= -||y||_1 ||A'lam + G'nu||_inf``, so this
  proves that no feasible point with ``||y||_1 <= R`` exists.
* dual infeasible (unbounded): the predictor or corrector direction ``d``
  satisfies ``R max(||Qd||_inf, ||Ad||_inf, ||max(Gd, 0)||_inf) < -q'd ||d||_inf``,
  which proves that no dual feasible point with ``||(y, lam, nu)||_1 <= R``
  exists (the objective decreases without bound along ``d``).  This also
  catches a ``Q`` that passed the PSD test but is slightly indefinite along a
  free direction.

``R = cert_radius = 1e8`` by default: a problem whose every feasible point (or
dual solution) is larger than ``R`` could be misclassified, so rescale such
problems.  For infeasible/unbounded instances the last iterate is returned
(for primal infeasibility ``(lam, nu)`` is then a scaled certificate).

KKT residual
------------
``kkt_residual`` (reported per instance, and compared with ``tol``) is the max of::

    ||Q y + q + A'lam + G'nu||_inf / (1 + max(||q||, ||Q y||, ||A'lam||, ||G'nu||)_inf)
    ||A y - b||_inf                / (1 + max(||b||_inf, ||A y||_inf))
    ||G y + s - h||_inf            / (1 + max(||h||_inf, ||G y||_inf))
    max_i |nu_i s_i|               / (1 + |1/2 y'Q y + q'y|)

(with the symmetric part of ``Q`` and the full ``A``, ``b`` even when redundant
rows were dropped; terms for empty blocks are omitted).

Jacobian solves for the backward pass
-------------------------------------
:func:`kkt_jacobian_factor`, :func:`kkt_jacobian_solve_factored` and
:func:`kkt_jacobian_solve` solve systems with the Jacobian of
``F(y, lam, nu) = [Q y + q + A'lam + G'nu; A y - b; diag(nu)(G y - h)]``,
``J = [[Q, A', G'], [A, 0, 0], [diag(nu) G, 0, -diag(s)]]``, at a point given
by ``s = h - G y`` and ``nu`` (e.g. ``QPResult.s``, ``QPResult.nu``).  Factor
once (``O((m + p) n^2 + n^3)``), then solve ``J z = r`` or ``J' z = r`` for any
number of right-hand sides (``O(n^2 + (m + p) n)`` each).  Valid under strict
complementarity (``max(s_i, nu_i) > 0``), LICQ of the active rows and a
second-order condition; violations are reported per instance by a
:class:`KKTJacobianFlag` instead of returning garbage.  See
:func:`kkt_jacobian_factor` for the method.

Usage::

    res = solve_qp_batch(Q, q, G, h, A, b)
    fac = kkt_jacobian_factor(Q, G, A, res.s, res.nu)
    z = kkt_jacobian_solve_factored(fac, rhs, transpose=True)   # rhs (B,[K,]n+p+m)
"""

from __future__ import annotations

import enum
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional, Tuple

import numpy as np
import numba
from numba import njit
from . import kernel_f64

__all__ = [
    "QPStatus",
    "QP_STATUS_MESSAGES",
    "QPResult",
    "solve_qp_batch",
    "KKTJacobianFlag",
    "KKT_JACOBIAN_FLAG_MESSAGES",
    "KKTJacobianFactors",
    "KKTSolveResult",
    "kkt_jacobian_factor",
    "kkt_jacobian_solve_factored",
    "kkt_jacobian_solve",
    "KERNEL_GROUPS",
    "compile_kernels",
]


# --------------------------------------------------------------------------- #
# Status codes
# --------------------------------------------------------------------------- #
class QPStatus(enum.IntEnum):
    """Per-instance termination status of :func:`solve_qp_batch`."""

    SOLVED = 0
    PRIMAL_INFEASIBLE = 1
    DUAL_INFEASIBLE = 2
    NONCONVEX = 3
    RANK_DEFICIENT_EQUALITY = 4
    MAX_ITER = 5
    NUMERICAL_ERROR = 6


QP_STATUS_MESSAGES: dict[QPStatus, str] = {
    QPStatus.SOLVED: (
        "Solved: the KKT residual is below the requested tolerance."
    ),
    QPStatus.PRIMAL_INFEASIBLE: (
        "Primal infeasible: the constraints A y = b, G y <= h have no common "
        "solution (a Farkas certificate lam, nu >= 0 with A'lam + G'nu ~ 0 and "
        "b'lam + h'nu < 0 was found). Check h and b (e.g. contradictory bounds) "
        "or relax the constraints."
    ),
    QPStatus.DUAL_INFEASIBLE: (
        "Dual infeasible (unbounded): there is a direction d with Q d ~ 0, "
        "A d ~ 0, G d <= 0 and q'd < 0 along which the objective decreases "
        "without bound. Add constraints/bounds or make Q positive definite on "
        "the free directions."
    ),
    QPStatus.NONCONVEX: (
        "Nonconvex: the symmetric part of Q is not positive semidefinite "
        "(Cholesky of Q + psd_tol*max|Q|*I failed). Parameterise Q as L L' + "
        "eps*I or project it onto the PSD cone."
    ),
    QPStatus.RANK_DEFICIENT_EQUALITY: (
        "Rank-deficient equality constraints: A does not have full row rank. "
        "If b is inconsistent with the dependent rows the problem is "
        "infeasible (y, lam, nu are NaN); otherwise the redundant rows were "
        "dropped, y/lam/nu hold the solution of the reduced problem (lam = 0 "
        "on dropped rows, multipliers not unique). Remove dependent rows of A "
        "or pass allow_redundant_equalities=True."
    ),
    QPStatus.MAX_ITER: (
        "Not converged: max_iter Newton steps were taken, or the KKT residual "
        "stalled (below stall_res, no longer decreasing: the accuracy floor of "
        "this badly conditioned problem is above tol), before the KKT residual "
        "fell below tol. The best iterate seen is returned; check kkt_residual. "
        "Increase max_iter, loosen tol or rescale the problem."
    ),
    QPStatus.NUMERICAL_ERROR: (
        "Numerical error: non-finite input data, or the Newton system could "
        "not be factored even with regularisation (badly scaled or degenerate "
        "problem). Check the data for NaN/inf and rescale the problem."
    ),
}


class QPResult(NamedTuple):
    """Result of :func:`solve_qp_batch` (all arrays have leading batch dim B).

    Attributes
    ----------
    y : (B, n) primal solution.
    lam : (B, p) equality multipliers.
    nu : (B, m) inequality multipliers, ``nu >= 0``.
    s : (B, m) slack ``s = h - G y`` (the interior point slack iterate, ``s > 0``;
        ``|h - G y - s|`` is bounded through the KKT residual).  Pass it to
        :func:`kkt_jacobian_factor`.
    status : (B,) int64 codes, see :class:`QPStatus`.
    iterations : (B,) int64 number of Newton steps taken.
    kkt_residual : (B,) float64 relative KKT residual (module docstring).
    """

    y: np.ndarray
    lam: np.ndarray
    nu: np.ndarray
    s: np.ndarray
    status: np.ndarray
    iterations: np.ndarray
    kkt_residual: np.ndarray


# integer constants visible to numba
_SOLVED = 0
_PRIMAL_INFEASIBLE = 1
_DUAL_INFEASIBLE = 2
_NONCONVEX = 3
_RANK_DEFICIENT = 4
_MAX_ITER = 5
_NUMERICAL_ERROR = 6

# Compiled on first use (cache=True: stored next to this file).  "reassoc" and
# "contract" allow SIMD reductions/FMA but keep NaN/inf semantics; with
# error_model="numpy" a division by zero gives inf/nan instead of raising.
_JIT = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"},
            error_model="numpy", no_cfunc_wrapper=True)
# No kernel is used as a C callback (no_cfunc_wrapper), and the helpers (_HELPER) are
# only called from other kernels, never from Python (no_cpython_wrapper): numba would
# otherwise lower, optimise and emit a boxing wrapper for each of them (about a tenth of
# the cold compile of the solve group; the machine code of the kernels is unchanged).
_HELPER = dict(_JIT, no_cpython_wrapper=True)


# --------------------------------------------------------------------------- #
# Small dense linear algebra kernels
# --------------------------------------------------------------------------- #
@njit(**_HELPER)
def _dot(x, y, n):
    acc = 0.0
    for i in range(n):
        acc += x[i] * y[i]
    return acc


@njit(**_HELPER)
def _norm_inf(x, n):
    acc = 0.0
    for i in range(n):
        v = abs(x[i])
        if v > acc or v != v:
            acc = v
    return acc


@njit(**_HELPER)
def _cholesky(K, L, n, shift, piv_min, rel_min):
    """Row-wise Cholesky ``L L' = K + shift*I`` reading the lower triangle of K.

    Returns False when a pivot (before the square root) is not >
    ``piv_min + rel_min * (K[i, i] + shift)`` (``rel_min`` alone: a test invariant
    to a symmetric diagonal scaling ``D K D``).  Only the lower triangle of ``L``
    is written.
    """
    for i in range(n):
        Li = L[i]
        for j in range(i):
            Lj = L[j]
            acc = K[i, j]
            for k in range(j):
                acc -= Li[k] * Lj[k]
            Li[j] = acc / Lj[j]
        acc = K[i, i] + shift
        floor = piv_min + rel_min * acc
        for k in range(i):
            acc -= Li[k] * Li[k]
        if not (acc > floor):
            return False
        Li[i] = np.sqrt(acc)
    return True


@njit(**_HELPER)
def _lsolve(L, x, n):
    """x <- L^{-1} x (L lower triangular)."""
    for i in range(n):
        Li = L[i]
        acc = x[i]
        for k in range(i):
            acc -= Li[k] * x[k]
        x[i] = acc / Li[i]


@njit(**_HELPER)
def _ltsolve(L, x, n):
    """x <- L^{-T} x (L lower triangular)."""
    for i in range(n - 1, -1, -1):
        Li = L[i]
        xi = x[i] / Li[i]
        x[i] = xi
        for k in range(i):
            x[k] -= Li[k] * xi


@njit(**_HELPER)
def _schur_solve(L, Ls, Wt, f, g, n, pc):
    r"""The block elimination shared by the Newton step and the KKT-Jacobian
    solve, in place: with ``K = L L^T``, the rows ``Wt`` (``W = L^{-1} C^T``) and
    the factor ``Ls`` of the Schur complement,
    ``f <- L^{-1} f``, ``g <- (Ls Ls^T)^{-1} (W^T f - g)``, ``f <- L^{-T} (f - W g)``."""
    _lsolve(L, f, n)
    for j in range(pc):
        g[j] = _dot(Wt[j], f, n) - g[j]
    if pc > 0:
        _lsolve(Ls, g, pc)
        _ltsolve(Ls, g, pc)
    for j in range(pc):
        c = g[j]
        if c != 0.0:
            Wj = Wt[j]
            for i in range(n):
                f[i] -= c * Wj[i]
    _ltsolve(L, f, n)


@njit(**_HELPER)
def _symv(K, x, out, n):
    """out <- K x for a full symmetric K."""
    for i in range(n):
        out[i] = _dot(K[i], x, n)


@njit(**_HELPER)
def _gemtv_add(M, x, out, r, c, alpha):
    """out <- out + alpha * M' x, M (r, c)."""
    for i in range(r):
        xi = alpha * x[i]
        if xi != 0.0:
            Mi = M[i]
            for j in range(c):
                out[j] += xi * Mi[j]


@njit(**_HELPER)
def _add_gtdg_lower(K, G, d, m, n):
    """K (lower triangle) += G' diag(d) G."""
    for i in range(m):
        di = d[i]
        if di == 0.0:
            continue
        Gi = G[i]
        for j in range(n):
            gij = di * Gi[j]
            if gij != 0.0:
                Kj = K[j]
                for k in range(j + 1):
                    Kj[k] += gij * Gi[k]


@njit(**_HELPER)
def _chol_retry(K, L, n, delta, base):
    """Cholesky of K + shift I with shift = delta, growing the shift 100x (and
    to at least 1e-14 (1 + max(base, max diag K))) up to 6 times on a
    non-positive pivot.  Returns the shift used, or -1.0 on failure.
    """
    md = base
    for i in range(n):
        md = max(md, K[i, i])
    shift = delta
    for _ in range(7):
        if _cholesky(K, L, n, shift, 0.0, 0.0):
            return shift
        shift = max(shift * 100.0, 1e-14 * (1.0 + md))
    return -1.0


# --------------------------------------------------------------------------- #
# Newton system: factorisation and solves
# --------------------------------------------------------------------------- #
@njit(**_HELPER)
def _factor_newton(Kb, G, A, D, K, L, Wt, S, Ls, n, p, m, delta, base):
    """K = Kb + G' diag(D) G (lower triangles), L L' = K + shift I,
    Wt = (L^{-1} A')' (row j: L^{-1} a_j), Ls Ls' = Wt Wt' = A K^{-1} A'.
    Returns False on failure."""
    for i in range(n):
        Ki = K[i]
        Kbi = Kb[i]
        for j in range(i + 1):
            Ki[j] = Kbi[j]
    _add_gtdg_lower(K, G, D, m, n)
    if _chol_retry(K, L, n, delta, base) < 0.0:
        return False
    if p > 0:
        for j in range(p):
            for k in range(n):
                Wt[j, k] = A[j, k]
            _lsolve(L, Wt[j], n)
        md = 0.0
        for i in range(p):
            for j in range(i + 1):
                S[i, j] = _dot(Wt[i], Wt[j], n)
            md = max(md, S[i, i])
        if _chol_retry(S, Ls, p, 0.0, md) < 0.0:
            return False
    return True


@njit(**_HELPER)
def _newton(Q, A, G, L, Wt, Ls, n, p, m, rho, s, nu, D, R1, R2, R3, R4,
            dy, dl, dnu, ds, W, nref):
    """Solve the linearised KKT system for (dy, dl, dnu, ds)::

        Q dy + A'dl + G'dnu = R1
        A dy                = R2
        G dy + ds           = R3
        nu * ds + s * dnu   = R4

    by block elimination: with ``K = Q + G'DG + rho A'A = L L'`` (factored by
    :func:`_factor_newton`, ``Wt``, ``Ls``)::

        [K  A'] [dy]   [r1 = R1 + G'(D R3 - R4 / s) + rho A' R2]
        [A  0 ] [dl] = [R2                                    ]
        dl = (W'W)^{-1} (W' L^{-1} r1 - R2),   dy = L^{-T} (L^{-1} r1 - W dl)

    then ``dnu, ds`` row by row (from the complementarity row when
    ``s_i < nu_i``, else from the slack row), followed by ``nref`` steps of
    iterative refinement on the *unreduced* system above (its residual has no
    large ``D`` entries, so refinement recovers the accuracy the
    ill-conditioned ``K`` loses near the solution and removes the static
    regularisation).  W is an (11, max(n, m, p)) scratch array.
    """
    r1 = W[0, :n]
    t_m = W[2, :m]
    E1 = W[3, :n]
    E2 = W[4, :p]
    E3 = W[5, :m]
    E4 = W[6, :m]
    cy = W[7, :n]
    cl = W[8, :p]
    cn = W[9, :m]
    cs = W[10, :m]
    for sweep in range(nref + 1):
        if sweep == 0:
            F1, F2, F3, F4 = R1, R2, R3, R4
            xy, xl, xn, xs = dy, dl, dnu, ds
        else:
            # residual of the unreduced system at the current (dy, dl, dnu, ds)
            _symv(Q, dy, E1, n)
            for i in range(n):
                E1[i] = R1[i] - E1[i]
            _gemtv_add(A, dl, E1, p, n, -1.0)
            _gemtv_add(G, dnu, E1, m, n, -1.0)
            for j in range(p):
                E2[j] = R2[j] - _dot(A[j], dy, n)
            for i in range(m):
                E3[i] = R3[i] - _dot(G[i], dy, n) - ds[i]
                E4[i] = R4[i] - nu[i] * ds[i] - s[i] * dnu[i]
            F1, F2, F3, F4 = E1, E2, E3, E4
            xy, xl, xn, xs = cy, cl, cn, cs
        # ---- r1 = F1 + G'(D F3 - F4 / s) + rho A' F2
        for i in range(n):
            r1[i] = F1[i]
        for i in range(m):
            t_m[i] = D[i] * F3[i] - F4[i] / s[i]
        _gemtv_add(G, t_m, r1, m, n, 1.0)
        _gemtv_add(A, F2, r1, p, n, rho)
        # ---- Schur complement solve of the reduced system
        for j in range(p):
            xl[j] = F2[j]
        _schur_solve(L, Ls, Wt, r1, xl, n, p)
        for i in range(n):
            xy[i] = r1[i]
        # ---- dnu, ds
        for i in range(m):
            gdy = _dot(G[i], xy, n)
            if s[i] < nu[i]:
                # nearly active: D large, ds from the complementarity row
                xn[i] = D[i] * (gdy - F3[i]) + F4[i] / s[i]
                xs[i] = (F4[i] - s[i] * xn[i]) / nu[i]
            else:
                xs[i] = F3[i] - gdy
                xn[i] = (F4[i] - nu[i] * xs[i]) / s[i]
        if sweep > 0:
            for i in range(n):
                dy[i] += cy[i]
            for j in range(p):
                dl[j] += cl[j]
            for i in range(m):
                dnu[i] += cn[i]
                ds[i] += cs[i]


@njit(**_HELPER)
def _min_val(x, m):
    v = np.inf
    for i in range(m):
        if x[i] < v:
            v = x[i]
    return v


@njit(**_HELPER)
def _max_step(x, dx, m):
    a = np.inf
    for i in range(m):
        if dx[i] < 0.0:
            t = -x[i] / dx[i]
            if t < a:
                a = t
    return a


# --------------------------------------------------------------------------- #
# Residuals and certificates
# --------------------------------------------------------------------------- #
@njit(**_HELPER)
def _residuals(Q, q, G, h, A, b, y, lam, nu, s, n, p, m, rd, rpe, rpi, t_n, t_n2):
    """Compute rd, rpe, rpi and return the relative KKT residual."""
    # stationarity
    _symv(Q, y, t_n, n)
    qy = _norm_inf(t_n, n)
    for i in range(n):
        rd[i] = t_n[i] + q[i]
    for i in range(n):
        t_n2[i] = 0.0
    _gemtv_add(A, lam, t_n2, p, n, 1.0)
    alam = _norm_inf(t_n2, n)
    for i in range(n):
        rd[i] += t_n2[i]
        t_n2[i] = 0.0
    _gemtv_add(G, nu, t_n2, m, n, 1.0)
    gnu = _norm_inf(t_n2, n)
    for i in range(n):
        rd[i] += t_n2[i]
    sd = 1.0 + max(max(_norm_inf(q, n), qy), max(alam, gnu))
    res = _norm_inf(rd, n) / sd
    # equality
    if p > 0:
        ay = 0.0
        re = 0.0
        for j in range(p):
            v = _dot(A[j], y, n)
            ay = max(ay, abs(v))
            rpe[j] = v - b[j]
            re = max(re, abs(rpe[j]))
        res = max(res, re / (1.0 + max(_norm_inf(b, p), ay)))
    if m > 0:
        gy = 0.0
        ri = 0.0
        rcm = 0.0
        for i in range(m):
            v = _dot(G[i], y, n)
            gy = max(gy, abs(v))
            rpi[i] = v + s[i] - h[i]
            ri = max(ri, abs(rpi[i]))
            rcm = max(rcm, abs(nu[i] * s[i]))
        res = max(res, ri / (1.0 + max(_norm_inf(h, m), gy)))
        fval = 0.5 * _dot(y, t_n, n) + _dot(q, y, n)
        res = max(res, rcm / (1.0 + abs(fval)))
    if res != res:
        return np.inf
    return res


@njit(**_HELPER)
def _primal_infeasible(G, h, A, b, lam, nu, n, p, m, radius, t_n):
    """Farkas test on the dual iterate (lam, nu >= 0):
    ``radius * ||A'lam + G'nu||_inf < -(b'lam + h'nu)`` proves that no feasible
    point with ``||y||_1 <= radius`` exists."""
    ctb = _dot(b, lam, p) + _dot(h, nu, m)
    if not (ctb < 0.0):
        return False
    for i in range(n):
        t_n[i] = 0.0
    _gemtv_add(A, lam, t_n, p, n, 1.0)
    _gemtv_add(G, nu, t_n, m, n, 1.0)
    return radius * _norm_inf(t_n, n) < -ctb


@njit(**_HELPER)
def _dual_infeasible(Q, q, G, A, d, n, p, m, radius, t_n):
    """Unboundedness test on a direction d:
    ``radius * max(||Qd||, ||Ad||, ||max(Gd, 0)||)_inf < -q'd`` proves that no
    dual feasible point with ``||(y, lam, nu)||_1 <= radius`` exists."""
    dn = _norm_inf(d, n)
    if not (dn > 0.0) or dn == np.inf:
        return False
    qd = _dot(q, d, n) / dn
    if not (qd < 0.0):
        return False
    _symv(Q, d, t_n, n)
    viol = _norm_inf(t_n, n)
    for j in range(p):
        viol = max(viol, abs(_dot(A[j], d, n)))
    for i in range(m):
        viol = max(viol, _dot(G[i], d, n))
    return radius * viol / dn < -qd


# --------------------------------------------------------------------------- #
# Preprocessing helpers
# --------------------------------------------------------------------------- #
@njit(**_HELPER)
def _finite2(x):
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            if not np.isfinite(x[i, j]):
                return False
    return True


@njit(**_HELPER)
def _finite1(x):
    for i in range(x.shape[0]):
        if not np.isfinite(x[i]):
            return False
    return True


@njit(**_HELPER)
def _equality_rows(A, b, rank_tol, cons_tol, keep, U, ub, v):
    """Modified Gram-Schmidt (twice) on the rows of [A | b].

    keep[j] = True for a maximal set of independent rows (in order).
    Returns 0 (full row rank), 1 (dependent but consistent rows) or
    2 (dependent rows with inconsistent b).  U (p, n), ub (p,), v (n,) scratch.
    """
    p, n = A.shape
    k = 0
    code = 0
    bs = 1.0 + _norm_inf(b, p)
    for i in range(p):
        for j in range(n):
            v[j] = A[i, j]
        vb = b[i]
        rn = np.sqrt(_dot(v, v, n))
        for _ in range(2):
            for j in range(k):
                c = _dot(U[j], v, n)
                for t in range(n):
                    v[t] -= c * U[j, t]
                vb -= c * ub[j]
        nv = np.sqrt(_dot(v, v, n))
        if nv > rank_tol * rn and nv > 0.0:
            for t in range(n):
                U[k, t] = v[t] / nv
            ub[k] = vb / nv
            k += 1
            keep[i] = True
        else:
            keep[i] = False
            if abs(vb) > cons_tol * bs:
                code = 2
            elif code == 0:
                code = 1
    return code


# --------------------------------------------------------------------------- #
# The batch kernel
# --------------------------------------------------------------------------- #
@njit(**_JIT)
def _qp_kernel(Q, q, G, h, A, b, Y, LAM, NU, SL, STATUS, ITERS, RES, k0, k1, warm,
               max_iter, tol, reg, psd_tol, rank_tol, cons_tol, cert_radius,
               warm_margin, allow_redundant, nref, stall_iters, stall_res, polish):
    """Solve instances k0 <= k < k1 (all inputs C-contiguous float64).

    Per instance: finiteness check, symmetrisation and PSD check of Q, rank
    check of A, then the Mehrotra predictor-corrector iteration on the
    independent rows of A.  Results go to Y, LAM, NU, SL (in/out: warm start),
    STATUS, ITERS, RES.
    """
    n = q.shape[1]
    m = h.shape[1]
    p = b.shape[1]
    nmax = max(n, max(m, p))
    # ---- workspace shared by the instances of this range
    Qs = np.empty((n, n))
    Kb = np.empty((n, n))
    K = np.empty((n, n))
    L = np.empty((n, n))
    As = np.empty((p, n))
    bs = np.empty(p)
    lam = np.empty(p)
    Wt = np.empty((p, n))
    Sm = np.empty((p, p))
    Ls = np.empty((p, p))
    U = np.empty((p, n))
    keep = np.empty(p, dtype=np.bool_)
    W = np.empty((11, nmax))
    rd = np.empty(n)
    rpe = np.empty(p)
    rpi = np.empty(m)
    rc = np.empty(m)
    D = np.empty(m)
    R1 = np.empty(n)
    R2 = np.empty(p)
    R3 = np.empty(m)
    t_n = np.empty(n)
    t_n2 = np.empty(n)
    dy_a = np.empty(n)
    dl_a = np.empty(p)
    dnu_a = np.empty(m)
    ds_a = np.empty(m)
    dy = np.empty(n)
    dl = np.empty(p)
    dnu = np.empty(m)
    ds = np.empty(m)
    yb = np.empty(n)
    lbf = np.empty(p)
    nb = np.empty(m)
    sb = np.empty(m)

    for k in range(k0, k1):
        y = Y[k]
        nu = NU[k]
        s = SL[k]
        lam_out = LAM[k]
        Qk = Q[k]
        qk = q[k]
        Gk = G[k]
        hk = h[k]
        Ak = A[k]
        bk = b[k]
        ITERS[k] = 0
        # ------------------------------------------------ preprocessing
        if not (_finite2(Qk) and _finite1(qk) and _finite2(Gk) and _finite1(hk)
                and _finite2(Ak) and _finite1(bk)):
            STATUS[k] = _NUMERICAL_ERROR
            _fill_nan(y, lam_out, nu, s, RES, k)
            continue
        wk = warm
        if wk and not (_finite1(y) and _finite1(lam_out) and _finite1(nu)
                       and _finite1(s)):
            wk = False
        qmax = 0.0
        for i in range(n):
            for j in range(n):
                v = 0.5 * (Qk[i, j] + Qk[j, i])
                Qs[i, j] = v
                qmax = max(qmax, abs(v))
        if qmax > 0.0 and not _cholesky(Qs, L, n, psd_tol * qmax, 0.0, 0.0):
            STATUS[k] = _NONCONVEX
            _fill_nan(y, lam_out, nu, s, RES, k)
            continue
        code = 0
        if p > 0:
            code = _equality_rows(Ak, bk, rank_tol, cons_tol, keep, U, bs, t_n)
        if code == 2:
            STATUS[k] = _RANK_DEFICIENT
            _fill_nan(y, lam_out, nu, s, RES, k)
            continue
        ps = _count_true(keep, p)  # (a helper keeps ps a non-literal int64)
        r = 0
        for j in range(p):
            if keep[j]:
                for t in range(n):
                    As[r, t] = Ak[j, t]
                bs[r] = bk[j]
                lam[r] = lam_out[j] if wk else 0.0
                r += 1
        Ask = As[:ps]
        bsk = bs[:ps]
        lamk = lam[:ps]
        Wtk = Wt[:ps]
        if ps == p:
            Smk = Sm
            Lsk = Ls
        else:  # dropped redundant rows (rare): exact-size C-contiguous arrays
            Smk = np.empty((ps, ps))
            Lsk = np.empty((ps, ps))
        rpek = rpe[:ps]
        R2k = R2[:ps]
        dl_ak = dl_a[:ps]
        dlk = dl[:ps]
        lb = lbf[:ps]

        # K_base = Q + rho A'A, static regularisation delta
        rho = 0.0
        for i in range(n):
            for j in range(n):
                Kb[i, j] = Qs[i, j]
        if ps > 0:
            mq = 0.0
            for i in range(n):
                mq = max(mq, Qs[i, i])
            ma = 0.0
            for j in range(ps):
                ma = max(ma, _dot(Ask[j], Ask[j], n))
            rho = max(1.0, mq) / ma
            for j in range(ps):   # ps <= rank(A) <= n
                t_n[j] = rho
            _add_gtdg_lower(Kb, Ask, t_n, ps, n)   # (lower triangle is used)
        mdb = 0.0
        for i in range(n):
            mdb = max(mdb, abs(Kb[i, i]))
        delta = reg * (1.0 + mdb)

        # ------------------------------------------------ start point
        status = _MAX_ITER
        ok = True
        if not wk:
            # CVXOPT-style cold start: the Newton system with s = nu = D = 1 and
            # R = (-q, b, h, 0) is [Q A' G'; A 0 0; G 0 -I][y; lam; z] = [-q; b; h]
            # with z = nu = G y - h and s = h - G y; then s and nu are shifted
            # into the interior.
            for i in range(m):
                D[i] = 1.0
                rc[i] = 0.0
            ok = _factor_newton(Kb, Gk, Ask, D, K, L, Wtk, Smk, Lsk, n, ps, m, delta,
                                mdb)
            if ok:
                for i in range(n):
                    R1[i] = -qk[i]
                _newton(Qs, Ask, Gk, L, Wtk, Lsk, n, ps, m, rho, D, D, D, R1, bsk, hk,
                        rc, y, lamk, nu, s, W, nref)
                ns = 0.0
                for i in range(m):
                    ns += s[i] * s[i]
                ns = np.sqrt(ns)
                ts = -_min_val(s, m)
                if m > 0 and ts >= -1e-8 * max(ns, 1.0):
                    for i in range(m):
                        s[i] += 1.0 + ts
                tz = -_min_val(nu, m)
                if m > 0 and tz >= -1e-8 * max(ns, 1.0):
                    for i in range(m):
                        nu[i] += 1.0 + tz
            else:
                status = _NUMERICAL_ERROR
        elif m > 0:
            sc = 0.0
            for i in range(m):
                sc = max(sc, max(abs(s[i]), abs(nu[i])))
            thr = warm_margin * (1.0 + sc)
            for i in range(m):
                if not (s[i] >= thr):
                    s[i] = thr
                if not (nu[i] >= thr):
                    nu[i] = thr

        # ------------------------------------------------ iterations
        it = 0
        polishing = False
        res_sol = np.inf
        best = np.inf      # best residual so far (its iterate is kept)
        best_it = 0        # last iteration with significant (2x) progress
        prog = np.inf
        while ok:
            res = _residuals(Qs, qk, Gk, hk, Ask, bsk, y, lamk, nu, s, n, ps, m,
                             rd, rpek, rpi, t_n, t_n2)
            if polishing:
                # keep the polished iterate only if it is better
                if not (res < res_sol):
                    _copy_iterate(yb, lb, nb, sb, y, lamk, nu, s)
                status = _SOLVED
                break
            if res <= tol:
                if polish and m > 0 and it < max_iter:
                    # one extra Newton step from the accepted point
                    polishing = True
                    res_sol = res
                    _copy_iterate(y, lamk, nu, s, yb, lb, nb, sb)
                else:
                    status = _SOLVED
                    break
            if res == np.inf:
                status = _NUMERICAL_ERROR
                break
            if res < best:
                best = res
                _copy_iterate(y, lamk, nu, s, yb, lb, nb, sb)
                if res < 0.5 * prog:
                    prog = res
                    best_it = it
            if not polishing and best <= stall_res and it - best_it >= stall_iters:
                # accuracy floor reached near a solution: stop, keep the best
                status = _MAX_ITER
                break
            if m > 0 and not polishing and \
                    _primal_infeasible(Gk, hk, Ask, bsk, lamk, nu, n, ps, m,
                                            cert_radius, t_n):
                status = _PRIMAL_INFEASIBLE
                break
            if it >= max_iter:
                status = _MAX_ITER
                break
            dmax = 0.0
            dmin = np.inf
            for i in range(m):
                D[i] = nu[i] / s[i]
                dmax = max(dmax, D[i])
                dmin = min(dmin, D[i])
            # refinement only pays off once D spreads (K ill-conditioned)
            nr = nref if (m == 0 or dmax > 1e4 * dmin) else 0
            if not _factor_newton(Kb, Gk, Ask, D, K, L, Wtk, Smk, Lsk, n, ps, m, delta,
                                  mdb):
                # breakdown: past the attainable accuracy if already close
                status = _MAX_ITER if best <= stall_res else _NUMERICAL_ERROR
                if polishing:
                    _copy_iterate(yb, lb, nb, sb, y, lamk, nu, s)
                    status = _SOLVED
                break
            for i in range(n):
                R1[i] = -rd[i]
            for j in range(ps):
                R2k[j] = -rpek[j]
            for i in range(m):
                R3[i] = -rpi[i]
            # predictor (affine scaling) direction
            mu = 0.0
            for i in range(m):
                rc[i] = -s[i] * nu[i]
                mu -= rc[i]
            _newton(Qs, Ask, Gk, L, Wtk, Lsk, n, ps, m, rho, s, nu, D, R1, R2k, R3, rc,
                    dy_a, dl_ak, dnu_a, ds_a, W, nr)
            if m > 0:
                mu /= m
                a_aff = min(1.0, min(_max_step(s, ds_a, m), _max_step(nu, dnu_a, m)))
                mu_aff = 0.0
                for i in range(m):
                    mu_aff += (s[i] + a_aff * ds_a[i]) * (nu[i] + a_aff * dnu_a[i])
                mu_aff /= m
                sigma = min(1.0, (mu_aff / mu) ** 3)
                # corrector: complementarity target sigma*mu, second order term
                for i in range(m):
                    rc[i] = -s[i] * nu[i] - ds_a[i] * dnu_a[i] + sigma * mu
                _newton(Qs, Ask, Gk, L, Wtk, Lsk, n, ps, m, rho, s, nu, D, R1, R2k, R3,
                        rc, dy, dlk, dnu, ds, W, nr)
                alpha = min(1.0, 0.99 * min(_max_step(s, ds, m), _max_step(nu, dnu, m)))
            else:
                for i in range(n):
                    dy[i] = dy_a[i]
                for j in range(ps):
                    dlk[j] = dl_ak[j]
                alpha = 1.0
            if not polishing and (
                    _dual_infeasible(Qs, qk, Gk, Ask, dy, n, ps, m, cert_radius, t_n)
                    or _dual_infeasible(Qs, qk, Gk, Ask, dy_a, n, ps, m, cert_radius,
                                        t_n)):
                status = _DUAL_INFEASIBLE
                break
            for i in range(n):
                y[i] += alpha * dy[i]
            for j in range(ps):
                lamk[j] += alpha * dlk[j]
            for i in range(m):
                nu[i] += alpha * dnu[i]
                s[i] += alpha * ds[i]
            it += 1

        if (status == _MAX_ITER or status == _NUMERICAL_ERROR) and best < np.inf:
            _copy_iterate(yb, lb, nb, sb, y, lamk, nu, s)

        # ------------------------------------------------ outputs
        r = 0
        for j in range(p):
            if keep[j]:
                lam_out[j] = lamk[r]
                r += 1
            else:
                lam_out[j] = 0.0
        RES[k] = _residuals(Qs, qk, Gk, hk, Ak, bk, y, lam_out, nu, s, n, p, m,
                            rd, rpe, rpi, t_n, t_n2)
        if code == 1 and not allow_redundant:
            status = _RANK_DEFICIENT
        STATUS[k] = status
        ITERS[k] = it


@njit(**_HELPER)
def _copy_iterate(y, lam, nu, s, y2, lam2, nu2, s2):
    for i in range(y.shape[0]):
        y2[i] = y[i]
    for i in range(lam.shape[0]):
        lam2[i] = lam[i]
    for i in range(nu.shape[0]):
        nu2[i] = nu[i]
        s2[i] = s[i]


@njit(**_HELPER)
def _count_true(x, p):
    c = 0
    for j in range(p):
        if x[j]:
            c += 1
    return c


@njit(**_HELPER)
def _fill_nan(y, lam, nu, s, RES, k):
    for i in range(y.shape[0]):
        y[i] = np.nan
    for i in range(lam.shape[0]):
        lam[i] = np.nan
    for i in range(nu.shape[0]):
        nu[i] = np.nan
        s[i] = np.nan
    RES[k] = np.nan



_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0


def _run_batch(fn, B: int, num_threads: Optional[int]) -> None:
    """Run ``fn(k0, k1)`` over contiguous chunks of range(B) on a thread pool."""
    global _POOL, _POOL_SIZE
    if num_threads is None:
        try:
            nt = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover (not on Linux)
            nt = os.cpu_count() or 1
        # honour NUMBA_NUM_THREADS (and numba.set_num_threads) as the upper bound
        nt = min(nt, numba.get_num_threads())
    else:
        nt = int(num_threads)
    nt = max(1, min(nt, B))
    if nt == 1:
        fn(0, B)
        return
    if _POOL is None or _POOL_SIZE < nt:
        _POOL = ThreadPoolExecutor(max_workers=nt, thread_name_prefix="qp_pdipm")
        _POOL_SIZE = nt
    bounds = [(B * i) // nt for i in range(nt + 1)]
    futs = [_POOL.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, nt)]
    fn(bounds[0], bounds[1])
    for f in futs:
        f.result()


def _as_f64(x: np.ndarray, ndim: int, name: str) -> np.ndarray:
    a = kernel_f64(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    return a


def solve_qp_batch(
    Q: np.ndarray,
    q: np.ndarray,
    G: np.ndarray,
    h: np.ndarray,
    A: np.ndarray,
    b: np.ndarray,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
    warm_start: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = None,
    reg: float = 1e-13,
    psd_tol: float = 1e-10,
    rank_tol: float = 1e-10,
    consistency_tol: float = 1e-9,
    cert_radius: float = 1e8,
    warm_start_margin: float = 1e-4,
    allow_redundant_equalities: bool = False,
    refine_steps: int = 1,
    stall_iters: int = 5,
    stall_res: float = 1e-6,
    polish: bool = True,
    num_threads: Optional[int] = None,
) -> QPResult:
    r"""Solve a batch of convex QPs with a Mehrotra primal-dual interior point method.

    .. math::

        \min_y \tfrac12 y^T Q_k y + q_k^T y \quad\text{s.t.}\quad
        A_k y = b_k,\; G_k y \le h_k, \qquad k = 1..B

    Parameters
    ----------
    Q : (B, n, n) array; only its symmetric part is used; must be PSD.
    q : (B, n) array.
    G : (B, m, n) array (m may be 0).
    h : (B, m) array.
    A : (B, p, n) array (p may be 0).
    b : (B, p) array.
    max_iter : maximum number of Newton (predictor-corrector) steps.
    tol : tolerance on the relative KKT residual (see module docstring).
    warm_start : optional ``(y, lam, nu, s)`` batch arrays (not modified).  ``s``
        and ``nu`` are pushed to at least
        ``warm_start_margin * (1 + max(|s|, |nu|))`` to restart in the interior.
    reg : relative static regularisation ``delta = reg (1 + max diag(Q + rho A'A))``
        added to the eliminated matrix ``K`` before its Cholesky factorisation
        (its effect is removed by iterative refinement).
    psd_tol : ``Q`` counts as PSD when ``Q + psd_tol * max|Q_ij| * I`` has a
        Cholesky factorisation.
    rank_tol : a row of ``A`` is dependent when its component orthogonal to the
        previous rows has norm ``<= rank_tol * ||row||``.
    consistency_tol : a dependent row is inconsistent when its transformed right
        hand side exceeds ``consistency_tol * (1 + ||b||_inf)``.
    cert_radius : radius factor ``R`` of the infeasibility certificates (larger:
        more conservative detection).
    warm_start_margin : see ``warm_start``.
    allow_redundant_equalities : if True, consistent redundant equality rows are
        dropped silently (their ``lam`` is 0) and the status reflects the solve.
    refine_steps : iterative refinement steps (on the unreduced Newton system)
        per linear solve, used once ``max D / min D > 1e4`` (``D = nu / s``) or
        when ``m = 0``; earlier steps do not need the accuracy.
    stall_iters, stall_res : stop (status ``MAX_ITER``) when the KKT residual is
        already below ``stall_res`` but has not halved during ``stall_iters``
        iterations (accuracy floor of the problem reached above ``tol``).  For
        ``MAX_ITER`` and ``NUMERICAL_ERROR`` the best iterate seen is returned.
    polish : after reaching ``tol``, take one more Newton step and keep it if
        it lowers the KKT residual (typically by 10-100x, for one extra
        factorisation); this makes ``y, lam, nu`` accurate to about ``1e-10``
        on well-conditioned problems of unit scale.
    num_threads : number of threads over which the batch is split (the compiled
        kernel releases the GIL); default: the CPUs available to the process, at most
        ``numba.get_num_threads()`` (so ``NUMBA_NUM_THREADS`` bounds it).

    Returns
    -------
    QPResult
        ``(y, lam, nu, s, status, iterations, kkt_residual)``; see :class:`QPResult`.
        Statuses are per instance; one failing instance never affects the others.
        For ``NONCONVEX``, ``NUMERICAL_ERROR`` on non-finite data and inconsistent
        ``RANK_DEFICIENT_EQUALITY`` the solution arrays are NaN (``iterations`` 0);
        for ``MAX_ITER``/``NUMERICAL_ERROR`` they hold the best iterate seen, for
        ``PRIMAL_INFEASIBLE``/``DUAL_INFEASIBLE`` the last one.  ``iterations``
        counts the polishing step.  Nothing is compiled at import time; the
        first call compiles the kernel (cached on disk afterwards).
    """
    Q = _as_f64(Q, 3, "Q")
    q = _as_f64(q, 2, "q")
    G = _as_f64(G, 3, "G")
    h = _as_f64(h, 2, "h")
    A = _as_f64(A, 3, "A")
    b = _as_f64(b, 2, "b")
    B, n, n2 = Q.shape
    m = G.shape[1]
    p = A.shape[1]
    if n2 != n or q.shape != (B, n) or G.shape != (B, m, n) or h.shape != (B, m) \
            or A.shape != (B, p, n) or b.shape != (B, p):
        raise ValueError(
            "inconsistent shapes: Q %s q %s G %s h %s A %s b %s"
            % (Q.shape, q.shape, G.shape, h.shape, A.shape, b.shape))
    Y = np.zeros((B, n))
    LAM = np.zeros((B, p))
    NU = np.zeros((B, m))
    S = np.zeros((B, m))
    warm = warm_start is not None
    if warm:
        y0, l0, n0, s0 = warm_start
        Y[...] = y0
        LAM[...] = l0
        NU[...] = n0
        S[...] = s0
    STATUS = np.zeros(B, dtype=np.int64)
    ITERS = np.zeros(B, dtype=np.int64)
    RES = np.zeros(B, dtype=np.float64)
    args = (bool(warm), int(max_iter), float(tol), float(reg), float(psd_tol),
            float(rank_tol), float(consistency_tol), float(cert_radius),
            float(warm_start_margin), bool(allow_redundant_equalities),
            int(refine_steps), int(stall_iters), float(stall_res), bool(polish))
    _run_batch(
        lambda k0, k1: _qp_kernel(Q, q, G, h, A, b, Y, LAM, NU, S, STATUS, ITERS, RES,
                                  k0, k1, *args),
        B, num_threads)
    return QPResult(Y, LAM, NU, S, STATUS, ITERS, RES)


# =========================================================================== #
# Jacobian of the KKT residual: factor once, solve many right-hand sides
# =========================================================================== #
class KKTJacobianFlag(enum.IntEnum):
    """Per-instance flag of the KKT Jacobian factorisation/solve."""

    OK = 0
    DEGENERATE = 1
    SINGULAR = 2
    NONFINITE = 3


KKT_JACOBIAN_FLAG_MESSAGES: dict[KKTJacobianFlag, str] = {
    KKTJacobianFlag.OK: "Jacobian factored; solutions are valid.",
    KKTJacobianFlag.DEGENERATE: (
        "Strict complementarity fails: some constraint has both s_i and nu_i "
        "<= degen_tol, so the row diag(nu)G, diag(-s) of J is (numerically) "
        "zero and J is singular. The solution is NaN. The layer is not "
        "differentiable there (weakly active constraint); perturb the data or "
        "use a smoothed (interior point) s, nu."
    ),
    KKTJacobianFlag.SINGULAR: (
        "J is numerically singular: a Cholesky pivot of the eliminated system "
        "fell below sing_tol. Typical causes: the active constraint rows "
        "together with A are linearly dependent (LICQ fails), or Q is singular "
        "on directions left free by the active constraints. The solution is NaN."
    ),
    KKTJacobianFlag.NONFINITE: "Non-finite Q, G, A, s or nu. The solution is NaN.",
}


class KKTJacobianFactors(NamedTuple):
    """Factors of the KKT Jacobian at one point per instance
    (see :func:`kkt_jacobian_factor`).

    Attributes
    ----------
    G, A : the constraint matrices (references to the inputs, float64).
    s, nu : (B, m) slack and multipliers used (clipped at 0).
    active : (B, m) bool, constraints treated as rows (``s_i <= nu_i``).
    n_active : (B,) number of active constraints.
    dvals : (B, m) ``nu_i / s_i`` for inactive, ``s_i / nu_i`` for active rows.
    rho : (B,) augmentation weight.
    L_K : (B, n, n) Cholesky factor (lower) of ``K_w``.
    W_T : (B, pc, n) rows ``L_K^{-1} c_j`` for the rows ``c_j`` of ``C``.
    L_S : (B, pc, pc) Cholesky factor (lower) of the Schur complement.
    flag : (B,) int64 :class:`KKTJacobianFlag` codes.
    """

    G: np.ndarray
    A: np.ndarray
    s: np.ndarray
    nu: np.ndarray
    active: np.ndarray
    n_active: np.ndarray
    dvals: np.ndarray
    rho: np.ndarray
    L_K: np.ndarray
    W_T: np.ndarray
    L_S: np.ndarray
    flag: np.ndarray


class KKTSolveResult(NamedTuple):
    """``z`` (same shape as ``rhs``; NaN for flagged instances) and ``flag`` (B,)."""

    z: np.ndarray
    flag: np.ndarray


@njit(**_JIT)
def _kkt_factor_kernel(Q, G, A, S_, NU, ACTIVE, DV, RHO, LK, WT, LS, FLAG,
                       degen_tol, sing_tol, k0, k1):
    """Factor the eliminated KKT Jacobian for instances k0 <= k < k1."""
    m = G.shape[1]
    n = G.shape[2]
    p = A.shape[1]
    K = np.empty((n, n))
    Tc = np.empty(LS.shape[1])
    for k in range(k0, k1):
        Qk = Q[k]
        Gk = G[k]
        Ak = A[k]
        s = S_[k]
        nu = NU[k]
        act = ACTIVE[k]
        dv = DV[k]
        L = LK[k]
        Wt = WT[k]
        Ls = LS[k]
        if not (_finite2(Qk) and _finite2(Gk) and _finite2(Ak) and _finite1(s)
                and _finite1(nu)):
            FLAG[k] = 3
            continue
        flag = 0
        na = 0
        for i in range(m):
            if max(s[i], nu[i]) <= degen_tol:
                flag = 1
            if act[i]:
                dv[i] = s[i] / nu[i]
                na += 1
            else:
                dv[i] = nu[i] / s[i]
        if flag != 0:
            FLAG[k] = flag
            continue
        pc = p + na
        # K = Qsym + sum_inactive D_i g_i g_i'   (lower triangle)
        for i in range(n):
            for j in range(i + 1):
                K[i, j] = 0.5 * (Qk[i, j] + Qk[j, i])
        for i in range(m):
            if not act[i]:
                di = dv[i]
                if di != 0.0:
                    Gi = Gk[i]
                    for j in range(n):
                        gij = di * Gi[j]
                        if gij != 0.0:
                            Kj = K[j]
                            for t in range(j + 1):
                                Kj[t] += gij * Gi[t]
        # rows of C = [A; G_active] (kept in Wt for now), E_c, T_c
        r = 0
        for j in range(p):
            for t in range(n):
                Wt[r, t] = Ak[j, t]
            Tc[r] = 0.0          # E_c (A rows: 0)
            r += 1
        for i in range(m):
            if act[i]:
                for t in range(n):
                    Wt[r, t] = Gk[i, t]
                Tc[r] = dv[i]
                r += 1
        mk = 0.0
        for i in range(n):
            mk = max(mk, K[i, i])
        rho = 0.0
        if pc > 0:
            mc = 0.0
            for j in range(pc):
                mc = max(mc, _dot(Wt[j], Wt[j], n))
            if mc > 0.0:
                rho = max(1.0, mk) / mc
            # K_w = K + rho C' T C,  T = 1 / (1 + rho E)
            for j in range(pc):
                cj = rho / (1.0 + rho * Tc[j])
                Cj = Wt[j]
                for i in range(n):
                    c = cj * Cj[i]
                    if c != 0.0:
                        Ki = K[i]
                        for t in range(i + 1):
                            Ki[t] += c * Cj[t]
        RHO[k] = rho
        md = 0.0
        for i in range(n):
            md = max(md, K[i, i])
        if not _cholesky(K, L, n, 0.0, sing_tol * md, 0.0):
            FLAG[k] = 2
            continue
        for j in range(pc):
            _lsolve(L, Wt[j], n)
        # S = W'W + E (1 + rho E)
        for i in range(pc):
            for j in range(i + 1):
                Ls[i, j] = _dot(Wt[i], Wt[j], n)
            Ls[i, i] += Tc[i] * (1.0 + rho * Tc[i])
        # in-place Cholesky of the lower triangle of Ls (reads before it writes); each
        # pivot against its own diagonal entry: S's rows scale with the constraint rows
        # (a row times 1e4 scales its pivot by 1e8), and a test against max diag(S)
        # refused valid points whose active rows differ in scale
        if pc > 0 and not _cholesky(Ls, Ls, pc, 0.0, 0.0, sing_tol):
            FLAG[k] = 2
            continue
        FLAG[k] = 0


@njit(**_JIT)
def _kkt_solve_kernel(G, A, S_, NU, ACTIVE, DV, RHO, LK, WT, LS, FLAG, R, Z, transpose,
                      k0, k1):
    """Apply the factors to R[k, j, :] for instances k0 <= k < k1."""
    m = G.shape[1]
    n = G.shape[2]
    p = A.shape[1]
    nr = R.shape[1]
    pcmax = LS.shape[1]
    f = np.empty(n)
    g = np.empty(pcmax)
    ec = np.empty(pcmax)
    idx = np.empty(m, dtype=np.int64)
    for k in range(k0, k1):
        if FLAG[k] != 0:
            for jr in range(nr):
                for i in range(Z.shape[2]):
                    Z[k, jr, i] = np.nan
            continue
        Gk = G[k]
        Ak = A[k]
        s = S_[k]
        nu = NU[k]
        act = ACTIVE[k]
        dv = DV[k]
        L = LK[k]
        Wt = WT[k]
        Ls = LS[k]
        rho = RHO[k]
        na = 0
        for i in range(m):
            if act[i]:
                idx[na] = i
                na += 1
        pc = p + na
        for j in range(p):
            ec[j] = 0.0
        for a in range(na):
            ec[p + a] = dv[idx[a]]
        for jr in range(nr):
            r = R[k, jr]
            z = Z[k, jr]
            # ---- f, g of the reduced system [K C'; C -E][zy; zc] = [f; g]
            for i in range(n):
                f[i] = r[i]
            for j in range(p):
                g[j] = r[n + j]
            for i in range(m):
                ri = r[n + p + i]
                if not act[i] and ri != 0.0:
                    c = ri * dv[i] if transpose else ri / s[i]
                    Gi = Gk[i]
                    for t in range(n):
                        f[t] += c * Gi[t]
            for a in range(na):
                i = idx[a]
                g[p + a] = r[n + p + i] if transpose else r[n + p + i] / nu[i]
            # ---- f += rho C' T g
            if rho != 0.0:
                for j in range(pc):
                    c = rho * g[j] / (1.0 + rho * ec[j])
                    if c != 0.0:
                        Cj = Ak[j] if j < p else Gk[idx[j - p]]
                        for t in range(n):
                            f[t] += c * Cj[t]
            # ---- Schur complement solve
            _schur_solve(L, Ls, Wt, f, g, n, pc)
            # ---- back substitution
            for t in range(n):
                z[t] = f[t]
            for j in range(p):
                z[n + j] = g[j]
            for a in range(na):
                i = idx[a]
                zc = g[p + a] * (1.0 + rho * ec[p + a])
                z[n + p + i] = zc / nu[i] if transpose else zc
            for i in range(m):
                if not act[i]:
                    gz = _dot(Gk[i], f, n)
                    ri = r[n + p + i]
                    if transpose:
                        z[n + p + i] = (gz - ri) / s[i]
                    else:
                        z[n + p + i] = dv[i] * gz - ri / s[i]


def kkt_jacobian_factor(
    Q: np.ndarray,
    G: np.ndarray,
    A: np.ndarray,
    s: np.ndarray,
    nu: np.ndarray,
    *,
    degen_tol: float = 1e-12,
    sing_tol: float = 1e-13,
    num_threads: Optional[int] = None,
) -> KKTJacobianFactors:
    r"""Factor the Jacobian of the KKT residual at ``(y, lam, nu)``, per instance.

    .. math::

        F(y,\lambda,\nu) = \begin{bmatrix} Qy + q + A^T\lambda + G^T\nu \\
                    Ay - b \\ \operatorname{diag}(\nu)(Gy - h)\end{bmatrix},\qquad
        J = \begin{bmatrix} Q & A^T & G^T \\ A & 0 & 0 \\
                    \operatorname{diag}(\nu) G & 0 & -\operatorname{diag}(s)
            \end{bmatrix}

    with ``s = h - G y`` (``Q`` is replaced by its symmetric part).

    Method: each inequality is classified as *active* (``s_i <= nu_i``) or
    *inactive*.  Inactive rows are eliminated with ``D_i = nu_i / s_i <= 1``;
    active rows stay as constraint rows with a small diagonal
    ``E_i = s_i / nu_i <= 1``, which gives the symmetric quasi-definite system

    .. math::

        \begin{bmatrix} K & C^T \\ C & -E \end{bmatrix},\quad
        K = Q + G_I^T D_I G_I,\quad C = \begin{bmatrix} A \\ G_{act}\end{bmatrix}.

    An exact augmentation ``K_w = K + rho C^T T C``, ``T = (I + rho E)^{-1}``,
    ``E' = E (I + rho E)`` (``rho = max(1, max diag K) / max ||c_j||^2``) makes
    ``K_w`` positive definite whenever ``J`` is nonsingular (also for ``Q = 0``),
    so ``K_w = L_K L_K'`` (cost ``O((m + p) n^2 + n^3)``) and the Schur complement
    ``S = W'W + E'`` with ``W = L_K^{-1} C'`` (``L_S L_S'``).  Each solve then
    costs ``O(n^2 + (m + p) n + pc^2)``.  Both ``D`` and ``E`` are bounded by 1,
    so this stays well conditioned at an exact solution (``s_i = 0`` on active
    constraints) as well as at an interior point iterate.

    Validity: ``J`` is nonsingular iff (i) strict complementarity holds,
    ``max(s_i, nu_i) > 0`` for every ``i`` (else flag ``DEGENERATE``), (ii) the
    rows of ``A`` and of the active ``G_i`` are linearly independent (LICQ) and
    (iii) ``Q`` is positive definite on their null space (second order
    condition); failures of (ii)/(iii) are detected as a tiny Cholesky pivot
    (flag ``SINGULAR``).  Flagged instances yield NaN solutions.

    Parameters
    ----------
    Q : (B, n, n); G : (B, m, n); A : (B, p, n)
    s : (B, m) slack ``h - G y`` (e.g. ``QPResult.s``); negative values are
        clipped to 0.
    nu : (B, m) inequality multipliers; negative values are clipped to 0.
    degen_tol : a constraint with ``max(s_i, nu_i) <= degen_tol`` is degenerate.
    sing_tol : relative pivot threshold for the two Cholesky factorisations: of
        ``K_w`` against its largest diagonal entry, of the Schur complement
        against each pivot's own diagonal entry (invariant to the scale of each
        constraint row).
    num_threads : threads over which the batch is split.

    Returns
    -------
    KKTJacobianFactors
        Pass to :func:`kkt_jacobian_solve_factored` (any number of times).
    """
    Q = _as_f64(Q, 3, "Q")
    G = _as_f64(G, 3, "G")
    A = _as_f64(A, 3, "A")
    s = np.maximum(_as_f64(s, 2, "s"), 0.0)
    nu = np.maximum(_as_f64(nu, 2, "nu"), 0.0)
    B, n, _ = Q.shape
    m = G.shape[1]
    p = A.shape[1]
    if Q.shape != (B, n, n) or G.shape != (B, m, n) or A.shape != (B, p, n) \
            or s.shape != (B, m) or nu.shape != (B, m):
        raise ValueError("inconsistent shapes: Q %s G %s A %s s %s nu %s"
                         % (Q.shape, G.shape, A.shape, s.shape, nu.shape))
    active = s <= nu
    n_active = active.sum(axis=1).astype(np.int64)
    pc = p + (int(n_active.max()) if B > 0 and m > 0 else 0)
    dvals = np.zeros((B, m))
    rho = np.zeros(B)
    L_K = np.zeros((B, n, n))
    W_T = np.zeros((B, pc, n))
    L_S = np.zeros((B, pc, pc))
    flag = np.zeros(B, dtype=np.int64)
    _run_batch(
        lambda k0, k1: _kkt_factor_kernel(Q, G, A, s, nu, active, dvals, rho, L_K, W_T,
                                          L_S, flag, float(degen_tol), float(sing_tol),
                                          k0, k1),
        B, num_threads)
    return KKTJacobianFactors(G, A, s, nu, active, n_active, dvals, rho, L_K, W_T, L_S,
                              flag)


def kkt_jacobian_solve_factored(
    factors: KKTJacobianFactors,
    rhs: np.ndarray,
    *,
    transpose: bool = False,
    num_threads: Optional[int] = None,
) -> np.ndarray:
    """Solve ``J z = rhs`` (or ``J' z = rhs`` if ``transpose``) with the factors
    of :func:`kkt_jacobian_factor`.

    Parameters
    ----------
    factors : result of :func:`kkt_jacobian_factor`.
    rhs : (B, n + p + m) or (B, K, n + p + m) right-hand sides, ordered
        ``[y-block (n), lam-block (p), nu-block (m)]`` like ``F``.
    transpose : solve with ``J'`` (vector-Jacobian products / adjoints).
    num_threads : threads over which the batch is split.

    Returns
    -------
    z : same shape as ``rhs``; NaN for instances with ``factors.flag != 0``.
    """
    G, A = factors.G, factors.A
    B, m, n = G.shape
    p = A.shape[1]
    R = np.asarray(rhs, dtype=np.float64)
    squeeze = R.ndim == 2
    if squeeze:
        R = R[:, None, :]
    if R.ndim != 3 or R.shape[0] != B or R.shape[2] != n + p + m:
        raise ValueError("rhs must have shape (B, n+p+m) or (B, K, n+p+m) with "
                         "B=%d, n+p+m=%d; got %s" % (B, n + p + m, np.shape(rhs)))
    R = kernel_f64(R)
    Z = np.empty_like(R)
    f = factors
    _run_batch(
        lambda k0, k1: _kkt_solve_kernel(G, A, f.s, f.nu, f.active, f.dvals, f.rho,
                                         f.L_K, f.W_T, f.L_S, f.flag, R, Z,
                                         bool(transpose), k0, k1),
        B, num_threads)
    return Z[:, 0, :] if squeeze else Z


def kkt_jacobian_solve(
    Q: np.ndarray,
    G: np.ndarray,
    A: np.ndarray,
    s: np.ndarray,
    nu: np.ndarray,
    rhs: np.ndarray,
    *,
    transpose: bool = False,
    degen_tol: float = 1e-12,
    sing_tol: float = 1e-13,
    num_threads: Optional[int] = None,
) -> KKTSolveResult:
    """Solve ``J z = rhs`` or ``J' z = rhs`` with the KKT Jacobian ``J`` at
    ``(y, lam, nu)`` given through the slack ``s = h - G y`` and ``nu``.

    One-shot convenience wrapper: :func:`kkt_jacobian_factor` followed by
    :func:`kkt_jacobian_solve_factored` (see those for the method, validity
    conditions and shapes).  Returns ``KKTSolveResult(z, flag)``.
    """
    fac = kkt_jacobian_factor(Q, G, A, s, nu, degen_tol=degen_tol, sing_tol=sing_tol,
                              num_threads=num_threads)
    z = kkt_jacobian_solve_factored(fac, rhs, transpose=transpose,
                                    num_threads=num_threads)
    return KKTSolveResult(z, fac.flag)


# --------------------------------------------------------------------------- #
# Active-set polish (the layer's _QPLayer._polish, per instance, compiled)
# --------------------------------------------------------------------------- #
@njit(**_HELPER)
def _lu_solve_inplace(K, z, N):
    """Solve ``K z = rhs`` (``z`` holds rhs) by LU with partial pivoting, in place;
    False when a pivot is exactly 0 (LAPACK gesv's singularity criterion)."""
    for j in range(N):
        piv = j
        big = abs(K[j, j])
        for i in range(j + 1, N):
            if abs(K[i, j]) > big:
                big = abs(K[i, j])
                piv = i
        if big == 0.0:
            return False
        if piv != j:
            for c in range(N):
                t = K[j, c]
                K[j, c] = K[piv, c]
                K[piv, c] = t
            t = z[j]
            z[j] = z[piv]
            z[piv] = t
        inv = 1.0 / K[j, j]
        for i in range(j + 1, N):
            f = K[i, j] * inv
            if f != 0.0:
                K[i, j] = f
                for c in range(j + 1, N):
                    K[i, c] -= f * K[j, c]
                z[i] -= f * z[j]
    for j in range(N - 1, -1, -1):
        acc = z[j]
        for c in range(j + 1, N):
            acc -= K[j, c] * z[c]
        z[j] = acc / K[j, j]
    return True


@njit(**_HELPER)
def _signed_margins_one(Qs, q, G, h, A, y, lam, nu, n, p, m, nb, sb, w):
    """Unclipped scale-free margins ``nu_bar, s_bar`` of one instance (into nb, sb)."""
    ny = 0.0
    for j in range(n):
        ny += y[j] * y[j]
    ny = np.sqrt(ny)
    t_qy = 0.0
    t_q = 0.0
    for i in range(n):
        acc = 0.0
        for j in range(n):
            acc += Qs[i, j] * y[j]
        t_qy += acc * acc
        t_q += q[i] * q[i]
    t_a = 0.0
    for j in range(n):
        acc = 0.0
        for i in range(p):
            acc += A[i, j] * lam[i]
        t_a += acc * acc
    S = np.sqrt(t_qy) + np.sqrt(t_q) + np.sqrt(t_a)
    for i in range(m):
        r = 0.0
        gy = 0.0
        for j in range(n):
            r += G[i, j] * G[i, j]
            gy += G[i, j] * y[j]
        r = np.sqrt(r)
        w[i] = r
        S += abs(r * nu[i])
        s = h[i] - gy
        den = r * ny + abs(h[i])
        sb[i] = s / den if den > 0 else 0.0
    for i in range(m):
        nb[i] = w[i] * nu[i] / S if S > 0 else 0.0


@njit(**_HELPER)
def _relative_kkt_residual_one(Qs, q, G, h, A, b, y, lam, nu, n, p, m, nb, sb, w):
    """Scale-free size of eq. 27 at one instance: each equation relative to the terms it
    is made of, complementarity by the margins ``min(|nu_bar_i|, |s_bar_i|)``."""
    size = 0.0
    worst = 0.0
    for i in range(n):
        t1 = 0.0
        for j in range(n):
            t1 += Qs[i, j] * y[j]
        t3 = 0.0
        for k in range(p):
            t3 += A[k, i] * lam[k]
        t4 = 0.0
        for k in range(m):
            t4 += G[k, i] * nu[k]
        size = max(size, abs(t1), abs(q[i]), abs(t3), abs(t4))
        worst = max(worst, abs(t1 + q[i] + t3 + t4))
    out = worst / size if size > 0 else 0.0
    for k in range(p):
        ay = 0.0
        sc = 0.0
        for j in range(n):
            ay += A[k, j] * y[j]
            sc += abs(A[k, j]) * abs(y[j])
        sc += abs(b[k])
        e = abs(ay - b[k]) / sc if sc > 0 else 0.0
        out = max(out, e)
    if m > 0:
        _signed_margins_one(Qs, q, G, h, A, y, lam, nu, n, p, m, nb, sb, w)
        for k in range(m):
            out = max(out, min(abs(nb[k]), abs(sb[k])))
    return out


@njit(**_JIT)
def _polish_kernel(Q, q, G, h, A, b, Y, LAM, NU, NUBAR, SBAR, DONE, k0, k1,
                   steps, accept, sign_tol):
    """Active-set polish of instances k0..k1 (see ``_QPLayer._polish``): Y, LAM, NU
    are overwritten where the polished point is kept (DONE[k] = True)."""
    n = Q.shape[1]
    p = A.shape[1]
    m = G.shape[1]
    N = n + p + m
    cap = max(n - p, 0)
    Qs = np.empty((n, n))
    K = np.empty((N, N))
    z = np.empty(N)
    act = np.empty(m, np.bool_)
    active = np.empty(m, np.bool_)
    score = np.empty(m)
    nb = np.empty(m)
    sb = np.empty(m)
    w = np.empty(m)
    nt = np.empty(m)
    order = np.empty(m, np.int64)
    for k in range(k0, k1):
        for i in range(n):
            for j in range(n):
                Qs[i, j] = 0.5 * (Q[k, i, j] + Q[k, j, i])
        for i in range(m):
            active[i] = NUBAR[k, i] > SBAR[k, i]
            score[i] = np.log(max(NUBAR[k, i], 1e-300)) - np.log(max(SBAR[k, i], 1e-300))
        old_res = -1.0
        for _ in range(steps):
            # at most cap rows, the highest score kept (ties: lower index first)
            count = 0
            for i in range(m):
                act[i] = active[i]
                if active[i]:
                    count += 1
            if count > cap:
                c = 0
                for i in range(m):
                    if active[i]:
                        order[c] = i
                        c += 1
                # stable insertion sort of order[:c] by descending score (the order of
                # a stable argsort of -score; c <= m is small, and np.argsort would
                # compile a whole mergesort)
                for t in range(1, c):
                    j = order[t]
                    u = t
                    while u > 0 and score[order[u - 1]] < score[j]:
                        order[u] = order[u - 1]
                        u -= 1
                    order[u] = j
                for i in range(m):
                    act[i] = False
                for t in range(cap):
                    act[order[t]] = True
            # the active set's KKT system, reduced to (y, lam, nu_a) (nu_i = 0 off a):
            # [[Q, A', G_a'], [A, 0, 0], [G_a, 0, 0]] (y, lam, nu_a) = (-q, b, h_a)
            na = 0
            for j in range(m):
                if act[j]:
                    order[na] = j
                    na += 1
            NK = n + p + na
            for i in range(NK):
                z[i] = 0.0
                for j in range(NK):
                    K[i, j] = 0.0
            for i in range(n):
                for j in range(n):
                    K[i, j] = Qs[i, j]
                for j in range(p):
                    K[i, n + j] = A[k, j, i]
                    K[n + j, i] = A[k, j, i]
                for t in range(na):
                    K[i, n + p + t] = G[k, order[t], i]
                    K[n + p + t, i] = G[k, order[t], i]
                z[i] = -q[k, i]
            for j in range(p):
                z[n + j] = b[k, j]
            for t in range(na):
                z[n + p + t] = h[k, order[t]]
            ok = _lu_solve_inplace(K, z, NK)
            if ok:
                for i in range(NK):
                    if not np.isfinite(z[i]):
                        ok = False
            if not ok:
                break
            for j in range(m):
                nt[j] = 0.0
            for t in range(na):
                nt[order[t]] = z[n + p + t]
            yt = z[:n]
            lt = z[n:n + p]
            _signed_margins_one(Qs, q[k], G[k], h[k], A[k], yt, lt, nt, n, p, m, nb, sb, w)
            worst_nu = -1
            worst_s = -1
            for j in range(m):
                if act[j] and nb[j] < -sign_tol:
                    if worst_nu < 0 or nb[j] < nb[worst_nu]:
                        worst_nu = j
                if (not act[j]) and sb[j] < -sign_tol:
                    if worst_s < 0 or sb[j] < sb[worst_s]:
                        worst_s = j
            if worst_nu < 0 and worst_s < 0:
                for j in range(m):
                    nt[j] = max(nt[j], 0.0)
                res = _relative_kkt_residual_one(Qs, q[k], G[k], h[k], A[k], b[k], yt, lt, nt,
                                                 n, p, m, nb, sb, w)
                keep = res <= accept
                if not keep:
                    if old_res < 0:
                        old_res = _relative_kkt_residual_one(Qs, q[k], G[k], h[k], A[k], b[k],
                                                             Y[k], LAM[k], NU[k], n, p, m,
                                                             nb, sb, w)
                    keep = res <= old_res
                if keep:
                    for i in range(n):
                        Y[k, i] = yt[i]
                    for i in range(p):
                        LAM[k, i] = lt[i]
                    for i in range(m):
                        NU[k, i] = nt[i]
                    DONE[k] = True
                break
            # one change per step: drop the most negative multiplier, else add the
            # most violated constraint; added rows outrank kept ones, dropped rank last
            for j in range(m):
                active[j] = act[j]
            if worst_nu >= 0:
                active[worst_nu] = False
                score[worst_nu] = -np.inf
            else:
                active[worst_s] = True
                score[worst_s] = np.inf


def polish_active_set(Q, q, G, h, A, b, y, lam, nu, nu_bar, s_bar, *, steps: int,
                      accept: float, sign_tol: float, num_threads: Optional[int] = None):
    """Compiled active-set polish of a batch (all arrays ``(B, .)`` float64, C-contiguous):
    returns ``(y, lam, nu, done)``, copies with the polished instances replaced."""
    y, lam, nu = (np.ascontiguousarray(v, dtype=np.float64).copy() for v in (y, lam, nu))
    args = [kernel_f64(v) for v in (Q, q, G, h, A, b)]
    nu_bar = kernel_f64(nu_bar)
    s_bar = kernel_f64(s_bar)
    B = y.shape[0]
    done = np.zeros(B, np.bool_)
    _run_batch(lambda k0, k1: _polish_kernel(*args, y, lam, nu, nu_bar, s_bar, done, k0, k1,
                                             int(steps), float(accept), float(sign_tol)),
               B, num_threads)
    return y, lam, nu, done


# --------------------------------------------------------------------------- #
# Compile ahead of the first real call
# --------------------------------------------------------------------------- #
#: the independent groups of compiled kernels (each group compiles in one process;
#: numba's on-disk cache then serves every later process)
KERNEL_GROUPS: Tuple[str, ...] = ("solve", "polish", "kkt")


def compile_kernels(groups: Tuple[str, ...] = KERNEL_GROUPS) -> None:
    """Compile (or load from numba's cache) the kernels of ``groups`` by tiny calls.

    The kernels have one signature each (the wrappers cast every input to
    C-contiguous float64 and every option to int/float/bool), so these calls compile
    exactly what later calls use.  Cold (empty cache), each group in its own process,
    they cost about ``solve`` 20 s, ``polish`` 8 s, ``kkt`` 8 s of CPU on this project's
    2-core machine (each compiles the helpers it calls; all three in one process ~30 s;
    ``python -m benchmarks.compile_time``); numba compiles under a global
    lock, so to overlap them, call this with one group per *process* (e.g. one job per
    group on a process pool before the real work), and later processes load the machine
    code from the cache in well under a second.

    Parameters
    ----------
    groups : a subset of :data:`KERNEL_GROUPS`.

    Raises
    ------
    nimplicit.errors.InvalidOptionError
        (a ``ValueError`` and ``TypeError``) An unknown group name.
    """
    from nimplicit.errors import InvalidOptionError
    unknown = [g for g in groups if g not in KERNEL_GROUPS]
    if unknown:
        raise InvalidOptionError(f"compile_kernels: unknown group(s) {unknown}; the groups are "
                         f"{list(KERNEL_GROUPS)}")
    B, n, m, p = 1, 2, 1, 1
    Q = np.eye(n)[None]
    q = np.ones((B, n))
    G = np.ones((B, m, n))
    h = np.ones((B, m))
    A = np.array([[[1.0, -1.0]]])
    b = np.zeros((B, p))
    y = np.zeros((B, n))
    lam = np.zeros((B, p))
    nu = np.ones((B, m))
    s = np.ones((B, m))
    if "solve" in groups:
        solve_qp_batch(Q, q, G, h, A, b, num_threads=1)
    if "polish" in groups:
        polish_active_set(Q, q, G, h, A, b, y, lam, nu, nu, s, steps=1, accept=1e-13,
                          sign_tol=1e-12, num_threads=1)
    if "kkt" in groups:
        fac = kkt_jacobian_factor(Q, G, A, s, nu, num_threads=1)
        kkt_jacobian_solve_factored(fac, np.ones((B, n + p + m)), num_threads=1)
