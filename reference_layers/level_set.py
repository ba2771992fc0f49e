r"""The level-set layer: the surface ``{x : phi(x) = level}`` of a grid field.

The paper's section 5.3.  A field ``phi`` sampled on a regular grid is read as
its trilinear interpolant ``phi_tri`` (eq. 39), whose zero set is the
continuous surface; marching cubes extracts a triangle mesh with one vertex
on every grid edge whose two corners lie on opposite sides of ``level``.
The vertices are a function of ``phi`` and ``level`` defined implicitly by an
equation per vertex; their derivatives come from the core's implicit node
(:func:`nimplicit.implicit_layer`, ``batch_axis=0``, one instance per vertex).

Two backward conventions (``mode``)
-----------------------------------
``mode="edge"`` (the derivative of what the forward computes)
    Vertex ``n`` lies on the grid edge ``(c0, c1)`` (``phi[c0] <= level <
    phi[c1]``, unit step ``c1 - c0``) at ``v = (c0 + t (c1 - c0)) * spacing``.
    The unknown is the scalar ``t`` and the residual is the 1-D linear
    interpolant along that edge,

    .. math::  F_n(t, \phi, \ell) = \phi[c_0] + t\,(\phi[c_1] - \phi[c_0]) - \ell = 0,

    a square ``1 x 1`` block per vertex with ``dF/dt = phi[c1] - phi[c0] > 0``;
    ``v`` is then an explicit autograd map of ``t``.  This is exactly the
    derivative of marching cubes' output as long as no grid value crosses
    ``level`` (the mesh's topology is piecewise constant in ``phi``), so
    finite differences of the forward check it.  Second derivatives work.
``mode="normal"`` (the MeshSDF convention)
    The unknown is the vertex ``v`` itself (3 numbers) and the residual is the
    trilinear surrogate,

    .. math::  F_n(v, \phi, \ell) = \phi_{tri}(v) - \ell = 0,

    one equation in three unknowns: a ``1 x 3`` block ``g^T`` with
    ``g = grad phi_tri(v)``.  The minimum-norm solution of the linearization,
    ``dv = -g (dphi_tri(v) - d ell) / |g|^2``, moves the vertex along the
    surface normal by the amount that keeps it on the surrogate surface
    (the ``1/|grad phi|`` factor is kept).  Equivalently ``dv_normal =
    n n^T dv_edge`` with ``n = g/|g|``: the normal component of the edge-mode
    derivative, tangential part dropped.  First order only (a minimum-norm
    solve; the core raises ``UnsupportedError`` for higher orders).

Which cell's interpolant at a vertex
    A vertex lies on a grid edge, which up to four cells share.  The
    interpolant is continuous there but its gradient is not: the component
    along the edge is ``(phi[c1] - phi[c0]) / h`` in every cell, the two
    components across it differ from cell to cell.  The rule used here: the
    cell whose lowest corner is ``min(c0, c1)`` (componentwise), shifted down
    by one in any axis where that corner is the last grid point (the cell must
    exist).  So the across-edge components are *forward* differences
    ``(phi[c + e_k] - phi[c]) / h_k`` at the edge, backward differences on the
    grid's upper boundary faces.

Values equal to the level
    The kernel's rule: ``phi <= level`` is inside.  A grid value exactly equal
    to ``level`` gives a vertex with ``t = 0`` sitting on that grid point; the
    derivative returned is the one-sided derivative of the current topology
    (raising that value would remove the vertex).

Inputs of the node
    Not the grid: the values the residual reads, gathered from ``phi`` (the
    ``(V, 2)`` edge ends, or the ``(V, 8)`` corners of each vertex's cell) by
    a traceable gather whose VJP is one scatter-add onto the grid
    (``numpy.bincount`` for the edge ends, a compiled loop for the corners;
    autograd's fancy-index VJP, ``np.add.at``, is several times slower),
    plus ``level``.  The node then works on ``O(V)`` numbers only.

Where the backward's time goes (and why it is no slower than the forward)
    The forward's byproducts reach the backward: the solver returns
    ``Solution(y, JacobianRows(...))``, the closed-form rows of ``J``
    (``phi[c1] - phi[c0]`` on an edge, ``grad phi_tri`` in normal mode),
    computed on the first solve only, so the backward forms no Jacobian by
    autograd.  The residuals (:func:`trilinear`, the edge interpolant) and
    the vertex placement are single autograd primitives with closed-form
    derivative rules: first-order products run as one pass over the
    vertices (small numba kernels in :mod:`reference_layers.kernels.marching_cubes`,
    compiled on first use and cached), higher orders use the same rules
    written in ``autograd.numpy`` (traceable).  In edge mode the vertices on
    raw numbers are the kernel's own (same formula, bit for bit).  What is
    left of a VJP is ``O(V)`` work plus the one scatter onto a fresh zero
    grid (the gradient itself), which on large grids is bound by the cost
    of touching that memory.

Linear solves
    Blocks are ``1 x 1`` (edge) or ``1 x 3`` (normal), one per vertex, so by
    default the layer passes the core a structured solver,
    :class:`VertexBlocks`, that takes the ``V`` rows of ``J`` from the
    forward (:class:`JacobianRows`; without them, one batched VJP) and
    solves every block in closed form with NumPy (``x = b / d`` and
    ``x = g b / |g|^2``); ``backward="generic"`` with
    ``linear_solver='lstsq'`` (the core's batched SVD, same result) or any
    other core solver can be chosen.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import autograd.numpy as np
import numpy as onp
from autograd.extend import defjvp, defvjp, primitive
from autograd.tracer import getval, isbox

from nimplicit import Solution, implicit_layer
from nimplicit.errors import NonFiniteError, ShapeError, SingularJacobianError
from nimplicit.errors import OptionError, check_backward, check_options, renamed
from nimplicit.linear_solvers import LinearSolver, LinearSolverState, legacy_function

from .kernels import kernel_f64
from .kernels import marching_cubes as _mck
from .kernels.marching_cubes import MCResult, marching_cubes

__all__ = ["iso_surface_layer", "iso_surface", "VertexBlocks", "JacobianRows",
           "solve_vertex_blocks", "cell_origins", "trilinear", "surrogate_gradient", "MODES"]

MODES = ("edge", "normal")


# ------------------------------------------------------------------------------
# the closed-form block solver
# ------------------------------------------------------------------------------

class _VertexBlocksState(LinearSolverState):
    def __init__(self, g: onp.ndarray, inv_norm2: onp.ndarray):
        self.g, self.inv_norm2 = g, inv_norm2
        self.exact = g.shape[1] == 1     # a pseudo-inverse (m > 1) has no higher-order rule

    def solve(self, b, transpose=False):
        b = onp.asarray(b, dtype=float)
        if b.ndim != 2:
            raise ShapeError(f"VertexBlocks expects a batch of blocks (batch_axis=0), got a "
                             f"right-hand side of shape {b.shape}")
        if transpose:       # b (V, m) -> x (V, 1)
            return (onp.einsum("ij,ij->i", self.g, b) * self.inv_norm2)[:, None]
        return self.g * (b[:, 0] * self.inv_norm2)[:, None]      # b (V, 1) -> x (V, m)


class JacobianRows:
    """The rows ``g_n = dF_n/dy_n`` of a batch of ``1 x m`` blocks, computed on demand.

    A forward byproduct (``Solution.aux``) for :class:`VertexBlocks`: the
    layer knows ``J`` in closed form (``phi[c1] - phi[c0]`` on an edge, the
    surrogate's gradient in normal mode), so the backward need not form it
    with an autograd VJP of the residual.  ``rows()`` is called at most once,
    on the first solve, so a forward without backward does not pay for it.
    """

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], onp.ndarray]):
        self._make = make

    def rows(self) -> onp.ndarray:
        return self._make()


class VertexBlocks(LinearSolver):
    r"""Minimum-norm solve of a batch of ``1 x m`` blocks ``J_n = g_n^T``.

    :meth:`init` takes the rows ``g_n`` of all ``V`` blocks from the forward's
    :class:`JacobianRows` (``aux``) when there is one, else forms them with one
    batched product with ``J^T`` (``operator.dense()`` with ``r = 1``).  Then, for
    every block at once,

    .. math::  J x = b:\ x_n = g_n\, b_n / |g_n|^2, \qquad
               J^T x = b:\ x_n = g_n^\top b_n / |g_n|^2,

    the exact inverse for ``m = 1`` (``state.exact``) and the minimum-norm
    (pseudo-inverse) solution for ``m > 1``.  A block with ``g_n = 0`` raises
    :class:`~nimplicit.errors.SingularJacobianError`.
    """

    name = "vertex_blocks"
    options: dict = {}

    def init(self, operator, aux=None):
        if operator.batch_size is None:
            raise ShapeError("VertexBlocks expects a batch of blocks (batch_axis=0)")
        if operator.r != 1:
            raise ShapeError(f"VertexBlocks solves 1 x m blocks, got {operator.r} x "
                             f"{operator.m}; use a core solver such as 'lstsq'")
        if isinstance(aux, JacobianRows):     # the forward's closed-form rows of J
            g = onp.asarray(aux.rows(), dtype=float)
            if g.shape != (operator.batch_size, operator.m):
                raise ShapeError(f"JacobianRows gave rows of shape {g.shape}, expected "
                                 f"{(operator.batch_size, operator.m)}")
        else:
            g = operator.dense()[:, 0, :]                  # (V, m): one batched VJP
        norm2 = onp.einsum("ij,ij->i", g, g)
        bad = onp.flatnonzero(~(norm2 > 0))
        if bad.size:
            raise SingularJacobianError(
                f"dF/dy vanishes at vertex {int(bad[0])} ({bad.size} vertices): the field's "
                f"gradient is zero there, so the vertex's derivative is undefined. Perturb phi "
                f"or the level away from this degenerate configuration.")
        return _VertexBlocksState(g, 1.0 / norm2)


#: deprecated callable form of :class:`VertexBlocks` (the old linear-solver protocol)
solve_vertex_blocks = legacy_function(VertexBlocks)


# ------------------------------------------------------------------------------
# the trilinear surrogate (autograd-traceable, vectorized over vertices)
# ------------------------------------------------------------------------------

def cell_origins(edge_vertices: onp.ndarray, shape: Sequence[int]) -> onp.ndarray:
    """Lowest corner of the cell whose interpolant is used at each vertex.

    ``min(c0, c1)`` componentwise, clipped to ``shape - 2`` so the cell exists
    (see the module docstring).  ``edge_vertices`` is ``(V, 2, 3)``.
    """
    low = onp.minimum(edge_vertices[:, 0, :], edge_vertices[:, 1, :])
    return onp.minimum(low, onp.asarray(shape, dtype=onp.int64) - 2)


def trilinear(corners, local):
    r"""The trilinear interpolant of a cell, vectorized over vertices.

    .. math::  \phi_{tri}(o + u) = \sum_{c \in \{0,1\}^3} \phi[o + c]
               \prod_{k=0}^{2} \big(c_k u_k + (1 - c_k)(1 - u_k)\big)

    ``corners`` ``(V, 8)`` are the values ``phi[o + c]`` of each vertex's cell
    (corner ``c = (c & 1, c >> 1 & 1, c >> 2)``), ``local`` ``(V, 3)`` the
    coordinates ``u`` in the cell; both may be traced (derivatives of any
    order: the derivative rules below are themselves traceable).

    Evaluated as three nested linear interpolations (along axis 0, then 1,
    then 2), one autograd primitive with closed-form derivatives: the
    product with the weights for ``corners`` and :func:`_trilinear_gradient`
    for ``local``.
    """
    return _trilinear(corners, local)


def _columns(a, count):
    """The ``count`` columns of a ``(V, count)`` array as ``(V,)`` arrays (traceable)."""
    return [a[:, k] for k in range(count)]


@primitive
def _trilinear(corners, local):
    return _mck.trilinear_rules(_f64(corners), _f64(local), _NO_G, 0)[:, 0]


_NO_G = onp.empty(0)                # placeholders of unused kernel arguments
_NO_CORNERS = onp.empty((0, 8))


_f64 = kernel_f64


def _traced(*args) -> bool:
    return any(isbox(a) for a in args)


def _trilinear_weights(local):
    r"""``w_c(u) = prod_k (c_k u_k + (1 - c_k)(1 - u_k))`` for the 8 corners, ``(V, 8)``."""
    w = [np.stack([1.0 - local[:, k], local[:, k]], axis=1) for k in range(3)]   # (V, 2) each
    V = np.shape(local)[0]
    return np.reshape(np.reshape(w[2], (V, 2, 1, 1)) * np.reshape(w[1], (V, 1, 2, 1))
                      * np.reshape(w[0], (V, 1, 1, 2)), (V, 8))


def _trilinear_gradient(corners, local):
    r"""``d phi_tri / d u`` ``(V, 3)`` in local cell coordinates (traceable)."""
    ux, uy, uz = local[:, 0], local[:, 1], local[:, 2]
    c = _columns(corners, 8)
    dx = [c[2 * q + 1] - c[2 * q] for q in range(4)]             # along axis 0, rows (cy, cz)
    e00, e10, e01, e11 = [c[2 * q] + ux * dx[q] for q in range(4)]
    gx = (1.0 - uz) * (dx[0] + uy * (dx[1] - dx[0])) + uz * (dx[2] + uy * (dx[3] - dx[2]))
    gy = (1.0 - uz) * (e10 - e00) + uz * (e11 - e01)
    gz = (e01 + uy * (e11 - e01)) - (e00 + uy * (e10 - e00))
    return np.stack([gx, gy, gz], axis=1)


def _unbatch_rows(g):
    return np.reshape(g, (-1, 1))


def _trilinear_corner_vjp(g, local):
    """``g_n w_c(u_n)``: the VJP of the interpolant in the corner values."""
    if _traced(g, local):          # a higher-order derivative: the traceable rule
        return _unbatch_rows(g) * _trilinear_weights(local)
    return _mck.trilinear_rules(_NO_CORNERS, _f64(local), _f64(g), 2)


def _trilinear_local_vjp(g, corners, local):
    """``g_n d phi_tri/d u``: the VJP of the interpolant in the cell coordinates."""
    if _traced(g, corners, local):
        return _unbatch_rows(g) * _trilinear_gradient(corners, local)
    return onp.reshape(g, (-1, 1)) * _raw_trilinear_gradient(corners, local)


def _raw_trilinear_gradient(corners, local) -> onp.ndarray:
    return _mck.trilinear_rules(_f64(corners), _f64(local), _NO_G, 1)


defvjp(_trilinear,
       lambda ans, corners, local: lambda g: _trilinear_corner_vjp(g, local),
       lambda ans, corners, local: lambda g: _trilinear_local_vjp(g, corners, local))
defjvp(_trilinear,
       lambda g, ans, corners, local: np.sum(g * _trilinear_weights(local), axis=1),
       lambda g, ans, corners, local: np.sum(g * _trilinear_gradient(corners, local), axis=1))


def surrogate_gradient(phi, mc: MCResult,
                       spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> onp.ndarray:
    r"""``grad phi_tri`` at every vertex of ``mc`` (raw numbers, ``(V, 3)``).

    In the cell chosen by :func:`cell_origins`, the gradient in world
    coordinates ``(d phi_tri / d u) / spacing``; its direction is the surface
    normal used by ``mode="normal"`` (towards increasing ``phi``).
    """
    phi = onp.asarray(phi, dtype=float)
    sp = onp.asarray(spacing, dtype=float)
    base, _, local = _cells(mc, phi.shape, sp)
    return _raw_trilinear_gradient(_take_corners(phi, base), local) / sp


# ------------------------------------------------------------------------------
# validation and the forward
# ------------------------------------------------------------------------------

def _validate(phi_raw, level_raw, spacing) -> Tuple[onp.ndarray, float, onp.ndarray]:
    phi_raw = onp.asarray(phi_raw)
    if phi_raw.ndim != 3 or min(phi_raw.shape) < 2:
        raise ShapeError(f"phi must be a 3-D grid with at least 2 points per axis, got shape "
                         f"{phi_raw.shape}")
    if phi_raw.dtype.kind not in "fiu":
        raise ShapeError(f"phi must hold real numbers, got dtype {phi_raw.dtype}")
    if onp.ndim(level_raw) != 0:
        raise ShapeError(f"level must be a scalar, got shape {onp.shape(level_raw)}")
    level_raw = float(level_raw)
    if not onp.isfinite(level_raw):
        raise NonFiniteError(f"level must be finite, got {level_raw}")
    sp = onp.asarray(spacing, dtype=float).reshape(-1)
    if sp.shape != (3,) or not onp.all(onp.isfinite(sp)) or not onp.all(sp > 0):
        raise ShapeError(f"spacing must be 3 finite positive numbers, got {spacing!r}")
    return phi_raw, level_raw, sp


def _extract(phi_raw: onp.ndarray, level_raw: float, sp: onp.ndarray) -> MCResult:
    try:
        return marching_cubes(phi_raw, level_raw, sp)
    except ValueError:
        bad = ~onp.isfinite(phi_raw)
        if bad.any():
            first = tuple(int(i) for i in onp.argwhere(bad)[0])
            raise NonFiniteError(
                f"phi contains {int(bad.sum())} non-finite value(s) (NaN or Inf), the first at "
                f"grid index {first}; marching cubes needs a finite field. Replace them (e.g. "
                f"clip a signed distance to a finite band) before the layer.") from None
        raise


def _empty_verts(phi, level):
    """``(0, 3)`` vertices that still depend on phi and level (zero gradients)."""
    return np.reshape(np.ravel(phi)[:0], (0, 3)) + 0.0 * level


def _edge_margin_diagnostic(point):
    """``min(t, 1 - t)`` over the vertices: how close a grid value is to the level."""
    t = onp.asarray(point.y)
    margin = float(onp.minimum(t, 1.0 - t).min()) if t.size else 1.0
    return {"edge_margin": (margin, margin > 0.0,
                            "min(t, 1 - t) over the vertices; near 0 a grid value is near the "
                            "level and a small change of phi changes the mesh's connectivity (at 0 the "
                            "derivative is one-sided)")}


def _edge_residual(t, ends, level):
    """``(1 - t) phi[c0] + t phi[c1] - level`` per vertex; ``ends = phi[(c0, c1)]`` ``(V, 2)``."""
    return _edge_interp(np.reshape(t, (-1,)), ends) - level


@primitive
def _edge_interp(t, ends):
    """``(1 - t) ends[:, 0] + t ends[:, 1]`` (one primitive: closed-form derivatives)."""
    return (1.0 - t) * ends[:, 0] + t * ends[:, 1]


def _edge_weights(t):
    """``[1 - t, t]`` per vertex, ``(V, 2)``: the derivative of the interpolant in ``ends``."""
    return np.stack([1.0 - t, t], axis=1)


def _edge_slope(ends):
    """``ends[:, 1] - ends[:, 0]``: the derivative of the interpolant in ``t``."""
    return ends[:, 1] - ends[:, 0]


# derivative rules written with autograd.numpy, so they are traceable (any order)
defvjp(_edge_interp,
       lambda ans, t, ends: lambda g: g * _edge_slope(ends),
       lambda ans, t, ends: lambda g: np.reshape(g, (-1, 1)) * _edge_weights(t))
defjvp(_edge_interp,
       lambda g, ans, t, ends: g * _edge_slope(ends),
       lambda g, ans, t, ends: np.sum(g * _edge_weights(t), axis=1))


@primitive
def _along_edges(t, mc: MCResult, sp: onp.ndarray):
    """``(c0 + t (c1 - c0)) * spacing``, linear in ``t``.

    At the kernel's own ``t`` these are the kernel's vertices (the same
    formula, bit for bit), which are returned; any other ``t`` (an
    intercepted forward) is placed on the edges here.
    """
    if onp.array_equal(t, mc.t):
        return mc.verts
    c0 = mc.edge_vertices[:, 0, :]
    return (c0 + onp.reshape(t, (-1, 1)) * (mc.edge_vertices[:, 1, :] - c0)) * sp


def _along_edges_vjp(g, mc: MCResult, sp: onp.ndarray):
    """``g_n . (c1 - c0) * spacing`` per vertex."""
    if _traced(g):
        step = mc.edge_vertices[:, 1, :] - mc.edge_vertices[:, 0, :]
        return np.sum(g * (step * sp), axis=1)
    return _mck.edge_direction_dot(_f64(g), mc.edge_vertices, sp)


defvjp(_along_edges, lambda ans, t, mc, sp: lambda g: _along_edges_vjp(g, mc, sp))
defjvp(_along_edges, lambda g, ans, t, mc, sp: np.reshape(g, (-1, 1)) * (
    (mc.edge_vertices[:, 1, :] - mc.edge_vertices[:, 0, :]) * sp))


@primitive
def _take_flat(phi, flat_index: onp.ndarray):
    """``phi.ravel()[flat_index]``."""
    return onp.reshape(phi, -1)[flat_index]


@primitive
def _scatter_add_flat(values, flat_index: onp.ndarray, shape: tuple):
    """The adjoint of :func:`_take_flat`: ``values`` summed into a zero grid."""
    size = int(onp.prod(shape))
    summed = onp.bincount(flat_index.ravel(), weights=onp.ravel(values), minlength=size)
    return summed.reshape(shape)


# both maps are linear, each the other's adjoint (so derivatives of any order work);
# bincount is much faster than np.add.at, autograd's scatter for fancy indexing
defvjp(_take_flat, lambda ans, phi, flat_index: lambda g: _scatter_add_flat(g, flat_index,
                                                                           onp.shape(phi)))
defjvp(_take_flat, lambda g, ans, phi, flat_index: _take_flat(g, flat_index))
defvjp(_scatter_add_flat,
       lambda ans, values, flat_index, shape: lambda g: _take_flat(g, flat_index))
defjvp(_scatter_add_flat, lambda g, ans, values, flat_index, shape: _scatter_add_flat(g, flat_index,
                                                                                     shape))


def _flat_index(points: onp.ndarray, shape: Sequence[int]) -> onp.ndarray:
    """C-order flat indices of integer grid points ``points (..., 3)``."""
    return points[..., 0] * (shape[1] * shape[2]) + points[..., 1] * shape[2] + points[..., 2]


def _gather(phi, points: onp.ndarray):
    """``phi`` at integer grid points ``points (..., 3)``, traceable: the fancy index
    ``phi[i, j, k]`` as a gather of flat indices whose VJP is one ``bincount``."""
    return _take_flat(phi, _flat_index(points, onp.shape(phi)))


def _cells(mc: MCResult, shape: Sequence[int], sp: onp.ndarray):
    """``(base, origins, local)`` of every vertex's cell (see :func:`cell_origins`):
    the flat index of its origin, the origin, and the vertex in cell coordinates."""
    return _mck.cell_geometry(mc.edge_vertices, mc.verts, sp, *(int(n) for n in shape))


@primitive
def _take_corners(phi, base: onp.ndarray):
    """``(V, 8)``: ``phi`` at the corners ``origin + c`` of the cells with flat origin ``base``."""
    shape = onp.shape(phi)
    out = onp.empty((len(base), 8))
    _mck.transfer_corners(_f64(phi).reshape(-1), base, out, shape[1], shape[2], False)
    return out


@primitive
def _scatter_corners(values, base: onp.ndarray, shape: tuple):
    """The adjoint of :func:`_take_corners`: ``values (V, 8)`` summed into a zero grid."""
    out = onp.zeros(int(onp.prod(shape)))
    _mck.transfer_corners(out, base, _f64(values), shape[1], shape[2], True)
    return out.reshape(shape)


defvjp(_take_corners, lambda ans, phi, base: lambda g: _scatter_corners(g, base, onp.shape(phi)))
defjvp(_take_corners, lambda g, ans, phi, base: _take_corners(g, base))
defvjp(_scatter_corners, lambda ans, values, base, shape: lambda g: _take_corners(g, base))
defjvp(_scatter_corners, lambda g, ans, values, base, shape: _scatter_corners(g, base, shape))


def iso_surface(phi, level=0.0, spacing: Sequence[float] = (1.0, 1.0, 1.0), *,
                mode: str = "edge",
                linear_solver: Union[str, Callable, None] = None):
    """Deprecated: ``iso_surface_layer(..., full_output=True)``.

    Returns ``(verts, faces, mc)`` with the kernel's
    :class:`~reference_layers.kernels.marching_cubes.MCResult`.
    """
    renamed("iso_surface(...)", "iso_surface_layer(..., full_output=True)", "level_set", None)
    backward = "structured" if linear_solver is None or linear_solver is solve_vertex_blocks \
        else "generic"
    return _iso_surface(phi, level, spacing, mode, backward,
                        None if backward == "structured" else linear_solver, None)


def _edge_solver(mc: MCResult) -> Callable:
    """The edge-mode forward: the kernel's ``t``, and ``dF/dt = phi[c1] - phi[c0]`` as aux."""
    def solver(ends, level_):
        return Solution(mc.t, JacobianRows(lambda: (ends[:, 1] - ends[:, 0])[:, None]))
    return solver


def _iso_surface(phi, level, spacing, mode: str, backward: str, linear_solver,
                 linear_solver_options: Optional[dict]):
    """The level-set layer: ``(verts, faces, mc)``.

    The implicit node's inputs are the grid values the residual reads,
    gathered from ``phi`` by one autograd fancy index (``(V, 2)`` edge ends,
    or ``(V, 8)`` cell corners, and ``level``); autograd's chain rule through
    the gather scatters the node's cotangents back onto the grid.  The node
    thus works on ``O(V)`` numbers, never on the whole grid.
    """
    if mode not in MODES:
        raise OptionError(f"mode must be one of {MODES}, got {mode!r}")
    phi_raw, level_raw, sp = _validate(getval(phi), getval(level), spacing)
    mc = _extract(phi_raw, level_raw, sp)
    if backward == "structured":
        linear_solver = VertexBlocks()
    elif linear_solver is None:
        linear_solver = "lstsq"
    solver_kw = dict(linear_solver=linear_solver, linear_solver_options=linear_solver_options)
    if len(mc.verts) == 0:
        return _empty_verts(phi, level), mc.faces, mc
    if mode == "edge":
        layer = implicit_layer(_edge_residual, _edge_solver(mc), batch_axis=0,
                               diagnostics=_edge_margin_diagnostic, check_independence=False,
                               **solver_kw)
        t = layer(_gather(phi, mc.edge_vertices), level)
        verts = _along_edges(t, mc, sp)
    else:
        base, origins, local = _cells(mc, phi_raw.shape, sp)

        def residual(v, corners, level_):
            # at the forward's own vertices the cell coordinates are known already
            u = local if not _traced(v) and onp.array_equal(v, mc.verts) else v / sp - origins
            return _trilinear(corners, u) - level_

        def solver(corners, level_):
            return Solution(mc.verts, JacobianRows(
                lambda: _raw_trilinear_gradient(corners, local) / sp))

        layer = implicit_layer(residual, solver, batch_axis=0, check_independence=False,
                               **solver_kw)
        verts = layer(_take_corners(phi, base), level)
    return verts, mc.faces, mc


def iso_surface_layer(phi, level=0.0, spacing: Sequence[float] = (1.0, 1.0, 1.0), *,
                      mode: str = "edge", full_output: bool = False,
                      backward: Optional[str] = None,
                      linear_solver: Union[str, Callable, None] = None,
                      linear_solver_options: Optional[dict] = None,
                      solver_options: Optional[dict] = None):
    r"""The ``level`` iso-surface of a grid field as a differentiable triangle mesh.

    Parameters
    ----------
    phi : (nx, ny, nz) array
        Grid values (any real dtype; used as float64), at least 2 points per
        axis; may be an autograd box.  NaN/Inf raise
        :class:`~nimplicit.errors.NonFiniteError`.
    level : float
        Iso-value; may be an autograd box.  ``phi <= level`` is inside.
    spacing : 3 floats
        Grid spacing per axis (constant: not differentiated).
    mode : {"edge", "normal"}
        The backward convention (see :mod:`reference_layers.level_set`):
        ``"edge"`` moves each vertex along its grid edge (the exact derivative
        of the forward), ``"normal"`` along the normal of the trilinear
        surrogate (minimum-norm solution of ``phi_tri(v) = level``).
    full_output : bool
        Also return the kernel's :class:`~reference_layers.kernels.marching_cubes.MCResult`
        (raw numbers: edge indices and ``t`` of every vertex): ``(verts, faces, mc)``.
    backward : {"structured", "generic"}
        ``"structured"`` (default): the closed-form per-vertex blocks
        (:class:`VertexBlocks`); ``"generic"``: the core's ``linear_solver``
        (default ``'lstsq'``, the same result; ``'lu'`` works for ``"edge"``)
        on the autograd Jacobian.  ``"fast"`` is a deprecated alias of "structured".
    linear_solver, linear_solver_options
        Only with ``backward="generic"``; passed to the core.  (A
        ``linear_solver`` without ``backward`` is the deprecated spelling of
        ``backward="generic"``.)
    solver_options : dict, optional
        The forward (marching cubes) has no options: must be empty or None.

    Returns
    -------
    verts : (V, 3) float64
        ``(c0 + t (c1 - c0)) * spacing``: scikit-image's coordinates (grid index
        times spacing).  Differentiable in ``phi`` and ``level``.  May be the
        kernel's own array ``mc.verts`` (no copy): copy before writing into it.
    faces : (F, 3) int64
        Triangles, normals (right-hand rule) towards increasing ``phi``;
        not differentiable, always raw integers (usable as indices).

    Differentiate ``verts`` or a loss of the mesh, e.g.
    ``make_vjp(lambda p: iso_surface_layer(p)[0])``.  The returned pair (and
    the ``full_output`` triple) is a plain tuple on purpose: an autograd tuple
    would make ``faces`` a box on unpacking, unusable as indices.  So
    ``make_vjp`` / ``make_jvp`` applied to this function itself do not see
    through it (they warn "Output seems independent of input" and return
    zeros); wrap the outputs you differentiate yourself, e.g.
    ``autograd.builtins.tuple((verts, loss))``.

    An empty surface (``level`` outside the range of ``phi``) gives ``(0, 3)``
    arrays; the gradient of any loss of them is zero.

    Examples
    --------
    >>> import autograd.numpy as np
    >>> from autograd import grad
    >>> x = np.linspace(-1, 1, 16)
    >>> phi = np.sqrt(x[:, None, None]**2 + x[None, :, None]**2 + x[None, None, :]**2) - 0.6
    >>> verts, faces = iso_surface_layer(phi, 0.0)
    >>> g = grad(lambda p: np.sum(iso_surface_layer(p, 0.0)[0][:, 0]))(phi)
    >>> g.shape
    (16, 16, 16)
    """
    check_options(solver_options, {}, "iso_surface_layer solver_options")
    if linear_solver is solve_vertex_blocks:
        linear_solver = None
    if backward is None and linear_solver is not None:
        backward = renamed("linear_solver without backward", "backward='generic'",
                           "iso_surface_layer", "generic")
    backward = check_backward(backward or "structured", "iso_surface_layer")
    if backward == "structured" and (linear_solver is not None or linear_solver_options):
        raise OptionError("iso_surface_layer: linear_solver / linear_solver_options are only "
                          "meaningful with backward='generic'")
    verts, faces, mc = _iso_surface(phi, level, spacing, mode, backward, linear_solver,
                                    linear_solver_options)
    # a plain tuple on purpose: an autograd tuple would turn faces into a box
    # on unpacking, and faces must stay raw integers usable as indices
    return (verts, faces, mc) if full_output else (verts, faces)
