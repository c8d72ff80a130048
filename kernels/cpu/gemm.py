"""Our own single-threaded SGEMM for the convolutions' products: C (+)= A @ B, float32.

The convolutions multiply thin matrices: a few dozen to a few hundred output
channels by a few dozen to a few thousand inputs, over a wide run of pixels or
tiles. NumPy's BLAS (OpenBLAS) reaches half its peak or less on the thinnest
of them on one core (32 x 27 @ 27 x 8192, a first layer's unfolded columns:
40-50 GFLOP/s on an AMD EPYC Zen 4 whose large products run at 100), because
its kernels are tuned for products whose every side is large. This one is
written for the shapes the convolutions have:

* **The register tile** (``_tile``). 12 rows of C by two vectors of
  columns (2 x 16 floats with AVX-512) stay in registers for the whole inner
  loop, 24 of the 32 vector registers. Each step loads two vectors of one
  row of B, broadcasts one element of A per row and does 24 fused
  multiply-adds. The tile is written as LLVM IR
  (vector types and the ``llvm.fma`` intrinsic) so that the accumulators are
  SSA values the register allocator keeps, not a local array in memory.
* **The loops around it** (``_gemm``): the inner dimension in chunks of
  ``_KC`` (a chunk of B's panel stays in L1 while every row tile reads it),
  then panels of 32 columns, then the rows in tiles of 12; the last rows in
  smaller tiles (8, 4, 2, 1), the last columns by masked loads and stores.
* **The numbers.** Every element of C is one chain of fused multiply-adds
  over the inner dimension in order, from zero (or from C when
  accumulating), whatever the tiling, the chunking or the thread that runs
  it: results are the same from run to run and from split to split.

Which products run here (``matmul``): float32, B's and C's rows contiguous,
on a CPU with AVX-512 and FMA (``VECTOR_WIDTH``, read from the host when this
module is imported), while NumPy's BLAS is on one thread (inside a split, or
a product run inline); a product that may use the BLAS's threads keeps them,
and everything else goes to ``np.matmul``. With AVX2 alone (16 registers, a
6 x 2 tile of 8-float vectors) the same loops were slower than OpenBLAS on
most of these shapes, so such CPUs keep the BLAS. ``SCRATCHSEG_GEMM=blas``
sends every product to the BLAS. Measurements: ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import os

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import runtime

__all__ = ["VECTOR_WIDTH", "matmul", "enabled", "describe"]

_MODES = ("auto", "blas")


def _mode():
    mode = os.environ.get("SCRATCHSEG_GEMM", "").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"SCRATCHSEG_GEMM={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def _vector_width(features):
    """16 (AVX-512F and FMA) or 0 (no own GEMM) from a map of the host's CPU features."""
    return 16 if features.get("fma") and features.get("avx512f") else 0


def _host_features():
    try:
        return dict(_llvm.get_host_cpu_features())
    except Exception:  # a host LLVM cannot describe: no own GEMM
        return {}


def _opaque_pointers():
    """Whether this llvmlite builds IR with opaque pointers, as the tile does (llvmlite >= 0.44)."""
    try:
        return ir.PointerType().is_opaque
    except Exception:
        return False


_MODE = _mode()
#: floats per vector register of the tiles (0: no own GEMM on this host, every product goes to the BLAS)
VECTOR_WIDTH = _vector_width(_host_features()) if _opaque_pointers() else 0
_W = 16
# register tile rows: the full one, then the smaller ones that finish the last rows (tallest first)
_ROWS = (12, 8, 4, 2, 1)
_KC = 128  # inner-dimension chunk: its 32-column panel of B is 16 KB, in L1


def _make_tile(gather="none"):
    """The intrinsic: C[rows, cols] (+)= A[rows, :kc] @ B[:kc, cols], every address and stride in bytes.

    ``tile(a, sam, sak, b, ldb, c, ldc, kc, accumulate, ncols, rows)``: A's
    element (i, k) at ``a + i*sam + k*sak``, B's row k at ``b + k*ldb``, C's
    row i at ``c + i*ldc``; kc >= 1; ``rows`` one of ``_ROWS``. ``ncols`` ==
    2W (W = 16 floats, one AVX-512 register): two vectors of columns; 1..W:
    the first ``ncols`` of one vector, by masked loads and stores. Each
    (rows, masked or not) is its own loop, chosen once per call.

    ``gather`` "b": B's rows are not evenly spaced, ``ldb`` is the address of
    a table of int64 byte offsets, row k at ``b + table[k]``; "a": A's rows
    are not, ``sam`` is the address of such a table, element (i, k) at ``a +
    table[i] + k*sak`` (the shifted rows of an image, ``shifted.py``).
    """

    @intrinsic
    def tile(typingctx, a, sam, sak, b, ldb, c, ldc, kc, accumulate, ncols, rows):
        sig = types.void(*([types.intp] * 11))

        def codegen(context, builder, signature, args):
            a, sam, sak, b, ldb, c, ldc, kc, accumulate, ncols, nrows = args
            f32, i32, i64, i1 = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.IntType(1)
            vec, ptr = ir.VectorType(f32, _W), ir.PointerType()
            module, fn = builder.module, builder.function
            fma = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{_W}f32")
            mvec = ir.VectorType(i1, _W)
            mload = cgutils.get_or_insert_function(
                module, ir.FunctionType(vec, [ptr, i32, mvec, vec]), f"llvm.masked.load.v{_W}f32.p0")
            mstore = cgutils.get_or_insert_function(
                module, ir.FunctionType(ir.VoidType(), [vec, ptr, i32, mvec]), f"llvm.masked.store.v{_W}f32.p0")
            zero = ir.Constant(vec, [0.0] * _W)
            splat0 = ir.Constant(ir.VectorType(i32, _W), [0] * _W)
            align = ir.Constant(i32, 4)

            def const(v):
                return ir.Constant(i64, v)

            def address(base, *terms):
                for term in terms:
                    base = builder.add(base, term)
                return builder.inttoptr(base, ptr)

            def splat(value, vtype):
                return builder.shuffle_vector(builder.insert_element(ir.Constant(vtype, ir.Undefined), value,
                                                                     ir.Constant(i32, 0)),
                                              ir.Constant(vtype, ir.Undefined), splat0)

            # lane l is in when l < ncols (used by the masked loop only)
            mask = builder.icmp_unsigned("<", ir.Constant(ir.VectorType(i64, _W), list(range(_W))),
                                         splat(ncols, ir.VectorType(i64, _W)))
            from_c = builder.icmp_signed("!=", accumulate, const(0))

            def variant(rows, masked):
                c_rows = [builder.mul(const(i), ldc) for i in range(rows)]
                if gather == "a":
                    a_rows = [builder.load(address(sam, const(8 * i)), typ=i64, align=8) for i in range(rows)]
                else:
                    a_rows = [builder.mul(const(i), sam) for i in range(rows)]
                nv = 1 if masked else 2

                def load(p):
                    if masked:
                        return builder.call(mload, [p, align, mask, zero])
                    return builder.load(p, typ=vec, align=4)

                c_ptrs = [[address(c, c_rows[i], const(4 * _W * j)) for j in range(nv)] for i in range(rows)]
                # the accumulators start from C (accumulate) or from zero
                entry = builder.block
                load_c = fn.append_basic_block("tile.load_c")
                start = fn.append_basic_block("tile.start")
                builder.cbranch(from_c, load_c, start)
                builder.position_at_end(load_c)
                loaded = [load(c_ptrs[i][j]) for i in range(rows) for j in range(nv)]
                builder.branch(start)
                builder.position_at_end(start)
                first = []
                for v in loaded:
                    phi = builder.phi(vec)
                    phi.add_incoming(v, load_c)
                    phi.add_incoming(zero, entry)
                    first.append(phi)
                # the inner loop: k = 0 .. kc-1, the accumulators carried in registers
                loop = fn.append_basic_block("tile.loop")
                done = fn.append_basic_block("tile.done")
                builder.branch(loop)
                builder.position_at_end(loop)
                k = builder.phi(i64)
                k.add_incoming(const(0), start)
                acc = []
                for v in first:
                    phi = builder.phi(vec)
                    phi.add_incoming(v, start)
                    acc.append(phi)
                if gather == "b":
                    b_row = builder.load(address(ldb, builder.mul(k, const(8))), typ=i64, align=8)
                else:
                    b_row = builder.mul(k, ldb)
                bv = [load(address(b, b_row, const(4 * _W * j))) for j in range(nv)]
                a_k = builder.mul(k, sak)
                new = []
                for i in range(rows):
                    s = splat(builder.load(address(a, a_rows[i], a_k), typ=f32, align=4), vec)
                    new.extend(builder.call(fma, [s, bv[j], acc[i * nv + j]]) for j in range(nv))
                k_next = builder.add(k, const(1))
                k.add_incoming(k_next, loop)
                for phi, v in zip(acc, new):
                    phi.add_incoming(v, loop)
                builder.cbranch(builder.icmp_signed("<", k_next, kc), loop, done)
                builder.position_at_end(done)
                for i in range(rows):
                    for j in range(nv):
                        if masked:
                            builder.call(mstore, [new[i * nv + j], c_ptrs[i][j], align, mask])
                        else:
                            builder.store(new[i * nv + j], c_ptrs[i][j], align=4)

            end = fn.append_basic_block("tile.end")
            is_full = builder.icmp_signed("==", ncols, const(2 * _W))
            switch = builder.switch(nrows, end)  # rows outside _ROWS: nothing
            for rows in sorted(set(_ROWS)):
                case = fn.append_basic_block(f"tile.rows{rows}")
                switch.add_case(const(rows), case)
                builder.position_at_end(case)
                full = fn.append_basic_block(f"tile.rows{rows}.full")
                part = fn.append_basic_block(f"tile.rows{rows}.masked")
                builder.cbranch(is_full, full, part)
                for block, masked in ((full, False), (part, True)):
                    builder.position_at_end(block)
                    variant(rows, masked)
                    builder.branch(end)
            builder.position_at_end(end)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile = _make_tile()
_tile_gather_b = _make_tile(gather="b")
_tile_gather_a = _make_tile(gather="a")


@njit(cache=True, nogil=True, inline="always")
def _tile_rows(left):
    """The tallest tile of ``_ROWS`` that fits ``left`` >= 1 rows."""
    for rows in _ROWS:
        if rows <= left:
            return rows
    return 1


@njit(cache=True, nogil=True, inline="always")
def _panel(a, sam, sak, b, ldb, c, ldc, M, kc, acc, ncols):
    """One panel of columns (2W, or 1..W masked) over all M rows: full tiles, then the smaller ones."""
    m = 0
    while m < M:
        rows = _tile_rows(M - m)
        _tile(a + m * sam, sam, sak, b, ldb, c + m * ldc, ldc, kc, acc, ncols, rows)
        m += rows


@njit(cache=True, nogil=True)
def _gemm(A, B, C, accumulate):
    """C[i] (+)= A[i] @ B[i] for every i of the leading axis (float32, 3-D, B's and C's rows contiguous)."""
    nb, M, K = A.shape
    N = B.shape[2]
    sam, sak, ldb, ldc = A.strides[1], A.strides[2], B.strides[1], C.strides[1]
    full = 2 * _W
    for i in range(nb):
        pa = A.ctypes.data + i * A.strides[0]
        pb = B.ctypes.data + i * B.strides[0]
        pc = C.ctypes.data + i * C.strides[0]
        for k0 in range(0, K, _KC):
            kc = min(_KC, K - k0)
            acc = 1 if (accumulate or k0 > 0) else 0
            a, b = pa + k0 * sak, pb + k0 * ldb
            n = 0
            while N - n >= full:
                _panel(a, sam, sak, b + 4 * n, ldb, pc + 4 * n, ldc, M, kc, acc, full)
                n += full
            while N - n > 0:
                cols = min(_W, N - n)
                _panel(a, sam, sak, b + 4 * n, ldb, pc + 4 * n, ldc, M, kc, acc, cols)
                n += cols


def enabled():
    """Whether float32 products may run here: an AVX-512 CPU, not ``SCRATCHSEG_GEMM=blas``, and tiles
    that compiled and multiplied a small product right the first time they were asked to."""
    if VECTOR_WIDTH == 0 or _MODE == "blas":
        return False
    if _compiled_ok[0] is None:
        _compiled_ok[0] = _check_compiled()
    return _compiled_ok[0]


_compiled_ok = [None]


def _check_compiled():
    """Compile the tiles and check a product on every kind of tile (an LLVM that cannot: the BLAS)."""
    rng = np.random.default_rng(0)
    B = rng.standard_normal((1, 5, 2 * _W + 3)).astype(np.float32)  # a full panel and a masked one
    for M in (23, 16):  # rows in tiles of 12, 8, 2, 1, then of 12 and 4
        A = rng.standard_normal((1, M, 5)).astype(np.float32)
        C = np.empty((1, M, 2 * _W + 3), np.float32)
        try:
            _gemm(A, B, C, False)
        except Exception:  # noqa: BLE001 -- any failure to build the tiles means: use the BLAS
            return False
        if not np.allclose(C, A.astype(np.float64) @ B, rtol=1e-5, atol=1e-5):
            return False
    return True


def describe():
    """Which GEMM the convolutions' float32 products use here, in words (for benchmarks and bug reports)."""
    if _MODE == "blas":
        return "NumPy's BLAS (SCRATCHSEG_GEMM=blas)"
    if not _opaque_pointers():
        return "NumPy's BLAS (this llvmlite builds no opaque pointers)"
    if VECTOR_WIDTH == 0:
        return "NumPy's BLAS (no AVX-512 with FMA on this CPU)"
    if not enabled():
        return "NumPy's BLAS (the tiles did not compile or multiply right here)"
    return "own (AVX-512, 12x32 register tiles) where the BLAS would run on one thread"


def _fits(A, B, C):
    # rows contiguous: unit stride, or a single column (whose stride NumPy may report as anything)
    return (A.dtype == B.dtype == C.dtype == np.float32 and (B.strides[-1] == 4 or B.shape[-1] == 1)
            and (C.strides[-1] == 4 or C.shape[-1] == 1) and A.shape[-1] > 0 and C.size > 0)


def _one_thread():
    """Whether NumPy's BLAS runs on one thread now (inside a split, or a product run inline)."""
    blas = runtime._blas_threads
    return blas is not None and blas.get() == 1


def matmul(A, B, out, accumulate=False, own=True):
    """out = A @ B (or out += A @ B), 2-D, or 3-D batched with A 2-D or 3-D; returns out.

    Runs here when the GEMM is ``enabled()``, the arrays suit it (float32,
    B's and out's rows contiguous, no empty side) and NumPy's BLAS is on one
    thread (where it may use several, on a product too large to run inline
    that cannot be split, it keeps them); else, or with ``own=False`` (a
    product the caller measured faster in the BLAS), by ``np.matmul``.
    ``out`` must not overlap A or B.
    """
    if own and enabled() and _fits(A, B, out) and _one_thread():
        B3 = B if B.ndim == 3 else B[None]
        C3 = out if out.ndim == 3 else out[None]
        A3 = A if A.ndim == 3 else np.broadcast_to(A, (C3.shape[0],) + A.shape)
        _gemm(A3, B3, C3, accumulate)
    elif accumulate:
        out += np.matmul(A, B)
    else:
        np.matmul(A, B, out=out)
    return out
