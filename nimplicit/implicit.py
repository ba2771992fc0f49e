"""The implicit node: an autograd primitive whose derivatives come from the
implicit function theorem.

A layer is a residual ``F(y, *inputs)`` and a forward ``solver(*inputs) -> y*``
with ``F(y*, x) = 0``.  With ``J = dF/dy`` and ``J_i = dF/dx_i`` at ``(y*, x)``:

- reverse mode:  solve ``J^T w = -g``, then ``x_i_bar = J_i^T w``;
- forward mode:  ``y_dot = -J^{-1} sum_i J_i x_i_dot``.

Data flow at one forward point::

    solver(*x) -> y or Solution(y, aux, status)     (raw numbers, never traced)
        -> residual check (per equation)
        -> ForwardPoint: y, aux, operator J (autograd products)
        -> linear_solver.init(operator, aux): a state built ONCE, on the first solve
        -> every VJP, JVP, higher-order solve: state.solve(b, transpose)

The linear solves are themselves a primitive (:func:`_solve`) whose derivative
is again a solve with the same state, ``d(A^{-1} b) = A^{-1} (db - dA A^{-1} b)``
(only when ``state.exact``), and every product is an autograd-traced call of
``F``, so derivatives of any order through a layer are correct.  Nothing of a
forward point is kept on the layer: it lives as long as autograd's graph (or a
:func:`record_points` list) refers to it.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Callable, Iterator, List, Optional, Union

import autograd.numpy as anp
import numpy as np
from autograd import make_jvp, make_vjp
from autograd.builtins import tuple as autograd_tuple
from autograd.core import VJPNode, add_outgrads, primitive_vjps, vspace
from autograd.extend import defjvp_argnums, defvjp_argnums, primitive
from autograd.tracer import getval, isbox, new_box, trace_stack
from autograd.util import toposort

from . import batch_status, linear_solvers
from .errors import (CouplingError, DTypeError, NonFiniteError, OptionError, ResidualError,
                     ShapeError, UnsupportedError, finite_or_raise, where)
from .structure import Structure, substitute

#: largest number of unknowns per instance for which ``linear_solver='auto'``
#: may form J_F,y densely; above it the matrix-free GMRES/LSMR are used.
DENSE_MAX = 200

#: smallest number of unknowns for which ``linear_solver='auto'`` (square J, one
#: instance, ``throw=True``) solves by GMRES first (``krylov_or_dense`` with its
#: singularity probe) instead of forming J from ``m`` VJPs; below it, the LU.
KRYLOV_MIN = 64


# ------------------------------------------------------------------------------
# what a forward solver returns
# ------------------------------------------------------------------------------

class Solution:
    """A forward solver's result with its byproducts.

    A solver may return ``Solution(y, aux, status)`` instead of a plain ``y``.

    Parameters
    ----------
    y : array or tuple of arrays
        The solution ``y*`` (raw numbers).
    aux : any, optional
        Byproducts of the forward solve (a factorization, an active set,
        an eigenbasis ...).  Never differentiated and never recomputed: it is
        handed to the linear solver's ``init(operator, aux)`` and is available
        to diagnostics as ``point.aux``.
    status : any, optional
        The solver's own report (e.g. iteration counts), kept as ``point.status``.
        Per-instance failures for ``throw=False``: a :class:`~nimplicit.BatchStatus`,
        or any object (or dict) with a boolean ``instance_ok`` array of shape ``(B,)``.
    """

    __slots__ = ("y", "aux", "status")

    def __init__(self, y, aux: Any = None, status: Any = None):
        self.y, self.aux, self.status = y, aux, status

    def __repr__(self):
        return f"Solution(y={self.y!r}, aux={type(self.aux).__name__}, status={self.status!r})"


def _as_solution(out) -> Solution:
    if isinstance(out, Solution):
        y = out.y
        out = Solution(tuple(y) if isinstance(y, list) else y, out.aux, out.status)
        return out
    return Solution(tuple(out) if isinstance(out, list) else out)


# ------------------------------------------------------------------------------
# recording and intercepting forward points (context-local, no global lists)
# ------------------------------------------------------------------------------

_RECORDERS: contextvars.ContextVar = contextvars.ContextVar("nimplicit_recorders", default=())
_INTERCEPTORS: contextvars.ContextVar = contextvars.ContextVar("nimplicit_interceptors", default=())


@contextlib.contextmanager
def record_points() -> Iterator[List["ForwardPoint"]]:
    """Collect the :class:`ForwardPoint` of every implicit layer evaluated in the block.

    >>> import numpy as onp
    >>> sqrt_layer = implicit_layer(lambda y, x: y ** 2 - x, lambda x: onp.sqrt(x))
    >>> with record_points() as points:
    ...     y = sqrt_layer(4.0)          # any code that calls implicit layers
    >>> len(points), float(points[0].y), points[0].inputs
    (1, 2.0, (4.0,))

    Each point also holds ``aux`` and ``status`` (the forward's
    :class:`Solution` byproducts) and the ``layer``.

    The recording is local to the current thread / context (``contextvars``);
    the points live as long as the returned list.
    """
    points: list = []
    token = _RECORDERS.set(_RECORDERS.get() + (points,))
    try:
        yield points
    finally:
        _RECORDERS.reset(token)


@contextlib.contextmanager
def intercept_forward(intercept: Callable[["ImplicitLayer", tuple, Solution], Optional[Solution]],
                      *, check_residual: Optional[bool] = None) -> Iterator[None]:
    """Within the block, let ``intercept`` see (and replace) every forward solution.

    After a layer's forward solver returns, ``intercept(layer, raw_inputs,
    solution)`` is called with the :class:`Solution`; if it returns a
    ``Solution`` that one is used instead (e.g. a deliberately perturbed ``y``
    for a mutation test).  ``check_residual=False`` turns the residual check off
    for the layers evaluated in the block (a perturbed point is not a
    solution).  Local to the current context; nothing is patched.
    """
    token = _INTERCEPTORS.set(_INTERCEPTORS.get() + ((intercept, check_residual),))
    try:
        yield
    finally:
        _INTERCEPTORS.reset(token)


# ------------------------------------------------------------------------------
# a traced function, replayed for many cotangents (first order, raw numbers)
# ------------------------------------------------------------------------------

def _is_float32(a) -> bool:
    """Whether ``a`` is a float32 array or scalar (a tuple input is not)."""
    return getattr(a, "dtype", None) == np.float32


def _is_f64(a) -> bool:
    """A plain float64 array or a Python / NumPy float (not a box, not complex, not float32)."""
    return (type(a) is np.ndarray and a.dtype == np.float64) or isinstance(a, float)


def _selected(argnums, fs) -> Callable:
    """A node VJP ``g -> (fs[k](g) for k in argnums)``, the tuple autograd's node expects."""
    fs = [fs[k] for k in argnums]
    if len(fs) == 1:
        f = fs[0]
        return lambda g: (f(g),)
    return lambda g: tuple(f(g) for f in fs)


def _elementwise(*vjps):
    """A fast VJP maker for an elementwise primitive ``f(x[, y])``: ``vjps[k](g, *args)``
    is the VJP in argument ``k``, the same expression as autograd's.  Applies when every
    argument is a float64 array or a number (a Python int too) and no differentiated
    argument is broadcast (autograd's ``unbroadcast`` would then be the identity)."""
    def maker(argnums, ans, args, kwargs):
        if kwargs or len(args) != len(vjps) or not _is_f64(ans) or not all(
                _is_f64(a) or type(a) is int for a in args):
            return None
        if any(np.shape(args[k]) != np.shape(ans) for k in argnums):
            return None
        return _selected(argnums, [lambda g, f=f: f(g, *args) for f in vjps])
    return maker


def _unary(factor, vjp):
    """Fast VJP maker for an elementwise unary ``f(x)``: ``c = factor(ans, x)`` is computed
    once per tape and ``vjp(g, c)`` reproduces autograd's expression with it (e.g. tanh:
    autograd's ``g / cosh(x)**2`` is ``g / c`` with ``c = cosh(x)**2``)."""
    def maker(argnums, ans, args, kwargs):
        if kwargs or len(args) != 1 or not (_is_f64(ans) and _is_f64(args[0])):
            return None
        c = factor(ans, args[0])
        return lambda g: (vjp(g, c),)
    return maker


def _product(argnums, ans, args, kwargs):
    """Fast VJP of ``dot`` / ``matmul`` of float64 matrices and vectors (ndim 1 or 2, not
    both 1): BLAS products in place of autograd's ``tensordot`` / ``expand_dims`` chains."""
    if kwargs or len(args) != 2 or not all(type(a) is np.ndarray and a.dtype == np.float64
                                           for a in args):
        return None
    A, B = args
    if A.ndim not in (1, 2) or B.ndim not in (1, 2) or A.ndim + B.ndim == 2:
        return None
    # written for a stack of cotangents too (leading axes of g, see _Tape.rows)
    if A.ndim == 2 and B.ndim == 1:
        fs = (lambda g: np.multiply.outer(g, B), lambda g: np.dot(g, A))
    elif A.ndim == 1:
        fs = (lambda g: np.dot(g, B.T), lambda g: A[:, None] * np.expand_dims(g, -2))
    else:
        fs = (lambda g: np.dot(g, B.T), lambda g: np.matmul(A.T, g))
    return _selected(argnums, fs)


def _transpose(argnums, ans, args, kwargs):
    """Fast VJP of ``transpose(x)`` (``x.T``, no axes) of a vector or matrix: ``g.T``, as
    autograd's (the last two axes, for a stack of cotangents)."""
    if kwargs or len(args) != 1 or not (type(args[0]) is np.ndarray and args[0].ndim <= 2
                                        and _is_f64(ans)):
        return None
    if args[0].ndim < 2:
        return lambda g: (g,)
    return lambda g: (np.swapaxes(g, -1, -2),)


#: primitive -> maker of a faster first-order VJP on raw float64 values (None where
#: it does not apply): the same numbers as autograd's VJP (up to the summation order
#: of a BLAS product), without its per-call wrapping, metadata and broadcasting checks.
#: Each also maps a stack of cotangents (extra leading axes) row by row, so a tape of
#: such nodes forms J in one replay (:meth:`_Tape.rows`).
_FAST_VJPS = {
    anp.add: _elementwise(lambda g, x, y: g, lambda g, x, y: g),
    anp.subtract: _elementwise(lambda g, x, y: g, lambda g, x, y: -g),
    anp.multiply: _elementwise(lambda g, x, y: y * g, lambda g, x, y: x * g),
    anp.true_divide: _elementwise(lambda g, x, y: g / y, lambda g, x, y: -g * x / y ** 2),
    anp.negative: _elementwise(lambda g, x: -g),
    anp.tanh: _unary(lambda ans, x: np.cosh(x) ** 2, lambda g, c: g / c),
    anp.exp: _unary(lambda ans, x: ans, lambda g, c: c * g),
    anp.log: _unary(lambda ans, x: x, lambda g, c: g / c),
    anp.sin: _unary(lambda ans, x: np.cos(x), lambda g, c: g * c),
    anp.cos: _unary(lambda ans, x: np.sin(x), lambda g, c: -g * c),
    anp.sqrt: _unary(lambda ans, x: x ** -0.5, lambda g, c: g * 0.5 * c),
    anp.square: _unary(lambda ans, x: x, lambda g, c: g * 2 * c),
    anp.dot: _product,
    anp.matmul: _product,
    anp.transpose: _transpose,
}


class _TapeNode(VJPNode):
    """A node of a :class:`_Tape`: for the primitives of :data:`_FAST_VJPS` on plain
    float64 values a faster VJP (``fast``, else None), used for raw cotangents;
    autograd's own (:meth:`autograd_vjp`) is built only when needed (any other
    primitive or value, or a boxed cotangent)."""

    __slots__ = ("fast", "recipe", "size")

    def __init__(self, value, fun, args, kwargs, parent_argnums, parents):
        self.size = np.size(value)
        maker = _FAST_VJPS.get(fun)
        self.fast = None if maker is None else maker(parent_argnums, value, args, kwargs)
        self.recipe = None
        if self.fast is None:
            super().__init__(value, fun, args, kwargs, parent_argnums, parents)
        else:
            self.parents, self.vjp = parents, None
            self.recipe = (fun, value, args, kwargs, parent_argnums)

    def autograd_vjp(self) -> Callable:
        """autograd's VJP of this node (built on first use)."""
        if self.vjp is None:
            fun, value, args, kwargs, argnums = self.recipe
            self.vjp = primitive_vjps[fun](argnums, value, args, kwargs)
        return self.vjp

    def initialize_root(self):
        super().initialize_root()
        self.fast = self.recipe = None
        self.size = 0


def _add_outgrads(prev, g):
    """autograd's ``add_outgrads`` (the sum of the cotangents reaching a node), inlined
    for plain arrays: the same sums (``prev + g``, then in place), without a vspace per add."""
    if type(g) is not np.ndarray or (prev is not None and type(prev[0]) is not np.ndarray):
        return add_outgrads(prev, g)
    if prev is None:
        return g, False
    total, mutable = prev
    if mutable:             # a sum made here: ours to update
        total += g
        return total, True
    return total + g, True


class _Tape:
    """``fun(*args)`` traced once by autograd at raw ``args``, each argument its own root.

    ``tape.vjp(g)`` returns the tuple ``(d<fun, g>/d arg_k)_k`` by one backward
    pass over the recorded graph, in a topological order computed once.  The
    same numbers as ``autograd.make_vjp`` (the same node VJPs, accumulated by
    autograd's ``add_outgrads``), without two per-call costs of it:

    - the topological sort of the graph on every call (a product in a Krylov
      solve is one call);
    - for several arguments, ``make_vjp`` traces one tuple: the VJP of each
      ``tuple[k]`` is a sparse object added into zeros of the WHOLE tuple, one
      allocation and one pass over every argument (an ``N x N`` parameter) per
      argument and per call.

    Only for raw (unboxed) arguments and cotangents: the higher-order paths
    keep ``make_vjp``, whose backward pass is itself traced.
    """

    __slots__ = ("args", "roots", "end", "order", "steps", "dtypes", "batchable", "widest")

    def __init__(self, fun: Callable, args: tuple):
        self.args = args
        self.roots = {}
        with trace_stack.new_trace() as t:
            boxes = []
            for k, a in enumerate(args):
                root = _TapeNode.new_root()
                self.roots[root] = k
                boxes.append(new_box(a, t, root))
            out = fun(*boxes)
            ours = isbox(out) and out._trace == t
        self.end = out._node if ours else None
        self.order = list(toposort(self.end)) if ours else []
        # (node, its argument index if a root, its parents, its fast VJP), in order
        self.steps = [(node, self.roots.get(node), node.parents, node.fast)
                      for node in self.order]
        # autograd's tuple path returns a float32 argument's gradient as float32
        self.dtypes = [np.float32 if _is_float32(a) else None for a in args]
        # every node has a fast VJP (they map stacks of cotangents row by row): see rows()
        self.batchable = ours and all(k is not None or fast is not None
                                      for _, k, _, fast in self.steps)
        self.widest = max([node.size for node in self.order] + [1])

    def vjp(self, g) -> tuple:
        grads = [None] * len(self.args)
        if self.end is not None:
            outgrads = {self.end: (g, False)}
            raw = not isbox(g)      # then every outgrad is raw too: the fast VJPs apply
            for node, k, parents, fast in self.steps:
                outgrad = outgrads.pop(node)[0]
                if k is not None:
                    grads[k] = outgrad
                    continue
                vjp = fast if raw and fast is not None else node.autograd_vjp()
                for parent, ingrad in zip(parents, vjp(outgrad)):
                    outgrads[parent] = _add_outgrads(outgrads.get(parent), ingrad)
        out = []
        for a, gk, dtype in zip(self.args, grads, self.dtypes):
            if gk is None:      # fun does not depend on this argument
                gk = vspace(a).zeros()
            elif dtype is not None and not isbox(gk) and getattr(gk, "dtype", None) != dtype:
                # a boxed gk (the VJP differentiated in its cotangent) keeps its dtype:
                # autograd's astype has no JVP
                gk = np.asarray(gk).astype(dtype)
            out.append(gk)
        return tuple(out)

    def rows(self, r: int) -> np.ndarray:
        """``(r, n)``: the rows ``d<fun, e_k>/d args[0]`` for the ``r`` unit cotangents
        ``e_k`` of a flat ``(r,)`` output (for ``J^T``: ``J`` itself), by replaying stacks
        of unit cotangents (of at most :data:`STACK_ELEMENTS` entries per node), when
        :attr:`batchable`; the same numbers as ``r`` replays, up to the summation order
        of the BLAS products."""
        chunk = max(1, STACK_ELEMENTS // self.widest)
        rows = None
        for lo in range(0, r, chunk):
            hi = min(r, lo + chunk)
            units = np.zeros((hi - lo, r))
            units[np.arange(hi - lo), np.arange(lo, hi)] = 1.0
            part = np.asarray(self.vjp(units)[0], dtype=float)
            if rows is None:
                rows = np.empty((r,) + part.shape[1:])
            rows[lo:hi] = part
        return rows


#: largest number of entries of one node's stack of cotangents in :meth:`_Tape.rows`
STACK_ELEMENTS = 2 ** 22


# ------------------------------------------------------------------------------
# the forward point
# ------------------------------------------------------------------------------

class JacobianOperator(linear_solvers.Operator):
    """``J = dF/dy`` at a forward point (raw numbers), as a linear-solver operator."""

    def __init__(self, point: "ForwardPoint"):
        super().__init__(point.r, point.m, point.y_structure.batch_size, point)

    def mv(self, u):
        p = self.point
        return np.asarray(p.J(np.asarray(u, float), p.y_flat, p.inputs), dtype=float)

    def rmv(self, w):
        p = self.point
        return np.asarray(p.raw_J_T(np.asarray(w, float)), dtype=float)

    def dense_is_cheap(self) -> bool:
        """Whether J forms in one replay of the residual's tape (one instance, every node
        with a fast VJP: see ``_Tape.rows``) instead of ``r`` products."""
        return self.batch_size is None and self.point.y_tape().batchable

    def dense(self) -> np.ndarray:
        if self._dense is None and self.dense_is_cheap():
            self._dense = self.point.y_tape().rows(self.r)
        return super().dense()


class ForwardPoint:
    """Everything the derivative rules need at one solution ``(y*, x)``.

    Attributes
    ----------
    layer : the :class:`ImplicitLayer`
    y : the solver's output, as it returned it (raw numbers)
    aux, status : the byproducts and status of a :class:`Solution` (or None)
    inputs : tuple of the raw inputs
    y_flat : ``(m,)`` or ``(B, m)`` flattened ``y``
    m, r : unknowns and equations per instance
    operator : :class:`JacobianOperator`, J at this point
    linear_solver : the :class:`~nimplicit.linear_solvers.LinearSolver` chosen here
    state : its state, built on first use (:attr:`solver_state`)
    """

    def __init__(self, layer: "ImplicitLayer", solution: Solution, inputs: tuple):
        self.layer = layer
        self.y, self.aux, self.status = solution.y, solution.aux, solution.status
        self.inputs = inputs
        y = self.y
        self.y_structure = Structure(y, layer.batch_axis, "the solver's output")
        self.y_dtype = _common_float_dtype(y)
        self.y_flat = np.asarray(self.y_structure.flatten(
            tuple(np.asarray(p, float) for p in y) if self.y_structure.is_tuple
            else np.asarray(y, float)), dtype=float)
        raw_res = layer.residual(self.y_structure.unflatten(self.y_flat), *inputs)
        finite_or_raise(raw_res, "the residual at the solver's output")
        self.res_structure = Structure(raw_res, layer.batch_axis, "the residual")
        if self.res_structure.batch_size != self.y_structure.batch_size:
            raise ShapeError(f"the residual has {self.res_structure.batch_size} instances along "
                             f"batch_axis but the solver's output has {self.y_structure.batch_size}")
        self.m, self.r = self.y_structure.size, self.res_structure.size
        self.res_flat = np.asarray(self.res_structure.flatten(raw_res), dtype=float)
        self.operator = JacobianOperator(self)
        self.linear_solver: Optional[linear_solvers.LinearSolver] = None
        self._state = None
        self._vjp_y = None
        self._pulls: dict = {}
        self._warned_cache = False

    # -- the residual as a function of flat vectors (traceable) --------------
    def F(self, y_flat, *inputs):
        return self.res_structure.flatten(
            self.layer.residual(self.y_structure.unflatten(y_flat), *inputs))

    # -- products with J = dF/dy at any (possibly boxed) point ----------------
    def J_T(self, w, y_flat, inputs):
        """``J^T w``, an autograd VJP of F in y."""
        if not (isbox(y_flat) or any(isbox(x) for x in inputs)):
            return self.raw_J_T(w)
        return make_vjp(lambda yy: self.F(yy, *inputs))(y_flat)[0](w)

    def raw_J_T(self, w):
        """``J^T w`` at this point's own (raw) ``y`` and inputs."""
        return self.y_tape().vjp(w)[0]

    def y_tape(self) -> _Tape:
        """F traced in ``y`` at this point (raw numbers), once; replayed for every product."""
        if self._vjp_y is None:
            self._vjp_y = _Tape(lambda yy: self.F(yy, *self.inputs), (self.y_flat,))
        return self._vjp_y

    def J(self, u, y_flat, inputs):
        """``J u``, an autograd JVP (forward mode) of F in y."""
        return make_jvp(lambda yy: self.F(yy, *inputs))(y_flat)(u)[1]

    @property
    def solver_state(self) -> linear_solvers.LinearSolverState:
        """The linear solver's state at this point, built once (on first use)."""
        if self._state is None:
            self.layer._check_independence(self)
            self._state = self.linear_solver.init(self.operator, self.aux)
        return self._state

    @property
    def cache(self) -> dict:
        """Deprecated: the per-point dict of an old-protocol (callable) linear solver.

        Warns (DeprecationWarning) on the first access at each point.
        """
        if not self._warned_cache:
            self._warned_cache = True
            warnings.warn("ForwardPoint.cache is deprecated and goes away in the next release: "
                          "a LinearSolver keeps what it builds at a point in its state "
                          "(point.solver_state)", DeprecationWarning, stacklevel=2)
        return getattr(self.solver_state, "cache", {})

    def solve_raw(self, b, transpose: bool):
        """Solve ``J^T x = b`` (transpose) or ``J x = b`` at this point, raw numbers."""
        b = np.asarray(b, dtype=float)
        finite_or_raise(b, "the right-hand side of the implicit linear solve (a cotangent or tangent)")
        x = np.asarray(self.solver_state.solve(b, transpose=transpose), dtype=float)
        if not np.all(np.isfinite(x)):
            raise NonFiniteError("the implicit linear solve returned NaN or Inf: J_F,y is singular "
                                 "or the linear solver failed; try linear_solver='lstsq' or ridge=...")
        return x

    def __reduce__(self):
        raise TypeError("a ForwardPoint holds autograd closures and factorizations of one call; "
                        "it is not picklable (pickle the layer and its inputs instead)")


def _common_float_dtype(value):
    parts = value if isinstance(value, (tuple, list)) else (value,)
    kinds = {np.asarray(p).dtype for p in parts}
    return np.float32 if kinds == {np.dtype(np.float32)} else np.float64


# ------------------------------------------------------------------------------
# the linear-solve primitive: x = A(theta)^{-1} b, A = J^T (transpose) or J
# ------------------------------------------------------------------------------

@primitive
def _solve(point: ForwardPoint, transpose: bool, b, y_flat, *inputs):
    return point.solve_raw(b, transpose)


def _apply_A(point, transpose, v, y_flat, inputs):
    return point.J_T(v, y_flat, inputs) if transpose else point.J(v, y_flat, inputs)


def _require_exact(point):
    if not point.solver_state.exact:
        raise UnsupportedError(
            "derivatives of order >= 2 through a least-squares / ridge / minimum-norm solve of "
            "J_F,y are not implemented (d(A^+) has extra terms); use a square, well-conditioned "
            "residual and an exact solver.")


def _A_x_of(point, transpose, x, y_flat, inputs, theta_nums):
    """``sel -> A(theta) x`` with the ``theta_nums`` (3 = y, 4.. = inputs) replaced by ``sel``."""
    theta = (y_flat,) + tuple(inputs)

    def A_x(sel):
        full = substitute(theta, [k - 3 for k in theta_nums], sel)
        return _apply_A(point, transpose, x, full[0], tuple(full[1:]))
    return A_x, tuple(theta[k - 3] for k in theta_nums)


def _solve_vjp(argnums, x, args, kwargs):
    point, transpose, b, y_flat, inputs = args[0], args[1], args[2], args[3], args[4:]
    _require_exact(point)

    def vjp(g):
        # b_bar = A^{-T} g;  theta_bar = -(d(A x)/d theta)^T b_bar
        b_bar = _solve(point, not transpose, g, y_flat, *inputs)
        grads = {2: b_bar}
        theta_nums = [k for k in argnums if k >= 3]
        if theta_nums:
            A_x, sel = _A_x_of(point, transpose, x, y_flat, inputs, theta_nums)
            grads.update(zip(theta_nums, make_vjp(A_x)(sel)[0](-b_bar)))
        return tuple(grads[k] for k in argnums)
    return vjp


def _solve_jvp(argnums, dots, x, args, kwargs):
    point, transpose, b, y_flat, inputs = args[0], args[1], args[2], args[3], args[4:]
    _require_exact(point)
    rhs = 0.0
    theta_dots = {k: d for k, d in zip(argnums, dots) if k != 2}
    if 2 in argnums:
        rhs = dots[list(argnums).index(2)]
    if theta_dots:
        nums = sorted(theta_dots)
        A_x, sel = _A_x_of(point, transpose, x, y_flat, inputs, nums)
        rhs = rhs - make_jvp(A_x)(sel)(tuple(theta_dots[k] for k in nums))[1]
    return _solve(point, transpose, rhs + anp.zeros(anp.shape(x)), y_flat, *inputs)


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
        return point.F(y_flat, *substitute(inputs, nums, sel))
    return F_of, tuple(inputs[i] for i in nums)


def _pullback_of_inputs(F_of, sel):
    """``w -> (J_i^T w)_i`` for the selected inputs.  One input is traced bare:
    traced as a 1-tuple, autograd would build its gradient as zeros plus an add
    (one more pass over a large input, e.g. an N^2 affinity, per product)."""
    if len(sel) == 1:
        pull = make_vjp(lambda s: F_of((s,)))(sel[0])[0]
        if _is_float32(getval(sel[0])):   # autograd's gradient has its input's dtype
            return lambda w: (pull(w).astype(np.float32),)
        return lambda w: (pull(w),)
    return make_vjp(F_of)(sel)[0]


def _node_vjp(argnums, y_flat, args, kwargs):
    point, inputs = args[0], args[1:]
    F_of, sel = _input_products(point, y_flat, inputs, argnums)
    raw = not (isbox(y_flat) or any(isbox(x) for x in inputs))
    if raw:   # first order: trace F in the inputs once, reuse for every cotangent
        pull_inputs = point._pulls.get(tuple(argnums))
        if pull_inputs is None:
            pull_inputs = point._pulls[tuple(argnums)] = _Tape(lambda *s: F_of(s), sel).vjp
    else:
        pull_inputs = _pullback_of_inputs(F_of, sel)

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
# input validation: the dtype policy
# ------------------------------------------------------------------------------

def _check_input(x, k: int, differentiated: bool) -> None:
    """The dtype policy of the core (see :func:`implicit_layer`, Notes)."""
    parts = x if isinstance(x, tuple) else (x,)
    for part in parts:
        if isinstance(part, (np.ndarray, np.generic, int, float, complex, bool, list)):
            dtype = np.asarray(part).dtype
        else:   # sparse matrices, user objects: left to the residual and the solver
            dtype = None
        if dtype is None:
            continue
        if dtype.kind == "c":
            raise DTypeError(f"input {k} is complex ({dtype}); nimplicit differentiates real "
                             f"functions only: pass the real and imaginary parts as separate "
                             f"real inputs")
        if dtype.kind in "OUSV":
            raise DTypeError(f"input {k} is an array of dtype {dtype}; pass numeric (float64 or "
                             f"float32) arrays")
        if dtype == np.float16:
            raise DTypeError(f"input {k} is float16: its 3 significant digits are below what the "
                             f"residual check and the implicit derivative need; cast it to float32 "
                             f"or float64")
        if differentiated and dtype.kind in "iub":
            raise DTypeError(f"input {k} is an integer/bool array ({dtype}) but is being "
                             f"differentiated; cast it to float64 first")


# ------------------------------------------------------------------------------
# the public layer
# ------------------------------------------------------------------------------

_AUTO = ("lu", "gmres", "lstsq", "lsmr", "krylov_or_dense")


class ImplicitLayer:
    """A differentiable layer ``x -> y*`` defined by ``F(y*, x) = 0``.

    Build it with :func:`implicit_layer`; call it as ``layer(*inputs)``.  A
    layer is a value: it holds its configuration only (no forward point, no
    factorization survives a call), so it pickles whenever its residual,
    solver and options do (e.g. module-level functions).
    """

    def __init__(self, residual, solver, *, linear_solver="auto", ridge: float = 0.0,
                 batch_axis: Optional[int] = None, residual_tol: float = 1e-6,
                 check_residual: bool = True, dense_max: int = DENSE_MAX,
                 linear_solver_options: Optional[dict] = None, diagnostics=None,
                 name: Optional[str] = None, check_independence: bool = True,
                 throw: bool = True, finite_inputs: tuple = (), **unknown):
        if unknown:
            raise OptionError(f"implicit_layer got unknown option(s) {sorted(unknown)}")
        if not callable(residual) or not callable(solver):
            raise OptionError("implicit_layer needs callables residual(y, *inputs) and "
                              "solver(*inputs)")
        try:
            residual_tol = float(residual_tol)
        except (TypeError, ValueError):
            raise OptionError(f"residual_tol must be a number, got {residual_tol!r}") from None
        if not (np.isfinite(residual_tol) and residual_tol >= 0):
            raise OptionError(f"residual_tol must be finite and >= 0, got {residual_tol!r} "
                              f"(use check_residual=False to turn the check off)")
        if not (np.isfinite(ridge) and ridge >= 0):
            raise OptionError(f"ridge must be >= 0 and finite, got {ridge}")
        for flag, value in (("throw", throw), ("check_residual", check_residual),
                            ("check_independence", check_independence)):
            if not isinstance(value, (bool, np.bool_)):
                raise OptionError(f"{flag} must be True or False, got {value!r}")
        self.throw = bool(throw)
        if not isinstance(finite_inputs, (tuple, list)) or not all(
                isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0
                for k in finite_inputs):
            raise OptionError(f"finite_inputs must be a tuple of input indices, got "
                              f"{finite_inputs!r}")
        self.finite_inputs = frozenset(int(k) for k in finite_inputs)
        self.residual = residual
        self.solver = solver
        self.diagnostics = diagnostics
        self.name = name or getattr(residual, "__qualname__", "implicit_layer")
        self.batch_axis = batch_axis
        self.residual_tol = residual_tol
        self.check_residual = bool(check_residual)
        self.check_independence = bool(check_independence)
        if isinstance(dense_max, bool) or not isinstance(dense_max, (int, np.integer)) \
                or dense_max < 0:
            raise OptionError(f"dense_max must be an integer >= 0 (the largest number of "
                              f"unknowns per instance for which J is formed densely), got "
                              f"{dense_max!r}")
        self.dense_max = int(dense_max)
        self.ridge = float(ridge)
        self.linear_solver_name = linear_solver
        self.linear_solver_options = dict(linear_solver_options or {})
        if self.ridge:
            if linear_solver not in ("auto", "lstsq", "lsmr") and not (
                    callable(linear_solver) and not isinstance(linear_solver, type)
                    and getattr(linear_solver, "solver_class", None) is None):
                raise UnsupportedError(f"ridge={ridge} needs linear_solver='lstsq' or 'lsmr' "
                                       f"(got {linear_solver!r})")
            self.linear_solver_options.setdefault("ridge", self.ridge)
        if linear_solver == "auto":
            known = set().union(*(linear_solvers.SOLVER_CLASSES[n].options for n in _AUTO))
            unknown = sorted(set(self.linear_solver_options) - known)
            if unknown:
                raise OptionError(f"linear_solver_options has unknown option(s) {unknown}: no "
                                  f"candidate of linear_solver='auto' ({', '.join(_AUTO)}) takes "
                                  f"them; known options are {sorted(known)}")
            self._auto = {name: self._auto_candidate(name) for name in _AUTO}
            self.linear_solver = None
        else:
            self._auto = None
            self.linear_solver = linear_solvers.make_solver(linear_solver,
                                                            self.linear_solver_options)

    def _auto_candidate(self, name):
        cls = linear_solvers.SOLVER_CLASSES[name]
        opts = {k: v for k, v in self.linear_solver_options.items() if k in cls.options}
        if name == "krylov_or_dense":    # auto's Krylov path keeps a singular J a typed error
            opts.setdefault("probe", True)
            opts.setdefault("dense_if_cheap", True)
        return cls(**opts)

    @property
    def last_point(self):
        raise AttributeError("ImplicitLayer.last_point was removed (layers keep no forward state); "
                             "use `with nimplicit.record_points() as points: layer(...)` and "
                             "points[-1]")

    def _choose_solver(self, point: ForwardPoint) -> linear_solvers.LinearSolver:
        if self._auto is None:
            chosen = self.linear_solver
            if point.r != point.m and isinstance(chosen, (linear_solvers.LU, linear_solvers.Cholesky,
                                                          linear_solvers._Krylov,
                                                          linear_solvers.KrylovOrDense)):
                raise ShapeError(
                    f"the residual has {point.r} entries per instance but the solver's output has "
                    f"{point.m}; linear_solver={self.linear_solver_name!r} needs a square dF/dy. "
                    f"Use 'lstsq' or 'lsmr', or fix the residual.")
            return chosen
        if point.r != point.m and not self.ridge:
            raise ShapeError(
                f"the residual has {point.r} entries per instance but the solver's output has "
                f"{point.m}: dF/dy is not square. Choose linear_solver='lstsq' (minimum-norm "
                f"solution) or 'lsmr', or ridge=..., explicitly, or fix the residual.")
        dense = point.m <= self.dense_max
        if self.ridge:
            return self._auto["lstsq" if dense else "lsmr"]
        if not dense:
            return self._auto["gmres"]
        if point.m >= KRYLOV_MIN and point.y_structure.batch_size is None and self.throw:
            # forming J costs m VJPs; a well-conditioned J needs far fewer Krylov products,
            # and the probe keeps a singular J the LU's typed error (KrylovOrDense, probe=True);
            # the ski-rental budget, priced by the measured product, bounds a hard J at ~2x;
            # where J forms in one replay of the tape (dense_if_cheap=True), the LU at once
            return self._auto["krylov_or_dense"]
        return self._auto["lu"]

    def _run_solver(self, raw_inputs: tuple):
        """Validate raw inputs, run the forward solver and the active interceptors.

        Returns the :class:`Solution` and whether the residual check is to run
        (an interceptor may turn it off).  Shared by :meth:`solve_forward` and
        the ``throw=False`` path (``batch_status``).
        """
        for k, x in enumerate(raw_inputs):
            _check_input(x, k, differentiated=False)
            if k not in self.finite_inputs:   # else the caller's own pass checked it
                finite_or_raise(x, f"input {k}")
        solution = _as_solution(self.solver(*raw_inputs))
        check = self.check_residual
        for intercept, check_residual in _INTERCEPTORS.get():
            replaced = intercept(self, raw_inputs, solution)
            if replaced is not None:
                solution = _as_solution(replaced)
            if check_residual is not None:
                check = check and check_residual
        return solution, check

    def solve_forward(self, *raw_inputs) -> ForwardPoint:
        """Run the forward solver on raw inputs, check its output, return the point."""
        solution, check = self._run_solver(raw_inputs)
        finite_or_raise(solution.y, "the solver's output")
        _check_output(solution.y)
        point = ForwardPoint(self, solution, raw_inputs)
        point.linear_solver = self._choose_solver(point)
        if check:
            self._check_residual(point)
        for recorder in _RECORDERS.get():
            recorder.append(point)
        return point

    # -- the residual check, per equation ------------------------------------
    def _check_residual(self, point: ForwardPoint) -> None:
        r"""``|F_i(y*, x)| <= tol (1 + s_i)`` for every equation ``i``.

        ``s_i`` is the size of the terms that make up equation ``i``,
        ``sqrt(sum_j (dF_i/dz_j z_j)^2)`` over the entries ``z_j`` of ``y`` and of
        the float inputs, estimated as the RMS of ``(dF/dz (g o z))_i`` over 4
        Gaussian probes ``g`` (4 JVPs, a chi-square estimate: it underestimates
        ``s_i`` by 1e4 with probability ~1e-8, far inside the margin between
        rounding, ``eps s_i``, and the tolerance).  Computed only when some
        ``|F_i| > tol``; an unrelated large input no longer raises the scale.
        """
        res = np.abs(point.res_flat)
        tol = self.residual_tol
        if not (res > tol).any():
            return
        scale = _term_scale(point)
        bad = res > tol * (1.0 + scale)
        if bad.any():
            flat = np.flatnonzero(bad.ravel())
            idx = int(flat[0])
            inst, eq = divmod(idx, point.r) if res.ndim > 1 else (None, idx)
            count = (f" ({int(bad.any(axis=1).sum())} of {len(res)} instances)"
                     if res.ndim > 1 else "")
            raise ResidualError(
                f"the residual is not met at the solver's output{where(inst, res.ndim > 1)}"
                f"{count}: |F_{eq}(y*, x)| = {res.ravel()[idx]:.3g} > residual_tol * (1 + s) = "
                f"{tol * (1 + scale.ravel()[idx]):.3g}, where s = {scale.ravel()[idx]:.3g} is the "
                f"size of the terms of that equation ({flat.size} equation(s) fail). Tighten the "
                f"forward solver, check that the residual and the solver describe the same "
                f"problem, or pass residual_tol=.")

    def _check_independence(self, point: ForwardPoint) -> None:
        """``batch_axis`` promises a block diagonal J: probe it with two VJPs."""
        B = point.y_structure.batch_size
        if not self.check_independence or B is None or B < 2:
            return
        rng = np.random.default_rng(7)
        w = rng.standard_normal((B, point.r))
        for mask in (np.arange(B) == 0, np.arange(B) % 2 == 0):
            u = point.operator.rmv(w * mask[:, None])
            inside, outside = np.abs(u[mask]).max(initial=0.0), np.abs(u[~mask]).max(initial=0.0)
            if outside > 1e-12 * max(inside, 1e-300) and outside > 0:
                k = int(np.flatnonzero(~mask)[np.argmax(np.abs(u[~mask]).max(axis=1))])
                raise CouplingError(
                    f"batch_axis={self.batch_axis} promises independent instances, but the "
                    f"residual couples them: a probe on instance(s) "
                    f"{np.flatnonzero(mask)[:4].tolist()}{'...' if mask.sum() > 4 else ''} "
                    f"reaches instance {k} (|J^T w| = {outside:.3g} there vs {inside:.3g} on the "
                    f"probe). Fix the residual, or drop batch_axis (one joint system).")

    def __call__(self, *inputs):
        if not self.throw:   # (y, BatchStatus): failed instances masked out (batch_status.py)
            return batch_status.call_with_status(self, inputs)
        _check_differentiated_inputs(inputs)
        point = self.solve_forward(*[getval(x) for x in inputs])
        return _output(point, _node(point, *inputs), inputs)

    def __repr__(self):
        return f"ImplicitLayer({self.name!r})"


def _check_differentiated_inputs(inputs) -> None:
    for k, x in enumerate(inputs):
        if isbox(x):
            _check_input(getval(x), k, differentiated=True)


def _output(point: ForwardPoint, flat, inputs):
    """The layer's output from the node's flat ``y``: its structure, float32 when the
    solver gave float32 and nothing is traced, an autograd tuple when traced."""
    y = point.y_structure.unflatten(flat)
    if point.y_dtype == np.float32 and not any(isbox(x) for x in inputs):
        y = _cast(y, np.float32)
    if point.y_structure.is_tuple and any(isbox(x) for x in inputs):
        # a plain tuple of boxes is invisible to autograd's make_jvp/make_vjp
        # on the layer itself (they would silently return zeros): box it
        y = autograd_tuple(y)
    return y


def _cast(y, dtype):
    if isinstance(y, tuple):
        return tuple(np.asarray(p).astype(dtype) for p in y)
    return np.asarray(y).astype(dtype)


def _check_output(y) -> None:
    parts = y if isinstance(y, (tuple, list)) else (y,)
    for k, p in enumerate(parts):
        dtype = np.asarray(p).dtype
        if dtype.kind not in "fiub":
            raise DTypeError(f"the solver's output (component {k}) has dtype {dtype}; it must be "
                             f"real (float64 or float32)")


def _term_scale(point: ForwardPoint) -> np.ndarray:
    """Per-equation size of the terms, ``sqrt(sum_j (dF_i/dz_j z_j)^2)`` (see _check_residual).

    The float array inputs take part when ``F`` can be traced in them; otherwise
    (a residual that uses an input non-differentiably) only ``y``'s terms count.
    """
    inputs = point.inputs
    diff = [k for k, x in enumerate(inputs) if _is_float_array(x)]
    try:
        return _signed_probe_rms(point, diff)
    except Exception:  # noqa: BLE001 - not traceable in some input: y's terms only
        return _signed_probe_rms(point, [])


def _signed_probe_rms(point, diff, probes: int = 4) -> np.ndarray:
    inputs = point.inputs
    rng = np.random.default_rng(3)
    base = (point.y_flat,) + tuple(np.asarray(inputs[k], float) for k in diff)
    acc = np.zeros_like(point.res_flat)

    def F_of(args):
        return point.F(args[0], *substitute(inputs, diff, args[1:]))
    push = make_jvp(F_of)(base)
    for _ in range(probes):
        signs = tuple(z * rng.standard_normal(np.shape(z)) for z in base)
        acc += np.asarray(push(signs)[1], float) ** 2
    return np.sqrt(acc / probes)


def _is_float_array(x) -> bool:
    return isinstance(x, (np.ndarray, float, np.floating)) and np.asarray(x).dtype.kind == "f"


def implicit_layer(residual: Callable[..., Any], solver: Callable[..., Any], *,
                   linear_solver: Union[str, Callable, linear_solvers.LinearSolver] = "auto",
                   ridge: float = 0.0,
                   batch_axis: Optional[int] = None, residual_tol: float = 1e-6,
                   check_residual: bool = True, dense_max: int = DENSE_MAX,
                   linear_solver_options: Optional[dict] = None,
                   diagnostics: Optional[Callable] = None,
                   name: Optional[str] = None, check_independence: bool = True,
                   throw: bool = True, finite_inputs: tuple = ()) -> ImplicitLayer:
    r"""A layer ``x -> y*`` defined implicitly by ``F(y*, x) = 0``.

    Parameters
    ----------
    residual : callable
        ``residual(y, *inputs)``, written with ``autograd.numpy``; returns an
        array or a tuple of arrays with as many entries (per instance) as ``y``
        (or any number with ``linear_solver='lstsq'``/``'lsmr'``/``ridge``).
    solver : callable
        ``solver(*inputs) -> y`` or ``-> Solution(y, aux, status)``; any code,
        called on raw numbers only and never differentiated.  ``y`` is an
        array of any shape or a tuple of arrays; ``aux`` reaches the linear
        solver's ``init(operator, aux)`` (see :class:`Solution`).
    linear_solver : str, LinearSolver or callable
        How ``J = dF/dy`` is solved: ``'auto'`` (square J: LU, with its
        condition check, below :data:`KRYLOV_MIN` = 64 unknowns, and for a batch
        or ``throw=False`` up to ``dense_max``; from ``KRYLOV_MIN`` to
        ``dense_max`` for one instance, ``'krylov_or_dense'`` with its singularity
        probe, ``probe=True``, so a singular J still ends in the LU's
        :class:`~nimplicit.errors.SingularJacobianError`, and ``dense_if_cheap=True``:
        the LU from the start when J forms in one replay of the residual's tape,
        i.e. every primitive of the residual has a fast VJP (``_FAST_VJPS``:
        elementwise arithmetic, tanh/exp/log/sin/cos/sqrt/square, dot/matmul,
        transpose, on float64 arrays without broadcasting); GMRES above ``dense_max``),
        ``'krylov_or_dense'`` (GMRES at rtol 1e-14 while its products cost less
        than forming and factoring J, then LU: faster where a VJP is expensive;
        without ``probe=True`` a singular J with a cotangent in its range is
        solved without the LU's error; see
        :class:`~nimplicit.linear_solvers.KrylovOrDense`), ``'lu'``, ``'cholesky'``,
        ``'lstsq'``, ``'cg'``, ``'minres'``, ``'gmres'``, ``'bicgstab'``,
        ``'lsmr'``, an instance of a :class:`~nimplicit.linear_solvers.LinearSolver`
        subclass, or (deprecated) a callable
        ``solve(matvec, rmatvec, b, *, transpose, x_size, cache, point, **opts)``.
    ridge : float
        Tikhonov damping; selects ``lstsq`` (dense) or ``lsmr`` under ``'auto'``.
    batch_axis : int, optional
        Axis of every component of ``y`` and of the residual that indexes
        independent instances: J is block diagonal.  The promise is verified
        (two probe VJPs on the first backward, :class:`~nimplicit.errors.CouplingError`).
    residual_tol : float
        The forward check ``|F_i(y*, x)| <= residual_tol (1 + s_i)`` per equation
        ``i``, with ``s_i`` the size of the terms of that equation (see
        ``ImplicitLayer._check_residual``); else :class:`~nimplicit.errors.ResidualError`.
        Must be finite and >= 0.
    check_residual : bool
        Turn that check off (not recommended).
    dense_max : int
        See ``linear_solver='auto'``.
    linear_solver_options : dict
        Options of the linear solver, validated by it (an unknown one raises
        :class:`~nimplicit.errors.OptionError`); under ``'auto'`` each candidate
        takes the options it declares.
    diagnostics : callable, optional
        ``diagnostics(point) -> {name: (value, ok, why)}`` at a :class:`ForwardPoint`.
    name : str, optional
        How checkers and error reports name the layer.
    check_independence : bool
        Probe the block-diagonal promise of ``batch_axis`` (default True).
    throw : bool
        True (default): a failure raises.  False: ``layer(*inputs)`` returns
        ``(y, status)``, a :class:`~nimplicit.batch_status.BatchStatus` of
        per-instance outcomes; failed instances get NaN rows in ``y`` and no
        gradient contribution (see :mod:`nimplicit.batch_status`).  Without
        ``batch_axis`` the problem is one instance (``len(status) == 1``).
    finite_inputs : tuple of int
        Indices of inputs whose finiteness the caller has already verified (a
        reference layer's own validation pass over them, e.g. the affinity of
        spectral matching): the core's NaN/Inf check skips them (one pass over
        the input saved).  Default ``()``: every input is checked.

    Returns
    -------
    ImplicitLayer
        ``layer(*inputs)`` returns the solver's ``y`` (same structure), differentiable
        by autograd in every input, any order (through exact solvers); with
        ``throw=False``, ``(y, status)``.

    Notes
    -----
    Reverse mode solves ``J^T w = -g`` then returns ``x_i_bar = (dF/dx_i)^T w``;
    forward mode returns ``y_dot = -J^{-1} sum_i (dF/dx_i) x_i_dot``.  All
    solves at one forward point share one linear-solver state.

    dtype policy: inputs are float64 or float32 (integers are allowed for
    inputs that are not differentiated).  The solver sees the inputs as given;
    when every component of its output is float32 the layer's (undifferentiated)
    output is float32 too, while the residual check and every derivative are
    computed in float64 (autograd returns a gradient in its input's dtype, so
    a float32 input gets a float32 gradient rounded from the float64 one).  float16, complex
    and object inputs, and integer inputs that are differentiated, raise
    :class:`~nimplicit.errors.DTypeError`.
    """
    return ImplicitLayer(residual, solver, linear_solver=linear_solver, ridge=ridge,
                         batch_axis=batch_axis, residual_tol=residual_tol,
                         check_residual=check_residual, dense_max=dense_max,
                         linear_solver_options=linear_solver_options, diagnostics=diagnostics,
                         name=name, check_independence=check_independence, throw=throw,
                         finite_inputs=finite_inputs)
