"""Unit-stride convolutions as one GEMM over shifted rows of the image: no unfolded columns.

The columns of im2col repeat every input pixel kh*kw times; for small maps
writing them and reading them back costs a good part of the product. Here
the image is laid out so that every tap's row of the column matrix is a
contiguous run of the image itself, shifted:

* **The wide image** (``_widen_rows``). Each channel of the batch is one
  long row: the samples' rows one after another, each ``W`` pixels followed
  by ``pw`` zeros, each sample preceded by ``ph`` zero rows (and ``ph`` after
  the last). A pixel (n, y, x) sits at ``(n*Hs + ph + y)*Wp + x`` with
  ``Wp = W + pw``, ``Hs = H + ph``; the zero padding of one row's right end
  is the next row's left padding.
* **The output on the same grid.** Output pixel (n, yo, xo) is computed at
  the same position q; tap (i, j) of channel c reads position
  ``q + (dh*i - ph)*Wp + (dw*j - pw)`` of channel c, a fixed offset for the
  tap. So B's row (c, i, j) of the product is the wide image at a fixed
  offset, and the product is the own GEMM's tile with B's rows looked up in
  a table of offsets (``gemm._tile_gather_b``). Positions that are no output
  pixel (the zero columns and rows) are computed and dropped: 6% of the work
  on 32x32 maps, 27% on 8x8 (``_MAX_WASTE``).
* **Blocks handed out, not assigned.** The wide positions are cut into blocks
  of whole register panels (``_BLOCKS`` of them, at least
  ``_MIN_BLOCK_COLUMNS`` wide, their output in half the L2). Every thread
  takes the next block from an atomic counter (``native._take``) until none is left,
  widens the input rows that block reads into its own buffer, multiplies, and
  copies the block's pixels into ``y`` (with the bias). A thread that starts
  late takes fewer blocks instead of holding the others up; each output pixel
  is one chain of products whichever thread computes it, so the results are
  the same from run to run.

The input gradient of a 'same' convolution is the forward of the flipped,
transposed kernel over dout (``_flip``), with the same padding: the same
product. The weight gradient is dw^T = (the shifted rows of x) @ (dout at
the same wide positions, pixel-major, zero elsewhere): the tile with A's
rows looked up in the table (``gemm._tile_gather_a``), blocks of input
channels handed out the same way, each row of dw^T one chain over every
position. Both gradients of a layer are one task (``shifted_backward``):
every thread prepares the flipped kernel and the pixel-major dout in chunks,
then drains the input gradient's blocks, then the weight gradient's. The
other core's share runs on a native worker (``native.py``) where one runs.
"""

from __future__ import annotations

import functools

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import carray, njit, uint64

from . import gemm, native, runtime
from .runtime import L2_BYTES, workspace

__all__ = ["shifted_applies", "shifted_conv", "shifted_weight_grad", "shifted_backward"]

_LEAD = 16  # zeros before the first row of each channel (at least pw; a whole vector keeps rows aligned)


# Where the products run here rather than on Winograd's tiles or unfolded columns
# (8 samples, two threads, ms, here / elsewhere, forward, input gradient, weight
# gradient: 32 -> 32 on 32x32 1.05 / 1.44, 1.09 / 1.40, 1.0 / 1.6; 64 -> 64 on 16x16
# 0.96 / 1.35, 1.04 / 1.34; 128 -> 64 on 16x16 1.63 / 2.09; 128 -> 128 on 8x8 0.93 /
# 1.09, 1.10 / 1.10, 1.12 / 1.49; but 64 -> 128 on 32x32 5.50 / 4.07, 5.32 / 4.94,
# 8.49 / 6.05; 64 -> 64 on 64x64 11.5 / 8.3; 256 -> 256 on 16x16 11.6 / 6.9;
# benchmarks/NOTES.md): Winograd's tiles need four times fewer multiplications, and
# their transforms cost less per product the more channels share them and the more
# tiles a map has. So this path takes small maps with few channels: the wider side's
# channels times the map's side at most _MAX_CHANNEL_SIDE (64 channels on 32x32, 128
# on 16x16, 256 on 8x8).
_MAX_PIXELS = 1024  # input (or output) pixels per sample, at most
_MAX_CHANNEL_SIDE = 2048
_MIN_DEPTH = 72  # the product's inner dimension (C*kh*kw), at least: with less, the tiles' set-up dominates
_MAX_WASTE = 1.3  # wide positions per output pixel, at most (8x8 maps: 81 / 64; 4x4: 25 / 16 is too many)
_ENABLED = True


def shifted_applies(C, K, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, groups, dtype):
    """Whether a convolution of C -> K channels runs here: unit stride, one group, float32, an output no
    larger than the input (``2p <= d*(k-1)``: 'same', 'valid' and between), a small map whose wide rows
    waste little, few channels for its size, a deep enough product, and the own GEMM on this CPU."""
    if not (_ENABLED and sh == 1 and sw == 1 and groups == 1 and dtype == np.float32
            and 0 <= 2 * ph <= dh * (kh - 1) and 0 <= 2 * pw <= dw * (kw - 1) and pw < _LEAD
            and Ho > 0 and Wo > 0 and C > 0 and K > 0):
        return False
    waste = (H + ph) * (W + pw) / (Ho * Wo)
    pixels = max(H * W, Ho * Wo)
    few = max(C, K) ** 2 * pixels <= _MAX_CHANNEL_SIDE ** 2
    return (pixels <= _MAX_PIXELS and few and C * kh * kw >= _MIN_DEPTH
            and waste <= _MAX_WASTE and gemm.enabled())


@njit(cache=True, nogil=True)
def _widen_rows(x, c0, c1, g0, g1, Hs, ph, Wp, xw):
    """Write the wide rows [g0, g1) of channels [c0, c1) of x (N, C, H, W, C-contiguous), zero rows and
    columns included, into xw (c1 - c0, cs) from its element _LEAD on (xw's first _LEAD elements and
    everything after the rows zeroed too).

    Flat, unsigned indices: the rows are short (4 to 32 pixels), and per-row views or signed indices
    (checked for Python's negative wraparound) cost more than the copy.
    """
    N, C, H, W = x.shape
    cs = xw.shape[1]
    xf, wf = x.reshape(N * C * H * W), xw.reshape(xw.shape[0] * cs)
    zero = np.float32(0.0)
    for c in range(c0, c1):
        base = uint64((c - c0) * cs)
        for e in range(_LEAD):
            wf[base + uint64(e)] = zero
        o = base + uint64(_LEAD)
        for g in range(g0, g1):
            n, yy = g // Hs, g % Hs - ph
            if n < N and 0 <= yy < H:
                src = uint64(((n * C + c) * H + yy) * W)
                for j in range(W):
                    wf[o + uint64(j)] = xf[src + uint64(j)]
                for j in range(W, Wp):
                    wf[o + uint64(j)] = zero
            else:
                for j in range(Wp):
                    wf[o + uint64(j)] = zero
            o += uint64(Wp)
        for e in range(o, base + uint64(cs)):
            wf[e] = zero


@njit(cache=True, nogil=True)
def _prepared(counter, chunks):
    """The chunk of a job's preparation this thread takes next (counter[1]), or -1 once none is left,
    after waiting for the chunks other threads took (counter[2] counts those done)."""
    c = native._take(counter.ctypes.data + 8)
    if c < chunks:
        return c
    while native._load(counter.ctypes.data + 16) < chunks:
        native._pause()
    return -1


@njit(cache=True, nogil=True)
def _drain(x, w2, weight, flips, offs, bias, has_bias, counter, per_block, blocks, q_end, Hs, ph, reach, Wp, xw,
           out, y):
    """First, where ``flips`` > 0, the rows of w2 flipped from the kernel ``weight`` in that many chunks;
    then blocks of ``per_block`` wide output positions until none is left (counter[0]): each widened,
    multiplied and copied into y here. Every thread does both; returns how many blocks this one took."""
    M = w2.shape[0]
    rows = -(-M // max(flips, 1))
    while flips > 0:
        c = _prepared(counter, flips)
        if c < 0:
            break
        _flip(weight, w2, c * rows, min((c + 1) * rows, M))
        native._take(counter.ctypes.data + 16)
    done = 0
    while True:
        b = native._take(counter.ctypes.data)
        if b >= blocks:
            return done
        q0 = ph * Wp + b * per_block
        q1 = min(q0 + per_block, q_end)
        g0 = q0 // Wp - ph  # the input rows the block reads
        _widen_rows(x, 0, x.shape[1], g0, (q1 - 1) // Wp - ph + reach + 1, Hs, ph, Wp, xw)
        o = out[:, :q1 - q0]
        _product(w2, offs, xw, q0 - g0 * Wp, o)
        _narrow(out, q0, q1, Wp, Hs, ph, bias, has_bias, y)
        done += 1


@njit(cache=True, nogil=True)
def _narrow(out, q0, q1, Wp, Hs, ph, bias, has_bias, y):
    """Copy the output pixels among wide positions [q0, q1) (out: (K, L), C-contiguous, L >= q1 - q0) into
    y (N, K, Ho, Wo, C-contiguous), adding the bias; flat unsigned indices, as in _widen_rows."""
    N, K, Ho, Wo = y.shape
    yf = y.reshape(N * K * Ho * Wo)
    ld = out.shape[1]
    of = out.reshape(K * ld)
    for r in range(q0 // Wp, (q1 - 1) // Wp + 1):
        n, yo = r // Hs, r % Hs - ph
        if yo < 0 or yo >= Ho:
            continue
        j0, j1 = max(q0 - r * Wp, 0), min(q1 - r * Wp, Wo)
        for k in range(K):
            b = bias[k] if has_bias else np.float32(0.0)
            dst = uint64(((n * K + k) * Ho + yo) * Wo)
            src = uint64(k * ld + r * Wp - q0)
            for j in range(j0, j1):
                yf[dst + uint64(j)] = of[src + uint64(j)] + b


@njit(cache=True, nogil=True)
def _gathered(gather_a, pa, sa, sak, pb, sb, pc, ldc, M, N, inner):
    """C (M, N) = A @ B over ``inner``, C's rows ``ldc`` bytes apart at ``pc``, by the gathered tiles.

    ``gather_a``: A's row m at ``pa + table[m]`` (``sa``: the table's address), element k ``sak`` bytes
    on; B's row k at ``pb + k*sb``. Otherwise A's rows ``sa`` bytes apart, and B's row k at ``pb +
    table[k]`` (``sb``: the table's address).
    """
    full = 2 * gemm._W
    for k0 in range(0, inner, gemm._KC):
        kc = min(gemm._KC, inner - k0)
        acc = 1 if k0 > 0 else 0
        n = 0
        while n < N:
            cols = full if N - n >= full else min(gemm._W, N - n)
            m = 0
            while m < M:
                rows = gemm._tile_rows(M - m)
                c = pc + m * ldc + 4 * n
                if gather_a:
                    gemm._tile_gather_a(pa + k0 * sak, sa + 8 * m, sak, pb + k0 * sb + 4 * n, sb, c, ldc, kc, acc,
                                        cols, rows)
                else:
                    gemm._tile_gather_b(pa + k0 * sak + m * sa, sa, sak, pb + 4 * n, sb + 8 * k0, c, ldc, kc, acc,
                                        cols, rows)
                m += rows
            n += cols


@njit(cache=True, nogil=True)
def _product(w2, offs, xw, q0, out):
    """out (M, Q) = w2 (M, R) by the shifted rows of xw (row r at ``offs[r]`` bytes from the output
    position) over the wide positions [q0, q0 + Q)."""
    M, Q = out.shape
    _gathered(False, w2.ctypes.data, w2.strides[0], w2.strides[1], xw.ctypes.data + 4 * (_LEAD + q0),
              offs.ctypes.data, out.ctypes.data, out.strides[0], M, Q, offs.shape[0])


@njit(cache=True, nogil=True)
def _flip(weight, out, c_lo, c_hi):
    """Rows [c_lo, c_hi) of out (C, K*kh*kw): the kernel (K, C, kh, kw) transposed and flipped, the input
    gradient's weights.

    In blocks of 16 x 16 (k, c): a row of the result is K*kh*kw floats long, and writing one element of
    each row in turn would touch a new page with every element.
    """
    K, C, kh, kw = weight.shape
    T = kh * kw
    w = weight.reshape(K * C * T)
    o = out.reshape(C * K * T)
    for k0 in range(0, K, 16):
        for c0 in range(c_lo, c_hi, 16):
            for k in range(k0, min(k0 + 16, K)):
                for c in range(c0, min(c0 + 16, c_hi)):
                    src = uint64((k * C + c) * T + T - 1)
                    dst = uint64((c * K + k) * T)
                    for t in range(T):
                        o[dst + uint64(t)] = w[src - uint64(t)]


def _offsets(C, kh, kw, ph, pw, dh, dw, Wp, cs):
    """The byte offset of B's row (c, i, j) from the output position: tap (i, j) of channel c."""
    c = np.arange(C, dtype=np.int64).reshape(C, 1, 1)
    i = np.arange(kh, dtype=np.int64).reshape(1, kh, 1)
    j = np.arange(kw, dtype=np.int64).reshape(1, 1, kw)
    return (4 * (c * cs + (dh * i - ph) * Wp + (dw * j - pw))).reshape(-1)


def _channel_stride(rows, Wp):
    """Elements per channel of a block's wide image of ``rows`` rows: the rows, the zeros before them and
    room for the last panel's overrun, padded to an odd number of 64-byte lines (the channels spread
    over the L1's sets)."""
    used = _LEAD + rows * Wp + 2 * gemm._W + _LEAD
    return used + (16 - used) % 32


# The preparations of a product (the input gradient's flipped kernel, the weight
# gradient's pixel-major dout) in this many chunks, shared out like the blocks, each
# of at least _MIN_PREP elements; the blocks start once every chunk is done.
_PREP_CHUNKS = 8
_MIN_PREP = 8192

# Blocks per product: enough that the thread woken last still finds some (the caller
# starts at once and takes more), few enough that each keeps a GEMM of several panels.
_BLOCKS = 16
_MIN_BLOCK_COLUMNS = 96


@functools.lru_cache(maxsize=256)
def _plan(N, C, H, W, M, kh, kw, ph, pw, dh, dw, Ho, blocks, min_columns):
    """The blocks of a product (computed once per geometry: a layer's calls repeat it every step):
    (q_end, per_block, blocks, cs, offsets), for ``blocks`` blocks of at least ``min_columns``."""
    Wp, Hs, reach = W + pw, H + ph, dh * (kh - 1)
    q_end = ((N - 1) * Hs + ph + Ho) * Wp  # the wide positions [ph*Wp, q_end) hold every output pixel
    Q = q_end - ph * Wp
    per_block = max(-(-Q // blocks), min_columns)
    per_block = min(per_block, max((L2_BYTES // 2) // (4 * M), min_columns))
    per_block = -(-per_block // 32) * 32  # whole panels
    cs = _channel_stride(-(-per_block // Wp) + 1 + reach, Wp)
    offs = _offsets(C, kh, kw, ph, pw, dh, dw, Wp, cs)
    offs.flags.writeable = False
    return q_end, per_block, -(-Q // per_block), cs, offs


def shifted_conv(x, weight, bias, ph, pw, dh, dw, y, flipped=False):
    """y (N, M, Ho, Wo) = conv2d(x, weight) + bias at unit stride, float32, as one GEMM over shifted rows.

    ``flipped``: the convolution with the kernel flipped and transposed, weight (C, M, kh, kw) read as
    (M, C, kh, kw) (the input gradient's product).
    """
    _run_jobs(_conv_job(x, weight, bias, ph, pw, dh, dw, y, flipped))
    return y


def _conv_job(x, weight, bias, ph, pw, dh, dw, y, flipped):
    """shifted_conv's blocks, to run: (blocks, part, fill, multiply-adds); see _run_jobs."""
    N, C, H, W = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    M = weight.shape[1] if flipped else weight.shape[0]
    if flipped:  # flipped by the threads that drain the job, in workspace slot 2 (0 and 1: their buffers)
        w2 = workspace(weight.size, np.float32, 2).reshape(M, C * kh * kw)
        flips = max(1, min(_PREP_CHUNKS, weight.size // _MIN_PREP))
    else:
        w2, flips = weight.reshape(M, C * kh * kw), 0
    Ho, Wo = y.shape[2], y.shape[3]
    Wp, Hs, reach = W + pw, H + ph, dh * (kh - 1)
    q_end, per_block, blocks, cs, offs = _plan(N, C, H, W, M, kh, kw, ph, pw, dh, dw, Ho, _BLOCKS, _MIN_BLOCK_COLUMNS)
    has_bias = bias is not None
    b = np.ascontiguousarray(bias, dtype=np.float32) if has_bias else np.zeros(1, np.float32)
    counter = np.zeros(3, np.int64)

    def part(lo=0, hi=0):
        xw = workspace(C * cs, np.float32).reshape(C, cs)
        out = workspace(M * per_block, np.float32, 1).reshape(M, per_block)
        return _drain(x, w2, weight, flips, offs, b, has_bias, counter, per_block, blocks, q_end, Hs, ph, reach, Wp,
                      xw, out, y)

    def fill(task, threads):  # the same drain for the native workers, each with buffers of its own
        n = threads - 1  # the workers' buffers: slots 4 and 5 of the caller, one slice each
        xw, out = workspace(n * C * cs, np.float32, 4), workspace(n * M * per_block, np.float32, 5)
        at = native.address
        task[_CONV_AT:_CONV_AT + 33] = (
            _CONV, at(counter), at(x), N, C, H, W, at(w2), M, w2.shape[1], at(offs), at(b), has_bias, per_block, blocks,
            q_end, Hs, ph, reach, Wp, at(xw), cs, at(out), at(y), Ho, Wo, b.size, at(weight), *weight.shape, flips)

    return blocks, part, fill, N * M * C * kh * kw * Ho * Wo


# The task row: a convolution's fields from _CONV_AT, a weight gradient's from _GRAD_AT (either, or both:
# the two gradients of one layer, their blocks drained one product after the other).
_CONV, _WEIGHT_GRAD = 1, 2
_CONV_AT, _GRAD_AT = 0, 40


def _run_jobs(*jobs):
    """Run the jobs' blocks on every thread, each thread draining one job after the other: on native
    workers where they run (``native.share``: no hand-over through the interpreter), else by
    ``runtime._run``. A job: (blocks, part, fill, multiply-adds)."""
    blocks = sum(job[0] for job in jobs)
    macs = sum(job[3] for job in jobs)

    def part(lo=0, hi=0):
        for job in jobs:
            job[1]()

    def fill(task, threads):
        task[_CONV_AT] = task[_GRAD_AT] = 0
        for job in jobs:
            job[2](task, threads)

    if macs < runtime._SPLIT_MIN_MACS or not native.share(SERVED, blocks, part, fill):
        runtime._run(blocks, part, macs)


SERVED = 1  # this module's tasks, to the native workers' loop (serve.py)


@njit(cache=True, nogil=True)
def _run_task(task, index):
    """Worker ``index``'s share of the task row (see ``fill`` in _conv_job and _weight_grad_job)."""
    f32, i64 = native._f32, native._i64
    t = task[_CONV_AT:]
    if t[0] == _CONV:
        counter = carray(i64(t[1]), (3,))
        x = carray(f32(t[2]), (t[3], t[4], t[5], t[6]))
        M, R, per_block = t[8], t[9], t[13]
        xw = carray(f32(t[20] + 4 * (index - 1) * t[4] * t[21]), (t[4], t[21]))
        out = carray(f32(t[22] + 4 * (index - 1) * M * per_block), (M, per_block))
        weight = carray(f32(t[27]), (t[28], t[29], t[30], t[31]))
        _drain(x, carray(f32(t[7]), (M, R)), weight, t[32], carray(i64(t[10]), (R,)), carray(f32(t[11]), (t[26],)),
               t[12] != 0, counter, per_block, t[14], t[15], t[16], t[17], t[18], t[19], xw, out,
               carray(f32(t[23]), (t[3], M, t[24], t[25])))
    t = task[_GRAD_AT:]
    if t[0] == _WEIGHT_GRAD:
        counter = carray(i64(t[1]), (3,))
        x = carray(f32(t[2]), (t[3], t[4], t[5], t[6]))
        per_block, cs, taps, K = t[12], t[20], t[18], t[9]
        xw = carray(f32(t[19] + 4 * (index - 1) * per_block * cs), (per_block, cs))
        _drain_weight_grad(x, carray(f32(t[22]), (t[3], K, t[23], t[24])), carray(f32(t[7]), (t[8], K)), t[25],
                           carray(i64(t[10]), (t[11],)), counter, per_block, t[13], t[14], t[15], t[16], t[17], taps,
                           xw, carray(f32(t[21]), (t[4] * taps, K)), carray(f32(t[26]), (K, t[4] * taps)))


# ------------------------------------------------------------------ the weight gradient
@njit(cache=True, nogil=True)
def _dout_rows(dout, r_lo, r_hi, Hs, ph, Wp, dT):
    """dT ((r_hi - r_lo)*Wp, K): dout (N, K, Ho, Wo) at the wide positions of rows [r_lo, r_hi), pixel-major,
    zero where no output pixel is."""
    N, K, Ho, Wo = dout.shape
    for r in range(r_lo, r_hi):
        n, yo = r // Hs, r % Hs - ph
        o = (r - r_lo) * Wp
        if n < N and 0 <= yo < Ho:
            for k in range(K):
                for j in range(Wo):
                    dT[o + j, k] = dout[n, k, yo, j]
            dT[o + Wo:o + Wp, :] = 0.0
        else:
            dT[o:o + Wp, :] = 0.0


@njit(cache=True, nogil=True)
def _product_t(base, table, dT, out):
    """out (M, K) = the shifted rows of the image at ``base`` (row m at ``base + table[m]``), over dT's Q
    positions, by dT (Q, K)."""
    M, K = out.shape
    _gathered(True, base, table.ctypes.data, 4, dT.ctypes.data, dT.strides[0], out.ctypes.data, out.strides[0],
              M, K, dT.shape[0])


@njit(cache=True, nogil=True)
def _drain_weight_grad(x, dout, dT, preps, table, counter, per_block, blocks, g_end, Hs, ph, Wp, taps, xw, dwT,
                       grad):
    """First dT from dout in ``preps`` chunks of rows; then blocks of ``per_block`` input channels until
    none is left: each widened (all samples) and multiplied by dT into its rows of dwT (C*taps, K), which
    the same thread then transposes into its columns of grad (K, C*taps) while they are in its cache."""
    C = x.shape[1]
    rows = -(-(dT.shape[0] // Wp) // preps)
    while True:
        c = _prepared(counter, preps)
        if c < 0:
            break
        r0 = ph + c * rows
        r1 = min(r0 + rows, ph + dT.shape[0] // Wp)
        _dout_rows(dout, r0, r1, Hs, ph, Wp, dT[(r0 - ph) * Wp:(r1 - ph) * Wp])
        native._take(counter.ctypes.data + 16)
    done = 0
    while True:
        b = native._take(counter.ctypes.data)
        if b >= blocks:
            return done
        c0 = b * per_block
        c1 = min(c0 + per_block, C)
        _widen_rows(x, c0, c1, 0, g_end, Hs, ph, Wp, xw)
        _product_t(xw.ctypes.data + 4 * (_LEAD + ph * Wp), table, dT, dwT[c0 * taps:c1 * taps])
        _transpose(dwT[c0 * taps:c1 * taps], grad[:, c0 * taps:c1 * taps])
        done += 1


# Input channels per block of the weight gradient: 36 rows of a 3x3 kernel's
# gradient, three full register tiles, and 8 or more blocks from 32 channels on.
_GRAD_CHANNELS = 4


@functools.lru_cache(maxsize=256)
def _grad_offsets(*args):
    """_offsets, computed once per geometry (read-only)."""
    table = _offsets(*args)
    table.flags.writeable = False
    return table


def shifted_weight_grad(x, dout, kh, kw, ph, pw, dh, dw):
    """dw (K, C, kh, kw) of conv2d at unit stride, float32: dw^T = the shifted rows of x by dout^T."""
    job, finish = _weight_grad_job(x, dout, kh, kw, ph, pw, dh, dw)
    _run_jobs(job)
    return finish()


def shifted_backward(x, weight, dout, ph, pw, dh, dw, dx):
    """Both gradients of a 'same' unit-stride convolution, float32, their blocks drained by every thread
    one product after the other (no thread idle while the other finishes the longer one): dx written
    into ``dx`` (N, C, H, W); returns dw."""
    kh, kw = weight.shape[2], weight.shape[3]
    qh, qw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    job, finish = _weight_grad_job(x, dout, kh, kw, ph, pw, dh, dw)
    _run_jobs(_conv_job(np.ascontiguousarray(dout, dtype=np.float32), weight, None, qh, qw, dh, dw, dx, True), job)
    return finish()


def _weight_grad_job(x, dout, kh, kw, ph, pw, dh, dw):
    """shifted_weight_grad's blocks, to run (see _run_jobs), and what makes dw of them once they have run."""
    N, C, H, W = x.shape
    K, Ho, Wo = dout.shape[1], dout.shape[2], dout.shape[3]
    Wp, Hs, reach = W + pw, H + ph, dh * (kh - 1)
    r_end = (N - 1) * Hs + ph + Ho
    dT = workspace((r_end - ph) * Wp * K, np.float32, 6).reshape((r_end - ph) * Wp, K)  # filled by the drain
    dout = np.ascontiguousarray(dout, dtype=np.float32)
    preps = max(1, min(_PREP_CHUNKS, dT.size // _MIN_PREP, r_end - ph))
    per_block = min(_GRAD_CHANNELS, C)
    blocks = -(-C // per_block)
    g_end = r_end - ph + reach  # the wide rows the products read
    cs = _channel_stride(g_end, Wp)
    table = _grad_offsets(per_block, kh, kw, ph, pw, dh, dw, Wp, cs)
    taps = kh * kw
    dwT = workspace(C * taps * K, np.float32, 3).reshape(C * taps, K)
    grad = np.empty((K, C * taps), np.float32)
    counter = np.zeros(3, np.int64)

    def part(lo=0, hi=0):
        xw = workspace(per_block * cs, np.float32).reshape(per_block, cs)
        return _drain_weight_grad(x, dout, dT, preps, table, counter, per_block, blocks, g_end, Hs, ph, Wp, taps, xw,
                                  dwT, grad)

    def fill(task, threads):
        xw = workspace((threads - 1) * per_block * cs, np.float32, 7)  # the workers' buffers
        at = native.address
        task[_GRAD_AT:_GRAD_AT + 27] = (
            _WEIGHT_GRAD, at(counter), at(x), N, C, H, W, at(dT), dT.shape[0], K, at(table), table.size, per_block,
            blocks, g_end, Hs, ph, Wp, taps, at(xw), cs, at(dwT), at(dout), Ho, Wo, preps, at(grad))

    def finish():
        return grad.reshape(K, C, kh, kw)

    return (blocks, part, fill, N * K * C * taps * Ho * Wo), finish


@njit(cache=True, nogil=True)
def _transpose(a, out):
    """out (L, M) = a (M, L) transposed, in blocks of 16 x 16: a row of either may be a multiple of 4 KiB
    long, and reading or writing one element of each row in turn would keep missing the L1."""
    M, L = a.shape
    for i0 in range(0, M, 16):
        for j0 in range(0, L, 16):
            for j in range(j0, min(j0 + 16, L)):
                for i in range(i0, min(i0 + 16, M)):
                    out[j, i] = a[i, j]
