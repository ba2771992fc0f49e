"""Every linear solver of the implicit node, on the problem it is meant for,
against finite differences of the forward solver's output or a closed form;
and one factorization per forward point.
"""
import re

import autograd.numpy as np
import numpy as onp
import pytest
import scipy.linalg
from autograd import grad, hessian, jacobian, make_jvp, make_vjp

from helpers import (assert_close, assert_grad_matches_fd, fd_directional, fd_grad,
                      fd_jacobian, newton_solve)
from nimplicit import argmin_layer, implicit_layer, linear_solvers, record_points
from nimplicit.errors import LinearSolveError, ShapeError, UnsupportedError

RTOL = 1e-6


# ------------------------------------------------------------------------------
# a non-symmetric J: the deep-equilibrium residual F = tanh(W y + U x) - y
# ------------------------------------------------------------------------------

DEQ_D, DEQ_K = 8, 3


def deq_residual(y, W, U, x):
    return np.tanh(np.dot(W, y) + np.dot(U, x)) - y


def deq_solver(W, U, x):
    y = onp.zeros(len(W))
    for _ in range(400):
        y_next = onp.tanh(W @ y + U @ x)
        if onp.abs(y_next - y).max() <= 1e-15:
            break
        y = y_next
    return y_next


@pytest.fixture(scope="module")
def deq_data():
    rng = onp.random.default_rng(10)
    W = 0.5 * rng.standard_normal((DEQ_D, DEQ_D)) / onp.sqrt(DEQ_D)
    U = rng.standard_normal((DEQ_D, DEQ_K))
    x = rng.standard_normal(DEQ_K)
    return W, U, x


@pytest.mark.parametrize("name", ["lu", "gmres", "bicgstab", "lsmr", "lstsq"])
def test_nonsymmetric_solvers_match_fd(deq_data, name, monkeypatch):
    W, U, x = deq_data
    if name in linear_solvers.MATRIX_FREE:   # matrix-free means J is never formed
        def no_dense(*a, **k):
            raise AssertionError(f"{name} formed J densely")
        monkeypatch.setattr(linear_solvers, "form_jacobian", no_dense)
    layer = implicit_layer(deq_residual, deq_solver, linear_solver=name)
    rng = onp.random.default_rng(0)
    G = rng.standard_normal(DEQ_D)
    loss = lambda W, U, x: np.sum(G * layer(W, U, x)) + np.sum(layer(W, U, x) ** 2)
    assert_close(grad(loss, 2)(W, U, x), fd_grad(lambda x: loss(W, U, x), x), RTOL, f"{name}: grad x")
    assert_grad_matches_fd(lambda W: loss(W, U, x), W, grad(loss, 0)(W, U, x), rng, 2, RTOL,
                           f"{name}: grad W")
    E = rng.standard_normal(U.shape)
    assert_close(make_jvp(lambda U: layer(W, U, x))(U)(E)[1],
                 fd_directional(lambda U: layer(W, U, x), U, E), RTOL, f"{name}: jvp U")


@pytest.mark.parametrize("name", ["gmres", "bicgstab"])
def test_krylov_second_order(deq_data, name):
    W, U, x = deq_data
    layer = implicit_layer(deq_residual, deq_solver, linear_solver=name)
    loss = lambda x: np.sum(np.sin(layer(W, U, x)))
    assert_close(hessian(loss)(x), fd_jacobian(grad(loss), x), RTOL, f"{name}: hessian")


# ------------------------------------------------------------------------------
# a symmetric J: an argmin layer, J = Hessian of the objective
# ------------------------------------------------------------------------------

def smooth_objective(y, Q, x):
    """0.5 y^T Q y + sum log cosh(y) - x . y   (strictly convex for Q SPD)."""
    return 0.5 * np.dot(y, np.dot(Q, y)) + np.sum(np.log(np.cosh(y))) - np.dot(x, y)


def smooth_argmin(Q, x):
    """Newton on the stationarity condition S y + tanh(y) = x, S = (Q + Q^T)/2 (Q is
    perturbed non-symmetrically by finite differences), Hessian S + diag(sech^2 y)."""
    Q = 0.5 * (Q + Q.T)
    y = onp.zeros(len(x))
    for _ in range(50):
        g = Q @ y + onp.tanh(y) - x
        if onp.abs(g).max() <= 1e-15 * (1 + onp.abs(y).max()):
            break
        y = y - onp.linalg.solve(Q + onp.diag(1 - onp.tanh(y) ** 2), g)
    return y


@pytest.fixture(scope="module")
def spd_data():
    rng = onp.random.default_rng(11)
    n = 6
    M = rng.standard_normal((n, n))
    Q = M @ M.T / n + onp.eye(n)
    return Q, rng.standard_normal(n)


@pytest.mark.parametrize("name", ["cholesky", "cg", "minres", "lu"])
def test_symmetric_solvers_on_argmin_layer(spd_data, name):
    Q, x = spd_data
    layer = argmin_layer(smooth_objective, smooth_argmin, linear_solver=name)
    rng = onp.random.default_rng(1)
    G = rng.standard_normal(len(x))
    loss = lambda Q, x: np.sum(G * layer(Q, x)) + 0.5 * np.sum(layer(Q, x) ** 2)
    assert_close(grad(loss, 1)(Q, x), fd_grad(lambda x: loss(Q, x), x), RTOL, f"{name}: grad x")
    assert_grad_matches_fd(lambda Q: loss(Q, x), Q, grad(loss, 0)(Q, x), rng, 2, RTOL, f"{name}: grad Q")
    v = rng.standard_normal(len(x))
    assert_close(make_jvp(grad(lambda x: loss(Q, x)))(x)(v)[1],
                 fd_directional(grad(lambda x: loss(Q, x)), x, v), RTOL, f"{name}: fwd-over-rev")


def test_minres_on_symmetric_indefinite_J():
    """F = S y + 0.1 y^3 - x with S symmetric indefinite: J = S + 0.3 diag(y^2)."""
    rng = onp.random.default_rng(12)
    P = rng.standard_normal((5, 5))
    S = onp.diag([3.0, -2.5, 4.0, -3.0, 2.0]) + 0.1 * (P + P.T)
    residual = lambda y, x: np.dot(S, y) + 0.1 * y ** 3 - x
    x = 0.5 * rng.standard_normal(5)
    layer = implicit_layer(residual, lambda x: newton_solve(residual, onp.linalg.solve(S, x), x),
                           linear_solver="minres")
    assert onp.linalg.eigvalsh(S + 0.3 * onp.diag(layer(x) ** 2)).min() < 0   # indefinite indeed
    assert_close(jacobian(layer)(x), fd_jacobian(layer, x), RTOL, "minres, indefinite J")


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_symmetric_krylov_on_nonsymmetric_J_raises(deq_data, name):
    W, U, x = deq_data
    layer = implicit_layer(deq_residual, deq_solver, linear_solver=name)
    with pytest.raises(LinearSolveError, match=f"linear_solver='{name}' needs a symmetric operator"):
        grad(lambda x: np.sum(layer(W, U, x)))(x)
    with pytest.raises(LinearSolveError, match="gmres"):
        make_jvp(lambda x: layer(W, U, x))(x)(onp.ones(DEQ_K))


@pytest.mark.parametrize("name", sorted(linear_solvers.SOLVERS))
def test_every_solver_in_batch_mode(spd_data, name):
    """A batch of 3 instances Q y_b + tanh(y_b) = x_b (J_b SPD): every solver acts
    instance by instance on (B, m) arrays."""
    Q, _ = spd_data
    rng = onp.random.default_rng(13)
    X = rng.standard_normal((3, len(Q)))
    residual = lambda Y, X: np.dot(Y, Q) + np.tanh(Y) - X       # Q symmetric: row b is Q y_b + tanh - x_b
    solver = lambda X: onp.stack([smooth_argmin(Q, x) for x in X])
    layer = implicit_layer(residual, solver, batch_axis=0, linear_solver=name)
    loss = lambda X: np.sum(layer(X) ** 3)
    assert_grad_matches_fd(loss, X, grad(loss)(X), rng, 2, RTOL, f"batched {name}")
    V = rng.standard_normal(X.shape)
    assert_close(make_jvp(layer)(X)(V)[1], fd_directional(layer, X, V), RTOL, f"batched {name}: jvp")


# ------------------------------------------------------------------------------
# lstsq: non-square and rank-deficient J, minimum norm
# ------------------------------------------------------------------------------

def plane_residual(y, a, c):
    """One equation, three unknowns: a . y = c."""
    return np.reshape(np.dot(a, y) - c, (1,))


def plane_solver(a, c):
    return c * a / onp.dot(a, a)      # the minimum-norm point of the plane


def test_lstsq_one_equation_three_unknowns_plane():
    layer = implicit_layer(plane_residual, plane_solver, linear_solver="lstsq")
    rng = onp.random.default_rng(14)
    a, c = rng.standard_normal(3), 0.8
    y = layer(a, c)
    # along c the forward IS the minimum-norm solution: dy/dc = a / |a|^2 = J^+ (-dF/dc)
    dy_dc = jacobian(lambda c: layer(a, c))(c)
    assert_close(dy_dc, a / a.dot(a), 1e-12, "dy/dc, minimum norm")
    assert_close(dy_dc, fd_directional(lambda c: layer(a, c), c, 1.0), RTOL, "dy/dc vs FD")
    # reverse mode in a: a_bar = J_a^T w, w = -(J^T)^+ g = -(a . g)/|a|^2, J_a = y^T
    g = rng.standard_normal(3)
    a_bar = make_vjp(lambda a: layer(a, c))(a)[0](g)
    assert_close(a_bar, -y * a.dot(g) / a.dot(a), 1e-12, "a_bar, minimum-norm closed form")
    # along da = a (scaling) the forward stays the min-norm solution: matches FD
    assert_close(make_jvp(lambda a: layer(a, c))(a)(a)[1],
                 fd_directional(lambda a: layer(a, c), a, a), RTOL, "jvp along a vs FD")
    # along any direction the IFT tangent is the min-norm solution of a.dy = -y.da: parallel to a
    da = rng.standard_normal(3)
    dy = make_jvp(lambda a: layer(a, c))(a)(da)[1]
    assert abs(a.dot(dy) + y.dot(da)) <= 1e-12 * (1 + abs(y.dot(da)))
    assert onp.linalg.norm(onp.cross(dy, a)) <= 1e-12 * onp.linalg.norm(dy) * onp.linalg.norm(a)


def test_lstsq_point_on_sphere():
    """|y|^2 = x with y = sqrt(x) u: the radial forward is the minimum-norm motion."""
    u = onp.array([2.0, -1.0, 2.0]) / 3.0
    layer = implicit_layer(lambda y, x: np.reshape(np.sum(y ** 2) - x, (1,)),
                           lambda x: onp.sqrt(x) * u, linear_solver="lstsq")
    x = 1.7
    J = jacobian(layer)(x)
    assert_close(J, u / (2 * onp.sqrt(x)), 1e-12, "closed form")
    assert_close(J, fd_directional(layer, x, 1.0), RTOL, "vs FD")
    assert_close(grad(lambda x: np.sum(layer(x) * u))(x), 1 / (2 * onp.sqrt(x)), 1e-12, "grad")
    # second order through a pseudo-inverse is refused, not silently wrong
    with pytest.raises(UnsupportedError, match="least-squares"):
        grad(grad(lambda x: np.sum(layer(x) * u)))(x)


def test_lstsq_square_rank_deficient():
    """J = [[1, 1], [2, 2]] (rank 1): the minimum-norm derivative is (1/2, 1/2)."""
    residual = lambda y, x: np.array([y[0] + y[1] - x, 2 * (y[0] + y[1]) - 2 * x])
    layer = implicit_layer(residual, lambda x: onp.array([x / 2, x / 2]), linear_solver="lstsq")
    x = 0.9
    assert_close(jacobian(layer)(x), onp.array([0.5, 0.5]), 1e-12, "min-norm dy/dx")
    assert_close(jacobian(layer)(x), fd_directional(layer, x, 1.0), RTOL, "vs FD")
    assert_close(grad(lambda x: layer(x)[0] - 3 * layer(x)[1])(x), -1.0, 1e-12, "grad")


def test_lstsq_on_square_regular_J_equals_lu_and_allows_second_order(deq_data):
    W, U, x = deq_data
    loss = lambda layer: (lambda x: np.sum(np.cos(layer(W, U, x))))
    by_lstsq = loss(implicit_layer(deq_residual, deq_solver, linear_solver="lstsq"))
    by_lu = loss(implicit_layer(deq_residual, deq_solver, linear_solver="lu"))
    assert_close(grad(by_lstsq)(x), grad(by_lu)(x), 1e-10, "lstsq == lu on a regular J")
    assert_close(hessian(by_lstsq)(x), hessian(by_lu)(x), 1e-10, "second order through lstsq")


# ------------------------------------------------------------------------------
# ridge (Tikhonov) against the closed form
# ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstsq", "lsmr", "auto"])
def test_ridge_matches_closed_form(name):
    """F = A y - B tanh(x): reverse w = -(J J^T + r I)^{-1} J g, x_bar = J_x^T w;
    forward y_dot = (J^T J + r I)^{-1} J^T (B diag(tanh') x_dot)."""
    rng = onp.random.default_rng(15)
    n, k, r = 4, 3, 0.05
    A = onp.diag([3.0, 1.0, 0.4, 0.2]) + 0.05 * rng.standard_normal((n, n))
    Bm = rng.standard_normal((n, k))
    layer = implicit_layer(lambda y, x: np.dot(A, y) - np.dot(Bm, np.tanh(x)),
                           lambda x: onp.linalg.solve(A, Bm @ onp.tanh(x)),
                           linear_solver=name, ridge=r)
    x = rng.standard_normal(k)
    db_dx = Bm * (1 - onp.tanh(x) ** 2)
    g, xd = rng.standard_normal(n), rng.standard_normal(k)
    x_bar = make_vjp(layer)(x)[0](g)
    expected_bar = db_dx.T @ onp.linalg.solve(A @ A.T + r * onp.eye(n), A @ g)
    assert_close(x_bar, expected_bar, 1e-9, f"{name}: ridge VJP")
    y_dot = make_jvp(layer)(x)(xd)[1]
    expected_dot = onp.linalg.solve(A.T @ A + r * onp.eye(n), A.T @ (db_dx @ xd))
    assert_close(y_dot, expected_dot, 1e-9, f"{name}: ridge JVP")
    exact = onp.linalg.solve(A, db_dx @ xd)
    assert onp.linalg.norm(y_dot - exact) > 1e-3 * onp.linalg.norm(exact), "ridge had no effect"


def test_ridge_needs_a_least_squares_solver():
    with pytest.raises(UnsupportedError, match="ridge"):
        implicit_layer(lambda y, x: y - x, lambda x: x, linear_solver="lu", ridge=0.1)


# ------------------------------------------------------------------------------
# one factorization per forward point; a user-supplied solver with a cache
# ------------------------------------------------------------------------------

def _counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(onp.shape(args[0]))
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_lu_factors_once_per_forward_point(deq_data, monkeypatch):
    W, U, x = deq_data
    calls = _counting(monkeypatch, scipy.linalg, "lu_factor")
    layer = implicit_layer(deq_residual, deq_solver)       # 'auto' -> lu for small m
    J = jacobian(lambda x: layer(W, U, x))(x)               # m = 8 cotangents
    assert calls == [(DEQ_D, DEQ_D)], calls
    make_jvp(lambda x: layer(W, U, x))(x)(onp.ones(DEQ_K))  # a new forward point
    assert len(calls) == 2
    hessian(lambda x: np.sum(np.sin(layer(W, U, x))))(x)    # one point, solves of 1st and 2nd order
    assert len(calls) == 3, calls
    assert_close(J, fd_jacobian(lambda x: layer(W, U, x), x), RTOL, "jacobian with counted LU")


def test_cholesky_and_lstsq_factor_once(spd_data, monkeypatch):
    Q, x = spd_data
    chol = _counting(monkeypatch, scipy.linalg, "cho_factor")
    layer = argmin_layer(smooth_objective, y0=onp.zeros(len(x)), linear_solver="cholesky")
    jacobian(lambda x: layer(Q, x))(x)
    assert len(chol) == 1
    svd = _counting(monkeypatch, onp.linalg, "svd")
    layer = argmin_layer(smooth_objective, y0=onp.zeros(len(x)), linear_solver="lstsq")
    jacobian(lambda x: layer(Q, x))(x)
    assert len(svd) == 1


def test_user_supplied_solver_caches_its_factorization(deq_data):
    W, U, x = deq_data
    factorizations, solves = [], []

    def cached_lu(matvec, rmatvec, b, *, transpose=False, x_size=None, cache=None, point=None, **opts):
        """Form J from VJPs (rows J^T e_k), LU-factor it once per forward point."""
        if "my_lu" not in cache:
            vjp = matvec if transpose else rmatvec
            rows = [vjp(e) for e in onp.eye(b.shape[-1])]
            cache["my_lu"] = scipy.linalg.lu_factor(onp.array(rows))
            factorizations.append(point)
        solves.append(transpose)
        return scipy.linalg.lu_solve(cache["my_lu"], b, trans=1 if transpose else 0)

    with pytest.warns(DeprecationWarning, match="callable linear_solver"):
        layer = implicit_layer(deq_residual, deq_solver, linear_solver=cached_lu)
    J = jacobian(lambda x: layer(W, U, x))(x)
    assert len(factorizations) == 1 and len(solves) == DEQ_D and all(solves)
    assert factorizations[0].y is not None and factorizations[0].m == DEQ_D
    assert_close(J, fd_jacobian(lambda x: layer(W, U, x), x), RTOL, "user solver vs FD")
    loss = lambda x: np.sum(np.sin(layer(W, U, x)))
    H = hessian(loss)(x)
    assert len(factorizations) == 2          # one more forward point
    assert False in solves                   # second order used the non-transposed system too
    assert_close(H, fd_jacobian(grad(loss), x), RTOL, "user solver, hessian vs FD")


def test_auto_picks_lu_when_small_and_gmres_when_large(deq_data):
    W, U, x = deq_data
    small = implicit_layer(deq_residual, deq_solver)
    large = implicit_layer(deq_residual, deq_solver, dense_max=DEQ_D - 1)
    with record_points() as points:
        small(W, U, x)
        large(W, U, x)
    assert isinstance(points[0].linear_solver, linear_solvers.LU)
    assert isinstance(points[1].linear_solver, linear_solvers.GMRES)
    g_small = grad(lambda x: np.sum(small(W, U, x) ** 2))(x)
    g_large = grad(lambda x: np.sum(large(W, U, x) ** 2))(x)
    assert_close(g_large, g_small, 1e-9, "gmres == lu")


def test_unknown_solver_name_is_refused():
    with pytest.raises(ValueError, match="unknown linear_solver"):
        implicit_layer(lambda y, x: y - x, lambda x: x, linear_solver="qr")


# ------------------------------------------------------------------------------
# preconditioning and iterative refinement of the Krylov solvers
# ------------------------------------------------------------------------------

def _counting_matvec(A):
    """``v -> A v`` (also on (B, n) arrays, row by row) and its call counter."""
    calls = [0]

    def matvec(v):
        calls[0] += 1
        return v @ A.T
    return matvec, calls


def _badly_scaled(kind, n=100, seed=3):
    """``A = S K S`` with ``S = diag(logspace(0, 3))`` and a well-conditioned
    ``K`` (SPD, or symmetric indefinite with alternating signs): cond(A) ~ 1e6,
    while the Jacobi-preconditioned ``|diag A|^{-1/2} A |diag A|^{-1/2}`` is
    as well conditioned as ``K``."""
    rng = onp.random.default_rng(seed)
    C = rng.standard_normal((n, n))
    C = 0.15 * (C + C.T) / onp.sqrt(n)
    signs = onp.ones(n) if kind == "spd" else onp.where(onp.arange(n) % 2, 1.0, -1.0)
    S = onp.diag(onp.logspace(0, 3, n))
    return S @ (onp.diag(signs) + C) @ S, rng.standard_normal(n)


@pytest.mark.parametrize("name,kind", [("cg", "spd"), ("minres", "indefinite"),
                                       ("gmres", "indefinite"), ("bicgstab", "spd")])
def test_jacobi_preconditioner_on_badly_scaled_system(name, kind):
    A, b = _badly_scaled(kind)
    solve = getattr(linear_solvers, name)
    n = len(b)
    matvec, plain_calls = _counting_matvec(A)
    with pytest.raises(LinearSolveError, match="did not converge"):
        solve(matvec, matvec, b, rtol=1e-10, maxiter=5 * n)
    assert plain_calls[0] >= 5 * n
    matvec, calls = _counting_matvec(A)
    x = solve(matvec, matvec, b, rtol=1e-10, maxiter=5 * n, preconditioner=1 / onp.abs(onp.diag(A)))
    assert onp.linalg.norm(A @ x - b) <= 1e-10 * onp.linalg.norm(b)
    assert calls[0] <= n, f"{name}: {calls[0]} products with the preconditioner"
    # the same preconditioner as a callable, on a batch of two right-hand sides
    B = onp.stack([b, -2 * b])
    matvec, _ = _counting_matvec(A)
    X = solve(matvec, matvec, B, rtol=1e-10, preconditioner=lambda V: V / onp.abs(onp.diag(A)))
    assert onp.linalg.norm(X @ A.T - B) <= 1e-10 * onp.linalg.norm(B)


def _minres_backward_error_gap(n=60, seed=3):
    """Symmetric indefinite ``A`` with eigenvalues ``+-logspace(-3, 0)`` and ``b``
    mostly along the smallest ones: ``|A| |x| >> |b|``, so SciPy's MINRES, which
    stops on ``|r| / (|A| |x| + |b|) <= rtol``, leaves ``|r| / |b| >> rtol``."""
    rng = onp.random.default_rng(seed)
    Q, _ = onp.linalg.qr(rng.standard_normal((n, n)))
    lam = onp.logspace(-3, 0, n) * onp.where(onp.arange(n) % 3 == 0, -1.0, 1.0)
    A = Q @ onp.diag(lam) @ Q.T
    A = 0.5 * (A + A.T)
    return A, Q[:, :3] @ onp.ones(3) + 1e-2 * Q[:, 3:] @ rng.standard_normal(n - 3)


def test_refinement_reaches_the_true_residual():
    A, b = _minres_backward_error_gap()
    matvec, _ = _counting_matvec(A)
    with pytest.raises(LinearSolveError, match=r"residual \|A x - b\|/\|b\| = [0-9.e-]+ did not reach "
                                               r"rtol=1e-10 after \d+ iterations in 1 Krylov"):
        linear_solvers.minres(matvec, matvec, b, rtol=1e-10, refinements=0)
    x = linear_solvers.minres(matvec, matvec, b, rtol=1e-10, refinements=3)
    assert onp.linalg.norm(A @ x - b) <= 1e-10 * onp.linalg.norm(b)
    assert_close(x, onp.linalg.solve(A, b), 1e-6, "refined minres vs dense solve")


@pytest.mark.parametrize("name", ["cg", "minres", "gmres", "bicgstab"])
def test_unreachable_tolerance_is_met_at_the_noise_floor(name):
    """rtol = 1e-30 is below double precision: the refinement stalls at the
    operator's noise floor c sqrt(n) eps (|A| |x| + |b|), and that solution (as
    accurate as double precision allows) is accepted, not reported as a failure."""
    A, b = _badly_scaled("spd", n=20)
    matvec, _ = _counting_matvec(A)
    x = getattr(linear_solvers, name)(matvec, matvec, b, rtol=1e-30,
                                      preconditioner=1 / onp.diag(A), refinements=2)
    floor = linear_solvers.noise_floor(onp.linalg.norm(A, 2), onp.linalg.norm(x),
                                       onp.linalg.norm(b), len(b))
    assert onp.linalg.norm(b - A @ x) <= floor
    assert_close(x, onp.linalg.solve(A, b), 1e-8, f"{name} at the noise floor vs dense solve")


@pytest.mark.parametrize("name", ["cg", "minres", "gmres", "bicgstab"])
def test_not_converged_above_the_noise_floor_raises(name):
    """Too few iterations: the residual is far above the noise floor, so the error
    says how far it got instead of returning a wrong-precision answer."""
    A, b = _badly_scaled("spd", n=20)
    matvec, _ = _counting_matvec(A)
    with pytest.raises(LinearSolveError) as info:
        getattr(linear_solvers, name)(matvec, matvec, b, rtol=1e-30, maxiter=3, refinements=2)
    assert info.value.status in (linear_solvers.SolveStatus.MAX_STEPS_REACHED,
                                 linear_solvers.SolveStatus.STAGNATION)
    msg = str(info.value)
    assert f"{name} did not converge" in msg and "did not reach rtol=1e-30" in msg
    assert re.search(r"\|A x - b\|/\|b\| = \d", msg) and "noise floor" in msg, msg
    assert re.search(r"after \d+ iterations in [1-3] Krylov solve", msg), msg


def test_preconditioner_errors():
    A, b = _badly_scaled("spd", n=10)
    matvec, _ = _counting_matvec(A)
    with pytest.raises(ShapeError, match="shape"):
        linear_solvers.cg(matvec, matvec, b, preconditioner=onp.ones(9))
    with pytest.raises(LinearSolveError, match="positive definite"):
        linear_solvers.minres(matvec, matvec, b, preconditioner=-onp.ones(10))
    with pytest.raises(LinearSolveError, match="preconditioner"):
        linear_solvers.minres(matvec, matvec, b, preconditioner=lambda v: -v)
    with pytest.raises(UnsupportedError, match="point"):
        linear_solvers.gmres(matvec, matvec, b, preconditioner=linear_solvers.per_point(lambda p: 1.0))
    with pytest.raises(UnsupportedError, match="preconditioner"):
        linear_solvers.lsmr(matvec, matvec, b, preconditioner=onp.ones(10))


def test_per_point_preconditioner_in_a_layer():
    """F = A y + 0.1 d tanh(y) - x with the badly scaled SPD ``A`` and d = diag A:
    J = A + 0.1 diag(d sech^2 y).  The Jacobi preconditioner depends on y, so it
    is a per_point factory, evaluated once per forward point; gradients match
    finite differences; the plain CG fails within the same maxiter."""
    A, x = _badly_scaled("spd", n=60)
    d = onp.diag(A).copy()
    residual = lambda y, x: np.dot(A, y) + 0.1 * d * np.tanh(y) - x
    solver = lambda x: newton_solve(residual, onp.linalg.solve(A, x), x)
    made = []

    def jacobi(point):
        made.append(point)
        return 1.0 / (d + 0.1 * d / onp.cosh(point.y) ** 2)

    options = {"maxiter": 120, "rtol": 1e-11}
    layer = implicit_layer(residual, solver, linear_solver="cg", linear_solver_options={
        **options, "preconditioner": linear_solvers.per_point(jacobi)})
    rng = onp.random.default_rng(4)
    G = rng.standard_normal(len(x))
    loss = lambda x: np.sum(G * layer(x)) + np.sum(layer(x) ** 2)
    assert_grad_matches_fd(loss, x, grad(loss)(x), rng, 2, RTOL, "preconditioned cg: grad")
    n_points = len(made)
    J = jacobian(layer)(x)                     # one forward point, 60 cotangents
    assert len(made) == n_points + 1
    assert_close(J @ G, fd_directional(layer, x, G), RTOL, "preconditioned cg: jacobian")
    plain = implicit_layer(residual, solver, linear_solver="cg", linear_solver_options=options)
    with pytest.raises(LinearSolveError, match="maxiter=120"):
        grad(lambda x: np.sum(G * plain(x)))(x)


def _noisy_operator(n=300, seed=5, noise=8.0, indefinite=True):
    """A symmetric ``A`` (eigenvalues +-logspace(-2, 1)) whose products are rounded
    to a grid of spacing ``noise * eps * |A| |v|``: a deterministic rounding error of
    the size an autograd VJP through a long chain of operations carries.  With
    ``|A| |x| / |b| ~ 1e2`` the attainable relative residual is ~1e-13, so
    ``rtol = 1e-14`` lies below the operator's noise floor."""
    rng = onp.random.default_rng(seed)
    Q, _ = onp.linalg.qr(rng.standard_normal((n, n)))
    lam = onp.logspace(-2, 1, n) * (onp.where(onp.arange(n) % 2, 1.0, -1.0) if indefinite else 1.0)
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    norm_A = onp.abs(lam).max()

    def matvec(v):
        spacing = noise * linear_solvers.EPS * norm_A * onp.linalg.norm(v)
        exact = v @ A.T
        return onp.round(exact / spacing) * spacing if spacing > 0 else exact
    return A, matvec, Q @ onp.ones(n)


@pytest.mark.parametrize("name,indefinite", [("minres", False), ("gmres", False), ("cg", False)])
def test_rtol_below_the_noise_floor_of_the_operator_is_met_at_the_floor(name, indefinite):
    """Issue 14 item 1: the NCut example died with ``minres ... 1.27e-12 did not
    reach rtol=1e-12``: a true residual at the operator's rounding noise cannot be
    refined further.  The solve accepts it -- and it is as accurate as the
    products allow -- instead of raising."""
    A, matvec, b = _noisy_operator(indefinite=indefinite)
    x = getattr(linear_solvers, name)(matvec, matvec, b, rtol=1e-14)
    res = onp.linalg.norm(b - A @ x) / onp.linalg.norm(b)
    assert res > 1e-14          # rtol was indeed not reached: the regime of the failure
    floor = linear_solvers.noise_floor(onp.linalg.norm(A, 2), onp.linalg.norm(x),
                                       onp.linalg.norm(b), len(b)) / onp.linalg.norm(b)
    assert res <= floor
    x_ref = onp.linalg.solve(A, b)
    cond = onp.linalg.cond(A)
    assert onp.linalg.norm(x - x_ref) <= 10 * cond * floor * onp.linalg.norm(x_ref)


def test_noise_floor_does_not_excuse_a_solve_that_is_not_converged():
    """The same noisy operator with too few iterations: far above the floor, raises."""
    A, matvec, b = _noisy_operator()
    with pytest.raises(LinearSolveError, match="did not converge") as info:
        linear_solvers.minres(matvec, matvec, b, rtol=1e-14, maxiter=40)
    assert info.value.status is linear_solvers.SolveStatus.MAX_STEPS_REACHED
