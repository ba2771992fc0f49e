"""nimplicit: implicitly defined layers in plain NumPy.

A layer is a residual ``F(y, x) = 0`` and any forward solver; its derivatives
(reverse, forward, any order) come from the implicit function theorem with
both Jacobian products taken by autograd.
"""
from . import errors, linear_solvers
from .implicit import ImplicitLayer, implicit_layer

__all__ = ["implicit_layer", "ImplicitLayer", "errors", "linear_solvers"]
__version__ = "0.1.0"
