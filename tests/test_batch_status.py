"""``throw=False``: one bad instance of a batch does not cost the others their results.

For every kind of failure: the bad instance's outcome and message, NaN rows for it,
the good instances' outputs and gradients equal to those of a batch of the good
instances alone, gradients (reverse, forward, second order) checked against finite
differences of the forward's actual output, and ``throw=True`` unchanged.
"""
import pickle
import warnings

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad, make_jvp

from nimplicit import BatchStatus, Outcome, Solution, implicit_layer
from nimplicit.errors import (NonFiniteError, OptionError, ResidualError,
                              SingularJacobianError)
from reference_layers.qp import InfeasibleQPError, NonConvexQPError, qp_layer
from verification import check_grad

TIGHT = dict(rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------
# user layers
# ------------------------------------------------------------------------------

def sqrt_residual(y, x, a):
    return y ** 2 - a * x


def newton_sqrt(x, a):
    """Newton on y^2 = a x, elementwise: where a x < 0 it wanders and never converges."""
    z = a * np.asarray(x, float)
    y = np.ones_like(z)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(60):
            y = y - (y * y - z) / (2 * y)
    return y


def sqrt_layer(throw=True):
    return implicit_layer(sqrt_residual, newton_sqrt, batch_axis=0, throw=throw)


X = np.array([[4.0, 2.0], [1.5, 3.0], [-1.0, 3.0], [9.0, 5.0]])
GOOD = np.array([0, 1, 3])


def good_rows(layer):
    """The layer's output restricted to the good instances (an autograd function)."""
    return lambda x, a: layer(x, a)[0][GOOD]


def assert_like_good_only(layer, good_layer, x, a):
    y, status = layer(x, a)
    y_good = good_layer(x[GOOD], a)
    np.testing.assert_allclose(y[GOOD], y_good, **TIGHT)

    def loss(x, a):
        return anp.sum(anp.sin(layer(x, a)[0][GOOD]))

    def loss_good(x, a):
        return anp.sum(anp.sin(good_layer(x, a)))

    gx, ga = grad(loss, 0)(x, a), grad(loss, 1)(x, a)
    gx_good, ga_good = grad(loss_good, 0)(x[GOOD], a), grad(loss_good, 1)(x[GOOD], a)
    assert np.all(np.isfinite(gx)) and np.isfinite(ga)
    np.testing.assert_allclose(gx[GOOD], gx_good, **TIGHT)
    bad = np.setdiff1d(np.arange(len(x)), GOOD)
    assert np.all(gx[bad] == 0.0)
    np.testing.assert_allclose(ga, ga_good, rtol=1e-14, atol=1e-14)
    return y, status


def test_newton_sqrt_with_a_negative_instance():
    layer, good = sqrt_layer(throw=False), sqrt_layer()
    y, status = assert_like_good_only(layer, good, X, 1.3)
    assert isinstance(status, BatchStatus) and len(status) == 4
    assert status.ok.tolist() == [True, True, False, True]
    assert status[2] == Outcome.RESIDUAL_NOT_MET and status.failed.tolist() == [2]
    assert "instance 2: RESIDUAL_NOT_MET: |F_" in status.messages[2]
    assert status.messages[0] == "ok"
    assert np.all(np.isnan(y[2]))
    # the derivatives of the good instances against finite differences of the forward
    check_grad(good_rows(layer), X, 1.3, modes=("rev", "fwd"), raise_on_fail=True)
    # and a second-order check, through the shared input a
    check_grad(lambda a: layer(X, a)[0][GOOD], 1.3, order=2, modes=("rev", "fwd"),
               raise_on_fail=True)


def test_throw_true_unchanged_raises_the_same_error():
    with pytest.raises(ResidualError, match="batch instance 2"):
        sqrt_layer()(X, 1.3)
    with pytest.raises(ResidualError, match="batch instance 2"):
        implicit_layer(sqrt_residual, newton_sqrt, batch_axis=0, throw=True)(X, 1.3)
    with pytest.raises(NonFiniteError, match="solver's output"):
        implicit_layer(root_residual, root_solver, batch_axis=0)(X, 1.3)


def test_jvp_of_the_good_instances():
    layer, good = sqrt_layer(throw=False), sqrt_layer()
    v = np.random.default_rng(1).standard_normal(X.shape)
    y, y_dot = make_jvp(lambda x: layer(x, 1.3)[0])(X)(v)
    _, y_dot_good = make_jvp(lambda x: good(x, 1.3))(X[GOOD])(v[GOOD])
    np.testing.assert_allclose(y_dot[GOOD], y_dot_good, **TIGHT)
    assert np.all(y_dot[2] == 0.0)
    _, a_dot = make_jvp(lambda a: layer(X, a)[0])(1.3)(1.0)
    _, a_dot_good = make_jvp(lambda a: good(X[GOOD], a))(1.3)(1.0)
    np.testing.assert_allclose(a_dot[GOOD], a_dot_good, **TIGHT)


def test_all_good_is_the_throw_true_result():
    x = np.abs(X)
    y, status = sqrt_layer(throw=False)(x, 1.3)
    assert status.ok.all() and repr(status) == "BatchStatus(4 instances, all OK)"
    np.testing.assert_array_equal(y, sqrt_layer()(x, 1.3))
    g = grad(lambda a: anp.sum(sqrt_layer(throw=False)(x, a)[0]))(1.3)
    assert g == grad(lambda a: anp.sum(sqrt_layer()(x, a)))(1.3)


# -- a solver that reports the failure itself ---------------------------------

def flagging_solver(x, a):
    """Converges for every instance but reports instance 2 as failed (finite rows)."""
    y = np.sqrt(a * np.abs(x))
    return Solution(y, status={"instance_ok": np.arange(len(x)) != 2})


def test_solver_reported_failure():
    x = np.abs(X)
    layer = implicit_layer(sqrt_residual, flagging_solver, batch_axis=0, throw=False)
    good = implicit_layer(sqrt_residual, flagging_solver, batch_axis=0)
    y, status = assert_like_good_only(layer, good, x, 0.7)
    assert status[2] == Outcome.SOLVER_FAILED and status.failed.tolist() == [2]
    assert "forward solver reported" in status.messages[2]
    assert np.all(np.isnan(y[2]))
    check_grad(good_rows(layer), x, 0.7, modes=("rev", "fwd"), raise_on_fail=True)
    # throw=True: the solver's own status is kept as it is today (no error of its own)
    np.testing.assert_array_equal(good(x, 0.7), np.sqrt(0.7 * x))


def test_solver_reports_a_batch_status_with_its_own_outcome():
    def solver(x, a):
        y = np.sqrt(a * np.abs(x))
        return Solution(y, status=BatchStatus.from_failures(
            len(x), {2: (Outcome.NOT_CONVERGED, "hit max_iter=3")}))
    layer = implicit_layer(sqrt_residual, solver, batch_axis=0, throw=False)
    _, status = layer(np.abs(X), 0.7)
    assert status[2] == Outcome.NOT_CONVERGED
    assert status.messages[2] == "instance 2: NOT_CONVERGED: hit max_iter=3"


# -- a residual that is not met on one instance -------------------------------

def sloppy_solver(x, a):
    y = newton_sqrt(np.abs(x), a)
    y[2] += 1e-2
    return y


def test_residual_not_met_on_one_instance():
    x = np.abs(X)
    layer = implicit_layer(sqrt_residual, sloppy_solver, batch_axis=0, throw=False)
    good = sqrt_layer()
    y, status = assert_like_good_only(layer, good, x, 1.3)
    assert status.failed.tolist() == [2] and status[2] == Outcome.RESIDUAL_NOT_MET
    assert "|F_" in status.messages[2] and "residual_tol" in status.messages[2]
    check_grad(good_rows(layer), x, 1.3, modes=("rev", "fwd"), raise_on_fail=True)
    with pytest.raises(ResidualError, match="batch instance 2"):
        implicit_layer(sqrt_residual, sloppy_solver, batch_axis=0)(x, 1.3)


# -- a singular block of J ----------------------------------------------------

def cube_residual(y, x, a):
    return y ** 3 - a * x


def cube_solver(x, a):
    return np.cbrt(a * np.asarray(x, float))


def test_singular_block_of_the_jacobian():
    x = np.abs(X)
    x[2] = 0.0                                # y = 0: dF/dy = 3 y^2 = 0
    layer = implicit_layer(cube_residual, cube_solver, batch_axis=0, throw=False)
    good = implicit_layer(cube_residual, cube_solver, batch_axis=0)
    y, status = assert_like_good_only(layer, good, x, 1.3)
    assert status.failed.tolist() == [2] and status[2] == Outcome.SINGULAR_JACOBIAN
    assert "max_condition" in status.messages[2]
    check_grad(good_rows(layer), x, 1.3, modes=("rev", "fwd"), raise_on_fail=True)
    with pytest.raises(SingularJacobianError, match="batch instance 2"):
        grad(lambda a: anp.sum(good(x, a)))(1.3)


def test_failed_block_is_replaced_by_the_identity_for_any_linear_solver():
    """A wrong row at a singular point (J_b = 0): Cholesky needs the masked block."""
    def solver(x, a):
        y = cube_solver(x, a)
        y[2] = 0.0                            # residual -a x != 0 and dF/dy = 0 there
        return y
    x = np.abs(X)
    layer = implicit_layer(cube_residual, solver, batch_axis=0, throw=False,
                           linear_solver="cholesky")
    good = implicit_layer(cube_residual, cube_solver, batch_axis=0, linear_solver="cholesky")
    _, status = assert_like_good_only(layer, good, x, 1.3)
    assert status[2] == Outcome.RESIDUAL_NOT_MET


# -- residuals whose partials are NaN on the failed instance ------------------

def root_residual(y, x, a):
    return y - anp.sqrt(a * x)


def root_solver(x, a):
    with np.errstate(invalid="ignore"):
        return np.sqrt(a * np.asarray(x, float))


def test_nan_partials_of_a_batched_input_are_the_failed_rows_own():
    layer = implicit_layer(root_residual, root_solver, batch_axis=0, throw=False)
    good = implicit_layer(root_residual, root_solver, batch_axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y, status = layer(X, 1.3)
        assert status[2] == Outcome.NON_FINITE_OUTPUT
        gx = grad(lambda x: anp.sum(layer(x, 1.3)[0][GOOD] ** 2))(X)
        assert np.all(np.isfinite(gx)) and np.all(gx[2] == 0.0)
        np.testing.assert_allclose(
            gx[GOOD], grad(lambda x: anp.sum(good(x, 1.3) ** 2))(X[GOOD]), **TIGHT)
        # the shared input a: 0 * NaN would reach it: a typed error naming the instance
        with pytest.raises(NonFiniteError, match=r"failed instance\(s\) \[2\]"):
            grad(lambda a: anp.sum(layer(X, a)[0][GOOD] ** 2))(1.3)


def test_non_finite_residual_on_one_instance():
    def log_residual(y, x):
        return anp.log(y) - x

    def solver(x):
        y = np.exp(x)
        y[2] = -1.0                           # finite, but log(-1) is NaN
        return y
    layer = implicit_layer(log_residual, solver, batch_axis=0, throw=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y, status = layer(X)
        assert status.failed.tolist() == [2] and status[2] == Outcome.NON_FINITE_RESIDUAL
        np.testing.assert_allclose(y[GOOD], np.exp(X[GOOD]), **TIGHT)
        g = grad(lambda x: anp.sum(layer(x)[0][GOOD]))(X)
        assert np.all(g[2] == 0.0)
        np.testing.assert_allclose(g[GOOD], np.exp(X[GOOD]), rtol=1e-14)
        check_grad(lambda x: layer(x)[0][GOOD], X, modes=("rev", "fwd"), raise_on_fail=True)


def test_coupling_still_raises_and_points_are_recorded():
    from nimplicit import record_points
    from nimplicit.errors import CouplingError

    def coupled(y, x):
        return y - x + 0.1 * anp.sum(y, axis=0, keepdims=True)

    def solver(x):
        return np.linalg.solve(np.eye(len(x)) + 0.1, x)
    layer = implicit_layer(coupled, solver, batch_axis=0, throw=False)
    x = np.abs(X)
    with record_points() as points:
        y, status = layer(x)
    assert status.ok.all() and len(points) == 1
    with pytest.raises(CouplingError):
        grad(lambda x: anp.sum(layer(x)[0]))(x)


# -- no batch axis: one instance ----------------------------------------------

def test_unbatched_is_one_instance():
    layer = implicit_layer(sqrt_residual, newton_sqrt, throw=False)
    y, status = layer(np.array([4.0, 2.0]), 1.0)
    assert len(status) == 1 and status.ok.all()
    np.testing.assert_array_equal(y, implicit_layer(sqrt_residual, newton_sqrt)(
        np.array([4.0, 2.0]), 1.0))
    y, status = layer(np.array([4.0, -2.0]), 1.0)
    assert len(status) == 1 and status[0] == Outcome.RESIDUAL_NOT_MET
    assert np.all(np.isnan(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, status = implicit_layer(root_residual, root_solver, throw=False)(
            np.array([4.0, -2.0]), 1.0)
    assert status[0] == Outcome.NON_FINITE_OUTPUT
    g = grad(lambda a: anp.sum(anp.where(np.isnan(y), 0.0, layer(np.array([4.0, -2.0]), a)[0])))
    assert g(1.0) == 0.0


def test_throw_option_is_validated_and_the_layer_pickles():
    with pytest.raises(OptionError, match="throw"):
        implicit_layer(sqrt_residual, newton_sqrt, batch_axis=0, throw="no")
    layer = pickle.loads(pickle.dumps(sqrt_layer(throw=False)))
    assert layer.throw is False and layer(X, 1.3)[1].failed.tolist() == [2]


def test_batch_status_validation():
    with pytest.raises(ValueError):
        BatchStatus([0, 99])
    with pytest.raises(ValueError):
        BatchStatus([0, 1], ["a"])


# ------------------------------------------------------------------------------
# the QP: one infeasible, one non-convex instance
# ------------------------------------------------------------------------------

def qp_batch():
    rng = np.random.default_rng(0)
    B, n = 5, 3
    M = rng.standard_normal((B, n, n))
    Q = M @ M.transpose(0, 2, 1) + np.eye(n)
    q = rng.standard_normal((B, n))
    G = np.concatenate([np.eye(n), -np.eye(n)])[None].repeat(B, axis=0)
    h = np.full((B, 2 * n), 0.3)
    h[1, 0], h[1, n] = -1.0, -1.0          # y_0 <= -1 and y_0 >= 1: infeasible
    Q[3] = -np.eye(n)                      # concave objective: not convex
    return Q, q, G, h


QP_GOOD = np.array([0, 2, 4])


@pytest.mark.parametrize("backward", ["structured", "generic"])
def test_qp_batch_with_an_infeasible_and_a_nonconvex_instance(backward):
    Q, q, G, h = qp_batch()
    y, status = qp_layer(Q, q, G, h, throw=False, backward=backward)
    assert status.failed.tolist() == [1, 3]
    assert status[1] == Outcome.INFEASIBLE and status[3] == Outcome.NOT_CONVEX
    assert "Primal infeasible" in status.messages[1]
    assert np.all(np.isnan(y[[1, 3]]))
    k = QP_GOOD
    np.testing.assert_allclose(y[k], qp_layer(Q[k], q[k], G[k], h[k], backward=backward),
                               **TIGHT)

    def loss(q, h):
        return anp.sum(anp.sin(qp_layer(Q, q, G, h, throw=False, backward=backward)[0][k]))

    def loss_good(q, h):
        return anp.sum(anp.sin(qp_layer(Q[k], q, G[k], h, backward=backward)))

    for arg in (0, 1):
        g = grad(loss, arg)(q, h)
        g_good = grad(loss_good, arg)(q[k], h[k])
        assert np.all(np.isfinite(g)) and np.all(g[[1, 3]] == 0.0)
        np.testing.assert_allclose(g[k], g_good, **TIGHT)
    check_grad(lambda q, h: qp_layer(Q, q, G, h, throw=False, backward=backward)[0][k], q, h,
               modes=("rev", "fwd"), raise_on_fail=True)
    # a shared (unbatched) q: its gradient is the sum over the good instances only
    gq = grad(lambda q: anp.sum(qp_layer(Q, q, G, h, throw=False, backward=backward)[0][k]))(q[0])
    gq_good = grad(lambda q: anp.sum(qp_layer(Q[k], q, G[k], h[k], backward=backward)))(q[0])
    np.testing.assert_allclose(gq, gq_good, rtol=1e-13, atol=1e-14)


def test_qp_full_output_and_throw_true():
    Q, q, G, h = qp_batch()
    (y, lam, nu), status = qp_layer(Q, q, G, h, throw=False, full_output=True)
    assert lam.shape == (5, 0) and np.all(np.isnan(nu[[1, 3]]))
    k = QP_GOOD
    _, _, nu_good = qp_layer(Q[k], q[k], G[k], h[k], full_output=True)
    np.testing.assert_allclose(nu[k], nu_good, **TIGHT)
    with pytest.raises(InfeasibleQPError, match="batch instance 1") as info:
        qp_layer(Q, q, G, h)
    assert info.value.instances == [1, 3]
    with pytest.raises(NonConvexQPError):
        qp_layer(Q[3], q[3], G[3], h[3])
    y, status = qp_layer(Q[3], q[3], G[3], h[3], throw=False)
    assert len(status) == 1 and status[0] == Outcome.NOT_CONVEX and np.all(np.isnan(y))


def test_qp_with_equalities_and_a_failed_instance():
    Q, q, G, h = qp_batch()
    A = np.ones((5, 1, 3))
    b = np.full((5, 1), 0.2)
    k = QP_GOOD
    (y, lam, nu), status = qp_layer(Q, q, G, h, A, b, throw=False, full_output=True)
    assert status.failed.tolist() == [1, 3]
    y_good, lam_good, _ = qp_layer(Q[k], q[k], G[k], h[k], A[k], b[k], full_output=True)
    np.testing.assert_allclose(y[k], y_good, **TIGHT)
    np.testing.assert_allclose(lam[k], lam_good, **TIGHT)
    check_grad(lambda b: qp_layer(Q, q, G, h, A, b, throw=False)[0][k], b,
               modes=("rev", "fwd"), raise_on_fail=True)


def test_qp_second_order_through_the_good_instances():
    Q, q, G, h = qp_batch()
    k = QP_GOOD
    check_grad(lambda s: qp_layer(Q * s, q, G, h, throw=False)[0][k], 1.5, order=2,
               modes=("rev", "fwd"), raise_on_fail=True)

    def loss(s):
        return anp.sum(anp.sin(qp_layer(Q * s, q, G, h, throw=False)[0][k]))

    def loss_good(s):
        return anp.sum(anp.sin(qp_layer(Q[k] * s, q[k], G[k], h[k])))
    d2 = grad(grad(loss))(1.5)
    assert np.isfinite(d2) and d2 != 0.0
    np.testing.assert_allclose(d2, grad(grad(loss_good))(1.5), **TIGHT)


def test_second_order_of_a_user_layer_vs_the_good_only_batch():
    layer, good = sqrt_layer(throw=False), sqrt_layer()

    def loss(a):
        return anp.sum(anp.sin(layer(X, a)[0][GOOD]))

    def loss_good(a):
        return anp.sum(anp.sin(good(X[GOOD], a)))
    np.testing.assert_allclose(grad(grad(loss))(1.3), grad(grad(loss_good))(1.3), **TIGHT)
