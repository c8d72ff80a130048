"""3-D U-Net: U-Net in volumes.

Çiçek, Abdulkadir, Lienkamp, Brox & Ronneberger, "3D U-Net: Learning Dense
Volumetric Segmentation from Sparse Annotation", MICCAI 2016.

The 2-D U-Net (``unet.py``) with every operation one dimension up: 3x3x3
convolutions, 2x2x2 max pooling, 2x2x2 up-convolutions, and the encoder's
feature maps concatenated to the decoder's at every level. Two details follow
the paper rather than the 2-D U-Net:

* the channels double *inside* each encoder level, before the pooling
  (32 -> 64 at the first level, then 64 -> 128, 128 -> 256, 256 -> 512 at the
  bottom), "to avoid bottlenecks" (section 2), instead of at the first
  convolution of the next level;
* the up-convolution keeps the channel count (512 up-convolved is 512,
  concatenated with the 256 of the skip: 768 -> 256 -> 256).

Every convolution is followed by normalization (batch norm in the paper; group
norm or none here on request) and a ReLU. Convolutions are 'same' (padding 1),
so the output has the input's size: the input is zero-padded to a multiple of
``2**depth`` on each axis and the output cropped back, as the padded 2-D U-Net
does (``pad_to_multiple``).

``up_mode``: ``'transposed'`` (the paper's 2x2x2 up-convolution, stride 2) or
``'trilinear'`` (fixed trilinear up-sampling, then a learnable 3x3x3
convolution: the resize-convolution of Odena et al. 2016 in volumes, which has
no checkerboard artefacts).

Sizes: ``base`` is the first convolution's width (32 in the paper, whose
network, ``base=32, depth=3``, 3 input channels and 3 classes, has 19,069,955
parameters: convolutions with biases, up-convolutions without, and batch
norm's scale and shift not counted); the default ``base=4`` (298,616
parameters for one channel and 4 classes) trains on a CPU in minutes.

    >>> import scratchseg
    >>> net = UNet3D(UNet3DConfig(num_classes=3, in_channels=3, base=32, depth=3, norm=None))
    >>> net.num_parameters()   # the paper's count (section 2)
    19069955
    >>> small = UNet3D(UNet3DConfig(num_classes=2, in_channels=1, base=2, depth=2))
    >>> small(scratchseg.randn(1, 1, 5, 7, 6)).shape   # any size: padded to 8x8x8, cropped back
    (1, 2, 5, 7, 6)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import scratchseg
from scratchseg import nn
from scratchseg.args import check_volume_batch, positive_int

from .unet import pad_to_multiple
from .upsampling import Interpolate

__all__ = ["UNet3DConfig", "DoubleConv3d", "TrilinearConv", "Up3d", "UNet3D", "unet3d", "NORMS", "UP_MODES"]

NORMS = ("batch", "group", None)
UP_MODES = ("transposed", "trilinear")


@dataclass
class UNet3DConfig:
    num_classes: int = 2
    in_channels: int = 1
    base: int = 4  # width of the first convolution; 32 in the paper
    depth: int = 3  # number of 2x2x2 poolings; 3 in the paper
    up_mode: str = "transposed"  # 'transposed' (2x2x2 up-convolution) or 'trilinear' (+ 3x3x3 convolution)
    norm: Optional[str] = "batch"  # 'batch' (the paper), 'group' (small batches) or None


def _norm(kind, channels):
    """The normalization after a convolution: BatchNorm3d, GroupNorm (up to 8 groups) or nothing."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)  # groups must divide the channels
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class DoubleConv3d(nn.Module):
    """(3x3x3 conv -> norm -> ReLU) twice: one level, ``in_ch -> mid_ch -> out_ch``.

    Shape:
        (N, in_ch, D, H, W) -> (N, out_ch, D, H, W)
    """

    def __init__(self, in_ch, mid_ch, out_ch, norm="batch"):
        super().__init__()
        bias = norm is None  # a bias right before a normalization is cancelled by its mean subtraction
        self.conv1 = nn.Conv3d(in_ch, mid_ch, 3, padding=1, bias=bias)
        self.norm1 = _norm(norm, mid_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv3d(mid_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, out_ch)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        x = self.relu1(self.norm1(self.conv1(x)))
        return self.relu2(self.norm2(self.conv2(x)))


class TrilinearConv(nn.Module):
    """Trilinear up-sampling x2, then a 3x3x3 convolution (learnable, like the up-convolution it replaces).

    Shape:
        (N, C, D, H, W) -> (N, C, 2D, 2H, 2W)
    """

    def __init__(self, channels):
        super().__init__()
        self.resize = Interpolate(channels, channels, 2, mode="trilinear")
        self.conv = nn.Conv3d(channels, channels, 3, padding=1, bias=False)  # as the up-convolution: no bias

    def forward(self, x):
        return self.conv(self.resize(x))


class Up3d(nn.Module):
    """One synthesis step: up-sample x2 (channels kept), concatenate the skip, DoubleConv3d.

    Shape:
        x (N, in_ch, d, h, w), skip (N, skip_ch, 2d, 2h, 2w) -> (N, out_ch, 2d, 2h, 2w)
    """

    def __init__(self, in_ch, skip_ch, out_ch, up_mode="transposed", norm="batch"):
        super().__init__()
        if up_mode == "transposed":
            # the paper's 2x2x2 up-convolution; no bias (its parameter count has none), the next conv has one
            self.upsample = nn.ConvTranspose3d(in_ch, in_ch, 2, stride=2, bias=False)
        else:
            self.upsample = TrilinearConv(in_ch)
        self.conv = DoubleConv3d(in_ch + skip_ch, out_ch, out_ch, norm)

    def forward(self, x, skip):
        x = self.upsample(x)  # (N, in_ch, 2d, 2h, 2w)
        x = scratchseg.cat([skip, x], dim=1)  # skip connection: (N, skip_ch + in_ch, 2d, 2h, 2w)
        return self.conv(x)


class UNet3D(nn.Module):
    """Analysis path of ``depth + 1`` levels, synthesis path of ``depth`` Up3d steps, 1x1x1 classifier.

    Widths (``b = base``): level ``i`` maps to ``b * 2**i`` then ``b * 2**(i+1)`` channels
    (level 0: in -> b -> 2b; the bottom, level ``depth``: -> ``b * 2**(depth+1)``); the
    decoder step back to level ``i`` ends with ``b * 2**(i+1)`` channels.

    Shape:
        (N, in_channels, D, H, W) -> (N, num_classes, D, H, W), any D, H, W >= 1
    """

    def __init__(self, config: UNet3DConfig):
        super().__init__()
        if config.up_mode not in UP_MODES:
            raise ValueError(f"3-D U-Net up_mode must be 'transposed' or 'trilinear', got {config.up_mode!r}")
        if config.norm in ("none", "None", ""):
            config.norm = None  # as the command line writes it
        if config.norm not in NORMS:
            raise ValueError(f"3-D U-Net norm must be 'batch', 'group' or None, got {config.norm!r}")
        positive_int(config.depth, "depth", "3-D U-Net")
        positive_int(config.base, "base", "3-D U-Net")
        self.config = config
        b = config.base
        self.down = nn.ModuleList()
        c = config.in_channels
        for i in range(config.depth + 1):  # e.g. 3 -> 32 -> 64, 64 -> 64 -> 128, ..., 256 -> 256 -> 512
            self.down.append(DoubleConv3d(c, b * 2**i, b * 2 ** (i + 1), config.norm))
            c = b * 2 ** (i + 1)
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        for i in reversed(range(config.depth)):  # e.g. 512 (+256) -> 256, 256 (+128) -> 128, 128 (+64) -> 64
            skip = b * 2 ** (i + 1)
            self.up.append(Up3d(c, skip, skip, config.up_mode, config.norm))
            c = skip
        self.head = nn.Conv3d(c, config.num_classes, 1)
        # He et al.'s Gaussian, std sqrt(2 / fan_in), as the 2-D U-Net: the signal keeps its scale without norm
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def _forward(self, x):
        skips = []
        for i, level in enumerate(self.down):
            x = level(x)  # (N, 2b * 2**i, D / 2**i, H / 2**i, W / 2**i)
            if i < self.config.depth:
                skips.append(x)  # kept for the synthesis path's concatenation
                x = self.pool(x)
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip)
        return self.head(x)  # (N, num_classes, D, H, W)

    def forward(self, x):
        check_volume_batch(x, self.config.in_channels, "3-D U-Net")
        # pad to a multiple of 2**depth so every pool halves an even size, then crop back
        x, window = pad_to_multiple(x, 2**self.config.depth, dims=3)
        out = self._forward(x)
        return out[window] if window else out


def unet3d(num_classes, in_channels=1, **options):
    """The 3-D U-Net (output size = input size); options: base, depth, up_mode ('transposed' or
    'trilinear'), norm ('batch', 'group' or None)."""
    return UNet3D(UNet3DConfig(num_classes=num_classes, in_channels=in_channels, **options))


unet3d.config_class = UNet3DConfig
