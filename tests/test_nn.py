"""Tests for nimplicit.nn: pytrees, layers, losses, batching, optimizers."""

import numpy as onp
import pytest
from hypothesis import given, settings, strategies as st

import autograd.numpy as np
from autograd import grad

from nimplicit import nn


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def central_diff_grad(f, tree, h=1e-6):
    """Central finite-difference gradient of scalar ``f`` w.r.t. a pytree."""
    vec, unflatten = nn.tree_flatten(tree)
    vec = onp.asarray(vec, dtype=float)
    g = onp.zeros_like(vec)
    for i in range(vec.size):
        e = onp.zeros_like(vec)
        e[i] = h
        g[i] = (f(unflatten(vec + e)) - f(unflatten(vec - e))) / (2 * h)
    return unflatten(g)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-8):
    va, _ = nn.tree_flatten(a)
    vb, _ = nn.tree_flatten(b)
    onp.testing.assert_allclose(va, vb, rtol=rtol, atol=atol)


def check_grad(f, tree):
    assert_trees_close(grad(f)(tree), central_diff_grad(f, tree), rtol=1e-5, atol=1e-7)


@pytest.fixture
def rng():
    return onp.random.default_rng(0)


# ---------------------------------------------------------------------------
# pytrees
# ---------------------------------------------------------------------------


def nested_tree(rng):
    return {
        "layers": [{"W": rng.normal(size=(3, 2)), "b": rng.normal(size=2)},
                   {"W": rng.normal(size=(2, 1)), "b": rng.normal(size=1)}],
        "scale": (rng.normal(size=()), 2.5),
        "empty": [],
    }


def test_tree_map_multiple_trees(rng):
    a, b = nested_tree(rng), nested_tree(rng)
    c = nn.tree_map(lambda x, y: x + 2 * y, a, b)
    assert isinstance(c["layers"], list) and isinstance(c["scale"], tuple)
    onp.testing.assert_allclose(c["layers"][1]["W"], a["layers"][1]["W"] + 2 * b["layers"][1]["W"])
    assert c["scale"][1] == pytest.approx(7.5)


def test_tree_map_dict_matched_by_key():
    out = nn.tree_map(lambda x, y: x - y, {"a": 1.0, "b": 2.0}, {"b": 20.0, "a": 10.0})
    assert out == {"a": -9.0, "b": -18.0}


@pytest.mark.parametrize("other", [{"a": 1.0}, {"a": 1.0, "b": [1.0, 2.0]}, {"a": 1.0, "c": 2.0}])
def test_tree_map_structure_mismatch_raises(other):
    with pytest.raises(ValueError):
        nn.tree_map(lambda x, y: x, {"a": 1.0, "b": [1.0]}, other)


def test_tree_flatten_round_trip(rng):
    tree = nested_tree(rng)
    vec, unflatten = nn.tree_flatten(tree)
    assert vec.shape == (nn.num_params(tree),) == (6 + 2 + 2 + 1 + 1 + 1,)
    back = unflatten(vec)
    assert isinstance(back["layers"], list) and isinstance(back["scale"], tuple)
    assert back["empty"] == []
    assert back["layers"][0]["W"].shape == (3, 2) and back["scale"][0].shape == ()
    assert_trees_close(back, tree, rtol=0, atol=0)
    with pytest.raises(ValueError):
        unflatten(vec[:-1])


def test_tree_flatten_empty_and_leaf():
    vec, unflatten = nn.tree_flatten({})
    assert vec.shape == (0,) and unflatten(vec) == {}
    x = onp.arange(6.0).reshape(2, 3)
    vec, unflatten = nn.tree_flatten(x)
    onp.testing.assert_array_equal(unflatten(vec), x)


def test_tree_flatten_under_autograd(rng):
    tree = nested_tree(rng)

    def loss(t):
        return np.sum(t["layers"][0]["W"] ** 2) + t["scale"][0] * np.sum(t["layers"][1]["b"]) \
            + np.sin(t["scale"][1])

    vec, unflatten = nn.tree_flatten(tree)
    # differentiate through unflatten (vector -> tree)
    g_vec = grad(lambda v: loss(unflatten(v)))(vec)
    g_tree = grad(loss)(tree)
    onp.testing.assert_allclose(g_vec, nn.tree_flatten(g_tree)[0], rtol=1e-12)
    # differentiate through flatten (tree -> vector), incl. autograd's boxed containers
    w = rng.normal(size=vec.shape)
    g_tree2 = grad(lambda t: np.dot(w, nn.tree_flatten(t)[0]))(tree)
    onp.testing.assert_allclose(nn.tree_flatten(g_tree2)[0], w, rtol=1e-12)
    # tree_map inside a differentiated function
    def sum_of_squares(t):
        return sum(np.sum(leaf) for leaf in nn.tree_leaves(nn.tree_map(lambda x: x ** 2, t)))

    g_tree3 = grad(sum_of_squares)(tree)
    assert_trees_close(g_tree3, nn.tree_map(lambda x: 2 * x, tree), rtol=1e-12)


def test_tree_zeros_like_and_num_params(rng):
    tree = nested_tree(rng)
    z = nn.tree_zeros_like(tree)
    assert all(onp.all(leaf == 0) for leaf in nn.tree_leaves(z))
    assert [onp.shape(l) for l in nn.tree_leaves(z)] == [onp.shape(l) for l in nn.tree_leaves(tree)]
    assert nn.num_params(nn.mlp_init(rng, [4, 5, 3])) == 4 * 5 + 5 + 5 * 3 + 3


# ---------------------------------------------------------------------------
# initializers
# ---------------------------------------------------------------------------


def test_initializers_shapes_scales_and_reproducibility():
    w = nn.glorot_uniform(onp.random.default_rng(1), 200, 300)
    assert w.shape == (200, 300) and onp.abs(w).max() <= onp.sqrt(6 / 500)
    onp.testing.assert_array_equal(w, nn.glorot_uniform(onp.random.default_rng(1), 200, 300))
    h = nn.he_normal(onp.random.default_rng(2), 400, 300)
    assert h.shape == (400, 300) and h.std() == pytest.approx(onp.sqrt(2 / 400), rel=0.02)
    assert not onp.any(nn.zeros(None, 3, 4)) and nn.zeros(None, 3, 4).shape == (3, 4)
    p = nn.dense_init(onp.random.default_rng(3), 3, 4, w_init=nn.he_normal)
    assert p["W"].shape == (3, 4) and p["b"].shape == (4,) and not onp.any(p["b"])


# ---------------------------------------------------------------------------
# layers and losses: gradients vs central differences
# ---------------------------------------------------------------------------


def test_dense_forward_and_grad(rng):
    params = nn.dense_init(rng, 4, 3)
    params["b"] = rng.normal(size=3)
    x = rng.normal(size=(5, 4))
    onp.testing.assert_allclose(nn.dense(params, x), x @ params["W"] + params["b"])
    w = rng.normal(size=(5, 3))
    check_grad(lambda p: np.sum(w * np.tanh(nn.dense(p, x))), params)
    check_grad(lambda xx: np.sum(w * nn.dense(params, xx) ** 2), x)


@pytest.mark.parametrize("activation", [nn.relu, nn.tanh])
def test_mlp_grad(rng, activation):
    params = nn.mlp_init(rng, [3, 6, 5, 2])
    x = rng.normal(size=(7, 3))
    w = rng.normal(size=(7, 2))
    out = nn.mlp(params, x, activation=activation)
    assert out.shape == (7, 2)
    check_grad(lambda p: np.sum(w * nn.mlp(p, x, activation=activation)), params)


def test_relu_values():
    onp.testing.assert_array_equal(nn.relu(onp.array([-2.0, 0.0, 3.0])), [0.0, 0.0, 3.0])
    onp.testing.assert_array_equal(grad(lambda x: np.sum(nn.relu(x)))(onp.array([-1.0, 0.0, 2.0])),
                                   [0.0, 0.0, 1.0])


@pytest.mark.parametrize("axis", [-1, 0])
def test_log_softmax_grad(rng, axis):
    z = rng.normal(size=(4, 5))
    w = rng.normal(size=(4, 5))
    check_grad(lambda zz: np.sum(w * nn.log_softmax(zz, axis=axis)), z)
    check_grad(lambda zz: np.sum(w * nn.softmax(zz, axis=axis)), z)


def test_nll_loss_value_and_grad(rng):
    logits = rng.normal(size=(6, 4))
    labels = rng.integers(0, 4, size=6)
    lp = nn.log_softmax(logits)
    expected = -onp.mean([lp[i, labels[i]] for i in range(6)])
    assert nn.nll_loss(lp, labels) == pytest.approx(expected)
    check_grad(lambda z: nn.nll_loss(nn.log_softmax(z), labels), logits)
    # analytic gradient of softmax cross-entropy: (softmax - onehot) / N
    onehot = onp.eye(4)[labels]
    onp.testing.assert_allclose(grad(lambda z: nn.nll_loss(nn.log_softmax(z), labels))(logits),
                                (nn.softmax(logits) - onehot) / 6, rtol=1e-10)
    with pytest.raises(TypeError):
        nn.nll_loss(lp, labels.astype(float))


def test_log_softmax_stable_at_large_inputs():
    z = onp.array([[1000.0, 1001.0, 1002.0], [-1000.0, -1001.0, -1003.0], [1e3, -1e3, 0.0]])
    lp = nn.log_softmax(z)
    assert onp.all(onp.isfinite(lp))
    onp.testing.assert_allclose(lp[0], nn.log_softmax(onp.array([0.0, 1.0, 2.0])), rtol=1e-12)
    onp.testing.assert_allclose(lp[2], [0.0, -2000.0, -1000.0], atol=1e-12)
    p = nn.softmax(z)
    assert onp.all(onp.isfinite(p))
    onp.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)
    g = grad(lambda zz: nn.nll_loss(nn.log_softmax(zz), onp.array([0, 2, 1])))(z)
    assert onp.all(onp.isfinite(g))


@settings(max_examples=50, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-3, 1.0, 50.0, 1e3]),
       axis=st.sampled_from([0, 1, -1]))
def test_softmax_sums_to_one(seed, scale, axis):
    z = scale * onp.random.default_rng(seed).normal(size=(3, 4))
    p = nn.softmax(z, axis=axis)
    assert onp.all(p >= 0)
    onp.testing.assert_allclose(p.sum(axis=axis), 1.0, rtol=1e-12)


def test_accuracy():
    logits = onp.array([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2]])
    assert nn.accuracy(logits, onp.array([0, 1, 1, 1])) == pytest.approx(0.75)
    assert nn.accuracy(nn.softmax(logits), onp.array([0, 1, 0, 1])) == 1.0


# ---------------------------------------------------------------------------
# minibatches
# ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, database=None)
@given(n=st.integers(0, 200), batch_size=st.integers(1, 64), shuffle=st.booleans(),
       seed=st.integers(0, 1000))
def test_minibatches_cover_each_index_once(n, batch_size, shuffle, seed):
    batches = list(nn.minibatches(onp.random.default_rng(seed), n, batch_size, shuffle=shuffle))
    assert len(batches) == -(-n // batch_size)
    assert all(len(b) == batch_size for b in batches[:-1])
    assert all(1 <= len(b) <= batch_size for b in batches)
    idx = onp.concatenate(batches) if batches else onp.array([], dtype=int)
    onp.testing.assert_array_equal(onp.sort(idx), onp.arange(n))
    if not shuffle:
        onp.testing.assert_array_equal(idx, onp.arange(n))


def test_minibatches_reproducible_and_validates():
    a = list(nn.minibatches(onp.random.default_rng(5), 10, 3))
    b = list(nn.minibatches(onp.random.default_rng(5), 10, 3))
    assert all(onp.array_equal(x, y) for x, y in zip(a, b))
    assert [len(x) for x in nn.minibatches(None, 10, 3, shuffle=False)] == [3, 3, 3, 1]
    with pytest.raises(ValueError):
        list(nn.minibatches(None, 10, 0, shuffle=False))
    with pytest.raises(ValueError):
        list(nn.minibatches(None, 10, 3, shuffle=True))


# ---------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------

A_QUAD = onp.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
B_QUAD = onp.array([1.0, -2.0, 0.5])
X_STAR = onp.linalg.solve(A_QUAD, B_QUAD)


def quadratic(params, batch=None):
    """0.5 x'Ax - b'x + c plus a 2x2 matrix term, minimum value 0."""
    x, m = params["x"], params["nested"][0]
    return 0.5 * np.dot(x, np.dot(A_QUAD, x)) - np.dot(B_QUAD, x) + 0.5 * np.dot(B_QUAD, X_STAR) \
        + 0.5 * np.sum((m - 1.0) ** 2)


@pytest.mark.parametrize("optimizer, kw, steps", [
    (nn.sgd, dict(lr=0.3), 2000),
    (nn.sgd, dict(lr=0.2, momentum=0.9), 1000),
    (nn.adam, dict(lr=0.05), 3000),
])
def test_optimizers_minimize_quadratic(optimizer, kw, steps):
    params = {"x": onp.zeros(3), "nested": [onp.zeros((2, 2))]}
    state = None
    for _ in range(steps):
        params, state, _ = nn.train_step(quadratic, params, None, optimizer, state, **kw)
    assert quadratic(params) < 1e-6
    onp.testing.assert_allclose(params["x"], X_STAR, atol=1e-6)
    onp.testing.assert_allclose(params["nested"][0], 1.0, atol=1e-6)
    assert isinstance(params["nested"], list)


def test_sgd_and_adam_single_step_formulas():
    p, g = {"w": onp.array([1.0, -2.0])}, {"w": onp.array([0.5, 4.0])}
    p1, s1 = nn.sgd(p, g, lr=0.1, momentum=0.9)
    onp.testing.assert_allclose(p1["w"], [0.95, -2.4])
    p2, _ = nn.sgd(p1, g, lr=0.1, momentum=0.9, state=s1)
    onp.testing.assert_allclose(p2["w"], p1["w"] - 0.1 * (0.9 * g["w"] + g["w"]))
    # first Adam step moves each coordinate by ~lr against the gradient sign
    q1, st1 = nn.adam(p, g, lr=0.01)
    onp.testing.assert_allclose(q1["w"], p["w"] - 0.01 * onp.sign(g["w"]), rtol=1e-6)
    assert st1["t"] == 1
    assert p["w"][0] == 1.0  # inputs are not mutated


def test_train_step_returns_loss_before_step():
    params = {"x": onp.zeros(3), "nested": [onp.zeros((2, 2))]}
    new, state, loss = nn.train_step(quadratic, params, None, nn.sgd, None, lr=0.1)
    assert loss == pytest.approx(quadratic(params))
    assert quadratic(new) < loss


# ---------------------------------------------------------------------------
# end to end: a 2-layer MLP on a small nonlinear two-class problem
# ---------------------------------------------------------------------------


def two_rings(rng, n):
    """Points inside radius 1 are class 0; points in the ring 1.5..2.5 are class 1."""
    labels = rng.integers(0, 2, size=n)
    radius = onp.where(labels == 0, rng.uniform(0.0, 1.0, n), rng.uniform(1.5, 2.5, n))
    angle = rng.uniform(0.0, 2 * onp.pi, n)
    x = onp.stack([radius * onp.cos(angle), radius * onp.sin(angle)], axis=1)
    return x, labels


def test_mlp_learns_two_class_problem():
    rng = onp.random.default_rng(42)
    x_train, y_train = two_rings(rng, 400)
    x_test, y_test = two_rings(rng, 400)
    params = nn.mlp_init(rng, [2, 16, 2], w_init=nn.he_normal)

    def loss(p, batch):
        xb, yb = batch
        return nn.nll_loss(nn.log_softmax(nn.mlp(p, xb)), yb)

    # chance level before training
    assert nn.accuracy(nn.mlp(params, x_test), y_test) < 0.9
    state, step = None, 0
    while step < 300:
        for idx in nn.minibatches(rng, len(x_train), 64):
            params, state, _ = nn.train_step(loss, params, (x_train[idx], y_train[idx]),
                                             nn.adam, state, lr=1e-2)
            step += 1
    assert nn.accuracy(nn.mlp(params, x_train), y_train) > 0.95
    assert nn.accuracy(nn.mlp(params, x_test), y_test) > 0.95
