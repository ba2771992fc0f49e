r"""Spectral matching (Leordeanu and Hebert 2005) as an implicit layer.

The relaxation ``max y'My  s.t.  y'y = 1``: the leading eigenvector of the
affinity ``M``, with the implicit residual (eq. 42, symmetric signs)

.. math::
    F(y, \lambda; M) = \begin{pmatrix} M y - \lambda y \\
                                       \tfrac12 (1 - y^\top y) \end{pmatrix} = 0 .

Data flow of one call: one validation pass over ``M`` (also giving ``M 1``)
-> forward eigensolver (:mod:`.eigen`, chosen by size and gap) -> its
byproducts (eigenbasis or Krylov data) as ``aux`` of :class:`nimplicit.Solution`
-> the structured backward (:class:`.bordered.BorderedKKT`) gets them in ``init``.
"""
from __future__ import annotations

from typing import Optional

import autograd.numpy as anp
import numpy as np
import scipy.linalg.blas
from autograd.builtins import tuple as autograd_tuple
from autograd.extend import defjvp, defvjp, primitive
from autograd.tracer import getval, isbox

from nimplicit import Solution, implicit_layer
from nimplicit.spectral import DEFAULT_GAP_TOL, check_gap_tol, require_simple_eigenvalue

from .bordered import KKT_DENSE_MAX, BorderedKKT
from .eigen import DENSE_MAX, EIG_METHODS, dense_eigendata, leading_eigendata, product
from .validation import (as_real_array, check_affinity, choice, deprecated, parse_options,
                         positive_float, positive_int, resolve_backward)

#: the forward's options (``solver_options``) with their defaults
SOLVER_DEFAULTS = {"eig_method": "auto", "tol": None, "max_iter": 300}
SOLVER_CHECKS = {
    "eig_method": lambda k, v: choice(k, v, EIG_METHODS),
    "tol": lambda k, v: None if v is None else positive_float(k, v, upper=1.0),
    "max_iter": lambda k, v: positive_int(k, v),
}
GAP_HINT = ("Break the symmetry (add node affinities) or use power_iteration_layer, whose output "
            "is always defined.")


def _sm_residual(z, M):
    """Eq. (42) with the symmetric sign: ``(M y - lam y, (1 - y'y)/2)``."""
    y, lam = z
    if anp.ndim(M) == 3:
        My = anp.einsum("bij,bj->bi", M, y)
        return My - lam[:, None] * y, 0.5 * (1.0 - anp.sum(y * y, axis=1))
    return anp.dot(M, y) - lam * y, 0.5 * (1.0 - anp.dot(y, y))


@primitive
def _sym_matvec(M, y):
    """``M @ y`` for an exactly symmetric, C-contiguous float64 ``(N, N)`` ``M``,
    reading one triangle (BLAS ``dsymv``, :func:`.eigen.product`); an autograd
    primitive with the derivatives of ``M @ y``: the cotangent of ``M`` is
    ``outer(g, y)`` (written directly by :func:`_outer`: ``anp.dot``'s
    ``tensordot`` takes about 1.4x as long at 2500 x 2500), that of ``y`` is
    ``M' g = M g``."""
    return product(M, True)(y)


def _sym_matvec_vjp_y(ans, M, y):
    # M' g; equal to M g at the exactly symmetric value, but a traced M needs M' g (its
    # derivative in M is that of the transpose on all square matrices)
    return (lambda g: anp.dot(g, M)) if isbox(M) else (lambda g: _sym_matvec(M, g))


def _outer(g, y):
    """``outer(g, y)``; for plain 1-D float64 vectors by BLAS ``dger`` into zeros
    (``np.zeros``: pages the kernel maps zeroed on first touch), the same numbers
    (``0 + 1.0 * g_i y_j``; a zero is ``+0.0``) as ``np.outer``, C-contiguous, in less CPU time at
    2500 x 2500 (the N x N cotangent of ``M`` is the backward's largest write)."""
    if (isbox(g) or isbox(y) or np.ndim(g) != 1 or np.ndim(y) != 1
            or np.result_type(g, y) != np.float64):
        return anp.outer(g, y)
    G = np.zeros((y.shape[0], g.shape[0]), order="F")      # G' is C-ordered (g.size, y.size)
    return scipy.linalg.blas.dger(1.0, y, g, a=G, overwrite_a=1).T


defvjp(_sym_matvec, lambda ans, M, y: lambda g: _outer(g, y), _sym_matvec_vjp_y)
defjvp(_sym_matvec,
       lambda dM, ans, M, y: anp.dot(dM, y),
       lambda dy, ans, M, y: _sym_matvec(M, dy))


def _one_triangle(M_checked: np.ndarray, symmetric: bool) -> bool:
    """Whether a residual may compute ``M y`` by :func:`_sym_matvec` at the validated
    ``M_checked``: exactly ``symmetric``, 2-D, C-contiguous float64."""
    return (symmetric and M_checked.ndim == 2 and M_checked.dtype == np.float64
            and M_checked.flags.c_contiguous)


def _sm_residual_on(M_checked: np.ndarray, symmetric: bool):
    """:func:`_sm_residual`, with ``M y`` by :func:`_sym_matvec` when ``M`` is the
    validated, exactly ``symmetric`` 2-D float64 ``M_checked`` (plain or traced:
    the core's residual check and the backward's products then read half of
    ``M``); any other ``M`` (a batch, float32, another array) takes
    :func:`_sm_residual`."""
    if not _one_triangle(M_checked, symmetric):
        return _sm_residual

    def residual(z, M):
        if getval(M) is not M_checked:
            return _sm_residual(z, M)
        y, lam = z
        return _sym_matvec(M, y) - lam * y, 0.5 * (1.0 - anp.dot(y, y))
    return residual


def _sm_solver(opts: dict, gap_tol: float, dense_max: int, store: dict):
    def solver(M):
        batched = M.ndim == 3
        # the validation pass's results (row sums, exact symmetry), used once (the layer
        # keeps no input after the call)
        checked = store.get("checked") if store.get("M") is M else None
        store.clear()
        if checked is None:
            checked = check_affinity(M, batched=batched)
        data = []
        for b, Mb in enumerate(M.reshape((-1,) + M.shape[-2:])):
            e = leading_eigendata(Mb, method=opts["eig_method"], tol=opts["tol"],
                                  max_iter=opts["max_iter"], dense_max=dense_max,
                                  row_sums=checked[b].row_sums, symmetric=checked[b].symmetric)
            require_simple_eigenvalue(e.lam, [e.lam2], e.scale, gap_tol=gap_tol,
                                      what="the affinity M",
                                      where=f" (batch instance {b})" if batched else "",
                                      hint=GAP_HINT)
            data.append(e)
        y = np.stack([e.y for e in data]) if batched else data[0].y
        lam = np.array([e.lam for e in data]) if batched else np.array(data[0].lam)
        return Solution((y, lam), aux=data)
    return solver


def _sm_diagnostics(point):
    M = np.asarray(point.inputs[0], dtype=float)
    gap = min(dense_eigendata(Mb).gap for Mb in M.reshape((-1,) + M.shape[-2:]))
    scale = float(np.abs(M).max())
    asym = float(np.abs(M - np.swapaxes(M, -1, -2)).max()) / scale
    return {
        "eigen_gap": (gap, gap > 1e-6, "relative gap (lam1 - lam2)/max|lam| of M; the "
                                       "derivative blows up as it tends to 0"),
        "asymmetry": (asym, asym <= 1e-10, "max|M - M'| / max|M|"),
        "min_entry": (float(M.min()) / scale, M.min() >= -1e-12 * scale,
                      "smallest entry of M relative to max|M| (must be >= 0)"),
    }


class LayerKeywords:
    """The validated keywords shared by :func:`spectral_matching_layer` and
    :func:`~reference_layers.matching.smac.smac_layer` (see :func:`layer_keywords`)."""

    __slots__ = ("opts", "dense_max", "gap_tol", "residual_tol", "backward")

    def __init__(self, opts, dense_max, gap_tol, residual_tol, backward):
        self.opts, self.dense_max, self.gap_tol = opts, dense_max, gap_tol
        self.residual_tol, self.backward = residual_tol, backward


def layer_keywords(layer: str, *, solver_options: Optional[dict], dense_max: int,
                   gap_tol: float, residual_tol: float, backward: Optional[str], linear_solver,
                   eig_method: Optional[str] = None, eig_tol: Optional[float] = None,
                   eig_dense_max: Optional[int] = None,
                   kkt_dense_max: Optional[int] = None) -> LayerKeywords:
    """Map the deprecated aliases (``eig_method``, ``eig_tol`` -> ``solver_options``;
    ``eig_dense_max``, ``kkt_dense_max`` -> ``dense_max``; ``DeprecationWarning``) and
    validate the keywords of the eigen layers (typed errors naming the keyword)."""
    solver_options = dict(solver_options or {})
    for old, key, value in (("eig_method", "eig_method", eig_method), ("eig_tol", "tol", eig_tol)):
        if value is not None:
            solver_options[key] = deprecated(old, f"solver_options={{'{key}': ...}}", value,
                                             layer=layer)
    for old, value in (("eig_dense_max", eig_dense_max), ("kkt_dense_max", kkt_dense_max)):
        dense_max = deprecated(old, "dense_max", value, dense_max, layer=layer)
    return LayerKeywords(parse_options(solver_options, SOLVER_DEFAULTS, SOLVER_CHECKS, layer),
                         positive_int("dense_max", dense_max, minimum=0),
                         check_gap_tol(gap_tol), positive_float("residual_tol", residual_tol),
                         resolve_backward(backward, linear_solver, layer=layer))


def backward_solver(kw: LayerKeywords, kind: str, linear_solver, linear_solver_options):
    """``(linear_solver, linear_solver_options)`` for the core: the structured
    :class:`~.bordered.BorderedKKT` (``kind`` 'sm' or 'smac'; it takes the options
    itself) or the core's solver (``backward='generic'``)."""
    if kw.backward == "structured":
        return BorderedKKT(kind=kind, dense_max=kw.dense_max,
                           **(linear_solver_options or {})), None
    return ("auto" if linear_solver is None else linear_solver), linear_solver_options


def spectral_matching_layer(M, *, full_output: bool = False, backward: Optional[str] = None,
                            linear_solver=None, linear_solver_options: Optional[dict] = None,
                            solver_options: Optional[dict] = None, dense_max: int = DENSE_MAX,
                            gap_tol: float = DEFAULT_GAP_TOL, residual_tol: float = 1e-6,
                            return_eigenvalue: Optional[bool] = None,
                            eig_method: Optional[str] = None, eig_tol: Optional[float] = None,
                            eig_dense_max: Optional[int] = None,
                            kkt_dense_max: Optional[int] = None):
    r"""Spectral matching: the leading eigenvector of the affinity ``M``.

    Parameters
    ----------
    M : array, shape (nm, nm) or (B, nm, nm)
        Real, symmetric, non-negative affinity (a batch along axis 0).
    full_output : bool
        Return ``(y, lam)`` (an autograd tuple) with the leading eigenvalue
        ``lam = y' M y`` (differentiable), instead of ``y``.
    backward : {'structured', 'generic'}
        ``'structured'`` (default): the bordered KKT system solved from the
        forward's eigenbasis (dense forward), by a balanced LU (up to
        ``dense_max`` unknowns) or by projected CG.  ``'generic'``: the core's
        ``linear_solver`` on the autograd Jacobian (``'minres'`` works: the
        Jacobian ``[[M - lam I, -y], [-y', 0]]`` is symmetric).  ``'fast'`` is a
        deprecated alias of ``'structured'``.
    linear_solver, linear_solver_options
        The core solver and its options (``backward='generic'``; the
        options also reach the structured solver: ``rtol``, ``maxiter``,
        ``max_condition``).
    solver_options : dict, optional
        The forward's options: ``eig_method`` in ``{'auto', 'dense',
        'krylov'}`` (default ``'auto'``: Lanczos from ``1``, dense ``eigh`` when
        Lanczos is slow on a small ``M``), ``tol`` (Lanczos stops at
        ``|M y - lam y| <= tol lam``, default ``None``: 1e-13 up to 100 unknowns
        (products are cheap there), 1e-10 above; the implicit gradient's
        error is of order ``tol lam / (lam - lam_2)``; the core's residual check
        ``residual_tol`` must allow it), ``max_iter`` (Lanczos steps, 300).
        An unknown key raises :class:`~.errors.UnknownOptionError` (a ``TypeError``).
    dense_max : int
        Dense eigen fallback and dense backward up to this many unknowns.
    gap_tol : float
        Raise :class:`~nimplicit.spectral.DegenerateEigenvalueError` when
        ``(lam_1 - lam_2) / max|lam_i| <= gap_tol`` (scale-free).
    return_eigenvalue, eig_method, eig_tol, eig_dense_max, kkt_dense_max
        Deprecated aliases of ``full_output``, ``solver_options['eig_method']``,
        ``solver_options['tol']`` and ``dense_max`` (``DeprecationWarning``).

    Returns
    -------
    y : array, shape (nm,) or (B, nm)
        Unit leading eigenvector, sign rule ``sum(y) > 0`` (see
        :func:`~reference_layers.matching.eigen.fix_sign`); with
        ``full_output``, the tuple ``(y, lam)``.

    Notes
    -----
    The derivative with respect to ``M`` is that of the map ``M -> y(M)`` on
    all square matrices near ``M``; for a symmetric parameterization
    ``M(theta)`` autograd's chain rule gives the right gradient.
    Finite-difference checks must perturb ``M`` symmetrically (non-symmetric
    ``M`` is rejected by the forward check).
    """
    layer_name = "spectral_matching_layer"
    full_output = bool(deprecated("return_eigenvalue", "full_output", return_eigenvalue,
                                  full_output, layer=layer_name))
    kw = layer_keywords(layer_name, solver_options=solver_options, dense_max=dense_max,
                        gap_tol=gap_tol, residual_tol=residual_tol, backward=backward,
                        linear_solver=linear_solver, eig_method=eig_method, eig_tol=eig_tol,
                        eig_dense_max=eig_dense_max, kkt_dense_max=kkt_dense_max)
    opts, dense_max, gap_tol = kw.opts, kw.dense_max, kw.gap_tol

    Mv = as_real_array(getval(M), "the affinity M")
    if Mv is not getval(M) and not isbox(M):
        M = Mv
    batched = Mv.ndim == 3
    checked = check_affinity(Mv, batched=batched)
    store = {"M": Mv, "checked": checked}
    solve, linear_solver_options = backward_solver(kw, "sm", linear_solver,
                                                   linear_solver_options)
    residual = _sm_residual_on(Mv, not batched and checked[0].symmetric)
    layer = implicit_layer(
        residual, _sm_solver(opts, gap_tol, dense_max, store), linear_solver=solve,
        batch_axis=0 if batched else None, residual_tol=kw.residual_tol,
        linear_solver_options=linear_solver_options, diagnostics=_sm_diagnostics,
        name="spectral-matching", finite_inputs=(0,))   # check_affinity counted NaN/Inf
    y, lam = layer(M)
    if full_output:
        return autograd_tuple((y, lam)) if isbox(y) else (y, lam)
    return y


__all__ = ["spectral_matching_layer", "KKT_DENSE_MAX"]
