r"""Registry entries of correct layers whose forward is *noisy* (issue 10 item 7).

Each forward stops at a tolerance, or is piecewise linear, so finite differences
of its actual output are not accurate to rounding: these are the layers on which a
gradient checker without a noise model raises false alarms.  Their derivatives
(by the implicit function theorem, or by autograd through the closed form) are
correct; the checker must pass them and still catch the seeded mutants.

- ``noisy-simplex-slsqp``: Euclidean projection onto the probability simplex,
  ``min 1/2 |y - x|^2  s.t.  sum y = 1, y >= 0``, through
  :func:`nimplicit.constrained_argmin_layer` with its *default* forward (SLSQP,
  multipliers by least squares and Newton polish); output ``(y, lam, nu)``.
  The forward leaves ~1e-16 noise on the entries that are exactly zero.
- ``noisy-box-slsqp``: projection onto the box ``lo <= y <= hi``, same front-end
  and default forward, output ``(y, nu)`` (``nu`` stacks the upper then the
  lower bound multipliers); order 2.
- ``noisy-sparsemax``: ``sparsemax(z) = max(z - tau, 0)`` with the threshold
  ``tau`` an implicit layer, ``sum_i max(z_i - tau, 0) = 1``, found by bisection
  to ``1e-11`` (a noisy, piecewise-linear forward: the output has kinks).
- ``noisy-krylov-gmres``: ``y = A^{-1} b`` with ``A = I + W`` (``|W|_2 < 1``),
  solved by ``scipy.sparse.linalg.gmres`` at ``rtol = 1e-8`` from ``x0 = 0``;
  backward by the IFT on ``F(y; A, b) = A y - b``.  With ``n = 24`` and
  ``|W|_2 = 0.3`` GMRES stops after ~16 < n iterations, so the forward really
  is accurate to ~1e-8 only (it is exact when it runs n iterations).

Instances keep a margin from the kinks (strict complementarity), as the
IFT derivative only exists there; the margin is ``1e-2`` relative, far above the
finite-difference steps but far below what would make the instances trivial.
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
import scipy.sparse.linalg as spla
from nimplicit import constrained_argmin_layer, implicit_layer
from nimplicit.errors import NotConvergedError

from ..registry import Entry, register

#: Relative accuracy the Krylov forward stops at.
KRYLOV_RTOL = 1e-8
#: Absolute accuracy of the sparsemax threshold's bisection.
BISECTION_TOL = 1e-11


# ------------------------------------------------------------------------------
# simplex projection, default SLSQP forward
# ------------------------------------------------------------------------------

def _half_distance(y, x):
    return 0.5 * anp.sum((y - x) ** 2)


def _simplex_sum(y, x):
    return anp.reshape(anp.sum(y) - 1.0, (1,))


def _nonnegative(y, x):
    return -y


simplex_slsqp = constrained_argmin_layer(_half_distance, eq=_simplex_sum, ineq=_nonnegative,
                                         y0=lambda x: np.full(np.shape(x), 1.0 / np.size(x)),
                                         name="noisy-simplex-slsqp")


def _simplex_tau(x: np.ndarray) -> float:
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, len(u) + 1)
    rho = np.nonzero(u - css / k > 0)[0][-1]
    return float(css[rho] / (rho + 1.0))


def simplex_generate(rng, n: int = 5, margin: float = 0.02, min_support: int = 2) -> tuple:
    """``x ~ N(0, 1)`` redrawn until every ``|x_i - tau| >= margin`` (strictly
    complementary: no weakly active constraint within ``margin``) and at least
    ``min_support`` entries lie above ``tau`` (with one, the projection is a
    vertex of the simplex and its Jacobian is zero: every mutant is equivalent)."""
    for _ in range(1000):
        x = rng.standard_normal(n)
        tau = _simplex_tau(x)
        if np.min(np.abs(x - tau)) >= margin and np.sum(x > tau) >= min_support:
            return (x,)
    raise ValueError(f"could not draw a simplex instance with margin {margin}; lower it")


register(Entry(
    name="noisy-simplex-slsqp", fn=simplex_slsqp, generate=simplex_generate,
    size={"n": 5, "margin": 0.02}, order=2,
    description="simplex projection via constrained_argmin_layer's default SLSQP forward "
                "(noisy zeros), output (y, lam, nu)",
    conventions="y = argmin 1/2|y - x|^2 s.t. sum y = 1 (multiplier lam), -y <= 0 (nu >= 0)"))


# ------------------------------------------------------------------------------
# box projection, default SLSQP forward
# ------------------------------------------------------------------------------

def _box(y, x, lo, hi):
    return anp.concatenate([y - hi, lo - y])


box_slsqp = constrained_argmin_layer(lambda y, x, lo, hi: 0.5 * anp.sum((y - x) ** 2),
                                     ineq=_box, y0=lambda x, lo, hi: np.zeros(np.shape(x)),
                                     name="noisy-box-slsqp")


def box_fn(x, lo, hi):
    """``(y, nu)`` of the box projection (no equality: ``lam`` is empty and dropped)."""
    y, _, nu = box_slsqp(x, lo, hi)
    return y, nu


def box_generate(rng, n: int = 4, margin: float = 0.05) -> tuple:
    """``lo ~ U(-1, -0.2)``, ``hi ~ U(0.2, 1)``, ``x ~ N(0, 1)`` redrawn until every
    ``x_i`` is at least ``margin`` away from both of its bounds."""
    for _ in range(1000):
        lo = rng.uniform(-1.0, -0.2, n)
        hi = rng.uniform(0.2, 1.0, n)
        x = rng.standard_normal(n)
        if min(np.min(np.abs(x - lo)), np.min(np.abs(x - hi))) >= margin:
            return x, lo, hi
    raise ValueError(f"could not draw a box instance with margin {margin}; lower it")


register(Entry(
    name="noisy-box-slsqp", fn=box_fn, generate=box_generate, size={"n": 4, "margin": 0.05},
    order=2,
    description="box projection lo <= y <= hi via constrained_argmin_layer's default SLSQP "
                "forward, output (y, nu)",
    conventions="nu = (multipliers of y - hi <= 0, then of lo - y <= 0), both >= 0"))


# ------------------------------------------------------------------------------
# sparsemax with a bisection threshold
# ------------------------------------------------------------------------------

def _tau_residual(tau, z):
    return anp.sum(anp.maximum(z - tau, 0.0)) - 1.0


def _tau_bisection(z) -> np.ndarray:
    """``tau`` with ``sum max(z - tau, 0) = 1`` by bisection on ``[max z - 1, max z]``
    to ``BISECTION_TOL``: deliberately a tolerance-limited forward."""
    z = np.asarray(z, dtype=float)
    lo, hi = float(z.max()) - 1.0, float(z.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.sum(np.maximum(z - mid, 0.0)) > 1.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= BISECTION_TOL:
            return np.asarray(0.5 * (lo + hi))
    raise NotConvergedError("sparsemax threshold bisection did not converge")


sparsemax_tau = implicit_layer(_tau_residual, _tau_bisection, linear_solver="lu",
                               name="noisy-sparsemax-tau")


def sparsemax(z):
    r"""``sparsemax(z) = max(z - \tau(z), 0)``: the Euclidean projection of ``z``
    onto the simplex, with ``tau`` an implicit layer solved by bisection."""
    return anp.maximum(z - sparsemax_tau(z), 0.0)


register(Entry(
    name="noisy-sparsemax", fn=sparsemax, generate=simplex_generate,
    size={"n": 6, "margin": 0.02}, order=2,
    description="sparsemax = max(z - tau, 0), tau by bisection to 1e-11 (implicit layer): "
                "a noisy piecewise-linear forward"))


# ------------------------------------------------------------------------------
# linear system by GMRES at rtol 1e-8
# ------------------------------------------------------------------------------

def _linear_residual(y, A, b):
    return anp.dot(A, y) - b


def _gmres_solve(A, b) -> np.ndarray:
    y, info = spla.gmres(np.asarray(A, float), np.asarray(b, float), rtol=KRYLOV_RTOL,
                         atol=0.0, restart=len(b), maxiter=50)
    if info != 0:
        raise NotConvergedError(f"GMRES did not reach rtol {KRYLOV_RTOL} (info {info})")
    return y


krylov_gmres = implicit_layer(_linear_residual, _gmres_solve, linear_solver="lu",
                              name="noisy-krylov-gmres")


def krylov_generate(rng, n: int = 24, contraction: float = 0.3) -> tuple:
    """``A = I + W`` with ``|W|_2 = contraction`` (cond(A) <= (1 + c) / (1 - c)),
    ``b ~ N(0, 1)``."""
    W = rng.standard_normal((n, n))
    W *= contraction / np.linalg.norm(W, 2)
    return np.eye(n) + W, rng.standard_normal(n)


register(Entry(
    name="noisy-krylov-gmres", fn=krylov_gmres, generate=krylov_generate,
    size={"n": 24, "contraction": 0.3}, order=2,
    description="y = A^{-1} b by scipy GMRES at rtol 1e-8 (IFT backward on A y - b)"))

#: The published noisy-forward set (issue 10 item 7).
NOISY_LAYERS = ("noisy-simplex-slsqp", "noisy-box-slsqp", "noisy-sparsemax", "noisy-krylov-gmres")
