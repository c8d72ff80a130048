"""Backbones: the encoders the segmentation heads sit on.

* ``VGG16`` (Simonyan & Zisserman 2015), 13 3x3 convolutions in five blocks,
  each block followed by a max-pool. FCN, DeepLab v1 and the hypercolumn
  model read features after several of its pools.
* ``ResNet`` (He et al. 2016) with ``BasicBlock`` (two 3x3 convolutions,
  ResNet-18/34) or ``Bottleneck`` (1x1 -> 3x3 -> 1x1, ResNet-50/101) residual
  blocks. DeepLab v2/v3/v3+ read it.

Both take a ``width`` (VGG) or ``base`` (ResNet) so that a small version
trains on a CPU: ``VGG16(width=1.0)`` and ``ResNet("bottleneck", (3, 4, 23, 3),
base=64)`` are the papers' ResNet-101 and VGG16.

Output stride (how much smaller the deepest features are than the input) is
traded for *dilation* (atrous convolution, Chen et al.): instead of striding,
later stages keep their resolution and spread their 3x3 taps apart, so the
receptive field still grows and pretrained-style layer shapes do not change.

    >>> import scratchseg
    >>> net = ResNet("basic", (1, 1, 1, 1), base=4, output_stride=8)
    >>> feats = net(scratchseg.randn(1, 3, 33, 47))
    >>> feats["layer1"].shape, feats["layer4"].shape   # strides 4 and 8
    ((1, 4, 9, 12), (1, 32, 5, 6))
"""

from __future__ import annotations

from collections import OrderedDict

from scratchseg import functional as F
from scratchseg import nn

__all__ = ["scaled", "VGG16", "BasicBlock", "Bottleneck", "ResNet", "RESNETS", "resnet"]


def scaled(channels, width):
    """``channels * width`` rounded, at least 1: the width multiplier rule.

    >>> scaled(64, 0.125), scaled(4096, 0.125), scaled(48, 1 / 64)
    (8, 512, 1)
    """
    return max(1, int(round(channels * width)))


# ---------------------------------------------------------------------- VGG16
# (channels, convolutions) of the five blocks
VGG16_LAYOUT = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16(nn.Module):
    """The 13 convolutions of VGG16 (no fully connected layers), widths scaled by ``width``.

    ``forward`` returns a dict with the output of every block before its pool
    (``'conv1'`` ... ``'conv5'``) and after it (``'pool1'`` ... ``'pool5'``).

    Options that the users of this backbone need:

    * ``conv1_padding``: FCN pads the first convolution by 100 so that any
      input survives the 7x7 ``fc6`` and the crops (Long et al., Sec. 4.1).
    * ``pool``: ``'2x2'`` (kernel 2, stride 2, ceil mode, as Caffe's VGG) or
      ``'3x3'`` (kernel 3, stride 2, padding 1, as DeepLab's).
    * ``output_stride``: 32, or 8 (DeepLab v1: pool4 and pool5 get stride 1
      and the block-5 convolutions dilation 2, so conv5 sees what it saw
      before; needs ``pool='3x3'``).

    Shape (``pool='3x3'``, padding 1 convolutions):
        pool_i has size ceil(H / 2^i) for the strided pools; stride-1 pools
        keep the size.

    >>> import scratchseg
    >>> feats = VGG16(width=1 / 16, pool="3x3")(scratchseg.randn(1, 3, 33, 47))
    >>> feats["pool3"].shape, feats["pool5"].shape
    ((1, 16, 5, 6), (1, 32, 2, 2))
    """

    def __init__(self, in_channels=3, width=1.0, conv1_padding=1, pool="2x2", output_stride=32):
        super().__init__()
        if pool not in ("2x2", "3x3"):
            raise ValueError(f"VGG16 pool must be '2x2' or '3x3', got {pool!r}")
        if output_stride not in (8, 32):
            raise ValueError(f"VGG16 output_stride must be 8 or 32, got {output_stride!r}")
        if output_stride == 8 and pool != "3x3":
            raise ValueError("VGG16 with output_stride=8 needs pool='3x3' (stride-1 pools must keep the size)")
        self.out_channels = {}
        c = in_channels
        for i, (channels, convs) in enumerate(VGG16_LAYOUT, start=1):
            out = scaled(channels, width)
            # DeepLab v1: pool4 and pool5 no longer stride, so block 5 dilates by 2 to keep its field of view
            dilation = 2 if output_stride == 8 and i == 5 else 1
            layers = OrderedDict()
            for j in range(1, convs + 1):
                padding = conv1_padding if (i, j) == (1, 1) else dilation
                layers[f"conv{i}_{j}"] = nn.Conv2d(c, out, 3, padding=padding, dilation=dilation)
                layers[f"relu{i}_{j}"] = nn.ReLU()
                c = out
            setattr(self, f"block{i}", nn.Sequential(layers))
            stride = 1 if output_stride == 8 and i >= 4 else 2
            if pool == "2x2":
                setattr(self, f"pool{i}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                setattr(self, f"pool{i}", nn.MaxPool2d(3, stride=stride, padding=1))
            self.out_channels[f"conv{i}"] = self.out_channels[f"pool{i}"] = out

    def forward(self, x):
        features = {}
        for i in range(1, 6):
            x = getattr(self, f"block{i}")(x)
            features[f"conv{i}"] = x
            x = getattr(self, f"pool{i}")(x)
            features[f"pool{i}"] = x
        return features


# --------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut: out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    Shape:
        (N, C, H, W) -> (N, planes, H_out, W_out), H_out = floor((H - 1) / stride) + 1
    """

    expansion = 1

    def __init__(self, in_ch, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        # the shortcut must match the residual's shape when the block strides or widens
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided / dilated) -> 1x1 expand by 4, with a shortcut.

    Shape:
        (N, C, H, W) -> (N, 4*planes, H_out, W_out), H_out = floor((H - 1) / stride) + 1
    """

    expansion = 4

    def __init__(self, in_ch, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet without its classifier: a stride-4 stem and four stages of residual blocks.

    ``block`` is ``'basic'`` or ``'bottleneck'``, ``layers`` the number of
    blocks per stage, ``base`` the width of the first stage (64 in the paper;
    stage ``k`` has ``base * 2^(k-1)`` planes).

    ``output_stride`` 32 is the classification network; 16 replaces the
    stride of ``layer4`` by dilation 2, and 8 also replaces ``layer3``'s
    (dilations 2 and 4). As in torchvision, the first block of a dilated stage
    keeps the previous dilation.

    ``forward`` returns ``{'layer1': (N, base*e, ~H/4, ~W/4),
    'layer4': (N, 8*base*e, ~H/os, ~W/os)}`` with ``e`` the block expansion
    (1 or 4): the low-level and the high-level features DeepLab v3+ needs.

    Shape:
        every strided step maps a size S to floor((S - 1) / 2) + 1 = ceil(S / 2).

    >>> import scratchseg
    >>> feats = ResNet("bottleneck", (1, 1, 1, 1), base=2, output_stride=16)(scratchseg.randn(1, 3, 64, 64))
    >>> feats["layer1"].shape, feats["layer4"].shape
    ((1, 8, 16, 16), (1, 64, 4, 4))
    """

    def __init__(self, block="basic", layers=(2, 2, 2, 2), in_channels=3, base=64, output_stride=32):
        super().__init__()
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if block not in blocks:
            raise ValueError(f"ResNet block must be 'basic' or 'bottleneck', got {block!r}")
        if len(tuple(layers)) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"ResNet layers must be four positive block counts, got {layers!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"ResNet output_stride must be 8, 16 or 32, got {output_stride!r}")
        self.block = blocks[block]
        # which of layer2..layer4 trade their stride for dilation
        dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]
        self.in_ch, self.dilation = base, 1
        self.conv1 = nn.Conv2d(in_channels, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(base, layers[0], stride=1, dilate=False)
        self.layer2 = self._make_layer(2 * base, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(4 * base, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(8 * base, layers[3], stride=2, dilate=dilate[2])
        e = self.block.expansion
        self.out_channels = {"layer1": base * e, "layer4": 8 * base * e}
        self.output_stride = output_stride

    def _make_layer(self, planes, blocks, stride, dilate):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        out_ch = planes * self.block.expansion
        downsample = None
        if stride != 1 or self.in_ch != out_ch:
            downsample = nn.Sequential(nn.Conv2d(self.in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
        stage = [self.block(self.in_ch, planes, stride, previous_dilation, downsample)]
        self.in_ch = out_ch
        stage += [self.block(out_ch, planes, 1, self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def set_output_stride(self, output_stride):
        """Re-stride the network in place for ``output_stride`` 8, 16 or 32: the same weights, no new ones.

        Every stage's first block strides (2) or, where the output stride
        asks for it, keeps the resolution and dilates instead, exactly as
        ``ResNet(..., output_stride=output_stride)`` builds it (DeepLab v3
        trains at 16 and evaluates at 8). Only strides, dilations and
        paddings change: a 3x3 convolution's weight has the same shape at any
        dilation, and a stage's shortcut projection is there at every output
        stride (its channels change), so the state dict is the same.
        """
        if output_stride not in (8, 16, 32):
            raise ValueError(f"ResNet output_stride must be 8, 16 or 32, got {output_stride!r}")
        dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]
        dilation = 1
        for stage, dilated in zip((self.layer2, self.layer3, self.layer4), dilate):
            previous, stride = dilation, 2
            if dilated:
                dilation, stride = dilation * 2, 1
            for i, block in enumerate(stage):
                # as _make_layer: the first block keeps the previous dilation and does the striding
                _regeometry(block, stride if i == 0 else 1, previous if i == 0 else dilation)
        self.dilation, self.output_stride = dilation, output_stride
        return self

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # stride 4
        low = self.layer1(x)
        x = self.layer4(self.layer3(self.layer2(low)))
        return {"layer1": low, "layer4": x}


def _regeometry(block, stride, dilation):
    """Set a residual block's stride and 3x3 dilation in place (padding = dilation keeps the size)."""
    strided = block.conv1 if isinstance(block, BasicBlock) else block.conv2  # v1.5: the 3x3 strides
    dilated = (block.conv1, block.conv2) if isinstance(block, BasicBlock) else (block.conv2,)
    strided.stride = (stride, stride)
    for conv in dilated:
        conv.dilation = conv.padding = (dilation, dilation)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def resnet(name, in_channels=3, base=64, output_stride=32, layers=None):
    """A ResNet by name (``'resnet18'``, ``'resnet34'``, ``'resnet50'``, ``'resnet101'``);
    ``layers`` overrides the block counts (e.g. ``(1, 1, 1, 1)`` for a tiny test net)."""
    if name not in RESNETS:
        raise ValueError(f"unknown ResNet {name!r}; expected one of {', '.join(map(repr, RESNETS))}")
    block, default_layers = RESNETS[name]
    return ResNet(block, tuple(layers or default_layers), in_channels=in_channels, base=base, output_stride=output_stride)
