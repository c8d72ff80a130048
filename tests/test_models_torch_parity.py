"""U-Net, FCN-8s and DeepLab v3+ against PyTorch mirrors of the same architectures.

Each mirror below is written with ``torch.nn`` under the same module and
parameter names, so our state dict loads into it as it is. Both networks then
see the same float64 input and the same random upstream gradient; the logits,
the input gradient and every parameter gradient must agree to a relative 1e-6
(and batchnorm's running statistics after the training-mode step).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
TF = torch.nn.functional

import scratchseg  # noqa: E402
from scratchseg import models  # noqa: E402
from scratchseg.models import unet as unet_module  # noqa: E402
from helpers import assert_close, to_numpy  # noqa: E402


# ------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def _float64(float64):
    """Every test here in float64 (conftest's ``float64``)."""


def randomise(model, seed=0):
    """Perturb every parameter (batchnorm's 1/0 and FCN's zero skip scores too) so nothing hides."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("bn1.weight") or ".bn" in name or name.endswith(".weight") and p.ndim == 1:
            p.data[...] = rng.uniform(0.5, 1.5, p.shape)
        elif p.ndim == 1:
            p.data[...] = p.data + rng.normal(0.0, 0.1, p.shape)
        elif not np.abs(p.data).any():
            p.data[...] = rng.normal(0.0, 0.1, p.shape)


def mirror_of(ours, theirs):
    """Load our state dict into the torch mirror; the key sets must be identical."""
    state = ours.state_dict()
    theirs = theirs.double()  # before loading: a float32 module would round our float64 weights
    assert set(state) == set(theirs.state_dict()), (
        f"state dict keys differ: ours only {sorted(set(state) - set(theirs.state_dict()))}, "
        f"torch only {sorted(set(theirs.state_dict()) - set(state))}"
    )
    theirs.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()})
    return theirs


def rel_close(actual, expected, rel=1e-6, what=""):
    e = to_numpy(expected)
    scale = float(np.abs(e).max()) if e.size else 1.0
    # the floor covers gradients that are zero in exact arithmetic (a bias right before batchnorm)
    # and come out as rounding noise (~1e-15) in both frameworks
    assert_close(actual, e, rtol=rel, atol=max(rel * 1e-3 * scale, 1e-11), msg=what)


def compare(ours, theirs, shape, train, seed=1):
    """Same input, same upstream gradient: logits, dL/dx, every dL/dparam and the buffers agree."""
    ours.train(train)
    theirs.train(train)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    xs = scratchseg.Tensor(x.copy(), requires_grad=True)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    ys, yt = ours(xs), theirs(xt)
    assert tuple(ys.shape) == tuple(yt.shape)
    rel_close(ys, yt, what="logits")
    dout = rng.standard_normal(tuple(yt.shape))
    ys.backward(dout)
    yt.backward(torch.from_numpy(dout))
    rel_close(xs.grad, xt.grad, what="input gradient")
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        rel_close(p.grad, theirs_params[name].grad, what=f"gradient of {name}")
    theirs_buffers = dict(theirs.named_buffers())
    for name, b in ours.named_buffers():
        rel_close(np.asarray(b), theirs_buffers[name], what=f"buffer {name}")
    return ys


# ------------------------------------------------------------ U-Net mirror
class TDoubleConv(tnn.Module):
    def __init__(self, in_ch, out_ch, padding, batchnorm):
        super().__init__()
        p = 1 if padding else 0
        self.conv1 = tnn.Conv2d(in_ch, out_ch, 3, padding=p, bias=not batchnorm)
        self.bn1 = tnn.BatchNorm2d(out_ch) if batchnorm else tnn.Identity()
        self.relu1 = tnn.ReLU()
        self.conv2 = tnn.Conv2d(out_ch, out_ch, 3, padding=p, bias=not batchnorm)
        self.bn2 = tnn.BatchNorm2d(out_ch) if batchnorm else tnn.Identity()
        self.relu2 = tnn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


class TResizeConv(tnn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = tnn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x):
        return self.conv(TF.interpolate(x, scale_factor=2, mode="nearest"))


class TBilinear(tnn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.proj = tnn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x):
        return self.proj(TF.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


class TUp(tnn.Module):
    def __init__(self, in_ch, out_ch, up_mode, padding, batchnorm):
        super().__init__()
        self.upsample = {
            "transposed": lambda: tnn.ConvTranspose2d(in_ch, out_ch, 2, stride=2),
            "resize_conv": lambda: TResizeConv(in_ch, out_ch),
            "bilinear": lambda: TBilinear(in_ch, out_ch),
        }[up_mode]()
        self.conv = TDoubleConv(2 * out_ch, out_ch, padding, batchnorm)

    def forward(self, x, skip):
        x = self.upsample(x)
        h, w = x.shape[2:]
        top, left = (skip.shape[2] - h) // 2, (skip.shape[3] - w) // 2
        skip = skip[:, :, top : top + h, left : left + w]
        return self.conv(torch.cat([skip, x], dim=1))


class TUNet(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base * 2**i for i in range(cfg.depth + 1)]
        self.down = tnn.ModuleList()
        c = cfg.in_channels
        for w in widths:
            self.down.append(TDoubleConv(c, w, cfg.padding, cfg.batchnorm))
            c = w
        self.pool = tnn.MaxPool2d(2)
        self.up = tnn.ModuleList(
            [TUp(widths[i + 1], widths[i], cfg.up_mode, cfg.padding, cfg.batchnorm) for i in reversed(range(cfg.depth))]
        )
        self.head = tnn.Conv2d(cfg.base, cfg.num_classes, 1)

    def core(self, x):
        skips = []
        for i, level in enumerate(self.down):
            x = level(x)
            if i < self.cfg.depth:
                skips.append(x)
                x = self.pool(x)
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip)
        return self.head(x)

    def forward(self, x):
        H, W = x.shape[2:]
        if self.cfg.padding:
            m = 2**self.cfg.depth
            ph, pw = -H % m, -W % m
            x = TF.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            return self.core(x)[:, :, ph // 2 : ph // 2 + H, pw // 2 : pw // 2 + W]
        if self.cfg.tiling == "valid":
            return self.core(x)
        # overlap-tile with torch's reflect padding (the pads here are smaller than the image)
        # pixels trimmed per side: 2 per conv pair at each scale 2^l, down and up, and 2 at the bottom
        d = self.cfg.depth
        margin = 4 * (2**d - 1) + 2 ** (d + 1)  # 92 for depth 4, 20 for depth 2
        th = unet_module._smallest_valid_tile(H + 2 * margin, self.cfg.depth)
        tw = unet_module._smallest_valid_tile(W + 2 * margin, self.cfg.depth)
        x = TF.pad(x, (margin, tw - W - margin, margin, th - H - margin), mode="reflect")
        return self.core(x)[:, :, :H, :W]


@pytest.mark.parametrize("up_mode", ["transposed", "resize_conv", "bilinear"])
def test_padded_unet_matches_torch(up_mode):
    scratchseg.manual_seed(0)
    ours = models.create("unet", num_classes=3, in_channels=2, base=3, depth=3, up_mode=up_mode)
    randomise(ours)
    theirs = mirror_of(ours, TUNet(ours.config))
    compare(ours, theirs, (2, 2, 21, 30), train=True)  # 21x30 is padded to 24x32 inside
    assert int(ours.down[0].bn1.num_batches_tracked) == 1


def test_original_unet_matches_torch_valid_tile():
    scratchseg.manual_seed(0)
    ours = models.create("unet_original", num_classes=2, in_channels=1, base=3, depth=2, tiling="valid")
    randomise(ours)
    theirs = mirror_of(ours, TUNet(ours.config))
    out = compare(ours, theirs, (2, 1, 44, 52), train=True)
    assert out.shape == (2, 2, 4, 12)


def test_original_unet_overlap_tile_matches_torch_reflect_padding():
    scratchseg.manual_seed(0)
    ours = models.create("unet_original", num_classes=2, in_channels=1, base=3, depth=2)  # tiling 'auto'
    assert ours.margin() == 20
    randomise(ours)
    theirs = mirror_of(ours, TUNet(ours.config))
    out = compare(ours, theirs, (1, 1, 27, 30), train=False)  # not a valid tile: mirrored by 20 + a few
    assert out.shape == (1, 2, 27, 30)


# ----------------------------------------------------------- FCN-8s mirror
VGG16_LAYOUT = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def scaled(c, w):
    return max(1, int(round(c * w)))


class TVGG16(tnn.Module):
    def __init__(self, in_ch, width, conv1_padding, pool, output_stride=32):
        super().__init__()
        c = in_ch
        for i, (channels, convs) in enumerate(VGG16_LAYOUT, start=1):
            out = scaled(channels, width)
            dilation = 2 if output_stride == 8 and i == 5 else 1
            layers = OrderedDict()
            for j in range(1, convs + 1):
                padding = conv1_padding if (i, j) == (1, 1) else dilation
                layers[f"conv{i}_{j}"] = tnn.Conv2d(c, out, 3, padding=padding, dilation=dilation)
                layers[f"relu{i}_{j}"] = tnn.ReLU()
                c = out
            setattr(self, f"block{i}", tnn.Sequential(layers))
            if pool == "2x2":
                setattr(self, f"pool{i}", tnn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                stride = 1 if output_stride == 8 and i >= 4 else 2
                setattr(self, f"pool{i}", tnn.MaxPool2d(3, stride=stride, padding=1))

    def forward(self, x):
        feats = {}
        for i in range(1, 6):
            x = getattr(self, f"block{i}")(x)
            feats[f"conv{i}"] = x
            x = getattr(self, f"pool{i}")(x)
            feats[f"pool{i}"] = x
        return feats


class TFCN8s(tnn.Module):
    """Long et al.'s FCN-8s as in the Caffe reference net: pad 100, crops at 5, 9 and 31."""

    def __init__(self, K, in_ch, width):
        super().__init__()
        self.backbone = TVGG16(in_ch, width, 100, "2x2")
        c3, c5, fc = scaled(256, width), scaled(512, width), scaled(4096, width)
        self.fc6, self.relu6, self.drop6 = tnn.Conv2d(c5, fc, 7), tnn.ReLU(), tnn.Dropout(0.0)
        self.fc7, self.relu7, self.drop7 = tnn.Conv2d(fc, fc, 1), tnn.ReLU(), tnn.Dropout(0.0)
        self.score_fr = tnn.Conv2d(fc, K, 1)
        self.score_pool4 = tnn.Conv2d(c5, K, 1)
        self.score_pool3 = tnn.Conv2d(c3, K, 1)
        self.upscore2 = tnn.ConvTranspose2d(K, K, 4, stride=2, bias=False)
        self.upscore_pool4 = tnn.ConvTranspose2d(K, K, 4, stride=2, bias=False)
        self.upscore8 = tnn.ConvTranspose2d(K, K, 16, stride=8, bias=False)

    def forward(self, x):
        H, W = x.shape[2:]
        f = self.backbone(x)
        h = self.drop7(self.relu7(self.fc7(self.drop6(self.relu6(self.fc6(f["pool5"]))))))
        up2 = self.upscore2(self.score_fr(h))
        s4 = self.score_pool4(f["pool4"])[:, :, 5 : 5 + up2.shape[2], 5 : 5 + up2.shape[3]]
        up4 = self.upscore_pool4(up2 + s4)
        s3 = self.score_pool3(f["pool3"])[:, :, 9 : 9 + up4.shape[2], 9 : 9 + up4.shape[3]]
        return self.upscore8(up4 + s3)[:, :, 31 : 31 + H, 31 : 31 + W]


@pytest.mark.parametrize("shape", [(2, 3, 37, 50), (1, 3, 32, 32)])
def test_fcn8s_matches_torch(shape):
    scratchseg.manual_seed(0)
    ours = models.create("fcn8s", num_classes=3, width=1 / 16, dropout=0.0)
    # the up-samplers start as exact bilinear interpolation (checked before randomising)
    from scratchseg.models.upsampling import bilinear_kernel

    np.testing.assert_array_equal(ours.upscore8.weight.data, bilinear_kernel(3, 3, 16))
    assert not np.abs(ours.score_pool3.weight.data).any()  # zero-initialised skip, as the paper
    randomise(ours)
    theirs = mirror_of(ours, TFCN8s(3, 3, 1 / 16))
    compare(ours, theirs, shape, train=True)


# ------------------------------------------------------- DeepLab v3+ mirror
class TBasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, in_ch, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_ch, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class TBottleneck(tnn.Module):
    expansion = 4

    def __init__(self, in_ch, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.relu = tnn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TResNet(tnn.Module):
    """torchvision's ResNet layout (replace_stride_with_dilation), without the classifier."""

    def __init__(self, block, layers, in_ch, base, output_stride):
        super().__init__()
        self.block = block
        dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]
        self.in_ch, self.dilation = base, 1
        self.conv1 = tnn.Conv2d(in_ch, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = tnn.BatchNorm2d(base)
        self.relu = tnn.ReLU()
        self.maxpool = tnn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(base, layers[0], 1, False)
        self.layer2 = self._make_layer(2 * base, layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(4 * base, layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(8 * base, layers[3], 2, dilate[2])

    def _make_layer(self, planes, blocks, stride, dilate):
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        out = planes * self.block.expansion
        downsample = None
        if stride != 1 or self.in_ch != out:
            downsample = tnn.Sequential(tnn.Conv2d(self.in_ch, out, 1, stride=stride, bias=False), tnn.BatchNorm2d(out))
        stage = [self.block(self.in_ch, planes, stride, previous, downsample)]
        self.in_ch = out
        stage += [self.block(out, planes, 1, self.dilation) for _ in range(1, blocks)]
        return tnn.Sequential(*stage)

    def forward(self, x):
        low = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return low, self.layer4(self.layer3(self.layer2(low)))


def t_conv_bn_relu(in_ch, out_ch, k=1, dilation=1):
    return tnn.Sequential(
        tnn.Conv2d(in_ch, out_ch, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
        tnn.BatchNorm2d(out_ch),
        tnn.ReLU(),
    )


class TImagePooling(tnn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.pool = tnn.AdaptiveAvgPool2d(1)
        self.conv = tnn.Conv2d(in_ch, out_ch, 1)
        self.relu = tnn.ReLU()

    def forward(self, x):
        y = self.relu(self.conv(self.pool(x)))
        return TF.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)


class TASPP(tnn.Module):
    def __init__(self, in_ch, out_ch, rates):
        super().__init__()
        self.branches = tnn.ModuleList(
            [t_conv_bn_relu(in_ch, out_ch)]
            + [t_conv_bn_relu(in_ch, out_ch, 3, r) for r in rates]
            + [TImagePooling(in_ch, out_ch)]
        )
        self.project = tnn.Sequential(
            tnn.Conv2d(5 * out_ch, out_ch, 1, bias=False), tnn.BatchNorm2d(out_ch), tnn.ReLU(), tnn.Dropout(0.0)
        )

    def forward(self, x):
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class TDeepLabV3Plus(tnn.Module):
    def __init__(self, K, in_ch, block, layers, width, output_stride):
        super().__init__()
        self.backbone = TResNet(block, layers, in_ch, scaled(64, width), output_stride)
        e = block.expansion
        base = scaled(64, width)
        c, low, dec = scaled(256, width), scaled(48, width), scaled(256, width)
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = TASPP(8 * base * e, c, rates)
        self.reduce = t_conv_bn_relu(base * e, low)
        self.decoder = tnn.Sequential(t_conv_bn_relu(c + low, dec, 3), t_conv_bn_relu(dec, dec, 3))
        self.classifier = tnn.Conv2d(dec, K, 1)

    def forward(self, x):
        low, high = self.backbone(x)
        low = self.reduce(low)
        h = TF.interpolate(self.aspp(high), size=low.shape[2:], mode="bilinear", align_corners=False)
        h = self.classifier(self.decoder(torch.cat([h, low], dim=1)))
        return TF.interpolate(h, size=x.shape[2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize(
    "backbone, block, output_stride",
    [("resnet18", TBasicBlock, 16), ("resnet50", TBottleneck, 8)],
)
def test_deeplabv3plus_matches_torch(backbone, block, output_stride):
    scratchseg.manual_seed(0)
    layers = (1, 1, 2, 2)
    ours = models.create(
        "deeplabv3plus", num_classes=3, backbone=backbone, width=1 / 16, layers=layers,
        output_stride=output_stride, dropout=0.0,
    )
    randomise(ours)
    theirs = mirror_of(ours, TDeepLabV3Plus(3, 3, block, layers, 1 / 16, output_stride))
    compare(ours, theirs, (2, 3, 45, 61), train=True)
