r"""Per-instance statuses for batches: ``implicit_layer(..., throw=False)``.

In a batch of independent instances (``batch_axis``), one bad instance must not
cost the others their results.  With ``throw=False`` a layer returns
``(y, status)``: ``y`` holds the good instances' outputs, NaN rows for the
failed ones, and ``status`` (a :class:`BatchStatus`) says per instance what
happened, from one enumeration of outcomes (:class:`Outcome`).

Detection, per instance ``b`` (in this order; the first outcome found is kept):

1. the solver reports it (``Solution(y, aux, status)`` with ``status`` a
   :class:`BatchStatus`, or any object with a boolean ``instance_ok`` array
   of shape ``(B,)``): ``SOLVER_FAILED`` (or the code the solver gives);
2. a NaN or Inf in row ``b`` of the solver's output: ``NON_FINITE_OUTPUT``;
3. a NaN or Inf in the residual's row ``b`` at that output: ``NON_FINITE_RESIDUAL``;
4. the core's residual check (``|F_i| <= residual_tol (1 + s_i)`` with the same
   per-equation term scale ``s_i``, :meth:`ImplicitLayer._check_residual`)
   fails on an equation of instance ``b``: ``RESIDUAL_NOT_MET``;
5. with the dense LU linear solver (the default up to ``dense_max`` unknowns),
   the block ``J_b = dF_b/dy_b`` has an estimated condition number above the
   LU's ``max_condition`` (the same equilibrated test as :class:`~nimplicit.linear_solvers.LU`):
   ``SINGULAR_JACOBIAN``.

The failed instances are then cut out of the derivative.  With the mask ``d_b``
(True on failed instances) and ``\tilde y`` the solver's output with non-finite
rows (or rows whose residual is not finite) replaced by the first good row, the
node differentiates the masked residual

.. math::

    \tilde F_b(y, x) = \begin{cases} F_b(y, x) & d_b = 0 \\
                       E (y_b - \tilde y_b) & d_b = 1 \end{cases}
    \qquad (E = I_{r \times m},\ \text{the identity when square})

at ``\tilde y``: the good blocks of ``J`` are exactly those of ``F``, a failed
block is the identity, and the failed rows do not depend on the inputs.  The
output's failed rows are NaN (``anp.where``), whose derivative is 0, so a failed
instance gets a zero cotangent, hence ``w_b = 0`` and a zero contribution to
every input's gradient; a good instance's output and gradient are those of a
batch of the good instances alone (to rounding in sums over the batch).
``F`` is evaluated at finite rows only, so ``0 * NaN`` cannot reach a shared
input's gradient through ``y``; a residual whose partial derivatives in an
*input* are non-finite on a failed instance still would, and every input's
gradient is checked: non-finite entries that all lie in the failed instances'
slices of an input with ``B`` entries along ``batch_axis`` (batched like ``y``)
are those instances' own zero contribution and are set to 0; any other
non-finite entry raises :class:`~nimplicit.errors.NonFiniteError` naming the
failed instances.  With the dense LU the failed blocks of the formed ``J``
are set to ``E`` exactly (so a NaN ``dF_b/dy_b`` there cannot reach the
factorization); the matrix-free solvers see ``F~``'s products as they are.

Without ``batch_axis`` the whole problem is one instance: ``status`` has length 1.
What still raises with ``throw=False``: invalid inputs (dtype, NaN/Inf in an
input: which instance it belongs to is not known), an exception raised by the
solver itself, shape errors, and a :class:`~nimplicit.errors.CouplingError`.
"""
from __future__ import annotations

import copy
import enum
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import autograd.numpy as anp
import numpy as np
import scipy.linalg
from autograd.extend import defjvp, defvjp, primitive
from autograd.tracer import getval, isbox

from . import linear_solvers
from .errors import NonFiniteError, ShapeError
from .structure import Structure

__all__ = ["Outcome", "BatchStatus", "OUTCOME_MESSAGES"]


class Outcome(enum.IntEnum):
    """What happened to one instance of a batch (the codes of :class:`BatchStatus`)."""

    OK = 0
    #: the forward solver reported that this instance failed
    SOLVER_FAILED = 1
    #: the solver's output has NaN or Inf in this instance
    NON_FINITE_OUTPUT = 2
    #: the residual F(y*, x) is NaN or Inf in this instance
    NON_FINITE_RESIDUAL = 3
    #: the core's residual check fails on an equation of this instance
    RESIDUAL_NOT_MET = 4
    #: this instance's block of J = dF/dy is singular or ill-conditioned
    SINGULAR_JACOBIAN = 5
    #: (optimization layers) the constraints have no common solution
    INFEASIBLE = 6
    #: (optimization layers) the objective is unbounded below on the feasible set
    UNBOUNDED = 7
    #: (optimization layers) the problem is not convex
    NOT_CONVEX = 8
    #: the forward solver did not converge in its iteration budget
    NOT_CONVERGED = 9


#: a default sentence per outcome (the per-instance message adds the numbers)
OUTCOME_MESSAGES: Dict[Outcome, str] = {
    Outcome.OK: "ok",
    Outcome.SOLVER_FAILED: "the forward solver reported a failure for this instance",
    Outcome.NON_FINITE_OUTPUT: "the solver's output contains NaN or Inf in this instance",
    Outcome.NON_FINITE_RESIDUAL: "the residual F(y*, x) is NaN or Inf at the solver's output",
    Outcome.RESIDUAL_NOT_MET: "the residual is not met at the solver's output",
    Outcome.SINGULAR_JACOBIAN: "J_F,y = dF/dy is singular or ill-conditioned in this instance",
    Outcome.INFEASIBLE: "the constraints have no common solution",
    Outcome.UNBOUNDED: "the objective is unbounded below on the feasible set",
    Outcome.NOT_CONVEX: "the problem is not convex",
    Outcome.NOT_CONVERGED: "the forward solver did not converge",
}


class BatchStatus:
    """Per-instance outcomes of one call of a layer built with ``throw=False``.

    Parameters
    ----------
    codes : sequence of int or :class:`Outcome`, shape ``(B,)``
    messages : sequence of str, optional
        One message per instance (``""`` or missing: the outcome's default).

    Attributes
    ----------
    codes : ``(B,)`` int array of :class:`Outcome` values
    ok : ``(B,)`` bool array, True where the instance succeeded
    failed : indices of the failed instances
    messages : tuple of str, ``"ok"`` for a good instance

    A solver may return ``Solution(y, aux, status=BatchStatus(...))`` to report
    per-instance failures itself (see :meth:`from_failures`).

    >>> s = BatchStatus.from_failures(3, {1: (Outcome.INFEASIBLE, "bounds contradict")})
    >>> s.ok.tolist(), s.failed.tolist(), s[1]
    ([True, False, True], [1], <Outcome.INFEASIBLE: 6>)
    >>> s.messages[1]
    'instance 1: INFEASIBLE: bounds contradict'
    """

    __slots__ = ("codes", "messages")

    def __init__(self, codes: Sequence[int], messages: Optional[Sequence[str]] = None):
        codes = np.asarray(codes, dtype=int).reshape(-1)
        for c in np.unique(codes):
            Outcome(int(c))   # an unknown code raises ValueError here
        msgs = list(messages) if messages is not None else [""] * len(codes)
        if len(msgs) != len(codes):
            raise ShapeError(f"BatchStatus: {len(msgs)} messages for {len(codes)} instances")
        self.codes = codes
        self.messages = tuple(_message(k, Outcome(int(c)), m)
                              for k, (c, m) in enumerate(zip(codes, msgs)))

    @classmethod
    def from_failures(cls, size: int, failures: Dict[int, Tuple[Outcome, str]]) -> "BatchStatus":
        """``size`` instances, all OK except ``failures = {k: (outcome, message)}``."""
        codes = np.zeros(int(size), dtype=int)
        msgs = [""] * int(size)
        for k, (outcome, message) in failures.items():
            codes[int(k)] = int(outcome)
            msgs[int(k)] = message
        return cls(codes, msgs)

    @property
    def ok(self) -> np.ndarray:
        return self.codes == Outcome.OK

    @property
    def failed(self) -> np.ndarray:
        return np.flatnonzero(self.codes != Outcome.OK)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, k: int) -> Outcome:
        return Outcome(int(self.codes[k]))

    def __repr__(self) -> str:
        bad = self.failed
        if not bad.size:
            return f"BatchStatus({len(self)} instances, all OK)"
        shown = ", ".join(f"{int(k)}: {self[k].name}" for k in bad[:5])
        more = ", ..." if bad.size > 5 else ""
        return f"BatchStatus({len(self)} instances, {bad.size} failed: {{{shown}{more}}})"


def _message(k: int, outcome: Outcome, text: str) -> str:
    if outcome == Outcome.OK:
        return "ok"
    return f"instance {k}: {outcome.name}: {text or OUTCOME_MESSAGES[outcome]}"


def solver_reported(status: Any, B: int) -> Tuple[np.ndarray, list]:
    """Codes and messages a solver reported through ``Solution.status`` (all OK if none)."""
    codes, msgs = np.zeros(B, dtype=int), [""] * B
    if isinstance(status, BatchStatus):
        if len(status) != B:
            raise ShapeError(f"the solver's BatchStatus has {len(status)} instances, its output "
                             f"has {B}")
        codes = status.codes.copy()
        msgs = [m.split(": ", 2)[-1] if c else "" for c, m in zip(codes, status.messages)]
        return codes, msgs
    ok = getattr(status, "instance_ok", None)
    if ok is None and isinstance(status, dict):
        ok = status.get("instance_ok")
    if ok is None:
        return codes, msgs
    ok = np.asarray(ok, dtype=bool).reshape(-1)
    if ok.size != B:
        raise ShapeError(f"the solver's status.instance_ok has {ok.size} entries, its output has "
                         f"{B} instances")
    codes[~ok] = Outcome.SOLVER_FAILED
    return codes, msgs


# ------------------------------------------------------------------------------
# the masked residual and the node call
# ------------------------------------------------------------------------------

class _MaskedResidual:
    """``F~`` of the module docstring: ``F`` on good instances, ``E (y_b - y~_b)`` on
    failed ones."""

    def __init__(self, residual, y_structure: Structure, res_structure: Structure,
                 bad: np.ndarray, y_sub_flat: np.ndarray):
        self.residual, self.ys, self.rs = residual, y_structure, res_structure
        self.bad, self.y_sub = bad, y_sub_flat
        self.E = np.eye(res_structure.size, y_structure.size)

    def __call__(self, y, *inputs):
        r_flat = self.rs.flatten(self.residual(y, *inputs))
        y_flat = self.ys.flatten(y)
        identity = anp.dot(y_flat - self.y_sub, self.E.T)
        mask = self.bad[:, None] if self.bad.ndim else self.bad
        return self.rs.unflatten(anp.where(mask, identity, r_flat))


@primitive
def _watched(x, k: int, failed: tuple, B, batch_axis):
    return x


def _check_gradient(g, k: int, failed: tuple, B, batch_axis):
    """Input ``k``'s gradient, checked finite.  Non-finite entries that all lie in the failed
    instances' slices of an input with ``B`` entries along ``batch_axis`` (an input batched
    like ``y``: its residual's partials are NaN there, ``0 * NaN``) are the failed
    instances' own zero contributions and are set to 0; any other raises."""
    raw = np.asarray(getval(g))
    bad = ~np.isfinite(raw)
    if not bad.any():
        return g
    if failed and B is not None and raw.ndim and raw.shape[batch_axis % raw.ndim] == B:
        rows = np.zeros(B, bool)
        rows[list(failed)] = True
        shape = [1] * raw.ndim
        shape[batch_axis % raw.ndim] = B
        in_failed = np.broadcast_to(rows.reshape(shape), raw.shape)
        if not (bad & ~in_failed).any():
            return anp.where(in_failed, 0.0, g)
    who = (f"the failed instance(s) {list(failed)}" if failed else "no failed instance")
    raise NonFiniteError(
        f"throw=False: the gradient with respect to input {k} is not finite although the "
        f"failed instances are masked out ({who}); the residual's partial derivatives in "
        f"input {k} are NaN/Inf there (0 * NaN reaches an entry shared with other "
        f"instances). Drop the failed instances from the batch, or write the residual so it "
        f"stays finite for them.")


defvjp(_watched, lambda ans, x, k, failed, B, axis: lambda g: _check_gradient(g, k, failed, B,
                                                                               axis))
defjvp(_watched, lambda g, ans, x, k, failed, B, axis: g)


def call_with_status(layer, inputs: tuple):
    """``layer(*inputs)`` for a layer built with ``throw=False``: ``(y, BatchStatus)``."""
    from . import implicit as core   # the node lives there; imported late (no cycle)

    core._check_differentiated_inputs(inputs)
    raw = tuple(getval(x) for x in inputs)
    solution, check = layer._run_solver(raw)
    core._check_output(solution.y)

    point, codes, msgs = _masked_point(layer, solution, raw, check)
    status = BatchStatus(codes, msgs)
    for recorder in core._RECORDERS.get():
        recorder.append(point)

    failed = tuple(int(k) for k in status.failed)
    B = point.y_structure.batch_size
    watched = [_watched(x, k, failed, B, layer.batch_axis)
               if isbox(x) and isinstance(getval(x), (np.ndarray, float)) else x
               for k, x in enumerate(inputs)]
    flat = core._node(point, *watched)
    if failed:
        bad = ~status.ok if point.y_structure.batch_size is not None else bool(failed)
        flat = anp.where(bad[:, None] if np.ndim(bad) else bad, np.nan, flat)
    return core._output(point, flat, inputs), status


def _flat(structure: Structure, value) -> np.ndarray:
    if structure.is_tuple:
        parts = tuple(np.asarray(p, float) for p in value)
    else:
        parts = np.asarray(value, float)
    return np.asarray(structure.flatten(parts), dtype=float)


def _masked_point(layer, solution, raw: tuple, check: bool):
    """The forward point of ``F~`` and the per-instance codes and messages."""
    ys = Structure(solution.y, layer.batch_axis, "the solver's output")
    B = ys.batch_size
    if B == 0:
        raise ShapeError("throw=False: the solver's output has 0 instances along batch_axis; "
                         "pass at least one instance")
    n = 1 if B is None else B
    y_flat = _flat(ys, solution.y).reshape(n, -1)
    codes, msgs = solver_reported(solution.status, n)

    def fail(rows, outcome, text):
        for k in np.flatnonzero(rows):
            if codes[k] == Outcome.OK:
                codes[k], msgs[k] = int(outcome), (text(k) if callable(text) else text)

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        fin_y = np.isfinite(y_flat).all(axis=1)
        fail(~fin_y, Outcome.NON_FINITE_OUTPUT, lambda k: (
            f"the solver's output has {int((~np.isfinite(y_flat[k])).sum())} NaN/Inf "
            f"value(s) in this instance"))
        y_sub = _substitute(y_flat, ~fin_y, codes)
        res = layer.residual(ys.unflatten(y_sub.reshape(-1) if B is None else y_sub), *raw)
        rs = Structure(res, layer.batch_axis, "the residual")
        if rs.batch_size != B:
            raise ShapeError(f"the residual has {rs.batch_size} instances along batch_axis but "
                             f"the solver's output has {B}")
        fin_r = np.isfinite(_flat(rs, res).reshape(n, -1)).all(axis=1)
        fail(~fin_r, Outcome.NON_FINITE_RESIDUAL, OUTCOME_MESSAGES[Outcome.NON_FINITE_RESIDUAL])
        y_sub = _substitute(y_flat, ~(fin_y & fin_r), codes)

    point = _build(layer, solution, raw, ys, rs, codes != 0, y_sub)
    if check:
        fail(*_residual_rows(layer, point, n))
    fail(*_singular_rows(point, codes != 0, n))
    J = point.operator._dense
    if not np.array_equal(codes != 0, point._nimplicit_bad):
        point = _build(layer, solution, raw, ys, rs, codes != 0, y_sub)
    if J is not None and (codes != 0).any():
        # the good blocks are unchanged; every failed block is E exactly (also where the
        # residual's own dF_b/dy_b is NaN there and 0 * NaN would have reached it)
        J = J.copy().reshape(n, point.r, point.m)
        J[codes != 0] = np.eye(point.r, point.m)
        point.operator._dense = J.reshape(point.operator.batch + (point.r, point.m))
    return point, codes, msgs


def _substitute(y_flat: np.ndarray, rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``y`` with ``rows`` replaced by the first good finite row (zeros if there is none)."""
    if not rows.any():
        return y_flat
    good = np.flatnonzero(~rows & (codes == 0))
    fill = y_flat[good[0]] if good.size else np.zeros(y_flat.shape[1])
    out = y_flat.copy()
    out[rows] = fill
    return out


def _build(layer, solution, raw, ys, rs, bad, y_sub):
    from . import implicit as core

    masked = copy.copy(layer)
    flat_bad = bad if ys.batch_size is not None else np.bool_(bad[0])
    masked.residual = _MaskedResidual(layer.residual, ys, rs, flat_bad,
                                      y_sub if ys.batch_size is not None else y_sub[0])
    y = ys.unflatten(y_sub if ys.batch_size is not None else y_sub[0])
    point = core.ForwardPoint(masked, core.Solution(y, solution.aux, solution.status), raw)
    point.linear_solver = masked._choose_solver(point)
    point._nimplicit_bad = bad.copy()
    return point


def _residual_rows(layer, point, n: int):
    """Instances on which the core's residual check (same tolerance, same scale) fails."""
    from . import implicit as core

    res = np.abs(point.res_flat).reshape(n, -1)
    tol = layer.residual_tol
    if not (res > tol).any():
        return np.zeros(n, bool), Outcome.RESIDUAL_NOT_MET, ""
    scale = core._term_scale(point).reshape(n, -1)
    bad = res > tol * (1.0 + scale)

    def text(k):
        eq = int(np.argmax(res[k] - tol * (1.0 + scale[k])))
        return (f"|F_{eq}(y*, x)| = {res[k, eq]:.3g} > residual_tol * (1 + s) = "
                f"{tol * (1 + scale[k, eq]):.3g}, s = {scale[k, eq]:.3g} the size of the terms of "
                f"that equation ({int(bad[k].sum())} equation(s) of this instance fail)")
    return bad.any(axis=1), Outcome.RESIDUAL_NOT_MET, text


def _block_condition(block: np.ndarray, units) -> float:
    """The LU's estimate: 1-norm condition of the Ruiz-equilibrated block (inf if not finite)."""
    if not np.isfinite(block).all():
        return np.inf
    r, c = linear_solvers.equilibrate(block, column_scale=units)
    scaled = block * r[:, None] * c[None, :]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        lu_piv = scipy.linalg.lu_factor(scaled, check_finite=False)
        return linear_solvers.lu_condition(lu_piv, scaled)


def _singular_rows(point, bad: np.ndarray, n: int):
    """With the dense LU: instances whose block fails the LU's own condition test."""
    solver = point.linear_solver
    none = np.zeros(n, bool), Outcome.SINGULAR_JACOBIAN, ""
    if not isinstance(solver, linear_solvers.LU) or point.r != point.m:
        return none
    max_condition = solver.opts["max_condition"]
    J = point.operator.dense().reshape(n, point.r, point.m)
    units = linear_solvers._unknown_units(point.operator, n)
    conds = np.zeros(n)
    for k in np.flatnonzero(~bad):
        conds[k] = _block_condition(J[k], units[k])
    rows = ~(conds <= max_condition)

    def text(k):
        return (f"J_F,y = dF/dy has an estimated condition number {conds[k]:.3g} > "
                f"max_condition={max_condition:.3g} (the LU's test) in this instance: the "
                f"implicit function theorem gives no unique derivative there")
    return rows, Outcome.SINGULAR_JACOBIAN, text
