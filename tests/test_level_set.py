"""The level-set layer (reference_layers.level_set) and the mesh losses.

Derivatives are checked against finite differences of the forward (marching
cubes' actual output) on grids whose values stay at least 2e-3 away from the
level, so the perturbations never change the mesh's topology.
"""
from __future__ import annotations

import autograd.numpy as np
import numpy as onp
import pytest
from autograd import grad, make_jvp
from hypothesis import HealthCheck, given, settings

from nimplicit.errors import NonFiniteError, OptionError, ShapeError, UnsupportedError
from reference_layers.kernels.marching_cubes import marching_cubes
from reference_layers.level_set import (cell_origins, iso_surface, iso_surface_layer,
                                        surrogate_gradient, trilinear)
from reference_layers.mesh_losses import (EmptyMeshError, chamfer_distance, enclosed_volume,
                                          surface_area)
from verification import check_grad
from verification.strategies.level_set import field, fields, grid, separated_level, torus_field

SETTINGS = dict(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sphere(n=12, r=0.6):
    X, Y, Z = grid(n)
    return onp.sqrt(X ** 2 + Y ** 2 + Z ** 2) - r


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------

def test_vertices_equal_scikit_image_with_spacing():
    skimage_measure = pytest.importorskip("skimage.measure")
    rng = onp.random.default_rng(3)
    phi, level = field(rng, "torus", n=14)
    phi = phi.astype(onp.float32).astype(float)     # scikit-image computes in float32
    sp = (0.5, 1.0, 2.0)
    verts, faces = iso_surface_layer(phi, level, sp)
    ref, _, _, _ = skimage_measure.marching_cubes(phi, level, spacing=sp, method="lorensen")
    ours = onp.unique(onp.round(verts, 4), axis=0)
    theirs = onp.unique(onp.round(ref.astype(float), 4), axis=0)
    assert ours.shape == theirs.shape and len(verts) == len(ours)
    onp.testing.assert_allclose(ours, theirs, atol=2e-4)


@pytest.mark.parametrize("mode", ["edge", "normal"])
def test_layer_forward_is_the_kernel_output(mode):
    phi, level = field(onp.random.default_rng(0), "smooth", n=9)
    verts, faces = iso_surface_layer(phi, level, (1.0, 0.5, 0.25), mode=mode)
    mc = marching_cubes(phi, level, (1.0, 0.5, 0.25))
    onp.testing.assert_array_equal(verts, mc.verts)
    onp.testing.assert_array_equal(faces, mc.faces)


@pytest.mark.parametrize("kind, euler", [("sphere", 2), ("torus", 0)])
def test_closed_surfaces_are_watertight_and_oriented(kind, euler):
    phi, level = field(onp.random.default_rng(1), kind, n=16)
    verts, faces = iso_surface_layer(phi, level)
    directed = onp.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    # every directed edge once, and its reverse once: closed and consistently oriented
    assert len(onp.unique(directed, axis=0)) == len(directed)
    undirected, counts = onp.unique(onp.sort(directed, axis=1), axis=0, return_counts=True)
    assert (counts == 2).all()
    assert len(verts) - len(undirected) + len(faces) == euler
    assert enclosed_volume(verts, faces) > 0


def test_area_and_volume_of_a_fine_sphere():
    n, r = 48, 0.7
    h = 2.0 / (n - 1)
    verts, faces = iso_surface_layer(_sphere(n, r), 0.0, (h, h, h))
    assert abs(enclosed_volume(verts, faces) / (4 / 3 * onp.pi * r ** 3) - 1) < 0.01
    assert abs(surface_area(verts, faces) / (4 * onp.pi * r ** 2) - 1) < 0.02


# --------------------------------------------------------------------------
# edge mode: the derivative of the forward output
# --------------------------------------------------------------------------

@settings(**SETTINGS)
@given(fields(n_min=5, n_max=8))
def test_edge_mode_matches_finite_differences(phi_level):
    phi, level = phi_level
    report = check_grad(lambda p, lv: iso_surface_layer(p, lv, (0.3, 0.2, 0.5))[0],
                        phi, level, modes=("rev", "fwd"), n_directions=2)
    assert report.passed, report.summary(failures_only=True)


def test_edge_mode_second_order():
    phi, level = field(onp.random.default_rng(5), "sphere", n=6)
    report = check_grad(lambda p, lv: iso_surface_layer(p, lv)[0], phi, level, order=2,
                        modes=("rev",), n_directions=1)
    assert report.passed, report.summary(failures_only=True)


def test_edge_mode_linear_solvers_agree():
    phi, level = field(onp.random.default_rng(2), "smooth", n=7)
    w = onp.random.default_rng(0).standard_normal(iso_surface_layer(phi, level)[0].shape)
    kw = [{}, dict(backward="generic", linear_solver="lu"), dict(backward="generic")]
    grads = [grad(lambda p: np.sum(w * iso_surface_layer(p, level, **k)[0]))(phi) for k in kw]
    for g in grads[1:]:
        onp.testing.assert_allclose(g, grads[0], rtol=1e-10, atol=1e-12)


def test_grid_value_equal_to_level_gives_one_sided_derivative():
    """A grid value exactly at the level is inside (t = 0 vertices); lowering it
    keeps the topology, so the derivative is the one-sided difference from below."""
    phi = _sphere(8, 0.55)
    k = (2, 4, 4)
    phi[k] = 0.0
    verts, faces, mc = iso_surface_layer(phi, 0.0, full_output=True)
    assert (mc.t == 0).any()
    v = onp.zeros_like(phi)
    v[k] = -1.0
    w = onp.random.default_rng(0).standard_normal(verts.shape)
    f = lambda p: onp.sum(w * iso_surface_layer(p, 0.0)[0])
    h = 1e-7
    one_sided = (f(phi + h * v) - f(phi)) / h
    ad = onp.sum(grad(f)(phi) * v)
    assert abs(ad - one_sided) <= 1e-5 * max(1.0, abs(ad))


# --------------------------------------------------------------------------
# normal mode: consistency with the trilinear surrogate
# --------------------------------------------------------------------------

@settings(**SETTINGS)
@given(fields(n_min=5, n_max=8))
def test_normal_mode_is_consistent_with_the_surrogate(phi_level):
    phi, level = phi_level
    sp = onp.array([0.3, 0.2, 0.5])
    rng = onp.random.default_rng(0)
    dphi, dlevel = rng.standard_normal(phi.shape), 0.7
    verts, faces, mc = iso_surface_layer(phi, level, sp, full_output=True)
    origins = cell_origins(mc.edge_vertices, phi.shape)
    corners_of = lambda p: p[tuple((origins[:, None, :] + onp.array(
        [[c & 1, (c >> 1) & 1, c >> 2] for c in range(8)])[None]).transpose(2, 0, 1))]

    def along(s):     # (phi, level, v(phi, level)) moved by s along (dphi, dlevel)
        p, lv = phi + s * dphi, level + s * dlevel
        return p, lv, iso_surface_layer(p, lv, sp, mode="normal")[0]

    dv = make_jvp(lambda s: along(s)[2])(0.0)(1.0)[1]
    # total derivative of F(v, phi, level) = phi_tri(v) - level along the path is zero
    total = make_jvp(lambda s: trilinear(corners_of(along(s)[0]), along(s)[2] / sp - origins)
                     - along(s)[1])(0.0)(1.0)[1]
    g = surrogate_gradient(phi, mc, sp)
    scale = onp.abs(g).max() * onp.abs(dv).max()
    assert onp.abs(total).max() <= 1e-10 * max(scale, 1.0)
    # dv is parallel to the surrogate's gradient (normal) ...
    assert onp.abs(onp.cross(dv, g)).max() <= 1e-10 * max(scale, 1.0)
    # ... and its normal component is the edge mode's (the finite-difference-checked one)
    dv_edge = make_jvp(lambda s: iso_surface_layer(phi + s * dphi, level + s * dlevel, sp)[0])(
        0.0)(1.0)[1]
    onp.testing.assert_allclose(onp.sum(dv * g, 1), onp.sum(dv_edge * g, 1), rtol=1e-9,
                                atol=1e-10 * max(scale, 1.0))


def test_normal_mode_closed_form_equals_core_lstsq_and_vjp_matches_jvp():
    phi, level = field(onp.random.default_rng(4), "torus", n=9)
    w = onp.random.default_rng(1).standard_normal(iso_surface_layer(phi, level)[0].shape)
    loss = lambda p, s=None: np.sum(w * iso_surface_layer(
        p, level, mode="normal", **({} if s is None else dict(backward="generic", linear_solver=s)))[0])
    g_blocks, g_lstsq = grad(loss)(phi), grad(lambda p: loss(p, "lstsq"))(phi)
    onp.testing.assert_allclose(g_blocks, g_lstsq, rtol=1e-9, atol=1e-12)
    d = onp.random.default_rng(2).standard_normal(phi.shape)
    assert onp.isclose(onp.sum(g_blocks * d), make_jvp(loss)(phi)(d)[1], rtol=1e-10)


def test_normal_mode_second_order_is_refused():
    phi, level = field(onp.random.default_rng(0), "sphere", n=6)
    f = lambda p: np.sum(iso_surface_layer(p, level, mode="normal")[0] ** 2)
    with pytest.raises(UnsupportedError):
        grad(lambda p: np.sum(grad(f)(p) ** 2))(phi)


def test_trilinear_value_is_the_weighted_sum_of_corners():
    rng = onp.random.default_rng(11)
    corners, local = rng.standard_normal((50, 8)), rng.uniform(-0.2, 1.2, (50, 3))
    bits = onp.array([[c & 1, (c >> 1) & 1, c >> 2] for c in range(8)])
    weights = onp.prod(onp.where(bits[None], local[:, None, :], 1.0 - local[:, None, :]), axis=2)
    onp.testing.assert_allclose(trilinear(corners, local), onp.sum(corners * weights, 1),
                                rtol=1e-13, atol=1e-13)
    # at the corners the interpolant is the corner value (up to the lerps' rounding)
    onp.testing.assert_allclose(trilinear(corners[:8], bits.astype(float)),
                                corners[onp.arange(8), onp.arange(8)], rtol=0, atol=1e-15)


def test_trilinear_derivatives_match_finite_differences_to_second_order():
    # first order: the compiled rules; second order: the traceable NumPy rules
    rng = onp.random.default_rng(12)
    corners, local = rng.standard_normal((6, 8)), rng.uniform(0.05, 0.95, (6, 3))
    report = check_grad(trilinear, corners, local, order=2)
    assert report.passed, report.summary(failures_only=True)


@pytest.mark.parametrize("mode", ["edge", "normal"])
def test_jacobian_rows_from_the_forward_equal_the_autograd_rows(mode):
    from nimplicit import record_points
    from reference_layers.level_set import JacobianRows
    phi, level = field(onp.random.default_rng(5), "torus", n=9)
    with record_points() as points:
        iso_surface_layer(phi, level, (0.3, 0.2, 0.5), mode=mode)
    point = points[-1]
    assert isinstance(point.aux, JacobianRows)
    onp.testing.assert_allclose(point.aux.rows(), point.operator.dense()[:, 0, :],
                                rtol=1e-14, atol=1e-14)


def test_vertices_follow_an_intercepted_t():
    from reference_layers.level_set import _along_edges
    phi, level = field(onp.random.default_rng(3), "sphere", n=8)
    sp = onp.array([0.3, 0.2, 0.5])
    _, _, mc = iso_surface_layer(phi, level, sp, full_output=True)
    assert _along_edges(mc.t, mc, sp) is mc.verts
    t = 0.5 * mc.t
    c0, c1 = mc.edge_vertices[:, 0], mc.edge_vertices[:, 1]
    onp.testing.assert_allclose(_along_edges(t, mc, sp), (c0 + t[:, None] * (c1 - c0)) * sp,
                                rtol=0, atol=1e-15)


def test_cell_rule_uses_forward_differences_across_the_edge():
    phi, level = field(onp.random.default_rng(6), "smooth", n=7)
    _, _, mc = iso_surface_layer(phi, level, full_output=True)
    g = surrogate_gradient(phi, mc)
    c0, c1 = mc.edge_vertices[:, 0], mc.edge_vertices[:, 1]
    axis = onp.argmax(onp.abs(c1 - c0), axis=1)
    n = onp.arange(len(axis))
    # along the edge: the edge's own difference, in every cell
    onp.testing.assert_allclose(g[n, axis], (phi[tuple(c1.T)] - phi[tuple(c0.T)])
                                * (c1 - c0)[n, axis], rtol=1e-12, atol=1e-14)
    # across the edge, at the vertex's grid point when t = 0 ... forward differences
    low = onp.minimum(c0, c1)
    for k in range(3):
        sel = (axis != k) & (low[:, k] < phi.shape[k] - 1) & (mc.t == 0)
        if sel.any():
            up = low[sel].copy()
            up[:, k] += 1
            onp.testing.assert_allclose(g[sel, k], phi[tuple(up.T)] - phi[tuple(low[sel].T)])


# --------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["edge", "normal"])
def test_empty_surface_gives_empty_arrays_and_zero_gradients(mode):
    phi = _sphere(6)
    verts, faces = iso_surface_layer(phi, 10.0, mode=mode)
    assert verts.shape == (0, 3) and faces.shape == (0, 3)
    g_phi, g_level = grad(lambda p, lv: np.sum(iso_surface_layer(p, lv, mode=mode)[0] ** 2),
                          (0, 1))(phi, 10.0)
    assert g_phi.shape == phi.shape and not g_phi.any() and g_level == 0.0


@pytest.mark.parametrize("bad", [onp.nan, onp.inf, -onp.inf])
def test_non_finite_field_raises_typed_error(bad):
    phi = _sphere(6)
    phi[1, 2, 3] = bad
    with pytest.raises(NonFiniteError, match=r"\(1, 2, 3\)"):
        iso_surface_layer(phi)


def test_bad_arguments_raise_typed_errors():
    with pytest.raises(ShapeError):
        iso_surface_layer(onp.zeros((4, 4)))
    with pytest.raises(ShapeError):
        iso_surface_layer(onp.zeros((4, 1, 4)))
    with pytest.raises(ShapeError):
        iso_surface_layer(_sphere(5), 0.0, (1.0, -1.0, 1.0))
    with pytest.raises(NonFiniteError):
        iso_surface_layer(_sphere(5), onp.nan)
    with pytest.raises(ValueError, match="mode"):
        iso_surface_layer(_sphere(5), mode="tangent")


def test_separated_level_keeps_grid_values_away():
    phi = torus_field(onp.random.default_rng(0), n=12)
    level = separated_level(phi, 0.0, 1e-3)
    assert onp.abs(phi - level).min() >= 1e-3 - 1e-15 and abs(level) < 0.05


# --------------------------------------------------------------------------
# mesh losses
# --------------------------------------------------------------------------

def _tetrahedron():
    verts = onp.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    faces = onp.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])    # outward normals
    return verts, faces


def test_area_and_volume_of_a_tetrahedron():
    verts, faces = _tetrahedron()
    assert onp.isclose(enclosed_volume(verts, faces), 1 / 6)
    assert onp.isclose(enclosed_volume(verts + 5.0, faces), 1 / 6)     # origin-free
    assert onp.isclose(surface_area(verts, faces), 1.5 + onp.sqrt(3) / 2)


def test_chamfer_distance_value_and_gradients():
    rng = onp.random.default_rng(0)
    verts, points = rng.standard_normal((30, 3)), rng.standard_normal((20, 3))
    d = ((verts[:, None] - points[None]) ** 2).sum(-1)
    assert onp.isclose(chamfer_distance(verts, points), d.min(1).mean() + d.min(0).mean())
    assert chamfer_distance(verts, verts) == 0.0
    report = check_grad(chamfer_distance, verts, points)
    assert report.passed, report.summary(failures_only=True)
    verts, faces = _tetrahedron()
    verts = verts + 0.1 * rng.standard_normal(verts.shape)
    for loss in (surface_area, enclosed_volume):
        report = check_grad(lambda v: loss(v, faces), verts)
        assert report.passed, report.summary(failures_only=True)


def test_losses_of_empty_meshes():
    empty_v, empty_f = onp.zeros((0, 3)), onp.zeros((0, 3), dtype=int)
    with pytest.raises(EmptyMeshError):
        chamfer_distance(empty_v, onp.ones((3, 3)))
    assert surface_area(empty_v, empty_f) == 0.0 and enclosed_volume(empty_v, empty_f) == 0.0


def test_registry_entries_pass():
    from verification.registry import get
    for name in ("level-set-edge", "level-set-normal", "level-set-losses"):
        entry = get(name)
        inputs = entry.generate(onp.random.default_rng(11), **entry.size)
        report = check_grad(entry.fn, *inputs, argnums=entry.argnums, order=1)
        assert report.passed, (name, report.summary(failures_only=True))


def test_finite_difference_check_detects_the_normal_convention():
    """The normal mode is not the derivative of the forward: checking its full
    vertices against finite differences must fail (the check can fail)."""
    phi, level = field(onp.random.default_rng(8), "sphere", n=6)
    report = check_grad(lambda p: iso_surface_layer(p, level, mode="normal")[0], phi,
                        modes=("rev",), n_directions=1)
    assert not report.passed


def test_diagnose_reports_the_edge_margin():
    from verification.diagnose import diagnose
    phi, level = field(onp.random.default_rng(0), "sphere", n=7)
    assert diagnose(lambda p: iso_surface_layer(p, level)[0], phi).ok
    phi = _sphere(8, 0.55)
    phi[2, 4, 4] = 0.0                        # a grid value at the level: t = 0
    report = diagnose(lambda p: iso_surface_layer(p, 0.0)[0], phi)
    assert not report.ok and "edge_margin" in str(report)



def test_surface_area_at_zero_area_triangles_is_finite_with_zero_subgradient():
    """Issue 11 item 10: degenerate triangles (the level on grid values) contribute
    0 and the minimum-norm subgradient 0, not NaN blamed on "the cotangent"."""
    verts = onp.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [0.5, 0.5, 1.0]])
    faces = onp.array([[0, 1, 2], [0, 1, 3], [1, 2, 4]])      # face 1 is collinear: zero area
    g = grad(lambda v: surface_area(v, faces))(verts)
    g_without = grad(lambda v: surface_area(v, faces[[0, 2]]))(verts)
    assert onp.all(onp.isfinite(g))
    onp.testing.assert_allclose(g, g_without, rtol=0, atol=1e-15)
    onp.testing.assert_allclose(surface_area(verts, faces), surface_area(verts, faces[[0, 2]]))
    # away from degeneracy the gradient matches finite differences
    check = check_grad(lambda v: surface_area(v, faces[[0, 2]]), verts)
    assert check.passed, check


def test_keyword_convention_and_deprecated_aliases():
    phi = _sphere(10)
    loss = lambda p, **kw: np.sum(iso_surface_layer(p, 0.0, **kw)[0] ** 2)
    g = grad(loss)(phi)
    g_generic = grad(lambda p: loss(p, backward="generic"))(phi)
    onp.testing.assert_allclose(g_generic, g, rtol=1e-10, atol=1e-12)
    with pytest.warns(DeprecationWarning, match="backward='generic'"):
        g_old = grad(lambda p: loss(p, linear_solver="lstsq"))(phi)
    onp.testing.assert_allclose(g_old, g, rtol=1e-10, atol=1e-12)
    with pytest.warns(DeprecationWarning, match="full_output=True"):
        v3, f3, _ = iso_surface(phi, 0.0)
    onp.testing.assert_array_equal(v3, iso_surface_layer(phi, 0.0)[0])
    with pytest.raises(OptionError, match="unknown key"):
        iso_surface_layer(phi, 0.0, solver_options={"step": 1})
    with pytest.raises(OptionError, match="only meaningful with backward='generic'"):
        iso_surface_layer(phi, 0.0, backward="structured", linear_solver="lu")


def test_faces_stay_raw_integers_under_tracing():
    """The pair is a plain tuple on purpose (an autograd tuple would box faces):
    under grad, faces index the boxed verts, and the gradient matches FD."""
    from verification.finite_differences import directional_derivative
    phi = torus_field(onp.random.default_rng(1), n=10)
    t = onp.random.default_rng(3).standard_normal(phi.shape)
    seen = []

    def area(p):
        verts, faces = iso_surface_layer(p, 0.0)
        seen.append(type(faces))
        return surface_area(verts, faces)
    g = grad(area)(phi)
    assert seen[-1] is onp.ndarray
    fd = directional_derivative(area, phi, t)
    onp.testing.assert_allclose(onp.sum(g * t), fd.value, atol=float(fd.error) + 1e-10)


def test_read_only_field_reuses_the_one_compiled_specialization():
    """A read-only ``phi`` (a broadcast view, a read-only memory map) is copied by the
    wrappers, so the marching-cubes kernels are not compiled a second time for it."""
    from reference_layers.kernels import marching_cubes as mck

    x = onp.linspace(-1.0, 1.0, 9)
    phi = onp.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2) - 0.6
    ro = onp.broadcast_to(phi, phi.shape)
    assert not ro.flags.writeable
    a, b = marching_cubes(phi, 0.0), marching_cubes(ro, 0.0)
    for u, v in zip(a, b):
        onp.testing.assert_array_equal(u, v)
    for mode in ("edge", "normal"):
        def loss(p):
            out = iso_surface_layer(p, 0.0, mode=mode)
            return np.sum((out[0] if isinstance(out, tuple) else out) ** 2)
        assert onp.all(onp.isfinite(grad(loss)(ro)))
    for name in ("_classify_range", "_count_range", "_emit_range", "cell_geometry",
                 "transfer_corners", "trilinear_rules", "edge_direction_dot"):
        assert len(getattr(mck, name).signatures) <= 1, (name, getattr(mck, name).signatures)
