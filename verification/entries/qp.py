r"""Registry entries for the QP layer (``reference_layers.qp``).

Every entry returns ``(y, lam, nu)`` (``return_duals=True``, boxed as an autograd tuple;
variant ``"primal"``: ``y`` alone) and differentiates
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

from autograd.builtins import tuple as ag_tuple
from reference_layers.qp import qp_layer

from ..registry import Entry, register
from ..strategies.qp import batched_qp_inputs, qp_inputs


def _fn(**options):
    def fn(*inputs):
        # the layer returns a plain tuple of boxes: box it so autograd traces (y, lam, nu)
        return ag_tuple(qp_layer(*inputs, return_duals=True, **options))
    return fn


def _primal(**options):
    def fn(*inputs):
        return qp_layer(*inputs, **options)
    return fn


_RTOL_REASON = ("an interior point method run to eps 1e-12 reaches ~1e-6 on quantities that go "
                "through its multipliers (qpth's PDIPM: ~7e-7 on these files); 1e-5 leaves a margin "
                "for such a peer while a 1e-4 gradient error still fails")


def _conventions(p: bool, batched: bool = False, shared: tuple = ()) -> dict:
    def shape(dims: str, batch: bool = batched) -> str:
        return f"(B, {dims})" if batch else (f"({dims})" if "," in dims else f"({dims},)")
    names = [("Q", "n, n"), ("q", "n"), ("G", "m, n"), ("h", "m")]
    if p:
        names += [("A", "p, n"), ("b", "p")]
    inputs = [{"name": nm, "shape": shape(dims, batched and nm not in shared)} for nm, dims in names]
    conv = {
        "problem": "y = argmin 1/2 y'Qy + q'y  s.t.  G y <= h" + ("  and  A y = b" if p else ""),
        "inputs": inputs,
        "outputs": [{"name": "y", "shape": shape("n")},
                    {"name": "lam", "shape": shape("p") if p else
                     shape("0") + ": empty, there are no equalities"},
                    {"name": "nu", "shape": shape("m"), "sign": ">= 0"}],
        "duals": "Lagrangian 1/2 y'Qy + q'y + lam'(A y - b) + nu'(G y - h): stationarity "
                 "Q y + q + A'lam + G'nu = 0, nu >= 0, nu_i (G y - h)_i = 0",
        "symmetric_inputs": [0],
        "symmetric_part": "only (Q + Q')/2 enters: Q tangents and the stored Q VJPs are symmetric; "
                          "compare symmetrizes the peer's Q VJP",
        "recommended_rtol": 1e-5, "recommended_rtol_reason": _RTOL_REASON,
    }
    if batched:
        conv["batch"] = ("leading batch axis B on every batched argument; "
                         + (f"{', '.join(shared)} shared (one matrix for the batch): their VJP is "
                            f"the SUM over the batch of the per-instance gradients"
                            if shared else "no shared argument"))
    return conv


_PRIMAL = {"primal": {"outputs": [{"name": "y", "shape": "(n,) or (B, n)"}],
                      "duals": "not exported (primal-only variant for peers without duals)"}}


def _single(rng, n: int = 5, m: int = 8, p: int = 0, margin: float = 0.2):
    return qp_inputs(rng, n, m, p, margin)


def _batched(rng, batch: int = 3, n: int = 4, m: int = 6, p: int = 0, margin: float = 0.2,
             shared: tuple = ()):
    return batched_qp_inputs(rng, batch, n, m, p, margin, shared=tuple(shared))


_NOISE = 1e-13   # polished forward: exact up to rounding amplified by cond(KKT) ~ 1e2-1e3

register(Entry(
    name="qp", fn=_fn(), generate=_single, size={"n": 5, "m": 8}, noise=_NOISE,
    conventions=_conventions(False), variants={"primal": _primal()}, variant_conventions=_PRIMAL,
    description="convex QP argmin (y, lam, nu), PDIPM forward, structured KKT backward; all of Q, q, G, h"))
register(Entry(
    name="qp-eq", fn=_fn(), generate=_single, size={"n": 5, "m": 6, "p": 2}, noise=_NOISE,
    conventions=_conventions(True), variants={"primal": _primal()}, variant_conventions=_PRIMAL,
    description="convex QP with equalities A y = b; all six inputs Q, q, G, h, A, b"))
register(Entry(
    name="qp-batched", fn=_fn(), generate=_batched,
    size={"batch": 3, "n": 4, "m": 6, "shared": ("Q", "G")}, noise=_NOISE,
    conventions=_conventions(False, True, ("Q", "G")), variants={"primal": _primal()},
    variant_conventions=_PRIMAL,
    description="batch of 3 QPs, Q and G shared (broadcast: gradient summed over the batch)"))
register(Entry(
    name="qp-batched-eq", fn=_fn(), generate=_batched, size={"batch": 3, "n": 4, "m": 5, "p": 1},
    noise=_NOISE, conventions=_conventions(True, True), variants={"primal": _primal()},
    variant_conventions=_PRIMAL, description="batch of 3 QPs with equalities, every argument batched"))
register(Entry(
    name="qp-generic", fn=_fn(backward="generic"), generate=_single,
    size={"n": 4, "m": 6, "p": 1}, noise=_NOISE, conventions=_conventions(True),
    variants={"primal": _primal(backward="generic")}, variant_conventions=_PRIMAL,
    description="QP with the generic backward: core LU of the autograd Jacobian of eq. 27"))
