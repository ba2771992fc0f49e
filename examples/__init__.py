"""The paper's experiments (run them as ``python -m examples.<name>``; all of them with
``python -m examples.run_all``).

Importing this package defaults the BLAS/OpenMP thread counts to one (a caller's
own settings win): on a small shared machine extra BLAS threads oversubscribe the
cores, and the results files are deterministic for a given seed and thread count.
"""
import os as _os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")
