"""Bistochastic normalization: unrolled log-domain Sinkhorn and its implicit fixed point."""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.scipy.special import logsumexp
from autograd.tracer import getval

from nimplicit import fixed_point_layer
from nimplicit.errors import NotConvergedError, ShapeError



def _marginals(shape, row_marginals, col_marginals):
    n, m = shape[-2], shape[-1]
    r = np.ones(n) if row_marginals is None else np.asarray(row_marginals, float)
    c = np.full(m, n / m) if col_marginals is None else np.asarray(col_marginals, float)
    if r.shape != (n,) or c.shape != (m,):
        raise ShapeError(f"marginals must have shapes ({n},) and ({m},), got {r.shape}, {c.shape}")
    if (r <= 0).any() or (c <= 0).any() or abs(r.sum() - c.sum()) > 1e-10 * r.sum():
        raise ValueError(f"Sinkhorn needs positive marginals with equal totals, got sum(r) = "
                         f"{r.sum():.6g}, sum(c) = {c.sum():.6g}")
    return np.log(r), np.log(c)


def sinkhorn(S, iterations: int = 20, tau: float = 1.0, row_marginals=None, col_marginals=None):
    r"""Unrolled log-domain Sinkhorn: ``iterations`` alternating row and column
    normalizations of ``exp(S / tau)`` (``(n, m)`` or ``(B, n, m)``); rows are
    normalized last-but-one and columns last, so the column sums are exact.

    ``log P <- log P - LSE_row(log P) + log r``, then the same over columns with
    ``log c``.  Default marginals: rows sum to 1, columns to ``n/m``.
    """
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
                   tol: float = 1e-13, max_iter: int = 10000):
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
    """
    Sv = np.asarray(getval(S), float)
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

    layer = fixed_point_layer(T, solver=solver, batch_axis=0 if Sv.ndim == 3 else None,
                              name="sinkhorn")
    L = S / tau
    v = layer(L)
    return anp.exp(L + row_potential(v, L) + v[..., None, :])
