"""The paper's layers, each a thin residual and forward solver over nimplicit.

==========================  =====================================  ===============================
name                        what it returns                        module
==========================  =====================================  ===============================
``qp_layer``                argmin of a convex QP (and its duals)  :mod:`reference_layers.qp`
``ncut_layer``              normalized-cut eigenpair ``(v, lam)``  :mod:`reference_layers.ncut`
``iso_surface_layer``       marching-cubes mesh ``(verts, faces)``  :mod:`reference_layers.level_set`
``spectral_matching_layer`` leading eigenvector of an affinity     :mod:`reference_layers.matching.spectral`
``smac_layer``              spectral matching, affine constraints  :mod:`reference_layers.matching.smac`
``power_iteration_layer``   unrolled power iteration (baseline)    :mod:`reference_layers.matching.power_iteration`
``sinkhorn_layer``          implicit bistochastic normalization    :mod:`reference_layers.matching.sinkhorn`
==========================  =====================================  ===============================

Submodules are imported on first use, so importing this package is cheap and
compiles no numba kernel.
"""
import importlib

_WHERE = {
    "qp_layer": "qp",
    "ncut_layer": "ncut",
    "iso_surface_layer": "level_set",
    "spectral_matching_layer": "matching.spectral",
    "smac_layer": "matching.smac",
    "power_iteration_layer": "matching.power_iteration",
    "sinkhorn_layer": "matching.sinkhorn",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
