"""What every GPU kernel family shares: compiling, launching, argument packing, the TF32 switch.

The CUDA source lives next to this file, one ``.cu`` file per family
(``SOURCE_FILES``). They are templates: NVRTC (through CuPy) compiles all of
them as one module the first time a kernel of a dtype is used, with ``T``
typedef'd to ``float`` or ``double`` and ``SUFFIX`` replaced by ``f32`` or
``f64`` in every kernel name, and the module is cached per dtype. Nothing
here imports CuPy at import time, so the CPU-only install imports it fine.
"""

from __future__ import annotations

import importlib.resources

import numpy  # host-side shape arithmetic and kernel scalar arguments only

_THREADS = 256  # threads per block of the element-wise and unfolding kernels
_ROWS_THREADS = 1024  # threads per block of the one-block-per-channel batch-norm kernels
_MAX_Y_BLOCKS = 65535  # CUDA's limit on gridDim.y; the kernels loop over the rest
_TILE = (32, 8)  # threads of the unfolding kernels: along an output row, and across 8 rows

#: The CUDA source files of this package, in the order they are compiled.
SOURCE_FILES = ("im2col.cu", "normalization.cu", "pooling.cu", "loss.cu", "activation.cu", "optimizer.cu")

_CTYPES = {numpy.dtype("float32"): ("float", "f32"), numpy.dtype("float64"): ("double", "f64")}
_modules: dict = {}  # dtype -> (compiled module, {kernel name: function})


def available() -> bool:
    """True when CuPy imports (it may still find no GPU)."""
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def _module_source(dtype):
    """The CUDA source compiled for ``dtype``: every file of ``SOURCE_FILES``, T and SUFFIX filled in."""
    ctype, suffix = _CTYPES[numpy.dtype(dtype)]
    folder = importlib.resources.files(__package__)
    source = "\n".join(folder.joinpath(name).read_text(encoding="utf-8") for name in SOURCE_FILES)
    return f"typedef {ctype} T;\n" + source.replace("SUFFIX", suffix)


def _compile(dtype):
    """The CuPy module of every kernel for ``dtype`` (NVRTC; CuPy caches the binary on disk)."""
    import cupy

    return cupy.RawModule(code=_module_source(dtype))


def _kernel(name, dtype):
    """The compiled ``name`` kernel for ``dtype`` (the module is compiled on first use, then cached)."""
    dtype = numpy.dtype(dtype)
    if dtype not in _CTYPES:
        raise TypeError(f"kernels.cuda.{name}: dtype must be float32 or float64, got {dtype}")
    if dtype not in _modules:
        _modules[dtype] = (_compile(dtype), {})
    module, functions = _modules[dtype]
    if name not in functions:
        functions[name] = module.get_function(f"{name}_{_CTYPES[dtype][1]}")
    return functions[name]


# ------------------------------------------------------------------ launches
def _launch(kernel, total, args):
    """A 1-D grid-stride launch over ``total`` elements."""
    blocks = max(1, min((total + _THREADS - 1) // _THREADS, 1 << 20))
    kernel((blocks,), (_THREADS,), args)


def _launch_tiles(kernel, rows, tiles, args):
    """A launch of 32 x 8 thread tiles: one block row per output row, ``tiles`` tiles down each."""
    if rows <= 0 or tiles <= 0:
        return
    _check_index_range(rows)
    kernel((rows, max(1, min(tiles, _MAX_Y_BLOCKS))), _TILE, args)


def _tiles(n):
    """How many tiles of ``_TILE[1]`` rows cover ``n`` rows."""
    return (n + _TILE[1] - 1) // _TILE[1]


def _launch_rows(kernel, rows, length, args):
    """A 2-D launch: one block row per output row, threads along rows of ``length`` elements."""
    if rows <= 0 or length <= 0:
        return
    _check_index_range(rows, length)
    blocks_y = max(1, min((length + _THREADS - 1) // _THREADS, _MAX_Y_BLOCKS))
    kernel((rows, blocks_y), (_THREADS,), args)


# ------------------------------------------------------ arguments, geometry
_INTS: dict = {}


def _ints(*values):
    """``values`` as the kernels' ``int`` arguments (cached: a step asks for the same geometries again and again)."""
    ints = _INTS.get(values)
    if ints is None:
        if len(_INTS) > 4096:
            _INTS.clear()
        ints = _INTS[values] = tuple(numpy.int32(v) for v in values)
    return ints


def _geometry(N, C, H, W, kh, kw, stride, padding, dilation):
    """(Ho, Wo, the kernels' (kh, kw, sh, sw, ph, pw, dh, dw) ints) of a kh x kw window over (H, W)."""
    (sh, sw), (ph, pw), (dh, dw) = tuple(stride), tuple(padding), tuple(dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return Ho, Wo, _ints(kh, kw, sh, sw, ph, pw, dh, dw)


def _check_index_range(*sizes):
    """Refuse sizes the kernels' 32-bit ``int`` indices cannot address."""
    for size in sizes:
        if size >= 2**31:
            raise ValueError(f"kernels.cuda: an axis of {size} elements exceeds the 32-bit index range")


def _as_float32(arrays):
    """float32 copies of ``arrays`` (None stays None): dtypes without a kernel (float16) compute in float32."""
    return [None if a is None else a.astype(numpy.float32) for a in arrays]


# ---------------------------------------------------------------------- TF32
# cuBLAS may multiply float32 matrices on the tensor cores in TF32 (inputs
# rounded to a 10-bit mantissa, products summed in float32): several times the
# float32 rate on Ampere and later GPUs, for a relative error of about 1e-3 per
# product. Off by default, so a GPU computes what the reference computes;
# scratchseg.backend.set_allow_tf32(True) turns it on for the convolution
# GEMMs, as torch.backends.cudnn.allow_tf32 does for torch's convolutions (on
# there by default).
_tf32 = False


def tf32_allowed() -> bool:
    """Whether the convolution GEMMs may multiply float32 matrices in TF32 (False unless set)."""
    return _tf32


def set_tf32_allowed(enabled: bool) -> None:
    """Let (True) or forbid (False) the convolution GEMMs to multiply float32 matrices in TF32."""
    global _tf32
    if not isinstance(enabled, bool):
        raise TypeError(f"set_tf32_allowed takes True or False, got {enabled!r}")
    _tf32 = enabled
