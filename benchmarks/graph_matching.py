"""Graph matching: time per problem of our SM, SMAC (forward and backward) and
affinity builder, next to pygmtools' numpy sm, rrwm and build_aff_mat.

Instances: the synthetic keypoint protocol (``synthetic_pair``) with ``n``
nodes, all ordered pairs as edges (``n (n - 1)``), so ``M`` is ``n^2 x n^2``
and dense.  Our builder is :func:`reference_layers.graph_matching.gaussian_affinity`
(numba, Gaussian kernel on 3 edge features, node affinities given);
pygmtools' ``build_aff_mat`` gets the same node features (16-d), edge
features and connectivity with its default (inner-product) kernels.  The
solvers all get the same ``M`` (reordered to pygmtools' column-major
vectorization).

Timing: the minimum over repeats after a warm-up (the least-disturbed run: the
machine this was written on is shared; medians are saved in the JSON too), of
process CPU time by default (``--clock wall`` for wall time; BLAS runs on one
thread unless the caller sets ``OPENBLAS_NUM_THREADS``).
"backward" is one VJP of a random cotangent after a fresh forward (each
forward point has its own factorizations).  Note what each solver computes:
our SM/SMAC stop at a Ritz residual ``|M y - lam y| <= 1e-10 lam`` (the
implicit gradient needs an accurate eigenvector; "SM(1e-7)" is the same layer
with ``solver_options={"tol": 1e-7}``, pygmtools' accuracy); pygmtools' sm stops when successive power iterates
differ by less than 1e-5 (at most 50 iterations); rrwm runs its own
reweighted random walk with Sinkhorn steps.

Run:  PYTHONPATH=. python benchmarks/graph_matching.py [--quick] [--sizes 10 20 50]
      (pygmtools in another venv: PYGM_PATH=/work/venv-gm/lib/python3.11/site-packages:<its deps>)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# One BLAS thread unless the caller chose otherwise: on a small shared machine
# OpenBLAS's threads oversubscribe the cores and a 100 x 100 eigh can take 100x longer.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as onp
from autograd import make_vjp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks._common import (Column, format_table, machine_info, ratio, time_call,  # noqa: E402
                                time_phases, write_json)
from reference_layers import graph_matching as gm  # noqa: E402
from verification.strategies.graph_matching import mixing_matrix, synthetic_pair  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "output")
#: pygmtools' numpy ``sm`` forward as quoted in issue 13 (ms; another machine and load:
#: used only when pygmtools is not installed, and labelled as such)
ISSUE13_PYGM_MS = {10: 0.07, 20: 0.13, 50: 4.9}


def make_problem(rng, n):
    inst = synthetic_pair(rng, n=n, outliers=0, noise=0.05, mixing=mixing_matrix(rng, 16))
    W = inst["mixing"][:, :4] * 0.5
    Kp = onp.asarray(gm.node_affinity(inst["F1"], inst["F2"], W))
    w = onp.array([4.0, 2.0, 2.0])
    M = onp.asarray(gm.gaussian_affinity(Kp, inst["P1"], inst["P2"], w, inst["E1"], inst["E2"]))
    return inst, Kp, w, M


def column_major(M, n, m):
    """``M`` reindexed from our row-major ``i m + a`` to pygmtools' ``a n + i``."""
    perm = (onp.arange(m)[None, :] * n + onp.arange(n)[:, None]).ravel()
    K = onp.empty_like(M)
    K[onp.ix_(perm, perm)] = M
    return K


CLOCK = "cpu"


def time_layer(layer, M, repeats, rng):
    g = rng.standard_normal(M.shape[0])

    def run(laps):
        vjp, y = make_vjp(layer)(M)
        laps.lap("forward")
        vjp(g)
        laps.lap("backward")
    return time_phases(run, repeats=repeats, warmup=1, clock=CLOCK)


def gradient_error(layer, M, rng):
    """Relative error of ``<g, J D>`` (one VJP) against finite differences of the
    forward (``verification.finite_differences``), along a direction that keeps
    ``M`` symmetric and non-negative."""
    from verification.finite_differences import directional_derivative
    S = rng.uniform(size=M.shape)
    D = (S + S.T) * M
    g = rng.standard_normal(M.shape[0])
    vjp, _ = make_vjp(layer)(M)
    ad = float(onp.sum(vjp(g) * D))
    fd = directional_derivative(lambda X: float(g @ layer(X)), M, D)
    return abs(ad - float(fd.value)) / max(abs(float(fd.value)), 1e-300)


def _put(row, key, timing):
    row[key] = timing.min
    row[key + "_median"] = timing.median


def bench_size(n, repeats, pygm, rng):
    inst, Kp, w, M = make_problem(rng, n)
    row = {"n": n, "nm": n * n}
    builder = lambda w: gm.gaussian_affinity(Kp, inst["P1"], inst["P2"], w, inst["E1"], inst["E2"])
    _put(row, "build", time_call(lambda: builder(w), repeats=repeats, clock=CLOCK))
    G = rng.standard_normal(M.shape)
    _put(row, "build_vjp_w", time_call(lambda: make_vjp(builder)(w)[0](G), repeats=repeats,
                                       clock=CLOCK))
    # the forward as an untraced call (no autograd box): what pygmtools' sm is compared with
    _put(row, "sm_plain", time_call(lambda: gm.spectral_matching_layer(M), repeats=repeats,
                                    clock=CLOCK))
    for name, layer in (("sm", gm.spectral_matching_layer), ("smac", gm.smac_layer)):
        phases = time_layer(layer, M, repeats, rng)
        _put(row, f"{name}_fwd", phases["forward"])
        _put(row, f"{name}_bwd", phases["backward"])
    # the same layer stopped at pygmtools' accuracy (eigen-residual ~1e-7): like for like
    # (the core's residual check is relative to max|M|, while lam ~ nm mean(M): loosen it too)
    fast = lambda M: gm.spectral_matching_layer(M, solver_options={"tol": 1e-7}, residual_tol=1e-3)
    phases = time_layer(fast, M, repeats, rng)
    _put(row, "sm7_fwd", phases["forward"])
    _put(row, "sm7_bwd", phases["backward"])
    row["sm_grad_err"] = gradient_error(gm.spectral_matching_layer, M, rng)
    row["smac_grad_err"] = gradient_error(gm.smac_layer, M, rng)
    y = gm.spectral_matching_layer(M)
    row["sm_residual"] = float(onp.abs(M @ y - (y @ M @ y) * y).max() / (y @ M @ y))
    if pygm is not None:
        K = column_major(M, n, n)[None]
        nn_ = onp.array([n])
        _put(row, "pygm_sm", time_call(lambda: pygm.sm(K, nn_, nn_), repeats=repeats, clock=CLOCK))
        v = pygm.sm(K, nn_, nn_)[0].ravel()               # X[i, a] -> row-major y[i m + a]
        v = v / onp.linalg.norm(v)
        row["pygm_sm_residual"] = float(onp.abs(M @ v - (v @ M @ v) * v).max() / (v @ M @ v))
        _put(row, "pygm_rrwm", time_call(lambda: pygm.rrwm(K, nn_, nn_),
                                         repeats=max(1, repeats // 2), clock=CLOCK))
        F1, F2 = inst["F1"][None], inst["F2"][None]
        conn = inst["E1"][None]
        P1, P2 = inst["P1"][None], inst["P2"][None]
        _put(row, "pygm_build", time_call(
            lambda: pygm.utils.build_aff_mat(F1, P1, conn, F2, P2, conn),
            repeats=max(1, repeats // 2), clock=CLOCK))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 10, 20 only, fewer repeats")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="process CPU time (default: robust to other processes on a shared "
                         "machine) or wall time")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = args.clock
    sizes = args.sizes or ([10, 20] if args.quick else [10, 20, 50])
    repeats = args.repeats or (3 if args.quick else 7)
    # pygmtools may live in a separate venv (its dependencies are not the project's): its
    # site-packages can be appended, after ours, with PYGM_PATH=dir1:dir2
    sys.path.extend(p for p in os.environ.get("PYGM_PATH", "").split(os.pathsep) if p)
    try:
        import pygmtools as pygm
        pygm.set_backend("numpy")
    except ImportError:
        pygm = None
        print("(pygmtools not installed: our timings only; pip install pygmtools)")
    rng = onp.random.default_rng(0)
    rows = [bench_size(n, repeats, pygm, rng) for n in sizes]
    ms = "{:.2f}"
    x = "{:.2f}x"
    cols = [Column("n", "n"), Column("nm", "nm"),
            Column("SM plain ms", lambda r: 1e3 * r["sm_plain"], ms),
            Column("SM fwd ms", lambda r: 1e3 * r["sm_fwd"], ms),
            Column("SM bwd ms", lambda r: 1e3 * r["sm_bwd"], ms),
            Column("bwd/fwd", lambda r: ratio(r["sm_bwd"], r["sm_fwd"]), x),
            Column("(fwd+bwd)/fwd", lambda r: ratio(r["sm_fwd"] + r["sm_bwd"], r["sm_fwd"]), x),
            Column("SM grad err", "sm_grad_err", "{:.1e}"),
            Column("SM(1e-7) fwd ms", lambda r: 1e3 * r["sm7_fwd"], ms),
            Column("SMAC fwd ms", lambda r: 1e3 * r["smac_fwd"], ms),
            Column("SMAC bwd ms", lambda r: 1e3 * r["smac_bwd"], ms),
            Column("SMAC grad err", "smac_grad_err", "{:.1e}"),
            Column("build ms", lambda r: 1e3 * r["build"], ms),
            Column("build vjp ms", lambda r: 1e3 * r["build_vjp_w"], ms)]
    if pygm is None:
        cols += [Column("SM/pygm sm (issue 13's pygm numbers)",
                        lambda r: ratio(r["sm_fwd"], 1e-3 * ISSUE13_PYGM_MS.get(r["n"], onp.nan)),
                        x)]
    if pygm is not None:
        cols += [Column("pygm sm ms", lambda r: 1e3 * r["pygm_sm"], ms),
                 Column("pygm rrwm ms", lambda r: 1e3 * r["pygm_rrwm"], ms),
                 Column("pygm build ms", lambda r: 1e3 * r["pygm_build"], ms),
                 Column("SM/pygm sm", lambda r: ratio(r["sm_fwd"], r["pygm_sm"]), x),
                 Column("SM plain/pygm sm", lambda r: ratio(r["sm_plain"], r["pygm_sm"]), x),
                 Column("SM(1e-7)/pygm sm", lambda r: ratio(r["sm7_fwd"], r["pygm_sm"]), x),
                 Column("pygm build/ours", lambda r: ratio(r["pygm_build"], r["build"]), x)]
    print(format_table(rows, cols))
    print("relative eigen-residual |My - lam y|_inf / lam:  ours "
          + ", ".join(f"n={r['n']}: {r['sm_residual']:.1e}" for r in rows)
          + ("" if pygm is None else "\n                                          pygm sm "
             + ", ".join(f"n={r['n']}: {r['pygm_sm_residual']:.1e}" for r in rows)))
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "graph_matching.json")
    payload = {"machine": machine_info(), "rows": rows, "clock": CLOCK,
               "pygmtools_issue13_ms": ISSUE13_PYGM_MS, "timing": "min over repeats; "
               "medians in *_median"}
    write_json(path, payload)
    results = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(results, exist_ok=True)
    dated = os.path.join(results, f"graph_matching-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(dated, payload)
    print(f"saved {path} and {dated}")


if __name__ == "__main__":
    main()
