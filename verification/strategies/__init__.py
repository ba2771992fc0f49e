"""Hypothesis strategies for well-posed (and deliberately ill-posed) instances,
one module per layer (``verification.strategies.core``, ``.qp``, ...)."""
