"""Evaluation on a split, and the prediction of one image.

Predictions are made at the (optionally resized) input size and compared with
the masks at their own size: the predicted labels are upsampled with nearest
neighbour, so the scores are those of the masks as they were given.

Two-class tasks also get ISBI 2012's scores: the pixel error (1 - pixel
accuracy) and the adapted Rand error of the segments, which are the connected
components (4-connected) of class 1 in the prediction and in the truth: the
cells, class 1, between the membranes, class 0, of the membrane masks mapped
``0:0,255:1`` (a boundary task: class 0 the boundaries). Truth pixels of class
0 or ``ignore_index`` are left out; predicted class-0 pixels form one segment
(label 0), as in scikit-image's ``adapted_rand_error``. The pairs are pooled
over the images of the split (``metrics.RandScore``), and the mean of the
per-image errors is reported beside it. ``watershed=SEED`` takes the segments
from the probabilities instead: a seeded watershed (``metrics.watershed_cells``)
that keeps a weak spot in a predicted membrane from merging two cells.
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
from ..data.weightmap import instances_from_mask
from ..inference import log_probabilities, predict
from ..crf import dense_crf
from ..metrics import ConfusionMatrix, RandScore, watershed_cells

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


def rand_update(rand, pred, masks, cells=None):
    """Add the Rand pairs of each image: segments = the connected components of class 1 (see the module doc),
    or, when given, ``cells`` (N, H, W) int labels (``watershed_cells``), one segment map per image."""
    pred, masks = backend.asnumpy(pred), backend.asnumpy(masks)
    segments = (instances_from_mask(p, foreground=1) for p in pred) if cells is None else cells
    for seg, m in zip(segments, masks):  # one image (H, W), or volume (D, H, W), at a time
        rand.update(seg, instances_from_mask(m, foreground=1))


def cell_probabilities(logits):
    """p(class 1) (N, h, w) as a NumPy float64 array: the softmax of two-class logits (N, 2, h, w), or the
    sigmoid of a one-channel model's (N, 1, h, w). p1 = 1 / (1 + exp(x0 - x1)), computed without overflow."""
    x = backend.asnumpy(logits).astype(numpy.float64)
    d = x[:, 0] if x.shape[1] == 1 else x[:, 1] - x[:, 0]  # the log-odds of class 1
    with numpy.errstate(invalid="ignore"):  # -inf - -inf in log-probabilities of 0: nan, refused below
        return numpy.exp(-numpy.logaddexp(0.0, -d))


def image_for_crf(images, mean, std):
    """The RGB picture (N, H, W, 3) in [0, 1] behind normalised network inputs (N, C, H, W): the CRF's
    appearance kernel measures colour differences in the image's own units, not in normalised ones.
    A one-channel (grey) image is repeated into three equal channels."""
    x = numpy.moveaxis(backend.asnumpy(images), 1, -1)  # (N, H, W, C)
    x = numpy.clip(x * numpy.asarray(std, numpy.float32) + numpy.asarray(mean, numpy.float32), 0.0, 1.0)
    return numpy.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _probabilities(model, images, inference, crf, mean, std):
    """Log-probabilities (N, K, h, w) through ``inference.predict`` (tiles, flips, scales), refined by the
    dense CRF when ``crf`` is a dict of ``dense_crf`` options; they serve as logits (their softmax is p)."""
    probs = predict(model, images, **(inference or {}))
    if crf is not None:
        probs = dense_crf(probs, image_for_crf(images, mean, std), **crf)
    return Tensor(log_probabilities(probs))


def evaluate(model, task, split="val", batch_size=8, resize=None, max_batches=None, inference=None, crf=None,
             watershed=None):
    """Scores of ``model`` on ``task``'s ``split``: the metrics dict plus ``loss`` (mean cross-entropy per
    counted pixel, whatever loss the model was trained with; a one-channel sigmoid model's binary cross-entropy).
    A two-class task adds ``adapted_rand_error`` (pooled), ``adapted_rand_error_mean`` (over images),
    ``rand_precision``, ``rand_recall`` and ``pixel_error``.

    Under ``--distributed`` each process evaluates its own block of the split and the
    confusion matrices and loss sums are added up: every process gets the one-process scores.

    ``inference``: options of ``inference.predict`` (``dict(tile=..., overlap=..., flip=..., scales=...)``,
    images only): the batches are predicted through it, and the loss is the cross-entropy of its averaged
    probabilities. ``crf``: a dict of ``crf.dense_crf`` options (``{}`` for DeepLab's defaults): the
    probabilities are refined by the dense CRF on each image before they are scored (images only).
    ``watershed``: a seed probability in (0, 1) (two-class images only): the Rand error's segments are
    ``metrics.watershed_cells`` of p(class 1) instead of the components of class 1; pixel scores unchanged.
    """
    dataset = task.split(split)
    if watershed is not None and (task.num_classes != 2 or task.spatial_dims != 2):
        raise ValueError(f"watershed={watershed!r} segments the cells of a two-class image task; {task.name} has "
                         f"{task.num_classes} classes and {task.spatial_dims}-D samples")
    if not dataset.has_masks:
        raise DataError(f"the {split!r} split of {task.name} has no masks to evaluate against")
    part = distributed.shard(dataset)  # this process's block (alone: the whole split)
    loader = Loader(part, batch_size=batch_size, shuffle=False, mean=task.mean, std=task.std,
                    transform=T.ResizeImage(resize) if resize is not None else None) if len(part) else None
    cm = ConfusionMatrix(task.num_classes, task.ignore_index, task.class_names)
    rand = RandScore() if task.num_classes == 2 else None  # two-class tasks: ISBI 2012's scores too
    was_training = model.training
    model.eval()
    loss_sum, loss_pixels = 0.0, 0
    try:
        with no_grad():
            for b, (images, masks, _idx) in enumerate(loader.batches() if loader else []):
                if max_batches is not None and b >= max_batches:
                    break
                if inference is None and crf is None:
                    logits = model(Tensor(images))  # (N, K, h, w) or (N, K, d, h, w)
                else:  # tiled / flipped / multi-scale / CRF: log-probabilities serve as logits
                    logits = _probabilities(model, images, inference, crf, task.mean, task.std)
                small = T.resize_mask(masks, logits.shape[2:])  # the masks at the prediction's size, for the loss
                valid = int((small != task.loss_ignore_index).sum())
                if valid:
                    loss_sum += pixel_loss_sum(logits, small, task.loss_ignore_index)
                    loss_pixels += valid
                pred = T.resize_mask(predicted_labels(logits.data), masks.shape[1:])  # (N, H, W) or (N, D, H, W)
                cm.update(pred, masks)
                if rand is not None:
                    cells = None
                    if watershed is not None:  # segments from p(class 1), at the masks' size
                        p = cell_probabilities(logits.data)  # (N, h, w)
                        cells = T.resize_mask(numpy.stack([watershed_cells(q, watershed) for q in p]), masks.shape[1:])
                    rand_update(rand, pred, masks, cells)
    finally:
        model.train(was_training)
    if distributed.world_size() > 1:  # the sums of every process's block
        K = task.num_classes
        mine = backend.asnumpy(cm.matrix) if cm.matrix is not None else numpy.zeros((K, K), dtype=numpy.int64)
        cm.matrix, loss_sum, loss_pixels = distributed.all_reduce_evaluation(mine, loss_sum, loss_pixels)
        if rand is not None:
            distributed.all_reduce_sum(rand.sums)
            distributed.all_reduce_sum(rand.image_sums)
    scores = cm.compute()
    if rand is not None:
        scores.update(rand.compute(), pixel_error=None if scores["pixel_acc"] is None else 1.0 - scores["pixel_acc"])
    scores["loss"] = loss_sum / loss_pixels if loss_pixels else None
    return scores


def predict_array(model, image, mean, std, resize=None, inference=None, crf=None):
    """Class map (H, W) int64 for one (H, W, C) uint8 image, at the image's own size
    (a volume (D, H, W, C): (D, H, W)); ``inference``: options of ``inference.predict``, ``crf``: options
    of ``crf.dense_crf`` (images only)."""
    small = T.ResizeImage(resize)(image, None)[0] if resize is not None else image
    x, _ = T.Normalize(mean, std)(small, None)
    x = numpy.ascontiguousarray(numpy.moveaxis(x, -1, 0))[None]  # (1, C, h, w) or (1, C, d, h, w)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            x = backend.xp().asarray(x.astype(backend.get_default_dtype()))
            # tiled / flipped / multi-scale: the log of the averaged probabilities serves as logits
            if inference or crf is not None:
                logits = _probabilities(model, x, inference, crf, mean, std)
            else:
                logits = model(Tensor(x))
    finally:
        model.train(was_training)
    pred = predicted_labels(logits.data)  # (1, h, w) or (1, d, h, w)
    return backend.asnumpy(T.resize_mask(pred, image.shape[:-1])[0])
