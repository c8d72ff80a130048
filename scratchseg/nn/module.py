"""``Module``: the base class of every layer and model, as ``torch.nn.Module``.

A module owns three kinds of state, registered simply by assigning attributes:

* **parameters** (``Parameter``): learned, returned by ``parameters()``;
* **buffers** (plain arrays, ``register_buffer``): state that is saved but not
  learned, such as batch norm's ``running_mean``;
* **sub-modules** (``Module``): their parameters and buffers are reached
  through dotted names (``encoder.0.conv.weight``).

``state_dict()`` maps those dotted names to arrays with PyTorch's names, so a
PyTorch state dict converted to NumPy loads as it is, and back::

    >>> import numpy as np
    >>> from scratchseg import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    >>> list(net.state_dict())  # doctest: +NORMALIZE_WHITESPACE
    ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean',
     '1.running_var', '1.num_batches_tracked']
    >>> net.double().state_dict()["0.weight"].dtype
    dtype('float64')
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy

from .. import backend
from ..args import is_array
from ..autograd import Tensor
from .parameter import Parameter

__all__ = ["Module", "StateDictError", "IncompatibleKeys"]

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class StateDictError(RuntimeError):
    """``load_state_dict`` found missing, unexpected or mis-shaped entries."""


def _is_plain_array(value):
    """A NumPy or CuPy array, not a Tensor (which ``args.is_array`` accepts too): what a buffer holds."""
    return is_array(value) and not isinstance(value, Tensor)


def _is_floating(array):
    return numpy.dtype(array.dtype).kind == "f"


class Module:
    """Base class of layers and models.

    Subclasses call ``super().__init__()`` first, assign their parameters,
    buffers and sub-modules as attributes, and define ``forward``. Calling the
    module calls ``forward``.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent_buffers", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _followed_by(self, following):
        """A callable that runs this module and then ``following`` as one op with the same result, where
        the two fuse; None (the default) where they do not. ``Sequential`` asks each of its modules."""
        return None

    # -------------------------------------------------------- registration
    def _check_ready(self):
        if "_parameters" not in self.__dict__:
            raise AttributeError(
                f"cannot assign parameters, buffers or modules before {type(self).__name__}.__init__ "
                "calls super().__init__()"
            )

    @staticmethod
    def _check_name(name):
        if not isinstance(name, str):
            raise TypeError(f"attribute name must be a string, got {type(name).__name__}")
        if "." in name or name == "":
            raise KeyError(f"attribute name {name!r} must be non-empty and contain no '.'")

    def register_parameter(self, name, param):
        """Add ``param`` (a ``Parameter`` or ``None``) under ``name``."""
        self._check_ready()
        self._check_name(name)
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"cannot assign {type(param).__name__} as parameter {name!r} (a Parameter or None is expected)"
            )
        if hasattr(self, name) and name not in self._parameters:
            raise KeyError(f"attribute {name!r} already exists")
        self._parameters[name] = param

    def register_buffer(self, name, tensor, persistent=True):
        """Add an array (or ``None``) under ``name``: saved in ``state_dict`` when
        ``persistent``, moved by ``to()``, but not learned."""
        self._check_ready()
        self._check_name(name)
        if isinstance(tensor, Tensor):
            tensor = tensor.data
        if tensor is not None and not _is_plain_array(tensor):
            raise TypeError(f"cannot assign {type(tensor).__name__} as buffer {name!r} (an array or None is expected)")
        if hasattr(self, name) and name not in self._buffers:
            raise KeyError(f"attribute {name!r} already exists")
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent_buffers.discard(name)
        else:
            self._non_persistent_buffers.add(name)

    def add_module(self, name, module):
        """Add ``module`` (a ``Module`` or ``None``) as a child named ``name``."""
        self._check_ready()
        if not isinstance(name, str) or name == "" or "." in name:
            raise KeyError(f"module name {name!r} must be a non-empty string without '.'")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        if hasattr(self, name) and name not in self._modules:
            raise KeyError(f"attribute {name!r} already exists")
        self._modules[name] = module

    register_module = add_module

    def __setattr__(self, name, value):
        d = self.__dict__
        params, buffers, modules = d.get("_parameters"), d.get("_buffers"), d.get("_modules")
        if isinstance(value, Parameter):
            self._check_ready()
            for store in (buffers, modules):
                store.pop(name, None)
            d.pop(name, None)
            params[name] = value
        elif params is not None and name in params:
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} as parameter {name!r} (a Parameter or None is expected)"
                )
            params[name] = None
        elif isinstance(value, Module):
            self._check_ready()
            for store in (params, buffers):
                store.pop(name, None)
            d.pop(name, None)
            modules[name] = value
        elif modules is not None and name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as child module {name!r} (a Module or None)")
            modules[name] = None
        elif buffers is not None and name in buffers:
            if isinstance(value, Tensor):
                value = value.data
            if value is not None and not _is_plain_array(value):
                raise TypeError(f"cannot assign {type(value).__name__} as buffer {name!r} (an array or None)")
            buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # only called when normal lookup fails
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                self._non_persistent_buffers.discard(name)
                return
        object.__delattr__(self, name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._parameters) | set(self._buffers) | set(self._modules))

    # ------------------------------------------------------------ walking
    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        """``(dotted name, module)`` for this module and every descendant, depth first."""
        if memo is None:
            memo = set()
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, module in self._modules.items():
            if module is None:
                continue
            sub = prefix + ("." if prefix else "") + name
            yield from module.named_modules(memo, sub, remove_duplicate)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        seen = set()
        for name, module in self._modules.items():
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                yield name, module

    def children(self):
        for _, m in self.named_children():
            yield m

    def _named_members(self, get_members, prefix="", recurse=True):
        seen = set()
        modules = self.named_modules(prefix=prefix) if recurse else [(prefix, self)]
        for module_prefix, module in modules:
            for name, value in get_members(module):
                if value is None or id(value) in seen:
                    continue
                seen.add(id(value))
                yield module_prefix + ("." if module_prefix else "") + name, value

    def named_parameters(self, prefix="", recurse=True):
        """``(dotted name, Parameter)`` pairs, each parameter once (shared ones are not repeated)."""
        yield from self._named_members(lambda m: m._parameters.items(), prefix, recurse)

    def parameters(self, recurse=True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix="", recurse=True):
        yield from self._named_members(lambda m: m._buffers.items(), prefix, recurse)

    def buffers(self, recurse=True):
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def num_parameters(self, trainable_only=False):
        """Number of scalar parameters (only those that require grad when ``trainable_only``)."""
        return sum(int(p.data.size) for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------- modes
    def train(self, mode=True):
        """Training mode (dropout drops, batch norm uses batch statistics); returns ``self``."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be a bool, got {mode!r}")
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        """Evaluation mode, the same as ``train(False)``; returns ``self``."""
        return self.train(False)

    def requires_grad_(self, requires_grad=True):
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none=True):
        """Forget the gradients of every parameter (``.grad = None``, or zeros)."""
        for p in self.parameters():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad = p.grad * 0

    def apply(self, fn):
        """Call ``fn(module)`` on every descendant, children first, then ``self``; returns ``self``."""
        for module in self.children():
            module.apply(fn)
        fn(self)
        return self

    # -------------------------------------------------- devices and dtypes
    def _convert(self, fn_array):
        for module in self.modules():
            for p in module._parameters.values():
                if p is None:
                    continue
                p.data = fn_array(p.data)
                if p.grad is not None:
                    p.grad = fn_array(p.grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = fn_array(b)
        return self

    def to(self, device=None, dtype=None):
        """Move every parameter and buffer to ``device`` ('cpu' or 'cuda') and/or
        cast the floating ones to ``dtype``, in place; returns ``self``.

        ``model.to("cuda")``, ``model.to(numpy.float64)``,
        ``model.to(device="cpu", dtype=numpy.float32)``. Integer buffers
        (``num_batches_tracked``) keep their dtype, as in torch. The Parameter
        objects stay the same, so an optimizer built before still updates them.
        """
        if device is not None and dtype is None and not isinstance(device, str):
            device, dtype = None, device  # model.to(numpy.float64)
        if dtype is not None:
            dtype = numpy.dtype(dtype)
            if dtype.kind != "f":
                raise TypeError(f"Module.to() only accepts floating point dtypes, got {dtype}")

        def convert(a):
            if device is not None:
                a = backend.to_device(a, device)
            if dtype is not None and _is_floating(a) and a.dtype != dtype:
                a = a.astype(dtype)
            return a

        return self._convert(convert)

    def double(self):
        """Cast floating parameters and buffers to float64; returns ``self``."""
        return self.to(dtype=numpy.float64)

    def float(self):
        """Cast floating parameters and buffers to float32; returns ``self``."""
        return self.to(dtype=numpy.float32)

    def half(self):
        return self.to(dtype=numpy.float16)

    def cuda(self):
        """Move everything to the GPU (CuPy arrays); returns ``self``."""
        return self.to("cuda")

    def cpu(self):
        """Move everything to the host (NumPy arrays); returns ``self``."""
        return self.to("cpu")

    # --------------------------------------------------------- state dict
    def state_dict(self, destination=None, prefix="", keep_vars=False):
        """An ``OrderedDict`` from dotted names to arrays: every parameter and
        persistent buffer, in registration order, with PyTorch's names.

        The arrays are the module's own (not copies), as in torch; copy them
        (``numpy.array(a)``) to keep a snapshot. ``keep_vars=True`` returns
        the Parameter objects instead of their arrays.
        """
        if destination is None:
            destination = OrderedDict()
        for name, p in self._parameters.items():
            if p is not None:
                destination[prefix + name] = p if keep_vars else p.data
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent_buffers:
                destination[prefix + name] = b
        for name, module in self._modules.items():
            if module is not None:
                module.state_dict(destination, prefix + name + ".", keep_vars)
        return destination

    def _state_entries(self):
        """``{dotted name: (owning module, kind, attribute)}`` for every state_dict entry."""
        entries = OrderedDict()
        for prefix, module in self.named_modules(remove_duplicate=False):
            lead = prefix + "." if prefix else ""
            for name, p in module._parameters.items():
                if p is not None:
                    entries[lead + name] = (module, "param", name)
            for name, b in module._buffers.items():
                if b is not None and name not in module._non_persistent_buffers:
                    entries[lead + name] = (module, "buffer", name)
        return entries

    def load_state_dict(self, state_dict, strict=True):
        """Copy the arrays of ``state_dict`` into this module's parameters and buffers.

        Values may be NumPy or CuPy arrays, Tensors, or anything NumPy can
        convert (a CPU ``torch`` tensor, a list); each is cast to the dtype and
        device of the entry it replaces. Problems are gathered and reported in
        ONE ``StateDictError`` (a ``RuntimeError``) that lists the missing keys,
        the unexpected keys and every shape mismatch (name, expected, got).
        Shape mismatches are errors even with ``strict=False``; otherwise
        ``strict=False`` loads what matches and returns
        ``IncompatibleKeys(missing_keys, unexpected_keys)``.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"expected a mapping from names to arrays, got {type(state_dict).__name__}")
        entries = self._state_entries()
        missing = [k for k in entries if k not in state_dict]
        unexpected = [k for k in state_dict if k not in entries]
        mismatched, converted = [], {}
        for key, (module, kind, name) in entries.items():
            if key not in state_dict:
                continue
            target = module._parameters[name].data if kind == "param" else module._buffers[name]
            value = state_dict[key]
            if isinstance(value, Tensor):
                value = value.data
            if not (_is_plain_array(value) and backend.is_cupy_array(value)):
                value = numpy.asarray(value)
            if tuple(value.shape) != tuple(target.shape):
                mismatched.append((key, tuple(target.shape), tuple(value.shape)))
                continue
            converted[key] = value
        if mismatched or (strict and (missing or unexpected)):
            lines = [f"error(s) in loading state_dict for {type(self).__name__}:"]
            if missing:
                lines.append("  missing keys: " + ", ".join(repr(k) for k in missing))
            if unexpected:
                lines.append("  unexpected keys: " + ", ".join(repr(k) for k in unexpected))
            for key, expected, got in mismatched:
                lines.append(f"  size mismatch for {key!r}: expected shape {expected}, got {got}")
            raise StateDictError("\n".join(lines))
        for key, value in converted.items():
            module, kind, name = entries[key]
            target = module._parameters[name].data if kind == "param" else module._buffers[name]
            value = backend.to_device(value, backend.device_of(target))
            target[...] = value.astype(target.dtype, copy=False)
        return IncompatibleKeys(missing, unexpected)

    # -------------------------------------------------------------- repr
    def extra_repr(self):
        """One line of constructor arguments shown by ``repr`` (subclasses override)."""
        return ""

    def __repr__(self):
        extra = self.extra_repr()
        children = [(name, m) for name, m in self._modules.items() if m is not None]
        if not children:
            return f"{type(self).__name__}({extra})"
        lines = [f"{type(self).__name__}("]
        if extra:
            lines.extend("  " + line for line in extra.split("\n"))
        for name, module in children:
            body = repr(module).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        lines.append(")")
        return "\n".join(lines)
