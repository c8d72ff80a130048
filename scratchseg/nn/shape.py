"""Shape layers, as ``torch.nn.Flatten``, ``PixelShuffle`` and ``PixelUnshuffle``."""

from __future__ import annotations

from .. import functional as F
from ..args import positive_int
from ..autograd import Tensor
from .module import Module

__all__ = ["Flatten", "PixelShuffle", "PixelUnshuffle"]


class Flatten(Module):
    """Merge dimensions ``start_dim..end_dim`` into one.

    Shape: (N, C, H, W) -> (N, C*H*W) with the defaults.
    """

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, input):
        x = input if isinstance(input, Tensor) else Tensor(input)
        return x.flatten(self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class PixelShuffle(Module):
    """Channels into space: ``(*, C*r^2, H, W) -> (*, C, H*r, W*r)`` (``functional.pixel_shuffle``).

    Shape:
        (*, C*r^2, H, W) -> (*, C, H*r, W*r), r = upscale_factor

        >>> import scratchseg
        >>> PixelShuffle(3)(scratchseg.zeros(1, 9, 4, 4)).shape
        (1, 1, 12, 12)
    """

    def __init__(self, upscale_factor):
        super().__init__()
        self.upscale_factor = positive_int(upscale_factor, "upscale_factor", "PixelShuffle")

    def forward(self, input):
        return F.pixel_shuffle(input, self.upscale_factor)

    def extra_repr(self):
        return f"upscale_factor={self.upscale_factor}"


class PixelUnshuffle(Module):
    """Space into channels: ``(*, C, H*r, W*r) -> (*, C*r^2, H, W)`` (``functional.pixel_unshuffle``).

    Shape:
        (*, C, H*r, W*r) -> (*, C*r^2, H, W), r = downscale_factor

        >>> import scratchseg
        >>> PixelUnshuffle(3)(scratchseg.zeros(1, 1, 12, 12)).shape
        (1, 9, 4, 4)
    """

    def __init__(self, downscale_factor):
        super().__init__()
        self.downscale_factor = positive_int(downscale_factor, "downscale_factor", "PixelUnshuffle")

    def forward(self, input):
        return F.pixel_unshuffle(input, self.downscale_factor)

    def extra_repr(self):
        return f"downscale_factor={self.downscale_factor}"
