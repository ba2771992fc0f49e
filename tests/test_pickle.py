"""Layers are values (issue 15 item 4, issue 12): an ImplicitLayer built from
module-level functions pickles before and after a forward and after a grad
call, its pickle does not grow with use, and it works under spawn-based
multiprocessing."""
import multiprocessing
import pickle

import autograd.numpy as np
import numpy as onp
import pytest
from autograd import grad

from helpers import assert_close, fd_grad
from nimplicit import implicit_layer, linear_solvers


def deq_residual(y, W, x):
    return np.tanh(np.dot(W, y) + x) - y


def deq_solver(W, x):
    y = onp.zeros(len(x))
    for _ in range(200):
        y = onp.tanh(W @ y + x)
    return y


def _data(d=6, seed=0):
    rng = onp.random.default_rng(seed)
    return 0.4 * rng.standard_normal((d, d)) / onp.sqrt(d), rng.standard_normal(d)


def _loss(layer, W, x):
    return np.sum(layer(W, x) ** 2)


@pytest.mark.parametrize("linear_solver", ["auto", "lu", "gmres", linear_solvers.BiCGSTAB(rtol=1e-10)])
def test_layer_pickles_before_and_after_use_and_does_not_grow(linear_solver):
    layer = implicit_layer(deq_residual, deq_solver, linear_solver=linear_solver)
    W, x = _data()
    fresh = len(pickle.dumps(layer))
    layer(W, x)
    after_forward = len(pickle.dumps(layer))
    g = grad(lambda x: _loss(layer, W, x))(x)
    after_grad = len(pickle.dumps(layer))
    for _ in range(20):
        grad(lambda x: _loss(layer, W, x))(x)
    after_many = len(pickle.dumps(layer))
    assert fresh == after_forward == after_grad == after_many
    clone = pickle.loads(pickle.dumps(layer))
    assert_close(grad(lambda x: _loss(clone, W, x))(x), g, 1e-14, "gradient of the unpickled layer")


def test_gradient_of_pickled_layer_matches_fd():
    layer = pickle.loads(pickle.dumps(implicit_layer(deq_residual, deq_solver)))
    W, x = _data(seed=1)
    assert_close(grad(lambda x: _loss(layer, W, x))(x),
                 fd_grad(lambda x: _loss(layer, W, x), x), 1e-6, "pickled layer vs FD")


def _worker(args):
    layer, W, x = args
    return grad(lambda x: _loss(layer, W, x))(x)


def test_spawn_multiprocessing_with_a_layer():
    layer = implicit_layer(deq_residual, deq_solver)
    W, x = _data(seed=2)
    expected = grad(lambda x: _loss(layer, W, x))(x)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        (got,) = pool.map(_worker, [(layer, W, x)])
    assert_close(got, expected, 1e-14, "gradient computed in a spawned process")


def test_forward_point_is_not_picklable_with_a_clear_message():
    from nimplicit import record_points
    layer = implicit_layer(deq_residual, deq_solver)
    W, x = _data()
    with record_points() as points:
        layer(W, x)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(points[0])


def test_ncut_layers_pickle_after_a_grad_call():
    from reference_layers.ncut import SparseNCut, grid_graph_edges, make_ncut_layer
    rng = onp.random.default_rng(3)
    W = rng.uniform(0.1, 1.0, (6, 6))
    W = 0.5 * (W + W.T)
    onp.fill_diagonal(W, 0.0)
    dense = make_ncut_layer()
    g = grad(lambda W: dense(W)[1])(W)
    size = len(pickle.dumps(dense))
    clone = pickle.loads(pickle.dumps(dense))
    assert_close(grad(lambda W: clone(W)[1])(W), g, 1e-14, "unpickled dense NCut")
    grad(lambda W: dense(W)[1])(W)
    assert len(pickle.dumps(dense)) == size
    edges = grid_graph_edges(4, 4)
    w = onp.linspace(0.5, 1.5, len(edges))
    for backward in ("generic", "structured"):
        sparse = SparseNCut(edges, 16, backward=backward)
        g = grad(lambda w: sparse(w)[1])(w)
        clone = pickle.loads(pickle.dumps(sparse))
        assert_close(grad(lambda w: clone(w)[1])(w), g, 1e-12, f"unpickled SparseNCut {backward}")
