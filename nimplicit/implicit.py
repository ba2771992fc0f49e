"""The implicit node: an autograd primitive whose derivatives come from the
implicit function theorem.

A layer is a residual ``F(y, *inputs)`` and a forward ``solver(*inputs) -> y*``
with ``F(y*, x) = 0``.  With ``J = dF/dy`` and ``J_i = dF/dx_i`` at ``(y*, x)``:

- reverse mode:  solve ``J^T w = -g``, then ``x_i_bar = J_i^T w``;
- forward mode:  ``y_dot = -J^{-1} sum_i J_i x_i_dot``.

Both Jacobian products are autograd VJPs/JVPs of ``F``.  The linear solves are
themselves a primitive (:func:`_solve`) whose derivative is again a solve with
the same factorization, ``d(A^{-1} b) = A^{-1} (db - dA A^{-1} b)``, and every
product is an autograd-traced call of ``F``, so derivatives of any order
through a layer are correct.  The forward solver only ever sees raw numbers.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Union

import autograd.numpy as np
import numpy as onp
from autograd import make_jvp, make_vjp
from autograd.builtins import tuple as autograd_tuple
from autograd.extend import defjvp_argnums, defvjp_argnums, primitive
from autograd.tracer import getval, isbox

from . import linear_solvers
from .errors import (NonFiniteError, ResidualError, ShapeError, UnsupportedError,
                     finite_or_raise)
from .structure import Structure

_RECORDERS: list = []


@contextlib.contextmanager
def record_points():
    """Collect the :class:`ForwardPoint` of every implicit layer evaluated in the block.

    >>> with record_points() as points:
    ...     fn(*inputs)          # any function that calls implicit layers
    >>> points[0].y, points[0].inputs, points[0].layer

    This is how a checker (``verification.diagnose``) inspects the solutions
    and Jacobians inside an arbitrary composition of layers.
    """
    points: list = []
    _RECORDERS.append(points)
    try:
        yield points
    finally:
        _RECORDERS.remove(points)


#: largest number of unknowns per instance for which ``linear_solver='auto'``
#: forms J_F,y densely; above it the matrix-free GMRES/LSMR are used.
DENSE_MAX = 200


class ForwardPoint:
    """Everything the derivative rules need at one solution ``(y*, x)``.

    Holds the raw values, the flattened residual, the linear solver and the
    ``cache`` in which solvers keep their factorizations: one per forward point,
    shared by every VJP, JVP and higher-order solve at that point.

    Attributes
    ----------
    y : the solver's output, as it returned it (raw numbers)
    inputs : tuple of the raw inputs
    y_flat : ``(m,)`` or ``(B, m)`` flattened ``y``
    m, r : unknowns and equations per instance
    cache : dict for factorizations (see :mod:`nimplicit.linear_solvers`)
    """

    def __init__(self, layer: "ImplicitLayer", y, inputs: tuple):
        self.layer = layer
        self.y = y
        self.inputs = inputs
        self.y_structure = Structure(y, layer.batch_axis, "the solver's output")
        self.y_flat = onp.asarray(self.y_structure.flatten(tuple(onp.asarray(p, float) for p in y)
                                                          if self.y_structure.is_tuple
                                                          else onp.asarray(y, float)), dtype=float)
        raw_res = layer.residual(self.y_structure.unflatten(self.y_flat), *inputs)
        finite_or_raise(raw_res, "the residual at the solver's output")
        self.res_structure = Structure(raw_res, layer.batch_axis, "the residual")
        if self.res_structure.batch_size != self.y_structure.batch_size:
            raise ShapeError(f"the residual has {self.res_structure.batch_size} instances along "
                             f"batch_axis but the solver's output has {self.y_structure.batch_size}")
        self.m, self.r = self.y_structure.size, self.res_structure.size
        self.res_flat = onp.asarray(self.res_structure.flatten(raw_res), dtype=float)
        self.cache: dict = {}
        self.linear_solver = None     # chosen by the layer for this point
        self._vjp_y = None
        for recorder in _RECORDERS:
            recorder.append(self)

    # -- the residual as a function of flat vectors (traceable) --------------
    def F(self, y_flat, *inputs):
        return self.res_structure.flatten(
            self.layer.residual(self.y_structure.unflatten(y_flat), *inputs))

    # -- products with J = dF/dy at any (possibly boxed) point ----------------
    def J_T(self, w, y_flat, inputs):
        """``J^T w``, an autograd VJP of F in y."""
        if not (isbox(y_flat) or any(isbox(x) for x in inputs)):
            if self._vjp_y is None:   # trace F once per point, reuse for every product
                self._vjp_y = make_vjp(lambda yy: self.F(yy, *self.inputs))(self.y_flat)[0]
            return self._vjp_y(w)
        return make_vjp(lambda yy: self.F(yy, *inputs))(y_flat)[0](w)

    def J(self, u, y_flat, inputs):
        """``J u``, an autograd JVP (forward mode) of F in y."""
        return make_jvp(lambda yy: self.F(yy, *inputs))(y_flat)(u)[1]

    def solve_raw(self, b, transpose: bool):
        """Solve ``J^T x = b`` (transpose) or ``J x = b`` at this point, raw numbers."""
        b = onp.asarray(b, dtype=float)
        finite_or_raise(b, "the right-hand side of the implicit linear solve (a cotangent or tangent)")
        at = (self.y_flat, self.inputs)
        mv = lambda w: onp.asarray(self.J_T(w, *at)) if transpose else onp.asarray(self.J(w, *at))
        rmv = lambda u: onp.asarray(self.J(u, *at)) if transpose else onp.asarray(self.J_T(u, *at))
        x = self.linear_solver(mv, rmv, b, transpose=transpose,
                                     x_size=self.r if transpose else self.m,
                                     cache=self.cache, point=self, **self.layer.linear_solver_options)
        x = onp.asarray(x, dtype=float)
        if not onp.all(onp.isfinite(x)):
            raise NonFiniteError("the implicit linear solve returned NaN or Inf: J_F,y is singular "
                                 "or the linear solver failed; try linear_solver='lstsq' or ridge=...")
        return x


# ------------------------------------------------------------------------------
# the linear-solve primitive: x = A(theta)^{-1} b, A = J^T (transpose) or J
# ------------------------------------------------------------------------------

@primitive
def _solve(point: ForwardPoint, transpose: bool, b, y_flat, *inputs):
    return point.solve_raw(b, transpose)


def _apply_A(point, transpose, v, y_flat, inputs):
    return point.J_T(v, y_flat, inputs) if transpose else point.J(v, y_flat, inputs)


def _require_invertible(point):
    if point.cache.get("pseudo_inverse"):
        raise UnsupportedError(
            "derivatives of order >= 2 through a least-squares / ridge solve of J_F,y are not "
            "implemented (d(A^+) has extra terms); use a square, well-conditioned residual.")


def _solve_vjp(argnums, x, args, kwargs):
    point, transpose, b, y_flat, inputs = args[0], args[1], args[2], args[3], args[4:]
    _require_invertible(point)

    def vjp(g):
        # b_bar = A^{-T} g;  theta_bar = -(d(A x)/d theta)^T b_bar
        b_bar = _solve(point, not transpose, g, y_flat, *inputs)
        grads = {2: b_bar}
        theta_nums = [k for k in argnums if k >= 3]
        if theta_nums:
            theta = (y_flat,) + tuple(inputs)

            def A_x(sel):
                full = list(theta)
                for k, v in zip(theta_nums, sel):
                    full[k - 3] = v
                return _apply_A(point, transpose, x, full[0], tuple(full[1:]))

            pull = make_vjp(A_x)(tuple(theta[k - 3] for k in theta_nums))[0](-b_bar)
            grads.update(zip(theta_nums, pull))
        return tuple(grads[k] for k in argnums)
    return vjp


def _solve_jvp(argnums, dots, x, args, kwargs):
    point, transpose, b, y_flat, inputs = args[0], args[1], args[2], args[3], args[4:]
    _require_invertible(point)
    rhs = 0.0
    theta_dots = {}
    for k, d in zip(argnums, dots):
        if k == 2:
            rhs = rhs + d
        else:
            theta_dots[k] = d
    if theta_dots:
        theta = (y_flat,) + tuple(inputs)
        nums = sorted(theta_dots)

        def A_x(sel):
            full = list(theta)
            for k, v in zip(nums, sel):
                full[k - 3] = v
            return _apply_A(point, transpose, x, full[0], tuple(full[1:]))

        dA_x = make_jvp(A_x)(tuple(theta[k - 3] for k in nums))(tuple(theta_dots[k] for k in nums))[1]
        rhs = rhs - dA_x
    return _solve(point, transpose, rhs + np.zeros(np.shape(x)), y_flat, *inputs)


defvjp_argnums(_solve, _solve_vjp)
defjvp_argnums(_solve, _solve_jvp)


# ------------------------------------------------------------------------------
# the implicit node: y* = solver(x), differentiated through F(y*, x) = 0
# ------------------------------------------------------------------------------

@primitive
def _node(point: ForwardPoint, *inputs):
    return point.y_flat


def _input_products(point, y_flat, inputs, argnums):
    """The function ``sel -> F(y, inputs with the argnums replaced by sel)``."""
    nums = [k - 1 for k in argnums]

    def F_of(sel):
        full = list(inputs)
        for i, v in zip(nums, sel):
            full[i] = v
        return point.F(y_flat, *full)
    return F_of, tuple(inputs[i] for i in nums)


def _node_vjp(argnums, y_flat, args, kwargs):
    point, inputs = args[0], args[1:]
    F_of, sel = _input_products(point, y_flat, inputs, argnums)
    raw = not (isbox(y_flat) or any(isbox(x) for x in inputs))
    if raw:   # first order: trace F in the inputs once, reuse for every cotangent
        pull_inputs = point.cache.get(("pull", tuple(argnums)))
        if pull_inputs is None:
            pull_inputs = point.cache[("pull", tuple(argnums))] = make_vjp(F_of)(sel)[0]
    else:
        pull_inputs = make_vjp(F_of)(sel)[0]

    def vjp(g):
        w = _solve(point, True, -g, y_flat, *inputs)        # J^T w = -g
        return pull_inputs(w)                               # x_i_bar = J_i^T w
    return vjp


def _node_jvp(argnums, dots, y_flat, args, kwargs):
    point, inputs = args[0], args[1:]
    F_of, sel = _input_products(point, y_flat, inputs, argnums)
    Jx_dot = make_jvp(F_of)(sel)(tuple(dots))[1]           # sum_i J_i x_i_dot
    return _solve(point, False, -Jx_dot, y_flat, *inputs)   # J y_dot = -J_x x_dot


defvjp_argnums(_node, _node_vjp)
defjvp_argnums(_node, _node_jvp)


# ------------------------------------------------------------------------------
# the public layer
# ------------------------------------------------------------------------------

def _max_abs(value) -> float:
    parts = value if isinstance(value, (tuple, list)) else (value,)
    out = 0.0
    for p in parts:
        a = onp.asarray(p)
        if a.size and a.dtype.kind in "fiub":
            out = max(out, float(a.max()), -float(a.min()))   # no |a| temporary
        elif a.size and a.dtype.kind == "c":
            out = max(out, float(onp.abs(a).max()))
    return out


class ImplicitLayer:
    """A differentiable layer ``x -> y*`` defined by ``F(y*, x) = 0``.

    Build it with :func:`implicit_layer`; call it as ``layer(*inputs)``.
    """

    def __init__(self, residual, solver, *, linear_solver="auto", ridge: float = 0.0,
                 batch_axis: Optional[int] = None, residual_tol: float = 1e-6,
                 check_residual: bool = True, dense_max: int = DENSE_MAX,
                 linear_solver_options: Optional[dict] = None, diagnostics=None,
                 name: Optional[str] = None, **solver_options_unused):
        if solver_options_unused:
            raise TypeError(f"implicit_layer got unknown options {sorted(solver_options_unused)}")
        self.residual = residual
        self.solver = solver
        self.diagnostics = diagnostics
        self.name = name or getattr(residual, "__qualname__", "implicit_layer")
        self.batch_axis = batch_axis
        self.residual_tol = residual_tol
        self.check_residual = check_residual
        self.dense_max = dense_max
        self.ridge = float(ridge)
        self.linear_solver_name = linear_solver
        self.linear_solver_options = dict(linear_solver_options or {})
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if linear_solver != "auto":
            self.linear_solver = linear_solvers.get(linear_solver)
            if self.ridge and linear_solver not in ("lstsq", "lsmr") and not callable(linear_solver):
                raise UnsupportedError(f"ridge={ridge} needs linear_solver='lstsq' or 'lsmr' "
                                       f"(got {linear_solver!r})")
        if self.ridge:
            self.linear_solver_options.setdefault("ridge", self.ridge)
        self.last_point: Optional[ForwardPoint] = None

    def _choose_solver(self, point: ForwardPoint):
        if self.linear_solver_name != "auto":
            return self.linear_solver
        if point.r != point.m and not self.ridge:
            raise ShapeError(
                f"the residual has {point.r} entries per instance but the solver's output has "
                f"{point.m}: dF/dy is not square. Choose linear_solver='lstsq' (minimum-norm "
                f"solution) or 'lsmr', or ridge=..., explicitly, or fix the residual.")
        dense = point.m <= self.dense_max
        if self.ridge:
            return linear_solvers.lstsq if dense else linear_solvers.lsmr
        return linear_solvers.lu if dense else linear_solvers.gmres

    def solve_forward(self, *raw_inputs) -> ForwardPoint:
        """Run the forward solver on raw inputs and check its output."""
        for k, x in enumerate(raw_inputs):
            finite_or_raise(x, f"input {k}")
        y = self.solver(*raw_inputs)
        if isinstance(y, list):
            y = tuple(y)
        finite_or_raise(y, "the solver's output")
        point = ForwardPoint(self, y, raw_inputs)
        point.linear_solver = self._choose_solver(point)
        if point.r != point.m and point.linear_solver in (linear_solvers.lu, linear_solvers.cholesky):
            raise ShapeError(
                f"the residual has {point.r} entries per instance but the solver's output has "
                f"{point.m}; linear_solver={self.linear_solver_name!r} needs a square dF/dy. "
                f"Use 'lstsq' or 'lsmr', or fix the residual.")
        if self.check_residual:
            self._check_residual(point)
        return point

    def _check_residual(self, point: ForwardPoint):
        res = point.res_flat.reshape(-1, point.r) if point.res_flat.ndim > 1 else point.res_flat[None]
        norms = onp.abs(res).max(axis=1) if point.r else onp.zeros(len(res))
        scale = 1.0 + _max_abs(point.y)
        if (norms > self.residual_tol * scale).any():   # the inputs only ever raise the scale
            scale += max((_max_abs(x) for x in point.inputs), default=0.0)
        tol = self.residual_tol * scale
        bad = onp.flatnonzero(norms > tol)
        if bad.size:
            where = f" at batch instance {int(bad[0])} ({bad.size} of {len(norms)} instances)" \
                if self.batch_axis is not None else ""
            raise ResidualError(
                f"the residual is not met at the solver's output{where}: max|F(y*, x)| = "
                f"{norms[bad[0]]:.3g} > tolerance {tol:.3g} (residual_tol={self.residual_tol:g} "
                f"times the problem scale {scale:.3g}). Tighten the forward solver, check that "
                f"the residual and the solver describe the same problem, or pass residual_tol=.")

    def __call__(self, *inputs):
        point = self.solve_forward(*[getval(x) for x in inputs])
        self.last_point = point
        y = point.y_structure.unflatten(_node(point, *inputs))
        if point.y_structure.is_tuple and any(isbox(x) for x in inputs):
            # a plain tuple of boxes is invisible to autograd's make_jvp/make_vjp
            # on the layer itself (they would silently return zeros): box it
            y = autograd_tuple(y)
        return y


def implicit_layer(residual: Callable[..., Any], solver: Callable[..., Any], *,
                   linear_solver: Union[str, Callable] = "auto", ridge: float = 0.0,
                   batch_axis: Optional[int] = None, residual_tol: float = 1e-6,
                   check_residual: bool = True, dense_max: int = DENSE_MAX,
                   linear_solver_options: Optional[dict] = None,
                   diagnostics: Optional[Callable] = None,
                   name: Optional[str] = None) -> ImplicitLayer:
    r"""A layer ``x -> y*`` defined implicitly by ``F(y*, x) = 0``.

    Parameters
    ----------
    residual : callable
        ``residual(y, *inputs)``, written with ``autograd.numpy``; returns an
        array or a tuple of arrays with as many entries (per instance) as ``y``
        (or any number with ``linear_solver='lstsq'``/``'lsmr'``/``ridge``).
    solver : callable
        ``solver(*inputs) -> y``; any code, called on raw numbers only and never
        differentiated.  ``y`` is an array of any shape or a tuple of arrays.
    linear_solver : str or callable
        How ``J = dF/dy`` is solved: ``'auto'`` (LU for up to ``dense_max``
        unknowns per instance, else GMRES), ``'lu'``, ``'cholesky'`` (symmetric
        positive definite J), ``'lstsq'`` (minimum norm, any shape), the
        matrix-free ``'cg'``, ``'minres'`` (symmetric J), ``'gmres'``,
        ``'bicgstab'``, ``'lsmr'``, or a callable
        ``solve(matvec, rmatvec, b, **opts)`` (see :mod:`nimplicit.linear_solvers`).
    ridge : float
        Tikhonov damping ``min |A x - b|^2 + ridge |x|^2``; selects ``lstsq``
        (dense) or ``lsmr`` (matrix-free) under ``'auto'``.
    batch_axis : int, optional
        Axis of every component of ``y`` and of the residual that indexes
        independent instances: J is block diagonal, its blocks come from
        ``m`` VJPs of the batched residual and ``B`` small systems are solved.
    residual_tol : float
        The forward check ``max|F(y*, x)| <= residual_tol * (1 + max|y*| + max|x|)``,
        per instance; else :class:`~nimplicit.errors.ResidualError`.
    check_residual : bool
        Turn that check off (not recommended).
    dense_max : int
        See ``linear_solver='auto'``.
    linear_solver_options : dict
        Keyword options for the linear solver (``rtol``, ``maxiter``,
        ``max_condition``, ``rcond``, ``preconditioner``, ``refinements``, ...;
        see :mod:`nimplicit.linear_solvers`).
    diagnostics : callable, optional
        ``diagnostics(point) -> dict`` of layer-specific well-posedness measures
        at a :class:`ForwardPoint` (e.g. a strict-complementarity margin or an
        eigen-gap): ``{name: (value, ok, why)}``; read by checkers.
    name : str, optional
        How checkers and error reports name the layer (default: the residual's name).

    Returns
    -------
    ImplicitLayer
        ``layer(*inputs)`` returns the solver's ``y`` (same structure) and is
        differentiable by autograd in every input: ``grad``, ``jacobian``,
        ``make_vjp``, ``make_jvp`` and any order (``hessian``, ``grad(grad)``).

    Notes
    -----
    Reverse mode solves ``J^T w = -g`` then returns ``x_i_bar = (dF/dx_i)^T w``;
    forward mode returns ``y_dot = -J^{-1} sum_i (dF/dx_i) x_i_dot``.  All
    solves at one forward point share one factorization.
    """
    return ImplicitLayer(residual, solver, linear_solver=linear_solver, ridge=ridge,
                         batch_axis=batch_axis, residual_tol=residual_tol,
                         check_residual=check_residual, dense_max=dense_max,
                         linear_solver_options=linear_solver_options, diagnostics=diagnostics,
                         name=name)
