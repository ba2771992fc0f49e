"""Small helpers shared by the benchmarks: timing, peak memory, a text table, JSON/CSV.

Timing
    :func:`time_interleaved` times several competing implementations of one
    computation: each is a callable that times its own phases (say ``forward``
    and ``backward`` of one gradient evaluation) with a :class:`Laps`
    stopwatch.  After ``warmup`` unrecorded calls, the implementations run in
    turn, ``repeats`` rounds, and the median and minimum of each phase are
    kept.  Phases are timed inside one call because a backward pass usually
    needs a fresh forward pass (caches live per forward point); interleaving
    keeps ratios meaningful on a machine whose load changes.  On a shared
    machine use ``clock="cpu"`` (process CPU time).  :func:`time_phases` and
    :func:`time_call` are the one-implementation and one-phase cases.

Memory
    :func:`peak_memory` is the peak of ``tracemalloc``-traced allocations
    during one call, above what was allocated when the call started.  NumPy
    reports its array buffers to ``tracemalloc``; libraries that allocate
    outside Python's allocator (XLA/JAX, most of torch) are invisible to it.

Output
    :func:`format_table` prints rows (dicts) as an aligned plain-text table;
    a :class:`Column` is a key or a function of the row, so ratio columns are
    ``Column("bwd/fwd", lambda r: ratio(r["bwd"], r["fwd"]), "{:.2f}x")``.
    :func:`write_json` and :func:`write_csv` save the same rows.
    :func:`progress` wraps an iterable in ``tqdm`` when it is installed.

Example::

    from benchmarks._common import time_interleaved

    def ours(laps):
        backward = forward(); laps.lap("forward")
        backward();           laps.lap("backward")

    times = time_interleaved({"ours": ours, "theirs": theirs}, repeats=9, clock="cpu")
    times["ours"]["backward"].median      # seconds
"""
from __future__ import annotations

import csv
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

__all__ = ["Timing", "Laps", "CLOCKS", "time_interleaved", "time_phases", "time_call",
           "peak_memory", "ratio", "Column", "format_table", "write_json", "write_csv", "progress",
           "machine_info", "git_info"]


@dataclass
class Timing:
    """Seconds taken by one phase over ``len(samples)`` recorded repeats."""

    samples: list = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else math.nan

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "repeats": len(self.samples)}


#: clocks for :class:`Laps`: ``"wall"`` is elapsed time; ``"cpu"`` is the CPU
#: time of this process (all its threads), which other processes on a shared
#: machine do not inflate.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Laps:
    """A stopwatch for :func:`time_phases`: ``laps.lap("forward")`` records the
    seconds since the previous lap (or since the ``Laps`` was made) under that name."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.seconds: dict = {}
        self._clock = clock
        self._last = clock()

    def lap(self, phase: str) -> None:
        now = self._clock()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def _run_once(run: Callable[[Laps], Any], clock) -> dict:
    gc.collect()
    gc.disable()
    try:
        laps = Laps(clock)
        run(laps)
    finally:
        gc.enable()
    return laps.seconds


def time_interleaved(runs: Mapping[str, Callable[[Laps], Any]], *, repeats: int = 5,
                     warmup: int = 1, budget_s: Optional[float] = None, min_repeats: int = 3,
                     clock: str = "wall") -> dict:
    """Median/min seconds of each phase of several competing ``runs``, interleaved.

    Each ``run(laps)`` does one complete evaluation and calls ``laps.lap(name)``
    at the end of each phase.  Every run is called ``warmup`` times unrecorded
    (JIT compilation, caches, page faults); then, ``repeats`` times, each run
    once in turn, so that a slow spell of the machine hits all of them alike and
    their ratios stay meaningful.  The garbage collector runs before and is
    disabled during each call, so a collection is not billed to whichever phase
    it happens to fall in.

    With ``budget_s``, the number of rounds is cut to about ``budget_s`` divided
    by the duration of one warm-up round, but never below ``min_repeats`` (nor
    above ``repeats``): slow cases get fewer repeats.  ``clock`` is ``"wall"``
    or ``"cpu"`` (see :data:`CLOCKS`).

    Returns
    -------
    dict
        ``{run name: {phase: Timing}}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    tick = CLOCKS[clock]
    round_s = 0.0
    for _ in range(warmup):
        round_s = sum(sum(_run_once(run, tick).values()) for run in runs.values())
    if budget_s is not None and round_s > 0:
        repeats = max(min(min_repeats, repeats), min(repeats, int(budget_s / round_s)))
    out: dict = {name: {} for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            for phase, seconds in _run_once(run, tick).items():
                out[name].setdefault(phase, Timing()).samples.append(seconds)
    return out


def time_phases(run: Callable[[Laps], Any], **options) -> dict:
    """:func:`time_interleaved` for one run: ``{phase: Timing}``."""
    return time_interleaved({"run": run}, **options)["run"]


def time_call(fn: Callable[[], Any], **options) -> Timing:
    """Median/min seconds of ``fn()`` (options of :func:`time_interleaved`)."""
    def run(laps):
        fn()
        laps.lap("call")
    return time_phases(run, **options)["call"]


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated (as seen by ``tracemalloc``) during one call of ``fn``.

    The peak is counted above the traced memory at the start of the call, so
    inputs that already exist are not included; the result of ``fn`` is.
    Tracing slows the call down several times: never time under it.
    """
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return max(0, peak - base)


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """``numerator / denominator``, or ``None`` when either is missing, NaN or the
    denominator is zero (printed as ``-`` by :func:`format_table`)."""
    if numerator is None or denominator is None:
        return None
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return None
    return numerator / denominator


@dataclass
class Column:
    """One column of :func:`format_table`.

    ``value`` is a row key or a function ``row -> value``; ``fmt`` a
    ``str.format`` pattern applied to numbers (``None`` and NaN print as ``-``).
    """

    header: str
    value: Union[str, Callable[[Mapping], Any]]
    fmt: str = "{}"

    def cell(self, row: Mapping) -> str:
        v = row.get(self.value) if isinstance(self.value, str) else self.value(row)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return self.fmt.format(v) if isinstance(v, (int, float)) else str(v)


def format_table(rows: Sequence[Mapping], columns: Sequence[Column], *,
                 separator_key: Optional[str] = None) -> str:
    """An aligned plain-text table (text left-aligned, numbers right-aligned).

    With ``separator_key``, a rule is drawn wherever that key's value changes
    from one row to the next (e.g. between problem sizes).
    """
    cells = [[c.cell(r) for c in columns] for r in rows]
    headers = [c.header for c in columns]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    numeric = [all(_looks_numeric(row[i]) for row in cells) for i in range(len(columns))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(headers), rule]
    for k, (row, values) in enumerate(zip(rows, cells)):
        if separator_key and k and row.get(separator_key) != rows[k - 1].get(separator_key):
            out.append(rule)
        out.append(line(values))
    return "\n".join(out)


def _looks_numeric(text: str) -> bool:
    stripped = text.rstrip("x%").replace("e-", "").replace("e+", "")
    return text == "-" or stripped.replace(".", "", 1).lstrip("-").isdigit()


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):   # numpy scalars
        return _jsonable(value.item())
    return value


def git_info() -> dict:
    """``{"commit": hash, "dirty": bool, "dirty_files": [...]}`` of this checkout.

    ``dirty`` counts tracked files that differ from the commit, except the results
    folders (``benchmarks/results``, ``examples/results``); ``commit`` and ``dirty``
    are ``None`` outside a git checkout.  Same record as ``examples._results.git_info``.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None, "dirty_files": []}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 ":(exclude)benchmarks/results", ":(exclude)examples/results") or ""
    files = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": head.strip(), "dirty": bool(files), "dirty_files": files[:20]}


def write_json(path: str, payload: Any) -> None:
    """Write ``payload`` (dicts, lists, numbers, numpy scalars) as indented JSON;
    NaN and infinities become ``null``.  A dict payload gets the checkout's
    :func:`git_info` under ``"git"`` and the thread settings under ``"threads"``
    unless it has them already."""
    if isinstance(payload, dict):
        payload = dict(payload)
        payload.setdefault("git", git_info())
        payload.setdefault("threads", {var: os.environ.get(var) for var in
                                       ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                        "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")})
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2)
        f.write("\n")


def write_csv(path: str, rows: Sequence[Mapping]) -> None:
    """Write ``rows`` (dicts) as CSV with the union of their keys as header."""
    keys: list = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _jsonable(r.get(k)) for k in keys})


def progress(iterable: Iterable, **kwargs) -> Iterable:
    """``tqdm(iterable, **kwargs)`` when tqdm is installed, else ``iterable``."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def package_versions(*names: str) -> dict:
    """``{name: version}`` of installed distributions (``importlib.metadata``, so a
    package without ``__version__``, autograd or qpth, still reports one); ``None``
    for a package that is not installed."""
    from importlib import metadata
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def record_header(command: str, *packages: str) -> dict:
    """The header of a results file: UTC date, the command that wrote it, the machine
    and the versions of ``packages`` (:func:`write_json` adds the git commit)."""
    import datetime
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command, "machine": machine_info(),
            "versions": package_versions(*packages)}


def machine_info() -> dict:
    """Python, NumPy and platform versions, for the header of a saved result."""
    import numpy
    info = {"python": sys.version.split()[0], "numpy": numpy.__version__,
            "platform": platform.platform(), "processor": platform.processor()}
    try:
        info["cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    return info
