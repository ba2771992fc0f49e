"""Run the hostile-input (fuzz) suite and print its counts per entry point.

Usage (from the repository root)::

    NUMBA_CACHE_DIR=$PWD/.venv-numba python benchmarks/fuzz_counts.py [--slow] [--per-class N]
        [--json verification/results/fuzz-<date>.json] [--by-class] [-k EXPR]

Every example of tests/test_fuzz_*.py is run (outcomes are recorded, not
asserted, so that hypothesis does not stop at the first failure) and the
table "examples tried, typed errors, documented results, user exceptions
passed through, failures (and their classes)" is printed; ``--json`` also writes it, with the git commit, date
and command.  The exit status is 1 when any failure was recorded.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="the large run (PER_CLASS_SLOW examples per class)")
    parser.add_argument("--per-class", type=int, default=None, help="examples per bad-input class")
    parser.add_argument("--json", default=None, help="write the counts to this file")
    parser.add_argument("--by-class", action="store_true", help="also print the outcome of every class")
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset of entry points)")
    args = parser.parse_args(argv)
    if args.per_class is not None:
        if args.per_class < 1:
            parser.error("--per-class must be >= 1")
        os.environ["FUZZ_PER_CLASS" if not args.slow else "FUZZ_PER_CLASS_SLOW"] = str(args.per_class)
    os.environ["FUZZ_NO_ASSERT"] = "1"
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    os.chdir(ROOT)
    import pytest
    import fuzz_harness as H

    files = sorted(os.path.join("tests", f) for f in os.listdir(os.path.join(ROOT, "tests"))
                   if f.startswith("test_fuzz_") and f.endswith(".py"))
    pytest_args = files + ["-q", "-p", "no:cacheprovider", "-m", "slow" if args.slow else "not slow",
                           "-W", "ignore::DeprecationWarning"]
    if args.k:
        pytest_args += ["-k", args.k]
    pytest.main(pytest_args)
    print()
    print(H.format_table())
    if args.by_class:
        print()
        print(H.format_class_table())
    if H.FAILURES:
        print("\nfirst example of each failure:")
        for (entry, klass, kind), text in sorted(H.FAILURES.items()):
            print(f"- {entry} / {klass} / {kind}: {text[:400]}")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        rows = [dict(entry=e, tried=t, typed=ty, documented=d, user_exceptions=u, failures=f,
                     failure_kinds=k, failing_classes=c) for e, t, ty, d, f, k, c, u in H.summary_rows()]
        with open(args.json, "w") as fh:
            json.dump(dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           commit=commit, command=" ".join(["python", "benchmarks/fuzz_counts.py"] + (argv or sys.argv[1:])),
                           per_class=int(os.environ.get("FUZZ_PER_CLASS_SLOW" if args.slow else "FUZZ_PER_CLASS",
                                                        H.PER_CLASS_SLOW if args.slow else H.PER_CLASS_DEFAULT)),
                           rows=rows,
                           classes={e: {k: dict(v) for k, v in c.items()} for e, c in H.COUNTS.items()},
                           errors={e: {k: dict(v) for k, v in c.items()} for e, c in H.ERRORS.items()},
                           failures={f"{e} / {k} / {w}": t[:600] for (e, k, w), t in sorted(H.FAILURES.items())}),
                      fh, indent=1)
        print(f"\nwrote {args.json}")
    return 1 if H.FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
