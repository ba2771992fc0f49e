"""Worked examples: the paper's Example 1, a deep-equilibrium layer, robust
pooling (deep declarative networks) and the projection onto the simplex
(sparsemax), each against a closed form and finite differences."""
import autograd.numpy as np
import numpy as onp
import pytest
from autograd import grad, hessian, jacobian, make_jvp

from conftest import assert_close, assert_grad_matches_fd, fd_directional, fd_grad, fd_jacobian
from nimplicit import argmin_layer, constrained_argmin_layer, fixed_point_layer, implicit_layer

RTOL = 1e-6


# ------------------------------------------------------------------------------
# Example 1 (paper eq. 18): F1 = x^2 + y1^2 + y2^2 - 4, F2 = x y1 - 1
# ------------------------------------------------------------------------------

def example1_residual(y, x):
    return np.array([x ** 2 + y[0] ** 2 + y[1] ** 2 - 4.0, x * y[0] - 1.0])


def example1_solver(x):
    """The branch with y2 > 0: y1 = 1/x, y2 = sqrt(4 - x^2 - 1/x^2)."""
    y1 = 1.0 / x
    return onp.array([y1, onp.sqrt(4.0 - x ** 2 - y1 ** 2)])


def test_example1_derivative_at_x_equal_1():
    layer = implicit_layer(example1_residual, example1_solver)
    y = layer(1.0)
    assert_close(y, [1.0, onp.sqrt(2.0)], 1e-15, "y(1)")
    dy = jacobian(layer)(1.0)
    assert onp.allclose(dy, [-1.0, 0.0], rtol=0, atol=1e-14), dy       # the paper's answer
    assert_close(dy, fd_directional(layer, 1.0, 1.0), RTOL, "dy/dx vs FD")
    assert_close(make_jvp(layer)(1.0)(1.0)[1], [-1.0, 0.0], 1e-14, "forward mode")
    # away from x = 1 against the explicit derivative of the solver's formula:
    # y1' = -1/x^2, y2' = (-x + 1/x^3) / y2
    for x in (0.8, 1.3):
        y1, y2 = example1_solver(x)
        assert_close(jacobian(layer)(x), [-1 / x ** 2, (-x + 1 / x ** 3) / y2], 1e-12, f"x={x}")
    # second order: d2y/dx2 at x = 1 against FD of the first derivative
    assert_close(jacobian(jacobian(layer))(1.0), fd_directional(jacobian(layer), 1.0, 1.0), RTOL,
                 "second derivative")


# ------------------------------------------------------------------------------
# deep equilibrium: y = tanh(W y + U x)
# ------------------------------------------------------------------------------

@pytest.mark.parametrize("linear_solver", ["lu", "gmres"])
def test_deep_equilibrium_layer(linear_solver):
    rng = onp.random.default_rng(30)
    d, k = 10, 4
    W = 0.7 * rng.standard_normal((d, d)) / onp.sqrt(d)
    U = rng.standard_normal((d, k)) / onp.sqrt(k)
    x = rng.standard_normal(k)
    deq = fixed_point_layer(lambda y, W, U, x: np.tanh(np.dot(W, y) + np.dot(U, x)),
                            y0=lambda W, U, x: onp.zeros(len(W)), linear_solver=linear_solver)
    y = deq(W, U, x)
    # Anderson's stopping rule (default tol 1e-12): |T(y) - y|_inf <= tol (1 + |y|_inf)
    assert onp.abs(onp.tanh(W @ y + U @ x) - y).max() <= 1e-12 * (1 + onp.abs(y).max())
    # closed form: dy/dx = (I - D W)^{-1} D U with D = diag(1 - y^2)
    D = onp.diag(1 - y ** 2)
    assert_close(jacobian(lambda x: deq(W, U, x))(x), onp.linalg.solve(onp.eye(d) - D @ W, D @ U),
                 1e-9, "dy/dx closed form")
    target = rng.standard_normal(d)
    loss = lambda W, U, x: np.sum((deq(W, U, x) - target) ** 2)
    assert_close(grad(loss, 2)(W, U, x), fd_grad(lambda x: loss(W, U, x), x), RTOL, "grad x")
    assert_grad_matches_fd(lambda W: loss(W, U, x), W, grad(loss, 0)(W, U, x), rng, 3, RTOL, "grad W")
    assert_grad_matches_fd(lambda U: loss(W, U, x), U, grad(loss, 1)(W, U, x), rng, 3, RTOL, "grad U")
    assert_close(hessian(lambda x: loss(W, U, x))(x), fd_jacobian(grad(lambda x: loss(W, U, x)), x),
                 RTOL, "hessian x")


# ------------------------------------------------------------------------------
# robust pooling (deep declarative networks): pseudo-Huber penalty
# ------------------------------------------------------------------------------

ALPHA = 1.0


def pseudo_huber_objective(y, x):
    """f(y; x) = sum_i alpha^2 (sqrt(1 + ((y - x_i)/alpha)^2) - 1)."""
    return np.sum(ALPHA ** 2 * (np.sqrt(1.0 + ((y - x) / ALPHA) ** 2) - 1.0))


def test_robust_pooling_pseudo_huber():
    rng = onp.random.default_rng(31)
    x = rng.standard_normal(12)
    x[:2] = [9.0, -7.5]                                     # outliers
    pool = argmin_layer(pseudo_huber_objective, y0=lambda x: onp.median(x))
    y = pool(x)
    assert onp.shape(y) == ()
    # DDN closed form: dy/dx_i = phi''(y - x_i) / sum_j phi''(y - x_j),
    # phi''(z) = (1 + (z/alpha)^2)^(-3/2)
    w = (1 + ((y - x) / ALPHA) ** 2) ** -1.5
    g = grad(pool)(x)
    assert_close(g, w / w.sum(), 1e-9, "DDN closed form")
    assert_close(g, fd_grad(pool, x), RTOL, "grad vs FD")
    assert g[:2].max() < 0.1 * g[2:].min(), "outliers have small influence"
    assert_close(g.sum(), 1.0, 1e-12, "translation equivariance")
    v = rng.standard_normal(12)
    assert_close(make_jvp(grad(pool))(x)(v)[1], fd_directional(grad(pool), x, v), RTOL,
                 "forward-over-reverse")


# ------------------------------------------------------------------------------
# Euclidean projection onto the simplex == sparsemax
# ------------------------------------------------------------------------------

def sparsemax(z):
    """Closed form (Martins & Astudillo 2016): max(z - tau, 0) with the threshold tau."""
    zs = onp.sort(z)[::-1]
    k = onp.arange(1, len(z) + 1)
    cumulative = onp.cumsum(zs)
    support = k[1 + k * zs > cumulative].max()
    tau = (cumulative[support - 1] - 1) / support
    return onp.maximum(z - tau, 0.0), tau


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simplex_projection_is_sparsemax(seed):
    n = 6
    layer = constrained_argmin_layer(lambda y, x: 0.5 * np.sum((y - x) ** 2),
                                     eq=lambda y, x: np.array([np.sum(y) - 1.0]),
                                     ineq=lambda y, x: -y, y0=lambda x: onp.full(n, 1.0 / n))
    rng = onp.random.default_rng(seed)
    x = 0.8 * rng.standard_normal(n)
    s_value, tau = sparsemax(x)
    assert onp.abs(x - tau).min() > 1e-3, "pick a strictly complementary instance"
    y, lam, nu = layer(x)
    assert_close(y, s_value, 1e-10, "value")
    support = (s_value > 0).astype(float)
    assert 1 <= support.sum() < n
    J = jacobian(lambda x: layer(x)[0])(x)
    closed = onp.diag(support) - onp.outer(support, support) / support.sum()
    assert onp.abs(J - closed).max() <= 1e-10, onp.abs(J - closed).max()
    assert_close(J, fd_jacobian(lambda x: layer(x)[0], x), RTOL, "Jacobian vs FD")
    # the multipliers: lam = tau, nu_i = tau - x_i off the support
    assert_close(lam, [tau], 1e-9, "lam")
    assert_close(nu, (1 - support) * (tau - x), 1e-9, "nu")
