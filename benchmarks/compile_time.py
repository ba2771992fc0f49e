r"""Cold-start (numba compile) cost of the QP layer, and whether the on-disk cache is hit.

Each measurement runs in a fresh interpreter (``subprocess``) with its own
``NUMBA_CACHE_DIR``:

- ``cold``: an empty cache directory; ``import reference_layers.qp`` and then the first
  ``qp_layer`` forward + backward (a batch of 4 planted QPs with inequalities and equalities,
  then one without equalities), so every kernel the main job uses compiles; then an
  unbatched forward + backward (``unbatched_call_s``: the layer hands the kernels
  read-only broadcast views there; with one specialization per kernel nothing compiles);
- ``warm``: the same, again, with the cache directory the cold run filled (numba loads
  the machine code from disk: no compilation).

Per compiled function it lists the specializations (``dispatcher.signatures``; one per
function is the goal) and the time numba recorded for compiling each
(``overloads[sig].metadata["timers"]``: type inference + lowering under the compiler
lock, LLVM optimisation under the LLVM lock).  A caller's time includes the callees
it compiled first (numba compiles callees on the caller's type inference), so the rows
do not add up; the top-level kernels' sum is the total.

Then ``parallel_warmup``: :func:`~reference_layers.kernels.qp_pdipm.compile_kernels`
with one kernel group per process, concurrently, into an empty cache, and the same
child after it (it should find everything cached).

Optionally (``--gradcheck``) it also times the cold and the warm
``python -m verification.cli --no-progress`` (the main job, ``nimplicit-gradcheck``):
wall, user CPU of the CLI and its workers, and each layer's seconds.

Run: ``python -m benchmarks.compile_time [--gradcheck] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
import numpy as onp
from autograd import grad
import autograd.numpy as np
from reference_layers.qp import qp_layer
from reference_layers.kernels import qp_pdipm as K
from verification.strategies.qp import planted_qp
t_import = time.perf_counter() - t0; c_import = time.process_time() - c0
rng = onp.random.default_rng(0)
def batch(n, m, p, B=4):
    ds = [planted_qp(rng, n, m, p, 0.2, max_condition=1e6) for _ in range(B)]
    names = ("Q", "q", "G", "h", "A", "b") if p else ("Q", "q", "G", "h")
    return tuple(onp.stack([d[k] for d in ds]) for k in names)
t1 = time.perf_counter(); c1 = time.process_time()
for p in (2, 0):
    inp = batch(6, 8, p)
    def loss(q):
        args = list(inp); args[1] = q
        return np.sum(qp_layer(*args) ** 2)
    g = grad(loss)(inp[1])
    assert onp.all(onp.isfinite(g))
t_first = time.perf_counter() - t1; c_first = time.process_time() - c1
# the unbatched layer (the CLI's 'qp', 'qp-eq' entries): its inputs reach the kernels as
# read-only broadcast views with B = 1, which numba would type (and compile) apart
t3 = time.perf_counter(); c3 = time.process_time()
for p in (2, 0):
    d = planted_qp(rng, 5, 8, p, 0.2, max_condition=1e6)
    one = [d[k] for k in (("Q", "q", "G", "h", "A", "b") if p else ("Q", "q", "G", "h"))]
    def loss1(q):
        args = list(one); args[1] = q
        return np.sum(qp_layer(*args) ** 2)
    assert onp.all(onp.isfinite(grad(loss1)(one[1])))
t_unbatched = time.perf_counter() - t3; c_unbatched = time.process_time() - c3
t2 = time.perf_counter()
g = grad(loss)(inp[1])
t_second = time.perf_counter() - t2
funcs = {}
for name in dir(K):
    d = getattr(K, name)
    if hasattr(d, "signatures") and hasattr(d, "overloads"):
        rows = []
        for sig in d.signatures:
            md = d.overloads[sig].metadata or {}
            tm = md.get("timers", {})
            rows.append({"sig": str(sig), "compiler_lock": tm.get("compiler_lock"),
                         "llvm_lock": tm.get("llvm_lock")})
        if rows:
            funcs[name] = rows
print("@@" + json.dumps({"import_s": t_import, "first_call_s": t_first,
                         "second_call_s": t_second, "unbatched_call_s": t_unbatched,
                         "unbatched_call_cpu_s": c_unbatched,
                         "import_cpu_s": c_import, "first_call_cpu_s": c_first, "functions": funcs}))
"""


def _child(cache_dir: str, threads: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, NUMBA_NUM_THREADS=threads,
               PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    line = [ln for ln in out.splitlines() if ln.startswith("@@")][-1]
    res = json.loads(line[2:])
    res["process_wall_s"] = wall
    return res


def _parallel_warmup(cache_dir: str, threads: str) -> dict:
    """Compile the kernel groups in one process each, concurrently (empty cache)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, NUMBA_NUM_THREADS=threads,
               PYTHONPATH=ROOT)
    from reference_layers.kernels.qp_pdipm import KERNEL_GROUPS
    code = ("import sys, time; c = time.process_time(); "
            "from reference_layers.kernels.qp_pdipm import compile_kernels; "
            "compile_kernels((sys.argv[1],)); print('@@', time.process_time() - c)")
    t0 = time.perf_counter()
    procs = {g: subprocess.Popen([sys.executable, "-c", code, g], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True) for g in KERNEL_GROUPS}
    cpu = {}
    for g, pr in procs.items():
        out, _ = pr.communicate()
        if pr.returncode:
            raise RuntimeError(f"compile_kernels(({g!r},)) failed")
        cpu[g] = float(out.split("@@")[-1])
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu}


def _gradcheck(cache_dir: str, threads: str) -> dict:
    """One ``python -m verification.cli --no-progress`` run: wall and CPU seconds (of the
    CLI and its workers) and each layer's seconds (the sum of its cases')."""
    import resource
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, NUMBA_NUM_THREADS=threads,
               PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gradcheck.json")
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "verification.cli", "--no-progress", "--json", out],
                       env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(out) as f:
            layers = {r["layer"]: round(r["seconds"], 2) for r in json.load(f)["layers"]}
    return {"wall_s": wall, "user_cpu_s": r1.ru_utime - r0.ru_utime,
            "system_cpu_s": r1.ru_stime - r0.ru_stime, "layer_seconds": layers}


def _summary(result: dict) -> list:
    """One row per measured run, for the rendered results page."""
    rows = [{"run": f"QP first fwd+bwd, {tag} cache", "wall_s": result[key]["first_call_s"],
             "cpu_s": result[key]["first_call_cpu_s"]}
            for tag, key in (("empty", "cold"), ("filled", "warm"),
                             ("after compile_kernels", "after_parallel_warmup"))]
    rows.append({"run": "compile_kernels, one process per group", "wall_s":
                 result["parallel_warmup"]["wall_s"],
                 "cpu_s": sum(result["parallel_warmup"]["cpu_s"].values())})
    for tag, label in (("cold", "empty"), ("warm", "filled")):
        r = result.get(f"gradcheck_{tag}")
        if r is not None:
            rows.append({"run": f"nimplicit-gradcheck, {label} cache", "wall_s": r["wall_s"],
                         "cpu_s": r["user_cpu_s"] + r["system_cpu_s"]})
    return [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
            for row in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gradcheck", action="store_true",
                    help="also time the cold and warm `python -m verification.cli`")
    ap.add_argument("--threads", default=os.environ.get("NUMBA_NUM_THREADS", "2"))
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from benchmarks._common import record_header, write_json
    load0 = os.getloadavg()
    command = " ".join(["python -m benchmarks.compile_time", *(argv or sys.argv[1:])])
    result = dict(record_header(command, "numpy", "scipy", "numba", "llvmlite", "autograd"),
                  load_before=load0, threads=args.threads)
    with tempfile.TemporaryDirectory() as cache:
        cold = _child(cache, args.threads)
        warm = _child(cache, args.threads)
    result["cold"] = cold
    result["warm"] = {k: v for k, v in warm.items() if k != "functions"}
    with tempfile.TemporaryDirectory() as cache:
        par = _parallel_warmup(cache, args.threads)
        after = _child(cache, args.threads)
    result["parallel_warmup"] = par
    result["after_parallel_warmup"] = {k: v for k, v in after.items() if k != "functions"}
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    for tag, r in (("cold", cold), ("warm", warm)):
        print(f"{tag}: process {r['process_wall_s']:.1f} s, import {r['import_s']:.1f} s, "
              f"first fwd+bwd {r['first_call_s']:.1f} s (CPU: import {r['import_cpu_s']:.1f} s, "
              f"first {r['first_call_cpu_s']:.1f} s), second {r['second_call_s'] * 1e3:.1f} ms, "
              f"then unbatched {r['unbatched_call_s']:.1f} s (CPU {r['unbatched_call_cpu_s']:.1f} s)")
    print(f"compile_kernels, one process per group, concurrently: {par['wall_s']:.1f} s wall, "
          + ", ".join(f"{g} {c:.1f} s CPU" for g, c in par["cpu_s"].items())
          + f"; then the first fwd+bwd {after['first_call_s']:.2f} s (process "
          f"{after['process_wall_s']:.1f} s)")
    print(f"{'function':34s} {'#sig':>4s} {'compile s':>10s} {'llvm s':>8s}")
    for name, rows in sorted(cold["functions"].items(),
                             key=lambda kv: -sum(r["compiler_lock"] or 0 for r in kv[1])):
        c = sum(r["compiler_lock"] or 0 for r in rows)
        ll = sum(r["llvm_lock"] or 0 for r in rows)
        print(f"{name:34s} {len(rows):4d} {c:10.2f} {ll:8.2f}")
    if args.gradcheck:
        with tempfile.TemporaryDirectory() as cache:
            result["gradcheck_cold"] = _gradcheck(cache, args.threads)
            result["gradcheck_warm"] = _gradcheck(cache, args.threads)
        for tag in ("cold", "warm"):
            r = result[f"gradcheck_{tag}"]
            print(f"gradcheck {tag}: {r['wall_s']:.1f} s wall, {r['user_cpu_s']:.1f} s user CPU")
    result["summary"] = _summary(result)
    result["load_after"] = os.getloadavg()
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
