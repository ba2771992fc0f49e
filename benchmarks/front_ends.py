r"""Per-call cost of :func:`nimplicit.constrained_argmin_layer`'s forward (issue 13).

The gradient checker calls a layer's forward hundreds of times per case (finite
differences and their noise estimate), so the forward of the small registry
entries is what their CLI cases cost.  Timed (process CPU time, median of
``--repeats`` interleaved rounds, after warm-up), on the registry instances:

- ``box-n4``: ``noisy-box-slsqp`` (default SLSQP forward, 8 inequalities, n = 4);
- ``simplex-n5``: ``noisy-simplex-slsqp`` (default SLSQP forward, n = 5);
- ``simplex-user-n6``: ``simplex-projection`` (a user solver: only the KKT check);

each as ``forward`` (a raw call, what finite differences pay) and ``gradient``
(``autograd.grad`` of a scalar of the outputs: forward + backward).

Run: ``python -m benchmarks.front_ends [--repeats 41] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import sys

import autograd.numpy as anp
import numpy as np
from autograd import grad

from benchmarks._common import Column, format_table, record_header, time_interleaved, write_json

CASES = {"box-n4": "noisy-box-slsqp", "simplex-n5": "noisy-simplex-slsqp",
         "simplex-user-n6": "simplex-projection"}


def _scalar(fn, rest):
    def f(x):
        out = fn(x, *rest)
        parts = [out[i] for i in range(len(out))]
        return sum(anp.sum(anp.cos(anp.arange(p.size) + 1.0) * anp.ravel(p)) for p in parts)
    return f


def _runs():
    from verification import registry
    registry.load_all()
    runs = {}
    for label, name in CASES.items():
        entry = registry.ENTRIES[name]
        inputs = entry.generate(np.random.default_rng(0), **entry.size)
        g = grad(_scalar(entry.fn, inputs[1:]))

        def run(laps, fn=entry.fn, inputs=inputs, g=g):
            fn(*inputs)
            laps.lap("forward")
            g(inputs[0])
            laps.lap("gradient")
        runs[label] = run
    return runs


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    times = time_interleaved(_runs(), repeats=args.repeats, warmup=2, clock="cpu")
    rows = [{"case": label, "forward_ms": 1e3 * t["forward"].median,
             "gradient_ms": 1e3 * t["gradient"].median} for label, t in times.items()]
    print(format_table(rows, [Column("case", "case"), Column("forward ms", "forward_ms", "{:.2f}"),
                              Column("gradient ms", "gradient_ms", "{:.2f}")]))
    if args.json:
        command = " ".join(["python -m benchmarks.front_ends", *(argv or sys.argv[1:])])
        write_json(args.json, dict(record_header(command, "numpy", "scipy", "numba", "autograd"),
                                   repeats=args.repeats, rows=rows))
    return rows


if __name__ == "__main__":
    main()
