"""``nimplicit-gradcheck``: check every registered layer's derivatives.

::

    nimplicit-gradcheck                       # all layers, default cases, table
    nimplicit-gradcheck --list
    nimplicit-gradcheck --layer deq-tanh --cases 10 --order 2 --json out.json --workers 2
    nimplicit-gradcheck --target mymod:layer --instances mymod:generate --noise 1e-8
    nimplicit-gradcheck --self-test --cases 200 --scheduler tcp://127.0.0.1:8786
    nimplicit-gradcheck export deq-tanh deq.npz --cases 3 --directions 2 --size n=8
    nimplicit-gradcheck export --target mymod:layer --instances mymod:generate mine.npz
    nimplicit-gradcheck compare deq.npz --target mymod:wrapped_layer

Exit status: 0 every case passed, 1 a gradient check failed, 2 a usage error
(bad arguments, unwritable output path, unimportable target; all detected
before any case runs) or a runtime error (a case raised).  141 when standard
output was closed early (``--list | head -1``), without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
import traceback
import types
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

import numpy as onp

from .registry import Entry, load_all

SCHEMA_VERSION = 1
"""Version of the ``--json`` output's layout (documented in ``docs/cli.rst``)."""
EXIT_PASS, EXIT_FAIL, EXIT_ERROR, EXIT_PIPE = 0, 1, 2, 141
PROG = "nimplicit-gradcheck"


class UsageError(Exception):
    """Bad arguments, found before any case runs (exit status 2)."""


# ------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------

class Progress:
    """Progress of a sweep on ``stream`` (stderr).

    On a terminal one line is rewritten in place with carriage returns; on
    anything else (a log file, a pipe) one line is written per finished layer,
    so logs never hold ``\r``.
    """

    def __init__(self, layers: Sequence[str], desc: str, enabled: bool,
                 stream: Optional[TextIO] = None):
        self.stream = sys.stderr if stream is None else stream
        self.desc, self.total, self.done = desc, len(layers), 0
        self.left: Dict[str, int] = {}
        for name in layers:
            self.left[name] = self.left.get(name, 0) + 1
        self.cases = dict(self.left)
        self.enabled = enabled and self.total > 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, layer: str) -> None:
        self.done += 1
        self.left[layer] -= 1
        if not self.enabled:
            return
        if self.tty:
            self.stream.write(f"\r{self.desc} [{self.done}/{self.total}] {layer:<30}")
        elif self.left[layer] == 0:
            self.stream.write(f"{self.desc}: {layer} done, {self.cases[layer]} case(s) "
                              f"[{self.done}/{self.total}]\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()


# ------------------------------------------------------------------------------
# entries, including a user's own layer
# ------------------------------------------------------------------------------

def _cwd_on_path(cwd: Optional[str] = None) -> None:
    """Resolve ``--target`` modules from the working directory, as ``python -m`` does."""
    cwd = os.path.abspath(cwd or os.getcwd())
    if cwd not in [os.path.abspath(p or ".") for p in sys.path]:
        sys.path.insert(0, cwd)


def _import(spec: str, cwd: Optional[str] = None):
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise UsageError(f"expected MODULE:FUNCTION, got {spec!r}")
    _cwd_on_path(cwd)
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"cannot import {module!r} for {spec!r} ({exc}); run from the directory "
                         "that holds it or put it on PYTHONPATH") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module!r} has no attribute {attr!r} ({spec!r})") from None
    return obj


def as_instance(inst: Any) -> tuple:
    """The inputs of one case from what a user's generator returned.

    A tuple or list is the tuple of inputs; anything else (a bare array, a
    float) is the one input of a one-input layer, never split into rows.  A
    Python generator yields its first value.
    """
    if isinstance(inst, types.GeneratorType):
        inst = next(inst)
    if isinstance(inst, (tuple, list)):
        return tuple(inst)
    return (inst,)


def _user_entry(target: str, instances: str, cwd: Optional[str] = None) -> Entry:
    fn, generator = _import(target, cwd), _import(instances, cwd)

    def generate(rng, **_):
        return as_instance(generator(rng))
    return Entry(name=target, fn=fn, generate=generate, description=f"user layer {target}")


def _entry(name: str, target: Optional[str], instances: Optional[str],
           cwd: Optional[str] = None) -> Entry:
    if target is not None:
        return _user_entry(target, instances, cwd)
    return load_all()[name]


# ------------------------------------------------------------------------------
# one case (runs in a worker process)
# ------------------------------------------------------------------------------

def run_case(job: Dict[str, Any]) -> Dict[str, Any]:
    """Check one seeded case of one layer; a dict that pickles and serialises."""
    from .check import check_grad
    from .diagnose import diagnose

    entry = _entry(job["layer"], job.get("target"), job.get("instances"), job.get("cwd"))
    out: Dict[str, Any] = {"layer": job["layer"], "seed": job["seed"], "passed": False,
                           "vjp": None, "jvp": None, "order2": None, "cond": None,
                           "error": None, "report": None}
    start = time.perf_counter()
    # autograd warns when a derivative is identically zero (a legitimate answer here)
    warnings.filterwarnings("ignore", message="Output seems independent of input")
    try:
        inputs = entry.generate(onp.random.default_rng(job["seed"]), **entry.size)
        order = min(job["order"], entry.order)
        rtol = job["rtol"] if job["rtol"] is not None else entry.rtol
        atol = job["atol"] if job["atol"] is not None else entry.atol
        rep = check_grad(entry.fn, *inputs, modes=job["modes"], order=order, rtol=rtol, atol=atol,
                         seed=job["seed"], argnums=entry.argnums, fd_step=entry.fd_step,
                         noise=job["noise"] if job.get("noise") is not None else entry.noise)
        diag = diagnose(entry.fn, *inputs)
        out.update(passed=rep.passed, report=rep.to_dict(), cond=diag.worst_condition,
                   diagnosis=diag.to_dict(),
                   vjp=rep.worst_rel("rev", 1) if "rev" in job["modes"] else None,
                   jvp=rep.worst_rel("fwd", 1) if "fwd" in job["modes"] else None,
                   order2=rep.worst_rel(order=2) if order == 2 else None)
        if job.get("verbose") and not rep.passed:
            out["text"] = rep.summary(failures_only=True)
    except Exception as exc:   # reported as a failed case, with the reason
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = time.perf_counter() - start
    return out


def run_selftest_case(job: Dict[str, Any]) -> Dict[str, Any]:
    from .mutants import SelfTestResult, self_test_case

    entry = load_all()[job["layer"]]
    res = SelfTestResult(layer=job["layer"])
    start = time.perf_counter()
    warnings.filterwarnings("ignore", message="Output seems independent of input")
    try:
        self_test_case(entry, job["seed"], res)
    except Exception as exc:
        res.errors.append(f"case {job['seed']}: {type(exc).__name__}: {exc}")
    res.seconds = time.perf_counter() - start
    return res.to_dict()


def _family(layer: str) -> str:
    """The scheduling family of a layer: the first dash-separated word of its name.

    Registered layers that share it (``qp``, ``qp-eq``, ``qp-batched``...; the
    ``level-set-*`` ones; the ``gm-*`` ones) call the same compiled (numba) kernels.
    """
    return layer.split("-", 1)[0]


def _job_order(jobs: List[Dict[str, Any]]) -> List[int]:
    """Indices of ``jobs`` in the order they are offered to the workers.

    First every layer's first job, the families taken in turn (one layer of each
    family, then the next layer of each...), so the compile-heavy first cases of
    different families start early and side by side; then the other jobs in
    their given order.
    """
    first: Dict[str, int] = {}
    for i, job in enumerate(jobs):
        first.setdefault(job["layer"], i)
    by_family: Dict[str, List[int]] = {}
    for i in first.values():
        by_family.setdefault(_family(jobs[i]["layer"]), []).append(i)
    lists = list(by_family.values())
    heads = [lst[t] for t in range(max(map(len, lists), default=0)) for lst in lists
             if t < len(lst)]
    chosen = set(heads)
    return heads + [i for i in range(len(jobs)) if i not in chosen]


#: Families whose compiled (numba) kernels can be compiled ahead, group by group:
#: ``family -> (module, function, groups attribute)``; ``function((group,))`` compiles
#: one group (into numba's on-disk cache, which every worker then reads).
WARMUPS: Dict[str, tuple] = {
    "qp": ("reference_layers.kernels.qp_pdipm", "compile_kernels", "KERNEL_GROUPS"),
}


def warmup_jobs(jobs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One warm-up job per kernel group of every :data:`WARMUPS` family that ``jobs`` use."""
    families = {_family(job["layer"]) for job in jobs}
    out = []
    for family, (module, function, groups) in WARMUPS.items():
        if family in families:
            for group in getattr(importlib.import_module(module), groups):
                out.append({"family": family, "module": module, "function": function,
                            "group": group})
    return out


def run_warmup(job: Dict[str, Any]) -> Dict[str, Any]:
    """Compile one kernel group (a :func:`warmup_jobs` job) in a worker process.  A
    failure is returned in ``error``, not raised: the pool goes on, and the cases that
    need the kernels compile them again and report the error themselves."""
    start = time.perf_counter()
    error = None
    try:
        getattr(importlib.import_module(job["module"]), job["function"])((job["group"],))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    return dict(job, seconds=time.perf_counter() - start, error=error)


def _run_pool(worker: Callable[[Dict[str, Any]], Dict[str, Any]], jobs: List[Dict[str, Any]],
              workers: int, on_result: Callable[[Dict[str, Any]], None],
              warmups: Sequence[Dict[str, Any]] = (),
              warmup_worker: Callable[[Dict[str, Any]], Dict[str, Any]] = run_warmup) -> List[Dict]:
    """Run the jobs on a local process pool so that compiling is not done twice.

    A layer is *cold* until one of its jobs has finished (its first job compiles
    the numba kernels it calls, which numba's on-disk cache then serves to every
    other process).  A cold layer's job never starts while a cold job of the same
    :func:`_family` is running in another worker: the second worker would compile
    the same kernels at the same time; it takes other work instead (order:
    :func:`_job_order`).  The ``warmups`` (:func:`warmup_jobs`, run by
    ``warmup_worker``) start first, side by side (each compiles its own kernel
    group), and a family's cold jobs wait until its warm-ups are done.  Results in
    the order of ``jobs`` (the warm-ups' are not returned).
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    results: List[Any] = [None] * len(jobs)
    pending = _job_order(jobs)
    todo = list(warmups)
    warm: set = set()
    running: Dict[Any, Any] = {}    # future -> index of a job, or a warm-up (a dict)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        while todo or pending or running:
            compiling = {_family(jobs[i]["layer"]) for i in running.values()
                         if isinstance(i, int) and jobs[i]["layer"] not in warm}
            compiling |= {w["family"] for w in todo}
            compiling |= {w["family"] for w in running.values() if isinstance(w, dict)}
            while len(running) < workers:
                if todo:
                    job = todo.pop(0)
                    running[pool.submit(warmup_worker, job)] = job
                    continue
                pick = next((i for i in pending if jobs[i]["layer"] in warm
                             or _family(jobs[i]["layer"]) not in compiling), None)
                if pick is None:
                    break
                pending.remove(pick)
                running[pool.submit(worker, jobs[pick])] = pick
                if jobs[pick]["layer"] not in warm:
                    compiling.add(_family(jobs[pick]["layer"]))
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                i = running.pop(fut)
                if isinstance(i, dict):
                    fut.result()
                    continue
                results[i] = fut.result()
                warm.add(jobs[i]["layer"])
                on_result(results[i])
    return results


def _run_jobs(worker: Callable[[Dict[str, Any]], Dict[str, Any]], jobs: List[Dict[str, Any]],
              workers: int, progress: Progress, scheduler: Optional[str] = None,
              warmups: bool = False) -> List[Dict]:
    """Run ``worker`` on every job: in this process, a local process pool
    (scheduled by :func:`_run_pool`, after the :func:`warmup_jobs` if ``warmups``),
    or on the Dask cluster at ``scheduler``; results in the order of ``jobs``."""
    results = []
    if scheduler is not None:
        from .distributed import run_on_cluster
        results = run_on_cluster(worker, jobs, scheduler, on_result=lambda r: progress.update(r["layer"]))
    elif workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(worker(job))
            progress.update(job["layer"])
    else:
        results = _run_pool(worker, jobs, workers, lambda r: progress.update(r["layer"]),
                            warmup_jobs(jobs) if warmups else ())
    progress.close()
    return results


# ------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------

def _fmt(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and onp.isnan(v)):
        return "-"
    return f"{v:.1e}"


def summarize(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per layer: cases, worst relative errors, worst condition, time, verdict."""
    rows: Dict[str, Dict[str, Any]] = {}
    for r in results:
        row = rows.setdefault(r["layer"], {"layer": r["layer"], "cases": 0, "vjp": None, "jvp": None,
                                           "order2": None, "cond": None, "seconds": 0.0,
                                           "passed": True, "failed_seeds": [], "errors": []})
        row["cases"] += 1
        row["seconds"] += r["seconds"]
        for key in ("vjp", "jvp", "order2", "cond"):
            if r.get(key) is not None and not onp.isnan(r[key]):
                row[key] = r[key] if row[key] is None else max(row[key], r[key])
        if not r["passed"]:
            row["passed"] = False
            row["failed_seeds"].append(r["seed"])
            if r["error"]:
                row["errors"].append(f"seed {r['seed']}: {r['error']}")
    return list(rows.values())


def format_table(rows: List[Dict[str, Any]]) -> str:
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    lines = [f"{'layer':<{width}}  {'cases':>5}  {'VJP rel':>8}  {'JVP rel':>8}  {'2nd rel':>8}  "
             f"{'cond(J)':>8}  {'time':>7}  result"]
    for r in rows:
        lines.append(f"{r['layer']:<{width}}  {r['cases']:>5}  {_fmt(r['vjp']):>8}  {_fmt(r['jvp']):>8}  "
                     f"{_fmt(r['order2']):>8}  {_fmt(r['cond']):>8}  {r['seconds']:>6.1f}s  "
                     f"{'PASS' if r['passed'] else 'FAIL'}")
        for e in r["errors"]:
            lines.append(f"    error: {e}")
        if r["failed_seeds"] and not r["errors"]:
            lines.append(f"    failing seeds: {r['failed_seeds']}")
    return "\n".join(lines)


def format_selftest(rows: List[Dict[str, Any]]) -> str:
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    lines = [f"{'layer':<{width}}  {'cases':>5}  {'false alarms':>12}  {'mutants caught':>14}  "
             f"{'equiv.':>6}  {'smallest caught':>15}  {'time':>7}  result"]
    for r in rows:
        total = r["caught"] + r["missed"]
        equiv = sum(m["equivalent"] for m in r["mutants"].values())
        smallest = min((m["min_rel_error"] for m in r["mutants"].values()), default=float("inf"))
        lines.append(f"{r['layer']:<{width}}  {r['cases']:>5}  {len(r['false_alarms']):>12}  "
                     f"{r['caught']:>6}/{total:<7}  {equiv:>6}  {_fmt(smallest):>15}  "
                     f"{r['seconds']:>6.1f}s  {'PASS' if r['passed'] else 'FAIL'}")
        for kind, m in r["mutants"].items():
            if m["missed"]:
                lines.append(f"    missed {kind} on seeds {m['missed_cases']}")
        for e in r["errors"][:3]:
            lines.append(f"    error: {e}")
        if r["false_alarms"]:
            lines.append(f"    false alarms on seeds {r['false_alarms']}")
    return "\n".join(lines)


def merge_selftest(parts: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows: Dict[str, Dict[str, Any]] = {}
    for p in parts:
        row = rows.setdefault(p["layer"], {"layer": p["layer"], "cases": 0, "correct_passed": 0,
                                           "false_alarms": [], "errors": [], "caught": 0, "missed": 0,
                                           "seconds": 0.0, "mutants": {}})
        for key in ("cases", "correct_passed", "caught", "missed", "seconds"):
            row[key] += p[key]
        row["false_alarms"] += p["false_alarms"]
        row["errors"] += p["errors"]
        for kind, m in p["mutants"].items():
            acc = row["mutants"].setdefault(kind, {"kind": m["kind"], "mode": m["mode"], "caught": 0,
                                                   "missed": 0, "equivalent": 0, "not_applicable": 0,
                                                   "min_rel_error": float("inf"), "missed_cases": []})
            for key in ("caught", "missed", "equivalent", "not_applicable"):
                acc[key] += m[key]
            acc["min_rel_error"] = min(acc["min_rel_error"], m["min_rel_error"])
            acc["missed_cases"] += m["missed_cases"]
    for row in rows.values():
        row["passed"] = not row["false_alarms"] and not row["missed"] and not row["errors"]
    return list(rows.values())


# ------------------------------------------------------------------------------
# argument types and early validation
# ------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not onp.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _size_item(text: str):
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


def check_output_path(path: str, option: str) -> None:
    """Raise :class:`UsageError` unless ``path`` can be written (checked before any case runs)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a directory; give a file name")
    if not os.path.isdir(directory):
        raise UsageError(f"{option} {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path!r} is not writable")


def _check_scheduler(address: Optional[str]) -> None:
    if address is None:
        return
    from .distributed import require_distributed
    require_distributed()


# ------------------------------------------------------------------------------
# parsers
# ------------------------------------------------------------------------------

USAGE = (f"{PROG} [options]                 check layers (the default)\n"
         f"       {PROG} export LAYER PATH [options]   write oracle vectors\n"
         f"       {PROG} export --target MOD:FN --instances MOD:GEN PATH\n"
         f"       {PROG} compare FILE --target MOD:FN  check an implementation against a file")

EPILOG = ("subcommands:\n"
          "  export   write verified oracle vectors (.npz); see 'nimplicit-gradcheck export -h'\n"
          "  compare  check another implementation against an oracle file; "
          "see 'nimplicit-gradcheck compare -h'\n\n"
          "exit status: 0 all passed, 1 a gradient check failed, 2 usage or runtime error")


def _add_scheduler(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the cases on the Dask distributed cluster at ADDRESS "
                        "(e.g. tcp://scheduler-host:8786); needs the 'distributed' extra")


def _parser() -> argparse.ArgumentParser:
    """The parser of the default command (layer checks and the self-test)."""
    p = argparse.ArgumentParser(
        prog=PROG, usage=USAGE, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check the VJPs, JVPs and second derivatives of registered implicit layers\n"
                    "(or your own, with --target) against finite differences of the forward's output.")
    p.add_argument("--list", action="store_true", help="list the registered layers and exit")
    p.add_argument("--layer", action="append", metavar="NAME", help="check this layer (repeatable)")
    p.add_argument("--cases", type=_positive_int, metavar="N",
                   help="seeded cases per layer, at least 1 (default: the entry's; 3 for --target; "
                        "200 for --self-test)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="first case seed (cases use S, S+1, ...; default 0)")
    p.add_argument("--order", type=int, choices=(1, 2), default=2,
                   help="highest derivative order checked (capped by each entry's order; default 2)")
    p.add_argument("--modes", default="rev,fwd",
                   help="comma-separated subset of rev (VJPs), fwd (JVPs); default rev,fwd")
    p.add_argument("--rtol", type=_nonnegative_float, metavar="R",
                   help="extra relative tolerance (added to the finite-difference error bound)")
    p.add_argument("--atol", type=_nonnegative_float, metavar="A", help="extra absolute tolerance")
    p.add_argument("--noise", type=_nonnegative_float, metavar="EPS",
                   help="relative accuracy of the forward's output (e.g. 1e-8 for an iterative "
                        "solver stopped there); passed to check_grad(noise=)")
    p.add_argument("--json", metavar="PATH",
                   help="write every case's results to PATH (schema in docs/cli.rst; "
                        "checked to be writable before any case runs)")
    p.add_argument("--workers", type=_positive_int, default=min(2, os.cpu_count() or 1), metavar="N",
                   help="local processes (default: min(2, CPUs))")
    _add_scheduler(p)
    p.add_argument("--target", metavar="MODULE:FUNCTION",
                   help="check your own layer fn(*inputs); MODULE is resolved from the working directory")
    p.add_argument("--instances", metavar="MODULE:GENERATOR",
                   help="with --target: generate(rng) -> one instance: a tuple of inputs, or one "
                        "array for a one-input layer")
    p.add_argument("--self-test", action="store_true",
                   help="mutation self-test: seeded faulty VJPs/JVPs must all be flagged, "
                        "the correct layers must all pass")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (by default: a rewritten line on a terminal, "
                        "one line per finished layer otherwise)")
    p.add_argument("--verbose", action="store_true",
                   help="print the report of every failing case, and tracebacks of errors")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} export",
        usage=f"{PROG} export LAYER PATH [options]\n"
              f"       {PROG} export --target MOD:FN --instances MOD:GEN PATH [options]",
        description="Write oracle vectors (.npz with a JSON header) of a registered layer or of "
                    "your own; every case is checked against finite differences first.")
    p.add_argument("args", nargs="*", metavar="LAYER PATH",
                   help="registered layer name and output file (only PATH with --target)")
    p.add_argument("--size", type=_size_item, nargs="+", action="extend", metavar="KEY=VALUE",
                   help="keywords of the entry's generator, e.g. n=50 m=80 (see --list)")
    p.add_argument("--cases", type=_positive_int, default=3, metavar="N",
                   help="seeded cases (default 3)")
    p.add_argument("--directions", type=_positive_int, default=2, metavar="N",
                   help="random cotangents and tangents per case (default 2)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="first case seed (default 0)")
    p.add_argument("--target", metavar="MODULE:FUNCTION", help="export your own layer fn(*inputs)")
    p.add_argument("--instances", metavar="MODULE:GENERATOR",
                   help="with --target: generate(rng) -> one instance")
    p.add_argument("--name", help="with --target: the layer name recorded in the file")
    p.add_argument("--variant", metavar="NAME",
                   help="an entry's alternative form, e.g. a primal-only QP file for peers "
                        "without duals (when the entry declares variants)")
    _add_scheduler(p)
    p.add_argument("--layer", help=argparse.SUPPRESS)     # deprecated: use the LAYER argument
    p.add_argument("--out", help=argparse.SUPPRESS)       # deprecated: use the PATH argument
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} compare",
                                description="Check an implementation against an oracle file "
                                            "(exit 0 when every case agrees, 1 otherwise).")
    p.add_argument("file", help="an oracle file written by 'export'")
    p.add_argument("--target", required=True, metavar="MODULE:FUNCTION",
                   help="fn(*inputs) -> outputs, optionally with .vjp / .jvp attributes")
    p.add_argument("--vjp", metavar="MODULE:FUNCTION", help="vjp(inputs, cotangent) -> tuple")
    p.add_argument("--jvp", metavar="MODULE:FUNCTION", help="jvp(inputs, tangent) -> outputs")
    p.add_argument("--framework", choices=("torch", "jax"),
                   help="the target takes and returns this framework's arrays; VJPs and JVPs "
                        "come from the framework (needs it installed)")
    p.add_argument("--jvp-from", choices=("auto", "adjoint", "fd"), default="auto",
                   help="where JVPs come from when the target has none: 'adjoint' (through the "
                        "target's VJPs), 'fd' (finite differences of the target); 'auto' "
                        "(default) uses the adjoint identity when a VJP exists")
    p.add_argument("--noise", type=_nonnegative_float, metavar="EPS",
                   help="the target's relative forward accuracy, for --jvp-from fd "
                        "(default 64 machine epsilons)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not re-check the file's stored values before comparing")
    p.add_argument("--rtol", type=_nonnegative_float, default=None, metavar="R",
                   help="relative tolerance (default: the file's recommended_rtol)")
    p.add_argument("--atol", type=_nonnegative_float, default=1e-12, metavar="A",
                   help="absolute tolerance (default 1e-12)")
    p.add_argument("--json", metavar="PATH",
                   help="also write the report as JSON (schema_version, kind 'compare', and "
                        "OracleReport.to_dict()'s fields)")
    return p


def parsers() -> Dict[str, argparse.ArgumentParser]:
    """Every parser of the command, by subcommand (``""`` is the default command); for the docs."""
    return {"": _parser(), "export": _export_parser(), "compare": _compare_parser()}


# ------------------------------------------------------------------------------
# subcommands
# ------------------------------------------------------------------------------

def _generator_keywords(entry: Entry) -> Optional[List[str]]:
    """The keywords ``entry.generate`` accepts after ``rng`` (``None``: any, it takes ``**kw``)."""
    params = list(inspect.signature(entry.generate).parameters.values())[1:]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params]


def _export_main(argv: Sequence[str]) -> int:
    """``export``: exit 1 when a stored gradient fails its check, 2 on a bad size or variant."""
    from .oracle import OracleVerificationError, SizeOptionError
    try:
        return _export(argv)
    except OracleVerificationError as exc:
        print(f"{PROG}: export: a gradient failed its check: {exc}",
              file=sys.stderr)
        return EXIT_FAIL
    except SizeOptionError as exc:
        raise UsageError(f"export: {exc}") from exc


def _export(argv: Sequence[str]) -> int:
    from . import oracle
    a = _export_parser().parse_args(argv)
    args = list(a.args)
    if a.layer is not None or a.out is not None:
        warnings.warn("export --layer/--out are deprecated: use 'export LAYER PATH'",
                      DeprecationWarning, stacklevel=2)
        print(f"{PROG}: warning: export --layer/--out are deprecated: use 'export LAYER PATH'",
              file=sys.stderr)
        args = [x for x in (a.layer, a.out) if x is not None] + args
    size = dict(a.size or [])
    if (a.target is None) != (a.instances is None):
        raise UsageError("export: --target and --instances go together")
    if a.target is not None:
        if len(args) != 1:
            raise UsageError(f"export --target: expected one PATH argument, got {args}")
        if size:
            raise UsageError("export --target: --size applies to registered layers only")
        if a.scheduler is not None:
            raise UsageError("export --target: --scheduler is not supported for your own layer "
                             "(it may not be importable on the workers); drop --scheduler")
        if not hasattr(oracle, "export_function"):
            raise UsageError("export --target needs verification.oracle.export_function, which this "
                             "version does not have yet; export a registered layer instead")
        path = args[0]
        check_output_path(path, "export PATH")
        fn, gen = _import(a.target), _import(a.instances)
        instances = [as_instance(gen(onp.random.default_rng(a.seed + c))) for c in range(a.cases)]
        header = oracle.export_function(fn, instances, path, name=a.name or a.target,
                                        n_directions=a.directions)
    else:
        if len(args) != 2:
            raise UsageError(f"export: expected LAYER PATH, got {args}")
        layer, path = args
        registry = load_all()
        if layer not in registry:
            raise UsageError(f"export: unknown layer {layer!r}; registered: {sorted(registry)}")
        allowed = _generator_keywords(registry[layer])
        unknown = sorted(set(size) - set(allowed)) if allowed is not None else []
        if unknown:
            raise UsageError(f"export: --size keys {unknown} are not keywords of {layer}'s generator; "
                             f"allowed: {allowed}")
        export_params = inspect.signature(oracle.export).parameters
        if size and "size" not in export_params:
            raise UsageError("export --size needs verification.oracle.export(size=), which this "
                             "version does not have yet; drop --size")
        if a.variant is not None and "variant" not in export_params:
            raise UsageError("export --variant needs verification.oracle.export(variant=), which "
                             "this version does not have yet; drop --variant")
        check_output_path(path, "export PATH")
        _check_scheduler(a.scheduler)
        kwargs = {"cases": a.cases, "seed": a.seed, "n_directions": a.directions}
        if size:
            kwargs["size"] = size
        if a.variant is not None:
            if a.scheduler is not None:
                raise UsageError("export --variant with --scheduler is not supported; drop one")
            kwargs["variant"] = a.variant
        if a.scheduler is not None:
            from .distributed import export_on_cluster
            header = export_on_cluster(layer, path, a.scheduler, **kwargs)
        else:
            header = oracle.export(layer, path, **kwargs)
    print(f"wrote {path}: layer {header['layer']}, {len(header['cases'])} cases, "
          f"{a.directions} cotangents/tangents each")
    return EXIT_PASS


def _compare_main(argv: Sequence[str]) -> int:
    from .oracle import OracleVerificationError, compare
    a = _compare_parser().parse_args(argv)
    if not os.path.isfile(a.file):
        raise UsageError(f"compare: no such file {a.file!r}")
    if a.json:
        check_output_path(a.json, "compare --json")
    if a.noise is not None and a.jvp_from != "fd":
        raise UsageError("compare: --noise is the forward accuracy used by --jvp-from fd; "
                         "add --jvp-from fd or drop --noise")
    fn = _import(a.target)
    vjp, jvp = (_import(a.vjp) if a.vjp else None), (_import(a.jvp) if a.jvp else None)
    if a.framework is not None and (vjp is not None or jvp is not None):
        raise UsageError("compare: --framework computes VJPs and JVPs itself; drop --vjp/--jvp")
    if a.framework is not None:
        _check_framework(a.framework)
    try:
        rep = compare(a.file, fn, vjp, jvp, rtol=a.rtol, atol=a.atol, framework=a.framework,
                      jvp_from=a.jvp_from, verify=not a.no_verify, noise=a.noise)
    except OracleVerificationError as exc:
        print(f"{PROG}: the oracle file {a.file} failed its own check (use --no-verify to "
              f"compare anyway): {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(rep.summary())
    if a.json:
        _write_json(a.json, {"schema_version": SCHEMA_VERSION, "kind": "compare",
                             "file": a.file, "target": a.target, **rep.to_dict()})
    return EXIT_PASS if rep.passed else EXIT_FAIL


def _check_framework(name: str) -> None:
    """Usage error (exit 2) when ``--framework`` names a framework that is not installed."""
    try:
        importlib.import_module(name)
    except ImportError as exc:
        raise UsageError(f"compare --framework {name}: {name} is not installed here ({exc}); "
                         f"install it (e.g. pip install {name}) or run with the Python that has "
                         f"it") from exc


def _list(registry: Dict[str, Entry]) -> int:
    width = max(len(n) for n in registry)
    for name in sorted(registry):
        e = registry[name]
        size = " ".join(f"{k}={v}" for k, v in e.size.items())
        print(f"{name:<{width}}  order {e.order}, {e.cases} cases  {e.description}"
              + (f"  [--size {size}]" if size else ""))
    return EXIT_PASS


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump({"schema_version": SCHEMA_VERSION, **payload}, fh, indent=1, default=float)


def _self_test(a, names: List[str], start: float) -> int:
    cases = a.cases if a.cases is not None else 200
    jobs = [{"layer": n, "seed": a.seed + c} for n in names for c in range(cases)]
    parts = _run_jobs(run_selftest_case, jobs, a.workers,
                      Progress([j["layer"] for j in jobs], "self-test", not a.no_progress),
                      a.scheduler, warmups=True)
    rows = merge_selftest(parts)
    print(format_selftest(rows))
    ok = all(r["passed"] for r in rows)
    errors = any(r["errors"] for r in rows)
    total = sum(r["caught"] + r["missed"] for r in rows)
    print(f"{'PASS' if ok else 'ERROR' if errors else 'FAIL'}: {sum(r['caught'] for r in rows)}/{total} "
          f"mutants caught, {sum(len(r['false_alarms']) for r in rows)} false alarms in "
          f"{sum(r['cases'] for r in rows)} correct cases, {time.perf_counter() - start:.1f} s")
    if a.json:
        _write_json(a.json, {"kind": "self-test", "passed": ok, "self_test": rows})
    return EXIT_PASS if ok else EXIT_ERROR if errors else EXIT_FAIL


def _check(a, names: List[str], modes: tuple, registry: Dict[str, Entry], start: float) -> int:
    jobs = []
    for n in names:
        n_cases = a.cases if a.cases is not None else (3 if a.target else registry[n].cases)
        jobs += [{"layer": n, "seed": a.seed + c, "order": a.order, "modes": modes, "rtol": a.rtol,
                  "atol": a.atol, "noise": a.noise, "target": a.target, "instances": a.instances,
                  "cwd": os.getcwd(), "verbose": a.verbose} for c in range(n_cases)]
    results = _run_jobs(run_case, jobs, a.workers,
                        Progress([j["layer"] for j in jobs], "gradcheck", not a.no_progress),
                        a.scheduler, warmups=not a.target)
    rows = summarize(results)
    print(format_table(rows))
    if a.verbose:
        for r in results:
            if r.get("text"):
                print(f"\n{r['layer']} seed {r['seed']}:\n{r['text']}")
    ok = all(r["passed"] for r in rows)
    errors = any(r["error"] for r in results)
    print(f"{'PASS' if ok else 'ERROR' if errors else 'FAIL'}: {sum(r['cases'] for r in rows)} cases "
          f"of {len(rows)} layer(s) in {time.perf_counter() - start:.1f} s")
    if a.json:
        _write_json(a.json, {"kind": "check", "passed": ok, "layers": rows, "cases": results})
    return EXIT_PASS if ok else EXIT_ERROR if errors else EXIT_FAIL


def _main(argv: List[str]) -> int:
    if argv and argv[0] == "export":
        return _export_main(argv[1:])
    if argv and argv[0] == "compare":
        return _compare_main(argv[1:])
    a = _parser().parse_args(argv)
    registry = load_all()
    if a.list:
        return _list(registry)
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    if not modes or any(m not in ("rev", "fwd") for m in modes):
        raise UsageError(f"--modes must be a comma-separated subset of rev,fwd; got {a.modes!r}")
    if (a.target is None) != (a.instances is None):
        raise UsageError("--target and --instances go together")
    if a.json:
        check_output_path(a.json, "--json")
    if a.target is not None:
        if a.self_test:
            raise UsageError("--self-test runs on registered layers only")
        if a.layer:
            raise UsageError("--target and --layer exclude each other")
        names = [a.target]
        _user_entry(a.target, a.instances)   # fail early on a bad import
    else:
        names = a.layer or sorted(registry)
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise UsageError(f"unknown layer(s) {unknown}; registered: {sorted(registry)}")
    _check_scheduler(a.scheduler)
    start = time.perf_counter()
    if a.self_test:
        return _self_test(a, names, start)
    return _check(a, names, modes, registry, start)


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nimplicit-gradcheck``; returns the exit status.

    0 every case passed, 1 a gradient check failed, 2 a usage or runtime
    error, 141 standard output closed early.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        code = _main(argv)
        sys.stdout.flush()             # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as exc:          # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:           # a runtime error outside the cases: one line, not a traceback
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
