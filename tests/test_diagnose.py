"""diagnose(): residual, conditioning of J_F,y and the layers' declared measures;
ill-posed instances raise a typed error or are flagged, never a silent NaN."""
import warnings

import autograd.numpy as np
import numpy as onp
import pytest
from autograd import make_vjp
from hypothesis import HealthCheck, given, settings

from nimplicit import implicit_layer
from nimplicit.errors import ImplicitGradientWarning, NimplicitError, SolverError
from verification import diagnose
from verification.entries import core
from verification.strategies import core as strategies


def test_well_posed_deq_is_ok_and_reports_its_measures():
    x, W, b = core.deq_generate(onp.random.default_rng(0))
    d = diagnose(core.deq_tanh, x, W, b)
    assert d.ok, d
    (p,) = d.points
    assert p.m == p.r == 5 and p.method == "dense SVD"
    assert 1.0 <= p.condition < 10 and p.residual < 1e-12
    value, ok, _ = p.measures["contraction"]
    assert ok and 0 < value < 1
    assert "OK" in str(d)


def test_ill_conditioned_instance_is_flagged_with_the_reason():
    # y = 0 is the fixed point; J = W - I = diag(-0.5, -1e-10): cond 5e9, yet contractive
    W = onp.diag([0.5, 1.0 - 1e-10])
    d = diagnose(core.deq_tanh, onp.zeros(2), W, onp.zeros(2))
    assert not d.ok
    (flag,) = d.flags
    assert "ill-conditioned" in flag and "cond" in flag
    assert d.points[0].condition == pytest.approx(5e9, rel=1e-3)
    assert d.points[0].sigma_min == pytest.approx(1e-10, rel=1e-3)


def test_singular_instance_is_flagged_and_its_gradient_raises():
    W = onp.eye(3)                      # J = W - I = 0 at y = 0
    args = (onp.zeros(3), W, onp.zeros(3))
    d = diagnose(core.deq_tanh, *args)
    assert not d.ok
    assert any("singular" in f for f in d.flags)
    assert any("contraction" in f for f in d.flags)
    with pytest.raises(NimplicitError):
        make_vjp(lambda x: core.deq_tanh(x, W, onp.zeros(3)))(onp.zeros(3))[0](onp.ones(3))


def test_residual_not_met_is_flagged():
    layer = implicit_layer(lambda y, x: y ** 3 - x, lambda x: onp.cbrt(x) + 1e-3, check_residual=False)
    d = diagnose(layer, onp.array([1.0, 8.0]))
    assert any("residual" in f for f in d.flags)


def test_a_failing_layer_is_reported_not_raised():
    d = diagnose(core.circle, onp.array([3.0, 0.0]), 1.0)          # |x| > r: no solution
    assert not d.ok and isinstance(d.error, SolverError)
    assert "SolverError" in d.flags[0]


def test_nothing_to_diagnose_in_an_explicit_function():
    d = diagnose(np.sin, onp.ones(3))
    assert d.ok and d.points == [] and "no implicit layer" in d.notes[0]


def test_matrix_free_estimate_matches_the_dense_svd():
    x, W, b = core.deq_generate(onp.random.default_rng(3), n=8, contraction=0.9)
    dense = diagnose(core.deq_tanh, x, W, b).points[0]
    est = diagnose(core.deq_tanh, x, W, b, dense_max=4).points[0]
    assert est.method.startswith("svds")
    assert est.condition == pytest.approx(dense.condition, rel=1e-6)


def test_composition_of_layers_diagnoses_every_point():
    x, W, b = core.deq_generate(onp.random.default_rng(1))

    def two_layers(x):
        y = core.deq_tanh(x, W, b)
        return core.simplex_projection(y)
    d = diagnose(two_layers, x)
    assert len(d.points) == 2 and d.to_dict()["points"][1]["measures"]


@pytest.mark.parametrize("name", sorted(strategies.ILL_POSED))
def test_ill_posed_instances_raise_a_typed_error_or_are_flagged(name):
    @settings(max_examples=5, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategies.ill_posed(name))
    def run(drawn):
        entry, inputs = drawn
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImplicitGradientWarning)
            try:
                out = entry.fn(*inputs)
                parts = out if isinstance(out, tuple) else (out,)
                assert all(onp.all(onp.isfinite(p)) for p in parts), "silent NaN in the output"
                vjp = make_vjp(lambda x0: entry.fn(x0, *inputs[1:]))(inputs[0])[0]
                g = vjp(tuple(onp.ones_like(p) for p in parts) if isinstance(out, tuple)
                        else onp.ones_like(out))
                finite_gradient = bool(onp.all(onp.isfinite(g)))
            except NimplicitError:
                return                     # a typed error: fine
            d = diagnose(entry.fn, *inputs)
        assert not d.ok, f"{name}: ill-posed instance neither raised nor was flagged\n{d}"
        assert finite_gradient or not d.ok
    run()


# ------------------------------------------------------------------------------
# item 8: the a-posteriori error bar of the implicit gradient
# ------------------------------------------------------------------------------

def _picard(tol):
    """The tanh equilibrium by Picard iteration stopped at max|T(y) - y| <= tol:
    a deliberately inaccurate forward when tol is large."""
    def solve(x, W, b):
        y = onp.zeros_like(x)
        for _ in range(10000):
            t = onp.tanh(W @ y + x + b)
            if onp.abs(t - y).max() <= tol:
                return t
            y = t
        raise SolverError("Picard did not converge")
    return solve


def _inaccurate_deq(tol):
    from nimplicit import fixed_point_layer
    return fixed_point_layer(core.tanh_map, solver=_picard(tol), linear_solver="lu",
                             name=f"deq-picard-{tol:g}")


def _ift_gradient(layer, inputs, u):
    """d<u, y>/d(x, W, b) through the layer (the IFT gradient at its forward's y)."""
    vjp = make_vjp(lambda *a: layer(*a), argnum=(0, 1, 2))(*inputs)[0]
    return onp.concatenate([onp.ravel(g) for g in vjp(u)])


@pytest.mark.parametrize("tol", [1e-5, 1e-8])
def test_error_bar_predicts_the_gradient_error_of_an_inaccurate_forward(tol):
    inputs = core.deq_generate(onp.random.default_rng(4), n=6, contraction=0.9)
    sloppy, exact = _inaccurate_deq(tol), core.deq_tanh
    d = diagnose(sloppy, *inputs)
    (p,) = d.points
    bar = p.error_bar
    assert bar is not None and bar.forward_error <= bar.forward_bound * 1.01
    # the actual error of the IFT gradient at the sloppy y, against the exact one
    u = onp.random.default_rng(0).standard_normal(6)      # the cotangent the bar uses (seed 0)
    g_sloppy, g_exact = _ift_gradient(sloppy, inputs, u), _ift_gradient(exact, inputs, u)
    actual = onp.linalg.norm(g_sloppy - g_exact) / onp.linalg.norm(g_exact)
    assert actual > 100 * bar.rounding                    # the forward's error dominates
    assert actual / 3 <= bar.relative <= 3 * actual, (actual, bar)
    assert d.explains(0.5 * actual) and not d.explains(1e3 * actual)
    assert "gradient error bar" in d.summary()


def test_error_bar_of_an_accurate_forward_is_rounding():
    inputs = core.deq_generate(onp.random.default_rng(4))
    (p,) = diagnose(core.deq_tanh, *inputs).points
    assert p.error_bar.relative < 1e-13


def test_check_report_says_whether_the_forward_explains_a_gap():
    from verification.check import check_grad
    from verification.mutants import make_mutant
    inputs = core.deq_generate(onp.random.default_rng(4), n=6, contraction=0.9)
    layer = _inaccurate_deq(1e-7)
    rep = check_grad(layer, *inputs)
    assert rep.forward_error > 1e-10
    assert "forward solution error" in rep.summary()
    # a real fault (VJP scaled by 1 + 1e-4) is far outside that bar: flagged, not explained
    mutant = make_mutant(layer, inputs, "scale", "rev", seed=0)
    bad = check_grad(mutant, *inputs, modes=("rev",))
    assert not bad.passed and "is NOT explained by it" in bad.summary()
