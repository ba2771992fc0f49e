"""The core's dtype policy and input validation (issue 15 item 5, issue 11 items 3, 4, 7).

float64 and float32 inputs are accepted; a float32 solver's output comes back
float32 (undifferentiated); derivatives are computed in float64 (returned in
the input's dtype, autograd's convention) and match finite differences; float16, complex and object inputs, and differentiated integer
inputs, raise DTypeError; residual_tol must be finite and >= 0; the residual
check is per equation; batch_axis independence is probed.
"""
import autograd.numpy as np
import numpy as onp
import pytest
from autograd import grad, jacobian

from helpers import assert_close, fd_grad
from nimplicit import implicit_layer
from nimplicit.errors import (CouplingError, DTypeError, NimplicitError, OptionError,
                              ResidualError)


def _residual(y, x):
    return y ** 3 + y - x


def _solver(x):
    x = onp.asarray(x)
    y = onp.zeros_like(x, dtype=float)
    for _ in range(60):
        y = y - (y ** 3 + y - x) / (3 * y ** 2 + 1)
    return y.astype(x.dtype) if x.dtype.kind == "f" else y


layer = implicit_layer(_residual, _solver)


def test_float32_solver_gives_float32_output_and_derivatives_computed_in_float64():
    x32 = onp.array([0.3, -1.2, 2.0], dtype=onp.float32)
    y = layer(x32)
    assert y.dtype == onp.float32
    assert_close(y, _solver(x32.astype(float)), 1e-6, "float32 value")
    g = grad(lambda x: np.sum(layer(x) ** 2))(x32)
    assert g.dtype == onp.float32          # autograd returns a gradient in its input's dtype
    # the derivative at the float32 solution, against FD of the float64 forward
    x64 = x32.astype(float)
    assert_close(g, fd_grad(lambda x: onp.sum(_solver(x) ** 2), x64), 1e-5, "float32 gradient")


@pytest.mark.parametrize("bad,match", [
    (onp.array([1.0, 2.0], dtype=onp.float16), "float16"),
    (onp.array([1.0 + 1j, 2.0]), "complex"),
    (onp.array([1.0, "a"], dtype=object), "dtype object"),
])
def test_unsupported_input_dtypes_are_typed_errors(bad, match):
    with pytest.raises(DTypeError, match=match) as info:
        layer(bad)
    assert isinstance(info.value, (NimplicitError, TypeError))


def test_integer_input_is_fine_undifferentiated_but_not_differentiated():
    y = layer(onp.array([1, 2]))
    assert_close(y, _solver(onp.array([1.0, 2.0])), 1e-14, "integer input")
    two = implicit_layer(lambda y, x, k: y - x * k, lambda x, k: x * k)
    assert_close(grad(lambda x: np.sum(two(x, onp.array([2, 3]))))(onp.ones(2)),
                 onp.array([2.0, 3.0]), 1e-14, "integer parameter")


@pytest.mark.parametrize("tol", [float("nan"), float("inf"), -1e-6, "1e-6x"])
def test_residual_tol_must_be_finite_and_non_negative(tol):
    with pytest.raises(OptionError, match="residual_tol"):
        implicit_layer(_residual, _solver, residual_tol=tol)


def test_residual_check_is_per_equation_not_fooled_by_an_unrelated_large_input():
    """Issue 11 item 4: the solver is off by 1e-2 in equation 0, an unrelated input is 1e5."""
    def residual(y, x, big):
        return np.stack([y[0] - x[0], y[1] - big[0] * x[1]])

    off = implicit_layer(residual, lambda x, big: onp.array([x[0] + 1e-2, big[0] * x[1]]))
    with pytest.raises(ResidualError, match=r"\|F_0\(y\*, x\)\| = 0.01"):
        off(onp.array([1.0, 1.0]), onp.array([1e5]))
    # rounding-level residuals at large scales pass (equation 1 has terms of size 1e5)
    ok = implicit_layer(residual, lambda x, big: onp.array([x[0], big[0] * x[1] * (1 + 1e-15)]))
    ok(onp.array([1.0, 1.0]), onp.array([1e5]))
    # and at tiny scales the absolute floor tol * 1 applies
    ok(onp.array([1e-9, 1e-9]), onp.array([1e-9]))


def test_batch_axis_coupling_is_detected():
    """Issue 11 item 3: a residual that couples the instances of a batch."""
    def coupled(y, x):
        return y - x + 0.1 * np.sum(y, axis=0, keepdims=True)

    def solve(x):
        B = x.shape[0]
        M = onp.eye(B) + 0.1 * onp.ones((B, B))
        return onp.linalg.solve(M, x)

    lay = implicit_layer(coupled, solve, batch_axis=0)
    x = onp.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(CouplingError, match="couples them"):
        grad(lambda x: np.sum(lay(x) ** 2))(x)
    # the joint system without batch_axis is right
    joint = implicit_layer(coupled, solve)
    J = jacobian(joint)(x).reshape(12, 12)
    assert_close(J, onp.kron(onp.linalg.inv(onp.eye(4) + 0.1 * onp.ones((4, 4))), onp.eye(3)),
                 1e-10, "joint derivative")


def test_independent_batch_passes_the_probe():
    lay = implicit_layer(lambda y, x: y ** 3 + y - x, _solver, batch_axis=0)
    x = onp.random.default_rng(1).standard_normal((5, 2))
    g = grad(lambda x: np.sum(lay(x)))(x)
    y = _solver(x)
    assert_close(g, 1 / (3 * y ** 2 + 1), 1e-10, "batched gradient")
