"""Shared helpers of the core test suite: finite differences of a layer's
actual forward output, and a norm-wise relative comparison.

The helpers are plain functions (import them with ``from conftest import ...``)
so that each test reads as "analytic derivative == finite differences".

Finite differences
------------------
``fd_directional(f, x, v)`` estimates ``d/dt f(x + t v)`` at ``t = 0`` by
central differences ``D(h) = (f(x + h v) - f(x - h v)) / (2 h)`` combined by one
Richardson step, ``(4 D(h/2) - D(h)) / 3``, whose truncation error is
``O(h^4)``.  With ``h = 1e-3`` the truncation error is ~1e-12 and the rounding
error ~``eps |f| / h`` ~ 1e-13, so a relative tolerance of 1e-6 leaves room for
forward solvers that stop at ~1e-12.  ``f`` is called on raw numbers only, so
it runs the forward solver (never a surrogate).
"""
from __future__ import annotations

import numpy as onp

FD_STEP = 1e-3


def _as_arrays(value):
    if isinstance(value, (tuple, list)):
        return tuple(onp.asarray(v, dtype=float) for v in value)
    return onp.asarray(value, dtype=float)


def _combine(a, b, fa, fb):
    if isinstance(a, tuple):
        return tuple(fa * ai + fb * bi for ai, bi in zip(a, b))
    return fa * a + fb * b


def _shift(x, v, t):
    if isinstance(x, float):
        return x + t * float(v)
    return onp.asarray(x, dtype=float) + t * onp.asarray(v, dtype=float)


def fd_directional(f, x, v, h: float = FD_STEP):
    """Richardson-extrapolated central difference of ``f`` at ``x`` along ``v``.

    ``x`` is a float or an array, ``v`` has its shape; returns an array (or a
    tuple of arrays) of the structure of ``f``'s output.
    """
    def central(step):
        plus = _as_arrays(f(_shift(x, v, step)))
        minus = _as_arrays(f(_shift(x, v, -step)))
        return _combine(plus, minus, 1.0 / (2 * step), -1.0 / (2 * step))

    coarse, fine = central(h), central(h / 2)
    return _combine(fine, coarse, 4.0 / 3.0, -1.0 / 3.0)


def fd_jacobian(f, x, h: float = FD_STEP):
    """Finite-difference Jacobian, shape ``out.shape + x.shape`` (array output)."""
    if isinstance(x, float) or onp.ndim(x) == 0:
        return onp.asarray(fd_directional(f, x if isinstance(x, float) else onp.asarray(x, float),
                                          1.0 if isinstance(x, float) else onp.ones(()), h))
    x = onp.asarray(x, dtype=float)
    columns = []
    for k in range(x.size):
        e = onp.zeros(x.size)
        e[k] = 1.0
        columns.append(onp.asarray(fd_directional(f, x, e.reshape(x.shape), h)))
    out = onp.stack(columns, axis=-1)
    return out.reshape(out.shape[:-1] + x.shape)


def fd_grad(f, x, h: float = FD_STEP):
    """Finite-difference gradient of a scalar function (shape of ``x``)."""
    return fd_jacobian(f, x, h)


def rel_err(actual, expected) -> float:
    """Norm-wise relative error ``|a - e| / |e|`` (tuples are concatenated)."""
    if isinstance(expected, (tuple, list)):
        actual = onp.concatenate([onp.ravel(a) for a in actual])
        expected = onp.concatenate([onp.ravel(e) for e in expected])
    actual, expected = onp.asarray(actual, float), onp.asarray(expected, float)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    denom = onp.linalg.norm(expected)
    return float(onp.linalg.norm(actual - expected) / denom) if denom > 0 \
        else float(onp.linalg.norm(actual))


def assert_close(actual, expected, rtol: float = 1e-6, what: str = ""):
    """``rel_err(actual, expected) <= rtol``, with the error in the message."""
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}\n{actual}\nvs\n{expected}"


def random_direction(rng, x):
    """A random direction with the shape of ``x`` (float for a float)."""
    if isinstance(x, float):
        return float(rng.standard_normal())
    return rng.standard_normal(onp.shape(x))


def vdot(a, b) -> float:
    """Sum of elementwise products, also for tuples of arrays."""
    if isinstance(a, (tuple, list)):
        return float(sum(onp.vdot(onp.ravel(ai), onp.ravel(bi)) for ai, bi in zip(a, b)))
    return float(onp.vdot(onp.ravel(a), onp.ravel(b)))


def newton_solve(residual, y0, *inputs, tol: float = 1e-14, max_iter: int = 50):
    """A forward solver for the tests: Newton's method on ``residual(y, *inputs) = 0``.

    Works on raw numbers only (the Jacobian is formed by autograd on raw
    values inside the solver, which is the solver's own business).  ``y0`` is
    an array of the output's shape; returns an array of that shape.
    """
    from autograd import jacobian as _jacobian

    y = onp.array(y0, dtype=float)
    shape = y.shape
    F = lambda v: onp.ravel(onp.asarray(residual(v.reshape(shape), *inputs), dtype=float))
    J = _jacobian(lambda v: _flat_residual(residual, v, shape, inputs))
    v = y.ravel()
    for _ in range(max_iter):
        r = F(v)
        if onp.abs(r).max() <= tol * (1 + onp.abs(v).max()):
            return v.reshape(shape)
        v = v - onp.linalg.solve(onp.reshape(J(v), (v.size, v.size)), r)
    raise AssertionError(f"test Newton solver did not converge: |F| = {onp.abs(F(v)).max():.3g}")


def _flat_residual(residual, v, shape, inputs):
    import autograd.numpy as anp
    return anp.reshape(residual(anp.reshape(v, shape), *inputs), (-1,))


def assert_grad_matches_fd(f, x, g, rng, n_directions: int = 2, rtol: float = 1e-6, what: str = ""):
    """``<g, v> == d/dt f(x + t v)`` (FD) along ``n_directions`` random ``v``:
    a full check of ``g`` in expectation at a fraction of the cost of a full
    FD gradient.  ``f`` may return an array: then ``g`` is its Jacobian-like
    array ``out.shape + x.shape`` and the comparison is ``g . v``."""
    for k in range(n_directions):
        v = random_direction(rng, x)
        fd = onp.asarray(fd_directional(f, x, v))
        g_arr = onp.asarray(g)
        nv = onp.ndim(v)
        predicted = onp.tensordot(g_arr, onp.asarray(v), axes=nv) if nv else g_arr * v
        assert_close(predicted, fd, rtol, f"{what} (direction {k})")
