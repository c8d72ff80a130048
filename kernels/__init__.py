"""Accelerated twins of scratchseg's reference hot loops.

* ``kernels.cpu``  -- Numba ``@njit(parallel=True, cache=True)`` kernels for
  NumPy arrays;
* ``kernels.cuda`` -- CuPy ``RawKernel`` kernels for CuPy arrays, compiled on
  first use (the module imports fine without CuPy).

Each kernel has the same signature and gives the same result as the NumPy
reference in ``scratchseg.functional``; ``scratchseg.backend.kernel(name,
*arrays)`` picks the right one (or ``None`` for the reference).

Importing this package (``scratchseg.backend`` does, before it imports NumPy)
also tunes the process for the CPU fast path, because three defaults of this
kind of machine cost more than the maths:

* **OpenBLAS worker threads spin** for about 0.1 s after every GEMM
  (``OPENBLAS_THREAD_TIMEOUT`` defaults to 2**28 cycles) and halve the speed
  of a Numba kernel that runs next on the same cores. We default the
  timeout to 2**18 cycles (about 0.1 ms). It is read when OpenBLAS loads, so it only works
  when scratchseg is imported before NumPy; otherwise set it in the shell.
* **Numba's OpenMP workers spin** after a parallel kernel and slow the GEMM
  that follows: we default ``NUMBA_THREADING_LAYER`` to ``workqueue``, whose
  workers sleep.
* **glibc serves large arrays with fresh mmap()s**, which the kernel pages in
  and zeroes on first touch, and gives them back on free: an im2col buffer of
  hundreds of MiB costs that every call. ``mallopt`` raises the mmap and trim
  thresholds so freed large blocks stay in the heap and are reused.

Every setting is a default only: a value already in the environment wins, and
``SCRATCHSEG_NO_TUNING=1`` turns all three off.
"""

from __future__ import annotations

import os
import sys

__all__ = ["tune_process", "tuning"]

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
    """Raise glibc's mmap/trim thresholds; False where there is no glibc."""
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
    """Apply the process defaults described in the module docstring (idempotent)."""
    if tuning:
        return tuning
    if os.environ.get("SCRATCHSEG_NO_TUNING", "").strip() not in ("", "0"):
        tuning["disabled"] = True
        return tuning
    numpy_loaded = "numpy" in sys.modules
    if "OPENBLAS_THREAD_TIMEOUT" not in os.environ and not numpy_loaded:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = _OPENBLAS_THREAD_TIMEOUT
    tuning["openblas_thread_timeout"] = (
        os.environ.get("OPENBLAS_THREAD_TIMEOUT", "default")
        + (" (numpy was imported first: too late to change)" if numpy_loaded else "")
    )
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    tuning["numba_threading_layer"] = os.environ["NUMBA_THREADING_LAYER"]
    tuning["mallopt"] = _mallopt()
    return tuning


tune_process()
