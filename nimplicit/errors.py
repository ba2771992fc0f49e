"""The typed errors of nimplicit.

Every failure the framework detects is raised loudly, as a subclass of
:class:`NimplicitError`, with a message that says what went wrong, the numbers
that show it, and what to do about it.  Nothing is ever returned as a silent
NaN.  Errors that callers commonly catch by their builtin kind also derive from
it (``ShapeError`` is a ``ValueError``, ``UnsupportedError`` a
``NotImplementedError``).
"""
from __future__ import annotations

import warnings


class NimplicitError(Exception):
    """Base class of every error raised by nimplicit and its reference layers."""


class ShapeError(NimplicitError, ValueError):
    """Arrays of incompatible sizes: e.g. a residual with a different number
    of entries than the output of the solver it is meant to vanish at."""


class NonFiniteError(NimplicitError, ValueError):
    """NaN or Inf in an input, in the solver's output, or in a cotangent."""


class ResidualError(NimplicitError):
    """The residual F(y*, x) is not small at the solver's output y*: the solver
    and the residual disagree, or the solver stopped early."""


class SolverError(NimplicitError):
    """The forward solver failed (did not converge, infeasible problem, ...)."""


class NotConvergedError(SolverError):
    """An iterative forward solver hit its iteration limit."""


class SingularJacobianError(NimplicitError):
    """J_{F,y} at the solution is singular or too ill-conditioned for the
    implicit function theorem to give a trustworthy derivative."""


class LinearSolveError(NimplicitError):
    """A (Krylov) linear solve of the backward or forward-mode pass did not
    reach its tolerance."""


class UnsupportedError(NimplicitError, NotImplementedError):
    """A combination of options that nimplicit does not implement."""


class ImplicitGradientWarning(UserWarning):
    """The implicit gradient is well defined only up to a convention here
    (e.g. a minimum-norm choice at a weakly active constraint)."""


def warn(message: str) -> None:
    """Issue an :class:`ImplicitGradientWarning` pointing at the user's code."""
    warnings.warn(message, ImplicitGradientWarning, stacklevel=3)


def finite_or_raise(value, what: str) -> None:
    """Raise :class:`NonFiniteError` when ``value`` (an array or a tuple of
    arrays) contains NaN or Inf; ``what`` names it in the message."""
    import numpy as onp

    parts = value if isinstance(value, (tuple, list)) else (value,)
    for k, part in enumerate(parts):
        arr = onp.asarray(part)
        if arr.dtype.kind not in "fc":
            continue
        with onp.errstate(over="ignore", invalid="ignore"):
            if onp.isfinite(arr.sum()):   # one pass, no temporary; overflow falls through
                continue
        bad = ~onp.isfinite(arr)
        if bad.any():
            where = f" (component {k})" if len(parts) > 1 else ""
            first = tuple(int(i) for i in onp.argwhere(bad)[0]) if arr.ndim else ()
            raise NonFiniteError(
                f"{what}{where} contains {int(bad.sum())} non-finite value(s) "
                f"(NaN or Inf), the first at index {first}. Check the data fed to "
                f"the layer, or the solver that produced it."
            )


class OptionError(NimplicitError, TypeError, ValueError):
    """An unknown option, or an option with an invalid value, given to a
    nimplicit function, layer or linear solver; the message lists the allowed ones."""


class DTypeError(NimplicitError, TypeError):
    """An input of a dtype nimplicit does not differentiate: complex, object,
    float16, or an integer array given to a differentiated argument."""


class CouplingError(NimplicitError):
    """``batch_axis`` promises independent instances, but the residual couples them:
    a perturbation of one instance changes the residual of another."""


def where(batch_index, batched: bool = True) -> str:
    """The text ``" (batch instance k)"`` for messages, or ``""`` when not batched."""
    if not batched or batch_index is None:
        return ""
    return f" (batch instance {int(batch_index)})"


# ------------------------------------------------------------------------------
# the keyword convention of the reference layers (issue 12 item 4)
# ------------------------------------------------------------------------------

BACKWARDS = ("structured", "generic")


def check_options(options, allowed: dict, what: str) -> dict:
    """``{**allowed, **options}`` after checking that ``options`` (a dict or None)
    has only keys of ``allowed`` (a dict of defaults); :class:`OptionError` otherwise."""
    if options is None:
        return dict(allowed)
    if not isinstance(options, dict):
        raise OptionError(f"{what} must be a dict or None, got {type(options).__name__}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise OptionError(f"{what} got unknown key(s) {unknown}; allowed: "
                          f"{sorted(allowed) if allowed else 'none'}")
    return {**allowed, **options}


def check_backward(backward: str, layer: str, *, structured: bool = True) -> str:
    """Validate ``backward`` ("structured" | "generic"; "fast" is a deprecated alias)."""
    if backward == "fast":
        warnings.warn(f"{layer}: backward='fast' is deprecated, use backward='structured'",
                      DeprecationWarning, stacklevel=3)
        backward = "structured"
    if backward not in BACKWARDS:
        raise OptionError(f"{layer}: backward must be one of {BACKWARDS}, got {backward!r}")
    if backward == "structured" and not structured:
        raise OptionError(f"{layer} has no structured backward; use backward='generic'")
    return backward


def renamed(old: str, new: str, layer: str, value):
    """Warn that keyword ``old`` is deprecated in favour of ``new``; return ``value``."""
    warnings.warn(f"{layer}: the keyword {old!r} is deprecated, use {new} instead",
                  DeprecationWarning, stacklevel=3)
    return value
