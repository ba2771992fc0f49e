r"""Implicit differentiation vs. backpropagation through the unrolled iterations.

The layer is the fixed point

.. math::  y^* = \tanh(W y^* + U x),\qquad L(y^*) = \textstyle\sum_i (y^*_i)^2,

with ``W`` scaled to spectral norm ``rho`` (default 0.5: the map is a
contraction with factor ``<= rho``, so ``k = 50`` plain iterations from
``y = 0`` reach ``rho^50 ~ 1e-15`` and the forward is converged for every
``k`` measured; nimplicit's residual check keeps its default tolerance).  For
each size ``d`` and forward iteration count ``k``, the gradient of ``L`` with
respect to ``(W, U, x)`` (first table) and to ``x`` alone (second table, where
no ``d x d`` parameter gradient hides the cost of the tape) is computed by

- ``nimplicit lu`` / ``nimplicit gmres``: :func:`nimplicit.fixed_point_layer`
  whose forward solver does exactly ``k`` plain iterations; the implicit VJP
  solves ``(I - W^T D) v = 2 y*`` (``D = diag(1 - y*^2)``) by a dense LU of
  ``J`` (formed from ``d`` autograd VJPs) or by matrix-free GMRES
  (``rtol=1e-11``);
- ``nimplicit auto``: the same with the default ``linear_solver='auto'`` (LU,
  with its condition check, up to ``dense_max=200`` unknowns, GMRES at rtol
  1e-11 above);
- ``nimplicit krylov_or_dense``: ``linear_solver='krylov_or_dense'`` (GMRES at
  rtol 1e-14, falling back to LU once its products cost more than forming J);
- ``nimplicit cg``: the same with ``linear_solver='cg'``, which must refuse
  (``LinearSolveError``: its symmetry probe sees that ``I - W^T D`` is not
  symmetric) rather than return a wrong gradient;
- ``autograd unrolled``: ``autograd`` through the ``k`` iterations;
- ``jaxopt gmres`` / ``jaxopt cg``: ``jaxopt.implicit_diff.custom_fixed_point``
  (jitted, CPU, float64) with ``solve_gmres`` / ``solve_cg`` (``tol=1e-11``);
  CG assumes a symmetric positive definite system, which ``I - W^T D`` is not,
  so its gradients are wrong.  Only when ``jax`` and ``jaxopt`` import.

The forward solver ``b = U x; y <- tanh(W y + b)`` is the same code in every
method.  Times are medians of one fresh forward + backward pass, the methods
of a case interleaved, by process CPU time with one BLAS/XLA thread (see
``--clock``, ``--threads``).  The peak memory (``tracemalloc``: NumPy buffers
only, XLA's are invisible to it) covers forward and backward.  The gradient
error is ``max_p |g_p - g*_p|_inf / |g*_p|_inf`` over the differentiated
parameters against the exact implicit-function-theorem gradient ``g*`` at a
fixed point converged to machine precision, from a dense NumPy solve; that
reference is itself checked against finite differences of the converged
forward at the smallest size.

Run ``python benchmarks/implicit_vs_unrolled.py [--quick] [--json PATH]``.  With
``--generic`` only the "generic node" row of issue 13: forward + backward of
``nimplicit auto`` (``linear_solver='auto'``, the default) against ``jaxopt
gmres`` at ``d = 10, 100, 1000``, ``k = 50``, written to
``benchmarks/results/generic-<date>.json`` (machine, versions, threads, load,
medians, ratios).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional


def _limit_threads(argv: list) -> int:
    """Fix the BLAS / XLA thread count from ``--threads`` (default 1) before
    NumPy or JAX are imported: on a small machine shared with other work, a
    multi-threaded OpenBLAS ``gemv`` waits for descheduled threads (measured
    here: median 12 ms instead of 0.1 ms for d = 1000), which would make every
    timing noise.  One thread for every method keeps the comparison fair."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=1)
    threads = pre.parse_known_args(argv)[0].threads
    if "numpy" in sys.modules:   # imported as a module: too late to change, leave as is
        return threads
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false").strip()
    return threads


if __name__ == "__main__":
    _limit_threads(sys.argv[1:])

import numpy as onp                                            # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import autograd.numpy as np                                    # noqa: E402
from autograd import make_vjp                                  # noqa: E402

import nimplicit                                               # noqa: E402
from benchmarks._common import (Column, format_table, machine_info,  # noqa: E402
                                package_versions, peak_memory, progress, ratio,
                                time_interleaved, write_csv, write_json)

KRYLOV_RTOL = 1e-11


# ------------------------------------------------------------------------------
# the problem and its exact gradient
# ------------------------------------------------------------------------------

@dataclass
class Problem:
    """``y = tanh(W y + U x)`` with ``|W|_2 = rho``; ``U`` is ``d x d``, ``x`` has ``d`` entries."""

    W: onp.ndarray
    U: onp.ndarray
    x: onp.ndarray

    @property
    def d(self) -> int:
        return len(self.x)

    @property
    def params(self) -> tuple:
        return (self.W, self.U, self.x)


def make_problem(d: int, rho: float, seed: int = 0) -> Problem:
    """Random ``W`` rescaled to spectral norm ``rho``; ``U`` with ``N(0, 1/d)``
    entries and ``x ~ N(0, 1)``, so ``U x`` has entries of order one."""
    rng = onp.random.default_rng(seed)
    W = rng.standard_normal((d, d))
    W *= rho / onp.linalg.norm(W, 2)
    U = rng.standard_normal((d, d)) / onp.sqrt(d)
    x = rng.standard_normal(d)
    return Problem(W, U, x)


def iterate(W, U, x, k: int) -> onp.ndarray:
    """Exactly ``k`` plain iterations ``y <- tanh(W y + U x)`` from ``y = 0``
    (raw NumPy: the forward solver of every NumPy method)."""
    b = U @ x
    y = onp.zeros(len(x))
    for _ in range(k):
        y = onp.tanh(W @ y + b)
    return y


def converged_fixed_point(W, U, x, *, max_iter: int = 100_000) -> onp.ndarray:
    """The fixed point to machine precision: plain iterations until the step is
    below ``1e-12``, then two Newton steps on ``F(y) = tanh(W y + U x) - y``."""
    b = U @ x
    y = onp.zeros(len(x))
    for _ in range(max_iter):
        y_new = onp.tanh(W @ y + b)
        step = onp.abs(y_new - y).max()
        y = y_new
        if step < 1e-12:
            break
    for _ in range(2):
        t = onp.tanh(W @ y + b)
        J = (1.0 - t ** 2)[:, None] * W - onp.eye(len(y))
        y = y - onp.linalg.solve(J, t - y)
    return y


def loss_of_y(y):
    return np.sum(y ** 2)


def ift_gradient(problem: Problem) -> tuple:
    r"""Exact gradient of ``L(y*)`` by the implicit function theorem, dense NumPy.

    With ``z = W y* + U x``, ``D = diag(1 - tanh(z)^2)`` and ``g = dL/dy = 2 y*``:
    ``v = (I - W^T D)^{-1} g`` and ``s = D v``; then ``dL/dW = s y*^T``,
    ``dL/dU = s x^T``, ``dL/dx = U^T s``.
    """
    W, U, x = problem.params
    y = converged_fixed_point(W, U, x)
    D = 1.0 - onp.tanh(W @ y + U @ x) ** 2
    v = onp.linalg.solve(onp.eye(len(y)) - W.T * D[None, :], 2.0 * y)
    s = D * v
    return onp.outer(s, y), onp.outer(s, x), U.T @ s


def check_reference(problem: Problem, seed: int = 1, step: float = 1e-3) -> float:
    """Relative error of the IFT gradient's directional derivative against
    finite differences of ``L`` at the converged forward in a random direction
    (fourth-order central stencil ``[f(-2h), -8 f(-h), 8 f(h), -f(2h)] / 12h``)."""
    rng = onp.random.default_rng(seed)
    direction = [rng.standard_normal(p.shape) for p in problem.params]

    def L(t):
        W, U, x = (p + t * v for p, v in zip(problem.params, direction))
        return float(onp.sum(converged_fixed_point(W, U, x) ** 2))

    h = step
    fd = (8 * (L(h) - L(-h)) - (L(2 * h) - L(-2 * h))) / (12 * h)
    exact = sum(float(onp.vdot(g, v)) for g, v in zip(ift_gradient(problem), direction))
    return abs(fd - exact) / max(abs(exact), 1e-300)


def gradient_error(grads, reference) -> float:
    """``max_p |g_p - g*_p|_inf / |g*_p|_inf`` over the parameters ``p``."""
    return max(float(onp.abs(onp.asarray(g) - r).max() / onp.abs(r).max())
               for g, r in zip(grads, reference))


# ------------------------------------------------------------------------------
# the methods: method(problem) -> forward(); forward() -> backward; backward() -> grads
# ------------------------------------------------------------------------------
# ``wrt="all"`` differentiates with respect to (W, U, x), ``wrt="x"`` only x
# (W and U are then constants).  Gradients come back as a tuple in that order.

WRT = {"all": "W, U, x", "x": "x"}


def T(y, W, U, x):
    """The fixed-point map, traceable by autograd."""
    return np.tanh(np.dot(W, y) + np.dot(U, x))


#: how the autograd-based methods take the gradient with respect to (W, U, x):
#: ``"tuple"`` (default) ``make_vjp`` of ``loss((W, U, x))``, as a user writes it:
#: autograd's VJP of each ``params[k]`` is a sparse object added into zeros of the
#: WHOLE tuple (at d = 1000 two 8 MB allocations and passes per parameter, the same for
#: every autograd method, none for jaxopt); ``"roots"`` one trace with a root per
#: parameter (:func:`vjp_with_roots`), which has no such cost.  Set by ``--harness``.
HARNESS = "tuple"


def vjp_with_roots(fun: Callable, args: tuple) -> Callable:
    """``g -> (d<fun(*args), g>/d args[k])_k``: autograd's trace with one root per
    argument and its backward pass, collecting each root's gradient (the harness
    ``"roots"``; independent of nimplicit's internals)."""
    from autograd.core import VJPNode, add_outgrads, vspace
    from autograd.tracer import isbox, new_box, trace_stack
    from autograd.util import toposort

    with trace_stack.new_trace() as t:
        roots = [VJPNode.new_root() for _ in args]
        out = fun(*[new_box(a, t, r) for a, r in zip(args, roots)])
        end = out._node if isbox(out) and out._trace == t else None
    index = {r: k for k, r in enumerate(roots)}

    def vjp(g):
        grads = [None] * len(args)
        if end is not None:
            outgrads = {end: (g, False)}
            for node in toposort(end):
                outgrad = outgrads.pop(node)
                if node in index:
                    grads[index[node]] = outgrad[0]
                    continue
                for parent, ingrad in zip(node.parents, node.vjp(outgrad[0])):
                    outgrads[parent] = add_outgrads(outgrads.get(parent), ingrad)
        return tuple(vspace(a).zeros() if gk is None else gk for a, gk in zip(args, grads))
    return vjp


def _autograd_forward(loss, problem: Problem, wrt: str) -> Callable:
    """``forward()`` records ``loss`` for reverse mode and returns ``backward()``."""
    W, U, x = problem.params
    if wrt == "all" and HARNESS == "roots":
        def forward():
            return functools.partial(vjp_with_roots(lambda *p: loss(p), (W, U, x)), 1.0)
    elif wrt == "all":
        def forward():
            vjp, _value = make_vjp(loss)((W, U, x))
            return lambda: vjp(1.0)
    else:
        def forward():
            vjp, _value = make_vjp(lambda xx: loss((W, U, xx)))(x)
            return lambda: (vjp(1.0),)
    return forward


def nimplicit_method(problem: Problem, k: int, wrt: str, linear_solver: str) -> Callable:
    layer = nimplicit.fixed_point_layer(T, solver=functools.partial(iterate, k=k),
                                        linear_solver=linear_solver)
    return _autograd_forward(lambda params: loss_of_y(layer(*params)), problem, wrt)


def unrolled_method(problem: Problem, k: int, wrt: str) -> Callable:
    def loss(params):
        W, U, x = params
        b = np.dot(U, x)
        y = np.zeros(len(x))
        for _ in range(k):
            y = np.tanh(np.dot(W, y) + b)
        return loss_of_y(y)
    return _autograd_forward(loss, problem, wrt)


def jax_available() -> bool:
    try:
        import jax        # noqa: F401
        import jaxopt     # noqa: F401
    except ImportError:
        return False
    return True


def jaxopt_method(problem: Problem, k: int, wrt: str, linear_solver: str) -> Callable:
    """``custom_fixed_point`` with a jitted forward that returns the VJP closure
    and a jitted backward, so the two phases are timed apart."""
    import jax
    import jax.numpy as jnp
    from jaxopt.implicit_diff import custom_fixed_point
    from jaxopt.linear_solve import solve_cg, solve_gmres
    jax.config.update("jax_enable_x64", True)
    solve = {"gmres": solve_gmres, "cg": solve_cg}[linear_solver]

    def fixed_point_map(y, params):
        W, U, x = params
        return jnp.tanh(W @ y + U @ x)

    @custom_fixed_point(fixed_point_map, solve=functools.partial(solve, tol=KRYLOV_RTOL))
    def solver(y0, params):
        W, U, x = params
        b = U @ x
        return jax.lax.fori_loop(0, k, lambda _, y: jnp.tanh(W @ y + b), y0)

    def loss(W, U, x):
        return jnp.sum(solver(jnp.zeros(x.shape), (W, U, x)) ** 2)

    if wrt == "all":
        jit_forward = jax.jit(lambda W, U, x: jax.vjp(loss, W, U, x))
    else:
        jit_forward = jax.jit(lambda W, U, x: jax.vjp(lambda xx: loss(W, U, xx), x))
    jit_backward = jax.jit(lambda vjp, cotangent: vjp(cotangent))
    one = jnp.asarray(1.0)
    params = tuple(jnp.asarray(p) for p in problem.params)

    def forward():
        _value, vjp = jax.block_until_ready(jit_forward(*params))

        def backward():
            return tuple(onp.asarray(g) for g in jax.block_until_ready(jit_backward(vjp, one)))
        return backward
    return forward


def methods(with_jax: bool) -> list:
    """``(name, make(problem, k, wrt) -> forward, memory_visible)``."""
    out = [("nimplicit auto", functools.partial(nimplicit_method, linear_solver="auto"), True),
           ("nimplicit krylov_or_dense",
            functools.partial(nimplicit_method, linear_solver="krylov_or_dense"), True),
           ("nimplicit lu", functools.partial(nimplicit_method, linear_solver="lu"), True),
           ("nimplicit gmres", functools.partial(nimplicit_method, linear_solver="gmres"), True),
           # expected to refuse: its symmetry probe rejects the nonsymmetric I - W^T D
           ("nimplicit cg", functools.partial(nimplicit_method, linear_solver="cg"), True),
           ("autograd unrolled", unrolled_method, True)]
    if with_jax:
        out += [("jaxopt gmres", functools.partial(jaxopt_method, linear_solver="gmres"), False),
                ("jaxopt cg", functools.partial(jaxopt_method, linear_solver="cg"), False)]
    return out


# ------------------------------------------------------------------------------
# measuring and reporting
# ------------------------------------------------------------------------------

def _timed(forward: Callable) -> Callable:
    """``laps -> None`` timing one forward (which returns its backward) and that backward."""
    def run(laps):
        backward = forward()
        laps.lap("forward")
        backward()
        laps.lap("backward")
    return run


def measure_group(forwards: dict, memory_visible: dict, reference: tuple, *, budget_s: float,
                  repeats: int, clock: str) -> dict:
    """Forward/backward times (interleaved across methods), peak memory and
    gradient error of competing methods on one problem: ``{method: row}``.

    A method that raises (e.g. nimplicit's ``ResidualError`` when ``k``
    iterations do not converge for a large ``--rho``) gets a row holding the
    error's name instead of numbers.
    """
    rows, working = {}, {}
    for name, forward in forwards.items():
        try:
            grads = forward()()
        except Exception as error:     # reported in the table, not fatal to the others
            rows[name] = {"fwd_ms": None, "bwd_ms": None, "grad_err": None, "peak_mb": None,
                          "error": f"{type(error).__name__}: {str(error)[:200]}"}
            continue
        rows[name] = {"grad_err": gradient_error(grads, reference)}
        working[name] = forward

    times = time_interleaved({name: _timed(f) for name, f in working.items()}, repeats=repeats,
                             warmup=1, budget_s=budget_s, min_repeats=3, clock=clock)
    for name, forward in working.items():
        fwd, bwd = times[name]["forward"], times[name]["backward"]
        rows[name].update({
            "fwd_ms": 1e3 * fwd.median, "bwd_ms": 1e3 * bwd.median,
            "fwd_min_ms": 1e3 * fwd.min, "bwd_min_ms": 1e3 * bwd.min,
            "repeats": len(fwd.samples),
            "peak_mb": (peak_memory(lambda: forward()()) / 2 ** 20
                        if memory_visible[name] else None)})
    return rows


def add_ratios(rows: list) -> None:
    """Ratio columns: backward / the same row's forward, the unrolled backward
    (same wrt, d, k) / this backward, and peak memory at this k / at the smallest k."""
    by_key = {(r["wrt"], r["d"], r["k"], r["method"]): r for r in rows}
    k_min = min(r["k"] for r in rows)
    for r in rows:
        unrolled = by_key.get((r["wrt"], r["d"], r["k"], "autograd unrolled"))
        first = by_key.get((r["wrt"], r["d"], k_min, r["method"]))
        r["bwd_over_fwd"] = ratio(r["bwd_ms"], r["fwd_ms"])
        r["unrolled_bwd_over_bwd"] = ratio(unrolled["bwd_ms"], r["bwd_ms"]) if unrolled else None
        r["mem_vs_kmin"] = ratio(r["peak_mb"], first["peak_mb"]) if first else None
        if r.get("error"):
            r["grad_err"] = r["error"].split(":")[0]


def goal_lines(rows: list) -> list:
    """The targets for ``nimplicit gmres``, checked at the largest d and k."""
    out = []
    k_max = max(r["k"] for r in rows)
    for wrt in dict.fromkeys(r["wrt"] for r in rows):
        ours = [r for r in rows if r["wrt"] == wrt and r["method"] == "nimplicit gmres"
                and not r.get("error")]
        if not ours:
            continue
        d_max = max(r["d"] for r in ours)
        at = [r for r in ours if r["d"] == d_max and r["k"] == k_max][0]
        first = [r for r in ours if r["d"] == d_max and r["k"] == min(q["k"] for q in ours)][0]
        checks = [
            (f"VJP <= 2x our forward (k={first['k']})", first["bwd_over_fwd"], "{:.2f}x",
             first["bwd_over_fwd"] is not None and first["bwd_over_fwd"] <= 2),
            (f"VJP >= 10x faster than unrolled (k={k_max})", at["unrolled_bwd_over_bwd"], "{:.1f}x",
             at["unrolled_bwd_over_bwd"] is not None and at["unrolled_bwd_over_bwd"] >= 10),
            ("memory flat in k", at["mem_vs_kmin"], "{:.2f}x",
             at["mem_vs_kmin"] is not None and at["mem_vs_kmin"] <= 1.1),
            ("gradient error <= 1e-10", max(r["grad_err"] for r in ours), "{:.1e}",
             max(r["grad_err"] for r in ours) <= 1e-10),
        ]
        for what, value, fmt, ok in checks:
            shown = "-" if value is None else fmt.format(value)
            out.append(f"  [{'met' if ok else 'MISSED'}] wrt {WRT[wrt]}, d={d_max}: {what}: {shown}")
    return out


COLUMNS = [
    Column("wrt", lambda r: WRT[r["wrt"]]),
    Column("d", "d", "{:d}"),
    Column("k", "k", "{:d}"),
    Column("method", "method"),
    Column("fwd ms", "fwd_ms", "{:.3g}"),
    Column("bwd ms", "bwd_ms", "{:.3g}"),
    Column("bwd/fwd", "bwd_over_fwd", "{:.2f}x"),
    Column("unrolled bwd/bwd", "unrolled_bwd_over_bwd", "{:.2f}x"),
    Column("peak MB", "peak_mb", "{:.3g}"),
    Column("mem/mem(k=min)", "mem_vs_kmin", "{:.2f}x"),
    Column("grad err", "grad_err", "{:.1e}"),   # or the name of the error the method raised
]


# ------------------------------------------------------------------------------
# the issue-13 row: the generic node (linear_solver='auto') against jaxopt
# ------------------------------------------------------------------------------

#: goals of the "generic node" row: nimplicit auto fwd+bwd <= goal x jaxopt gmres fwd+bwd
GENERIC_GOALS = {10: 5.0, 100: 3.0, 1000: 1.0}


def _versions() -> dict:
    return package_versions("numpy", "scipy", "autograd", "jax", "jaxlib", "jaxopt")


def generic_row(sizes: list, k: int, rho: float, threads: int, clock: str, repeats: int,
                budget_s: float) -> dict:
    """fwd+bwd of ``nimplicit auto`` (and lu / gmres for context) against
    ``jaxopt gmres``, wrt (W, U, x), methods interleaved per size; medians of
    the per-repeat sums forward + backward and their ratios to jaxopt's."""
    with_jax = jax_available()
    chosen = [m for m in methods(with_jax) if m[0] in ("nimplicit auto", "nimplicit lu",
                                                         "nimplicit krylov_or_dense",
                                                         "nimplicit gmres", "jaxopt gmres")]
    load_before = os.getloadavg()
    rows = []
    for d in sizes:
        problem = make_problem(d, rho)
        reference = ift_gradient(problem)
        forwards = {name: make(problem, k, "all") for name, make, _ in chosen}
        errors = {name: gradient_error(f()(), reference) for name, f in forwards.items()}

        times = time_interleaved({n: _timed(f) for n, f in forwards.items()}, repeats=repeats,
                                 warmup=2, budget_s=budget_s, min_repeats=5, clock=clock)
        for name in forwards:
            fwd, bwd = times[name]["forward"], times[name]["backward"]
            total = [a + b for a, b in zip(fwd.samples, bwd.samples)]
            rows.append({"d": d, "k": k, "method": name, "grad_err": errors[name],
                         "fwd_ms": 1e3 * fwd.median, "bwd_ms": 1e3 * bwd.median,
                         "total_ms": 1e3 * statistics.median(total),
                         "total_min_ms": 1e3 * min(total), "repeats": len(total)})
    for r in rows:
        peer = [q for q in rows if q["d"] == r["d"] and q["method"] == "jaxopt gmres"]
        r["over_jaxopt"] = ratio(r["total_ms"], peer[0]["total_ms"]) if peer else None
    summary = []
    for d in sizes:
        ours = [r for r in rows if r["d"] == d and r["method"] == "nimplicit auto"][0]
        kod = [r for r in rows if r["d"] == d and r["method"] == "nimplicit krylov_or_dense"][0]
        goal = GENERIC_GOALS.get(d)
        summary.append({"d": d, "nimplicit_auto_ms": ours["total_ms"],
                        "krylov_or_dense_ms": kod["total_ms"],
                        "krylov_or_dense_ratio": kod["over_jaxopt"],
                        "jaxopt_gmres_ms": next((r["total_ms"] for r in rows if r["d"] == d
                                                 and r["method"] == "jaxopt gmres"), None),
                        "ratio": ours["over_jaxopt"], "goal_ratio": goal,
                        "met": (None if goal is None or ours["over_jaxopt"] is None
                                else ours["over_jaxopt"] <= goal)})
    return {"benchmark": "generic node (issue 13 item 4)",
            "problem": f"y = tanh(W y + U x), |W|_2 = {rho}, k = {k} forward iterations, "
                       f"loss sum(y^2), gradient wrt (W, U, x)",
            "clock": clock, "threads": threads, "krylov_rtol_jaxopt": KRYLOV_RTOL,
            "autograd_harness": HARNESS,
            "load_before": load_before, "load_after": os.getloadavg(),
            "machine": machine_info(), "versions": _versions(),
            "rows": rows, "summary": summary}


GENERIC_COLUMNS = [
    Column("d", "d", "{:d}"),
    Column("method", "method"),
    Column("fwd ms", "fwd_ms", "{:.3g}"),
    Column("bwd ms", "bwd_ms", "{:.3g}"),
    Column("fwd+bwd ms", "total_ms", "{:.3g}"),
    Column("/ jaxopt", "over_jaxopt", "{:.2f}x"),
    Column("grad err", "grad_err", "{:.1e}"),
]


def main_generic(args) -> int:
    sizes = args.sizes or [10, 100, 1000]
    k = args.iters[0]
    budget_s, repeats = (1.0, 7) if args.quick else (6.0, 31)
    result = generic_row(sizes, k, args.rho, args.threads, args.clock, repeats, budget_s)
    print(f"generic node: {result['problem']}; median {args.clock} ms of fwd+bwd, "
          f"{args.threads} thread(s); autograd harness {HARNESS}; load {result['load_before']} -> {result['load_after']}")
    print(format_table(result["rows"], GENERIC_COLUMNS, separator_key="d"))
    for s in result["summary"]:
        shown = "-" if s["ratio"] is None else f"{s['ratio']:.2f}x"
        state = "-" if s["met"] is None else ("met" if s["met"] else "MISSED")
        print(f"  [{state}] d={s['d']}: nimplicit auto / jaxopt gmres = {shown} "
              f"(goal <= {s['goal_ratio']}x)")
    path = args.json or os.path.join(ROOT, "benchmarks", "results",
                                     f"generic-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    result["command"] = "python benchmarks/implicit_vs_unrolled.py " + " ".join(sys.argv[1:])
    result["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(path, result)
    print(f"wrote {path}")
    bad = [r for r in result["rows"] if r["method"].startswith("nimplicit") and r["grad_err"] > 1e-8]
    return 1 if bad else 0


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="d in {10, 100} and at most 5 repeats per case")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="problem sizes d (default 10 100 1000; with --quick 10 100)")
    parser.add_argument("--iters", type=int, nargs="+", default=[50, 200],
                        help="forward iteration counts k (default 50 200)")
    parser.add_argument("--wrt", choices=["all", "x", "both"], default="both",
                        help="differentiate w.r.t. (W, U, x), only x, or both tables (default)")
    parser.add_argument("--rho", type=float, default=0.5,
                        help="spectral norm of W, a bound on the contraction factor (default 0.5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/XLA threads, fixed before NumPy is imported (default 1)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="time by process CPU time (default; robust on a shared machine) "
                             "or by wall-clock time")
    parser.add_argument("--no-jax", action="store_true", help="skip jaxopt even if it imports")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV to PATH")
    parser.add_argument("--generic", action="store_true",
                        help="only the issue-13 row: fwd+bwd of nimplicit auto vs jaxopt gmres, "
                             "wrt (W, U, x), k = the first --iters, d in --sizes (default 10 100 "
                             "1000); writes benchmarks/results/generic-<date>.json (or --json)")
    parser.add_argument("--harness", choices=["tuple", "roots"], default="tuple",
                        help="how autograd-based methods differentiate wrt (W, U, x): make_vjp "
                             "of a tuple (default, as a user writes it) or one root per "
                             "parameter (no sparse-add cost of autograd's tuples); see HARNESS")
    args = parser.parse_args(argv)
    global HARNESS
    HARNESS = args.harness
    if args.generic:
        return main_generic(args)
    sizes = args.sizes or ([10, 100] if args.quick else [10, 100, 1000])
    wrts = ["all", "x"] if args.wrt == "both" else [args.wrt]
    budget_s, max_repeats = (1.0, 5) if args.quick else (4.0, 21)
    with_jax = not args.no_jax and jax_available()

    fd_problem = make_problem(min(sizes), args.rho)
    reference_fd_error = check_reference(fd_problem)
    print(f"reference IFT gradient vs 4th-order central differences of the converged forward "
          f"(d={fd_problem.d}): relative error {reference_fd_error:.1e}")
    if not with_jax:
        print("jaxopt not measured (jax/jaxopt not installed, or --no-jax): pip install jax jaxopt")

    groups = [(wrt, d, k) for wrt in wrts for d in sizes for k in args.iters]
    problems, references, rows = {}, {}, []
    for wrt, d, k in progress(groups, desc="benchmark", unit="case", leave=False):
        if d not in problems:
            problems[d] = make_problem(d, args.rho)
            references[d] = ift_gradient(problems[d])
        reference = references[d] if wrt == "all" else references[d][2:]
        chosen = methods(with_jax)
        forwards = {name: make(problems[d], k, wrt) for name, make, _ in chosen}
        visible = {name: mem for name, _, mem in chosen}
        measured = measure_group(forwards, visible, reference, budget_s=budget_s,
                                 repeats=max_repeats, clock=args.clock)
        rows += [{"wrt": wrt, "d": d, "k": k, "method": name, **row}
                 for name, row in measured.items()]
    add_ratios(rows)

    print(f"\ny = tanh(W y + U x), |W|_2 = {args.rho}, loss sum(y^2); k forward iterations from "
          f"y = 0; Krylov rtol {KRYLOV_RTOL:g}; {args.threads} BLAS/XLA thread(s); median {args.clock} ms "
          f"of 3-{max_repeats} interleaved repeats;\npeak MB by tracemalloc over forward + backward (- for "
          f"XLA, invisible to it); grad err relative to the exact IFT gradient")
    print(format_table(rows, COLUMNS, separator_key="d"))
    print("\ngoals for nimplicit gmres:")
    print("\n".join(goal_lines(rows)))

    expected_refusal = {"nimplicit cg": "LinearSolveError"}
    ours_ok = True
    for r in rows:
        if not r["method"].startswith("nimplicit"):
            continue
        expected = expected_refusal.get(r["method"])
        if expected:
            ours_ok &= bool(r.get("error")) and r["error"].startswith(expected)
        else:
            ours_ok &= not r.get("error") and r["grad_err"] <= 1e-8
    shown = set()
    for r in rows:
        kind = (r["method"], r.get("error", "").split(":")[0])
        if r.get("error") and kind not in shown:    # once per method and error type
            shown.add(kind)
            print(f"{r['method']} (wrt {WRT[r['wrt']]}, d={r['d']}, k={r['k']}) raised {r['error']}")
    if args.json:
        write_json(args.json, {"benchmark": "implicit_vs_unrolled", "rho": args.rho,
                               "krylov_rtol": KRYLOV_RTOL, "threads": args.threads,
                               "reference_fd_error": reference_fd_error,
                               "machine": machine_info(), "rows": rows})
        print(f"wrote {args.json}")
    if args.csv:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    if not ours_ok:
        print("ERROR: a nimplicit gradient failed, is off the exact IFT gradient by more than "
              "1e-8, or nimplicit cg did not refuse the nonsymmetric system")
    return 0 if ours_ok else 1


if __name__ == "__main__":
    sys.exit(main())
