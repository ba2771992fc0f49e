"""Spectral matching (Leordeanu and Hebert 2005) as an implicit layer."""
from __future__ import annotations

from typing import Optional

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from nimplicit import implicit_layer

from .bordered import KKT_DENSE_MAX, _linear_solver
from .eigen import EIG_DENSE_MAX, _require_gap, eigen_gap, leading_eigenpair
from .validation import _check_affinity



def _sm_residual(z, M):
    """Eq. (42) with the symmetric sign: ``(M y - lam y, (1 - y'y)/2)``."""
    y, lam = z
    if anp.ndim(M) == 3:
        My = anp.einsum("bij,bj->bi", M, y)
        return My - lam[:, None] * y, 0.5 * (1.0 - anp.sum(y * y, axis=1))
    return anp.dot(M, y) - lam * y, 0.5 * (1.0 - anp.dot(y, y))


def _sm_solver(eig_method: str, gap_tol: float, eig_dense_max: int, eig_tol: float):
    def solver(M):
        M = np.asarray(M, float)
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
            return np.stack(ys), np.array(lams)
        return ys[0], np.array(lams[0])
    return solver


def _sm_diagnostics(point):
    M = np.asarray(point.inputs[0], float)
    gap = eigen_gap(M)
    scale = float(np.abs(M).max())
    asym = float(np.abs(M - np.swapaxes(M, -1, -2)).max()) / scale
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
    Mv = np.asarray(getval(M))
    layer = implicit_layer(
        _sm_residual, _sm_solver(eig_method, gap_tol, eig_dense_max, eig_tol),
        linear_solver=_linear_solver("sm", linear_solver, kkt_dense_max),
        batch_axis=0 if Mv.ndim == 3 else None, residual_tol=residual_tol,
        linear_solver_options=linear_solver_options, diagnostics=_sm_diagnostics,
        name="spectral-matching")
    y, lam = layer(M)
    return (y, lam) if return_eigenvalue else y

