r"""Graphs for the NCut layer with a controlled eigen-gap, and ill-posed ones.

Seeded generators (``rng`` a ``numpy.random.Generator``) used by the registry
entries, and hypothesis strategies built on them for property tests.

Dense graphs with a planted gap (:func:`block_affinity`)
    A two-block affinity ``W_ij = p`` within a block and ``q`` across, with
    ``q / p = (1 - g) / (1 + g)``.  For equal blocks the generalized spectrum of
    ``(D - W, D)`` is ``0, 1 - g, 1, ..., 1`` (``W`` has rank 2), so the relative
    eigen-gap ``(lam_3 - lam_2) / lam_3`` is exactly ``g``.  Every entry is then
    multiplied by ``1 + noise * eta_ij`` (``eta`` symmetric, uniform in
    ``[-1, 1]``), which splits the bulk at 1 and moves ``lam_2`` by ``O(noise)``:
    the gap stays ``~g`` (the generators return the exact one).
Sparse image graphs (:func:`image_graph`)
    A ``height x width`` pixel grid (radius-``radius`` neighbourhood) with
    Gaussian intensity affinities ``exp(-(I_i - I_j)^2 / (2 s^2)) + floor`` on a
    two-region image; ``floor > 0`` keeps every node connected.
Ill-posed graphs (:func:`ill_posed_affinity`)
    One per failure the layer must report: ``"three-components"`` (three equal
    blocks with equal coupling: ``lam_2 = lam_3``), ``"disconnected"``,
    ``"negative"``, ``"isolated"``, ``"asymmetric"``, ``"nan"``.
"""
from __future__ import annotations

from typing import Tuple

import numpy as onp

try:
    from hypothesis import strategies as st
except ImportError:     # the generators work without hypothesis
    st = None


def eigen_gaps(W: onp.ndarray) -> Tuple[float, float]:
    """``((lam_3 - lam_2) / lam_3, lam_2 - lam_1)`` of ``(D - W, D)`` (dense, raw)."""
    import scipy.linalg
    d = W.sum(axis=1)
    lams = scipy.linalg.eigh(onp.diag(d) - W, onp.diag(d), eigvals_only=True,
                             subset_by_index=[0, 2])
    return float((lams[2] - lams[1]) / lams[2]), float(lams[1] - lams[0])


def block_affinity(rng: onp.random.Generator, n: int = 8, gap: float = 0.5,
                   noise: float = 0.1, scale: float = 1.0) -> onp.ndarray:
    """A symmetric positive ``(n, n)`` affinity with relative eigen-gap ``~gap`` (see above).

    Blocks have sizes ``n // 2`` and ``n - n // 2``; ``scale`` multiplies ``W``
    (the eigenvalues do not change).
    """
    if not 0.0 < gap < 1.0:
        raise ValueError(f"gap must lie in (0, 1), got {gap}")
    if n < 4:
        raise ValueError(f"n must be >= 4, got {n}")
    labels = onp.arange(n) < n // 2
    q = (1.0 - gap) / (1.0 + gap)
    W = onp.where(labels[:, None] == labels[None, :], 1.0, q)
    eta = rng.uniform(-1.0, 1.0, (n, n))
    W = W * (1.0 + noise * 0.5 * (eta + eta.T))
    perm = rng.permutation(n)
    return scale * W[perm][:, perm]


def block_affinity_batch(rng: onp.random.Generator, batch: int = 3, n: int = 6,
                         gap: float = 0.5, noise: float = 0.1) -> onp.ndarray:
    """``(batch, n, n)`` independent :func:`block_affinity` draws."""
    return onp.stack([block_affinity(rng, n, gap, noise) for _ in range(batch)])


def two_region_image(rng: onp.random.Generator, height: int, width: int,
                     contrast: float = 1.0, noise: float = 0.1) -> onp.ndarray:
    """A ``height x width`` image: a wavy horizontal boundary, ``contrast`` between
    the regions, Gaussian pixel noise."""
    yy, xx = onp.mgrid[0:height, 0:width]
    phase, amp = rng.uniform(0, 2 * onp.pi), rng.uniform(0.05, 0.2) * height
    boundary = 0.5 * height + amp * onp.sin(2 * onp.pi * xx / max(width, 2) + phase)
    return contrast * (yy > boundary) + noise * rng.standard_normal((height, width))


def image_graph(rng: onp.random.Generator, height: int = 5, width: int = 6,
                radius: float = 1.5, contrast: float = 1.0, sigma: float = 0.5,
                floor: float = 0.05, noise: float = 0.1) -> Tuple[onp.ndarray, onp.ndarray, int]:
    """``(edges (E, 2), weights (E,), n_nodes)`` of a pixel graph of a two-region image."""
    from reference_layers.ncut import grid_graph_edges
    img = two_region_image(rng, height, width, contrast, noise).ravel()
    edges = grid_graph_edges(height, width, radius)
    diff = img[edges[:, 0]] - img[edges[:, 1]]
    weights = onp.exp(-diff ** 2 / (2 * sigma ** 2)) + floor
    return edges, weights, height * width


def ill_posed_affinity(kind: str, rng: onp.random.Generator, n: int = 9) -> onp.ndarray:
    """A dense affinity with the named defect (see the module docstring)."""
    W = block_affinity(rng, n, 0.5, 0.1)
    if kind == "three-components":
        size = n // 3
        labels = onp.minimum(onp.arange(3 * size) // size, 2)
        W = onp.where(labels[:, None] == labels[None, :], 1.0, 0.01)   # lam_2 = lam_3
    elif kind == "disconnected":
        labels = onp.arange(n) < n // 2
        W = onp.where(labels[:, None] == labels[None, :], W, 0.0)
    elif kind == "negative":
        W = W.copy()
        W[0, 1] = W[1, 0] = -0.3
    elif kind == "isolated":
        W = W.copy()
        W[0, :] = W[:, 0] = 0.0
    elif kind == "asymmetric":
        W = W.copy()
        W[0, 1] += 0.2
    elif kind == "nan":
        W = W.copy()
        W[2, 3] = W[3, 2] = onp.nan
    else:
        raise ValueError(f"unknown ill-posed kind {kind!r}")
    return W


ILL_POSED_KINDS = ("three-components", "disconnected", "negative", "isolated", "asymmetric", "nan")


if st is not None:
    @st.composite
    def dense_graphs(draw, n=st.integers(4, 10), gap=st.floats(0.2, 0.8),
                     noise=st.floats(0.0, 0.2), scale=st.floats(0.1, 10.0)):
        """Hypothesis strategy: ``W`` from :func:`block_affinity` (relative gap ``~gap``)."""
        seed = draw(st.integers(0, 2 ** 32 - 1))
        return block_affinity(onp.random.default_rng(seed), draw(n), draw(gap), draw(noise),
                              draw(scale))

    @st.composite
    def sparse_image_graphs(draw, height=st.integers(3, 6), width=st.integers(3, 6),
                            contrast=st.floats(0.0, 2.0), floor=st.floats(0.01, 0.2)):
        """Hypothesis strategy: ``(edges, weights, n_nodes)`` from :func:`image_graph`."""
        seed = draw(st.integers(0, 2 ** 32 - 1))
        return image_graph(onp.random.default_rng(seed), draw(height), draw(width), 1.5,
                           draw(contrast), 0.5, draw(floor))

    def ill_posed_graphs(n=st.integers(6, 12)):
        """Hypothesis strategy: ``(kind, W)`` with ``kind`` in :data:`ILL_POSED_KINDS`."""
        return st.builds(lambda kind, size, seed: (kind, ill_posed_affinity(
            kind, onp.random.default_rng(seed), size)),
            st.sampled_from(ILL_POSED_KINDS), n, st.integers(0, 2 ** 32 - 1))
