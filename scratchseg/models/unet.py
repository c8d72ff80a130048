"""U-Net, the original and the padded variant.

Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical
Image Segmentation", MICCAI 2015.

The idea: a contracting path (3x3 convolutions, 2x2 max-pool, channels
doubling) captures context; a symmetric expanding path (2x2 up-convolution
halving the channels, then 3x3 convolutions) recovers resolution, and at every
level the encoder's feature map is *concatenated* to the decoder's (the skip
connections, in ``Up.forward``), so the fine detail lost by pooling comes back.

Two flavours:

* **original** (``padding=False``, ``batchnorm=False``): unpadded ("valid")
  convolutions, so every 3x3 convolution trims a pixel on each side and the
  encoder maps are larger than the decoder's: they are centre-cropped before
  the concatenation. A 572x572 tile gives a 388x388 map -- the segmentation of
  the tile's centre. Any other size is handled with the paper's
  *overlap-tile* strategy (``tiling``, below).
* **padded** (the default ``unet``): 'same' 3x3 convolutions with batchnorm,
  so the output matches the input; the input is zero-padded to a multiple of
  ``2**depth`` (so every pooling halves an even size and every concatenation
  matches) and the output cropped back.

``tiling`` (original only): ``'valid'`` is the paper's network as it is
(output smaller by a fixed margin, 184 pixels at depth 4; an input whose
poolings would meet an odd size raises); ``'same'`` mirrors the input by
that margin (plus what makes the size a valid tile) so the output covers
the input exactly, ``(N, K, H, W)``; ``'auto'`` (default) is ``'valid'``
when the size is a valid tile (572 -> 388) and ``'same'`` otherwise.

Sizes: ``base`` is the first level's channel count (64 in the paper). The
padded ``unet`` defaults to ``base=16``, which trains on a CPU. The name
``unet_original`` promises the paper's network, so it defaults to
``base=64``: ``create("unet_original", num_classes=2, in_channels=1)`` has
the paper's 31,030,658 parameters (pass ``base=16`` for a CPU-sized one).

    >>> import scratchseg
    >>> net = UNet(UNetConfig(num_classes=2, in_channels=1, base=2, padding=False, batchnorm=False))
    >>> net(scratchseg.randn(1, 1, 188, 188)).shape   # a valid tile: 188 -> 4
    (1, 2, 4, 4)
    >>> valid_output_size(572, depth=4)
    388
"""

from __future__ import annotations

from dataclasses import dataclass

import scratchseg
from scratchseg import functional as F
from scratchseg import nn
from scratchseg.args import check_image_batch, positive_int

from .upsampling import MODES, SubPixel, make_upsample

__all__ = ["UNetConfig", "DoubleConv", "Up", "UNet", "valid_output_size", "mirror_pad", "pad_to_multiple", "unet",
           "unet_original"]


@dataclass
class UNetConfig:
    num_classes: int = 2
    in_channels: int = 3
    base: int = 16  # channels of the first level; 64 in the paper
    depth: int = 4  # number of 2x2 poolings
    padding: bool = True  # 'same' 3x3 convolutions (False: the paper's valid ones)
    batchnorm: bool = True
    up_mode: str = "transposed"  # 'transposed' (2x2 up-conv), 'resize_conv', 'sub_pixel' or 'bilinear'
    tiling: str = "auto"  # valid networks only: 'auto', 'valid' or 'same'
    # 'batch', 'group', 'instance', 'layer' or None (nn.norm_layer); batchnorm=False switches it off
    norm: str | None = "batch"


def valid_output_size(size, depth):
    """Output size of the valid (unpadded) U-Net for an input size, or ``None``
    when a pooling would meet an odd size or a map would vanish.

    Shape:
        down: s -> (s - 4) / 2 (two 3x3 valid convs, then 2x2 pool), ``depth`` times;
        bottom: s -> s - 4; up: s -> 2 s - 4, ``depth`` times.

    >>> valid_output_size(572, 4), valid_output_size(573, 4), valid_output_size(100, 4), valid_output_size(140, 4)
    (388, None, None, None)
    """
    s = size
    for _ in range(depth):
        s -= 4
        if s <= 0 or s % 2:
            return None
        s //= 2
    s -= 4
    if s <= 0:
        return None
    for _ in range(depth):
        s = 2 * s - 4
        if s <= 0:  # the up-path's valid convolutions eat more than the up-sampling gives
            return None
    return s


def _smallest_valid_tile(size, depth):
    """The smallest input size >= ``size`` that the valid U-Net accepts."""
    t = size
    while valid_output_size(t, depth) is None:  # valid sizes recur every 2**depth, so this ends soon
        t += 1
    return t


def pad_to_multiple(x, multiple, dims=2):
    """Zero-pad the last ``dims`` dimensions of ``x`` up to multiples of ``multiple``; the window to crop back.

    A padded U-Net pools ``depth`` times, so every spatial size must be a
    multiple of ``2**depth`` for each pooling to halve an even size and each
    skip to match its up-sampled map. The padding is split evenly (the odd
    voxel at the end), and ``out[window]`` is the part of the output that
    belongs to the input (``window`` is ``None`` when nothing was padded).
    The same for images (``dims=2``) and volumes (``dims=3``).

    Shape:
        (N, C, *S) -> (N, C, *[s + (-s mod multiple) for s in S])

    >>> x, window = pad_to_multiple(scratchseg.randn(1, 2, 5, 8, 9), 4, dims=3)
    >>> x.shape, x[window].shape
    ((1, 2, 8, 8, 12), (1, 2, 5, 8, 9))
    """
    sizes = tuple(x.shape[-dims:])
    extra = [-s % multiple for s in sizes]
    if not any(extra):
        return x, None
    amounts = []
    for e in reversed(extra):  # F.pad's order: last dimension first
        amounts += [e // 2, e - e // 2]
    window = (slice(None),) * (x.ndim - dims) + tuple(slice(e // 2, e // 2 + s) for e, s in zip(extra, sizes))
    return F.pad(x, amounts), window


def mirror_pad(x, top, bottom, left, right):
    """Pad the last two dimensions by mirroring (reflection without repeating the edge),
    repeated as often as needed when the pad is larger than the image.

    The paper extrapolates the missing context at the image border this way.
    Each round is one ``F.pad(..., mode="reflect")`` of at most ``size - 1`` per
    side (torch's limit); the padded image is larger, so the next round can
    reach further, and the rounds add up to the periodic mirror image of
    period ``2*(size - 1)``. A side of size 1 is its own mirror image: it is
    repeated (``mode="replicate"``).

    Shape:
        (N, C, H, W) -> (N, C, H + top + bottom, W + left + right)

    >>> import numpy
    >>> mirror_pad(scratchseg.tensor(numpy.arange(3.0).reshape(1, 1, 1, 3)), 0, 0, 4, 1).numpy()[0, 0, 0]
    array([0., 1., 2., 1., 0., 1., 2., 1.])
    """
    todo = [left, right, top, bottom]  # F.pad's order: last dimension first
    while any(todo):
        H, W = x.shape[-2], x.shape[-1]
        reach = (W - 1, W - 1, H - 1, H - 1)  # the most one reflection can add per side
        single = [t if r == 0 else 0 for t, r in zip(todo, reach)]
        if any(single):  # a 1-pixel side: its mirror image is itself
            x = F.pad(x, single, mode="replicate")
            todo = [t - s for t, s in zip(todo, single)]
            continue
        step = [min(t, r) for t, r in zip(todo, reach)]
        x = F.pad(x, step, mode="reflect")
        todo = [t - s for t, s in zip(todo, step)]
    return x


class DoubleConv(nn.Module):
    """(3x3 conv -> [norm] -> ReLU) twice: one U-Net level.

    ``norm``: 'batch', 'group', 'instance', 'layer' (``nn.norm_layer``) or
    None; ``batchnorm=False`` (the older switch) means None. The layers keep
    the names ``bn1``, ``bn2`` whatever the norm (as torchvision's ResNet
    does), so batch-norm checkpoints load as before.

    Shape:
        (N, in_ch, H, W) -> (N, out_ch, H - 4 + 4*padding, W - 4 + 4*padding)
    """

    def __init__(self, in_ch, out_ch, padding=True, batchnorm=True, norm="batch"):
        super().__init__()
        p = 1 if padding else 0
        norm = norm if batchnorm else None
        # a conv bias right before a norm is redundant (the norm subtracts a mean and adds its own shift)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=p, bias=norm is None)
        self.bn1 = nn.Identity() if norm is None else nn.norm_layer(norm, out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=p, bias=norm is None)
        self.bn2 = nn.Identity() if norm is None else nn.norm_layer(norm, out_ch)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(x)))


class Up(nn.Module):
    """One expanding step: up-sample x2 (halving channels), crop the skip, concatenate, DoubleConv.

    Shape:
        x (N, in_ch, h, w), skip (N, in_ch/2, >= 2h, >= 2w) -> (N, in_ch/2, 2h - 4 + 4p, 2w - 4 + 4p)
    """

    def __init__(self, in_ch, out_ch, up_mode="transposed", padding=True, batchnorm=True, norm="batch"):
        super().__init__()
        # the paper's "2x2 up-convolution that halves the number of feature channels"
        options = {"kernel_size": 2} if up_mode == "transposed" else {}
        self.upsample = make_upsample(up_mode, in_ch, out_ch, 2, **options)
        self.conv = DoubleConv(2 * out_ch, out_ch, padding=padding, batchnorm=batchnorm, norm=norm)

    def forward(self, x, skip):
        x = self.upsample(x)  # (N, out_ch, 2h, 2w)
        # valid convolutions leave the encoder map larger: take its centre (a no-op when padded)
        skip = F.center_crop(skip, (x.shape[2], x.shape[3]))
        x = scratchseg.cat([skip, x], dim=1)  # skip connection: (N, 2*out_ch, 2h, 2w)
        return self.conv(x)


class UNet(nn.Module):
    """Encoder of ``depth + 1`` DoubleConv levels, decoder of ``depth`` Up steps, 1x1 classifier.

    Shape:
        padded: (N, in_channels, H, W) -> (N, num_classes, H, W), any H, W >= 1;
        valid:  (N, in_channels, H, W) -> (N, num_classes, valid_output_size(H), valid_output_size(W))
        for a valid tile, or (N, num_classes, H, W) with tiling 'same'/'auto' otherwise.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if config.up_mode not in MODES or config.up_mode == "trilinear":
            raise ValueError(
                f"U-Net up_mode must be 'transposed', 'resize_conv', 'sub_pixel' or 'bilinear', got {config.up_mode!r}"
            )
        if config.tiling not in ("auto", "valid", "same"):
            raise ValueError(f"U-Net tiling must be 'auto', 'valid' or 'same', got {config.tiling!r}")
        if config.norm is not None and config.norm not in nn.NORMS:
            raise ValueError(f"U-Net norm must be one of {nn.NORMS} or None, got {config.norm!r}")
        positive_int(config.depth, "depth", "U-Net")
        positive_int(config.base, "base", "U-Net")
        self.config = config
        widths = [config.base * 2**i for i in range(config.depth + 1)]  # e.g. 64, 128, 256, 512, 1024
        kw = dict(padding=config.padding, batchnorm=config.batchnorm, norm=config.norm)
        self.down = nn.ModuleList()
        c = config.in_channels
        for width in widths:
            self.down.append(DoubleConv(c, width, **kw))
            c = width
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([Up(widths[i + 1], widths[i], config.up_mode, **kw) for i in reversed(range(config.depth))])
        self.head = nn.Conv2d(config.base, config.num_classes, 1)
        # the paper's initialisation: Gaussian, std sqrt(2 / fan_in) (He et al.), so that without
        # batchnorm the signal neither dies nor explodes through ~23 ReLU layers
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, SubPixel):
                m.icnr_()  # He-initialised, then ICNR: checkerboard-free at the start (fan-in unchanged)

    def _forward(self, x):
        skips = []
        for i, level in enumerate(self.down):
            x = level(x)
            if i < self.config.depth:
                skips.append(x)  # kept for the decoder's concatenation
                x = self.pool(x)
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip)
        return self.head(x)

    def forward(self, x):
        cfg = self.config
        _, _, H, W = check_image_batch(x, cfg.in_channels, "U-Net")
        if cfg.padding:
            # pad to a multiple of 2**depth so every pool halves an even size, then crop back
            x, window = pad_to_multiple(x, 2**cfg.depth, dims=2)
            out = self._forward(x)
            return out[window] if window else out

        valid = valid_output_size(H, cfg.depth) is not None and valid_output_size(W, cfg.depth) is not None
        if cfg.tiling == "valid" or (cfg.tiling == "auto" and valid):
            if not valid:
                raise ValueError(
                    f"the valid U-Net (depth {cfg.depth}) cannot take a {H}x{W} input: every 2x2 pooling "
                    f"must meet an even size and no map may vanish; the smallest valid tile is "
                    f"{_smallest_valid_tile(H, cfg.depth)}x{_smallest_valid_tile(W, cfg.depth)} "
                    f"(or use tiling='same', the overlap-tile strategy)"
                )
            return self._forward(x)
        # overlap-tile: mirror the context the valid convolutions eat, plus what makes a valid tile
        margin = self.margin()  # 92 at depth 4: (572 - 388) / 2
        th = _smallest_valid_tile(H + 2 * margin, cfg.depth)
        tw = _smallest_valid_tile(W + 2 * margin, cfg.depth)
        x = mirror_pad(x, margin, th - H - margin, margin, tw - W - margin)
        out = self._forward(x)  # (N, K, th - 2*margin, tw - 2*margin), pixel i = input pixel i
        return out[:, :, :H, :W]

    def margin(self):
        """Pixels a valid network trims from each side (the same for every valid tile)."""
        t = _smallest_valid_tile(1, self.config.depth)
        return (t - valid_output_size(t, self.config.depth)) // 2


def unet(num_classes, in_channels=3, **options):
    """The padded U-Net (output size = input size); options: base, depth, batchnorm,
    norm ('batch', 'group', 'instance', 'layer' or None; group norm takes
    ``nn.group_count(C)`` groups: at most 32, at least 2 channels each),
    up_mode ('transposed', 'resize_conv', 'sub_pixel' or 'bilinear')."""
    return UNet(UNetConfig(num_classes=num_classes, in_channels=in_channels, **options))


def unet_original(num_classes, in_channels=3, **options):
    """The paper's U-Net: valid convolutions, no normalisation, biases everywhere, ``base=64`` unless given
    (a ``norm`` option adds that normalisation)."""
    options.setdefault("base", 64)
    options.setdefault("padding", False)
    options.setdefault("batchnorm", "norm" in options)
    return UNet(UNetConfig(num_classes=num_classes, in_channels=in_channels, **options))


unet.config_class = unet_original.config_class = UNetConfig
