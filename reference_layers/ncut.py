r"""Normalized cuts as an implicit layer (the paper's section 5.2).

For a symmetric non-negative affinity ``W`` with degrees ``d = W 1``,
``D = diag(d)`` and Laplacian ``L = D - W``, the layer returns the
second-smallest generalized eigenpair ``(v, lam)`` of ``(L, D)``:

.. math::

    F(v, \lambda; W) = \begin{pmatrix} (L - \lambda D)\, v \\
                         -\tfrac12 (v^\top D v - 1) \end{pmatrix} = 0 .

Normalization (a convention, documented)
    The default ``normalization="degree"`` fixes ``v^T D v = 1`` (what
    ``scipy.linalg.eigh(L, D)`` returns).  Written as ``-(1/2)(v^T D v - 1)``
    the bordered Jacobian

    .. math::  J = \begin{pmatrix} L - \lambda D & -D v \\ -(D v)^\top & 0 \end{pmatrix}

    is symmetric (indefinite), so MINRES applies to the backward pass.  The
    paper's ``v^T v = 1`` is ``normalization="unit"``; its residual row
    ``-(1/2)(v^T v - 1)`` makes ``J`` non-symmetric (last row ``-v^T``), so the
    matrix-free backward pass uses GMRES there.  ``lam`` is the same in both
    conventions; ``v`` differs by the positive factor ``sqrt(v^T D v)``.

Sign convention (a convention, documented)
    ``v`` and ``-v`` both solve ``F = 0``.  The layer returns the one with
    ``r^T v > 0`` for a fixed reference vector ``r``: by default a fixed
    pseudo-random Gaussian vector (``numpy.random.default_rng(20240527)``,
    length ``N``), or the user's ``sign_reference`` (e.g. a vertical ramp for
    sky/ground images).  A random ``r`` is stable under small perturbations of
    ``W`` unless ``v`` is (nearly) orthogonal to it; the diagnostic
    ``sign_margin = |r^T v| / (|r| |v|)`` measures how far the point is from
    that failure case, where the sign would flip under a tiny perturbation (the
    layer is discontinuous there).  For a random ``r`` the margin is typically
    ``~1/sqrt(N)``.  Functions of ``v v^T`` (or of ``|v|``) do not depend on
    the convention and are what the gradient checks use.

Well-posedness
    The derivative exists when ``lam_2`` is a simple eigenvalue:
    ``lam_1 = 0 < lam_2 < lam_3``.  Invalid graphs raise
    :class:`InvalidGraphError` (negative or asymmetric weights, isolated
    nodes, bad edge lists); a disconnected graph raises
    :class:`DisconnectedGraphError` (then ``lam_2 = 0`` is repeated); a
    (numerically) repeated second eigenvalue raises :class:`EigenGapError`.
    NaN or Inf inputs raise :class:`nimplicit.errors.NonFiniteError`.  The
    layer's ``diagnostics`` report the gaps ``(lam_3 - lam_2)/lam_3`` and
    ``lam_2 - lam_1`` and the sign margin.

Forms
    - dense ``W`` of shape ``(N, N)``: forward ``scipy.linalg.eigh(L, D)``,
      backward by LU of the bordered system (``m = N + 1`` unknowns);
    - batched dense ``W`` of shape ``(B, N, N)``: ``batch_axis=0``, ``B``
      independent bordered systems;
    - sparse: a fixed edge list ``edges (E, 2)`` and differentiable weights
      ``w (E,)``; ``L v = A diag(w) A^T v`` and ``D v = (|A| w) * v`` with the
      fixed signed incidence matrix ``A`` (``N x E``), applied through an
      autograd primitive whose VJP is the transpose (any order).  Forward:
      shift-invert Lanczos (``scipy.sparse.linalg.eigsh`` with ``M = D``,
      ``sigma < 0``) with a residual check; backward (default
      ``linear_solver="krylov"``): the core's matrix-free ``'minres'``
      (``'gmres'`` for ``normalization="unit"``) on autograd products of the
      residual, with the Jacobi-like preconditioner
      ``M^{-1} = diag(D^{-1}, 1)``.  ``D`` depends on the weights, so the
      preconditioner is a factory of the forward point,
      ``nimplicit.linear_solvers.per_point(point -> diag)``, evaluated once per
      point and kept in its cache.  The core refines the solution on the true
      residual until ``|J x - b| / |b| <= rtol = 1e-12``: SciPy's MINRES alone
      stops on a backward-error estimate that, for the ill-conditioned bordered
      system of a nearly disconnected graph, leaves the true residual orders of
      magnitude above its ``rtol``.  ``linear_solver="splu"`` is a sparse LU of
      the assembled bordered matrix.  Neither forms an ``N x N`` inverse.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Optional, Tuple, Union

import autograd.numpy as np
import numpy as onp
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla
from autograd.extend import defjvp, defvjp, primitive
from autograd.builtins import tuple as ag_tuple
from autograd.tracer import isbox

from nimplicit import Solution, implicit_layer
from nimplicit.batch_status import BatchStatus, Outcome
from nimplicit.linear_solvers import LinearSolver, LinearSolverState, per_point
from nimplicit.errors import (EmptyInputError, InvalidOptionError, NimplicitError,
                              NotConvergedError, OptionError, ShapeError,
                              SingularJacobianError, check_backward,
                              check_options, finite_or_raise, renamed, where)
from nimplicit.spectral import (DegenerateEigenvalueError, check_gap_tol,
                                require_simple_eigenvalue)

__all__ = ["ncut_layer", "make_ncut_layer", "SparseNCut", "grid_graph_edges", "ncut_spectrum",
           "InvalidGraphError", "DisconnectedGraphError", "EigenGapError", "DEFAULT_SIGN_SEED"]

#: seed of the default sign-reference vector ``r`` (see the module docstring)
DEFAULT_SIGN_SEED = 20240527
#: relative asymmetry ``max|W - W^T| / max|W|`` above which ``W`` is rejected
SYMMETRY_TOL = 1e-10
#: sparse graphs with at most this many nodes get a dense generalized eigh (ARPACK needs k < N)
SMALL_SPARSE_N = 8
#: diagnostics flag a gap below this (derivatives are amplified by ~1/gap)
GAP_WARN = 1e-4
#: diagnostics flag ``sign_margin * sqrt(N)`` below this
SIGN_MARGIN_WARN = 1e-3


class InvalidGraphError(NimplicitError, ValueError):
    """The affinity is not a valid NCut graph: negative or asymmetric weights,
    an isolated node (zero degree, so ``D`` is singular), or a bad edge list."""


class EigenGapError(DegenerateEigenvalueError):
    """The second-smallest generalized eigenvalue is not simple (``lam_3 ~ lam_2``
    or ``lam_2 ~ lam_1``): the eigenvector is not a function of ``W`` there and
    the bordered Jacobian is singular."""


class DisconnectedGraphError(EigenGapError):
    """The graph has several connected components: ``lam_1 = lam_2 = 0``."""


# ------------------------------------------------------------------------------
# input validation (raw numbers)
# ------------------------------------------------------------------------------

def _check_connected(adjacency: sp.spmatrix, where: str) -> None:
    n_comp, labels = csgraph.connected_components(adjacency, directed=False)
    if n_comp > 1:
        sizes = onp.bincount(labels)
        raise DisconnectedGraphError(
            f"the graph{where} has {n_comp} connected components (sizes "
            f"{sorted(sizes.tolist(), reverse=True)[:6]}): the eigenvalue 0 of (L, D) has "
            f"multiplicity {n_comp}, so the second eigenvector is not unique. Connect the "
            f"components (e.g. add a small constant affinity) or segment each one separately.")


def _check_degrees(d: onp.ndarray, where: str) -> None:
    isolated = onp.flatnonzero(d <= 0)
    if isolated.size:
        raise InvalidGraphError(
            f"the graph{where} has {isolated.size} isolated node(s) with zero degree (the first: "
            f"{isolated[:5].tolist()}), so D = diag(W 1) is singular and the generalized "
            f"eigenproblem (L, D) is undefined. Remove those nodes or give them a positive affinity.")


def _validate_dense(W: onp.ndarray, where: str = "") -> None:
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ShapeError(f"the affinity{where} must be a square (N, N) matrix, got shape {W.shape}")
    finite_or_raise(W, f"the affinity{where}")
    if W.shape[0] < 3:
        raise ShapeError(f"the affinity{where} has N = {W.shape[0]} nodes; the layer needs N >= 3 "
                         f"(lam_3 must exist to check that lam_2 is simple)")
    scale = onp.abs(W).max()
    if (W < 0).any():
        i, j = onp.argwhere(W < 0)[0]
        raise InvalidGraphError(
            f"the affinity{where} has {int((W < 0).sum())} negative entries (e.g. W[{i}, {j}] = "
            f"{W[i, j]:.3g}); NCut needs W >= 0. Use a non-negative affinity such as exp(-dist^2).")
    asym = onp.abs(W - W.T).max()
    if asym > SYMMETRY_TOL * max(scale, 1e-300):
        i, j = onp.unravel_index(onp.argmax(onp.abs(W - W.T)), W.shape)
        raise InvalidGraphError(
            f"the affinity{where} is not symmetric: max|W - W^T| = {asym:.3g} (at [{i}, {j}]) "
            f"relative to max|W| = {scale:.3g} exceeds {SYMMETRY_TOL:g}. Pass (W + W.T) / 2.")
    _check_degrees(W.sum(axis=1), where)
    off = sp.csr_matrix(W - onp.diag(onp.diag(W)))
    _check_connected(off, where)


# ------------------------------------------------------------------------------
# spectra and the forward solvers (raw numbers)
# ------------------------------------------------------------------------------

def _sign_reference(n: int, sign_reference: Optional[onp.ndarray]) -> onp.ndarray:
    if sign_reference is None:
        return onp.random.default_rng(DEFAULT_SIGN_SEED).standard_normal(n)
    try:
        r = onp.asarray(sign_reference, dtype=float)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"sign_reference must be a real vector of shape ({n},), got "
                                 f"{type(sign_reference).__name__}") from None
    if r.shape != (n,):
        raise ShapeError(f"sign_reference must have shape ({n},), got {r.shape}")
    if not onp.isfinite(r).all():
        raise InvalidOptionError(f"sign_reference holds {int((~onp.isfinite(r)).sum())} "
                                 f"non-finite value(s); the sign convention r^T v > 0 needs a "
                                 f"finite vector r")
    if not onp.any(r):
        raise InvalidOptionError("sign_reference must not be the zero vector: the sign convention "
                                 "r^T v > 0 needs r != 0")
    return r


def _gap_check(lams: onp.ndarray, gap_tol: float, where: str) -> None:
    """:class:`EigenGapError` unless ``lam_2`` is simple relative to ``|lam_3|``:
    ``min(lam_2 - lam_1, lam_3 - lam_2) / |lam_3| <= gap_tol`` (the shared test
    :func:`nimplicit.spectral.require_simple_eigenvalue`; ``lam_3`` is the spectral
    scale that matters here, as ``lam_1 = 0`` and the spectrum lies in ``[0, 2]``)."""
    lam1, lam2, lam3 = (float(lam) for lam in lams[:3])
    try:
        require_simple_eigenvalue(
            lam2, (lam1, lam3), abs(lam3), gap_tol=gap_tol,
            what="(L, D) (the second generalized eigenvalue)", where=where,
            hint=f"lam_1, lam_2, lam_3 = {lam1:.6g}, {lam2:.6g}, {lam3:.6g}. Perturb the affinity "
                 f"to separate the eigenvalues, or use a different graph.")
    except DegenerateEigenvalueError as err:
        raise EigenGapError(str(err)) from None


def _fix_sign_and_scale(v: onp.ndarray, d: onp.ndarray, r: onp.ndarray,
                        normalization: str) -> onp.ndarray:
    v = v / onp.sqrt(onp.dot(d * v, v))        # v^T D v = 1
    if normalization == "unit":
        v = v / onp.linalg.norm(v)
    return -v if onp.dot(r, v) < 0 else v


def _dense_spectrum(W: onp.ndarray) -> Tuple[onp.ndarray, onp.ndarray]:
    """Three smallest generalized eigenpairs of ``(L, D)`` for a validated dense ``W``."""
    d = W.sum(axis=1)
    L = onp.diag(d) - W
    lams, vecs = scipy.linalg.eigh(L, onp.diag(d), subset_by_index=[0, 2])
    return lams, vecs


def _incidence(edges: onp.ndarray, n_nodes: int) -> sp.csr_matrix:
    e = len(edges)
    rows = onp.concatenate([edges[:, 0], edges[:, 1]])
    cols = onp.concatenate([onp.arange(e), onp.arange(e)])
    vals = onp.concatenate([onp.ones(e), -onp.ones(e)])
    return sp.csr_matrix((vals, (rows, cols)), shape=(n_nodes, e))


def _sparse_spectrum(weights: onp.ndarray, incidence: sp.csr_matrix, abs_incidence: sp.csr_matrix,
                     *, eig_tol: float = 1e-10, where: str = "", dense_max: int = 8
                     ) -> Tuple[onp.ndarray, onp.ndarray]:
    """Three smallest generalized eigenpairs of ``(L, D)`` by shift-invert Lanczos.

    ``L - sigma D`` with ``sigma = -1e-6`` is positive definite for a connected
    graph (the eigenvalues of ``(L, D)`` lie in ``[0, 2]`` whatever the scale of ``W``); ARPACK's shift-invert mode finds the eigenvalues of
    ``(L, D)`` nearest ``sigma`` (the smallest, since all are >= 0).
    """
    d = abs_incidence @ weights
    L = (incidence @ sp.diags(weights) @ incidence.T).tocsc()
    D = sp.diags(d).tocsc()
    n = len(d)
    if n <= max(dense_max, 4):   # ARPACK needs k < n; a dense eigh is exact and cheap here
        lams, vecs = scipy.linalg.eigh(L.toarray(), onp.diag(d), subset_by_index=[0, 2])
        return lams, vecs
    sigma = -1e-6
    v0 = onp.random.default_rng(0).standard_normal(n) + 1.0
    try:
        lams, vecs = spla.eigsh(L, k=3, M=D, sigma=sigma, which="LM", v0=v0, tol=0.0,
                                maxiter=max(1000, 10 * n))
    except spla.ArpackNoConvergence as exc:
        raise NotConvergedError(
            f"shift-invert Lanczos (eigsh) did not converge for the graph{where}: {exc}. "
            f"Check that the graph is connected and not badly scaled.") from None
    order = onp.argsort(lams)
    lams, vecs = lams[order], vecs[:, order]
    # the convergence check: the eigen-equation's residual, relative to |L| and |v|_D
    lnorm = 2.0 * d.max()
    for k in range(3):
        vk = vecs[:, k]
        res = onp.abs(L @ vk - lams[k] * d * vk).max() / (lnorm * onp.abs(vk).max())
        if not res <= eig_tol:
            raise NotConvergedError(
                f"eigsh returned an inaccurate eigenpair {k + 1} for the graph{where}: relative "
                f"residual max|L v - lam D v| / (|L| max|v|) = {res:.3g} > {eig_tol:g}. The "
                f"eigenvalues may be clustered; check the eigen-gap or loosen eig_tol.")
    return lams, vecs


# ------------------------------------------------------------------------------
# sparse products as an autograd primitive (fixed matrix, differentiable vector)
# ------------------------------------------------------------------------------

class _FixedSparse:
    """A fixed scipy sparse matrix ``M`` with its transpose, for :func:`_sparse_apply`."""

    def __init__(self, M: sp.spmatrix, transpose: Optional["_FixedSparse"] = None):
        self.M = sp.csr_matrix(M)
        self._T = transpose

    @property
    def T(self) -> "_FixedSparse":
        if self._T is None:
            self._T = _FixedSparse(self.M.T, transpose=self)
        return self._T

    def apply(self, x: onp.ndarray) -> onp.ndarray:
        return onp.asarray(self.M @ x) if x.ndim == 1 else onp.asarray(self.M @ x.T).T


@primitive
def _sparse_apply(op: _FixedSparse, x):
    """``M x`` (``x`` of shape ``(k,)``) or ``x M^T`` row-wise (``x`` of shape ``(B, k)``)."""
    return op.apply(onp.asarray(x, dtype=float))


# linear in x: the VJP is the transpose, the JVP the map itself; both call the
# primitive again, so derivatives of any order exist
defvjp(_sparse_apply, None, lambda ans, op, x: lambda g: _sparse_apply(op.T, g))
defjvp(_sparse_apply, None, lambda g, ans, op, x: _sparse_apply(op, g))


# ------------------------------------------------------------------------------
# residuals (autograd.numpy)
# ------------------------------------------------------------------------------

def _constraint(v, Dv, normalization: str):
    if normalization == "degree":
        return -0.5 * (np.sum(v * Dv, axis=-1) - 1.0)
    return -0.5 * (np.sum(v * v, axis=-1) - 1.0)


class _DenseResidual:
    """``F((v, lam), W)`` of the dense layer (a class, so that layers pickle)."""

    def __init__(self, normalization: str):
        self.normalization = normalization

    def __call__(self, y, W):
        v, lam = y
        S = 0.5 * (W + np.swapaxes(W, -1, -2))    # the layer is a function of sym(W)
        d = np.sum(S, axis=-1)
        Dv = d * v
        Lv = Dv - np.matmul(S, v[..., None])[..., 0]
        return Lv - lam[..., None] * Dv, _constraint(v, Dv, self.normalization)


def _dense_residual(normalization: str) -> Callable:
    return _DenseResidual(normalization)


class _SparseResidual:
    """``F((v, lam), weights)`` of the sparse layer (a class, so that layers pickle)."""

    def __init__(self, A: "_FixedSparse", absA: "_FixedSparse", normalization: str):
        self.A, self.absA, self.normalization = A, absA, normalization

    def __call__(self, y, weights):
        v, lam = y
        d = _sparse_apply(self.absA, weights)
        Dv = d * v
        Lv = _sparse_apply(self.A, weights * _sparse_apply(self.A.T, v))
        return Lv - lam * Dv, _constraint(v, Dv, self.normalization)


def _sparse_residual(A: "_FixedSparse", absA: "_FixedSparse", normalization: str) -> Callable:
    return _SparseResidual(A, absA, normalization)


# ------------------------------------------------------------------------------
# diagnostics
# ------------------------------------------------------------------------------

def _gap_diagnostics(lams_per_instance, margins) -> dict:
    lams = onp.atleast_2d(onp.asarray(lams_per_instance, dtype=float))
    scale = onp.maximum(onp.abs(lams[:, 2]), 1e-300)
    upper = (lams[:, 2] - lams[:, 1]) / scale
    lower = lams[:, 1] - lams[:, 0]
    margins = onp.atleast_1d(onp.asarray(margins, dtype=float))
    u, lo, mg = float(upper.min()), float(lower.min()), float(margins.min())
    return {
        "eigen_gap_upper": (u, u > GAP_WARN,
                            f"min over instances of (lam_3 - lam_2)/lam_3; below {GAP_WARN:g} "
                            f"the derivative of v is amplified by ~1/gap"),
        "eigen_gap_lower": (lo, lo > GAP_WARN * float(scale.min()),
                            "min over instances of lam_2 - lam_1 (lam_1 = 0 for a connected graph); "
                            "tiny means a nearly disconnected graph"),
        "sign_margin": (mg, mg > SIGN_MARGIN_WARN,
                        "min over instances of |r^T v| sqrt(N) / (|r| |v|); near 0 the sign "
                        "convention r^T v > 0 can flip under a small perturbation"),
    }


def _margin(r: onp.ndarray, v: onp.ndarray) -> float:
    return abs(float(r @ v)) * onp.sqrt(len(v)) / (onp.linalg.norm(r) * onp.linalg.norm(v))


# ------------------------------------------------------------------------------
# the sparse bordered system, for linear_solver="splu"
# ------------------------------------------------------------------------------

class _BorderedSpluState(LinearSolverState):
    def __init__(self, factor):
        self.factor = factor

    def solve(self, b, transpose=False):
        if onp.ndim(b) != 1:
            raise ShapeError("linear_solver='splu' solves one instance at a time")
        x = self.factor.solve(onp.asarray(b, float), trans="T" if transpose else "N")
        if not onp.all(onp.isfinite(x)):
            raise SingularJacobianError("the bordered NCut Jacobian is singular (sparse LU); the "
                                        "second eigenvalue is probably not simple")
        return x


class BorderedSplu(LinearSolver):
    """A structured linear solver: sparse LU of the explicitly assembled bordered Jacobian.

    ``J = [[L - lam D, -D v], [c, 0]]`` with ``c = -(D v)^T`` (degree) or
    ``-v^T`` (unit), exactly ``dF/dy`` of :func:`_sparse_residual`; factored
    once per forward point in :meth:`init` (from the point's ``(v, lam)`` and
    edge weights), used for ``J`` and ``J^T``.
    """

    name = "splu"
    options: dict = {}

    def __init__(self, incidence: sp.csr_matrix, abs_incidence: sp.csr_matrix,
                 normalization: str):
        super().__init__()
        self.incidence, self.abs_incidence, self.normalization = \
            incidence, abs_incidence, normalization

    def init(self, operator, aux=None):
        point = operator.point
        if point is None or operator.batch_size is not None:
            raise ShapeError("linear_solver='splu' needs the forward point and one instance")
        (v, lam), (w,) = point.y, point.inputs
        v, lam, w = onp.asarray(v, float), float(lam), onp.asarray(w, float)
        A = self.incidence
        d = self.abs_incidence @ w
        L = A @ sp.diags(w) @ A.T
        Dv = (d * v)[:, None]
        last = -(Dv.T if self.normalization == "degree" else v[None, :])
        J = sp.bmat([[L - lam * sp.diags(d), -Dv], [last, None]], format="csc")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.SparseEfficiencyWarning)
            try:
                factor = spla.splu(J)
            except RuntimeError as exc:       # "Factor is exactly singular"
                raise SingularJacobianError(
                    f"the bordered NCut Jacobian is singular (sparse LU: {exc}); the second "
                    f"eigenvalue is probably not simple, or the graph is disconnected") from None
        return _BorderedSpluState(factor)

    def __eq__(self, other):
        return (type(other) is BorderedSplu and other.normalization == self.normalization
                and other.incidence is self.incidence)

    __hash__ = object.__hash__


# ------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------

_NORMALIZATIONS = ("degree", "unit")


def _check_normalization(normalization: str) -> None:
    if not isinstance(normalization, str) or normalization not in _NORMALIZATIONS:
        raise InvalidOptionError(f"normalization must be one of {_NORMALIZATIONS}, got "
                                 f"{normalization!r}")


#: keywords of :func:`nimplicit.implicit_layer` the NCut layers pass on (``**layer_options``)
_PASSED_ON = tuple(name for name in inspect.signature(implicit_layer).parameters
                   if name not in ("residual", "solver", "linear_solver", "batch_axis", "diagnostics"))


def _check_layer_options(layer_options: dict, function: Callable) -> None:
    """:class:`OptionError` naming ``function``'s keywords (its own and those it
    passes to :func:`nimplicit.implicit_layer`) for an unknown one in ``layer_options``."""
    own = [p.name for p in inspect.signature(function).parameters.values()
           if p.kind is p.KEYWORD_ONLY]
    check_options(layer_options, dict.fromkeys(own + list(_PASSED_ON)),
                  f"{function.__name__} (its keywords and those passed to implicit_layer)")


def _check_int(value, name: str, minimum: int) -> int:
    """``value`` as an ``int >= minimum``; :class:`InvalidOptionError` otherwise (a bool is not one)."""
    if isinstance(value, (bool, onp.bool_)) or not isinstance(value, (int, onp.integer)):
        raise InvalidOptionError(f"{name} must be an integer >= {minimum}, got {value!r} "
                                 f"of type {type(value).__name__}")
    if value < minimum:
        raise InvalidOptionError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, onp.bool_)):
        raise InvalidOptionError(f"{name} must be True or False, got {value!r}")
    return bool(value)


class _DenseForward:
    """The dense forward ``W -> (v, lam)`` and its diagnostics (picklable)."""

    def __init__(self, batched: bool, normalization: str, sign_reference, gap_tol: float,
                 throw: bool = True):
        self.batched, self.normalization = batched, normalization
        self.sign_reference, self.gap_tol = sign_reference, gap_tol
        self.throw = throw

    def _instance(self, W, at):
        _validate_dense(W, at)
        lams, vecs = _dense_spectrum(W)
        _gap_check(lams, self.gap_tol, at)
        r = _sign_reference(len(W), self.sign_reference)
        return lams, _fix_sign_and_scale(vecs[:, 1], W.sum(axis=1), r, self.normalization)

    def __call__(self, W):
        W = onp.asarray(W, dtype=float)
        if not self.batched:
            lams, v = self._instance(W, "")
            return v, onp.asarray(lams[1])
        if W.ndim != 3:
            raise ShapeError(f"the batched NCut layer needs W of shape (B, N, N), got {W.shape}")
        if W.shape[0] == 0:
            raise EmptyInputError(f"the batch of affinities is empty (shape {W.shape}): there is "
                                  f"no instance to segment; skip the call for an empty batch")
        if self.throw:
            out = [self._instance(Wb, where(b)) for b, Wb in enumerate(W)]
            return onp.stack([v for _, v in out]), onp.array([lams[1] for lams, _ in out])
        return self._each_or_status(W)

    def _each_or_status(self, W):
        """``throw=False``: a typed failure of one graph (invalid graph, repeated
        eigenvalue) gives NaN rows and its outcome; the others are solved."""
        v = onp.full(W.shape[:2], onp.nan)
        lam = onp.full(W.shape[0], onp.nan)
        failures = {}
        for b, Wb in enumerate(W):
            try:
                lams, v[b] = self._instance(Wb, where(b))
                lam[b] = lams[1]
            except DegenerateEigenvalueError as exc:
                failures[b] = (Outcome.SINGULAR_JACOBIAN, str(exc))
            except NimplicitError as exc:
                failures[b] = (Outcome.SOLVER_FAILED, str(exc))
        return Solution((v, lam), status=BatchStatus.from_failures(len(W), failures))

    def diagnostics(self, point):
        W = onp.asarray(point.inputs[0], dtype=float)
        Ws = W if self.batched else W[None]
        v = onp.asarray(point.y[0]).reshape(len(Ws), -1)
        lams = [_dense_spectrum(Wb)[0] for Wb in Ws]
        margins = [_margin(_sign_reference(Wb.shape[0], self.sign_reference), vb)
                   for Wb, vb in zip(Ws, v)]
        return _gap_diagnostics(lams, margins)


def make_ncut_layer(*, batch_axis: Optional[int] = None, normalization: str = "degree",
                    sign_reference: Optional[onp.ndarray] = None, gap_tol: float = 1e-8,
                    linear_solver: str = "lu", batched: Optional[bool] = None, **layer_options):
    r"""The dense NCut layer ``W -> (v, lam)`` as an :class:`nimplicit.ImplicitLayer`.

    Parameters
    ----------
    batch_axis : {None, 0}
        ``0``: ``W`` of shape ``(B, N, N)`` (``v`` is ``(B, N)``, ``lam`` is
        ``(B,)``) instead of ``(N, N)``.  (``batched=True`` is the deprecated
        spelling.)  The layer returns ``(v, lam)``.
    normalization : {"degree", "unit"}
        ``v^T D v = 1`` (symmetric bordered Jacobian) or the paper's ``v^T v = 1``.
    sign_reference : array (N,), optional
        ``r`` of the sign convention ``r^T v > 0`` (default: the fixed Gaussian vector).
    gap_tol : float
        :class:`EigenGapError` when ``(lam_3 - lam_2)`` or ``(lam_2 - lam_1)`` is
        ``<= gap_tol * lam_3``.
    linear_solver : str or callable
        Backward solver of the bordered system (default ``'lu'``).
    **layer_options
        Passed to :func:`nimplicit.implicit_layer` (``residual_tol``,
        ``linear_solver_options``, ...).
    """
    _check_normalization(normalization)
    gap_tol = check_gap_tol(gap_tol)
    _check_layer_options(layer_options, make_ncut_layer)
    if batched is not None:
        batch_axis = renamed("batched", "batch_axis=0", "make_ncut_layer", 0 if batched else None)
    if batch_axis not in (None, 0):
        raise OptionError(f"make_ncut_layer: batch_axis must be None or 0, got {batch_axis!r}")
    batched = batch_axis == 0

    forward = _DenseForward(batched, normalization, sign_reference, gap_tol,
                            throw=bool(layer_options.get("throw", True)))
    solver, diagnostics = forward, forward.diagnostics

    layer_options.setdefault("name", "ncut-batched" if batched else "ncut-dense")
    return implicit_layer(_dense_residual(normalization), solver, linear_solver=linear_solver,
                          batch_axis=0 if batched else None, diagnostics=diagnostics,
                          **layer_options)


class SparseNCut:
    r"""The NCut layer on a fixed sparse graph: ``weights (E,) -> (v, lam)``.

    Parameters
    ----------
    edges : int array (E, 2)
        Undirected edges ``(i, j)``, ``i != j``, each listed once (a repeated
        edge adds its weights); the structure is fixed, the weights are the
        differentiable input.
    n_nodes : int
        ``N``; every node must have an edge of positive weight.
    normalization, sign_reference, gap_tol
        As in :func:`make_ncut_layer`.
    backward : {"generic", "structured"}, optional
        ``"generic"`` (default): the core's Krylov solver on the bordered
        system, ``'minres'`` (``normalization="degree"``, symmetric ``J``) or
        ``'gmres'`` (``"unit"``) with the options :meth:`krylov_options`
        (preconditioner ``diag(D^{-1}, 1)``, ``rtol=1e-12`` on the true
        relative residual, refinements; entries of ``linear_solver_options``
        override them).  ``"structured"``: sparse LU of the assembled bordered
        matrix (:class:`BorderedSplu`; fast, exact).  ``"fast"`` is a
        deprecated alias of "structured"; ``linear_solver='splu'`` /
        ``'krylov'`` are the deprecated spellings of the two.
    linear_solver : str, LinearSolver or callable, optional
        Only with ``backward="generic"``: any solver of
        :mod:`nimplicit.linear_solvers`, passed to the core unchanged (without
        the preconditioner).
    solver_options : dict, optional
        ``{"eig_tol": 1e-10}``: convergence check of the forward eigensolver
        (relative eigen-residual); ``eig_tol=`` is the deprecated spelling.
    dense_max : int
        Graphs with at most this many nodes use a dense ``eigh`` forward.
    full_output : bool
        ``True`` (default): ``(v, lam)``; ``False``: ``v`` only.
    **layer_options
        Passed to :func:`nimplicit.implicit_layer`.

    Examples
    --------
    >>> import numpy as onp
    >>> edges = grid_graph_edges(8, 8, radius=1)
    >>> weights = onp.random.default_rng(0).uniform(0.5, 1.0, len(edges))   # (E,) > 0
    >>> layer = SparseNCut(edges, 8 * 8)
    >>> v, lam = layer(weights)
    >>> v.shape, bool(0 < lam < 1)
    ((64,), True)
    """

    def __init__(self, edges, n_nodes: int, *, normalization: str = "degree",
                 sign_reference: Optional[onp.ndarray] = None, gap_tol: float = 1e-8,
                 backward: Optional[str] = None,
                 linear_solver: Optional[Union[str, Callable]] = None,
                 solver_options: Optional[dict] = None, dense_max: int = SMALL_SPARSE_N,
                 full_output: bool = True, eig_tol: Optional[float] = None, **layer_options):
        _check_normalization(normalization)
        gap_tol = check_gap_tol(gap_tol)
        _check_layer_options(layer_options, SparseNCut.__init__)
        if eig_tol is not None:
            solver_options = {**(solver_options or {}),
                              "eig_tol": renamed("eig_tol", "solver_options={'eig_tol': ...}",
                                                 "SparseNCut", eig_tol)}
        solver_options = check_options(solver_options, {"eig_tol": 1e-10}, "SparseNCut solver_options")
        eig_tol = solver_options["eig_tol"]
        if (isinstance(eig_tol, (bool, onp.bool_)) or not isinstance(eig_tol, (int, float, onp.number))
                or not (onp.isfinite(eig_tol) and eig_tol > 0)):
            raise InvalidOptionError(f"SparseNCut: solver_options['eig_tol'] must be a finite "
                                     f"positive number, got {eig_tol!r}")
        eig_tol = float(eig_tol)
        if linear_solver in ("splu", "krylov"):
            new = "backward='structured'" if linear_solver == "splu" else "backward='generic'"
            backward = renamed(f"linear_solver={linear_solver!r}", new, "SparseNCut",
                               "structured" if linear_solver == "splu" else "generic")
            linear_solver = None
        backward = check_backward(backward or "generic", "SparseNCut")
        if backward == "structured" and linear_solver is not None:
            raise OptionError("SparseNCut: linear_solver is only meaningful with backward='generic'")
        self.backward = backward
        self.dense_max = _check_int(dense_max, "SparseNCut: dense_max", 0)
        self.full_output = _check_bool(full_output, "SparseNCut: full_output")
        edges = onp.asarray(edges)
        if edges.ndim != 2 or edges.shape[1] != 2 or edges.shape[0] == 0:
            raise ShapeError(f"edges must be a non-empty integer array of shape (E, 2), got {edges.shape}")
        if edges.dtype.kind not in "iu":
            raise InvalidGraphError(f"edges must hold integer node indices, got dtype {edges.dtype}")
        n_nodes = _check_int(n_nodes, "SparseNCut: n_nodes", 0)
        if n_nodes < 3:
            raise ShapeError(f"the graph needs N >= 3 nodes, got {n_nodes}")
        if edges.min() < 0 or edges.max() >= n_nodes:
            raise InvalidGraphError(f"edge indices must lie in [0, {n_nodes}), got range "
                                    f"[{edges.min()}, {edges.max()}]")
        loops = onp.flatnonzero(edges[:, 0] == edges[:, 1])
        if loops.size:
            raise InvalidGraphError(f"the edge list has {loops.size} self-loop(s) (e.g. edge "
                                    f"{int(loops[0])}); they do not change L but would change D: "
                                    f"remove them")
        self.edges = edges.astype(onp.int64)
        self.n_nodes = n_nodes
        self.normalization = normalization
        self.gap_tol = gap_tol
        self.eig_tol = eig_tol
        self.sign_reference = _sign_reference(n_nodes, sign_reference)
        self.incidence = _incidence(self.edges, n_nodes)
        self.abs_incidence = abs(self.incidence).tocsr()
        A, absA = _FixedSparse(self.incidence), _FixedSparse(self.abs_incidence)
        self._abs_op = absA
        if backward == "structured":
            linear_solver = BorderedSplu(self.incidence, self.abs_incidence, normalization)
        elif linear_solver is None:
            linear_solver = "minres" if normalization == "degree" else "gmres"
            layer_options["linear_solver_options"] = {
                **self.krylov_options(), **(layer_options.get("linear_solver_options") or {})}
        layer_options.setdefault("name", "ncut-sparse")
        self.layer = implicit_layer(_sparse_residual(A, absA, normalization), self._solve,
                                    linear_solver=linear_solver, diagnostics=self._diagnostics,
                                    **layer_options)

    def krylov_options(self) -> dict:
        """The core Krylov options of the default backward solve.

        ``preconditioner``: ``M^{-1} = diag(D^{-1}, 1)`` with ``D = diag(|A| w)``
        at the forward point (symmetric positive definite, as MINRES needs): it
        equilibrates the ``(L - lam D)`` block, whose rows scale with the
        degrees.  ``rtol=1e-12`` is met by the true residual ``|J x - b|/|b|``
        after up to ``refinements=6`` restarts on it; gradients accurate to
        ~1e-12 keep finite differences of them (second-order checks) clean,
        which ``rtol=1e-10`` does not, at ~5% more products.
        """
        options = {"preconditioner": per_point(self._preconditioner), "rtol": 1e-12,
                   "refinements": 6}
        if self.normalization == "unit":
            options["restart"] = 100
        return options

    def _preconditioner(self, point) -> onp.ndarray:
        d = self.abs_incidence @ onp.asarray(point.inputs[0], dtype=float)
        return onp.concatenate([1.0 / d, [1.0]])

    def validate(self, weights: onp.ndarray) -> None:
        """Raise a typed error unless ``weights`` define a valid connected graph."""
        w = onp.asarray(weights, dtype=float)
        if w.shape != (len(self.edges),):
            raise ShapeError(f"weights must have shape ({len(self.edges)},) (one per edge), got {w.shape}")
        finite_or_raise(w, "the edge weights")
        if (w < 0).any():
            k = int(onp.flatnonzero(w < 0)[0])
            raise InvalidGraphError(
                f"{int((w < 0).sum())} edge weight(s) are negative (e.g. weights[{k}] = {w[k]:.3g} "
                f"on edge {self.edges[k].tolist()}); NCut needs non-negative affinities.")
        _check_degrees(self.abs_incidence @ w, "")
        pos = w > 0
        adj = sp.csr_matrix((onp.ones(pos.sum()), (self.edges[pos, 0], self.edges[pos, 1])),
                            shape=(self.n_nodes, self.n_nodes))
        _check_connected(adj, "")

    def degrees(self, weights):
        """``d = |A| w``, the node degrees (differentiable in ``weights``, any order)."""
        return _sparse_apply(self._abs_op, weights)

    def spectrum(self, weights) -> Tuple[onp.ndarray, onp.ndarray]:
        """The three smallest generalized eigenpairs ``(lams (3,), vecs (N, 3))`` of ``(L, D)``."""
        w = onp.asarray(weights, dtype=float)
        self.validate(w)
        return _sparse_spectrum(w, self.incidence, self.abs_incidence, eig_tol=self.eig_tol,
                                dense_max=self.dense_max)

    def _solve(self, weights):
        w = onp.asarray(weights, dtype=float)
        lams, vecs = self.spectrum(w)
        _gap_check(lams, self.gap_tol, "")
        v = _fix_sign_and_scale(vecs[:, 1], self.abs_incidence @ w, self.sign_reference,
                                self.normalization)
        return v, onp.asarray(lams[1])

    def _diagnostics(self, point) -> dict:
        lams, _ = self.spectrum(point.inputs[0])
        return _gap_diagnostics(lams, [_margin(self.sign_reference, onp.asarray(point.y[0]))])

    def __call__(self, weights):
        return _call(self.layer, weights, self.full_output)


def ncut_layer(W, *, edges=None, n_nodes: Optional[int] = None, normalization: str = "degree",
               sign_reference: Optional[onp.ndarray] = None, gap_tol: float = 1e-8,
               full_output: Optional[bool] = None, backward: Optional[str] = None,
               linear_solver: Optional[Union[str, Callable]] = None,
               solver_options: Optional[dict] = None, dense_max: Optional[int] = None,
               **layer_options):
    r"""Second-smallest generalized eigenpair ``(v, lam)`` of ``(D - W, D)``, differentiable in ``W``.

    Solves ``(L - lam D) v = 0`` with ``v^T D v = 1`` (``normalization="degree"``,
    default) or ``v^T v = 1`` (``"unit"``, the paper's eq. 37) and the sign
    convention ``r^T v > 0`` (see the module docstring).

    Parameters
    ----------
    W : array (N, N), (B, N, N), or (E,) with ``edges``
        Symmetric non-negative affinity (the layer is a function of
        ``(W + W^T)/2``, so its gradient is symmetric), a batch of them, or the
        weights of a sparse graph.
        A ``scipy.sparse`` matrix is read as a sparse graph (the upper triangle
        of ``(W + W^T)/2``; the result equals the dense one, but a sparse matrix
        is data, not differentiable: pass its weights with ``edges=`` for that).
    edges : int array (E, 2), optional
        Fixed edge list of a sparse graph (then ``W`` holds its weights and
        ``n_nodes`` is required); for repeated calls build a :class:`SparseNCut`
        once instead.
    normalization, sign_reference, gap_tol
        See :func:`make_ncut_layer` and :class:`SparseNCut`.
    full_output : bool, optional
        ``True``: return ``(v, lam)``; ``False``: ``v`` only.  The default
        (``None``) returns ``(v, lam)`` as before; it becomes ``False`` in the
        next release (the keyword convention of the reference layers).
    backward : {"generic", "structured"}, optional
        ``"generic"`` (default): the core's linear solver on the autograd
        Jacobian (``linear_solver``, default ``'lu'`` dense, Krylov sparse);
        ``"structured"``: the sparse LU of the bordered system (sparse graphs
        only).  ``"fast"`` is a deprecated alias of ``"structured"``.
    linear_solver : str, LinearSolver or callable, optional
        Only with ``backward="generic"``; with ``linear_solver_options``
        passed to the core.
    solver_options : dict, optional
        Forward options: ``{"eig_tol": 1e-10}`` (sparse graphs); the dense
        forward (LAPACK ``eigh``) has none.  Unknown keys raise
        :class:`~nimplicit.errors.OptionError`.
    dense_max : int, optional
        Sparse graphs with at most this many nodes use a dense ``eigh``.
    **layer_options
        Passed to :func:`nimplicit.implicit_layer` (``residual_tol``,
        ``linear_solver_options``, ...).

    Returns
    -------
    v : array (N,) or (B, N)
    lam : array () or (B,), when ``full_output`` is not False

    Raises
    ------
    OptionError
        (a ``ValueError`` and a ``TypeError``) naming the option: an unknown
        keyword (the message lists ncut_layer's keywords and those passed to
        :func:`nimplicit.implicit_layer`), ``normalization`` not in
        ``("degree", "unit")``, ``gap_tol`` not a finite number in ``[0, 1)``,
        ``n_nodes`` / ``dense_max`` not a non-negative integer (``n_nodes``
        with a dense ``W`` must equal its ``N``), ``full_output`` not a bool,
        ``sign_reference`` zero or non-finite.
    EmptyInputError
        An empty batch ``(0, N, N)``.
    EigenGapError
        ``lam_2`` not simple: ``min(lam_2 - lam_1, lam_3 - lam_2) / |lam_3| <=
        gap_tol`` (the shared relative test
        :func:`nimplicit.spectral.require_simple_eigenvalue`, invariant under
        ``W -> c W``); a :class:`~nimplicit.spectral.DegenerateEigenvalueError`.

    Examples
    --------
    >>> import numpy as onp
    >>> from autograd import grad
    >>> W = onp.random.default_rng(0).uniform(0.1, 1.0, (5, 5))
    >>> W = 0.5 * (W + W.T)                  # symmetric, non-negative
    >>> dlam_dW = grad(lambda W: ncut_layer(W)[1])(W)
    >>> dlam_dW.shape, bool(onp.allclose(dlam_dW, dlam_dW.T))
    ((5, 5), True)
    """
    full = True if full_output is None else _check_bool(full_output, "ncut_layer: full_output")
    _check_layer_options(layer_options, ncut_layer)
    sparse_kw = dict(normalization=normalization, sign_reference=sign_reference, gap_tol=gap_tol,
                     backward=backward, linear_solver=linear_solver, solver_options=solver_options,
                     full_output=full, **({} if dense_max is None else {"dense_max": dense_max}),
                     **layer_options)
    if edges is not None:
        if n_nodes is None:
            raise OptionError("ncut_layer: the sparse form needs n_nodes together with edges")
        return SparseNCut(edges, n_nodes, **sparse_kw)(W)
    if sp.issparse(W):
        edges, weights, n = _sparse_to_edges(W)
        return SparseNCut(edges, n, **sparse_kw)(weights)
    check_options(solver_options, {}, "ncut_layer (dense W) solver_options")
    if check_backward(backward or "generic", "ncut_layer") == "structured":
        raise OptionError("ncut_layer: backward='structured' needs a sparse graph (edges= or a "
                          "scipy.sparse W); the dense layer's backward is the core's LU")
    ndim = onp.ndim(W)
    if ndim not in (2, 3):
        raise ShapeError(f"W must have shape (N, N) or (B, N, N) (or pass edges= for weights), "
                         f"got {onp.shape(W)}")
    _check_dense_only(onp.shape(W), n_nodes, dense_max)
    layer = make_ncut_layer(batch_axis=0 if ndim == 3 else None, normalization=normalization,
                            sign_reference=sign_reference, gap_tol=gap_tol,
                            linear_solver=linear_solver or "lu", **layer_options)
    return _call(layer, W, full)


def _check_dense_only(shape: tuple, n_nodes, dense_max) -> None:
    """``n_nodes`` and ``dense_max`` describe sparse graphs: with a dense ``W``
    they must be absent or (``n_nodes``) agree with ``W``."""
    if n_nodes is not None:
        n = _check_int(n_nodes, "ncut_layer: n_nodes", 0)
        if n != shape[-1]:
            raise InvalidOptionError(
                f"ncut_layer: n_nodes={n} is only used with edges= (a sparse graph); the dense W "
                f"of shape {shape} has N = {shape[-1]} nodes. Drop n_nodes, or pass the edge weights "
                f"with edges=")
    if dense_max is not None:
        _check_int(dense_max, "ncut_layer: dense_max", 0)


def _call(layer, x, full_output: bool):
    """``layer(x)`` as the public functions return it; with ``throw=False`` also the status."""
    if layer.throw:
        v, lam = layer(x)
        return _outputs(v, lam, full_output)
    (v, lam), status = layer(x)
    return _outputs(v, lam, full_output), status


def _outputs(v, lam, full_output: bool):
    """``(v, lam)`` (an autograd tuple when traced, so ``make_vjp`` of the layer sees it) or ``v``."""
    if not full_output:
        return v
    return ag_tuple((v, lam)) if isbox(v) or isbox(lam) else (v, lam)


def _sparse_to_edges(W) -> Tuple[onp.ndarray, onp.ndarray, int]:
    """The edge form ``(edges, weights, N)`` of a symmetric scipy.sparse ``W``: the
    upper triangle of ``(W + W^T)/2`` (a sparse ``W`` is data, not differentiable)."""
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ShapeError(f"a sparse W must be square (N, N), got {W.shape}")
    if W.dtype.kind not in "fiu":
        raise ShapeError(f"a sparse W must be real, got dtype {W.dtype}")
    sym = sp.triu((W + W.T) * 0.5, k=1).tocoo()
    keep = sym.data != 0
    edges = onp.stack([sym.row[keep], sym.col[keep]], axis=1).astype(onp.int64)
    return edges, onp.asarray(sym.data[keep], dtype=float), W.shape[0]


def ncut_spectrum(W) -> Tuple[onp.ndarray, onp.ndarray]:
    """The three smallest generalized eigenpairs of ``(D - W, D)`` for a dense ``W``
    (validated; raw numbers, not differentiable) -- for diagnostics and baselines."""
    W = onp.asarray(W, dtype=float)
    _validate_dense(W)
    return _dense_spectrum(W)


def grid_graph_edges(height: int, width: int, radius: float = 1.0) -> onp.ndarray:
    """Edges ``(E, 2)`` between pixels of a ``height x width`` grid (raster order,
    node ``i * width + j``) at Euclidean distance ``<= radius``, each once (``i < j``)."""
    r = int(onp.floor(radius))
    offsets = [(di, dj) for di in range(0, r + 1) for dj in range(-r, r + 1)
               if (di > 0 or dj > 0) and di * di + dj * dj <= radius * radius + 1e-12]
    idx = onp.arange(height * width).reshape(height, width)
    out = []
    for di, dj in offsets:
        rows = slice(0, height - di)                     # di >= 0 by construction
        cols = slice(max(0, -dj), width - max(0, dj))
        src = idx[rows, cols]
        dst = idx[di:di + src.shape[0], cols.start + dj:cols.start + dj + src.shape[1]]
        out.append(onp.stack([src.ravel(), dst.ravel()], axis=1))
    return onp.concatenate(out).astype(onp.int64)
