r"""Registry entries for the level-set layer (``reference_layers.level_set``).

Inputs come from :mod:`verification.strategies.level_set`: spheres, tori and
sums of Gaussian bumps on small grids, with a level at least ``2e-3`` away
from every grid value, so the finite differences (relative steps ``~1e-5``
of ``O(1)`` values) never change the mesh's topology and the vertex count
is fixed.

- ``level-set-edge``: the vertices ``(V, 3)`` in ``mode="edge"``, the
  derivative of marching cubes' actual output; first and second order.
- ``level-set-normal``: ``mode="normal"`` moves vertices along the surrogate
  normal ``n`` only; its derivative is ``n n^T`` times the edge-mode one.
  The entry checks the normal components ``n_k . v_k`` (``n`` fixed at the
  generated point, an input that is not differentiated) against finite
  differences of the forward; the tangential part is zero by construction
  and is checked in ``tests/test_level_set.py`` (surrogate consistency).
- ``level-set-losses``: Chamfer distance to a fixed point cloud, surface area
  and enclosed volume of the edge-mode mesh.
"""
from __future__ import annotations

import autograd.numpy as np
import numpy as onp
from autograd.builtins import tuple as ag_tuple
from reference_layers.level_set import iso_surface_layer, surrogate_gradient
from reference_layers.mesh_losses import chamfer_distance, enclosed_volume, surface_area

from ..registry import Entry, register
from ..strategies.level_set import random_field


def canonical_order(edge_vertices: onp.ndarray) -> onp.ndarray:
    """The permutation sorting vertices by the grid edge carrying them: its lower
    corner ``min(c0, c1)`` lexicographically ``(i, j, k)``, then its axis.  It
    depends only on the mesh's topology, so it is the same for every
    implementation of marching cubes and constant under small perturbations."""
    ev = onp.asarray(edge_vertices)
    low = onp.minimum(ev[:, 0, :], ev[:, 1, :])
    axis = onp.argmax(onp.abs(ev[:, 1, :] - ev[:, 0, :]), axis=1)
    return onp.lexsort((axis, low[:, 2], low[:, 1], low[:, 0]))


def _edge_fn(phi, level):
    verts, _, mc = iso_surface_layer(phi, level, mode="edge", full_output=True)
    return verts[canonical_order(mc.edge_vertices)]


def _edge_generate(rng, n: int = 7):
    return random_field(rng, n=n)


def _normal_fn(phi, level, normals):
    verts, _, mc = iso_surface_layer(phi, level, mode="normal", full_output=True)
    return np.sum(normals * verts[canonical_order(mc.edge_vertices)], axis=1)


def _normal_generate(rng, n: int = 7):
    phi, level = random_field(rng, n=n)
    _, _, mc = iso_surface_layer(phi, level, full_output=True)
    g = surrogate_gradient(phi, mc)
    return phi, level, (g / onp.linalg.norm(g, axis=1, keepdims=True))[canonical_order(mc.edge_vertices)]


def _losses_fn(phi, level, points):
    verts, faces = iso_surface_layer(phi, level, spacing=(0.25, 0.25, 0.25))
    # a plain tuple of boxes would look constant to autograd: box it
    return ag_tuple((chamfer_distance(verts, points), surface_area(verts, faces),
                     enclosed_volume(verts, faces)))


def _losses_generate(rng, n: int = 7, n_points: int = 40):
    phi, level = random_field(rng, n=n)
    centre = 0.25 * (n - 1) / 2
    d = rng.standard_normal((n_points, 3))
    points = centre + 0.5 * centre * d / onp.linalg.norm(d, axis=1, keepdims=True)
    return phi, level, points


_FIELD = [{"name": "phi", "shape": "(n, n, n) grid values"}, {"name": "level", "shape": "float"}]
_MESH = {"vertex_order": "canonical: sorted by the grid edge carrying each vertex (its lower corner "
                         "(i, j, k) lexicographically, then the edge's axis 0/1/2); sort a peer's "
                         "vertices the same way (verification.entries.level_set.canonical_order)",
         "vertex_position": "c0 + t (c1 - c0) in grid-index coordinates, t = (level - phi[c0]) / "
                            "(phi[c1] - phi[c0]) (linear interpolation on the edge, as scikit-image)",
         "triangulation": "Lorensen-Cline marching cubes (scikit-image compatible tables), triangles "
                          "oriented so normals point towards increasing phi; the faces are not "
                          "differentiated and not stored"}

register(Entry(
    name="level-set-edge", fn=_edge_fn, generate=_edge_generate, argnums=(0, 1), order=2,
    size={"n": 7},
    conventions={"inputs": _FIELD, "outputs": [{"name": "verts", "shape": "(V, 3)"}], **_MESH},
    description="iso-surface vertices, mode='edge' (exact derivative of marching cubes)"))
register(Entry(
    name="level-set-normal", fn=_normal_fn, generate=_normal_generate, argnums=(0, 1), order=1,
    size={"n": 7},
    conventions={"inputs": _FIELD + [{"name": "normals", "shape": "(V, 3)", "differentiated": False,
                                      "meaning": "unit surrogate normals in canonical vertex order"}],
                 "outputs": [{"name": "n.v", "shape": "(V,)"}], **_MESH,
                 "mode": "normal: vertices move along the surrogate normal only (min-norm)"},
    description="iso-surface, mode='normal' (min-norm): normal components n.v of the vertices"))
register(Entry(
    name="level-set-losses", fn=_losses_fn, generate=_losses_generate, argnums=(0, 1, 2), order=1,
    size={"n": 7, "n_points": 40},
    conventions={"inputs": _FIELD + [{"name": "points", "shape": "(P, 3)"}],
                 "outputs": [{"name": "chamfer", "shape": "()"}, {"name": "area", "shape": "()"},
                             {"name": "volume", "shape": "()"}],
                 "spacing": "(0.25, 0.25, 0.25)", "triangulation": _MESH["triangulation"]},
    description="Chamfer distance, surface area and enclosed volume of the edge-mode mesh"))
