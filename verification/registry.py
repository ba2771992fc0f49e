"""The registry of checkable layers.

Each :class:`Entry` names a differentiable function, a seeded generator of
well-posed instances and the tolerances it is checked at.  The CLI
(``nimplicit-gradcheck``), the oracle export and the self-test iterate over it.
Entries live in ``verification/entries/<layer>.py`` (one module per layer, each
calling :func:`register` at import); :func:`load_all` imports them all.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Union


@dataclass
class Entry:
    """A checkable layer.

    Attributes
    ----------
    name : unique name used by ``--layer`` (e.g. ``"qp"``, ``"qp-batched"``).
    fn : ``fn(*inputs) -> array or tuple of arrays``, differentiable by autograd
        in every input listed in ``argnums``.  For outputs defined only up to a
        convention (an eigenvector's sign) ``fn`` returns a function of them
        that is invariant to the convention, or documents the convention.
    generate : ``generate(rng, **size) -> tuple of inputs`` of a well-posed
        instance; ``rng`` is a ``numpy.random.Generator`` (seeded by the caller).
    size : default keyword arguments for ``generate`` (size, conditioning...).
    argnums : indices of the inputs to differentiate (default: every float input).
    order : highest derivative order the entry supports (1 or 2).
    rtol, atol : explicit tolerances; ``None`` means derived from the
        finite-difference error estimate.
    cases : number of default cases the CLI checks.
    description : one line for ``--list``.
    fd_step : optional base step for finite differences.
    noise : relative accuracy of ``fn``'s output when it is worse than the
        checker's default (``verification.check.NOISE``, 64 eps), e.g. for a
        forward solver that stops at a tolerance; ``None`` for the default.
    conventions : conventions of the inputs and outputs, recorded in exported
        oracle files and printed by ``compare``: a dict with (where they apply)
        ``inputs`` / ``outputs`` (lists of ``{"name", "shape", ...}`` in argument
        order), ``constraints``, ``duals``, ``symmetric_inputs`` (indices of
        inputs whose symmetric part alone enters: their tangents and VJPs are
        exported symmetric), ``batch``, ``sign``, ``normalization``,
        ``vertex_order``, ``triangulation``, ``recommended_rtol`` and
        ``recommended_rtol_reason`` (the comparison tolerance an accurate peer
        meets, and why).  A plain string is accepted as ``{"notes": text}``.
    variants : alternative forms of ``fn`` (same inputs) exported with
        ``export(..., variant=name)``, e.g. ``"primal"`` for a QP's ``y`` alone.
    variant_conventions : per variant, conventions that replace the entry's keys.
    """
    name: str
    fn: Callable[..., Any]
    generate: Callable[..., tuple]
    size: Dict[str, Any] = field(default_factory=dict)
    argnums: Optional[Sequence[int]] = None
    order: int = 2
    rtol: Optional[float] = None
    atol: Optional[float] = None
    cases: int = 3
    description: str = ""
    fd_step: Optional[float] = None
    noise: Optional[float] = None
    conventions: Union[Dict[str, Any], str] = field(default_factory=dict)
    variants: Dict[str, Callable[..., Any]] = field(default_factory=dict)
    variant_conventions: Dict[str, Dict[str, Any]] = field(default_factory=dict)


ENTRIES: Dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    """Add ``entry`` to the registry (names are unique)."""
    if entry.name in ENTRIES and ENTRIES[entry.name] is not entry:
        raise ValueError(f"a layer named {entry.name!r} is already registered")
    ENTRIES[entry.name] = entry
    return entry


def load_all() -> Dict[str, Entry]:
    """Import every module of ``verification.entries`` and return the registry."""
    from . import entries
    for info in pkgutil.iter_modules(entries.__path__):
        importlib.import_module(f"{entries.__name__}.{info.name}")
    return ENTRIES


def get(name: str) -> Entry:
    load_all()
    try:
        return ENTRIES[name]
    except KeyError:
        raise KeyError(f"no registered layer {name!r}; registered: {sorted(ENTRIES)}") from None
