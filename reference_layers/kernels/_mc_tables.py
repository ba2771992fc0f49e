"""Programmatic construction of the marching-cubes lookup tables.

Nothing in this module is copied from an existing marching-cubes table: the
triangulation of every cube configuration is *derived* from first principles
(the contour of the iso-surface on each cube face, oriented by the sign
pattern, closed into loops and triangulated), so every convention used by
:mod:`reference_layers.kernels.marching_cubes` is visible in this file.

Local numbering
---------------
Corners
    ``n = di + 2*dj + 4*dk`` for the corner at offset ``(di, dj, dk)`` from the
    cell origin ``(i, j, k)`` (offsets along array axes 0, 1, 2).  With this
    numbering the 8-bit case index of a cell is simply
    ``sum(positive(n) << n)``.
Edges
    ``e = 4*a + u + 2*v`` for the edge parallel to axis ``a``; ``(u, v)`` are
    the corner offsets along the two *other* axes in increasing axis order
    (axis 0 -> (1, 2), axis 1 -> (0, 2), axis 2 -> (0, 1)).  Its first corner
    has offset 0 along ``a``, its second corner offset 1.
Faces
    ``f = 2*a + side``: the face orthogonal to axis ``a`` at offset ``side``.
    Its corners are listed in in-plane order ``(0,0), (1,0), (0,1), (1,1)``
    over the two other axes (increasing axis order), so that the two cells
    sharing a face see its corners in the same order.

How a configuration is triangulated
-----------------------------------
1.  On each face, the crossed face edges (endpoints of different sign) carry
    the iso-contour.  With 2 crossings there is one segment.  With 4 crossings
    (an *ambiguous* face: the two diagonals carry opposite signs) there are two
    segments, chosen by a per-face decision bit: bit set means "the two
    positive corners are connected across the face" (each negative corner is
    cut off by its own segment), bit clear means the opposite.  At run time the
    bit is the asymptotic decider, which depends only on the four values of
    the face, so both cells sharing a face always agree -> watertight.
2.  Each segment is oriented so that, seen from outside the cube through that
    face, the positive region lies on a fixed side.  Every crossed edge then
    has exactly one incoming and one outgoing segment and the segments close
    into loops; neighbouring cells traverse their shared segments in opposite
    directions, so orientation is globally consistent.
3.  Each loop is triangulated without adding vertices, by dynamic programming
    over polygon triangulations, evaluated at edge mid-points: first minimise
    the number of chords lying in a cube face, then the total area, then the
    total diagonal length.  A chord joining two vertices on a common
    (necessarily ambiguous) face lies in that face and is visible from the
    neighbouring cell too; if both cells used it, that mesh edge would have
    four triangles.  Such chords are therefore *owned* by exactly one of the
    two cells (:func:`_chord_penalty`) and forbidden in the other.  They are
    needed only by loops that wind around the cell (ambiguous faces of one
    cell resolved differently, the configurations where MC33 inserts an
    interior vertex); the ownership rule was chosen so that every such loop
    stays triangulable, which :func:`build_tables` asserts.  Triangles are
    emitted in loop order, which gives normals (right-hand rule) pointing
    towards the positive side (``phi > level``), i.e. towards increasing
    ``phi``.

Consequences (checked by the tests): with one vertex per crossed grid edge,
every mesh edge of a surface that does not reach the grid boundary is shared
by exactly two triangles with opposite directions, and the triangles around
each vertex form a single fan (the mesh is a closed oriented 2-manifold).

The table is indexed by ``case * 64 + decision_bits`` where ``decision_bits``
has bit ``f`` set for ambiguous face ``f`` whose positive corners are
connected; bits of non-ambiguous faces must be zero (the kernel masks them
with ``ambig_mask[case]``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np

__all__ = ["MCTables", "build_tables", "CORNER_OFFSETS", "EDGE_CORNERS", "FACE_CORNERS"]


def _corner_offset(n: int) -> tuple[int, int, int]:
    return (n & 1, (n >> 1) & 1, (n >> 2) & 1)


def _other_axes(a: int) -> tuple[int, int]:
    b, c = (ax for ax in range(3) if ax != a)
    return b, c


def _edge_corners(e: int) -> tuple[int, int]:
    a, r = divmod(e, 4)
    u, v = r & 1, r >> 1
    b, c = _other_axes(a)
    off = [0, 0, 0]
    off[b], off[c] = u, v
    c0 = off[0] + 2 * off[1] + 4 * off[2]
    return c0, c0 + (1 << a)


def _face_corners(f: int) -> tuple[int, int, int, int]:
    a, side = divmod(f, 2)
    b, c = _other_axes(a)
    out = []
    for q in range(2):
        for p in range(2):
            off = [0, 0, 0]
            off[a], off[b], off[c] = side, p, q
            out.append(off[0] + 2 * off[1] + 4 * off[2])
    return tuple(out)  # (0,0), (1,0), (0,1), (1,1)


CORNER_OFFSETS = np.array([_corner_offset(n) for n in range(8)], dtype=np.int64)
EDGE_CORNERS = np.array([_edge_corners(e) for e in range(12)], dtype=np.int64)
FACE_CORNERS = np.array([_face_corners(f) for f in range(6)], dtype=np.int64)

_EDGE_OF_CORNER_PAIR = {frozenset(map(int, EDGE_CORNERS[e])): e for e in range(12)}


# plain-Python copies (table construction works on tiny tuples, numpy is slow there)
_CO = [tuple(int(x) for x in CORNER_OFFSETS[n]) for n in range(8)]
_EC = [(int(EDGE_CORNERS[e, 0]), int(EDGE_CORNERS[e, 1])) for e in range(12)]
_FC = [tuple(int(x) for x in FACE_CORNERS[f]) for f in range(6)]
_MID = [tuple(0.5 * (_CO[_EC[e][0]][ax] + _CO[_EC[e][1]][ax]) for ax in range(3)) for e in range(12)]


def _sub(u, v):
    return (u[0] - v[0], u[1] - v[1], u[2] - v[2])


def _cross(u, v):
    return (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])


def _dot(u, v) -> float:
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def _face_edges(f: int) -> list[int]:
    fc = _FC[f]
    # the 4 edges of the face, as corner pairs in in-plane order
    pairs = [(fc[0], fc[1]), (fc[2], fc[3]), (fc[0], fc[2]), (fc[1], fc[3])]
    return [_EDGE_OF_CORNER_PAIR[frozenset(pair)] for pair in pairs]


_FACE_EDGES = [_face_edges(f) for f in range(6)]
_EDGE_FACES = [[f for f in range(6) if e in _FACE_EDGES[f]] for e in range(12)]


def _is_ambiguous(case: int, f: int) -> bool:
    s = [(case >> c) & 1 for c in _FC[f]]
    return s[0] == s[3] and s[1] == s[2] and s[0] != s[1]


def _face_segments(case: int, f: int, connect_positive: bool) -> list[tuple[int, int]]:
    """Oriented iso-contour segments (edge pairs) on face ``f``."""
    pos = lambda c: (case >> c) & 1  # noqa: E731
    crossed = [e for e in _FACE_EDGES[f] if pos(_EC[e][0]) != pos(_EC[e][1])]
    if not crossed:
        return []
    if len(crossed) == 2:
        segs = [(crossed[0], crossed[1])]
    else:
        assert len(crossed) == 4 and _is_ambiguous(case, f)
        # cut off each corner of the separated sign
        cut_sign = 0 if connect_positive else 1
        segs = []
        for c in _FC[f]:
            if pos(c) != cut_sign:
                continue
            inc = [e for e in _FACE_EDGES[f] if c in _EC[e]]
            assert len(inc) == 2
            segs.append((inc[0], inc[1]))
    a, side = divmod(f, 2)
    normal = [0.0, 0.0, 0.0]
    normal[a] = 1.0 if side else -1.0
    out = []
    for p, q in segs:
        c0, c1 = _EC[p]
        m = _sub(_CO[c1], _CO[c0]) if pos(c1) else _sub(_CO[c0], _CO[c1])  # neg -> pos along edge p
        s = _dot(_sub(_MID[q], _MID[p]), _cross(m, normal))
        assert s != 0.0
        out.append((p, q) if s > 0 else (q, p))
    return out


def _loops(case: int, bits: int) -> list[list[int]]:
    nxt: dict[int, int] = {}
    for f in range(6):
        for p, q in _face_segments(case, f, bool((bits >> f) & 1)):
            assert p not in nxt, "edge with two outgoing segments"
            nxt[p] = q
    assert sorted(nxt) == sorted(nxt.values()), "segments do not close into loops"
    loops = []
    seen: set[int] = set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop = [start]
        seen.add(start)
        e = nxt[start]
        while e != start:
            loop.append(e)
            seen.add(e)
            e = nxt[e]
        loops.append(loop)
    return loops


def _chord_penalty(e1: int, e2: int) -> float:
    """Cost of using the non-boundary chord between loop vertices ``e1, e2``.

    0 when the two edges share no cube face (the chord crosses the cell
    interior).  Two edges sharing a face ``f`` but not joined by a contour
    segment only occur on an *ambiguous* face; such a chord lies in ``f`` and
    is visible from both cells sharing ``f``.  It is forbidden (``inf``) unless
    it is *owned* by this cell; owned chords cost 1 (they are needed only by
    a few loops that wind around the cell, see :func:`_triangulate`).

    Ownership rule: a chord cutting off the face corner at in-plane offset
    ``(p, q)`` belongs to the cell that has ``f`` at ``side == p``.  Chords
    joining two opposite face edges are never used.  The rule depends only on
    the face and the chord, so exactly one of the two cells may use it.
    """
    common = set(_EDGE_FACES[e1]) & set(_EDGE_FACES[e2])
    if not common:
        return 0.0
    (f,) = common
    side = f % 2
    shared = set(_EC[e1]) & set(_EC[e2])
    if not shared:  # opposite edges of the face
        return float("inf")
    (corner,) = shared
    p = _FC[f].index(corner) & 1  # in-plane (p, q) order 00, 10, 01, 11
    return 1.0 if p == side else float("inf")


_CHORD_PENALTY = [[_chord_penalty(e1, e2) if e1 != e2 else 0.0 for e2 in range(12)] for e1 in range(12)]


def _triangulate(loop: list[int]) -> list[tuple[int, int, int]]:
    """Triangulate a loop of edge ids without adding vertices.

    Dynamic programming over all triangulations of the polygon.  A chord
    (diagonal) between two loop vertices lying on a common cube face would lie
    in that face and is also visible to the neighbouring cell; to keep every
    mesh edge shared by exactly two triangles such chords are restricted by
    an ownership rule (:func:`_chord_penalty`).  In-face chords are needed
    only by loops that wind around the cell (ambiguous faces of one cell
    resolved differently by the asymptotic decider, where MC33 would insert
    an interior vertex); their number is minimised first, then the total
    area, then the total diagonal length (evaluated at edge mid-points).
    """
    m = len(loop)
    if m == 3:
        return [(loop[0], loop[1], loop[2])]
    pts = [_MID[e] for e in loop]
    INF = float("inf")

    def chord_penalty(i: int, j: int) -> float:
        if j - i == 1 or (i == 0 and j == m - 1):
            return 0.0
        return _CHORD_PENALTY[loop[i]][loop[j]]

    def tri_area(i: int, k: int, j: int) -> float:
        c = _cross(_sub(pts[k], pts[i]), _sub(pts[j], pts[i]))
        return 0.5 * math.sqrt(_dot(c, c))

    best: dict[tuple[int, int], tuple[tuple[float, float, float], int]] = {}
    zero = (0.0, 0.0, 0.0)
    for gap in range(2, m):
        for i in range(0, m - gap):
            j = i + gap
            cand: tuple[tuple[float, float, float], int] = ((INF, INF, INF), -1)
            for k in range(i + 1, j):
                left = best[(i, k)][0] if k - i > 1 else zero
                right = best[(k, j)][0] if j - k > 1 else zero
                pen = left[0] + right[0] + chord_penalty(i, k) + chord_penalty(k, j)
                if pen == INF:
                    continue
                diag = left[2] + right[2]
                if k - i > 1:
                    diag += math.dist(pts[k], pts[i])
                if j - k > 1:
                    diag += math.dist(pts[j], pts[k])
                area = round(left[1] + right[1] + tri_area(i, k, j), 9)
                cost = (pen, area, round(diag, 9))
                if cost < cand[0]:
                    cand = (cost, k)
            best[(i, j)] = cand
    assert best[(0, m - 1)][1] >= 0, f"no admissible triangulation for loop {loop}"

    tris: list[tuple[int, int, int]] = []

    def emit(i: int, j: int) -> None:
        if j - i < 2:
            return
        k = best[(i, j)][1]
        tris.append((loop[i], loop[k], loop[j]))
        emit(i, k)
        emit(k, j)

    emit(0, m - 1)
    return tris


class MCTables(NamedTuple):
    """Lookup tables consumed by the numba kernel.

    Attributes
    ----------
    tri_start : (256*64,) int32
        First row of ``tri_edges`` for configuration ``idx = case*64 + bits``.
    tri_count : (256*64,) int32
        Number of triangles of that configuration (rows
        ``tri_start[idx] : tri_start[idx] + tri_count[idx]``).
    tri_edges : (T, 3) int8
        Local edge ids of each triangle, in output (oriented) order.
    ambig_mask : (256,) uint8
        Bit ``f`` set when face ``f`` is ambiguous for the case.
    face_corners : (6, 4) int64
        Corner ids of each face in in-plane order (00, 10, 01, 11).
    edge_corners : (12, 2) int64
        Corner ids of each local edge (first has offset 0 along the edge).
    corner_offsets : (8, 3) int64
        ``(di, dj, dk)`` of each corner.
    max_tris : int
        Largest number of triangles of a configuration.
    """

    tri_start: np.ndarray
    tri_count: np.ndarray
    tri_edges: np.ndarray
    ambig_mask: np.ndarray
    face_corners: np.ndarray
    edge_corners: np.ndarray
    corner_offsets: np.ndarray
    max_tris: int


@lru_cache(maxsize=1)
def build_tables() -> MCTables:
    """Derive the triangulation tables for all 256 cases x face decisions.

    Returns
    -------
    MCTables
        Read-only arrays (see :class:`MCTables`).  The result is cached.
    """
    ambig_mask = np.zeros(256, dtype=np.uint8)
    for case in range(256):
        for f in range(6):
            if _is_ambiguous(case, f):
                ambig_mask[case] |= 1 << f
    start_of: dict[tuple[int, int], tuple[int, int]] = {}
    tri_start = np.zeros(256 * 64, dtype=np.int32)
    tri_count = np.zeros(256 * 64, dtype=np.int32)
    all_tris: list[tuple[int, int, int]] = []
    for case in range(256):
        for bits in range(64):
            key = (case, bits & int(ambig_mask[case]))
            if key not in start_of:
                tris: list[tuple[int, int, int]] = []
                for loop in _loops(*key):
                    tris.extend(_triangulate(loop))
                start_of[key] = (len(all_tris), len(tris))
                all_tris.extend(tris)
            tri_start[case * 64 + bits], tri_count[case * 64 + bits] = start_of[key]
    tri_edges = np.array(all_tris, dtype=np.int8).reshape(-1, 3)
    counts = tri_count
    tables = MCTables(
        tri_start=tri_start,
        tri_count=tri_count,
        tri_edges=tri_edges,
        ambig_mask=ambig_mask,
        face_corners=FACE_CORNERS.copy(),
        edge_corners=EDGE_CORNERS.copy(),
        corner_offsets=CORNER_OFFSETS.copy(),
        max_tris=int(counts.max()),
    )
    for arr in tables[:-1]:
        arr.setflags(write=False)
    return tables
