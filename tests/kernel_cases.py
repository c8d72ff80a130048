"""What the kernel tests share: hypothesis strategies for convolution geometries, PyTorch's
convolution gradients as the oracle, and a way to set the CPU kernels' tuning constants
for a block (hypothesis tests cannot use pytest's ``monkeypatch``)."""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
from helpers import geometries as shared_geometries
from hypothesis import strategies as st

DTYPES = [np.float32, np.float64]


def geometries(max_size=9):
    """(x_shape, kh, kw, stride, padding, dilation) with at least one output pixel, padding up to far
    beyond the input: the shared strategy of ``helpers.geometries`` with the kernel tests' ranges."""
    return shared_geometries(batch=(1, 3), channels=(1, 4), kernel=(1, 4), stride=(1, 3), padding=(0, 6),
                             dilation=(1, 5), size=(1, max_size), fit="bounded").map(
        lambda g: (g.x_shape, *g.im2col_args))


@st.composite
def conv_cases(draw):
    """A grouped convolution's geometry and a block plan of the CPU kernels, each choice drawn both ways.

    The plan is a list of (module, name, value) for :func:`patched`.
    """
    from kernels.cpu import conv, gemm, runtime, shifted

    (N, C, H, W), kh, kw, stride, padding, dilation = draw(geometries(max_size=12))
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if C % g == 0]))
    K = groups * draw(st.integers(1, 3))
    plan = [
        # the whole batch in one block, or blocks of a few hundred bytes, so
        # the loops split rows of one sample and group several samples
        (conv, "_BLOCK_BYTES", draw(st.sampled_from([64 << 20, 1, 300, 2000]))),
        # blocks of at least 256 columns whatever the budget (whole samples of a small map), or none
        (conv, "_MIN_BLOCK_COLUMNS", draw(st.sampled_from([0, 0, 256]))),
        # a block of several samples: one GEMM per sample (0) or one wide GEMM (always)
        (conv, "_MERGE_BELOW", draw(st.sampled_from([0, 1 << 30]))),
        # the weight gradient as dout @ cols^T (1) or as its transpose
        (conv, "_DW_DIRECT_MIN_K", draw(st.sampled_from([1, 1 << 30]))),
        # its transposed form with dout copied pixel-major for the own GEMM (1 << 30), or read in place (0)
        (conv, "_DW_ROWS_BELOW_K", draw(st.sampled_from([0, 1 << 30]))),
        # the input gradient's products by the own GEMM (True) or by the BLAS
        (conv, "_DX_OWN_GEMM", draw(st.booleans())),
        # the forward's columns in rows padded to an odd number of cache lines, or packed
        (conv, "_PAD_ROWS", draw(st.booleans())),
        # both gradients at once on two threads (any size) or one after the other
        (conv, "_TOGETHER_MAX_MACS", draw(st.sampled_from([0, 1 << 62]))),
        # the batch split between worker threads (0), or run inline
        (runtime, "_SPLIT_MIN_MACS", draw(st.sampled_from([0, 1 << 62]))),
        # float32 products by our own GEMM (where the CPU has it) or by NumPy's BLAS
        (gemm, "_MODE", draw(st.sampled_from(["auto", "blas"]))),
        # unit-stride float32 products over shifted rows wherever they fit (inf), as they are set, or never
        (shifted, "_MAX_WASTE", draw(st.sampled_from([float("inf"), shifted._MAX_WASTE]))),
        (shifted, "_MIN_DEPTH", draw(st.sampled_from([1, shifted._MIN_DEPTH]))),
        (shifted, "_ENABLED", draw(st.booleans())),
    ]
    return (N, C, H, W), K, kh, kw, stride, padding, dilation, groups, plan


def torch_conv(x, w, b, dout, stride, padding, dilation, groups):
    """PyTorch's conv2d of (x, w, b) and its gradients for ``dout``: y, dx, dw as NumPy arrays."""
    import torch

    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    y = torch.nn.functional.conv2d(tx, tw, torch.tensor(b), stride, padding, dilation, groups)
    y.backward(torch.tensor(dout))
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy()


@contextlib.contextmanager
def patched(settings):
    """A context in which each (module, name, value) of ``settings`` is set; restored on exit."""
    with contextlib.ExitStack() as stack:
        for module, name, value in settings:
            stack.enter_context(mock.patch.object(module, name, value))
        yield
