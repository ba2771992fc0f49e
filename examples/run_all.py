"""Regenerate every results file: ``python -m examples.run_all [--quick] [--only NAME ...]``.

Runs each example's full default configuration (``--quick``: the smoke runs) one
after the other, in this process, with the BLAS threads pinned to one (see
:mod:`examples`); each writes ``examples/results/<example>-<date>.json`` and its
PNGs.  A summary of the wall times is printed at the end, and after the full runs
the documentation pages are re-rendered from the results files
(``python -m examples.report``; ``--no-report`` skips that).
"""
from __future__ import annotations

import argparse
import importlib
import time

EXAMPLES = ("qp_digits", "ncut_segmentation", "level_set_shapes", "graph_matching")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the smoke runs only")
    ap.add_argument("--only", nargs="+", choices=EXAMPLES, default=None)
    ap.add_argument("--no-report", action="store_true",
                    help="do not re-render docs/_generated/ after the full runs")
    args = ap.parse_args(argv)
    seconds = {}
    for name in args.only or EXAMPLES:
        print(f"\n######## examples.{name} {'--quick' if args.quick else ''}", flush=True)
        t0 = time.time()
        importlib.import_module(f"examples.{name}").main(["--quick"] if args.quick else [])
        seconds[name] = time.time() - t0
    print("\nwall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()), flush=True)
    if not args.quick and not args.no_report:
        from examples import report
        report.main([])
    return seconds


if __name__ == "__main__":
    main()
