"""The numba kernels of the reference layers (compiled on first use, cached)."""
import numpy as np


def kernel_f64(x) -> np.ndarray:
    """``x`` as a C-contiguous, writeable float64 array (no copy when it is one).

    A read-only input (e.g. an unbatched layer's ``broadcast_to`` view, which
    ``ascontiguousarray`` passes through) is copied: numba types read-only arrays
    apart and would compile every kernel once more for them."""
    a = np.ascontiguousarray(x, dtype=np.float64)
    return a if a.flags.writeable else a.copy()
