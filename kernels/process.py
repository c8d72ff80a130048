"""Every change scratchseg makes to its own process, in one place.

Three defaults of a many-core Linux machine cost the CPU kernels more than the
maths, so ``kernels/__init__.py`` calls :func:`tune_process` when the package
is imported (``scratchseg.backend`` imports it before it imports NumPy):

1. **OPENBLAS_THREAD_TIMEOUT = 2**18 cycles (about 0.1 ms).** OpenBLAS's worker
   threads spin for about 0.1 s after every GEMM (its default is 2**28 cycles)
   and slow a Numba kernel that runs next on the same cores. OpenBLAS reads the
   variable when it loads; when NumPy was imported first, the variable is set
   all the same and change 7 below makes the loaded OpenBLAS re-read it.
2. **NUMBA_THREADING_LAYER = workqueue.** Numba's OpenMP workers spin after a
   parallel kernel and slow the GEMM that follows; workqueue's workers sleep.
3. **glibc mallopt: mmap and trim thresholds raised to 1 GiB / never.** glibc
   serves large arrays with fresh mmap()s that the kernel zeroes on first
   touch, and gives them back on free: an im2col buffer of hundreds of MiB
   would pay that on every call. Now freed large blocks stay in the heap and
   are reused.

Each is a default only (a value already in the environment wins), and
``SCRATCHSEG_NO_TUNING=1`` turns all three off, and a fourth made elsewhere:
the kernels' worker threads kept off the caller's CPU
(``kernels/cpu/workers.py``). ``tuning`` records what was done
(``kernels.tuning`` is the same dict), for benchmarks and bug reports.

When the CPU kernels load (``kernels.cpu``), :func:`prepare_cpu_kernels` does
three more things, which are not tuning but what the kernels need to run, so
``SCRATCHSEG_NO_TUNING`` leaves them on (``SCRATCHSEG_KERNELS=numpy`` keeps
scratchseg from importing ``kernels.cpu`` at all):

4. **Numba's threading layer applied late.** When Numba was imported before
   ``kernels``, setting the environment variable came too late; the layer
   named there is written into ``numba.config`` (it takes effect at the first
   parallel launch).
5. **A throwaway 2x2 matmul**, so that NumPy's BLAS library is loaded.
6. **A scan of /proc/self/maps for that OpenBLAS** and its get/set thread-count
   functions. ``kernels.cpu.runtime`` uses them to run each worker's GEMMs on
   one thread while the batch is split between worker threads, restoring the
   count afterwards (``_split``). Where none is found, the kernels never split
   a batch between threads.
7. **Change 1 made late.** When NumPy was loaded before ``kernels`` (a script
   that imports numpy first, or numba), OpenBLAS has already read its
   environment and its workers spin for its default timeout after every GEMM:
   an idle process burned 0.03-0.07 s of CPU in the 0.2 s after a small
   training step (benchmarks/NOTES.md). OpenBLAS exports the two functions
   its own fork handler uses: ``openblas_read_env`` re-reads the variables
   and ``blas_thread_shutdown_`` stops the workers, which the next threaded
   GEMM starts again with the new timeout. Done once, while the kernels are
   being imported and only when no other Python thread runs (one could be
   inside a GEMM); skipped under ``SCRATCHSEG_NO_TUNING`` and where the
   variable came from the user.
"""

from __future__ import annotations

import os
import sys

__all__ = ["tune_process", "tuning", "prepare_cpu_kernels"]

#: What ``tune_process`` did, for benchmarks and bug reports.
tuning: dict = {}

# 2**18 cycles is ~0.1 ms: long enough that back-to-back GEMMs keep their
# threads awake, short enough that a Numba kernel right after gets the cores.
_OPENBLAS_THREAD_TIMEOUT = "18"
# Blocks below this come from the heap and are reused after free (bytes).
_MMAP_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def _mallopt() -> bool:
    """Raise glibc's mmap/trim thresholds (change 3); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
        ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_MMAP_THRESHOLD))
        return bool(ok_trim) and bool(ok_mmap)
    except (OSError, AttributeError):
        return False


def tune_process() -> dict:
    """Apply changes 1-3 of the module docstring (idempotent); returns ``tuning``."""
    if tuning:
        return tuning
    if os.environ.get("SCRATCHSEG_NO_TUNING", "").strip() not in ("", "0"):
        tuning["disabled"] = True
        return tuning
    numpy_loaded = "numpy" in sys.modules
    late = "OPENBLAS_THREAD_TIMEOUT" not in os.environ and numpy_loaded
    if "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = _OPENBLAS_THREAD_TIMEOUT
    tuning["openblas_thread_timeout"] = (
        os.environ["OPENBLAS_THREAD_TIMEOUT"]
        + (" (numpy was imported first: too late for its load; re-read when the CPU kernels load)" if late else "")
    )
    tuning["openblas_timeout_late"] = late
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    tuning["numba_threading_layer"] = os.environ["NUMBA_THREADING_LAYER"]
    tuning["mallopt"] = _mallopt()
    return tuning


# The names of OpenBLAS's thread-count functions, by build (SciPy's wheels, 64-bit ints, plain).
_OPENBLAS_THREAD_FUNCTIONS = [
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
]


def prepare_cpu_kernels():
    """Changes 4-7 of the module docstring, run once when ``kernels.cpu`` loads.

    Returns ``(library, getter, setter)``: NumPy's OpenBLAS as a ``ctypes.PyDLL``
    and the names of its get/set thread-count functions, or None where there
    is none to be found.
    """
    tune_process()  # a no-op after kernels/__init__.py; here for a caller that skipped it
    import numba
    import numpy as np

    if os.environ.get("NUMBA_THREADING_LAYER") and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]  # change 4
    np.ones((2, 2)) @ np.ones((2, 2))  # change 5: NumPy's BLAS is loaded before we look for it
    found = _find_openblas()
    if found is not None and tuning.get("openblas_timeout_late"):
        tuning["openblas_threads_restarted"] = _restart_openblas_threads(found[0])  # change 7
    return found


def _restart_openblas_threads(lib):
    """Change 7: make a loaded OpenBLAS re-read OPENBLAS_THREAD_TIMEOUT; True if it could.

    ``openblas_read_env`` refreshes the values OpenBLAS took from the
    environment at load; the timeout is applied when its thread pool starts,
    so the pool is stopped (``blas_thread_shutdown_``, what OpenBLAS runs
    before a fork) and the next multi-threaded GEMM starts it again.
    """
    import threading

    read_env = getattr(lib, "openblas_read_env", None)
    shutdown = getattr(lib, "blas_thread_shutdown_", None)
    if read_env is None or shutdown is None or threading.active_count() > 1:
        return False  # no such functions, or another thread may be inside a GEMM right now
    read_env()
    shutdown()
    return True


def _find_openblas():
    """Change 6: the loaded OpenBLAS with its thread-count functions, from /proc/self/maps (None: not found)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:  # PyDLL: its calls keep the interpreter lock (a CDLL call drops it, and a step makes dozens of
            lib = ctypes.PyDLL(path)  # these quick calls, each of which could then wait for another thread)
        except OSError:
            continue
        for getter, setter in _OPENBLAS_THREAD_FUNCTIONS:
            if hasattr(lib, getter) and hasattr(lib, setter):
                return lib, getter, setter
    return None
