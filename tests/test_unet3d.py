"""The 3-D U-Net (``scratchseg.models.unet3d``): shapes at any size, bad input, and the same network
written in torch giving the same loss, gradients and parameters after two SGD steps (float64)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import scratchseg
import scratchseg.functional as F
from scratchseg import models, optim

from helpers import assert_close

L = torch.nn


# ------------------------------------------------------------- the torch twin
def _torch_norm(kind, channels):
    if kind == "batch":
        return L.BatchNorm3d(channels)
    if kind == "group":
        return L.GroupNorm(next(g for g in (8, 4, 2, 1) if channels % g == 0), channels)
    return L.Identity()


class TorchDoubleConv(L.Module):
    def __init__(self, cin, mid, cout, norm):
        super().__init__()
        bias = norm is None
        self.conv1, self.norm1 = L.Conv3d(cin, mid, 3, padding=1, bias=bias), _torch_norm(norm, mid)
        self.relu1 = L.ReLU()
        self.conv2, self.norm2 = L.Conv3d(mid, cout, 3, padding=1, bias=bias), _torch_norm(norm, cout)
        self.relu2 = L.ReLU()

    def forward(self, x):
        return self.relu2(self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x))))))


class TorchTrilinearConv(L.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = L.Conv3d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(L.functional.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False))


class TorchUp(L.Module):
    def __init__(self, cin, skip, cout, up_mode, norm):
        super().__init__()
        self.upsample = (L.ConvTranspose3d(cin, cin, 2, stride=2, bias=False) if up_mode == "transposed"
                         else TorchTrilinearConv(cin))
        self.conv = TorchDoubleConv(cin + skip, cout, cout, norm)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.upsample(x)], dim=1))


class TorchUNet3D(L.Module):
    """Çiçek et al.'s network as scratchseg builds it: the same module names, so the state dicts match."""

    def __init__(self, in_channels, num_classes, base, depth, up_mode, norm):
        super().__init__()
        self.depth = depth
        self.down = L.ModuleList()
        c = in_channels
        for i in range(depth + 1):
            self.down.append(TorchDoubleConv(c, base * 2**i, base * 2 ** (i + 1), norm))
            c = base * 2 ** (i + 1)
        self.pool = L.MaxPool3d(2)
        self.up = L.ModuleList()
        for i in reversed(range(depth)):
            skip = base * 2 ** (i + 1)
            self.up.append(TorchUp(c, skip, skip, up_mode, norm))
            c = skip
        self.head = L.Conv3d(c, num_classes, 1)

    def forward(self, x):
        D, H, W = x.shape[2:]
        m = 2**self.depth
        extra = [-s % m for s in (D, H, W)]
        pad = []
        for e in reversed(extra):
            pad += [e // 2, e - e // 2]
        x = L.functional.pad(x, pad)
        skips = []
        for i, level in enumerate(self.down):
            x = level(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip)
        out = self.head(x)
        a, b, c = (e // 2 for e in extra)
        return out[:, :, a:a + D, b:b + H, c:c + W]


# ------------------------------------------------------------- shapes and errors
@pytest.mark.parametrize("size", [(5, 7, 6), (8, 8, 8), (1, 3, 2)])
@pytest.mark.parametrize("up_mode,norm", [("transposed", "batch"), ("trilinear", "group"), ("transposed", None)])
def test_output_has_the_input_size(size, up_mode, norm):
    scratchseg.manual_seed(0)
    net = models.create("unet3d", num_classes=3, in_channels=2, base=2, depth=2, up_mode=up_mode, norm=norm)
    out = net(scratchseg.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)


def test_registered_and_paper_sized():
    assert "unet3d" in models.available()
    net = models.create("unet3d", num_classes=3, in_channels=3, base=32, depth=3, norm=None)
    assert net.num_parameters() == 19_069_955  # Çiçek et al. 2016, section 2


def test_bad_input_and_options():
    net = models.create("unet3d", num_classes=2, in_channels=1, base=2, depth=1)
    with pytest.raises(ValueError, match=r"5-D input of shape \(N, 1, D, H, W\), got \(1, 1, 8, 8\)"):
        net(scratchseg.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 1, D, H, W\), got \(1, 3, 4, 4, 4\)"):
        net(scratchseg.randn(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="up_mode must be 'transposed' or 'trilinear', got 'bilinear'"):
        models.create("unet3d", num_classes=2, up_mode="bilinear")
    with pytest.raises(ValueError, match="norm must be 'batch', 'group' or None, got 'layer'"):
        models.create("unet3d", num_classes=2, norm="layer")
    with pytest.raises(TypeError, match="unknown option"):
        models.create("unet3d", num_classes=2, batchnorm=True)
    with pytest.raises(ValueError, match="depth"):
        models.create("unet3d", num_classes=2, depth=0)


# ------------------------------------------------------------- against torch
@pytest.mark.parametrize("up_mode,norm", [("transposed", "batch"), ("trilinear", "group"), ("transposed", None)])
def test_two_sgd_steps_match_torch(up_mode, norm):
    torch.manual_seed(0)
    options = dict(base=2, depth=2, up_mode=up_mode, norm=norm)
    theirs = TorchUNet3D(1, 3, **options).double()
    ours = models.create("unet3d", num_classes=3, in_channels=1, **options).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})

    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_s = optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    for step in range(2):
        x = rng.standard_normal((2, 1, 5, 6, 7))  # odd sizes: the pad-and-crop path
        y = rng.integers(0, 3, size=(2, 5, 6, 7))
        y[0, :2, :3, :1] = -100  # some ignored voxels
        opt_t.zero_grad(), opt_s.zero_grad()
        loss_t = L.functional.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y))
        loss_s = F.cross_entropy(ours(scratchseg.Tensor(x)), y)
        assert loss_s.item() == pytest.approx(loss_t.item(), rel=1e-6), f"loss at step {step}"
        loss_t.backward()
        loss_s.backward()
        opt_t.step()
        opt_s.step()

    state_s = ours.state_dict()
    for name, value in theirs.state_dict().items():
        if value.dtype == torch.int64:
            assert int(state_s[name]) == int(value) == 2, name
        else:
            assert_close(state_s[name], value, rtol=1e-6, atol=1e-12, msg=name)
    ours.eval(), theirs.eval()  # running statistics: the same predictions
    x = rng.standard_normal((1, 1, 4, 9, 5))
    assert_close(ours(scratchseg.Tensor(x)), theirs(torch.from_numpy(x)).detach(), rtol=1e-6, atol=1e-12)
