"""Shared results writer and training-step guard of the examples.

Every example writes ``examples/results/<example>-<YYYY-MM-DD>.json`` with the
command line, the seed, the library versions, the thread settings, the wall
time, the git commit (and whether the work tree was dirty), its metrics and the
paper's numbers beside ours, plus its PNG figures
(``examples/results/<example>-<name>.png``).  The JSON is written with sorted
keys and no timestamps inside the metrics, so two runs with the same seed and
thread count give the same metrics (wall times differ, of course).

:func:`guarded_step` runs one training step (forward *and* backward) and turns a
typed failure of the library (:class:`nimplicit.errors.NimplicitError`) into a
skipped, counted step instead of the end of the run.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from nimplicit.errors import NimplicitError

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMBA_NUM_THREADS")


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "autograd", "numba", "matplotlib", "skimage", "sklearn",
                 "torch", "qpth"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        version = getattr(mod, "__version__", None)
        if version is None:
            try:
                from importlib.metadata import version as _dist_version
                version = _dist_version(name)
            except Exception:
                version = "unknown"
        out[name] = str(version)
    return out


#: results folders, left out of the dirty check (a run rewrites them itself)
_RESULT_PATHS = ("examples/results", "benchmarks/results")


def _git(args, cwd: str) -> Optional[str]:
    try:
        done = subprocess.run(["git"] + list(args), cwd=cwd, capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_info(cwd: Optional[str] = None) -> Dict[str, Any]:
    """The commit of the checkout the code runs from.

    Returns ``{"commit": <40-hex hash>, "dirty": bool, "dirty_files": [...]}``:
    ``dirty`` is true when tracked files differ from the commit (untracked files
    and the results folders ``examples/results`` and ``benchmarks/results`` are
    not counted, since a run writes there itself); ``dirty_files`` lists at most
    20 of them.  Outside a git checkout (an installed copy) ``commit`` and
    ``dirty`` are ``None``.
    """
    cwd = cwd or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = _git(["rev-parse", "HEAD"], cwd)
    if head is None:
        return {"commit": None, "dirty": None, "dirty_files": [],
                "note": "not a git checkout (or git is not installed)"}
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", "."]
                  + [f":(exclude){p}" for p in _RESULT_PATHS], cwd) or ""
    files = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": head.strip(), "dirty": bool(files), "dirty_files": files[:20]}


def environment() -> Dict[str, Any]:
    """Versions, thread settings and machine of this run."""
    return {"versions": _versions(),
            "threads": {var: os.environ.get(var) for var in THREAD_VARS},
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform()}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class Results:
    """Collects one run's metrics and writes them.

    Parameters
    ----------
    example : str
        File stem of the example (``"ncut_segmentation"``).
    args : argparse.Namespace or dict
        The parsed options (saved as the configuration).
    seed : int
        The run's seed.
    out_dir : str, optional
        Where to write (default ``examples/results``).
    tag : str, optional
        Appended to the file stem (``"quick"`` for ``--quick`` runs) so a smoke
        run never overwrites the full run's file.
    """

    def __init__(self, example: str, args, seed: int, out_dir: Optional[str] = None,
                 tag: str = ""):
        self.example = example
        self.stem = example + (f"-{tag}" if tag else "")
        self.out_dir = out_dir or RESULTS_DIR
        self.start = time.time()
        self.date = datetime.date.today().isoformat()
        cfg = vars(args) if hasattr(args, "__dict__") else dict(args)
        self.data: Dict[str, Any] = {
            "example": example, "command": f"python -m examples.{example}", "seed": seed, "config": dict(cfg),
            "environment": environment(), "git": git_info(), "metrics": {}, "paper": {}, "differences": [],
            "figures": []}
        os.makedirs(self.out_dir, exist_ok=True)

    def set_command(self, argv) -> None:
        """Record the example's arguments: ``argv`` as given to ``main`` (``None``: the
        command line of this process), and the process's own command line."""
        args = sys.argv[1:] if argv is None else list(argv)
        self.data["command"] = " ".join(["python", "-m", f"examples.{self.example}"] + args)
        self.data["invoked_as"] = " ".join(["python"] + sys.argv)

    def figure_path(self, name: str) -> str:
        """Path for a PNG (recorded in the JSON's ``figures``)."""
        path = os.path.join(self.out_dir, f"{self.stem}-{name}.png")
        self.data["figures"].append(os.path.basename(path))
        return path

    def write(self) -> str:
        """Write the JSON (wall time measured now) and return its path."""
        self.data["wall_seconds"] = round(time.time() - self.start, 1)
        path = os.path.join(self.out_dir, f"{self.stem}-{self.date}.json")
        with open(path, "w") as f:
            json.dump(_jsonable(self.data), f, indent=1, sort_keys=True)
        return path


def paper_table(rows, header=("quantity", "ours", "paper")) -> str:
    """A plain-text table of ``(name, ours, paper)`` rows."""
    rows = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class SkipCounter:
    """Counts the training steps skipped because of a typed library failure."""

    def __init__(self):
        self.skipped = 0
        self.by_type: Dict[str, int] = {}
        self.first: Optional[str] = None

    def record(self, exc: BaseException, where: str) -> None:
        self.skipped += 1
        name = type(exc).__name__
        self.by_type[name] = self.by_type.get(name, 0) + 1
        if self.first is None:
            self.first = f"{where}: {name}: {str(exc)[:300]}"

    def as_dict(self) -> Dict[str, Any]:
        return {"skipped_steps": self.skipped, "by_type": dict(self.by_type),
                "first_failure": self.first}


def guarded_step(grad_fn: Callable[..., Tuple[Any, Any]], *args, counter: SkipCounter,
                 where: str = "step"):
    """``grad_fn(*args)`` (a ``value_and_grad``), or ``None`` when the library raised a
    :class:`~nimplicit.errors.NimplicitError` in the forward or the backward pass.

    The failure is counted in ``counter`` (by type, the first message kept) and the
    caller skips the optimizer update for this batch.
    """
    try:
        return grad_fn(*args)
    except NimplicitError as exc:
        counter.record(exc, where)
        return None
