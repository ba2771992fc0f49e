"""nimplicit: implicitly defined layers in plain NumPy.

A layer is a residual ``F(y, x) = 0`` and any forward solver; its derivatives
(reverse, forward, any order) come from the implicit function theorem with
both Jacobian products taken by autograd.
"""
from . import errors, linear_solvers
from .implicit import ForwardPoint, ImplicitLayer, implicit_layer, record_points

__all__ = ["implicit_layer", "ImplicitLayer", "ForwardPoint", "record_points", "errors",
           "linear_solvers"]
__version__ = "0.1.0"
from .front_ends import anderson, argmin_layer, constrained_argmin_layer, fixed_point_layer

__all__ += ["fixed_point_layer", "argmin_layer", "constrained_argmin_layer", "anderson"]
