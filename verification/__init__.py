"""Verification of implicit layers: finite differences you can trust,
``check_grad`` (VJPs, JVPs and second order against finite differences),
``diagnose`` (is the implicit gradient well posed here?), the registry of
checkable layers, oracle vectors, and the mutation self-test of the checker.
"""
from .check import GradCheckReport, GradientMismatch, check_grad
from .diagnose import Diagnosis, diagnose

__all__ = ["check_grad", "GradCheckReport", "GradientMismatch", "diagnose", "Diagnosis"]
