r"""Registry entries for the graph-matching layers (``reference_layers.graph_matching``).

The affinity input is the unconstrained ``X`` of ``M = exp((X + X')/2)``
(entrywise), so the checker's random directions stay inside the layers'
domain (symmetric, positive ``M``: a simple Perron eigenvalue with a large
gap).  SM's sign convention (``sum(y) > 0``) is deterministic and smooth on
positive affinities, so ``y`` itself is checked.

- ``gm-sm``: SM ``(y, lam)`` on ``(9, 9)``: dense eigh forward, bordered LU backward;
- ``gm-sm-batched``: SM on ``(3, 8, 8)``, ``batch_axis=0``;
- ``gm-sm-krylov``: SM with the Lanczos forward and the projected-CG backward;
- ``gm-smac``: SMAC (one-to-one constraints, 3 x 3 assignment), output ``x`` with ``C x = d``;
- ``gm-smac-constraints``: SMAC differentiated also in user constraints ``C`` and ``d``;
- ``gm-sinkhorn``: implicit log-domain Sinkhorn (fixed point of the gauge-fixed
  dual potentials) on ``(4, 5)`` scores;
- ``gm-power-iteration``: 5 unrolled power iterations (explicit, autograd);
- ``gm-affinity``: the numba Gaussian affinity builder (first order only).
"""
from __future__ import annotations

import autograd.numpy as np
import numpy as onp
from autograd.builtins import tuple as ag_tuple
from reference_layers import graph_matching as gm

from ..registry import Entry, register
from ..strategies.graph_matching import random_affinity_input


def _sym_exp(X):
    return np.exp(0.5 * (X + np.swapaxes(X, -1, -2)))


def _sm(X):
    # the layer returns a plain tuple of boxes: box it so autograd traces (y, lam)
    return ag_tuple(gm.spectral_matching_layer(_sym_exp(X), return_eigenvalue=True))


def _sm_krylov(X):
    return ag_tuple(gm.spectral_matching_layer(_sym_exp(X), return_eigenvalue=True,
                                               eig_method="krylov", kkt_dense_max=0))


_AFFINITY_INPUT = {"name": "X", "shape": "(N, N) or (B, N, N)",
                   "enters_as": "M = exp((X + X')/2) entrywise (symmetric, positive affinity)"}
_EIG_REASON = ("dense LAPACK eigh and Lanczos reach ~1e-12 on a Perron vector with a relative gap "
               "~0.5, and their derivatives ~1e-10; 1e-7 leaves a margin while a 1e-4 gradient "
               "error fails")


def _sm_conventions(batched: bool = False) -> dict:
    conv = {"inputs": [_AFFINITY_INPUT],
            "outputs": [{"name": "y", "shape": "(N,)" + (" per instance, (B, N)" if batched else "")},
                        {"name": "lam", "shape": "()" + (" per instance, (B,)" if batched else "")}],
            "problem": "leading eigenpair M y = lam y of the (N, N) affinity",
            "normalization": "y'y = 1", "sign": "sum(y) > 0 (deterministic, smooth on positive M)",
            "recommended_rtol": 1e-7, "recommended_rtol_reason": _EIG_REASON}
    if batched:
        conv["batch"] = "leading batch axis B, independent instances (no shared argument)"
    return conv


_SMAC_CONVENTIONS = {
    "inputs": [_AFFINITY_INPUT, {"name": "C", "shape": "(p, N)"}, {"name": "d", "shape": "(p,)"}],
    "outputs": [{"name": "x", "shape": "(N,)"}],
    "problem": "SMAC: leading eigenvector of the affinity projected on the null space of the "
               "constraints, rescaled so that C x = d (default C, d: one-to-one on a 3x3 assignment)",
    "sign": "fixed by the rescaling C x = d", "recommended_rtol": 1e-7,
    "recommended_rtol_reason": _EIG_REASON}


def _smac(X):
    return gm.smac_layer(_sym_exp(X))


def _smac_constraints(X, C, d):
    return gm.smac_layer(_sym_exp(X), C, d)


def _single(rng, N: int = 9):
    return (random_affinity_input(rng, N),)


def _batched(rng, batch: int = 3, N: int = 8):
    return (onp.stack([random_affinity_input(rng, N) for _ in range(batch)]),)


def _with_constraints(rng, N: int = 8, p: int = 3):
    return random_affinity_input(rng, N), rng.uniform(0.5, 1.5, (p, N)), rng.uniform(0.5, 1.5, p)


def _scores(rng, n: int = 4, m: int = 5):
    return (rng.uniform(-1.5, 1.5, (n, m)),)


def _affinity_inputs(rng, n: int = 4, m: int = 3):
    E1, E2 = gm.full_edges(n), gm.full_edges(m)
    P1 = gm.edge_features(rng.standard_normal((n, 2)), E1)
    P2 = gm.edge_features(rng.standard_normal((m, 2)), E2)
    return rng.uniform(0.1, 1.0, (n, m)), P1, P2, rng.uniform(0.2, 1.5, 3)


_E1, _E2 = gm.full_edges(4), gm.full_edges(3)


def _affinity(Kp, P1, P2, w):
    return gm.gaussian_affinity(Kp, P1, P2, w, _E1, _E2)


register(Entry(name="gm-sm", fn=_sm, generate=_single, size={"N": 9}, argnums=(0,),
               conventions=_sm_conventions(),
               description="spectral matching (y, lam) of exp((X+X')/2): dense eigh + bordered LU"))
register(Entry(name="gm-sm-batched", fn=_sm, generate=_batched, size={"batch": 3, "N": 8},
               argnums=(0,), conventions=_sm_conventions(True), description="spectral matching on a batch (B, N, N), batch_axis=0"))
register(Entry(name="gm-sm-krylov", fn=_sm_krylov, generate=_single, size={"N": 9}, argnums=(0,),
               conventions=_sm_conventions(),
               description="spectral matching: Lanczos forward, projected-CG backward"))
register(Entry(name="gm-smac", fn=_smac, generate=_single, size={"N": 9}, argnums=(0,),
               conventions={**_SMAC_CONVENTIONS, "inputs": [_AFFINITY_INPUT]},
               description="SMAC with one-to-one constraints (3x3), rescaled so C x = d"))
register(Entry(name="gm-smac-constraints", fn=_smac_constraints, generate=_with_constraints,
               size={"N": 8, "p": 3}, argnums=(0, 1, 2), conventions=_SMAC_CONVENTIONS,
               description="SMAC differentiated in the affinity and the constraints C, d"))
register(Entry(name="gm-sinkhorn", fn=lambda S: gm.sinkhorn_layer(S, tau=0.8), generate=_scores,
               size={"n": 4, "m": 5}, argnums=(0,),
               conventions={"inputs": [{"name": "S", "shape": "(n, m) scores"}],
                            "outputs": [{"name": "P", "shape": "(n, m)"}],
                            "problem": "P = exp(S/tau + u 1' + 1 v'), tau = 0.8: rows sum to 1, "
                                       "columns to n/m (the layer's default marginals); the "
                                       "potentials are gauge-fixed, P is unique"},
               description="implicit log-domain Sinkhorn (gauge-fixed dual fixed point)"))
register(Entry(name="gm-power-iteration", fn=lambda X: gm.power_iteration_layer(_sym_exp(X), 5),
               generate=_single, size={"N": 9}, argnums=(0,),
               conventions={"inputs": [_AFFINITY_INPUT], "outputs": [{"name": "y", "shape": "(N,)"}],
                            "problem": "5 power iterations y <- M y / |M y| from y0 = 1/sqrt(N)"},
               description="5 unrolled power iterations (explicit baseline, plain autograd)"))
register(Entry(name="gm-affinity", fn=_affinity, generate=_affinity_inputs, size={}, order=1,
               argnums=(0, 1, 2, 3),
               conventions={"inputs": [{"name": "Kp", "shape": "(4, 3) node affinities"},
                                       {"name": "P1", "shape": "(12, 2) edge features, graph 1"},
                                       {"name": "P2", "shape": "(6, 2) edge features, graph 2"},
                                       {"name": "w", "shape": "(3,) kernel weights"}],
                            "outputs": [{"name": "M", "shape": "(12, 12)"}],
                            "edges": "full directed edge lists full_edges(4), full_edges(3)"},
               description="numba Gaussian affinity builder M(Kp, P1, P2, w) (first order)"))
