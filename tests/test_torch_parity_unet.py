"""A small U-Net in scratchseg and the same in torch: same loss, gradients,
parameters and running statistics after two SGD steps (float64)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

import scratchseg
import scratchseg.functional as F
from scratchseg import nn, optim

from helpers import assert_close, to_numpy

C, K = 4, 3  # base channels, classes


# ------------------------------------------------------------- the two nets
class UNet(nn.Module):
    """2 levels: (3x3 conv + BN + ReLU) x 2, max-pool, ..., ConvTranspose2d up, concat skip, 1x1 head."""

    def __init__(self, in_channels=3, num_classes=K, c=C):
        super().__init__()

        def double(cin, cout):
            return nn.Sequential(nn.ConvBlock(cin, cout), nn.ConvBlock(cout, cout))

        self.enc1, self.enc2 = double(in_channels, c), double(c, 2 * c)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = double(2 * c, 4 * c)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2), double(4 * c, 2 * c)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2), double(2 * c, c)
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)  # (N, c, H, W)
        e2 = self.enc2(self.pool(e1))  # (N, 2c, H/2, W/2)
        b = self.bottleneck(self.pool(e2))  # (N, 4c, H/4, W/4)
        d2 = self.dec2(scratchseg.cat([e2, self.up2(b)], dim=1))  # (N, 2c, H/2, W/2)
        d1 = self.dec1(scratchseg.cat([e1, self.up1(d2)], dim=1))  # (N, c, H, W)
        return self.head(d1)  # (N, K, H, W)


class TorchUNet(torch.nn.Module):
    def __init__(self, in_channels=3, num_classes=K, c=C):
        super().__init__()
        L = torch.nn

        def block(cin, cout):
            return L.Sequential(OrderedDict(
                conv=L.Conv2d(cin, cout, 3, padding=1, bias=False), bn=L.BatchNorm2d(cout), act=L.ReLU()))

        def double(cin, cout):
            return L.Sequential(block(cin, cout), block(cout, cout))

        self.enc1, self.enc2 = double(in_channels, c), double(c, 2 * c)
        self.pool = L.MaxPool2d(2)
        self.bottleneck = double(2 * c, 4 * c)
        self.up2, self.dec2 = L.ConvTranspose2d(4 * c, 2 * c, 2, stride=2), double(4 * c, 2 * c)
        self.up1, self.dec1 = L.ConvTranspose2d(2 * c, c, 2, stride=2), double(2 * c, c)
        self.head = L.Conv2d(c, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([e2, self.up2(b)], dim=1))
        d1 = self.dec1(torch.cat([e1, self.up1(d2)], dim=1))
        return self.head(d1)


def _batches(steps, rng):
    out = []
    for _ in range(steps):
        x = rng.standard_normal((2, 3, 12, 12))
        y = rng.integers(0, K, size=(2, 12, 12))
        y[0, :2, :3] = -100  # some ignored pixels
        out.append((x, y))
    return out


def test_state_dict_keys_match():
    ours, theirs = UNet().state_dict(), TorchUNet().state_dict()
    assert list(ours) == list(theirs)
    assert all(tuple(ours[k].shape) == tuple(theirs[k].shape) for k in ours)


@pytest.mark.parametrize("steps", [2])
def test_two_sgd_steps_match_torch(steps):
    torch.manual_seed(0)
    theirs = TorchUNet().double()
    ours = UNet().double()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})

    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_s = optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    for step, (x, y) in enumerate(_batches(steps, rng)):
        opt_t.zero_grad(), opt_s.zero_grad()
        loss_t = torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y))
        loss_s = F.cross_entropy(ours(scratchseg.Tensor(x)), y)
        assert loss_s.item() == pytest.approx(loss_t.item(), rel=1e-6), f"loss at step {step}"
        loss_t.backward()
        loss_s.backward()
        grads_s = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            assert_close(grads_s[name].grad, p.grad, rtol=1e-6, atol=1e-12, msg=f"grad of {name} at step {step}")
        opt_t.step()
        opt_s.step()

    state_s = ours.state_dict()
    for name, value in theirs.state_dict().items():
        if value.dtype == torch.int64:
            assert int(state_s[name]) == int(value) == steps, name
        else:
            assert_close(state_s[name], value, rtol=1e-6, atol=1e-12, msg=name)
    # evaluation mode uses the running statistics: the same predictions
    ours.eval(), theirs.eval()
    x = rng.standard_normal((1, 3, 12, 12))
    assert_close(ours(scratchseg.Tensor(x)), theirs(torch.from_numpy(x)).detach(), rtol=1e-6, atol=1e-12)
    assert to_numpy(ours.head.weight).dtype == np.float64


@pytest.mark.gpu
def test_two_sgd_steps_on_the_gpu_match_torch():
    from helpers import cupy_or_skip

    cupy = cupy_or_skip()
    torch.manual_seed(0)
    theirs = TorchUNet().double()
    ours = UNet().double().cuda()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    assert isinstance(ours.head.weight.data, cupy.ndarray)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_s = optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for x, y in _batches(2, np.random.default_rng(0)):
        opt_t.zero_grad(), opt_s.zero_grad()
        loss_t = torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y))
        loss_s = F.cross_entropy(ours(scratchseg.Tensor(cupy.asarray(x))), cupy.asarray(y))
        assert loss_s.item() == pytest.approx(loss_t.item(), rel=1e-6)
        loss_t.backward(), loss_s.backward()
        opt_t.step(), opt_s.step()
    state_s = ours.state_dict()
    for name, value in theirs.state_dict().items():
        assert_close(state_s[name], value, rtol=1e-6, atol=1e-12, msg=name)
