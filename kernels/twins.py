"""What the CPU and the GPU twins of a reference function check alike (host-only, imports neither Numba nor CuPy)."""

from __future__ import annotations

import numpy as np

__all__ = ["sgd_arrays_fit"]


def sgd_arrays_fit(p, grad, buf, momentum, dtypes):
    """Whether an SGD kernel can update ``p`` in place: p, grad (and buf) of one dtype among ``dtypes`` and one
    shape, p and buf C-contiguous, and a buffer wherever there is momentum. Else the reference runs."""
    dtype = np.dtype(p.dtype)
    arrays = (p, grad) if buf is None else (p, grad, buf)
    if dtype not in dtypes or any(a.dtype != dtype or a.shape != p.shape for a in arrays):
        return False
    if not p.flags.c_contiguous or (buf is not None and not buf.flags.c_contiguous):
        return False
    return not (momentum != 0 and buf is None)
