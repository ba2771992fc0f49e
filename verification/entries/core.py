r"""Registry entries for the core's worked examples.

Every forward solver here ends with Newton steps to the last bits of precision,
so the finite differences of the actual solver output are accurate to rounding
and a relative gradient error of ``1e-4`` stands far above their error estimate.

- ``paper-example1``: the paper's Example 1 (eq. 18), ``F1 = x^2 + y1^2 + y2^2 - 4``,
  ``F2 = x y1 - 1`` on the branch ``y2 > 0`` (``dy/dx = (-1, 0)`` at ``x = 1``);
  ill-posed as ``y2 -> 0``.
- ``sphere-height``: the scalar implicit function of the unit-circle kind,
  ``F(y; x, r) = |x|^2 + y^2 - r^2 = 0`` on the branch ``y > 0``
  (``dy/dx = -x / y``); ill-posed as ``y -> 0``.
- ``deq-tanh`` / ``deq-tanh-gmres``: the tanh equilibrium layer
  ``y = tanh(W y + x + b)`` (dense LU / matrix-free GMRES backward solves);
  ill-posed as the contraction ``|diag(1 - y^2) W|_2 -> 1``.
- ``robust-pool``: robust (pseudo-Huber) pooling
  ``y = argmin_y sum_i alpha^2 (sqrt(1 + ((y - x_i)/alpha)^2) - 1)`` per feature;
  ill-conditioned when ``alpha`` is small against the spread of the points.
- ``simplex-projection``: the Euclidean projection onto the probability simplex
  as a constrained argmin, returning ``(y, lambda, nu)``; ill-posed when a
  constraint is weakly active (``y_i = 0`` and ``nu_i = 0``).
- ``deq-tanh-batched``: a batch of independent tanh equilibria sharing ``W``
  (``batch_axis=0``, block-diagonal ``J_{F,y}``).
"""
from __future__ import annotations

import autograd.numpy as np
import numpy as onp
from nimplicit import argmin_layer, constrained_argmin_layer, fixed_point_layer, implicit_layer
from nimplicit.errors import NotConvergedError, SolverError

from ..registry import Entry, register

NEWTON_TOL = 4 * onp.finfo(float).eps


# ------------------------------------------------------------------------------
# example 1: a point on a circle (sphere), y = sqrt(r^2 - |x|^2)
# ------------------------------------------------------------------------------

def circle_residual(y, x, r):
    return np.sum(x ** 2) + y ** 2 - r ** 2


def circle_solver(x, r):
    gap = float(r) ** 2 - float(onp.sum(onp.asarray(x) ** 2))
    if not gap > 0:
        raise SolverError(f"no point with y > 0 on the sphere: |x|^2 = {r ** 2 - gap:.6g} >= "
                          f"r^2 = {float(r) ** 2:.6g}; choose |x| < r")
    y = onp.sqrt(gap)
    y = y - (gap - y * y) / (-2 * y)      # one Newton step against the rounding of sqrt
    return onp.asarray(y)


def circle_height(point):
    """Declared measure: ``dF/dy = 2 y`` against ``dF/dx = 2 x``, i.e. ``y / r``;
    the derivative ``dy/dx = -x / y`` blows up as it goes to 0."""
    y = float(onp.asarray(point.y))
    r = float(onp.sqrt(onp.sum(onp.asarray(point.inputs[0]) ** 2) + y * y))
    rel = abs(y) / r if r > 0 else 0.0
    return {"relative height y/r": (rel, rel > 1e-6, "dF/dy = 2y vanishes against dF/dx = 2x: "
                                                     "the point is at the rim, dy/dx = -x/y is unbounded")}


circle = implicit_layer(circle_residual, circle_solver, diagnostics=circle_height,
                        name="sphere-height")   # the name diagnose() reports


def circle_generate(rng, n: int = 4, height: float = 0.5):
    """``r ~ U(1, 2)`` and ``x`` with ``y* = height * r`` (``height`` in (0, 1];
    small ``height`` means ``dF/dy = 2 y`` small: ill-conditioned)."""
    r = float(rng.uniform(1.0, 2.0))
    y = height * r
    direction = rng.standard_normal(n)
    x = direction / onp.linalg.norm(direction) * onp.sqrt(r * r - y * y)
    return x, r


register(Entry(
    name="sphere-height", fn=circle, generate=circle_generate, size={"n": 4, "height": 0.5},
    conventions={"inputs": [{"name": "x", "shape": "(n,)"}, {"name": "r", "shape": "float"}],
                 "outputs": [{"name": "y", "shape": "()", "branch": "y > 0"}]},
    description="y > 0 on the sphere |x|^2 + y^2 = r^2 (0-d output, vector and float inputs)"))


# ------------------------------------------------------------------------------
# the paper's Example 1 (eq. 18)
# ------------------------------------------------------------------------------

def example1_residual(y, x):
    return np.array([x ** 2 + y[0] ** 2 + y[1] ** 2 - 4.0, x * y[0] - 1.0])


def example1_solver(x):
    x = float(x)
    gap = 4.0 - x * x - 1.0 / (x * x)
    if not gap > 0:
        raise SolverError(f"Example 1 has no real solution at x = {x:.6g} (4 - x^2 - 1/x^2 = "
                          f"{gap:.3g} <= 0); choose x in (0.52, 1.93)")
    return onp.array([1.0 / x, onp.sqrt(gap)])


def example1_margin(point):
    """Declared measure: ``y2``; ``det dF/dy = -2 x y2`` vanishes with it."""
    y2 = float(point.y[1])
    return {"y2 (det dF/dy = -2 x y2)": (y2, y2 > 1e-6, "y2 -> 0: dF/dy is singular there")}


example1 = implicit_layer(example1_residual, example1_solver, diagnostics=example1_margin,
                          name="paper-example1")


def example1_generate(rng, low: float = 0.7, high: float = 1.5):
    """``x ~ U(low, high)``; the well-posed range is inside (0.52, 1.93)."""
    return (float(rng.uniform(low, high)),)


register(Entry(
    name="paper-example1", fn=example1, generate=example1_generate,
    size={"low": 0.7, "high": 1.5},
    conventions={"inputs": [{"name": "x", "shape": "float"}],
                 "outputs": [{"name": "y", "shape": "(2,)", "branch": "y2 > 0"}]},
    description="the paper's Example 1 (eq. 18): x^2 + |y|^2 = 4, x y1 = 1 (float input, vector output)"))


# ------------------------------------------------------------------------------
# tanh deep equilibrium layer, y = tanh(W y + x + b)
# ------------------------------------------------------------------------------

def tanh_map(y, x, W, b):
    return np.tanh(np.dot(W, y) + x + b)


def _tanh_newton(x, W, b, *, max_iter: int = 100):
    """Fixed point of ``y = tanh(W y + x + b)``: Picard steps, then Newton."""
    x, W, b = (onp.asarray(v, dtype=float) for v in (x, W, b))
    y = onp.zeros_like(x)
    for _ in range(5):
        y = onp.tanh(W @ y + x + b)
    eye = onp.eye(len(y))
    for _ in range(max_iter):
        t = onp.tanh(W @ y + x + b)
        F = t - y
        if onp.abs(F).max() <= NEWTON_TOL * (1 + onp.abs(y).max()):
            return y
        J = (1 - t * t)[:, None] * W - eye
        y = y - onp.linalg.solve(J, F)
    raise NotConvergedError(f"the tanh equilibrium Newton iteration did not converge: "
                            f"max|T(y) - y| = {onp.abs(F).max():.3g}; is W a contraction?")


def tanh_contraction(point):
    """Declared measure: ``|diag(1 - y^2) W|_2 < 1`` makes the fixed point unique
    and ``I - diag(1 - y^2) W`` invertible."""
    x, W, b = point.inputs
    y = onp.asarray(point.y)
    q = float(onp.linalg.norm((1 - onp.tanh(W @ y + x + b) ** 2)[:, None] * W, 2))
    return {"contraction": (q, q < 1.0, "the local Lipschitz constant of T in y; < 1 guarantees a "
                                        "unique equilibrium and an invertible I - dT/dy")}


deq_tanh = fixed_point_layer(tanh_map, solver=_tanh_newton, linear_solver="lu",
                             diagnostics=tanh_contraction, name="deq-tanh")
deq_tanh_gmres = fixed_point_layer(tanh_map, solver=_tanh_newton, linear_solver="gmres",
                                   linear_solver_options={"rtol": 1e-13},
                                   diagnostics=tanh_contraction, name="deq-tanh-gmres")


def deq_generate(rng, n: int = 5, contraction: float = 0.6):
    """``W`` with spectral norm ``contraction`` (conditioning: cond(I - dT/dy) grows
    like ``1 / (1 - contraction)``), ``x, b ~ N(0, 1)``."""
    W = rng.standard_normal((n, n))
    W *= contraction / onp.linalg.norm(W, 2)
    return rng.standard_normal(n), W, 0.5 * rng.standard_normal(n)


def _deq_fn(layer):
    def fn(x, W, b):
        return layer(x, W, b)
    return fn


register(Entry(
    name="deq-tanh", fn=_deq_fn(deq_tanh), generate=deq_generate,
    size={"n": 5, "contraction": 0.6},
    conventions={"inputs": [{"name": "x", "shape": "(n,)"}, {"name": "W", "shape": "(n, n)"},
                            {"name": "b", "shape": "(n,)"}],
                 "outputs": [{"name": "y", "shape": "(n,)", "meaning": "y = tanh(W y + x + b)"}]},
    description="tanh equilibrium y = tanh(W y + x + b), dense LU backward solves"))
register(Entry(
    name="deq-tanh-gmres", fn=_deq_fn(deq_tanh_gmres), generate=deq_generate,
    size={"n": 5, "contraction": 0.6},
    conventions={"inputs": [{"name": "x", "shape": "(n,)"}, {"name": "W", "shape": "(n, n)"},
                            {"name": "b", "shape": "(n,)"}],
                 "outputs": [{"name": "y", "shape": "(n,)", "meaning": "y = tanh(W y + x + b)"}]},
    description="tanh equilibrium y = tanh(W y + x + b), matrix-free GMRES backward solves"))


# ------------------------------------------------------------------------------
# robust pooling: pseudo-Huber argmin, per feature
# ------------------------------------------------------------------------------

def pseudo_huber_objective(y, x, alpha):
    z = (y[None, :] - x) / alpha
    return np.sum(alpha ** 2 * (np.sqrt(1.0 + z * z) - 1.0))


def robust_pool_solver(x, alpha, *, max_iter: int = 200):
    """Safeguarded Newton per feature on ``g(y) = sum_i z_i / sqrt(1 + z_i^2) * alpha``,
    bracketed by ``[min_i x_i, max_i x_i]`` (g is increasing there)."""
    x = onp.asarray(x, dtype=float)
    alpha = float(alpha)
    lo, hi = x.min(axis=0), x.max(axis=0)
    y = onp.median(x, axis=0)
    for _ in range(max_iter):
        z = (y[None, :] - x) / alpha
        s = onp.sqrt(1 + z * z)
        g = alpha * onp.sum(z / s, axis=0)
        h = onp.sum(1.0 / s ** 3, axis=0)
        lo = onp.where(g < 0, onp.maximum(lo, y), lo)
        hi = onp.where(g > 0, onp.minimum(hi, y), hi)
        step = g / h
        y_new = y - step
        outside = (y_new <= lo) | (y_new >= hi)
        y_new = onp.where(outside, 0.5 * (lo + hi), y_new)
        if onp.all(onp.abs(y_new - y) <= NEWTON_TOL * (1 + onp.abs(y))):
            return y_new
        y = y_new
    raise NotConvergedError("robust pooling Newton iteration did not converge")


def robust_pool_curvature(point):
    """Declared measure: the Hessian ``sum_i (1 + z_i^2)^{-3/2}`` per feature over
    ``n`` (1 for a quadratic, -> 0 when every point is far out in the linear tails)."""
    x, alpha = point.inputs
    z = (onp.asarray(point.y)[None, :] - onp.asarray(x)) / float(alpha)
    curvature = float(onp.min(onp.mean((1 + z * z) ** -1.5, axis=0)))
    return {"relative curvature": (curvature, curvature > 1e-8,
                                   "every point lies far in the linear tails of the pseudo-Huber "
                                   "penalty: the objective is nearly flat at the minimiser, its "
                                   "Hessian J_F,y nearly singular")}


robust_pool = argmin_layer(pseudo_huber_objective, solver=robust_pool_solver, linear_solver="lu",
                           diagnostics=robust_pool_curvature, name="robust-pool")


def robust_pool_generate(rng, n: int = 8, d: int = 3, alpha: float = 1.0, outliers: int = 2):
    """``n`` points in ``R^d`` (``N(0, 1)``) of which ``outliers`` are moved far
    away; ``alpha`` is the pseudo-Huber width (small ``alpha`` against the spread:
    small Hessian, ill-conditioned)."""
    x = rng.standard_normal((n, d))
    x[:outliers] += rng.choice([-1.0, 1.0], size=(outliers, d)) * rng.uniform(5, 10, (outliers, d))
    return x, float(alpha)


register(Entry(
    name="robust-pool", fn=robust_pool, generate=robust_pool_generate,
    size={"n": 8, "d": 3, "alpha": 1.0},
    conventions={"inputs": [{"name": "x", "shape": "(n, d) points"}, {"name": "alpha", "shape": "float"}],
                 "outputs": [{"name": "y", "shape": "(d,)"}]},
    description="robust pooling: pseudo-Huber argmin per feature (argmin_layer)"))


# ------------------------------------------------------------------------------
# projection onto the probability simplex as a constrained argmin
# ------------------------------------------------------------------------------

def _simplex_objective(y, x):
    return 0.5 * np.sum((y - x) ** 2)


def _simplex_eq(y, x):
    return np.reshape(np.sum(y) - 1.0, (1,))


def _simplex_ineq(y, x):
    return -y


def simplex_tau(x) -> float:
    """The threshold ``tau`` with ``sum_i max(x_i - tau, 0) = 1`` (sort-based)."""
    u = onp.sort(onp.asarray(x, dtype=float))[::-1]
    css = onp.cumsum(u) - 1.0
    k = onp.arange(1, len(u) + 1)
    rho = onp.nonzero(u - css / k > 0)[0][-1]
    return css[rho] / (rho + 1.0)


def simplex_solver(x):
    """Exact projection ``y = max(x - tau, 0)`` with multipliers ``lambda = tau``,
    ``nu = max(tau - x, 0)`` (stationarity ``y - x + lambda 1 - nu = 0``)."""
    x = onp.asarray(x, dtype=float)
    tau = simplex_tau(x)
    y = onp.maximum(x - tau, 0.0)
    support = y > 0
    tau = float(onp.mean(x[support]) - 1.0 / support.sum())   # re-derived from the support: exact sum
    y = onp.where(support, x - tau, 0.0)
    nu = onp.where(support, 0.0, tau - x)
    return y, onp.array([tau]), nu


def simplex_margin(point):
    """Declared measure: the strict-complementarity margin ``min_i max(y_i, nu_i)``."""
    y, _, nu = (onp.asarray(v) for v in point.y)
    margin = float(onp.min(onp.maximum(y, nu)))
    scale = 1.0 + float(onp.abs(onp.asarray(point.inputs[0])).max())
    return {"complementarity margin": (margin, margin > 1e-6 * scale,
                                       "y_i = 0 together with nu_i = 0 (a weakly active constraint) "
                                       "makes the KKT Jacobian singular: the projection is not "
                                       "differentiable there")}


simplex_projection = constrained_argmin_layer(
    _simplex_objective, eq=_simplex_eq, ineq=_simplex_ineq, solver=simplex_solver,
    diagnostics=simplex_margin, name="simplex-projection")


def simplex_generate(rng, n: int = 6, scale: float = 1.0, margin: float = 0.05):
    """``x ~ N(0, scale^2)`` redrawn until every ``|x_i - tau| >= margin * scale``
    (strict complementarity by a margin; ``margin = 0`` allows degenerate draws)."""
    for _ in range(1000):
        x = scale * rng.standard_normal(n)
        if onp.min(onp.abs(x - simplex_tau(x))) >= margin * scale:
            return (x,)
    raise ValueError(f"could not draw a simplex instance with margin {margin}; lower it")


register(Entry(
    name="simplex-projection", fn=simplex_projection, generate=simplex_generate,
    size={"n": 6, "scale": 1.0, "margin": 0.05},
    conventions={"inputs": [{"name": "x", "shape": "(n,)"}],
                 "outputs": [{"name": "y", "shape": "(n,)"}, {"name": "lambda", "shape": "(1,)"},
                             {"name": "nu", "shape": "(n,)", "sign": ">= 0"}],
                 "duals": "Lagrangian 1/2|y - x|^2 + lambda (sum y - 1) - nu'y: stationarity "
                          "y - x + lambda 1 - nu = 0"},
    description="projection onto the simplex as a KKT constrained argmin, output (y, lambda, nu)"))


# ------------------------------------------------------------------------------
# a batched layer: independent tanh equilibria with a shared W
# ------------------------------------------------------------------------------

def batched_tanh_residual(y, x, W):
    return np.tanh(np.dot(y, W.T) + x) - y


def batched_tanh_solver(x, W, *, max_iter: int = 100):
    """Batched Newton: ``B`` independent ``n x n`` systems per step."""
    x, W = onp.asarray(x, dtype=float), onp.asarray(W, dtype=float)
    y = onp.zeros_like(x)
    eye = onp.eye(W.shape[0])
    for _ in range(max_iter):
        t = onp.tanh(y @ W.T + x)
        F = t - y
        if onp.abs(F).max() <= NEWTON_TOL * (1 + onp.abs(y).max()):
            return y
        J = (1 - t * t)[:, :, None] * W[None] - eye
        y = y - onp.linalg.solve(J, F[..., None])[..., 0]
    raise NotConvergedError("the batched tanh Newton iteration did not converge")


deq_tanh_batched = implicit_layer(batched_tanh_residual, batched_tanh_solver, batch_axis=0,
                                  name="deq-tanh-batched")


def batched_generate(rng, batch: int = 4, n: int = 3, contraction: float = 0.7):
    W = rng.standard_normal((n, n))
    W *= contraction / onp.linalg.norm(W, 2)
    return rng.standard_normal((batch, n)), W


register(Entry(
    name="deq-tanh-batched", fn=deq_tanh_batched, generate=batched_generate,
    size={"batch": 4, "n": 3, "contraction": 0.7},
    conventions={"inputs": [{"name": "x", "shape": "(B, n)"}, {"name": "W", "shape": "(n, n)"}],
                 "outputs": [{"name": "y", "shape": "(B, n)"}],
                 "batch": "W shared by the batch: its VJP is the SUM of the per-instance gradients"},
    description="batch of tanh equilibria y_b = tanh(W y_b + x_b), shared W (batch_axis=0)"))
