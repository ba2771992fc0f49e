"""Unrolled power iteration (Zanfir and Sminchisescu 2018): the explicit baseline."""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval, isbox

from nimplicit.errors import NonFiniteError

from .errors import AffinityError
from .validation import as_real_array, positive_int


def power_iteration_layer(M, iterations: int = 10):
    r"""``iterations`` steps of ``y <- M y / |M y|`` from ``y_0 = 1/sqrt(nm)``
    (Zanfir and Sminchisescu 2018), differentiated by unrolling (autograd).

    ``M`` is a real array of shape ``(nm, nm)`` or ``(B, nm, nm)``; returns
    ``y`` of shape ``(nm,)`` or ``(B, nm)``.  No well-posedness requirement:
    the output is defined for any finite ``M`` with ``M y_k != 0``.  NaN/Inf in
    ``M`` raise :class:`~nimplicit.errors.NonFiniteError`, complex or
    non-numeric ``M`` an :class:`~reference_layers.matching.errors.AffinityError`.
    (An explicit layer: none of the implicit layers' backward/solver keywords apply.)
    """
    iterations = positive_int("iterations", iterations)
    Mv = as_real_array(getval(M), "the affinity M")
    if Mv is not getval(M) and not isbox(M):
        M = Mv
    if Mv.ndim not in (2, 3) or Mv.shape[-1] != Mv.shape[-2] or Mv.shape[-1] == 0:
        raise AffinityError(f"power_iteration_layer needs M of shape (nm, nm) or (B, nm, nm), got "
                            f"{Mv.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(Mv.sum())
    if not finite and not np.isfinite(Mv).all():
        raise NonFiniteError(f"the affinity M contains {int((~np.isfinite(Mv)).sum())} non-finite "
                             f"value(s) (NaN or Inf): power iteration would return NaN.")
    N = Mv.shape[-1]
    y = np.full(Mv.shape[:-1], 1.0 / np.sqrt(N))
    for _ in range(iterations):
        y = anp.einsum("...ij,...j->...i", M, y)
        norm = anp.sqrt(anp.sum(y * y, axis=-1, keepdims=True))
        nv = getval(norm)
        if np.any(nv == 0) or not np.all(np.isfinite(nv)):
            raise AffinityError("power iteration reached M y = 0 or overflowed: the affinity "
                                "annihilates the iterate (all-zero M?) or is too large to square "
                                "(rescale M).")
        y = y / norm
    return y
