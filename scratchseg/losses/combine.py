"""Cross-entropy for masks, weighted sums of losses, and the loss names of ``--loss``.

``parse_loss("ce+0.5*dice")`` -> ``[(1.0, 'ce'), (0.5, 'dice')]``; an unknown
name is a ValueError that lists the known ones. ``make_criterion`` turns such a
spec into one module ``criterion(logits, masks)``.
"""

from __future__ import annotations

import re

import numpy

from .. import backend
from .. import functional as F
from ..nn.loss import CrossEntropyLoss
from ..nn.containers import ModuleList
from ..nn.module import Module
from ._common import as_data, prepare
from .focal import FocalLoss
from .lovasz import LovaszLoss
from .overlap import DiceLoss, JaccardLoss, TverskyLoss

__all__ = ["BinaryCrossEntropyLoss", "WeightedSum", "LOSS_NAMES", "parse_loss", "check_loss", "make_criterion"]

# name -> (what it is, the modes it works in)
LOSS_NAMES = {
    "ce": ("softmax cross-entropy", ("multiclass",)),
    "bce": ("sigmoid binary cross-entropy", ("binary",)),
    "dice": ("soft Dice", ("multiclass", "binary")),
    "jaccard": ("soft Jaccard (IoU)", ("multiclass", "binary")),
    "tversky": ("Tversky, alpha=0.3 beta=0.7", ("multiclass", "binary")),
    "focal": ("focal, gamma=2", ("multiclass", "binary")),
    "lovasz": ("Lovasz-Softmax (binary: Lovasz-hinge)", ("multiclass", "binary")),
}


class BinaryCrossEntropyLoss(Module):
    """``BCEWithLogitsLoss`` for integer masks: one logit (N, 1, d1, ...), labels (N, d1, ...) in {0, 1}.

    loss = sum_i w_i l_i / sum_i w_i over counted pixels, l_i the stable sigmoid
    BCE of ``functional.binary_cross_entropy_with_logits``, w_i = weight[y_i]
    (``weight``: None or the 2 weights of background and foreground) and 0 on
    ``ignore_index`` pixels: they add nothing and get zero gradient (the BCE's
    gradient is w_i (...)). Every pixel ignored: 0/0 = nan, as ``cross_entropy``.
    """

    def __init__(self, weight=None, pos_weight=None, ignore_index=-100):
        super().__init__()
        self.weight = None if weight is None else [float(w) for w in as_data(weight)]
        if self.weight is not None and len(self.weight) != 2:
            raise ValueError(f"BinaryCrossEntropyLoss: weight must be 2 numbers (background, foreground), got "
                             f"{self.weight}")
        self.pos_weight, self.ignore_index = pos_weight, int(ignore_index)

    def forward(self, input, target):
        x3, t, valid = prepare("binary cross-entropy", input, target, "binary", self.ignore_index)
        w = valid.astype(x3.dtype)  # (N, S)
        if self.weight is not None:
            xp = backend.get_array_module(w)
            w = w * xp.where(t == 1, self.weight[1], self.weight[0]).astype(w.dtype)
        total = float(w.sum())
        y = t.astype(x3.dtype)[:, None, :]  # (N, 1, S), 0 on ignored pixels (weight 0 there)
        loss = F.binary_cross_entropy_with_logits(x3, y, w[:, None, :], reduction="sum", pos_weight=self.pos_weight)
        return loss * (1.0 / total if total else float("nan"))


class WeightedSum(Module):
    """sum_k weight_k loss_k(input, target): ``WeightedSum([(1.0, CrossEntropyLoss()), (0.5, DiceLoss())])``.

    Composed from the terms' own Functions with Tensor ``*`` and ``+``, so its
    gradient is exactly sum_k weight_k dloss_k/dx.
    """

    def __init__(self, terms, names=None):
        super().__init__()
        terms = list(terms)
        if not terms:
            raise ValueError("WeightedSum needs at least one (weight, loss) term")
        self.weights = [float(w) for w, _ in terms]
        self.terms = ModuleList([loss for _, loss in terms])
        self.names = list(names) if names is not None else [type(loss).__name__ for _, loss in terms]

    def forward(self, input, target):
        total = None
        for w, loss in zip(self.weights, self.terms):
            value = loss(input, target)
            value = value if w == 1.0 else value * w
            total = value if total is None else total + value
        return total

    def extra_repr(self):
        return " + ".join(f"{w:g}*{n}" for w, n in zip(self.weights, self.names))


_TERM = re.compile(r"^(?:(?P<w>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*\*\s*)?(?P<name>[a-z_]+)$")


def parse_loss(spec):
    """``'ce+0.5*dice'`` -> ``[(1.0, 'ce'), (0.5, 'dice')]``; ValueError naming what is wrong."""
    known = ", ".join(LOSS_NAMES)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"loss must be a name or a sum such as 'ce+0.5*dice', got {spec!r}; known losses: {known}")
    terms = []
    for part in spec.lower().replace(" ", "").split("+"):
        m = _TERM.match(part)
        if not m:
            raise ValueError(f"cannot read {part!r} in loss {spec!r}: write NAME or WEIGHT*NAME joined by '+', "
                             f"e.g. 'ce+0.5*dice'; known losses: {known}")
        name = m.group("name")
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r} in {spec!r}; known losses: {known} "
                             "(combine them as 'ce+dice' or 'ce+0.5*dice')")
        weight = float(m.group("w")) if m.group("w") else 1.0
        if not weight > 0:
            raise ValueError(f"the weight of {name!r} in loss {spec!r} must be positive, got {weight}")
        terms.append((weight, name))
    return terms


def check_loss(spec, binary=False):
    """:func:`parse_loss`, and a ValueError for a loss that does not fit the model (``ce`` with one
    sigmoid channel, ``bce`` with a softmax over classes); returns the parsed terms."""
    terms = parse_loss(spec)
    mode = "binary" if binary else "multiclass"
    for _, name in terms:
        if mode not in LOSS_NAMES[name][1]:
            hint = "use 'bce' for a one-channel (--binary) model" if name == "ce" else \
                "it needs a one-channel sigmoid model (--binary); use 'ce' for a softmax model"
            raise ValueError(f"loss {name!r} does not fit a {'one-channel binary' if binary else 'multi-class'} "
                             f"model: {hint}")
    return terms


def make_criterion(spec, binary=False, ignore_index=-100, class_weights=None):
    """One module ``criterion(logits, masks)`` for the loss ``spec`` (see :func:`parse_loss`).

    ``binary``: the model has one sigmoid channel (``bce``; the overlap losses in
    binary mode; ``lovasz`` is the hinge). ``class_weights`` (a list, one per class
    of the task) go to ``ce`` and ``bce``. A loss that does not fit the model's
    mode is a ValueError.
    """
    mode = "binary" if binary else "multiclass"
    terms = []
    for weight, name in check_loss(spec, binary):
        if name == "ce":
            w = None if class_weights is None else backend.xp().asarray(
                numpy.asarray(class_weights, dtype=backend.get_default_dtype()))
            loss = CrossEntropyLoss(weight=w, ignore_index=ignore_index)
        elif name == "bce":
            loss = BinaryCrossEntropyLoss(weight=class_weights, ignore_index=ignore_index)
        elif name == "dice":
            loss = DiceLoss(mode, ignore_index=ignore_index)
        elif name == "jaccard":
            loss = JaccardLoss(mode, ignore_index=ignore_index)
        elif name == "tversky":
            loss = TverskyLoss(mode, alpha=0.3, beta=0.7, ignore_index=ignore_index)
        elif name == "focal":
            loss = FocalLoss(mode, gamma=2.0, ignore_index=ignore_index)
        else:
            loss = LovaszLoss(mode, ignore_index=ignore_index)
        terms.append((weight, loss))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return WeightedSum(terms, names=[name for _, name in parse_loss(spec)])
