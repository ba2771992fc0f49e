"""``linear_solver='krylov_or_dense'``: Krylov first, the dense LU when forming J
is cheaper (:class:`nimplicit.linear_solvers.KrylovOrDense`); ``'auto'`` keeps the
LU below ``KRYLOV_MIN`` unknowns and takes ``krylov_or_dense`` with its singularity
probe from there up to ``dense_max`` (one instance, ``throw=True``), so a singular J
stays the LU's typed error on every path of ``'auto'`` up to ``dense_max``."""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad, jacobian

from helpers import assert_close, assert_grad_matches_fd, fd_jacobian
from nimplicit import fixed_point_layer, implicit, implicit_layer, linear_solvers, record_points
from nimplicit.errors import OptionError, SingularJacobianError
from verification import check_grad


def T(y, W, b):
    """A contraction ``y -> tanh(W y + b)`` (``|W|_2 = 0.5``)."""
    return anp.tanh(anp.dot(W, y) + b)


def iterate(W, b, k=80):
    y = np.zeros(len(b))
    for _ in range(k):
        y = np.tanh(W @ y + b)
    return y


def problem(d, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d, d))
    W *= 0.5 / np.linalg.norm(W, 2)
    return W, rng.standard_normal(d)


def T_sliced(y, W, b):
    """``T`` through an indexing of ``y``: a primitive without a fast VJP, so J is not
    formed in one replay of the tape and 'auto' keeps its Krylov path."""
    return anp.tanh(anp.dot(W, y[::1]) + b)


def layer_and_point(d, fn=T, **options):
    W, b = problem(d)
    options.setdefault("linear_solver", "krylov_or_dense")
    layer = fixed_point_layer(fn, solver=iterate, **options)
    with record_points() as points:
        g = grad(lambda b: anp.sum(layer(W, b) ** 2))(b)
    return layer, points[0], (W, b), g


def test_auto_keeps_the_lu_below_krylov_min_and_krylov_or_dense_tries_krylov_first():
    assert 40 < implicit.KRYLOV_MIN
    _, auto, _, _ = layer_and_point(40, linear_solver="auto")
    assert isinstance(auto.linear_solver, linear_solvers.LU)
    _, mid, _, _ = layer_and_point(40)
    assert isinstance(mid.linear_solver, linear_solvers.KrylovOrDense)
    state = mid.solver_state
    # a contraction: GMRES converges in far fewer products than the 40 rows of J
    assert state.switched_because is None and 0 < state.counted.products < 40
    _, large, _, _ = layer_and_point(40, linear_solver="auto", dense_max=39)
    assert isinstance(large.linear_solver, linear_solvers.GMRES)


def _singular_residual(y, a):
    """J = diag(1, ..., 1, 0): singular; a cotangent without an e_m part is in its range."""
    return anp.concatenate([y[:-1] - a[:-1], anp.zeros(1) * y[-1]]) + 0.0 * a[-1]


@pytest.mark.parametrize("d", [20, implicit.KRYLOV_MIN, 150])
def test_auto_refuses_a_singular_j_even_with_a_cotangent_in_its_range(d):
    """GMRES alone would return one of many solutions silently: below KRYLOV_MIN the
    LU refuses, from there the probe (a random right-hand side) sends the point to it."""
    layer = implicit_layer(_singular_residual, lambda a: np.concatenate([a[:-1], [0.0]]))
    a = np.linspace(1.0, 2.0, d)
    with record_points() as points:
        with pytest.raises(SingularJacobianError):
            grad(lambda a: anp.sum(layer(a)[:-1]))(a)     # g has no component along e_m
    chosen = points[0].linear_solver
    if d < implicit.KRYLOV_MIN:
        assert isinstance(chosen, linear_solvers.LU)
    else:
        assert isinstance(chosen, linear_solvers.KrylovOrDense) and chosen.opts["probe"]
        assert "probe" in points[0].solver_state.switched_because


def test_without_the_probe_krylov_or_dense_solves_that_singular_j_silently():
    """The gap the probe closes (and why plain 'krylov_or_dense' is opt-in)."""
    d = 80
    layer = implicit_layer(_singular_residual, lambda a: np.concatenate([a[:-1], [0.0]]),
                           linear_solver="krylov_or_dense")
    g = grad(lambda a: anp.sum(layer(a)[:-1]))(np.linspace(1.0, 2.0, d))
    assert np.all(np.isfinite(g))


def test_auto_takes_krylov_with_the_probe_from_krylov_min_to_dense_max():
    d = implicit.KRYLOV_MIN + 16
    layer, point, (W, b), g = layer_and_point(d, fn=T_sliced, linear_solver="auto")
    solver = point.linear_solver
    assert isinstance(solver, linear_solvers.KrylovOrDense) and solver.opts["probe"]
    assert solver.krylov.opts["rtol"] == linear_solvers.KRYLOV_OR_DENSE_RTOL
    state = point.solver_state
    assert state.probed and state.dense_state is None and state.switched_because is None
    # probe + solve: still fewer products than the d VJPs that form J
    assert state.counted.products < d
    g_lu = grad(lambda b: anp.sum(fixed_point_layer(T, solver=iterate, linear_solver="lu")(W, b)
                                  ** 2))(b)
    assert_close(g, g_lu, 1e-12, "auto (GMRES at rtol 1e-14, probed) vs LU")
    report = check_grad(lambda b: layer(W, b), b, modes=("rev", "fwd"))
    assert report.passed, report
    # the explicit choices still force each path; a batch, throw=False and dense_max keep the LU
    for kind, cls in (("lu", linear_solvers.LU), ("gmres", linear_solvers.GMRES),
                      ("krylov_or_dense", linear_solvers.KrylovOrDense)):
        _, p, _, _ = layer_and_point(d, linear_solver=kind)
        assert type(p.linear_solver) is cls
    _, p, _, _ = layer_and_point(d, linear_solver="krylov_or_dense")
    assert not p.linear_solver.opts["probe"]
    _, p, _, _ = layer_and_point(d, linear_solver="auto", dense_max=d - 1)
    assert isinstance(p.linear_solver, linear_solvers.GMRES)
    _, p, _, _ = layer_and_point(d, linear_solver="auto", linear_solver_options={"probe": False})
    assert not p.linear_solver.opts["probe"]
    bad = implicit_layer(lambda y, a: y - a, lambda a: a, throw=False)
    with record_points() as points:
        bad(np.ones(d))
    assert isinstance(points[0].linear_solver, linear_solvers.LU)


def test_auto_forms_j_in_one_replay_when_every_node_has_a_fast_vjp():
    """tanh(W y + b) - y: every node of the tape maps a stack of cotangents, J forms in one
    replay, and 'auto' solves by the LU (its condition check) without Krylov products."""
    d = implicit.KRYLOV_MIN + 16
    layer, point, (W, b), g = layer_and_point(d, linear_solver="auto")
    solver = point.linear_solver
    assert isinstance(solver, linear_solvers.KrylovOrDense) and solver.opts["dense_if_cheap"]
    state = point.solver_state
    assert point.operator.dense_is_cheap() and "one replay" in state.switched_because
    assert isinstance(state.dense_state, linear_solvers._LUState)
    assert state.counted.products == 0 and not state.probed
    rows = linear_solvers.form_jacobian(point.operator.rmv, None, np.zeros(d), True, d)
    assert_close(point.operator.dense(), rows, 1e-13, "J from one replay vs d replays")
    g_lu = grad(lambda b: anp.sum(fixed_point_layer(T, solver=iterate, linear_solver="lu")(W, b)
                                  ** 2))(b)
    assert_close(g, g_lu, 1e-13, "auto (one-replay LU) vs LU")
    report = check_grad(lambda b: layer(W, b), b, modes=("rev", "fwd"))
    assert report.passed, report
    # forceable: the Krylov path with its probe
    _, p, _, _ = layer_and_point(d, linear_solver="auto",
                                 linear_solver_options={"dense_if_cheap": False})
    assert p.solver_state.probed and p.solver_state.dense_state is None
    _, p, _, _ = layer_and_point(d)                  # explicit krylov_or_dense: Krylov first
    assert p.solver_state.dense_state is None


def test_auto_refuses_an_ill_conditioned_j_on_the_krylov_path():
    """J = I + (eps - 1) u u^T: the probe's solution grows by 1/eps; the LU decides."""
    d = implicit.KRYLOV_MIN + 16
    rng = np.random.default_rng(1)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    for eps, fails in ((1e-6, False), (1e-13, True), (0.0, True)):
        M = np.eye(d) + (eps - 1) * np.outer(u, u)
        layer = implicit_layer(lambda y, a: anp.dot(M, y) - a,
                               lambda a: np.linalg.lstsq(M, a, rcond=None)[0])
        a = M @ rng.standard_normal(d)
        P = np.eye(d) - np.outer(u, u)          # a cotangent in the range of J
        loss = lambda a: anp.sum(anp.dot(P, layer(a)))
        if fails:
            with pytest.raises(SingularJacobianError):
                grad(loss)(a)
        else:
            assert_close(grad(loss)(a), np.linalg.solve(M.T, P.T @ np.ones(d)), 1e-10, "eps=1e-6")


def test_krylov_gradient_is_as_accurate_as_the_lu_one():
    layer, point, (W, b), g = layer_and_point(60)
    assert point.solver_state.dense_state is None          # solved by GMRES
    g_lu = grad(lambda b: anp.sum(fixed_point_layer(T, solver=iterate, linear_solver="lu")(W, b)
                                  ** 2))(b)
    assert_close(g, g_lu, 1e-12, "auto (GMRES at rtol 1e-14) vs LU")
    report = check_grad(lambda b: layer(W, b), b, modes=("rev",))
    assert report.passed, report


def test_many_solves_at_one_point_switch_to_the_dense_lu():
    """``jacobian`` asks for m solves: once the products reach the dense cost, J is formed."""
    d = 30
    W, b = problem(d, seed=1)
    layer = fixed_point_layer(T, solver=iterate, linear_solver="krylov_or_dense")
    with record_points() as points:
        J = jacobian(lambda b: layer(W, b))(b)
    state = points[0].solver_state
    assert state.dense_state is not None and "reached the cost" in state.switched_because
    assert state.counted.products <= state.break_even() + 1
    assert_close(J, fd_jacobian(lambda b: layer(W, b), b), 1e-6, "jacobian through the switch")


def test_a_krylov_failure_falls_back_to_the_lu_and_its_typed_error():
    """A singular J and a cotangent outside the range of J^T: GMRES cannot converge,
    the LU then reports the singularity (as 'auto' did before Krylov came first)."""
    d = 20

    def residual(y, a):
        return anp.concatenate([y[:-1] - a[:-1], anp.zeros(1) * y[-1]]) + 0.0 * a[-1]

    layer = implicit_layer(residual, lambda a: np.concatenate([a[:-1], [0.0]]),
                           linear_solver="krylov_or_dense")
    a = np.linspace(1.0, 2.0, d)
    with pytest.raises(SingularJacobianError):
        grad(lambda a: anp.sum(layer(a)))(a)       # g = 1 has a component along e_m


def test_budget_rule_on_a_matrix_operator():
    """Non-normal J whose GMRES needs ~m iterations: the state switches and solves exactly."""
    m = 40
    rng = np.random.default_rng(3)
    J = np.eye(m) + np.diag(np.full(m - 1, 3.0), 1) + 1e-3 * rng.standard_normal((m, m))
    op = linear_solvers.MatrixOperator(J)
    state = linear_solvers.KrylovOrDense(linear_solvers.GMRES(rtol=1e-14)).init(op)
    assert state.break_even() == m                       # no product timed yet
    x_true = rng.standard_normal(m)
    for transpose in (False, True):
        b = (J.T if transpose else J) @ x_true
        assert_close(state.solve(b, transpose=transpose), x_true, 1e-9, f"transpose={transpose}")
    assert state.dense_state is not None and state.exact


def test_user_rtol_reaches_the_krylov_candidate():
    layer = fixed_point_layer(T, solver=iterate, linear_solver="krylov_or_dense",
                              linear_solver_options={"rtol": 1e-9})
    assert layer.linear_solver.krylov.opts["rtol"] == 1e-9
    default = fixed_point_layer(T, solver=iterate, linear_solver="krylov_or_dense")
    assert default.linear_solver.krylov.opts["rtol"] == 1e-14
    with pytest.raises(OptionError, match="krylov_or_dense"):
        fixed_point_layer(T, solver=iterate, linear_solver="krylov_or_dense",
                          linear_solver_options={"bogus": 1})


def test_second_order_through_the_krylov_path():
    d = 24
    W, b = problem(d, seed=2)
    layer = fixed_point_layer(T, solver=iterate, linear_solver="krylov_or_dense")
    loss = lambda b: anp.sum(anp.sin(layer(W, b)))
    H = jacobian(grad(loss))(b)
    rng = np.random.default_rng(0)
    assert_grad_matches_fd(grad(loss), b, H, rng, rtol=1e-6, what="hessian through auto")


def test_gmres_refuses_a_blown_up_iterate_on_a_singular_j():
    """Before: GMRES on J = diag(1, .., 1, 0) with b outside the range returned
    x ~ 1e16 (accepted at a noise floor that grows with |x|) and a wrong gradient."""
    from nimplicit.errors import LinearSolveError

    def residual(y, a):
        return anp.concatenate([y[:-1] - a[:-1], anp.zeros(1) * y[-1]]) + 0.0 * a[-1]

    layer = implicit_layer(residual, lambda a: np.concatenate([a[:-1], [0.0]]),
                           linear_solver="gmres")
    with pytest.raises(LinearSolveError, match="singular|ill-conditioned") as info:
        grad(lambda a: anp.sum(layer(a)))(np.linspace(1.0, 2.0, 20))
    assert info.value.status in (linear_solvers.SolveStatus.SINGULAR,
                                 linear_solvers.SolveStatus.STAGNATION)
    # the refusal is the driver's, not the Krylov method's luck: a blown-up iterate
    J = np.eye(20)
    J[-1, -1] = 0.0
    with pytest.raises(LinearSolveError, match="singular") as info:
        linear_solvers._krylov("gmres", linear_solvers.spla.gmres, lambda v: J.T @ v,
                               lambda v: J @ v, -np.ones(20), rtol=1e-14, maxiter=None,
                               M=lambda v: v, refinements=3)
    assert info.value.status is linear_solvers.SolveStatus.SINGULAR


@pytest.mark.parametrize("options", [{}, {"dense_if_cheap": False}],
                         ids=["one-replay LU", "probed Krylov"])
@pytest.mark.parametrize("cond, fails", [(1e6, False), (5e11, True), (5e12, True), (5e13, True)])
def test_both_auto_paths_refuse_what_the_lu_refuses(options, cond, fails):
    """m = 80, J = I + (1/cond - 1) u u^T and a cotangent in the range of J: 'auto' by the
    one-replay LU and by the probed Krylov path (dense_if_cheap=False) decide as the LU."""
    d = 80
    rng = np.random.default_rng(1)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    M = np.eye(d) + (1 / cond - 1) * np.outer(u, u)
    P = np.eye(d) - np.outer(u, u)
    a = M @ rng.standard_normal(d)
    for kind, opts in (("auto", options), ("lu", {})):
        layer = implicit_layer(lambda y, a: anp.dot(M, y) - a,
                               lambda a: np.linalg.lstsq(M, a, rcond=None)[0],
                               linear_solver=kind, linear_solver_options=opts)
        loss = lambda a: anp.sum(anp.dot(P, layer(a)))
        if fails:
            with pytest.raises(SingularJacobianError):
                grad(loss)(a)
        else:
            assert_close(grad(loss)(a), np.linalg.solve(M.T, P.T @ np.ones(d)), 1e-9, kind)


def test_the_probe_hands_callbacks_a_writeable_right_hand_side():
    """A preconditioner or operator that works in place on its argument keeps working
    under ``probe=True`` (the probe's cached right-hand side is handed out as a copy)."""
    m = 70
    W, x = problem(m, seed=3)

    def in_place_jacobi(v):
        v *= 1.0
        return v

    class InPlace(linear_solvers.Operator):
        def mv(self, u):
            return A @ u

        def rmv(self, w):
            w *= 1.0
            return A.T @ w

    A = np.eye(m) + W
    state = linear_solvers.KrylovOrDense(probe=True).init(InPlace(m, m), None)
    b = np.ones(m)
    assert_close(state.solve(b.copy(), transpose=True), np.linalg.solve(A.T, b), rtol=1e-10)
    solver = linear_solvers.KrylovOrDense(linear_solvers.GMRES(preconditioner=in_place_jacobi),
                                          linear_solvers.LU(), probe=True)
    layer = fixed_point_layer(T, solver=iterate, linear_solver=solver)
    reference = fixed_point_layer(T, solver=iterate, linear_solver="lu")
    g = grad(lambda b: anp.sum(layer(W, b) ** 2), 0)(x)
    assert_close(g, grad(lambda b: anp.sum(reference(W, b) ** 2), 0)(x), rtol=1e-9)
