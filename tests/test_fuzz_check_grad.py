"""Hostile inputs to verification.check_grad: bad options, functions whose
output is NaN, empty, complex or not differentiable, and inputs of hostile
dtypes and layouts (invariant: see tests/fuzz_harness.py).  A "documented
result" here is a report; its verdict must be right (a correct gradient
passes, a corrupted one fails), which the harness' ``grad`` hook asserts.
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.extend import defvjp, primitive

from fuzz_harness import (BAD_DTYPES, LAYOUTS, NONFINITE, as_dtype, case, hostile_tests,
                          put_nonfinite)
from verification import check_grad


def _f(x):
    return anp.sin(x) * anp.exp(0.3 * x)


@primitive
def _wrong(x):
    return anp.sin(x)


defvjp(_wrong, lambda ans, x: lambda g: 1.1 * g * anp.cos(x))


def _pick(draw, options, label):
    from hypothesis import strategies as st
    return draw(st.sampled_from(options), label=label)


def cg_options(rng, draw):
    opts = _pick(draw, ({"modes": ("bogus",)}, {"modes": ()}, {"order": 3}, {"n_directions": -1},
                        {"rtol": float("nan")}, {"atol": -1.0}, {"noise": float("nan")},
                        {"fd_step": -1e-3}, {"fd_levels": 0}, {"argnums": (5,)},
                        {"full_jacobian_max": -1}, {"modes": "rev"}), "options")
    x = rng.standard_normal(3)
    key = sorted(opts)[0]
    return case(lambda: check_grad(_f, x, **opts), must_raise=True, words=(key,),
                describe=f"check_grad({opts})")


def cg_bad_output(rng, draw):
    kind = _pick(draw, ("nan", "empty", "complex", "none", "string"), "kind")
    fn = {"nan": lambda x: x * np.nan, "empty": lambda x: x[:0],
          "complex": lambda x: x * (1 + 1j), "none": lambda x: None,
          "string": lambda x: "y"}[kind]
    x = rng.standard_normal(3)
    words = {"nan": ("nan", "finite"), "empty": ("no output", "empty", "entries")}.get(kind, ("output",))
    return case(lambda: check_grad(fn, x), must_raise=True, words=words,
                describe=f"check_grad of a function returning {kind}")


def cg_inputs(rng, draw):
    kind = _pick(draw, ("nan", "inf", "empty", "no-float") + BAD_DTYPES + tuple(LAYOUTS), "kind")
    x = rng.standard_normal(4)
    if kind in ("nan", "inf"):
        x = put_nonfinite(x, 1, np.nan if kind == "nan" else np.inf)
    elif kind == "empty":
        x = np.zeros(0)
    elif kind == "no-float":
        x = np.arange(3)
    elif kind in LAYOUTS:
        x = LAYOUTS[kind](x)
    else:
        x = as_dtype(x, kind)
    # a correct gradient must pass on every input check_grad accepts
    return case(lambda: check_grad(_f, x), grad=lambda report: report,
                describe=f"check_grad on a {kind} input")


def cg_verdict(rng, draw):
    """A wrong VJP (10 % off) must fail; at an extreme input scale too."""
    s = _pick(draw, (1e-8, 1.0, 1e8), "scale")
    x = rng.uniform(0.5, 1.0, 3) * (1.0 if s == 1.0 else 1.0)
    fn = (lambda x: _wrong(x * s) / s) if s != 1.0 else _wrong
    return case(lambda: check_grad(fn, x, modes=("rev",)),
                grad=lambda report: not report.passed, describe=f"check_grad verdict on a wrong VJP, scale {s:g}")


CHECK_GRAD = {"options": cg_options, "bad-output": cg_bad_output, "inputs": cg_inputs,
              "verdict": cg_verdict}
test_check_grad, test_check_grad_slow = hostile_tests("check_grad", CHECK_GRAD)
