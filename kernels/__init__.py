"""Accelerated twins of scratchseg's reference hot loops.

* ``kernels.cpu``  -- Numba kernels for NumPy arrays, one module per family,
  registered in ``kernels.cpu.KERNELS``;
* ``kernels.cuda`` -- CuPy ``RawKernel`` kernels for CuPy arrays, compiled on
  first use (the module imports fine without CuPy).

Each kernel has the same signature and gives the same result as the NumPy
reference in ``scratchseg.functional``; ``scratchseg.backend.kernel(name,
*arrays)`` picks the right one (or ``None`` for the reference).

Importing this package tunes the process for the CPU kernels (thread spinning
of OpenBLAS and Numba, glibc's large allocations): ``kernels/process.py`` says
what, why, and how to turn it off (``SCRATCHSEG_NO_TUNING=1``); ``tuning`` is
what it did. This must run before NumPy loads, which is why
``scratchseg.backend`` imports ``kernels`` first and why this file imports
nothing else.
"""

from __future__ import annotations

from .process import tune_process, tuning

__all__ = ["tune_process", "tuning"]

tune_process()
