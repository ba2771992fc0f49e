"""Front-ends: fixed_point_layer (Anderson), argmin_layer and
constrained_argmin_layer (KKT), against finite differences and closed forms."""
import warnings

import autograd.numpy as np
import numpy as onp
import pytest
from autograd import grad, jacobian, make_jvp

from conftest import assert_close, assert_grad_matches_fd, fd_directional, fd_grad, fd_jacobian
import nimplicit
from nimplicit import anderson, argmin_layer, constrained_argmin_layer, fixed_point_layer
from nimplicit.errors import ImplicitGradientWarning, NotConvergedError, SolverError

RTOL = 1e-6


# ------------------------------------------------------------------------------
# fixed points
# ------------------------------------------------------------------------------

def test_anderson_solves_a_fixed_point():
    y = anderson(lambda y: onp.cos(y), onp.zeros(3), tol=1e-14)
    assert onp.abs(onp.cos(y) - y).max() <= 1e-13
    assert_close(y, onp.full(3, 0.7390851332151607), 1e-13, "Dottie number")


def test_fixed_point_layer_gradients():
    rng = onp.random.default_rng(20)
    d = 6
    W = 0.6 * rng.standard_normal((d, d)) / onp.sqrt(d)
    b = rng.standard_normal(d)
    layer = fixed_point_layer(lambda y, W, b, s: s * np.tanh(np.dot(W, y) + b) + 0.1 * np.sin(y),
                              y0=lambda W, b, s: onp.zeros(len(b)))
    s = 0.9
    y = layer(W, b, s)
    assert onp.abs(s * onp.tanh(W @ y + b) + 0.1 * onp.sin(y) - y).max() <= 1e-12
    loss = lambda W, b, s: np.sum(np.cos(layer(W, b, s)) * b)
    assert_close(grad(loss, 1)(W, b, s), fd_grad(lambda b: loss(W, b, s), b), RTOL, "grad b")
    assert_close(grad(loss, 2)(W, b, s), fd_directional(lambda s: loss(W, b, s), s, 1.0), RTOL, "grad s")
    assert_grad_matches_fd(lambda W: loss(W, b, s), W, grad(loss, 0)(W, b, s), rng, 2, RTOL, "grad W")
    v = rng.standard_normal(d)
    assert_close(make_jvp(lambda b: layer(W, b, s))(b)(v)[1],
                 fd_directional(lambda b: layer(W, b, s), b, v), RTOL, "jvp b")
    assert_close(grad(grad(loss, 2), 2)(W, b, s),
                 fd_directional(lambda s: grad(loss, 2)(W, b, s), s, 1.0), RTOL, "second order in s")


def test_fixed_point_layer_with_a_user_solver_and_gmres():
    T = lambda y, x: 0.5 * np.cos(y) + x
    solver_calls = []

    def plain_iteration(x):
        solver_calls.append(x)
        y = onp.zeros_like(x)
        for _ in range(200):
            y = 0.5 * onp.cos(y) + x
        return y

    layer = fixed_point_layer(T, plain_iteration, linear_solver="gmres")
    x = onp.array([0.1, -0.4, 1.0])
    assert_close(jacobian(layer)(x), fd_jacobian(layer, x), RTOL, "user solver + gmres")
    # diagonal closed form: dy/dx = 1 / (1 + 0.5 sin y)
    assert_close(onp.diag(jacobian(layer)(x)), 1 / (1 + 0.5 * onp.sin(layer(x))), 1e-12, "closed form")
    assert solver_calls


def test_fixed_point_not_contractive_raises():
    """T(y) = y^2 + x has no real fixed point for x > 1/4."""
    layer = fixed_point_layer(lambda y, x: y ** 2 + x, y0=onp.zeros(2))
    with pytest.raises(NotConvergedError) as info:
        layer(onp.ones(2))
    msg = str(info.value)
    assert "did not converge" in msg and "max_iter=1000" in msg and "contraction" in msg


def test_fixed_point_max_iter_too_small_raises():
    layer = fixed_point_layer(lambda y, x: 0.5 * np.cos(y) + x, y0=onp.zeros(2), max_iter=2)
    with pytest.raises(NotConvergedError, match=r"max_iter=2 steps: max\|T\(y\) - y\| = "):
        layer(onp.ones(2))
    assert issubclass(NotConvergedError, SolverError)


def test_fixed_point_needs_an_initial_guess():
    with pytest.raises(TypeError, match="y0"):
        fixed_point_layer(lambda y, x: 0.5 * y + x)(onp.ones(2))


# ------------------------------------------------------------------------------
# argmin
# ------------------------------------------------------------------------------

def test_argmin_layer_quadratic_closed_form_and_fd():
    """argmin 0.5 y^T Q y - x . y + 0.25 sum y^4 ; J = Q + 3 diag(y^2)."""
    rng = onp.random.default_rng(21)
    M = rng.standard_normal((4, 4))
    Q = M @ M.T / 4 + onp.eye(4)
    obj = lambda y, Q, x: 0.5 * np.dot(y, np.dot(Q, y)) - np.dot(x, y) + 0.25 * np.sum(y ** 4)
    layer = argmin_layer(obj, y0=onp.zeros(4))
    x = rng.standard_normal(4)
    y = layer(Q, x)
    assert onp.abs(Q @ y - x + y ** 3).max() <= 1e-10
    J = jacobian(lambda x: layer(Q, x))(x)
    assert_close(J, onp.linalg.inv(Q + 3 * onp.diag(y ** 2)), 1e-10, "dy/dx = H^{-1}")
    assert_close(J, fd_jacobian(lambda x: layer(Q, x), x), RTOL, "dy/dx vs FD")
    loss = lambda Q: np.sum(layer(Q, x) ** 2)
    assert_grad_matches_fd(loss, Q, grad(loss)(Q), rng, 2, RTOL, "grad Q")


def test_argmin_layer_matrix_variable():
    """y is a 2 x 2 matrix; argmin of sum cosh(y - x) + 0.5 |y|^2: separable."""
    obj = lambda y, x: np.sum(np.cosh(y - x)) + 0.5 * np.sum(y ** 2)
    layer = argmin_layer(obj, y0=lambda x: onp.zeros_like(x))
    x = onp.array([[0.3, -1.0], [2.0, 0.5]])
    y = layer(x)
    assert y.shape == (2, 2)
    # elementwise: sinh(y - x) + y = 0  ->  dy/dx = cosh(y - x) / (cosh(y - x) + 1)
    c = onp.cosh(y - x)
    J = jacobian(layer)(x)
    assert_close(onp.einsum("ijij->ij", J), c / (c + 1), 1e-9, "closed form")
    V = onp.ones((2, 2))
    assert_close(make_jvp(layer)(x)(V)[1], fd_directional(layer, x, V), RTOL, "jvp vs FD")


def test_argmin_not_converged():
    obj = lambda y, x: np.sum((y - x) ** 4) + np.sum(np.exp(y))
    layer = argmin_layer(obj, y0=onp.full(3, 5.0), method="BFGS", max_iter=1)
    with pytest.raises(NotConvergedError, match="stopped with"):
        layer(onp.zeros(3))


# ------------------------------------------------------------------------------
# constrained argmin (KKT)
# ------------------------------------------------------------------------------

def test_projection_onto_a_ball_closed_form():
    """min 0.5 |y - x|^2 s.t. |y|^2 <= 1, x outside: y = x/|x|, nu = (|x| - 1)/2,
    dy/dx = (I - y y^T)/|x|."""
    layer = constrained_argmin_layer(lambda y, x: 0.5 * np.sum((y - x) ** 2),
                                     ineq=lambda y, x: np.array([np.sum(y ** 2) - 1.0]),
                                     y0=lambda x: onp.zeros(len(x)))
    x = onp.array([1.2, -0.9, 0.6])
    r = onp.linalg.norm(x)
    y, lam, nu = layer(x)
    assert lam.shape == (0,) and nu.shape == (1,)
    assert_close(y, x / r, 1e-10, "y")
    assert_close(nu, [(r - 1) / 2], 1e-8, "nu")
    Jy = jacobian(lambda x: layer(x)[0])(x)
    assert_close(Jy, (onp.eye(3) - onp.outer(y, y)) / r, 1e-8, "dy/dx closed form")
    assert_close(Jy, fd_jacobian(lambda x: layer(x)[0], x), RTOL, "dy/dx vs FD")
    assert_close(grad(lambda x: layer(x)[2][0])(x), x / (2 * r), 1e-8, "dnu/dx closed form")
    assert_close(jacobian(lambda x: layer(x)[2])(x), fd_jacobian(lambda x: layer(x)[2], x), RTOL,
                 "dnu/dx vs FD")


def test_equality_and_inequality_constrained_qp():
    """min 0.5 y^T P y + q(x) . y  s.t.  sum(y) = x0,  y >= -0.2 (some active)."""
    rng = onp.random.default_rng(22)
    n = 5
    M = rng.standard_normal((n, n))
    P = M @ M.T / n + 0.5 * onp.eye(n)
    obj = lambda y, q, t: 0.5 * np.dot(y, np.dot(P, y)) + np.dot(q, y)
    layer = constrained_argmin_layer(obj, eq=lambda y, q, t: np.array([np.sum(y) - t]),
                                     ineq=lambda y, q, t: -0.2 - y,
                                     y0=lambda q, t: onp.full(n, t / n))
    q = onp.array([1.5, -0.5, 2.0, -1.0, 0.2])
    t = 1.0
    y, lam, nu = layer(q, t)
    active = nu > 1e-6
    assert 0 < active.sum() < n, (y, nu)        # strictly complementary, some active
    assert onp.all(onp.abs(y[active] + 0.2) <= 1e-10) and onp.all(y[~active] > -0.2 + 1e-6)
    G = (rng.standard_normal(n), rng.standard_normal(1), rng.standard_normal(n))
    loss = lambda q, t: sum(np.sum(g * z) for g, z in zip(G, layer(q, t)))
    assert_close(grad(loss, 0)(q, t), fd_grad(lambda q: loss(q, t), q), RTOL, "grad q (y, lam, nu)")
    assert_close(grad(loss, 1)(q, t), fd_directional(lambda t: loss(q, t), t, 1.0), RTOL, "grad t")
    v = rng.standard_normal(n)
    assert_close(make_jvp(lambda q: layer(q, t))(q)(v)[1],
                 fd_directional(lambda q: layer(q, t), q, v), RTOL, "jvp of (y, lam, nu)")
    # second order through the KKT system
    loss_y = lambda q: np.sum(np.sin(layer(q, t)[0]))
    assert_close(make_jvp(grad(loss_y))(q)(v)[1], fd_directional(grad(loss_y), q, v), RTOL,
                 "forward-over-reverse through KKT")


def test_equality_only_closed_form():
    """min 0.5 |y - x|^2 s.t. a.y = c: y = x - a (a.x - c)/|a|^2, lam = (a.x - c)/|a|^2."""
    a, c = onp.array([1.0, 2.0, -1.0]), 0.5
    layer = constrained_argmin_layer(lambda y, x: 0.5 * np.sum((y - x) ** 2),
                                     eq=lambda y, x: np.array([np.dot(a, y) - c]), y0=onp.zeros(3))
    x = onp.array([0.3, 0.1, 0.7])
    y, lam, nu = layer(x)
    assert nu.shape == (0,)
    k = (a @ x - c) / (a @ a)
    assert_close(y, x - a * k, 1e-10, "y")
    assert_close(lam, [k], 1e-10, "lam")
    assert_close(jacobian(lambda x: layer(x)[0])(x), onp.eye(3) - onp.outer(a, a) / (a @ a), 1e-10, "dy/dx")
    assert_close(jacobian(lambda x: layer(x)[1])(x), a[None] / (a @ a), 1e-10, "dlam/dx")


def _simplex_projection():
    n = 5
    return constrained_argmin_layer(lambda y, x: 0.5 * np.sum((y - x) ** 2),
                                    eq=lambda y, x: np.array([np.sum(y) - 1.0]),
                                    ineq=lambda y, x: -y, y0=lambda x: onp.full(n, 1.0 / n))


def test_weakly_active_constraint_warns_and_gives_the_minimum_norm_gradient():
    """Projection onto the simplex of x = (0.5, 0.5, 0, -3, -2): y = (0.5, 0.5, 0, 0, 0)
    and the constraint y_2 >= 0 is weakly active (y_2 = 0 and nu_2 = 0)."""
    layer = _simplex_projection()
    x = onp.array([0.5, 0.5, 0.0, -3.0, -2.0])
    y, lam, nu = layer(x)
    assert abs(y[2]) <= 1e-9 and abs(nu[2]) <= 1e-9
    with pytest.warns(ImplicitGradientWarning, match=r"1 weakly active constraint\(s\) in constraint\(s\) \[2\]") as rec, \
            nimplicit.record_points() as points:
        J = jacobian(lambda x: np.concatenate(layer(x)))(x)
    assert "minimum-norm" in str(rec[0].message)
    # the minimum-norm solution of the (singular) KKT system: dz/dx = -pinv(dF/dz) dF/dx
    point = points[-1]
    Fz = jacobian(lambda z: point.F(z, x))(point.y_flat)
    Fx = jacobian(lambda x: point.F(point.y_flat, x))(x)
    assert onp.linalg.matrix_rank(Fz) < Fz.shape[0]            # singular indeed
    assert_close(J, -onp.linalg.pinv(Fz) @ Fx, 1e-10, "minimum-norm KKT derivative")


def test_strictly_complementary_projection_does_not_warn():
    layer = _simplex_projection()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitGradientWarning)
        jacobian(lambda x: layer(x)[0])(onp.array([0.5, 0.1, -0.3, 0.9, -1.0]))


def test_infeasible_problem_raises_solver_error():
    layer = constrained_argmin_layer(lambda y, x: np.sum((y - x) ** 2),
                                     eq=lambda y, x: np.array([np.sum(y) - 1.0]),
                                     ineq=lambda y, x: np.concatenate([y - 0.1, -y]),
                                     y0=onp.zeros(3))
    with pytest.raises(SolverError, match="SLSQP"):
        layer(onp.zeros(3))


def test_fixed_point_without_fixed_point_raises_instead_of_converging_at_infinity():
    # |T(y) - y| stays ~1 while |y| grows: a purely relative test would accept it
    layer = fixed_point_layer(lambda y, x: y + 1 + 0.1 * np.sin(y) + 0 * x,
                              y0=lambda x: onp.zeros(2), max_iter=100000)
    with pytest.raises(SolverError, match="no fixed point"):
        layer(onp.ones(2))


# ------------------------------------------------------------------------------
# scale-free weak test, KKT checks of every forward point, pickling
# ------------------------------------------------------------------------------

import pickle

from nimplicit import kkt
from nimplicit.errors import (ComplementarityError, DualInfeasibleError, InvalidOptionError,
                              KKTViolationError, NimplicitError, NotAMinimumError,
                              PrimalInfeasibleError)


def _scaled_box_objective(y, x, c):
    return 0.5 * c * np.sum((y - x) ** 2)


def _scaled_nonneg(y, x, c, d):
    return -d * y


@pytest.mark.parametrize("c", [1e-8, 1e-4, 1.0, 1e4, 1e8])
@pytest.mark.parametrize("d", [1e-6, 1.0, 1e6])
def test_weak_test_is_invariant_to_objective_and_row_scales(c, d):
    """Projection onto y >= 0 with objective c/2 |y - x|^2 and rows -d y <= 0: nu_i = c |x_i| / d
    on the active entries (as small as 1e-8 * 1e-3 / 1e6 = 1e-17). Strictly complementary at
    every scale: no warning, and dy/dx = diag(x > 0) exactly."""
    x = onp.array([0.3, -0.2, 0.5, -1e-3, 2.0])
    # the exact projection as the forward (SLSQP's own tolerances are not scale-free: at
    # these scales it returns infeasible points, which the layer refuses, see below)
    exact = lambda x: (onp.maximum(x, 0.0), onp.zeros(0), c * onp.maximum(-x, 0.0) / d)
    layer = constrained_argmin_layer(
        lambda y, x: _scaled_box_objective(y, x, c), ineq=lambda y, x: _scaled_nonneg(y, x, c, d),
        solver=exact)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitGradientWarning)
        J = jacobian(lambda x: layer(x)[0])(x)
    assert_close(J, onp.diag((x > 0).astype(float)), 1e-9, "dy/dx of the box projection")
    _, _, nu = layer(x)
    assert_close(nu, onp.where(x < 0, -c * x / d, 0.0), 1e-8, "multipliers")


def test_default_slsqp_forward_is_refused_not_wrong_at_extreme_scales():
    """SLSQP at objective scale 1e-8 with rows scaled by 1e6 stops at an infeasible point:
    a typed error (never a silently returned infeasible y)."""
    x = onp.array([0.3, -0.2, 0.5, -1e-3, 2.0])
    layer = constrained_argmin_layer(lambda y, x: _scaled_box_objective(y, x, 1e-8),
                                     ineq=lambda y, x: _scaled_nonneg(y, x, 1e-8, 1e6),
                                     y0=onp.ones(5))
    try:
        y, _, _ = layer(x)
    except SolverError:
        return
    assert_close(y, onp.maximum(x, 0.0), 1e-9, "y")


@pytest.mark.parametrize("c", [1e4, 1e8])
def test_default_slsqp_forward_solves_objectives_of_large_scale(c):
    """c/2 |y - x|^2 s.t. y <= 1 from y0 = 0: SLSQP on the unscaled objective stopped
    (status 8) at points the layer refused for about a quarter of these x (the slow fuzz
    suite's 'scale' class at c = 1e4); the forward minimizes c f / max(1, |grad c f(y0)|)."""
    rng = onp.random.default_rng(2783)
    layer = constrained_argmin_layer(lambda y, x: c * 0.5 * np.sum((y - x) ** 2),
                                     ineq=lambda y, x: y - 1.0, y0=lambda x: onp.zeros(3))
    base = onp.array([2.95218362, 1.47309568, 1.9829193])
    for _ in range(40):
        x = base + 1e-6 * rng.standard_normal(3)
        y, _, nu = layer(x)
        assert_close(y, onp.minimum(x, 1.0), 1e-12, "y")
        assert_close(nu, c * (x - 1.0), 1e-8, "multipliers")


@pytest.mark.parametrize("x", [[2.18529708, -0.07743116, -0.7919148],
                               [1.84892737, 0.03545837, -0.03329714],
                               [0.62604135, 2.63983585, -0.82773245]])
@pytest.mark.parametrize("t", [1e4, 1e8])
def test_default_slsqp_forward_solves_constraint_rows_of_large_scale(x, t):
    """1e-4/2 |y - x|^2 s.t. t (y - 1) <= 0 from y0 = 0 (the slow fuzz suite's 'scale'
    class, objective 1e-4 and rows 1e4; these x failed it): a row times t leaves rounding
    of t 1e-16 in its value, SLSQP's absolute feasibility test never passed and it hit its
    iteration limit (status 9, SolverError); the forward divides each row by
    max(1, |its gradient at y0|_inf).  The multipliers are those of the unscaled rows."""
    rng = onp.random.default_rng(388)
    layer = constrained_argmin_layer(lambda y, x: 1e-4 * 0.5 * np.sum((y - x) ** 2),
                                     ineq=lambda y, x: t * (y - 1.0), y0=lambda x: onp.zeros(3))
    for _ in range(20):
        xk = onp.array(x) + 1e-6 * rng.standard_normal(3)
        y, _, nu = layer(xk)
        assert_close(y, onp.minimum(xk, 1.0), 1e-12, "y")
        assert_close(nu, 1e-4 * onp.maximum(xk - 1.0, 0.0) / t, 1e-8, "multipliers")


def test_weak_tol_is_validated():
    with pytest.raises(InvalidOptionError, match="weak_tol"):
        constrained_argmin_layer(lambda y, x: np.sum(y ** 2), ineq=lambda y, x: -y, y0=onp.ones(2),
                                 weak_tol=float("nan"))
    with pytest.raises(InvalidOptionError, match="kkt_tol"):
        constrained_argmin_layer(lambda y, x: np.sum(y ** 2), ineq=lambda y, x: -y, y0=onp.ones(2),
                                 kkt_tol=-1.0)


def _nonneg_projection(solver):
    return constrained_argmin_layer(lambda y, x: 0.5 * np.sum((y - x) ** 2),
                                    ineq=lambda y, x: -y, solver=solver)


def test_infeasible_point_from_a_users_solver_is_refused():
    layer = _nonneg_projection(lambda x: (onp.array(x, float), onp.zeros(0), onp.zeros(len(x))))
    with pytest.raises(PrimalInfeasibleError, match="violates inequality constraint 1") as info:
        layer(onp.array([0.5, -0.3, 0.2]))
    assert isinstance(info.value, (ValueError, NimplicitError, SolverError))


def test_contradicting_inequalities_are_refused():
    """y <= 0.1 and y >= 0.2: no feasible point; a typed error, never a returned y."""
    layer = constrained_argmin_layer(lambda y, x: np.sum((y - x) ** 2),
                                     ineq=lambda y, x: np.concatenate([y - 0.1, 0.2 - y]),
                                     y0=onp.zeros(2))
    with pytest.raises(SolverError):
        layer(onp.zeros(2))


def test_negative_multiplier_from_a_users_solver_is_refused():
    # y = 0 with nu = -x: stationarity holds for x > 0, but nu < 0 (the true solution is y = x)
    layer = _nonneg_projection(lambda x: (onp.zeros(len(x)), onp.zeros(0), -onp.array(x, float)))
    with pytest.raises(DualInfeasibleError, match="nu_0 is negative"):
        layer(onp.array([0.5, 0.3]))


def test_multiplier_on_an_inactive_constraint_is_refused():
    # y = x + 0 with nu_0 > 0 on a constraint with slack 0.5: complementarity fails
    layer = _nonneg_projection(lambda x: (onp.array(x, float), onp.zeros(0), onp.array([0.2, 0.0])))
    with pytest.raises(ComplementarityError, match="constraint 0"):
        layer(onp.array([0.5, 0.3]))


def test_constrained_stationary_maximum_is_refused():
    """max |y|^2 on the hyperplane sum(y) = 1: y = 1/n is stationary, a maximum of -|y|^2
    restricted there... i.e. of the objective -|y|^2 it is a maximum: refused."""
    n = 3
    layer = constrained_argmin_layer(
        lambda y, x: -np.sum((y - x) ** 2), eq=lambda y, x: np.array([np.sum(y) - 1.0]),
        solver=lambda x: (onp.full(n, 1.0 / n), onp.array([2.0 / n]), onp.zeros(0)))
    with pytest.raises(NotAMinimumError, match="maximum or a saddle"):
        layer(onp.zeros(n))


def test_constrained_second_order_uses_the_null_space_only():
    """min -y_0^2 + y_1^2 s.t. y_0 = 0: the Hessian is indefinite, but on the null space
    of the active constraint (the y_1 axis) it is positive: accepted."""
    layer = constrained_argmin_layer(
        lambda y, x: -y[0] ** 2 + (y[1] - x[0]) ** 2, eq=lambda y, x: np.array([y[0]]),
        solver=lambda x: (onp.array([0.0, x[0]]), onp.array([0.0]), onp.zeros(0)))
    y, lam, nu = layer(onp.array([0.7]))
    assert_close(jacobian(lambda x: layer(x)[0])(onp.array([0.7])), onp.array([[0.0], [1.0]]),
                 1e-12, "dy/dx")


def _saddle(y, x):
    return y[0] ** 2 - y[1] ** 2 + x[0] * y[0]


def test_argmin_layer_refuses_a_saddle_from_the_default_solver():
    # started exactly at the stationary saddle (x = 0): gradient zero, the solver stops there
    layer = argmin_layer(_saddle, y0=onp.zeros(2))
    with pytest.raises(NotAMinimumError, match="maximum or a saddle"):
        layer(onp.zeros(1))


def test_argmin_layer_refuses_a_maximum_from_a_users_solver():
    layer = argmin_layer(lambda y, x: -np.sum((y - x) ** 2), solver=lambda x: onp.array(x, float))
    with pytest.raises(NotAMinimumError) as info:
        layer(onp.array([1.0, 2.0]))
    assert isinstance(info.value, ValueError) and isinstance(info.value, KKTViolationError)
    # and the check can be switched off explicitly (documented cost: one Hessian per forward)
    argmin_layer(lambda y, x: -np.sum((y - x) ** 2), solver=lambda x: onp.array(x, float),
                 second_order_tol=None)(onp.array([1.0, 2.0]))


def test_argmin_layer_second_order_is_scale_free():
    """A well-posed minimum with curvature 1e-8 (objective scaled by 1e-8) is accepted."""
    obj = lambda y, x: 1e-8 * np.sum((y - x) ** 2)
    layer = argmin_layer(obj, solver=lambda x: onp.array(x, float))
    assert_close(layer(onp.array([1.0, 2.0])), onp.array([1.0, 2.0]), 0, "y")


# module-level pieces for the pickling tests
def _contraction(y, x):
    return 0.5 * np.cos(y) + x


def _zeros_like_x(x):
    return onp.zeros_like(onp.asarray(x, float))


def _quadratic(y, x):
    return np.sum((y - x) ** 2) + 0.1 * np.sum(y ** 4)


def _half_sq(y, x):
    return 0.5 * np.sum((y - x) ** 2)


def _neg(y, x):
    return -y


@pytest.mark.parametrize("build", [
    lambda: fixed_point_layer(_contraction, y0=_zeros_like_x),
    lambda: argmin_layer(_quadratic, y0=_zeros_like_x),
    lambda: constrained_argmin_layer(_half_sq, ineq=_neg, y0=_zeros_like_x),
], ids=["fixed_point", "argmin", "constrained_argmin"])
def test_front_end_layers_pickle_before_and_after_use(build):
    layer = build()
    x = onp.array([0.3, -0.4, 0.8])
    restored = pickle.loads(pickle.dumps(layer))
    out = layer(x)
    again = pickle.loads(pickle.dumps(layer))            # after a forward call
    for other in (restored, again):
        got = other(x)
        for a, b in zip(out if isinstance(out, tuple) else (out,),
                        got if isinstance(got, tuple) else (got,)):
            assert onp.array_equal(onp.asarray(a), onp.asarray(b))


# --- option validation and scale-relative stopping (fuzz fixes) ---------------

def test_option_errors_are_typed_and_named():
    import pytest as _pt
    from nimplicit.errors import OptionError
    from nimplicit.front_ends import argmin_layer, constrained_argmin_layer, fixed_point_layer
    import autograd.numpy as _anp
    obj = lambda y, x: _anp.sum((y - x) ** 2)
    T = lambda y, x: 0.5 * y + x
    cases = [(lambda: argmin_layer(obj, y0=_anp.zeros(2), method="bogus"), "method"),
             (lambda: argmin_layer(obj, y0=_anp.zeros(2), gtol=-1.0), "gtol"),
             (lambda: argmin_layer(obj, y0=_anp.zeros(2), gtol=float("nan")), "gtol"),
             (lambda: constrained_argmin_layer(obj, y0=_anp.zeros(2), tol=float("nan")), "tol"),
             (lambda: constrained_argmin_layer(obj, y0=_anp.zeros(2), max_iter=-1), "max_iter"),
             (lambda: fixed_point_layer(T, y0=_anp.zeros(2), memory=0), "memory"),
             (lambda: fixed_point_layer(T, y0=_anp.zeros(2), memory=-2), "memory"),
             (lambda: fixed_point_layer(T, y0=_anp.zeros(2), max_iter=2.5), "max_iter")]
    for build, name in cases:
        with _pt.raises(OptionError, match=name):
            build()


def test_anderson_resolves_tiny_fixed_points():
    from nimplicit.front_ends import anderson
    for x in (1e-150, 1e-300, 1.0):
        y = anderson(lambda v: 0.5 * v + x, onp.zeros(3))
        onp.testing.assert_allclose(y, 2 * x, rtol=1e-10)


@pytest.mark.parametrize("build", [
    lambda: nimplicit.fixed_point_layer(lambda y, x: 0.5 * y + x),
    lambda: nimplicit.argmin_layer(lambda y, x: np.sum((y - x) ** 2)),
    lambda: nimplicit.constrained_argmin_layer(lambda y, x: np.sum((y - x) ** 2),
                                               eq=lambda y, x: np.sum(y) - 1.0),
])
def test_default_solver_without_y0_is_a_typed_error_at_construction(build):
    from nimplicit.errors import OptionError
    with pytest.raises(OptionError, match="y0="):
        build()
