"""The noise-aware checker (issue 10 item 7): no false alarms on correct layers with
noisy forwards, and their seeded mutants still caught."""
import warnings
import zlib

import numpy as onp
import pytest

from verification.check import check_grad
from verification.entries.noisy import NOISY_LAYERS
from verification.finite_differences import directional_derivative, estimate_noise
from verification.mutants import self_test
from verification.registry import get

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MUTANT_KINDS = ("scale", "sign", "drop")      # the ones issue 10 names


def hashed_noise(x, sigma: float) -> float:
    """Deterministic i.i.d. N(0, sigma^2) noise as a function of the exact point."""
    seed = zlib.crc32(onp.ascontiguousarray(x, dtype=float).tobytes())
    return sigma * float(onp.random.default_rng(seed).standard_normal())


# ------------------------------------------------------------------------------
# the estimator
# ------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1e-12, 1e-9, 1e-6])
def test_ecnoise_recovers_the_level_of_additive_noise(sigma):
    f = lambda x: onp.array([onp.sin(x).sum() + hashed_noise(x, sigma), onp.cos(x[0])])
    x = onp.array([0.3, -1.2, 2.0])
    est = estimate_noise(f, x, onp.array([1.0, 0.5, -0.2]))
    assert est.detected[0] and 0.2 * sigma <= est.noise[0] <= 5 * sigma
    assert est.noise[1] == 0.0            # a smooth output is rounding only


def test_noisy_function_does_not_collapse_the_step():
    """Noise 1e-9 on a smooth function: the error bar holds the truth and is small
    enough to resolve a 1e-4 relative error."""
    f = lambda x: onp.exp(x).sum() + hashed_noise(x, 1e-9)
    x, v = onp.array([0.1, 0.7]), onp.array([1.0, 0.5])
    truth = float(onp.exp(x) @ v)
    res = directional_derivative(f, x, v, noise="auto")
    assert abs(res.value - truth) <= res.error
    assert res.error <= 2.5e-5 * abs(truth)      # without the noise model: ~1e-3 or a collapse
    assert float(res.noise) > 1e-10 and 0 < float(res.noise_error) <= res.error


def test_kink_inside_the_stencil_gives_the_one_sided_slope():
    """A piecewise-linear f with a kink at distance 1e-6 (inside the base step):
    the slope on the kink-free side is returned, exactly, and marked."""
    f = lambda x: onp.array([onp.maximum(x[0] - 1e-6, 0.0) * 3.0 + 2.0 * x[0]])
    res = directional_derivative(f, onp.array([0.0]), onp.array([1.0]), noise="auto")
    assert bool(res.kinks[0])
    assert res.value[0] == pytest.approx(2.0, abs=1e-9)
    assert res.error[0] < 1e-6


def test_explicit_noise_still_overrides_the_estimate():
    f = lambda x: x ** 2
    rep = check_grad(f, onp.array([0.5, 1.5]), noise=1e-10)
    assert rep.passed
    assert all(r.worst_noise_error == 0.0 for r in rep.results)   # no ECnoise ran


def test_failure_message_says_when_noise_may_be_the_cause():
    """A forward with noise 1e-5 whose autograd derivative is off by 0.1: the gap
    is within ten times the noise part of the bound, and the message says so."""
    import autograd.numpy as anp
    from autograd.extend import defvjp, primitive

    @primitive
    def noisy(x):
        return onp.sin(x) + onp.array([hashed_noise(x, 1e-5) for _ in range(1)])

    defvjp(noisy, lambda ans, x: lambda g: g * (anp.cos(x) + 0.1))
    rep = check_grad(noisy, onp.array([0.4]), modes=("rev",))
    assert not rep.passed
    assert any(r.noise_suspect for r in rep.results)
    assert "noise, not the derivative, may be the cause" in rep.summary()


# ------------------------------------------------------------------------------
# the published noisy-forward set
# ------------------------------------------------------------------------------

def test_the_noisy_layers_are_registered():
    from verification.registry import load_all
    assert set(NOISY_LAYERS) <= set(load_all())


@pytest.mark.parametrize("name", NOISY_LAYERS)
def test_default_check_passes_the_noisy_layers(name):
    entry = get(name)
    for seed in range(2):
        inputs = entry.generate(onp.random.default_rng(seed), **entry.size)
        rep = check_grad(entry.fn, *inputs, seed=seed, order=entry.order)
        assert rep.passed, rep.summary()


def _sweep(names, cases):
    results = self_test(names, cases=cases, seed=0)
    total = dict(cases=0, false_alarms=0, caught=0, missed=0)
    for r in results:
        assert not r.errors, (r.layer, r.errors[:2])
        total["cases"] += r.cases
        total["false_alarms"] += len(r.false_alarms)
        total["caught"] += r.caught
        # the kinds issue 10 names; "perturb" (derivative at a moved y*) misses
        # 7 of 200 box cases, reported, not asserted
        total["missed"] += sum(r.mutants[f"{k}/{m}"].missed for k in MUTANT_KINDS
                               for m in ("rev", "fwd"))
        for kind in MUTANT_KINDS:
            for mode in ("rev", "fwd"):
                m = r.mutants[f"{kind}/{mode}"]
                # every case's mutant is caught, unless it is equivalent (it changes
                # nothing: the corrupted derivative block is zero on that instance,
                # e.g. sparsemax with a one-element support, a box bound never active)
                assert m.not_applicable == 0 and m.missed == 0, (r.layer, kind, mode, m.missed_cases)
                assert m.caught + m.equivalent == r.cases and m.caught > 0, (r.layer, kind, mode)
    return results, total


def test_small_sweep_of_the_noisy_layers():
    results, total = _sweep(["noisy-sparsemax", "noisy-krylov-gmres", "noisy-simplex-slsqp"], 2)
    assert total["false_alarms"] == 0 and total["missed"] == 0, total


@pytest.mark.slow
def test_200_cases_per_noisy_layer_zero_false_alarms_all_mutants_caught():
    results, total = _sweep(list(NOISY_LAYERS), 200)
    assert total["cases"] == 800
    assert total["false_alarms"] == 0 and total["missed"] == 0, (
        total, [(r.layer, r.false_alarms[:5]) for r in results])
