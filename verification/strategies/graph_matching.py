r"""Instances for the graph-matching layers: seeded generators and hypothesis strategies.

Affinities
    :func:`positive_affinity` draws a symmetric matrix with entries in
    ``[0.1, 1]``: positive, so (Perron-Frobenius) the leading eigenvalue is
    simple with a large relative gap.  :func:`random_affinity_input` draws the
    unconstrained ``X`` of the parameterization ``M = exp((X + X')/2)`` used
    by the registry entries and tests (random finite-difference directions in
    ``X`` stay symmetric and positive in ``M``).
Synthetic keypoint pairs (:func:`synthetic_pair`)
    The standard protocol: ``n`` inlier points uniform in ``[-1, 1]^2``; the
    second graph is a copy under a random rotation (``|angle| <= rotation``),
    scale (``[1/scale, scale]``) and Gaussian deformation noise, with its nodes
    permuted; each graph gets ``outliers`` extra uniform points.  Node
    features are informative only through a linear map: ``f = Q [z; r]`` with
    a latent code ``z`` shared by a point and its match (plus noise), a
    per-graph nuisance ``r`` of larger amplitude, and a fixed orthogonal
    mixing ``Q``; a learnable projection can recover ``z``, raw distances
    cannot.  Edges: all ordered pairs; edge features from the geometry
    (:func:`reference_layers.graph_matching.edge_features`).
"""
from __future__ import annotations

from typing import Optional

import numpy as onp
from reference_layers import graph_matching as gm

try:
    from hypothesis import strategies as st
except ImportError:     # the generators work without hypothesis
    st = None


def positive_affinity(rng: onp.random.Generator, N: int) -> onp.ndarray:
    """Symmetric ``(N, N)`` affinity with entries in ``[0.1, 1]``."""
    A = rng.uniform(0.1, 1.0, (N, N))
    return 0.5 * (A + A.T)


def random_affinity_input(rng: onp.random.Generator, N: int, spread: float = 1.0) -> onp.ndarray:
    """``X`` with ``M = exp((X + X')/2)`` a positive symmetric affinity."""
    return spread * rng.uniform(-1.0, 1.0, (N, N))


def all_sums_constraints(n: int, m: int) -> tuple:
    """All ``n`` row sums and all ``m`` column sums of an ``n x m`` assignment
    (row-major ``y = vec(X)``), with ``d = (1, .., 1, n/m, .., n/m)``: the
    standard one-to-one constraints *with* their redundant row (rank
    ``n + m - 1``), which ``smac_layer`` accepts."""
    rows = onp.kron(onp.eye(n), onp.ones((1, m)))
    cols = onp.kron(onp.ones((1, n)), onp.eye(m))
    return (onp.concatenate([rows, cols]), onp.concatenate([onp.ones(n), onp.full(m, n / m)]))


def mixing_matrix(rng: onp.random.Generator, dim: int) -> onp.ndarray:
    """A random orthogonal ``(dim, dim)`` matrix (QR of a Gaussian)."""
    Q, R = onp.linalg.qr(rng.standard_normal((dim, dim)))
    return Q * onp.sign(onp.diag(R))


def synthetic_pair(rng: onp.random.Generator, n: int = 10, outliers: int = 0, noise: float = 0.05,
                   rotation: float = onp.pi / 6, scale: float = 1.2, code_dim: int = 4,
                   nuisance_dim: int = 12, code_noise: float = 0.3, nuisance: float = 1.5,
                   mixing: Optional[onp.ndarray] = None) -> dict:
    """One synthetic matching problem (see the module docstring).

    Returns a dict with ``points1, points2`` (``N x 2``, ``N = n + outliers``),
    node features ``F1, F2`` (``N x (code_dim + nuisance_dim)``), edges
    ``E1 = E2`` (all ordered pairs), edge features ``P1, P2``, the ground truth
    ``X_true`` (``N x N``, ones at inlier matches) and ``inliers1`` (mask).
    """
    N = n + outliers
    dim = code_dim + nuisance_dim
    Q = mixing if mixing is not None else mixing_matrix(rng, dim)
    inl = rng.uniform(-1, 1, (n, 2))
    pts1 = onp.concatenate([inl, rng.uniform(-1, 1, (outliers, 2))])
    a = rng.uniform(-rotation, rotation)
    s = onp.exp(rng.uniform(-onp.log(scale), onp.log(scale)))
    R = s * onp.array([[onp.cos(a), -onp.sin(a)], [onp.sin(a), onp.cos(a)]])
    moved = inl @ R.T + noise * rng.standard_normal((n, 2))
    pts2_unperm = onp.concatenate([moved, s * rng.uniform(-1, 1, (outliers, 2))])
    perm = rng.permutation(N)            # node k of graph 2 is node perm[k] before permuting
    pts2 = pts2_unperm[perm]
    codes = rng.standard_normal((n, code_dim))

    def features(codes_used, count):
        z = onp.concatenate([codes_used, rng.standard_normal((count - n, code_dim))])
        z = z + code_noise * rng.standard_normal(z.shape)
        r = nuisance * rng.standard_normal((count, nuisance_dim))
        return onp.concatenate([z, r], axis=1) @ Q.T

    F1 = features(codes, N)
    F2 = features(codes, N)[perm]
    X_true = onp.zeros((N, N))
    inv = onp.argsort(perm)
    X_true[onp.arange(n), inv[:n]] = 1.0
    E = gm.full_edges(N)
    return {"points1": pts1, "points2": pts2, "F1": F1, "F2": F2, "E1": E, "E2": E,
            "P1": gm.edge_features(pts1, E), "P2": gm.edge_features(pts2, E),
            "X_true": X_true, "inliers1": onp.arange(N) < n, "mixing": Q}


def matching_instance(rng: onp.random.Generator, n: int = 6, outliers: int = 0,
                      noise: float = 0.05, weights=(2.0, 1.0, 1.0)) -> dict:
    """:func:`synthetic_pair` plus its affinity ``M`` from the geometric Gaussian
    kernel (``weights`` on length, cos, sin) and node affinities on the code
    coordinates (the ideal projection)."""
    inst = synthetic_pair(rng, n, outliers, noise)
    code_dim = 4
    W = inst["mixing"][:, :code_dim]     # projects the features onto the codes
    Kp = gm.node_affinity(inst["F1"], inst["F2"], 0.5 * W)
    inst["M"] = gm.gaussian_affinity(Kp, inst["P1"], inst["P2"], onp.asarray(weights, float),
                                     inst["E1"], inst["E2"])
    return inst


if st is not None:
    @st.composite
    def affinity_strategy(draw, max_batch: int = 2, max_size: int = 10, min_size: int = 3):
        """A positive symmetric affinity, single ``(N, N)`` or batched ``(B, N, N)``."""
        N = draw(st.integers(min_size, max_size))
        batch = draw(st.integers(0, max_batch))
        seed = draw(st.integers(0, 2 ** 32 - 1))
        rng = onp.random.default_rng(seed)
        if batch == 0:
            return positive_affinity(rng, N)
        return onp.stack([positive_affinity(rng, N) for _ in range(batch)])

    @st.composite
    def sinkhorn_scores(draw, max_size: int = 6):
        """Scores ``(n, m)`` for Sinkhorn with entries of moderate range."""
        n, m = draw(st.integers(2, max_size)), draw(st.integers(2, max_size))
        seed = draw(st.integers(0, 2 ** 32 - 1))
        return onp.random.default_rng(seed).uniform(-2, 2, (n, m))
