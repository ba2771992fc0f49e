"""Flattening of a layer's output (an array or a tuple of arrays) to one vector.

The implicit node works on ``y`` as one flat vector per instance: shape
``(m,)``, or ``(B, m)`` for a batch of ``B`` independent instances whose batch
axis is ``batch_axis`` in every component.  Both directions are written with
autograd-traceable operations, so derivatives flow through them.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import autograd.numpy as np
import numpy as onp

from .errors import OptionError, ShapeError


def _check_batch_axis(batch_axis, what: str) -> Optional[int]:
    """``batch_axis`` as an ``int`` (or ``None``); :class:`OptionError` for a
    non-integer (``1.5``, ``"0"``, ``True``: a bool is not an axis)."""
    if batch_axis is None:
        return None
    if isinstance(batch_axis, (bool, onp.bool_)) or not isinstance(batch_axis, (int, onp.integer)):
        raise OptionError(f"batch_axis must be None or an integer axis of {what}, got "
                          f"{batch_axis!r} of type {type(batch_axis).__name__}")
    return int(batch_axis)


class Structure:
    """The shapes of an array or tuple of arrays, and how to (un)flatten it.

    Parameters
    ----------
    value : array_like or tuple of array_like
        An example value (raw numbers) that fixes the structure.
    batch_axis : int or None
        The axis of every component that indexes independent instances.
    what : str
        Name used in error messages ("the solver's output", "the residual").
    """

    def __init__(self, value, batch_axis: Optional[int] = None, what: str = "value"):
        self.is_tuple = isinstance(value, (tuple, list))
        parts = [onp.asarray(p) for p in (value if self.is_tuple else (value,))]
        if not parts:
            raise ShapeError(f"{what} is an empty tuple; it must hold at least one array")
        self.batch_axis = _check_batch_axis(batch_axis, what)
        self.batch_size = None
        self.shapes = []
        for k, p in enumerate(parts):
            if self.batch_axis is None:
                self.shapes.append(p.shape)
                continue
            if p.ndim == 0:
                raise ShapeError(f"{what} (component {k}) is a scalar but batch_axis={batch_axis} "
                                 f"asks for a batch axis in every component")
            if not -p.ndim <= batch_axis < p.ndim:
                raise ShapeError(f"{what} (component {k}) has ndim {p.ndim} (shape {p.shape}), so "
                                 f"batch_axis={batch_axis} is out of range: it must lie in "
                                 f"[{-p.ndim}, {p.ndim - 1}]")
            ax = batch_axis % p.ndim
            if self.batch_size is None:
                self.batch_size = p.shape[ax]
            elif p.shape[ax] != self.batch_size:
                raise ShapeError(f"{what} (component {k}) has {p.shape[ax]} instances along "
                                 f"batch_axis={batch_axis}, component 0 has {self.batch_size}")
            self.shapes.append(onp.delete(onp.array(p.shape), ax).tolist())
        # math.prod / accumulate: the same numbers as onp.prod / onp.cumsum, without
        # their per-call overhead (a Structure is built twice per forward point)
        self.sizes = [int(math.prod(s)) for s in self.shapes]
        self.size = sum(self.sizes)
        self.offsets = onp.array([0, *itertools.accumulate(self.sizes)], dtype=int)

    def flatten(self, value):
        """``(m,)`` vector (or ``(B, m)``) holding the entries of ``value``."""
        parts = value if self.is_tuple else (value,)
        if self.batch_axis is None:
            # no-op reshapes are skipped: each would be one more autograd node per product
            pieces = [p if np.ndim(p) == 1 else np.reshape(p, (-1,)) for p in parts]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        pieces = [p if (np.ndim(p) == 2 and self.batch_axis % 2 == 0) else
                  np.reshape(np.moveaxis(p, self.batch_axis, 0), (self.batch_size, -1)) for p in parts]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)

    def unflatten(self, flat):
        """Inverse of :meth:`flatten`."""
        parts = []
        for k, shape in enumerate(self.shapes):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            if self.batch_axis is None:
                piece = flat if len(self.shapes) == 1 else flat[lo:hi]
                parts.append(piece if len(shape) == 1 else np.reshape(piece, tuple(shape)))
            else:
                piece = flat if len(self.shapes) == 1 else flat[:, lo:hi]
                if len(shape) != 1:
                    piece = np.reshape(piece, (self.batch_size,) + tuple(shape))
                parts.append(np.moveaxis(piece, 0, self.batch_axis % (len(shape) + 1)))
        return tuple(parts) if self.is_tuple else parts[0]


def substitute(args, positions, values) -> list:
    """``list(args)`` with ``args[positions[i]]`` replaced by ``values[i]``.

    The one helper for "differentiate with respect to some arguments only":
    ``f_of(sel) = f(*substitute(args, argnums, sel))``.
    """
    full = list(args)
    for i, v in zip(positions, values):
        full[i] = v
    return full
