"""Neural-network building blocks, as ``torch.nn``: ``Module``, ``Parameter``,
containers, layers under torch's names, ``ConvBlock`` and ``nn.init``.

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
from . import layers as _layers
from .layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    Conv2d,
    ConvTranspose2d,
    CrossEntropyLoss,
    Dropout,
    Dropout2d,
    Flatten,
    LeakyReLU,
    LogSoftmax,
    MaxPool2d,
    ReLU,
    Sigmoid,
    Softmax,
    Tanh,
    Upsample,
)
from .module import IncompatibleKeys, Module, StateDictError
from .parameter import Parameter

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
    *_layers.__all__,
]

_sys.modules[__name__ + ".functional"] = functional  # `import scratchseg.nn.functional as F` works too
