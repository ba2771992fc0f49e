"""Tests of the QP layer ``reference_layers.qp`` (the paper's section 5.1).

Instances are planted (``verification.strategies.qp``): the KKT point is known
and strictly complementary with a chosen margin, so the layer must return it,
and every gradient (all six inputs) is compared with central finite
differences of the layer's actual forward output.
"""
import warnings

import autograd.numpy as np
import numpy as onp
import pytest
from autograd import grad
from hypothesis import HealthCheck, given, settings

from nimplicit.errors import (ImplicitGradientWarning, NotConvergedError, ShapeError,
                              SolverError)
from reference_layers.qp import (InfeasibleQPError, NonConvexQPError, QPNotConvergedError,
                                 RankDeficientEqualityError, UnboundedQPError,
                                 complementarity_margin, qp_layer)
from verification import check_grad
from verification.diagnose import diagnose
from verification.strategies.qp import (batched_qp_inputs, batched_qps, ill_posed_qp, planted_qp, qp_inputs,
                                        weakly_active_qp)

NAMES = ("Q", "q", "G", "h", "A", "b")


def _fd_grad(f, args, i, rng, eps=1e-6):
    """Central difference of scalar ``f`` along a random direction of input ``i``."""
    d = rng.standard_normal(onp.shape(args[i]))
    up = list(args)
    dn = list(args)
    up[i] = args[i] + eps * d
    dn[i] = args[i] - eps * d
    return (f(*up) - f(*dn)) / (2 * eps), d


def _loss(c, **kw):
    return lambda *a: np.sum(c * qp_layer(*a, **kw))


# --------------------------------------------------------------------------- forward

@pytest.mark.parametrize("p", [0, 2])
def test_forward_recovers_planted_solution(p):
    d = planted_qp(onp.random.default_rng(0), n=6, m=9, p=p)
    args = [d[k] for k in NAMES[:6 if p else 4]]
    y, lam, nu = qp_layer(*args, full_output=True)
    assert onp.allclose(y, d["y"], atol=1e-8)
    assert onp.allclose(nu, d["nu"], atol=1e-8)
    assert onp.allclose(lam, d["lam"], atol=1e-8)
    assert lam.shape == (p,)


def test_lp_vertex():
    d = planted_qp(onp.random.default_rng(1), n=4, m=7, lp=True)
    y = qp_layer(d["Q"], d["q"], d["G"], d["h"])
    assert onp.allclose(y, d["y"], atol=1e-8)


def test_batched_forward_matches_single_and_broadcast():
    rng = onp.random.default_rng(2)
    Q, q, G, h = batched_qp_inputs(rng, batch=4, n=5, m=7, shared=("Q", "G"))
    assert Q.ndim == 2 and q.ndim == 2
    y, lam, nu = qp_layer(Q, q, G, h, full_output=True)
    assert y.shape == (4, 5) and nu.shape == (4, 7) and lam.shape == (4, 0)
    for k in range(4):
        assert onp.allclose(y[k], qp_layer(Q, q[k], G, h[k]), atol=1e-10)


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("p", [0, 2])
def test_all_six_gradients_single_vs_fd(p):
    rng = onp.random.default_rng(3 + p)
    args = list(qp_inputs(rng, n=5, m=8, p=p))
    report = check_grad(lambda *a: qp_layer(*a, full_output=True), *args, modes=("rev", "fwd"),
                        noise=1e-9)
    assert report.passed, report


@pytest.mark.parametrize("shared", [(), ("Q", "G", "A")])
def test_all_six_gradients_batched_vs_fd(shared):
    rng = onp.random.default_rng(5)
    args = list(batched_qp_inputs(rng, batch=3, n=4, m=6, p=1, shared=shared))
    report = check_grad(lambda *a: qp_layer(*a), *args, modes=("rev",), noise=1e-9)
    assert report.passed, report


def test_broadcast_gradient_is_sum_over_batch():
    rng = onp.random.default_rng(6)
    Q, q, G, h = batched_qp_inputs(rng, batch=3, n=4, m=6, shared=("G",))
    c = rng.standard_normal(4)
    gG = grad(lambda G: np.sum(qp_layer(Q, q, G, h) @ c))(G)
    per = sum(grad(lambda G: np.sum(qp_layer(Q[k], q[k], G, h[k]) * c))(G) for k in range(3))
    assert onp.allclose(gG, per, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("p", [0, 3])
def test_fast_and_generic_backward_agree(p):
    rng = onp.random.default_rng(7)
    args = list(batched_qp_inputs(rng, batch=5, n=7, m=10, p=p))
    c = rng.standard_normal(7)
    argnums = list(range(len(args)))
    fast = grad(_loss(c, backward="structured"), argnums)(*args)
    generic = grad(_loss(c, backward="generic"), argnums)(*args)
    for name, gf, gg in zip(NAMES, fast, generic):
        rel = onp.abs(gf - gg).max() / onp.abs(gg).max()
        assert rel < 1e-8, (name, rel)
        assert onp.all(onp.isfinite(gf))
    # and against finite differences of the forward output
    f = _loss(c)
    for i in argnums:
        fd, d = _fd_grad(f, args, i, rng)
        assert abs(onp.sum(fast[i] * d) - fd) <= 1e-6 * (1 + abs(fd)), NAMES[i]


def test_second_order_through_fast_backward():
    args = list(qp_inputs(onp.random.default_rng(8), n=4, m=6))
    report = check_grad(lambda q, h: qp_layer(args[0], q, args[2], h), args[1], args[3],
                        modes=("rev",), order=2, noise=1e-9)
    assert report.passed, report


# --------------------------------------------------------------------------- weakly active

@pytest.mark.parametrize("p", [0, 1])
def test_weakly_active_constraint_min_norm_and_warning(p):
    args = list(weakly_active_qp(onp.random.default_rng(9), n=5, m=7, p=p))
    c = onp.random.default_rng(10).standard_normal(5)
    argnums = list(range(len(args)))
    results = {}
    for backward in ("structured", "generic"):
        with pytest.warns(ImplicitGradientWarning, match="weakly active"):
            results[backward] = grad(_loss(c, backward=backward), argnums)(*args)
    for name, gf, gg in zip(NAMES, results["structured"], results["generic"]):
        assert onp.all(onp.isfinite(gf))
        assert onp.abs(gf - gg).max() <= 1e-8 * (1 + onp.abs(gg).max()), name
    diag = diagnose(lambda *a: qp_layer(*a), *args)
    value, ok, why = diag.points[0].measures["strict_complementarity_margin"]
    assert not ok and value < 1e-8


def test_strict_complementarity_margin_reported():
    d = planted_qp(onp.random.default_rng(11), n=5, m=8, margin=0.3)
    diag = diagnose(lambda *a: qp_layer(*a), d["Q"], d["q"], d["G"], d["h"])
    value, ok, _ = diag.points[0].measures["strict_complementarity_margin"]
    # the planted point's own scale-free margins (nimplicit.kkt), computed independently
    G, y, h = d["G"], d["y"], d["h"]
    row = onp.linalg.norm(G, axis=1)
    S = onp.linalg.norm(0.5 * (d["Q"] + d["Q"].T) @ y) + onp.linalg.norm(d["q"]) + row @ d["nu"]
    margin = onp.maximum(row * d["nu"] / S, d["s"] / (row * onp.linalg.norm(y) + onp.abs(h)))
    assert ok and abs(value - margin.min()) < 1e-8 * margin.min()
    assert abs(value - complementarity_margin(d["Q"], d["q"], G, h, y, d["nu"]).min()) < 1e-12


# --------------------------------------------------------------------------- failures

@pytest.mark.parametrize("kind, error", [
    ("infeasible", InfeasibleQPError), ("unbounded", UnboundedQPError),
    ("nonconvex", NonConvexQPError), ("rank-deficient", RankDeficientEqualityError),
    ("not-converged", QPNotConvergedError)])
def test_failure_modes_raise_typed_errors(kind, error):
    inputs, options = ill_posed_qp(kind)
    with pytest.raises(error) as info:
        qp_layer(*inputs, solver_options=options or None)
    assert isinstance(info.value, SolverError)
    assert info.value.instances == [0]


def test_failure_names_the_batch_instance():
    rng = onp.random.default_rng(12)
    Q, q, G, h = batched_qp_inputs(rng, batch=4, n=4, m=6)
    (_, _, Gi, hi), _ = ill_posed_qp("infeasible")
    G = onp.concatenate([G, onp.broadcast_to(Gi[-2:], (4, 2, 4))], axis=1)
    h = onp.concatenate([h, onp.zeros((4, 2)) + 1.0], axis=1)
    h[2, -2:] = -1.0
    with pytest.raises(InfeasibleQPError, match="batch instance 2") as info:
        qp_layer(Q, q, G, h)
    assert info.value.instances == [2]
    assert issubclass(QPNotConvergedError, NotConvergedError)


def test_bad_shapes():
    Q, q, G, h = qp_inputs(onp.random.default_rng(13), n=4, m=5)
    with pytest.raises(ShapeError, match="G is"):
        qp_layer(Q, q, G[:, :3], h)
    with pytest.raises(ShapeError, match="batch size"):
        qp_layer(onp.stack([Q, Q]), onp.stack([q, q, q]), G, h)
    with pytest.raises(ShapeError, match="both A and b"):
        qp_layer(Q, q, G, h, A=onp.ones((1, 4)))


def test_warm_start_gives_same_solution():
    args = qp_inputs(onp.random.default_rng(14), n=5, m=8, p=1)
    sol = qp_layer(*args, full_output=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = qp_layer(*args, warm_start=sol)
    assert onp.allclose(y, sol[0], atol=1e-9)


def test_stalled_instances_are_retried_with_a_rescaled_objective(monkeypatch):
    import reference_layers.qp as qp_module
    rng = onp.random.default_rng(15)
    args = batched_qp_inputs(rng, batch=3, n=4, m=6, p=1)
    expected = qp_layer(*args, full_output=True)
    real = qp_module.solve_qp_batch
    calls = []

    def stalls_once(Q, q, *rest, **kw):
        res = real(Q, q, *rest, **kw)
        calls.append(len(q))
        if len(calls) == 1:     # the first solve "stalls" on instance 1 with a wrong iterate
            res.status[1] = qp_module.QPStatus.MAX_ITER
            res.kkt_residual[1] = 1e-3
            res.y[1] += 1.0
        return res

    monkeypatch.setattr(qp_module, "solve_qp_batch", stalls_once)
    got = qp_layer(*args, full_output=True)
    assert calls == [3, 1]
    for g, e in zip(got, expected):
        assert onp.allclose(g, e, atol=1e-9)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batched_qps())
def test_property_fast_generic_agree_on_random_well_posed_batches(args):
    B, n = args[1].shape
    c = onp.linspace(-1.0, 1.0, n)
    argnums = list(range(len(args)))
    fast = grad(_loss(c, backward="structured"), argnums)(*args)
    generic = grad(_loss(c, backward="generic"), argnums)(*args)
    for name, gf, gg in zip(NAMES, fast, generic):
        assert onp.abs(gf - gg).max() <= 1e-8 * (1 + onp.abs(gg).max()), name


# --------------------------------------------------------------------------- equality-only, bad inputs

from autograd import make_jvp, make_vjp

from nimplicit.errors import (EmptyInputError, InvalidInputError, InvalidOptionError,
                              UnknownOptionError)


def _equality_only(rng, n=4, p=2):
    M = rng.standard_normal((n, n))
    Q = M @ M.T / n + 0.5 * onp.eye(n)
    return Q, rng.standard_normal(n), rng.standard_normal((p, n)), rng.standard_normal(p)


@pytest.mark.parametrize("backward", ["structured", "generic"])
@pytest.mark.parametrize("form", ["None", "m=0"])
def test_equality_only_qp_forward_and_backward(backward, form):
    Q, q, A, b = _equality_only(onp.random.default_rng(40))
    n, p = len(q), len(b)
    K = onp.block([[Q, A.T], [A, onp.zeros((p, p))]])
    y_ref = onp.linalg.solve(K, onp.concatenate([-q, b]))[:n]
    if form == "None":
        f = lambda Q, q, A, b: qp_layer(Q, q, None, None, A, b, backward=backward)
    else:
        f = lambda Q, q, A, b: qp_layer(Q, q, onp.zeros((0, n)), onp.zeros(0), A, b,
                                        backward=backward)
    assert onp.allclose(f(Q, q, A, b), y_ref, atol=1e-12)
    y, lam, nu = qp_layer(Q, q, None, None, A, b, full_output=True)
    assert nu.shape == (0,) and lam.shape == (p,)
    report = check_grad(f, Q, q, A, b, modes=("rev", "fwd"))
    assert report.passed, report


def test_complex_and_object_inputs_are_typed_errors():
    Q, q, G, h = qp_inputs(onp.random.default_rng(41), n=3, m=4)
    with pytest.raises(InvalidInputError, match="complex") as info:
        qp_layer(Q, q + 1e-3j, G, h)
    assert isinstance(info.value, TypeError)
    with pytest.raises(InvalidInputError, match="dtype object"):
        qp_layer(Q.astype(object), q, G, h)
    with pytest.raises(InvalidInputError, match="dtype"):
        qp_layer(Q, onp.array(["a", "b", "c"]), G, h)


def test_empty_batch_and_empty_problem_are_typed_errors():
    with pytest.raises(EmptyInputError, match="0 instances") as info:
        qp_layer(onp.zeros((0, 3, 3)), onp.zeros((0, 3)), onp.zeros((0, 2, 3)), onp.zeros((0, 2)))
    assert isinstance(info.value, ValueError)
    with pytest.raises(EmptyInputError, match="n = 0"):
        qp_layer(onp.zeros((0, 0)), onp.zeros(0), onp.zeros((2, 0)), onp.ones(2))


def test_full_output_is_a_boxed_tuple_for_make_vjp_and_make_jvp():
    """make_vjp / make_jvp of a function returning (y, lam, nu) must not see zeros."""
    Q, q, G, h = qp_inputs(onp.random.default_rng(42), n=4, m=6, margin=0.2)
    f = lambda q: qp_layer(Q, q, G, h, full_output=True)
    vjp, out = make_vjp(f)(q)
    assert len(out) == 3
    ct = tuple(onp.ones_like(onp.asarray(v)) for v in out)
    g = vjp(ct)
    assert onp.abs(g).max() > 1e-3
    jv = make_jvp(f)(q)(onp.ones_like(q))[1]
    assert len(jv) == 3 and max(onp.abs(onp.asarray(v)).max(initial=0.0) for v in jv) > 1e-3
    report = check_grad(f, q, modes=("rev", "fwd"))
    assert report.passed, report


# --------------------------------------------------------------------------- keyword convention

def test_deprecated_keywords_warn_and_still_work():
    Q, q, G, h = qp_inputs(onp.random.default_rng(43), n=4, m=6)
    y = qp_layer(Q, q, G, h)
    with pytest.warns(DeprecationWarning, match="full_output"):
        y1, _, _ = qp_layer(Q, q, G, h, return_duals=True)
    with pytest.warns(DeprecationWarning, match="backward='structured'"):
        y2 = qp_layer(Q, q, G, h, backward="fast")
    with pytest.warns(DeprecationWarning, match="solver_options"):
        y3 = qp_layer(Q, q, G, h, tol=1e-11, max_iter=200)
    for other in (y1, y2, y3):
        assert onp.allclose(other, y, atol=1e-12)


def test_solver_options_are_validated():
    Q, q, G, h = qp_inputs(onp.random.default_rng(44), n=4, m=6)
    with pytest.raises(UnknownOptionError, match="allowed") as info:
        qp_layer(Q, q, G, h, solver_options={"tolerance": 1e-9})
    assert isinstance(info.value, TypeError)
    with pytest.raises(InvalidOptionError, match="tol"):
        qp_layer(Q, q, G, h, solver_options={"tol": float("nan")})
    with pytest.raises(InvalidOptionError, match="backward must be"):
        qp_layer(Q, q, G, h, backward="bogus")
    with pytest.raises(InvalidOptionError, match="backward='generic' only"):
        qp_layer(Q, q, G, h, linear_solver="gmres")
    with pytest.raises(InvalidOptionError, match="weak_tol"):
        qp_layer(Q, q, G, h, weak_tol=-1.0)
    y = qp_layer(Q, q, G, h, solver_options={"tol": 1e-11, "max_iter": 50, "num_threads": 1})
    assert onp.allclose(y, qp_layer(Q, q, G, h), atol=1e-12)


def test_generic_backward_with_a_core_linear_solver():
    args = qp_inputs(onp.random.default_rng(45), n=4, m=6, margin=0.2)
    c = onp.random.default_rng(46).standard_normal(4)
    ref = grad(_loss(c), [1, 3])(*args)
    got = grad(_loss(c, backward="generic", linear_solver="gmres",
                     linear_solver_options={"rtol": 1e-13}), [1, 3])(*args)
    for a, b in zip(got, ref):
        assert onp.allclose(a, b, atol=1e-9)
