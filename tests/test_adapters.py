"""Adapters (torch, JAX; skipped when the framework is absent) and the pytest helper."""
import autograd.numpy as anp
import numpy as np
import pytest

from verification import oracle
from verification.registry import get
from verification.testing import assert_matches_oracle


def _layer(x, W):
    return anp.tanh(anp.dot(W, x)), anp.sum(x ** 2)


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    instances = [(rng.standard_normal(3), rng.standard_normal((2, 3))) for _ in range(2)]
    path = str(tmp_path_factory.mktemp("adapters") / "user.npz")
    oracle.export_function(_layer, instances, path, name="tanh-user")
    return path


def test_assert_matches_oracle_passes_and_fails_with_the_report(user_file):
    good = oracle.AutogradWrapper(_layer, [0, 1])
    rep = assert_matches_oracle(user_file, good)
    assert rep.passed
    bad = lambda inputs, cot: tuple(1.001 * g for g in good.vjp(inputs, cot))
    with pytest.raises(AssertionError, match="VJP input"):
        assert_matches_oracle(user_file, good, vjp=bad)


def test_unknown_framework_is_a_typed_error(user_file):
    from verification.adapters import AdapterError
    with pytest.raises(AdapterError, match="torch' or 'jax"):
        oracle.compare(user_file, _layer, framework="tensorflow")


def test_torch_adapter(user_file):
    torch = pytest.importorskip("torch")

    def layer(x, W):
        return torch.tanh(W @ x), (x ** 2).sum()
    rep = assert_matches_oracle(user_file, layer, framework="torch")
    assert all(c.jvp_source == "jvp" for c in rep.cases)
    wrong = lambda x, W: (torch.tanh(W @ x), (x ** 2).sum() * 1.0001)
    with pytest.raises(AssertionError):
        assert_matches_oracle(user_file, wrong, framework="torch")


def test_torch_peer_without_forward_mode_is_checked_through_its_vjps(user_file):
    torch = pytest.importorskip("torch")

    class NoForward(torch.autograd.Function):      # like qpth / cvxpylayers: no jvp
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    def layer(x, W):
        x = NoForward.apply(x)
        return torch.tanh(W @ x), (x ** 2).sum()
    rep = assert_matches_oracle(user_file, layer, framework="torch")
    assert all(c.jvp_source == "adjoint identity" for c in rep.cases)


def test_jax_adapter(user_file):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def layer(x, W):
        return jnp.tanh(W @ x), jnp.sum(x ** 2)
    rep = assert_matches_oracle(user_file, layer, framework="jax")
    assert rep.passed and all(c.jvp_source == "jvp" for c in rep.cases)


def test_registered_layer_through_the_protocol(tmp_path):
    path = str(tmp_path / "deq.npz")
    h = oracle.export("deq-tanh", path, cases=1)
    assert_matches_oracle(path, oracle.AutogradWrapper(get("deq-tanh").fn, h["argnums"]))


def test_selected_inputs_helper_substitutes_argnums_and_tuples_lists():
    """The one argnums selection both adapters differentiate through."""
    from verification.adapters import _of_selected
    f = _of_selected(lambda a, b, c: [a, b * c], [1.0, 2.0, 3.0], [0, 2])
    assert f(10.0, 30.0) == (10.0, 60.0)


def test_missing_framework_is_a_typed_error_naming_it():
    from verification.adapters import AdapterError, _import
    with pytest.raises(AdapterError, match="no_such_framework_module"):
        _import("torch", "no_such_framework_module")
