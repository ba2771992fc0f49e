"""Graph matching on hostile and extreme input (issue 11 items 5, 6, 7, 9; issue 12 item 4).

Every derivative is checked with ``verification.check_grad`` (finite differences
of the forward's actual output).  Affinities are ``M = s exp((X + X')/2)`` so
that the checker's directions stay symmetric and positive.
"""
import warnings

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import make_vjp

from nimplicit import spectral
from nimplicit.errors import NimplicitError, NonFiniteError
from reference_layers import graph_matching as gm
from verification import check_grad
from verification.strategies.graph_matching import (all_sums_constraints, positive_affinity,
                                                     random_affinity_input)


def sym_exp(X, s=1.0):
    return s * anp.exp(0.5 * (X + anp.swapaxes(X, -1, -2)))


# ------------------------------------------------------------------------------
# nimplicit.spectral: the one relative gap test
# ------------------------------------------------------------------------------

def test_relative_gap_is_scale_free_and_raises_typed_error():
    for s in (1e-150, 1.0, 1e150):
        assert spectral.relative_gap(3 * s, [1 * s], 3 * s) == pytest.approx(2 / 3)
        with pytest.raises(spectral.DegenerateEigenvalueError, match="not simple"):
            spectral.require_simple_eigenvalue(3 * s, [3 * s * (1 - 1e-12)], 3 * s)
    assert spectral.relative_gap(1.0, [], 1.0) == np.inf
    assert gm.DegenerateEigenvalueError is spectral.DegenerateEigenvalueError
    for bad in (np.nan, -1e-3, 1.0, "x"):
        with pytest.raises(ValueError, match="gap_tol"):
            spectral.check_gap_tol(bad)


# ------------------------------------------------------------------------------
# issue 11 item 5: no false degeneracy at extreme scales
# ------------------------------------------------------------------------------

LAYERS = {
    "sm": lambda M: gm.spectral_matching_layer(M),
    "sm-dense": lambda M: gm.spectral_matching_layer(M, solver_options={"eig_method": "dense"}),
    "sm-krylov-cg": lambda M: gm.spectral_matching_layer(
        M, solver_options={"eig_method": "krylov"}, dense_max=0),
    "smac": lambda M: gm.smac_layer(M),
    "smac-krylov-cg": lambda M: gm.smac_layer(M, solver_options={"eig_method": "krylov"},
                                              dense_max=0),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_scale_invariance_of_output_at_extreme_scales(name):
    rng = np.random.default_rng(0)
    M = positive_affinity(rng, 9)
    f = LAYERS[name]
    ref = f(M)
    for s in (1e-150, 1e-8, 1e5, 1e8, 1e150):
        np.testing.assert_allclose(f(s * M), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["sm", "sm-dense", "smac", "smac-krylov-cg"])
@pytest.mark.parametrize("s", [1e-150, 1e6, 1e150])
def test_gradient_at_extreme_scales_against_fd(name, s):
    rng = np.random.default_rng(1)
    X = random_affinity_input(rng, 9)
    f = LAYERS[name]
    assert check_grad(lambda X: f(sym_exp(X, s)), X, modes=("rev",), n_directions=2).passed


# ------------------------------------------------------------------------------
# issue 11 item 6: SMAC with rank-deficient constraints, deterministic sign with d = 0
# ------------------------------------------------------------------------------

def all_sums(n):
    """All n row sums and all n column sums of an n x n assignment: rank 2n - 1."""
    return all_sums_constraints(n, n)


@pytest.mark.parametrize("options", [{}, {"solver_options": {"eig_method": "krylov"},
                                          "dense_max": 0}])
def test_smac_accepts_the_standard_rank_deficient_one_to_one_constraints(options):
    rng = np.random.default_rng(2)
    n = 3
    C, d = all_sums(n)
    assert np.linalg.matrix_rank(C) == 2 * n - 1
    X = random_affinity_input(rng, n * n)
    x = gm.smac_layer(sym_exp(X), C, d, **options)
    np.testing.assert_allclose(C @ x, d, atol=1e-12)
    np.testing.assert_allclose(x, gm.smac_layer(sym_exp(X), **options), atol=1e-10)
    rep = check_grad(lambda X: gm.smac_layer(sym_exp(X), C, d, **options), X, modes=("rev",))
    assert rep.passed


def test_smac_rank_deficient_and_inconsistent_is_an_error():
    rng = np.random.default_rng(3)
    C, d = all_sums(3)
    d[-1] = 2.0
    with pytest.raises(gm.InfeasibleConstraintsError, match="inconsistent"):
        gm.smac_layer(positive_affinity(rng, 9), C, d)


def test_smac_sign_with_d_zero_is_deterministic_under_tiny_perturbations():
    # the sum constraint with d = 0 forces sum(y) = 0: the old rule sum(y) > 0 was decided
    # by rounding noise; the fallback (first entry with |y_i| >= max|y|/2 positive) is not
    rng = np.random.default_rng(4)
    N = 9
    M = positive_affinity(rng, N)
    C, d = np.ones((1, N)), np.zeros(1)
    y0 = gm.smac_layer(M, C, d)
    assert abs(y0.sum()) < 1e-12
    big = np.abs(y0) >= 0.5 * np.abs(y0).max()
    assert y0[np.argmax(big)] > 0
    for _ in range(200):
        E = 1e-12 * rng.standard_normal((N, N))
        y = gm.smac_layer(M + E + E.T, C, d)
        assert np.abs(y - y0).max() < 1e-9


# ------------------------------------------------------------------------------
# issue 11 items 7 and 9: typed errors on bad input and bad options
# ------------------------------------------------------------------------------

def _bad_inputs():
    M = positive_affinity(np.random.default_rng(5), 9)
    nan = M.copy()
    nan[2, 3] = nan[3, 2] = np.nan
    inf = M.copy()
    inf[0, 0] = np.inf
    S = np.random.default_rng(6).standard_normal((3, 4))
    return {
        "power NaN": (lambda: gm.power_iteration_layer(nan), NonFiniteError),
        "power Inf": (lambda: gm.power_iteration_layer(inf), NonFiniteError),
        "power complex": (lambda: gm.power_iteration_layer(M + 0j), ValueError),
        "power iterations": (lambda: gm.power_iteration_layer(M, iterations=0), ValueError),
        "sm complex": (lambda: gm.spectral_matching_layer(M * (1 + 1e-3j)), ValueError),
        "sm NaN": (lambda: gm.spectral_matching_layer(nan), NonFiniteError),
        "sm empty": (lambda: gm.spectral_matching_layer(np.zeros((0, 0))), ValueError),
        "sm object": (lambda: gm.spectral_matching_layer(M.astype(object)), ValueError),
        "smac complex M": (lambda: gm.smac_layer(M + 0j), ValueError),
        "smac complex C": (lambda: gm.smac_layer(M, np.ones((1, 9)) + 0j, np.ones(1)), ValueError),
        "smac NaN C": (lambda: gm.smac_layer(M, np.full((1, 9), np.nan), np.ones(1)),
                       NonFiniteError),
        "eig_method bogus": (lambda: gm.spectral_matching_layer(
            M, solver_options={"eig_method": "bogus"}), ValueError),
        "tol NaN": (lambda: gm.spectral_matching_layer(M, solver_options={"tol": np.nan}),
                    ValueError),
        "max_iter 0": (lambda: gm.smac_layer(M, solver_options={"max_iter": 0}), ValueError),
        "unknown option": (lambda: gm.smac_layer(M, solver_options={"eig_tol": 1e-8}), TypeError),
        "gap_tol NaN": (lambda: gm.spectral_matching_layer(M, gap_tol=np.nan), ValueError),
        "residual_tol NaN": (lambda: gm.smac_layer(M, residual_tol=np.nan), ValueError),
        "dense_max -1": (lambda: gm.spectral_matching_layer(M, dense_max=-1), ValueError),
        "backward bogus": (lambda: gm.spectral_matching_layer(M, backward="bogus"), ValueError),
        "structured + solver": (lambda: gm.spectral_matching_layer(
            M, backward="structured", linear_solver="minres"), ValueError),
        "smac shape": (lambda: gm.smac_layer(M, shape=(2, 4)), ValueError),
        "sinkhorn tau NaN": (lambda: gm.sinkhorn_layer(S, tau=np.nan), ValueError),
        "sinkhorn NaN": (lambda: gm.sinkhorn_layer(S * np.nan), NonFiniteError),
        "sinkhorn complex": (lambda: gm.sinkhorn_layer(S + 0j), ValueError),
        "sinkhorn option": (lambda: gm.sinkhorn_layer(S, solver_options={"bogus": 1}), TypeError),
        "sinkhorn structured": (lambda: gm.sinkhorn_layer(S, backward="structured"), ValueError),
        "sinkhorn marginals": (lambda: gm.sinkhorn_layer(S, row_marginals=[1, 1, np.nan]),
                               ValueError),
        "voting temperature NaN": (lambda: gm.voting_layer(S, temperature=np.nan), ValueError),
    }


@pytest.mark.parametrize("case", sorted(_bad_inputs()))
def test_bad_input_gets_a_typed_error(case):
    call, kind = _bad_inputs()[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no numpy ComplexWarning, no silent cast
        with pytest.raises(NimplicitError) as info:
            call()
    assert isinstance(info.value, kind)


# ------------------------------------------------------------------------------
# issue 12 item 4: the keyword convention and its deprecated aliases
# ------------------------------------------------------------------------------

def test_full_output_is_an_autograd_tuple_with_correct_derivatives():
    rng = np.random.default_rng(7)
    X = random_affinity_input(rng, 8)
    for fn in (lambda X: gm.spectral_matching_layer(sym_exp(X), full_output=True),
               lambda X: gm.smac_layer(sym_exp(X), shape=(2, 4), full_output=True),
               lambda X: gm.sinkhorn_layer(X[:3], full_output=True)):
        assert check_grad(fn, X, modes=("rev",)).passed
        vjp, out = make_vjp(fn)(X)
        assert isinstance(out, tuple)


def test_structured_backward_from_the_dense_eigenbasis_against_fd():
    rng = np.random.default_rng(8)
    X = random_affinity_input(rng, 9)
    Xb = np.stack([X, random_affinity_input(rng, 9)])
    opts = {"solver_options": {"eig_method": "dense"}}
    assert check_grad(lambda X: gm.spectral_matching_layer(sym_exp(X), full_output=True, **opts),
                      X).passed
    assert check_grad(lambda X: gm.spectral_matching_layer(sym_exp(X), **opts), Xb,
                      modes=("rev",)).passed
    assert check_grad(lambda X: gm.smac_layer(sym_exp(X), **opts), X).passed


@pytest.mark.parametrize("old, new", [
    ({"return_eigenvalue": True}, {"full_output": True}),
    ({"eig_method": "krylov", "eig_tol": 1e-9}, {"solver_options": {"eig_method": "krylov",
                                                                     "tol": 1e-9}}),
    ({"eig_dense_max": 0}, {"dense_max": 0}),
    ({"kkt_dense_max": 0}, {"dense_max": 0}),
    ({"linear_solver": "minres"}, {"backward": "generic", "linear_solver": "minres"}),
    ({"backward": "fast"}, {"backward": "structured"}),
])
def test_deprecated_keywords_warn_and_mean_the_new_ones(old, new):
    M = positive_affinity(np.random.default_rng(9), 9)
    with pytest.warns(DeprecationWarning) as record:
        a = gm.spectral_matching_layer(M, **old)
    named = [k for k in new if k in str(record[0].message)]
    assert named, f"the warning names the new keyword: {record[0].message}"
    b = gm.spectral_matching_layer(M, **new)
    np.testing.assert_allclose(np.concatenate([np.ravel(p) for p in np.atleast_1d(a)])
                               if not isinstance(a, tuple) else np.concatenate(
                                   [np.ravel(p) for p in a]),
                               np.concatenate([np.ravel(p) for p in b]) if isinstance(b, tuple)
                               else b, atol=1e-9)


def test_sinkhorn_deprecated_tol():
    S = np.random.default_rng(10).standard_normal((3, 3))
    with pytest.warns(DeprecationWarning, match="solver_options"):
        P = gm.sinkhorn_layer(S, tol=1e-12)
    np.testing.assert_allclose(P, gm.sinkhorn_layer(S, solver_options={"tol": 1e-12}))


@pytest.mark.parametrize("layer", ["sm", "smac"])
def test_deflated_cg_backward_agrees_with_the_eigenbasis_backward(layer):
    # Lanczos forward + CG deflated by its Ritz vectors vs dense eigh + eigenbasis solve,
    # also for a cotangent whose projected right-hand side is at rounding level (sum(x)
    # is fixed by the constraints, so <1, dx> = 0: the CG must stop at its noise floor)
    rng = np.random.default_rng(11)
    X = random_affinity_input(rng, 18)
    kw = {"shape": (3, 6)} if layer == "smac" else {}
    fn = gm.smac_layer if layer == "smac" else gm.spectral_matching_layer
    krylov = lambda X: fn(sym_exp(X), solver_options={"eig_method": "krylov"}, dense_max=0, **kw)
    dense = lambda X: fn(sym_exp(X), solver_options={"eig_method": "dense"}, **kw)
    for g in (rng.standard_normal(18), np.ones(18)):
        a = make_vjp(krylov)(X)[0](g)
        b = make_vjp(dense)(X)[0](g)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * max(1.0, np.abs(b).max()))
    assert check_grad(krylov, X, modes=("rev",)).passed


def test_smac_rectangular_all_sums_equals_the_reduced_constraints():
    rng = np.random.default_rng(12)
    C, d = all_sums_constraints(3, 5)
    assert np.linalg.matrix_rank(C) == 3 + 5 - 1
    M = positive_affinity(rng, 15)
    x = gm.smac_layer(M, C, d)
    np.testing.assert_allclose(x, gm.smac_layer(M, shape=(3, 5)), atol=1e-10)
    np.testing.assert_allclose(C @ x, d, atol=1e-12)
