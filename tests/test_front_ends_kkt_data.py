"""constrained_argmin_layer: the forward's data (first derivatives, Hessian of the
Lagrangian) is computed once and shared by the default forward, its check and the
backward's dF/dz; these tests pin that sharing to what it replaces."""
import pickle

import autograd.numpy as np
import numpy as onp
import pytest
from autograd import grad, jacobian

from conftest import assert_close
import nimplicit
from nimplicit import constrained_argmin_layer, kkt
from nimplicit.errors import NotAMinimumError
from nimplicit.front_ends import _KKTAux, _Local, _Problem


def _quartic_disc():
    """Nonlinear objective, a linear equality and a nonlinear inequality (strictly active
    for the draws below): every block of dF/dz is non-trivial."""
    return constrained_argmin_layer(
        lambda y, x: np.sum((y - x) ** 4) + 0.5 * np.dot(y, y),
        eq=lambda y, x: np.reshape(np.sum(y) - 0.3, (1,)),
        ineq=lambda y, x: np.reshape(np.sum(y ** 2) - 0.05, (1,)),
        y0=lambda x: onp.zeros(onp.shape(x)))


def _box():
    return constrained_argmin_layer(lambda y, x, lo, hi: 0.5 * np.sum((y - x) ** 2),
                                    ineq=lambda y, x, lo, hi: np.concatenate([y - hi, lo - y]),
                                    y0=lambda x, lo, hi: onp.zeros(onp.shape(x)))


def _point(layer, *inputs):
    with nimplicit.record_points() as points:
        layer(*inputs)
    return points[-1]


@pytest.mark.parametrize("seed", range(4))
def test_forward_kkt_jacobian_equals_the_vjp_formed_one(seed):
    x = 2.0 * onp.random.default_rng(seed).standard_normal(4)
    point = _point(_quartic_disc(), x)
    nu = point.y[2]
    assert nu[0] > 1e-3                                     # the disc constraint is active
    assert point.aux.forward is not None
    J_forward = point.aux.dense(point.operator)
    J_vjp = point.operator.dense()                          # one VJP of F per row
    assert J_forward is not J_vjp
    assert_close(J_forward, J_vjp, 1e-12, "dF/dz from the forward's data")


def test_moved_point_falls_back_to_vjps():
    """An interceptor moving y (a mutation test's wrong point) keeps the solver's aux:
    dF/dz must then come from the residual at the moved point, not the forward's data."""
    layer = _quartic_disc()
    x = onp.array([1.5, -0.7, 2.2, 0.3])

    def move(layer_, raw_inputs, solution):
        y, lam, nu = solution.y
        return nimplicit.Solution((y * (1 + 1e-3), lam, nu), solution.aux, solution.status)

    with nimplicit.intercept_forward(move, check_residual=False), \
            nimplicit.record_points() as points:
        layer(x)
    point = points[-1]
    J = point.aux.dense(point.operator)
    assert J is point.operator.dense()
    # and the derivative through the moved point is the VJP-formed one's
    with nimplicit.intercept_forward(move, check_residual=False):
        g = grad(lambda x: np.sum(layer(x)[0] * onp.arange(1.0, 5.0)))(x)
    with nimplicit.intercept_forward(move, check_residual=False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_KKTAux, "dense", lambda self, operator: operator.dense())
            g_ref = grad(lambda x: np.sum(layer(x)[0] * onp.arange(1.0, 5.0)))(x)
    assert_close(g, g_ref, 1e-13, "gradient at a moved point")


def test_gradient_matches_the_vjp_formed_backward():
    layer = _quartic_disc()
    x = onp.array([1.5, -0.7, 2.2, 0.3])
    f = lambda x: np.concatenate(layer(x))
    J = jacobian(f)(x)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_KKTAux, "dense", lambda self, operator: operator.dense())
        J_ref = jacobian(f)(x)
    assert_close(J, J_ref, 1e-11, "dz/dx")


def test_pickled_aux_drops_the_forward_closures():
    point = _point(_box(), onp.array([0.9, -0.1, -2.0]), -onp.ones(3) * 0.5, onp.ones(3) * 0.5)
    aux = pickle.loads(pickle.dumps(point.aux))
    assert aux.forward is None and aux.offset == point.aux.offset
    assert onp.array_equal(aux.weak, point.aux.weak)
    assert aux.dense(point.operator) is point.operator.dense()


def test_local_first_order_data_is_shared_and_matches_autograd():
    pb = _Problem(lambda y, x: np.sum(np.sin(y) * x), lambda y, x: np.array([np.sum(y ** 3)]),
                  lambda y, x: np.concatenate([y ** 2 - x, -y]))
    x = onp.array([0.3, 1.2, -0.4])
    local = _Local(pb, (3,), (x,))
    v = onp.array([0.2, -0.5, 0.7])
    g1, J1 = local.constraint("g", v)
    g2, J2 = local.constraint("g", v.copy())
    assert J1 is J2                                          # traced once per point
    assert_close(J1, jacobian(lambda v: pb.ineq(v, x))(v), 1e-15, "Jg")
    assert_close(local.grad_f(v), grad(lambda v: pb.objective(v, x))(v), 1e-15, "grad f")
    lam, nu = onp.array([0.7]), onp.array([0.1, 0.0, 0.4, 0.0, 0.0, 2.0])
    from autograd import hessian
    H_ref = hessian(lambda v: pb.lagrangian(v, lam, nu, x))(v)
    assert_close(local.hessian(v, lam, nu), H_ref, 1e-14, "Hessian of the Lagrangian")
    assert onp.array_equal(local.ineq_jac(v), -J1) and local.ineq_jac(v) is not J1


def test_second_order_check_forms_the_hessian_only_for_a_nontrivial_null_space():
    calls = []

    def H():
        calls.append(1)
        return -onp.eye(2)
    kkt.check_second_order("t", H, onp.eye(2))              # null space {0}: nothing to check
    assert calls == []
    with pytest.raises(NotAMinimumError):
        kkt.check_second_order("t", H, onp.array([[1.0, 0.0]]))
    assert calls == [1]
    kkt.check_second_order("t", lambda: onp.diag([-1.0, 1.0]), onp.array([[1.0, 0.0]]))
    with pytest.raises(NotAMinimumError, match="maximum or a saddle"):
        kkt.check_second_order("t", lambda: onp.diag([-1.0, 1.0]), None)


def test_users_solution_object_is_still_refused():
    """Only the default forward's private byproduct is unwrapped; a user's solver must
    return (y, lam, nu)."""
    from nimplicit.errors import ShapeError
    layer = constrained_argmin_layer(
        lambda y, x: np.sum((y - x) ** 2), ineq=lambda y, x: -y,
        solver=lambda x: nimplicit.Solution((onp.maximum(x, 0), onp.zeros(0),
                                             onp.maximum(-2 * x, 0))))
    with pytest.raises(ShapeError, match=r"must return \(y, lam, nu\)"):
        layer(onp.array([0.5, -1.0]))
