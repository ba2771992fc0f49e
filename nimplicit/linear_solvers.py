"""Linear solvers for the systems of the implicit function theorem.

Every solver has one signature::

    x = solve(matvec, rmatvec, b, *, transpose=False, x_size=None, cache=None, point=None, **opts)

and solves ``A x = b`` where ``matvec(v) = A v`` and ``rmatvec(u) = A^T u``.
The implicit node calls them with ``A = J^T`` (``transpose=True``, the reverse
mode system ``J^T w = -g``) or ``A = J`` (``transpose=False``, the forward mode
system ``J y_dot = -J_x x_dot``), where ``J = dF/dy`` is ``r x m`` (``r``
equations, ``m`` unknowns).

- ``b`` is one instance, shape ``(k,)``, or a batch of independent instances,
  shape ``(B, k)``; ``matvec`` and ``rmatvec`` act instance by instance on
  arrays of the same layout (A is block diagonal).
- ``x_size`` is the number of unknowns per instance of ``A x = b`` (defaults to
  the size of ``b``; differs from it only when A is not square).
- ``cache`` is a dict that lives as long as one forward point: a solver stores
  its factorization there, so the many solves of one Jacobian (``m`` VJPs, both
  transposes, higher orders) factor ``J`` once.  The dense solvers keep the
  formed ``J`` under ``cache["J"]`` and use one found there, so a caller that
  already holds ``J`` (e.g. a structured layer) passes it in that way.
- ``point`` is the :class:`~nimplicit.implicit.ForwardPoint` (solution and
  inputs), for solvers whose setup depends on where the layer is evaluated.

Dense solvers (:func:`lu`, :func:`cholesky`, :func:`lstsq`) form ``J`` from
``r`` products with ``J^T`` (VJPs, the cheap product in reverse-mode autograd),
batched: the ``k``-th unit cotangent in every instance at once yields row
``k`` of all ``B`` blocks, so a batch costs ``r`` VJPs, not ``B r``.
Matrix-free solvers (:func:`cg`, :func:`minres`, :func:`gmres`,
:func:`bicgstab`, :func:`lsmr`) never form a matrix.

The square Krylov solvers (cg, minres, gmres, bicgstab) share one driver and
two options:

- ``preconditioner``: ``M^{-1}``, an approximation of ``A^{-1}`` -- a callable
  ``v -> M^{-1} v`` on arrays of ``b``'s layout, an array holding the diagonal
  of ``M^{-1}``, or :class:`per_point` ``(factory)`` whose ``factory(point)``
  returns either, evaluated once per forward point and kept in ``cache`` (the
  way to use a preconditioner that depends on the solution, since
  ``linear_solver_options`` are fixed per layer).  cg and minres need it
  symmetric positive definite.
- ``refinements``: iterative refinement.  A solution is accepted only when the
  TRUE relative residual ``|A x - b| / |b| <= rtol`` (SciPy's methods stop on
  their own estimates: a recursively updated residual, a preconditioned
  residual, or MINRES's backward error ``|r| / (|A| |x| + |b|)``, which can be
  orders of magnitude smaller); while it is not, and at most ``refinements``
  times, the solve restarts on the true residual: ``x += solve(A, b - A x)``.
  Otherwise :class:`~nimplicit.errors.LinearSolveError` names the iterations,
  the residual reached and what to try.  ``maxiter`` bounds the inner
  iterations of all rounds together.

A user-supplied solver is any callable with the same signature; ``cache`` is
where a structured solver keeps a factorization it builds (or receives from
the forward solver) for reuse.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import numpy as onp
import scipy.linalg
import scipy.sparse.linalg as spla

from .errors import LinearSolveError, ShapeError, SingularJacobianError, UnsupportedError

MatVec = Callable[[onp.ndarray], onp.ndarray]

EPS = onp.finfo(float).eps


# --------------------------------------------------------------------------
# dense: form J once per forward point, factor once, solve many times
# --------------------------------------------------------------------------

def form_jacobian(matvec: MatVec, rmatvec: MatVec, b: onp.ndarray, transpose: bool,
                  x_size: Optional[int] = None) -> onp.ndarray:
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
        e = onp.zeros(batch + (r,))
        e[..., k] = 1.0
        rows.append(onp.asarray(vjp(e), dtype=float))
    return onp.stack(rows, axis=-2)


def _jacobian(matvec, rmatvec, b, transpose, x_size, cache):
    if cache is not None and "J" in cache:
        return cache["J"]
    J = form_jacobian(matvec, rmatvec, b, transpose, x_size)
    if cache is not None:
        cache["J"] = J
    return J


def _blocks(J):
    return J.reshape((-1,) + J.shape[-2:])


def _condition_error(cond: float, index, max_condition: float) -> SingularJacobianError:
    where = "" if index is None else f" (batch instance {index})"
    if not onp.isfinite(cond) or cond * EPS >= 1.0:
        what = f"is singular to working precision (estimated condition number {cond:.3g})"
    else:
        what = f"is ill-conditioned (estimated condition number {cond:.3g} > max_condition={max_condition:.3g})"
    return SingularJacobianError(
        f"J_F,y = dF/dy at the solution{where} {what}; the implicit function theorem "
        f"does not give a unique derivative there. Use linear_solver='lstsq' for the "
        f"minimum-norm solution or pass ridge=<small positive number> for a damped one, "
        f"or raise max_condition if the conditioning is expected.")


def _check_square(J):
    if J.shape[-1] != J.shape[-2]:
        raise ShapeError(
            f"dF/dy is {J.shape[-2]} x {J.shape[-1]} (equations x unknowns), not square: "
            f"use linear_solver='lstsq' (minimum-norm / least-squares solution) or ridge=...")


def lu(matvec: MatVec, rmatvec: MatVec, b: onp.ndarray, *, transpose: bool = False,
       x_size: Optional[int] = None, cache: Optional[dict] = None,
       max_condition: float = 1e12, **_) -> onp.ndarray:
    """Solve ``J x = b`` (or ``J^T x = b``) by a cached LU factorization of ``J``.

    The condition number of every block is estimated (LAPACK ``gecon``, 1-norm)
    when the factorization is made; above ``max_condition`` a
    :class:`SingularJacobianError` is raised.
    """
    key = "lu"
    if cache is None or key not in cache:
        J = _jacobian(matvec, rmatvec, b, transpose, x_size, cache)
        _check_square(J)
        factors = []
        for i, block in enumerate(_blocks(J)):
            with warnings.catch_warnings():   # singularity is reported below, as a typed error
                warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
                lu_piv = scipy.linalg.lu_factor(block, check_finite=False)
            anorm = onp.abs(block).sum(axis=0).max()
            rcond, _info = scipy.linalg.lapack.dgecon(lu_piv[0], anorm, norm="1")
            cond = 1.0 / rcond if rcond > 0 else onp.inf
            if not cond <= max_condition:
                raise _condition_error(cond, i if J.ndim == 3 else None, max_condition)
            factors.append(lu_piv)
        if cache is not None:
            cache[key] = factors
    else:
        factors = cache[key]
    trans = 1 if transpose else 0
    bb = b.reshape(len(factors), -1)
    x = onp.stack([scipy.linalg.lu_solve(f, bi, trans=trans, check_finite=False)
                   for f, bi in zip(factors, bb)])
    return x.reshape(b.shape)


def cholesky(matvec: MatVec, rmatvec: MatVec, b: onp.ndarray, *, transpose: bool = False,
             x_size: Optional[int] = None, cache: Optional[dict] = None,
             max_condition: float = 1e12, **_) -> onp.ndarray:
    """Solve ``J x = b`` for a symmetric positive definite ``J`` (say so with
    ``linear_solver='cholesky'``) by a cached Cholesky factorization.

    ``J`` is symmetrized as ``(J + J^T)/2`` after a check that it is symmetric
    to ``1e-8`` relative; a failed factorization raises
    :class:`SingularJacobianError` ("not positive definite").
    """
    key = "cholesky"
    if cache is None or key not in cache:
        J = _jacobian(matvec, rmatvec, b, transpose, x_size, cache)
        _check_square(J)
        factors = []
        for i, block in enumerate(_blocks(J)):
            asym = onp.abs(block - block.T).max()
            if asym > 1e-8 * max(onp.abs(block).max(), 1e-300):
                raise LinearSolveError(
                    f"linear_solver='cholesky' needs a symmetric J_F,y but |J - J^T| = {asym:.3g}"
                    f" (batch instance {i}); use linear_solver='lu' or 'gmres'.")
            try:
                c = scipy.linalg.cho_factor(0.5 * (block + block.T), check_finite=False)
            except onp.linalg.LinAlgError:
                raise SingularJacobianError(
                    f"J_F,y is not positive definite (batch instance {i}): Cholesky failed. "
                    f"Use linear_solver='lu' for an indefinite symmetric system, or "
                    f"'lstsq' / ridge=... if it is singular.") from None
            d = onp.diag(c[0])
            cond = (d.max() / d.min()) ** 2
            if not cond <= max_condition:
                raise _condition_error(cond, i if J.ndim == 3 else None, max_condition)
            factors.append(c)
        if cache is not None:
            cache[key] = factors
    else:
        factors = cache[key]
    bb = b.reshape(len(factors), -1)
    x = onp.stack([scipy.linalg.cho_solve(f, bi, check_finite=False) for f, bi in zip(factors, bb)])
    return x.reshape(b.shape)


def lstsq(matvec: MatVec, rmatvec: MatVec, b: onp.ndarray, *, transpose: bool = False,
          x_size: Optional[int] = None, cache: Optional[dict] = None,
          ridge: float = 0.0, rcond: Optional[float] = None, **_) -> onp.ndarray:
    """Minimum-norm least-squares solution ``x = A^+ b``, or with ``ridge > 0``
    the Tikhonov solution ``x = argmin |A x - b|^2 + ridge |x|^2``.

    With the cached SVD ``J = U diag(s) V^T``: ``J^+ = V diag(f(s)) U^T`` where
    ``f(s) = 1/s`` for ``s > rcond * s_max`` (else 0), or ``f(s) = s/(s^2 + ridge)``.
    Non-square ``J`` is allowed (e.g. one equation for a point with three
    coordinates).
    """
    key = "svd"
    if cache is None or key not in cache:
        J = _jacobian(matvec, rmatvec, b, transpose, x_size, cache)
        U, s, Vt = onp.linalg.svd(J, full_matrices=False)
        if ridge > 0:
            f = s / (s * s + ridge)
        else:
            cut = (rcond if rcond is not None else max(J.shape[-2:]) * EPS) * s.max(axis=-1, keepdims=True)
            f = onp.where(s > cut, 1.0 / onp.where(s > cut, s, 1.0), 0.0)
        svd = (U, f, Vt)
        if cache is not None:
            cache[key] = svd
            # the solution is not A^{-1} b: higher derivatives need other formulas
            cache["pseudo_inverse"] = bool(ridge > 0 or J.shape[-1] != J.shape[-2] or (f == 0).any())
    else:
        svd = cache[key]
    U, f, Vt = svd
    if transpose:   # J^T x = b  ->  x = U f V^T b
        left, right = U, onp.swapaxes(Vt, -1, -2)
    else:           # J x = b    ->  x = V f U^T b
        left, right = onp.swapaxes(Vt, -1, -2), U
    proj = onp.einsum("...ki,...k->...i", right, b)
    return onp.einsum("...ik,...k->...i", left, f * proj)


# --------------------------------------------------------------------------
# matrix-free Krylov solvers: one driver, preconditioning, iterative refinement
# --------------------------------------------------------------------------

class per_point:
    """A preconditioner that depends on the forward point (e.g. on the solution).

    ``linear_solver_options`` are fixed when a layer is built, but a good
    preconditioner usually depends on where the layer is evaluated.  Wrap a
    factory ``factory(point) -> preconditioner`` (a callable ``v -> M^{-1} v``
    or an array holding the diagonal of ``M^{-1}``) in ``per_point``: the Krylov
    solvers evaluate it once per :class:`~nimplicit.implicit.ForwardPoint` and
    keep the result in that point's ``cache``, so every VJP, JVP and
    higher-order solve at the point shares it.

    >>> opts = {"preconditioner": per_point(lambda point: 1.0 / diag_of_J(point))}
    >>> layer = implicit_layer(F, solver, linear_solver="minres", linear_solver_options=opts)
    """

    def __init__(self, factory: Callable[..., object]):
        if not callable(factory):
            raise TypeError(f"per_point needs a callable factory(point), got {type(factory).__name__}")
        self.factory = factory


Preconditioner = Union[None, Callable[[onp.ndarray], onp.ndarray], onp.ndarray, per_point]


def _probe_symmetry(matvec, b, name):
    rng = onp.random.default_rng(0)
    u, v = rng.standard_normal(b.shape), rng.standard_normal(b.shape)
    left, right = onp.vdot(u, matvec(v)), onp.vdot(v, matvec(u))
    scale = max(abs(left), abs(right), 1e-300)
    if abs(left - right) > 1e-8 * scale * max(1.0, onp.sqrt(b.size)):
        raise LinearSolveError(
            f"linear_solver='{name}' needs a symmetric operator, but <u, A v> = {left:.6g} "
            f"and <v, A u> = {right:.6g} differ: {name} would converge to a wrong solution. "
            f"Use 'gmres', 'bicgstab' or 'lsmr' for a non-symmetric J_F,y.")


def _flat_operator(apply: MatVec, shape) -> Callable[[onp.ndarray], onp.ndarray]:
    """``apply`` (on arrays of ``b``'s layout) as a map of flat vectors."""
    return lambda v: onp.asarray(apply(onp.asarray(v).reshape(shape)), dtype=float).ravel()


def _diagonal_preconditioner(diag, b: onp.ndarray, name: str, spd: bool) -> MatVec:
    diag = onp.asarray(diag, dtype=float)
    if diag.shape not in (b.shape, b.shape[-1:]):
        raise ShapeError(f"the diagonal preconditioner of {name} has shape {diag.shape}; it must "
                         f"have the shape of b, {b.shape}, or of one instance, {b.shape[-1:]}")
    if not onp.all(onp.isfinite(diag)) or (spd and not onp.all(diag > 0)):
        raise LinearSolveError(
            f"the diagonal preconditioner of {name} has {int((~(diag > 0)).sum())} entries that are "
            f"not {'positive and ' if spd else ''}finite; {name} needs "
            f"{'a symmetric positive definite M^{-1}' if spd else 'a nonsingular M^{-1}'} "
            f"(e.g. 1 / |diag(J_F,y)|, with zeros replaced by 1).")
    return lambda v: diag * v


def _resolve_preconditioner(preconditioner: Preconditioner, b, cache, point, name: str,
                            spd: bool) -> Optional[MatVec]:
    """``v -> M^{-1} v`` on arrays of ``b``'s layout, or None."""
    if preconditioner is None:
        return None
    if isinstance(preconditioner, per_point):
        if cache is not None and "preconditioner" in cache:
            return cache["preconditioner"]
        if point is None:
            raise UnsupportedError(
                f"{name}: a per_point preconditioner needs the forward point, but the solver was "
                f"called with point=None; pass a fixed preconditioner instead.")
        resolved = _resolve_preconditioner(preconditioner.factory(point), b, None, None, name, spd)
        if cache is not None:
            cache["preconditioner"] = resolved
        return resolved
    if callable(preconditioner):
        return preconditioner
    return _diagonal_preconditioner(preconditioner, b, name, spd)


def _one_krylov_solve(method, op, M, rhs, rtol, budget, kw):
    """One run of a SciPy Krylov method on ``op x = rhs`` from ``x = 0``, at
    most ``budget`` inner iterations.  Returns ``(x, info, iterations)``."""
    iterations = [0]

    def count(*_):
        iterations[0] += 1

    if method is spla.gmres:
        # scipy counts GMRES restart cycles; here the budget bounds the inner
        # iterations (matrix-vector products), as for the other Krylov methods
        restart = max(1, min(kw["restart"], budget))
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


def _krylov(name: str, method, matvec: MatVec, rmatvec: Optional[MatVec], b: onp.ndarray, *,
            rtol: float, maxiter: Optional[int], preconditioner: Preconditioner, refinements: int,
            cache: Optional[dict], point, symmetric: bool = False, check_symmetric: bool = False,
            **kw) -> onp.ndarray:
    r"""Solve ``A x = b`` with a SciPy Krylov ``method`` and iterative refinement.

    Round 0 solves ``A x_0 = b``; round ``k`` solves the correction equation
    ``A d = r_k`` on the true residual ``r_k = b - A x_k`` and sets
    ``x_{k+1} = x_k + d``, for at most ``refinements`` rounds after the first.
    ``x`` is accepted as soon as ``|A x - b| <= rtol |b|`` (the true residual);
    every round asks its method for the reduction still needed, divided by the
    gap between the method's own stopping estimate and the true residual seen in
    the previous round.  ``maxiter`` bounds the inner iterations of all rounds.
    """
    shape = b.shape
    bf = b.ravel()
    bnorm = onp.linalg.norm(bf)
    if bnorm == 0:
        return onp.zeros(shape)
    if symmetric and check_symmetric:
        _probe_symmetry(matvec, b, name)
    n = bf.size
    op = spla.LinearOperator((n, n), matvec=_flat_operator(matvec, shape), dtype=float,
                             rmatvec=_flat_operator(rmatvec, shape) if rmatvec is not None else None)
    apply_M = _resolve_preconditioner(preconditioner, b, cache, point, name, spd=symmetric)
    M = None if apply_M is None else spla.LinearOperator((n, n), matvec=_flat_operator(apply_M, shape),
                                                          dtype=float)
    maxiter = maxiter or 10 * n
    x, r = onp.zeros(n), bf
    used, rounds, gap, info = 0, 0, 1.0, 0
    res = 1.0
    while True:
        asked = min(0.5, max(rtol / res / gap, EPS)) if rounds else rtol
        d, info, its = _one_krylov_solve(method, op, M, r, asked, maxiter - used, kw)
        used, rounds = used + its, rounds + 1
        x = x + d
        r = bf - op.matvec(x)
        previous, res = res, onp.linalg.norm(r) / bnorm
        if res <= rtol:
            return x.reshape(shape)
        gap = max(1.0, res / (asked * previous))
        if rounds > refinements or used >= maxiter or info < 0 or not res < previous:
            break
    raise LinearSolveError(_not_converged(name, res, rtol, used, rounds, refinements, maxiter, info,
                                          stagnated=not res < previous))


def _not_converged(name, res, rtol, iterations, rounds, refinements, maxiter, info, stagnated) -> str:
    why = ("maxiter was reached" if iterations >= maxiter else
           f"method breakdown (scipy info={info})" if info < 0 else
           "the last round did not reduce the residual (the system may be too ill-conditioned "
           "for double precision)" if stagnated else "the refinements were used up")
    return (f"{name} did not converge: the relative residual |A x - b|/|b| = {res:.3g} did not "
            f"reach rtol={rtol:g} after {iterations} iterations in {rounds} Krylov solve(s) "
            f"(refinements={refinements}, maxiter={maxiter}): {why}. Raise maxiter or refinements, "
            f"pass preconditioner= (an approximation of A^{{-1}}, e.g. the inverse diagonal of "
            f"J_F,y), use a solver suited to the operator (gmres for a non-symmetric J_F,y), or a "
            f"dense solver ('lu').")


_KRYLOV_OPTIONS_DOC = """
    Parameters
    ----------
    matvec, rmatvec, b, cache, point
        See :mod:`nimplicit.linear_solvers`.
    rtol : float
        Accept ``x`` when the true relative residual ``|A x - b| / |b| <= rtol``.
    maxiter : int, optional
        Bound on the inner iterations (matrix-vector products) summed over all
        refinement rounds; default ``10 * b.size``.
    preconditioner : callable, array, :class:`per_point` or None
        ``M^{-1}``, an approximation of ``A^{-1}``: a callable ``v -> M^{-1} v``
        on arrays of ``b``'s layout, an array holding the diagonal of ``M^{-1}``
        (shape of ``b`` or of one instance), or ``per_point(factory)`` with
        ``factory(point)`` returning either (evaluated once per forward point).
        The same ``M^{-1}`` serves ``A = J`` and ``A = J^T``.%s
    refinements : int
        At most this many restarts on the true residual, ``x += solve(A, b - A x)``,
        after the first solve; :class:`~nimplicit.errors.LinearSolveError` if
        ``|A x - b| / |b| <= rtol`` is still not met (or a round makes no progress).
"""
_SPD_NOTE = "\n        Must be symmetric positive definite."


def cg(matvec: MatVec, rmatvec: Optional[MatVec], b: onp.ndarray, *, rtol: float = 1e-11,
       maxiter: Optional[int] = None, check_symmetric: bool = True,
       preconditioner: Preconditioner = None, refinements: int = 3,
       cache: Optional[dict] = None, point=None, **_) -> onp.ndarray:
    """Conjugate gradients, for a symmetric positive definite ``A`` (checked by a
    random probe ``<u, A v> = <v, A u>`` unless ``check_symmetric=False``).
    """
    return _krylov("cg", spla.cg, matvec, rmatvec, b, rtol=rtol, maxiter=maxiter,
                   preconditioner=preconditioner, refinements=refinements, cache=cache, point=point,
                   symmetric=True, check_symmetric=check_symmetric)


def minres(matvec: MatVec, rmatvec: Optional[MatVec], b: onp.ndarray, *, rtol: float = 1e-11,
           maxiter: Optional[int] = None, check_symmetric: bool = True,
           preconditioner: Preconditioner = None, refinements: int = 3,
           cache: Optional[dict] = None, point=None, **_) -> onp.ndarray:
    """MINRES, for a symmetric (possibly indefinite) ``A`` (probed as in :func:`cg`).

    SciPy's MINRES stops on a backward-error estimate ``|r| / (|A| |x| + |b|)``,
    which on an ill-conditioned ``A`` can leave ``|A x - b| / |b|`` orders of
    magnitude above ``rtol``; the refinement rounds close that gap.
    """
    return _krylov("minres", spla.minres, matvec, rmatvec, b, rtol=rtol, maxiter=maxiter,
                   preconditioner=preconditioner, refinements=refinements, cache=cache, point=point,
                   symmetric=True, check_symmetric=check_symmetric)


def gmres(matvec: MatVec, rmatvec: Optional[MatVec], b: onp.ndarray, *, rtol: float = 1e-11,
          maxiter: Optional[int] = None, restart: int = 60, preconditioner: Preconditioner = None,
          refinements: int = 3, cache: Optional[dict] = None, point=None, **_) -> onp.ndarray:
    """Restarted GMRES(``restart``), for a general square ``A``; ``maxiter`` bounds the
    total number of inner iterations over all restart cycles and refinement rounds.
    """
    return _krylov("gmres", spla.gmres, matvec, rmatvec, b, rtol=rtol, maxiter=maxiter,
                   preconditioner=preconditioner, refinements=refinements, cache=cache, point=point,
                   restart=min(restart, b.size))


def bicgstab(matvec: MatVec, rmatvec: Optional[MatVec], b: onp.ndarray, *, rtol: float = 1e-11,
             maxiter: Optional[int] = None, preconditioner: Preconditioner = None,
             refinements: int = 3, cache: Optional[dict] = None, point=None, **_) -> onp.ndarray:
    """BiCGSTAB, for a general square ``A``."""
    return _krylov("bicgstab", spla.bicgstab, matvec, rmatvec, b, rtol=rtol, maxiter=maxiter,
                   preconditioner=preconditioner, refinements=refinements, cache=cache, point=point)


cg.__doc__ += _KRYLOV_OPTIONS_DOC % _SPD_NOTE
minres.__doc__ += _KRYLOV_OPTIONS_DOC % _SPD_NOTE
gmres.__doc__ += _KRYLOV_OPTIONS_DOC % ""
bicgstab.__doc__ += _KRYLOV_OPTIONS_DOC % ""


def lsmr(matvec: MatVec, rmatvec: MatVec, b: onp.ndarray, *, transpose: bool = False,
         x_size: Optional[int] = None, rtol: float = 1e-12, maxiter: Optional[int] = None,
         ridge: float = 0.0, cache: Optional[dict] = None, preconditioner: Preconditioner = None,
         refinements: Optional[int] = None, **_) -> onp.ndarray:
    """LSMR: ``argmin |A x - b|^2 + ridge |x|^2`` for any (also non-square) ``A``,
    minimum-norm when ``ridge = 0``; uses both products.

    It takes neither ``preconditioner`` nor ``refinements``: a preconditioner
    changes which least-squares / minimum-norm solution is found, and the true
    residual of an inconsistent system never reaches ``rtol``; LSMR stops on its
    own least-squares criteria (``atol = btol = rtol``).
    """
    if preconditioner is not None or refinements is not None:
        raise UnsupportedError("lsmr takes no preconditioner or refinements (they would change the "
                               "least-squares solution); use 'gmres' or 'minres' for a square, "
                               "nonsingular J_F,y.")
    if rmatvec is None:
        raise UnsupportedError("lsmr needs both products of the operator (matvec and rmatvec)")
    batch = b.shape[:-1]
    k = b.shape[-1]
    m = x_size or k
    bshape, xshape = batch + (k,), batch + (m,)
    op = spla.LinearOperator(
        (int(onp.prod(bshape)), int(onp.prod(xshape))), dtype=float,
        matvec=lambda v: onp.asarray(matvec(onp.asarray(v).reshape(xshape)), float).ravel(),
        rmatvec=lambda u: onp.asarray(rmatvec(onp.asarray(u).reshape(bshape)), float).ravel())
    maxiter = maxiter or 10 * max(op.shape)
    if cache is not None:
        cache["pseudo_inverse"] = True
    x, istop, itn = spla.lsmr(op, b.ravel(), damp=onp.sqrt(ridge), atol=rtol, btol=rtol,
                              conlim=1e14, maxiter=maxiter)[:3]
    if istop in (3, 6, 7):
        reason = {3: "the operator's estimated condition number exceeded conlim=1e14",
                  6: "the condition number exceeded 1/eps",
                  7: f"maxiter={maxiter} was reached"}[istop]
        raise LinearSolveError(f"lsmr did not converge after {itn} iterations: {reason}. "
                               f"Raise maxiter, add ridge=..., or use linear_solver='lstsq'.")
    return x.reshape(xshape)


DENSE = {"lu": lu, "cholesky": cholesky, "lstsq": lstsq}
MATRIX_FREE = {"cg": cg, "minres": minres, "gmres": gmres, "bicgstab": bicgstab, "lsmr": lsmr}
SOLVERS = {**DENSE, **MATRIX_FREE}

# Solvers whose solution x = A^{-1} b has the derivative dx = -A^{-1} dA x used by
# the implicit node for higher orders; the least-squares family does not.
INVERTIBLE = {"lu", "cholesky", "cg", "minres", "gmres", "bicgstab"}


def get(name_or_callable):
    """Resolve a linear solver given by name (see ``SOLVERS``) or as a callable."""
    if callable(name_or_callable):
        return name_or_callable
    try:
        return SOLVERS[name_or_callable]
    except KeyError:
        raise ValueError(f"unknown linear_solver {name_or_callable!r}; choose one of "
                         f"{sorted(SOLVERS)} or pass a callable "
                         f"solve(matvec, rmatvec, b, **opts)") from None
