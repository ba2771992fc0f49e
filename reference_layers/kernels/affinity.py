r"""Numba kernels that build a graph-matching affinity matrix and its VJPs.

Conventions (shared with :mod:`reference_layers.graph_matching`)
----------------------------------------------------------------
Graph 1 has ``n`` nodes and directed edges ``E1`` (``e1 x 2``, rows
``(i, j)``), graph 2 has ``m`` nodes and edges ``E2`` (``e2 x 2``, rows
``(a, b)``).  An assignment ``X`` (``n x m``) is vectorized row-major,
``y[i*m + a] = X[i, a]``, so that ``vec(A X B') = (A kron B) vec(X)``.  The
affinity matrix (``nm x nm``) is

.. math::
    M = \operatorname{diag}(\operatorname{vec} K_p)
        + (G_1 \otimes G_2)\, \operatorname{diag}(\operatorname{vec} K_e)\,
          (H_1 \otimes H_2)^T,

with ``G`` / ``H`` the edge-to-start-node / edge-to-end-node incidence
matrices: entry-wise ``M[i m + a, j m + b] += K_e[e, f]`` for ``e = (i, j)``
and ``f = (a, b)``, plus ``M[i m + a, i m + a] += K_p[i, a]``.

The Gaussian edge kernel is
``K_e[e, f] = exp(-sum_t w_t (P1[e, t] - P2[f, t])^2)`` on edge features ``P``.

The scatter kernels run in parallel over the start nodes of graph 1: edges are
grouped by start node (``order``/``ptr``, a CSR index built by the caller), so
each thread writes only its own rows of ``M`` and there are no write races.
Kernels are compiled on first call (``cache=True``), never at import.
"""
from __future__ import annotations

import types

import numpy as np
from numba import njit, prange


def group_by_start(edges: np.ndarray, n_nodes: int):
    """CSR grouping of the edges by start node: ``order`` and ``ptr`` with the
    edges starting at node ``i`` being ``order[ptr[i]:ptr[i+1]]``."""
    starts = edges[:, 0]
    order = np.argsort(starts, kind="stable").astype(np.int64)
    counts = np.bincount(starts, minlength=n_nodes)
    ptr = np.zeros(n_nodes + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return order, ptr


@njit(cache=True, inline="always")
def _edge_exponent(P1, P2, w, e, f):  # pragma: no cover - numba
    """``s = sum_t w_t (P1[e, t] - P2[f, t])^2``, so that ``K_e[e, f] = exp(-s)``.

    Inlined into the kernels at numba-IR level: as a plain call it measured
    ~2x slower on the matrix build (n = m = 20, full edges)."""
    s = 0.0
    for t in range(P1.shape[1]):
        d = P1[e, t] - P2[f, t]
        s += w[t] * d * d
    return s


def _py_gaussian_affinity_matrix(Kp, P1, P2, w, E1, E2, order, ptr):  # pragma: no cover - numba
    """Dense ``M`` from node affinities ``Kp`` and the Gaussian edge kernel."""
    n, m = Kp.shape
    N = n * m
    e2 = E2.shape[0]
    M = np.zeros((N, N))
    for i in prange(n):
        for a in range(m):
            M[i * m + a, i * m + a] += Kp[i, a]
        for q in range(ptr[i], ptr[i + 1]):
            e = order[q]
            j = E1[e, 1]
            for f in range(e2):
                M[i * m + E2[f, 0], j * m + E2[f, 1]] += np.exp(-_edge_exponent(P1, P2, w, e, f))
    return M


def _py_gaussian_affinity_vjp_w(G, P1, P2, w, E1, E2, m):  # pragma: no cover - numba
    """Cotangent of ``w`` for the cotangent ``G`` of ``M`` (``m`` nodes in graph 2):
    ``w_bar_t = -sum_{e,f} G[i m + a, j m + b] K_e[e,f] (P1[e,t] - P2[f,t])^2``."""
    e1, k = P1.shape
    e2 = P2.shape[0]
    rows = np.zeros((e1, k))
    for e in prange(e1):
        i, j = E1[e, 0], E1[e, 1]
        for f in range(e2):
            g = G[i * m + E2[f, 0], j * m + E2[f, 1]]
            if g == 0.0:
                continue
            c = -g * np.exp(-_edge_exponent(P1, P2, w, e, f))
            for t in range(k):
                d = P1[e, t] - P2[f, t]
                rows[e, t] += c * d * d
    out = np.zeros(k)
    for e in range(e1):
        for t in range(k):
            out[t] += rows[e, t]
    return out


def _py_gaussian_affinity_vjp_p1(G, P1, P2, w, E1, E2, m):  # pragma: no cover - numba
    """Cotangent of ``P1``: ``-2 sum_f G K_e w_t (P1[e,t] - P2[f,t])``."""
    e1, k = P1.shape
    e2 = P2.shape[0]
    out = np.zeros((e1, k))
    for e in prange(e1):
        i, j = E1[e, 0], E1[e, 1]
        for f in range(e2):
            g = G[i * m + E2[f, 0], j * m + E2[f, 1]]
            if g == 0.0:
                continue
            c = -2.0 * g * np.exp(-_edge_exponent(P1, P2, w, e, f))
            for t in range(k):
                out[e, t] += c * w[t] * (P1[e, t] - P2[f, t])
    return out


def _py_gaussian_affinity_vjp_p2(G, P1, P2, w, E1, E2, m):  # pragma: no cover - numba
    """Cotangent of ``P2``: ``+2 sum_e G K_e w_t (P1[e,t] - P2[f,t])``."""
    e1, k = P1.shape
    e2 = P2.shape[0]
    out = np.zeros((e2, k))
    for f in prange(e2):
        a, b = E2[f, 0], E2[f, 1]
        for e in range(e1):
            g = G[E1[e, 0] * m + a, E1[e, 1] * m + b]
            if g == 0.0:
                continue
            c = 2.0 * g * np.exp(-_edge_exponent(P1, P2, w, e, f))
            for t in range(k):
                out[f, t] += c * w[t] * (P1[e, t] - P2[f, t])
    return out


def _py_gaussian_affinity_jvp(P1, P2, w, dP1, dP2, dw, E1, E2, order, ptr, n, m):  # noqa
    """Tangent of the edge part of ``M`` for tangents ``(dP1, dP2, dw)``:
    ``dK_e = -K_e sum_t [dw_t d_t^2 + 2 w_t d_t (dP1[e,t] - dP2[f,t])]``,
    ``d = P1[e] - P2[f]``,
    scattered like ``K_e`` (the node part's tangent is ``diag(vec dK_p)``, added by the caller)."""
    N = n * m
    e2 = E2.shape[0]
    k = P1.shape[1]
    dM = np.zeros((N, N))
    for i in prange(n):
        for q in range(ptr[i], ptr[i + 1]):
            e = order[q]
            j = E1[e, 1]
            for f in range(e2):
                s = 0.0
                ds = 0.0
                for t in range(k):
                    d = P1[e, t] - P2[f, t]
                    s += w[t] * d * d
                    ds += dw[t] * d * d + 2.0 * w[t] * d * (dP1[e, t] - dP2[f, t])
                dM[i * m + E2[f, 0], j * m + E2[f, 1]] -= np.exp(-s) * ds
    return dM


def _py_scatter_affinity(Kp, Ke, E1, E2, order, ptr):  # pragma: no cover - numba
    """Dense ``M`` from node affinities ``Kp`` (``n x m``) and any edge
    affinities ``Ke`` (``e1 x e2``); linear in both."""
    n, m = Kp.shape
    N = n * m
    e2 = E2.shape[0]
    M = np.zeros((N, N))
    for i in prange(n):
        for a in range(m):
            M[i * m + a, i * m + a] += Kp[i, a]
        for q in range(ptr[i], ptr[i + 1]):
            e = order[q]
            j = E1[e, 1]
            for f in range(e2):
                M[i * m + E2[f, 0], j * m + E2[f, 1]] += Ke[e, f]
    return M


def _py_gather_affinity(G, E1, E2, n, m):  # pragma: no cover - numba
    """Adjoint of :func:`scatter_affinity`: ``(Kp_bar, Ke_bar)`` for the
    cotangent ``G`` of ``M``."""
    e1 = E1.shape[0]
    e2 = E2.shape[0]
    Kp_bar = np.empty((n, m))
    for i in range(n):
        for a in range(m):
            Kp_bar[i, a] = G[i * m + a, i * m + a]
    Ke_bar = np.empty((e1, e2))
    for e in prange(e1):
        i, j = E1[e, 0], E1[e, 1]
        for f in range(e2):
            Ke_bar[e, f] = G[i * m + E2[f, 0], j * m + E2[f, 1]]
    return Kp_bar, Ke_bar


@njit(cache=True)
def symmetry_stats(M):  # pragma: no cover - numba
    """``(max|M|, max|M - M'|, min M)`` in one tiled pass over the upper triangle."""
    N = M.shape[0]
    tile = 64
    big = 0.0
    asym = 0.0
    low = np.inf
    for I in range(0, N, tile):
        for J in range(I, N, tile):
            for i in range(I, min(I + tile, N)):
                j0 = max(J, i)
                for j in range(j0, min(J + tile, N)):
                    a = M[i, j]
                    b = M[j, i]
                    d = abs(a - b)
                    if d > asym:
                        asym = d
                    if abs(a) > big:
                        big = abs(a)
                    if abs(b) > big:
                        big = abs(b)
                    if a < low:
                        low = a
                    if b < low:
                        low = b
    return big, asym, low


# reassociation lets the reductions vectorize; NaN/Inf semantics are kept (no nnan/ninf flags)
@njit(cache=True, fastmath={"reassoc", "nsz", "contract"})
def affinity_stats(M):  # pragma: no cover - numba
    """One fused, tiled pass over ``M`` (square, float64, C-contiguous):
    ``(max|M|, max|M - M'|, min M, number of non-finite entries, M 1)``.

    The row sums ``M 1`` are the first Lanczos product of spectral matching
    (its start vector is ``1``), so validating ``M`` costs no extra pass.  Each
    off-diagonal tile pair is compared through a transposed copy of the lower
    tile in a small buffer, so both reads of the inner loop are contiguous
    (branch-free max/min: the loop vectorizes)."""
    N = M.shape[0]
    tile = 64
    big = 0.0
    asym = 0.0
    low = np.inf
    total = 0.0
    rows = np.zeros(N)
    buf = np.empty((tile, tile))
    for I in range(0, N, tile):
        ni = min(tile, N - I)
        for J in range(I, N, tile):
            nj = min(tile, N - J)
            for jj in range(nj):          # buf[ii, jj] = M[J + jj, I + ii]
                for ii in range(ni):
                    buf[ii, jj] = M[J + jj, I + ii]
            for ii in range(ni):
                i = I + ii
                jj0 = i - J + 1 if J == I else 0
                if J == I:                # the diagonal entry itself
                    a = M[i, i]
                    big = max(big, abs(a))
                    low = min(low, a)
                    total += a
                    rows[i] += a
                s = 0.0
                for jj in range(jj0, nj):
                    a = M[i, J + jj]
                    b = buf[ii, jj]
                    asym = max(asym, abs(a - b))
                    big = max(big, max(abs(a), abs(b)))
                    low = min(low, min(a, b))
                    s += a
                    total += a + b
                rows[i] += s
            for jj in range(nj):          # column sums of the lower tile = row sums there
                j = J + jj
                s = 0.0
                for ii in range(jj if J == I else ni):   # M[j, I + ii] strictly below the diagonal
                    s += buf[ii, jj]
                rows[j] += s
    bad = 0
    if not np.isfinite(total) or not np.isfinite(asym):   # NaN/Inf (or overflow): count them
        for i in range(N):
            for j in range(N):
                if not np.isfinite(M[i, j]):
                    bad += 1
    return big, asym, low, bad, rows



# the same flags as affinity_stats: the row sums vectorize, NaN/Inf semantics are kept
@njit(cache=True, fastmath={"reassoc", "nsz", "contract"})
def affinity_scan(M, X, r, s):  # pragma: no cover - numba
    """One streamed, row-major pass over ``M`` (square, float64, C-contiguous)
    with an exact randomized symmetry certificate:
    ``(number of non-finite entries, M 1, certified, signed)``.

    ``signed``: some entry has its sign bit set (a negative entry or ``-0.0``;
    with ``signed`` False every entry is ``>= +0``, so ``M == 0`` exactly when
    ``M 1 == 0``).  A NaN/Inf entry makes its row sum non-finite, so the entries
    are counted only then.

    ``X`` is ``M.view(np.uint64)`` (the entries' bit patterns), ``r`` and ``s``
    are independent uniform random integers in ``[0, 2**32)`` (uint64).  Each
    entry is split into its two 32-bit words ``lo``, ``hi``, and the pass
    computes ``u = L r + H s`` and ``c = L' r + H' s`` in integer arithmetic
    modulo ``2**64`` (``L``, ``H``: the matrices of the words; ``c`` by an axpy
    per row, so ``M`` is read once, in memory order).  No rounding is involved:

    - an exactly symmetric ``M`` (bit-identical ``M[i, j]``, ``M[j, i]``) always
      gives ``u == c`` (``certified`` True);
    - otherwise some row ``i`` has an entry ``j`` whose words differ, and
      ``u_i - c_i`` contains ``d r_j`` (or ``d s_j``) with ``0 < |d| < 2**32``:
      ``r_j -> d r_j mod 2**64`` is injective on ``[0, 2**32)``, so given the
      other draws at most one value of ``r_j`` makes the row cancel, and
      ``certified`` is True with probability at most ``2**-32``.

    ``certified`` False says nothing about the size of ``M - M'`` (``-0.0``
    against ``0.0`` also differs): the caller then measures it exactly
    (:func:`affinity_stats`)."""
    N = M.shape[0]
    total = 0.0
    rows = np.empty(N)
    u = np.empty(N, dtype=np.uint64)
    c = np.zeros(N, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    shift = np.uint64(32)
    bits = np.uint64(0)
    for i in range(N):
        Mi = M[i]
        Xi = X[i]
        t = 0.0
        ui = np.uint64(0)
        ri = r[i] & mask
        si = s[i] & mask
        o = np.uint64(0)
        for j in range(N):
            t += Mi[j]
            x = Xi[j]
            o |= x
            wl = x & mask
            wh = x >> shift
            ui += wl * (r[j] & mask) + wh * (s[j] & mask)   # masks: 32x32-bit products
            c[j] += wl * ri + wh * si
        rows[i] = t
        total += t
        u[i] = ui
        bits |= o
    certified = True
    for i in range(N):
        if u[i] != c[i]:
            certified = False
    bad = 0
    if not np.isfinite(total):
        for i in range(N):
            for j in range(N):
                if not np.isfinite(M[i, j]):
                    bad += 1
    return bad, rows, certified, (bits >> np.uint64(63)) != 0


# Each kernel in two compilations: serial (small problems, where a parallel region's
# start-up dominates, badly so on a loaded machine) and parallel (prange over rows).
# The copies get their own qualified names so that numba's on-disk cache keeps the two
# compilations apart.
def _named_copy(f, suffix):
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__,
                           f.__closure__)
    g.__qualname__ = f.__qualname__ + suffix
    g.__doc__ = f.__doc__
    return g


KERNELS = ("gaussian_affinity_matrix", "gaussian_affinity_vjp_w", "gaussian_affinity_vjp_p1",
           "gaussian_affinity_vjp_p2", "gaussian_affinity_jvp", "scatter_affinity",
           "gather_affinity")
for _name in KERNELS:
    _py = globals()[f"_py_{_name}"]
    globals()[f"{_name}_serial"] = njit(cache=True)(_named_copy(_py, "_serial"))
    globals()[f"{_name}_parallel"] = njit(cache=True, parallel=True)(_named_copy(_py, "_parallel"))


#: pair count (e1 * e2) above which the parallel compilations are used
PARALLEL_MIN_PAIRS = 200_000


def pick(name: str, pairs: int):
    """The serial or the parallel compilation of kernel ``name`` for ``pairs`` edge pairs."""
    return globals()[f"{name}_{'parallel' if pairs >= PARALLEL_MIN_PAIRS else 'serial'}"]
