"""Shared helpers of the test suite: finite differences of a layer's actual
forward output (built on :mod:`verification.finite_differences`), a norm-wise
relative comparison, and a small Newton solver.

Import them with ``from helpers import ...`` (``tests/`` is on ``sys.path``
through pytest's rootdir conftest); ``conftest`` re-exports them for old test
files.

Finite differences
------------------
``fd_directional(f, x, v)`` estimates ``d/dt f(x + t v)`` at ``t = 0`` with
:func:`verification.finite_differences.directional_derivative` at a fixed
relative base step ``h = 1e-3`` and two Richardson levels (truncation
``O(h^4)`` ~ 1e-12; rounding ~ ``eps |f| / h``): the fixed, large step leaves
room for forward solvers that stop at ~1e-12, so a relative tolerance of
1e-6 is meaningful.  ``f`` is called on raw numbers only, so it runs the
forward solver (never a surrogate).
"""
from __future__ import annotations

import numpy as onp

from verification.finite_differences import directional_derivative

FD_STEP = 1e-3


def fd_directional(f, x, v, h: float = FD_STEP):
    """Richardson-extrapolated central difference of ``f`` at ``x`` along ``v``.

    ``x`` is a float or an array, ``v`` has its shape; returns an array (or a
    tuple of arrays) of the structure of ``f``'s output.
    """
    return directional_derivative(f, x, v, step=h, levels=2).value


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
