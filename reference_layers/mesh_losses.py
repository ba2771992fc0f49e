r"""Losses on triangle meshes, differentiable by autograd in the vertices.

For a mesh ``(verts, faces)`` with vertices ``v_n`` and triangles
``(a, b, c)`` (normals by the right-hand rule):

- :func:`chamfer_distance` between the vertices and a point cloud ``P``,

  .. math::  d(V, P) = \frac{1}{|V|}\sum_{v \in V} \min_{p \in P} |v - p|^2
                     + \frac{1}{|P|}\sum_{p \in P} \min_{v \in V} |v - p|^2;

- :func:`surface_area`,  :math:`A = \tfrac12 \sum_f |(b - a) \times (c - a)|`;
- :func:`enclosed_volume` (divergence theorem, oriented faces),
  :math:`\mathrm{Vol} = \tfrac16 \sum_f a \cdot (b \times c)`, positive for a
  closed surface whose normals point outwards.

The nearest neighbours of the Chamfer distance are found on raw numbers with
a k-d tree (:class:`scipy.spatial.cKDTree`) and used as fixed indices: the
distance is piecewise smooth in the vertices and this is its derivative
wherever the nearest neighbours are unique.
"""
from __future__ import annotations

import autograd.numpy as np
import numpy as onp
from autograd.tracer import getval
from scipy.spatial import cKDTree

from nimplicit.errors import NimplicitError, NonFiniteError, ShapeError

EPS = onp.finfo(float).eps

__all__ = ["chamfer_distance", "surface_area", "enclosed_volume", "EmptyMeshError"]


class EmptyMeshError(NimplicitError, ValueError):
    """A loss that needs at least one vertex (or point) got none."""


def _points(x, what: str) -> onp.ndarray:
    raw = onp.asarray(getval(x), dtype=float)
    if raw.ndim != 2 or raw.shape[1] != 3:
        raise ShapeError(f"{what} must be an (N, 3) array of points, got shape {raw.shape}")
    if not onp.all(onp.isfinite(raw)):
        raise NonFiniteError(f"{what} contains NaN or Inf")
    return raw


def chamfer_distance(verts, points) -> "float":
    r"""Symmetric Chamfer distance: mean squared nearest distances, both ways.

    Parameters
    ----------
    verts : (V, 3) array, may be traced
    points : (P, 3) array, may be traced

    Returns
    -------
    scalar
        ``mean_v min_p |v - p|^2 + mean_p min_v |v - p|^2``.

    Raises
    ------
    EmptyMeshError
        If either set is empty (the distance is undefined); a training loop
        must decide what an empty prediction costs.
    """
    v_raw, p_raw = _points(verts, "verts"), _points(points, "points")
    if len(v_raw) == 0 or len(p_raw) == 0:
        raise EmptyMeshError(
            f"the Chamfer distance needs non-empty sets, got {len(v_raw)} vertices and "
            f"{len(p_raw)} points (an empty surface: the level is outside the field's range)")
    nearest_point = cKDTree(p_raw).query(v_raw)[1]
    nearest_vert = cKDTree(v_raw).query(p_raw)[1]
    d_vp = verts - points[nearest_point]
    d_pv = points - verts[nearest_vert]
    return np.mean(np.sum(d_vp * d_vp, axis=1)) + np.mean(np.sum(d_pv * d_pv, axis=1))


def _corners(verts, faces):
    faces = onp.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ShapeError(f"faces must be an (F, 3) integer array, got shape {faces.shape}")
    return verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]


def surface_area(verts, faces):
    r"""Total area :math:`\tfrac12 \sum_f |(b - a) \times (c - a)|` (0 for no faces).

    Differentiable wherever no triangle is degenerate.  A degenerate triangle
    (zero area to rounding: ``|n|^2 <= (eps |b - a| |c - a|)^2`` with
    ``n = (b - a) x (c - a)``; marching cubes produces them when the level
    equals grid values) contributes 0 and the gradient 0 -- the minimum-norm
    subgradient of ``|n|`` at ``n = 0`` -- instead of ``n / |n| = 0/0``.
    """
    if len(faces) == 0:
        return np.sum(verts) * 0.0
    a, b, c = _corners(verts, faces)
    n = np.cross(b - a, c - a)
    nn = np.sum(n * n, axis=1)
    ab, ac = np.sum((b - a) ** 2, axis=1), np.sum((c - a) ** 2, axis=1)
    degenerate = onp.asarray(getval(nn)) <= (EPS ** 2) * onp.asarray(getval(ab * ac))
    safe = np.sqrt(np.where(degenerate, 1.0, nn))
    return 0.5 * np.sum(np.where(degenerate, 0.0, safe))


def enclosed_volume(verts, faces):
    r"""Signed volume :math:`\tfrac16 \sum_f a \cdot (b \times c)` (0 for no faces).

    By the divergence theorem this is the volume enclosed by a closed,
    consistently oriented surface (positive for outward normals, the
    orientation of :func:`reference_layers.iso_surface_layer` for a field
    negative inside), independent of the origin.
    """
    if len(faces) == 0:
        return np.sum(verts) * 0.0
    a, b, c = _corners(verts, faces)
    return np.sum(a * np.cross(b, c)) / 6.0
