"""The unfolded-columns products of ``conv.py`` on the native workers: each thread's share without the interpreter.

``conv.py`` splits a product over unfolded columns (im2col, then a GEMM per
block) by samples between threads through ``runtime._split``, and runs a small
layer's two gradients side by side through ``runtime._together``: hand-overs
through the interpreter, with the native worker of the products around them
(``native.py``) parked for each. In a training step on small images a dozen
such products sit between the shifted and batch-norm products that the
native worker serves. Here the same work runs as a native task:

* **Shares handed out.** A product's shares are the split's contiguous
  sample ranges, one per thread; a pair of products (both gradients of a
  layer) are two shares, each product over the whole batch (from 256 output
  channels: the first product in halves of the batch, the weight gradient in
  blocks of input channels, each block a share). An atomic
  counter hands them out: the caller takes the first at once, the worker
  the next as soon as it is awake, and whoever finishes first takes what is
  left (a worker still waking up takes nothing, and nobody waits for it).
  Inside a share, the blocks of ``conv._blocks``, as the split runs them.
* **The numbers.** The forward's blocks are unfolded and multiplied by the
  same GEMM tiles (``gemm._gemm``), merged and biased in the same order as
  the split: the same numbers. The input gradient multiplies on the own GEMM
  too, then folds each block back (``im2col._col2im_block``) into its own
  samples' planes. The weight gradient is dw^T = cols @ dout^T, dout copied
  pixel-major per block, summed over the blocks in order by the one thread
  that runs the product, then transposed; from 256 output channels (where
  that transpose costs too much) dw = dout @ cols^T in its own layout, each
  block of input channels' columns unfolded pixel-major over every sample.
  Either way each number is computed by one thread in a fixed order: the
  same from run to run.

Float32, one group, the own GEMM on this CPU, and (input gradient) blocks of
whole samples; elsewhere ``conv.py`` runs the products as before.
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import carray, njit

from . import gemm, native, runtime
from .im2col import _col2im_block, _im2col_block
from .shifted import _transpose

__all__ = ["forward_job", "input_grad_job", "weight_grad_job", "weight_grad_direct_job", "share"]

SERVED = 4  # this module's tasks, to the native workers' loop (serve.py)
_FORWARD, _INPUT_GRAD, _WEIGHT_GRAD, _WEIGHT_GRAD_DIRECT = 1, 2, 3, 4
_FIELDS = 29  # task fields per product; products from field 2 on, then the shares' fields
_SHARES_AT = 2 + 2 * _FIELDS


@njit(cache=True, nogil=True)
def _forward_share(x, w2, bias, has_bias, y, table, t0, t1, geometry, merge_below, cols, merge):
    """Blocks [t0, t1) of ``table`` (rows n0, n1, ho0, ho1) of y = conv(x, w2) (+ bias), as conv2d_forward's
    split runs them: unfold into ``cols`` (R, stride), multiply, merge through ``merge`` (K, width)."""
    kh, kw, sh, sw, ph, pw, dh, dw, Wo = geometry
    C = x.shape[1]
    y3 = y.reshape(y.shape[0], y.shape[1], y.shape[2] * y.shape[3])
    A = w2[None]  # (1, K, R)
    for t in range(t0, t1):
        n0, n1, ho0, ho1 = table[t, 0], table[t, 1], table[t, 2], table[t, 3]
        nb, P = n1 - n0, (ho1 - ho0) * Wo
        _im2col_block(x, 0, C, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, cols)
        if nb > 1 and P < merge_below:  # one wide GEMM, then each sample's columns copied out
            m = merge[:, :nb * P]
            gemm._gemm(A, cols[None, :, :nb * P], m[None], False)
            for i in range(nb):
                y3[n0 + i, :, ho0 * Wo:ho1 * Wo] = m[:, i * P:(i + 1) * P]
        else:  # one GEMM per sample, written straight into y
            for i in range(nb):
                gemm._gemm(A, cols[None, :, i * P:(i + 1) * P], y3[n0 + i:n0 + i + 1, :, ho0 * Wo:ho1 * Wo], False)
        if has_bias:
            for n in range(n0, n1):
                for k in range(y3.shape[1]):
                    y3[n, k, ho0 * Wo:ho1 * Wo] += bias[k]


@njit(cache=True, nogil=True)
def _input_grad_share(dout, w2, dx, table, t0, t1, geometry, merge_below, dcols, wide):
    """Blocks [t0, t1) (whole samples) of dx = conv2d_input_grad(dout, w2): dcols = w2^T @ dout per block
    (samples side by side in ``wide`` where thin), folded into dx, whose planes of these samples start zeroed."""
    kh, kw, sh, sw, ph, pw, dh, dw, Wo = geometry
    C = dx.shape[1]
    d3 = dout.reshape(dout.shape[0], dout.shape[1], dout.shape[2] * dout.shape[3])
    A = w2.T[None]  # (1, R, K)
    if t1 > t0:
        dx[table[t0, 0]:table[t1 - 1, 1]] = 0.0
    for t in range(t0, t1):
        n0, n1, ho0, ho1 = table[t, 0], table[t, 1], table[t, 2], table[t, 3]
        nb, P = n1 - n0, (ho1 - ho0) * Wo
        c = dcols[:, :nb * P]
        if nb > 1 and P < merge_below:
            b = wide[:, :nb * P]
            for i in range(nb):
                b[:, i * P:(i + 1) * P] = d3[n0 + i, :, ho0 * Wo:ho1 * Wo]
            gemm._gemm(A, b[None], c[None], False)
        else:
            for i in range(nb):
                gemm._gemm(A, d3[n0 + i:n0 + i + 1, :, ho0 * Wo:ho1 * Wo], c[None, :, i * P:(i + 1) * P], False)
        _col2im_block(c, 0, C, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, dx, True, True)


@njit(cache=True, nogil=True)
def _weight_grad_share(x, dout, dwT, table, t0, t1, geometry, cols, dT):
    """dwT (R, K) = the sum over blocks [t0, t1) of cols(x) (R, nb*P) @ dout (nb*P, K, pixel-major in ``dT``)."""
    kh, kw, sh, sw, ph, pw, dh, dw, Wo = geometry
    C = x.shape[1]
    d3 = dout.reshape(dout.shape[0], dout.shape[1], dout.shape[2] * dout.shape[3])
    if t1 == t0:
        dwT[...] = 0.0
    for t in range(t0, t1):
        n0, n1, ho0, ho1 = table[t, 0], table[t, 1], table[t, 2], table[t, 3]
        nb, P = n1 - n0, (ho1 - ho0) * Wo
        _im2col_block(x, 0, C, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, cols)
        for i in range(nb):
            _transpose(d3[n0 + i, :, ho0 * Wo:ho1 * Wo], dT[i * P:(i + 1) * P])
        gemm._gemm(cols[None, :, :nb * P], dT[None, :nb * P], dwT[None], t > t0)


@njit(cache=True, nogil=True)
def _im2col_pixels(x, c0, c1, geometry, Ho, colsT):
    """The columns of channels [c0, c1) of every sample, pixel-major: colsT[(n, ho, wo), (c - c0, i, j)]."""
    kh, kw, sh, sw, ph, pw, dh, dw, Wo = geometry
    N, C, H, W = x.shape
    zero = np.float32(0.0)
    for n in range(N):
        for ho in range(Ho):
            for wo in range(Wo):
                row = colsT[(n * Ho + ho) * Wo + wo]
                r = 0
                for c in range(c0, c1):
                    for i in range(kh):
                        h = ho * sh - ph + i * dh
                        for j in range(kw):
                            w = wo * sw - pw + j * dw
                            row[r] = x[n, c, h, w] if 0 <= h < H and 0 <= w < W else zero
                            r += 1


@njit(cache=True, nogil=True)
def _weight_grad_direct_share(x, dout_wide, dw, table, t0, t1, geometry, colsT):
    """Blocks [t0, t1) of input channels (rows c0, c1) of dw (K, R) = dout (K, N*P, samples side by side) @
    cols^T, each block's columns of dw computed whole by one thread: no sum over threads, no transpose."""
    kh, kw = geometry[0], geometry[1]
    NP = dout_wide.shape[1]
    Ho = NP // x.shape[0] // geometry[8]
    A = dout_wide[None]
    for t in range(t0, t1):
        c0, c1 = table[t, 0], table[t, 1]
        r0, r1 = c0 * kh * kw, c1 * kh * kw
        _im2col_pixels(x, c0, c1, geometry, Ho, colsT)
        gemm._gemm(A, colsT[None, :NP, :r1 - r0], dw[None, :, r0:r1], False)


@njit(cache=True, nogil=True)
def _run_share(kind, a, b, bias, has_bias, out, table, t0, t1, geometry, merge_below, first, second):
    """Blocks [t0, t1) of one product; every array 4-D (a 2-D one as (1, 1, rows, cols))."""
    if kind == _FORWARD:
        _forward_share(a, b[0, 0], bias, has_bias, out, table, t0, t1, geometry, merge_below, first, second)
    elif kind == _INPUT_GRAD:
        _input_grad_share(a, b[0, 0], out, table, t0, t1, geometry, merge_below, first, second)
    elif kind == _WEIGHT_GRAD:
        _weight_grad_share(a, b, out[0, 0], table, t0, t1, geometry, first, second)
    elif kind == _WEIGHT_GRAD_DIRECT:
        _weight_grad_direct_share(a, b[0, 0], out[0, 0], table, t0, t1, geometry, first)


@njit(cache=True, nogil=True)
def _product(t, at, index, base):
    """The arrays of the product whose fields start at ``t[at]``; this thread's buffers (worker ``index`` >= 1:
    its slice of the workers' buffers; 0: the buffers at ``base``, the caller's)."""
    f32, i64 = native._f32, native._i64
    p = t[at:at + _FIELDS]
    a = carray(f32(p[1]), (p[2], p[3], p[4], p[5]))
    b = carray(f32(p[6]), (p[7], p[8], p[9], p[10]))
    out = carray(f32(p[11]), (p[12], p[13], p[14], p[15]))
    bias = carray(f32(p[16]), (p[17],))
    table = carray(i64(p[19]), (p[20], 4))
    geometry = carray(i64(p[21]), (9,))
    r1, c1, r2, c2 = p[24], p[25], p[27], p[28]
    slot = index - 1 if index > 0 else 0
    first = carray(f32((p[23] if index > 0 else base[0]) + 4 * slot * r1 * c1), (r1, c1))
    second = carray(f32((p[26] if index > 0 else base[1]) + 4 * slot * r2 * c2), (r2, c2))
    return p[0], a, b, bias, p[18] != 0, out, table, geometry, p[22], first, second


@njit(cache=True, nogil=True)
def _drain(t, index, base0, base1):
    """Shares (rows of the shares' table: product, first and last block) until none is left."""
    s_at = _SHARES_AT
    shares = carray(native._i64(t[s_at]), (t[s_at + 1], 3))
    counter = t[s_at + 2]
    while True:
        s = native._take(counter)
        if s >= shares.shape[0]:
            return
        at = 2 + shares[s, 0] * _FIELDS
        kind, a, b, bias, has_bias, out, table, geometry, merge_below, first, second = _product(
            t, at, index, base0 if shares[s, 0] == 0 else base1)
        _run_share(kind, a, b, bias, has_bias, out, table, shares[s, 1], shares[s, 2], geometry, merge_below, first,
                   second)


@njit(cache=True, nogil=True)
def _run_task(t, index):
    """Worker ``index``'s share of the task row ``t`` (see ``share``)."""
    _drain(t, index, t[:2], t[:2])  # (a worker's buffers are in the row; the bases are unused)


def _as4(a):
    return a.reshape((1,) * (4 - a.ndim) + a.shape)


class _Job:
    """One product to run: its kind, arrays (4-D), blocks, and the shape of each thread's two buffers."""

    # parts: how many shares of samples (None: one per thread alone, one beside another job); 0: every block
    # (of channels, not samples) a share of its own
    parts = None

    def __init__(self, kind, a, b, out, bias, blocks, geometry, merge_below, first, second):
        self.kind, self.a, self.b, self.out = kind, a, _as4(b), _as4(out)
        self.has_bias = bias is not None
        self.bias = np.ascontiguousarray(bias, dtype=np.float32) if self.has_bias else np.zeros(1, np.float32)
        self.blocks_of, self.geometry = blocks, np.asarray(geometry, np.int64)
        self.merge_below, self.first, self.second = merge_below, first, second

    def fields(self, table, first, second):
        at = native.address
        return (self.kind, at(self.a), *self.a.shape, at(self.b), *self.b.shape, at(self.out), *self.out.shape,
                at(self.bias), self.bias.size, self.has_bias, at(table), table.shape[0], at(self.geometry),
                self.merge_below, at(first), *self.first, at(second), *self.second)


def forward_job(x, w2, bias, y, blocks_of, geometry, row_stride, merge_below):
    """conv2d_forward's product (one group): y (N, K, Ho, Wo) = conv(x, w2 (K, R)) + bias."""
    widest = _widest(blocks_of, x.shape[0], geometry[-1])
    return _Job(_FORWARD, x, w2, y, bias, blocks_of, geometry, merge_below, (w2.shape[1], row_stride(widest)),
                (w2.shape[0], widest))


def input_grad_job(dout, w2, dx, blocks_of, geometry, merge_below):
    """conv2d_input_grad's product (one group): dx (N, C, H, W) from dout (N, K, Ho, Wo) and w2 (K, R); None
    where a block is part of a sample (blocks of one sample folded by two threads would overlap)."""
    N, Ho, Wo = dout.shape[0], dout.shape[2], geometry[-1]
    if any(ho0 != 0 or ho1 != Ho for _, _, ho0, ho1 in blocks_of(0, N)):
        return None
    widest = _widest(blocks_of, N, Wo)
    return _Job(_INPUT_GRAD, dout, w2, dx, None, blocks_of, geometry, merge_below, (w2.shape[1], widest),
                (w2.shape[0], widest))


def weight_grad_job(x, dout, dwT, blocks_of, geometry, row_stride):
    """conv2d_weight_grad's product (one group) as its transpose: dwT (R, K) = cols(x) @ dout^T."""
    widest = _widest(blocks_of, x.shape[0], geometry[-1])
    return _Job(_WEIGHT_GRAD, x, dout, dwT, None, blocks_of, geometry, 0, (dwT.shape[0], row_stride(widest)),
                (widest, dout.shape[1]))


def weight_grad_direct_job(x, dout, dw, geometry, channels):
    """conv2d_weight_grad's product (one group) in its own layout: dw (K, R) = dout @ cols^T, blocks of
    ``channels`` input channels, each a share of its own (for small maps: the pixel-major columns of every
    sample of a block stay in the cache)."""
    N, C = x.shape[0], x.shape[1]
    K, NP = dout.shape[1], dout.shape[0] * dout.shape[2] * dout.shape[3]
    wide = np.ascontiguousarray(dout.reshape(N, K, -1).transpose(1, 0, 2)).reshape(K, NP)  # samples side by side
    taps = geometry[0] * geometry[1]
    job = _Job(_WEIGHT_GRAD_DIRECT, x, wide, dw, None, lambda lo, hi: [(c, min(c + channels, C), 0, 0)
                                                                      for c in range(0, C, channels)],
               geometry, 0, (NP, channels * taps), (1, 1))
    job.parts = 0
    return job


def _widest(blocks_of, N, Wo):
    return max([(n1 - n0) * (ho1 - ho0) * Wo for n0, n1, ho0, ho1 in blocks_of(0, N)] + [1])


def _suits(*arrays):
    return (gemm.enabled() and native.available() and not runtime._inline[0]
            and all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays))


def share(*jobs):
    """Run one job split by samples between the threads, or two side by side (each over the whole batch), on the
    caller and the native worker. False (nothing run) where that does not run here: one thread, another
    platform, inside another split, not float32 or contiguous, no own GEMM, or a job that is None."""
    if any(job is None for job in jobs):
        return False
    N = jobs[0].a.shape[0]
    threads = runtime._workers(N if len(jobs) == 1 else 2)
    if threads < 2 or not _suits(*(arr for job in jobs for arr in (job.a, job.b, job.out))):
        return False
    workspace = runtime.workspace

    tables, rows = [], []
    for p, job in enumerate(jobs):
        parts = job.parts if job.parts is not None else (threads if len(jobs) == 1 else 1)
        blocks = []
        if parts == 0:  # every block a share
            blocks = list(job.blocks_of(0, N))
            rows.extend((p, b, b + 1) for b in range(len(blocks)))
        for t in range(parts):
            lo, hi = N * t // parts, N * (t + 1) // parts
            start = len(blocks)
            blocks.extend(job.blocks_of(lo, hi))
            rows.append((p, start, len(blocks)))
        tables.append(np.array(blocks, np.int64).reshape(-1, 4))
    shares = np.array(rows, np.int64)
    counter = np.zeros(1, np.int64)
    task = np.zeros(native._TASK, np.int64)
    caller = []
    for p, job in enumerate(jobs):  # the caller's buffers: slots 0, 1 (first product), 12, 13 (second)
        caller.append((workspace(job.first[0] * job.first[1], np.float32, 12 * p),
                       workspace(job.second[0] * job.second[1], np.float32, 12 * p + 1)))
    base0 = np.array([native.address(caller[0][0]), native.address(caller[0][1])], np.int64)
    base1 = np.array([native.address(caller[-1][0]), native.address(caller[-1][1])], np.int64)

    def fill(row, threads):
        n = threads - 1  # the workers' buffers: slots 10, 11 (first product) and 14, 15 (second), a slice each
        row[0], row[1] = SERVED, len(jobs)
        for p, job in enumerate(jobs):
            first = workspace(n * job.first[0] * job.first[1], np.float32, 10 + 4 * p)
            second = workspace(n * job.second[0] * job.second[1], np.float32, 11 + 4 * p)
            row[2 + p * _FIELDS:2 + (p + 1) * _FIELDS] = job.fields(tables[p], first, second)
        row[_SHARES_AT:_SHARES_AT + 3] = (native.address(shares), shares.shape[0], native.address(counter))
        task[:] = row  # the caller reads its products from the same fields

    def own():
        _drain(task, 0, base0, base1)

    return native.share(SERVED, shares.shape[0], own, fill)
