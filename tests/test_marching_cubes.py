"""Tests of the marching cubes forward kernel.

Checks: vertex set equal to scikit-image's (one vertex per crossed edge),
watertight + consistently oriented + vertex-manifold closed surfaces,
Euler characteristics, edge_vertices / t reproducing the vertices, the
equality rule, empty surfaces, input validation, anisotropic spacing,
determinism across thread counts, and randomised tiny grids (hypothesis).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference_layers.kernels._mc_tables import build_tables
from reference_layers.kernels.marching_cubes import MCResult, marching_cubes

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def f32(a: np.ndarray) -> np.ndarray:
    """Round to float32-representable values (scikit-image works in float32)."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def sphere(n: int, radius: float = 0.6, center=(0.03, -0.02, 0.01)) -> np.ndarray:
    x = np.linspace(-1.0, 1.0, n)
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    return np.sqrt((X - center[0]) ** 2 + (Y - center[1]) ** 2 + (Z - center[2]) ** 2) - radius


def torus(n: int, R: float = 0.55, r: float = 0.22) -> np.ndarray:
    x = np.linspace(-1.0, 1.0, n)
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    q = np.sqrt(X**2 + Y**2) - R
    return np.sqrt(q**2 + Z**2) - r


def smooth_random(n: int, seed: int, n_terms: int = 6, pad: bool = True) -> np.ndarray:
    """Low-frequency sum of sines; with ``pad`` a positive border keeps the surface closed."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, n)
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    phi = np.full(X.shape, 0.1)
    for _ in range(n_terms):
        kv = rng.uniform(-2.5, 2.5, size=3) * np.pi
        phi += rng.uniform(0.3, 1.0) * np.sin(kv[0] * X + kv[1] * Y + kv[2] * Z + rng.uniform(0, 2 * np.pi))
    if pad:
        phi[0, :, :] = phi[-1, :, :] = 1.0
        phi[:, 0, :] = phi[:, -1, :] = 1.0
        phi[:, :, 0] = phi[:, :, -1] = 1.0
    return phi


def undirected_edges(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    u, counts = np.unique(np.sort(d, axis=1), axis=0, return_counts=True)
    return u, counts


def assert_closed_oriented_manifold(res: MCResult) -> int:
    """Watertight, consistently oriented, vertex-manifold; returns the Euler characteristic."""
    v, f = res.verts, res.faces
    assert f.ndim == 2 and f.shape[1] == 3 and len(f) > 0
    # no degenerate index triples, all indices valid, every vertex used
    assert np.all(f[:, 0] != f[:, 1]) and np.all(f[:, 1] != f[:, 2]) and np.all(f[:, 2] != f[:, 0])
    assert f.min() >= 0 and f.max() < len(v)
    assert np.array_equal(np.unique(f), np.arange(len(v)))
    # every undirected edge in exactly two faces
    u, counts = undirected_edges(f)
    assert np.all(counts == 2), np.bincount(counts)
    # consistent orientation: every directed edge exactly once (so its reverse also once)
    d = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    assert len(np.unique(d, axis=0)) == len(d)
    # vertex manifold: the link of each vertex is a single cycle
    nxt: dict[tuple[int, int], int] = {}
    for a, b, c in f.tolist():
        nxt[(a, b)] = c
        nxt[(b, c)] = a
        nxt[(c, a)] = b
    link: dict[int, dict[int, int]] = {}
    for (a, b), c in nxt.items():
        link.setdefault(a, {})[b] = c
    for vid, ring in link.items():
        start = next(iter(ring))
        cur, steps = ring[start], 1
        while cur != start:
            cur = ring[cur]
            steps += 1
            assert steps <= len(ring)
        assert steps == len(ring), f"vertex {vid} is not manifold"
    return len(v) - len(u) + len(f)


def signed_volume(res: MCResult) -> float:
    a, b, c = (res.verts[res.faces[:, r]] for r in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def crossed_edge_count(phi: np.ndarray, level: float) -> int:
    s = phi > level
    return int((s[1:] != s[:-1]).sum() + (s[:, 1:] != s[:, :-1]).sum() + (s[:, :, 1:] != s[:, :, :-1]).sum())


def assert_edge_data(res: MCResult, phi: np.ndarray, level: float, spacing=(1.0, 1.0, 1.0)) -> None:
    v, e, t = res.verts, res.edge_vertices, res.t
    assert v.dtype == np.float64 and t.dtype == np.float64 and e.dtype == np.int64
    assert e.shape == (len(v), 2, 3) and t.shape == (len(v),)
    c0, c1 = e[:, 0], e[:, 1]
    step = c1 - c0
    assert np.all(np.abs(step).sum(axis=1) == 1)  # a unit step along one axis (either direction)
    p0 = phi[c0[:, 0], c0[:, 1], c0[:, 2]]
    p1 = phi[c1[:, 0], c1[:, 1], c1[:, 2]]
    assert np.all(p0 <= level) and np.all(p1 > level)
    assert np.all((t >= 0.0) & (t <= 1.0))
    np.testing.assert_array_equal(t, (level - p0) / (p1 - p0))
    np.testing.assert_array_equal(v, (c0 + t[:, None] * (c1 - c0)) * np.asarray(spacing))
    # exactly one vertex per crossed grid edge
    key = np.concatenate([np.minimum(c0, c1), np.argmax(np.abs(step), axis=1)[:, None]], axis=1)
    assert len(np.unique(key, axis=0)) == len(v) == crossed_edge_count(phi, level)


def assert_same_points(ours: np.ndarray, theirs: np.ndarray, atol: float, subset: bool = False) -> None:
    """Each of our vertices matches a distinct reference vertex within ``atol``."""
    from scipy.spatial import cKDTree

    if not subset:
        assert len(ours) == len(theirs)
    dist, idx = cKDTree(theirs).query(ours)
    assert dist.max() <= atol, dist.max()
    assert len(np.unique(idx)) == len(ours)


def sk_tol(phi_shape, spacing=(1.0, 1.0, 1.0)) -> float:
    # scikit-image returns float32 vertices
    return 4.0 * float(np.spacing(np.float32(max(phi_shape)))) * max(spacing) + 1e-12


# --------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------


def test_tables_basic():
    tb = build_tables()
    assert tb.tri_count[0 * 64] == 0 and tb.tri_count[255 * 64] == 0
    # a single positive corner -> one triangle on its three edges (0, 4, 8)
    assert tb.tri_count[1 * 64] == 1
    assert sorted(tb.tri_edges[tb.tri_start[1 * 64]].tolist()) == [0, 4, 8]
    # ambiguous faces exist exactly for diagonal patterns
    assert tb.ambig_mask[0b1001] == 1 << 4  # corners 0 and 3 on the k=0 face
    assert tb.max_tris <= 12


# --------------------------------------------------------------------------
# geometry vs scikit-image
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lorensen", "lewiner"])
def test_sphere_matches_skimage(method):
    skimage_measure = pytest.importorskip("skimage.measure")
    phi = f32(sphere(40))
    res = marching_cubes(phi, 0.0)
    sv, sf, _, _ = skimage_measure.marching_cubes(phi, 0.0, method=method)
    assert_same_points(res.verts, sv.astype(np.float64), sk_tol(phi.shape))
    assert len(res.faces) == len(sf)
    # same orientation convention as scikit-image's default
    sres = MCResult(sv.astype(np.float64), sf.astype(np.int64), None, None)
    assert np.sign(signed_volume(res)) == np.sign(signed_volume(sres)) == 1.0


def test_sphere_closed_euler_volume():
    phi = sphere(48)
    res = marching_cubes(phi, 0.0)
    assert assert_closed_oriented_manifold(res) == 2
    assert_edge_data(res, phi, 0.0)
    h = 2.0 / 47
    vol = signed_volume(res) * h**3
    assert vol == pytest.approx(4.0 / 3.0 * np.pi * 0.6**3, rel=0.02)
    # normals point towards increasing phi: flipping the field flips orientation
    res_neg = marching_cubes(-phi, 0.0)
    assert signed_volume(res_neg) < 0


def test_torus_euler_zero():
    skimage_measure = pytest.importorskip("skimage.measure")
    phi = f32(torus(48))
    res = marching_cubes(phi, 0.0)
    assert assert_closed_oriented_manifold(res) == 0
    assert signed_volume(res) > 0
    assert_edge_data(res, phi, 0.0)
    sv, _, _, _ = skimage_measure.marching_cubes(phi, 0.0, method="lorensen")
    assert_same_points(res.verts, sv.astype(np.float64), sk_tol(phi.shape))


@pytest.mark.parametrize("seed", range(4))
def test_random_smooth_fields(seed):
    skimage_measure = pytest.importorskip("skimage.measure")
    phi = f32(smooth_random(28, seed))
    level = 0.0
    res = marching_cubes(phi, level)
    chi = assert_closed_oriented_manifold(res)
    assert chi % 2 == 0
    assert_edge_data(res, phi, level)
    tol = sk_tol(phi.shape)
    sv, _, _, _ = skimage_measure.marching_cubes(phi, level, method="lorensen")
    assert_same_points(res.verts, sv.astype(np.float64), tol)
    # lewiner may add cell-interior vertices (MC33 tunnels); all our (edge) vertices are there
    lv, _, _, _ = skimage_measure.marching_cubes(phi, level, method="lewiner")
    assert_same_points(res.verts, lv.astype(np.float64), tol, subset=True)


def test_open_surface_matches_skimage_and_boundary_edges():
    """A surface cut by the grid boundary: same vertices, interior edges shared twice."""
    skimage_measure = pytest.importorskip("skimage.measure")
    phi = f32(smooth_random(24, seed=11, pad=False))
    res = marching_cubes(phi, 0.05)
    assert_edge_data(res, phi, 0.05)
    sv, _, _, _ = skimage_measure.marching_cubes(phi, 0.05, method="lorensen")
    assert_same_points(res.verts, sv.astype(np.float64), sk_tol(phi.shape))
    u, counts = undirected_edges(res.faces)
    assert set(np.unique(counts)) <= {1, 2}
    # edges used once lie in a boundary plane of the grid
    ev = res.edge_vertices[u[counts == 1]]  # (E, 2 verts, 2 corners, 3)
    shape = np.array(phi.shape) - 1
    on_plane = np.zeros(len(ev), dtype=bool)
    for ax in range(3):
        for val in (0, shape[ax]):
            on_plane |= np.all(ev[..., ax] == val, axis=(1, 2))
    assert on_plane.all()


@pytest.mark.parametrize("shape", [(7, 8, 62), (6, 7, 63), (6, 5, 64), (5, 6, 65), (4, 5, 129)])
def test_word_boundaries(shape):
    """Rows longer than one 64-bit word (sign bits are packed along axis 2)."""
    skimage_measure = pytest.importorskip("skimage.measure")
    rng = np.random.default_rng(sum(shape))
    phi = f32(np.pad(rng.normal(size=shape), 1, constant_values=1.0))
    res = marching_cubes(phi, 0.0)
    assert_closed_oriented_manifold(res)
    assert_edge_data(res, phi, 0.0)
    sv, _, _, _ = skimage_measure.marching_cubes(phi, 0.0, method="lorensen")
    assert_same_points(res.verts, sv.astype(np.float64), sk_tol(phi.shape))


def test_anisotropic_spacing():
    skimage_measure = pytest.importorskip("skimage.measure")
    phi = f32(sphere(30))
    spacing = (0.5, 1.25, 2.0)
    res = marching_cubes(phi, 0.1, spacing=spacing)
    res1 = marching_cubes(phi, 0.1)
    np.testing.assert_array_equal(res.faces, res1.faces)
    np.testing.assert_array_equal(res.edge_vertices, res1.edge_vertices)
    np.testing.assert_array_equal(res.verts, res1.verts * np.array(spacing))
    assert_edge_data(res, phi, 0.1, spacing)
    sv, _, _, _ = skimage_measure.marching_cubes(phi, 0.1, spacing=spacing, method="lorensen")
    assert_same_points(res.verts, sv.astype(np.float64), sk_tol(phi.shape, spacing))
    assert signed_volume(res) == pytest.approx(signed_volume(res1) * np.prod(spacing))


# --------------------------------------------------------------------------
# equality rule, empty, validation
# --------------------------------------------------------------------------


def test_values_exactly_at_level():
    skimage_measure = pytest.importorskip("skimage.measure")
    rng = np.random.default_rng(3)
    inner = rng.integers(-2, 3, size=(6, 6, 6)).astype(np.float64)
    phi = np.pad(inner, 1, constant_values=1.0)
    level = 0.0
    assert np.any(phi == level)
    res = marching_cubes(phi, level)
    assert_closed_oriented_manifold(res)
    assert_edge_data(res, phi, level)
    assert np.any(res.t == 0.0)
    # vertices at a corner at the level coincide in position (distinct edges, distinct ids)
    sv, _, _, _ = skimage_measure.marching_cubes(phi, level, method="lorensen")
    ours = res.verts[np.lexsort(np.round(res.verts, 5).T)]
    theirs = sv.astype(np.float64)[np.lexsort(np.round(sv.astype(np.float64), 5).T)]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_level_equal_to_min_and_max():
    phi = np.pad(np.zeros((3, 3, 3)), 1, constant_values=1.0)
    # level == min: zeros are inside (phi <= level) -> closed box surface
    res = marching_cubes(phi, 0.0)
    assert_closed_oriented_manifold(res)
    assert np.all(res.t == 0.0)
    # level == max: nothing is outside -> empty
    res = marching_cubes(phi, 1.0)
    assert len(res.verts) == 0 and len(res.faces) == 0


@pytest.mark.parametrize("level", [-5.0, 5.0])
def test_empty_surface(level):
    res = marching_cubes(sphere(16), level)
    assert res.verts.shape == (0, 3) and res.verts.dtype == np.float64
    assert res.faces.shape == (0, 3) and res.faces.dtype == np.int64
    assert res.edge_vertices.shape == (0, 2, 3) and res.edge_vertices.dtype == np.int64
    assert res.t.shape == (0,) and res.t.dtype == np.float64


def test_degenerate_shapes_are_empty():
    for shape in [(1, 5, 5), (5, 1, 5), (5, 5, 1), (0, 3, 3)]:
        res = marching_cubes(np.linspace(-1, 1, int(np.prod(shape))).reshape(shape), 0.0)
        assert res.verts.shape == (0, 3) and res.faces.shape == (0, 3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(bad):
    phi = sphere(12)
    phi[3, 4, 5] = bad
    word, other = ("NaN", "infinite") if np.isnan(bad) else ("infinite", "NaN")
    with pytest.raises(ValueError, match=word) as info:
        marching_cubes(phi, 0.0)
    assert other not in str(info.value)
    phi[0, 0, 0] = np.nan
    phi[1, 1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN and .* infinite"):
        marching_cubes(phi, 0.0, num_threads=2)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="3-D"):
        marching_cubes(np.zeros((4, 4)), 0.0)
    with pytest.raises(ValueError, match="level"):
        marching_cubes(sphere(8), np.nan)
    with pytest.raises(ValueError, match="spacing"):
        marching_cubes(sphere(8), 0.0, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        marching_cubes(sphere(8), 0.0, spacing=(1.0, 0.0, 1.0))


def test_huge_values_do_not_overflow_t():
    phi = np.pad(np.full((2, 2, 2), -1.5e308), 1, constant_values=1.7e308)
    res = marching_cubes(phi, 0.0)
    assert_closed_oriented_manifold(res)
    assert np.all(np.isfinite(res.verts)) and np.all((res.t >= 0) & (res.t <= 1))
    np.testing.assert_allclose(res.t[res.t > 0], 1.5 / 3.2, rtol=1e-15)


def test_input_dtype_and_layout():
    phi = sphere(20)
    ref = marching_cubes(phi, 0.0)
    for variant in (phi.astype(np.float32).astype(np.float64), np.asfortranarray(phi), phi[::1, ::1, ::1]):
        res = marching_cubes(variant, 0.0)
        assert res.faces.shape[1] == 3
    res = marching_cubes(np.asfortranarray(phi), 0.0)
    np.testing.assert_array_equal(res.faces, ref.faces)
    np.testing.assert_array_equal(res.verts, ref.verts)


def test_deterministic_across_threads():
    import numba

    phi = smooth_random(40, seed=5)
    a = marching_cubes(phi, 0.0, num_threads=1)
    b = marching_cubes(phi, 0.0, num_threads=numba.config.NUMBA_NUM_THREADS)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_vertex_order_is_sorted_by_edge():
    phi = smooth_random(20, seed=2)
    res = marching_cubes(phi, 0.0)
    c0, c1 = res.edge_vertices[:, 0], res.edge_vertices[:, 1]
    owner = np.minimum(c0, c1)
    axis = np.argmax(np.abs(c1 - c0), axis=1)
    keys = np.stack([owner[:, 0], owner[:, 1], owner[:, 2], axis], axis=1)
    order = np.lexsort(keys.T[::-1])
    np.testing.assert_array_equal(order, np.arange(len(order)))


# --------------------------------------------------------------------------
# exhaustive single cells and random tiny grids
# --------------------------------------------------------------------------


def test_all_256_cases_and_face_decisions():
    """Every sign pattern of a cell (surrounded by a positive border), with
    magnitudes chosen to flip the asymptotic decider of every ambiguous face."""
    rng = np.random.default_rng(0)
    for case in range(256):
        for trial in range(4):
            inner = np.empty((2, 2, 2))
            for n in range(8):
                di, dj, dk = n & 1, (n >> 1) & 1, n >> 2
                mag = rng.choice([0.1, 1.0, 3.0]) if trial else 1.0
                inner[di, dj, dk] = mag if (case >> n) & 1 else -mag * rng.uniform(0.2, 1.0)
            phi = np.pad(inner, 1, constant_values=1.0)
            res = marching_cubes(phi, 0.0)
            if case == 255:
                assert len(res.faces) == 0
                continue
            assert_closed_oriented_manifold(res)
            assert_edge_data(res, phi, 0.0)


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=3, max_side=5),
        elements=st.floats(-1.0, 1.0, allow_nan=False, width=32),
    ),
    st.sampled_from([0.0, 0.25, -0.5]),
)
def test_random_tiny_grids_closed(inner, level):
    phi = np.pad(inner, 1, constant_values=2.0)
    res = marching_cubes(phi, level)
    if len(res.faces) == 0:
        assert np.all(phi > level)
        return
    chi = assert_closed_oriented_manifold(res)
    assert chi % 2 == 0
    assert_edge_data(res, phi, level)


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=3, max_side=5),
        elements=st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0]),
    )
)
def test_random_tiny_integer_grids_with_ties(inner):
    """Values exactly at the level and decider ties (saddle value exactly 0)."""
    phi = np.pad(inner, 1, constant_values=1.0)
    res = marching_cubes(phi, 0.0)
    if len(res.faces) == 0:
        assert np.all(phi > 0.0)
        return
    assert_closed_oriented_manifold(res)
    assert_edge_data(res, phi, 0.0)
