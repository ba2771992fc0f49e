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
