"""Typed errors of the graph-matching layers."""
from __future__ import annotations

from nimplicit.errors import NimplicitError, SingularJacobianError, SolverError


class AffinityError(NimplicitError, ValueError):
    """The affinity matrix is not a valid graph-matching affinity (not square,
    not symmetric, negative entries, or all zero)."""


class DegenerateEigenvalueError(SingularJacobianError):
    """The leading eigenvalue is not simple: the eigenvector, and hence its
    derivative, is not unique."""


class InfeasibleConstraintsError(SolverError):
    """``C y = d`` has no solution, or the relaxed problem has no maximizer on it."""


class ConstraintRankError(NimplicitError, ValueError):
    """The constraint rows are linearly dependent (remove the redundant rows)."""

