"""The one switch between NumPy (CPU) and CuPy (GPU).

Everything in scratchseg asks this module for its array library instead of
importing NumPy for array math, so the same forward and backward passes run
on either device.

    >>> import scratchseg
    >>> scratchseg.backend.current()
    'numpy'
    >>> with scratchseg.backend.use("numpy"):
    ...     scratchseg.backend.xp().zeros(2).shape
    (2,)

Choosing the backend:

* ``scratchseg.set_backend("numpy" | "cupy")`` for the whole process;
* ``with scratchseg.backend.use("cupy"): ...`` for a block;
* the environment variable ``SCRATCHSEG_BACKEND`` at import time.

Choosing the kernels (CPU fast path):

* ``SCRATCHSEG_KERNELS=numpy`` forces the readable pure-NumPy reference;
* ``SCRATCHSEG_KERNELS=numba`` (the default when Numba imports) uses the
  compiled kernels in the top-level ``kernels`` package;
* ``scratchseg.backend.set_kernels(...)`` / ``use_kernels(...)`` at run time.

Precision on the GPU: convolutions multiply in full float32, as the reference
does, unless ``scratchseg.backend.set_allow_tf32(True)`` lets their GEMMs use
TF32 tensor cores (what ``torch.backends.cudnn.allow_tf32`` does for torch,
where it is on by default).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

try:  # before NumPy loads: kernels/ sets OpenBLAS/Numba thread defaults and glibc's mmap threshold
    import kernels as _kernels  # noqa: F401
except ImportError:  # the top-level kernels package is optional
    _kernels = None

import numpy

__all__ = [
    "BackendError",
    "current",
    "set_backend",
    "use",
    "xp",
    "get_array_module",
    "is_cupy_array",
    "to_device",
    "device_of",
    "asnumpy",
    "kernels",
    "set_kernels",
    "use_kernels",
    "replaceable",
    "kernel",
    "get_default_dtype",
    "set_default_dtype",
    "allow_tf32",
    "set_allow_tf32",
]

_BACKENDS = ("numpy", "cupy")
_KERNELS = ("numba", "numpy")


class BackendError(RuntimeError):
    """Raised when a backend is asked for and cannot be used here."""


_state = threading.local()


def _cupy():
    """Import CuPy and check that it finds a GPU, with a clear error if not."""
    try:
        import cupy  # noqa: F401  (optional dependency)
    except Exception as exc:  # ImportError, or a broken CUDA install
        raise BackendError(
            "backend 'cupy' was requested but CuPy cannot be imported "
            f"({type(exc).__name__}: {exc}); install it with "
            "`pip install scratchseg[gpu]` (or a cupy-cudaXXx wheel matching your CUDA)"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendError(
            f"backend 'cupy' was requested but CuPy finds no usable GPU ({exc})"
        ) from exc
    if count < 1:
        raise BackendError("backend 'cupy' was requested but CuPy finds no GPU (0 devices)")
    return cupy


def _check_name(name, allowed, what):
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(map(repr, allowed))}")


def _initial_backend():
    name = os.environ.get("SCRATCHSEG_BACKEND", "numpy").strip().lower() or "numpy"
    _check_name(name, _BACKENDS, "SCRATCHSEG_BACKEND")
    return name


def _initial_kernels():
    name = os.environ.get("SCRATCHSEG_KERNELS", "numba").strip().lower() or "numba"
    _check_name(name, _KERNELS, "SCRATCHSEG_KERNELS")
    return name


_global = {"backend": None, "kernels": _initial_kernels(), "dtype": numpy.dtype("float32")}


def current() -> str:
    """Name of the active backend: ``'numpy'`` or ``'cupy'``."""
    name = getattr(_state, "backend", None)
    if name is not None:
        return name
    if _global["backend"] is None:
        name = _initial_backend()
        if name == "cupy":
            _cupy()
        _global["backend"] = name
    return _global["backend"]


def set_backend(name: str) -> None:
    """Make ``name`` (``'numpy'`` or ``'cupy'``) the backend of the whole process."""
    _check_name(name, _BACKENDS, "backend")
    if name == "cupy":
        _cupy()
    _global["backend"] = name
    _state.backend = None


@contextlib.contextmanager
def use(name: str):
    """Use backend ``name`` inside a ``with`` block (this thread only)."""
    _check_name(name, _BACKENDS, "backend")
    if name == "cupy":
        _cupy()
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def xp():
    """The array module of the active backend (``numpy`` or ``cupy``)."""
    return _cupy() if current() == "cupy" else numpy


_cupy_types: dict = {}  # type -> whether it is one of CuPy's array types (asked for every op)


def is_cupy_array(a) -> bool:
    kind = type(a)
    known = _cupy_types.get(kind)
    if known is None:
        known = _cupy_types[kind] = kind.__module__.split(".")[0] == "cupy"
    return known


def get_array_module(*arrays):
    """The array module that owns ``arrays`` (CuPy if any of them lives on a GPU)."""
    for a in arrays:
        data = getattr(a, "data", a) if hasattr(a, "_ctx") else a  # a Tensor
        if is_cupy_array(data):
            import cupy

            return cupy
    return numpy


def device_of(a) -> str:
    """``'cuda'`` for a CuPy array, ``'cpu'`` otherwise."""
    return "cuda" if is_cupy_array(a) else "cpu"


def _normalise_device(device) -> str:
    name = str(device).lower()
    if name.startswith("cuda") or name in ("gpu", "cupy"):
        return "cuda"
    if name in ("cpu", "numpy"):
        return "cpu"
    raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


def to_device(a, device):
    """Copy array ``a`` to ``device`` (``'cpu'`` or ``'cuda'``); a no-op when it is there."""
    target = _normalise_device(device)
    if target == "cuda":
        cupy = _cupy()
        return a if is_cupy_array(a) else cupy.asarray(a)
    return asnumpy(a)


def asnumpy(a):
    """A NumPy array with the values of ``a`` (copied from the GPU when needed)."""
    if is_cupy_array(a):
        return a.get()
    return numpy.asarray(a)


# ----------------------------------------------------------------- kernels
def kernels() -> str:
    """``'numba'`` when the compiled CPU kernels are used, ``'numpy'`` for the reference."""
    name = getattr(_state, "kernels", None)
    return name if name is not None else _global["kernels"]


def set_kernels(name: str) -> None:
    _check_name(name, _KERNELS, "kernels")
    _global["kernels"] = name
    _state.kernels = None


@contextlib.contextmanager
def use_kernels(name: str):
    _check_name(name, _KERNELS, "kernels")
    previous = getattr(_state, "kernels", None)
    _state.kernels = name
    try:
        yield
    finally:
        _state.kernels = previous


# ------------------------------------------------------------ default dtype
def get_default_dtype():
    """dtype of new parameters and of tensors made from Python numbers (float32 unless set)."""
    return _global["dtype"]


def set_default_dtype(dtype) -> None:
    dt = numpy.dtype(dtype)
    if dt not in (numpy.dtype("float32"), numpy.dtype("float64"), numpy.dtype("float16")):
        raise ValueError(f"default dtype must be float16, float32 or float64, got {dt}")
    _global["dtype"] = dt


# -------------------------------------------------------------------- TF32
def allow_tf32() -> bool:
    """Whether convolutions on CuPy arrays may multiply in TF32 (False unless set)."""
    cuda = _kernel_module("cuda")
    return bool(cuda is not None and cuda.tf32_allowed())


def set_allow_tf32(enabled: bool) -> None:
    """Let the GEMMs of convolutions on CuPy arrays run on TF32 tensor cores.

    TF32 rounds each float32 input to a 10-bit mantissa before multiplying and
    sums in float32: several times faster on Ampere and later GPUs, with a
    relative error of about 1e-3 per product instead of about 1e-7. It is what
    ``torch.backends.cudnn.allow_tf32 = True`` (torch's default) does for
    torch's convolutions. Off by default here. No effect on the CPU, on
    float64, or on other matrix products.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_allow_tf32 takes True or False, got {enabled!r}")
    cuda = _kernel_module("cuda")
    if cuda is None:
        if enabled:
            raise BackendError("set_allow_tf32(True): the GPU kernels (kernels.cuda) are not installed")
        return
    cuda.set_tf32_allowed(enabled)


# ------------------------------------------------------------------ the seam
def replaceable(reference):
    """Let an accelerated kernel of the same name stand in for ``reference``.

    ``reference`` is a plain array function written in readable NumPy (it runs
    on CuPy arrays too). Calling the decorated function calls, in this order:

    1. the twin registered under ``reference.__name__`` in ``kernels.cuda.KERNELS``
       when an argument is a CuPy array, else in ``kernels.cpu.KERNELS`` (unless
       ``SCRATCHSEG_KERNELS=numpy`` or ``use_kernels("numpy")`` ask for the
       reference), if there is one and it does not return ``NotImplemented``
       (a twin's one way of saying "these arguments are not mine");
    2. ``reference`` itself.

    A twin takes the same arguments and returns the same result. The reference
    stays reachable as ``.reference``, so tests hold the two side by side.
    """
    name = reference.__name__

    @functools.wraps(reference)
    def call(*args, **kwargs):
        twin = kernel(name, *args)
        if twin is not None:
            result = twin(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return reference(*args, **kwargs)

    call.reference = reference
    return call


def kernel(name: str, *arrays):
    """The kernel registered as ``name`` for the device of ``arrays``, or ``None``.

    CuPy arrays look in ``kernels.cuda.KERNELS``; NumPy arrays in
    ``kernels.cpu.KERNELS`` unless the reference is forced
    (``SCRATCHSEG_KERNELS=numpy``). ``None``: the reference runs.
    """
    on_gpu = any(is_cupy_array(a) for a in arrays)
    if not on_gpu and kernels() == "numpy":
        return None
    module = _kernel_module("cuda" if on_gpu else "cpu")
    return module.KERNELS.get(name) if module is not None else None


_kernel_modules: dict = {}


def _kernel_module(which):
    if which not in _kernel_modules:
        import importlib

        try:
            _kernel_modules[which] = importlib.import_module(f"kernels.{which}")
        except ImportError:
            _kernel_modules[which] = None
    return _kernel_modules[which]
