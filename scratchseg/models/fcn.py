"""FCN-32s, FCN-16s and FCN-8s.

Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015.

The idea: a classification network becomes a dense predictor once its fully
connected layers are read as convolutions (``fc6`` = a 7x7 convolution over
pool5, ``fc7`` = 1x1). Its class scores come out 32 times coarser than the
image; a learnable up-sampling (a transposed convolution initialised to
bilinear interpolation) brings them back. Coarse scores know *what*, shallow
features know *where*: FCN-16s adds scores predicted from pool4 (the "skip"),
FCN-8s also from pool3, each fused by summation after a 2x up-sampling.

Geometry, as in the paper's Caffe nets: ``conv1_1`` pads by 100 so that even a
small image survives the 7x7 ``fc6``; every fusion then *crops* the finer
score map at a fixed offset (5 for pool4, 9 for pool3) and the final
up-sampled map at 19 / 27 / 31 (32s / 16s / 8s), so any input size gives a
``(N, num_classes, H, W)`` output aligned with the input.

Where things happen (``FCN.forward``): the skip crops and sums are the lines
marked ``# skip``.

Sizes: ``width`` multiplies every VGG16 channel count and fc6/fc7's 4096.
The default ``width=1/8`` trains on a CPU; ``width=1.0`` is the paper's net:
``create("fcn8s", num_classes=21, width=1.0)`` has 134,489,759 parameters.

    >>> import scratchseg
    >>> net = FCN(FCNConfig(num_classes=3, variant="8s", width=1 / 32))
    >>> net(scratchseg.randn(1, 3, 37, 50)).shape
    (1, 3, 37, 50)
"""

from __future__ import annotations

from dataclasses import dataclass

from scratchseg import nn
from scratchseg.args import check_image_batch

from .backbones import VGG16, scaled
from .upsampling import transposed_upsample

__all__ = ["FCNConfig", "FCN", "fcn32s", "fcn16s", "fcn8s"]

# crop offsets of the Caffe reference nets (conv1_1 padding 100, 2x2 ceil-mode pools, unpadded deconvolutions)
OFFSET_POOL4 = 5
OFFSET_POOL3 = 9
OFFSET_FINAL = {"32s": 19, "16s": 27, "8s": 31}


@dataclass
class FCNConfig:
    num_classes: int = 21
    in_channels: int = 3
    variant: str = "8s"  # '32s', '16s' or '8s'
    width: float = 0.125  # 1.0 = VGG16 as in the paper
    dropout: float = 0.5  # after fc6 and fc7, as VGG's fully connected layers


def _crop(x, offset, size):
    """x[..., offset:offset+h, offset:offset+w] -- the Caffe ``Crop`` layer."""
    h, w = size
    return x[:, :, offset : offset + h, offset : offset + w]


class FCN(nn.Module):
    """VGG16 backbone, fc6/fc7 as convolutions, score layers, skip fusion, up-sampling.

    Shape:
        (N, in_channels, H, W) -> (N, num_classes, H, W) for any H, W >= 1.
    """

    def __init__(self, config: FCNConfig):
        super().__init__()
        if config.variant not in OFFSET_FINAL:
            raise ValueError(f"FCN variant must be one of '32s', '16s', '8s', got {config.variant!r}")
        self.config = config
        K, w = config.num_classes, config.width
        self.backbone = VGG16(config.in_channels, width=w, conv1_padding=100, pool="2x2")
        fc = scaled(4096, w)
        # fc6/fc7: VGG's fully connected layers, read as convolutions over the pool5 grid
        self.fc6 = nn.Conv2d(self.backbone.out_channels["pool5"], fc, 7)
        self.relu6 = nn.ReLU()
        self.drop6 = nn.Dropout(config.dropout)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.relu7 = nn.ReLU()
        self.drop7 = nn.Dropout(config.dropout)
        self.score_fr = nn.Conv2d(fc, K, 1)

        # all up-samplers start as bilinear interpolation (the paper's initialisation) and learn
        if config.variant == "32s":
            self.upscore = transposed_upsample(K, K, 32, kernel_size=64, padding=0, bias=False, bilinear_init=True)
        else:
            self.score_pool4 = nn.Conv2d(self.backbone.out_channels["pool4"], K, 1)
            self.upscore2 = transposed_upsample(K, K, 2, kernel_size=4, padding=0, bias=False, bilinear_init=True)
        if config.variant == "16s":
            self.upscore16 = transposed_upsample(K, K, 16, kernel_size=32, padding=0, bias=False, bilinear_init=True)
        if config.variant == "8s":
            self.score_pool3 = nn.Conv2d(self.backbone.out_channels["pool3"], K, 1)
            self.upscore_pool4 = transposed_upsample(K, K, 2, kernel_size=4, padding=0, bias=False, bilinear_init=True)
            self.upscore8 = transposed_upsample(K, K, 8, kernel_size=16, padding=0, bias=False, bilinear_init=True)
        # the paper zero-initialises the new skip score layers so fine-tuning starts from the coarser net
        for name in ("score_pool4", "score_pool3"):
            layer = getattr(self, name, None)
            if layer is not None:
                layer.weight.data[...] = 0
                layer.bias.data[...] = 0

    def forward(self, x):
        _, _, H, W = check_image_batch(x, self.config.in_channels, "FCN")
        feats = self.backbone(x)
        h = self.drop6(self.relu6(self.fc6(feats["pool5"])))
        h = self.drop7(self.relu7(self.fc7(h)))
        score = self.score_fr(h)  # (N, K, ~H/32, ~W/32)

        variant = self.config.variant
        if variant == "32s":
            return _crop(self.upscore(score), OFFSET_FINAL["32s"], (H, W))

        up2 = self.upscore2(score)  # (N, K, ~H/16, ~W/16)
        skip4 = _crop(self.score_pool4(feats["pool4"]), OFFSET_POOL4, up2.shape[2:])
        fused = up2 + skip4  # skip: pool4 scores, cropped and summed
        if variant == "16s":
            return _crop(self.upscore16(fused), OFFSET_FINAL["16s"], (H, W))

        up4 = self.upscore_pool4(fused)  # (N, K, ~H/8, ~W/8)
        skip3 = _crop(self.score_pool3(feats["pool3"]), OFFSET_POOL3, up4.shape[2:])
        fused = up4 + skip3  # skip: pool3 scores, cropped and summed
        return _crop(self.upscore8(fused), OFFSET_FINAL["8s"], (H, W))


def _build(variant):
    def build(num_classes, in_channels=3, **options):
        return FCN(FCNConfig(num_classes=num_classes, in_channels=in_channels, variant=variant, **options))

    build.__name__ = f"fcn{variant}"
    build.__doc__ = f"FCN-{variant} (Long et al. 2015); options: width (1.0 = paper), dropout."
    build.config_class = FCNConfig
    build.fixed_options = ("variant",)
    return build


fcn32s = _build("32s")
fcn16s = _build("16s")
fcn8s = _build("8s")
