"""CuPy kernels for CuPy arrays: the GPU twins of the reference hot loops.

Same signatures and results as the NumPy reference (``scratchseg.functional``)
and as the CPU kernels in ``kernels.cpu``. The CUDA source, one ``.cu`` file
per family next to this file, is compiled by CuPy (NVRTC) the first time a
kernel is used, once per dtype, and cached; importing this package needs no
CuPy, so the CPU-only install imports it fine.

Why these kernels exist: a U-Net training step on a GPU does little arithmetic
per layer, so its time goes to *launching* work. Every CuPy operation costs
the host microseconds to issue, so the readable reference, which spends 5-20
array operations on a batch norm or an SGD update, is bound by the host and
leaves the GPU idle. Each kernel here does one op's work in one or two
launches:

* ``im2col`` / ``col2im`` (``im2col.py``) and the conv2d forward,
  input-gradient and weight-gradient (``conv.py``): one unfolding kernel and
  one cuBLAS GEMM per chunk of samples (GEMMs called straight through cuBLAS,
  ``gemm.py``, not ``cupy.matmul``);
* batch norm (training) forward and backward (``normalization.py``): one
  block per channel computes the channel's sums (in float64) and writes the
  output in the same launch;
* max pooling forward (max and winning tap) and backward, a gather (``pooling.py``);
* cross entropy (``loss.py``): softmax, loss and target weights in one
  launch, the gradient in another;
* the ReLU gradient (``activation.py``) and the SGD update (``optimizer.py``):
  one element-wise launch each.

Every kernel writes each output element from exactly one thread (col2im and
the max-pool backward are *gathers*: each input pixel sums what reaches it),
so there are no atomics and the results are deterministic.

``KERNELS`` is the one table of the public kernels, keyed by the name of the
``@replaceable`` reference function each one stands in for
(``scratchseg.backend.replaceable`` looks there). A kernel that cannot take
its arguments returns ``NotImplemented`` and the reference runs.
Compilation, launches and the TF32 switch (``tf32_allowed`` /
``set_tf32_allowed``) live in ``runtime.py``.
"""

from __future__ import annotations

from . import activation, conv, gemm, im2col, loss, normalization, optimizer, pooling, runtime
from .runtime import available, set_tf32_allowed, tf32_allowed

#: name -> kernel: every public kernel of this package, by the reference op's name.
KERNELS = {
    "im2col": im2col.im2col,
    "col2im": im2col.col2im,
    "conv2d_forward": conv.conv2d_forward,
    "conv2d_input_grad": conv.conv2d_input_grad,
    "conv2d_weight_grad": conv.conv2d_weight_grad,
    "batch_norm_train_forward": normalization.batch_norm_train_forward,
    "batch_norm_update_running": normalization.batch_norm_update_running,
    "batch_norm_backward": normalization.batch_norm_backward,
    "max_pool2d_forward": pooling.max_pool2d_forward,
    "max_pool2d_backward": pooling.max_pool2d_backward,
    "cross_entropy_forward": loss.cross_entropy_forward,
    "cross_entropy_backward": loss.cross_entropy_backward,
    "relu_backward": activation.relu_backward,
    "sgd_update": optimizer.sgd_update,
}

__all__ = ["KERNELS", "available", "tf32_allowed", "set_tf32_allowed"]
