"""DeepLab v1, v2, v3 and v3+.

* v1: Chen, Papandreou, Kokkinos, Murphy & Yuille, "Semantic Image
  Segmentation with Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015.
* v2: Chen et al., "DeepLab: Semantic Image Segmentation with Deep
  Convolutional Nets, Atrous Convolution, and Fully Connected CRFs", TPAMI 2018.
* v3: Chen, Papandreou, Schroff & Adam, "Rethinking Atrous Convolution for
  Semantic Image Segmentation", arXiv 2017.
* v3+: Chen, Zhu, Papandreou, Schroff & Adam, "Encoder-Decoder with Atrous
  Separable Convolution for Semantic Image Segmentation", ECCV 2018.

The idea running through all four: *atrous* (dilated) convolution. Instead of
striding the last stages of the backbone (which loses resolution), keep the
resolution (output stride 8 or 16) and spread the 3x3 taps apart by the
dilation rate, so the field of view still grows at no extra cost. Then look at
several scales at once:

* v1 (``DeepLabV1``): VGG16 with pool4/pool5 unstrided, conv5 dilated by 2,
  and "LargeFOV" fc6: a 3x3 convolution with dilation 12. (The dense CRF
  post-processing of the paper is not part of the network and not included.)
* v2 (``ASPPv2``): atrous spatial pyramid pooling -- four parallel 3x3
  branches with rates 6, 12, 18, 24, each predicting class scores, *summed*.
* v3 (``ASPP``): a 1x1 branch, three 3x3 atrous branches (6, 12, 18 at output
  stride 16, doubled at 8) and an image-level pooling branch, each with
  batchnorm, *concatenated* and projected by a 1x1 convolution.
* v3+ (``DeepLabV3Plus``): v3 as the encoder plus a light decoder: low-level
  (stride 4) features projected to 48 channels, concatenated with the ASPP
  output up-sampled to their size, two 3x3 convolutions, then the final
  up-sampling to the input size.

All predict at output stride 8 or 16 and interpolate bilinearly (align_corners
False) to exactly the input size, so any input size works without padding.

Batch size 1: the image-pooling branch reduces each image to one value per
channel, so batchnorm there would see a single value per channel for a batch
of one (torch raises "Expected more than 1 value per channel when training").
Here that branch's 1x1 convolution has a bias and *no batchnorm*: the same
behaviour for every batch size, in training and evaluation.

Sizes: ``width`` multiplies the ResNet base width (64), the ASPP channels
(256) and the v3+ decoder's 48 and 256; ``backbone`` is ``'resnet18'``,
``'resnet34'``, ``'resnet50'`` or ``'resnet101'`` (``layers`` overrides the
block counts). Defaults (``resnet18``, ``width=0.25``) train on a CPU;
``backbone='resnet101', width=1.0`` is the papers' configuration. v1 takes a
VGG16 ``width`` (default 1/8; 1.0 is the paper's).

    >>> import scratchseg
    >>> net = DeepLabV3Plus(DeepLabConfig(num_classes=3, width=1 / 16, layers=(1, 1, 1, 1)))
    >>> net(scratchseg.randn(1, 3, 33, 47)).shape
    (1, 3, 33, 47)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import scratchseg
from scratchseg import functional as F
from scratchseg import nn
from scratchseg.args import check_image_batch
from scratchseg.backend import get_array_module

from .backbones import VGG16, resnet, scaled

__all__ = [
    "DeepLabV1Config",
    "DeepLabConfig",
    "DeepLabV1",
    "ASPPv2",
    "DeepLabV2",
    "ImagePooling",
    "ASPP",
    "DeepLabV3",
    "DeepLabV3Plus",
    "deeplabv1",
    "deeplabv2",
    "deeplabv3",
    "deeplabv3plus",
    "set_output_stride",
]


@dataclass
class DeepLabV1Config:
    num_classes: int = 21
    in_channels: int = 3
    width: float = 0.125  # VGG16 width multiplier; 1.0 = paper
    fc_channels: int = 1024  # LargeFOV fc6/fc7 (scaled by width)
    rate: int = 12  # LargeFOV dilation of fc6
    dropout: float = 0.5


@dataclass
class DeepLabConfig:
    num_classes: int = 21
    in_channels: int = 3
    backbone: str = "resnet18"
    width: float = 0.25  # ResNet base 64*width, ASPP 256*width, decoder 48*width and 256*width
    layers: Optional[Tuple[int, int, int, int]] = None  # override the backbone's block counts
    output_stride: int = 16
    rates: Optional[Tuple[int, ...]] = None  # None: the paper's rates for the version and output stride
    dropout: float = 0.1  # after the ASPP projection (v3, v3+)


def _upsample_to(x, size):
    """Bilinear interpolation of the score map to the input's ``(H, W)``."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------- v1
class DeepLabV1(nn.Module):
    """VGG16 at output stride 8 + LargeFOV head (fc6 3x3 dilation 12, fc7 1x1, fc8 scores).

    Shape:
        (N, in_channels, H, W) -> (N, num_classes, H, W); scores at ceil(H/8) x ceil(W/8).
    """

    def __init__(self, config: DeepLabV1Config):
        super().__init__()
        self.config = config
        self.backbone = VGG16(config.in_channels, width=config.width, pool="3x3", output_stride=8)
        c5, fc, r = self.backbone.out_channels["pool5"], scaled(config.fc_channels, config.width), config.rate
        # LargeFOV: a 3x3 kernel dilated by 12 sees as far as VGG's 7x7 fc6 over a stride-32 grid
        self.fc6 = nn.Conv2d(c5, fc, 3, padding=r, dilation=r)
        self.relu6 = nn.ReLU()
        self.drop6 = nn.Dropout(config.dropout)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.relu7 = nn.ReLU()
        self.drop7 = nn.Dropout(config.dropout)
        self.fc8 = nn.Conv2d(fc, config.num_classes, 1)

    def forward(self, x):
        check_image_batch(x, self.config.in_channels, "DeepLabV1")
        h = self.backbone(x)["pool5"]  # (N, c5, ~H/8, ~W/8)
        h = self.drop6(self.relu6(self.fc6(h)))
        h = self.drop7(self.relu7(self.fc7(h)))
        return _upsample_to(self.fc8(h), x.shape[2:])


# --------------------------------------------------------------------- v2
class ASPPv2(nn.Module):
    """DeepLab v2's ASPP: parallel 3x3 atrous convolutions straight to class scores, summed.

    out = sum_r conv3x3_{dilation r}(x)

    Shape:
        (N, C, h, w) -> (N, num_classes, h, w) (padding = rate keeps the size)
    """

    def __init__(self, in_ch, num_classes, rates=(6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(in_ch, num_classes, 3, padding=r, dilation=r) for r in rates])

    def forward(self, x):
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)  # ASPP v2: the branches' scores are summed
        return out


class DeepLabV2(nn.Module):
    """ResNet at output stride 8 (default) + ASPP v2.

    Shape:
        (N, in_channels, H, W) -> (N, num_classes, H, W)
    """

    def __init__(self, config: DeepLabConfig):
        super().__init__()
        self.config = config
        self.backbone = _resnet(config)
        self.aspp = ASPPv2(self.backbone.out_channels["layer4"], config.num_classes, config.rates or (6, 12, 18, 24))

    def forward(self, x):
        check_image_batch(x, self.config.in_channels, "DeepLabV2")
        return _upsample_to(self.aspp(self.backbone(x)["layer4"]), x.shape[2:])


# --------------------------------------------------------------------- v3
def _conv_bn_relu(in_ch, out_ch, kernel_size=1, dilation=1):
    """conv (no bias: batchnorm follows) -> batchnorm -> ReLU."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class ImagePooling(nn.Module):
    """The image-level branch of ASPP: global average -> 1x1 conv (with bias, no batchnorm) -> ReLU -> broadcast.

    No batchnorm on purpose: the pooled map has one value per channel and
    image, so batch statistics over a batch of one are undefined (see the
    module docstring).

    Shape:
        (N, C, h, w) -> (N, out_ch, h, w), constant over each map
    """

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_ch, out_ch, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        h, w = x.shape[2], x.shape[3]
        y = self.relu(self.conv(self.pool(x)))  # (N, out_ch, 1, 1)
        # bilinear up-sampling of a 1x1 map copies it everywhere: a broadcast does that exactly
        xp = get_array_module(y.data)
        return y * xp.ones((1, 1, h, w), dtype=y.dtype)  # (N, out_ch, h, w)


class ASPP(nn.Module):
    """DeepLab v3's ASPP: 1x1, three atrous 3x3 and image pooling branches, concatenated, projected.

    Shape:
        (N, C, h, w) -> (N, out_ch, h, w); the concatenation is (N, 5*out_ch, h, w)
    """

    def __init__(self, in_ch, out_ch, rates=(6, 12, 18), dropout=0.1):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_ch, out_ch, 1)]
            + [_conv_bn_relu(in_ch, out_ch, 3, dilation=r) for r in rates]
            + [ImagePooling(in_ch, out_ch)]
        )
        self.project = nn.Sequential(
            nn.Conv2d(len(self.branches) * out_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
            nn.Dropout(dropout),
        )

    def set_rates(self, rates):
        """Give the three atrous branches new dilation rates in place (same weights, padding = rate)."""
        atrous = [branch[0] for branch in self.branches[1:-1]]  # the conv of each 3x3 conv-bn-relu
        rates = tuple(int(r) for r in rates)
        if len(rates) != len(atrous) or min(rates) < 1:
            raise ValueError(f"ASPP has {len(atrous)} atrous branches; expected {len(atrous)} positive rates, "
                             f"got {rates}")
        for conv, r in zip(atrous, rates):
            conv.dilation = conv.padding = (r, r)
        return self

    def forward(self, x):
        # ASPP v3: every branch sees the same features at its own scale; concatenated along channels
        return self.project(scratchseg.cat([branch(x) for branch in self.branches], dim=1))


def _resnet(config):
    return resnet(
        config.backbone,
        in_channels=config.in_channels,
        base=scaled(64, config.width),
        output_stride=config.output_stride,
        layers=config.layers,
    )


def _v3_rates(config):
    if config.rates is not None:
        return tuple(config.rates)
    # the rates are in units of the feature grid: twice the resolution needs twice the rate
    return (6, 12, 18) if config.output_stride == 16 else tuple(2 * r for r in (6, 12, 18))


def set_output_stride(model, output_stride):
    """Evaluate a v3 / v3+ model at another output stride with the same weights, as DeepLab v3 does.

    Trained at output stride 16, evaluated at 8: ``layer3`` of the backbone
    stops striding and dilates by 2 (``layer4`` by 4), and every ASPP rate
    doubles, since the rates count steps of a feature grid that is now twice
    as fine (6, 12, 18 -> 12, 24, 36). No parameter is added or changed; the
    features are 4x as many, so it costs about 4x in the last two stages.
    """
    if output_stride not in (8, 16):
        raise ValueError(f"DeepLab v3/v3+ output_stride must be 8 or 16, got {output_stride!r}")
    config = model.config
    rates = _v3_rates(config)
    scaled_rates = [r * config.output_stride / output_stride for r in rates]
    if any(r != int(r) for r in scaled_rates):
        raise ValueError(f"the ASPP rates {rates} at output stride {config.output_stride} have no whole-number "
                         f"equivalent at output stride {output_stride}")
    model.backbone.set_output_stride(output_stride)
    model.aspp.set_rates([int(r) for r in scaled_rates])
    model.config = dataclasses.replace(config, output_stride=output_stride,
                                       rates=None if config.rates is None else tuple(int(r) for r in scaled_rates))
    return model


class DeepLabV3(nn.Module):
    """ResNet at output stride 16 (default) + ASPP + 1x1 classifier.

    Shape:
        (N, in_channels, H, W) -> (N, num_classes, H, W)
    """

    def __init__(self, config: DeepLabConfig):
        super().__init__()
        self.config = config
        self.backbone = _resnet(config)
        c = scaled(256, config.width)
        self.aspp = ASPP(self.backbone.out_channels["layer4"], c, _v3_rates(config), config.dropout)
        self.classifier = nn.Conv2d(c, config.num_classes, 1)

    def set_output_stride(self, output_stride):
        """The same weights at output stride 8 or 16 (see ``set_output_stride``); returns the model."""
        return set_output_stride(self, output_stride)

    def forward(self, x):
        check_image_batch(x, self.config.in_channels, "DeepLabV3")
        h = self.aspp(self.backbone(x)["layer4"])
        return _upsample_to(self.classifier(h), x.shape[2:])


class DeepLabV3Plus(nn.Module):
    """DeepLab v3 encoder + decoder that fuses stride-4 low-level features.

    Shape:
        (N, in_channels, H, W) -> (N, num_classes, H, W); the decoder runs at the
        stride-4 resolution of ``layer1``.
    """

    def __init__(self, config: DeepLabConfig):
        super().__init__()
        self.config = config
        self.backbone = _resnet(config)
        c, low, dec = scaled(256, config.width), scaled(48, config.width), scaled(256, config.width)
        self.aspp = ASPP(self.backbone.out_channels["layer4"], c, _v3_rates(config), config.dropout)
        # few low-level channels (48 of 256) so they refine, not outvote, the semantic ASPP features
        self.reduce = _conv_bn_relu(self.backbone.out_channels["layer1"], low, 1)
        self.decoder = nn.Sequential(_conv_bn_relu(c + low, dec, 3), _conv_bn_relu(dec, dec, 3))
        self.classifier = nn.Conv2d(dec, config.num_classes, 1)

    def set_output_stride(self, output_stride):
        """The same weights at output stride 8 or 16 (see ``set_output_stride``); returns the model."""
        return set_output_stride(self, output_stride)

    def forward(self, x):
        check_image_batch(x, self.config.in_channels, "DeepLabV3Plus")
        feats = self.backbone(x)
        low = self.reduce(feats["layer1"])  # (N, 48w, ~H/4, ~W/4)
        h = _upsample_to(self.aspp(feats["layer4"]), low.shape[2:])  # ASPP output, ~4x up to the low-level grid
        h = scratchseg.cat([h, low], dim=1)  # decoder: encoder output + low-level features
        h = self.classifier(self.decoder(h))
        return _upsample_to(h, x.shape[2:])


# ----------------------------------------------------------------- builders
def deeplabv1(num_classes, in_channels=3, **options):
    """DeepLab v1 LargeFOV on VGG16; options: width (1.0 = paper), fc_channels, rate, dropout."""
    return DeepLabV1(DeepLabV1Config(num_classes=num_classes, in_channels=in_channels, **options))


def deeplabv2(num_classes, in_channels=3, **options):
    """DeepLab v2 (ASPP, summed scores) on a ResNet at output stride 8."""
    options.setdefault("output_stride", 8)
    return DeepLabV2(DeepLabConfig(num_classes=num_classes, in_channels=in_channels, **options))


def deeplabv3(num_classes, in_channels=3, **options):
    """DeepLab v3 (ASPP with image pooling) on a ResNet at output stride 16."""
    return DeepLabV3(DeepLabConfig(num_classes=num_classes, in_channels=in_channels, **options))


def deeplabv3plus(num_classes, in_channels=3, **options):
    """DeepLab v3+ (v3 encoder + low-level decoder) on a ResNet at output stride 16."""
    return DeepLabV3Plus(DeepLabConfig(num_classes=num_classes, in_channels=in_channels, **options))


deeplabv1.config_class = DeepLabV1Config
deeplabv2.config_class = deeplabv3.config_class = deeplabv3plus.config_class = DeepLabConfig
