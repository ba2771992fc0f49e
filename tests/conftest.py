"""Fixtures of the test suite.

The helper functions live in :mod:`helpers` (``tests/helpers.py``); the names
below are re-exported, lazily, for test files that still do
``from conftest import ...`` (deprecated: import from ``helpers``).  Lazily, so
that loading conftest imports nothing beyond the standard library: what a
conftest imports at collection time shifts the state hypothesis seeds from.
"""
from __future__ import annotations

import importlib
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

_REEXPORTED = ("FD_STEP", "assert_close", "assert_grad_matches_fd", "fd_directional", "fd_grad",
               "fd_jacobian", "newton_solve", "random_direction", "rel_err", "vdot")


def __getattr__(name: str):
    if name in _REEXPORTED:
        return getattr(importlib.import_module("helpers"), name)
    raise AttributeError(f"module 'conftest' has no attribute {name!r}")
