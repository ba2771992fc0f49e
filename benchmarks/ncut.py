r"""NCut layer: forward and backward time against the number of pixels N.

The problem: a ``s x s`` pixel graph (8-neighbourhood) of a two-region image
(:func:`verification.strategies.ncut.image_graph`), ``N = s^2``, and the
sign-invariant scalar ``f = lam + sum_i c_i v_i^2`` of the NCut eigenpair.
One timed evaluation is the forward pass (the layer's eigensolver, recorded by
``autograd.make_vjp``) and the backward pass (the VJP of ``f``, one implicit
linear solve).  Rows:

- ``dense / lu``: ``W`` as a dense ``(N, N)`` matrix, ``scipy.linalg.eigh(L, D)``,
  LU of the dense bordered Jacobian (formed from ``N + 1`` VJPs);
- ``sparse / krylov``: weights on the ``E`` edges, shift-invert Lanczos,
  matrix-free preconditioned MINRES on autograd products of the residual;
- ``sparse / splu``: the same forward, sparse LU of the assembled bordered matrix;
- ``torch / eigh``: ``torch.linalg.eigh`` of ``D^{-1/2} L D^{-1/2}`` (dense, all
  eigenpairs) and its autograd backward, when torch is installed.

``grad diff`` is ``|g - g_ref|_inf / |g_ref|_inf`` of the gradient in the edge
weights against ``sparse / splu`` at the same N (dense gradients are mapped to
edges as ``G_ij + G_ji``).

Run: ``PYTHONPATH=. python benchmarks/ncut.py [--quick] [--max-dense 1024]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import autograd.numpy as np
import numpy as onp
from autograd import make_vjp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import (Column, format_table, machine_info, ratio, time_phases,  # noqa: E402
                                write_json)
from reference_layers.ncut import SparseNCut, make_ncut_layer  # noqa: E402
from verification.strategies.ncut import image_graph  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")


def _objective(layer, c):
    def f(x):
        v, lam = layer(x)
        return lam + np.sum(c * v * v)
    return f


def _time_autograd(f, x, repeats):
    grads = {}

    def run(laps):
        vjp, _ = make_vjp(f)(x)
        laps.lap("forward")
        grads["g"] = vjp(1.0)
        laps.lap("backward")
    t = time_phases(run, repeats=repeats, warmup=1 if repeats > 1 else 0)
    return t["forward"].median, t["backward"].median, onp.asarray(grads["g"])


def _torch_row(W, c, repeats):
    import torch
    Wt = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    ct = torch.tensor(c, dtype=torch.float64)
    out = {}

    def run(laps):
        if Wt.grad is not None:
            Wt.grad = None
        d = Wt.sum(dim=1)
        s = d.rsqrt()
        Ln = torch.eye(len(d), dtype=torch.float64) - s[:, None] * Wt * s[None, :]
        lams, U = torch.linalg.eigh(Ln)
        v = s * U[:, 1]
        f = lams[1] + (ct * v * v).sum()
        laps.lap("forward")
        f.backward()
        laps.lap("backward")
        out["g"] = Wt.grad.numpy().copy()
    t = time_phases(run, repeats=repeats, warmup=1 if repeats > 1 else 0)
    return t["forward"].median, t["backward"].median, out["g"]


def _to_edges(G, edges):
    return G[edges[:, 0], edges[:, 1]] + G[edges[:, 1], edges[:, 0]]


def _diff(g, ref):
    return float(onp.abs(g - ref).max() / onp.abs(ref).max())


def run(sides, max_dense: int, torch_max: int, repeats_small: int = 3):
    import importlib.util
    have_torch = importlib.util.find_spec("torch") is not None
    if not have_torch:
        print("torch is not installed: skipping the torch.linalg.eigh rows")
    rows = []
    for s in sides:
        rng = onp.random.default_rng(s)
        edges, weights, n = image_graph(rng, s, s, contrast=1.0, floor=0.02)
        c = rng.standard_normal(n)
        repeats = repeats_small if n <= 1024 else 1
        base = {"N": n, "E": len(edges)}
        ref = None
        for solver in ("splu", "krylov"):
            layer = SparseNCut(edges, n, linear_solver=solver)
            fwd, bwd, g = _time_autograd(_objective(layer, c), weights, repeats)
            ref = g if solver == "splu" else ref
            rows.append({**base, "form": "sparse", "solver": solver, "forward_s": fwd,
                         "backward_s": bwd, "grad_diff": _diff(g, ref)})
            print(f"N={n:5d} sparse {solver:6s} fwd {fwd:.4f} s bwd {bwd:.4f} s", flush=True)
        W = onp.zeros((n, n))
        W[edges[:, 0], edges[:, 1]] = weights
        W[edges[:, 1], edges[:, 0]] = weights
        if n <= max_dense:
            layer = make_ncut_layer(dense_max=n + 1)
            fwd, bwd, G = _time_autograd(_objective(layer, c), W, repeats)
            rows.append({**base, "form": "dense", "solver": "lu", "forward_s": fwd,
                         "backward_s": bwd, "grad_diff": _diff(_to_edges(G, edges), ref)})
            print(f"N={n:5d} dense  lu     fwd {fwd:.4f} s bwd {bwd:.4f} s", flush=True)
        if have_torch and n <= torch_max:
            fwd, bwd, G = _torch_row(W, c, repeats)
            rows.append({**base, "form": "torch", "solver": "eigh", "forward_s": fwd,
                         "backward_s": bwd, "grad_diff": _diff(_to_edges(G, edges), ref)})
            print(f"N={n:5d} torch  eigh   fwd {fwd:.4f} s bwd {bwd:.4f} s", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="NCut layer timings against N")
    parser.add_argument("--quick", action="store_true", help="N up to 1024")
    parser.add_argument("--max-dense", type=int, default=1024,
                        help="largest N for the dense layer (it forms an (N+1)^2 Jacobian)")
    parser.add_argument("--torch-max", type=int, default=4096)
    args = parser.parse_args(argv)
    sides = [4, 8, 16, 32] if args.quick else [4, 8, 16, 32, 64]
    rows = run(sides, args.max_dense, args.torch_max)
    columns = [Column("N", "N"), Column("E", "E"), Column("form", "form"),
               Column("solver", "solver"), Column("forward s", "forward_s", "{:.4f}"),
               Column("backward s", "backward_s", "{:.4f}"),
               Column("bwd/fwd", lambda r: ratio(r["backward_s"], r["forward_s"]), "{:.2f}x"),
               Column("grad diff", "grad_diff", "{:.1e}")]
    print()
    print(format_table(rows, columns, separator_key="N"))
    os.makedirs(OUT_DIR, exist_ok=True)
    write_json(os.path.join(OUT_DIR, "ncut.json"), {"machine": machine_info(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
