"""check_grad on functions with known-correct and known-wrong derivatives, and on
every well-posed instance the core's hypothesis strategies draw."""
import autograd.numpy as np
import numpy as onp
import pytest
from autograd.extend import defjvp, defvjp, primitive
from autograd.tracer import getval
from hypothesis import HealthCheck, given, settings

from verification import GradientMismatch, check_grad
from verification.strategies import core as strategies


def smooth(x, W, c):
    """Tuple output, matrix / vector / float inputs."""
    return np.tanh(np.dot(W, x)) * c, np.sum(x ** 3) + c ** 2


def _inputs(seed=0, n=12):
    rng = onp.random.default_rng(seed)
    return rng.standard_normal(n), rng.standard_normal((3, n)), 2.5


def test_correct_function_passes_all_modes_and_orders():
    rep = check_grad(smooth, *_inputs(), order=2)
    assert rep.passed, rep
    # one result per input, mode and order
    assert {(r.input, r.mode, r.order) for r in rep.results} == \
        {(i, m, o) for i in range(3) for m in ("rev", "fwd") for o in (1, 2)}
    for r in rep.results:
        assert r.max_rel_error < 1e-7 and r.fd_error < 1e-5
    assert rep.n_evals > 0 and "PASS" in str(rep)


def test_small_inputs_get_the_full_jacobian_and_large_ones_directions():
    rep = check_grad(smooth, *_inputs(n=4))
    kinds = {(r.input, r.mode): r.kind for r in rep.results}
    assert kinds[(0, "fwd")] == "jacobian" and kinds[(0, "rev")] == "jacobian"   # x: 4 entries
    assert kinds[(1, "fwd")] == "jvp" and kinds[(1, "rev")] == "dot"             # W: 12 entries
    assert kinds[(2, "rev")] == "jacobian"                                       # float c


@pytest.mark.parametrize("x", [0.7, onp.array(0.7), onp.linspace(0.1, 1.0, 3).reshape(3, 1)],
                         ids=["float", "0-d", "n-d"])
def test_input_kinds(x):
    assert check_grad(lambda t: np.sin(t) * t, x, order=2).passed


def test_badly_scaled_inputs_are_probed_at_their_own_size():
    # entries of size 1e-6 and 1e6: a common absolute step would destroy one of them
    f = lambda x: np.sin(x * onp.array([1e6, 1e-6, 1.0]))
    assert check_grad(f, onp.array([1e-6, 1e6, 0.3]), order=2).passed
    g = lambda x: np.sum(np.sin(x * onp.logspace(-6, 6, 20)))
    assert check_grad(g, onp.logspace(6, -6, 20), order=2).passed


def _wrong_primitive(vjp_factor=1.0, jvp_factor=1.0):
    @primitive
    def f(x):
        return np.sin(x)
    defvjp(f, lambda ans, x: lambda g: g * np.cos(x) * vjp_factor)
    defjvp(f, lambda g, ans, x: g * np.cos(x) * jvp_factor)
    return f


@pytest.mark.parametrize("n", [5, 20], ids=["full-jacobian", "directional"])
def test_vjp_scaled_by_1e_minus_4_is_caught_and_measured(n):
    f = _wrong_primitive(vjp_factor=1 + 1e-4)
    rep = check_grad(f, onp.linspace(0.1, 1.0, n))
    rev, fwd = rep.select(mode="rev")[0], rep.select(mode="fwd")[0]
    assert not rev.passed and fwd.passed
    assert 0.9e-4 < rev.max_rel_error < 1.1e-4          # says by how much
    assert rev.fd_error < 1e-6                           # FD error far below 1e-4
    assert rev.worst_ad != rev.worst_fd


def test_wrong_jvp_is_caught_and_raise_on_fail():
    f = _wrong_primitive(jvp_factor=-1.0)
    with pytest.raises(GradientMismatch) as info:
        check_grad(f, onp.linspace(0.1, 1.0, 6), raise_on_fail=True)
    rep = info.value.report
    assert [r.mode for r in rep.failures()] == ["fwd"]
    assert "JVP" in str(info.value)


@pytest.mark.filterwarnings("ignore:Output seems independent of input")
def test_wrong_second_derivative_is_caught_at_order_2_only():
    @primitive
    def f(x):
        return np.sin(x)
    # the VJP drops the dependence of cos(x) on x: first order right, second order wrong
    defvjp(f, lambda ans, x: lambda g: g * onp.cos(getval(x)))
    defjvp(f, lambda g, ans, x: g * np.cos(x))
    x = onp.linspace(0.1, 1.0, 4)
    assert check_grad(f, x, order=1).passed
    rep = check_grad(f, x, order=2)
    assert not rep.passed
    assert {r.order for r in rep.failures()} == {2}
    assert any(r.mode == "rev" for r in rep.failures())


def test_explicit_tolerances_and_validation():
    f = _wrong_primitive(vjp_factor=1 + 1e-4)
    x = onp.linspace(0.1, 1.0, 5)
    assert check_grad(f, x, rtol=1e-3).passed            # explicit tolerance wide enough
    assert not check_grad(f, x, rtol=1e-6).passed
    with pytest.raises(ValueError):
        check_grad(np.sin, x, modes=("backward",))
    with pytest.raises(ValueError):
        check_grad(lambda k: onp.ones(2) * k, 3)          # an int: nothing to differentiate


def test_fd_cache_is_shared_between_checks_of_equal_forward_values():
    cache = {}
    x = _inputs()
    first = check_grad(smooth, *x, fd_cache=cache)
    second = check_grad(smooth, *x, fd_cache=cache)
    assert first.n_evals > 0 and second.n_evals == 0
    assert first.passed and second.passed


def test_zero_hessian_of_piecewise_linear_map_is_reported_as_unresolvable():
    from verification.registry import get
    entry = get("simplex-projection")
    inputs = entry.generate(onp.random.default_rng(0), **entry.size)
    rep = check_grad(entry.fn, *inputs, order=2)
    assert rep.passed, rep
    assert all(not r.resolvable for r in rep.select(order=2))
    assert rep.worst_rel(order=2) == 0.0


@pytest.mark.parametrize("name", sorted(strategies.WELL_POSED))
def test_every_well_posed_instance_passes(name):
    @settings(max_examples=3, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategies.well_posed(name))
    def run(drawn):
        entry, inputs = drawn
        rep = check_grad(entry.fn, *inputs, order=entry.order, seed=1, n_directions=1)
        assert rep.passed, f"{name} {[onp.shape(x) for x in inputs]}\n{rep}"
    run()


# --- typed errors for hostile input (fuzz fixes) ---
import pytest as _pytest
from nimplicit.errors import DTypeError as _DTypeError, NonFiniteError as _NonFinite, OptionError as _OptionError
from verification.check import check_grad as _cg


@_pytest.mark.parametrize("opts", [{"modes": ("bogus",)}, {"order": 3}, {"n_directions": 0},
                                   {"argnums": (5,)}, {"rtol": float("nan")}, {"noise": float("nan")},
                                   {"full_jacobian_max": -1}, {"fd_step": -1e-3}])
def test_bad_options_raise_option_error(opts):
    with _pytest.raises(_OptionError):
        _cg(lambda x: x ** 2, [1.0 + _np_ones()], **opts)


def _np_ones():
    import numpy
    return numpy.ones(3)


def test_nan_input_and_output_raise_non_finite():
    with _pytest.raises(_NonFinite):
        _cg(lambda x: x ** 2, [_np_ones() * float("nan")], argnums=(0,))
    with _pytest.raises(_NonFinite):
        _cg(lambda x: x * float("nan"), [_np_ones()], argnums=(0,))


def test_complex_output_raises_dtype_error():
    with _pytest.raises(_DTypeError):
        _cg(lambda x: x * 1j, [_np_ones()], argnums=(0,))


def test_each_finite_difference_point_is_evaluated_once_per_check():
    """The order-1 differences keep their forward passes for order 2 (the same points
    along coordinate directions): no point but x itself is evaluated twice, the
    report is the one of a check that evaluates everything afresh."""
    seen = []

    def fn(x, c):
        seen.append(onp.asarray(getval(x), dtype=float).tobytes())
        return np.sin(x) * x ** 2 + c * np.sum(x ** 3)

    x, c = onp.array([0.3, -1.1, 0.7]), 0.5
    rep = check_grad(fn, x, c, order=2, argnums=[0])
    assert rep.passed
    points = [p for p in seen if p != x.tobytes()]
    assert len(points) == len(set(points)) and len(points) < rep.n_evals / 2   # 40 of 88

    def fresh(x, c):              # the same function, not recognised as evaluated before
        return np.sin(x) * x ** 2 + c * np.sum(x ** 3)
    ref = check_grad(fresh, x, c, order=2, argnums=[0])
    strip = lambda d: {k: v for k, v in d.items() if k != "seconds"}
    assert strip(rep.to_dict()) == strip(ref.to_dict())
