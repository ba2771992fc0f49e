r"""Registry entries for the QP layer (``reference_layers.qp``).

Every entry returns ``(y, lam, nu)`` (``return_duals=True``) and differentiates
all of ``Q, q, G, h`` (and ``A, b``).  Instances are planted by
:mod:`verification.strategies.qp` with a strict-complementarity margin of
``0.2`` (``diagnose`` reports it through the layer's ``diagnostics``).  The
interior point method stops at a relative KKT residual of ``1e-10``; the
layer's active-set polish then solves the active KKT system exactly, so the
output is accurate to rounding amplified by the KKT matrix's condition number
(``noise=1e-13``), and a ``1 + 1e-4`` error in a gradient is detectable.

- ``qp``: one instance, inequalities only, fast (structured) backward;
- ``qp-eq``: one instance with equality constraints;
- ``qp-batched``: a batch of 3 with ``Q`` and ``G`` shared (broadcast);
- ``qp-batched-eq``: a batch of 3 with equalities, every argument batched;
- ``qp-generic``: the generic backward (core LU of the autograd KKT Jacobian).
"""
from __future__ import annotations

from reference_layers.qp import qp_layer

from ..registry import Entry, register
from ..strategies.qp import batched_qp_inputs, qp_inputs


def _fn(**options):
    def fn(*inputs):
        return qp_layer(*inputs, return_duals=True, **options)
    return fn


def _single(rng, n: int = 5, m: int = 8, p: int = 0, margin: float = 0.2):
    return qp_inputs(rng, n, m, p, margin)


def _batched(rng, batch: int = 3, n: int = 4, m: int = 6, p: int = 0, margin: float = 0.2,
             shared: tuple = ()):
    return batched_qp_inputs(rng, batch, n, m, p, margin, shared=tuple(shared))


_NOISE = 1e-13   # polished forward: exact up to rounding amplified by cond(KKT) ~ 1e2-1e3

register(Entry(
    name="qp", fn=_fn(), generate=_single, size={"n": 5, "m": 8}, noise=_NOISE,
    description="convex QP argmin (y, lam, nu), PDIPM forward, structured KKT backward; all of Q, q, G, h"))
register(Entry(
    name="qp-eq", fn=_fn(), generate=_single, size={"n": 5, "m": 6, "p": 2}, noise=_NOISE,
    description="convex QP with equalities A y = b; all six inputs Q, q, G, h, A, b"))
register(Entry(
    name="qp-batched", fn=_fn(), generate=_batched,
    size={"batch": 3, "n": 4, "m": 6, "shared": ("Q", "G")}, noise=_NOISE,
    description="batch of 3 QPs, Q and G shared (broadcast: gradient summed over the batch)"))
register(Entry(
    name="qp-batched-eq", fn=_fn(), generate=_batched, size={"batch": 3, "n": 4, "m": 5, "p": 1},
    noise=_NOISE, description="batch of 3 QPs with equalities, every argument batched"))
register(Entry(
    name="qp-generic", fn=_fn(backward="generic"), generate=_single,
    size={"n": 4, "m": 6, "p": 1}, noise=_NOISE,
    description="QP with the generic backward: core LU of the autograd Jacobian of eq. 27"))
