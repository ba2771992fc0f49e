"""Unrolled power iteration (Zanfir and Sminchisescu 2018): the explicit baseline."""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from .errors import AffinityError



def power_iteration_layer(M, iterations: int = 10):
    r"""``iterations`` steps of ``y <- M y / |M y|`` from ``y_0 = 1/sqrt(nm)``
    (Zanfir and Sminchisescu 2018), differentiated by unrolling (autograd).

    ``M`` has shape ``(nm, nm)`` or ``(B, nm, nm)``; returns ``y`` of shape
    ``(nm,)`` or ``(B, nm)``.  No well-posedness requirement: the output is
    defined for any ``M`` with ``M y_k != 0``.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    Mv = np.asarray(getval(M))
    if Mv.ndim not in (2, 3) or Mv.shape[-1] != Mv.shape[-2]:
        raise AffinityError(f"power_iteration_layer needs M of shape (nm, nm) or (B, nm, nm), got "
                            f"{Mv.shape}")
    N = Mv.shape[-1]
    y = np.full(Mv.shape[:-1], 1.0 / np.sqrt(N))
    for _ in range(iterations):
        y = anp.einsum("...ij,...j->...i", M, y)
        norm = anp.sqrt(anp.sum(y * y, axis=-1, keepdims=True))
        if np.any(getval(norm) == 0):
            raise AffinityError("power iteration reached M y = 0: the affinity annihilates the "
                                "iterate (all-zero M?)")
        y = y / norm
    return y

