"""The processes of a data-parallel job and what they exchange: MPI (mpi4py) on the CPU, NCCL between GPUs.

One process per worker, started by ``mpirun -n R`` (or ``srun``). ``init()``
joins the job; ``rank()`` is this process's number, ``world_size()`` the
number of processes (0 and 1 when ``init()`` was never called, so every
function here is a no-op in an ordinary run). Arrays are exchanged in place:

    all_reduce_sum(a)   every process ends with the element-wise sum over all processes
    broadcast(a)        every process ends with rank 0's values

NumPy arrays go through MPI (``Allreduce``/``Bcast`` on the array's buffer,
no pickling). Under ``--backend cupy`` each process takes one GPU (its rank
on the node, modulo the GPUs there) and CuPy arrays go through NCCL: rank 0
creates the NCCL id and broadcasts it over MPI, then every process joins the
NCCL communicator. (The NCCL path is written to NCCL's documented API but was
not run on GPUs here.)

mpi4py is optional: ``import scratchseg`` works without it, and the first
function that needs it raises ``DistributedError`` naming the extra to install.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import numpy

from .. import backend

__all__ = ["DistributedError", "init", "is_initialized", "rank", "world_size", "is_main", "all_reduce_sum",
           "broadcast", "broadcast_object", "all_gather_scalar", "abort", "abort_on_error", "launcher_world_size"]

INSTALL_HINT = 'pip install "scratchseg[mpi]"  (from a checkout: pip install ".[mpi]")'

_state = {"comm": None, "nccl": None}


class DistributedError(RuntimeError):
    """Distributed training cannot start (no mpi4py, a resume with another number of processes, ...)."""


def _mpi():
    try:
        from mpi4py import MPI  # importing it initialises MPI
    except ImportError as exc:
        raise DistributedError(f"distributed training needs mpi4py and an MPI library: {INSTALL_HINT} "
                               f"(import failed: {exc})") from None
    return MPI


def init():
    """Join the job started by ``mpirun``/``srun`` (a single process without one); returns the world size.

    Calling it again does nothing. Under the CuPy backend it also picks this
    process's GPU and opens the NCCL communicator.
    """
    if _state["comm"] is None:
        comm = _mpi().COMM_WORLD
        _state["comm"] = comm
        if backend.current() == "cupy" and comm.size > 1:
            _state["nccl"] = _open_nccl(comm)
    return _state["comm"].size


def is_initialized():
    return _state["comm"] is not None


def rank():
    """This process's number, 0 to ``world_size() - 1`` (0 before ``init()``)."""
    return _state["comm"].rank if _state["comm"] is not None else 0


def world_size():
    """The number of processes (1 before ``init()``)."""
    return _state["comm"].size if _state["comm"] is not None else 1


def is_main():
    """True on rank 0, the one process that writes files and prints."""
    return rank() == 0


def launcher_world_size():
    """The number of processes a launcher (mpirun of MPICH or Open MPI, srun) says it started; 1 if none."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


# ------------------------------------------------------------------ exchanges
def all_reduce_sum(array):
    """Sum ``array`` element-wise over all processes, in place (it must be contiguous); returns it."""
    comm = _state["comm"]
    if comm is None or comm.size == 1:
        return array
    if not array.flags.c_contiguous:
        raise ValueError("all_reduce_sum needs a contiguous array")
    if _state["nccl"] is not None and not isinstance(array, numpy.ndarray):
        _nccl_call("allReduce", array)
    else:
        comm.Allreduce(_mpi().IN_PLACE, array, op=_mpi().SUM)
    return array


def broadcast(array, root=0):
    """Overwrite ``array`` on every process with ``root``'s, in place; returns it."""
    comm = _state["comm"]
    if comm is None or comm.size == 1:
        return array
    if _state["nccl"] is not None and not isinstance(array, numpy.ndarray):
        _nccl_call("bcast", array, root)
    else:
        comm.Bcast(array, root=root)
    return array


def broadcast_object(value, root=0):
    """``root``'s ``value`` (any picklable object) on every process."""
    comm = _state["comm"]
    return value if comm is None or comm.size == 1 else comm.bcast(value, root=root)


def all_gather_scalar(value):
    """``[value of rank 0, value of rank 1, ...]`` on every process (``[value]`` when alone)."""
    comm = _state["comm"]
    if comm is None or comm.size == 1:
        return [float(value)]
    out = numpy.empty(comm.size, dtype=numpy.float64)
    comm.Allgather(numpy.array([value], dtype=numpy.float64), out)
    return [float(v) for v in out]


# ------------------------------------------------------------------ failures
def abort(message, code=1):
    """Print ``message`` naming this rank, then end every process of the job (``MPI_Abort``): no rank hangs."""
    sys.stderr.write(f"error on rank {rank()} of {world_size()}: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    comm = _state["comm"]
    if comm is not None and comm.size > 1:
        time.sleep(0.5)  # let the launcher forward the message before MPI_Abort tears the job down
        comm.Abort(code)
    raise SystemExit(code)


class abort_on_error:
    """``with abort_on_error(collective=(...)):`` -- in a job of several processes, an exception raised by one
    of them ends the whole job with its message (the others would otherwise wait forever at the next exchange).

    Exceptions in ``collective`` are raised by every process at the same point (Ctrl-C agreed at the
    gradient exchange, a loss gathered from all ranks): they propagate normally.
    """

    def __init__(self, collective=()):
        self.collective = tuple(collective)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or world_size() == 1 or isinstance(exc, self.collective):
            return False
        if os.environ.get("SCRATCHSEG_DEBUG"):
            traceback.print_exception(exc_type, exc, tb)
        abort(f"{type(exc).__name__}: {exc}", code=2 if isinstance(exc, (ValueError, DistributedError)) else 1)
        return False  # pragma: no cover - abort does not return


# ------------------------------------------------------------------ NCCL (GPUs)
def _open_nccl(comm):
    """One GPU per process (its rank on this node); an NCCL communicator over all processes."""
    import cupy
    from cupy.cuda import nccl

    local_rank = comm.Split_type(_mpi().COMM_TYPE_SHARED).rank
    cupy.cuda.Device(local_rank % cupy.cuda.runtime.getDeviceCount()).use()
    uid = nccl.get_unique_id() if comm.rank == 0 else None
    uid = comm.bcast(uid, root=0)  # the id travels over MPI; the data then goes GPU to GPU
    return nccl.NcclCommunicator(comm.size, uid, comm.rank)


def _nccl_call(op, array, root=0):
    import cupy
    from cupy.cuda import nccl

    types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64, "float16": nccl.NCCL_FLOAT16,
             "int64": nccl.NCCL_INT64, "int32": nccl.NCCL_INT32}
    kind = types[str(array.dtype)]
    stream = cupy.cuda.get_current_stream().ptr
    if op == "allReduce":
        _state["nccl"].allReduce(array.data.ptr, array.data.ptr, array.size, kind, nccl.NCCL_SUM, stream)
    else:
        _state["nccl"].bcast(array.data.ptr, array.size, kind, root, stream)
