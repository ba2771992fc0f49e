r"""QP layer: forward and backward time and gradient accuracy against qpth and cvxpylayers.

Problems: batches of planted convex QPs (:mod:`verification.strategies.qp`,
strict-complementarity margin 0.2, KKT Jacobian condition <= 1e6) of size ``(batch, n, m_ineq, p_eq)``; every
instance has its own ``Q, q, G, h, A, b``.  The loss is ``L = sum_k c_k' y_k``
with a fixed random ``c``.  One timed evaluation = forward (solve, and record
what the backward needs) + backward (gradients with respect to all inputs),
implementations interleaved (:func:`benchmarks._common.time_interleaved`,
wall clock), medians reported.

- ``ours structured``: ``qp_layer(..., backward="structured")`` (numba PDIPM, structured
  factorization of the KKT Jacobian reused in the backward pass);
- ``ours generic``: ``backward="generic"`` (core LU of the autograd Jacobian);
- ``qpth``: ``qpth.qp.QPFunction()`` with its defaults (PyTorch CPU, float64,
  torch's default thread count);
- ``cvxpylayers``: ``CvxpyLayer`` on ``min 1/2 |U y|^2 + q'y`` (``U`` the
  Cholesky factor of ``Q``, so the problem is DPP) with its defaults, on the
  smaller sizes only (``--cvxpylayers-max-n``).

Accuracy: ``y err`` is ``max_k |y_k - y*_k|_inf / (1 + |y*_k|_inf)`` against the
planted solution; ``dL/dq err`` is the worst (and the median) over the batch of
``|g_k - g*_k|_2 / max(|g*_k|_2, 1e-3 |c_k|_2)`` (the floor matters only for
instances at a vertex, where ``g* = 0``) with ``g*`` from a dense float64 solve of the
transposed KKT Jacobian at the planted (exact) solution.

With ``--instances generic``: random instances as in issue 13 (``Q = LL'/n + 0.1 I``,
``G ~ N(0, 1)``, ``h = G y0 + U(0.1, 1)``), reference from a tight solve's active set,
verified to be a KKT point (:func:`make_generic_problem`).

Run: ``PYTHONPATH=. python benchmarks/qp.py [--quick] [--repeats 5] [--instances generic]
[--sizes 128,10,20,0] [--threads 1] [--clock cpu]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import autograd.numpy as np
import numpy as onp
from autograd import make_vjp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import (Column, format_table, machine_info,  # noqa: E402
                                package_versions, ratio, time_interleaved, write_json)
from reference_layers.qp import qp_layer  # noqa: E402
from verification.strategies.qp import kkt_jacobian, planted_qp  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
SIZES = [(1, 10, 20, 0), (128, 10, 20, 0), (128, 50, 100, 0), (32, 100, 200, 0), (128, 10, 20, 5)]


def make_problem(B, n, m, p, seed=0):
    rng = onp.random.default_rng(seed)
    ds = [planted_qp(rng, n, m, p, 0.2, max_condition=1e6) for _ in range(B)]
    names = ("Q", "q", "G", "h", "A", "b") if p else ("Q", "q", "G", "h")
    inputs = tuple(onp.stack([d[k] for d in ds]) for k in names)
    c = rng.standard_normal((B, n))
    # reference dL/dq: J^T w = -(c, 0, 0) at the planted point, dL/dq = w_y
    g_ref = onp.empty((B, n))
    for k, d in enumerate(ds):
        A = d.get("A", onp.zeros((0, n)))
        J = kkt_jacobian(d["Q"], d["G"], A, d["nu"], d["s"])
        rhs = onp.zeros(J.shape[0])
        rhs[:n] = -c[k]
        g_ref[k] = onp.linalg.solve(J.T, rhs)[:n]
    y_ref = onp.stack([d["y"] for d in ds])
    return inputs, c, y_ref, g_ref


def make_generic_problem(B, n, m, p, seed=0):
    """Generic random instances (issue 13): ``Q = L L'/n + 0.1 I``, ``G ~ N(0, 1)``,
    ``h = G y0 + U(0.1, 1)`` (and ``A ~ N(0, 1)``, ``b = A y0``).  Weakly active-looking
    constraints occur here.  Reference: a tight interior point solve (``tol=1e-13``)
    gives the active set, the exact reduced KKT system on it gives ``y*`` and ``dL/dq``,
    and the point is verified to be a KKT point (``nu_a > 0``, inactive slacks > 0);
    an instance that fails the verification raises instead of giving a false reference."""
    from reference_layers.kernels.qp_pdipm import solve_qp_batch
    rng = onp.random.default_rng(seed)
    L = rng.standard_normal((B, n, n))
    Q = L @ L.transpose(0, 2, 1) / n + 0.1 * onp.eye(n)
    q = rng.standard_normal((B, n))
    G = rng.standard_normal((B, m, n))
    y0 = rng.standard_normal((B, n))
    h = onp.einsum("bij,bj->bi", G, y0) + rng.uniform(0.1, 1.0, (B, m))
    A = rng.standard_normal((B, p, n))
    b = onp.einsum("bij,bj->bi", A, y0)
    c = rng.standard_normal((B, n))
    tight = solve_qp_batch(Q, q, G, h, A, b, tol=1e-13, max_iter=300)
    y_ref, g_ref = onp.empty((B, n)), onp.empty((B, n))
    for k in range(B):
        a = tight.nu[k] > tight.s[k]
        C = onp.vstack([A[k], G[k][a]])
        K = onp.block([[Q[k], C.T], [C, onp.zeros((len(C), len(C)))]])
        z = onp.linalg.solve(K, onp.concatenate([-q[k], b[k], h[k][a]]))
        s = h[k] - G[k] @ z[:n]
        if not ((z[n + p:] > 0).all() and (s[~a] > 0).all()):
            raise RuntimeError(f"generic instance {k}: the reference is not a KKT point")
        y_ref[k] = z[:n]
        g_ref[k] = -onp.linalg.solve(K, onp.concatenate([c[k], onp.zeros(len(C))]))[:n]
    inputs = (Q, q, G, h, A, b) if p else (Q, q, G, h)
    return inputs, c, y_ref, g_ref


def errors(y, g, y_ref, g_ref, c):
    y_err = float((onp.abs(y - y_ref).max(axis=1) / (1 + onp.abs(y_ref).max(axis=1))).max())
    # an instance whose solution sits at a vertex has dL/dq = 0: floor the scale at
    # 1e-3 |c| (c = dL/dy) so its error is measured against the loss' sensitivity
    scale = onp.maximum(onp.linalg.norm(g_ref, axis=1), 1e-3 * onp.linalg.norm(c, axis=1))
    g_rel = onp.linalg.norm(g - g_ref, axis=1) / scale
    return y_err, float(g_rel.max()), float(onp.median(g_rel))


# ----------------------------------------------------------------------------- implementations

def ours(backward):
    def setup(inputs, c):
        def loss(args):
            return np.sum(c * qp_layer(*args, backward=backward))

        def run(laps):
            vjp, _ = make_vjp(loss)(inputs)
            laps.lap("forward")
            grads = vjp(1.0)
            laps.lap("backward")
            return grads

        def result():
            y = qp_layer(*inputs)
            return onp.asarray(y), onp.asarray(run(_NoLaps())[1])
        return run, result
    return setup


class _NoLaps:
    def lap(self, name):
        pass


def qpth_setup(inputs, c):
    import torch
    from qpth.qp import QPFunction
    T = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs]
    if len(T) == 4:
        T += [torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]
    ct = torch.tensor(c)

    def run(laps):
        for t in T:
            t.grad = None
        y = QPFunction(verbose=-1)(*T)
        laps.lap("forward")
        (y * ct).sum().backward()
        laps.lap("backward")
        return y

    def result():
        y = run(_NoLaps())
        return y.detach().numpy(), T[1].grad.numpy().copy()
    return run, result


def cvxpylayers_setup(inputs, c):
    import cvxpy as cp
    import torch
    from cvxpylayers.torch import CvxpyLayer
    Q, q, G, h = inputs[:4]
    B, n = q.shape
    m = h.shape[1]
    U = onp.linalg.cholesky(Q).transpose(0, 2, 1)     # Q = U'U
    y = cp.Variable(n)
    Up, qp_, Gp, hp = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    cons = [Gp @ y <= hp]
    params = [Up, qp_, Gp, hp]
    T = [torch.tensor(x, requires_grad=True) for x in (U, q, G, h)]
    if len(inputs) == 6:
        p = inputs[5].shape[1]
        Ap, bp = cp.Parameter((p, n)), cp.Parameter(p)
        cons.append(Ap @ y == bp)
        params += [Ap, bp]
        T += [torch.tensor(x, requires_grad=True) for x in inputs[4:]]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Up @ y) + qp_ @ y), cons)
    layer = CvxpyLayer(prob, parameters=params, variables=[y])
    ct = torch.tensor(c)

    def run(laps):
        for t in T:
            t.grad = None
        (sol,) = layer(*T)
        laps.lap("forward")
        (sol * ct).sum().backward()
        laps.lap("backward")
        return sol

    def result():
        sol = run(_NoLaps())
        return sol.detach().numpy(), T[1].grad.numpy().copy()
    return run, result


def available(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two sizes, 3 repeats")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cvxpylayers-max-n", type=int, default=10)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--instances", choices=("planted", "generic"), default="planted",
                    help="planted KKT points (default) or generic random instances")
    ap.add_argument("--sizes", default=None,
                    help="e.g. '128,10,20,0;1,10,20,0' (B,n,m,p per size)")
    ap.add_argument("--no-generic-backward", action="store_true",
                    help="time only backward='structured' of ours (the generic one is slow)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock, or process CPU time (a shared machine; with one thread)")
    ap.add_argument("--threads", type=int, default=None,
                    help="numba.set_num_threads and torch.set_num_threads to this (default: as is)")
    ap.add_argument("--out", default=None,
                    help="also write the rows, versions and thread counts to this JSON file")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")      # peers' deprecation chatter
    sizes = SIZES[:2] if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(v) for v in part.split(",")) for part in args.sizes.split(";")]
    build = make_generic_problem if args.instances == "generic" else make_problem
    repeats = 3 if args.quick else args.repeats
    peers = {} if args.no_peers else {
        "qpth": qpth_setup if available("qpth") and available("torch") else None,
        "cvxpylayers": cvxpylayers_setup if available("cvxpylayers") else None}
    if args.threads is not None:
        import numba
        numba.set_num_threads(args.threads)
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    try:
        import torch
        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    rows = []
    for (B, n, m, p) in sizes:
        inputs, c, y_ref, g_ref = build(B, n, m, p)
        impls = {"ours structured": ours("structured")}
        if not args.no_generic_backward:
            impls["ours generic"] = ours("generic")
        for name, setup in peers.items():
            if setup is None or (name == "cvxpylayers" and n > args.cvxpylayers_max_n):
                continue
            impls[name] = setup
        runs, accs = {}, {}
        for name, setup in impls.items():
            try:
                run, result = setup(inputs, c)
                y, g = result()
                accs[name] = errors(y, g, y_ref, g_ref, c)
                runs[name] = run
            except Exception as exc:      # a peer failing on a size is reported, not fatal
                print(f"{name} failed at {(B, n, m, p)}: {type(exc).__name__}: {exc}")
        times = time_interleaved(runs, repeats=repeats, warmup=1, clock=args.clock)
        base = times["ours structured"]
        for name in runs:
            t = times[name]
            fwd, bwd = t["forward"].median, t["backward"].median
            rows.append({"size": f"({B},{n},{m},{p})", "impl": name, "forward_ms": 1e3 * fwd,
                         "backward_ms": 1e3 * bwd, "total_ms": 1e3 * (fwd + bwd),
                         "vs_ours": ratio(fwd + bwd, base["forward"].median + base["backward"].median),
                         "y_err": accs[name][0], "dq_err_max": accs[name][1],
                         "dq_err_median": accs[name][2]})
        print(format_table([r for r in rows if r["size"] == rows[-1]["size"]], COLUMNS), flush=True)
    print()
    print(format_table(rows, COLUMNS, separator_key="size"))
    os.makedirs(OUT_DIR, exist_ok=True)
    record = {"machine": machine_info(), "versions": _versions(), "torch_threads": threads,
              "numba_threads": _numba_threads(), "instances": args.instances,
              "clock": args.clock, "load_average": os.getloadavg(),
              "repeats": repeats, "rows": rows}
    write_json(os.path.join(OUT_DIR, f"qp_{args.instances}.json"), record)
    if args.out:
        write_json(args.out, record)


def _versions() -> dict:
    return package_versions("numpy", "scipy", "numba", "autograd", "torch", "qpth",
                            "cvxpylayers")


def _numba_threads():
    import numba
    return numba.get_num_threads()


COLUMNS = [Column("size", "size"), Column("impl", "impl"),
           Column("fwd ms", "forward_ms", "{:.2f}"), Column("bwd ms", "backward_ms", "{:.2f}"),
           Column("total ms", "total_ms", "{:.2f}"),
           Column("total / ours structured", "vs_ours", "{:.2f}x"),
           Column("y err", "y_err", "{:.1e}"), Column("dL/dq err max", "dq_err_max", "{:.1e}"),
           Column("dL/dq err median", "dq_err_median", "{:.1e}")]


if __name__ == "__main__":
    main()
