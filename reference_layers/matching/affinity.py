"""Affinity builders: node affinities, edge features, the numba Gaussian affinity and the
scatter ``assemble_affinity`` (both with their VJPs/JVPs)."""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.extend import defjvp, defvjp, primitive
from autograd.tracer import getval, isbox

from nimplicit.errors import ShapeError, UnsupportedError



def full_edges(n: int) -> np.ndarray:
    """All ``n (n - 1)`` directed edges ``(i, j)``, ``i != j`` (both directions)."""
    i, j = np.nonzero(~np.eye(n, dtype=bool))
    return np.stack([i, j], axis=1).astype(np.int64)


def edge_features(points, edges) -> np.ndarray:
    r"""Geometric edge features ``(length / mean length, cos theta, sin theta)``
    of the directed edges (``e x 2``) of 2-D ``points`` (``n x 2``).

    Lengths are normalized by their mean (scale invariance).  Reversing an edge
    flips the direction vector, so a Gaussian kernel on feature differences is
    the same for ``(e, f)`` and their reverses: the affinity is symmetric.
    """
    points, edges = np.asarray(points, float), np.asarray(edges)
    vec = points[edges[:, 1]] - points[edges[:, 0]]
    length = np.linalg.norm(vec, axis=1)
    if (length == 0).any():
        raise ValueError("two nodes joined by an edge coincide: edge direction undefined")
    return np.stack([length / length.mean(), vec[:, 0] / length, vec[:, 1] / length], axis=1)


def node_affinity(F1, F2, W):
    r"""Gaussian node affinity through a learnable linear map ``W`` (``d x k``):
    ``K_p[i, a] = exp(-|W' f1_i - W' f2_a|^2)`` (``n x m``; batched: leading axis)."""
    A, B = anp.matmul(F1, W), anp.matmul(F2, W)
    sq = (anp.sum(A * A, axis=-1)[..., :, None] + anp.sum(B * B, axis=-1)[..., None, :]
          - 2 * anp.matmul(A, anp.swapaxes(B, -1, -2)))
    return anp.exp(-anp.maximum(sq, 0.0))


def gaussian_affinity_reference(Kp, P1, P2, w, E1, E2):
    r"""The dense affinity of :func:`gaussian_affinity` in plain autograd.numpy
    (one instance): ``K_e = exp(-sum_t w_t (P1[e,t] - P2[f,t])^2)`` and
    ``M = diag(vec K_p) + (G1 ⊗ G2) diag(vec K_e) (H1 ⊗ H2)'``.
    Slow (materializes ``e1 e2 k`` differences) but any-order differentiable."""
    n, m = anp.shape(Kp)
    diff = P1[:, None, :] - P2[None, :, :]
    Ke = anp.exp(-anp.sum(w * diff * diff, axis=-1))
    G1, H1 = np.eye(n)[E1[:, 0]].T, np.eye(n)[E1[:, 1]].T
    G2, H2 = np.eye(m)[E2[:, 0]].T, np.eye(m)[E2[:, 1]].T
    edge = anp.dot(anp.dot(np.kron(G1, G2), anp.diag(anp.reshape(Ke, (-1,)))), np.kron(H1, H2).T)
    return anp.diag(anp.reshape(Kp, (-1,))) + edge


class _Edges:
    """Validated edge lists with their CSR grouping, per instance."""

    def __init__(self, E1, E2, n: int, m: int):
        from ..kernels import affinity as kern
        self.E1 = np.ascontiguousarray(E1, dtype=np.int64)
        self.E2 = np.ascontiguousarray(E2, dtype=np.int64)
        for E, nodes, name in ((self.E1, n, "E1"), (self.E2, m, "E2")):
            if E.ndim != 2 or E.shape[1] != 2:
                raise ShapeError(f"{name} must have shape (edges, 2), got {E.shape}")
            if E.size and (E.min() < 0 or E.max() >= nodes):
                raise ShapeError(f"{name} refers to node {int(E.max())} of a graph with {nodes} "
                                 f"nodes")
        self.order, self.ptr = kern.group_by_start(self.E1, n)


def _per_instance(x, batched):
    return list(x) if batched else [x]


def _require_shape(name: str, value, want: tuple) -> None:
    # the numba kernels do not bounds-check: a wrong shape would read past the arrays
    got = np.shape(getval(value))
    if got != tuple(want):
        raise ShapeError(f"{name} must have shape {tuple(want)}, got {got}")


def _edges_per_instance(Kp, E1, E2) -> list:
    """One :class:`_Edges` per instance of the node affinities ``Kp`` (``(n, m)``
    or ``(B, n, m)``); edge lists without a batch axis are shared by the batch."""
    Kpv = np.asarray(getval(Kp))
    if Kpv.ndim not in (2, 3):
        raise ShapeError(f"Kp must have shape (n, m) or (B, n, m), got {Kpv.shape}")
    n, m = Kpv.shape[-2:]
    count = Kpv.shape[0] if Kpv.ndim == 3 else 1
    E1s = E1 if Kpv.ndim == 3 and np.ndim(E1) == 3 else [E1] * count
    E2s = E2 if Kpv.ndim == 3 and np.ndim(E2) == 3 else [E2] * count
    if len(E1s) != count or len(E2s) != count:
        raise ShapeError(f"batched edge lists must have {count} instances like Kp, got "
                         f"{len(E1s)} (E1) and {len(E2s)} (E2)")
    return [_Edges(a, b, n, m) for a, b in zip(E1s, E2s)]


@primitive
def _gaussian_affinity(Kp, P1, P2, w, edges):
    from ..kernels import affinity as kern
    batched = np.ndim(Kp) == 3
    pairs = len(edges[0].E1) * len(edges[0].E2)
    kernel = kern.pick("gaussian_affinity_matrix", pairs)
    out = [kernel(np.ascontiguousarray(kp, float), np.ascontiguousarray(p1, float),
                  np.ascontiguousarray(p2, float), np.ascontiguousarray(w, float),
                  ed.E1, ed.E2, ed.order, ed.ptr)
           for kp, p1, p2, ed in zip(_per_instance(Kp, batched), _per_instance(P1, batched),
                                     _per_instance(P2, batched), edges)]
    return np.stack(out) if batched else out[0]


def _first_order_only(g, *args):
    if isbox(g) or any(isbox(a) for a in args):
        raise UnsupportedError("gaussian_affinity's numba VJP is first order only; for higher "
                               "orders use gaussian_affinity_reference (autograd.numpy).")
    return np.ascontiguousarray(g, float)


def _gaussian_vjp(which):
    def make(ans, Kp, P1, P2, w, edges):
        def vjp(g):
            from ..kernels import affinity as kern
            g = _first_order_only(g, Kp, P1, P2, w)
            batched = np.ndim(Kp) == 3
            m = np.shape(Kp)[-1]
            pairs = len(edges[0].E1) * len(edges[0].E2)
            parts = []
            for k, (gb, p1, p2, ed) in enumerate(zip(_per_instance(g, batched),
                                                     _per_instance(P1, batched),
                                                     _per_instance(P2, batched), edges)):
                p1, p2 = np.ascontiguousarray(p1, float), np.ascontiguousarray(p2, float)
                wv = np.ascontiguousarray(w, float)
                if which == "Kp":
                    parts.append(np.diagonal(gb).reshape(np.shape(Kp)[-2:]))
                elif which == "P1":
                    kernel = kern.pick("gaussian_affinity_vjp_p1", pairs)
                    parts.append(kernel(gb, p1, p2, wv, ed.E1, ed.E2, m))
                elif which == "P2":
                    kernel = kern.pick("gaussian_affinity_vjp_p2", pairs)
                    parts.append(kernel(gb, p1, p2, wv, ed.E1, ed.E2, m))
                else:
                    kernel = kern.pick("gaussian_affinity_vjp_w", pairs)
                    parts.append(kernel(gb, p1, p2, wv, ed.E1, ed.E2, m))
            if which == "w":
                return np.sum(parts, axis=0)
            return np.stack(parts) if batched else parts[0]
        return vjp
    return make


defvjp(_gaussian_affinity, _gaussian_vjp("Kp"), _gaussian_vjp("P1"), _gaussian_vjp("P2"),
       _gaussian_vjp("w"))


def _gaussian_jvp(which):
    def jvp(g, ans, Kp, P1, P2, w, edges):
        from ..kernels import affinity as kern
        g = _first_order_only(g, Kp, P1, P2, w)
        batched = np.ndim(Kp) == 3
        n, m = np.shape(Kp)[-2:]
        if which == "Kp":
            out = [np.diag(gb.ravel()) for gb in _per_instance(g, batched)]
            return np.stack(out) if batched else out[0]
        pairs = len(edges[0].E1) * len(edges[0].E2)
        kernel = kern.pick("gaussian_affinity_jvp", pairs)
        wv = np.ascontiguousarray(w, float)
        out = []
        for b, (p1, p2, ed) in enumerate(zip(_per_instance(P1, batched), _per_instance(P2, batched),
                                             edges)):
            p1, p2 = np.ascontiguousarray(p1, float), np.ascontiguousarray(p2, float)
            d1 = g[b] if (which == "P1" and batched) else g if which == "P1" else np.zeros_like(p1)
            d2 = g[b] if (which == "P2" and batched) else g if which == "P2" else np.zeros_like(p2)
            dw = g if which == "w" else np.zeros_like(wv)
            out.append(kernel(p1, p2, wv, np.ascontiguousarray(d1, float),
                              np.ascontiguousarray(d2, float), np.ascontiguousarray(dw, float),
                              ed.E1, ed.E2, ed.order, ed.ptr, n, m))
        return np.stack(out) if batched else out[0]
    return jvp


defjvp(_gaussian_affinity, _gaussian_jvp("Kp"), _gaussian_jvp("P1"), _gaussian_jvp("P2"),
       _gaussian_jvp("w"))


def gaussian_affinity(Kp, P1, P2, w, E1, E2):
    r"""Dense affinity ``M`` (``nm x nm``, or ``(B, nm, nm)``) from node
    affinities and a Gaussian kernel on edge features, built by a numba kernel:

    .. math::
        M = \operatorname{diag}(\operatorname{vec} K_p)
            + (G_1 \otimes G_2) \operatorname{diag}(\operatorname{vec} K_e) (H_1 \otimes H_2)^\top,
        \quad K_e[e, f] = \exp\Big(-\sum_t w_t (P_1[e, t] - P_2[f, t])^2\Big).

    Parameters
    ----------
    Kp : (n, m) or (B, n, m)   node affinities (e.g. :func:`node_affinity`)
    P1, P2 : (e1, k), (e2, k) or batched   edge features (e.g. :func:`edge_features`)
    w : (k,)   kernel weights (>= 0 for a bounded kernel); shared by the batch
    E1, E2 : (e1, 2), (e2, 2) or batched   directed edges (include both
        directions of an undirected edge for a symmetric ``M``)

    Reverse- and forward-mode derivatives with respect to ``Kp``, ``P1``,
    ``P2`` and ``w`` are numba kernels (first order;
    :func:`gaussian_affinity_reference` is the any-order autograd version).
    """
    edges = _edges_per_instance(Kp, E1, E2)
    batch, k = np.shape(getval(Kp))[:-2], np.shape(getval(P1))[-1:]
    _require_shape("P1", P1, batch + (len(edges[0].E1),) + k)
    _require_shape("P2", P2, batch + (len(edges[0].E2),) + k)
    _require_shape("w", w, k)
    return _gaussian_affinity(Kp, P1, P2, w, edges)


@primitive
def _scatter(Kp, Ke, edges):
    from ..kernels import affinity as kern
    batched = np.ndim(Kp) == 3
    pairs = len(edges[0].E1) * len(edges[0].E2)
    kernel = kern.pick("scatter_affinity", pairs)
    out = [kernel(np.ascontiguousarray(kp, float), np.ascontiguousarray(ke, float),
                  ed.E1, ed.E2, ed.order, ed.ptr)
           for kp, ke, ed in zip(_per_instance(Kp, batched), _per_instance(Ke, batched), edges)]
    return np.stack(out) if batched else out[0]


def _gather_both(G, edges, n, m):
    from ..kernels import affinity as kern
    batched = np.ndim(G) == 3
    kps, kes = [], []
    for gb, ed in zip(_per_instance(G, batched), edges):
        kernel = kern.pick("gather_affinity", len(ed.E1) * len(ed.E2))
        kp, ke = kernel(np.ascontiguousarray(gb, float), ed.E1, ed.E2, n, m)
        kps.append(kp)
        kes.append(ke)
    return (np.stack(kps), np.stack(kes)) if batched else (kps[0], kes[0])


@primitive
def _gather_kp(G, edges, n, m):
    return _gather_both(G, edges, n, m)[0]


@primitive
def _gather_ke(G, edges, n, m):
    return _gather_both(G, edges, n, m)[1]


def _zeros_ke(Kp, edges):
    shape = (len(edges[0].E1), len(edges[0].E2))
    return np.zeros((np.shape(Kp)[0],) + shape if np.ndim(Kp) == 3 else shape)


# scatter and the gathers are adjoint linear maps: each one's VJP is the other (any order)
defvjp(_scatter,
       lambda ans, Kp, Ke, edges: lambda g: _gather_kp(g, edges, *np.shape(Kp)[-2:]),
       lambda ans, Kp, Ke, edges: lambda g: _gather_ke(g, edges, *np.shape(Kp)[-2:]))
defjvp(_scatter,
       lambda g, ans, Kp, Ke, edges: _scatter(g, np.zeros(np.shape(Ke)), edges),
       lambda g, ans, Kp, Ke, edges: _scatter(np.zeros(np.shape(Kp)), g, edges))
defvjp(_gather_kp, lambda ans, G, edges, n, m: lambda g: _scatter(g, _zeros_ke(g, edges), edges))
defvjp(_gather_ke, lambda ans, G, edges, n, m:
       lambda g: _scatter(np.zeros(np.shape(g)[:-2] + (n, m)), g, edges))
defjvp(_gather_kp, lambda g, ans, G, edges, n, m: _gather_kp(g, edges, n, m))
defjvp(_gather_ke, lambda g, ans, G, edges, n, m: _gather_ke(g, edges, n, m))


def assemble_affinity(Kp, Ke, E1, E2):
    r"""Dense ``M = diag(vec K_p) + (G1 ⊗ G2) diag(vec K_e) (H1 ⊗ H2)'`` from any
    node affinities ``Kp`` (``n x m``) and edge affinities ``Ke`` (``e1 x e2``),
    e.g. Zanfir and Sminchisescu's bilinear ``K_e = X Λ Y'``; batched with a
    leading axis.  A numba scatter whose adjoint (the gather) is its VJP:
    differentiable in ``Kp`` and ``Ke`` to any order, both modes."""
    edges = _edges_per_instance(Kp, E1, E2)
    _require_shape("Ke", Ke, np.shape(getval(Kp))[:-2] + (len(edges[0].E1), len(edges[0].E2)))
    return _scatter(Kp, Ke, edges)
