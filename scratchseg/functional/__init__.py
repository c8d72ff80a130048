"""Functional ops, mirroring ``torch.nn.functional``: same names, arguments,
defaults and output shapes. One file per family, each op a ``Function`` with
its forward and backward side by side."""

from .activation import *  # noqa: F401,F403
from .conv import *  # noqa: F401,F403
from .conv3d import *  # noqa: F401,F403
from .dropout import *  # noqa: F401,F403
from .linear import *  # noqa: F401,F403
from .loss import *  # noqa: F401,F403
from .normalization import *  # noqa: F401,F403
from .pooling import *  # noqa: F401,F403
from .pooling3d import *  # noqa: F401,F403
from .shape import *  # noqa: F401,F403
from .unpooling import *  # noqa: F401,F403
from .upsampling import *  # noqa: F401,F403
from . import activation, conv, dropout, im2col, loss, normalization, pooling, shape, unpooling, upsampling  # noqa: F401
