"""Hypothesis strategies for the core's registered layers.

``well_posed(name)`` draws a seed and generator parameters (size, conditioning)
inside the well-posed range of the entry and returns ``(entry, inputs)``; for
every such draw the gradient check must pass.  ``ill_posed(name)`` draws
instances at or past the edge (a point at the rim of the circle, a non-contractive
equilibrium map, points far in the tails of the robust penalty, a weakly active
simplex constraint): the layer must then raise a typed error
(:class:`nimplicit.errors.NimplicitError`) or ``verification.diagnose`` must flag
the instance — never return a silent NaN.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as onp
from hypothesis import strategies as st

from ..entries import core as _core   # noqa: F401  (registers the entries)
from ..registry import Entry, get

SEEDS = st.integers(min_value=0, max_value=2 ** 32 - 1)

#: generator parameters of well-posed instances, per registered name
WELL_POSED: Dict[str, Dict[str, st.SearchStrategy]] = {
    "sphere-height": {"n": st.integers(1, 6), "height": st.floats(0.2, 1.0)},
    "paper-example1": {"low": st.floats(0.6, 1.0), "high": st.floats(1.1, 1.8)},
    "deq-tanh": {"n": st.integers(1, 7), "contraction": st.floats(0.0, 0.8)},
    "deq-tanh-gmres": {"n": st.integers(1, 7), "contraction": st.floats(0.0, 0.8)},
    "robust-pool": {"n": st.integers(2, 10), "d": st.integers(1, 3), "alpha": st.floats(0.3, 3.0),
                    "outliers": st.integers(0, 2)},
    "simplex-projection": {"n": st.integers(2, 7), "scale": st.floats(0.1, 10.0),
                           "margin": st.just(0.05)},
    "deq-tanh-batched": {"batch": st.integers(1, 4), "n": st.integers(1, 4),
                         "contraction": st.floats(0.0, 0.8)},
}


@st.composite
def instances(draw, name: str, **params: st.SearchStrategy) -> Tuple[Entry, tuple]:
    """``(entry, inputs)`` from the entry's generator with drawn keyword parameters."""
    entry = get(name)
    size = dict(entry.size)
    size.update({k: draw(v) for k, v in params.items()})
    rng = onp.random.default_rng(draw(SEEDS))
    return entry, tuple(entry.generate(rng, **size))


def well_posed(name: str) -> st.SearchStrategy:
    """Well-posed instances of the registered core layer ``name``."""
    return instances(name, **WELL_POSED[name])


@st.composite
def _simplex_weakly_active(draw):
    """A simplex instance with one constraint weakly active: an entry ``x_j = tau``
    (it gets ``y_j = 0`` and ``nu_j = 0``; ``tau`` is unchanged by it)."""
    entry = get("simplex-projection")
    rng = onp.random.default_rng(draw(SEEDS))
    n = draw(st.integers(3, 7))
    for _ in range(100):
        x = rng.standard_normal(n)
        tau = _core.simplex_tau(x)
        inactive = onp.flatnonzero(x < tau)
        if inactive.size:
            x[inactive[0]] = tau
            return entry, (x,)
    raise AssertionError("no inactive entry in 100 draws")


@st.composite
def _deq_not_contractive(draw, name: str = "deq-tanh"):
    """``W = c I`` with ``c >= 1`` and ``x = b = 0``: ``y = 0`` is a fixed point at
    which ``I - dT/dy = (1 - c) I`` is singular (``c = 1``) or the map expands
    (``c > 1``: other fixed points exist, the layer's output is not unique)."""
    entry = get(name)
    n = draw(st.integers(1, 5))
    c = draw(st.one_of(st.just(1.0), st.floats(1.5, 5.0)))
    return entry, (onp.zeros(n), c * onp.eye(n), onp.zeros(n))


ILL_POSED: Dict[str, Any] = {
    # y2 -> 0 at x = 1/sqrt(2 - sqrt(3)) ~ 1.9319 (and at its reciprocal)
    "paper-example1": lambda: instances("paper-example1", low=st.just(1.9318516525781366),
                                        high=st.just(1.9318516525781366)),
    "sphere-height": lambda: instances("sphere-height", n=st.integers(1, 5),
                                         height=st.sampled_from([0.0, 1e-7, 3e-8])),
    "deq-tanh": lambda: _deq_not_contractive("deq-tanh"),
    "deq-tanh-gmres": lambda: _deq_not_contractive("deq-tanh-gmres"),
    "robust-pool": lambda: instances("robust-pool", n=st.sampled_from([2, 4, 6]), d=st.integers(1, 2),
                                     alpha=st.sampled_from([1e-6, 1e-7]), outliers=st.just(0)),
    # (an even number of points: the minimiser lies between the two middle ones,
    # every point far out in the linear tails)
    "simplex-projection": _simplex_weakly_active,
}


def ill_posed(name: str) -> st.SearchStrategy:
    """Instances of ``name`` where the implicit gradient is ill-posed or undefined."""
    return ILL_POSED[name]()
