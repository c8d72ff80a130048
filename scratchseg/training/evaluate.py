"""Evaluation on a split, and the prediction of one image.

Predictions are made at the (optionally resized) input size and compared with
the masks at their own size: the predicted labels are upsampled with nearest
neighbour, so the scores are those of the masks as they were given.
"""

from __future__ import annotations

import numpy

from .. import backend
from .. import distributed
from .. import functional as F
from ..autograd import Tensor, no_grad
from ..data import Loader
from ..data import transforms as T
from ..data.task import DataError
from ..metrics import ConfusionMatrix

__all__ = ["evaluate", "predict_array", "predicted_labels", "pixel_loss_sum"]


def predicted_labels(logits):
    """Class map (N, h, w) from logits (N, K, h, w): the argmax over K, or, for a one-channel sigmoid
    model (``--binary``, K == 1), class 1 where sigmoid(x) > 0.5, that is where the logit x > 0."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).astype(numpy.int64)
    return logits.argmax(axis=1)


def pixel_loss_sum(logits, masks, ignore_index):
    """The summed cross-entropy of the counted pixels (binary cross-entropy for one sigmoid channel)."""
    if logits.shape[1] != 1:
        return float(F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum").item())
    valid = (masks != ignore_index)[:, None]  # (N, 1, h, w): weight 0 on ignored pixels
    target = (masks == 1)[:, None]
    return float(F.binary_cross_entropy_with_logits(logits, target, weight=valid, reduction="sum").item())


def evaluate(model, task, split="val", batch_size=8, resize=None, max_batches=None):
    """Scores of ``model`` on ``task``'s ``split``: the metrics dict plus ``loss`` (mean cross-entropy per
    counted pixel, whatever loss the model was trained with; a one-channel sigmoid model's binary cross-entropy).

    Under ``--distributed`` each process evaluates its own block of the split and the
    confusion matrices and loss sums are added up: every process gets the one-process scores.
    """
    dataset = task.split(split)
    if not dataset.has_masks:
        raise DataError(f"the {split!r} split of {task.name} has no masks to evaluate against")
    part = distributed.shard(dataset)  # this process's block (alone: the whole split)
    loader = Loader(part, batch_size=batch_size, shuffle=False, mean=task.mean, std=task.std,
                    transform=T.ResizeImage(resize) if resize is not None else None) if len(part) else None
    cm = ConfusionMatrix(task.num_classes, task.ignore_index, task.class_names)
    was_training = model.training
    model.eval()
    loss_sum, loss_pixels = 0.0, 0
    try:
        with no_grad():
            for b, (images, masks, _idx) in enumerate(loader.batches() if loader else []):
                if max_batches is not None and b >= max_batches:
                    break
                logits = model(Tensor(images))  # (N, K, h, w) or (N, K, d, h, w)
                small = T.resize_mask(masks, logits.shape[2:])  # the masks at the prediction's size, for the loss
                valid = int((small != task.loss_ignore_index).sum())
                if valid:
                    loss_sum += pixel_loss_sum(logits, small, task.loss_ignore_index)
                    loss_pixels += valid
                pred = predicted_labels(logits.data)  # (N, h, w) or (N, d, h, w)
                cm.update(T.resize_mask(pred, masks.shape[1:]), masks)
    finally:
        model.train(was_training)
    if distributed.world_size() > 1:  # the sums of every process's block
        K = task.num_classes
        mine = backend.asnumpy(cm.matrix) if cm.matrix is not None else numpy.zeros((K, K), dtype=numpy.int64)
        cm.matrix, loss_sum, loss_pixels = distributed.all_reduce_evaluation(mine, loss_sum, loss_pixels)
    scores = cm.compute()
    scores["loss"] = loss_sum / loss_pixels if loss_pixels else None
    return scores


def predict_array(model, image, mean, std, resize=None):
    """Class map (H, W) int64 for one (H, W, C) uint8 image, at the image's own size
    (a volume (D, H, W, C): (D, H, W))."""
    small = T.ResizeImage(resize)(image, None)[0] if resize is not None else image
    x, _ = T.Normalize(mean, std)(small, None)
    x = numpy.ascontiguousarray(numpy.moveaxis(x, -1, 0))[None]  # (1, C, h, w) or (1, C, d, h, w)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            logits = model(Tensor(backend.xp().asarray(x.astype(backend.get_default_dtype()))))
    finally:
        model.train(was_training)
    pred = predicted_labels(logits.data)  # (1, h, w) or (1, d, h, w)
    return backend.asnumpy(T.resize_mask(pred, image.shape[:-1])[0])
