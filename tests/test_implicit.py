"""The implicit node: every derivative mode against finite differences of the
forward solver's actual output.

Covers reverse mode (``grad``, ``jacobian``, ``make_vjp``), forward mode
(``make_jvp``) and second order (``grad`` of ``grad``, ``hessian``,
Hessian-vector products, forward-over-reverse), for 0-d, vector, matrix and
tuple outputs and inputs given as Python floats, 0-d and n-d arrays; batches
(``batch_axis`` 0 and non-zero, shared inputs); and the guarantee that the
forward solver only ever sees raw numbers.
"""
from unittest import mock

import autograd.numpy as np
import numpy as onp
import pytest
import scipy.linalg
import scipy.optimize
from autograd import elementwise_grad, grad, hessian, jacobian, make_jvp, make_vjp
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import (assert_close, assert_grad_matches_fd, fd_directional, fd_grad, fd_jacobian, newton_solve,
                      random_direction, vdot)
from nimplicit import (ForwardPoint, Solution, implicit_layer, intercept_forward, linear_solvers,
                       record_points)
from nimplicit.errors import OptionError, ResidualError, UnsupportedError

RTOL = 1e-6


# ------------------------------------------------------------------------------
# 0-d output: y^3 + y = x  (dy/dx = 1 / (3 y^2 + 1))
# ------------------------------------------------------------------------------

def cubic_residual(y, x):
    return y ** 3 + y - x


def cubic_solver(x):
    y = scipy.optimize.brentq(lambda t: t ** 3 + t - x, -10.0, 10.0, xtol=1e-15)
    for _ in range(2):   # polish to the last bit, so that FD of high order stay accurate
        y = y - (y ** 3 + y - x) / (3 * y ** 2 + 1)
    return y


cubic = implicit_layer(cubic_residual, cubic_solver)


@pytest.mark.parametrize("x", [2.0, onp.array(2.0), onp.array(-0.7)], ids=["float", "0d", "0d-neg"])
def test_scalar_output_first_and_second_order(x):
    y = cubic(x)
    assert onp.shape(y) == ()
    closed = 1.0 / (3 * y ** 2 + 1)
    fd1 = fd_directional(cubic, x, 1.0 if isinstance(x, float) else onp.ones(()))
    assert_close(grad(cubic)(x), closed, RTOL, "grad vs closed form")
    assert_close(grad(cubic)(x), fd1, RTOL, "grad vs FD")
    assert_close(make_jvp(cubic)(x)(1.0)[1], fd1, RTOL, "jvp vs FD")
    # d2y/dx2 = -6 y (dy/dx)^3
    fd2 = fd_directional(grad(cubic), x, 1.0 if isinstance(x, float) else onp.ones(()))
    assert_close(grad(grad(cubic))(x), -6 * y * closed ** 3, RTOL, "grad(grad) vs closed form")
    assert_close(grad(grad(cubic))(x), fd2, RTOL, "grad(grad) vs FD")
    assert_close(hessian(cubic)(x), fd2, RTOL, "hessian vs FD")
    # forward over reverse and reverse over forward
    assert_close(make_jvp(grad(cubic))(x)(1.0)[1], fd2, RTOL, "fwd-over-rev")
    assert_close(grad(lambda t: make_jvp(cubic)(t)(1.0)[1])(x), fd2, RTOL, "rev-over-fwd")


def test_scalar_output_third_order():
    x = 1.3
    d3 = grad(grad(grad(cubic)))(x)
    assert_close(d3, fd_directional(grad(grad(cubic)), x, 1.0), RTOL, "third order vs FD")


# ------------------------------------------------------------------------------
# vector output, several inputs: A y + s tanh(y) = b
# ------------------------------------------------------------------------------

def vec_residual(y, A, b, s):
    return np.dot(A, y) + s * np.tanh(y) - b


def vec_solver(A, b, s):
    return newton_solve(vec_residual, onp.zeros(b.shape), A, b, s)


@pytest.fixture(scope="module")
def vec_problem():
    rng = onp.random.default_rng(0)
    n = 4
    A = 2.0 * onp.eye(n) + 0.4 * rng.standard_normal((n, n))
    b = rng.standard_normal(n)
    return implicit_layer(vec_residual, vec_solver), (A, b, 0.7), rng


@pytest.mark.parametrize("argnum", [0, 1, 2], ids=["matrix-A", "vector-b", "float-s"])
def test_vector_output_jacobian_vjp_jvp(vec_problem, argnum):
    layer, inputs, rng = vec_problem
    at = lambda v: layer(*inputs[:argnum], v, *inputs[argnum + 1:])
    x = inputs[argnum]
    J = jacobian(at)(x)
    assert_close(J, fd_jacobian(at, x), RTOL, "jacobian vs FD")
    v = random_direction(rng, x)
    fd_v = fd_directional(at, x, v)
    assert_close(make_jvp(at)(x)(v)[1], fd_v, RTOL, "jvp vs FD")
    g = rng.standard_normal(layer(*inputs).shape)
    x_bar = make_vjp(at)(x)[0](g)
    assert onp.shape(x_bar) == onp.shape(x)
    assert abs(vdot(x_bar, v) - vdot(g, fd_v)) <= RTOL * onp.linalg.norm(g) * onp.linalg.norm(fd_v)


def test_vector_output_second_order(vec_problem):
    layer, (A, b, s), rng = vec_problem
    w = rng.standard_normal(b.shape)

    def loss(A, b, s):
        y = layer(A, b, s)
        return np.sum(w * np.sin(y)) + np.sum(y ** 2) * s

    loss_b = lambda b: loss(A, b, s)
    H = hessian(loss_b)(b)
    assert_close(H, fd_jacobian(grad(loss_b), b), RTOL, "hessian in b vs FD of grad")
    v = rng.standard_normal(b.shape)
    fd_Hv = fd_directional(grad(loss_b), b, v)
    hvp_rev = grad(lambda b: np.sum(grad(loss_b)(b) * v))(b)
    assert_close(hvp_rev, fd_Hv, RTOL, "Hessian-vector product (reverse over reverse)")
    assert_close(make_jvp(grad(loss_b))(b)(v)[1], fd_Hv, RTOL, "forward over reverse")
    # mixed: d/ds of grad_b, and d/dA of grad_s (python float input)
    mixed = grad(lambda s: np.sum(grad(loss, 1)(A, b, s) * v))(s)
    assert_close(mixed, fd_directional(lambda s: vdot(grad(loss, 1)(A, b, s), v), s, 1.0), RTOL,
                 "d/ds grad_b")
    E = rng.standard_normal(A.shape)
    mixed_A = grad(lambda A: grad(loss, 2)(A, b, s))(A)
    assert_close(vdot(mixed_A, E), fd_directional(lambda A: grad(loss, 2)(A, b, s), A, E), RTOL,
                 "d/dA grad_s")
    assert_close(grad(grad(loss, 2), 2)(A, b, s),
                 fd_directional(lambda s: grad(loss, 2)(A, b, s), s, 1.0), RTOL, "grad of grad in s")


# ------------------------------------------------------------------------------
# matrix output: C Y + 0.1 Y^3 = X   (Y is p x q)
# ------------------------------------------------------------------------------

def mat_residual(Y, C, X):
    return np.dot(C, Y) + 0.1 * Y ** 3 - X


def test_matrix_output():
    rng = onp.random.default_rng(1)
    p, q = 3, 2
    C = 2.5 * onp.eye(p) + 0.3 * rng.standard_normal((p, p))
    X = rng.standard_normal((p, q))
    layer = implicit_layer(mat_residual, lambda C, X: newton_solve(mat_residual, onp.zeros((p, q)), C, X))
    Y = layer(C, X)
    assert Y.shape == (p, q)
    for argnum, x in enumerate((C, X)):
        at = (lambda v: layer(v, X)) if argnum == 0 else (lambda v: layer(C, v))
        assert_close(jacobian(at)(x), fd_jacobian(at, x), RTOL, f"jacobian in input {argnum}")
        V = rng.standard_normal(x.shape)
        assert_close(make_jvp(at)(x)(V)[1], fd_directional(at, x, V), RTOL, f"jvp in input {argnum}")
    loss = lambda X: np.sum(np.cos(layer(C, X)) * X)
    V = rng.standard_normal(X.shape)
    assert_close(make_jvp(grad(loss))(X)(V)[1], fd_directional(grad(loss), X, V), RTOL,
                 "forward-over-reverse, matrix output")


# ------------------------------------------------------------------------------
# tuple output of mixed shapes: (y vector, s 0-d, M matrix)
# ------------------------------------------------------------------------------

def tuple_residual(z, A, b):
    y, s, M = z
    return (np.dot(A, y) + 0.2 * np.sin(y) - b,
            s - np.sum(y ** 2),
            M - np.outer(y, b) * s)


def tuple_solver(A, b):
    y = newton_solve(lambda y, A, b: np.dot(A, y) + 0.2 * np.sin(y) - b, onp.zeros(b.shape), A, b)
    s = onp.sum(y ** 2)
    return y, onp.array(s), onp.outer(y, b) * s


def test_tuple_output_all_modes():
    rng = onp.random.default_rng(2)
    n = 3
    A = 2 * onp.eye(n) + 0.3 * rng.standard_normal((n, n))
    b = rng.standard_normal(n)
    layer = implicit_layer(tuple_residual, tuple_solver)
    y, s, M = layer(A, b)
    assert onp.shape(y) == (n,) and onp.shape(s) == () and onp.shape(M) == (n, n)
    gy, gs, gM = rng.standard_normal(n), float(rng.standard_normal()), rng.standard_normal((n, n))

    def loss(A, b):
        y, s, M = layer(A, b)
        return np.sum(gy * y) + gs * s + np.sum(gM * M) + np.sum(y ** 2) * s

    for argnum, x in enumerate((A, b)):
        at = (lambda v: loss(v, b)) if argnum == 0 else (lambda v: loss(A, v))
        assert_close(grad(at)(x), fd_grad(at, x), RTOL, f"grad, tuple output, input {argnum}")
    # make_vjp / make_jvp on the tuple itself
    v = rng.standard_normal(n)
    fd_v = fd_directional(lambda b: layer(A, b), b, v)
    jvp = make_jvp(lambda b: layer(A, b))(b)(v)[1]
    assert_close(jvp, fd_v, RTOL, "jvp of a tuple output")
    b_bar = make_vjp(lambda b: layer(A, b))(b)[0]((gy, gs, gM))
    assert abs(vdot(b_bar, v) - vdot((gy, gs, gM), fd_v)) <= RTOL * abs(vdot((gy, gs, gM), fd_v))
    # second order through the tuple
    H = hessian(lambda b: loss(A, b))(b)
    assert_close(H, fd_jacobian(grad(lambda b: loss(A, b)), b), RTOL, "hessian, tuple output")


# ------------------------------------------------------------------------------
# the forward solver is never traced
# ------------------------------------------------------------------------------

def test_forward_solver_only_sees_raw_numbers():
    seen = []

    def strict_solver(x, a):
        for v in (x, a):
            assert type(v) is onp.ndarray or type(v) is float, f"solver got {type(v)}"
        seen.append((type(x), type(a)))
        return newton_solve(lambda y, x, a: y + a * np.tanh(y) - x, onp.zeros(x.shape), x, a)

    def strict_residual(y, x, a):
        return y + a * np.tanh(y) - x

    layer = implicit_layer(strict_residual, strict_solver)
    x, a = onp.array([0.3, -1.2, 2.0]), 0.5
    loss = lambda x, a: np.sum(layer(x, a) ** 3)
    assert_close(grad(loss)(x, a), fd_grad(lambda x: loss(x, a), x), RTOL, "grad with a strict solver")
    assert_close(grad(loss, 1)(x, a), fd_directional(lambda a: loss(x, a), a, 1.0), RTOL,
                 "grad in a float with a strict solver")
    hessian(loss)(x, a)
    grad(grad(loss, 1), 1)(x, a)
    make_jvp(grad(loss))(x, a)(onp.ones(3))
    jacobian(lambda a: layer(x, a))(a)
    assert len(seen) > 6
    assert all(t in ((onp.ndarray, float),) for t in seen), seen


def test_record_points_and_forward_point():
    layer = implicit_layer(cubic_residual, cubic_solver)
    with record_points() as points:
        grad(lambda x: layer(x) * layer(2 * x))(0.5)
    assert len(points) == 2
    assert all(isinstance(p, ForwardPoint) and p.layer is layer for p in points)
    assert_close(onp.array([p.inputs[0] for p in points]), onp.array([0.5, 1.0]), 1e-15, "inputs")
    assert points[0].m == points[0].r == 1
    assert abs(float(points[0].y) ** 3 + float(points[0].y) - 0.5) < 1e-14


# ------------------------------------------------------------------------------
# random well-conditioned linear residuals A vec(y) = B tanh(vec(x)), random structures
# ------------------------------------------------------------------------------

def _split(total, rng):
    """Random structure for ``total`` unknowns: one array or a tuple of arrays."""
    kind = int(rng.integers(4))
    if total == 1:
        return ([()], False) if kind < 2 else ([(), (0,)], True) if kind == 2 else ([(1, 1)], False)
    if kind == 0:
        return [(total,)], False
    if kind == 1 and total % 2 == 0:
        return [(2, total // 2)], False
    cut = int(rng.integers(1, total))
    return ([(cut,), (total - cut,)] if kind == 2 else [(), (total - 1, 1)]), True


@settings(deadline=None, max_examples=25, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 6), x_shape=st.sampled_from([(), (3,), (2, 2)]), seed=st.integers(0, 2 ** 31),
       flat_residual=st.booleans())
def test_random_linear_residuals_match_closed_form(m, x_shape, seed, flat_residual):
    rng = onp.random.default_rng(seed)
    shapes, is_tuple = _split(m, rng)
    Q1, _ = onp.linalg.qr(rng.standard_normal((m, m)))
    Q2, _ = onp.linalg.qr(rng.standard_normal((m, m)))
    A = Q1 @ onp.diag(rng.uniform(1.0, 3.0, m)) @ Q2         # condition number <= 3
    k = int(onp.prod(x_shape))
    Bmat = rng.standard_normal((m, k))
    sizes = onp.cumsum([0] + [int(onp.prod(s)) for s in shapes])

    def unflat(v):
        parts = tuple(np.reshape(v[sizes[i]:sizes[i + 1]], s) for i, s in enumerate(shapes))
        return parts if is_tuple else parts[0]

    def flat(y):
        parts = y if is_tuple else (y,)
        return np.concatenate([np.reshape(p, (-1,)) for p in parts])

    def residual(y, x):
        r = np.dot(A, flat(y)) - np.dot(Bmat, np.tanh(np.reshape(x, (-1,))))
        return r if flat_residual else unflat(r)

    def solver(x):
        return unflat(onp.linalg.solve(A, Bmat @ onp.tanh(onp.reshape(x, -1))))

    layer = implicit_layer(residual, solver)
    x = rng.standard_normal(x_shape)
    # closed form: d vec(y) / d vec(x) = A^{-1} B diag(1 - tanh(x)^2)
    closed = onp.linalg.solve(A, Bmat) * (1 - onp.tanh(onp.reshape(x, -1)) ** 2)
    flat_layer = lambda x: flat(layer(x))
    J = onp.reshape(jacobian(flat_layer)(x), (m, k))
    assert_close(J, closed, RTOL, "jacobian vs closed form")
    assert_close(J, onp.reshape(fd_jacobian(lambda x: onp.asarray(flat(layer(x))), x), (m, k)), RTOL,
                 "jacobian vs FD")
    v = rng.standard_normal(x_shape)
    assert_close(onp.reshape(make_jvp(flat_layer)(x)(v)[1], -1), closed @ onp.reshape(v, -1), RTOL, "jvp")


# ------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------

B_INST, D = 4, 3


def batched_residual(y, A, W, c):
    """Instance b: (A_b + W) y_b + 0.1 y_b^3 = c_b; A, c batched (axis 0), W shared."""
    return np.einsum("bij,bj->bi", A + W, y) + 0.1 * y ** 3 - c


def batched_solver(A, W, c):
    return onp.stack([newton_solve(lambda y, M, ci: np.dot(M, y) + 0.1 * y ** 3 - ci,
                                   onp.zeros(D), A[i] + W, c[i]) for i in range(len(c))])


@pytest.fixture(scope="module")
def batch_data():
    rng = onp.random.default_rng(3)
    A = 0.3 * rng.standard_normal((B_INST, D, D))
    W = 2.5 * onp.eye(D) + 0.2 * rng.standard_normal((D, D))
    c = rng.standard_normal((B_INST, D))
    return A, W, c, rng


def test_batch_axis0_gradients_and_shared_input(batch_data):
    A, W, c, rng = batch_data
    layer = implicit_layer(batched_residual, batched_solver, batch_axis=0)
    G = rng.standard_normal((B_INST, D))
    loss = lambda A, W, c: np.sum(G * layer(A, W, c)) + np.sum(layer(A, W, c) ** 4)
    for argnum, x in enumerate((A, W, c)):
        at = lambda v: loss(*((A, W, c)[:argnum] + (v,) + (A, W, c)[argnum + 1:]))
        assert_grad_matches_fd(at, x, grad(at)(x), rng, 2, RTOL, f"batched grad in input {argnum}")
    # the shared W gets the sum of the per-instance gradients of an unbatched layer
    single = implicit_layer(lambda y, A, W, c: np.dot(A + W, y) + 0.1 * y ** 3 - c,
                            lambda A, W, c: batched_solver(A[None], W, c[None])[0])
    per_instance = sum(grad(lambda W: np.sum(G[i] * single(A[i], W, c[i]))
                            + np.sum(single(A[i], W, c[i]) ** 4))(W) for i in range(B_INST))
    assert_close(grad(loss, 1)(A, W, c), per_instance, 1e-10, "shared input: summed gradient")
    # forward mode and second order in batch mode
    V = rng.standard_normal(c.shape)
    at_c = lambda c: layer(A, W, c)
    assert_close(make_jvp(at_c)(c)(V)[1], fd_directional(at_c, c, V), RTOL, "batched jvp")
    loss_c = lambda c: loss(A, W, c)
    assert_close(make_jvp(grad(loss_c))(c)(V)[1], fd_directional(grad(loss_c), c, V), RTOL,
                 "batched forward-over-reverse")


@pytest.mark.filterwarnings("ignore:a callable linear_solver:DeprecationWarning")  # counts via the old protocol
def test_batch_blocks_cost_m_vjps_and_B_small_factorizations(batch_data, monkeypatch):
    A, W, c, _ = batch_data
    counts = {"J_T products": 0, "J products": 0}
    factor_shapes = []
    real_lu_factor = scipy.linalg.lu_factor

    def counting_lu_factor(a, *args, **kw):
        factor_shapes.append(onp.shape(a))
        return real_lu_factor(a, *args, **kw)

    monkeypatch.setattr(scipy.linalg, "lu_factor", counting_lu_factor)

    def counting_lu(matvec, rmatvec, b, *, transpose=False, **kw):
        def mv(v):
            counts["J_T products" if transpose else "J products"] += 1
            return matvec(v)

        def rmv(u):
            counts["J products" if transpose else "J_T products"] += 1
            return rmatvec(u)
        return linear_solvers.lu(mv, rmv, b, transpose=transpose, **kw)

    layer = implicit_layer(batched_residual, batched_solver, batch_axis=0, linear_solver=counting_lu)
    J = jacobian(lambda c: layer(A, W, c))(c)        # B*D cotangents, B*D solves
    assert counts == {"J_T products": D, "J products": 0}, counts
    assert factor_shapes == [(D, D)] * B_INST, factor_shapes
    # J is block diagonal: instance i depends on c_i only
    for i in range(B_INST):
        for j in range(B_INST):
            if i != j:
                assert onp.all(J[i, :, j, :] == 0)
    assert_close(J, fd_jacobian(lambda c: layer(A, W, c), c), RTOL, "batched jacobian vs FD")


def test_nonzero_batch_axis_with_tuple_output(batch_data):
    """batch_axis=-1: y is (D, B) and s is (B,); batch_axis=1: y is (D, B), (2, B)."""
    A, W, c, rng = batch_data
    cT = c.T.copy()

    def residual_last(z, A, W, cT):
        y, s = z
        return (np.einsum("bij,jb->ib", A + W, y) + 0.1 * y ** 3 - cT, s - np.sum(y ** 2, axis=0))

    def solver_last(A, W, cT):
        y = batched_solver(A, W, cT.T).T
        return y, onp.sum(y ** 2, axis=0)

    def residual_one(z, A, W, cT):
        y, t = z
        return (np.einsum("bij,jb->ib", A + W, y) + 0.1 * y ** 3 - cT,
                t - np.stack([y[0] * y[1], np.sum(y, axis=0)]))

    def solver_one(A, W, cT):
        y = batched_solver(A, W, cT.T).T
        return y, onp.stack([y[0] * y[1], y.sum(0)])

    for batch_axis, residual, solver in ((-1, residual_last, solver_last), (1, residual_one, solver_one)):
        layer = implicit_layer(residual, solver, batch_axis=batch_axis)
        y, second = layer(A, W, cT)
        assert y.shape == (D, B_INST) and second.shape[-1] == B_INST
        G1, G2 = rng.standard_normal(y.shape), rng.standard_normal(second.shape)

        def loss(A, W, cT):
            y, second = layer(A, W, cT)
            return np.sum(G1 * y) + np.sum(G2 * second ** 2)

        for argnum, x in enumerate((A, W, cT)):
            at = lambda v: loss(*((A, W, cT)[:argnum] + (v,) + (A, W, cT)[argnum + 1:]))
            assert_grad_matches_fd(at, x, grad(at)(x), rng, 1, RTOL,
                                   f"batch_axis={batch_axis}, input {argnum}")
        V = rng.standard_normal(cT.shape)
        assert_close(make_jvp(lambda cT: layer(A, W, cT))(cT)(V)[1],
                     fd_directional(lambda cT: layer(A, W, cT), cT, V), RTOL,
                     f"batch_axis={batch_axis}: jvp of a tuple")
        loss_c = lambda cT: loss(A, W, cT)
        assert_grad_matches_fd(grad(loss_c), cT, hessian(loss_c)(cT), rng, 1, RTOL,
                               f"batch_axis={batch_axis}: hessian")


def test_elementwise_grad_of_batched_layer_matches_per_instance_derivative():
    """y_b^3 + y_b = x_b for a batch of 0-d instances: dy_b/dx_b = 1/(3 y_b^2 + 1)."""
    layer = implicit_layer(cubic_residual,
                           lambda x: onp.array([cubic_solver(v) for v in x]), batch_axis=0)
    x = onp.linspace(-2, 3, 7)
    y = layer(x)
    assert_close(elementwise_grad(layer)(x), 1 / (3 * y ** 2 + 1), RTOL, "batched scalar instances")


@pytest.mark.filterwarnings("ignore:a callable linear_solver:DeprecationWarning")  # counts via the old protocol
@settings(deadline=None, max_examples=15, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_inst=st.integers(1, 4), m=st.integers(1, 4), batch_axis=st.sampled_from([0, 1, -1]),
       seed=st.integers(0, 2 ** 31))
def test_random_batched_linear_residuals(n_inst, m, batch_axis, seed):
    """Instance b: A_b y_b = tanh(x_b), batch axis anywhere: the Jacobian is block
    diagonal with blocks A_b^{-1} diag(1 - tanh(x_b)^2); m J^T products and B
    factorizations of m x m blocks build it."""
    rng = onp.random.default_rng(seed)
    A = onp.stack([onp.linalg.qr(rng.standard_normal((m, m)))[0] @ onp.diag(rng.uniform(1, 3, m))
                   for _ in range(n_inst)])
    to_batch_first = lambda v: np.moveaxis(v, batch_axis, 0)
    from_batch_first = lambda v: np.moveaxis(v, 0, batch_axis)

    def residual(y, A, x):
        return from_batch_first(np.einsum("bij,bj->bi", A, to_batch_first(y)) - np.tanh(to_batch_first(x)))

    def solver(A, x):
        return onp.moveaxis(onp.linalg.solve(A, onp.tanh(onp.moveaxis(x, batch_axis, 0))[..., None])[..., 0],
                            0, batch_axis)

    counts = {"J_T": 0}

    def counting_lu(matvec, rmatvec, b, *, transpose=False, **kw):
        def mv(v):
            counts["J_T"] += transpose
            return matvec(v)

        def rmv(u):
            counts["J_T"] += not transpose
            return rmatvec(u)
        return linear_solvers.lu(mv, rmv, b, transpose=transpose, **kw)

    layer = implicit_layer(residual, solver, batch_axis=batch_axis, linear_solver=counting_lu)
    x = rng.standard_normal((n_inst, m) if batch_axis == 0 else (m, n_inst))
    with mock.patch.object(scipy.linalg, "lu_factor", wraps=scipy.linalg.lu_factor) as lu_factor:
        J = jacobian(lambda x: layer(A, x))(x)
    assert counts["J_T"] == m and lu_factor.call_count == n_inst
    # to (B, m, B, m) layout and compare with the block-diagonal closed form
    J = onp.moveaxis(onp.moveaxis(J, batch_axis % 2, 0), 2 + batch_axis % 2, 2)
    xb = onp.moveaxis(x, batch_axis, 0)
    expected = onp.zeros((n_inst, m, n_inst, m))
    for b in range(n_inst):
        expected[b, :, b, :] = onp.linalg.solve(A[b], onp.diag(1 - onp.tanh(xb[b]) ** 2))
    assert_close(J, expected, 1e-10, "batched jacobian vs closed form")


# ------------------------------------------------------------------------------
# forward byproducts, the linear-solver protocol, recording and intercepting
# ------------------------------------------------------------------------------

class _AuxLU(linear_solvers.LinearSolver):
    """A structured solver that takes J from the forward's byproducts (aux)."""

    name = "aux_lu"
    options = {"scale": 1.0}
    inits: list = []

    def init(self, operator, aux=None):
        type(self).inits.append(aux)
        return linear_solvers.LU().init(linear_solvers.MatrixOperator(aux["J"] * self.opts["scale"]))


def _linear_solver_with_aux(A, x):
    y = onp.linalg.solve(A, x)
    return Solution(y, aux={"J": A.copy()}, status="direct solve")


def test_solution_aux_reaches_the_solver_once_per_point_and_is_not_differentiated():
    rng = onp.random.default_rng(1)
    A = onp.eye(4) * 3 + 0.3 * rng.standard_normal((4, 4))
    x = rng.standard_normal(4)
    _AuxLU.inits.clear()
    layer = implicit_layer(lambda y, A, x: np.dot(A, y) - x, _linear_solver_with_aux,
                           linear_solver=_AuxLU())
    with record_points() as points:
        J = jacobian(lambda x: layer(A, x))(x)
    assert_close(J, onp.linalg.inv(A), 1e-12, "dy/dx = A^{-1} through the aux factorization")
    assert len(_AuxLU.inits) == 1 and _AuxLU.inits[0]["J"] is points[0].aux["J"]
    assert points[0].status == "direct solve"
    loss = lambda A: np.sum(np.sin(layer(A, x)))
    assert_grad_matches_fd(loss, A, grad(loss)(A), rng, 2, RTOL, "grad A with aux solver")
    # the plain y is what the layer returns
    assert_close(layer(A, x), onp.linalg.solve(A, x), 1e-14, "forward value")


def test_linear_solver_options_are_validated():
    with pytest.raises(OptionError, match=r"unknown option\(s\) \['tol'\].*max_condition"):
        implicit_layer(cubic_residual, cubic_solver, linear_solver="lu",
                       linear_solver_options={"tol": 1e-3})
    with pytest.raises(TypeError):      # OptionError is a TypeError too
        linear_solvers.GMRES(rtl=1e-3)
    with pytest.raises(OptionError, match="unknown linear_solver 'bogus'"):
        implicit_layer(cubic_residual, cubic_solver, linear_solver="bogus")
    with pytest.raises(OptionError, match="rtol must be a positive finite"):
        linear_solvers.MINRES(rtol=float("nan"))
    with pytest.raises(OptionError, match="unknown option"):   # under auto: no candidate takes it
        implicit_layer(cubic_residual, cubic_solver, linear_solver_options={"bogus": 1})


def test_exactness_is_a_property_of_the_state():
    J = onp.array([[2.0, 0.0], [0.0, 1.0]])
    assert linear_solvers.LU().init(linear_solvers.MatrixOperator(J)).exact
    assert linear_solvers.Lstsq().init(linear_solvers.MatrixOperator(J)).exact
    assert not linear_solvers.Lstsq(ridge=1e-3).init(linear_solvers.MatrixOperator(J)).exact
    assert not linear_solvers.Lstsq().init(linear_solvers.MatrixOperator(J[:1])).exact
    assert not linear_solvers.LSMR().init(linear_solvers.MatrixOperator(J)).exact


def test_layer_keeps_no_forward_state():
    layer = implicit_layer(cubic_residual, cubic_solver)
    before = dict(vars(layer))
    grad(layer)(0.3)
    layer(0.5)
    assert vars(layer).keys() == before.keys()
    assert all(vars(layer)[k] is before[k] for k in before)
    with pytest.raises(AttributeError, match="record_points"):
        layer.last_point


def test_record_points_is_context_local():
    import threading
    layer = implicit_layer(cubic_residual, cubic_solver)
    seen_in_thread = []

    def other():
        with record_points() as mine:
            layer(0.1)
        seen_in_thread.append(len(mine))

    with record_points() as points:
        t = threading.Thread(target=other)
        t.start()
        t.join()
        layer(0.2)
    assert len(points) == 1 and seen_in_thread == [1]


def test_intercept_forward_replaces_the_solution_without_patching():
    layer = implicit_layer(cubic_residual, cubic_solver)
    hits = []

    def perturb(lay, raw_inputs, solution):
        hits.append(lay)
        return Solution(solution.y + 1e-3, solution.aux, solution.status)

    with intercept_forward(perturb, check_residual=False):
        y_moved = layer(0.5)
    assert hits == [layer] and abs(y_moved - cubic_solver(0.5) - 1e-3) < 1e-15
    with pytest.raises(ResidualError):          # the residual check stays on unless turned off
        with intercept_forward(perturb):
            layer(0.5)
    assert abs(layer(0.5) - cubic_solver(0.5)) == 0.0   # nothing left behind


def test_legacy_callable_protocol_still_works_and_marks_pseudo_inverse():
    """The deprecated solve(matvec, rmatvec, b, *, transpose, x_size, cache, point)."""
    calls = []

    def legacy(matvec, rmatvec, b, *, transpose=False, x_size=None, cache=None, point=None):
        calls.append(point)
        cache["pseudo_inverse"] = True
        return linear_solvers.lu(matvec, rmatvec, b, transpose=transpose, x_size=x_size, cache=cache)

    with pytest.warns(DeprecationWarning, match="callable linear_solver") as caught:
        layer = implicit_layer(cubic_residual, cubic_solver, linear_solver=legacy)
    assert len(caught) == 1                  # once per construction
    assert_close(grad(layer)(0.4), fd_grad(cubic, 0.4), RTOL, "legacy solver gradient")
    assert isinstance(calls[0], ForwardPoint)
    with record_points() as points:
        grad(layer)(0.4)
    with pytest.warns(DeprecationWarning, match="ForwardPoint.cache") as caught:
        assert points[0].cache.get("pseudo_inverse") is True
        points[0].cache
    assert len(caught) == 1                  # once per point
    with pytest.raises(UnsupportedError, match="order >= 2"):
        grad(grad(layer))(0.4)


@pytest.mark.parametrize("option, bad", [("dense_max", -3), ("dense_max", 2.5),
                                         ("dense_max", float("nan")), ("dense_max", True),
                                         ("dense_max", "200"), ("check_residual", "yes"),
                                         ("check_independence", 1), ("throw", None)])
def test_numeric_and_flag_options_are_validated(option, bad):
    """Found by the fuzz suite at 10 examples per class: dense_max=-3 and
    check_residual='yes' were accepted."""
    with pytest.raises(OptionError, match=option):
        implicit_layer(cubic_residual, cubic_solver, **{option: bad})


def test_finite_inputs_skips_the_core_check_of_inputs_the_caller_verified():
    from nimplicit.errors import NonFiniteError
    seen = []
    residual = lambda y, x: y - x
    solver = lambda x: seen.append(x) or onp.array(x, dtype=float)
    x = onp.array([1.0, onp.nan])
    with pytest.raises(NonFiniteError, match="input 0"):
        implicit_layer(residual, solver)(x)
    assert not seen                 # the default checks before the solver runs
    layer = implicit_layer(residual, solver, finite_inputs=(0,), check_residual=False)
    with pytest.raises(NonFiniteError, match="solver's output"):
        layer(x)                    # input 0 is the caller's promise; the output is still checked
    assert len(seen) == 1
    for bad in ((-1,), 0, ("0",), (True,)):
        with pytest.raises(OptionError, match="finite_inputs"):
            implicit_layer(residual, solver, finite_inputs=bad)


def test_tuple_input_beside_another_input_and_alone():
    """A tuple-valued input differentiated together with another one, or alone
    (the replayed tape casts per array, a tuple has no dtype)."""
    a, b, c = onp.array([0.5, 0.7]), onp.array([1.0, 2.0, 3.0]), onp.array([1.5, 2.5])
    layer = implicit_layer(lambda y, p, c: y - (p[0] * c + np.sum(p[1])),
                   lambda p, c: onp.asarray(p[0]) * c + onp.sum(p[1]))
    y = a * c + b.sum()
    (ga, gb), gc = grad(lambda args: np.sum(layer(*args) ** 2))(((a, b), c))
    onp.testing.assert_allclose(ga, 2 * y * c, rtol=1e-12)
    onp.testing.assert_allclose(gb, onp.full(3, 2 * y.sum()), rtol=1e-12)
    onp.testing.assert_allclose(gc, 2 * y * a, rtol=1e-12)
    ga1, gb1 = grad(lambda p: np.sum(layer(p, c) ** 2))((a, b))
    onp.testing.assert_allclose(ga1, ga, rtol=1e-12)


def test_vjp_differentiated_in_its_cotangent_with_a_float32_input():
    a, c = onp.array([0.5, 0.7], dtype=onp.float32), onp.array([1.5, 2.5])
    layer = implicit_layer(lambda y, a, c: y - a * c, lambda a, c: onp.asarray(a, float) * c)
    vjp, _ = make_vjp(lambda t: layer(t[0], t[1]))((a, c))
    assert vjp(onp.ones(2))[0].dtype == onp.float32
    onp.testing.assert_allclose(make_jvp(lambda g: vjp(g)[0])(onp.ones(2))(onp.ones(2))[1], c)
    onp.testing.assert_allclose(grad(lambda g: np.sum(vjp(g)[0] ** 2))(onp.ones(2)), 2 * c * c)


# the replayed tape's fast first-order VJPs (nimplicit.implicit._FAST_VJPS)

_R = onp.random.default_rng(11)
_A, _B, _v, _u = _R.standard_normal((4, 3)), _R.standard_normal((3, 5)), _R.standard_normal(3), \
    _R.standard_normal(4)
_p = onp.abs(_R.standard_normal(3)) + 0.5

#: (name, fun, args, whether every node takes the fast path)
_TAPE_CASES = [
    ("add", lambda a, b: a + b, (_v, _v[::-1].copy()), True),
    ("subtract", lambda a, b: a - b, (_v, _p), True),
    ("multiply", lambda a, b: a * b, (_v, _p), True),
    ("divide", lambda a, b: a / b, (_v, _p), True),
    ("negative", lambda a, b: -a + 0.0 * b, (_v, _p), True),
    ("same argument twice", lambda a, b: a * a - b * a, (_v, _p), True),
    ("int constant", lambda a, b: 2 * a - 1 + b, (_v, _p), True),
    ("unary", lambda a, b: np.tanh(a) + np.exp(a) * np.log(b) + np.sin(b) - np.cos(a)
     + np.sqrt(b) + np.square(a), (_v, _p), True),
    ("dot 2-1", lambda a, b: np.dot(a, b), (_A[:, :3], _v), True),
    ("dot 1-2", lambda a, b: np.dot(a, b), (_v, _B), True),
    ("dot 2-2", lambda a, b: np.dot(a, b), (_A[:, :3].copy(), _B), True),
    ("matmul 2-1", lambda a, b: a @ b, (_A[:, :3].copy(), _v), True),
    ("matmul 1-2 and 2-2", lambda a, b: (a @ b) @ b.T, (_v, _B), True),
    ("broadcast (autograd's unbroadcast)", lambda a, b: a + b, (_v, 2.5), False),
    ("float32 (autograd casts)", lambda a, b: np.tanh(a) * b, (_v.astype(onp.float32), _p), False),
    ("dot 1-1 (a scalar)", lambda a, b: np.dot(a, b) * a, (_v, _p), False),
    ("a primitive without a fast VJP", lambda a, b: np.sum(a) * b + np.reshape(a, (3,)),
     (_v, _p), False),
]


@pytest.mark.parametrize("name, fun, args, fast", _TAPE_CASES, ids=[c[0] for c in _TAPE_CASES])
def test_replayed_tape_matches_autograd_and_takes_the_fast_vjps(name, fun, args, fast):
    from nimplicit.implicit import _Tape
    tape = _Tape(fun, args)
    inner = [node for node in tape.order if node not in tape.roots]
    assert inner and all(node.fast is not None for node in inner) == fast
    g = _R.standard_normal(onp.shape(fun(*args)))
    ours = tape.vjp(g)
    for k, a in enumerate(args):
        pull = make_vjp(lambda s: fun(*[s if i == k else x for i, x in enumerate(args)]))(a)[0]
        ref = pull(g)
        # in the argument's dtype (a float32 gradient rounded, as autograd's tuple path)
        assert ours[k].dtype == onp.asarray(a).dtype and ours[k].shape == onp.shape(ref)
        rtol = 1e-14 if onp.asarray(a).dtype == onp.float64 else 1e-6
        onp.testing.assert_allclose(ours[k], ref, rtol=rtol, atol=rtol * onp.abs(ref).max())
    assert tape.batchable == fast
    if fast:    # a stack of cotangents (a leading axis) replays row by row
        G = _R.standard_normal((3,) + onp.shape(g))
        stacked = tape.vjp(G)
        for k in range(len(args)):
            rows = onp.stack([tape.vjp(Gi)[k] for Gi in G])
            onp.testing.assert_allclose(stacked[k], rows, rtol=1e-13, atol=1e-14)
    again = tape.vjp(2 * g)            # a tape replays: the same factors for every cotangent
    for k, a in enumerate(args):
        rtol = 1e-14 if onp.asarray(a).dtype == onp.float64 else 1e-6
        onp.testing.assert_allclose(again[k], 2 * ours[k], rtol=rtol, atol=1e-300)


def test_replayed_tape_with_a_boxed_cotangent_uses_autograd_vjps():
    """A cotangent being differentiated (the VJP's own derivative) takes autograd's VJPs."""
    from nimplicit.implicit import _Tape
    tape = _Tape(lambda a, b: np.tanh(np.dot(a, b)), (_A[:, :3].copy(), _v))
    H = jacobian(lambda g: tape.vjp(g)[1])(onp.ones(4))      # d(A^T diag(t') g)/dg
    t = onp.tanh(_A[:, :3] @ _v)
    onp.testing.assert_allclose(H, (_A[:, :3] * (1 - t ** 2)[:, None]).T, rtol=1e-12)


def test_tape_rows_form_the_jacobian_in_chunks():
    from nimplicit import implicit
    from nimplicit.implicit import _Tape
    W = _R.standard_normal((7, 7))
    tape = _Tape(lambda y: np.tanh(np.dot(W, y)) - y, (_R.standard_normal(7),))
    J = onp.stack([tape.vjp(e)[0] for e in onp.eye(7)])
    onp.testing.assert_allclose(tape.rows(7), J, rtol=1e-13, atol=1e-15)
    with mock.patch.object(implicit, "STACK_ELEMENTS", 14):      # 2 rows per replay
        onp.testing.assert_allclose(tape.rows(7), J, rtol=1e-13, atol=1e-15)
