r"""The checker checks itself: seeded faulty derivatives must be flagged.

A *mutant* of a registered layer has the layer's exact forward values but a
corrupted VJP (mode ``"rev"``) or JVP (mode ``"fwd"``).  It is an autograd
primitive wrapping the entry's ``fn``; its derivative rules first compute the
true VJP/JVP with autograd, then corrupt them:

``scale``      every derivative times ``1 + 1e-4`` (the checker must resolve 1e-4);
``sign``       one input's derivative sign-flipped;
``transpose``  one input's leading square block (its ``k x k`` first entries,
               ``k = floor(sqrt(size))``; the whole matrix for a square input)
               transposed: the cotangent (reverse) or the tangent (forward);
``drop``       the dependence on one input dropped (zero derivative);
``perturb``    the derivative evaluated at a perturbed solution: every implicit
               layer's ``y*`` moved by a relative ``1e-3`` before the backward
               pass (for functions without implicit layers, the inputs are).

:func:`self_test` runs :func:`verification.check_grad` on the correct layer and
on every mutant for many seeded cases: every mutant must fail the check (in
the corrupted mode), every correct case must pass.  A mutant that does not
change the derivative on an instance (e.g. a transposed block that happens to
be symmetric) is *equivalent*, not a fault: it is counted separately.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as onp
from autograd import make_jvp, make_vjp
from autograd.extend import defjvp_argnums, defvjp_argnums, primitive
from nimplicit import implicit as _implicit

from .check import OutputLayout, check_grad, differentiable_argnums
from .registry import Entry, load_all

KINDS = ("scale", "sign", "transpose", "drop", "perturb")
MODES = ("rev", "fwd")
SCALE = 1e-4
PERTURBATION = 1e-3
EQUIVALENT_RTOL = 1e-9


def _square_block_transposed(a, k: int):
    flat = onp.array(onp.asarray(a, dtype=float).reshape(-1))
    block = flat[:k * k].reshape(k, k).T.copy()
    flat[:k * k] = block.ravel()
    return flat.reshape(onp.shape(a))


def _perturb(value, rng):
    """``value + 1e-3 (|value| + mean |value|) z``, ``z ~ N(0, 1)``: zeros move too."""
    if isinstance(value, (tuple, list)):
        return type(value)(_perturb(v, rng) for v in value)
    arr = onp.asarray(value, dtype=float)
    size = onp.abs(arr) + (onp.abs(arr).mean() if arr.size else 0.0) + 1e-300
    return arr + PERTURBATION * size * rng.standard_normal(arr.shape)


@contextlib.contextmanager
def perturbed_solutions(seed: int, hits: list):
    """Within the block, every implicit layer's forward solution ``y*`` is moved by a
    relative ``1e-3`` (its residual check off): derivatives are then taken at a
    wrong point.  ``hits`` receives one entry per perturbed layer call."""
    rng = onp.random.default_rng(seed)

    def intercept(layer, raw_inputs, solution):
        hits.append(layer)
        return _implicit.Solution(_perturb(solution.y, rng), solution.aux, solution.status)

    with _implicit.intercept_forward(intercept, check_residual=False):
        yield


def make_mutant(fn: Callable, inputs: Sequence[Any], kind: str, mode: str, *,
                argnums: Optional[Sequence[int]] = None, seed: int = 0) -> Optional[Callable]:
    """A copy of ``fn`` with the same values and a corrupted ``mode`` derivative.

    Mutants are first-order objects: their derivative rules work on raw
    values, so they are checked with ``order=1``.

    Returns ``None`` when the mutation does not apply (``transpose`` needs an
    input with at least 4 entries).  The corrupted input (for ``sign``,
    ``transpose``, ``drop``) is chosen by ``seed`` among ``argnums``.
    """
    if kind not in KINDS or mode not in MODES:
        raise ValueError(f"kind must be one of {KINDS} and mode one of {MODES}")
    argnums = differentiable_argnums(inputs) if argnums is None else list(argnums)
    rng = onp.random.default_rng(seed)
    candidates = [k for k in argnums if onp.size(inputs[k]) >= 4] if kind == "transpose" else argnums
    if not candidates:
        return None
    target = int(candidates[rng.integers(len(candidates))])
    block = int(onp.floor(onp.sqrt(onp.size(inputs[target]))))
    with _implicit.record_points() as points:
        layout = OutputLayout(fn(*inputs))
    _has_layers = bool(points)

    def flat_of(args):
        return layout.flatten(fn(*args))

    def selector(args, nums):
        def F(sel):
            full = list(args)
            for k, v in zip(nums, sel):
                full[k] = v
            return flat_of(full)
        return F, tuple(args[k] for k in nums)

    @contextlib.contextmanager
    def at_point():
        if kind != "perturb":
            yield
            return
        with perturbed_solutions(seed, []):
            yield

    def point_args(args):
        """The arguments the derivative is evaluated at (perturbed inputs when
        ``fn`` holds no implicit layer to perturb)."""
        if kind != "perturb" or _has_layers:
            return args
        fixed = onp.random.default_rng([seed, 2])      # the same perturbation at every call
        return [_perturb(a, fixed) if k in argnums else a for k, a in enumerate(args)]

    @primitive
    def flat_value(*args):
        return onp.asarray(flat_of(args), dtype=float)

    def vjp_maker(nums, ans, args, kwargs):
        with at_point():
            F, sel = selector(point_args(list(args)), nums)
            true_vjp = make_vjp(F)(sel)[0]

        def vjp(g):
            with at_point():
                grads = list(true_vjp(g))
            if mode == "rev":
                grads = [_corrupt(kind, k, target, gk, block) for k, gk in zip(nums, grads)]
            return tuple(grads)
        return vjp

    def jvp_maker(nums, dots, ans, args, kwargs):
        dots = list(dots)
        if mode == "fwd":
            dots = [_corrupt(kind, k, target, d, block) if kind != "scale" else d
                    for k, d in zip(nums, dots)]
        with at_point():
            F, sel = selector(point_args(list(args)), nums)
            out = make_jvp(F)(sel)(tuple(dots))[1]
        return out * (1.0 + SCALE) if (mode == "fwd" and kind == "scale") else out

    defvjp_argnums(flat_value, vjp_maker)
    defjvp_argnums(flat_value, jvp_maker)

    def mutant(*args):
        flat = flat_value(*args)
        parts = []
        for k, shape in enumerate(layout.shapes):
            piece = flat[layout.offsets[k]:layout.offsets[k + 1]]
            parts.append(piece.reshape(shape) if hasattr(piece, "reshape") else piece)
        return tuple(parts) if layout.is_tuple else parts[0]

    mutant.kind, mutant.mode, mutant.target = kind, mode, target
    return mutant


def _corrupt(kind: str, k: int, target: int, value, block: int):
    if kind == "scale":
        return value * (1.0 + SCALE)
    if k != target:
        return value
    if kind == "sign":
        return -value
    if kind == "drop":
        return 0.0 * value
    if kind == "transpose":
        return _as_kind(value, _square_block_transposed(value, block))
    return value   # "perturb" acts on the point, not on the value


def _as_kind(template, value):
    if isinstance(template, float):
        return float(value)
    return value


def mutant_distance(fn: Callable, mutant: Callable, inputs: Sequence[Any], mode: str,
                    argnums: Sequence[int], seed: int = 0) -> float:
    """Largest relative difference between the derivatives of ``fn`` and ``mutant``
    on random probes (0 means an equivalent mutant on this instance)."""
    rng = onp.random.default_rng(seed + 7919)
    worst = 0.0
    for i in argnums:
        def of(f):
            return lambda xi: OutputLayout(f(*inputs)).flatten(
                f(*[xi if k == i else a for k, a in enumerate(inputs)]))
        x = inputs[i]
        if mode == "rev":
            M = OutputLayout(fn(*inputs)).size
            u = rng.standard_normal(M)
            a = onp.asarray(make_vjp(of(fn))(x)[0](u), dtype=float)
            b = onp.asarray(make_vjp(of(mutant))(x)[0](u), dtype=float)
        else:
            v = rng.standard_normal(onp.shape(x))
            v = float(v) if isinstance(x, float) else v
            a = onp.asarray(make_jvp(of(fn))(x)(v)[1], dtype=float)
            b = onp.asarray(make_jvp(of(mutant))(x)(v)[1], dtype=float)
        scale = max(onp.abs(a).max(initial=0.0), onp.abs(b).max(initial=0.0), 1e-300)
        worst = max(worst, float(onp.abs(a - b).max(initial=0.0) / scale))
    return worst


# ------------------------------------------------------------------------------
# the self-test sweep
# ------------------------------------------------------------------------------

@dataclass
class MutantOutcome:
    kind: str
    mode: str
    caught: int = 0
    missed: int = 0
    equivalent: int = 0
    not_applicable: int = 0
    min_rel_error: float = float("inf")     # the smallest error that was caught
    missed_cases: List[int] = field(default_factory=list)


@dataclass
class SelfTestResult:
    layer: str
    cases: int = 0
    correct_passed: int = 0
    false_alarms: List[int] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    mutants: Dict[str, MutantOutcome] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def caught(self) -> int:
        return sum(m.caught for m in self.mutants.values())

    @property
    def missed(self) -> int:
        return sum(m.missed for m in self.mutants.values())

    @property
    def passed(self) -> bool:
        return not self.false_alarms and not self.missed and not self.errors

    def to_dict(self) -> Dict[str, Any]:
        return {"layer": self.layer, "cases": self.cases, "correct_passed": self.correct_passed,
                "false_alarms": self.false_alarms, "errors": self.errors,
                "caught": self.caught, "missed": self.missed, "seconds": self.seconds,
                "passed": self.passed,
                "mutants": {k: vars(m) for k, m in self.mutants.items()}}


def self_test_case(entry: Entry, case_seed: int, result: SelfTestResult, *,
                   kinds: Sequence[str] = KINDS, modes: Sequence[str] = MODES) -> None:
    """One seeded case of :func:`self_test`, accumulated into ``result``."""
    inputs = entry.generate(onp.random.default_rng(case_seed), **entry.size)
    argnums = list(entry.argnums) if entry.argnums is not None else differentiable_argnums(inputs)
    options = dict(argnums=argnums, seed=case_seed, rtol=entry.rtol, atol=entry.atol,
                   fd_step=entry.fd_step, noise=getattr(entry, "noise", None))
    cache: dict = {}
    result.cases += 1
    report = check_grad(entry.fn, *inputs, order=1, fd_cache=cache, **options)
    if report.passed:
        result.correct_passed += 1
    else:
        result.false_alarms.append(case_seed)
    for kind in kinds:
        for mode in modes:
            out = result.mutants.setdefault(f"{kind}/{mode}", MutantOutcome(kind, mode))
            mutant = make_mutant(entry.fn, inputs, kind, mode, argnums=argnums, seed=case_seed)
            if mutant is None:
                out.not_applicable += 1
                continue
            rep = check_grad(mutant, *inputs, order=1, modes=(mode,), fd_cache=cache, **options)
            if not rep.passed:
                out.caught += 1
                out.min_rel_error = min(out.min_rel_error, rep.worst_rel(mode, 1))
            elif mutant_distance(entry.fn, mutant, inputs, mode, argnums, case_seed) <= EQUIVALENT_RTOL:
                out.equivalent += 1      # the corruption changed nothing on this instance
            else:
                out.missed += 1
                out.missed_cases.append(case_seed)


def self_test(names: Optional[Sequence[str]] = None, cases: int = 200, seed: int = 0,
              progress: Optional[Callable[[int], None]] = None) -> List[SelfTestResult]:
    """Run the mutation self-test on the registered layers ``names`` (default all),
    on ``cases`` seeded cases each (seeds ``seed, seed + 1, ...``)."""
    registry = load_all()
    results = []
    for name in (names or sorted(registry)):
        entry = registry[name]
        res = SelfTestResult(layer=name)
        start = time.perf_counter()
        for c in range(cases):
            try:
                self_test_case(entry, seed + c, res)
            except Exception as exc:   # a crash is reported as a failure of the sweep
                res.errors.append(f"case {seed + c}: {type(exc).__name__}: {exc}")
            if progress is not None:
                progress(1)
        res.seconds = time.perf_counter() - start
        results.append(res)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m verification.mutants [NAME ...] [--cases N] [--seed S]``: run the
    self-test and print, per layer and in total, cases, false alarms, mutants
    caught, missed and equivalent; exit status 1 on any false alarm, miss or error."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m verification.mutants")
    parser.add_argument("names", nargs="*", help="registered layers (default: all)")
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = self_test(args.names or None, cases=args.cases, seed=args.seed)
    total = {"cases": 0, "false_alarms": 0, "caught": 0, "missed": 0, "equivalent": 0, "errors": 0}
    for r in results:
        eq = sum(m.equivalent for m in r.mutants.values())
        print(f"{r.layer}: {r.cases} cases, {len(r.false_alarms)} false alarms "
              f"{r.false_alarms[:5]}, {r.caught} mutants caught, {r.missed} missed, {eq} equivalent, "
              f"{len(r.errors)} errors ({r.seconds:.0f} s)")
        for key, value in (("cases", r.cases), ("false_alarms", len(r.false_alarms)),
                           ("caught", r.caught), ("missed", r.missed), ("equivalent", eq),
                           ("errors", len(r.errors))):
            total[key] += value
    print("TOTAL " + ", ".join(f"{k} {v}" for k, v in total.items()))
    return int(bool(total["false_alarms"] or total["missed"] or total["errors"]))


if __name__ == "__main__":
    raise SystemExit(main())
