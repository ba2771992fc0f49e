"""``nimplicit-gradcheck``: check every registered layer's derivatives.

::

    nimplicit-gradcheck                       # all layers, default cases, table, exit 0 iff all pass
    nimplicit-gradcheck --list
    nimplicit-gradcheck --layer deq-tanh --cases 10 --order 2 --json out.json --workers 2
    nimplicit-gradcheck --target mymod:layer --instances mymod:generate
    nimplicit-gradcheck --self-test --cases 200 --workers 2
    nimplicit-gradcheck export --layer deq-tanh --out deq.npz
    nimplicit-gradcheck compare deq.npz --target mymod:wrapped_layer
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

import numpy as onp

from .registry import Entry, load_all


# ------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------

class Progress:
    """tqdm when installed, else a plain ``[k/N]`` line on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.done, self.desc, self.bar = total, 0, desc, None
        self.enabled = enabled and total > 1
        if self.enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
            except ImportError:
                self.bar = None

    def update(self, n: int = 1, label: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        else:
            sys.stderr.write(f"\r{self.desc} [{self.done}/{self.total}] {label:<30}")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


# ------------------------------------------------------------------------------
# entries, including a user's own layer
# ------------------------------------------------------------------------------

def _import(spec: str):
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise SystemExit(f"expected module:function, got {spec!r}")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _user_entry(target: str, instances: str) -> Entry:
    fn, generator = _import(target), _import(instances)

    def generate(rng, **_):
        inst = generator(rng)
        if isinstance(inst, types.GeneratorType):
            inst = next(inst)
        return tuple(inst)
    return Entry(name=target, fn=fn, generate=generate, description=f"user layer {target}")


def _entry(name: str, target: Optional[str], instances: Optional[str]) -> Entry:
    if target is not None:
        return _user_entry(target, instances)
    return load_all()[name]


# ------------------------------------------------------------------------------
# one case (runs in a worker process)
# ------------------------------------------------------------------------------

def run_case(job: Dict[str, Any]) -> Dict[str, Any]:
    """Check one seeded case of one layer; a dict that pickles and serialises."""
    from .check import check_grad
    from .diagnose import diagnose

    entry = _entry(job["layer"], job.get("target"), job.get("instances"))
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
                         noise=entry.noise)
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


def _run_jobs(worker, jobs: List[Dict[str, Any]], workers: int, progress: Progress) -> List[Dict]:
    results = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(worker(job))
            progress.update(1, job["layer"])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for res in pool.map(worker, jobs, chunksize=1):
                results.append(res)
                progress.update(1, res["layer"])
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
# command lines
# ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nimplicit-gradcheck",
        description="Check the VJPs, JVPs and second derivatives of registered implicit layers "
                    "against finite differences (exit status 0 only when all pass). "
                    "Subcommands: 'export' (oracle vectors), 'compare' (check against them).")
    p.add_argument("--list", action="store_true", help="list the registered layers and exit")
    p.add_argument("--layer", action="append", metavar="NAME", help="check this layer (repeatable)")
    p.add_argument("--cases", type=int, help="seeded cases per layer (default: the entry's; "
                                             "200 for --self-test)")
    p.add_argument("--seed", type=int, default=0, help="first case seed (cases use seed, seed+1, ...)")
    p.add_argument("--order", type=int, choices=(1, 2), default=2,
                   help="highest derivative order checked (capped by each entry's order)")
    p.add_argument("--modes", default="rev,fwd", help="comma-separated subset of rev,fwd")
    p.add_argument("--rtol", type=float, help="extra relative tolerance (added to the FD error bound)")
    p.add_argument("--atol", type=float, help="extra absolute tolerance")
    p.add_argument("--json", metavar="PATH", help="write every case's results to PATH")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes (default: min(2, CPUs))")
    p.add_argument("--target", metavar="MODULE:FUNCTION", help="check your own layer fn(*inputs)")
    p.add_argument("--instances", metavar="MODULE:GENERATOR",
                   help="with --target: generate(rng) -> tuple of inputs (one case per call)")
    p.add_argument("--self-test", action="store_true",
                   help="mutation self-test: seeded faulty VJPs/JVPs must all be flagged, "
                        "the correct layers must all pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print the report of every failing case")
    return p


def _export_main(argv: Sequence[str]) -> int:
    from .oracle import export
    p = argparse.ArgumentParser(prog="nimplicit-gradcheck export",
                                description="write oracle vectors (.npz with a JSON header)")
    p.add_argument("--layer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--directions", type=int, default=2, help="cotangents and tangents per case")
    a = p.parse_args(argv)
    header = export(a.layer, a.out, cases=a.cases, seed=a.seed, n_directions=a.directions)
    print(f"wrote {a.out}: layer {header['layer']}, {len(header['cases'])} cases, "
          f"{a.directions} cotangents/tangents each")
    return 0


def _compare_main(argv: Sequence[str]) -> int:
    from .oracle import compare
    p = argparse.ArgumentParser(prog="nimplicit-gradcheck compare",
                                description="check an implementation against an oracle file")
    p.add_argument("file")
    p.add_argument("--target", required=True, metavar="MODULE:FUNCTION",
                   help="fn(*inputs) -> outputs, optionally with .vjp / .jvp attributes")
    p.add_argument("--vjp", metavar="MODULE:FUNCTION", help="vjp(inputs, cotangent) -> tuple")
    p.add_argument("--jvp", metavar="MODULE:FUNCTION", help="jvp(inputs, tangent) -> outputs")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-12)
    a = p.parse_args(argv)
    rep = compare(a.file, _import(a.target), _import(a.vjp) if a.vjp else None,
                  _import(a.jvp) if a.jvp else None, rtol=a.rtol, atol=a.atol)
    print(rep.summary())
    return 0 if rep.passed else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nimplicit-gradcheck``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        return _export_main(argv[1:])
    if argv and argv[0] == "compare":
        return _compare_main(argv[1:])
    a = _parser().parse_args(argv)
    registry = load_all()
    if a.list:
        width = max(len(n) for n in registry)
        for name in sorted(registry):
            e = registry[name]
            print(f"{name:<{width}}  order {e.order}, {e.cases} cases  {e.description}")
        return 0
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    if not modes or any(m not in ("rev", "fwd") for m in modes):
        print(f"--modes must be a comma-separated subset of rev,fwd; got {a.modes!r}", file=sys.stderr)
        return 2
    if (a.target is None) != (a.instances is None):
        print("--target and --instances go together", file=sys.stderr)
        return 2
    if a.target is not None:
        names = [a.target]
        _user_entry(a.target, a.instances)   # fail early on a bad import
    else:
        names = a.layer or sorted(registry)
        unknown = [n for n in names if n not in registry]
        if unknown:
            print(f"unknown layer(s) {unknown}; registered: {sorted(registry)}", file=sys.stderr)
            return 2
    start = time.perf_counter()
    show = not a.no_progress

    if a.self_test:
        if a.target is not None:
            print("--self-test runs on registered layers only", file=sys.stderr)
            return 2
        cases = a.cases if a.cases is not None else 200
        jobs = [{"layer": n, "seed": a.seed + c} for n in names for c in range(cases)]
        parts = _run_jobs(run_selftest_case, jobs, a.workers,
                          Progress(len(jobs), "self-test", show))
        rows = merge_selftest(parts)
        print(format_selftest(rows))
        ok = all(r["passed"] for r in rows)
        total = sum(r["caught"] + r["missed"] for r in rows)
        print(f"{'PASS' if ok else 'FAIL'}: {sum(r['caught'] for r in rows)}/{total} mutants caught, "
              f"{sum(len(r['false_alarms']) for r in rows)} false alarms in "
              f"{sum(r['cases'] for r in rows)} correct cases, {time.perf_counter() - start:.1f} s")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"self_test": rows}, fh, indent=1, default=float)
        return 0 if ok else 1

    jobs = []
    for n in names:
        n_cases = a.cases if a.cases is not None else (3 if a.target else registry[n].cases)
        jobs += [{"layer": n, "seed": a.seed + c, "order": a.order, "modes": modes, "rtol": a.rtol,
                  "atol": a.atol, "target": a.target, "instances": a.instances,
                  "verbose": a.verbose} for c in range(n_cases)]
    results = _run_jobs(run_case, jobs, a.workers, Progress(len(jobs), "gradcheck", show))
    rows = summarize(results)
    print(format_table(rows))
    if a.verbose:
        for r in results:
            if r.get("text"):
                print(f"\n{r['layer']} seed {r['seed']}:\n{r['text']}")
    ok = all(r["passed"] for r in rows)
    print(f"{'PASS' if ok else 'FAIL'}: {sum(r['cases'] for r in rows)} cases of {len(rows)} "
          f"layer(s) in {time.perf_counter() - start:.1f} s")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"passed": ok, "layers": rows, "cases": results}, fh, indent=1, default=float)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
