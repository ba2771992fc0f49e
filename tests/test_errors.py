"""Loud failures: each is a typed error deriving from NimplicitError whose
message names the cause (and the numbers that show it)."""
import warnings

import autograd.numpy as np
import numpy as onp
import pytest
from autograd import grad, jacobian, make_jvp, make_vjp

from nimplicit import errors, implicit_layer
from nimplicit.errors import (LinearSolveError, NimplicitError, NonFiniteError, ResidualError,
                              ShapeError, SingularJacobianError, UnsupportedError)


def test_every_error_derives_from_the_base_class():
    for name in ("ShapeError", "NonFiniteError", "ResidualError", "SolverError", "NotConvergedError",
                 "SingularJacobianError", "LinearSolveError", "UnsupportedError"):
        assert issubclass(getattr(errors, name), NimplicitError), name
    assert issubclass(ShapeError, ValueError) and issubclass(UnsupportedError, NotImplementedError)


def test_residual_not_met_names_norm_and_tolerance():
    # the solver is off by 1e-3: F(y*, x) = 1e-3 at its output
    layer = implicit_layer(lambda y, x: y - x, lambda x: x + 1e-3)
    with pytest.raises(ResidualError) as info:
        layer(onp.array([1.0, 2.0]))
    msg = str(info.value)
    assert "residual is not met" in msg and "|F_0(y*, x)| = 0.001" in msg
    assert "residual_tol * (1 + s)" in msg and "size of the terms of that equation" in msg
    # a looser residual_tol accepts it; check_residual=False skips the check
    implicit_layer(lambda y, x: y - x, lambda x: x + 1e-3, residual_tol=1e-3)(onp.array([1.0, 2.0]))
    implicit_layer(lambda y, x: y - x, lambda x: x + 1e-3, check_residual=False)(onp.array([1.0]))


def test_residual_not_met_in_a_batch_names_the_instance():
    layer = implicit_layer(lambda y, x: y - x, lambda x: x + onp.array([[0.0], [0.5], [0.0]]),
                           batch_axis=0)
    with pytest.raises(ResidualError, match="batch instance 1"):
        layer(onp.ones((3, 1)))


@pytest.mark.parametrize("bad", [float("nan"), onp.array([1.0, onp.inf]), onp.array(onp.nan)],
                         ids=["float-nan", "array-inf", "0d-nan"])
def test_non_finite_input(bad):
    calls = []
    layer = implicit_layer(lambda y, x: y - x, lambda x: calls.append(1) or x)
    with pytest.raises(NonFiniteError, match=r"input 0 contains 1 non-finite value"):
        layer(bad)
    assert not calls, "the solver must not run on a non-finite input"


def test_non_finite_solver_output():
    layer = implicit_layer(lambda y, x: y - x, lambda x: onp.array([x[0], onp.nan]))
    with pytest.raises(NonFiniteError, match="the solver's output contains 1 non-finite") as info:
        layer(onp.array([1.0, 2.0]))
    assert "index (1,)" in str(info.value)
    tuple_layer = implicit_layer(lambda z, x: (z[0] - x, z[1] - x),
                                 lambda x: (x, onp.full_like(x, onp.inf)))
    with pytest.raises(NonFiniteError, match=r"solver's output \(component 1\)"):
        tuple_layer(onp.array([1.0]))


def test_singular_jacobian_names_condition_number_and_remedies():
    """F = y^2 - x at x = 0: y* = 0 and dF/dy = 2 y = 0."""
    layer = implicit_layer(lambda y, x: y ** 2 - x, lambda x: onp.sqrt(x))
    assert layer(0.0) == 0.0                                   # the forward is fine
    with pytest.raises(SingularJacobianError) as info, warnings.catch_warnings():
        warnings.simplefilter("error")                         # the typed error, no stray warning
        grad(layer)(0.0)
    msg = str(info.value)
    assert "condition number" in msg and "singular" in msg
    assert "lstsq" in msg and "ridge" in msg
    with pytest.raises(SingularJacobianError, match="condition number"):
        make_jvp(layer)(0.0)(1.0)


def test_ill_conditioned_jacobian_is_refused():
    """A y = x with cond(A) ~ 1e14 > max_condition = 1e12."""
    rng = onp.random.default_rng(0)
    Q1, _ = onp.linalg.qr(rng.standard_normal((3, 3)))
    Q2, _ = onp.linalg.qr(rng.standard_normal((3, 3)))
    A = Q1 @ onp.diag([1.0, 1e-7, 1e-14]) @ Q2
    layer = implicit_layer(lambda y, x: np.dot(A, y) - x, lambda x: onp.linalg.lstsq(A, x, rcond=None)[0],
                           check_residual=False)
    with pytest.raises(SingularJacobianError) as info:
        jacobian(layer)(onp.ones(3))
    msg = str(info.value)
    assert "ill-conditioned" in msg and "condition number" in msg and "max_condition" in msg
    cond = float(msg.split("condition number ")[1].split(" ")[0])
    assert 1e13 <= cond <= 1e16, msg
    # a well-conditioned matrix passes, and max_condition is an option of the solver
    loose = implicit_layer(lambda y, x: np.dot(A, y) - x, lambda x: onp.linalg.lstsq(A, x, rcond=None)[0],
                           check_residual=False, linear_solver_options={"max_condition": 1e16})
    jacobian(loose)(onp.ones(3))


def test_ill_conditioned_cholesky_is_refused():
    A = onp.diag([1.0, 1e-14])
    layer = implicit_layer(lambda y, x: np.dot(A, y) - x, lambda x: x / onp.diag(A),
                           linear_solver="cholesky")
    with pytest.raises(SingularJacobianError, match="condition number"):
        grad(lambda x: np.sum(layer(x)))(onp.array([1.0, 1e-14]))


def test_cholesky_on_indefinite_or_nonsymmetric_J():
    indefinite = implicit_layer(lambda y, x: np.array([y[0], -y[1]]) - x, lambda x: x * onp.array([1, -1.]),
                                linear_solver="cholesky")
    with pytest.raises(SingularJacobianError, match="not positive definite"):
        grad(lambda x: np.sum(indefinite(x)))(onp.ones(2))
    A = onp.array([[2.0, 1.0], [0.0, 2.0]])
    nonsym = implicit_layer(lambda y, x: np.dot(A, y) - x, lambda x: onp.linalg.solve(A, x),
                            linear_solver="cholesky")
    with pytest.raises(LinearSolveError, match="symmetric"):
        grad(lambda x: np.sum(nonsym(x)))(onp.ones(2))


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "cg", "minres"])
def test_krylov_not_converged_names_iterations_and_residual(name):
    """maxiter=2 on a 30-unknown SPD system with spread-out eigenvalues."""
    n = 30
    d = onp.linspace(1.0, 50.0, n)
    layer = implicit_layer(lambda y, x: d * y + 0.01 * y ** 3 - x,
                           lambda x: _diag_newton(d, x), linear_solver=name,
                           linear_solver_options={"maxiter": 2})
    x = onp.linspace(-1, 1, n)
    with pytest.raises(LinearSolveError) as info:
        grad(lambda x: np.sum(layer(x) * onp.arange(n)))(x)
    msg = str(info.value)
    assert f"{name} did not converge" in msg
    assert "relative residual" in msg and "iterations" in msg and "maxiter=2" in msg


def _diag_newton(d, x):
    y = x / d
    for _ in range(30):
        y = y - (d * y + 0.01 * y ** 3 - x) / (d + 0.03 * y ** 2)
    return y


def test_lsmr_not_converged():
    n = 30
    d = onp.linspace(1.0, 50.0, n)
    layer = implicit_layer(lambda y, x: d * y - x, lambda x: x / d, linear_solver="lsmr",
                           linear_solver_options={"maxiter": 2})
    with pytest.raises(LinearSolveError, match="lsmr did not converge after 2 iterations"):
        grad(lambda x: np.sum(layer(x) * onp.arange(n)))(onp.linspace(-1, 1, n))


def test_residual_and_output_of_different_sizes():
    layer = implicit_layer(lambda y, x: np.concatenate([y - x, y[:1]]), lambda x: x)
    with pytest.raises(ShapeError, match=r"3 entries per instance but the solver's output has 2") as info:
        layer(onp.array([0.0, 0.0]))
    assert "lstsq" in str(info.value)
    for name in ("lu", "cholesky"):
        layer = implicit_layer(lambda y, x: np.concatenate([y - x, y[:1]]), lambda x: x, linear_solver=name)
        with pytest.raises(ShapeError, match="square"):
            layer(onp.array([0.0, 0.0]))


def test_batch_size_mismatch_between_residual_and_output():
    layer = implicit_layer(lambda y, x: y[:2] - x[:2], lambda x: x, batch_axis=0)
    with pytest.raises(ShapeError, match="instances"):
        layer(onp.zeros((3, 2)))


def test_non_finite_cotangent():
    layer = implicit_layer(lambda y, x: y - np.sin(x), lambda x: onp.sin(x))
    vjp, _ = make_vjp(layer)(onp.array([0.1, 0.2]))
    with pytest.raises(NonFiniteError, match="cotangent"):
        vjp(onp.array([1.0, onp.nan]))
    jvp = make_jvp(layer)(onp.array([0.1, 0.2]))
    with pytest.raises(NonFiniteError, match="tangent"):
        jvp(onp.array([onp.inf, 0.0]))


def test_non_finite_residual_at_the_solution():
    layer = implicit_layer(lambda y, x: np.log(y) - x + 0 * y, lambda x: onp.zeros_like(x))
    with pytest.raises(NonFiniteError, match="residual"):
        with onp.errstate(divide="ignore"):
            layer(onp.array([1.0]))


def test_second_order_through_a_pseudo_inverse_is_unsupported():
    layer = implicit_layer(lambda y, x: y - x, lambda x: x, linear_solver="lsmr")
    assert grad(lambda x: np.sum(layer(x) ** 2))(onp.ones(2)) == pytest.approx([2.0, 2.0])
    with pytest.raises(UnsupportedError, match="order >= 2"):
        grad(lambda x: np.sum(grad(lambda x: np.sum(layer(x) ** 2))(x)))(onp.ones(2))
