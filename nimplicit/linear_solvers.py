"""Linear solvers for the systems of the implicit function theorem.

Every solver has one signature::

    x = solve(matvec, rmatvec, b, *, transpose=False, x_size=None, cache=None, **opts)

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
  transposes, higher orders) factor ``J`` once.

Dense solvers (:func:`lu`, :func:`cholesky`, :func:`lstsq`) form ``J`` from
``r`` products with ``J^T`` (VJPs, the cheap product in reverse-mode autograd),
batched: the ``k``-th unit cotangent in every instance at once yields row
``k`` of all ``B`` blocks, so a batch costs ``r`` VJPs, not ``B r``.
Matrix-free solvers (:func:`cg`, :func:`minres`, :func:`gmres`,
:func:`bicgstab`, :func:`lsmr`) never form a matrix.

A user-supplied solver is any callable with the same signature; ``cache`` is
where a structured solver keeps a factorization it builds (or receives from
the forward solver) for reuse.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

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
# matrix-free Krylov solvers
# --------------------------------------------------------------------------

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


def _krylov(name, method, matvec, rmatvec, b, rtol, maxiter, symmetric, check_symmetric, **kw):
    shape = b.shape
    n = b.size
    flat = lambda f: (lambda v: onp.asarray(f(onp.asarray(v).reshape(shape)), dtype=float).ravel())
    if symmetric and check_symmetric:
        _probe_symmetry(matvec, b, name)
    op = spla.LinearOperator((n, n), matvec=flat(matvec), dtype=float,
                             rmatvec=flat(rmatvec) if rmatvec is not None else None)
    bf = b.ravel()
    bnorm = onp.linalg.norm(bf)
    if bnorm == 0:
        return onp.zeros(shape)
    iters = [0]

    def count(*_):
        iters[0] += 1

    maxiter = maxiter or 10 * n
    if method is spla.gmres:
        # scipy counts GMRES restart cycles; here maxiter bounds the inner iterations
        # (matrix-vector products), as for the other Krylov methods
        restart = max(1, min(kw.pop("restart"), maxiter))
        cycles = -(-maxiter // restart)
        x, info = method(op, bf, rtol=rtol, atol=0.0, maxiter=cycles, restart=restart,
                         callback=count, callback_type="pr_norm", **kw)
    else:
        x, info = method(op, bf, rtol=rtol, maxiter=maxiter, callback=count, **kw)
    res = onp.linalg.norm(op.matvec(x) - bf) / bnorm
    # 100x slack on the true residual: Krylov methods stop on a recursively
    # updated residual that drifts from the true one by a few ulps per step.
    if info != 0 or not res <= max(100 * rtol, 1e3 * EPS):
        raise LinearSolveError(
            f"{name} did not converge: relative residual |A x - b|/|b| = {res:.3g} after "
            f"{iters[0]} iterations (rtol={rtol:g}, maxiter={maxiter}, info={info}). Raise maxiter, "
            f"use a solver suited to the operator (gmres for non-symmetric J_F,y), or a dense solver.")
    return x.reshape(shape)


def cg(matvec: MatVec, rmatvec: Optional[MatVec], b: onp.ndarray, *, rtol: float = 1e-11,
       maxiter: Optional[int] = None, check_symmetric: bool = True, **_) -> onp.ndarray:
    """Conjugate gradients, for a symmetric positive definite ``A`` (checked by a
    random probe ``<u, A v> = <v, A u>`` unless ``check_symmetric=False``)."""
    return _krylov("cg", spla.cg, matvec, rmatvec, b, rtol, maxiter, True, check_symmetric)


def minres(matvec: MatVec, rmatvec: Optional[MatVec], b: onp.ndarray, *, rtol: float = 1e-11,
           maxiter: Optional[int] = None, check_symmetric: bool = True, **_) -> onp.ndarray:
    """MINRES, for a symmetric (possibly indefinite) ``A``."""
    return _krylov("minres", spla.minres, matvec, rmatvec, b, rtol, maxiter, True, check_symmetric)


def gmres(matvec: MatVec, rmatvec: Optional[MatVec], b: onp.ndarray, *, rtol: float = 1e-11,
          maxiter: Optional[int] = None, restart: int = 60, **_) -> onp.ndarray:
    """Restarted GMRES(``restart``), for a general square ``A``; ``maxiter`` bounds the
    total number of inner iterations over all restart cycles."""
    return _krylov("gmres", spla.gmres, matvec, rmatvec, b, rtol, maxiter, False, False,
                   restart=min(restart, b.size))


def bicgstab(matvec: MatVec, rmatvec: Optional[MatVec], b: onp.ndarray, *, rtol: float = 1e-11,
             maxiter: Optional[int] = None, **_) -> onp.ndarray:
    """BiCGSTAB, for a general square ``A``."""
    return _krylov("bicgstab", spla.bicgstab, matvec, rmatvec, b, rtol, maxiter, False, False)


def lsmr(matvec: MatVec, rmatvec: MatVec, b: onp.ndarray, *, transpose: bool = False,
         x_size: Optional[int] = None, rtol: float = 1e-12, maxiter: Optional[int] = None,
         ridge: float = 0.0, cache: Optional[dict] = None, **_) -> onp.ndarray:
    """LSMR: ``argmin |A x - b|^2 + ridge |x|^2`` for any (also non-square) ``A``,
    minimum-norm when ``ridge = 0``; uses both products."""
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
