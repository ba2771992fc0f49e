"""Front-ends: common implicit layers expressed as residuals for the one node.

- :func:`fixed_point_layer`: ``y = T(y, x)`` is a root of ``F = T(y, x) - y``;
- :func:`argmin_layer`: ``y = argmin_y f(y, x)`` is a root of ``F = grad_y f``;
- :func:`constrained_argmin_layer`: a KKT point ``(y, lam, nu)`` of
  ``min f  s.t.  h(y, x) = 0, g(y, x) <= 0`` is a root of the KKT residual.

Each comes with a default forward solver (used when ``solver=None``) that needs
an initial guess ``y0`` (an array, or a callable of the raw inputs); all other
keyword options go to :func:`nimplicit.implicit_layer`.
"""
from __future__ import annotations

from typing import Callable, Optional

import autograd.numpy as np
import numpy as onp
import scipy.optimize
from autograd import grad, hessian, jacobian

from .errors import NotConvergedError, SolverError, warn
from .implicit import ImplicitLayer, implicit_layer
from . import linear_solvers


def _initial_guess(y0, inputs):
    if y0 is None:
        raise TypeError("the default forward solver needs an initial guess: pass y0= (an array, "
                        "or a callable of the layer's inputs), or pass solver=")
    y = y0(*inputs) if callable(y0) else y0
    return onp.array(y, dtype=float)


# ------------------------------------------------------------------------------
# fixed points
# ------------------------------------------------------------------------------

def anderson(T: Callable[[onp.ndarray], onp.ndarray], y0: onp.ndarray, *, memory: int = 5,
             max_iter: int = 1000, tol: float = 1e-12, mixing: float = 1.0,
             regularization: float = 1e-12) -> onp.ndarray:
    r"""Anderson-accelerated fixed-point iteration for ``y = T(y)``.

    With residuals ``f_k = T(y_k) - y_k`` and the last ``memory`` differences
    ``dF = [f_{i+1} - f_i]``, ``dG = [T(y_{i+1}) - T(y_i)]``:
    ``gamma = argmin |f_k - dF gamma|^2 + regularization |gamma|^2`` and
    ``y_{k+1} = T(y_k) - dG gamma`` (with ``mixing`` < 1 a damped step).
    Stops when ``|f_k|_inf <= tol * (1 + |y_k|_inf)``; raises
    :class:`NotConvergedError` after ``max_iter`` steps and :class:`SolverError`
    when the iterates diverge (non-finite, or ``1e8`` times larger than ``y0``).
    """
    shape = onp.shape(y0)
    y = onp.array(y0, dtype=float).ravel()
    Tf = lambda v: onp.asarray(T(v.reshape(shape)), dtype=float).ravel()
    gy = Tf(y)
    f = gy - y
    start_size = onp.abs(y).max() if y.size else 0.0
    dF, dG = [], []
    best = onp.inf
    for it in range(max_iter):
        err = onp.abs(f).max()
        if not onp.isfinite(err):
            raise SolverError(f"the fixed-point iteration diverged (non-finite iterate at step {it}); "
                              f"T may not be contractive here: pass a better y0 or solver=")
        best = min(best, err)
        size = onp.abs(y).max()
        if size > 1e8 * (1 + start_size):
            # a relative test would call |T(y) - y| ~ 1 at |y| ~ 1e12 converged
            raise SolverError(f"the fixed-point iterates grew from max|y0| = {start_size:.3g} to "
                              f"{size:.3g} in {it} steps: T seems to have no fixed point near y0; "
                              f"pass a better y0 or solver=")
        if err <= tol * (1 + size):
            return y.reshape(shape)
        if dF:
            Fm, Gm = onp.stack(dF, 1), onp.stack(dG, 1)
            gamma = onp.linalg.solve(Fm.T @ Fm + regularization * onp.eye(len(dF)), Fm.T @ f)
            y_new = gy - Gm @ gamma - (1 - mixing) * (f - Fm @ gamma)
        else:
            y_new = y + mixing * f
        g_new = Tf(y_new)
        f_new = g_new - y_new
        dF.append(f_new - f)
        dG.append(g_new - gy)
        if len(dF) > memory:
            dF.pop(0)
            dG.pop(0)
        y, gy, f = y_new, g_new, f_new
    raise NotConvergedError(
        f"the Anderson fixed-point iteration did not converge in max_iter={max_iter} steps: "
        f"max|T(y) - y| = {onp.abs(f).max():.3g} (best {best:.3g}) > tol={tol:g}. Raise max_iter, "
        f"loosen tol, or check that T is a contraction near the fixed point.")


def fixed_point_layer(T: Callable, solver: Optional[Callable] = None, *, y0=None,
                      max_iter: int = 1000, tol: float = 1e-12, memory: int = 5,
                      **options) -> ImplicitLayer:
    r"""Layer returning the fixed point ``y* = T(y*, *inputs)``.

    The residual is ``F(y, x) = T(y, x) - y``; its Jacobian in ``y`` is
    ``dT/dy - I``.  The default forward solver is :func:`anderson` started at
    ``y0`` (array or callable of the inputs).  ``T`` must be written with
    ``autograd.numpy``; ``y`` is one array.
    """
    def residual(y, *inputs):
        return T(y, *inputs) - y

    if solver is None:
        def solver(*inputs):
            return anderson(lambda v: T(v, *inputs), _initial_guess(y0, inputs),
                            memory=memory, max_iter=max_iter, tol=tol)
    return implicit_layer(residual, solver, **options)


# ------------------------------------------------------------------------------
# unconstrained argmin
# ------------------------------------------------------------------------------

def argmin_layer(objective: Callable, solver: Optional[Callable] = None, *, y0=None,
                 method: str = "trust-exact", gtol: float = 1e-11, max_iter: int = 1000,
                 **options) -> ImplicitLayer:
    r"""Layer returning ``y* = argmin_y objective(y, *inputs)``.

    The residual is the stationarity condition ``F(y, x) = grad_y f(y, x)``;
    ``dF/dy`` is the Hessian of ``f``.  The default forward solver is
    ``scipy.optimize.minimize`` (``method``, default ``'trust-exact'`` with the
    exact autograd gradient and Hessian) from ``y0``; it must reach
    ``|grad f|_inf <= gtol * (1 + |y|_inf)`` or :class:`NotConvergedError` is raised.
    """
    gradient = grad(objective, 0)

    def residual(y, *inputs):
        return gradient(y, *inputs)

    if solver is None:
        hess = hessian(objective, 0)

        def solver(*inputs):
            y_init = _initial_guess(y0, inputs)
            shape = y_init.shape
            fun = lambda v: float(objective(v.reshape(shape), *inputs))
            jac = lambda v: onp.ravel(gradient(v.reshape(shape), *inputs))
            hes = lambda v: onp.reshape(hess(v.reshape(shape), *inputs), (v.size, v.size))
            kw = {"hess": hes} if method in ("trust-exact", "trust-krylov", "trust-ncg", "Newton-CG",
                                              "trust-constr", "dogleg") else {}
            opts = {"gtol": gtol, "maxiter": max_iter} if method != "Newton-CG" \
                else {"xtol": 1e-14, "maxiter": max_iter}
            res = scipy.optimize.minimize(fun, y_init.ravel(), jac=jac, method=method,
                                          options=opts, **kw)
            y = res.x
            gnorm = onp.abs(jac(y)).max()
            # A method driven by decreases of f stalls once they fall below f's rounding
            # (|grad f| ~ sqrt(eps |f|)); Newton steps on grad f = 0 reach gtol from there.
            for _ in range(5 if getattr(res, "nit", 0) < max_iter else 0):
                if gnorm <= gtol * (1 + onp.abs(y).max()):
                    break
                try:
                    y_new = y - onp.linalg.solve(hes(y), jac(y))
                except onp.linalg.LinAlgError:
                    break
                g_new = onp.abs(jac(y_new)).max()
                if not g_new < gnorm:
                    break
                y, gnorm = y_new, g_new
            if not gnorm <= gtol * (1 + onp.abs(y).max()) * 10:
                raise NotConvergedError(
                    f"scipy.optimize.minimize(method={method!r}) stopped with |grad f|_inf = "
                    f"{gnorm:.3g} ({res.message}); raise max_iter, try another method=, a better "
                    f"y0, or pass solver=")
            return y.reshape(shape)
    return implicit_layer(residual, solver, **options)


# ------------------------------------------------------------------------------
# constrained argmin (KKT)
# ------------------------------------------------------------------------------

def _kkt_residual(objective, eq, ineq):
    def lagrangian(y, lam, nu, *inputs):
        value = objective(y, *inputs)
        if eq is not None:
            value = value + np.sum(lam * eq(y, *inputs))
        if ineq is not None:
            value = value + np.sum(nu * ineq(y, *inputs))
        return value
    grad_L = grad(lagrangian, 0)

    def residual(z, *inputs):
        """Paper eq. (27): [grad_y L; h(y); D(nu) g(y)]."""
        y, lam, nu = z
        parts = [grad_L(y, lam, nu, *inputs)]
        parts.append(eq(y, *inputs) if eq is not None else lam)
        parts.append(nu * ineq(y, *inputs) if ineq is not None else nu)
        return tuple(parts)
    return residual


def constrained_argmin_layer(objective: Callable, eq: Optional[Callable] = None,
                             ineq: Optional[Callable] = None, solver: Optional[Callable] = None, *,
                             y0=None, tol: float = 1e-12, active_tol: float = 1e-8,
                             weak_tol: float = 1e-9, max_iter: int = 500,
                             **options) -> ImplicitLayer:
    r"""Layer returning a KKT point ``(y, lam, nu)`` of
    ``min_y f(y, x)  s.t.  h(y, x) = 0,  g(y, x) <= 0``.

    The residual is the paper's eq. (27),

    .. math::
        F(y, \lambda, \nu; x) = \begin{bmatrix} \nabla_y f + J_h^T \lambda + J_g^T \nu \\
        h(y) \\ \operatorname{diag}(\nu)\, g(y) \end{bmatrix} = 0,

    differentiated with respect to every input.  ``eq``/``ineq`` return 1-d
    arrays (``None`` for none: then ``lam``/``nu`` are empty).  The default
    forward solver is SLSQP from ``y0``, then multipliers from the active set by
    least squares and Newton polishing of the active KKT system to ``tol``.

    A weakly active constraint (``nu_i`` and ``g_i`` both within ``weak_tol``)
    makes ``dF/dz`` singular: the gradient is then one choice among many; the
    layer uses the minimum-norm solution (``lstsq``) and warns
    (:class:`~nimplicit.errors.ImplicitGradientWarning`).
    """
    residual = _kkt_residual(objective, eq, ineq)

    if solver is None:
        def solver(*inputs):
            return _slsqp_kkt(objective, eq, ineq, _initial_guess(y0, inputs), inputs,
                              tol=tol, active_tol=active_tol, max_iter=max_iter)

    base = options.pop("linear_solver", "lu")
    base = linear_solvers.get(base)

    def kkt_linear_solver(matvec, rmatvec, b, *, point=None, cache=None, **opts):
        if cache is not None and "kkt_degenerate" not in cache:
            y, lam, nu = point.y
            g = onp.asarray(ineq(y, *point.inputs)) if ineq is not None else onp.zeros(0)
            weak = onp.flatnonzero((onp.abs(nu) <= weak_tol) & (onp.abs(g) <= weak_tol))
            cache["kkt_degenerate"] = weak.size > 0
            if weak.size:
                warn(f"constraint(s) {weak.tolist()} are weakly active (nu_i ~ 0 and g_i(y) ~ 0): "
                     f"the KKT Jacobian is singular and the implicit gradient is not unique; "
                     f"using the minimum-norm solution, one choice among many.")
        solve = linear_solvers.lstsq if cache.get("kkt_degenerate") else base
        return solve(matvec, rmatvec, b, cache=cache, point=point, **opts)

    return implicit_layer(residual, solver, linear_solver=kkt_linear_solver, **options)


def _slsqp_kkt(objective, eq, ineq, y_init, inputs, *, tol, active_tol, max_iter):
    shape = y_init.shape
    f = lambda v: float(objective(v.reshape(shape), *inputs))
    df = grad(lambda v: objective(v.reshape(shape), *inputs))
    cons = []
    if eq is not None:
        h = lambda v: onp.asarray(eq(v.reshape(shape), *inputs), float)
        cons.append({"type": "eq", "fun": h, "jac": jacobian(lambda v: eq(v.reshape(shape), *inputs))})
    if ineq is not None:   # scipy's convention is fun(y) >= 0
        cons.append({"type": "ineq", "fun": lambda v: -onp.asarray(ineq(v.reshape(shape), *inputs), float),
                     "jac": jacobian(lambda v: -ineq(v.reshape(shape), *inputs))})
    res = scipy.optimize.minimize(f, y_init.ravel(), jac=df, constraints=cons, method="SLSQP",
                                  options={"ftol": 1e-15, "maxiter": max_iter})
    if not res.success and res.status not in (8,):   # 8: positive directional derivative (at precision)
        raise SolverError(f"SLSQP failed: {res.message} (status {res.status}); check feasibility, "
                          f"pass a better y0, or solver=")
    y = res.x
    p = 0 if eq is None else onp.size(eq(y.reshape(shape), *inputs))
    mi = 0 if ineq is None else onp.size(ineq(y.reshape(shape), *inputs))
    g = onp.asarray(ineq(y.reshape(shape), *inputs), float) if mi else onp.zeros(0)
    active = onp.flatnonzero(g >= -active_tol)

    ny = y.size

    def active_lagrangian(yy, lam, nu_a):
        Y = np.reshape(yy, shape)
        value = objective(Y, *inputs)
        if p:
            value = value + np.sum(lam * eq(Y, *inputs))
        if active.size:
            value = value + np.sum(nu_a * ineq(Y, *inputs)[active])
        return value
    grad_L = grad(active_lagrangian, 0)

    def active_kkt(z):
        yy, lam, nu_a = z[:ny], z[ny:ny + p], z[ny + p:]
        Y = np.reshape(yy, shape)
        parts = [grad_L(yy, lam, nu_a)]
        if p:
            parts.append(np.reshape(eq(Y, *inputs), (-1,)))
        if active.size:
            parts.append(np.reshape(ineq(Y, *inputs), (-1,))[active])
        return np.concatenate(parts)

    # multipliers: least squares on stationarity with y fixed, then Newton on the active KKT system
    z = onp.concatenate([y, onp.zeros(p + active.size)])
    Jz = jacobian(active_kkt)
    if p + active.size:
        A = Jz(z)[:y.size, y.size:]
        z[y.size:] = onp.linalg.lstsq(A, -df(y), rcond=None)[0]
    for _ in range(20):
        r = active_kkt(z)
        if onp.abs(r).max() <= tol * (1 + onp.abs(z).max()):
            break
        step = onp.linalg.lstsq(Jz(z), -r, rcond=None)[0]
        z = z + step
    y, lam = z[:y.size], z[y.size:y.size + p]
    nu = onp.zeros(mi)
    nu[active] = z[y.size + p:]
    if mi and (nu < -1e-8 * (1 + onp.abs(nu).max())).any():
        raise SolverError(f"the recovered inequality multipliers are negative ({nu.min():.3g}): the "
                          f"SLSQP active set is wrong; pass a better y0 or solver=")
    return y.reshape(shape), lam, onp.maximum(nu, 0.0)
