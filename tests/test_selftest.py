"""The mutation self-test: seeded faulty VJPs/JVPs are flagged, correct layers pass."""
import numpy as onp
import pytest

from verification.check import check_grad
from verification.mutants import KINDS, MODES, make_mutant, mutant_distance, self_test
from verification.registry import get


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_each_mutant_of_the_deq_is_caught_in_its_mode(kind, mode):
    entry = get("deq-tanh")
    inputs = entry.generate(onp.random.default_rng(11), **entry.size)
    mutant = make_mutant(entry.fn, inputs, kind, mode, seed=11)
    # same values as the layer
    assert onp.allclose(mutant(*inputs), entry.fn(*inputs), rtol=0, atol=0)
    assert mutant_distance(entry.fn, mutant, inputs, mode, [0, 1, 2], 11) > 1e-6
    cache = {}
    assert check_grad(entry.fn, *inputs, fd_cache=cache, seed=11).passed
    rep = check_grad(mutant, *inputs, modes=(mode,), fd_cache=cache, seed=11)
    assert not rep.passed
    if kind == "scale":
        assert rep.worst_rel(mode, 1) == pytest.approx(1e-4, rel=0.05)   # says by how much


def test_transpose_needs_an_input_with_a_square_block():
    entry = get("sphere-height")
    inputs = (onp.array([0.3, 0.2]), 1.5)
    assert make_mutant(entry.fn, inputs, "transpose", "rev") is None


def test_small_self_test_on_every_core_layer():
    names = ["sphere-height", "deq-tanh", "deq-tanh-gmres", "robust-pool",
             "simplex-projection", "deq-tanh-batched"]
    results = self_test(names, cases=1, seed=3)
    for r in results:
        assert r.passed, (r.layer, r.false_alarms, r.errors,
                          {k: m.missed_cases for k, m in r.mutants.items() if m.missed})
        assert r.caught >= 8


@pytest.mark.slow
def test_self_test_200_cases_per_registered_layer():
    results = self_test(cases=200)
    failed = [(r.layer, r.false_alarms[:5], r.errors[:2],
               {k: m.missed_cases[:5] for k, m in r.mutants.items() if m.missed})
              for r in results if not r.passed]
    assert not failed, failed
