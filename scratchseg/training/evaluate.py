"""Evaluation on a split, and the prediction of one image.

Predictions are made at the (optionally resized) input size and compared with
the masks at their own size: the predicted labels are upsampled with nearest
neighbour, so the scores are those of the masks as they were given.
"""

from __future__ import annotations

import numpy

from .. import backend
from .. import functional as F
from ..autograd import Tensor, no_grad
from ..data import Loader
from ..data import transforms as T
from ..data.task import DataError
from ..metrics import ConfusionMatrix

__all__ = ["evaluate", "predict_array"]


def evaluate(model, task, split="val", batch_size=8, resize=None, max_batches=None):
    """Scores of ``model`` on ``task``'s ``split``: the metrics dict plus ``loss`` (mean cross-entropy)."""
    dataset = task.split(split)
    if not dataset.has_masks:
        raise DataError(f"the {split!r} split of {task.name} has no masks to evaluate against")
    loader = Loader(dataset, batch_size=batch_size, shuffle=False, mean=task.mean, std=task.std,
                    transform=T.ResizeImage(resize) if resize is not None else None)
    cm = ConfusionMatrix(task.num_classes, task.ignore_index, task.class_names)
    was_training = model.training
    model.eval()
    loss_sum, loss_pixels = 0.0, 0
    try:
        with no_grad():
            for b, (images, masks, _idx) in enumerate(loader.batches()):
                if max_batches is not None and b >= max_batches:
                    break
                logits = model(Tensor(images))  # (N, K, h, w)
                small = T.resize_mask(masks, logits.shape[-2:])  # the masks at the prediction's size, for the loss
                valid = int((small != task.loss_ignore_index).sum())
                if valid:
                    loss = F.cross_entropy(logits, small, ignore_index=task.loss_ignore_index, reduction="sum")
                    loss_sum += float(loss.item())
                    loss_pixels += valid
                pred = logits.data.argmax(axis=1)  # (N, h, w)
                cm.update(T.resize_mask(pred, masks.shape[-2:]), masks)
    finally:
        model.train(was_training)
    scores = cm.compute()
    scores["loss"] = loss_sum / loss_pixels if loss_pixels else None
    return scores


def predict_array(model, image, mean, std, resize=None):
    """Class map (H, W) int64 for one (H, W, C) uint8 image, at the image's own size."""
    small = T.ResizeImage(resize)(image, None)[0] if resize is not None else image
    x, _ = T.Normalize(mean, std)(small, None)
    x = numpy.ascontiguousarray(x.transpose(2, 0, 1))[None]  # (1, C, h, w)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            logits = model(Tensor(backend.xp().asarray(x.astype(backend.get_default_dtype()))))
    finally:
        model.train(was_training)
    pred = logits.data.argmax(axis=1)  # (1, h, w)
    return backend.asnumpy(T.resize_mask(pred, image.shape[:2])[0])
