"""Hypercolumns for pixel classification.

Hariharan, Arbelaez, Girshick & Malik, "Hypercolumns for Object Segmentation
and Fine-grained Localization", CVPR 2015.

The idea: the *hypercolumn* of a pixel is the vector of all the activations
above it, through every depth of the network -- shallow layers say where an
edge is, deep layers what the object is. Feature maps from several depths are
up-sampled bilinearly to the full resolution, concatenated per pixel (the
concatenation is in ``Hypercolumn.forward``), and a small per-pixel classifier
(1x1 convolutions) labels each pixel.

As in the paper, the taps are VGG16's pool2, conv4 (conv4_3) and fc7 (here
fc6/fc7 are convolutions over pool5, 3x3 and 1x1). The paper notes that the
first classifier layer is linear, so it could be applied *before* the
up-sampling (cheaper: the same numbers); the literal order is kept here
because it reads like the definition.

Sizes: ``width`` multiplies VGG16's channels, fc6/fc7's ``fc_channels``
(1024) and the classifier's ``hidden`` (512). The default 1/8 trains on a
CPU; ``width=1.0`` is the full network.

    >>> import scratchseg
    >>> net = Hypercolumn(HypercolumnConfig(num_classes=4, width=1 / 32))
    >>> net(scratchseg.randn(1, 3, 33, 47)).shape
    (1, 4, 33, 47)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import scratchseg
from scratchseg import functional as F
from scratchseg import nn
from scratchseg.args import check_image_batch

from .backbones import VGG16, scaled

__all__ = ["HypercolumnConfig", "Hypercolumn", "hypercolumn"]


@dataclass
class HypercolumnConfig:
    num_classes: int = 21
    in_channels: int = 3
    width: float = 0.125
    taps: Tuple[str, ...] = ("pool2", "conv4", "fc7")  # any of VGG16's conv1..5 / pool1..5, and 'fc7'
    fc_channels: int = 1024
    hidden: int = 512


class Hypercolumn(nn.Module):
    """VGG16 + fc6/fc7 convolutions; taps up-sampled to (H, W), concatenated, 1x1 classifier.

    Shape:
        (N, in_channels, H, W) -> hypercolumns (N, sum of tap channels, H, W)
        -> (N, num_classes, H, W)
    """

    def __init__(self, config: HypercolumnConfig):
        super().__init__()
        self.config = config
        self.backbone = VGG16(config.in_channels, width=config.width, pool="3x3")
        fc = scaled(config.fc_channels, config.width)
        if "fc7" in config.taps:  # built only when read, so every parameter gets a gradient
            self.fc6 = nn.Conv2d(self.backbone.out_channels["pool5"], fc, 3, padding=1)
            self.fc7 = nn.Conv2d(fc, fc, 1)
            self.relu = nn.ReLU()
        channels = dict(self.backbone.out_channels, fc7=fc)
        unknown = [t for t in config.taps if t not in channels]
        if unknown or not config.taps:
            raise ValueError(f"hypercolumn taps must be a non-empty subset of {sorted(channels)}, got {config.taps!r}")
        hidden = scaled(config.hidden, config.width)
        self.classifier = nn.Sequential(
            nn.Conv2d(sum(channels[t] for t in config.taps), hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, config.num_classes, 1),
        )

    def forward(self, x):
        _, _, H, W = check_image_batch(x, self.config.in_channels, "Hypercolumn")
        feats = self.backbone(x)
        if "fc7" in self.config.taps:
            feats["fc7"] = self.relu(self.fc7(self.relu(self.fc6(feats["pool5"]))))
        # every tap to full resolution, then one long feature vector per pixel: the hypercolumn
        columns = [F.interpolate(feats[t], size=(H, W), mode="bilinear", align_corners=False) for t in self.config.taps]
        hypercolumns = scratchseg.cat(columns, dim=1)  # (N, sum C_tap, H, W)
        return self.classifier(hypercolumns)


def hypercolumn(num_classes, in_channels=3, **options):
    """The hypercolumn network; options: width (1.0 = full VGG16), taps, fc_channels, hidden."""
    if "taps" in options:
        options["taps"] = tuple(options["taps"])
    return Hypercolumn(HypercolumnConfig(num_classes=num_classes, in_channels=in_channels, **options))


hypercolumn.config_class = HypercolumnConfig
