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
from autograd import grad, hessian, make_vjp

from . import kkt
from .errors import InvalidOptionError, NotConvergedError, ShapeError, SolverError
from .implicit import ImplicitLayer, Solution, implicit_layer
from . import linear_solvers


def _require_y0(y0, who: str) -> None:
    if y0 is None:
        raise InvalidOptionError(f"{who}: the default forward solver needs an initial guess: "
                                 f"pass y0= (an array, or a callable of the layer's inputs), or "
                                 f"pass solver=")


def _initial_guess(y0, inputs):
    y = y0(*inputs) if callable(y0) else y0
    return onp.array(y, dtype=float)


# ------------------------------------------------------------------------------
# fixed points
# ------------------------------------------------------------------------------

_TINY = onp.finfo(float).tiny


def anderson(T: Callable[[onp.ndarray], onp.ndarray], y0: onp.ndarray, *, memory: int = 5,
             max_iter: int = 1000, tol: float = 1e-12, mixing: float = 1.0,
             regularization: float = 1e-12) -> onp.ndarray:
    r"""Anderson-accelerated fixed-point iteration for ``y = T(y)``.

    With residuals ``f_k = T(y_k) - y_k`` and the last ``memory`` differences
    ``dF = [f_{i+1} - f_i]``, ``dG = [T(y_{i+1}) - T(y_i)]``:
    ``gamma = argmin |f_k - dF gamma|^2 + regularization |gamma|^2`` and
    ``y_{k+1} = T(y_k) - dG gamma`` (with ``mixing`` < 1 a damped step).
    Stops when ``|f_k|_inf <= tol * max(|y_k|_inf, |T(y_k)|_inf, tiny)``
    (``tiny`` the smallest normal float); raises
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
        # relative to the iteration's own scale, so tiny fixed points (|y| ~ 1e-150) are resolved
        if err <= tol * max(size, onp.abs(gy).max(), _TINY):
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



class _FixedPointResidual:
    """``F(y, x) = T(y, x) - y`` (a module-level class, so a layer built from
    module-level functions pickles)."""

    def __init__(self, T: Callable):
        self.T = T

    def __call__(self, y, *inputs):
        return self.T(y, *inputs) - y


class _Bound:
    """``v -> f(v, *inputs)``."""

    def __init__(self, f: Callable, inputs: tuple):
        self.f, self.inputs = f, inputs

    def __call__(self, v):
        return self.f(v, *self.inputs)


class _AndersonSolver:
    """The default forward of :func:`fixed_point_layer`: :func:`anderson` from ``y0``."""

    def __init__(self, T: Callable, y0, memory: int, max_iter: int, tol: float):
        self.T, self.y0, self.memory, self.max_iter, self.tol = T, y0, memory, max_iter, tol

    def __call__(self, *inputs):
        return anderson(_Bound(self.T, inputs), _initial_guess(self.y0, inputs),
                        memory=self.memory, max_iter=self.max_iter, tol=self.tol)


def fixed_point_layer(T: Callable, solver: Optional[Callable] = None, *, y0=None,
                      max_iter: int = 1000, tol: float = 1e-12, memory: int = 5,
                      **options) -> ImplicitLayer:
    r"""Layer returning the fixed point ``y* = T(y*, *inputs)``.

    The residual is ``F(y, x) = T(y, x) - y``; its Jacobian in ``y`` is
    ``dT/dy - I``.  The default forward solver is :func:`anderson` started at
    ``y0`` (array or callable of the inputs).  ``T`` must be written with
    ``autograd.numpy``; ``y`` is one array.  Built from module-level ``T`` (and
    ``y0``), the layer pickles.
    """
    if solver is None:
        _require_y0(y0, "fixed_point_layer")
        solver = _AndersonSolver(T, y0, _positive_int(memory, "memory"),
                                 _positive_int(max_iter, "max_iter"), _positive(tol, "tol"))
    return implicit_layer(_FixedPointResidual(T), solver, **options)


# ------------------------------------------------------------------------------
# unconstrained argmin
# ------------------------------------------------------------------------------

class _GradientResidual:
    """``F(y, x) = grad_y f(y, x)``."""

    def __init__(self, objective: Callable):
        self.objective = objective

    def __call__(self, y, *inputs):
        return grad(self.objective, 0)(y, *inputs)


_HESSIAN_METHODS = ("trust-exact", "trust-krylov", "trust-ncg", "Newton-CG", "trust-constr",
                    "dogleg")


class _MinimizeSolver:
    """The default forward of :func:`argmin_layer`: ``scipy.optimize.minimize`` from
    ``y0`` with the exact autograd gradient (and Hessian), then Newton steps to ``gtol``."""

    def __init__(self, objective: Callable, y0, method: str, gtol: float, max_iter: int):
        self.objective, self.y0, self.method = objective, y0, method
        self.gtol, self.max_iter = gtol, max_iter

    def __call__(self, *inputs):
        objective, method, gtol, max_iter = self.objective, self.method, self.gtol, self.max_iter
        y_init = _initial_guess(self.y0, inputs)
        shape = y_init.shape
        gradient = grad(objective, 0)
        hess = hessian(objective, 0)
        fun = lambda v: float(objective(v.reshape(shape), *inputs))
        jac = lambda v: onp.ravel(gradient(v.reshape(shape), *inputs))
        hes = lambda v: onp.reshape(hess(v.reshape(shape), *inputs), (v.size, v.size))
        kw = {"hess": hes} if method in _HESSIAN_METHODS else {}
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


class _MinimumChecked:
    """Wrap a forward solver of :func:`argmin_layer`: the returned point must be a
    strict local minimum (Hessian positive definite, :func:`nimplicit.kkt.check_second_order`)."""

    def __init__(self, objective: Callable, solver: Callable, second_order_tol: float):
        self.objective, self.solver, self.second_order_tol = objective, solver, second_order_tol

    def __call__(self, *inputs):
        y = self.solver(*inputs)
        yv = onp.asarray(y, dtype=float)
        H = hessian(self.objective, 0)(yv, *inputs)
        kkt.check_second_order("argmin_layer", onp.reshape(H, (yv.size, yv.size)),
                               tol=self.second_order_tol)
        return y


def argmin_layer(objective: Callable, solver: Optional[Callable] = None, *, y0=None,
                 method: str = "trust-exact", gtol: float = 1e-11, max_iter: int = 1000,
                 second_order_tol: Optional[float] = kkt.DEFAULT_SECOND_ORDER_TOL,
                 **options) -> ImplicitLayer:
    r"""Layer returning ``y* = argmin_y objective(y, *inputs)``.

    The residual is the stationarity condition ``F(y, x) = grad_y f(y, x)``;
    ``dF/dy`` is the Hessian of ``f``.  The default forward solver is
    ``scipy.optimize.minimize`` (``method``, default ``'trust-exact'`` with the
    exact autograd gradient and Hessian) from ``y0``; it must reach
    ``|grad f|_inf <= gtol * (1 + |y|_inf)`` or :class:`NotConvergedError` is raised.

    Every forward point (of the default or a user's ``solver``) must be a strict
    local minimum: the Hessian ``H`` positive definite,
    ``lambda_min(H) > second_order_tol * max|lambda(H)|``; a stationary maximum,
    saddle or flat point raises :class:`~nimplicit.errors.NotAMinimumError`.
    ``second_order_tol=None`` skips the test (it costs one Hessian per forward).
    """
    if solver is None:
        _require_y0(y0, "argmin_layer")
        solver = _MinimizeSolver(objective, y0, _check_method(method), _positive(gtol, "gtol"),
                                 _positive_int(max_iter, "max_iter"))
    if second_order_tol is not None:
        solver = _MinimumChecked(objective, solver, _nonnegative(second_order_tol,
                                                                 "second_order_tol"))
    return implicit_layer(_GradientResidual(objective), solver, **options)


_MINIMIZE_METHODS = ("nelder-mead", "powell", "cg", "bfgs", "newton-cg", "l-bfgs-b", "tnc",
                     "cobyla", "cobyqa", "slsqp", "trust-constr", "dogleg", "trust-ncg",
                     "trust-exact", "trust-krylov")


def _check_method(method) -> str:
    if not isinstance(method, str) or method.lower() not in _MINIMIZE_METHODS:
        raise InvalidOptionError(f"argmin_layer: method must be one of scipy.optimize.minimize's "
                                 f"methods {_MINIMIZE_METHODS}, got {method!r}")
    return method


def _positive(value, name: str) -> float:
    v = _nonnegative(value, name)
    if v <= 0:
        raise InvalidOptionError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, onp.integer)) or value < 1:
        raise InvalidOptionError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _nonnegative(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"{name} must be a number, got {value!r}") from None
    if not (v >= 0 and onp.isfinite(v)):
        raise InvalidOptionError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


# ------------------------------------------------------------------------------
# constrained argmin (KKT)
# ------------------------------------------------------------------------------

class _Problem:
    """``(objective, eq, ineq)`` of a constrained argmin and the data of a point."""

    def __init__(self, objective: Callable, eq: Optional[Callable], ineq: Optional[Callable]):
        self.objective, self.eq, self.ineq = objective, eq, ineq

    def lagrangian(self, y, lam, nu, *inputs):
        value = self.objective(y, *inputs)
        if self.eq is not None:
            value = value + np.sum(lam * self.eq(y, *inputs))
        if self.ineq is not None:
            value = value + np.sum(nu * self.ineq(y, *inputs))
        return value

    @staticmethod
    def margins(d: dict, signed: bool = False):
        """Scale-free ``(nu_bar, s_bar)`` of :mod:`nimplicit.kkt` and ``eq_bar``;
        ``s = -g(y)``, the slack's terms ``||grad g_i|| ||y|| + |grad g_i . y - g_i|``."""
        ny = onp.linalg.norm(d["y"])
        rows = onp.linalg.norm(d["Jg"], axis=1)
        terms = onp.linalg.norm(d["grad_f"]) + onp.linalg.norm(d["Jh"].T @ d["lam"])
        slack_terms = rows * ny + onp.abs(d["Jg"] @ d["y"] - d["g"])
        eq_terms = onp.linalg.norm(d["Jh"], axis=1) * ny + onp.abs(d["Jh"] @ d["y"] - d["h"])
        eq_bar = kkt._safe_ratio(onp.abs(d["h"]), eq_terms) if d["h"].size else d["h"]
        if signed:
            nu_bar, s_bar = kkt.signed_margins(d["nu"], -d["g"], rows, terms, slack_terms)
        else:
            nu_bar, s_bar = kkt.normalized_margins(d["nu"], -d["g"], rows, terms, slack_terms)
        return nu_bar, s_bar, eq_bar


def _value_and_rows(fn, v):
    """``(fn(v), dfn/dv)`` of a flat function of a flat ``v``: one trace and one VJP
    per output entry (what ``autograd.jacobian`` does, without its re-wrapping)."""
    vjp, value = make_vjp(fn)(v)
    value = onp.asarray(value, dtype=float)
    rows = [vjp(e) for e in onp.eye(value.size)]
    J = onp.stack(rows) if rows else onp.zeros((0, v.size))
    return value, onp.reshape(J, (value.size, v.size))


class _Local:
    """The functions of a :class:`_Problem` at fixed raw inputs, of a flat ``y``.

    Every function is traced once per point; the first-order data of the last
    point asked for is kept, so that the default forward (SLSQP, the multipliers'
    least squares and polish) and the check (:class:`_KKTChecked`) share it
    instead of tracing again.  One object per forward call: layers keep no state.
    """

    def __init__(self, problem: _Problem, shape: tuple, inputs: tuple):
        self.problem, self.shape, self.inputs = problem, shape, inputs
        self._last = {}

    def _flat(self, fn):
        shape, inputs = self.shape, self.inputs
        return lambda v: np.reshape(fn(np.reshape(v, shape), *inputs), (-1,))

    def _cached(self, name, v, compute):
        key = v.tobytes()
        hit = self._last.get(name)
        if hit is None or hit[0] != key:
            hit = self._last[name] = (key, compute(v))
        return hit[1]

    # -- for scipy's SLSQP: plain values, traced derivatives (copies: scipy may write) --
    def objective(self, v):
        return float(self.problem.objective(v.reshape(self.shape), *self.inputs))

    def objective_grad(self, v):
        return onp.array(self.grad_f(v), dtype=float)

    def eq_values(self, v):
        return onp.asarray(self.problem.eq(v.reshape(self.shape), *self.inputs), float)

    def ineq_values(self, v):   # scipy's convention is fun(y) >= 0
        return -onp.asarray(self.problem.ineq(v.reshape(self.shape), *self.inputs), float)

    def eq_jac(self, v):
        return onp.array(self.constraint("h", v)[1])

    def ineq_jac(self, v):
        return -self.constraint("g", v)[1]

    # -- derivatives ---------------------------------------------------------
    def grad_f(self, v):
        """``grad f`` at a flat ``v`` (the layer's objective must be scalar)."""
        shape, inputs, objective = self.shape, self.inputs, self.problem.objective
        return self._cached("grad_f", v, lambda w: onp.ravel(
            grad(lambda u: objective(np.reshape(u, shape), *inputs))(w)))

    def constraint(self, name, v):
        """``(values, Jacobian)`` of the equalities (``"h"``) or inequalities (``"g"``)."""
        fn = self.problem.eq if name == "h" else self.problem.ineq
        if fn is None:
            return onp.zeros(0), onp.zeros((0, v.size))
        return self._cached(name, v, lambda w: _value_and_rows(self._flat(fn), w))

    def point(self, v, lam, nu) -> dict:
        """The data of :meth:`_Problem.margins` at a flat ``v`` with multipliers."""
        d = {"y": v, "shape": self.shape, "grad_f": self.grad_f(v)}
        d["h"], d["Jh"] = self.constraint("h", v)
        d["g"], d["Jg"] = self.constraint("g", v)
        d["lam"] = onp.ravel(onp.asarray(lam, dtype=float))
        d["nu"] = onp.ravel(onp.asarray(nu, dtype=float))
        return d

    def hessian(self, v, lam, nu):
        """The Hessian of the Lagrangian in ``y`` (flat, ``(n, n)``): the Jacobian of
        its gradient, one trace and ``n`` VJPs."""
        pb, shape, inputs = self.problem, self.shape, self.inputs
        lagrangian = lambda u: pb.lagrangian(np.reshape(u, shape), lam, nu, *inputs)
        return _value_and_rows(grad(lagrangian), v)[1]


class _SLSQPPoint:
    """The default forward's byproduct for :class:`_KKTChecked`: the :class:`_Local`
    holding the first-order data at the returned point (not recomputed)."""

    __slots__ = ("local",)

    def __init__(self, local: _Local):
        self.local = local


class _KKTResidual:
    """Paper eq. (27): ``[grad_y L; h(y); diag(nu) g(y)]`` (:func:`nimplicit.kkt.kkt_residual_parts`)."""

    def __init__(self, problem: _Problem):
        self.problem = problem

    def __call__(self, z, *inputs):
        y, lam, nu = z
        pb = self.problem
        stationarity = grad(pb.lagrangian, 0)(y, lam, nu, *inputs)
        eq_values = pb.eq(y, *inputs) if pb.eq is not None else lam
        ineq_values = pb.ineq(y, *inputs) if pb.ineq is not None else 1.0
        return kkt.kkt_residual_parts(stationarity, eq_values, nu, ineq_values)


class _SLSQPSolver:
    """The default forward of :func:`constrained_argmin_layer` (see :func:`_slsqp_kkt`)."""

    def __init__(self, problem: _Problem, y0, tol: float, active_tol: float, max_iter: int):
        self.problem, self.y0, self.tol = problem, y0, tol
        self.active_tol, self.max_iter = active_tol, max_iter

    def __call__(self, *inputs):
        return _slsqp_kkt(self.problem, _initial_guess(self.y0, inputs), inputs,
                          tol=self.tol, active_tol=self.active_tol, max_iter=self.max_iter)


class _KKTChecked:
    """Wrap a forward solver of :func:`constrained_argmin_layer`: its point must satisfy
    primal and dual feasibility, complementarity (scale-free, ``kkt_tol``) and
    second-order sufficiency (``second_order_tol``); typed errors otherwise."""

    def __init__(self, problem: _Problem, solver: Callable, kkt_tol: float,
                 second_order_tol: Optional[float], weak_tol: float):
        self.problem, self.solver = problem, solver
        self.kkt_tol, self.second_order_tol, self.weak_tol = kkt_tol, second_order_tol, weak_tol

    def __call__(self, *inputs):
        z = self.solver(*inputs)
        local = None
        if isinstance(z, Solution) and isinstance(z.aux, _SLSQPPoint):   # the default forward
            z, local = z.y, z.aux.local
        if not (isinstance(z, (tuple, list)) and len(z) == 3):
            raise ShapeError("constrained_argmin_layer: the forward solver must return "
                             f"(y, lam, nu), got {type(z).__name__}")
        y, lam, nu = z
        pb = self.problem
        yv = onp.asarray(y, dtype=float)
        if local is None:
            local = _Local(pb, yv.shape, inputs)
        d = local.point(yv.ravel(), lam, nu)
        if d["nu"].size != d["g"].size or d["lam"].size != d["h"].size:
            raise ShapeError(f"constrained_argmin_layer: the solver returned {d['lam'].size} "
                             f"equality and {d['nu'].size} inequality multipliers for "
                             f"{d['h'].size} equality and {d['g'].size} inequality constraints")
        nu_bar, s_bar, eq_bar = pb.margins(d, signed=True)
        kkt.check_kkt_point("constrained_argmin_layer", eq_bar=eq_bar, nu_bar=nu_bar,
                            s_bar=s_bar, tol=self.kkt_tol)
        # the unsigned margins count a negative multiplier as 0: the same before and after
        # the rounding of nu below, computed once
        nb, sb, _ = pb.margins(d)
        hessians = {}   # the Hessian of the Lagrangian at (y, lam, nu), formed at most once

        def hessian_at(multipliers):
            key = onp.asarray(multipliers, dtype=float).tobytes()
            if key not in hessians:
                hessians[key] = local.hessian(d["y"], lam, multipliers)
            return hessians[key]

        if self.second_order_tol is not None:
            _, inactive = kkt.strict_sets(nb, sb, self.weak_tol)
            C = onp.vstack([d["Jh"], d["Jg"][~inactive]])
            kkt.check_second_order("constrained_argmin_layer", lambda: hessian_at(nu),
                                   C if C.size else None, tol=self.second_order_tol)
        # tiny negative multipliers (within kkt_tol) are rounding: exactly 0
        nu_out = onp.maximum(onp.asarray(nu, dtype=float), 0.0) if onp.size(nu) else nu
        # the weakly active set, decided once here for the backward (KKTLinearSolver)
        weak = kkt.weak_mask(nb, sb, self.weak_tol)
        z = onp.concatenate([onp.ravel(onp.asarray(v, dtype=float)) for v in (y, lam, nu_out)])
        nu_flat = onp.ravel(onp.asarray(nu_out, dtype=float))

        def kkt_jacobian():
            """``dF/dz`` of the residual (eq. 27) at this point from the forward's data:
            ``[[H, Jh', Jg'], [Jh, 0, 0], [diag(nu) Jg, 0, diag(g)]]``."""
            n, p_, mi = d["y"].size, d["h"].size, d["g"].size
            J = onp.zeros((n + p_ + mi,) * 2)
            J[:n, :n] = hessian_at(nu_out)   # the check's Hessian unless nu was rounded
            J[:n, n:n + p_] = d["Jh"].T
            J[:n, n + p_:] = d["Jg"].T
            J[n:n + p_, :n] = d["Jh"]
            J[n + p_:, :n] = nu_flat[:, None] * d["Jg"]
            J[n + p_:, n + p_:] = onp.diag(d["g"])
            return J

        return Solution((y, lam, nu_out), aux=_KKTAux(weak, d["y"].size + d["h"].size,
                                                      _KKTForwardData(z, inputs, kkt_jacobian)))


class _KKTForwardData:
    """The checked forward's data for ``dF/dz``: the flat point ``z`` and the raw
    inputs it belongs to, and a function forming ``dF/dz`` there (from the Hessian
    of the Lagrangian and the constraint Jacobians, instead of one VJP per row)."""

    __slots__ = ("z", "inputs", "jacobian")

    def __init__(self, z: onp.ndarray, inputs: tuple, jacobian: Callable[[], onp.ndarray]):
        self.z, self.inputs, self.jacobian = z, inputs, jacobian


class _KKTAux:
    """What the checked forward hands to :class:`KKTLinearSolver`: the weakly active
    constraints (``weak``, ``(n_ineq,)``), the offset of the complementarity rows in
    ``z = (y, lam, nu)`` and the :class:`_KKTForwardData` (``None`` after pickling)."""

    __slots__ = ("weak", "offset", "forward")

    def __init__(self, weak: onp.ndarray, offset: int, forward: Optional[_KKTForwardData] = None):
        self.weak, self.offset, self.forward = weak, offset, forward

    def __getstate__(self):   # the forward's closures stay behind
        return self.weak, self.offset

    def __setstate__(self, state):
        self.weak, self.offset = state
        self.forward = None

    def dense(self, operator) -> onp.ndarray:
        """``dF/dz`` at the operator's point: formed from the forward's data when the
        point is the forward's own (same ``z``, same inputs); otherwise (a point moved
        by an interceptor, a batch) from VJPs, ``operator.dense()``."""
        fwd, point = self.forward, operator.point
        if (fwd is not None and point is not None and operator.batch_size is None
                and operator.r == operator.m == fwd.z.size
                and len(point.inputs) == len(fwd.inputs)
                and all(a is b for a, b in zip(point.inputs, fwd.inputs))
                and onp.array_equal(point.y_flat, fwd.z)):
            return fwd.jacobian()
        return operator.dense()


class KKTLinearSolver(linear_solvers.LinearSolver):
    """The linear solver of :func:`constrained_argmin_layer` (the core's protocol).

    ``init(operator, aux)`` decides once per forward point, from the forward's
    :class:`_KKTAux`: without a weakly active constraint, ``base`` (``'lu'``: the LU
    of the Ruiz-equilibrated ``J``, :func:`nimplicit.kkt.equilibrated_lu_state`, whose
    condition test is independent of the scales of the objective and of each
    constraint; any other name or :class:`~nimplicit.linear_solvers.LinearSolver` as
    the core builds it, with ``base_options``); with one, the minimum-norm convention
    (those rows of ``J`` zeroed, :class:`~nimplicit.linear_solvers.Lstsq`,
    ``state.exact`` False) and an :class:`~nimplicit.errors.ImplicitGradientWarning`.
    """

    name = "kkt"
    options = {"base": "lu", "base_options": None, "weak_tol": kkt.DEFAULT_WEAK_TOL}

    def init(self, operator, aux=None):
        if not isinstance(aux, _KKTAux):
            raise SolverError("KKTLinearSolver: the forward point carries no KKT data; it is "
                              "the linear solver of constrained_argmin_layer only")
        if aux.weak.any():
            kkt.warn_weak("constrained_argmin_layer", aux.weak, self.opts["weak_tol"])
            return kkt.MinimumNormState(aux.dense(operator)[None], aux.weak[None], aux.offset)
        base, options = self.opts["base"], dict(self.opts["base_options"] or {})
        if base in ("lu", linear_solvers.lu):
            return kkt.equilibrated_lu_state(aux.dense(operator), **options)
        return linear_solvers.make_solver(base, options).init(operator, aux)


def constrained_argmin_layer(objective: Callable, eq: Optional[Callable] = None,
                             ineq: Optional[Callable] = None, solver: Optional[Callable] = None, *,
                             y0=None, tol: float = 1e-12, active_tol: float = 1e-8,
                             weak_tol: float = kkt.DEFAULT_WEAK_TOL, max_iter: int = 500,
                             kkt_tol: float = kkt.DEFAULT_KKT_TOL,
                             second_order_tol: Optional[float] = kkt.DEFAULT_SECOND_ORDER_TOL,
                             **options) -> ImplicitLayer:
    r"""Layer returning a KKT point ``(y, lam, nu)`` of
    ``min_y f(y, x)  s.t.  h(y, x) = 0,  g(y, x) <= 0``.

    The residual is the paper's eq. (27),

    .. math::
        F(y, \lambda, \nu; x) = \begin{bmatrix} \nabla_y f + J_h^T \lambda + J_g^T \nu \\
        h(y) \\ \operatorname{diag}(\nu)\, g(y) \end{bmatrix} = 0,

    differentiated with respect to every input.  ``eq``/``ineq`` return 1-d
    arrays (``None`` for none: then ``lam``/``nu`` are empty).  The default
    forward solver is SLSQP from ``y0``, then multipliers from the active set
    (constraints with scale-free slack ``s_bar_i <= active_tol``, see
    :mod:`nimplicit.kkt`) by least squares and Newton polishing of the active
    KKT system to ``tol``.

    Every forward point (default or user ``solver``) is checked, scale-free
    (:func:`nimplicit.kkt.check_kkt_point`, tolerance ``kkt_tol``): primal
    feasibility (:class:`~nimplicit.errors.PrimalInfeasibleError`), ``nu >= 0``
    (:class:`~nimplicit.errors.DualInfeasibleError`), complementarity
    (:class:`~nimplicit.errors.ComplementarityError`), and second-order
    sufficiency: the Hessian of the Lagrangian positive definite on the null
    space of the equality and (strictly or weakly) active inequality constraints'
    Jacobian (:class:`~nimplicit.errors.NotAMinimumError`;
    ``second_order_tol=None`` skips it).

    A weakly active constraint (:mod:`nimplicit.kkt`: its normalised multiplier
    and slack both ``<= max(weak_tol, 10 x`` the point's complementarity)) makes
    ``dF/dz`` singular: its row of ``dF/dz`` is set to zero and the minimum-norm
    solution (``lstsq``) is used, with an
    :class:`~nimplicit.errors.ImplicitGradientWarning`; the same mechanism and
    meaning of ``weak_tol`` as :func:`reference_layers.qp.qp_layer`.
    """
    weak_tol = kkt.check_weak_tol(weak_tol, "constrained_argmin_layer")
    kkt_tol = _nonnegative(kkt_tol, "kkt_tol")
    if second_order_tol is not None:
        second_order_tol = _nonnegative(second_order_tol, "second_order_tol")
    problem = _Problem(objective, eq, ineq)
    if solver is None:
        _require_y0(y0, "constrained_argmin_layer")
        solver = _SLSQPSolver(problem, y0, _positive(tol, "tol"),
                              _nonnegative(active_tol, "active_tol"),
                              _positive_int(max_iter, "max_iter"))
    solver = _KKTChecked(problem, solver, kkt_tol, second_order_tol, weak_tol)
    base = options.pop("linear_solver", "lu")
    base_options = options.pop("linear_solver_options", None)
    if base not in ("lu", linear_solvers.lu):   # an unknown name fails here, not at the first backward
        linear_solvers.make_solver(base, base_options)
    return implicit_layer(_KKTResidual(problem), solver,
                          linear_solver=KKTLinearSolver(base=base, base_options=base_options,
                                                        weak_tol=weak_tol), **options)


def _objective_scale(grad_at_start: onp.ndarray) -> float:
    """``1 / max(1, |grad f|_inf)`` at the starting point (1 when that is not finite)."""
    size = float(onp.max(onp.abs(grad_at_start))) if grad_at_start.size else 0.0
    return 1.0 / size if onp.isfinite(size) and size > 1.0 else 1.0


def _row_scales(jacobian: onp.ndarray) -> onp.ndarray:
    """``1 / max(1, |row|_inf)`` per row of a constraint Jacobian (1 where not finite)."""
    if not jacobian.size:
        return onp.ones(len(jacobian))
    size = onp.max(onp.abs(jacobian), axis=1)
    return onp.where(onp.isfinite(size) & (size > 1.0), 1.0 / onp.maximum(size, 1.0), 1.0)


def _slsqp_kkt(problem: _Problem, y_init, inputs, *, tol, active_tol, max_iter):
    """SLSQP from ``y_init``, multipliers of the active set by least squares, Newton
    polish of the active KKT system to ``tol``; returns the point and its
    :class:`_SLSQPPoint` (``Solution``)."""
    shape = y_init.shape
    local = _Local(problem, shape, inputs)
    # SLSQP's line search stops early (status 8) away from the solution when the
    # objective's scale is large (an objective times 1e4): it minimizes c f, which has
    # the same minimizer, with c = 1 / max(1, |grad f(y_init)|_inf) (only ever shrinking:
    # a small gradient at y_init says nothing of the scale elsewhere).  A constraint row
    # times 1e4 leaves rounding of 1e-12 in its value, above SLSQP's absolute feasibility
    # test (ftol), which then never passes (iteration limit, status 9): each row is
    # divided by max(1, |its gradient at y_init|_inf) by the same rule.  The multipliers
    # below are fitted to the unscaled problem.
    v0 = y_init.ravel()
    cons = []
    if problem.eq is not None:
        re_ = _row_scales(local.constraint("h", v0)[1])
        cons.append({"type": "eq", "fun": lambda v: re_ * local.eq_values(v),
                     "jac": lambda v: re_[:, None] * local.eq_jac(v)})
    if problem.ineq is not None:
        rg = _row_scales(local.constraint("g", v0)[1])
        cons.append({"type": "ineq", "fun": lambda v: rg * local.ineq_values(v),
                     "jac": lambda v: rg[:, None] * local.ineq_jac(v)})
    c = _objective_scale(local.objective_grad(v0))
    res = scipy.optimize.minimize(lambda v: c * local.objective(v), y_init.ravel(),
                                  jac=lambda v: c * local.objective_grad(v),
                                  constraints=cons, method="SLSQP",
                                  options={"ftol": 1e-15, "maxiter": max_iter})
    # status 8 (positive directional derivative in the line search) is SLSQP stopping at
    # its precision: accepted here, the point is then polished and checked (_KKTChecked)
    if not res.success and res.status not in (8,):
        raise SolverError(f"SLSQP failed: {res.message} (status {res.status}); check feasibility, "
                          f"pass a better y0, or solver=")
    y = onp.asarray(res.x, dtype=float)
    ny = y.size
    h, Jh = local.constraint("h", y)
    g, Jg = local.constraint("g", y)
    p, mi = h.size, g.size
    if mi:
        # scale-free slack: -g_i relative to the terms ||grad g_i|| ||y|| + |grad g_i . y - g_i|
        s_bar = kkt._safe_ratio(-g, onp.linalg.norm(Jg, axis=1) * onp.linalg.norm(y)
                                + onp.abs(Jg @ y - g))
        active = onp.flatnonzero(s_bar <= active_tol)
    else:
        active = onp.zeros(0, dtype=int)
    na = active.size

    # multipliers: least squares on stationarity with y fixed, then Newton on the active
    # KKT system [grad f + Jh' lam + Ja' nu_a; h; g_a] = 0, whose Jacobian is
    # [[H, Jh', Ja'], [Jh, 0, 0], [Ja, 0, 0]] (H: the Hessian of the Lagrangian)
    z = onp.concatenate([y, onp.zeros(p + na)])
    if p + na:
        A = onp.hstack([Jh.T, Jg[active].T])
        z[ny:] = onp.linalg.lstsq(A, -local.grad_f(y), rcond=None)[0]
    for it in range(21):   # at most 20 steps; the data at the final point is kept
        yy, lam, nu_a = z[:ny], z[ny:ny + p], z[ny + p:]
        grad_f = local.grad_f(yy)
        h, Jh = local.constraint("h", yy)
        g, Jg = local.constraint("g", yy)
        Ja = Jg[active]
        r = onp.concatenate([grad_f + Jh.T @ lam + Ja.T @ nu_a, h, g[active]])
        if it == 20 or onp.abs(r).max() <= tol * (1 + onp.abs(z).max()):
            break
        nu = onp.zeros(mi)
        nu[active] = nu_a
        K = onp.zeros((z.size, z.size))
        K[:ny, :ny] = local.hessian(yy, lam, nu)
        K[:ny, ny:] = onp.hstack([Jh.T, Ja.T])
        K[ny:, :ny] = onp.vstack([Jh, Ja])
        step = onp.linalg.lstsq(K, -r, rcond=None)[0]
        z = z + step
    y, lam = z[:ny], z[ny:ny + p]
    nu = onp.zeros(mi)
    nu[active] = z[ny + p:]
    # the signs of nu and the feasibility of y are checked by _KKTChecked, scale-free
    return Solution((y.reshape(shape), lam, nu), aux=_SLSQPPoint(local))
