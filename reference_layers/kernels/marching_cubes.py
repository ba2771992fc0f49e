"""Marching cubes forward kernel (numba, float64, shared vertices).

Extracts the iso-surface ``{x : phi(x) = level}`` of a regular 3-D grid as an
indexed, watertight, consistently oriented triangle mesh with exactly one
vertex per crossed grid edge, plus the per-vertex edge information a
differentiable layer needs (which grid edge each vertex lies on and its
interpolation parameter).

Conventions
-----------
Coordinates
    ``verts[n] = (c0 + t (c1 - c0)) * spacing`` where ``c0, c1`` are integer
    grid indices ``(i, j, k)`` along array axes ``(0, 1, 2)``; this is the
    coordinate system of :func:`skimage.measure.marching_cubes`.
Inside / outside (equality rule)
    A grid value is *positive* (outside) iff ``phi > level`` and *negative*
    (inside) iff ``phi <= level``.  This is the rule used by scikit-image.
    A grid edge is crossed iff its two corners have different classes.
Edge vertices
    ``edge_vertices[n] = (c0, c1)`` with ``phi[c0] <= level < phi[c1]`` (the
    inside corner first; ``c1 - c0`` is +-1 along one axis) and
    ``t[n] = (level - phi[c0]) / (phi[c1] - phi[c0])``, bit-exact (except when
    ``phi[c1] - phi[c0]`` overflows, where a rescaled quotient is used), so
    ``0 <= t <= 1``.  ``t == 0`` exactly when ``phi[c0] == level``: the vertex
    then sits on that grid corner (the vertices of all crossed edges at that
    corner share the position, but keep distinct indices, so no triangle
    references a vertex twice).  ``t == 1`` only arises from rounding, when
    ``phi[c1] - level`` is below ~1e-16 of ``level - phi[c0]``.
Orientation
    Faces are counter-clockwise seen from the positive side: the normal
    ``cross(v1 - v0, v2 - v0)`` points towards increasing ``phi``
    (outwards for a signed distance function that is negative inside).  This
    is the same orientation as scikit-image's default
    ``gradient_direction='descent'`` output.  For a closed surface of an SDF
    the signed volume ``sum(dot(v0, cross(v1, v2))) / 6`` is positive.
Ambiguous faces
    A cell face whose diagonals carry opposite classes is resolved by the
    asymptotic decider evaluated on that face alone: with ``P`` the product of
    ``phi - level`` over the positive diagonal and ``N`` over the negative
    diagonal, the positive corners are joined across the face iff ``P > N``
    (the bilinear saddle value is positive; a zero saddle counts as inside,
    consistently with the equality rule).  Both cells sharing a face compute
    bit-identical decisions, so every mesh edge of a closed surface is shared
    by exactly two triangles.  Interior (cell-body) ambiguities of MC33 are not
    resolved: no interior vertices are ever created (see ``_mc_tables``).
Vertex order
    Sorted by the lower corner ``min(c0, c1)`` of the edge (C order of
    ``(i, j, k)``), then by the edge axis 0, 1, 2; deterministic and
    independent of the number of threads.
Relation to scikit-image
    For float32-representable ``phi`` the vertex set equals
    ``skimage.measure.marching_cubes(phi, level, spacing=spacing,
    method='lorensen')`` (same crossed edges, same orientation) up to its
    float32 rounding (~1e-7 relative); ``method='lewiner'`` has the same edge
    vertices plus cell-interior vertices in MC33 tunnel configurations.
    Differences: scikit-image casts ``phi`` to float32 (so classification
    can differ for values within float32 rounding of ``level``), computes
    positions with a weighted average (``1 / (eps + |phi - level|)``)
    instead of the exact linear root, returns float32 vertices, and raises
    when ``level`` is outside ``[min(phi), max(phi)]`` (here: empty arrays).
    Triangulations differ (table and ambiguity resolution), not the vertices.

Implementation: three passes, each a numba kernel (``nogil``) run over slabs
of slices on a small thread pool: (1) classify grid points into bit-packed
signs (and detect NaN/inf); (2) count crossed edges per 64-point row word and
triangles per cell row; after prefix sums, (3) write every vertex and every
triangle directly at its final offset.  A triangle's vertex ids are computed
from the bit masks (prefix popcounts), so no edge->vertex map is stored.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Callable, NamedTuple, Sequence

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from . import kernel_f64
from ._mc_tables import build_tables

__all__ = ["MCResult", "marching_cubes"]


class MCResult(NamedTuple):
    """Output of :func:`marching_cubes`.

    Attributes
    ----------
    verts : (V, 3) float64
        Vertex positions, ``(c0 + t (c1 - c0)) * spacing`` in grid-index
        coordinates scaled by ``spacing`` (same as scikit-image).
    faces : (F, 3) int64
        Triangles as indices into ``verts``; normals (right-hand rule) point
        towards increasing ``phi``.
    edge_vertices : (V, 2, 3) int64
        Grid indices ``(c0, c1)`` of the edge carrying each vertex, with
        ``phi[c0] <= level < phi[c1]``; ``c1 - c0`` is a unit vector.
    t : (V,) float64
        Interpolation parameter ``(level - phi[c0]) / (phi[c1] - phi[c0])`` in
        ``[0, 1]`` (``0`` iff ``phi[c0] == level``).
    """

    verts: np.ndarray
    faces: np.ndarray
    edge_vertices: np.ndarray
    t: np.ndarray


# --------------------------------------------------------------------------
# numba kernels
#
# Signs are bit-packed: B[i, j, w] bit b  <=>  phi[i, j, 64*w + b] > level.
# Crossed-edge masks of a row word are then single XORs (axis 0: rows (i, j)
# and (i+1, j); axis 1: rows (i, j) and (i, j+1); axis 2: the row and itself
# shifted by one bit), so every pass except the classification touches only
# 1/64 of the grid, and the work per surface element is O(1).
# --------------------------------------------------------------------------

_ONE = np.uint64(1)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_S63 = np.uint64(63)


@intrinsic
def _popcount(typingctx, x):  # pragma: no cover - compiled
    if x != types.uint64:
        return None

    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@intrinsic
def _ctz(typingctx, x):  # pragma: no cover - compiled
    if x != types.uint64:
        return None

    def codegen(context, builder, sig, args):
        return builder.cttz(args[0], llvm_ir.Constant(llvm_ir.IntType(1), 0))

    return types.uint64(types.uint64), codegen


@njit(cache=True, nogil=True)
def _classify_range(phi, level, B, i0, i1):  # pragma: no cover - compiled
    """Pack slices i0:i1 of (phi > level) into B; return the number of non-finite values."""
    ny, nz = phi.shape[1], phi.shape[2]
    nw = B.shape[2]
    nb = 0
    for i in range(i0, i1):
        for j in range(ny):
            for w in range(nw):
                k0 = w * 64
                m = min(64, nz - k0)
                word = np.uint64(0)
                for b in range(m):
                    v = phi[i, j, k0 + b]
                    word |= np.uint64(v > level) << np.uint64(b)
                    nb += (v - v) != 0.0  # NaN and +-inf
                B[i, j, w] = word
    return nb


@njit(cache=True, inline="always")
def _low_mask(n):  # pragma: no cover
    """Word with the lowest ``n`` bits set (n may be <= 0 or >= 64)."""
    if n >= 64:
        return _ALL
    if n <= 0:
        return np.uint64(0)
    return (_ONE << np.uint64(n)) - _ONE


@njit(cache=True, inline="always")
def _next_bits(B, i, j, w, nw):  # pragma: no cover
    """Bits of row (i, j) shifted so that bit b holds position k + 1."""
    x = B[i, j, w] >> _ONE
    if w + 1 < nw:
        x |= B[i, j, w + 1] << _S63
    return x


@njit(cache=True, inline="always")
def _cross_words(B, i, j, w, nx, ny, nz, nw):  # pragma: no cover
    """Crossed-edge masks (axis 0, 1, 2) of the edges starting in word w of row (i, j)."""
    r = B[i, j, w]
    cx = r ^ B[i + 1, j, w] if i + 1 < nx else np.uint64(0)
    cy = r ^ B[i, j + 1, w] if j + 1 < ny else np.uint64(0)
    cz = (r ^ _next_bits(B, i, j, w, nw)) & _low_mask(nz - 1 - 64 * w)
    return cx, cy, cz


@njit(cache=True, inline="always")
def _active_cells(B, i, j, w, nz, nw):  # pragma: no cover
    """Mask of cells (i, j, 64w + b) whose 8 corners do not all agree."""
    r00 = B[i, j, w]
    d = (r00 ^ B[i + 1, j, w]) | (r00 ^ B[i, j + 1, w]) | (r00 ^ B[i + 1, j + 1, w])
    dn = d >> _ONE
    if w + 1 < nw:
        s00 = B[i, j, w + 1]
        dn |= ((s00 ^ B[i + 1, j, w + 1]) | (s00 ^ B[i, j + 1, w + 1]) | (s00 ^ B[i + 1, j + 1, w + 1])) << _S63
    z = r00 ^ _next_bits(B, i, j, w, nw)
    return (d | dn | z) & _low_mask(nz - 1 - 64 * w)


@njit(cache=True, inline="always")
def _cell_case(B, i, j, w, b, nw):  # pragma: no cover
    """8-bit case of cell (i, j, 64w + b); bit n is corner (n&1, n>>1&1, n>>2)."""
    sb = np.uint64(b)
    lo = (
        ((B[i, j, w] >> sb) & _ONE)
        | (((B[i + 1, j, w] >> sb) & _ONE) << np.uint64(1))
        | (((B[i, j + 1, w] >> sb) & _ONE) << np.uint64(2))
        | (((B[i + 1, j + 1, w] >> sb) & _ONE) << np.uint64(3))
    )
    if b < 63:
        w1 = w
        s1 = np.uint64(b + 1)
    else:
        w1 = w + 1
        s1 = np.uint64(0)
    hi = (
        ((B[i, j, w1] >> s1) & _ONE)
        | (((B[i + 1, j, w1] >> s1) & _ONE) << np.uint64(1))
        | (((B[i, j + 1, w1] >> s1) & _ONE) << np.uint64(2))
        | (((B[i + 1, j + 1, w1] >> s1) & _ONE) << np.uint64(3))
    )
    return np.int64(lo | (hi << np.uint64(4)))


@njit(cache=True, inline="always")
def _decision_bits(phi, level, i, j, k, case, amask, face_corners):  # pragma: no cover
    """Asymptotic decider for the ambiguous faces of cell (i, j, k).

    Uses only the four values of each face; the products are commutative, so
    the two cells sharing a face get bit-identical answers.
    """
    bits = 0
    for f in range(6):
        if (amask >> f) & 1:
            c00 = face_corners[f, 0]
            c10 = face_corners[f, 1]
            c01 = face_corners[f, 2]
            c11 = face_corners[f, 3]
            v00 = phi[i + (c00 & 1), j + ((c00 >> 1) & 1), k + (c00 >> 2)] - level
            v10 = phi[i + (c10 & 1), j + ((c10 >> 1) & 1), k + (c10 >> 2)] - level
            v01 = phi[i + (c01 & 1), j + ((c01 >> 1) & 1), k + (c01 >> 2)] - level
            v11 = phi[i + (c11 & 1), j + ((c11 >> 1) & 1), k + (c11 >> 2)] - level
            d0 = v00 * v11
            d1 = v10 * v01
            if (case >> c00) & 1:
                pos_connected = d0 > d1
            else:
                pos_connected = d1 > d0
            if pos_connected:
                bits |= 1 << f
    return bits


@njit(cache=True, nogil=True)
def _count_range(phi, level, B, tri_count, ambig_mask, face_corners, wcnt, rowt, i0, i1):  # pragma: no cover
    """Vertices owned by each row word and triangles of each cell row, slices i0:i1."""
    nx, ny, nw = B.shape
    nz = phi.shape[2]
    for i in range(i0, i1):
        for j in range(ny):
            for w in range(nw):
                cx, cy, cz = _cross_words(B, i, j, w, nx, ny, nz, nw)
                wcnt[i, j, w] = np.int64(_popcount(cx) + _popcount(cy) + _popcount(cz))
            if i + 1 < nx and j + 1 < ny:
                cnt = 0
                for w in range(nw):
                    act = _active_cells(B, i, j, w, nz, nw)
                    while act != 0:
                        b = np.int64(_ctz(act))
                        act &= act - _ONE
                        case = _cell_case(B, i, j, w, b, nw)
                        amask = ambig_mask[case]
                        bits = 0
                        if amask != 0:
                            bits = _decision_bits(phi, level, i, j, 64 * w + b, case, amask, face_corners)
                        cnt += tri_count[case * 64 + bits]
                rowt[i, j] = cnt


@njit(cache=True, inline="always")
def _edge_t(p0, p1, level):  # pragma: no cover
    """(level - p0) / (p1 - p0) for p0 <= level < p1 (finite), in [0, 1]."""
    d = p1 - p0
    if d == np.inf:  # the difference overflows (|values| near the float64 max)
        return min(max((0.5 * level - 0.5 * p0) / (0.5 * p1 - 0.5 * p0), 0.0), 1.0)
    return (level - p0) / d


@njit(cache=True, inline="always")
def _emit_vertex(phi, level, sp, inside_first, i, j, k, a, n, verts, edges, tv):  # pragma: no cover
    """Write vertex ``n`` on the edge from (i, j, k) along axis ``a``."""
    i0 = np.int64(i)
    j0 = np.int64(j)
    k0 = np.int64(k)
    i1 = i0 + np.int64(a == 0)
    j1 = j0 + np.int64(a == 1)
    k1 = k0 + np.int64(a == 2)
    if inside_first:  # (i, j, k) is the inside corner
        ci0, cj0, ck0, ci1, cj1, ck1 = i0, j0, k0, i1, j1, k1
    else:
        ci0, cj0, ck0, ci1, cj1, ck1 = i1, j1, k1, i0, j0, k0
    t = _edge_t(phi[ci0, cj0, ck0], phi[ci1, cj1, ck1], level)
    verts[n, 0] = (ci0 + t * (ci1 - ci0)) * sp[0]
    verts[n, 1] = (cj0 + t * (cj1 - cj0)) * sp[1]
    verts[n, 2] = (ck0 + t * (ck1 - ck0)) * sp[2]
    edges[n, 0, 0] = ci0
    edges[n, 0, 1] = cj0
    edges[n, 0, 2] = ck0
    edges[n, 1, 0] = ci1
    edges[n, 1, 1] = cj1
    edges[n, 1, 2] = ck1
    tv[n] = t


@njit(cache=True, inline="always")
def _vertex_id(B, wbase, i, j, k, a, nx, ny, nz, nw):  # pragma: no cover
    """Index of the vertex on the (crossed) axis-``a`` edge starting at (i, j, k)."""
    w = k >> 6
    b = np.uint64(k & 63)
    cx, cy, cz = _cross_words(B, i, j, w, nx, ny, nz, nw)
    below = (_ONE << b) - _ONE
    n = wbase[i, j, w] + np.int64(_popcount(cx & below) + _popcount(cy & below) + _popcount(cz & below))
    if a >= 1:
        n += np.int64((cx >> b) & _ONE)
    if a == 2:
        n += np.int64((cy >> b) & _ONE)
    return n


@njit(cache=True, inline="always")
def _id_in_word(cx, cy, cz, base, b, a):  # pragma: no cover
    """:func:`_vertex_id` from the row word's crossed-edge masks and vertex base:
    the vertex on the axis-``a`` edge at bit ``b`` (< 64) of that word."""
    sb = np.uint64(b)
    below = (_ONE << sb) - _ONE
    n = base + np.int64(_popcount(cx & below) + _popcount(cy & below) + _popcount(cz & below))
    if a >= 1:
        n += np.int64((cx >> sb) & _ONE)
    if a == 2:
        n += np.int64((cy >> sb) & _ONE)
    return n


@njit(cache=True, nogil=True)
def _emit_range(
    phi, level, sp, B, wbase, rowt, toff, tri_start, tri_count, tri_edges,
    ambig_mask, face_corners, edge_start, verts, edges, tv, faces, i0, i1,
):  # pragma: no cover - compiled
    """Write the vertices owned by slices i0:i1 and the triangles of those cell layers."""
    nx, ny, nw = B.shape
    nz = phi.shape[2]
    ids = np.zeros(12, dtype=np.int64)
    rcx = np.zeros(4, dtype=np.uint64)
    rcy = np.zeros(4, dtype=np.uint64)
    rcz = np.zeros(4, dtype=np.uint64)
    rbase = np.zeros(4, dtype=np.int64)
    for i in range(i0, i1):
        for j in range(ny):
            # vertices owned by row (i, j), in (k, axis) order
            for w in range(nw):
                cx, cy, cz = _cross_words(B, i, j, w, nx, ny, nz, nw)
                u = cx | cy | cz
                if u == 0:
                    continue
                n = wbase[i, j, w]
                r = B[i, j, w]
                while u != 0:
                    sb = _ctz(u)
                    u &= u - _ONE
                    k = 64 * w + np.int64(sb)
                    inside = ((r >> sb) & _ONE) == 0
                    # axes 0, 1, 2 in turn through one (inlined) call site: numba
                    # inlines, types and lowers every call site of _emit_vertex anew
                    for a in range(3):
                        ca = cx if a == 0 else (cy if a == 1 else cz)
                        if (ca >> sb) & _ONE:
                            _emit_vertex(phi, level, sp, inside, i, j, k, a, n, verts, edges, tv)
                            n += 1
            # triangles of cell row (i, j)
            if i + 1 < nx and j + 1 < ny and rowt[i, j] > 0:
                f = toff[i, j]
                for w in range(nw):
                    act = _active_cells(B, i, j, w, nz, nw)
                    if act == 0:
                        continue
                    # the crossed-edge masks and vertex bases of word w of the four edge
                    # rows (i + di, j + dj) of this cell row, once per word, not per edge
                    for r in range(4):
                        ii = i + (r & 1)
                        jj = j + (r >> 1)
                        cxr, cyr, czr = _cross_words(B, ii, jj, w, nx, ny, nz, nw)
                        rcx[r] = cxr
                        rcy[r] = cyr
                        rcz[r] = czr
                        rbase[r] = wbase[ii, jj, w]
                    while act != 0:
                        b = np.int64(_ctz(act))
                        act &= act - _ONE
                        k = 64 * w + b
                        case = _cell_case(B, i, j, w, b, nw)
                        amask = ambig_mask[case]
                        bits = 0
                        if amask != 0:
                            bits = _decision_bits(phi, level, i, j, k, case, amask, face_corners)
                        # ids of the crossed edges of the cell (each is used by its triangles)
                        for e in range(12):
                            if ((case >> edge_start[e, 4]) ^ (case >> edge_start[e, 5])) & 1:
                                kb = b + edge_start[e, 3]
                                if kb < 64:
                                    r = edge_start[e, 1] + 2 * edge_start[e, 2]
                                    ids[e] = _id_in_word(rcx[r], rcy[r], rcz[r], rbase[r], kb,
                                                         edge_start[e, 0])
                                else:   # the edge starts in the next word
                                    ids[e] = _vertex_id(
                                        B, wbase, i + edge_start[e, 1], j + edge_start[e, 2],
                                        k + edge_start[e, 3], edge_start[e, 0], nx, ny, nz, nw,
                                    )
                        idx = case * 64 + bits
                        t0 = tri_start[idx]
                        for q in range(tri_count[idx]):
                            faces[f, 0] = ids[tri_edges[t0 + q, 0]]
                            faces[f, 1] = ids[tri_edges[t0 + q, 1]]
                            faces[f, 2] = ids[tri_edges[t0 + q, 2]]
                            f += 1


# --------------------------------------------------------------------------
# Python wrapper
# --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _edge_start() -> np.ndarray:
    """Per local edge: (axis, di, dj, dk) of its first corner, then its two corner ids."""
    tb = build_tables()
    out = np.zeros((12, 6), dtype=np.int64)
    for e in range(12):
        c0 = tb.edge_corners[e, 0]
        out[e, 0] = e // 4
        out[e, 1:4] = tb.corner_offsets[c0]
        out[e, 4:6] = tb.edge_corners[e]
    return out


#: Grids with fewer points run single-threaded by default: below ~100^3 points
#: the whole extraction takes ~1-2 ms and waking worker threads (especially on a
#: busy machine) costs about as much as it saves.
PARALLEL_MIN_POINTS = 2**20

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(n_workers: int) -> ThreadPoolExecutor:
    # keyed by pid too: a forked child must not reuse the parent's (thread-less) pool
    key = (os.getpid(), n_workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(n_workers, thread_name_prefix="marching_cubes")
        return pool


class _SlabJob:
    """Slabs of one pass, claimed dynamically by the caller and pool workers."""

    def __init__(self, fn: Callable[..., Any], args: tuple, bounds: np.ndarray) -> None:
        self.fn, self.args = fn, args
        self.slabs = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        self.results: list[Any] = [None] * len(self.slabs)
        self.error: BaseException | None = None
        self._next = itertools.count()  # next() is atomic under the GIL
        self._lock = threading.Lock()
        self._left = len(self.slabs)
        self.done = threading.Event()

    def work(self) -> None:
        while True:
            s = next(self._next)
            if s >= len(self.slabs):
                return
            try:
                self.results[s] = self.fn(*self.args, *self.slabs[s])
            except BaseException as exc:  # re-raised by the caller
                self.error = exc
            with self._lock:
                self._left -= 1
                if self._left == 0:
                    self.done.set()


def _run_slabs(fn: Callable[..., Any], args: tuple, n: int, n_threads: int) -> list[Any]:
    """Run ``fn(*args, i0, i1)`` over slabs covering ``range(n)``.

    The kernels are compiled with ``nogil=True``, so slabs run truly in
    parallel.  The calling thread works too and slabs are claimed
    dynamically, so a worker thread that is slow to wake up (busy machine)
    never delays the call by more than the slab it is processing.  Each slab
    writes a disjoint part of the outputs, so the result does not depend on
    ``n_threads``.
    """
    if n_threads <= 1 or n < 2:
        return [fn(*args, 0, n)]
    n_slabs = min(n, 4 * n_threads)  # a few slabs per thread for load balance
    job = _SlabJob(fn, args, np.linspace(0, n, n_slabs + 1).round().astype(np.int64))
    pool = _pool(n_threads - 1)
    for _ in range(n_threads - 1):
        pool.submit(job.work)
    job.work()
    job.done.wait()
    if job.error is not None:
        raise job.error
    return job.results


def _exclusive_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.empty_like(a)
    flat = out.reshape(-1)
    np.cumsum(a.reshape(-1), out=flat)
    flat -= a.reshape(-1)
    return out


def _empty_result() -> MCResult:
    return MCResult(
        np.empty((0, 3), dtype=np.float64),
        np.empty((0, 3), dtype=np.int64),
        np.empty((0, 2, 3), dtype=np.int64),
        np.empty((0,), dtype=np.float64),
    )


def marching_cubes(
    phi: np.ndarray,
    level: float = 0.0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    num_threads: int | None = None,
) -> MCResult:
    """Extract the ``level`` iso-surface of a 3-D grid as a shared-vertex mesh.

    Parameters
    ----------
    phi : (nx, ny, nz) array_like
        Grid values (converted to C-contiguous float64).  Must be finite.
    level : float, default 0.0
        Iso-value.  Grid values ``phi > level`` are outside (positive),
        ``phi <= level`` inside (the scikit-image rule).
    spacing : sequence of 3 floats, default (1, 1, 1)
        Grid spacing along axes 0, 1, 2 (finite, > 0).  Vertex coordinates
        are grid indices times ``spacing`` (as in scikit-image).
    num_threads : int, optional
        Number of threads for the three passes (the numba kernels release the
        GIL).  Default: 1 for grids with fewer than ``PARALLEL_MIN_POINTS``
        points, where waking threads costs more than it saves, otherwise
        ``numba.get_num_threads()`` (which honours ``NUMBA_NUM_THREADS``).
        The output does not depend on it.

    Returns
    -------
    MCResult
        ``verts (V, 3) float64``, ``faces (F, 3) int64``,
        ``edge_vertices (V, 2, 3) int64`` and ``t (V,) float64``; see
        :class:`MCResult` and the module docstring for the conventions.  An
        empty surface (level outside the range of ``phi``, or a grid with a
        dimension < 2) gives empty arrays of these shapes and dtypes.

    Raises
    ------
    ValueError
        If ``phi`` is not 3-D, contains NaN or infinite values, or ``level``
        / ``spacing`` are invalid.

    Notes
    -----
    One vertex per crossed grid edge (no duplicates; every vertex is used by
    at least one face when all dimensions are >= 2).  Ambiguous cell faces
    are resolved with the asymptotic decider, consistently in the two cells
    sharing the face, so the surface is watertight (every mesh edge shared by
    exactly two triangles) wherever it does not reach the grid boundary.
    The vertex set equals scikit-image's ``method='lorensen'`` vertex set
    (and the edge vertices of ``method='lewiner'``) up to scikit-image's
    float32 rounding when ``phi`` is float32-representable.

    Examples
    --------
    >>> x = np.linspace(-1, 1, 32)
    >>> phi = np.sqrt(x[:, None, None]**2 + x[None, :, None]**2 + x[None, None, :]**2) - 0.5
    >>> res = marching_cubes(phi, 0.0)
    >>> res.verts.shape[1], res.faces.dtype
    (3, dtype('int64'))
    """
    phi = kernel_f64(phi)
    if phi.ndim != 3:
        raise ValueError(f"phi must be a 3-D array, got shape {phi.shape}")
    level = float(level)
    if not np.isfinite(level):
        raise ValueError(f"level must be finite, got {level}")
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise ValueError(f"spacing must be 3 finite positive numbers, got {spacing!r}")
    if phi.size == 0:
        return _empty_result()
    if num_threads is None:
        nt = numba.get_num_threads() if phi.size >= PARALLEL_MIN_POINTS else 1
    else:
        nt = int(num_threads)
    return _marching_cubes(phi, level, sp, max(1, nt))


def _marching_cubes(phi: np.ndarray, level: float, sp: np.ndarray, nt: int) -> MCResult:
    nx, ny, nz = phi.shape
    B = np.empty((nx, ny, (nz + 63) // 64), dtype=np.uint64)
    nbad = sum(_run_slabs(_classify_range, (phi, level, B), nx, nt))
    if nbad:
        n_nan = int(np.isnan(phi).sum())
        n_inf = int(np.isinf(phi).sum())
        kinds = ([f"{n_nan} NaN"] if n_nan else []) + ([f"{n_inf} infinite (+-inf)"] if n_inf else [])
        raise ValueError(f"phi contains {' and '.join(kinds)} value(s); marching cubes needs a finite field")
    if min(nx, ny, nz) < 2:
        return _empty_result()

    tb = build_tables()
    wcnt = np.empty(B.shape, dtype=np.int64)
    rowt = np.zeros((nx - 1, ny - 1), dtype=np.int64)
    _run_slabs(_count_range, (phi, level, B, tb.tri_count, tb.ambig_mask, tb.face_corners, wcnt, rowt), nx, nt)
    wbase = _exclusive_cumsum(wcnt)
    n_verts = int(wbase.reshape(-1)[-1] + wcnt.reshape(-1)[-1])
    toff = _exclusive_cumsum(rowt)
    n_faces = int(toff.reshape(-1)[-1] + rowt.reshape(-1)[-1])
    if n_faces == 0:
        return _empty_result()

    verts = np.empty((n_verts, 3), dtype=np.float64)
    edges = np.empty((n_verts, 2, 3), dtype=np.int64)
    tv = np.empty(n_verts, dtype=np.float64)
    faces = np.empty((n_faces, 3), dtype=np.int64)
    args = (
        phi, level, sp, B, wbase, rowt, toff, tb.tri_start, tb.tri_count, tb.tri_edges,
        tb.ambig_mask, tb.face_corners, _edge_start(), verts, edges, tv, faces,
    )
    _run_slabs(_emit_range, args, nx, nt)
    return MCResult(verts, faces, edges, tv)


# --------------------------------------------------------------------------
# per-vertex kernels of the level-set layer (reference_layers.level_set)
#
# One pass over the vertices each, writing one output array: on this kind of
# machine a fresh large NumPy temporary costs about as much as the arithmetic
# (page faults), so the normal mode's cell data, trilinear values, gradients
# and corner weights are computed here rather than as chains of (V, 8) NumPy
# expressions.  float64 / int64 only: one compiled specialization each,
# compiled on first use and cached on disk (cache=True).
#
# Corner c of a cell is (c & 1, c >> 1 & 1, c >> 2) along axes (0, 1, 2).
# --------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def cell_geometry(edges, verts, sp, nx, ny, nz):  # pragma: no cover - compiled
    """Flat index of each vertex's cell origin and the vertex in cell coordinates.

    The origin is ``min(c0, c1)`` clipped to ``shape - 2`` (see
    ``reference_layers.level_set.cell_origins``); ``local = verts / sp - origin``.
    Returns ``base (V,) int64``, ``origins (V, 3) float64`` and ``local (V, 3) float64``.
    """
    V = edges.shape[0]
    base = np.empty(V, dtype=np.int64)
    origins = np.empty((V, 3), dtype=np.float64)
    local = np.empty((V, 3), dtype=np.float64)
    top0, top1, top2 = nx - 2, ny - 2, nz - 2
    for n in range(V):
        o0 = min(min(edges[n, 0, 0], edges[n, 1, 0]), top0)
        o1 = min(min(edges[n, 0, 1], edges[n, 1, 1]), top1)
        o2 = min(min(edges[n, 0, 2], edges[n, 1, 2]), top2)
        base[n] = (o0 * ny + o1) * nz + o2
        origins[n, 0], origins[n, 1], origins[n, 2] = o0, o1, o2
        local[n, 0] = verts[n, 0] / sp[0] - o0
        local[n, 1] = verts[n, 1] / sp[1] - o1
        local[n, 2] = verts[n, 2] / sp[2] - o2
    return base, origins, local


@njit(cache=True, nogil=True)
def transfer_corners(grid_flat, base, values, ny, nz, scatter):  # pragma: no cover - compiled
    """Between a flat grid and the ``(V, 8)`` corner values of cells with flat origins ``base``.

    ``scatter=False``: ``values[n, c] = grid_flat[base[n] + offset(c)]`` (a gather);
    ``scatter=True``: ``grid_flat[base[n] + offset(c)] += values[n, c]``, in order
    (n, then c).  One function for both (one compiled specialization).
    """
    for n in range(base.shape[0]):
        for c in range(8):
            i = base[n] + ((c & 1) * ny + ((c >> 1) & 1)) * nz + (c >> 2)
            if scatter:
                grid_flat[i] += values[n, c]
            else:
                values[n, c] = grid_flat[i]


@njit(cache=True, nogil=True)
def trilinear_rules(corners, local, g, what):  # pragma: no cover - compiled
    """The trilinear interpolant of each cell at ``local`` and its derivative rules.

    ``what = 0``: the values ``(V,)``; ``1``: the gradients ``(V, 3)`` in cell
    coordinates; ``2``: the corner weights times ``g``, ``out[n, c] = g[n]
    prod_k (c_k u_k + (1 - c_k)(1 - u_k))``, ``(V, 8)`` (``corners`` unused).
    Values and gradients are nested linear interpolations along axis 0, then
    1, then 2 (the operations, in the order, of ``reference_layers.level_set``'s
    NumPy rules, so both give bit-identical values).  One function for the
    three (one compiled specialization).
    """
    V = local.shape[0]
    out = np.empty((V, 1 if what == 0 else (3 if what == 1 else 8)), dtype=np.float64)
    for n in range(V):
        ux, uy, uz = local[n, 0], local[n, 1], local[n, 2]
        if what == 2:
            wx0, wy0, wz0 = 1.0 - ux, 1.0 - uy, 1.0 - uz
            for c in range(8):
                w = ux if c & 1 else wx0
                w = w * (uy if (c >> 1) & 1 else wy0)
                w = w * (uz if c >> 2 else wz0)
                out[n, c] = g[n] * w
            continue
        d0 = corners[n, 1] - corners[n, 0]
        d1 = corners[n, 3] - corners[n, 2]
        d2 = corners[n, 5] - corners[n, 4]
        d3 = corners[n, 7] - corners[n, 6]
        e00 = corners[n, 0] + ux * d0
        e10 = corners[n, 2] + ux * d1
        e01 = corners[n, 4] + ux * d2
        e11 = corners[n, 6] + ux * d3
        f0 = e00 + uy * (e10 - e00)
        f1 = e01 + uy * (e11 - e01)
        if what == 0:
            out[n, 0] = f0 + uz * (f1 - f0)
        else:
            out[n, 0] = (1.0 - uz) * (d0 + uy * (d1 - d0)) + uz * (d2 + uy * (d3 - d2))
            out[n, 1] = (1.0 - uz) * (e10 - e00) + uz * (e11 - e01)
            out[n, 2] = f1 - f0
    return out


@njit(cache=True, nogil=True)
def edge_direction_dot(g, edges, sp):  # pragma: no cover - compiled
    """``out[n] = sum_k g[n, k] (c1 - c0)_k sp[k]`` for the vertex edges ``(c0, c1)``."""
    V = edges.shape[0]
    out = np.empty(V, dtype=np.float64)
    for n in range(V):
        acc = 0.0
        for k in range(3):
            acc += g[n, k] * ((edges[n, 1, k] - edges[n, 0, k]) * sp[k])
        out[n] = acc
    return out
