"""Typed errors of the graph-matching layers.

:class:`DegenerateEigenvalueError` is the one class of :mod:`nimplicit.spectral`
(shared with NCut).  Option errors are the core's :class:`~nimplicit.errors.OptionError`
(both ``TypeError`` and ``ValueError``), so callers catching the builtin kinds keep working.
"""
from __future__ import annotations

from nimplicit.errors import NimplicitError, OptionError, SolverError
from nimplicit.spectral import DegenerateEigenvalueError

__all__ = ["AffinityError", "DegenerateEigenvalueError", "InfeasibleConstraintsError",
           "ConstraintRankError", "UnknownOptionError", "InvalidOptionError"]


class AffinityError(NimplicitError, ValueError):
    """The affinity matrix is not a valid graph-matching affinity (not square,
    not real, not symmetric, negative entries, or all zero)."""


class InfeasibleConstraintsError(SolverError):
    """``C y = d`` has no solution, or the relaxed problem has no maximizer on it."""


class ConstraintRankError(NimplicitError, ValueError):
    """The constraints leave no freedom (rank ``C`` >= number of unknowns)."""


class UnknownOptionError(OptionError):
    """An option dictionary has a key the layer does not know (a ``TypeError``)."""


class InvalidOptionError(OptionError):
    """An option has a value outside its domain (unknown enum value, NaN, <= 0, ...;
    a ``ValueError``)."""
