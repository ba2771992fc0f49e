"""Hostile inputs to the core entry points: implicit_layer, fixed_point_layer,
argmin_layer, constrained_argmin_layer (see tests/fuzz_harness.py for the
invariant: a typed error naming the problem, or a finite result whose
gradient agrees with finite differences; never NaN, untyped, or a hang).
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
import pytest

import nimplicit
from nimplicit.errors import OptionError, ShapeError
from fuzz_harness import (BAD_DTYPES, LAYOUTS, NONFINITE, NONFINITE_WORDS, as_dtype, case,
                          dtype_case, grad_check, hostile_tests, nonfinite_case, put_nonfinite,
                          rescaled)

#: output accuracy the front-ends' default solvers document (tol=1e-12 on the
#: residual, gtol=1e-11 on the gradient): the finite differences' noise model
FRONT_END_NOISE = 1e-10

SCALES = (1e-150, 1e-8, 1e-4, 1e4, 1e8, 1e150)


def _pick(draw, options, label):
    from hypothesis import strategies as st
    return draw(st.sampled_from(options), label=label)


def _index(draw, n, label="index"):
    from hypothesis import strategies as st
    return draw(st.integers(0, max(n - 1, 0)), label=label)


def _one_input_builders(make_layer, make_x, name: str, first_output: bool = False):
    """The ``nan-inf`` and ``dtype`` builders of a front-end layer of one input
    ``x = make_x(rng)`` (:func:`fuzz_harness.nonfinite_case`, :func:`fuzz_harness.dtype_case`
    with the front-ends' noise; ``first_output``: check the gradient of ``layer(x)[0]``)."""
    def nonfinite(rng, draw):
        x = make_x(rng)
        return nonfinite_case(make_layer(), x, _index(draw, x.size), _pick(draw, NONFINITE, "value"),
                              name)

    def dtype(rng, draw):
        layer, x = make_layer(), make_x(rng)
        return dtype_case(layer, x, _pick(draw, BAD_DTYPES, "dtype"), name, noise=FRONT_END_NOISE,
                          differentiated=(lambda x: layer(x)[0]) if first_output else None)
    return nonfinite, dtype


# ------------------------------------------------------------------------------
# implicit_layer: the linear system F(y, A, b) = A y - b
# ------------------------------------------------------------------------------

def _linear_residual(y, A, b):
    return anp.dot(A, y) - b


def _linear_solver(A, b):
    return np.linalg.solve(np.asarray(A, dtype=float), np.asarray(b, dtype=float))


def _linear_layer(**options):
    return nimplicit.implicit_layer(_linear_residual, _linear_solver, **options)


def _well_conditioned(rng, n):
    A = rng.standard_normal((n, n)) + n * np.eye(n)
    return A, rng.standard_normal(n)


def _il_ok(rng, draw, A=None, b=None, **options):
    n = _index(draw, 4, "n") + 2
    if A is None:
        A, b = _well_conditioned(rng, n)
    layer = _linear_layer(**options)
    return case(lambda: layer(A, b), grad=lambda y: grad_check(layer, A, b),
                describe=f"implicit_layer A y = b, n={n}, options={options}")


def il_nonfinite(rng, draw):
    A, b = _well_conditioned(rng, 3)
    value, which = _pick(draw, NONFINITE, "value"), _pick(draw, ("A", "b"), "which")
    k = _index(draw, 9)
    A2, b2 = (put_nonfinite(A, k, value), b) if which == "A" else (A, put_nonfinite(b, k, value))
    layer = _linear_layer()
    return case(lambda: layer(A2, b2), words=NONFINITE_WORDS,
                describe=f"implicit_layer with {value} in {which}[{k}]")


def il_dtype(rng, draw):
    A, b = _well_conditioned(rng, 3)
    dtype, which = _pick(draw, BAD_DTYPES, "dtype"), _pick(draw, ("A", "b"), "which")
    A2, b2 = (as_dtype(A, dtype), b) if which == "A" else (A, as_dtype(b, dtype))
    layer = _linear_layer()
    # float16/32 and int inputs may be used as float64 (then the gradient must be right);
    # complex, object and bool must be refused or give a finite result
    grad = None if dtype in ("complex128", "object", "bool") else \
        (lambda y: grad_check(layer, np.asarray(A2, float), np.asarray(b2, float)))
    if dtype == "bool":
        grad = None
    return case(lambda: layer(A2, b2), grad=grad, must_raise=(dtype == "complex128"),
                describe=f"implicit_layer {which} as {dtype}")


def il_layout(rng, draw):
    A, b = _well_conditioned(rng, 4)
    how = _pick(draw, sorted(LAYOUTS), "layout")
    A2, b2 = LAYOUTS[how](A), LAYOUTS[how](b)
    layer = _linear_layer()
    return case(lambda: layer(A2, b2), grad=lambda y: grad_check(layer, A2, b2), must_succeed=True,
                describe=f"implicit_layer with {how} inputs")


def il_scale(rng, draw):
    A, b = _well_conditioned(rng, 3)
    s, t = _pick(draw, SCALES, "A scale"), _pick(draw, SCALES, "b scale")
    A2, b2 = A * s, b * t
    layer = _linear_layer()
    if abs(np.log10(t) - np.log10(s)) > 200:        # y = A^-1 b overflows or underflows: a typed error is fine
        return case(lambda: layer(A2, b2), describe=f"implicit_layer A*{s:g}, b*{t:g}")
    return case(lambda: layer(A2, b2), grad=lambda y: grad_check(rescaled(layer, (s, t), t / s), A, b),
                must_succeed=abs(np.log10(t) - np.log10(s)) <= 100, describe=f"implicit_layer A*{s:g}, b*{t:g}")


def il_empty(rng, draw):
    kind = _pick(draw, ("0x0", "empty-batch"), "kind")
    if kind == "0x0":
        A, b, opts = np.zeros((0, 0)), np.zeros(0), {}
    else:
        A, b, opts = np.zeros((0, 3, 3)), np.zeros((0, 3)), {"batch_axis": 0}
    layer = nimplicit.implicit_layer(lambda y, A, b: anp.einsum("...ij,...j->...i", A, y) - b,
                                     lambda A, b: np.zeros(b.shape), **opts)
    return case(lambda: layer(A, b), words=("empty", "0", "size", "entries", "instances"),
                describe=f"implicit_layer on {kind}")


def il_singular(rng, draw):
    n = 3
    A = np.ones((n, n))                                # rank one; b in its range
    b = A @ rng.standard_normal(n)
    layer = nimplicit.implicit_layer(_linear_residual, lambda A, b: np.linalg.lstsq(A, b, rcond=None)[0])
    return case(lambda: layer(A, b), grad=lambda y: grad_check(layer, A, b), must_raise=False,
                words=("singular", "condition", "rank"),
                describe="implicit_layer with a singular J (lstsq forward)")


def il_wrong_solver(rng, draw):
    A, b = _well_conditioned(rng, 3)
    kind = _pick(draw, ("nan", "shape", "off-by-1e-2-big-input", "none"), "kind")
    if kind == "nan":
        solver, words = (lambda A, b: np.full(3, np.nan)), NONFINITE_WORDS
    elif kind == "shape":
        solver, words = (lambda A, b: np.zeros(4)), ("shape", "entries", "size")
    elif kind == "none":
        solver, words = (lambda A, b: None), ()
    else:
        # defect 4: an unrelated huge input must not hide a residual of 1e-2
        def residual(y, x, c):
            return y - x + 0.0 * anp.sum(c)
        layer = nimplicit.implicit_layer(residual, lambda x, c: x + 1e-2)
        x, c = rng.standard_normal(3), np.full(3, 1e5)
        return case(lambda: layer(x, c), must_raise=True, words=("residual",),
                    describe="solver off by 1e-2 with an unrelated input of 1e5")
    layer = nimplicit.implicit_layer(_linear_residual, solver)
    return case(lambda: layer(A, b), must_raise=True, words=words,
                describe=f"implicit_layer with a solver returning {kind}")


def il_coupled_batch(rng, draw):
    """Defect 3: a residual coupling the instances of batch_axis must be refused."""
    B = _index(draw, 3, "B") + 2
    x = rng.standard_normal((B, 2))
    c = 0.1

    def residual(y, x):
        return y - x - c * anp.sum(y, axis=0, keepdims=True)

    def solver(x):
        S = x.sum(axis=0) / (1 - c * x.shape[0])
        return x + c * S

    layer = nimplicit.implicit_layer(residual, solver, batch_axis=0)
    # the forward is right; the block-diagonal backward is not: typed error or a right gradient
    return case(lambda: layer(x), grad=lambda y: grad_check(layer, x),
                words=("coupl", "independent", "instance"),
                describe=f"batch_axis=0 with a residual coupling {B} instances")


def il_mixed_batch(rng, draw):
    B = 3
    A = np.stack([_well_conditioned(rng, 3)[0] for _ in range(B)])
    b = rng.standard_normal((B, 3))
    bad = _index(draw, B, "bad instance")
    kind = _pick(draw, ("nan", "singular"), "kind")
    if kind == "nan":
        b[bad, 0] = np.nan
    else:
        A[bad] = 0.0

    def solver(A, b):
        return np.stack([np.linalg.lstsq(Ai, bi, rcond=None)[0] for Ai, bi in zip(A, b)])

    layer = nimplicit.implicit_layer(lambda y, A, b: anp.einsum("bij,bj->bi", A, y) - b, solver,
                                     batch_axis=0)
    return case(lambda: anp.sum(__import__("autograd").grad(lambda b: anp.sum(layer(A, b)))(b)),
                must_raise=True, words=("instance", str(bad)) if kind == "nan" else ("instance", "singular"),
                describe=f"batch with instance {bad} {kind}")


def il_options(rng, draw):
    A, b = _well_conditioned(rng, 3)
    opts = _pick(draw, (
        {"linear_solver": "bogus"}, {"residual_tol": float("nan")}, {"residual_tol": -1.0},
        {"dense_max": -3}, {"batch_axis": 5}, {"ridge": -1.0}, {"ridge": float("nan")},
        {"linear_solver_options": {"bogus": 1}}, {"linear_solver": "lu", "linear_solver_options": {"rtol": -1}},
        {"residual_tol": "small"}, {"batch_axis": 1.5}, {"check_residual": "yes"},
        {"batch_axis": "0"}, {"batch_axis": True}, {"batch_axis": -3}), "options")
    key = sorted(opts)[-1] if "linear_solver_options" in opts else sorted(opts)[0]

    def call():
        layer = _linear_layer(**opts)
        return anp.sum(__import__("autograd").grad(lambda b: anp.sum(layer(A, b)))(b))
    words = (key,) if key != "linear_solver_options" else ("bogus", "rtol", "option")
    return case(call, must_raise=True, words=words, describe=f"implicit_layer({opts})")


IMPLICIT = {"nan-inf": il_nonfinite, "dtype": il_dtype, "layout": il_layout, "scale": il_scale,
            "empty": il_empty, "singular-J": il_singular, "bad-solver": il_wrong_solver,
            "coupled-batch": il_coupled_batch, "mixed-batch": il_mixed_batch, "options": il_options}
test_implicit_layer, test_implicit_layer_slow = hostile_tests("implicit_layer", IMPLICIT)


# ------------------------------------------------------------------------------
# fixed_point_layer: y = 0.5 tanh(y) + x
# ------------------------------------------------------------------------------

def _contraction(y, x):
    return 0.5 * anp.tanh(y) + x


def _fp_layer(**kw):
    return nimplicit.fixed_point_layer(_contraction, y0=lambda x: np.zeros(np.shape(x)), **kw)


fp_nonfinite, fp_dtype = _one_input_builders(_fp_layer, lambda rng: rng.standard_normal(4),
                                              "fixed_point_layer")


def fp_scale(rng, draw):
    s = _pick(draw, SCALES, "scale")
    x0 = rng.standard_normal(4)
    layer = _fp_layer()
    return case(lambda: layer(s * x0),
                grad=lambda y: grad_check(rescaled(layer, (s,), s), x0, noise=FRONT_END_NOISE),
                describe=f"fixed_point_layer x*{s:g}")


def fp_layout(rng, draw):
    how = _pick(draw, sorted(LAYOUTS), "layout")
    x = LAYOUTS[how](rng.standard_normal((2, 3)))
    layer = _fp_layer()
    return case(lambda: layer(x), grad=lambda y: grad_check(layer, x, noise=FRONT_END_NOISE),
                must_succeed=True, describe=f"fixed_point_layer {how} x")


def fp_no_fixed_point(rng, draw):
    kind = _pick(draw, ("translation", "expanding"), "kind")
    T = (lambda y, x: y + 1.0 + 0.0 * x) if kind == "translation" else (lambda y, x: 3.0 * anp.sinh(y) + x)
    layer = nimplicit.fixed_point_layer(T, y0=lambda x: np.zeros(np.shape(x)), max_iter=200)
    x = rng.standard_normal(3)
    return case(lambda: layer(x), grad=lambda y: grad_check(layer, x, noise=FRONT_END_NOISE),
                must_raise=(kind == "translation"), words=("converge", "fixed point", "contraction",
                                                           "residual", "iteration"),
                describe=f"fixed_point_layer without a (contractive) fixed point: {kind}")


def fp_options(rng, draw):
    opts = _pick(draw, ({"max_iter": -1}, {"tol": float("nan")}, {"tol": -1.0}, {"memory": 0},
                        {"memory": -2}, {"max_iter": 2.5},
                        {"residual_tol": float("nan")}), "options")
    x = rng.standard_normal(4)
    key = sorted(opts)[0]
    kw = dict(opts)
    kw.setdefault("y0", lambda x: np.zeros(np.shape(x)))
    return case(lambda: nimplicit.fixed_point_layer(_contraction, **kw)(x), must_raise=True,
                words=(key, "shape"), describe=f"fixed_point_layer({opts})")


FIXED_POINT = {"nan-inf": fp_nonfinite, "dtype": fp_dtype, "scale": fp_scale, "layout": fp_layout,
               "no-fixed-point": fp_no_fixed_point, "options": fp_options}
test_fixed_point_layer, test_fixed_point_layer_slow = hostile_tests("fixed_point_layer", FIXED_POINT)


# ------------------------------------------------------------------------------
# argmin_layer: min_y |y - x|^2 + 0.1 |y|_4^4
# ------------------------------------------------------------------------------

def _objective(y, x):
    return anp.sum((y - x) ** 2) + 0.1 * anp.sum(y ** 4)


def _am_layer(objective=_objective, **kw):
    kw.setdefault("y0", lambda x: np.zeros(np.shape(x)))
    return nimplicit.argmin_layer(objective, **kw)


am_nonfinite, am_dtype = _one_input_builders(_am_layer, lambda rng: rng.standard_normal(3),
                                              "argmin_layer")


def am_scale(rng, draw):
    """The objective rescaled by s: the argmin does not move."""
    s = _pick(draw, (1e-4, 1e-2, 1e2, 1e4), "objective scale")
    layer = _am_layer(lambda y, x: s * _objective(y, x))
    x = rng.standard_normal(3)
    return case(lambda: layer(x), grad=lambda y: grad_check(layer, x, noise=FRONT_END_NOISE),
                must_succeed=True, describe=f"argmin_layer objective*{s:g}")


def am_stationary_max(rng, draw):
    """Defect 2: started at a stationary maximum or saddle, it must refuse."""
    kind = _pick(draw, ("maximum", "saddle"), "kind")
    if kind == "maximum":
        obj = lambda y, x: -anp.sum(y ** 2) + 0.0 * anp.sum(x)
    else:
        obj = lambda y, x: y[0] ** 2 - y[1] ** 2 + 0.0 * anp.sum(x)
    layer = nimplicit.argmin_layer(obj, y0=lambda x: np.zeros(2))
    x = rng.standard_normal(2)
    return case(lambda: layer(x), must_raise=True,
                words=("minimum", "maximum", "saddle", "positive definite", "hessian", "indefinite"),
                describe=f"argmin_layer started at a stationary {kind}")


def am_unbounded(rng, draw):
    layer = _am_layer(lambda y, x: anp.sum(x * y))
    x = rng.uniform(0.5, 1.0, 3)
    return case(lambda: layer(x), must_raise=True, describe="argmin_layer of an unbounded linear objective")


def am_options(rng, draw):
    opts = _pick(draw, ({"method": "bogus"}, {"gtol": float("nan")}, {"gtol": -1.0},
                        {"max_iter": -5}, {"max_iter": 0}), "options")
    x = rng.standard_normal(3)
    key = sorted(opts)[0]
    return case(lambda: _am_layer(**opts)(x), must_raise=True, words=(key, "bogus"),
                describe=f"argmin_layer({opts})")


ARGMIN = {"nan-inf": am_nonfinite, "dtype": am_dtype, "scale": am_scale,
          "non-convex": am_stationary_max, "unbounded": am_unbounded, "options": am_options}
test_argmin_layer, test_argmin_layer_slow = hostile_tests("argmin_layer", ARGMIN)


# ------------------------------------------------------------------------------
# constrained_argmin_layer: min 1/2 |y - x|^2 s.t. y <= 1 (and variants)
# ------------------------------------------------------------------------------

def _proj_objective(y, x):
    return 0.5 * anp.sum((y - x) ** 2)


def _box(y, x):
    return y - 1.0


def _ca_layer(ineq=_box, eq=None, objective=_proj_objective, **kw):
    kw.setdefault("y0", lambda x: np.zeros(np.shape(x)))
    return nimplicit.constrained_argmin_layer(objective, eq=eq, ineq=ineq, **kw)


def _strict_x(rng, n=3):
    """x whose projection onto y <= 1 has every constraint strictly active or strictly inactive."""
    x = rng.uniform(-1.0, 3.0, n)
    x[np.abs(x - 1.0) < 0.3] += 0.6
    return x


ca_nonfinite, ca_dtype = _one_input_builders(_ca_layer, _strict_x, "constrained_argmin_layer",
                                              first_output=True)


def ca_scale(rng, draw):
    """Objective scaled by s and each constraint row by t: y does not move (defect 1's sibling)."""
    s, t = _pick(draw, (1e-4, 1.0, 1e4), "objective scale"), _pick(draw, (1e-4, 1.0, 1e4), "row scale")
    layer = _ca_layer(ineq=lambda y, x: t * (y - 1.0), objective=lambda y, x: s * _proj_objective(y, x))
    x = _strict_x(rng)
    return case(lambda: layer(x),
                grad=lambda z: grad_check(lambda x: layer(x)[0], x, noise=FRONT_END_NOISE),
                must_succeed=True, describe=f"constrained_argmin_layer objective*{s:g}, rows*{t:g}, x={x}")


def ca_infeasible(rng, draw):
    """Defect 2: contradicting inequalities must not return a point."""
    layer = _ca_layer(ineq=lambda y, x: anp.stack([y[0] - 1.0, 2.0 - y[0]]) + 0.0 * anp.sum(x))
    x = rng.standard_normal(2)
    return case(lambda: layer(x), must_raise=True, words=("infeasib", "feasib", "violat"),
                describe="constrained_argmin_layer with y0 <= 1 and y0 >= 2")


def ca_bad_multipliers(rng, draw):
    """Defect 2: a user's solver returning a negative inequality multiplier."""
    x = np.array([2.0, 0.0, 3.0])

    def solver(x):
        y = np.minimum(x, 1.0)
        nu = np.where(x > 1.0, -(x - 1.0), 0.0)           # the sign is wrong
        return (y, np.zeros(0), nu)

    layer = nimplicit.constrained_argmin_layer(_proj_objective, ineq=_box, solver=solver)
    return case(lambda: layer(x), must_raise=True, words=("multiplier", "dual", "negative", "nu"),
                describe="constrained_argmin_layer with a solver returning nu < 0")


def ca_weakly_active(rng, draw):
    x = np.array([1.0, 0.0, 2.0])                          # x_0 exactly on the constraint
    layer = _ca_layer()
    return case(lambda: layer(x), describe="constrained_argmin_layer, weakly active constraint")


def ca_options(rng, draw):
    opts = _pick(draw, ({"tol": float("nan")}, {"tol": -1.0}, {"active_tol": float("nan")},
                        {"weak_tol": -1.0}, {"max_iter": -1}, {"linear_solver": "bogus"}), "options")
    x = _strict_x(rng)
    key = sorted(opts)[0]
    return case(lambda: _ca_layer(**opts)(x), must_raise=True, words=(key, "bogus"),
                describe=f"constrained_argmin_layer({opts})")


CONSTRAINED = {"nan-inf": ca_nonfinite, "dtype": ca_dtype, "scale": ca_scale,
               "infeasible": ca_infeasible, "bad-multipliers": ca_bad_multipliers,
               "weakly-active": ca_weakly_active, "options": ca_options}
test_constrained_argmin_layer, test_constrained_argmin_layer_slow = hostile_tests(
    "constrained_argmin_layer", CONSTRAINED)


@pytest.mark.parametrize("batch_axis, error, words", [
    (5, ShapeError, ("batch_axis=5", "ndim 2")), (-3, ShapeError, ("batch_axis=-3", "ndim 2")),
    (1.5, OptionError, ("1.5", "float")), ("0", OptionError, ("'0'", "str")),
    (True, OptionError, ("True", "bool"))])
def test_structure_refuses_a_bad_batch_axis(batch_axis, error, words):
    """Structure names the bad batch_axis and the value's ndim (or the wrong type)."""
    from nimplicit.structure import Structure
    with pytest.raises(error) as info:
        Structure(np.ones((2, 3)), batch_axis, "the solver's output")
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("batch_axis", [0, 1, -1, -2, np.int64(1)])
def test_structure_accepts_every_axis_in_range(batch_axis):
    from nimplicit.structure import Structure
    s = Structure(np.ones((2, 3)), batch_axis)
    assert s.batch_size == (2, 3)[int(batch_axis) % 2]


def test_the_docs_bad_input_table_is_generated_from_its_results_file():
    """docs/_generated/bad_input_table.inc is benchmarks.fuzz_counts.rst_table of
    the results file it names (no hand-copied counts), and that file has 0 failures."""
    import json
    import os
    import re

    from benchmarks.fuzz_counts import ROOT, rst_table
    with open(os.path.join(ROOT, "docs", "_generated", "bad_input_table.inc")) as fh:
        table = fh.read()
    source = re.search(r"--rst from (\S+);", table.splitlines()[0]).group(1)
    with open(os.path.join(ROOT, source)) as fh:
        results = json.load(fh)
    results["source"] = source
    assert rst_table(results) == table
    assert not results["failures"] and "FAILURE" not in table


def test_rst_table_names_typed_errors_documented_results_and_failures():
    from benchmarks.fuzz_counts import rst_table
    results = {"command": "c", "commit": "0123456789ab", "date": "d", "per_class": 2,
               "classes": {"f": {"options": {"typed": 2}, "scale": {"documented": 1, "failure:nan": 1}}},
               "errors": {"f": {"options": {"OptionError": 2}}}}
    table = rst_table(results)
    assert "``OptionError`` 2" in table and "documented result 1" in table
    assert "**FAILURE nan** 1" in table and "4 examples, 1 failure(s)" in table
