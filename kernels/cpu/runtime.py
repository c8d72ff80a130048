"""How the CPU kernels run: worker threads, parallel Numba kernels with serial twins, BLAS threads, workspaces.

Two kinds of parallelism, each chosen so that waking threads costs less
than it saves:

* **The batch split between worker threads** (``_split``, ``_run``): the
  convolutions run serial, ``nogil`` Numba loops and single-threaded GEMMs,
  each worker on its own contiguous slice of the samples. Coarse on purpose:
  a fine-grained split (a parallel im2col, then a multi-threaded GEMM, per
  block) hands the cores back and forth between two thread pools hundreds of
  times per layer, and each hand-over costs (idle pools spin or must be woken;
  on a loaded machine a worker that lost its core stalls the whole barrier).
  The workers are threads of our own (``workers.Worker``), each moved off
  the CPU of the thread that hands it its share. Small products run inline
  instead, on one thread; one that is large but cannot be split (a single
  sample) runs its GEMMs on the BLAS's own threads.
* **``parallel=True`` Numba kernels** (``prange`` over channels or planes:
  batch norm, max pool, ReLU, Winograd's weight transforms), launched by
  ``_launch``, which runs a serial twin of the kernel for small inputs.

``SCRATCHSEG_NUM_THREADS`` sets the number of workers (default: Numba's
thread count, one per core). ``workspace`` hands out reusable per-thread
scratch arrays, so the blocked kernels allocate nothing per call. What this
needs of the process (NumPy's OpenBLAS found and its thread count capped
during a split) is described in ``kernels/process.py``.
"""

from __future__ import annotations

import ctypes
import os
import threading
import types

import numba
import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit

from .. import process
from . import workers


# ------------------------------------------------------------- BLAS threads
class _OpenBLASThreads:
    """get()/set() the thread count of NumPy's OpenBLAS (found by ``kernels.process``)."""

    def __init__(self, lib, getter, setter):
        self._get, self._set = getattr(lib, getter), getattr(lib, setter)
        self._get.restype = ctypes.c_int

    def get(self):
        return int(self._get())

    def set(self, n):
        self._set(ctypes.c_int(n))

    @classmethod
    def find(cls):
        """The thread control of the OpenBLAS NumPy loaded, or None where there is none."""
        found = process.prepare_cpu_kernels()
        return None if found is None else cls(*found)


_blas_threads = _OpenBLASThreads.find()


# ---------------------------------------------------- the batch split between threads
_local = threading.local()
_split_lock = threading.Lock()
_workers_started = []  # the worker threads (workers.Worker), started as the first split needs them


def _threads():
    """Worker threads for the kernels: SCRATCHSEG_NUM_THREADS, else Numba's thread count."""
    n = os.environ.get("SCRATCHSEG_NUM_THREADS", "").strip()
    return max(1, int(n)) if n else max(1, numba.config.NUMBA_NUM_THREADS)


def _workers(N):
    """How many threads share N samples (1: run inline, with a multi-threaded GEMM)."""
    if _blas_threads is None:  # OpenBLAS threads cannot be capped: no nested parallelism
        return 1
    return min(_threads(), N)


def _start_workers(T):
    """Start worker threads until T - 1 run (the caller is the T-th); hold _split_lock."""
    while len(_workers_started) < T - 1:
        i = len(_workers_started) + 1
        _workers_started.append(workers.Worker(f"scratchseg-kernel-{i}", i, _threads()))


# Inside a split every core is taken: a product a share runs (_together's) is not
# split again, and a parallel kernel it launches runs its serial twin.
_inline = [0]


def _split(N, part):
    """Run ``part(n0, n1)`` on contiguous sample ranges covering [0, N), one per worker thread."""
    T = _workers(N)
    bounds = [N * t // T for t in range(T + 1)]
    with _split_lock:  # one split at a time: callers in several threads queue here
        _park()  # a spinning native worker would take a core from ours
        _start_workers(T)
        previous = _blas_threads.get()
        _blas_threads.set(1)  # each worker's GEMM runs on its own core (NumPy's BLAS is process-wide)
        _inline[0] += 1
        try:
            for t in range(1, T):
                _workers_started[t - 1].post(part, bounds[t], bounds[t + 1])
            try:  # the calling thread takes the first share itself: one thread fewer to wake
                first = part(bounds[0], bounds[1])
            finally:  # every worker's share is finished before the arrays go back to the caller
                rest = [_result(_workers_started[t - 1]) for t in range(1, T)]
            for value, error in rest:
                if error is not None:
                    raise error
            return [first] + [value for value, _ in rest]
        finally:
            _inline[0] -= 1
            _blas_threads.set(previous)


def _park():
    """Native workers (native.py) stop spinning: Numba's, the BLAS's or our split's threads need the cores."""
    from . import native  # which imports this module

    native.park()


def _together(first, second):
    """``first()`` on the calling thread and ``second()`` on a worker at the same time; (first(), second()).

    Two independent products (a convolution's input and weight gradients), each
    on one core over the whole batch, instead of each split in turn between the
    cores: one hand-over between threads instead of two, and GEMMs twice as wide.
    It is a split of two "samples", the two products (inside, each runs inline).
    With one thread (or a BLAS whose threads cannot be capped), one after the other.
    """
    if _workers(2) < 2:
        return first(), second()
    a, b = _split(2, lambda lo, hi: (first, second)[lo]())
    return a, b


def _result(worker):
    try:
        return worker.result(), None
    except BaseException as error:  # raised by _split once every share is done
        return None, error


def _forget_workers():
    """After fork: the child has none of the parent's threads; its first split starts new ones."""
    global _split_lock
    _workers_started.clear()
    _split_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


# A split hands work to other threads and takes it back (about 0.1 ms): a
# product of fewer multiply-adds than this runs inline on the calling thread,
# its GEMMs on that thread alone too: waking the BLAS's own threads costs as much
# as it saves on such a product, and far more on a virtual machine whose CPUs
# went idle (a U-Net step on 16x16 images after 0.3 s of idle: 87-90 ms with
# the BLAS's threads, 50-57 ms without; measurements: benchmarks/NOTES.md).
_SPLIT_MIN_MACS = 8_000_000


def _run(N, part, macs):
    """``part`` over the samples [0, N): split between workers if ``macs`` multiply-adds pay for it,
    else inline; the list of results.

    Inline, a product too small to split runs its GEMMs on one thread; a large
    one that cannot be split (one sample) keeps the BLAS's threads.
    """
    if _inline[0]:  # inside a split (a product of _together's): this thread alone, the BLAS on one thread
        return [part(0, N)]
    if _workers(N) > 1 and macs >= _SPLIT_MIN_MACS:
        return _split(N, part)
    if macs >= _SPLIT_MIN_MACS or _blas_threads is None:
        _park()  # the BLAS's threads may take every core
        return [part(0, N)]
    with _split_lock:  # the BLAS's thread count is process-wide: changed by one caller at a time
        previous = _blas_threads.get()
        if previous > 1:
            _blas_threads.set(1)
        try:
            return [part(0, N)]
        finally:
            if previous > 1:
                _blas_threads.set(previous)


# ----------------------------------------------- parallel kernels, serial twins
# Numba's workqueue threading layer (the default set by kernels/process.py)
# aborts the whole process when two Python threads run parallel=True kernels at
# the same time. Every call into one goes through _launch, which holds this
# lock; each already uses every core.
_PARALLEL_LOCK = threading.Lock()

# Waking Numba's workers costs about 0.1 ms a launch, even for a kernel with
# nothing to do, and these kernels are bound by memory more than by the core:
# below this many elements the serial twin of a kernel (the same code compiled
# without parallel=True, where prange is a plain range) wins
# (measurements: benchmarks/NOTES.md).
_PARALLEL_MIN_WORK = 1 << 20
_SERIAL = {}  # parallel kernel -> its serial twin


def _parallel_njit(**options):
    """``@njit(parallel=True, cache=True, **options)`` that also compiles a serial twin (see ``_launch``).

    The twin is the same Python function under another name: Numba's disk cache
    keys a function by its name, not by its options, so two compilations of one
    name would overwrite each other's cache entries.
    """

    def wrap(f):
        kernel = njit(parallel=True, cache=True, **options)(f)
        twin = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
        twin.__qualname__ = f.__qualname__ + "_serial"
        _SERIAL[kernel] = njit(cache=True, nogil=True, **options)(twin)
        return kernel

    return wrap


def _launch(kernel, work, *args):
    """``kernel(*args)``: in parallel, or by its serial twin when ``work`` elements are too few to pay for it."""
    if work < _PARALLEL_MIN_WORK or _inline[0]:  # (inside a split the cores are taken)
        return _SERIAL[kernel](*args)
    with _PARALLEL_LOCK:
        _park()
        return kernel(*args)


# ------------------------------------------------------------ the CPU's caches
_SYSCONF_CACHE = {1: "SC_LEVEL1_DCACHE_SIZE", 2: "SC_LEVEL2_CACHE_SIZE", 3: "SC_LEVEL3_CACHE_SIZE"}


def _parse_size(text):
    """'1024K' / '32M' / '49152' (sysfs's spelling) -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def cache_bytes(level, default, root="/sys/devices/system/cpu/cpu0/cache"):
    """The size in bytes of the level-``level`` data (or unified) cache of one core, as the OS reports it.

    Read from sysfs (``index*/level``, ``type``, ``size``), else from
    ``os.sysconf``; ``default`` where neither knows (another OS, a container
    that hides them). Blocked kernels size their blocks from it, so that a
    block fits the cache of the CPU they run on rather than of the one they
    were measured on; the same machine always reads the same size, so the
    blocks, and the results, are the same from run to run.
    """
    try:
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            try:
                with open(os.path.join(path, "level")) as f:
                    lvl = int(f.read())
                with open(os.path.join(path, "type")) as f:
                    kind = f.read().strip()
                with open(os.path.join(path, "size")) as f:
                    size = _parse_size(f.read())
            except (OSError, ValueError):
                continue
            if lvl == level and kind in ("Data", "Unified") and size > 0:
                return size
    except OSError:
        pass
    try:
        size = os.sysconf(_SYSCONF_CACHE[level])
        if size and size > 0:
            return int(size)
    except (ValueError, OSError, KeyError, AttributeError):
        pass
    return int(default)


#: One core's L2 cache (bytes), the unit of the blocked kernels' block sizes (``conv``, ``winograd``, ``conv3d``).
L2_BYTES = cache_bytes(2, default=1 << 20)


# --------------------------------------------------------------- workspaces
def workspace(size, dtype, slot=0):
    """A reusable flat scratch array of at least ``size`` elements (per thread, dtype and slot).

    The contents are garbage; the array is overwritten by the next call for the
    same slot, so a caller must not keep it. A caller that needs several
    scratch arrays at once takes them from different slots.
    """
    dtype = np.dtype(dtype)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    key = (dtype, slot)
    buf = cache.get(key)
    if buf is None or buf.size < size:
        buf = cache[key] = np.empty(max(int(size), 1), dtype=dtype)
    return buf[:size]
