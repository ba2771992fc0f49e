"""A small explicit-layer toolkit in plain HIPS autograd.

Everything here is a function on arrays or on *pytrees*: parameters are nested
``dict`` / ``list`` / ``tuple`` containers whose leaves are arrays (or
scalars).  Layers come as ``(init, apply)`` pairs, e.g. ``dense_init`` /
``dense``; optimizers are pure functions ``(params, grads, ..., state) ->
(params, state)``.  All ``apply`` functions use ``autograd.numpy`` so they can
be differentiated with :func:`autograd.grad`.

Randomness always comes from an explicitly passed
:class:`numpy.random.Generator`, so initialisation and batching are
reproducible given a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as onp

import autograd.numpy as np
from autograd import value_and_grad
from autograd.scipy.special import logsumexp
from autograd.tracer import getval

__all__ = [
    "PyTree",
    "tree_map",
    "tree_leaves",
    "tree_flatten",
    "tree_zeros_like",
    "num_params",
    "glorot_uniform",
    "he_normal",
    "zeros",
    "dense_init",
    "dense",
    "relu",
    "tanh",
    "softmax",
    "log_softmax",
    "nll_loss",
    "accuracy",
    "mlp_init",
    "mlp",
    "minibatches",
    "sgd",
    "adam",
    "train_step",
]

PyTree = Any
"""Nested ``dict`` / ``list`` / ``tuple`` of arrays (or a single array)."""

Initializer = Callable[[onp.random.Generator, int, int], onp.ndarray]


# ---------------------------------------------------------------------------
# Pytrees
# ---------------------------------------------------------------------------


def _children(tree: PyTree) -> tuple[str, Any, list] | None:
    """Split one level of a pytree into ``(kind, aux, children)``.

    Returns ``None`` for a leaf.  Works on plain containers *and* on autograd's
    boxed containers (``DictBox`` / ``SequenceBox``), which appear when a
    function is differentiated with respect to a whole pytree: the container
    type is read from the unboxed value, the children are taken through the
    box so gradients keep flowing.  ``None`` is an empty node (no leaves).
    """
    value = getval(tree)
    if value is None:
        return ("none", None, [])
    if isinstance(value, dict):
        keys = list(value.keys())
        return ("dict", keys, [tree[k] for k in keys])
    if isinstance(value, (list, tuple)):
        kind = type(value)
        return ("seq", kind, [tree[i] for i in range(len(value))])
    return None


def _rebuild(kind: str, aux: Any, children: list) -> PyTree:
    if kind == "none":
        return None
    if kind == "dict":
        return dict(zip(aux, children))
    if aux is list:
        return list(children)
    if aux is tuple:
        return tuple(children)
    if hasattr(aux, "_fields"):  # namedtuple
        return aux(*children)
    return aux(children)


def tree_map(f: Callable[..., Any], *trees: PyTree) -> PyTree:
    """Apply ``f`` leafwise to one or more pytrees of the same structure.

    ``tree_map(f, a, b)`` returns a pytree shaped like ``a`` whose leaf at
    each position is ``f(a_leaf, b_leaf)``.  Dict children are matched by key
    (the output follows the key order of the first tree), sequences by
    position.  ``None`` is an empty node and maps to ``None``.

    Raises
    ------
    ValueError
        If the trees do not have the same structure.
    """
    if not trees:
        raise TypeError("tree_map needs at least one tree")
    first = _children(trees[0])
    if first is None:
        for t in trees[1:]:
            if _children(t) is not None:
                raise ValueError("tree_map: tree structures differ (leaf vs. container)")
        return f(*trees)
    kind, aux, kids = first
    others = []
    for t in trees[1:]:
        node = _children(t)
        if node is None or node[0] != kind:
            raise ValueError("tree_map: tree structures differ")
        if kind == "dict":
            if set(node[1]) != set(aux):
                raise ValueError(f"tree_map: dict keys differ: {sorted(map(str, aux))} "
                                 f"vs {sorted(map(str, node[1]))}")
            others.append([t[k] for k in aux])
        else:
            if len(node[2]) != len(kids):
                raise ValueError("tree_map: sequence lengths differ")
            others.append(node[2])
    mapped = [tree_map(f, *leaves) for leaves in zip(kids, *others)]
    return _rebuild(kind, aux, mapped)


def tree_leaves(tree: PyTree) -> list:
    """Leaves of a pytree in canonical (depth-first, dict-insertion) order."""
    node = _children(tree)
    if node is None:
        return [tree]
    return [leaf for child in node[2] for leaf in tree_leaves(child)]


def tree_flatten(tree: PyTree) -> tuple[np.ndarray, Callable[[np.ndarray], PyTree]]:
    r"""Concatenate all leaves of ``tree`` into one vector.

    .. math::  v = [\,\mathrm{vec}(\ell_1);\ \mathrm{vec}(\ell_2);\ \dots\,]

    Both directions are built from differentiable ``autograd.numpy``
    operations, so ``tree_flatten`` can be called inside a function being
    differentiated with respect to ``tree``, and ``unflatten`` inside a
    function being differentiated with respect to the vector (e.g. to hand a
    pytree of parameters to a routine that wants a flat vector).

    Parameters
    ----------
    tree : pytree
        Nested dict / list / tuple of arrays or scalars.

    Returns
    -------
    vector : ndarray, shape (num_params(tree),)
        Leaves raveled in C order and concatenated (dtypes follow NumPy
        promotion; an empty tree gives a length-0 float vector).
    unflatten : callable
        ``unflatten(vector) -> tree`` with the original structure and leaf
        shapes.  Leaves come back with the dtype of the vector passed in.
    """
    node_leaves = tree_leaves(tree)
    skeleton = tree_map(lambda _: 0, tree)  # plain containers, no boxes kept
    shapes = [np.shape(leaf) for leaf in node_leaves]
    sizes = [int(onp.prod(s, dtype=int)) for s in shapes]
    offsets = onp.concatenate([[0], onp.cumsum(sizes, dtype=int)])
    total = int(offsets[-1])
    if node_leaves:
        vector = np.concatenate([np.ravel(leaf) for leaf in node_leaves])
    else:
        vector = np.zeros(0)

    def unflatten(vec: np.ndarray) -> PyTree:
        if np.shape(vec) != (total,):
            raise ValueError(f"unflatten expects a vector of shape ({total},), "
                             f"got {np.shape(vec)}")
        pieces = iter(
            np.reshape(vec[offsets[i]:offsets[i + 1]], shapes[i])
            for i in range(len(shapes))
        )
        return tree_map(lambda _: next(pieces), skeleton)

    return vector, unflatten


def tree_zeros_like(tree: PyTree) -> PyTree:
    """A pytree of the same structure with every leaf replaced by zeros."""
    return tree_map(lambda x: onp.zeros_like(getval(x)), tree)


def num_params(tree: PyTree) -> int:
    """Total number of scalar entries over all leaves of ``tree``."""
    return int(sum(onp.size(getval(leaf)) for leaf in tree_leaves(tree)))


# ---------------------------------------------------------------------------
# Initializers
# ---------------------------------------------------------------------------


def glorot_uniform(rng: onp.random.Generator, fan_in: int, fan_out: int) -> onp.ndarray:
    r"""Glorot/Xavier uniform weights of shape ``(fan_in, fan_out)``.

    .. math::  W_{ij} \sim \mathcal{U}(-a, a), \qquad
               a = \sqrt{6 / (\text{fan\_in} + \text{fan\_out})}
    """
    limit = onp.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out))


def he_normal(rng: onp.random.Generator, fan_in: int, fan_out: int) -> onp.ndarray:
    r"""He/Kaiming normal weights of shape ``(fan_in, fan_out)`` (for ReLU).

    .. math::  W_{ij} \sim \mathcal{N}(0, \sigma^2), \qquad
               \sigma = \sqrt{2 / \text{fan\_in}}
    """
    return rng.normal(0.0, onp.sqrt(2.0 / fan_in), size=(fan_in, fan_out))


def zeros(rng: onp.random.Generator | None, fan_in: int, fan_out: int) -> onp.ndarray:
    """All-zero weights of shape ``(fan_in, fan_out)``.

    Same signature as the other initializers (``rng`` is ignored) so it can be
    passed as ``w_init`` — e.g. to start a residual/implicit block at zero.
    """
    return onp.zeros((fan_in, fan_out))


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def dense_init(rng: onp.random.Generator, n_in: int, n_out: int,
               w_init: Initializer = glorot_uniform) -> dict:
    """Parameters ``{"W": (n_in, n_out), "b": (n_out,)}`` of an affine layer.

    ``W`` is drawn with ``w_init(rng, n_in, n_out)``; ``b`` starts at zero.
    """
    return {"W": w_init(rng, n_in, n_out), "b": onp.zeros(n_out)}


def dense(params: dict, x: np.ndarray) -> np.ndarray:
    r"""Affine layer :math:`y = x W + b`.

    Parameters
    ----------
    params : dict
        ``{"W": (n_in, n_out), "b": (n_out,)}`` as made by :func:`dense_init`.
    x : ndarray, shape (batch, n_in) or (n_in,)

    Returns
    -------
    ndarray, shape (batch, n_out) or (n_out,)
    """
    return np.dot(x, params["W"]) + params["b"]


def relu(x: np.ndarray) -> np.ndarray:
    r""":math:`\max(x, 0)` elementwise (gradient taken as 0 at ``x = 0``)."""
    return np.where(x > 0, x, 0.0)


def tanh(x: np.ndarray) -> np.ndarray:
    r""":math:`\tanh(x)` elementwise (``autograd.numpy.tanh``)."""
    return np.tanh(x)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    r"""Numerically stable log-softmax along ``axis``.

    .. math::  \log\mathrm{softmax}(z)_i = z_i - \log\sum_j e^{z_j}

    computed with ``logsumexp`` (which shifts by :math:`\max_j z_j`), so it is
    finite for logits of any magnitude.
    """
    return z - logsumexp(z, axis=axis, keepdims=True)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    r"""Softmax along ``axis``: :math:`e^{z_i} / \sum_j e^{z_j}` (stable)."""
    return np.exp(log_softmax(z, axis=axis))


def nll_loss(log_probs: np.ndarray, labels: onp.ndarray) -> np.ndarray:
    r"""Mean negative log-likelihood of integer class labels.

    .. math::  L = -\frac{1}{N}\sum_{n=1}^{N} \log p_{n, y_n}

    Parameters
    ----------
    log_probs : ndarray, shape (N, C)
        Log-probabilities, e.g. ``log_softmax(logits)``.
    labels : int ndarray, shape (N,)
        Class indices in ``[0, C)``.
    """
    labels = onp.asarray(labels)
    if not onp.issubdtype(labels.dtype, onp.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    n = np.shape(log_probs)[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    return -np.mean(log_probs[onp.arange(n), labels])


def accuracy(logits_or_probs: np.ndarray, labels: onp.ndarray) -> float:
    """Fraction of rows whose arg-max over the last axis equals ``labels``.

    Works equally on logits, probabilities or log-probabilities (all share
    the same arg-max).  Not differentiable; returns a Python float.
    """
    scores = onp.asarray(getval(logits_or_probs))
    return float(onp.mean(onp.argmax(scores, axis=-1) == onp.asarray(labels)))


def mlp_init(rng: onp.random.Generator, sizes: list[int],
             w_init: Initializer = glorot_uniform) -> list[dict]:
    """Parameters of an MLP with layer widths ``sizes = [n_in, h_1, ..., n_out]``.

    Returns a list of ``len(sizes) - 1`` :func:`dense_init` dicts.
    """
    if len(sizes) < 2:
        raise ValueError("mlp_init needs at least input and output sizes")
    return [dense_init(rng, n_in, n_out, w_init) for n_in, n_out in zip(sizes[:-1], sizes[1:])]


def mlp(params: list[dict], x: np.ndarray,
        activation: Callable[[np.ndarray], np.ndarray] = relu) -> np.ndarray:
    r"""Multi-layer perceptron; the last layer is linear (returns logits).

    .. math::  h_0 = x,\quad h_{k} = \sigma(h_{k-1} W_k + b_k)\ (k < K),\quad
               y = h_{K-1} W_K + b_K
    """
    n_layers = len(params)
    h = x
    for k in range(n_layers):
        h = dense(params[k], h)
        if k < n_layers - 1:
            h = activation(h)
    return h


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def minibatches(rng: onp.random.Generator | None, n: int, batch_size: int,
                shuffle: bool = True) -> Iterator[onp.ndarray]:
    """Yield index arrays covering ``range(n)`` exactly once (one epoch).

    Batches have ``batch_size`` indices except possibly the last, which holds
    the remaining ``n % batch_size``.  With ``shuffle=True`` the order is a
    permutation drawn from ``rng``; with ``shuffle=False`` it is ``0..n-1``
    and ``rng`` may be ``None``.  ``n = 0`` yields nothing.
    """
    n = int(n)
    batch_size = int(batch_size)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shuffle:
        if rng is None:
            raise ValueError("shuffle=True needs a numpy.random.Generator")
        order = rng.permutation(n)
    else:
        order = onp.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------


def sgd(params: PyTree, grads: PyTree, lr: float, momentum: float = 0.0,
        state: PyTree | None = None) -> tuple[PyTree, PyTree]:
    r"""One step of (heavy-ball) stochastic gradient descent on a pytree.

    .. math::  v \leftarrow \mu v + g, \qquad \theta \leftarrow \theta - \eta v

    (with :math:`\mu = 0` this is plain :math:`\theta - \eta g`).

    Parameters
    ----------
    params, grads : pytree
        Same structure.
    lr : float
        Step size :math:`\eta`.
    momentum : float
        :math:`\mu \in [0, 1)`.
    state : pytree or None
        Velocity :math:`v` from the previous call; ``None`` starts at zero.

    Returns
    -------
    (new_params, new_state)
    """
    velocity = tree_zeros_like(params) if state is None else state
    velocity = tree_map(lambda v, g: momentum * v + g, velocity, grads)
    new_params = tree_map(lambda p, v: p - lr * v, params, velocity)
    return new_params, velocity


def adam(params: PyTree, grads: PyTree, lr: float = 1e-3, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8,
         state: dict | None = None) -> tuple[PyTree, dict]:
    r"""One Adam step (Kingma & Ba, 2015) on a pytree.

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        v  \leftarrow \beta_2 v + (1-\beta_2) g^2, \\
        \hat m &= m / (1-\beta_1^t), \qquad \hat v = v / (1-\beta_2^t), \\
        \theta &\leftarrow \theta - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)

    Parameters
    ----------
    state : dict or None
        ``{"m": pytree, "v": pytree, "t": int}`` from the previous call;
        ``None`` starts with zero moments and ``t = 0``.

    Returns
    -------
    (new_params, new_state)
    """
    if state is None:
        state = {"m": tree_zeros_like(params), "v": tree_zeros_like(params), "t": 0}
    t = state["t"] + 1
    m = tree_map(lambda m_, g: b1 * m_ + (1.0 - b1) * g, state["m"], grads)
    v = tree_map(lambda v_, g: b2 * v_ + (1.0 - b2) * g * g, state["v"], grads)
    m_scale = 1.0 / (1.0 - b1 ** t)
    v_scale = 1.0 / (1.0 - b2 ** t)
    new_params = tree_map(
        lambda p, m_, v_: p - lr * (m_ * m_scale) / (np.sqrt(v_ * v_scale) + eps),
        params, m, v)
    return new_params, {"m": m, "v": v, "t": t}


def train_step(loss_fn: Callable[[PyTree, Any], Any], params: PyTree, batch: Any,
               optimizer: Callable[..., tuple[PyTree, PyTree]], opt_state: PyTree,
               **kw: Any) -> tuple[PyTree, PyTree, float]:
    """Evaluate ``loss_fn(params, batch)``, differentiate, and take one step.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, batch) -> scalar``, written with ``autograd.numpy``.
    optimizer : callable
        :func:`sgd`, :func:`adam`, or anything with the signature
        ``optimizer(params, grads, ..., state=...) -> (params, state)``.
    opt_state : pytree or None
        Optimizer state from the previous step (``None`` on the first).
    **kw
        Extra keyword arguments for the optimizer, e.g. ``lr=1e-2``.

    Returns
    -------
    (new_params, new_opt_state, loss) : loss is the value *before* the step.
    """
    loss, grads = value_and_grad(loss_fn)(params, batch)
    new_params, new_state = optimizer(params, grads, state=opt_state, **kw)
    return new_params, new_state, float(loss)
