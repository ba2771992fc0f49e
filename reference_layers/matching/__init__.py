r"""Graph matching as a relaxed quadratic assignment problem (the paper's section 5.4).

Matching graph 1 (``n`` nodes) to graph 2 (``m`` nodes) is the QAP
``max_X vec(X)' M vec(X)`` over (partial) permutation matrices ``X``
(``n x m``), with the affinity ``M`` (``nm x nm``, symmetric, non-negative)
holding node affinities on its diagonal and edge-pair affinities off it.
Vectorization is row-major throughout: ``y[i*m + a] = X[i, a]``.

Layers
------
:func:`spectral_matching_layer` (SM, Leordeanu and Hebert 2005)
    The relaxation ``max y'My  s.t.  y'y = 1``: the leading eigenvector of
    ``M``.  Output ``y`` with ``|y| = 1`` and ``sum(y) > 0`` (the sign
    convention; a non-negative ``M`` has a non-negative Perron vector, so the
    sum is positive whenever the leading eigenvalue is simple).  The implicit
    residual is the KKT system (the paper's eq. 42) in the unknowns ``(y, lam)``,

    .. math::
        F(y, \lambda; M) = \begin{pmatrix} M y - \lambda y \\
                                           \tfrac12 (1 - y^\top y) \end{pmatrix} = 0,

    written with the factor ``-1/2`` on the norm constraint so that its
    Jacobian, the bordered matrix
    ``[[M - lam I, -y], [-y', 0]]``, is symmetric (MINRES/CG applicable).
    ``lam`` is a second output (``full_output=True``), not eliminated.

:func:`smac_layer` (Cour, Srinivasan and Shi 2007)
    The relaxation with affine constraints ``max y'My / y'y  s.t.  C y = d``.
    With a pivot row ``k`` (``argmax |d_k|``) the constraint ``C y ∝ d`` is the
    homogeneous ``C_eq y = 0``, ``C_eq = C_{-k} - d_{-k} C_k / d_k``; as the
    ratio is scale-invariant, its maximizer is the leading eigenvector ``y``
    of ``M`` on ``null(C_eq)`` (``C`` may have dependent rows: the one-to-one
    constraints with all row and all column sums are accepted), rescaled so that
    the output satisfies the constraint exactly:

    .. math::
        x = y / t, \qquad t = \frac{d^\top C y}{d^\top d}  \quad (C y = t d),

    so ``C x = d``.  (With ``d = 0`` the output is the unit ``y``.)  The
    implicit residual is the KKT system (eq. 44) of
    ``max y'My s.t. y'y = 1, C_eq y = 0`` in ``(y, lam, mu)``:

    .. math::
        F = \begin{pmatrix} M y - \lambda y - C_{eq}^\top \mu \\
                            \tfrac12 (1 - y^\top y) \\ -C_{eq}\, y \end{pmatrix} = 0,

    again with a symmetric bordered Jacobian; the rescaling and ``C_eq`` are
    explicit autograd operations around the implicit node, so gradients reach
    ``M``, ``C`` and ``d``.

:func:`power_iteration_layer` (Zanfir and Sminchisescu 2018)
    ``k`` steps of ``y <- M y / |M y|`` from ``y_0 = 1/sqrt(nm)``,
    differentiated by unrolling (plain autograd): the explicit baseline.

Around them: :func:`sinkhorn` (log-domain, unrolled), :func:`sinkhorn_layer`
(the same bistochastic normalization as an implicit fixed point of the dual
potentials), :func:`voting_layer` (row softmax with temperature),
:func:`hungarian` (discretization, evaluation only) and the affinity builders
(:func:`gaussian_affinity`, :func:`assemble_affinity`, numba forward with numba
VJPs; :func:`node_affinity`, :func:`edge_features`).

Data flow and backward passes
-----------------------------
One validation pass over ``M`` (numba: finite, symmetric, non-negative, and the
row sums ``M 1``, which are the forward's first Lanczos product) -> the forward
eigensolver (:mod:`.eigen`: Lanczos from ``1``, dense ``eigh`` for small ``M``
with a slow Lanczos or on request) -> its byproducts (the dense eigenbasis, or
the Ritz vectors and the Lanczos relation) in a store private to the call's
layer -> the structured solver of the bordered KKT systems (:mod:`.bordered`):
from the eigenbasis (two products), by a balanced, scale-free LU up to
``dense_max`` unknowns, or by CG on the constraint null space deflated with
the forward's Ritz vectors.  ``backward='generic'`` passes the core's
``linear_solver`` instead (``'lu'``, ``'minres'``, ``'gmres'``, ...).

Keywords follow the reference layers' convention: ``full_output``,
``backward`` (``'structured'``/``'generic'``; ``'fast'`` deprecated),
``linear_solver`` and ``linear_solver_options``, ``solver_options`` (validated
keys), ``dense_max``; ``return_eigenvalue``, ``eig_method``, ``eig_tol``,
``eig_dense_max``, ``kkt_dense_max`` (and Sinkhorn's ``tol``, ``max_iter``)
are deprecated aliases.

Ill-posed input raises typed errors: :class:`AffinityError` (not square, not
real, not symmetric, negative entries, all zero), :class:`DegenerateEigenvalueError`
(leading eigenvalue not simple relative to the spectral scale, the one test of
:mod:`nimplicit.spectral`), :class:`InfeasibleConstraintsError` (``C y = d``
inconsistent, or the ratio's maximum not attained on ``C y = d``),
:class:`ConstraintRankError` (no freedom left), :class:`UnknownOptionError`
(``TypeError``) and :class:`InvalidOptionError` (``ValueError``) for options.
The layers declare ``diagnostics=`` with the relative eigen-gap, read by
``verification.diagnose``.
"""
from __future__ import annotations

from .affinity import (assemble_affinity, edge_features, full_edges, gaussian_affinity,
                       gaussian_affinity_reference, node_affinity)
from .assignment import hungarian, matching_accuracy, voting_layer
from .bordered import KKT_DENSE_MAX
from .eigen import DENSE_MAX, EIG_DENSE_MAX, eigen_gap, lanczos_top, leading_eigenpair
from .errors import (AffinityError, ConstraintRankError, DegenerateEigenvalueError,
                     InfeasibleConstraintsError, InvalidOptionError, UnknownOptionError)
from .power_iteration import power_iteration_layer
from .sinkhorn import sinkhorn, sinkhorn_layer
from .smac import homogeneous_constraints, one_to_one_constraints, smac_layer
from .spectral import spectral_matching_layer

__all__ = [
    "spectral_matching_layer", "smac_layer", "power_iteration_layer",
    "sinkhorn", "sinkhorn_layer", "voting_layer", "hungarian", "matching_accuracy",
    "one_to_one_constraints", "homogeneous_constraints", "leading_eigenpair", "lanczos_top",
    "eigen_gap",
    "gaussian_affinity", "gaussian_affinity_reference", "assemble_affinity",
    "node_affinity", "edge_features", "full_edges",
    "AffinityError", "DegenerateEigenvalueError", "InfeasibleConstraintsError",
    "ConstraintRankError", "UnknownOptionError", "InvalidOptionError", "DENSE_MAX",
    "EIG_DENSE_MAX", "KKT_DENSE_MAX",
]
