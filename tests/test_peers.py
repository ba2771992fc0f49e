"""Peers checked against oracle files in their own frameworks (issue 10 item 9).

Skipped unless the peer is installed (the ``bench`` environment:
``python3 -m venv /work/venv-bench`` with torch, qpth --no-deps, cvxpylayers,
jax, jaxopt).  ``python tests/test_peers.py`` writes the measured verdict table
to ``verification/results/peers-<date>.json``.
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import numpy as np
import pytest

from verification import oracle

HERE = os.path.dirname(os.path.abspath(__file__))


def _file(tmp, layer, *, variant=None, size=None, cases=2):
    name = "-".join([layer, variant or "full"] + [f"{k}{v}" for k, v in (size or {}).items()]) + ".npz"
    path = os.path.join(str(tmp), name)
    if not os.path.exists(path):
        oracle.export(layer, path, cases=cases, variant=variant, size=size)
    return path


# ------------------------------------------------------------------------------ peers

def qpth_layer(eps: float = 1e-12, expand_shared: bool = False):
    import torch
    from qpth.qp import QPFunction

    def fn(Q, q, G, h, A=None, b=None):
        batched = q.ndim == 2
        B = q.shape[0] if batched else 1
        if expand_shared:   # expand shared matrices ourselves: torch then SUMS their gradients
            Q = Q.expand(B, *Q.shape[-2:]) if Q.ndim == 2 and batched else Q
            G = G.expand(B, *G.shape[-2:]) if G.ndim == 2 and batched else G
        e = torch.empty(0, dtype=torch.float64)
        y = QPFunction(eps=eps, verbose=-1, maxIter=50)(
            0.5 * (Q + Q.transpose(-1, -2)), q, G, h, e if A is None else A, e if b is None else b)
        return y if batched else y.reshape(-1)
    return fn


def cvxpylayers_qp(n: int, m: int, solver_args: dict | None = None):
    import cvxpy as cp
    import torch
    from cvxpylayers.torch import CvxpyLayer
    y = cp.Variable(n)
    L, q, G, h = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ y) + q @ y), [G @ y <= h])
    layer = CvxpyLayer(prob, parameters=[L, q, G, h], variables=[y])

    def fn(Q, q_, G_, h_):
        U = torch.linalg.cholesky(0.5 * (Q + Q.T)).T      # y'Qy = |U y|^2
        args = dict(solver_args or {})
        if not torch.is_grad_enabled():   # diffcp's solve-only path takes no adjoint 'mode'
            args.pop("mode", None)
        return layer(U, q_, G_, h_, solver_args=args)[0]
    return fn


def jax_eigh_sm():
    import jax.numpy as jnp

    def fn(X):
        M = jnp.exp(0.5 * (X + X.T))
        w, V = jnp.linalg.eigh(M)
        y = V[:, -1]
        return y * jnp.sign(jnp.sum(y)), w[-1]
    return fn


def jaxopt_deq():
    import jax.numpy as jnp
    from jaxopt import FixedPointIteration

    T = lambda y, x, W, b: jnp.tanh(W @ y + x + b)
    solver = FixedPointIteration(fixed_point_fun=T, tol=1e-14, maxiter=2000, implicit_diff=True)

    def fn(x, W, b):
        return solver.run(jnp.zeros_like(x), x, W, b).params
    return fn


# ------------------------------------------------------------------------------ runs

def _row(peer, path, rep, expected):
    w_in, w_out = rep.worst("VJP"), rep.worst("output")
    return {"peer": peer, "file": os.path.basename(path), "rtol": rep.rtol,
            "passed": rep.passed, "expected": expected,
            "worst_output": None if w_out is None else [w_out[1].quantity, w_out[1].rel],
            "worst_vjp": None if w_in is None else [w_in[1].quantity, w_in[1].rel],
            "jvp_source": rep.cases[0].jvp_source,
            "jvp_rel": max((c.jvp_error or 0.0) for c in rep.cases)}


def run_qpth(tmp):
    rows = []
    for layer in ("qp", "qp-eq", "qp-batched-eq"):
        path = _file(tmp, layer, variant="primal")
        rep = oracle.compare(path, qpth_layer(), framework="torch")
        rows.append(_row("qpth eps 1e-12", path, rep, "pass"))
    path = _file(tmp, "qp-batched", variant="primal")
    rows.append(_row("qpth eps 1e-12 (shared Q, G)", path,
                     oracle.compare(path, qpth_layer(), framework="torch"),
                     "fail: gradient of shared Q/G averaged"))
    rows.append(_row("qpth, shared Q, G expanded by the caller", path,
                     oracle.compare(path, qpth_layer(expand_shared=True), framework="torch"), "pass"))
    return rows


def run_cvxpylayers(tmp, n: int = 50, m: int = 60):
    path = _file(tmp, "qp", variant="primal", size={"n": n, "m": m}, cases=1)
    default = oracle.compare(path, cvxpylayers_qp(n, m), framework="torch")
    tight = oracle.compare(path, cvxpylayers_qp(n, m, {"eps_abs": 1e-12, "eps_rel": 1e-12,
                                                        "max_iters": 200000, "mode": "dense"}),
                           framework="torch")
    return [_row(f"cvxpylayers default (SCS), n={n}", path, default, "fail at n >= 50"),
            _row(f"cvxpylayers SCS eps 1e-12, dense adjoint, n={n}", path, tight, "pass")]


def run_jax(tmp):
    path = _file(tmp, "gm-sm")
    r1 = _row("jax.numpy.linalg.eigh", path, oracle.compare(path, jax_eigh_sm(), framework="jax"),
              "pass")
    path = _file(tmp, "deq-tanh")
    r2 = _row("jaxopt FixedPointIteration (implicit diff)", path,
              oracle.compare(path, jaxopt_deq(), framework="jax"), "pass")
    return [r1, r2]


# ------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("peers")


def test_qpth_passes_and_averages_shared_gradients(tmp):
    pytest.importorskip("torch")
    pytest.importorskip("qpth")
    rows = run_qpth(tmp)
    for r in rows[:3]:
        assert r["passed"], r
    shared, expanded = rows[3], rows[4]
    assert not shared["passed"] and expanded["passed"], (shared, expanded)
    assert shared["worst_vjp"][0].startswith(("VJP input 0", "VJP input 2"))
    assert all(r["jvp_source"] == "adjoint identity" for r in rows)   # qpth has no forward mode


def test_cvxpylayers_default_flagged_tight_passes(tmp):
    pytest.importorskip("cvxpylayers")
    default, tight = run_cvxpylayers(tmp)
    assert not default["passed"], default
    assert tight["passed"], tight


def test_jax_eigh_and_jaxopt_fixed_point(tmp):
    pytest.importorskip("jax")
    pytest.importorskip("jaxopt")
    for r in run_jax(tmp):
        assert r["passed"], r


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        rows = run_qpth(d) + run_cvxpylayers(d) + run_jax(d)
    import platform
    versions = {"python": platform.python_version()}
    for mod in ("torch", "qpth", "cvxpylayers", "cvxpy", "scs", "diffcp", "jax", "jaxopt"):
        try:
            from importlib.metadata import version
            versions[mod] = version(mod)
        except Exception:
            versions[mod] = "absent"
    out_dir = os.path.join(os.path.dirname(HERE), "verification", "results")
    os.makedirs(out_dir, exist_ok=True)
    date = datetime.date.today().isoformat()
    out = os.path.join(out_dir, f"peers-{date}.json")
    with open(out, "w") as fh:
        json.dump({"date": date, "versions": versions, "rows": rows}, fh, indent=1)
    for r in rows:
        print(f"{'PASS' if r['passed'] else 'FAIL'}  {r['peer']:<48} {r['file']:<26} worst VJP "
              f"{r['worst_vjp'][0]} {r['worst_vjp'][1]:.1e}, JVP ({r['jvp_source']}) "
              f"{r['jvp_rel']:.1e}  (expected {r['expected']})")
    print(out)
    sys.exit(0)
