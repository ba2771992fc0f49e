"""Graph matching (the paper's section 5.4): a thin re-export of :mod:`reference_layers.matching`.

The layers and builders live in modules with one job each:

=================================================  ===========================================
module                                             contents
=================================================  ===========================================
:mod:`reference_layers.matching.spectral`          :func:`spectral_matching_layer`
:mod:`reference_layers.matching.smac`              :func:`smac_layer`, constraint helpers
:mod:`reference_layers.matching.power_iteration`   :func:`power_iteration_layer`
:mod:`reference_layers.matching.sinkhorn`          :func:`sinkhorn`, :func:`sinkhorn_layer`
:mod:`reference_layers.matching.assignment`        voting, Hungarian, accuracy
:mod:`reference_layers.matching.affinity`          affinity builders (numba, with VJPs)
:mod:`reference_layers.matching.eigen`             forward eigensolvers (Lanczos, dense)
:mod:`reference_layers.matching.bordered`          structured backward (bordered KKT)
:mod:`reference_layers.matching.errors`            typed errors
=================================================  ===========================================
"""
from .matching import *  # noqa: F401,F403
from .matching import __all__  # noqa: F401
