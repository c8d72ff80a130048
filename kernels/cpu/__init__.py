"""Numba kernels for NumPy arrays: the CPU twins of scratchseg's reference hot loops.

``KERNELS`` maps the name of a reference function in ``scratchseg.functional``
to the kernel that replaces it; the kernel takes the same arguments and
returns the same numbers (``tests/test_kernels*.py`` hold them equal;
im2col/col2im also take an optional ``out=`` workspace), or ``NotImplemented``
where it does not apply, and the reference runs. One module per family:

* ``im2col.py``        -- ``im2col``, ``col2im`` and the block kernels the convolution reuses;
* ``conv.py``          -- ``conv2d_forward``, ``conv2d_input_grad``, ``conv2d_weight_grad``,
  computed block by block so the full column matrix never exists;
* ``im2col3d.py``      -- ``im2col3d``, ``col2im3d`` and their block kernels (rows of depth planes);
* ``conv3d.py``        -- ``conv3d_forward``, ``conv3d_input_grad``, ``conv3d_weight_grad``,
  blocked like ``conv.py``, with a ring of unfolded (or Winograd-transformed) depth planes;
* ``winograd.py``      -- Winograd's F(2x2, 3x3) and F(4x4, 3x3) (``winograd4.py``: the
  transforms of its 6x6 tiles), which ``conv.py`` takes for 3x3 unit-stride convolutions
  with enough channels;
* ``gemm.py``          -- our own float32 GEMM (AVX-512 register tiles written as LLVM IR),
  which the convolutions' products run on where it applies, else NumPy's BLAS;
* ``shifted.py``       -- unit-stride convolutions of small maps as one GEMM over the image's
  shifted rows (no unfolded columns), blocks handed out to whichever thread asks;
* ``taps.py``          -- convolution tap by tap over the outputs each tap reaches inside
  the image, which ``conv.py`` takes when most products would multiply zero padding;
* ``normalization.py`` -- ``batch_norm_train_forward``, ``batch_norm_backward``;
* ``pooling.py``       -- ``max_pool2d_forward``, ``max_pool2d_backward``;
* ``activation.py``    -- ``relu_forward``, ``relu_backward``;
* ``optimizer.py``     -- ``sgd_update``, the SGD step of one parameter in one pass, and
  ``sgd_update_many``, of every parameter of a group in one call;
* ``resample.py``      -- ``resample_axis``, ``resample_axis_grad``: interpolation along one axis
  and its transpose, one pass each;
* ``lattice.py``       -- the permutohedral lattice, Gaussian filtering in feature
  space for the dense CRF; not a twin (it approximates), so not in ``KERNELS``:
  ``scratchseg.crf.dense_crf(..., filter='lattice')`` imports it by name;
* ``unfolded.py``      -- ``conv.py``'s products over unfolded columns (forward, input gradient,
  both gradients of a small layer side by side) as native tasks;
* ``native.py``        -- native worker threads (``serve.py``: their loop) that take their share of
  the shifted and unfolded products, batch norm and the SGD step without the interpreter;
* ``runtime.py``       -- worker threads, parallel kernels and their serial twins,
  BLAS threads, workspaces; ``workers.py`` -- the split's worker threads and where
  they run; ``_common.py`` -- shapes and dtypes.

Every loop is compiled with ``cache=True``, once per dtype (float32, float64;
float16 runs in float32), and cached on disk, so a new process loads them in
milliseconds. Numba checks only the file of the function it loads: after
editing one module, delete ``kernels/cpu/__pycache__/*.nb[ci]`` so that the
loops of other modules that call into it (``serve.py``'s above all) are
compiled again; a fresh install or clone compiles everything.
``SCRATCHSEG_NUM_THREADS`` sets the number of worker threads (default:
Numba's thread count, one per core). Loading these kernels also prepares the
process (``kernels/process.py``).
"""

from __future__ import annotations

from . import activation, conv, conv3d, im2col, im2col3d, normalization, optimizer, pooling, resample

#: reference function name (in ``scratchseg.functional``) -> the kernel that replaces it
KERNELS = {
    "im2col": im2col.im2col,
    "col2im": im2col.col2im,
    "conv2d_forward": conv.conv2d_forward,
    "conv2d_input_grad": conv.conv2d_input_grad,
    "conv2d_weight_grad": conv.conv2d_weight_grad,
    "conv2d_backward": conv.conv2d_backward,
    "conv_transpose2d_backward": conv.conv_transpose2d_backward,
    "im2col3d": im2col3d.im2col3d,
    "col2im3d": im2col3d.col2im3d,
    "conv3d_forward": conv3d.conv3d_forward,
    "conv3d_input_grad": conv3d.conv3d_input_grad,
    "conv3d_weight_grad": conv3d.conv3d_weight_grad,
    "batch_norm_train_forward": normalization.batch_norm_train_forward,
    "batch_norm_backward": normalization.batch_norm_backward,
    "max_pool2d_forward": pooling.max_pool2d_forward,
    "max_pool2d_backward": pooling.max_pool2d_backward,
    "relu_forward": activation.relu_forward,
    "relu_backward": activation.relu_backward,
    "sgd_update": optimizer.sgd_update,
    "sgd_update_many": optimizer.sgd_update_many,
    "resample_axis": resample.resample_axis,
    "resample_axis_grad": resample.resample_axis_grad,
}

__all__ = ["KERNELS"]
