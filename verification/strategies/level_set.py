r"""Grid fields for the level-set layer, kept away from degenerate grids.

Seeded generators (``rng`` a ``numpy.random.Generator``) used by the registry
entries, and hypothesis strategies built on them.  Every field is sampled on
the grid ``linspace(-1, 1, n)^3`` (spacing ``h = 2 / (n - 1)``):

- :func:`sphere_field`: ``|x - c| - r`` plus a small smooth ripple;
- :func:`torus_field`: ``sqrt((sqrt(x'^2 + y'^2) - R)^2 + z'^2) - r`` in a
  randomly rotated frame ``x' = Q (x - c)``;
- :func:`smooth_field`: ``1/2 - sum_i a_i exp(-|x - c_i|^2 / (2 s_i^2))``, a
  few random Gaussian bumps (one or several components, random topology).

Non-degenerate level (:func:`separated_level`)
    Marching cubes' output is a smooth function of the grid values only while
    no grid value crosses the level.  The generators return a level for which
    ``min |phi - level| >= margin`` over the grid: the requested level moved
    into the nearest gap between consecutive grid values that is at least
    ``2 margin`` wide.  Finite differences with steps below ``margin`` then
    never change the mesh's topology.

All three fields are positive on the grid's boundary for the default
parameters (closed surfaces), so the mesh is watertight.
"""
from __future__ import annotations

from typing import Tuple

import numpy as onp

try:
    from hypothesis import strategies as st
except ImportError:     # the generators work without hypothesis
    st = None

KINDS = ("sphere", "torus", "smooth")


def grid(n: int) -> Tuple[onp.ndarray, onp.ndarray, onp.ndarray]:
    """The coordinate arrays ``X, Y, Z`` of ``linspace(-1, 1, n)^3`` (``ij`` indexing)."""
    x = onp.linspace(-1.0, 1.0, n)
    return onp.meshgrid(x, x, x, indexing="ij")


def spacing(n: int) -> float:
    return 2.0 / (n - 1)


def separated_level(phi: onp.ndarray, level: float = 0.0, margin: float = 1e-3) -> float:
    """A level near ``level`` with ``min |phi - level| >= margin`` on the grid.

    Raises ``ValueError`` when no gap of ``2 margin`` exists within the range
    of ``phi`` (a grid too dense for the margin).
    """
    values = onp.unique(phi.ravel())
    lows, highs = values[:-1], values[1:]
    wide = (highs - lows) >= 2.0 * margin
    if not wide.any():
        raise ValueError(f"no gap of width {2 * margin:g} between grid values; lower the margin")
    lows, highs = lows[wide] + margin, highs[wide] - margin
    candidates = onp.clip(level, lows, highs)     # best level inside each wide gap
    return float(candidates[onp.argmin(onp.abs(candidates - level))])


def sphere_field(rng, n: int = 8, ripple: float = 0.05) -> onp.ndarray:
    X, Y, Z = grid(n)
    c = rng.uniform(-0.15, 0.15, 3)
    r = rng.uniform(0.45, 0.7)
    k = rng.uniform(1.0, 3.0, 3)
    phase = rng.uniform(0, 2 * onp.pi, 3)
    dist = onp.sqrt((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2)
    return dist - r + ripple * onp.sin(k[0] * X + phase[0]) * onp.cos(k[1] * Y + phase[1]) \
        * onp.sin(k[2] * Z + phase[2])


def random_rotation(rng) -> onp.ndarray:
    q, r = onp.linalg.qr(rng.standard_normal((3, 3)))
    q = q * onp.sign(onp.diag(r))
    if onp.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def torus_field(rng, n: int = 10) -> onp.ndarray:
    X, Y, Z = grid(n)
    c = rng.uniform(-0.1, 0.1, 3)
    Q = random_rotation(rng)
    P = onp.stack([X - c[0], Y - c[1], Z - c[2]], axis=-1) @ Q.T
    big, small = rng.uniform(0.45, 0.55), rng.uniform(0.2, 0.3)
    ring = onp.sqrt(P[..., 0] ** 2 + P[..., 1] ** 2) - big
    return onp.sqrt(ring ** 2 + P[..., 2] ** 2) - small


def smooth_field(rng, n: int = 8, bumps: int = 3) -> onp.ndarray:
    X, Y, Z = grid(n)
    phi = onp.full(X.shape, 0.5)
    for _ in range(bumps):
        c = rng.uniform(-0.35, 0.35, 3)
        s = rng.uniform(0.2, 0.3)
        a = rng.uniform(0.6, 1.0)
        r2 = (X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2
        phi = phi - a * onp.exp(-r2 / (2 * s * s))
    return phi


_FIELDS = {"sphere": sphere_field, "torus": torus_field, "smooth": smooth_field}


def field(rng, kind: str = "sphere", n: int = 8, margin: float = 2e-3) -> Tuple[onp.ndarray, float]:
    """``(phi, level)``: a field of the given kind and a non-degenerate level near 0."""
    if kind not in _FIELDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    phi = _FIELDS[kind](rng, n=n)
    return phi, separated_level(phi, 0.0, margin)


def random_field(rng, n: int = 8, margin: float = 2e-3) -> Tuple[onp.ndarray, float]:
    """``(phi, level)`` of a kind drawn uniformly from :data:`KINDS`."""
    return field(rng, KINDS[int(rng.integers(len(KINDS)))], n=n, margin=margin)


if st is not None:
    def fields(kinds=KINDS, n_min: int = 6, n_max: int = 10, margin: float = 2e-3):
        """Hypothesis strategy of ``(phi, level)`` pairs (seeded numpy draws)."""
        return st.builds(
            lambda seed, kind, n: field(onp.random.default_rng(seed), kind, n=n, margin=margin),
            st.integers(0, 2 ** 32 - 1), st.sampled_from(list(kinds)), st.integers(n_min, n_max))
