"""Marching cubes and the level-set layer against scikit-image and PyMCubes.

For a sphere's signed distance on ``n^3`` grids (``n`` = 32 ... 256), wall
time of

forward
    ``kernel``: :func:`reference_layers.kernels.marching_cubes.marching_cubes`;
    ``layer`` / ``layer normal``: :func:`reference_layers.iso_surface_layer`
    on raw numbers in ``mode="edge"`` / ``"normal"`` (the kernel plus the
    implicit node's forward: the residual check per vertex);
    scikit-image ``lewiner`` and ``lorensen`` (Cython) and PyMCubes (C++),
    when installed (``pip install scikit-image PyMCubes``);
zero grid
    ``numpy.zeros(phi.shape)`` with every page written: the memory cost of
    the ``n^3`` gradient any backward returns (on a virtual machine whose
    fresh pages are expensive this floor alone varies by 10x at 256^3);
backward
    a VJP of ``sum(verts)`` with respect to ``phi`` in ``mode="edge"`` and
    ``mode="normal"``: ``traced`` is the forward under autograd's tracing
    (``make_vjp``), ``vjp`` the backward pass alone (one batched VJP of the
    residual to form the ``V`` blocks, the closed-form solves, the VJP into
    the gathered grid values and their scatter onto the grid).

All implementations of one size are timed interleaved (median of
``--repeats`` rounds) so that their ratios are fair on a busy machine.
The ratios reported: ``fwd+bwd/fwd`` = ``(traced + vjp) / layer`` of the
same mode (the goal of issue 13: <= 2, the backward no slower than the
forward), ``vjp/kernel``, and scikit-image's ``lewiner`` over our
``kernel`` and ``layer``.  Besides ``benchmarks/output/``, ``--save``
writes the dated record ``benchmarks/results/marching_cubes-<date>.json``
(``marching_cubes-<date>-wall.json`` with ``--clock wall``): machine,
versions, threads, load, medians, minima, ratios.

    PYTHONPATH=. python benchmarks/marching_cubes.py [--quick] [--sizes 32,64,128,256]
        [--clock cpu] [--save]
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import numpy as onp
from autograd import make_vjp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import (Column, format_table, machine_info,  # noqa: E402
                                package_versions, ratio, time_interleaved, write_json)
from reference_layers.kernels.marching_cubes import marching_cubes  # noqa: E402
from reference_layers.level_set import iso_surface_layer  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sphere(n: int, radius: float = 0.7) -> onp.ndarray:
    x = onp.linspace(-1.0, 1.0, n)
    return onp.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2) - radius


def _peers():
    peers = {}
    try:
        from skimage.measure import marching_cubes as sk_mc
        peers["skimage lewiner"] = lambda phi: sk_mc(phi, 0.0, method="lewiner")
        peers["skimage lorensen"] = lambda phi: sk_mc(phi, 0.0, method="lorensen")
    except ImportError:
        print("scikit-image not installed: skipped", file=sys.stderr)
    try:
        import mcubes
        peers["pymcubes"] = lambda phi: mcubes.marching_cubes(phi, 0.0)
    except ImportError:
        print("PyMCubes not installed: skipped", file=sys.stderr)
    return peers


def _forward_run(fn, phi):
    def run(laps):
        fn(phi)
        laps.lap("forward")
    return run


def _zero_grid(phi):
    """A fresh zero array of phi's shape, every page written: the memory cost of the
    gradient that every VJP must return (a floor for the backward on large grids)."""
    out = onp.zeros(phi.shape)
    out.fill(0.0)
    return out


def _backward_run(mode, phi):
    def run(laps):
        vjp, verts = make_vjp(lambda p: iso_surface_layer(p, 0.0, mode=mode)[0])(phi)
        laps.lap("traced")
        vjp(onp.ones_like(verts))
        laps.lap("vjp")
    return run


def bench(sizes, repeats: int, clock: str = "wall"):
    peers = _peers()
    rows = []
    for n in sizes:
        phi = sphere(n)
        n_verts = len(marching_cubes(phi).verts)
        runs = {"kernel": _forward_run(marching_cubes, phi),
                "layer": _forward_run(lambda p: iso_surface_layer(p), phi),
                "layer normal": _forward_run(lambda p: iso_surface_layer(p, mode="normal"), phi)}
        runs.update({name: _forward_run(fn, phi) for name, fn in peers.items()})
        runs["zero grid"] = _forward_run(_zero_grid, phi)
        runs["edge"] = _backward_run("edge", phi)
        runs["normal"] = _backward_run("normal", phi)
        times = time_interleaved(runs, repeats=repeats, warmup=1, budget_s=20.0, clock=clock)
        row = {"n": n, "V": n_verts}
        for name in ["kernel", "layer", "layer normal", "zero grid"] + list(peers):
            row[name] = times[name]["forward"].median
            row[f"{name} min"] = times[name]["forward"].min
        for mode in ("edge", "normal"):
            for phase in ("traced", "vjp"):
                row[f"{mode} {phase}"] = times[mode][phase].median
                row[f"{mode} {phase} min"] = times[mode][phase].min
        row["repeats"] = len(times["kernel"]["forward"].samples)
        row.update(_ratios(row))
        rows.append(row)
        print(f"n={n}: done", file=sys.stderr)
    return rows, list(peers)


def _ratios(row: dict) -> dict:
    out = {}
    for mode, fwd in (("edge", "layer"), ("normal", "layer normal")):
        out[f"{mode} fwd+bwd/fwd"] = ratio(row[f"{mode} traced"] + row[f"{mode} vjp"], row[fwd])
        out[f"{mode} vjp/kernel"] = ratio(row[f"{mode} vjp"], row["kernel"])
    if "skimage lewiner" in row:
        out["lewiner/kernel"] = ratio(row["skimage lewiner"], row["kernel"])
        out["lewiner/layer"] = ratio(row["skimage lewiner"], row["layer"])
    return out


def _versions() -> dict:
    return package_versions("numpy", "scipy", "numba", "autograd", "scikit-image", "PyMCubes")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _record(rows, args, repeats, load_before) -> dict:
    import numba
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git_commit(),
            "command": "PYTHONPATH=. python benchmarks/marching_cubes.py " + " ".join(
                sys.argv[1:]),
            "clock": args.clock, "repeats": repeats,
            "threads": {"numba": numba.get_num_threads(),
                        "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
                        "kernel_parallel_min_points": 2 ** 20},
            "load_average": {"before": load_before, "after": list(os.getloadavg())},
            "machine": machine_info(), "versions": _versions(),
            "units": "seconds (medians over the interleaved rounds; '<name> min' the minima)",
            "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,128,256")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="sizes 32,64, 3 repeats")
    parser.add_argument("--save", action="store_true",
                        help="also write benchmarks/results/marching_cubes-<date>.json "
                             "(<date>-wall.json for the wall clock)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or process CPU time (all threads) on a busy machine")
    args = parser.parse_args(argv)
    sizes = [32, 64] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = 3 if args.quick else args.repeats
    load_before = list(os.getloadavg())
    rows, peers = bench(sizes, repeats, args.clock)
    ms = lambda key: Column(key, lambda r: None if r.get(key) is None else 1e3 * r[key], "{:.1f}")
    x = lambda key: Column(key, key, "{:.2f}x")
    columns = [Column("n", "n"), Column("V", "V"), ms("kernel"), ms("layer"), ms("layer normal"),
               ms("zero grid")]
    columns += [ms(p) for p in peers]
    if "skimage lewiner" in peers:
        columns += [x("lewiner/kernel"), x("lewiner/layer")]
    for mode in ("edge", "normal"):
        columns += [ms(f"{mode} traced"), ms(f"{mode} vjp"), x(f"{mode} fwd+bwd/fwd"),
                    x(f"{mode} vjp/kernel")]
    print(f"{args.clock}-clock milliseconds (median of {repeats}), sphere SDF, level 0")
    print(format_table(rows, columns))
    os.makedirs(OUT_DIR, exist_ok=True)
    record = _record(rows, args, repeats, load_before)
    print(f"load average before {load_before}, after {record['load_average']['after']}")
    write_json(os.path.join(OUT_DIR, f"marching_cubes_{args.clock}.json"), record)
    if args.save:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        variant = "" if args.clock == "cpu" else f"-{args.clock}"
        path = os.path.join(RESULTS_DIR, f"marching_cubes-{stamp}{variant}.json")
        write_json(path, record)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
