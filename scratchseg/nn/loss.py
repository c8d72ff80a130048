"""Loss layers, as ``torch.nn.CrossEntropyLoss``: they hold the loss's options
(and its class weights, as a buffer) and call ``scratchseg.functional``.
"""

from __future__ import annotations

import numpy

from .. import backend
from .. import functional as F
from ..args import is_array
from ..autograd import Tensor
from .module import Module

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(Module):
    """Softmax cross entropy over classes (dim 1), per pixel for segmentation.

    loss_i = -weight[y_i] * log softmax(x_i)[y_i]; pixels with y_i == ignore_index
    count for nothing; reduction 'mean' divides by the sum of the weights of
    the counted pixels, 'sum' adds, 'none' keeps them.

    Shape: input (N, K, H, W) and target (N, H, W) of class indices -> a scalar
    (or (N, H, W) with reduction='none'). ``weight`` (K,) is a buffer, saved
    in the state dict as in torch. ``label_smoothing`` in [0, 1] mixes each
    one-hot target with the uniform distribution over the K classes, as torch.
    """

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        if weight is not None:
            weight = weight.data if isinstance(weight, Tensor) else weight
            if not is_array(weight):  # a list or tuple of class weights
                weight = backend.xp().asarray(numpy.asarray(weight, dtype=backend.get_default_dtype()))
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction = int(ignore_index), reduction

    def forward(self, input, target):
        return F.cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}" if (
            self.ignore_index != -100 or self.reduction != "mean"
        ) else ""
