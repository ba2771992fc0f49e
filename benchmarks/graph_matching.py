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

Timing: ours and pygmtools' sm interleaved (each in turn, every repeat), the
median over repeats after a warm-up (minima saved in the JSON too), of
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
      (pygmtools in another venv: PYGM_PATH=/work/venv-gm/lib/python3.11/site-packages)
      [--kinds synthetic outliers] [--rrwm]
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

from benchmarks._common import (Column, format_table, machine_info,  # noqa: E402
                                package_versions, ratio, time_call, time_interleaved,
                                write_json)
from reference_layers import graph_matching as gm  # noqa: E402
from verification.strategies.graph_matching import mixing_matrix, synthetic_pair  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "output")
#: pygmtools' numpy ``sm`` forward as quoted in issue 13 (ms; another machine and load:
#: used only when pygmtools is not installed, and labelled as such)
ISSUE13_PYGM_MS = {10: 0.07, 20: 0.13, 50: 4.9}


def make_problem(rng, n, kind="synthetic"):
    """One matching problem of ``n`` nodes per graph and its affinity ``M``.

    ``kind='synthetic'``: the keypoint protocol with small noise (an easy
    instance, a large relative eigen-gap).  ``kind='outliers'``: a generic,
    harder instance: half of the nodes are outliers, the inliers are rotated by
    any angle and moved by noise 0.3, so ``M`` has no dominant planted
    structure and a smaller gap."""
    if kind == "synthetic":
        inst = synthetic_pair(rng, n=n, outliers=0, noise=0.05, mixing=mixing_matrix(rng, 16))
    elif kind == "outliers":
        inst = synthetic_pair(rng, n=n - n // 2, outliers=n // 2, noise=0.3, rotation=onp.pi,
                              mixing=mixing_matrix(rng, 16))
    else:
        raise ValueError(f"unknown instance kind {kind!r}")
    W = inst["mixing"][:, :4] * 0.5
    Kp = onp.asarray(gm.node_affinity(inst["F1"], inst["F2"], W))
    w = onp.array([4.0, 2.0, 2.0])
    M = onp.asarray(gm.gaussian_affinity(Kp, inst["P1"], inst["P2"], w, inst["E1"], inst["E2"]))
    return inst, Kp, w, M


def import_pygmtools():
    """pygmtools' numpy backend, or ``None``.  Its package imports its dataset
    downloaders (``requests``, ``aiohttp``) at import time; when those are not
    installed (they are not needed for ``sm``/``rrwm``/``build_aff_mat``),
    empty stand-in modules are registered so that the import succeeds."""
    import importlib
    import types
    for name in ("requests", "aiohttp"):
        try:
            importlib.import_module(name)
        except Exception:
            for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[k]
            stub = types.ModuleType(name)
            stub.__path__ = []
            stub.__getattr__ = lambda attr: type(attr, (), {})
            sys.modules[name] = stub
    try:
        import pygmtools as pygm
    except ImportError:
        return None
    pygm.set_backend("numpy")
    return pygm


def column_major(M, n, m):
    """``M`` reindexed from our row-major ``i m + a`` to pygmtools' ``a n + i``."""
    perm = (onp.arange(m)[None, :] * n + onp.arange(n)[:, None]).ravel()
    K = onp.empty_like(M)
    K[onp.ix_(perm, perm)] = M
    return K


CLOCK = "cpu"


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
    scale = max(abs(float(fd.value)), 1e-300)
    bound = getattr(fd, "error", None)
    return abs(ad - float(fd.value)) / scale, (None if bound is None else float(bound) / scale)


def _put(row, key, timing):
    row[key] = timing.min
    row[key + "_median"] = timing.median


def bench_size(n, repeats, pygm, rng, kind, rrwm=False):
    inst, Kp, w, M = make_problem(rng, n, kind)
    row = {"n": n, "nm": n * n, "kind": kind}
    builder = lambda w: gm.gaussian_affinity(Kp, inst["P1"], inst["P2"], w, inst["E1"], inst["E2"])
    _put(row, "build", time_call(lambda: builder(w), repeats=repeats, clock=CLOCK))
    G = rng.standard_normal(M.shape)
    _put(row, "build_vjp_w", time_call(lambda: make_vjp(builder)(w)[0](G), repeats=repeats,
                                       clock=CLOCK))
    g = rng.standard_normal(M.shape[0])
    # pygmtools' accuracy (eigen-residual ~1e-7): like for like (the core's residual check
    # is relative to max|M|, while lam ~ nm mean(M): loosen it too)
    fast = lambda M: gm.spectral_matching_layer(M, solver_options={"tol": 1e-7}, residual_tol=1e-3)

    def traced(layer):
        def run(laps):
            vjp, _ = make_vjp(layer)(M)
            laps.lap("forward")
            vjp(g)
            laps.lap("backward")
        return run

    def plain(fn):
        def run(laps):
            fn()
            laps.lap("call")
        return run

    runs = {"sm": traced(gm.spectral_matching_layer), "smac": traced(gm.smac_layer),
            "sm7": traced(fast),
            # the forward as an untraced call (no autograd box): what pygmtools' sm computes
            "sm_plain": plain(lambda: gm.spectral_matching_layer(M))}
    if pygm is not None:
        K = column_major(M, n, n)[None]
        nn_ = onp.array([n])
        runs["pygm_sm"] = plain(lambda: pygm.sm(K, nn_, nn_))
    # interleaved: a slow spell of the shared machine hits every solver alike
    timed = time_interleaved(runs, repeats=repeats, warmup=1, clock=CLOCK)
    for name in ("sm", "smac", "sm7"):
        _put(row, f"{name}_fwd", timed[name]["forward"])
        _put(row, f"{name}_bwd", timed[name]["backward"])
    _put(row, "sm_plain", timed["sm_plain"]["call"])
    # relative error against finite differences, and the FD estimate's own error bound
    row["sm_grad_err"], row["sm_grad_fd_bound"] = gradient_error(gm.spectral_matching_layer, M,
                                                                 rng)
    row["smac_grad_err"], row["smac_grad_fd_bound"] = gradient_error(gm.smac_layer, M, rng)
    y = gm.spectral_matching_layer(M)
    row["sm_residual"] = float(onp.abs(M @ y - (y @ M @ y) * y).max() / (y @ M @ y))
    # relative eigen-gap: dense up to 400 unknowns, else the Lanczos estimate (an upper bound)
    from reference_layers.matching.eigen import eigen_gap, leading_eigendata
    row["eigen_gap"] = eigen_gap(M) if M.shape[0] <= 400 else leading_eigendata(M).gap
    if pygm is not None:
        _put(row, "pygm_sm", timed["pygm_sm"]["call"])
        v = pygm.sm(K, nn_, nn_)[0].ravel()               # X[i, a] -> row-major y[i m + a]
        v = v / onp.linalg.norm(v)
        row["pygm_sm_residual"] = float(onp.abs(M @ v - (v @ M @ v) * v).max() / (v @ M @ v))
        if rrwm:
            _put(row, "pygm_rrwm", time_call(lambda: pygm.rrwm(K, nn_, nn_),
                                             repeats=max(1, repeats // 2), clock=CLOCK))
        F1, F2 = inst["F1"][None], inst["F2"][None]
        conn = inst["E1"][None]
        P1, P2 = inst["P1"][None], inst["P2"][None]
        _put(row, "pygm_build", time_call(
            lambda: pygm.utils.build_aff_mat(F1, P1, conn, F2, P2, conn),
            repeats=max(1, repeats // 2), clock=CLOCK))
    return row


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 10, 20 only, fewer repeats")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--kinds", nargs="*", default=["synthetic", "outliers"],
                    choices=["synthetic", "outliers"],
                    help="instances: the easy keypoint protocol and/or generic ones with half "
                         "outliers (see make_problem)")
    ap.add_argument("--rrwm", action="store_true", help="also time pygmtools' rrwm (slow)")
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
    pygm = import_pygmtools()
    if pygm is None:
        print("(pygmtools not installed: our timings only; pip install pygmtools)")
    rng = onp.random.default_rng(0)
    load_before = _load()
    rows = []
    for kind in args.kinds:
        for n in sizes:
            rows.append(bench_size(n, repeats, pygm, rng, kind, rrwm=args.rrwm))
            rows[-1]["load"] = _load()
    ms = "{:.2f}"
    x = "{:.2f}x"
    med = lambda key: (lambda r: 1e3 * r[key + "_median"])
    cols = [Column("kind", "kind"), Column("n", "n"), Column("nm", "nm"),
            Column("gap", "eigen_gap", "{:.1e}"),
            Column("SM plain ms", med("sm_plain"), ms),
            Column("SM fwd ms", med("sm_fwd"), ms),
            Column("SM bwd ms", med("sm_bwd"), ms),
            Column("bwd/fwd", lambda r: ratio(r["sm_bwd_median"], r["sm_fwd_median"]), x),
            Column("(fwd+bwd)/fwd", lambda r: ratio(r["sm_fwd_median"] + r["sm_bwd_median"],
                                                    r["sm_fwd_median"]), x),
            Column("SM grad err", "sm_grad_err", "{:.1e}"),
            Column("FD bound", "sm_grad_fd_bound", "{:.1e}"),
            Column("SM(1e-7) fwd ms", med("sm7_fwd"), ms),
            Column("SMAC fwd ms", med("smac_fwd"), ms),
            Column("SMAC bwd ms", med("smac_bwd"), ms),
            Column("SMAC (fwd+bwd)/fwd", lambda r: ratio(r["smac_fwd_median"]
                                                         + r["smac_bwd_median"],
                                                         r["smac_fwd_median"]), x),
            Column("SMAC grad err", "smac_grad_err", "{:.1e}")]
    if pygm is None:
        cols += [Column("SM/pygm sm (issue 13's pygm numbers)",
                        lambda r: ratio(r["sm_fwd_median"],
                                        1e-3 * ISSUE13_PYGM_MS.get(r["n"], onp.nan)), x)]
    else:
        cols += [Column("pygm sm ms", med("pygm_sm"), ms),
                 Column("SM fwd/pygm sm", lambda r: ratio(r["sm_fwd_median"],
                                                          r["pygm_sm_median"]), x),
                 Column("SM plain/pygm sm", lambda r: ratio(r["sm_plain_median"],
                                                            r["pygm_sm_median"]), x),
                 Column("SM(1e-7)/pygm sm", lambda r: ratio(r["sm7_fwd_median"],
                                                            r["pygm_sm_median"]), x)]
    print(format_table(rows, cols))
    build = [Column("n", "n"), Column("build ms", med("build"), ms),
             Column("build vjp ms", med("build_vjp_w"), ms)]
    if pygm is not None:
        build += [Column("pygm build ms", med("pygm_build"), ms),
                  Column("pygm build/ours", lambda r: ratio(r["pygm_build_median"],
                                                            r["build_median"]), x)]
        if args.rrwm:
            build += [Column("pygm rrwm ms", med("pygm_rrwm"), ms)]
    print(format_table([r for r in rows if r["kind"] == args.kinds[0]], build))
    print("relative eigen-residual |My - lam y|_inf / lam:  ours "
          + ", ".join(f"{r['kind']} n={r['n']}: {r['sm_residual']:.1e}" for r in rows)
          + ("" if pygm is None else "\n    pygm sm "
             + ", ".join(f"{r['kind']} n={r['n']}: {r['pygm_sm_residual']:.1e}" for r in rows)))
    print(f"load average before: {load_before}, after: {_load()}; clock: {CLOCK}; medians")
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "graph_matching.json")
    machine = dict(machine_info(), **package_versions("scipy", "numba", "autograd",
                                                       "pygmtools"),
                   threads={v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS",
                                                           "OMP_NUM_THREADS",
                                                           "NUMBA_NUM_THREADS")},
                   load_before=load_before, load_after=_load())
    payload = {"machine": machine, "rows": rows, "clock": CLOCK,
               "pygmtools_issue13_ms": ISSUE13_PYGM_MS,
               "timing": "interleaved (ours and pygmtools in turn); the tables print medians, "
                         "*_median and min (the plain keys) both saved"}
    write_json(path, payload)
    results = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(results, exist_ok=True)
    dated = os.path.join(results, f"graph_matching-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(dated, payload)
    print(f"saved {path} and {dated}")


if __name__ == "__main__":
    main()
