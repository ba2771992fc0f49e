"""Fixtures of the test suite.

The helper functions live in :mod:`helpers` (``tests/helpers.py``); the names
below are re-exported for test files that still do ``from conftest import ...``
(deprecated: import from ``helpers``).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import (FD_STEP, assert_close, assert_grad_matches_fd, fd_directional,  # noqa: E402,F401
                     fd_grad, fd_jacobian, newton_solve, random_direction, rel_err, vdot)
