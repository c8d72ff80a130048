"""Loss layers, as ``torch.nn.CrossEntropyLoss`` and ``torch.nn.BCEWithLogitsLoss``: they hold the
loss's options (and its weights, as buffers) and call ``scratchseg.functional``.
"""

from __future__ import annotations

import numpy

from .. import backend
from .. import functional as F
from ..args import is_array
from ..autograd import Tensor
from .module import Module

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss"]


def _buffer(value):
    """A weight given as a Tensor, array, list or number, as an array of the active backend (or None)."""
    if value is None:
        return None
    value = value.data if isinstance(value, Tensor) else value
    if not is_array(value):
        value = backend.xp().asarray(numpy.asarray(value, dtype=backend.get_default_dtype()))
    return value


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


class BCEWithLogitsLoss(Module):
    """Sigmoid + binary cross-entropy, as ``torch.nn.BCEWithLogitsLoss``, for one-channel (sigmoid) models.

    l = -w [pw y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))] per element,
    computed stably (see ``functional.binary_cross_entropy_with_logits``);
    reduction 'mean' over all elements, 'sum' or 'none'. ``weight`` and
    ``pos_weight`` (broadcastable to the input; (C, 1, 1) for (N, C, H, W))
    are buffers, saved in the state dict as in torch.

    Shape: input (*) logits and target (*) in [0, 1], the same shape -> a
    scalar (or (*) with reduction='none'). For integer masks with an
    ``ignore_index``, use ``scratchseg.losses.BinaryCrossEntropyLoss``.
    """

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean", pos_weight=None):
        super().__init__()
        if size_average is not None or reduce is not None:
            raise ValueError("size_average and reduce are deprecated; use reduction='mean', 'sum' or 'none'")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.register_buffer("weight", _buffer(weight))
        self.register_buffer("pos_weight", _buffer(pos_weight))
        self.reduction = reduction

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, self.weight, reduction=self.reduction,
                                                  pos_weight=self.pos_weight)

    def extra_repr(self):
        return f"reduction={self.reduction!r}" if self.reduction != "mean" else ""
