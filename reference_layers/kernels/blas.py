"""SciPy's BLAS/LAPACK called from numba kernels (``dsymv``, ``dgemv``, ``dsyev``).

The Fortran routines of :mod:`scipy.linalg.cython_blas` and
:mod:`scipy.linalg.cython_lapack` are registered once, at import, as named
LLVM symbols (``llvmlite.binding.add_symbol``: reading a capsule, no
compilation) and declared to numba as external functions, so that the kernels
calling them stay cacheable (``cache=True``; a ctypes function pointer would
not be) and compile faster than numba's own ``np.linalg.eigh``.

All wrappers take C-contiguous float64 arrays.  A C-contiguous ``A`` is the
Fortran array ``A'``: ``symv`` reads the upper triangle of ``A`` only (so it
is ``A @ x`` exactly when ``A`` is exactly symmetric), ``gemv`` computes
``A @ x`` (Fortran ``'T'`` on ``A'``).
"""
from __future__ import annotations

import llvmlite.binding as _llvm
import numpy as np
from numba import njit, types
from numba.extending import get_cython_function_address

_PTR = types.voidptr


def _external(module: str, name: str, nargs: int):
    symbol = f"nimplicit_scipy_{name}"
    _llvm.add_symbol(symbol, get_cython_function_address(f"scipy.linalg.{module}", name))
    return types.ExternalFunction(symbol, types.void(*([_PTR] * nargs)))


_dsymv = _external("cython_blas", "dsymv", 10)
_dgemv = _external("cython_blas", "dgemv", 11)
_dsyev = _external("cython_lapack", "dsyev", 9)

_L, _N, _T, _V = 76, 78, 84, 86        # ord("L"), ord("N"), ord("T"), ord("V")


@njit(cache=True)
def symv(A, x, y, ibuf, dbuf):  # pragma: no cover - numba
    """``y[:] = A x`` for a symmetric C-contiguous ``(n, n)`` ``A`` from its upper
    triangle (BLAS ``dsymv``).  ``ibuf`` (int32, >= 3) and ``dbuf`` (float64,
    >= 2) are scratch."""
    ibuf[0] = A.shape[0]
    ibuf[1] = 1
    ibuf[2] = _L
    dbuf[0] = 1.0
    dbuf[1] = 0.0
    _dsymv(ibuf[2:].ctypes, ibuf.ctypes, dbuf.ctypes, A.ctypes, ibuf.ctypes, x.ctypes,
           ibuf[1:].ctypes, dbuf[1:].ctypes, y.ctypes, ibuf[1:].ctypes)


@njit(cache=True)
def _gemv(A, x, y, alpha, beta, trans, ibuf, dbuf):  # pragma: no cover - numba
    """BLAS ``dgemv`` on the Fortran array ``A'`` of a C-contiguous ``(m, n)``
    ``A``: ``trans = _T`` gives ``A x``, ``trans = _N`` gives ``A' x``."""
    ibuf[0] = A.shape[1]        # Fortran rows of A'
    ibuf[1] = A.shape[0]        # Fortran columns of A'
    ibuf[2] = 1
    ibuf[3] = trans
    dbuf[0] = alpha
    dbuf[1] = beta
    _dgemv(ibuf[3:].ctypes, ibuf.ctypes, ibuf[1:].ctypes, dbuf.ctypes, A.ctypes, ibuf.ctypes,
           x.ctypes, ibuf[2:].ctypes, dbuf[1:].ctypes, y.ctypes, ibuf[2:].ctypes)


@njit(cache=True)
def gemv(A, x, y, alpha, beta, ibuf, dbuf):  # pragma: no cover - numba
    """``y[:] = alpha A x + beta y`` for a C-contiguous ``(m, n)`` ``A`` (BLAS
    ``dgemv``); ``ibuf`` (int32, >= 4) and ``dbuf`` (float64, >= 2) are scratch."""
    _gemv(A, x, y, alpha, beta, _T, ibuf, dbuf)


@njit(cache=True)
def syev(A, w, work, ibuf):  # pragma: no cover - numba
    """Eigen-decomposition of a symmetric C-contiguous ``(n, n)`` ``A`` in place
    (LAPACK ``dsyev``): eigenvalues ascending in ``w[:n]``, eigenvector ``r`` in
    the row ``A[r]``.  ``work`` (float64, >= 3n - 1) and ``ibuf`` (int32, >= 4)
    are scratch.  Returns LAPACK's ``info`` (0 on success)."""
    ibuf[0] = A.shape[0]
    ibuf[1] = work.shape[0]
    ibuf[2] = _V
    ibuf[3] = _L
    info = np.zeros(1, dtype=np.int32)
    _dsyev(ibuf[2:].ctypes, ibuf[3:].ctypes, ibuf.ctypes, A.ctypes, ibuf.ctypes, w.ctypes,
           work.ctypes, ibuf[1:].ctypes, info.ctypes)
    return info[0]


@njit(cache=True)
def gemv_t(A, x, y, alpha, beta, ibuf, dbuf):  # pragma: no cover - numba
    """``y[:] = alpha A' x + beta y`` for a C-contiguous ``(m, n)`` ``A`` (BLAS
    ``dgemv``, Fortran ``'N'`` on ``A'``); scratch as in :func:`gemv`."""
    _gemv(A, x, y, alpha, beta, _N, ibuf, dbuf)
