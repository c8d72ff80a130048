"""Up-sampling building blocks a decoder chooses by name.

A segmentation network shrinks the image to see context and must grow the
scores back to one per pixel. There are five classic ways, all here:

* ``'transposed'`` -- a learnable transposed convolution ("deconvolution",
  FCN, U-Net's 2x2 up-convolution). It can start as exact bilinear
  interpolation (``bilinear_init=True``, as FCN and d2l do) and learn from
  there. With a kernel that is not a multiple of the stride it produces
  checkerboard artefacts (Odena et al. 2016).
* ``'resize_conv'`` -- nearest-neighbour resize, then a 3x3 convolution
  (Odena, Dumoulin & Olah, "Deconvolution and Checkerboard Artifacts",
  Distill 2016): learnable, and every output pixel sees the same number of
  inputs, so no checkerboard.
* ``'sub_pixel'`` -- a 3x3 convolution to ``out_ch * scale**2`` channels at
  the low resolution, then a pixel shuffle that moves each group of
  ``scale**2`` channels into a ``scale x scale`` block of pixels (Shi et al.,
  "Real-Time Single Image and Video Super-Resolution Using an Efficient
  Sub-Pixel Convolutional Neural Network", CVPR 2016). Learnable and cheap
  (the convolution runs before the resolution grows). Started with ICNR
  (Aitken et al. 2017: the ``scale**2`` sub-kernels of each output channel
  equal) it is exactly resize-conv at initialisation, so no checkerboard.
* ``'bilinear'`` -- fixed bilinear interpolation (DeepLab, hypercolumns);
  no parameters unless the channel count changes (then a 1x1 convolution
  follows).
* ``'trilinear'`` -- the same for volumes ``(N, C, D, H, W)``.

``make_upsample(mode, in_ch, out_ch, scale)`` builds any of them; every one
maps ``(N, in_ch, H, W)`` to ``(N, out_ch, scale*H, scale*W)``.

    >>> up = make_upsample("resize_conv", 4, 2, 2)
    >>> up(scratchseg.randn(1, 4, 3, 5)).shape
    (1, 2, 6, 10)
"""

from __future__ import annotations

import numpy

import scratchseg
from scratchseg import functional as F
from scratchseg import nn
from scratchseg.args import positive_int
from scratchseg.backend import get_array_module

__all__ = [
    "MODES",
    "bilinear_kernel",
    "make_upsample",
    "transposed_upsample",
    "ResizeConv",
    "SubPixel",
    "Interpolate",
]

MODES = ("transposed", "resize_conv", "sub_pixel", "bilinear", "trilinear")


def bilinear_kernel(in_ch, out_ch, size):
    """The weight of a transposed convolution that performs bilinear up-sampling.

    Channel ``c`` maps to channel ``c`` (for ``c < min(in_ch, out_ch)``) through
    the 2-D tent filter; every other channel pair gets zeros. This is the FCN
    (``surgery.interp``) / d2l initialisation: with ``stride = factor`` and
    ``size = 2*factor - factor % 2`` the transposed convolution *is* bilinear
    interpolation.

    filt[i, j] = (1 - |i - center| / f) * (1 - |j - center| / f),
    f = ceil(size / 2), center = f - 1 (odd size) or f - 0.5 (even size).

    Shape:
        returns a NumPy float64 array of shape ``(in_ch, out_ch, size, size)``,
        the ``ConvTranspose2d`` weight layout.

    >>> bilinear_kernel(2, 2, 4).shape
    (2, 2, 4, 4)
    >>> bilinear_kernel(1, 1, 4)[0, 0, 0]
    array([0.0625, 0.1875, 0.1875, 0.0625])
    """
    in_ch = positive_int(in_ch, "in_ch", "bilinear_kernel")
    out_ch = positive_int(out_ch, "out_ch", "bilinear_kernel")
    size = positive_int(size, "size", "bilinear_kernel")
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = numpy.arange(size, dtype=numpy.float64)
    tent = 1.0 - numpy.abs(og - center) / factor  # (size,)
    filt = tent[:, None] * tent[None, :]  # (size, size)
    weight = numpy.zeros((in_ch, out_ch, size, size), dtype=numpy.float64)
    channels = numpy.arange(min(in_ch, out_ch))
    weight[channels, channels] = filt
    return weight


def _fill_bilinear_(weight):
    """Overwrite a ``ConvTranspose2d`` weight (in place) with ``bilinear_kernel``."""
    in_ch, out_ch, kh, kw = weight.shape
    if kh != kw:
        raise ValueError(f"bilinear initialisation needs a square kernel, got {kh}x{kw}")
    xp = get_array_module(weight.data)
    weight.data[...] = xp.asarray(bilinear_kernel(in_ch, out_ch, kh), dtype=weight.data.dtype)
    return weight


def transposed_upsample(in_ch, out_ch, scale, kernel_size=None, padding=None, bias=True, bilinear_init=False):
    """A ``ConvTranspose2d`` that multiplies the spatial size by ``scale``.

    The default kernel is ``2*scale - scale % 2`` (the bilinear kernel's size,
    and a multiple of the stride for even scales, which avoids checkerboards);
    ``padding`` defaults to ``(kernel_size - scale) // 2`` so that

    Shape:
        H_out = (H - 1)*scale - 2*padding + kernel_size = scale*H
        (the FCN score up-samplers pass ``padding=0`` and crop instead).

    >>> transposed_upsample(3, 3, 2)(scratchseg.randn(1, 3, 5, 7)).shape
    (1, 3, 10, 14)
    >>> transposed_upsample(3, 3, 2, kernel_size=2)(scratchseg.randn(1, 3, 5, 7)).shape  # U-Net's 2x2
    (1, 3, 10, 14)
    """
    scale = positive_int(scale, "upsampling scale")
    if kernel_size is None:
        kernel_size = 2 * scale - scale % 2
    if padding is None:
        if kernel_size < scale or (kernel_size - scale) % 2:
            raise ValueError(
                f"a transposed convolution with stride {scale} and kernel {kernel_size} cannot give exactly "
                f"{scale}x the input size; use kernel_size = {scale} + 2*p for some p >= 0"
            )
        padding = (kernel_size - scale) // 2
    up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size, stride=scale, padding=padding, bias=bias)
    if bilinear_init:
        _fill_bilinear_(up.weight)
        if bias:
            up.bias.data[...] = 0  # pure interpolation to start with
    return up


class ResizeConv(nn.Module):
    """Nearest-neighbour resize by ``scale``, then a 3x3 convolution (Odena et al. 2016).

    out = conv3x3(nearest_upsample(x, scale))

    Shape:
        (N, in_ch, H, W) -> (N, out_ch, scale*H, scale*W)

    >>> ResizeConv(4, 2, 3)(scratchseg.randn(2, 4, 3, 5)).shape
    (2, 2, 9, 15)
    """

    def __init__(self, in_ch, out_ch, scale, bias=True):
        super().__init__()
        self.scale = positive_int(scale, "upsampling scale")
        # padding 1 keeps the resized size: the resize, not the conv, sets the geometry
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=self.scale, mode="nearest")  # (N, in_ch, s*H, s*W)
        return self.conv(x)


class SubPixel(nn.Module):
    """Sub-pixel convolution (Shi et al. 2016): a 3x3 convolution to ``out_ch * scale**2``
    channels, then ``pixel_shuffle`` by ``scale``.

    out = pixel_shuffle(conv3x3(x), scale): output pixel ``(h*s + i, w*s + j)`` of
    channel ``c`` is conv channel ``c*s^2 + i*s + j`` at ``(h, w)``.

    With ``icnr=True`` (the default) the weight starts as ICNR (Aitken et al.
    2017, "Checkerboard artifact free sub-pixel convolution"): the ``s^2``
    sub-kernels of each output channel are copies of one, so at initialisation
    every ``s x s`` block is constant, i.e. nearest resize of a convolution,
    and no checkerboard. ``icnr_()`` re-applies it after a model re-draws its
    weights.

    Shape:
        (N, in_ch, H, W) -> conv (N, out_ch*scale**2, H, W) -> (N, out_ch, scale*H, scale*W)

    >>> SubPixel(4, 2, 3)(scratchseg.randn(2, 4, 3, 5)).shape
    (2, 2, 9, 15)
    >>> up = SubPixel(1, 1, 2)
    >>> y = up(scratchseg.randn(1, 1, 2, 2)).numpy()[0, 0]
    >>> bool((y[0::2, 0::2] == y[1::2, 1::2]).all())   # ICNR: constant 2x2 blocks at the start
    True
    """

    def __init__(self, in_ch, out_ch, scale, bias=True, icnr=True):
        super().__init__()
        self.scale = positive_int(scale, "upsampling scale")
        # padding 1 keeps the size: the shuffle, not the conv, sets the geometry
        self.conv = nn.Conv2d(in_ch, out_ch * self.scale**2, 3, padding=1, bias=bias)
        self.shuffle = nn.PixelShuffle(self.scale)
        if icnr:
            self.icnr_()

    def icnr_(self):
        """Make the ``scale**2`` sub-kernels (and biases) of each output channel copies of the first."""
        r2 = self.scale**2
        for p in (self.conv.weight, self.conv.bias):
            if p is None:
                continue
            groups = p.data.reshape((-1, r2) + p.shape[1:])  # (out_ch, s^2, ...): channel c*s^2 + k
            groups[...] = groups[:, :1].copy()
        return self

    def forward(self, x):
        return self.shuffle(self.conv(x))  # (N, out_ch*s^2, H, W) -> (N, out_ch, s*H, s*W)


class Interpolate(nn.Module):
    """Fixed (parameter-free) bilinear or trilinear up-sampling by ``scale``.

    When ``in_ch != out_ch`` a 1x1 convolution follows, so the block can stand
    where a learnable up-sampler would change the channel count (U-Net).

    Shape:
        'bilinear':  (N, in_ch, H, W) -> (N, out_ch, scale*H, scale*W)
        'trilinear': (N, C, D, H, W) -> (N, C, scale*D, scale*H, scale*W), in_ch == out_ch

    >>> Interpolate(3, 3, 4)(scratchseg.randn(1, 3, 2, 3)).shape
    (1, 3, 8, 12)
    >>> Interpolate(2, 2, 2, mode="trilinear")(scratchseg.randn(1, 2, 2, 3, 4)).shape
    (1, 2, 4, 6, 8)
    """

    def __init__(self, in_ch, out_ch, scale, mode="bilinear", align_corners=False):
        super().__init__()
        scale = positive_int(scale, "upsampling scale")
        if mode not in ("bilinear", "trilinear"):
            raise ValueError(f"Interpolate mode must be 'bilinear' or 'trilinear', got {mode!r}")
        if mode == "trilinear" and in_ch != out_ch:
            raise ValueError(
                f"'trilinear' up-sampling is parameter-free and keeps the channels: in_ch ({in_ch}) "
                f"must equal out_ch ({out_ch})"
            )
        self.scale, self.mode, self.align_corners = int(scale), mode, align_corners
        self.proj = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        expected = 4 if self.mode == "bilinear" else 5
        if x.ndim != expected:
            raise ValueError(f"{self.mode} up-sampling expects a {expected}-D input, got shape {tuple(x.shape)}")
        x = F.interpolate(x, scale_factor=self.scale, mode=self.mode, align_corners=self.align_corners)
        return self.proj(x) if self.proj is not None else x


def make_upsample(mode, in_ch, out_ch, scale, **options):
    """Build the up-sampler named ``mode`` (one of ``MODES``).

    ``options`` go to the chosen block: ``kernel_size``, ``padding``, ``bias``,
    ``bilinear_init`` for ``'transposed'``; ``bias`` for ``'resize_conv'``;
    ``bias`` and ``icnr`` for ``'sub_pixel'``; ``align_corners`` for
    ``'bilinear'``/``'trilinear'``.

    Shape:
        (N, in_ch, H, W) -> (N, out_ch, scale*H, scale*W)
        ('trilinear': (N, C, D, H, W) -> (N, C, scale*D, scale*H, scale*W))

    >>> [tuple(make_upsample(m, 2, 2, 2)(scratchseg.randn(1, 2, 3, 3)).shape)
    ...  for m in ("transposed", "resize_conv", "sub_pixel", "bilinear")]
    [(1, 2, 6, 6), (1, 2, 6, 6), (1, 2, 6, 6), (1, 2, 6, 6)]
    """
    if mode == "transposed":
        return transposed_upsample(in_ch, out_ch, scale, **options)
    if mode == "resize_conv":
        return ResizeConv(in_ch, out_ch, scale, **options)
    if mode == "sub_pixel":
        return SubPixel(in_ch, out_ch, scale, **options)
    if mode in ("bilinear", "trilinear"):
        return Interpolate(in_ch, out_ch, scale, mode=mode, **options)
    raise ValueError(f"unknown upsampling mode {mode!r}; expected one of {', '.join(map(repr, MODES))}")
