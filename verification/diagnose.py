r"""IFT diagnostics: is the implicit gradient of a layer well posed at an instance?

The implicit function theorem gives ``dy/dx = -J_{F,y}^{-1} J_{F,x}`` only where
``F(y*, x) = 0`` holds and ``J_{F,y}`` is invertible; numerically the derivative
is as trustworthy as ``J_{F,y}`` is well conditioned.  :func:`diagnose` runs
``fn(*inputs)`` (a layer, or any function calling implicit layers), collects the
:class:`nimplicit.ForwardPoint` of every layer evaluated (``nimplicit.record_points``)
and reports for each

- the residual ``max |F(y*, x)|`` against the layer's own tolerance,
- the singular values of ``J_{F,y}``: ``sigma_min`` and
  ``cond = sigma_max / sigma_min``, from the dense ``J`` (``r`` VJPs) when
  ``m <= dense_max``, otherwise estimated by ``scipy.sparse.linalg.svds`` on the
  matrix-free operator (or skipped, with a note, if that fails),
- the layer's declared measures ``point.layer.diagnostics(point)`` (a
  strict-complementarity margin, an eigen-gap, ...),
- an a-posteriori error bar on the implicit gradient itself
  (:class:`GradientErrorBar`, :func:`gradient_error_bar`): what the forward
  residual and the backward solve's residual, amplified by the conditioning of
  ``J_{F,y}``, leave of its accuracy,

and flags the instance (``ok = False``) with the reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as onp
import scipy.sparse.linalg as spla
from autograd import jacobian as ag_jacobian
from autograd import make_vjp
from nimplicit import record_points
from nimplicit.errors import NimplicitError
from nimplicit.linear_solvers import form_jacobian

EPS = float(onp.finfo(float).eps)
MAX_CONDITION = 1e8
DENSE_MAX = 200


@dataclass
class PointDiagnosis:
    """Diagnostics of one implicit layer evaluation (one :class:`ForwardPoint`).

    ``condition`` and ``sigma_min`` are the worst over the batch instances;
    ``measures`` holds the layer's own ``{name: (value, ok, why)}``.
    """
    layer: str
    m: int
    r: int
    batch: Optional[int]
    residual: float
    residual_tol: float
    sigma_min: Optional[float]
    sigma_max: Optional[float]
    condition: Optional[float]
    method: str
    error_bar: Optional["GradientErrorBar"] = None
    measures: Dict[str, Tuple[float, bool, str]] = field(default_factory=dict)
    flags: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.flags


@dataclass
class Diagnosis:
    """Result of :func:`diagnose`: one :class:`PointDiagnosis` per layer evaluation."""
    points: List[PointDiagnosis] = field(default_factory=list)
    error: Optional[BaseException] = None
    notes: List[str] = field(default_factory=list)

    @property
    def flags(self) -> List[str]:
        out = [f"point {k} ({p.layer}): {f}" for k, p in enumerate(self.points) for f in p.flags]
        if self.error is not None:
            out.insert(0, f"the function raised {type(self.error).__name__}: {self.error}")
        return out

    @property
    def ok(self) -> bool:
        return not self.flags

    @property
    def gradient_error(self) -> float:
        """Largest a-posteriori relative error bar of the implicit gradients
        (NaN when none could be computed)."""
        bars = [p.error_bar.relative for p in self.points if p.error_bar is not None]
        return max(bars, default=float("nan"))

    def explains(self, gap: float) -> bool:
        """Is a relative AD/FD gap ``gap`` within the implicit gradients' error bar?"""
        bar = self.gradient_error
        return bool(onp.isfinite(bar) and gap <= bar)

    @property
    def worst_condition(self) -> float:
        conds = [p.condition for p in self.points if p.condition is not None]
        return max(conds, default=float("nan"))

    def summary(self) -> str:
        lines = []
        for k, p in enumerate(self.points):
            cond = "n/a" if p.condition is None else f"{p.condition:.3g}"
            smin = "n/a" if p.sigma_min is None else f"{p.sigma_min:.3g}"
            batch = "" if p.batch is None else f", batch {p.batch}"
            lines.append(f"point {k}: {p.layer} (m={p.m}, r={p.r}{batch}): residual {p.residual:.2e} "
                         f"(tol {p.residual_tol:.1e}), sigma_min {smin}, cond {cond} [{p.method}]"
                         f" {'ok' if p.ok else 'FLAGGED'}")
            for name, (value, ok, why) in p.measures.items():
                lines.append(f"    {name} = {value:.3g} {'ok' if ok else 'BAD'}: {why}")
            if p.error_bar is not None:
                lines.append(f"    {p.error_bar}")
            lines += [f"    flag: {f}" for f in p.flags] + [f"    note: {n}" for n in p.notes]
        if self.error is not None:
            lines.append(f"raised {type(self.error).__name__}: {self.error}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("OK: the implicit gradient is well posed here" if self.ok
                     else f"FLAGGED: {len(self.flags)} problem(s)")
        return "\n".join(lines)

    __str__ = summary

    def to_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "flags": self.flags, "worst_condition": self.worst_condition,
                "gradient_error": self.gradient_error,
                "points": [{"layer": p.layer, "m": p.m, "r": p.r, "batch": p.batch,
                            "residual": p.residual, "sigma_min": p.sigma_min,
                            "condition": p.condition, "method": p.method,
                            "error_bar": None if p.error_bar is None else vars(p.error_bar),
                            "measures": {k: [float(v[0]), bool(v[1]), str(v[2])]
                                         for k, v in p.measures.items()},
                            "flags": p.flags, "notes": p.notes} for p in self.points]}


@dataclass
class GradientErrorBar:
    r"""A-posteriori error bar of the implicit gradient at one forward point.

    All quantities are relative (2-norms).  ``relative`` is the estimate of
    ``|xbar - xbar*| / |xbar|`` for the gradient ``xbar = -J_{F,x}^T J^{-T} u``
    of ``<u, y>`` (``u`` a seeded random cotangent), ``xbar*`` its value at the
    exact solution with an exact solve; see :func:`gradient_error_bar`.
    """
    forward_error: float         # |dy| / |y| from the Newton correction dy = -J^+ F(y)
    forward_bound: float         # cond(J) |F(y)| / (|J| |y|), the a-priori bound of it
    from_forward: float          # measured: |xbar(y) - xbar(y + dy)| / |xbar(y)|
    backward_residual: float     # |J^T lam - u| / (|J| |lam| + |u|) of the layer's own solve
    from_backward: float         # cond(J) * backward_residual
    rounding: float              # cond(J) * eps
    relative: float              # from_forward + from_backward + rounding

    def __str__(self) -> str:
        return (f"gradient error bar: relative {self.relative:.2g} (forward residual -> "
                f"|dy|/|y| = {self.forward_error:.2g} [bound {self.forward_bound:.2g}] -> "
                f"{self.from_forward:.2g} in the gradient; backward solve residual "
                f"{self.backward_residual:.2g} x cond -> {self.from_backward:.2g}; rounding "
                f"{self.rounding:.2g})")


def _float_input_indices(inputs) -> List[int]:
    return [k for k, x in enumerate(inputs)
            if isinstance(x, float) or (isinstance(x, onp.ndarray) and x.dtype.kind == "f")]


def gradient_error_bar(point, *, seed: int = 0) -> Optional[GradientErrorBar]:
    r"""Estimate the implicit gradient's own error at ``point`` from its residuals.

    Let ``y`` be the solver's output with residual ``r = F(y, x) != 0``, ``y*``
    the exact solution, ``J = J_{F,y}(y)``, ``B = J_{F,x}(y)``, and the
    gradient of ``<u, y>`` be ``xbar(y) = -B(y)^T lam``, ``J(y)^T lam = u``.

    **Forward part.**  ``0 = F(y*) = r + J (y* - y) + O(|y* - y|^2)``, so the
    Newton correction ``dy = -J^{-1} r`` is ``y* - y`` to first order and

    .. math::
        \frac{\|dy\|}{\|y\|} \le \|J^{-1}\| \frac{\|r\|}{\|y\|}
        = \kappa(J) \frac{\|F(y)\|}{\|J\| \|y\|}

    (``forward_bound``).  The gradient map is evaluated at ``y`` instead of
    ``y*``; its change ``xbar(y) - xbar(y*) = xbar(y) - xbar(y + dy) + O(|dy|^2)``
    is *measured* (``from_forward``) by evaluating ``J``, ``B`` and the dense
    solve at the corrected point ``y + dy``.  (If ``J`` and ``B`` vary on the
    scale of ``y``, perturbation theory of ``J^{-T}`` gives
    ``from_forward <~ kappa(J) |dy| / |y|``; the measurement needs no such model.)

    **Backward part.**  The layer's own linear solver returns ``lam`` with
    normwise backward error ``eta = |J^T lam - u| / (|J| |lam| + |u|)``; the
    standard forward-error bound gives ``|lam - lam*| / |lam*| <~ kappa(J) eta``
    (``from_backward``), which ``B^T`` carries into ``xbar`` unamplified in
    relative terms when ``B^T`` has no cancellation.

    **Rounding.**  ``kappa(J) eps``.

    ``relative = from_forward + from_backward + rounding``: an estimate, not a
    rigorous bound (first order in ``dy``; ``u`` random).  Only square, unbatched
    points with ``m <= DENSE_MAX`` are handled (``None`` otherwise).
    """
    if point.r != point.m or point.y_structure.batch_size is not None or point.m > DENSE_MAX \
            or point.m == 0:
        return None
    inputs = tuple(point.inputs)
    nums = _float_input_indices(inputs)
    if not nums:
        return None
    y = onp.asarray(point.y_flat, dtype=float)
    res = onp.asarray(point.res_flat, dtype=float)

    def J_at(yy):
        return onp.asarray(ag_jacobian(lambda v: point.F(v, *inputs))(yy), dtype=float)

    def xbar(yy, lam):
        def F_x(sel):
            full = list(inputs)
            for k, v in zip(nums, sel):
                full[k] = v
            return point.F(yy, *full)
        pulled = make_vjp(F_x)(tuple(inputs[k] for k in nums))[0](lam)
        return -onp.concatenate([onp.ravel(onp.asarray(g, dtype=float)) for g in pulled])

    J = J_at(y)
    sv = onp.linalg.svd(J, compute_uv=False)
    if sv[-1] <= 0 or not onp.all(onp.isfinite(sv)):
        return None
    cond, norm_J = float(sv[0] / sv[-1]), float(sv[0])
    u = onp.random.default_rng(seed).standard_normal(point.m)
    # the layer's own backward solve and its residual
    lam = onp.asarray(point.solve_raw(u, transpose=True), dtype=float).ravel()
    eta = float(onp.linalg.norm(J.T @ lam - u) / (norm_J * onp.linalg.norm(lam) + onp.linalg.norm(u)))
    # the forward error, by one Newton correction
    dy = -onp.linalg.solve(J, res)
    y_norm = max(float(onp.linalg.norm(y)), onp.finfo(float).tiny)
    g0 = xbar(y, onp.linalg.solve(J.T, u))
    y_c = y + dy
    g1 = xbar(y_c, onp.linalg.solve(J_at(y_c).T, u))
    g_norm = max(float(onp.linalg.norm(g0)), onp.finfo(float).tiny)
    from_forward = float(onp.linalg.norm(g0 - g1)) / g_norm
    rounding = cond * EPS
    return GradientErrorBar(
        forward_error=float(onp.linalg.norm(dy)) / y_norm,
        forward_bound=cond * float(onp.linalg.norm(res)) / (norm_J * y_norm),
        from_forward=from_forward, backward_residual=eta, from_backward=cond * eta,
        rounding=rounding, relative=from_forward + cond * eta + rounding)



def dense_jacobian(point) -> onp.ndarray:
    """``J_{F,y}`` at a forward point from ``r`` VJPs: ``(r, m)`` or ``(B, r, m)``."""
    # the core's own construction (row k = J^T e_k), with b = the residual giving r and the batch
    return form_jacobian(None, lambda u: point.J_T(u, point.y_flat, point.inputs),
                         point.res_flat, transpose=False)


def _singular_values_dense(point) -> Tuple[onp.ndarray, onp.ndarray]:
    J = dense_jacobian(point)
    blocks = J.reshape((-1,) + J.shape[-2:])
    s = onp.linalg.svd(blocks, compute_uv=False)   # (B, min(r, m)), descending
    return s[:, -1], s[:, 0]


def _singular_values_matrix_free(point) -> Tuple[float, float]:
    n_rows, n_cols = point.res_flat.size, point.y_flat.size
    shape_y, shape_r = point.y_flat.shape, point.res_flat.shape
    op = spla.LinearOperator(
        (n_rows, n_cols), dtype=float,
        matvec=lambda v: onp.asarray(point.J(onp.reshape(v, shape_y), point.y_flat, point.inputs),
                                     float).ravel(),
        rmatvec=lambda u: onp.asarray(point.J_T(onp.reshape(u, shape_r), point.y_flat,
                                                point.inputs), float).ravel())
    rng = onp.random.default_rng(0)
    v0 = rng.standard_normal(min(n_rows, n_cols))
    smax = spla.svds(op, k=1, which="LM", v0=v0, return_singular_vectors=False)[0]
    smin = spla.svds(op, k=1, which="SM", v0=v0, return_singular_vectors=False, maxiter=2000)[0]
    return float(smin), float(smax)


def diagnose_point(point, *, dense_max: int = DENSE_MAX, max_condition: float = MAX_CONDITION,
                   matrix_free: bool = True) -> PointDiagnosis:
    """Diagnostics of one :class:`nimplicit.ForwardPoint` (see :func:`diagnose`)."""
    layer = point.layer
    name = layer.name   # the core defaults it to the residual's name
    batch = point.y_structure.batch_size
    res = onp.abs(point.res_flat).max() if point.res_flat.size else 0.0
    scale = 1.0 + onp.abs(point.y_flat).max(initial=0.0) + max(
        (onp.abs(onp.asarray(x, float)).max(initial=0.0) for x in point.inputs
         if onp.asarray(x).dtype.kind in "fiu"), default=0.0)
    tol = layer.residual_tol * scale
    d = PointDiagnosis(layer=str(name), m=point.m, r=point.r, batch=batch, residual=float(res),
                       residual_tol=float(tol), sigma_min=None, sigma_max=None, condition=None,
                       method="skipped")
    if not res <= tol:
        d.flags.append(f"the residual max|F(y*, x)| = {res:.3g} exceeds the layer's tolerance "
                       f"{tol:.3g}: y* is not a solution, so the IFT derivative is not its derivative")
    if point.r != point.m:
        d.notes.append(f"J_F,y is {point.r} x {point.m} (not square): the derivative is the "
                       f"minimum-norm / least-squares choice, a convention")
    try:
        if point.m <= dense_max:
            smin_b, smax_b = _singular_values_dense(point)
            with onp.errstate(divide="ignore"):
                cond_b = onp.where(smin_b > 0, smax_b / onp.where(smin_b > 0, smin_b, 1.0), onp.inf)
            worst = int(onp.argmax(cond_b))
            d.sigma_min, d.sigma_max = float(smin_b.min()), float(smax_b.max())
            d.condition = float(cond_b[worst])
            d.method = "dense SVD" + (f" of {len(cond_b)} blocks" if batch is not None else "")
            where = f" (batch instance {worst})" if batch is not None else ""
        elif matrix_free:
            d.sigma_min, d.sigma_max = _singular_values_matrix_free(point)
            d.condition = d.sigma_max / d.sigma_min if d.sigma_min > 0 else float("inf")
            d.method = "svds estimate (matrix-free)"
            where = ""
        else:
            d.notes.append(f"m = {point.m} > dense_max = {dense_max}: condition number not computed")
            where = ""
    except (ArithmeticError, ValueError, RuntimeError, spla.ArpackNoConvergence) as exc:
        d.notes.append(f"singular values not computed ({type(exc).__name__}: {exc})")
        where = ""
    if d.condition is not None and point.r == point.m:
        if not onp.isfinite(d.condition) or d.condition * EPS >= 1.0:
            d.flags.append(f"J_F,y is singular to working precision{where} (sigma_min = "
                           f"{d.sigma_min:.3g}, sigma_max = {d.sigma_max:.3g}): the implicit "
                           f"gradient does not exist or is not unique")
        elif d.condition > max_condition:
            d.flags.append(f"J_F,y is ill-conditioned{where}: cond = {d.condition:.3g} > "
                           f"{max_condition:.3g}, so the implicit gradient may lose up to "
                           f"{onp.log10(d.condition):.0f} digits and amplifies solver errors")
    try:
        d.error_bar = gradient_error_bar(point)
    except (ArithmeticError, ValueError, RuntimeError, NimplicitError) as exc:
        d.notes.append(f"gradient error bar not computed ({type(exc).__name__}: {exc})")
    if d.error_bar is None and not any("error bar" in n for n in d.notes):
        d.notes.append("gradient error bar not computed (needs a square, unbatched J_F,y with "
                       f"m <= {DENSE_MAX} and a float input)")
    if layer.diagnostics is not None:
        try:
            measures = layer.diagnostics(point) or {}
        except Exception as exc:   # a broken diagnostics hook is reported, not fatal
            d.notes.append(f"the layer's diagnostics raised {type(exc).__name__}: {exc}")
            measures = {}
        for key, (value, ok, why) in measures.items():
            d.measures[key] = (float(value), bool(ok), str(why))
            if not ok:
                d.flags.append(f"{key} = {float(value):.3g}: {why}")
    return d


def diagnose(fn: Callable[..., Any], *inputs: Any, dense_max: int = DENSE_MAX,
             max_condition: float = MAX_CONDITION, matrix_free: bool = True) -> Diagnosis:
    r"""Diagnose the implicit layers evaluated by ``fn(*inputs)``.

    Parameters
    ----------
    fn : a layer or any function that calls implicit layers.
    *inputs : its inputs (raw numbers).
    dense_max : largest number of unknowns per instance ``m`` for which
        ``J_{F,y}`` is formed densely (``r`` VJPs) and its SVD taken.
    max_condition : flag ``cond(J_{F,y}) = sigma_max / sigma_min`` above this.
    matrix_free : for ``m > dense_max`` estimate ``sigma_max`` and ``sigma_min``
        with ``scipy.sparse.linalg.svds`` on the operator ``v -> J v``,
        ``u -> J^T u``; ``False`` skips it (noted in the result).

    Returns
    -------
    Diagnosis
        ``.ok`` is False when any evaluation is flagged (residual not met,
        ``J_{F,y}`` singular or ill-conditioned, a layer measure not ok, or
        ``fn`` raised a :class:`nimplicit.errors.NimplicitError`, kept in
        ``.error``); ``.flags`` says why; ``.worst_condition`` is the largest
        condition number seen.
    """
    diagnosis = Diagnosis()
    with record_points() as points:
        try:
            fn(*inputs)
        except NimplicitError as exc:
            diagnosis.error = exc
    for point in points:
        diagnosis.points.append(diagnose_point(point, dense_max=dense_max,
                                               max_condition=max_condition,
                                               matrix_free=matrix_free))
    if not points and diagnosis.error is None:
        diagnosis.notes.append("no implicit layer was evaluated by fn: nothing to diagnose")
    return diagnosis
