"""nimplicit: implicitly defined layers in plain NumPy.

A layer is a residual ``F(y, x) = 0`` and any forward solver; its derivatives
(reverse, forward, any order) come from the implicit function theorem with
both Jacobian products taken by autograd.
"""
from . import errors, linear_solvers
from .implicit import (ForwardPoint, ImplicitLayer, Solution, implicit_layer, intercept_forward,
                       record_points)
from .linear_solvers import LinearSolver, LinearSolverState, Operator
from .batch_status import BatchStatus, Outcome

__all__ = ["implicit_layer", "ImplicitLayer", "ForwardPoint", "Solution", "record_points",
           "intercept_forward", "LinearSolver", "LinearSolverState", "Operator", "errors",
           "linear_solvers", "BatchStatus", "Outcome"]
__version__ = "0.1.0"
from .front_ends import anderson, argmin_layer, constrained_argmin_layer, fixed_point_layer

__all__ += ["fixed_point_layer", "argmin_layer", "constrained_argmin_layer", "anderson"]
