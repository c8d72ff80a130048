"""Segmentation networks, built by name.

``create(name, num_classes=..., in_channels=3, **options)`` builds one;
``available()`` lists the names. Every network maps ``(N, in_channels, H, W)``
to class scores ``(N, num_classes, H, W)`` for any ``H, W`` (the original
U-Net on a valid tile gives the paper's smaller map: 572 -> 388); ``unet3d``
maps volumes ``(N, in_channels, D, H, W)`` to ``(N, num_classes, D, H, W)``.

=================  ==========================================  =====================================
name               model (file)                                full size of the paper
=================  ==========================================  =====================================
``fcn32s``         FCN-32s, Long et al. 2015 (``fcn.py``)      ``width=1.0``
``fcn16s``         FCN-16s, pool4 skip                         ``width=1.0``
``fcn8s``          FCN-8s, pool4 + pool3 skips                 ``width=1.0`` (134,489,759 params, 21 classes)
``unet``           U-Net, padded, batchnorm (``unet.py``)      ``base=64``
``unet_original``  U-Net, Ronneberger et al. 2015, valid convs ``base=64`` (31,030,658 params, 1 in, 2 classes)
``unet3d``         3-D U-Net, Çiçek et al. (``unet3d.py``)    ``base=32`` (19,069,955 params, 3 in, 3 classes)
``deeplabv1``      DeepLab-LargeFOV on VGG16 (``deeplab.py``)  ``width=1.0``
``deeplabv2``      DeepLab v2, ASPP summed, output stride 8    ``backbone='resnet101', width=1.0``
``deeplabv3``      DeepLab v3, ASPP + image pooling            ``backbone='resnet101', width=1.0``
``deeplabv3plus``  DeepLab v3+, v3 + low-level decoder         ``backbone='resnet101', width=1.0``
``hypercolumn``    Hariharan et al. 2015 (``hypercolumn.py``)  ``width=1.0``
=================  ==========================================  =====================================

The defaults are small enough to train on a CPU (U-Net ``base=16``, VGG
``width=1/8``, ResNet-18 at ``width=1/4``), except ``unet_original``, which
is the paper's network unless told otherwise (``base=16`` makes it small). Each model keeps its settings in
``model.config`` (a dataclass); unknown options raise a ``TypeError`` that
lists the valid ones. Up-sampling blocks (transposed convolution, resize +
convolution, bilinear, trilinear) are in ``upsampling.py``; the VGG16 and
ResNet backbones in ``backbones.py``.

Example -- one training step of a small U-Net on random data::

    >>> import numpy
    >>> import scratchseg
    >>> import scratchseg.functional as F
    >>> from scratchseg import models
    >>> _ = scratchseg.manual_seed(0)
    >>> model = models.create("unet", num_classes=3, in_channels=1, base=4, depth=2)
    >>> images = scratchseg.randn(2, 1, 21, 30)
    >>> masks = numpy.random.default_rng(0).integers(0, 3, size=(2, 21, 30))
    >>> logits = model(images)
    >>> logits.shape
    (2, 3, 21, 30)
    >>> loss = F.cross_entropy(logits, masks)
    >>> loss.backward()
    >>> all(p.grad is not None for p in model.parameters())
    True
    >>> "fcn8s" in models.available()
    True
"""

from __future__ import annotations

import dataclasses

from ..args import positive_int
from . import backbones, deeplab, fcn, hypercolumn, unet, unet3d, upsampling
from .upsampling import bilinear_kernel, make_upsample

__all__ = ["create", "available", "count_parameters", "bilinear_kernel", "make_upsample"]

_REGISTRY = {
    "fcn32s": fcn.fcn32s,
    "fcn16s": fcn.fcn16s,
    "fcn8s": fcn.fcn8s,
    "unet": unet.unet,
    "unet_original": unet.unet_original,
    "unet3d": unet3d.unet3d,
    "deeplabv1": deeplab.deeplabv1,
    "deeplabv2": deeplab.deeplabv2,
    "deeplabv3": deeplab.deeplabv3,
    "deeplabv3plus": deeplab.deeplabv3plus,
    "hypercolumn": hypercolumn.hypercolumn,
}


def available():
    """The model names ``create`` accepts, sorted."""
    return sorted(_REGISTRY)


def create(name, num_classes=None, in_channels=3, **options):
    """Build the model ``name`` for ``num_classes`` classes and ``in_channels`` input channels.

    ``options`` are the fields of the model's config dataclass (e.g.
    ``base=64`` for U-Net, ``width=1.0`` for FCN, ``backbone='resnet101'``
    for DeepLab).

    >>> create("unet", num_classes=2, base=4, depth=2).config.base
    4
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    num_classes = positive_int(num_classes, "num_classes", f"create({name!r})")
    in_channels = positive_int(in_channels, "in_channels", f"create({name!r})")
    build = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(build.config_class)} - {"num_classes", "in_channels"}
    fields -= set(getattr(build, "fixed_options", ()))
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"create({name!r}): unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    return build(num_classes, in_channels=in_channels, **options)


def count_parameters(model):
    """Number of scalar parameters of ``model``."""
    return sum(int(p.data.size) for p in model.parameters())
