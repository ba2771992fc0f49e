r"""Registry entries for the normalized-cuts layer (``reference_layers.ncut``).

The eigenvector's sign is a convention, so every entry checks ``lambda`` and
two sign-invariant functions of ``v``:

.. math::  \big(\lambda,\; v^\top C v,\; \textstyle\sum_i c_i v_i^2\big)

with a fixed random matrix ``C`` and vector ``c`` (inputs that are not
differentiated).  The affinity input ``X`` is symmetrized inside the entry,
``W = (X + X^T)/2``, so that the checker's random (non-symmetric) directions
stay inside the layer's domain of symmetric affinities.

- ``ncut-dense``: ``(N, N)``, forward ``scipy.linalg.eigh(L, D)``, LU backward;
- ``ncut-dense-unit``: the paper's ``v^T v = 1`` normalization;
- ``ncut-batched``: ``(B, N, N)``, ``batch_axis=0``;
- ``ncut-sparse``: weights on a pixel grid's edges, shift-invert Lanczos forward,
  matrix-free preconditioned MINRES backward (solved to a relative residual of
  1e-10, hence ``rtol=1e-6``);
- ``ncut-sparse-splu``: the same with a sparse LU of the bordered system.

Inputs come from :mod:`verification.strategies.ncut` (planted relative
eigen-gap ``~0.5``); ``diagnose`` reports the gap through the layer's
``diagnostics`` hook.
"""
from __future__ import annotations

import autograd.numpy as np
import numpy as onp
from autograd.builtins import tuple as ag_tuple
from reference_layers.ncut import SparseNCut, make_ncut_layer

from ..registry import Entry, register
from ..strategies.ncut import block_affinity, block_affinity_batch, image_graph

_dense = make_ncut_layer()
_dense_unit = make_ncut_layer(normalization="unit")
_batched = make_ncut_layer(batch_axis=0)


def _invariants(v, lam, C, c):
    """``(lam, v^T C v, sum c v^2)`` for one instance or a batch (last axis)."""
    quad = np.sum(np.matmul(v, C) * v, axis=-1)
    # a plain tuple of boxes would look constant to autograd: box it
    return ag_tuple((lam, quad, np.sum(c * v * v, axis=-1)))


def _dense_fn(layer):
    def fn(X, C, c):
        v, lam = layer(0.5 * (X + np.swapaxes(X, -1, -2)))
        return _invariants(v, lam, C, c)
    return fn


def _dense_generate(rng, n: int = 7, gap: float = 0.5, noise: float = 0.1):
    return block_affinity(rng, n, gap, noise), rng.standard_normal((n, n)), rng.standard_normal(n)


def _batched_generate(rng, batch: int = 3, n: int = 6, gap: float = 0.5, noise: float = 0.1):
    return (block_affinity_batch(rng, batch, n, gap, noise), rng.standard_normal((n, n)),
            rng.standard_normal(n))


# the sparse structure is fixed per entry; the generator draws the weights on it
_HEIGHT, _WIDTH = 4, 5
_EDGES, _, _N = image_graph(onp.random.default_rng(0), _HEIGHT, _WIDTH)
_sparse = SparseNCut(_EDGES, _N)
_sparse_splu = SparseNCut(_EDGES, _N, backward="structured")


def _sparse_fn(layer):
    def fn(weights, C, c):
        v, lam = layer(weights)
        return _invariants(v, lam, C, c)
    return fn


def _sparse_generate(rng, contrast: float = 1.0, floor: float = 0.05):
    _, weights, n = image_graph(rng, _HEIGHT, _WIDTH, contrast=contrast, floor=floor)
    return weights, rng.standard_normal((n, n)), rng.standard_normal(n)


_OUTPUTS = [{"name": "lam", "shape": "() or (B,)", "meaning": "second generalized eigenvalue of "
                                                             "(D - W, D)"},
            {"name": "vCv", "shape": "() or (B,)", "meaning": "v' C v (sign-invariant)"},
            {"name": "cvv", "shape": "() or (B,)", "meaning": "sum_i c_i v_i^2 (sign-invariant)"}]
_REASON = ("LAPACK generalized eigh / shift-invert Lanczos reach ~1e-12 at a relative eigen-gap "
           "~0.5, derivatives ~1e-10 (sparse MINRES backward: 1e-10); 1e-7 leaves a margin")


def _conv(inputs, normalization: str = "v' D v = 1", batched: bool = False, rtol: float = 1e-7):
    conv = {"inputs": inputs, "outputs": _OUTPUTS,
            "problem": "NCut: (D - W) v = lam D v, second smallest lam, D = diag(W 1)",
            "normalization": normalization,
            "sign": "v's sign is a convention: only sign-invariant functions of v are exported",
            "recommended_rtol": rtol, "recommended_rtol_reason": _REASON}
    if batched:
        conv["batch"] = "X is (B, N, N); C and c are shared and not differentiated"
    return conv


_DENSE_IN = [{"name": "X", "shape": "(N, N) or (B, N, N)", "enters_as": "W = (X + X')/2"},
             {"name": "C", "shape": "(N, N)", "differentiated": False},
             {"name": "c", "shape": "(N,)", "differentiated": False}]
_SPARSE_IN = [{"name": "weights", "shape": "(E,)", "enters_as": "W on the edges of a fixed 4x5 "
                                                                   "4-connected pixel grid"},
              {"name": "C", "shape": "(20, 20)", "differentiated": False},
              {"name": "c", "shape": "(20,)", "differentiated": False}]

register(Entry(
    name="ncut-dense", fn=_dense_fn(_dense), generate=_dense_generate, argnums=(0,),
    conventions=_conv(_DENSE_IN),
    size={"n": 7, "gap": 0.5, "noise": 0.1},
    description="NCut (v, lam) of (D - W, D), dense eigh + LU; checks lam, v'Cv, sum c v^2"))
register(Entry(
    name="ncut-dense-unit", fn=_dense_fn(_dense_unit), generate=_dense_generate, argnums=(0,),
    conventions=_conv(_DENSE_IN, "v' v = 1 (the paper's)"),
    size={"n": 7, "gap": 0.5, "noise": 0.1},
    description="NCut with the paper's v'v = 1 normalization (non-symmetric bordered J)"))
register(Entry(
    name="ncut-batched", fn=_dense_fn(_batched), generate=_batched_generate, argnums=(0,),
    conventions=_conv(_DENSE_IN, batched=True),
    size={"batch": 3, "n": 6, "gap": 0.5, "noise": 0.1},
    description="NCut on a batch (B, N, N) of affinities, batch_axis=0"))
register(Entry(
    name="ncut-sparse", fn=_sparse_fn(_sparse), generate=_sparse_generate, argnums=(0,),
    conventions=_conv(_SPARSE_IN, rtol=1e-5),
    size={"contrast": 1.0, "floor": 0.05}, rtol=1e-6,
    description="NCut on a 4x5 pixel graph: eigsh shift-invert + matrix-free MINRES (core minres with a per-point diag(D^-1, 1) preconditioner, true residual <= 1e-12)"))
register(Entry(
    name="ncut-sparse-splu", fn=_sparse_fn(_sparse_splu), generate=_sparse_generate, argnums=(0,),
    conventions=_conv(_SPARSE_IN),
    size={"contrast": 1.0, "floor": 0.05},
    description="NCut on a 4x5 pixel graph: eigsh shift-invert + sparse LU of the bordered J"))
