"""Run the CLI's sweeps on a Dask distributed cluster (the optional ``distributed`` extra).

``nimplicit-gradcheck --scheduler ADDRESS`` (check, ``--self-test`` and
``export``) submits one task per seeded case to the scheduler at ``ADDRESS``
and gathers the results in the order of the cases, so the table, the verdict
and the ``--json`` output are the same as a local run's.  Dask is imported only
here and only when ``--scheduler`` is given::

    pip install ".[distributed]"
    dask scheduler                                  # on one machine
    dask worker tcp://SCHEDULER:8786 --nthreads 1   # on each worker machine
    nimplicit-gradcheck --self-test --scheduler tcp://SCHEDULER:8786

Every worker needs nimplicit installed (the same version) and, for
``--target``, the user's module importable.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from nimplicit.errors import NimplicitError


class DistributedUnavailable(NimplicitError, ImportError):
    """``--scheduler`` was given but dask.distributed is not installed."""


def require_distributed():
    """The ``distributed`` module, or :class:`DistributedUnavailable` with the install command."""
    try:
        import distributed
    except ImportError:
        raise DistributedUnavailable(
            "--scheduler needs Dask distributed, which is not installed: "
            "pip install 'nimplicit[distributed]' (or pip install 'dask[distributed]')") from None
    return distributed


def run_on_cluster(worker: Callable[[Dict[str, Any]], Dict[str, Any]], jobs: List[Dict[str, Any]],
                   address: Any, on_result: Optional[Callable[[Dict[str, Any]], None]] = None
                   ) -> List[Dict[str, Any]]:
    """``[worker(job) for job in jobs]``, each call a task on the cluster at ``address``.

    Parameters
    ----------
    worker : a module-level function (it is pickled by reference).
    jobs : picklable dicts, one per case.
    address : the scheduler's address (``"tcp://host:8786"``) or a running
        cluster object such as ``distributed.LocalCluster``.
    on_result : called with each result as it arrives (progress).

    Returns
    -------
    The results in the order of ``jobs``.
    """
    distributed = require_distributed()
    client = distributed.Client(address)
    try:
        futures = [client.submit(worker, job, pure=False) for job in jobs]
        index = {f.key: i for i, f in enumerate(futures)}
        results: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
        for future in distributed.as_completed(futures):
            res = future.result()
            results[index[future.key]] = res
            if on_result is not None:
                on_result(res)
        return results   # type: ignore[return-value]
    finally:
        client.close()


def _export_one(job: Dict[str, Any]) -> Dict[str, Any]:
    """One case of an export, written to its own file (runs on a worker)."""
    from .oracle import export
    kwargs = {"cases": 1, "seed": job["seed"], "n_directions": job["n_directions"]}
    if job.get("size"):
        kwargs["size"] = job["size"]
    export(job["layer"], job["path"], **kwargs)
    with np.load(job["path"], allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    os.remove(job["path"])
    return {"layer": job["layer"], "seed": job["seed"], "arrays": arrays}


def merge_exports(parts: List[Dict[str, Any]], path: str) -> Dict[str, Any]:
    """Merge one-case oracle files (as dicts of arrays) into one file at ``path``.

    Case ``c`` of the result is the only case of ``parts[c]``; the header is the
    first part's with the cases of all parts, so the file equals what one local
    ``export`` with the same seeds writes (up to the ``created`` time stamp).
    """
    header: Optional[Dict[str, Any]] = None
    arrays: Dict[str, np.ndarray] = {}
    for c, part in enumerate(parts):
        h = json.loads(str(part["arrays"]["header"]))
        if header is None:
            header, cases = h, []
        elif h.get("argnums") != header.get("argnums"):
            raise NimplicitError(f"the differentiated inputs differ between cases: "
                                 f"{h.get('argnums')} vs {header.get('argnums')}")
        cases.append(h["cases"][0])
        for key, value in part["arrays"].items():
            if key.startswith("case0/"):
                arrays[f"case{c}/" + key[len("case0/"):]] = value
    assert header is not None
    header["cases"] = cases
    arrays["header"] = np.array(json.dumps(header))
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return header


def export_on_cluster(layer: str, path: str, address: Any, *, cases: int, seed: int,
                      n_directions: int, size: Optional[dict] = None) -> Dict[str, Any]:
    """``verification.oracle.export`` with its cases run as tasks on the cluster.

    Each task exports one case (seed ``seed + c``) to a temporary file on its
    worker and returns the arrays; they are merged here into ``path``.  The
    temporary directory must be writable on the workers.
    """
    tmp = tempfile.gettempdir()
    jobs = [{"layer": layer, "seed": seed + c, "n_directions": n_directions, "size": size or {},
             "path": os.path.join(tmp, f"nimplicit-export-{os.getpid()}-{seed + c}.npz")}
            for c in range(cases)]
    parts = run_on_cluster(_export_one, jobs, address)
    return merge_exports(parts, path)
