"""Input checks of the graph-matching layers (the affinity matrix)."""
from __future__ import annotations

import numpy as np

from nimplicit.errors import finite_or_raise

from .errors import AffinityError



def _check_affinity(M: np.ndarray, *, batched: bool, allow_negative: bool = False) -> None:
    if M.ndim != (3 if batched else 2) or M.shape[-1] != M.shape[-2]:
        want = "(B, nm, nm)" if batched else "(nm, nm)"
        raise AffinityError(f"the affinity must be a square matrix of shape {want}, got shape "
                            f"{M.shape}")
    finite_or_raise(M, "the affinity matrix")   # symmetry_stats would skip NaNs
    from ..kernels.affinity import symmetry_stats
    for b, Mb in enumerate(M.reshape((-1,) + M.shape[-2:])):
        where = f" (batch instance {b})" if batched else ""
        scale, asym, low = symmetry_stats(np.ascontiguousarray(Mb, dtype=float))
        if scale == 0.0:
            raise AffinityError(f"the affinity matrix is all zero{where}: every vector is a "
                                f"leading eigenvector and nothing is matched. Check the affinity "
                                f"builder (kernel bandwidths, edge lists).")
        if asym > 1e-10 * scale:
            raise AffinityError(
                f"the affinity matrix is not symmetric{where}: max|M - M'| = {asym:.3g} (max|M| = "
                f"{scale:.3g}). Graph-matching affinities are symmetric; build M with both "
                f"directions of every edge, or pass (M + M.T) / 2.")
        if not allow_negative and low < -1e-12 * scale:
            raise AffinityError(
                f"the affinity matrix has negative entries{where} (min {low:.3g}): spectral "
                f"matching needs M >= 0 (Perron-Frobenius: a non-negative leading eigenvector). "
                f"Use a non-negative kernel (e.g. exp(-distance)).")

