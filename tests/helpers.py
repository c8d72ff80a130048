"""Small helpers for holding scratchseg side by side with PyTorch in tests.

    from helpers import to_torch, to_numpy, assert_close, cupy_or_skip

* ``to_torch(a, requires_grad=False)``: a Tensor / NumPy / CuPy array as a CPU
  ``torch.Tensor`` of the same dtype (a fresh leaf, so it can require grad);
* ``to_numpy(a)``: a scratchseg Tensor, torch tensor, CuPy or NumPy array as a
  NumPy array;
* ``assert_close(actual, expected, rtol=None, atol=None)``: element-wise check
  with tolerances chosen from the dtype (float64: rtol 1e-7; float32: rtol 1e-4)
  and an error message that says where the largest difference is;
* ``cupy_or_skip()``: the ``cupy`` module, or ``pytest.skip`` when CuPy or a
  GPU is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

# default tolerances per dtype: (rtol, atol)
TOLERANCES = {
    np.dtype("float64"): (1e-7, 1e-10),
    np.dtype("float32"): (1e-4, 1e-5),
    np.dtype("float16"): (1e-2, 1e-3),
}


def to_numpy(a):
    """The values of ``a`` (scratchseg Tensor, torch tensor, CuPy or NumPy array) as NumPy."""
    if hasattr(a, "_ctx") and hasattr(a, "data"):  # scratchseg.Tensor
        a = a.data
    if type(a).__module__.split(".")[0] == "torch":
        return a.detach().cpu().numpy()
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)


def to_torch(a, requires_grad=False):
    """``a`` as a CPU torch tensor with the same dtype and values (a new leaf)."""
    import torch

    t = torch.from_numpy(np.array(to_numpy(a), copy=True))
    return t.requires_grad_(requires_grad) if requires_grad else t


def assert_close(actual, expected, rtol=None, atol=None, msg=""):
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` everywhere, same shape.

    Tolerances default to the looser dtype of the two (float64 -> rtol 1e-7).
    """
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{msg} shape mismatch: got {a.shape}, expected {e.shape}"
    dtype = a.dtype if a.dtype.kind == "f" else np.dtype("float64")
    if e.dtype.kind == "f" and e.dtype.itemsize < dtype.itemsize:
        dtype = e.dtype
    default_rtol, default_atol = TOLERANCES.get(dtype, (1e-7, 1e-10))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    if not np.allclose(a64, e64, rtol=rtol, atol=atol, equal_nan=True):
        diff = np.abs(a64 - e64)
        excess = diff - (atol + rtol * np.abs(e64))
        where = np.unravel_index(np.nanargmax(excess), excess.shape) if excess.size else ()
        raise AssertionError(
            f"{msg} not close (rtol={rtol}, atol={atol}): max abs diff {np.nanmax(diff):.3e}; "
            f"at index {tuple(int(i) for i in where)}: got {a64[where]!r}, expected {e64[where]!r}"
        )


def cupy_or_skip():
    """The ``cupy`` module when CuPy imports and sees a GPU; otherwise skip the test."""
    try:
        import cupy
    except Exception as exc:  # ImportError or a broken CUDA install
        pytest.skip(f"CuPy is not available ({type(exc).__name__})")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy finds no GPU")
    except Exception as exc:
        pytest.skip(f"CuPy finds no usable GPU ({type(exc).__name__})")
    return cupy
