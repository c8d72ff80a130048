"""The losses segmentation users reach for beyond cross-entropy, each a ``Function``
with its forward and backward written by hand (``docs/losses.md`` says when to use which).

    overlap.py   soft Dice, Jaccard (IoU) and Tversky: dice_loss, jaccard_loss, tversky_loss
    focal.py     focal loss (Lin et al. 2017): focal_loss
    lovasz.py    Lovász-Softmax and Lovász-hinge (Berman et al. 2018): lovasz_softmax, lovasz_hinge
    combine.py   BinaryCrossEntropyLoss (BCE on integer masks with ignore_index), WeightedSum,
                 parse_loss / make_criterion for ``--loss ce+0.5*dice``

Every loss takes logits (N, C, d1, ...) and integer labels (N, d1, ...):
``mode='multiclass'`` (softmax over C >= 2 channels) or ``mode='binary'`` (one
sigmoid channel, labels in {0, 1}); a binary loss given several channels, a
multi-class one given one channel, or a label outside the classes raises a
ValueError that names it. Every loss honours ``ignore_index``: ignored pixels
add nothing to the value and get a gradient of exactly 0.

    >>> import numpy as np
    >>> from scratchseg import losses
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    >>> t = np.random.default_rng(1).integers(0, 3, (2, 4, 4))
    >>> criterion = losses.make_criterion("ce+0.5*dice")
    >>> criterion
    WeightedSum(
      1*ce + 0.5*dice
      (terms): ModuleList(
        (0): CrossEntropyLoss()
        (1): DiceLoss(mode='multiclass', smooth=1.0, average='macro', ignore_index=-100)
      )
    )
    >>> criterion(x, t).shape
    ()
"""

from .combine import LOSS_NAMES, BinaryCrossEntropyLoss, WeightedSum, check_loss, make_criterion, parse_loss
from .focal import FocalLoss, focal_loss
from .lovasz import LovaszLoss, lovasz_hinge, lovasz_softmax
from .overlap import DiceLoss, JaccardLoss, TverskyLoss, dice_loss, jaccard_loss, tversky_loss

__all__ = ["dice_loss", "jaccard_loss", "tversky_loss", "focal_loss", "lovasz_softmax", "lovasz_hinge",
           "DiceLoss", "JaccardLoss", "TverskyLoss", "FocalLoss", "LovaszLoss", "BinaryCrossEntropyLoss",
           "WeightedSum", "LOSS_NAMES", "parse_loss", "check_loss", "make_criterion"]
