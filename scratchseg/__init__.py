"""scratchseg: semantic segmentation built from scratch.

Every layer's forward and backward pass is written by hand in NumPy and runs
unchanged on CuPy arrays on a GPU. The public surface mirrors PyTorch::

    import scratchseg
    import scratchseg.functional as F
    from scratchseg import nn

    x = scratchseg.tensor(images, requires_grad=True)
    loss = F.cross_entropy(model(x), masks)
    loss.backward()
"""

from . import backend, random
from .autograd import Function, Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from .backend import get_array_module, get_default_dtype, set_backend, set_default_dtype
from .random import manual_seed

__version__ = "0.1.0"


def cat(tensors, dim=0):
    """Concatenate tensors along ``dim`` (as ``torch.cat``)."""
    from .functional.shape import cat as _cat

    return _cat(tensors, dim)


def _factory(fill):
    def make(*shape, dtype=None, requires_grad=False):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        xp = backend.xp()
        data = fill(xp, shape, dtype or get_default_dtype())
        return Tensor(data, requires_grad=requires_grad)

    return make


zeros = _factory(lambda xp, shape, dt: xp.zeros(shape, dtype=dt))
ones = _factory(lambda xp, shape, dt: xp.ones(shape, dtype=dt))


def randn(*shape, dtype=None, requires_grad=False):
    """Standard normal samples from the global seeded generator."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    data = random.generator().standard_normal(shape).astype(dtype or get_default_dtype())
    return Tensor(backend.xp().asarray(data), requires_grad=requires_grad)


_SUBMODULES = ("functional", "nn", "optim", "models", "data", "metrics", "gradcheck", "training", "checkpoint")


def __getattr__(name):
    """Import the larger submodules on first use (``scratchseg.nn``, ``scratchseg.models``, ...)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'scratchseg' has no attribute {name!r}")


__all__ = [
    "Tensor",
    "Function",
    "tensor",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "cat",
    "zeros",
    "ones",
    "randn",
    "manual_seed",
    "set_backend",
    "get_array_module",
    "set_default_dtype",
    "get_default_dtype",
    "backend",
    "random",
]
