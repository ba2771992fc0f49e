r"""Linear solvers for the systems of the implicit function theorem.

The protocol (modelled on lineax)
---------------------------------
At a forward point the node needs solves with ``J = dF/dy`` (``r x m`` per
instance: ``r`` equations, ``m`` unknowns) and with ``J^T``:

- reverse mode: ``J^T w = -g``;   forward mode: ``J y_dot = -J_x x_dot``;
- higher orders: more solves with the same ``J``.

A linear solver is an object of a :class:`LinearSolver` subclass::

    solver = LU(max_condition=1e10)          # options declared by the class; unknown -> OptionError
    state = solver.init(operator, aux)       # ONCE per forward point: factor, form, precondition
    x = state.solve(b)                       # J x = b,    as often as asked
    x = state.solve(b, transpose=True)       # J^T x = b
    state.exact                              # True: x = J^{-1} b exactly (higher orders allowed)

``operator`` is a :class:`Operator` (``mv(u) = J u``, ``rmv(w) = J^T w``,
``dense()`` the formed ``J``; block diagonal over a batch); ``aux`` is what the
forward solver handed over in :class:`nimplicit.Solution` (a factorization, an
eigenbasis ...), never differentiated.  ``b`` is one instance ``(k,)`` or a
batch ``(B, k)``.

Solvers
-------
Dense (:class:`LU`, :class:`Cholesky`, :class:`Lstsq`) form ``J`` from ``r``
batched VJPs (the ``k``-th unit cotangent in every instance at once yields row
``k`` of all ``B`` blocks).  Matrix-free (:class:`CG`, :class:`MINRES`,
:class:`GMRES`, :class:`BiCGSTAB`, :class:`LSMR`) never form a matrix.  The
square Krylov solvers share one driver with

- ``preconditioner``: ``M^{-1}`` ~ ``A^{-1}``: a callable on arrays of ``b``'s
  layout, an array (the diagonal of ``M^{-1}``), or :class:`per_point`
  ``(factory)`` evaluated once per forward point in :meth:`LinearSolver.init`;
- ``refinements``: iterative refinement on the TRUE residual.  A solution is
  accepted when ``|A x - b| <= rtol |b|``, or -- when ``rtol`` lies below what
  double precision can certify for this operator -- when the residual has
  reached the operator's noise floor ``c eps (|A| |x| + |b|)`` and stopped
  decreasing (see :func:`noise_floor`).  Otherwise
  :class:`~nimplicit.errors.LinearSolveError` with a :class:`SolveStatus`.

Failures are the enumeration :class:`SolveStatus`; every ``LinearSolveError``
raised here carries one as ``error.status``.

The deprecated callable protocol
--------------------------------
``solve(matvec, rmatvec, b, *, transpose, x_size, cache, point, **opts)`` with
``matvec(v) = A v``, ``A = J^T`` (``transpose=True``) or ``J``, and a ``cache``
dict per forward point, still works: the functions :func:`lu`, :func:`lstsq`,
:func:`gmres` ... keep that signature, and a user callable passed as
``linear_solver`` is wrapped by :class:`LegacySolver`.  Both are the only
places where the old dict (``cache["J"]``, ``cache["pseudo_inverse"]``) lives;
they go away in the next release.
"""
from __future__ import annotations

import enum
import inspect
import math
import time
import warnings
from typing import Any, Callable, Optional, Union

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as spla

from .errors import (LinearSolveError, OptionError, ShapeError, SingularJacobianError,
                     UnsupportedError, where)

MatVec = Callable[[np.ndarray], np.ndarray]

EPS = np.finfo(float).eps


class SolveStatus(enum.Enum):
    """Why a linear solve failed (or that it did not): readable messages."""

    SUCCESSFUL = "the solve succeeded"
    MAX_STEPS_REACHED = "maxiter was reached"
    BREAKDOWN = "the Krylov method broke down"
    STAGNATION = ("the last round did not reduce the residual, which is still above the "
                  "operator's noise floor (the system may be too ill-conditioned for double precision)")
    REFINEMENTS_USED_UP = "the refinements were used up"
    SINGULAR = "J_F,y is singular to working precision"
    ILL_CONDITIONED = "J_F,y is too ill-conditioned"
    NOT_POSITIVE_DEFINITE = "J_F,y is not positive definite"
    NOT_SYMMETRIC = "the operator is not symmetric"
    NOT_SQUARE = "J_F,y is not square"

    @property
    def message(self) -> str:
        return self.value


def _error(cls, status: SolveStatus, text: str):
    err = cls(text)
    err.status = status
    return err


# --------------------------------------------------------------------------
# operators
# --------------------------------------------------------------------------

def form_jacobian(matvec: MatVec, rmatvec: MatVec, b: np.ndarray, transpose: bool,
                  x_size: Optional[int] = None) -> np.ndarray:
    """Form J (``r x m``, or ``B x r x m`` for a batch) from ``r`` VJPs.

    With ``transpose=True`` the VJP is ``matvec`` (A = J^T) and ``r`` is the
    size of the unknown; otherwise it is ``rmatvec`` (A = J) and ``r`` is the
    size of ``b``.  Row ``k`` of every block is ``J^T e_k`` with ``e_k`` the
    ``k``-th unit vector repeated in every instance.
    """
    vjp = matvec if transpose else rmatvec
    if vjp is None:
        raise UnsupportedError("a dense solver needs both products of the operator "
                               "(matvec and rmatvec) to form the Jacobian")
    batch = b.shape[:-1]
    r = (x_size or b.shape[-1]) if transpose else b.shape[-1]
    rows = []
    for k in range(r):
        e = np.zeros(batch + (r,))
        e[..., k] = 1.0
        rows.append(np.asarray(vjp(e), dtype=float))
    return np.stack(rows, axis=-2)


class Operator:
    """``J`` (``r x m`` per instance, block diagonal over ``batch_size`` instances).

    Subclasses provide :meth:`mv` (``J u``) and :meth:`rmv` (``J^T w``) on arrays
    of shape ``(m,)``/``(r,)`` or ``(B, m)``/``(B, r)``; :meth:`dense` forms J
    once from ``r`` batched VJPs and keeps it.  ``point`` is the forward point
    (or None), for solvers whose setup depends on the solution.
    """

    def __init__(self, r: int, m: int, batch_size: Optional[int] = None, point=None):
        self.r, self.m, self.batch_size, self.point = int(r), int(m), batch_size, point
        self._dense = None

    @property
    def batch(self) -> tuple:
        return () if self.batch_size is None else (self.batch_size,)

    def mv(self, u):
        raise NotImplementedError

    def rmv(self, w):
        raise NotImplementedError

    def dense(self) -> np.ndarray:
        """J as an array ``(r, m)`` or ``(B, r, m)``, formed once."""
        if self._dense is None:
            self._dense = form_jacobian(self.rmv, None, np.zeros(self.batch + (self.m,)),
                                        True, self.r)
        return self._dense


class CallbackOperator(Operator):
    """An :class:`Operator` from two functions (either may be None) or a formed J."""

    def __init__(self, mv: Optional[MatVec], rmv: Optional[MatVec], r: int, m: int,
                 batch_size: Optional[int] = None, point=None, J: Optional[np.ndarray] = None):
        super().__init__(r, m, batch_size, point)
        self._mv, self._rmv, self._dense = mv, rmv, J

    def mv(self, u):
        if self._mv is None:
            return np.einsum("...ij,...j->...i", self.dense(), u)
        return self._mv(u)

    def rmv(self, w):
        if self._rmv is None:
            if self._dense is None:
                raise UnsupportedError("this operator has no product with J^T and no formed J")
            return np.einsum("...ij,...i->...j", self._dense, w)
        return self._rmv(w)


class MatrixOperator(CallbackOperator):
    """An :class:`Operator` holding J as an array ``(r, m)`` or ``(B, r, m)``."""

    def __init__(self, J, point=None):
        J = np.asarray(J, dtype=float)
        if J.ndim not in (2, 3):
            raise ShapeError(f"MatrixOperator needs J of shape (r, m) or (B, r, m), got {J.shape}")
        super().__init__(None, None, J.shape[-2], J.shape[-1],
                         J.shape[0] if J.ndim == 3 else None, point, J)


# --------------------------------------------------------------------------
# the solver protocol
# --------------------------------------------------------------------------

class LinearSolverState:
    """What a :class:`LinearSolver` built at one forward point.

    Attributes
    ----------
    exact : bool
        True when :meth:`solve` returns ``J^{-1} b`` (an exact inverse, so the
        derivative ``d(J^{-1} b) = -J^{-1} dJ J^{-1} b`` used for higher orders
        holds); False for least-squares, minimum-norm and ridge solutions.
    """

    exact: bool = True

    def solve(self, b: np.ndarray, transpose: bool = False) -> np.ndarray:
        """``x`` with ``J x = b`` (or ``J^T x = b``); ``b`` of shape ``(k,)`` or ``(B, k)``."""
        raise NotImplementedError


class LinearSolver:
    """Base class of linear solvers: declared options, :meth:`init` once per point.

    Subclasses set ``name`` and ``options`` (a dict of option names and their
    defaults) and implement :meth:`init`.  Options are validated on
    construction: an unknown one raises :class:`~nimplicit.errors.OptionError`
    (a ``TypeError``) naming the allowed ones.  Instances are plain values:
    comparable, picklable.
    """

    name: str = "linear_solver"
    options: dict = {}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise OptionError(f"linear solver {self.name!r} got unknown option(s) {unknown}; its "
                              f"options are {sorted(self.options)}")
        self.opts = {**self.options, **options}
        self._validate()

    def _validate(self) -> None:
        for key in ("rtol", "max_condition"):
            if key in self.opts and not (np.isfinite(self.opts[key]) and self.opts[key] > 0):
                raise OptionError(f"{self.name}: {key} must be a positive finite number, "
                                  f"got {self.opts[key]!r}")
        if "ridge" in self.opts and not (np.isfinite(self.opts["ridge"]) and self.opts["ridge"] >= 0):
            raise OptionError(f"{self.name}: ridge must be >= 0 and finite, got {self.opts['ridge']!r}")

    def init(self, operator: Operator, aux: Any = None) -> LinearSolverState:
        """Build the state (factorizations, preconditioner) at one forward point."""
        raise NotImplementedError

    def __repr__(self):
        changed = {k: v for k, v in self.opts.items() if self.options.get(k) is not v}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def __eq__(self, other):
        return type(self) is type(other) and self.opts.keys() == other.opts.keys() and all(
            self.opts[k] is other.opts[k] or self.opts[k] == other.opts[k] for k in self.opts)

    __hash__ = object.__hash__


# --------------------------------------------------------------------------
# dense: form J once per forward point, factor once, solve many times
# --------------------------------------------------------------------------

def _blocks(J):
    return J.reshape((-1,) + J.shape[-2:])


def lu_condition(lu_piv, block: np.ndarray) -> float:
    """1-norm condition estimate (LAPACK ``gecon``) of ``block`` from its LU factors."""
    anorm = np.abs(block).sum(axis=0).max()
    rcond, _info = scipy.linalg.lapack.dgecon(lu_piv[0], anorm, norm="1")
    return 1.0 / rcond if rcond > 0 else np.inf


def condition_error(cond: float, index, max_condition: float, what: str = "J_F,y = dF/dy"
                    ) -> SingularJacobianError:
    """The typed error for a (near) singular Jacobian block ``index`` (None: unbatched)."""
    if not np.isfinite(cond) or cond * EPS >= 1.0:
        status, text = SolveStatus.SINGULAR, (f"is singular to working precision (estimated "
                                              f"condition number {cond:.3g})")
    else:
        status, text = SolveStatus.ILL_CONDITIONED, (
            f"is ill-conditioned (estimated condition number {cond:.3g} > "
            f"max_condition={max_condition:.3g})")
    return _error(SingularJacobianError, status,
                  f"{what} at the solution{where(index, index is not None)} {text}; the implicit "
                  f"function theorem does not give a unique derivative there. Use "
                  f"linear_solver='lstsq' for the minimum-norm solution or pass ridge=<small "
                  f"positive number> for a damped one, or raise max_condition if the conditioning "
                  f"is expected.")


def _check_square(J):
    if J.shape[-1] != J.shape[-2]:
        raise _error(ShapeError, SolveStatus.NOT_SQUARE,
                     f"dF/dy is {J.shape[-2]} x {J.shape[-1]} (equations x unknowns), not square: "
                     f"use linear_solver='lstsq' (minimum-norm / least-squares solution) or ridge=...")


class _BlockState(LinearSolverState):
    def __init__(self, factors, shape):
        self.factors, self.shape = factors, shape

    def solve(self, b, transpose=False):
        b = np.asarray(b, dtype=float)
        bb = b.reshape(len(self.factors), -1)
        x = np.stack([self._solve_block(f, bi, transpose) for f, bi in zip(self.factors, bb)])
        return x.reshape(b.shape)


def _pow2(x: np.ndarray) -> np.ndarray:
    return np.exp2(np.round(np.log2(x)))


def equilibrate(block: np.ndarray, sweeps: int = 40, column_scale: Optional[np.ndarray] = None):
    """Row and column scalings ``r, c`` (powers of two, so exact) with ``diag(r) J diag(c)``
    of rows and columns of max-norm ~1: Ruiz's iteration, ``r_i <- r_i / sqrt(max row i)``,
    ``c_j <- c_j / sqrt(max column j)`` until balanced (each sweep halves the log-imbalance).
    The condition test of :class:`LU` is then invariant to the scales of the equations and
    of the unknowns.  ``column_scale`` (e.g. the magnitudes of the solution's components,
    the unknowns' natural units) starts the iteration: max-norm balancing alone has
    unbalanced fixed points such as ``[[eps A, b], [b^T, 0]]`` (a bordered eigen-system
    whose eigenvector has size 1e75)."""
    a = np.abs(block)
    r = np.ones(a.shape[0])
    c = np.ones(a.shape[1]) if column_scale is None else np.asarray(column_scale, float).copy()
    rmax = (a * c[None, :]).max(axis=1)
    r = 1.0 / np.where(rmax > 0, rmax, 1.0)          # rows to max-norm 1 in the given units
    for _ in range(sweeps):
        scaled = a * r[:, None] * c[None, :]
        rmax, cmax = scaled.max(axis=1), scaled.max(axis=0)
        if np.all((rmax == 0) | ((rmax > 0.5) & (rmax < 2))) and \
                np.all((cmax == 0) | ((cmax > 0.5) & (cmax < 2))):
            break
        r = r / np.sqrt(np.where(rmax > 0, rmax, 1.0))
        c = c / np.sqrt(np.where(cmax > 0, cmax, 1.0))
    return _pow2(r), _pow2(c)


def _unknown_units(operator, n_blocks: int) -> list:
    """Per block, the RMS size of each component of the solution (1 where 0 or unknown)."""
    point = operator.point
    structure = getattr(point, "y_structure", None)
    if structure is None:
        return [None] * n_blocks
    y = np.asarray(point.y_flat, float).reshape(n_blocks, -1)
    units = np.ones_like(y)
    for lo, hi in zip(structure.offsets[:-1], structure.offsets[1:]):
        rms = np.sqrt(np.mean(y[:, lo:hi] ** 2, axis=1)) if hi > lo else np.zeros(len(y))
        good = np.isfinite(rms) & (rms > 0)
        units[:, lo:hi] = np.where(good, rms, 1.0)[:, None]
    return list(units)


class _LUState(_BlockState):
    def solve(self, b, transpose=False):
        b = np.asarray(b, dtype=float)
        bb = b.reshape(len(self.factors), -1)
        out = []
        for (f, r, c), bi in zip(self.factors, bb):
            if transpose:   # J^T x = b:  (RJC)^T (R^-1 x) = C b
                out.append(r * scipy.linalg.lu_solve(f, c * bi, trans=1, check_finite=False))
            else:           # J x = b:    (RJC) (C^-1 x) = R b
                out.append(c * scipy.linalg.lu_solve(f, r * bi, trans=0, check_finite=False))
        return np.stack(out).reshape(b.shape)


class LU(LinearSolver):
    """``J x = b`` by an LU factorization of each block, formed and factored once.

    Each block is first equilibrated by exact power-of-two row and column
    scalings (:func:`equilibrate`), so the 1-norm condition number estimated
    (LAPACK ``gecon``) is that of ``R J C``: scale-invariant, relative to the
    sizes of the equations and unknowns.  Above ``max_condition`` a
    :class:`SingularJacobianError` is raised.
    """

    name = "lu"
    options = {"max_condition": 1e12}

    def init(self, operator, aux=None):
        J = operator.dense()
        _check_square(J)
        factors = []
        units = _unknown_units(operator, len(_blocks(J)))
        for i, block in enumerate(_blocks(J)):
            r, c = equilibrate(block, column_scale=units[i])
            scaled = block * r[:, None] * c[None, :]
            with warnings.catch_warnings():   # singularity is reported below, as a typed error
                warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
                lu_piv = scipy.linalg.lu_factor(scaled, check_finite=False)
            cond = lu_condition(lu_piv, scaled)
            if not cond <= self.opts["max_condition"]:
                raise condition_error(cond, i if J.ndim == 3 else None, self.opts["max_condition"])
            factors.append((lu_piv, r, c))
        return _LUState(factors, J.shape)


class _CholeskyState(_BlockState):
    def _solve_block(self, f, bi, transpose):
        return scipy.linalg.cho_solve(f, bi, check_finite=False)


class Cholesky(LinearSolver):
    """``J x = b`` for a symmetric positive definite ``J`` by a Cholesky factorization.

    ``J`` is symmetrized as ``(J + J^T)/2`` after a check that it is symmetric
    to ``1e-8`` relative; a failed factorization raises
    :class:`SingularJacobianError` ("not positive definite").
    """

    name = "cholesky"
    options = {"max_condition": 1e12}

    def init(self, operator, aux=None):
        J = operator.dense()
        _check_square(J)
        batched = J.ndim == 3
        factors = []
        for i, block in enumerate(_blocks(J)):
            asym = np.abs(block - block.T).max()
            if asym > 1e-8 * max(np.abs(block).max(), 1e-300):
                raise _error(LinearSolveError, SolveStatus.NOT_SYMMETRIC,
                             f"linear_solver='cholesky' needs a symmetric J_F,y but |J - J^T| = "
                             f"{asym:.3g}{where(i, batched)}; use linear_solver='lu' or 'gmres'.")
            try:
                c = scipy.linalg.cho_factor(0.5 * (block + block.T), check_finite=False)
            except np.linalg.LinAlgError:
                raise _error(SingularJacobianError, SolveStatus.NOT_POSITIVE_DEFINITE,
                             f"J_F,y is not positive definite{where(i, batched)}: Cholesky failed. "
                             f"Use linear_solver='lu' for an indefinite symmetric system, or "
                             f"'lstsq' / ridge=... if it is singular.") from None
            d = np.diag(c[0])
            cond = (d.max() / d.min()) ** 2
            if not cond <= self.opts["max_condition"]:
                raise condition_error(cond, i if batched else None, self.opts["max_condition"])
            factors.append(c)
        return _CholeskyState(factors, J.shape)


class _SVDState(LinearSolverState):
    def __init__(self, U, f, Vt, exact):
        self.U, self.f, self.Vt, self.exact = U, f, Vt, exact

    def solve(self, b, transpose=False):
        b = np.asarray(b, dtype=float)
        if transpose:   # J^T x = b  ->  x = U f V^T b
            left, right = self.U, np.swapaxes(self.Vt, -1, -2)
        else:           # J x = b    ->  x = V f U^T b
            left, right = np.swapaxes(self.Vt, -1, -2), self.U
        proj = np.einsum("...ki,...k->...i", right, b)
        return np.einsum("...ik,...k->...i", left, self.f * proj)


class Lstsq(LinearSolver):
    """Minimum-norm least squares ``x = J^+ b`` or, with ``ridge > 0``, Tikhonov.

    With the SVD ``J = U diag(s) V^T``: ``J^+ = V diag(f(s)) U^T`` where
    ``f(s) = 1/s`` for ``s > rcond * s_max`` (else 0), or ``f(s) = s/(s^2 + ridge)``.
    Non-square ``J`` is allowed.  ``state.exact`` is True only when J is square
    and no singular value was cut and ``ridge = 0``.
    """

    name = "lstsq"
    options = {"ridge": 0.0, "rcond": None}

    def init(self, operator, aux=None):
        J = operator.dense()
        U, s, Vt = np.linalg.svd(J, full_matrices=False)
        ridge, rcond = self.opts["ridge"], self.opts["rcond"]
        if ridge > 0:
            f = s / (s * s + ridge)
        else:
            cut = (rcond if rcond is not None else max(J.shape[-2:]) * EPS) * s.max(
                axis=-1, keepdims=True, initial=0.0)
            f = np.where(s > cut, 1.0 / np.where(s > cut, s, 1.0), 0.0)
        exact = not (ridge > 0 or J.shape[-1] != J.shape[-2] or (f == 0).any())
        return _SVDState(U, f, Vt, exact)


# --------------------------------------------------------------------------
# matrix-free Krylov solvers: one driver, preconditioning, iterative refinement
# --------------------------------------------------------------------------

class per_point:
    """A preconditioner that depends on the forward point (e.g. on the solution).

    Wrap a factory ``factory(point) -> preconditioner`` (a callable
    ``v -> M^{-1} v`` or an array holding the diagonal of ``M^{-1}``): the
    Krylov solvers evaluate it once per forward point, in :meth:`LinearSolver.init`,
    so every VJP, JVP and higher-order solve at the point shares it.

    >>> import numpy as onp
    >>> import autograd.numpy as anp
    >>> from autograd import grad
    >>> from nimplicit import implicit_layer
    >>> def newton(x):                   # y^3 + y = x elementwise
    ...     y = onp.cbrt(x)
    ...     for _ in range(50):
    ...         y = y - (y ** 3 + y - x) / (3 * y ** 2 + 1)
    ...     return y
    >>> # J_F,y = diag(3 y^2 + 1): its inverse diagonal is an exact preconditioner
    >>> opts = {"preconditioner": per_point(lambda point: 1.0 / (3 * point.y ** 2 + 1))}
    >>> layer = implicit_layer(lambda y, x: y ** 3 + y - x, newton, linear_solver="minres",
    ...                        linear_solver_options=opts)
    >>> grad(lambda x: anp.sum(layer(x)))(onp.array([2.0, 10.0]))      # 1 / (3 y^2 + 1)
    array([0.25      , 0.07692308])
    """

    def __init__(self, factory: Callable[..., object]):
        if not callable(factory):
            raise TypeError(f"per_point needs a callable factory(point), got {type(factory).__name__}")
        self.factory = factory


Preconditioner = Union[None, Callable[[np.ndarray], np.ndarray], np.ndarray, per_point]


def _probe_symmetry(matvec, shape, name):
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(shape), rng.standard_normal(shape)
    left, right = np.vdot(u, matvec(v)), np.vdot(v, matvec(u))
    scale = max(abs(left), abs(right), 1e-300)
    if abs(left - right) > 1e-8 * scale * max(1.0, np.sqrt(u.size)):
        raise _error(LinearSolveError, SolveStatus.NOT_SYMMETRIC,
                     f"linear_solver='{name}' needs a symmetric operator, but <u, A v> = {left:.6g} "
                     f"and <v, A u> = {right:.6g} differ: {name} would converge to a wrong solution. "
                     f"Use 'gmres', 'bicgstab' or 'lsmr' for a non-symmetric J_F,y.")


def _flat_operator(apply: MatVec, shape) -> Callable[[np.ndarray], np.ndarray]:
    """``apply`` (on arrays of ``b``'s layout) as a map of flat vectors."""
    return lambda v: np.asarray(apply(np.asarray(v).reshape(shape)), dtype=float).ravel()


def _diagonal_preconditioner(diag, shape, name: str, spd: bool) -> MatVec:
    diag = np.asarray(diag, dtype=float)
    if diag.shape not in (shape, shape[-1:]):
        raise ShapeError(f"the diagonal preconditioner of {name} has shape {diag.shape}; it must "
                         f"have the shape of b, {shape}, or of one instance, {shape[-1:]}")
    if not np.all(np.isfinite(diag)) or (spd and not np.all(diag > 0)):
        raise LinearSolveError(
            f"the diagonal preconditioner of {name} has {int((~(diag > 0)).sum())} entries that are "
            f"not {'positive and ' if spd else ''}finite; {name} needs "
            f"{'a symmetric positive definite M^{-1}' if spd else 'a nonsingular M^{-1}'} "
            f"(e.g. 1 / |diag(J_F,y)|, with zeros replaced by 1).")
    return lambda v: diag * v


def _resolve_preconditioner(preconditioner: Preconditioner, shape, point, name: str,
                            spd: bool) -> Optional[MatVec]:
    """``v -> M^{-1} v`` on arrays of ``b``'s layout, or None."""
    if preconditioner is None:
        return None
    if isinstance(preconditioner, per_point):
        if point is None:
            raise UnsupportedError(
                f"{name}: a per_point preconditioner needs the forward point, but the solver was "
                f"called with point=None; pass a fixed preconditioner instead.")
        return _resolve_preconditioner(preconditioner.factory(point), shape, None, name, spd)
    if callable(preconditioner):
        return preconditioner
    return _diagonal_preconditioner(preconditioner, shape, name, spd)


def _gmres(matvec: MatVec, b: np.ndarray, rtol: float, budget: int, restart: int):
    r"""Restarted GMRES on ``A x = b`` from ``x = 0``: at most ``budget`` products.

    Arnoldi with classical Gram-Schmidt applied twice (CGS2: as stable as
    modified Gram-Schmidt, but two matrix-vector products with the basis per
    step instead of ``j`` vector operations), Givens rotations for the
    least-squares residual ``|b - A x_j| = |g_{j+1}|``; stops when that
    estimate is ``<= rtol |b|`` or the budget is spent.  The caller checks the
    true residual.  Returns ``(x, info, iterations)`` with SciPy's ``info``
    convention (0 converged, > 0 not converged).
    """
    n = b.size
    bnorm = float(np.linalg.norm(b))
    x = np.zeros(n)
    if bnorm == 0:
        return x, 0, 0
    its, r, beta = 0, b, bnorm
    trtrs = _TRTRS
    while True:
        k_max = max(1, min(restart, budget - its, n))
        V = np.empty((k_max + 1, n))
        R = np.zeros((k_max + 1, k_max))       # the rotated Hessenberg matrix
        cs, sn = [0.0] * k_max, [0.0] * k_max  # Python floats: the rotations are scalar work
        g = [0.0] * (k_max + 1)
        np.divide(r, beta, out=V[0])
        g[0] = float(beta)
        k, hn = 0, 1.0
        target = rtol * bnorm
        for j in range(k_max):
            w = np.asarray(matvec(V[j]), dtype=float).ravel()
            its += 1
            basis = V[:j + 1]
            h = basis @ w
            w = w - h @ basis
            h2 = basis @ w
            w -= h2 @ basis
            h = (h + h2).tolist()
            hn = math.sqrt(float(w @ w))
            for i in range(j):                  # the previous rotations
                c, s_, hi, hi1 = cs[i], sn[i], h[i], h[i + 1]
                h[i], h[i + 1] = c * hi + s_ * hi1, -s_ * hi + c * hi1
            rho = math.hypot(h[j], hn)
            if rho == 0:
                break
            c, s_ = h[j] / rho, hn / rho
            cs[j], sn[j] = c, s_
            h[j] = rho
            R[:j + 1, j] = h
            g[j + 1], g[j] = -s_ * g[j], c * g[j]
            k = j + 1
            if hn > 0:
                np.divide(w, hn, out=V[j + 1])
            if abs(g[j + 1]) <= target or hn == 0:
                break
        if k:
            y, info = trtrs(R[:k, :k], np.array(g[:k]))
            if info != 0:      # an exactly zero diagonal: rho == 0 stopped before it
                y = scipy.linalg.solve_triangular(R[:k, :k], np.array(g[:k]), check_finite=False)
            x = x + y @ V[:k]
        converged = k > 0 and abs(g[k]) <= target
        if converged or k < k_max and (k == 0 or hn == 0) or its >= budget:
            return x, 0 if converged else its, its
        r = b - np.asarray(matvec(x), dtype=float).ravel()
        beta = float(np.linalg.norm(r))
        if beta <= target:
            return x, 0, its
        if its >= budget:
            return x, its, its


#: LAPACK's triangular solve (the back substitution of GMRES), without
#: ``scipy.linalg.solve_triangular``'s per-call checks (~30 us, once per restart)
_TRTRS = scipy.linalg.lapack.dtrtrs


def _one_krylov_solve(method, op, M, rhs, rtol, budget, restart, flat=None):
    """One run of a SciPy Krylov method on ``op x = rhs`` from ``x = 0``, at
    most ``budget`` inner iterations.  Returns ``(x, info, iterations)``.
    ``flat``: ``op``'s product as a plain function (our GMRES calls it directly,
    without the ~5 us of ``LinearOperator.matvec``'s checks per product)."""
    iterations = [0]

    def count(*_):
        iterations[0] += 1

    if method is spla.gmres and M is None:
        return _gmres(flat or op.matvec, rhs, rtol, budget, restart)
    if method is spla.gmres:
        # scipy counts GMRES restart cycles; here the budget bounds the inner
        # iterations (matrix-vector products), as for the other Krylov methods
        restart = max(1, min(restart, budget))
        x, info = method(op, rhs, rtol=rtol, atol=0.0, maxiter=-(-budget // restart), M=M,
                         restart=restart, callback=count, callback_type="pr_norm")
    else:
        try:
            x, info = method(op, rhs, rtol=rtol, maxiter=budget, M=M, callback=count)
        except ValueError as exc:   # minres: "indefinite preconditioner", "non-symmetric ..."
            raise LinearSolveError(f"{method.__name__} refused the problem: {exc}. MINRES and CG "
                                   f"need a symmetric operator and a symmetric positive definite "
                                   f"preconditioner.") from None
    return x, info, iterations[0]


#: largest ``|A| |x| / |b|`` (a lower bound on ``cond(A)``) of a Krylov solution
#: accepted at the noise floor; the LU's ``max_condition`` default
MAX_KRYLOV_GROWTH = 1e12

#: the noise floor's safety factor: ``|fl(A x) - A x| <= gamma_n |A| |x|`` with
#: ``gamma_n ~ n eps`` in the worst case and ~ sqrt(n) eps typically.
NOISE_FACTOR = 10.0


def noise_floor(norm_A: float, norm_x: float, norm_b: float, n: int) -> float:
    r"""The smallest residual norm that double precision can certify for ``A x = b``.

    A product ``A x`` evaluated in floating point (an autograd VJP is a chain of
    such products) carries an error of order ``eps |A| |x|``, and ``b - A x``
    one of order ``eps (|A| |x| + |b|)``.  A computed residual below

    .. math:: \tau = c\,\sqrt{n}\,\epsilon\,(\|A\|\,\|x\| + \|b\|),\quad c = 10,

    is rounding noise: no refinement can reduce it further.
    """
    return NOISE_FACTOR * np.sqrt(max(n, 1)) * EPS * (norm_A * norm_x + norm_b)


def _estimate_norm(apply: MatVec, apply_T: Optional[MatVec], n: int, steps: int = 6) -> float:
    """``|A|_2`` from below by a few power iterations on ``A^T A`` (or on ``A`` if symmetric)."""
    rng = np.random.default_rng(12345)
    v = rng.standard_normal(n)
    v /= np.linalg.norm(v)
    est = 0.0
    for _ in range(steps):
        w = apply(v)
        est = max(est, float(np.linalg.norm(w)))
        if apply_T is not None:
            w = apply_T(w)
        nw = np.linalg.norm(w)
        if not nw > 0:
            break
        v = w / nw
    return est


def _krylov(name: str, method, apply: MatVec, apply_T: Optional[MatVec], b: np.ndarray, *,
            rtol: float, maxiter: Optional[int], M: Optional[MatVec], refinements: int,
            restart: int = 60) -> np.ndarray:
    r"""Solve ``A x = b`` with a SciPy Krylov ``method`` and iterative refinement.

    Round 0 solves ``A x_0 = b``; round ``k`` solves the correction equation
    ``A d = r_k`` on the true residual ``r_k = b - A x_k`` and sets
    ``x_{k+1} = x_k + d``, for at most ``refinements`` rounds after the first.
    ``x`` is accepted as soon as ``|A x - b| <= rtol |b|``, or when a round no
    longer reduces a residual that is already at the noise floor of the
    operator (:func:`noise_floor`): then ``rtol`` was below what double
    precision can certify, and ``x`` is as accurate as the products allow.
    ``maxiter`` bounds the inner iterations of all rounds.
    """
    shape = b.shape
    bf = b.ravel()
    bnorm = np.linalg.norm(bf)
    if bnorm == 0:
        return np.zeros(shape)
    n = bf.size
    fa = _flat_operator(apply, shape)
    # our GMRES calls fa itself; SciPy's methods take a LinearOperator
    op = None if method is spla.gmres and M is None else \
        spla.LinearOperator((n, n), matvec=fa, dtype=float)
    Mop = None if M is None else spla.LinearOperator((n, n), matvec=_flat_operator(M, shape),
                                                     dtype=float)
    maxiter = maxiter or 10 * n
    x, r = np.zeros(n), bf
    best_x, best_res = x, 1.0
    used, rounds, gap, info = 0, 0, 1.0, 0
    res = previous = 1.0
    while True:
        # no residual below the smallest possible noise floor (|A| |x| >= |b|) can be
        # certified: never ask a round for less, or an unattainable rtol burns maxiter
        asked = (min(0.5, max(rtol / res / gap, EPS)) if rounds
                 else max(rtol, 2 * NOISE_FACTOR * np.sqrt(n) * EPS))
        d, info, its = _one_krylov_solve(method, op, Mop, r, asked, maxiter - used, restart, fa)
        used, rounds = used + its, rounds + 1
        x = x + d
        r = bf - fa(x)
        previous, res = res, np.linalg.norm(r) / bnorm
        if res < best_res:
            best_x, best_res = x, res
        if res <= rtol:
            return x.reshape(shape)
        gap = max(1.0, res / (asked * previous))
        stalled = not res < previous
        if stalled or rounds > refinements or used >= maxiter or info < 0:
            break
    # is what remains rounding noise of the operator?  (then rtol was unattainable)
    fT = None if apply_T is None else _flat_operator(apply_T, shape)
    norm_A, norm_x = _estimate_norm(fa, fT, n), np.linalg.norm(best_x)
    floor = noise_floor(norm_A, norm_x, bnorm, n) / bnorm
    # |A| |x| / |b| <= cond(A): a solution this large certifies that A is (numerically)
    # singular, and its noise floor (which grows with |x|) says nothing
    growth = norm_A * norm_x / bnorm
    if best_res <= floor and growth <= MAX_KRYLOV_GROWTH:
        return best_x.reshape(shape)
    if growth > MAX_KRYLOV_GROWTH:
        raise _error(LinearSolveError, SolveStatus.SINGULAR,
                     f"{name} did not converge (relative residual {best_res:.3g} > rtol={rtol:g}) "
                     f"and its iterate grew to |A| |x| / |b| = {growth:.3g} > {MAX_KRYLOV_GROWTH:g}, "
                     f"a lower bound on the condition number: J_F,y is singular or too "
                     f"ill-conditioned for a unique derivative. Use linear_solver='lstsq' for the "
                     f"minimum-norm solution or ridge=<small positive number>.")
    status = (SolveStatus.MAX_STEPS_REACHED if used >= maxiter else
              SolveStatus.BREAKDOWN if info < 0 else
              SolveStatus.STAGNATION if stalled else SolveStatus.REFINEMENTS_USED_UP)
    raise _error(LinearSolveError, status,
                 _not_converged(name, best_res, rtol, used, rounds, refinements, maxiter, info,
                                status, floor))


def _not_converged(name, res, rtol, iterations, rounds, refinements, maxiter, info, status,
                   floor) -> str:
    why = (f"method breakdown (scipy info={info})" if status is SolveStatus.BREAKDOWN
           else status.message)
    return (f"{name} did not converge: the relative residual |A x - b|/|b| = {res:.3g} did not "
            f"reach rtol={rtol:g} after {iterations} iterations in {rounds} Krylov solve(s) "
            f"(refinements={refinements}, maxiter={maxiter}; the operator's noise floor is "
            f"{floor:.2g}): {why}. Raise maxiter or refinements, "
            f"pass preconditioner= (an approximation of A^{{-1}}, e.g. the inverse diagonal of "
            f"J_F,y), use a solver suited to the operator (gmres for a non-symmetric J_F,y), or a "
            f"dense solver ('lu').")


class _KrylovState(LinearSolverState):
    def __init__(self, solver: "_Krylov", operator: Operator, M: Optional[MatVec]):
        self.solver, self.operator, self.M = solver, operator, M
        self._probed = set()

    def solve(self, b, transpose=False):
        b = np.asarray(b, dtype=float)
        s, op = self.solver, self.operator
        apply, apply_T = (op.rmv, op.mv) if transpose else (op.mv, op.rmv)
        if s.symmetric:
            apply = apply or apply_T
        if s.symmetric and s.opts["check_symmetric"] and transpose not in self._probed:
            _probe_symmetry(apply, b.shape, s.name)
            self._probed.add(transpose)
        return _krylov(s.name, s.method, apply, apply_T, b, rtol=s.opts["rtol"],
                       maxiter=s.opts["maxiter"], M=self.M, refinements=s.opts["refinements"],
                       restart=min(s.opts.get("restart", 60), b.size))


class _Krylov(LinearSolver):
    """Square Krylov solver (see the module docstring for the options)."""

    method = None
    symmetric = False
    options = {"rtol": 1e-11, "maxiter": None, "preconditioner": None, "refinements": 3}

    def init(self, operator, aux=None):
        if operator.r != operator.m:
            raise _error(ShapeError, SolveStatus.NOT_SQUARE,
                         f"{self.name} needs a square J_F,y, got {operator.r} x {operator.m}; use "
                         f"'lsmr' or 'lstsq'")
        M = _resolve_preconditioner(self.opts["preconditioner"], operator.batch + (operator.m,),
                                    operator.point, self.name, spd=self.symmetric)
        return _KrylovState(self, operator, M)


class CG(_Krylov):
    """Conjugate gradients, for a symmetric positive definite ``J`` (probed unless
    ``check_symmetric=False``)."""
    name, method, symmetric = "cg", staticmethod(spla.cg), True
    options = {**_Krylov.options, "check_symmetric": True}


class MINRES(_Krylov):
    """MINRES, for a symmetric (possibly indefinite) ``J``.  SciPy's MINRES stops on
    a backward-error estimate; the refinement rounds close the gap to ``rtol``."""
    name, method, symmetric = "minres", staticmethod(spla.minres), True
    options = {**_Krylov.options, "check_symmetric": True}


class GMRES(_Krylov):
    """Restarted GMRES(``restart``) for a general square ``J``."""
    name, method = "gmres", staticmethod(spla.gmres)
    options = {**_Krylov.options, "restart": 60}


class BiCGSTAB(_Krylov):
    """BiCGSTAB for a general square ``J``."""
    name, method = "bicgstab", staticmethod(spla.bicgstab)


class _LSMRState(LinearSolverState):
    exact = False

    def __init__(self, solver, operator):
        self.solver, self.operator = solver, operator

    def solve(self, b, transpose=False):
        b = np.asarray(b, dtype=float)
        op, o = self.operator, self.solver.opts
        mv, rmv = (op.rmv, op.mv) if transpose else (op.mv, op.rmv)
        if mv is None or rmv is None:
            raise UnsupportedError("lsmr needs both products of the operator (J and J^T)")
        batch = b.shape[:-1]
        xshape = batch + ((op.r if transpose else op.m),)
        A = spla.LinearOperator(
            (b.size, int(np.prod(xshape))), dtype=float,
            matvec=lambda v: np.asarray(mv(np.asarray(v).reshape(xshape)), float).ravel(),
            rmatvec=lambda u: np.asarray(rmv(np.asarray(u).reshape(b.shape)), float).ravel())
        maxiter = o["maxiter"] or 10 * max(A.shape)
        x, istop, itn = spla.lsmr(A, b.ravel(), damp=np.sqrt(o["ridge"]), atol=o["rtol"],
                                  btol=o["rtol"], conlim=1e14, maxiter=maxiter)[:3]
        if istop in (3, 6, 7):
            reason = {3: "the operator's estimated condition number exceeded conlim=1e14",
                      6: "the condition number exceeded 1/eps",
                      7: f"maxiter={maxiter} was reached"}[istop]
            raise _error(LinearSolveError, SolveStatus.MAX_STEPS_REACHED if istop == 7
                         else SolveStatus.ILL_CONDITIONED,
                         f"lsmr did not converge after {itn} iterations: {reason}. "
                         f"Raise maxiter, add ridge=..., or use linear_solver='lstsq'.")
        return x.reshape(xshape)


class LSMR(LinearSolver):
    """LSMR: ``argmin |J x - b|^2 + ridge |x|^2`` for any (also non-square) ``J``,
    minimum-norm when ``ridge = 0``; uses both products; never exact.

    It takes neither ``preconditioner`` nor ``refinements``: a preconditioner
    changes which least-squares / minimum-norm solution is found, and the true
    residual of an inconsistent system never reaches ``rtol``.
    """

    name = "lsmr"
    options = {"rtol": 1e-12, "maxiter": None, "ridge": 0.0, "preconditioner": None,
               "refinements": None}

    def _validate(self):
        super()._validate()
        if self.opts["preconditioner"] is not None or self.opts["refinements"] is not None:
            raise UnsupportedError("lsmr takes no preconditioner or refinements (they would change "
                                   "the least-squares solution); use 'gmres' or 'minres' for a "
                                   "square, nonsingular J_F,y.")

    def init(self, operator, aux=None):
        return _LSMRState(self, operator)


SOLVER_CLASSES = {cls.name: cls for cls in (LU, Cholesky, Lstsq, CG, MINRES, GMRES, BiCGSTAB, LSMR)}


# --------------------------------------------------------------------------
# 'auto' for mid-sized square J: Krylov first, dense LU when that is cheaper
# --------------------------------------------------------------------------

#: multiply-adds per second assumed for LAPACK's LU factorization (one thread,
#: conservative): the dense cost of a block of size m is m^3/3 / LU_RATE seconds.
LU_RATE = 1e9


class _OverBudget(Exception):
    """Raised by :class:`_CountingOperator` when the Krylov products exceed the dense cost."""


class _CountingOperator(Operator):
    """``operator`` with every product counted and timed, and a budget of products.

    ``budget()`` is re-evaluated on each product from the ``floor``-th on (it depends
    on the measured cost of one product, and is never below ``floor``); exceeding it
    raises :class:`_OverBudget`, which unwinds the Krylov solve that asked for the
    product.
    """

    def __init__(self, operator: Operator, budget: Callable[[], float], floor: int = 0):
        super().__init__(operator.r, operator.m, operator.batch_size, operator.point)
        self.inner, self.budget, self.floor = operator, budget, floor
        self.products, self.fastest = 0, np.inf

    def _count(self, apply, v):
        if self.products >= self.floor and self.products >= self.budget():
            raise _OverBudget
        start = time.perf_counter()
        out = apply(v)
        self.fastest = min(self.fastest, time.perf_counter() - start)
        self.products += 1
        return out

    def mv(self, u):
        return self._count(self.inner.mv, u)

    def rmv(self, w):
        return self._count(self.inner.rmv, w)

    def dense(self):
        return self.inner.dense()


class _KrylovOrDenseState(LinearSolverState):
    def __init__(self, solver: "KrylovOrDense", operator: Operator, aux):
        self.solver, self.operator, self.aux = solver, operator, aux
        self.counted = _CountingOperator(operator, self.break_even, floor=operator.m)
        self.krylov = solver.krylov.init(self.counted, aux)
        self.dense_state: Optional[LinearSolverState] = None
        self.switched_because: Optional[str] = None
        self.probed = not solver.opts["probe"]
        cheap = getattr(operator, "dense_is_cheap", None)
        if solver.opts["dense_if_cheap"] and cheap is not None and cheap():
            self.switched_because = ("J forms in one replay of the residual's tape: the dense "
                                     "solve, with its condition check, is the cheaper")
            self.dense_state = solver.dense.init(operator, aux)
        if not self.probed:
            k = solver.krylov
            self.probe_krylov = type(k)(**{**k.opts, "rtol": max(PROBE_RTOL, k.opts["rtol"])}
                                        ).init(self.counted, aux)

    @property
    def exact(self) -> bool:
        return True if self.dense_state is None else self.dense_state.exact

    def _probe(self, shape, transpose: bool) -> None:
        r"""Once per point, before the first Krylov solve: is J (numerically) singular?

        A Krylov method only explores the range of J from the right-hand side, so
        it solves a singular J with a right-hand side in its range without noticing
        (one of many solutions).  A random right-hand side ``z`` (fixed seed) has a
        component outside the range of a singular J, of relative size ``c``; no
        solve gets the residual below ``c |z|``, and ``c < PROBE_RTOL = 1e-8``
        has probability ``~ 0.8 * 1e-8 sqrt(m)`` (a one-dimensional null space;
        less for a larger one).  So the probe's solve, to ``PROBE_RTOL``, fails
        (or runs over the budget), and the state goes to the dense LU, which
        reports the singularity as a typed error.  A converged probe whose solution
        grew to ``m |A z| |x| / |z|^2 > max_condition`` (the growth is a lower
        bound on ``cond(A)``, within a factor of about ``m`` of it) goes to the LU
        too, whose condition test decides.  Costs one Krylov solve to ``PROBE_RTOL``
        and one product.
        """
        self.probed = True
        z = _probe_vector(shape)
        x = self.probe_krylov.solve(z, transpose=transpose)
        Az = (self.counted.rmv if transpose else self.counted.mv)(z)
        growth = float(np.linalg.norm(Az) * np.linalg.norm(x) / np.vdot(z, z))
        limit = self.solver.dense.opts.get("max_condition", MAX_KRYLOV_GROWTH)
        # growth underestimates cond(A) by up to a factor ~ m: compare m * growth, so that
        # every J the LU's condition test would refuse goes to the LU
        m = z.shape[-1]
        if not m * growth <= limit:
            raise _error(LinearSolveError, SolveStatus.ILL_CONDITIONED,
                         f"the probe solve's solution grew to |A z| |x| / |z|^2 = {growth:.3g}, "
                         f"times m = {m} > max_condition={limit:.3g}: J_F,y may be ill-conditioned")

    def break_even(self) -> float:
        r"""The number of products that forming and factoring J would cost.

        ``m`` VJPs (one per row, batched over the instances) plus the LU of the
        ``B`` blocks, ``B m^3/3`` multiply-adds at :data:`LU_RATE`, converted to
        products by the fastest product measured so far.
        """
        op = self.operator
        blocks = op.batch_size or 1
        t_lu = blocks * op.m ** 3 / 3.0 / LU_RATE
        t_product = self.counted.fastest
        extra = t_lu / t_product if np.isfinite(t_product) and t_product > 0 else 0.0
        return op.m + extra

    def solve(self, b, transpose=False):
        if self.dense_state is None:
            try:
                if not self.probed:
                    try:
                        self._probe(np.shape(b), transpose)
                    except LinearSolveError as exc:
                        raise LinearSolveError(f"the probe with a random right-hand side (is "
                                               f"J_F,y singular?): {exc}") from exc
                return self.krylov.solve(b, transpose=transpose)
            except _OverBudget:
                self.switched_because = (f"the Krylov products ({self.counted.products}) "
                                         f"reached the cost of forming and factoring J")
            except LinearSolveError as exc:   # not converged: the dense solve decides
                self.switched_because = f"{self.solver.krylov.name} failed: {exc}"
            self.dense_state = self.solver.dense.init(self.operator, self.aux)
        return self.dense_state.solve(b, transpose=transpose)


#: default GMRES tolerance of :class:`KrylovOrDense` (a few more iterations than at
#: GMRES's 1e-11; below the noise floor the refinement accepts the floor, see
#: :func:`noise_floor`)
KRYLOV_OR_DENSE_RTOL = 1e-14

#: seed of the random right-hand side of :meth:`_KrylovOrDenseState._probe`
PROBE_SEED = 20261202

_PROBE_VECTORS: dict = {}


def _probe_vector(shape) -> np.ndarray:
    """The probe's right-hand side of ``shape``: standard normal from :data:`PROBE_SEED`,
    drawn once per shape (the last few shapes are kept); a fresh copy, since user
    preconditioners and operators may write into their argument."""
    z = _PROBE_VECTORS.get(shape)
    if z is None:
        if len(_PROBE_VECTORS) >= 16:
            _PROBE_VECTORS.clear()
        z = np.random.default_rng(PROBE_SEED).standard_normal(shape)
        z.flags.writeable = False
        z = _PROBE_VECTORS.setdefault(shape, z)
    return z.copy()


#: the relative residual the singularity probe of :class:`KrylovOrDense` solves to
#: (a singular J goes unnoticed with probability ~ PROBE_RTOL sqrt(m))
PROBE_RTOL = 1e-8


class KrylovOrDense(LinearSolver):
    r"""``linear_solver='auto'`` for a square J of moderate size: Krylov first, LU when cheaper.

    The cost of a solve is counted in products with J (VJPs / JVPs), the
    dominant cost of a traced residual.  Forming J densely costs ``m`` products
    (batched over instances) plus the LU, ``B m^3/3`` multiply-adds; a Krylov
    solve costs its iterations, which are not known in advance.  Rule (a
    ski-rental bound): solve by ``krylov`` while the products spent at this
    point stay below the dense cost ``N_d = m + t_LU / t_v`` (``t_v`` the
    fastest product measured at the point, ``t_LU = B m^3 / (3 LU_RATE)``);
    when a solve would exceed it, or the Krylov method does not converge, form
    and factor J with ``dense`` and use it for this and every later solve.  So
    a point never costs more than about twice the cheaper of the two, and a
    well-conditioned J with ``m`` above the Krylov iteration count (typically
    10-30 to rtol 1e-11) is never formed.  ``state.switched_because`` tells why
    a point went dense (None while Krylov).

    A Krylov solve does not estimate the condition of J: a singular J with a
    right-hand side in its range is solved (one of the solutions) where the
    LU would raise :class:`~nimplicit.errors.SingularJacobianError`; a
    right-hand side outside it makes the Krylov method fail and the LU report
    the singularity.  ``probe=True`` (what ``linear_solver='auto'`` uses)
    closes that gap: before the first solve at a point, one Krylov solve with a
    random right-hand side, which a singular J cannot solve, so the LU reports
    it (see ``_KrylovOrDenseState._probe``; one more Krylov solve per point).
    ``dense_if_cheap=True`` (also what ``'auto'`` uses): when the operator forms J
    at about the cost of a product (``operator.dense_is_cheap()``: the residual's
    tape replays a stack of unit cotangents at once), the dense solver from the
    start.  Pass ``linear_solver='lu'`` for the LU's condition check on every point.
    """

    name = "krylov_or_dense"
    #: GMRES's options, with an rtol tight enough that the gradient is as accurate
    #: as the LU's, and the LU's
    options: dict = {**GMRES.options, "rtol": KRYLOV_OR_DENSE_RTOL, **LU.options, "probe": False,
                     "dense_if_cheap": False}

    def __init__(self, krylov: Optional[LinearSolver] = None, dense: Optional[LinearSolver] = None,
                 **options):
        inner = sorted(set(options) - {"probe", "dense_if_cheap"})
        if inner and (krylov is not None or dense is not None):
            raise OptionError(f"KrylovOrDense: options {inner} given together with "
                              f"constructed solvers: pass them to those solvers' constructors")
        super().__init__(**options)
        self.krylov = GMRES(**{k: self.opts[k] for k in GMRES.options}) if krylov is None \
            else krylov
        self.dense = LU(**{k: self.opts[k] for k in LU.options}) if dense is None else dense

    def init(self, operator, aux=None):
        return _KrylovOrDenseState(self, operator, aux)

    def __repr__(self):
        flags = "".join(f", {k}=True" for k in ("probe", "dense_if_cheap") if self.opts[k])
        return f"KrylovOrDense({self.krylov!r}, {self.dense!r}{flags})"

    def __eq__(self, other):
        def key(s):
            return s.krylov, s.dense, s.opts["probe"], s.opts["dense_if_cheap"]
        return type(other) is KrylovOrDense and key(other) == key(self)

    __hash__ = object.__hash__


SOLVER_CLASSES[KrylovOrDense.name] = KrylovOrDense
DENSE_NAMES = ("lu", "cholesky", "lstsq")


# --------------------------------------------------------------------------
# the deprecated callable protocol: the only place of the old cache dict
# --------------------------------------------------------------------------

class _LegacyOperator(CallbackOperator):
    """The operator of an old-protocol call: ``matvec = A``, ``A = J^T`` if transpose."""

    def __init__(self, matvec, rmatvec, b, transpose, x_size, point, J):
        k = b.shape[-1]
        r, m = ((x_size or k), k) if transpose else (k, (x_size or k))
        mv, rmv = (rmatvec, matvec) if transpose else (matvec, rmatvec)
        batch = b.shape[:-1]
        if len(batch) > 1:
            raise ShapeError(f"a right-hand side of shape {b.shape}: one instance (k,) or a batch "
                             f"(B, k)")
        super().__init__(mv, rmv, r, m, batch[0] if batch else None, point, J)


def _legacy_call(cls, matvec, rmatvec, b, transpose, x_size, cache, point, opts):
    """Old protocol -> new: build (once per ``cache``) the state and solve."""
    opts = {k: v for k, v in opts.items() if k not in ("x_size", "cache", "point", "transpose")}
    b = np.asarray(b, dtype=float)
    key = ("nimplicit.linear_solvers", cls.name)
    state = cache.get(key) if cache is not None else None
    if state is None:
        J = cache.get("J") if cache is not None else None
        state = cls(**opts).init(_LegacyOperator(matvec, rmatvec, b, transpose, x_size, point, J))
        if cache is not None:
            cache[key] = state
            if not state.exact:
                cache["pseudo_inverse"] = True
    return state.solve(b, transpose=transpose)


def legacy_function(cls):
    """The deprecated callable form ``solve(matvec, rmatvec, b, *, transpose, x_size, cache,
    point, **opts)`` of a :class:`LinearSolver` class (its state kept in ``cache``)."""
    def solve(matvec: Optional[MatVec], rmatvec: Optional[MatVec], b: np.ndarray, *,
              transpose: bool = False, x_size: Optional[int] = None, cache: Optional[dict] = None,
              point=None, **opts) -> np.ndarray:
        return _legacy_call(cls, matvec, rmatvec, b, transpose, x_size, cache, point, opts)
    solve.__name__ = solve.__qualname__ = cls.name
    solve.__doc__ = (f"Deprecated callable form of :class:`{cls.__name__}` "
                     f"(``solve(matvec, rmatvec, b, *, transpose, x_size, cache, point, **opts)``, "
                     f"``matvec = A``, ``A = J^T`` when ``transpose``).\n\n"
                     f"{inspect.cleandoc(cls.__doc__ or '')}")
    solve.solver_class = cls
    return solve


lu = legacy_function(LU)
cholesky = legacy_function(Cholesky)
lstsq = legacy_function(Lstsq)
cg = legacy_function(CG)
minres = legacy_function(MINRES)
gmres = legacy_function(GMRES)
bicgstab = legacy_function(BiCGSTAB)
lsmr = legacy_function(LSMR)

DENSE = {"lu": lu, "cholesky": cholesky, "lstsq": lstsq}
MATRIX_FREE = {"cg": cg, "minres": minres, "gmres": gmres, "bicgstab": bicgstab, "lsmr": lsmr}
SOLVERS = {**DENSE, **MATRIX_FREE}
INVERTIBLE = {"lu", "cholesky", "cg", "minres", "gmres", "bicgstab"}


class _LegacyState(LinearSolverState):
    def __init__(self, fn, operator, options):
        self.fn, self.operator, self.options = fn, operator, options
        self.cache: dict = {}      # the old per-point dict, for this callable only

    @property
    def exact(self):
        return not self.cache.get("pseudo_inverse")

    def solve(self, b, transpose=False):
        op = self.operator
        mv, rmv = (op.rmv, op.mv) if transpose else (op.mv, op.rmv)
        b = np.asarray(b, dtype=float)
        return self.fn(mv, rmv, b, transpose=transpose, x_size=op.r if transpose else op.m,
                       cache=self.cache, point=op.point, **self.options)


class LegacySolver(LinearSolver):
    """Deprecated: a callable ``solve(matvec, rmatvec, b, *, transpose, x_size, cache, point,
    **opts)`` used as a linear solver.  ``cache`` is a dict per forward point;
    ``cache["pseudo_inverse"] = True`` marks a non-exact solve.  Write a
    :class:`LinearSolver` subclass instead.
    """

    name = "legacy"

    def __init__(self, fn: Callable, **options):
        if not callable(fn):
            raise OptionError(f"a legacy linear solver must be callable, got {type(fn).__name__}")
        warnings.warn(f"a callable linear_solver ({getattr(fn, '__qualname__', fn)!r}, the "
                      f"solve(matvec, rmatvec, b, *, transpose, x_size, cache, point) protocol) is "
                      f"deprecated and goes away in the next release: write a "
                      f"nimplicit.linear_solvers.LinearSolver subclass (init(operator, aux) -> "
                      f"state, state.solve(b, transpose)) instead", DeprecationWarning, stacklevel=3)
        self.fn = fn
        self.opts = dict(options)    # passed through to the callable, as before

    def init(self, operator, aux=None):
        return _LegacyState(self.fn, operator, self.opts)

    def __repr__(self):
        return f"LegacySolver({getattr(self.fn, '__qualname__', self.fn)!r})"

    def __eq__(self, other):
        return type(other) is LegacySolver and other.fn is self.fn and other.opts == self.opts

    __hash__ = object.__hash__


def make_solver(spec: Union[str, LinearSolver, type, Callable], options: Optional[dict] = None
                ) -> LinearSolver:
    """A :class:`LinearSolver` from a name, a class, an instance or a (deprecated) callable.

    ``options`` are the solver's options (``linear_solver_options``); with an
    instance they must be empty.
    """
    options = dict(options or {})
    if isinstance(spec, LinearSolver):
        if options:
            raise OptionError(f"linear_solver_options={sorted(options)} given together with a "
                              f"constructed solver {spec!r}: pass the options to its constructor")
        return spec
    if isinstance(spec, type) and issubclass(spec, LinearSolver):
        return spec(**options)
    if isinstance(spec, str):
        try:
            return SOLVER_CLASSES[spec](**options)
        except KeyError:
            raise OptionError(f"unknown linear_solver {spec!r}; choose one of "
                              f"{sorted(SOLVER_CLASSES)}, a LinearSolver instance, or "
                              f"(deprecated) a callable solve(matvec, rmatvec, b, **opts)") from None
    if callable(spec):
        cls = getattr(spec, "solver_class", None)
        if cls is not None:        # the callable form of a protocol class
            return cls(**options)
        return LegacySolver(spec, **options)
    raise OptionError(f"linear_solver must be a name, a LinearSolver or a callable, got "
                      f"{type(spec).__name__}")


def get(name_or_callable):
    """Deprecated: the old-protocol function of a solver name (or a callable as is)."""
    if callable(name_or_callable):
        return name_or_callable
    try:
        return SOLVERS[name_or_callable]
    except KeyError:
        raise OptionError(f"unknown linear_solver {name_or_callable!r}; choose one of "
                          f"{sorted(SOLVERS)} or pass a callable "
                          f"solve(matvec, rmatvec, b, **opts)") from None
