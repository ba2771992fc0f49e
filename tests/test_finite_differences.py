"""Tests for verification.finite_differences.

Every accuracy test checks two things against a known derivative:
the estimate is accurate, and the returned error estimate bounds the true
error elementwise (and is not absurdly loose).  Reference derivatives are
computed analytically in float64, so they carry a few ulps of rounding
themselves; the bound check allows for that (``REF_SLACK``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verification.finite_differences import (
    DEFAULT_FLOOR,
    FDResult,
    directional_derivative,
    entry_scales,
    jacobian,
)

EPS = np.finfo(float).eps
REF_SLACK = 8 * EPS  # relative rounding allowed in the float64 reference derivatives
BASE = EPS ** (1 / 3)  # default relative step of the central method


def as_tuple(a):
    return a if isinstance(a, tuple) else (a,)


def check(res: FDResult, exact, *, rtol: float, scale=None, loose: float = 1e3,
          eps: float = EPS) -> None:
    """Accuracy, bound and looseness checks for every array of ``res``.

    ``scale`` is the natural size of the derivative entries (default
    ``|exact|``); the estimate must satisfy
    ``error <= loose * max(true_error, eps**(2/3) * scale)``.
    """
    values, errors, exacts = as_tuple(res.value), as_tuple(res.error), as_tuple(exact)
    scales = as_tuple(scale) if scale is not None else (None,) * len(exacts)
    assert len(values) == len(errors) == len(exacts)
    for value, error, ex, sc in zip(values, errors, exacts, scales):
        ex = np.asarray(ex, dtype=float)
        assert isinstance(value, np.ndarray) and isinstance(error, np.ndarray)
        assert value.shape == error.shape == ex.shape
        assert np.all(np.isfinite(error)) and np.all(error >= 0)
        true_err = np.abs(value - ex)
        sc = np.abs(ex) if sc is None else np.broadcast_to(np.asarray(sc, dtype=float), ex.shape)
        assert np.all(true_err <= rtol * sc), f"inaccurate: {true_err} vs {rtol} * {sc}"
        assert np.all(true_err <= error + REF_SLACK * np.abs(ex)), (
            f"error estimate {error} does not bound the true error {true_err}"
        )
        assert np.all(error <= loose * np.maximum(true_err, eps ** (2 / 3) * sc)), (
            f"error estimate {error} too loose for true error {true_err}"
        )


# ---------------------------------------------------------------------------
# entry_scales
# ---------------------------------------------------------------------------


def test_entry_scales():
    x = np.array([[1e8, -1e-8], [0.0, -3.5]])
    assert DEFAULT_FLOOR == 1.0
    np.testing.assert_array_equal(entry_scales(x), [[1e8, 1.0], [1.0, 3.5]])
    np.testing.assert_array_equal(entry_scales(x, floor=1e-12), [[1e8, 1e-8], [1e-12, 3.5]])
    assert entry_scales(-2.0).shape == () and entry_scales(-2.0) == 2.0
    assert entry_scales(0).dtype == np.float64
    for bad in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError):
            entry_scales(x, floor=bad)


# ---------------------------------------------------------------------------
# Scalar functions with known derivatives
# ---------------------------------------------------------------------------

SCALAR_CASES = [
    ("cubic", lambda x: 2 * x**3 - x**2 + 3 * x - 5, lambda x: 6 * x**2 - 2 * x + 3,
     [-2.0, 0.0, 0.7, 13.0]),
    ("quintic", lambda x: x**5 - 4 * x, lambda x: 5 * x**4 - 4, [-1.3, 0.0, 0.2, 2.5]),
    ("exp", np.exp, np.exp, [-3.0, 0.0, 1.0, 20.0]),
    ("sin", np.sin, np.cos, [-2.0, 0.0, 1.5707963267948966, 4.0]),
    ("cos", np.cos, lambda x: -np.sin(x), [-1.0, 0.0, 3.0]),
    ("log", np.log, lambda x: 1 / x, [1e-3, 0.5, 1.0, 7.0, 1e6]),
    ("sqrt", np.sqrt, lambda x: 0.5 / np.sqrt(x), [0.01, 2.0, 1e4]),
    ("tanh", np.tanh, lambda x: 1 / np.cosh(x) ** 2, [-2.0, 0.0, 0.5]),
    ("exp_sin", lambda x: np.exp(np.sin(3 * x)),
     lambda x: 3 * np.cos(3 * x) * np.exp(np.sin(3 * x)), [-0.4, 0.9]),
]


@pytest.mark.parametrize("name,f,df,points", SCALAR_CASES, ids=[c[0] for c in SCALAR_CASES])
def test_scalar_functions(name, f, df, points):
    for x in points:
        exact = df(x)
        scale = abs(exact) + abs(f(x)) / max(abs(x), 1.0)
        for levels in (2, 3):
            res = directional_derivative(f, x, 1.0, levels=levels)
            check(res, exact, rtol=1e-9, scale=scale)
            assert res.value.shape == () and res.n_evals >= 2 * levels
        check(jacobian(f, x), exact, rtol=1e-9, scale=scale)
        # direction scaling: J (c v) = c J v
        check(directional_derivative(f, x, -2.5), -2.5 * exact, rtol=1e-9, scale=2.5 * scale)


def test_input_kinds_python_float_and_0d():
    seen = []

    def f(x):
        seen.append(type(x))
        return x * x * x

    res = directional_derivative(f, 2.0, 1.0)
    assert set(seen) == {float}  # a Python float in, Python floats to f
    assert isinstance(res.value, np.ndarray) and res.value.shape == ()
    check(res, 12.0, rtol=1e-12)

    seen.clear()
    res = jacobian(f, np.array(2.0))
    assert set(seen) == {np.ndarray}
    assert res.value.shape == ()
    check(res, 12.0, rtol=1e-12)

    # integer input is converted to float
    check(jacobian(lambda x: x**2, 3), 6.0, rtol=1e-12)


def test_cubic_is_exact_after_extrapolation():
    # Central differences of a cubic have only a t**2 error term, which one
    # Richardson step removes: what is left is rounding.
    res = jacobian(lambda x: x**3, 1.5)
    check(res, 6.75, rtol=1e-10)
    assert res.error <= 1e-9 * 6.75


def test_levels_and_evaluation_counts():
    f = lambda x: np.array([np.sin(x[0]) * x[1], np.exp(x[2])])
    x = np.array([1.3, 1.2, -2.7])
    for levels in (2, 3, 4):
        res = jacobian(f, x, levels=levels)
        assert res.n_evals == 2 * levels * x.size
    res = directional_derivative(f, x, np.ones(3), levels=3)
    assert res.n_evals == 6
    # nonzero entries below the floor (1/2 of it: steps are powers of two)
    # get a second stencil with a step proportional to themselves
    x = np.array([0.3, 1.2, -0.2])
    assert jacobian(f, x).n_evals == 4 * (2 + 1 + 2)
    assert jacobian(f, x, floor=1e-12).n_evals == 4 * 3
    assert jacobian(f, np.zeros(3)).n_evals == 4 * 3


# ---------------------------------------------------------------------------
# Vector maps, matrix inputs, tuple outputs
# ---------------------------------------------------------------------------


def vec_map(x):
    return np.array(
        [x[0] * x[1] * x[2], np.sin(x[0]) + x[1] ** 2, np.exp(x[1] - x[2]) * np.log(x[0])]
    )


def vec_map_jac(x):
    e = np.exp(x[1] - x[2])
    return np.array(
        [
            [x[1] * x[2], x[0] * x[2], x[0] * x[1]],
            [np.cos(x[0]), 2 * x[1], 0.0],
            [e / x[0], e * np.log(x[0]), -e * np.log(x[0])],
        ]
    )


def test_vector_map_jacobian_and_directional():
    x = np.array([1.3, -0.4, 2.2])
    exact = vec_map_jac(x)
    scale = np.abs(vec_map(x))[:, None] + np.abs(exact)
    res = jacobian(vec_map, x)
    assert res.value.shape == (3, 3)
    check(res, exact, rtol=1e-9, scale=scale)

    rng = np.random.default_rng(0)
    for _ in range(5):
        v = rng.normal(size=3)
        res = directional_derivative(vec_map, x, v)
        check(res, exact @ v, rtol=1e-9, scale=scale @ np.abs(v))


def test_matrix_input():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3, 3)) + 3 * np.eye(3)

    # f(X) = X @ X: d(XX)_ij / dX_kl = delta_ik X_lj + X_ik delta_jl
    eye = np.eye(3)
    exact = np.einsum("ik,lj->ijkl", eye, X) + np.einsum("ik,jl->ijkl", X, eye)
    res = jacobian(lambda A: A @ A, X)
    assert res.value.shape == (3, 3, 3, 3)
    check(res, exact, rtol=1e-9, scale=np.abs(exact) + 10)
    # flattened-friendly: reshape gives the Jacobian of the flattened map
    assert res.value.reshape(9, 9).shape == (9, 9)

    # scalar function of a matrix: d log|det X| / dX = inv(X).T
    res = jacobian(lambda A: np.linalg.slogdet(A)[1], X)
    check(res, np.linalg.inv(X).T, rtol=1e-9, scale=np.abs(np.linalg.inv(X)).max())

    V = rng.normal(size=(3, 3))
    res = directional_derivative(lambda A: A @ A, X, V)
    check(res, X @ V + V @ X, rtol=1e-9, scale=np.abs(X) @ np.abs(V) + np.abs(V) @ np.abs(X))


def tuple_map(x):
    return (np.sum(x**2), np.array([np.sin(x[0]), x[0] * x[1]]), np.outer(x, x))


def tuple_map_jac(x):
    j_outer = np.einsum("ik,j->ijk", np.eye(2), x) + np.einsum("i,jk->ijk", x, np.eye(2))
    return (2 * x, np.array([[np.cos(x[0]), 0.0], [x[1], x[0]]]), j_outer)


def test_tuple_outputs():
    x = np.array([0.8, -1.7])
    res = jacobian(tuple_map, x)
    assert isinstance(res.value, tuple) and isinstance(res.error, tuple)
    assert [v.shape for v in res.value] == [(2,), (2, 2), (2, 2, 2)]
    exact = tuple_map_jac(x)
    check(res, exact, rtol=1e-9, scale=tuple(np.abs(e) + 1 for e in exact))

    v = np.array([0.5, 2.0])
    res = directional_derivative(tuple_map, x, v)
    assert [a.shape for a in res.value] == [(), (2,), (2, 2)]
    exact_v = tuple(e @ v for e in exact)
    check(res, exact_v, rtol=1e-9, scale=tuple(np.abs(e) + 1 for e in exact_v))

    # lists are treated like tuples; a scalar function of a float input
    res = jacobian(lambda t: [t**2, np.array([t, 3 * t])], 1.5)
    check(res, (3.0, np.array([1.0, 3.0])), rtol=1e-12)


def test_zero_direction():
    res = directional_derivative(vec_map, np.array([1.0, 2.0, 3.0]), np.zeros(3))
    assert res.n_evals == 1
    np.testing.assert_array_equal(res.value, 0.0)
    np.testing.assert_array_equal(res.error, 0.0)


# ---------------------------------------------------------------------------
# Badly scaled inputs
# ---------------------------------------------------------------------------


def test_step_is_proportional_to_entry_scales():
    for floor in (DEFAULT_FLOOR, 1e-12, 1e3):
        x = np.array([1e8, 3.0, -2e-3, 1e-8, 0.0])
        scales = entry_scales(x, floor)
        points = []

        def f(z):
            points.append(z.copy())
            return np.sum(z**2)

        jacobian(f, x, floor=floor, levels=2)
        for j in range(x.size):
            moved = [p - x for p in points if np.any(p != x) and np.all(np.delete(p - x, j) == 0)]
            # the first stencil of column j: x + t e_j, x - t e_j, x +- t/2 e_j
            t0 = moved[0][j]
            assert BASE / 2 <= t0 / scales[j] <= BASE
            assert [m[j] for m in moved[:4]] == [t0, -t0, t0 / 2, -t0 / 2]


@pytest.mark.parametrize("x", [np.array([1e8, 1e-8]), np.array([1e-8, 1e8])])
def test_badly_scaled_product(x):
    res = jacobian(lambda z: z[0] * z[1], x)
    exact = np.array([x[1], x[0]])
    check(res, exact, rtol=1e-9)
    v = np.array([1.0, 0.0])
    check(directional_derivative(lambda z: z[0] * z[1], x, v), x[1], rtol=1e-9)


def test_badly_scaled_vector_maps():
    # natural size of J_ij: |J_ij| + |f_i| / |x_j| (steps are ~ |x_j|)
    x = np.array([1e8, 1e-8])
    f = lambda z: np.array([z[0] ** 2, np.sin(z[1] * 1e-8)])
    exact = np.array([[2e8, 0.0], [0.0, 1e-8 * np.cos(1e-16)]])
    scale = np.abs(exact) + np.abs(f(x))[:, None] / x
    check(jacobian(f, x), exact, rtol=1e-9, scale=scale)

    x = np.array([1e-8, 1e8])
    f = lambda z: np.array([z[0] ** 2, np.sin(z[1] * 1e-8), np.sin(z[0] * 1e8)])
    exact = np.array([[2e-8, 0.0], [0.0, 1e-8 * np.cos(1.0)], [1e8 * np.cos(1.0), 0.0]])
    scale = np.abs(exact) + np.abs(f(x))[:, None] / x
    check(jacobian(f, x), exact, rtol=1e-9, scale=scale)


def test_badly_scaled_domain_limited_functions():
    # log and 1/x at 1e-8: the floor-based step would cross 0; the estimate
    # must fall back / adapt to steps proportional to the entry itself.
    x = np.array([1e8, 1e-8])
    # natural size of J_ij: |J_ij| + |f_i| / |x_j|  (the steps are ~ |x_j|)
    scale = np.diag(1 / x) + np.abs(np.log(x))[:, None] / x
    check(jacobian(np.log, x), np.diag(1 / x), rtol=1e-9, scale=scale)
    scale = np.diag(1 / x**2) + np.abs(1 / x)[:, None] / x
    check(jacobian(lambda z: 1 / z, x), np.diag(-1 / x**2), rtol=1e-9, scale=scale)
    check(jacobian(np.sqrt, 1e-8), 0.5e4, rtol=1e-9)


def test_small_entry_that_is_its_own_scale():
    # f varies on the scale of x1 = 1e-7; the floor-based step (~4e-6) sees
    # a saturated, constant tanh.  The raw step (~ 1e-7 * eps**(1/3)) and the
    # cross-check must win.
    x = np.array([2.0, 1e-7])
    f = lambda z: np.array([np.tanh((z[1] / 1e-7) ** 2) + z[0]])
    exact = np.array([[1.0, 2e7 / np.cosh(1.0) ** 2]])
    check(jacobian(f, x), exact, rtol=1e-9, scale=np.abs(exact) + [[1.0, 3e7]])


def test_oscillation_faster_than_the_floor_step():
    # sin(x / s) at x ~ s << 1: the floor-based absolute step is far too big
    # and the step must shrink adaptively.
    for s in (1e-8, 1e-5):
        for u in (0.3, -1.7):
            res = jacobian(lambda z: np.sin(3 * z / s), u * s)
            check(res, 3 / s * np.cos(3 * u), rtol=1e-8, scale=3 / s)


def test_mixed_scale_direction_is_still_bounded():
    # One step for a direction mixing 1e8 and 1e-8 entries cannot suit both;
    # the estimate may be poor but its error estimate must say so.
    x = np.array([1e8, 1e-8])
    for v in (np.array([1.0, 1.0]), np.array([-0.3, 2.0])):
        res = directional_derivative(lambda z: z[0] + z[0] * z[1], x, v)
        exact = v[0] * (1 + x[1]) + v[1] * x[0]
        assert abs(res.value - exact) <= res.error
        assert abs(res.value - exact) <= 1e-6 * abs(exact)


# ---------------------------------------------------------------------------
# Non-finite values, invalid arguments
# ---------------------------------------------------------------------------


def test_nonfinite_values_raise():
    with pytest.raises(ValueError, match=r"non-finite.*x \+ t\*v.*t ="):
        directional_derivative(lambda x: np.log(x - 1.0), 1.0, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        jacobian(lambda x: np.full(2, np.inf) * x, np.ones(2))
    with pytest.raises(ValueError, match="non-finite"):
        jacobian(np.sqrt, 0.0)  # x - t < 0 for every step

    def f(x):  # NaN only when coordinate 1 moves
        return np.array([x[0] + (np.nan if x[1] != 2.0 else 0.0)])

    with pytest.raises(ValueError, match=r"coordinate 1"):
        jacobian(f, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="non-finite"):
        directional_derivative(f, np.array([1.0, 2.0]), np.array([0.0, 1.0]), step=1e-3)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="levels"):
        jacobian(np.sin, 1.0, levels=1)
    with pytest.raises(ValueError, match="method"):
        jacobian(np.sin, 1.0, method="forward")
    with pytest.raises(ValueError, match="step"):
        jacobian(np.sin, 1.0, step=-1e-3)
    with pytest.raises(ValueError, match="shape"):
        directional_derivative(np.sin, np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="inconsistent"):
        jacobian(lambda x: np.zeros(2 if x > 1.0 else 3), 1.0)


def test_explicit_step_and_float32_outputs():
    res = directional_derivative(np.exp, 0.5, 1.0, step=1e-3, levels=3)
    assert res.n_evals == 6
    check(res, np.exp(0.5), rtol=1e-9)
    # float32 outputs round at float32's eps, and the estimate knows it
    x = np.array([0.5, 2.0])
    res = jacobian(lambda z: np.exp(z).astype(np.float32), x)
    eps32 = float(np.finfo(np.float32).eps)
    scale = np.diag(np.exp(x)) + np.exp(x)[:, None] / np.maximum(x, 1)
    check(res, np.diag(np.exp(x)), rtol=1e-4, scale=scale, eps=eps32)


def test_noise_option_covers_cancellation_inside_f():
    # f is a small difference of O(1) intermediates; the |f|-based rounding
    # model cannot see that, the `noise` option lets the caller say so.
    c = -6.0264412084265695
    f = lambda x: c * (np.cos(x) - np.cos(np.sin(x)))
    x = 0.05251377513381114
    exact = c * (-np.sin(x) + np.sin(np.sin(x)) * np.cos(x))
    res = directional_derivative(f, x, 1.0, noise=2 * EPS * abs(c))
    check(res, exact, rtol=1e-4, scale=abs(exact), loose=1e5)


# ---------------------------------------------------------------------------
# Complex step
# ---------------------------------------------------------------------------


def test_complex_step_exact():
    f = lambda x: np.exp(np.sin(x)) * x**3 / (1 + x**2)
    df = lambda x: (
        np.exp(np.sin(x))
        * (np.cos(x) * x**3 / (1 + x**2) + (3 * x**2 * (1 + x**2) - 2 * x**4) / (1 + x**2) ** 2)
    )
    for x in (-1.3, 0.4, 7.0):
        res = directional_derivative(f, x, 1.0, method="complex")
        assert res.n_evals == 2
        assert abs(res.value - df(x)) <= 1e-14 * abs(df(x))
        assert abs(res.value - df(x)) <= res.error + REF_SLACK * abs(df(x))
        assert res.error <= 1e-14 * abs(df(x))

    x = np.array([1.3, -0.4, 2.2])
    res = jacobian(vec_map, x, method="complex")
    exact = vec_map_jac(x)
    np.testing.assert_allclose(res.value, exact, rtol=1e-14, atol=1e-14)
    assert np.all(np.abs(res.value - exact) <= res.error + REF_SLACK * np.abs(exact))

    X = np.array([[2.0, 0.5], [-0.3, 1.5]])
    res = jacobian(lambda A: np.linalg.inv(A).sum(), X, method="complex")
    inv = np.linalg.inv(X)
    np.testing.assert_allclose(res.value, -(inv.T @ np.ones((2, 2)) @ inv.T), rtol=1e-13)

    # badly scaled entries are no problem either
    x = np.array([1e8, 1e-8])
    f = lambda z: np.array([z[0] ** 2, np.sin(z[1] * 1e8), z[0] * z[1]])
    res = jacobian(f, x, method="complex")
    exact = np.array([[2e8, 0.0], [0.0, 1e8 * np.cos(1.0)], [1e-8, 1e8]])
    np.testing.assert_allclose(res.value, exact, rtol=1e-14, atol=0)


def test_complex_step_rejects_unsafe_functions():
    with pytest.raises(ValueError, match="complex-safe"):
        directional_derivative(lambda x: np.abs(x) ** 2, 1.0, 1.0, method="complex")
    with pytest.raises(ValueError, match="complex-safe"):
        jacobian(lambda x: np.real(x) ** 2, np.ones(2), method="complex")
    with pytest.raises(ValueError, match="complex input"):
        directional_derivative(math.sin, 1.0, 1.0, method="complex")


# ---------------------------------------------------------------------------
# Property-based: random polynomial / trigonometric compositions
# ---------------------------------------------------------------------------
#
# f(x) = prod_k g_k(a_k * p_k(x_{j_k})) with p_k(y) = sum_{d>=1} c_d y**d,
# c_d >= 0 and x > 0.  Products and these compositions are evaluated without
# cancellation of large intermediates, which is the regime in which the error
# estimate claims to bound the error (see directional_derivative's Notes).

OUTER = {
    "id": (lambda u: u, lambda u: np.ones_like(u)),
    "sin": (np.sin, np.cos),
    "cos": (np.cos, lambda u: -np.sin(u)),
    "tanh": (np.tanh, lambda u: 1 / np.cosh(u) ** 2),
    "exp_sin": (lambda u: np.exp(np.sin(u)), lambda u: np.cos(u) * np.exp(np.sin(u))),
}

factor_st = st.tuples(
    st.sampled_from(sorted(OUTER)),
    st.floats(-3, 3).filter(lambda a: abs(a) > 1e-3),
    st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1)), min_size=1, max_size=4),
)


def make_function(factors, n_in):
    """factors[i] = list of (outer, a, coeffs, coordinate) for output i."""

    def parts(x, fac):
        name, a, coeffs, j = fac
        y = x[j]
        p = sum(c * y ** (d + 1) for d, c in enumerate(coeffs))
        dp = sum((d + 1) * c * y**d for d, c in enumerate(coeffs))
        g, dg = OUTER[name]
        return g(a * p), dg(a * p) * a * dp

    def f(x):
        out = []
        for facs in factors:
            val = 1.0
            for fac in facs:
                val = val * parts(x, fac)[0]
            out.append(val)
        return np.array(out) if n_in else out[0]

    def jac(x):
        J = np.zeros((len(factors), max(n_in, 1)))
        for i, facs in enumerate(factors):
            vals = [parts(x, fac) for fac in facs]
            for k, fac in enumerate(facs):
                rest = np.prod([v[0] for m, v in enumerate(vals) if m != k])
                J[i, fac[3]] += vals[k][1] * rest
        return J

    def cond(x):
        """Size of the rounding of a float64 derivative of f (reference or complex step).

        Term k of f' is g_k'(u_k) a_k p_k'(x) prod_{j != k} g_j(u_j); the
        g's and g''s (all bounded by 3) are evaluated at arguments u_j with
        absolute rounding ~ eps |u_j|, so the result is accurate to a few eps
        times (1 + sum_j |u_j|) sum_k 3 |a_k p_k'| prod_{j != k} max(|g_j|, 1).
        """
        out = []
        for facs in factors:
            us, dus, gs = [], [], []
            for name, a, coeffs, j in facs:
                y = x[j]
                us.append(a * sum(c * y ** (d + 1) for d, c in enumerate(coeffs)))
                dus.append(a * sum((d + 1) * c * y**d for d, c in enumerate(coeffs)))
                gs.append(max(abs(OUTER[name][0](us[-1])), 1.0))
            total = sum(3 * abs(du) * np.prod(gs[:k] + gs[k + 1:]) for k, du in enumerate(dus))
            out.append((1 + sum(abs(u) for u in us)) * total)
        return np.array(out)

    return f, jac, cond


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    facs=st.lists(factor_st, min_size=1, max_size=3),
    x=st.floats(0.05, 2.5),
    levels=st.integers(2, 3),
)
def test_property_scalar_compositions(facs, x, levels):
    f, jac, cond = make_function([[(*fac, 0) for fac in facs]], n_in=0)
    exact = jac(np.array([x]))[0, 0]
    # Attainable accuracy is set by the rounding noise of f, which is about
    # eps * (|f| + |x f'|); the natural size of the derivative is that over
    # the size of x (or over 1 for |x| < 1, the default floor).
    scale = abs(exact) + (abs(f(np.array([x]))) + abs(x * exact)) / max(x, 1.0)
    res = directional_derivative(lambda t: f(np.array([t])), x, 1.0, levels=levels)
    # (looseness: typically ~10-100, worst seen over 10^4 random cases ~1e3)
    check(res, exact, rtol=1e-7, scale=scale, loose=2e3)
    # complex step on the same (complex-safe) functions: exact to rounding
    res = directional_derivative(lambda t: f(np.array([t])), x, 1.0, method="complex")
    assert abs(res.value - exact) <= 1e-14 * scale + 64 * EPS * cond(np.array([x]))[0]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    x=st.lists(st.floats(0.05, 2.5), min_size=3, max_size=3),
    log_scales=st.lists(st.integers(-8, 8), min_size=3, max_size=3),
)
def test_property_badly_scaled_vector_maps(data, x, log_scales):
    # f(x) = F(x / S): each coordinate has its natural scale S_j = 10**k_j,
    # and x_j = u_j * S_j.  Per-entry steps must cope with all of them.
    S = 10.0 ** np.array(log_scales, dtype=float)
    n_out = data.draw(st.integers(1, 3))
    factors = [
        [(*fac, data.draw(st.integers(0, 2)))
         for fac in data.draw(st.lists(factor_st, min_size=1, max_size=3))]
        for _ in range(n_out)
    ]
    F, dF, _ = make_function(factors, n_in=3)
    u = np.array(x)
    point = u * S
    exact = dF(u) / S  # chain rule for x -> x / S
    # natural size (see the scalar test): the noise of f_i is about
    # eps * (|f_i| + sum_k |x_k J_ik|), divided by the size of x_j
    noise = np.abs(F(u)) + np.abs(exact) @ np.abs(point)
    scale = np.abs(exact) + noise[:, None] / (S * np.maximum(u, 1.0))
    res = jacobian(lambda z: F(z / S), point)
    check(res, exact, rtol=1e-7, scale=scale, loose=2e3)
