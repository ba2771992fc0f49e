"""A pytest helper for other projects: check a layer against a nimplicit oracle file.

    from verification.testing import assert_matches_oracle

    def test_my_qp_layer():
        assert_matches_oracle("qp.npz", my_torch_qp, framework="torch")
"""
from __future__ import annotations

from typing import Callable, Optional

from .oracle import OracleReport, compare


def assert_matches_oracle(path: str, fn: Callable, *, vjp: Optional[Callable] = None,
                          jvp: Optional[Callable] = None, framework: Optional[str] = None,
                          rtol: Optional[float] = None) -> OracleReport:
    """Compare ``fn`` with the oracle file at ``path`` and raise ``AssertionError``
    with the per-quantity report when it disagrees.

    ``fn`` follows the wrapper protocol of :mod:`verification.oracle` (NumPy in and
    out, optional ``vjp``/``jvp``), or is a function of torch tensors / JAX arrays
    with ``framework="torch"`` / ``"jax"``.  ``rtol`` defaults to the file's
    recommended tolerance.  The file's stored values are re-verified first
    (an untrustworthy file raises :class:`verification.oracle.OracleVerificationError`).
    Returns the report.
    """
    report = compare(path, fn, vjp, jvp, rtol=rtol, framework=framework)
    if not report.passed:
        raise AssertionError(f"{path}: the implementation disagrees with the oracle\n"
                             f"{report.summary()}")
    return report
