"""Sub-pixel convolution (conv to C*r^2 channels, then pixel shuffle) as an up-sampling block and as
U-Net's ``up_mode="sub_pixel"``, against torch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import scratchseg
from scratchseg import models
from scratchseg.models.upsampling import SubPixel, make_upsample
from test_models_torch_parity import TUNet, compare, mirror_of, randomise

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


class TSubPixel(torch.nn.Module):
    """torch's sub-pixel up-sampler under our names: conv3x3 to out_ch*r^2, then PixelShuffle(r)."""

    def __init__(self, in_ch, out_ch, r):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_ch, out_ch * r * r, 3, padding=1)
        self.shuffle = torch.nn.PixelShuffle(r)

    def forward(self, x):
        return self.shuffle(self.conv(x))


@pytest.mark.parametrize("scale", [2, 3])
def test_sub_pixel_block_matches_torch(scale, float64, rng):
    ours = SubPixel(3, 2, scale)
    randomise(ours)  # past ICNR: every sub-kernel different, so a wrong channel order would show
    theirs = mirror_of(ours, TSubPixel(3, 2, scale))
    compare(ours, theirs, (2, 3, 5, 4), train=True)


def test_sub_pixel_starts_as_icnr(rng):
    # ICNR: the r^2 sub-kernels of each output channel are equal, so each r x r output block is constant
    up = make_upsample("sub_pixel", 4, 3, 2)
    w = up.conv.weight.data.reshape(3, 4, 4, 3, 3)  # (out_ch, r^2, in_ch, 3, 3)
    assert np.array_equal(w, np.broadcast_to(w[:, :1], w.shape)) and np.abs(w).max() > 0
    y = up(scratchseg.Tensor(rng.standard_normal((1, 4, 3, 5)).astype(np.float32))).numpy()
    assert y.shape == (1, 3, 6, 10)
    blocks = y.reshape(1, 3, 3, 2, 5, 2)
    assert np.array_equal(blocks, np.broadcast_to(blocks[:, :, :, :1, :, :1], blocks.shape))
    plain = SubPixel(4, 3, 2, icnr=False).conv.weight.data.reshape(3, 4, 36)  # torch's conv init: all differ
    assert not np.array_equal(plain[:, 1], plain[:, 0])


@pytest.mark.parametrize("shape", [(2, 3, 17, 10), (1, 3, 5, 7), (2, 3, 1, 3)])
def test_unet_sub_pixel_any_size_forward_backward(shape, float64, rng):
    model = models.create("unet", num_classes=2, up_mode="sub_pixel", depth=2, base=4)
    out = model(scratchseg.Tensor(rng.standard_normal(shape)))
    assert out.shape == (shape[0], 2) + shape[2:]
    out.backward(rng.standard_normal(out.shape))
    assert all(p.grad is not None and np.isfinite(p.grad).all() for p in model.parameters())
    # the U-Net's He init, then ICNR on every sub-pixel block
    for up in model.up:
        w = up.upsample.conv.weight.data
        groups = w.reshape(w.shape[0] // 4, 4, *w.shape[1:])
        assert np.array_equal(groups, np.broadcast_to(groups[:, :1], groups.shape))


def test_original_unet_sub_pixel_overlap_tile(float64, rng):
    model = models.create("unet_original", num_classes=2, in_channels=1, up_mode="sub_pixel", depth=2, base=2)
    out = model(scratchseg.Tensor(rng.standard_normal((1, 1, 13, 9))))
    assert out.shape == (1, 2, 13, 9)


def test_padded_unet_sub_pixel_matches_torch(float64):
    scratchseg.manual_seed(0)
    ours = models.create("unet", num_classes=3, in_channels=2, base=3, depth=3, up_mode="sub_pixel")
    randomise(ours)
    mirror = TUNet(dataclasses.replace(ours.config, up_mode="resize_conv"))
    widths = [3 * 2**i for i in range(4)]
    for up, i in zip(mirror.up, reversed(range(3))):
        up.upsample = TSubPixel(widths[i + 1], widths[i], 2)
    theirs = mirror_of(ours, mirror)
    compare(ours, theirs, (2, 2, 21, 30), train=True)  # 21x30 is padded to 24x32 inside


def test_unet_rejects_unknown_up_mode_naming_sub_pixel():
    with pytest.raises(ValueError, match="'sub_pixel'.*got 'pixelshuffle'"):
        models.create("unet", num_classes=2, up_mode="pixelshuffle")
