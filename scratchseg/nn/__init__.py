"""Neural-network building blocks, as ``torch.nn``: ``Module``, ``Parameter``,
containers, layers under torch's names, ``ConvBlock`` and ``nn.init``.

The layers live in one file per family, mirroring ``scratchseg.functional``
as ``torch/nn/modules`` does: ``conv``, ``normalization``, ``dropout``,
``pooling``, ``activation``, ``upsampling``, ``shape``, ``linear``, ``padding``
and ``loss``.

    >>> from scratchseg import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    >>> net.num_parameters()
    240
"""

import sys as _sys

from .. import functional  # scratchseg.nn.functional, as torch.nn.functional
from . import init
from .blocks import ConvBlock
from .containers import Identity, ModuleDict, ModuleList, Sequential
from .activation import LeakyReLU, LogSoftmax, ReLU, Sigmoid, Softmax, Tanh
from .conv import Conv2d, Conv3d, ConvTranspose2d, ConvTranspose3d
from .dropout import Dropout, Dropout2d, Dropout3d
from .linear import Linear
from .loss import BCEWithLogitsLoss, CrossEntropyLoss
from .module import IncompatibleKeys, Module, StateDictError
from .normalization import (
    NORMS, BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,
    LayerNorm, group_count, norm_layer,
)
from .parameter import Parameter
from .padding import ConstantPad2d, ReflectionPad2d, ReplicationPad2d, ZeroPad2d
from .pooling import AdaptiveAvgPool2d, AdaptiveAvgPool3d, AvgPool2d, AvgPool3d, MaxPool2d, MaxPool3d, MaxUnpool2d
from .shape import Flatten, PixelShuffle, PixelUnshuffle
from .upsampling import Upsample

__all__ = [
    "init",
    "functional",
    "Module",
    "Parameter",
    "StateDictError",
    "IncompatibleKeys",
    "Sequential",
    "ModuleList",
    "ModuleDict",
    "Identity",
    "ConvBlock",
    "Conv2d",
    "ConvTranspose2d",
    "Conv3d",
    "ConvTranspose3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "LayerNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "NORMS",
    "norm_layer",
    "group_count",
    "Dropout",
    "Dropout2d",
    "Dropout3d",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "MaxUnpool2d",
    "MaxPool3d",
    "AvgPool3d",
    "AdaptiveAvgPool3d",
    "Linear",
    "ReflectionPad2d",
    "ReplicationPad2d",
    "ZeroPad2d",
    "ConstantPad2d",
    "PixelShuffle",
    "PixelUnshuffle",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "Sigmoid",
    "Softmax",
    "LogSoftmax",
    "Upsample",
    "Flatten",
    "CrossEntropyLoss",
    "BCEWithLogitsLoss",
]

_sys.modules[__name__ + ".functional"] = functional  # `import scratchseg.nn.functional as F` works too
