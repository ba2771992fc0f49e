"""Graph-matching layers (reference_layers.graph_matching): SM, SMAC, power
iteration, Sinkhorn (unrolled and implicit), voting, Hungarian and the numba
affinity builders.

Every derivative is compared with central finite differences of the forward
solver's actual output.  Affinities are parameterized so that finite
differences stay inside the layers' domain (symmetric, non-negative):
``M(X) = exp((X + X') / 2)`` entrywise.
"""
import autograd.numpy as np
import numpy as onp
import pytest
from autograd import grad, hessian, make_jvp, make_vjp
from hypothesis import HealthCheck, given, settings

from conftest import assert_close, fd_directional, vdot
from nimplicit import record_points
from nimplicit.errors import (NimplicitError, NonFiniteError, ResidualError, ShapeError,
                              UnsupportedError)
from reference_layers import graph_matching as gm
from verification.strategies.graph_matching import (affinity_strategy, matching_instance,
                                                     positive_affinity, random_affinity_input)

RTOL = 1e-6


def sym_exp(X):
    return np.exp(0.5 * (X + np.swapaxes(X, -1, -2)))


def check_directional(f, x, rng, rtol=RTOL, h=1e-3, n_dirs=2):
    """Reverse and forward mode of scalar-or-array ``f`` at ``x`` against FD along
    random directions."""
    vjp, out = make_vjp(f)(x)
    for _ in range(n_dirs):
        v = rng.standard_normal(onp.shape(x))
        g = rng.standard_normal(onp.shape(out))
        fd = fd_directional(f, x, v, h)
        assert_close(vdot(vjp(g), v), vdot(g, fd), rtol, "vjp")
        assert_close(make_jvp(f)(x)(v)[1], fd, rtol, "jvp")


# ------------------------------------------------------------------------------
# affinity builders
# ------------------------------------------------------------------------------

def _builder_case(rng, n=5, m=4, k=3):
    E1, E2 = gm.full_edges(n), gm.full_edges(m)
    P1 = gm.edge_features(rng.standard_normal((n, 2)), E1)
    P2 = gm.edge_features(rng.standard_normal((m, 2)), E2)
    Kp = rng.uniform(0.1, 1.0, (n, m))
    w = rng.uniform(0.2, 1.5, k)
    return Kp, P1, P2, w, E1, E2


def test_gaussian_affinity_matches_kronecker_formula_and_is_symmetric():
    rng = onp.random.default_rng(0)
    Kp, P1, P2, w, E1, E2 = _builder_case(rng)
    M = gm.gaussian_affinity(Kp, P1, P2, w, E1, E2)
    ref = gm.gaussian_affinity_reference(Kp, P1, P2, w, E1, E2)
    assert M.shape == (20, 20)
    onp.testing.assert_allclose(M, ref, rtol=1e-14, atol=1e-15)
    onp.testing.assert_allclose(M, M.T, atol=1e-15)   # both edge directions: symmetric
    # one entry by hand: M[i m + a, j m + b] = exp(-sum w (p_e - p_f)^2), e = (i, j), f = (a, b)
    e, f = 3, 5
    (i, j), (a, b) = E1[e], E2[f]
    assert M[i * 4 + a, j * 4 + b] == pytest.approx(onp.exp(-onp.sum(w * (P1[e] - P2[f]) ** 2)))


@pytest.mark.parametrize("argnum", [0, 1, 2, 3])
def test_gaussian_affinity_numba_vjp_against_fd(argnum):
    rng = onp.random.default_rng(1)
    args = list(_builder_case(rng))
    G = rng.standard_normal((20, 20))

    def f(x):
        a = list(args)
        a[argnum] = x
        return np.sum(G * gm.gaussian_affinity(*a))
    x = args[argnum]
    v = rng.standard_normal(onp.shape(x))
    fd = fd_directional(f, x, v)
    assert_close(vdot(grad(f)(x), v), fd, RTOL, f"VJP, argument {argnum}")
    assert_close(make_jvp(f)(x)(v)[1], fd, RTOL, f"JVP, argument {argnum}")


def _parallel_vs_serial(monkeypatch, kernels_checked):
    from reference_layers.kernels import affinity as kern
    rng = onp.random.default_rng(20)
    Kp, P1, P2, w, E1, E2 = _builder_case(rng, n=6, m=5)
    G = rng.standard_normal((30, 30))
    f = lambda w, P1, P2: np.sum(G * gm.gaussian_affinity(Kp, P1, P2, w, E1, E2))
    serial = (gm.gaussian_affinity(Kp, P1, P2, w, E1, E2), grad(f, kernels_checked)(w, P1, P2))
    monkeypatch.setattr(kern, "PARALLEL_MIN_PAIRS", 0)
    parallel = (gm.gaussian_affinity(Kp, P1, P2, w, E1, E2), grad(f, kernels_checked)(w, P1, P2))
    onp.testing.assert_allclose(parallel[0], serial[0], rtol=1e-14)
    onp.testing.assert_allclose(parallel[1], serial[1], rtol=1e-12)


def test_parallel_builder_kernels_match_serial(monkeypatch):
    _parallel_vs_serial(monkeypatch, 0)


@pytest.mark.slow
@pytest.mark.parametrize("argnum", [1, 2])
def test_parallel_builder_vjp_kernels_match_serial(monkeypatch, argnum):
    _parallel_vs_serial(monkeypatch, argnum)


def test_gaussian_affinity_batched_and_first_order_only():
    rng = onp.random.default_rng(2)
    cases = [_builder_case(rng) for _ in range(3)]
    Kp = onp.stack([c[0] for c in cases])
    P1, P2 = onp.stack([c[1] for c in cases]), onp.stack([c[2] for c in cases])
    w, E1, E2 = cases[0][3], cases[0][4], cases[0][5]
    M = gm.gaussian_affinity(Kp, P1, P2, w, E1, E2)
    for b in range(3):
        onp.testing.assert_allclose(M[b], gm.gaussian_affinity(Kp[b], P1[b], P2[b], w, E1, E2))
    G = rng.standard_normal(M.shape)
    gw = grad(lambda w: np.sum(G * gm.gaussian_affinity(Kp, P1, P2, w, E1, E2)))(w)
    one = lambda w, b: np.sum(G[b] * gm.gaussian_affinity(Kp[b], P1[b], P2[b], w, E1, E2))
    expect = sum(grad(one)(w, b) for b in range(3))
    onp.testing.assert_allclose(gw, expect, rtol=1e-12)
    with pytest.raises(UnsupportedError, match="first order"):
        hessian(lambda w: np.sum(G[0] * gm.gaussian_affinity(Kp[0], P1[0], P2[0], w, E1, E2)))(w)


def test_affinity_builders_reject_mismatched_shapes():
    # the numba kernels do not bounds-check: these once read past the arrays (or dropped
    # batch instances) without an error
    rng = onp.random.default_rng(5)
    Kp, P1, P2, w, E1, E2 = _builder_case(rng)
    Kpb = onp.stack([Kp, Kp])
    Ke = rng.uniform(size=(len(E1), len(E2)))
    bad = {
        "P1": lambda: gm.gaussian_affinity(Kp, P1[:-2], P2, w, E1, E2),
        "P2": lambda: gm.gaussian_affinity(Kp, P1, P2[:, :-1], w, E1, E2),
        "w": lambda: gm.gaussian_affinity(Kp, P1, P2, w[:-1], E1, E2),
        "batched edge lists": lambda: gm.gaussian_affinity(
            Kpb, onp.stack([P1, P1]), onp.stack([P2, P2]), w, E1[None], E2),
        "Ke": lambda: gm.assemble_affinity(Kpb, Ke, E1, E2),
    }
    for name, call in bad.items():
        with pytest.raises(ShapeError, match=name):
            call()


def test_assemble_affinity_is_linear_with_adjoint_vjp_any_order():
    rng = onp.random.default_rng(3)
    Kp, P1, P2, w, E1, E2 = _builder_case(rng)
    Ke = rng.uniform(size=(len(E1), len(E2)))
    M = gm.assemble_affinity(Kp, Ke, E1, E2)
    # M is linear in (Kp, Ke): the gather is the exact adjoint
    G = rng.standard_normal(M.shape)
    dKp, dKe = rng.standard_normal(Kp.shape), rng.standard_normal(Ke.shape)
    lhs = onp.sum(G * gm.assemble_affinity(dKp, dKe, E1, E2))
    gKp = grad(lambda a: np.sum(G * gm.assemble_affinity(a, Ke, E1, E2)))(Kp)
    gKe = grad(lambda a: np.sum(G * gm.assemble_affinity(Kp, a, E1, E2)))(Ke)
    assert lhs == pytest.approx(vdot(gKp, dKp) + vdot(gKe, dKe), rel=1e-12)
    # a quadratic function of M has the Hessian of the linear map: second order through
    # the scatter/gather pair, against FD of the gradient
    f = lambda a: np.sum(gm.assemble_affinity(a, Ke, E1, E2) ** 2)
    v = rng.standard_normal(Kp.shape)
    hv = make_jvp(grad(f))(Kp)(v)[1]
    assert_close(hv, fd_directional(grad(f), Kp, v), RTOL, "Hessian-vector product")
    # the Kronecker formula for a generic Ke
    n, m = Kp.shape
    G1, H1 = onp.eye(n)[E1[:, 0]].T, onp.eye(n)[E1[:, 1]].T
    G2, H2 = onp.eye(m)[E2[:, 0]].T, onp.eye(m)[E2[:, 1]].T
    ref = onp.diag(Kp.ravel()) + onp.kron(G1, G2) @ onp.diag(Ke.ravel()) @ onp.kron(H1, H2).T
    onp.testing.assert_allclose(M, ref, atol=1e-14)


def test_node_affinity_and_edge_features():
    rng = onp.random.default_rng(4)
    F1, F2 = rng.standard_normal((3, 5)), rng.standard_normal((4, 5))
    W = rng.standard_normal((5, 2))
    Kp = gm.node_affinity(F1, F2, W)
    expect = onp.exp(-((F1 @ W)[:, None, :] - (F2 @ W)[None, :, :]) ** 2).prod(-1)
    onp.testing.assert_allclose(Kp, expect, rtol=1e-12)
    pts = onp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    P = gm.edge_features(pts, onp.array([[0, 1], [1, 0], [0, 2]]))
    onp.testing.assert_allclose(P[:, 0], onp.array([2.0, 2.0, 1.0]) / (5.0 / 3.0))
    onp.testing.assert_allclose(P[:, 1:], [[1, 0], [-1, 0], [0, 1]], atol=1e-15)


# ------------------------------------------------------------------------------
# spectral matching
# ------------------------------------------------------------------------------

def test_sm_forward_is_the_signed_leading_eigenvector():
    rng = onp.random.default_rng(5)
    M = positive_affinity(rng, 12)
    y, lam = gm.spectral_matching_layer(M, full_output=True)
    w, V = onp.linalg.eigh(M)
    assert lam == pytest.approx(w[-1], rel=1e-12)
    assert onp.linalg.norm(y) == pytest.approx(1.0)
    assert y.sum() > 0
    onp.testing.assert_allclose(y, V[:, -1] * onp.sign(V[:, -1].sum()), atol=1e-10)
    y_k = gm.spectral_matching_layer(M, solver_options={"eig_method": "krylov"})
    onp.testing.assert_allclose(y_k, y, atol=1e-9)
    y_loose, lam_loose = gm.spectral_matching_layer(M, solver_options={"eig_method": "krylov",
                                                                       "tol": 1e-7},
                                                    full_output=True)
    assert onp.abs(M @ y_loose - lam_loose * y_loose).max() <= 1e-7 * lam_loose
    # a looser eigen-solve than the layer's residual check allows is caught by the core
    with pytest.raises(ResidualError):
        gm.spectral_matching_layer(M, solver_options={"eig_method": "krylov", "tol": 1e-4})


@pytest.mark.parametrize("options", [
    {},                                              # dense eigh + bordered LU
    {"solver_options": {"eig_method": "krylov"}, "dense_max": 0},   # Lanczos + projected CG
    {"backward": "generic", "linear_solver": "minres"},                     # core MINRES: the bordered J is symmetric
    {"backward": "generic", "linear_solver": "lu"},                         # core LU formed by VJPs
])
def test_sm_derivatives_against_fd(options):
    rng = onp.random.default_rng(6)
    X = random_affinity_input(rng, 9)
    def f(X):   # (y, lam) as one vector
        y, lam = gm.spectral_matching_layer(sym_exp(X), full_output=True, **options)
        return np.concatenate([y, np.reshape(lam, (1,))])
    check_directional(f, X, rng)


def test_sm_second_order_against_fd_of_gradient():
    rng = onp.random.default_rng(7)
    X = random_affinity_input(rng, 6)
    c = rng.standard_normal(6)
    f = lambda X: np.dot(c, gm.spectral_matching_layer(sym_exp(X))) ** 2
    v = rng.standard_normal(X.shape)
    hv = make_jvp(grad(f))(X)(v)[1]
    assert_close(hv, fd_directional(grad(f), X, v), 1e-5, "SM Hessian-vector product")


def test_sm_batched_equals_per_instance():
    rng = onp.random.default_rng(8)
    X = onp.stack([random_affinity_input(rng, 8) for _ in range(3)])
    G = rng.standard_normal((3, 8))
    f = lambda X: np.sum(G * gm.spectral_matching_layer(sym_exp(X)))
    g = grad(f)(X)
    for b in range(3):
        fb = lambda Xb: np.dot(G[b], gm.spectral_matching_layer(sym_exp(Xb)))
        onp.testing.assert_allclose(g[b], grad(fb)(X[b]), rtol=1e-9, atol=1e-12)
    v = rng.standard_normal(X.shape)
    assert_close(vdot(g, v), fd_directional(f, X, v), RTOL, "batched SM")


def test_sm_large_uses_krylov_and_matches_fd():
    rng = onp.random.default_rng(9)
    n = 12   # nm = 144 > DENSE_MAX: Lanczos + projected CG
    inst = matching_instance(rng, n)
    M = inst["M"]
    assert M.shape[0] > gm.DENSE_MAX
    S = rng.uniform(size=M.shape)
    D = (S + S.T) * M                # a direction that keeps M symmetric and non-negative
    g = rng.standard_normal(M.shape[0])
    f = lambda M: np.dot(g, gm.spectral_matching_layer(M))
    assert_close(vdot(grad(f)(M), D), fd_directional(f, M, D, 1e-4), RTOL, "large SM")


# ------------------------------------------------------------------------------
# SMAC
# ------------------------------------------------------------------------------

def test_one_to_one_constraints_full_rank_and_feasible():
    for n, m in [(4, 4), (3, 5)]:
        C, d = gm.one_to_one_constraints(n, m)
        assert C.shape == (n + m - 1, n * m)
        assert onp.linalg.matrix_rank(C) == n + m - 1
        X = onp.full((n, m), 1.0 / m)
        onp.testing.assert_allclose(C @ X.ravel(), d)


def test_smac_forward_solves_the_constrained_ratio_problem():
    rng = onp.random.default_rng(10)
    n = 4
    M = positive_affinity(rng, n * n)
    x = gm.smac_layer(M)
    X = x.reshape(n, n)
    onp.testing.assert_allclose(X.sum(1), 1.0, atol=1e-12)
    onp.testing.assert_allclose(X.sum(0), 1.0, atol=1e-12)
    # x maximizes the ratio over C x = d: compare with the best over a null-space basis
    C, d = gm.one_to_one_constraints(n, n)
    x0 = onp.linalg.lstsq(C, d, rcond=None)[0]
    Z = onp.linalg.svd(C)[2][C.shape[0]:].T
    ratio = lambda z: (x0 + Z @ z) @ M @ (x0 + Z @ z) / ((x0 + Z @ z) @ (x0 + Z @ z))
    best = ratio(onp.linalg.lstsq(Z, x - x0, rcond=None)[0])
    assert best == pytest.approx(x @ M @ x / (x @ x), rel=1e-10)
    for _ in range(200):
        assert ratio(Z.T @ (x - x0) + 0.1 * rng.standard_normal(Z.shape[1])) <= best + 1e-12
    # eigen-route and the Krylov route agree
    onp.testing.assert_allclose(gm.smac_layer(M, solver_options={"eig_method": "krylov"}), x,
                                atol=1e-8)


@pytest.mark.parametrize("options", [{}, {"solver_options": {"eig_method": "krylov"},
                                          "dense_max": 0},
                                     {"backward": "generic", "linear_solver": "minres"}])
def test_smac_derivatives_against_fd(options):
    rng = onp.random.default_rng(11)
    X = random_affinity_input(rng, 9)
    f = lambda X: gm.smac_layer(sym_exp(X), **options)
    check_directional(f, X, rng)


def test_smac_gradient_in_constraints_against_fd():
    rng = onp.random.default_rng(12)
    N, p = 8, 3
    M = positive_affinity(rng, N)
    C = rng.uniform(0.5, 1.5, (p, N))
    d = rng.uniform(0.5, 1.5, p)
    g = rng.standard_normal(N)
    fC = lambda C: np.dot(g, gm.smac_layer(M, C, d))
    fd_ = lambda d: np.dot(g, gm.smac_layer(M, C, d))
    assert onp.abs(C @ gm.smac_layer(M, C, d) - d).max() < 1e-12
    for f, x in ((fC, C), (fd_, d)):
        v = rng.standard_normal(onp.shape(x))
        assert_close(vdot(grad(f)(x), v), fd_directional(f, x, v), RTOL, "SMAC in C, d")


# ------------------------------------------------------------------------------
# power iteration, Sinkhorn, voting, Hungarian
# ------------------------------------------------------------------------------

def test_power_iteration_converges_to_sm_and_is_differentiable():
    rng = onp.random.default_rng(13)
    X = random_affinity_input(rng, 8)
    M = sym_exp(X)
    onp.testing.assert_allclose(gm.power_iteration_layer(M, iterations=200),
                                gm.spectral_matching_layer(M), atol=1e-10)
    f = lambda X: gm.power_iteration_layer(sym_exp(X), iterations=5)
    check_directional(f, X, rng)
    Mb = onp.stack([M, M * 2])
    onp.testing.assert_allclose(gm.power_iteration_layer(Mb, 5)[1], gm.power_iteration_layer(M, 5))


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (2, 3, 4)])
def test_sinkhorn_implicit_equals_unrolled_and_has_marginals(shape):
    rng = onp.random.default_rng(14)
    S = rng.standard_normal(shape)
    P = gm.sinkhorn_layer(S, tau=0.7)
    n, m = shape[-2:]
    onp.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-10)
    onp.testing.assert_allclose(P.sum(-2), n / m, atol=1e-10)
    onp.testing.assert_allclose(gm.sinkhorn(S, iterations=500, tau=0.7), P, atol=1e-9)


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (2, 3, 3)])
def test_sinkhorn_implicit_derivatives_against_fd(shape):
    rng = onp.random.default_rng(15)
    S = rng.standard_normal(shape)
    check_directional(lambda S: gm.sinkhorn_layer(S, tau=0.8), S, rng)


def test_sinkhorn_unrolled_gradient_approaches_implicit():
    rng = onp.random.default_rng(16)
    S = rng.standard_normal((4, 4))
    G = rng.standard_normal((4, 4))
    g_imp = grad(lambda S: np.sum(G * gm.sinkhorn_layer(S)))(S)
    g_unr = grad(lambda S: np.sum(G * gm.sinkhorn(S, iterations=300)))(S)
    onp.testing.assert_allclose(g_unr, g_imp, atol=1e-8)


def test_voting_and_hungarian():
    X = onp.array([[0.1, 0.9, 0.0], [0.8, 0.7, 0.1], [0.0, 0.2, 0.3]])
    V = gm.voting_layer(X, temperature=0.1)
    onp.testing.assert_allclose(V.sum(1), 1.0)
    assert V[0].argmax() == 1
    P = gm.hungarian(X)
    onp.testing.assert_array_equal(P, [[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    assert gm.matching_accuracy(P, onp.eye(3)) == pytest.approx(1 / 3)
    assert gm.hungarian(onp.stack([X, X.T])).shape == (2, 3, 3)


# ------------------------------------------------------------------------------
# ill-posed input: typed errors and diagnostics
# ------------------------------------------------------------------------------

def test_sm_rejects_invalid_affinities():
    rng = onp.random.default_rng(17)
    M = positive_affinity(rng, 6)
    A = M.copy()
    A[0, 1] += 0.5
    with pytest.raises(gm.AffinityError, match="not symmetric"):
        gm.spectral_matching_layer(A)
    with pytest.raises(gm.AffinityError, match="negative"):
        gm.spectral_matching_layer(M - 2 * M.max())
    with pytest.raises(gm.AffinityError, match="all zero"):
        gm.spectral_matching_layer(onp.zeros((6, 6)))
    with pytest.raises(gm.AffinityError, match="square"):
        gm.spectral_matching_layer(onp.ones((6, 5)))
    with pytest.raises(NimplicitError, match="non-finite"):
        gm.spectral_matching_layer(M * onp.nan)


def test_sm_repeated_leading_eigenvalue_raises():
    block = onp.array([[1.0, 2.0], [2.0, 1.0]])
    M = onp.kron(onp.eye(2), block)          # two identical components: lam_1 = lam_2 = 3
    with pytest.raises(gm.DegenerateEigenvalueError, match="not simple"):
        gm.spectral_matching_layer(M)
    with pytest.raises(gm.DegenerateEigenvalueError, match="not simple"):
        gm.spectral_matching_layer(onp.stack([M + 1.0, M]))   # batch: instance 1 is degenerate


def test_smac_constraint_errors():
    rng = onp.random.default_rng(18)
    M = positive_affinity(rng, 9)
    C, d = gm.one_to_one_constraints(3, 3)
    full = onp.concatenate([C, onp.kron(onp.ones((1, 3)), onp.eye(3))[-1:]])  # redundant row back
    # rank-deficient but consistent (all row and all column sums): accepted, same output
    onp.testing.assert_allclose(gm.smac_layer(M, full, onp.concatenate([d, [1.0]])),
                                gm.smac_layer(M, C, d), atol=1e-12)
    with pytest.raises(gm.ConstraintRankError, match="no freedom"):
        gm.smac_layer(M, onp.eye(9), onp.ones(9))
    with pytest.raises(gm.InfeasibleConstraintsError, match="inconsistent"):
        gm.smac_layer(M, full, onp.concatenate([d, [2.0]]))
    # a single constraint orthogonal to the leading eigenvector: C y = 0, no maximizer on C y = d
    y = gm.spectral_matching_layer(M)
    c = rng.standard_normal(9)
    c -= (c @ y) * y
    with pytest.raises(gm.InfeasibleConstraintsError, match="not attained"):
        gm.smac_layer(M, c[None, :], onp.ones(1))
    with pytest.raises(Exception, match="not a square"):
        gm.smac_layer(positive_affinity(rng, 6))


def test_smac_non_finite_input_is_a_typed_error():
    # checked before the layer runs: an all-NaN M once passed as "all zero", a NaN in C
    # surfaced as numpy's LinAlgError from the rank check
    rng = onp.random.default_rng(21)
    M = positive_affinity(rng, 9)
    C, d = gm.one_to_one_constraints(3, 3)
    with pytest.raises(NonFiniteError, match="affinity"):
        gm.smac_layer(onp.full_like(M, onp.nan))
    C_nan = C.copy()
    C_nan[0, 0] = onp.nan
    with pytest.raises(NonFiniteError, match="constraints"):
        gm.smac_layer(M, C_nan, d)


def test_layers_declare_the_eigen_gap_diagnostic():
    rng = onp.random.default_rng(19)
    M = positive_affinity(rng, 9)
    with record_points() as points:
        gm.spectral_matching_layer(M)
        gm.smac_layer(M)
    gaps = [p.layer.diagnostics(p)["eigen_gap"] for p in points]
    w = onp.linalg.eigvalsh(M)
    assert gaps[0][0] == pytest.approx((w[-1] - w[-2]) / w[-1], rel=1e-10)
    assert gaps[0][1] and gaps[1][1]
    from verification.diagnose import diagnose
    report = diagnose(lambda M: gm.spectral_matching_layer(M), M)
    assert report.ok


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(affinity_strategy(max_batch=2, max_size=10))
def test_sm_property_residual_and_gradient(M):
    rng = onp.random.default_rng(0)
    y, lam = gm.spectral_matching_layer(M, full_output=True)
    My = onp.einsum("...ij,...j->...i", M, y)
    assert onp.abs(My - lam[..., None] * y).max() <= 1e-8 * onp.abs(M).max()
    S = rng.uniform(size=M.shape)
    D = (S + onp.swapaxes(S, -1, -2)) * M
    g = rng.standard_normal(y.shape)
    f = lambda M: np.sum(g * gm.spectral_matching_layer(M))
    # the directional derivative is a sum of terms of both signs that may nearly cancel:
    # compare against the FD's own error estimate plus a relative allowance of the
    # absolute size of the terms (|grad| . |D|), not of their (possibly tiny) sum
    from verification.finite_differences import directional_derivative
    gM = grad(f)(M)
    fd = directional_derivative(f, M, D)
    terms = float(onp.sum(onp.abs(gM) * onp.abs(D)))
    assert abs(vdot(gM, D) - float(fd.value)) <= 4 * float(fd.error) + 1e-7 * terms


def test_krylov_forward_detects_repeated_leading_eigenvalue_when_start_is_an_eigenvector():
    # M 1 is an eigenvector of this block-circulant M, so Lanczos stops after one step;
    # lam_2 must still be estimated (by deflation) and the repeated eigenvalue reported
    from scipy.linalg import circulant
    from reference_layers.graph_matching import DegenerateEigenvalueError
    B = circulant(onp.r_[2.0, 1.0, onp.zeros(57), 1.0])
    M = onp.kron(onp.eye(2), B)
    with pytest.raises(DegenerateEigenvalueError, match="not simple"):
        gm.spectral_matching_layer(M, solver_options={"eig_method": "krylov"})


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("N, tol, maxiter", [(30, 1e-13, 300), (120, 1e-10, 300), (120, 1e-13, 3),
                                             (1100, 1e-10, 300)])
def test_compiled_lanczos_takes_the_python_lanczos_steps(N, tol, maxiter, symmetric):
    # the dense forward runs the Lanczos loop compiled (BLAS dgemv, or dsymv on one triangle
    # of an exactly symmetric M; LAPACK dsyev for the Ritz test): same steps, same Ritz test,
    # same byproducts (the backward's deflation space) as the operator version, or None for both
    from reference_layers.matching import eigen
    rng = onp.random.default_rng(N)
    A = rng.uniform(size=(N, N))
    M = A + A.T
    assert onp.array_equal(M, M.T)
    w0 = M.sum(axis=1) / onp.sqrt(N)
    a = eigen._lanczos(lambda v: M @ v, onp.ones(N), tol, maxiter, w0=w0)
    b = eigen._lanczos_dense(M, onp.ones(N), tol, maxiter, w0=w0, symmetric=symmetric)
    if a is None:
        assert b is None
        return
    assert a[4] == b[4]
    onp.testing.assert_allclose(b[0], a[0], rtol=0, atol=1e-12)
    onp.testing.assert_allclose(b[1:4], a[1:4], rtol=1e-12)
    onp.testing.assert_allclose(b[5].W, a[5].W, rtol=0, atol=1e-10)
    onp.testing.assert_allclose(b[5].theta, a[5].theta, rtol=1e-10)
    assert abs(b[5].beta - a[5].beta) <= 1e-10 * abs(a[1])
    # and the residual the Ritz test promised
    assert onp.abs(M @ b[0] - b[1] * b[0]).max() <= 10 * tol * b[1]


def test_bordered_cg_that_does_not_converge_falls_back_to_the_exact_lu():
    """A projected CG that cannot converge (here: one iteration allowed) must not fail the
    backward below LU_FALLBACK_MAX unknowns: the balanced LU gives the exact solution."""
    from reference_layers.matching.bordered import BorderedSystem
    rng = onp.random.default_rng(0)
    N = 30
    A = rng.standard_normal((N, N))
    M = A + A.T
    w, V = onp.linalg.eigh(M)
    B = V[:, -1:]
    rhs = rng.standard_normal(N + 1)
    scale = float(onp.abs(M).sum(axis=1).max())
    exact = BorderedSystem(M, w[-1], B, mode="lu", scale=scale).solve(rhs, 1e-12, None)
    stalled = BorderedSystem(M, w[-1], B, mode="cg", scale=scale)
    x = stalled.solve(rhs, 1e-12, 1)
    assert stalled.mode == "lu"
    assert onp.allclose(x, exact, rtol=1e-12, atol=1e-12 * onp.abs(exact).max())


@pytest.mark.parametrize("N", [60, 1100])
def test_exact_symmetry_picks_the_one_triangle_product_with_the_same_result(N):
    # check_affinity reports exact symmetry; SM and SMAC then run their products on one
    # triangle (BLAS dsymv).  A matrix asymmetric within the accepted 1e-10 takes the full
    # product instead; both give the eigenvector to the forward's accuracy.
    from reference_layers.matching.validation import check_affinity
    rng = onp.random.default_rng(N)
    A = rng.uniform(size=(N, N))
    M = A + A.T
    (exact,) = check_affinity(M, batched=False)
    assert exact.symmetric
    onp.testing.assert_allclose(exact.row_sums, M.sum(axis=1), rtol=1e-13)
    E = rng.uniform(size=(N, N)) * 1e-13 * onp.abs(M).max()
    near = M + onp.triu(E, 1)
    (checked,) = check_affinity(near, batched=False)
    assert not checked.symmetric
    opts = {"eig_method": "krylov"}
    y, lam = gm.spectral_matching_layer(M, solver_options=opts, full_output=True)
    y2, lam2 = gm.spectral_matching_layer(near, solver_options=opts, full_output=True)
    assert onp.abs(M @ y - lam * y).max() <= 1e-9 * lam
    assert onp.abs(near @ y2 - lam2 * y2).max() <= 1e-9 * lam2
    assert onp.abs(y - y2).max() <= 1e-9
    C = onp.ones((1, N))            # SMAC on sum(x) = 1 (Krylov forward above dense_max)
    x = gm.smac_layer(M, C, onp.ones(1))
    x2 = gm.smac_layer(near, C, onp.ones(1))
    assert abs(x.sum() - 1) <= 1e-12
    assert onp.abs(x - x2).max() <= 1e-9 * onp.abs(x).max()


def test_symmetry_certificate_of_the_streamed_validation_pass():
    # affinity_scan's integer certificate: an exactly symmetric M is always accepted; each
    # kind of asymmetry (one ulp, a factor 2 = exponent bits only, a sign flip = the sign
    # bit only, two of them in one row) is refused (probability of a miss <= 2**-32 each)
    from reference_layers.kernels.affinity import affinity_scan, affinity_stats
    rng = onp.random.default_rng(3)
    N = 40
    A = rng.uniform(size=(N, N))
    M = A + A.T

    def scan(M):
        words = rng.integers(0, 2 ** 32, (2, N), dtype=onp.uint64)
        return affinity_scan(M, M.view(onp.uint64), words[0], words[1])

    for _ in range(5):
        bad, rows, certified, signed = scan(M)
        assert (bad, certified, signed) == (0, True, False)
        onp.testing.assert_allclose(rows, M.sum(axis=1), rtol=1e-14)
    changes = [lambda v: onp.nextafter(v, 2.0), lambda v: 2.0 * v, lambda v: -v]
    for change in changes:
        for pairs in ([(3, 7)], [(3, 7), (3, 9)], [(5, 1), (8, 2), (8, 30)]):
            B = M.copy()
            for i, j in pairs:
                B[i, j] = change(B[i, j])
            assert not scan(B)[2]
            assert affinity_stats(B)[1] > 0
    Z = M.copy()
    Z[0, 1], Z[1, 0] = -0.0, 0.0         # equal values, different bits: refused, then measured
    bad, rows, certified, signed = scan(Z)
    assert not certified and signed and affinity_stats(Z)[1] == 0.0
    N = 3                                # a NaN is counted
    Q = onp.ones((3, 3))
    Q[1, 2] = Q[2, 1] = onp.nan
    assert scan(Q)[0] == 2


def test_check_affinity_fast_and_measured_paths_keep_the_contract():
    # the fast path (certified, no sign bit) and the measured one (tiled affinity_stats)
    # give the same verdicts and typed errors as before
    from reference_layers.matching.validation import check_affinity
    rng = onp.random.default_rng(4)
    A = rng.uniform(size=(30, 30))
    M = A + A.T
    (c,) = check_affinity(M, batched=False)
    assert c.symmetric
    Z = M.copy()
    Z[0, 1], Z[1, 0] = -0.0, 0.0         # measured path: exactly symmetric in value
    (c,) = check_affinity(Z, batched=False)
    assert c.symmetric
    near = M.copy()
    near[2, 5] = onp.nextafter(near[2, 5], 2.0)   # within 1e-10: accepted, not exact
    (c,) = check_affinity(near, batched=False)
    assert not c.symmetric
    onp.testing.assert_allclose(c.row_sums, near.sum(axis=1), rtol=1e-14)
    far = M.copy()
    far[2, 5] *= 1.0 + 1e-8
    with pytest.raises(gm.AffinityError, match="not symmetric"):
        check_affinity(far, batched=False)
    neg = M.copy()
    neg[4, 6] = neg[6, 4] = -0.5         # exactly symmetric but negative
    with pytest.raises(gm.AffinityError, match="negative"):
        check_affinity(neg, batched=False)
    (c,) = check_affinity(neg, batched=False, allow_negative=True)
    assert c.symmetric
    with pytest.raises(gm.AffinityError, match="all zero"):
        check_affinity(onp.zeros((5, 5)), batched=False)
    with pytest.raises(gm.AffinityError, match="all zero"):
        check_affinity(-onp.zeros((5, 5)), batched=False)   # -0.0: the measured path
    bad = M.copy()
    bad[3, 3] = onp.inf
    with pytest.raises(NonFiniteError):
        check_affinity(bad, batched=False)
    with pytest.raises(NonFiniteError, match="batch instance 1"):
        check_affinity(onp.stack([M, bad]), batched=True)


def test_one_triangle_residual_product_keeps_first_and_second_derivatives(monkeypatch):
    # the residual's M y reads one triangle of an exactly symmetric M (_sym_matvec, an
    # autograd primitive); its derivatives must be those of M @ y on all square matrices:
    # a non-symmetric direction W gives the same JVP, VJP and Hessian-vector product as
    # the plain anp.dot residual, and the symmetric one matches finite differences
    import reference_layers.matching.spectral as sp
    rng = onp.random.default_rng(5)
    N = 12
    A = rng.uniform(size=(N, N))
    M = A + A.T
    c = rng.standard_normal(N)
    f = lambda M: np.dot(c, gm.spectral_matching_layer(M))
    V = rng.standard_normal((N, N))
    V = V + V.T
    W = rng.standard_normal((N, N))
    calls = []
    product = sp.product
    monkeypatch.setattr(sp, "product", lambda M, s: calls.append(1) or product(M, s))
    ours = [make_jvp(f)(M)(W)[1], grad(f)(M), make_jvp(grad(f))(M)(W)[1],
            make_jvp(grad(f))(M)(V)[1]]
    assert calls
    monkeypatch.setattr(sp, "_sm_residual_on", lambda M, symmetric: sp._sm_residual)
    plain = [make_jvp(f)(M)(W)[1], grad(f)(M), make_jvp(grad(f))(M)(W)[1],
             make_jvp(grad(f))(M)(V)[1]]
    for a, b in zip(ours, plain):
        assert_close(a, b, 1e-9, "one-triangle residual vs anp.dot")
    e = 1e-5
    fd = (grad(f)(M + e * V) - grad(f)(M - e * V)) / (2 * e)
    assert_close(ours[3], fd, 1e-6, "Hessian-vector product vs FD")


def test_smac_one_triangle_residual_product_keeps_the_derivatives(monkeypatch):
    # SMAC's residual uses the same one-triangle product; JVP and VJP equal the anp.dot
    # residual's
    import reference_layers.matching.smac as smac_module
    rng = onp.random.default_rng(6)
    N = 16
    A = rng.uniform(size=(N, N))
    M = A + A.T
    C = onp.ones((1, N))
    c = rng.standard_normal(N)
    f = lambda M: np.dot(c, gm.smac_layer(M, C, onp.ones(1)))
    W = rng.standard_normal((N, N))
    ours = [make_jvp(f)(M)(W)[1], grad(f)(M)]
    monkeypatch.setattr(smac_module, "_smac_residual_on",
                        lambda M, symmetric: smac_module._smac_residual)
    plain = [make_jvp(f)(M)(W)[1], grad(f)(M)]
    for a, b in zip(ours, plain):
        assert_close(a, b, 1e-9, "SMAC one-triangle residual vs anp.dot")


def test_cotangent_of_m_by_dger_is_np_outer():
    # the one-triangle product's cotangent of M is written by BLAS dger into zeros: the
    # same values as np.outer, oriented (g.size, y.size) and C-contiguous; other dtypes and
    # a boxed cotangent (second order, covered above) take anp.outer
    from reference_layers.matching.spectral import _outer
    rng = onp.random.default_rng(8)
    g, y = rng.standard_normal(5), rng.standard_normal(7)
    g[1], y[3] = 0.0, -0.0
    G = _outer(g, y)
    assert G.shape == (5, 7) and G.dtype == onp.float64 and G.flags.c_contiguous
    assert onp.array_equal(G, onp.outer(g, y))
    g32 = g.astype(onp.float32)
    G32 = _outer(g32, y.astype(onp.float32))
    assert G32.dtype == onp.float32 and onp.array_equal(G32, onp.outer(g32, y.astype(onp.float32)))
    assert onp.array_equal(_outer(g[:, None], y), onp.outer(g[:, None], y))
