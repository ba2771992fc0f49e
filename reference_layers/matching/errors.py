"""Typed errors of the graph-matching layers.

:class:`DegenerateEigenvalueError` is the one class of :mod:`nimplicit.spectral`
(shared with NCut).  Option errors are the core's :class:`~nimplicit.errors.UnknownOptionError` and
:class:`~nimplicit.errors.InvalidOptionError` (subclasses of
:class:`~nimplicit.errors.OptionError`, both ``TypeError`` and ``ValueError``),
re-exported here under the same names.
"""
from __future__ import annotations

# the option errors are the core's classes, re-exported under their old names here
from nimplicit.errors import InvalidOptionError, NimplicitError, SolverError, UnknownOptionError
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
