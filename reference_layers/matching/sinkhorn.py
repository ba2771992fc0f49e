"""Bistochastic normalization: unrolled log-domain Sinkhorn and its implicit fixed point."""
from __future__ import annotations

from typing import Optional

import autograd.numpy as anp
import numpy as np
from autograd.scipy.special import logsumexp
from autograd.builtins import tuple as autograd_tuple
from autograd.tracer import getval, isbox

from nimplicit import fixed_point_layer
from nimplicit.errors import NonFiniteError, NotConvergedError, ShapeError

from .errors import InvalidOptionError
from .validation import (as_real_array, deprecated, parse_options, positive_float, positive_int,
                         resolve_backward)

SOLVER_DEFAULTS = {"tol": 1e-13, "max_iter": 10000}
SOLVER_CHECKS = {"tol": lambda k, v: positive_float(k, v, upper=1.0),
                 "max_iter": lambda k, v: positive_int(k, v)}



def _check_scores(S, tau) -> np.ndarray:
    """Real, finite scores of shape (n, m) or (B, n, m), and a finite tau > 0."""
    positive_float("tau", tau)
    Sv = as_real_array(getval(S), "the scores S")
    if Sv.ndim not in (2, 3) or 0 in Sv.shape:
        raise ShapeError(f"the scores must have shape (n, m) or (B, n, m), non-empty; got "
                         f"{Sv.shape}")
    if not np.isfinite(Sv).all():
        raise NonFiniteError(f"the scores S contain {int((~np.isfinite(Sv)).sum())} non-finite "
                             f"value(s) (NaN or Inf)")
    return Sv


def _marginals(shape, row_marginals, col_marginals):
    n, m = shape[-2], shape[-1]
    r = np.ones(n) if row_marginals is None else as_real_array(row_marginals, "row_marginals")
    c = np.full(m, n / m) if col_marginals is None else as_real_array(col_marginals,
                                                                    "col_marginals")
    if r.shape != (n,) or c.shape != (m,):
        raise ShapeError(f"marginals must have shapes ({n},) and ({m},), got {r.shape}, {c.shape}")
    if not (np.isfinite(r).all() and np.isfinite(c).all()) or (r <= 0).any() or (c <= 0).any() \
            or abs(r.sum() - c.sum()) > 1e-10 * r.sum():
        raise InvalidOptionError(f"Sinkhorn needs positive marginals with equal totals, got sum(r) = "
                         f"{r.sum():.6g}, sum(c) = {c.sum():.6g}")
    return np.log(r), np.log(c)


def sinkhorn(S, iterations: int = 20, tau: float = 1.0, row_marginals=None, col_marginals=None):
    r"""Unrolled log-domain Sinkhorn: ``iterations`` alternating row and column
    normalizations of ``exp(S / tau)`` (``(n, m)`` or ``(B, n, m)``); rows are
    normalized last-but-one and columns last, so the column sums are exact.

    ``log P <- log P - LSE_row(log P) + log r``, then the same over columns with
    ``log c``.  Default marginals: rows sum to 1, columns to ``n/m``.
    """
    positive_int("iterations", iterations)
    _check_scores(S, tau)
    log_r, log_c = _marginals(np.shape(getval(S)), row_marginals, col_marginals)
    L = S / tau
    for _ in range(iterations):
        L = L - logsumexp(L, axis=-1, keepdims=True) + log_r[:, None]
        L = L - logsumexp(L, axis=-2, keepdims=True) + log_c[None, :]
    return anp.exp(L)


def _sinkhorn_map(log_r, log_c):
    """The gauge-fixed map T(v) on column potentials (see :func:`sinkhorn_layer`)."""
    def row_potential(v, L):
        return log_r[:, None] - logsumexp(L + v[..., None, :], axis=-1, keepdims=True)

    def T(v, L):
        u = row_potential(v, L)
        g = log_c - logsumexp(L + u, axis=-2)
        return g - g[..., -1:]
    return T, row_potential


def sinkhorn_layer(S, tau: float = 1.0, row_marginals=None, col_marginals=None, *,
                   full_output: bool = False, backward: Optional[str] = None,
                   linear_solver=None, linear_solver_options: Optional[dict] = None,
                   solver_options: Optional[dict] = None,
                   tol: Optional[float] = None, max_iter: Optional[int] = None):
    r"""Bistochastic normalization of ``exp(S / tau)`` as an implicit fixed point.

    With ``L = S / tau``, row potential ``u(v) = log r - LSE_a(L_{ia} + v_a)``
    and ``g(v) = log c - LSE_i(L_{ia} + u_i(v))``, Sinkhorn's iteration is
    ``v <- g(v)``; it is invariant to ``(u, v) -> (u - k, v + k)``, so the layer
    solves the gauge-fixed fixed point

    .. math::  v = T(v; L) = g(v) - g_m(v)\, \mathbf 1  \qquad (v_m = 0),

    with :func:`nimplicit.fixed_point_layer`, and returns
    ``P = exp(L + u(v) 1' + 1 v')``: rows sum to ``r``, columns to ``c``.
    The forward solver is the log-domain Sinkhorn iteration run to ``tol``;
    the backward pass is the implicit function theorem (no unrolling).
    ``S`` is ``(n, m)`` or ``(B, n, m)``.

    Keywords (the reference layers' convention): ``full_output`` returns
    ``(P, u, v)`` (an autograd tuple) with the row and column potentials
    (``v_m = 0``); ``backward`` is ``'generic'`` only (no structured solver:
    the core's ``linear_solver`` with ``linear_solver_options`` on the
    autograd Jacobian); ``solver_options`` holds ``tol`` (1e-13, on the change
    of the potentials) and ``max_iter`` (10000).  ``tol=`` and ``max_iter=``
    are deprecated aliases.
    """
    layer_name = "sinkhorn_layer"
    solver_options = dict(solver_options or {})
    for key, value in (("tol", tol), ("max_iter", max_iter)):
        if value is not None:
            solver_options[key] = deprecated(key, f"solver_options={{'{key}': ...}}", value,
                                             layer=layer_name)
    opts = parse_options(solver_options, SOLVER_DEFAULTS, SOLVER_CHECKS, layer_name)
    tol, max_iter = opts["tol"], opts["max_iter"]
    resolve_backward(backward, linear_solver, layer=layer_name, has_structured=False)
    Sv = _check_scores(S, tau)
    if Sv is not getval(S) and not isbox(S):
        S = Sv
    log_r, log_c = _marginals(Sv.shape, row_marginals, col_marginals)
    T, row_potential = _sinkhorn_map(log_r, log_c)

    def solver(L):
        v = np.zeros(L.shape[:-2] + L.shape[-1:])
        for it in range(max_iter):
            v_new = np.asarray(T(v, L))
            if np.abs(v_new - v).max() <= tol * (1 + np.abs(v_new).max()):
                return v_new
            v = v_new
        raise NotConvergedError(
            f"Sinkhorn did not converge in max_iter={max_iter} iterations (change of the "
            f"potentials {np.abs(v_new - v).max():.3g}); tau={tau} may be too small for the "
            f"score range: raise tau or max_iter.")

    extra = {} if linear_solver is None else {"linear_solver": linear_solver}
    layer = fixed_point_layer(T, solver=solver, batch_axis=0 if Sv.ndim == 3 else None,
                              name="sinkhorn", linear_solver_options=linear_solver_options,
                              **extra)
    L = S / tau
    v = layer(L)
    u = row_potential(v, L)
    P = anp.exp(L + u + v[..., None, :])
    if full_output:
        parts = (P, u[..., 0], v)
        return autograd_tuple(parts) if isbox(P) else parts
    return P
