"""The normalized-cuts layer: forward against eigh, gradients of lambda and of
sign-invariant functions of v against finite differences of the actual forward
output (dense, batched, sparse; first and second order), the typed errors of
ill-posed graphs, and the eigen-gap diagnostics."""
from __future__ import annotations

import autograd.numpy as np
import numpy as onp
import pytest
import scipy.linalg
from autograd import grad, make_jvp
from helpers import assert_close, fd_directional
from hypothesis import HealthCheck, assume, given, settings

from nimplicit.errors import (LinearSolveError, NonFiniteError, OptionError, ShapeError,
                              SingularJacobianError)
from reference_layers.ncut import (DEFAULT_SIGN_SEED, DisconnectedGraphError, EigenGapError,
                                   InvalidGraphError, SparseNCut, _sparse_apply, _FixedSparse,
                                   grid_graph_edges, make_ncut_layer, ncut_layer, ncut_spectrum)
from verification.diagnose import diagnose
from verification.strategies.ncut import (ILL_POSED_KINDS, block_affinity, block_affinity_batch,
                                          dense_graphs, eigen_gaps, ill_posed_affinity,
                                          image_graph)

FD_STEP = 1e-4


def sym_direction(rng, W):
    """A random symmetric direction, scaled by W so that W + t E stays positive."""
    E = rng.standard_normal(W.shape)
    return 0.5 * (E + onp.swapaxes(E, -1, -2)) * W


def invariants(layer, C, c):
    """``W -> lam + v^T C v + sum c v^2``: independent of v's sign convention."""
    def f(W):
        v, lam = layer(W)
        return np.sum(lam) + np.sum(np.matmul(v, C) * v) + np.sum(c * v * v)
    return f


def dense_to_weights(W, edges):
    return W[edges[:, 0], edges[:, 1]]


def weights_to_dense(weights, edges, n):
    W = onp.zeros((n, n))
    W[edges[:, 0], edges[:, 1]] = weights
    W[edges[:, 1], edges[:, 0]] = weights
    return W


# ------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["degree", "unit"])
def test_dense_forward_matches_eigh_and_conventions(normalization):
    rng = onp.random.default_rng(0)
    W = block_affinity(rng, 9, gap=0.4, noise=0.1)
    v, lam = ncut_layer(W, normalization=normalization)
    d = W.sum(axis=1)
    lams, vecs = scipy.linalg.eigh(onp.diag(d) - W, onp.diag(d))
    assert abs(lam - lams[1]) <= 1e-13
    assert onp.allclose((onp.diag(d) - W) @ v, lam * d * v, atol=1e-12)
    norm = v @ (d * v) if normalization == "degree" else v @ v
    assert abs(norm - 1.0) <= 1e-13
    r = onp.random.default_rng(DEFAULT_SIGN_SEED).standard_normal(9)
    assert r @ v > 0
    cos = abs(v @ onp.diag(d) @ vecs[:, 1]) / onp.sqrt(v @ (d * v))
    assert abs(cos - 1.0) <= 1e-12


def test_planted_gap_strategy_controls_the_spectrum():
    rng = onp.random.default_rng(1)
    for gap in (0.2, 0.5, 0.8):
        W = block_affinity(rng, 10, gap=gap, noise=0.0)
        upper, lower = eigen_gaps(W)
        assert abs(upper - gap) <= 1e-12 and abs(lower - (1 - gap)) <= 1e-12


def test_sign_convention_user_reference_and_stability():
    rng = onp.random.default_rng(2)
    W = block_affinity(rng, 8, gap=0.5)
    ref = onp.arange(8.0) - 3.5
    v, _ = ncut_layer(W, sign_reference=ref)
    assert ref @ v > 0
    v_minus, _ = ncut_layer(W, sign_reference=-ref)
    assert onp.allclose(v_minus, -v)
    # a small perturbation keeps the sign: the layer is a continuous function
    v2, _ = ncut_layer(W + 1e-6 * sym_direction(rng, W), sign_reference=ref)
    assert onp.abs(v2 - v).max() < 1e-4


def test_batched_forward_matches_instances():
    W = block_affinity_batch(onp.random.default_rng(3), batch=4, n=7)
    v, lam = ncut_layer(W)
    assert v.shape == (4, 7) and lam.shape == (4,)
    for b in range(4):
        vb, lb = ncut_layer(W[b])
        assert onp.allclose(vb, v[b], atol=1e-14) and abs(lb - lam[b]) <= 1e-14


@pytest.mark.parametrize("normalization", ["degree", "unit"])
def test_sparse_forward_matches_dense(normalization):
    edges, weights, n = image_graph(onp.random.default_rng(4), 5, 6)
    v_s, lam_s = SparseNCut(edges, n, normalization=normalization)(weights)
    v_d, lam_d = ncut_layer(weights_to_dense(weights, edges, n), normalization=normalization)
    assert abs(lam_s - lam_d) <= 1e-12 * abs(lam_d) + 1e-15
    assert onp.abs(v_s - v_d).max() <= 1e-10 * onp.abs(v_d).max()


def test_grid_graph_edges_matches_brute_force():
    h, w, radius = 4, 5, 1.5
    edges = grid_graph_edges(h, w, radius)
    expected = {(a, b) for a in range(h * w) for b in range(a + 1, h * w)
                if (a // w - b // w) ** 2 + (a % w - b % w) ** 2 <= radius ** 2}
    assert sorted(map(tuple, edges.tolist())) == sorted(expected)


# ------------------------------------------------------------------------------
# gradients against finite differences of the forward solver
# ------------------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["degree", "unit"])
def test_dense_gradients_match_finite_differences(normalization):
    rng = onp.random.default_rng(5)
    n = 8
    W = block_affinity(rng, n, gap=0.5)
    C, c = rng.standard_normal((n, n)), rng.standard_normal(n)
    f = invariants(make_ncut_layer(normalization=normalization), C, c)
    E = sym_direction(rng, W)
    fd = fd_directional(f, W, E, FD_STEP)
    g = grad(f)(W)
    assert onp.allclose(g, g.T, atol=1e-14)          # a function of sym(W)
    assert_close(onp.sum(g * E), fd, 1e-8, "reverse mode")
    assert_close(make_jvp(f)(W)(E)[1], fd, 1e-8, "forward mode")
    # lambda alone
    lam_fn = lambda W: make_ncut_layer(normalization=normalization)(W)[1]
    assert_close(onp.sum(grad(lam_fn)(W) * E), fd_directional(lam_fn, W, E, FD_STEP), 1e-8, "lambda")


def test_dense_second_order_matches_finite_differences():
    rng = onp.random.default_rng(6)
    n = 6
    W = block_affinity(rng, n, gap=0.5)
    f = invariants(make_ncut_layer(), rng.standard_normal((n, n)), rng.standard_normal(n))
    U, E = sym_direction(rng, W), sym_direction(rng, W)
    directional = lambda W: np.sum(grad(f)(W) * U)
    assert_close(onp.sum(grad(directional)(W) * E), fd_directional(directional, W, E, FD_STEP),
                 1e-7, "Hessian-vector product")


def test_batched_gradients_match_finite_differences():
    rng = onp.random.default_rng(7)
    W = block_affinity_batch(rng, batch=3, n=6)
    f = invariants(make_ncut_layer(batch_axis=0), rng.standard_normal((6, 6)), rng.standard_normal(6))
    E = sym_direction(rng, W)
    # the batched forward's eigenvectors are accurate to ~1e-12 of f, so a central
    # difference at FD_STEP = 1e-4 carries ~1e-8 of noise (1.3e-8 measured on one CPU):
    # below this test's tolerance.  At 1e-3 and 5e-4 truncation (O(h^2)) and noise are
    # both ~1e-9; the gradient must match both.
    g = onp.sum(grad(f)(W) * E)
    for step in (1e-3, 5e-4):
        assert_close(g, fd_directional(f, W, E, step), 1e-8, f"batched (step {step:g})")


@pytest.mark.parametrize("solver,normalization,rtol", [
    ("generic", "degree", 1e-7), ("generic", "unit", 1e-7), ("structured", "degree", 1e-8),
    ("structured", "unit", 1e-8)])
def test_sparse_gradients_match_finite_differences(solver, normalization, rtol):
    rng = onp.random.default_rng(8)
    edges, weights, n = image_graph(rng, 5, 6)
    layer = SparseNCut(edges, n, normalization=normalization, backward=solver)
    f = invariants(layer, rng.standard_normal((n, n)), rng.standard_normal(n))
    E = rng.standard_normal(weights.shape) * weights
    fd = fd_directional(f, weights, E, FD_STEP)
    assert_close(onp.dot(grad(f)(weights), E), fd, rtol, "reverse mode")
    assert_close(make_jvp(f)(weights)(E)[1], fd, rtol, "forward mode")


@pytest.mark.parametrize("solver", ["generic", "structured"])
def test_sparse_second_order_matches_finite_differences(solver):
    rng = onp.random.default_rng(9)
    edges, weights, n = image_graph(rng, 4, 5)
    layer = SparseNCut(edges, n, backward=solver)
    f = invariants(layer, rng.standard_normal((n, n)), rng.standard_normal(n))
    U, E = rng.standard_normal(weights.shape), rng.standard_normal(weights.shape) * weights
    directional = lambda w: np.dot(grad(f)(w), U)
    assert_close(onp.dot(grad(directional)(weights), E),
                 fd_directional(directional, weights, E, FD_STEP), 1e-6, "Hessian-vector product")


def test_bordered_jacobian_symmetric_only_for_degree_normalization():
    """The D-normalization written as -(1/2)(v'Dv - 1) makes J symmetric, so the
    core's plain MINRES (which probes symmetry) accepts it; the paper's v'v = 1
    does not."""
    rng = onp.random.default_rng(21)
    edges, weights, n = image_graph(rng, 3, 4, contrast=0.3, floor=0.5)
    c = rng.standard_normal(n)
    f = lambda layer: (lambda w: np.sum(c * layer(w)[0] ** 2))
    ref = grad(f(SparseNCut(edges, n, backward="structured")))(weights)
    plain = SparseNCut(edges, n, linear_solver="minres", linear_solver_options={"rtol": 1e-13})
    assert_close(grad(f(plain))(weights), ref, 1e-8, "core minres")
    unit = SparseNCut(edges, n, normalization="unit", linear_solver="minres")
    with pytest.raises(LinearSolveError, match="symmetric"):
        grad(f(unit))(weights)


def test_sparse_gradient_equals_dense_gradient_on_the_same_graph():
    rng = onp.random.default_rng(10)
    edges, weights, n = image_graph(rng, 4, 4)
    C = rng.standard_normal((n, n))
    g_sparse = grad(invariants(SparseNCut(edges, n, backward="structured"), C, 0.0))(weights)
    g_dense = grad(invariants(make_ncut_layer(), C, 0.0))(weights_to_dense(weights, edges, n))
    # w_e enters W_ij and W_ji
    expected = g_dense[edges[:, 0], edges[:, 1]] + g_dense[edges[:, 1], edges[:, 0]]
    assert_close(g_sparse, expected, 1e-9, "sparse vs dense gradient")


def test_sparse_product_primitive_second_order():
    rng = onp.random.default_rng(11)
    M = _FixedSparse(scipy.sparse.random(5, 7, density=0.5, random_state=1))
    x, u = rng.standard_normal(7), rng.standard_normal(5)
    f = lambda x: np.sum(_sparse_apply(M, x) ** 3 * u)
    E = rng.standard_normal(7)
    hv = lambda x: np.dot(grad(f)(x), E)
    assert_close(grad(f)(x), onp.array([fd_directional(f, x, e) for e in onp.eye(7)]), 1e-9, "grad")
    assert_close(onp.dot(grad(hv)(x), E), fd_directional(hv, x, E), 1e-9, "second order")


def test_larger_image_graph_gradient():
    """32 x 32 pixels (N = 1024): shift-invert Lanczos + matrix-free MINRES."""
    rng = onp.random.default_rng(12)
    edges, weights, n = image_graph(rng, 32, 32, contrast=1.0, floor=0.02)
    layer = SparseNCut(edges, n)
    c = rng.standard_normal(n)
    f = lambda w: (lambda vl: vl[1] + np.sum(c * vl[0] ** 2) / np.sum(vl[0] ** 2))(layer(w))
    E = rng.standard_normal(weights.shape) * weights
    assert_close(onp.dot(grad(f)(weights), E), fd_directional(f, weights, E, FD_STEP), 1e-6, "N=1024")


@pytest.mark.slow
def test_4096_pixel_graph_gradient():
    rng = onp.random.default_rng(13)
    edges, weights, n = image_graph(rng, 64, 64, contrast=1.0, floor=0.02)
    for solver in ("generic", "structured"):
        layer = SparseNCut(edges, n, backward=solver)
        c = rng.standard_normal(n)
        f = lambda w: (lambda vl: vl[1] + np.sum(c * vl[0] ** 2) / np.sum(vl[0] ** 2))(layer(w))
        E = rng.standard_normal(weights.shape) * weights
        assert_close(onp.dot(grad(f)(weights), E), fd_directional(f, weights, E, FD_STEP), 1e-6,
                     f"N=4096 {solver}")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(W=dense_graphs())
def test_property_dense_gradient_of_lambda(W):
    """lambda and v^T C v against finite differences with their error estimate
    (``check_grad``: |AD - FD| <= FD error estimate + 1e-12 norm-wise)."""
    from verification.check import check_grad
    upper, lower = eigen_gaps(W)
    assume(upper > 0.05 and lower > 0.05)
    C = onp.random.default_rng(0).standard_normal(W.shape)

    def fn(X):
        v, lam = ncut_layer(0.5 * (X + X.T))
        return lam, np.sum(np.dot(v, C) * v)
    report = check_grad(fn, W, order=1)
    assert report.passed, str(report)


# ------------------------------------------------------------------------------
# ill-posed input: typed errors, never a silent NaN
# ------------------------------------------------------------------------------

EXPECTED_ERRORS = {"three-components": EigenGapError, "disconnected": DisconnectedGraphError,
                   "negative": InvalidGraphError, "isolated": InvalidGraphError,
                   "asymmetric": InvalidGraphError, "nan": NonFiniteError}


@pytest.mark.parametrize("kind", ILL_POSED_KINDS)
def test_ill_posed_dense_raises_typed_error(kind):
    W = ill_posed_affinity(kind, onp.random.default_rng(14), 9)
    with pytest.raises(EXPECTED_ERRORS[kind]):
        ncut_layer(W)
    with pytest.raises(EXPECTED_ERRORS[kind]):
        grad(lambda W: ncut_layer(W)[1])(W)


def test_repeated_eigenvalue_is_a_singular_jacobian_error():
    W = ill_posed_affinity("three-components", onp.random.default_rng(0), 9)
    with pytest.raises(SingularJacobianError, match="not simple"):
        ncut_layer(W)
    three = onp.kron(onp.eye(3), onp.ones((3, 3)))         # three disconnected cliques
    with pytest.raises(DisconnectedGraphError, match="3 connected components"):
        ncut_layer(three)


def test_batched_error_names_the_instance():
    W = block_affinity_batch(onp.random.default_rng(15), batch=3, n=6)
    W[1, 0, 1] = W[1, 1, 0] = -1.0
    with pytest.raises(InvalidGraphError, match="batch instance 1"):
        ncut_layer(W)


def test_bad_shapes():
    with pytest.raises(ShapeError):
        ncut_layer(onp.ones((3, 4)))
    with pytest.raises(ShapeError):
        ncut_layer(onp.ones((2, 2)))
    with pytest.raises(ShapeError):
        ncut_layer(onp.ones(5))


def test_sparse_ill_posed_inputs():
    rng = onp.random.default_rng(16)
    edges, weights, n = image_graph(rng, 4, 4)
    layer = SparseNCut(edges, n)
    bad = weights.copy()
    bad[3] = -0.1
    with pytest.raises(InvalidGraphError, match="negative"):
        layer(bad)
    nan = weights.copy()
    nan[0] = onp.nan
    with pytest.raises(NonFiniteError):
        layer(nan)
    isolated = weights.copy()
    isolated[(edges == 0).any(axis=1)] = 0.0
    with pytest.raises(InvalidGraphError, match="isolated"):
        layer(isolated)
    cut = weights.copy()
    cut[(edges // 4)[:, 0] != (edges // 4)[:, 1]] = 0.0     # remove every vertical edge
    with pytest.raises(DisconnectedGraphError, match="4 connected components"):
        layer(cut)
    with pytest.raises(ShapeError):
        layer(weights[:-1])
    with pytest.raises(InvalidGraphError, match="self-loop"):
        SparseNCut(onp.array([[0, 1], [1, 1], [1, 2]]), 3)
    with pytest.raises(InvalidGraphError, match="must lie in"):
        SparseNCut(onp.array([[0, 1], [1, 5]]), 3)


def test_sparse_repeated_eigenvalue():
    """A uniform square grid has lam_2 = lam_3 (horizontal and vertical modes)."""
    edges = grid_graph_edges(5, 5, 1.0)
    with pytest.raises(EigenGapError):
        SparseNCut(edges, 25)(onp.ones(len(edges)))


def test_krylov_failure_is_reported_not_silent():
    rng = onp.random.default_rng(17)
    edges, weights, n = image_graph(rng, 4, 5)
    layer = SparseNCut(edges, n, linear_solver_options={"maxiter": 2, "refinements": 1})
    with pytest.raises(LinearSolveError, match="did not reach"):
        grad(lambda w: np.sum(onp.arange(n) * layer(w)[0] ** 2))(weights)


# ------------------------------------------------------------------------------
# diagnostics
# ------------------------------------------------------------------------------

def test_diagnose_reports_the_eigen_gap():
    rng = onp.random.default_rng(18)
    W = block_affinity(rng, 8, gap=0.5, noise=0.0)
    report = diagnose(lambda W: ncut_layer(W), W)
    measures = report.points[0].measures
    assert abs(measures["eigen_gap_upper"][0] - 0.5) < 1e-10 and measures["eigen_gap_upper"][1]
    assert abs(measures["eigen_gap_lower"][0] - 0.5) < 1e-10 and measures["eigen_gap_lower"][1]
    assert report.ok
    # a nearly repeated lam_2 (planted gap 1e-6 > gap_tol): evaluated but flagged
    tight = block_affinity(rng, 8, gap=1e-6, noise=0.0)
    report = diagnose(lambda W: ncut_layer(W), tight)
    assert not report.points[0].measures["eigen_gap_upper"][1]
    assert not report.ok and any("eigen_gap_upper" in f for f in report.flags)


def test_diagnose_sparse_and_errors():
    edges, weights, n = image_graph(onp.random.default_rng(19), 4, 5)
    layer = SparseNCut(edges, n)
    report = diagnose(layer, weights)
    assert set(report.points[0].measures) == {"eigen_gap_upper", "eigen_gap_lower", "sign_margin"}
    bad = ill_posed_affinity("three-components", onp.random.default_rng(0), 9)
    report = diagnose(lambda W: ncut_layer(W), bad)
    assert isinstance(report.error, EigenGapError) and not report.ok


def test_ncut_spectrum_helper():
    W = block_affinity(onp.random.default_rng(20), 6, gap=0.3, noise=0.0)
    lams, vecs = ncut_spectrum(W)
    assert onp.allclose(lams, [0.0, 0.7, 1.0], atol=1e-12) and vecs.shape == (6, 3)
    W[0, 1] = W[1, 0] = onp.nan   # the helper runs outside the layer's input check
    with pytest.raises(NonFiniteError, match="affinity"):
        ncut_spectrum(W)


# ------------------------------------------------------------------------------
# the registry entries (what the CLI checks)
# ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ncut-dense", "ncut-dense-unit", "ncut-batched", "ncut-sparse",
                                  "ncut-sparse-splu"])
def test_registry_entries_pass_check_grad(name):
    from verification.check import check_grad
    from verification.registry import get
    entry = get(name)
    inputs = entry.generate(onp.random.default_rng(0), **entry.size)
    report = check_grad(entry.fn, *inputs, order=entry.order, argnums=entry.argnums,
                        rtol=entry.rtol, atol=entry.atol)
    assert report.passed, str(report)


@pytest.mark.filterwarnings("ignore:Output seems independent of input")
def test_registry_check_detects_a_wrong_gradient():
    """The entry's check can fail: the same forward solver with a residual whose
    dependence on W is hidden from autograd (zero implicit gradient) is caught."""
    from autograd.tracer import getval
    from nimplicit import implicit_layer
    from verification.check import check_grad
    from verification.registry import get
    import reference_layers.ncut as ncut_module
    entry = get("ncut-dense")
    good = make_ncut_layer()
    residual = ncut_module._dense_residual("degree")
    broken = implicit_layer(lambda y, W: residual(y, getval(W)), good.solver, linear_solver="lu")
    X, C, c = entry.generate(onp.random.default_rng(0), **entry.size)
    fn = lambda X: broken(0.5 * (X + X.T))[1]
    assert not check_grad(fn, X, order=1).passed
    assert check_grad(lambda X: good(0.5 * (X + X.T))[1], X, order=1).passed


def test_segmentation_example_end_to_end_gradient():
    """The experiment's chain (MLP features -> Gaussian affinity -> NCut layer ->
    sign-invariant alignment loss) differentiated in the MLP's last-layer
    weights, against finite differences."""
    from examples.ncut_segmentation import (PixelGraph, alignment_loss, feature_map,
                                            init_params, make_scene)
    rng = onp.random.default_rng(22)
    image, mask = make_scene(rng, 8)
    graph = PixelGraph(8, 1.5, sigma_x=2.0)
    params = init_params(rng)
    patches = graph.patches(image[None])[0]

    def loss(W2):
        p = [params[0], {**params[1], "W": W2}, params[2]]
        w = graph.learned_weights(feature_map(p, patches), 1e-3)
        v, _ = graph.layer(w)
        return alignment_loss(v, graph.layer.degrees(w), mask.ravel().astype(float))
    W2 = params[1]["W"]
    E = rng.standard_normal(W2.shape)
    assert_close(onp.sum(grad(loss)(W2) * E), fd_directional(loss, W2, E, FD_STEP), 1e-6,
                 "example loss")


# ------------------------------------------------------------------------------
# issue 11: N = 3 sparse graphs, scipy.sparse W, extreme scales
# ------------------------------------------------------------------------------

def _dense_W(n=6, seed=0):
    rng = onp.random.default_rng(seed)
    W = rng.uniform(0.1, 1.0, (n, n))
    W = 0.5 * (W + W.T)
    onp.fill_diagonal(W, 0.0)
    return W


def test_sparse_ncut_with_three_nodes_matches_the_dense_layer():
    edges = onp.array([[0, 1], [1, 2], [0, 2]])
    w = onp.array([1.0, 2.0, 3.0])
    W = onp.zeros((3, 3))
    W[edges[:, 0], edges[:, 1]] = w
    W = W + W.T
    v_s, lam_s = SparseNCut(edges, 3)(w)
    v_d, lam_d = ncut_layer(W)
    assert_close(lam_s, lam_d, 1e-12, "lam, N = 3")
    assert_close(v_s, v_d, 1e-10, "v, N = 3")
    f = lambda w: SparseNCut(edges, 3)(w)[1]
    g = grad(f)(w)
    assert_close(g @ onp.array([0.3, -0.2, 0.5]), fd_directional(f, w, onp.array([0.3, -0.2, 0.5])),
                 1e-6, "dlam/dw, N = 3")


def test_scipy_sparse_W_is_read_as_a_graph():
    import scipy.sparse as sps
    W = _dense_W()
    v_s, lam_s = ncut_layer(sps.csr_matrix(W))
    v_d, lam_d = ncut_layer(W)
    assert_close(lam_s, lam_d, 1e-10, "lam of sparse W")
    assert_close(v_s, v_d, 1e-8, "v of sparse W")


@pytest.mark.parametrize("scale", [1e150, 1e-150])
def test_dense_ncut_at_extreme_scales_is_scale_invariant(scale):
    """Issue 11 item 5: no degeneracy reported at 1e+-150 (the tests are relative);
    (v, lam) is invariant to scaling W and dlam/dW scales as 1/scale."""
    W = _dense_W()
    v, lam = ncut_layer(W * scale)
    v1, lam1 = ncut_layer(W)
    assert_close(lam, lam1, 1e-12, "lam at scale")
    assert_close(v * onp.sqrt(scale), v1, 1e-8, "v (degree normalization scales with D)")
    g = grad(lambda W: ncut_layer(W)[1])(W * scale)
    g1 = grad(lambda W: ncut_layer(W)[1])(W)
    assert_close(g * scale, g1, 1e-8, "dlam/dW at scale")


def test_keyword_convention_and_deprecated_aliases():
    W = _dense_W()
    v, lam = ncut_layer(W)
    assert_close(ncut_layer(W, full_output=False), v, 0.0, "full_output=False gives v")
    v_t, lam_t = ncut_layer(W, full_output=True)
    assert_close(lam_t, lam, 0.0, "full_output=True gives (v, lam)")
    with pytest.raises(OptionError, match=r"unknown key\(s\) \['eig_tol'\]"):
        ncut_layer(W, solver_options={"eig_tol": 1e-8})        # the dense forward has none
    with pytest.raises(OptionError, match="backward must be one of"):
        ncut_layer(W, backward="bogus")
    edges = grid_graph_edges(3, 3)
    w = onp.linspace(0.5, 1.5, len(edges))
    with pytest.warns(DeprecationWarning, match="backward='structured'"):
        old = SparseNCut(edges, 9, linear_solver="splu")
    with pytest.warns(DeprecationWarning, match="backward='structured'"):
        fast = SparseNCut(edges, 9, backward="fast")
    new = SparseNCut(edges, 9, backward="structured", solver_options={"eig_tol": 1e-9})
    assert_close(grad(lambda w: old(w)[1])(w), grad(lambda w: new(w)[1])(w), 1e-12, "splu alias")
    assert_close(grad(lambda w: fast(w)[1])(w), grad(lambda w: new(w)[1])(w), 1e-12, "fast alias")
    with pytest.warns(DeprecationWarning, match="solver_options"):
        SparseNCut(edges, 9, eig_tol=1e-9)
    with pytest.warns(DeprecationWarning, match="batch_axis=0"):
        make_ncut_layer(batched=True)
    with pytest.raises(OptionError, match="unknown key"):
        SparseNCut(edges, 9, solver_options={"tol": 1})
    with pytest.raises(OptionError, match="only meaningful with backward='generic'"):
        SparseNCut(edges, 9, backward="structured", linear_solver="gmres")


def test_full_output_is_boxed_so_make_vjp_of_the_layer_sees_it():
    """make_vjp of ncut_layer itself (dense and edges= forms) with the cotangent on
    lam alone: non-zero, and <g, t> equals the FD estimate of dlam along t."""
    from autograd import make_vjp
    from verification.finite_differences import directional_derivative
    rng = onp.random.default_rng(5)
    W = rng.uniform(0.1, 1.0, (6, 6))
    W = 0.5 * (W + W.T)
    onp.fill_diagonal(W, 0.0)          # no self-loops: the edge list below has none
    t = rng.standard_normal(W.shape)
    t = 0.5 * (t + t.T)
    onp.fill_diagonal(t, 0.0)
    vjp, (v, lam) = make_vjp(lambda X: ncut_layer(X))(W)
    g = vjp((onp.zeros_like(v), 1.0))
    fd = directional_derivative(lambda X: ncut_layer(X)[1], W, t)
    assert onp.abs(g).max() > 0
    onp.testing.assert_allclose(onp.sum(g * t), fd.value, atol=float(fd.error) + 1e-10)
    edges = onp.array([(i, j) for i in range(6) for j in range(i + 1, 6)])
    w = W[edges[:, 0], edges[:, 1]]
    vjp_s, (v_s, lam_s) = make_vjp(lambda x: ncut_layer(x, edges=edges, n_nodes=6))(w)
    onp.testing.assert_allclose(lam_s, lam, rtol=1e-10)
    ge = vjp_s((onp.zeros_like(v_s), 1.0))
    te = t[edges[:, 0], edges[:, 1]]
    fde = directional_derivative(lambda x: ncut_layer(x, edges=edges, n_nodes=6)[1], w, te)
    onp.testing.assert_allclose(onp.sum(ge * te), fde.value, atol=float(fde.error) + 1e-10)


# ------------------------------------------------------------------------------
# option validation (issue 11 item 9): typed errors naming the option
# ------------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"normalization": "bogus"}, "normalization must be one of"),
    ({"gap_tol": float("nan")}, "gap_tol"), ({"gap_tol": -1.0}, "gap_tol"),
    ({"gap_tol": "small"}, "gap_tol"), ({"n_nodes": -2}, "n_nodes"), ({"n_nodes": 2.5}, "n_nodes"),
    ({"n_nodes": 7}, "n_nodes=7 is only used with edges="), ({"dense_max": -1}, "dense_max"),
    ({"full_output": "yes"}, "full_output"), ({"sign_reference": onp.zeros(6)}, "zero vector"),
    ({"sign_reference": onp.full(6, onp.nan)}, "non-finite"),
    ({"bogus_option": 1}, r"unknown key\(s\) \['bogus_option'\]"),
]


@pytest.mark.parametrize("options, match", BAD_OPTIONS, ids=lambda x: str(x)[:30])
def test_bad_options_raise_typed_option_errors(options, match):
    """Each bad option: an OptionError (a ValueError and a TypeError) naming it."""
    W = block_affinity(onp.random.default_rng(0), n=6)
    with pytest.raises(OptionError, match=match) as info:
        ncut_layer(W, **options)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_unknown_keyword_message_lists_ncut_and_core_keywords():
    W = block_affinity(onp.random.default_rng(0), n=6)
    with pytest.raises(OptionError) as info:
        ncut_layer(W, bogus_option=1)
    for keyword in ("normalization", "gap_tol", "n_nodes", "residual_tol", "linear_solver_options"):
        assert keyword in str(info.value)
    with pytest.raises(OptionError, match="bogus"):
        make_ncut_layer(bogus=1)
    with pytest.raises(OptionError, match="bogus"):
        SparseNCut(grid_graph_edges(3, 3), 9, bogus=1)


@pytest.mark.parametrize("make", [
    lambda: SparseNCut(grid_graph_edges(3, 3), 9, gap_tol=float("nan")),
    lambda: SparseNCut(grid_graph_edges(3, 3), 9.0),
    lambda: SparseNCut(grid_graph_edges(3, 3), 9, dense_max=True),
    lambda: SparseNCut(grid_graph_edges(3, 3), 9, solver_options={"eig_tol": "tight"}),
    lambda: SparseNCut(grid_graph_edges(3, 3), 9, normalization=1),
    lambda: make_ncut_layer(gap_tol=2.0),
])
def test_sparse_and_factory_options_are_validated(make):
    with pytest.raises(OptionError):
        make()


def test_valid_keywords_still_pass_through():
    """n_nodes equal to N with a dense W, residual_tol and name reach the core unchanged."""
    W = block_affinity(onp.random.default_rng(0), n=6)
    v, lam = ncut_layer(W)
    v2, lam2 = ncut_layer(W, n_nodes=6, residual_tol=1e-7, name="mine", gap_tol=0.0)
    assert_close(v2, v, 0.0, "v")
    assert_close(lam2, lam, 0.0, "lam")


def test_empty_batch_is_a_typed_error():
    from nimplicit.errors import EmptyInputError
    with pytest.raises(EmptyInputError, match="empty"):
        ncut_layer(onp.zeros((0, 5, 5)))


def test_eigen_gap_uses_the_shared_relative_test():
    """EigenGapError is the shared DegenerateEigenvalueError, and the verdict is
    invariant under W -> c W (the relative gap of nimplicit.spectral)."""
    from nimplicit.spectral import DegenerateEigenvalueError
    assert issubclass(EigenGapError, DegenerateEigenvalueError)
    W = onp.ones((5, 5))                       # lam_2 = lam_3: repeated
    for c in (1e-150, 1.0, 1e150):
        with pytest.raises(DegenerateEigenvalueError, match="not simple"):
            ncut_layer(c * W)
    good = block_affinity(onp.random.default_rng(1), n=6)
    lam = [float(ncut_layer(c * good)[1]) for c in (1e-150, 1.0, 1e150)]
    assert_close(onp.array(lam), onp.full(3, lam[1]), 1e-10, "lam invariant under scaling")


def _three_graphs(seed=0):
    rng = onp.random.default_rng(seed)
    A = rng.random((3, 7, 7))
    W = (A + A.transpose(0, 2, 1)) / 2
    for k in range(3):
        onp.fill_diagonal(W[k], 0.0)
    return W


def test_throw_false_keeps_the_good_graphs_of_a_batch():
    """One graph with isolated nodes: its rows are NaN with its outcome; the others'
    outputs and gradients are those of the batch without it (and match FD)."""
    from autograd import grad
    from nimplicit import Outcome
    from verification import check_grad

    W = _three_graphs()
    W[1] = 0.0
    W[1, 0, 1] = W[1, 1, 0] = 1.0                  # nodes 2..6 isolated: D singular
    (v, lam), status = ncut_layer(W, throw=False, full_output=True)
    assert status.ok.tolist() == [True, False, True]
    assert status.codes[1] == Outcome.SOLVER_FAILED and "isolated" in status.messages[1]
    assert onp.isnan(v[1]).all() and onp.isnan(lam[1])
    good = W[[0, 2]]
    v_good, lam_good = ncut_layer(good, full_output=True)
    assert onp.array_equal(v[[0, 2]], v_good) and onp.array_equal(lam[[0, 2]], lam_good)

    target = onp.random.default_rng(1).standard_normal(v_good.shape)

    def loss(W):
        v, status = ncut_layer(W, throw=False, full_output=False)
        return np.sum(np.where(status.ok[:, None], v, 0.0) * target[[0, 0, 1]])

    g = grad(loss)(W)
    g_good = grad(lambda Wg: np.sum(ncut_layer(Wg, full_output=False) * target))(good)
    assert onp.all(g[1] == 0.0) and onp.allclose(g[[0, 2]], g_good, rtol=1e-12, atol=1e-14)
    off = 1.0 - onp.eye(good.shape[1])                # FD steps keep W >= 0, zero diagonal
    report = check_grad(lambda P: ncut_layer(off * (P + np.swapaxes(P, 1, 2)) / 2,
                                             throw=False, full_output=False)[0], good,
                        modes=("rev",))
    assert report.passed, report


def test_throw_false_reports_a_repeated_eigenvalue_per_graph():
    from nimplicit import Outcome
    from nimplicit.errors import NimplicitError
    W = _three_graphs(2)
    n = 6
    ring = onp.zeros((n, n))
    for i in range(n):                               # a ring: lam_2 = lam_3 (repeated)
        ring[i, (i + 1) % n] = ring[(i + 1) % n, i] = 1.0
    W = W[:, :n, :n].copy()
    W[0] = ring
    v, status = ncut_layer(W, throw=False, full_output=False)
    assert status.ok.tolist() == [False, True, True]
    assert status.codes[0] == Outcome.SINGULAR_JACOBIAN
    with pytest.raises(NimplicitError):
        ncut_layer(W, full_output=False)             # throw=True: the whole batch raises
