"""``ConvBlock``: convolution, normalisation, activation, dropout and pooling in
an order given as a string.

    "conv-bn-act"                  the usual post-activation block (default)
    "conv-bn-act-dropout-pool"     with dropout and pooling at the end
    "bn-act-conv"                  pre-activation (ResNet v2 style)

Children are named ``conv``, ``bn``, ``act``, ``dropout`` and ``pool``, so a
state dict reads ``down1.conv.weight``, ``down1.bn.running_mean``. ``norm``
chooses what fills the ``bn`` slot: batch (default), group, instance or layer
norm (``nn.norm_layer``), or none; the slot keeps its name whatever the norm,
as torchvision's ResNet keeps ``bn1`` when given another ``norm_layer``.

    >>> from scratchseg import nn
    >>> block = nn.ConvBlock(3, 8)
    >>> [name for name, _ in block.named_children()], block.conv.bias is None
    (['conv', 'bn', 'act'], True)
    >>> pre = nn.ConvBlock(3, 8, order="bn-act-conv")
    >>> pre.bn.num_features, pre.conv.bias is not None
    (3, True)
    >>> nn.ConvBlock(3, 48, norm="group").bn, nn.ConvBlock(3, 8, norm=None).conv.bias is not None
    (GroupNorm(24, 48, eps=1e-05, affine=True, bias=True), True)
"""

from __future__ import annotations

from collections import OrderedDict

from .activation import LeakyReLU, ReLU, Sigmoid, Tanh
from .containers import Sequential
from .conv import Conv2d
from .dropout import Dropout
from .module import Module
from .normalization import NORMS, norm_layer
from .pooling import AvgPool2d, MaxPool2d

__all__ = ["ConvBlock"]

_ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh, "sigmoid": Sigmoid}
_POOLS = {"max": MaxPool2d, "avg": AvgPool2d}
_PARTS = ("conv", "bn", "act", "dropout", "pool")


def _activation(activation):
    if isinstance(activation, Module):
        return activation
    if isinstance(activation, type) and issubclass(activation, Module):
        return activation()
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}, None, or a Module"
        )
    return _ACTIVATIONS[activation]()


def _pool(pool):
    """``'max'`` / ``'avg'`` (2x2, stride 2) or a Module."""
    if isinstance(pool, Module):
        return pool
    if pool not in _POOLS:
        raise ValueError(f"unknown pool {pool!r}; expected 'max', 'avg', None or a Module")
    return _POOLS[pool](2)


class ConvBlock(Sequential):
    """A Sequential of conv / bn / act / dropout / pool in the order ``order`` says.

    ``order``: the parts joined by ``-``; each of conv, bn, act, dropout, pool
    at most once, conv required. ``norm`` fills the bn part: 'batch'
    (default), 'group' (GroupNorm with ``nn.group_count(C)`` groups: at most
    32, at least 2 channels each), 'instance' (InstanceNorm2d with affine),
    'layer' (GroupNorm(1, C)), a callable ``C -> Module``, or None (no bn
    part). The conv has no bias when a norm follows it directly (the norm's
    shift takes its place, as in torchvision and Detectron2). The norm
    normalises whatever flows in at its place: ``in_channels`` before the
    conv, ``out_channels`` after.
    ``activation``: 'relu', 'leaky_relu', 'tanh', 'sigmoid', a Module, or
    None (no act). ``dropout``: element-wise drop probability; 0 leaves it
    out. ``pool``: None, 'max' or 'avg' (2x2, stride 2) or a Module. A
    dropout or pool asked for but absent from ``order`` is appended at the
    end (dropout before pool).

    Shape:
        (N, in_channels, H, W) -> (N, out_channels, H', W') with
        H' = H + 2*padding - dilation*(kernel_size-1) - 1 + 1 (= H with the defaults),
        halved (floor) by a pool.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size=3,
        padding=1,
        dilation=1,
        order="conv-bn-act",
        activation="relu",
        dropout=0.0,
        pool=None,
        stride=1,
        norm="batch",
    ):
        if not isinstance(order, str):
            raise TypeError(f"order must be a string like 'conv-bn-act', got {type(order).__name__}")
        parts = [p.strip() for p in order.lower().split("-")]
        for p in parts:
            if p not in _PARTS:
                raise ValueError(f"unknown part {p!r} in order {order!r}; expected parts from {_PARTS}")
        if len(set(parts)) != len(parts):
            raise ValueError(f"order {order!r} names a part twice")
        if "conv" not in parts:
            raise ValueError(f"order {order!r} has no 'conv'")
        if isinstance(norm, str) and norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}, None, or a callable C -> Module")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if dropout > 0 and "dropout" not in parts:
            parts.insert(parts.index("pool") if "pool" in parts else len(parts), "dropout")
        if pool is not None and "pool" not in parts:
            parts.append("pool")

        modules = OrderedDict()
        channels = in_channels
        for i, part in enumerate(parts):
            if part == "conv":
                bn_next = norm is not None and i + 1 < len(parts) and parts[i + 1] == "bn"
                modules["conv"] = Conv2d(
                    in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                    dilation=dilation, bias=not bn_next,
                )
                channels = out_channels
            elif part == "bn" and norm is not None:
                modules["bn"] = norm_layer(norm, channels)
            elif part == "act" and activation is not None:
                modules["act"] = _activation(activation)
            elif part == "dropout" and dropout > 0:
                modules["dropout"] = Dropout(dropout)
            elif part == "pool" and pool is not None:
                modules["pool"] = _pool(pool)
        super().__init__(modules)
        self.order = "-".join(parts)
