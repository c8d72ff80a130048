"""The transforms of Winograd's F(4x4, 3x3): 36 multiplications per 4x4 tile of outputs, not 144.

The same algorithm as ``winograd.py``'s F(2x2, 3x3), on larger tiles: each
4x4 tile of outputs comes from a 6x6 tile of inputs d (Lavin & Gray, 2016,
interpolation points 0, 1, -1, 2, -2 and infinity)::

    Y = A^T [ (G g G^T) * (B^T d B) ] A            (* elementwise, 6x6)

    B^T = [[4,  0, -5,  0, 1, 0],    G = [[ 1/4,     0,    0 ],    A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4,  1, 1, 0],         [-1/6,  -1/6, -1/6 ],           [0, 1, -1, 2, -2, 0],
           [0,  4, -4, -1, 1, 0],         [-1/6,   1/6, -1/6 ],           [0, 1,  1, 4,  4, 0],
           [0, -2, -1,  2, 1, 0],         [1/24,  1/12,  1/6 ],           [0, 1, -1, 8, -8, 1]]
           [0,  2, -1, -2, 1, 0],         [1/24, -1/12,  1/6 ],
           [0,  4,  0, -5, 0, 1]]         [   0,     0,    1 ]]

Against F(2x2, 3x3): 2.25 multiplications per output and input channel
instead of 4 (the direct sum: 9), and 36 transformed values per 16 outputs
instead of 16 per 4, so the transforms too move 44% less memory per output.
The price is rounding: the larger coefficients make the error about ten
times F(2x2, 3x3)'s (float32, 64 channels: about 3e-6 of the largest
output, against 2.5e-7), still well inside float32 training's noise. The
weight transforms and the weight gradient's fold run in float64.

These kernels are the F(4x4, 3x3) counterparts of ``winograd.py``'s, with the
same arguments and the same layout: the (xi, nu) position of the transformed
tile is axis 0, at 6*xi + nu. ``winograd.py`` tiles, blocks and calls them.
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit, prange, uint64

from ._common import _load_rows, _valid_range
from .runtime import _parallel_njit

# the transforms' coefficients as float32, so that float32 tiles are transformed in float32 (a
# Python number would be a float64 constant and widen every operation); float64 tiles stay float64
_2, _4, _5, _8 = np.float32(2), np.float32(4), np.float32(5), np.float32(8)


@njit(cache=True, inline="always")
def _g6(t0, t1, t2):
    # G t for a column of three, in float64 (products by the reciprocals, no divisions)
    t0, t1, t2 = np.float64(t0), np.float64(t1), np.float64(t2)
    p, q = (t0 + t2) * (-1 / 6), t1 * (-1 / 6)
    r, s = t0 * (1 / 24) + t2 * (1 / 6), t1 * (1 / 12)
    return t0 * 0.25, p + q, p - q, r + s, r - s, t2


@_parallel_njit()
def _weights4(w, U):
    # U[6 xi + nu, k, c] = (G w[k, c] G^T)[xi, nu], w (K, C, 3, 3), in float64. Output channel by
    # output channel, each half of the product over all input channels at once: the loops over c
    # vectorise (a (k, c) at a time, all 36 values in scalars, ran five times slower)
    K, C = w.shape[0], w.shape[1]
    for k in prange(K):
        g = np.empty((6, 3, C), dtype=np.float64)  # G w[k, c], one per iteration (nothing shared)
        for j in range(3):
            for c in range(C):
                g[0, j, c], g[1, j, c], g[2, j, c], g[3, j, c], g[4, j, c], g[5, j, c] = _g6(
                    w[k, c, 0, j], w[k, c, 1, j], w[k, c, 2, j])
        for i in range(6):
            for c in range(C):
                v = _g6(g[i, 0, c], g[i, 1, c], g[i, 2, c])
                U[6 * i, k, c], U[6 * i + 1, k, c], U[6 * i + 2, k, c] = v[0], v[1], v[2]
                U[6 * i + 3, k, c], U[6 * i + 4, k, c], U[6 * i + 5, k, c] = v[3], v[4], v[5]
    return U


@njit(cache=True, inline="always")
def _bt(d0, d1, d2, d3, d4, d5):
    # B^T d for a column of six
    return (_4 * d0 - _5 * d2 + d4, (d3 + d4) - _4 * (d1 + d2), (d4 - d3) + _4 * (d1 - d2),
            (d4 - d2) + _2 * (d3 - d1), (d4 - d2) - _2 * (d3 - d1), _4 * d1 - _5 * d3 + d5)


@njit(cache=True, inline="always")
def _store6(V, p, i, t, v):
    # V[p + j, i, t] = v[j] for the six values of one row of a transformed tile (unsigned indices)
    V[p, i, t] = v[0]
    V[p + 1, i, t] = v[1]
    V[p + 2, i, t] = v[2]
    V[p + 3, i, t] = v[3]
    V[p + 4, i, t] = v[4]
    V[p + 5, i, t] = v[5]


@njit(cache=True, nogil=True)
def _input4(x, n, a, b, dh, dw, ph, pw, r0, r1, TW, V):
    # V[6 xi + nu, c, t] = (B^T d B)[xi, nu] for the tiles t of tile rows [r0, r1) of residue
    # class (a, b): tile (r, s) reads the 6x6 pixels x[n, c, a - ph + dh*(4r + e), b - pw + dw*(4s + f)]
    C, W = x.shape[1], x.shape[3]
    Wp = 4 * TW + 2  # the columns the tiles of a tile row read
    rows = np.empty((6, Wp), dtype=V.dtype)
    q = np.empty((6, Wp), dtype=V.dtype)
    m_lo, m_hi = _valid_range(b - pw, dw, W, Wp)  # columns m with 0 <= b - pw + dw*m < W
    for c in range(C):
        uc = uint64(c)
        for r in range(r0, r1):
            _load_rows(rows, x, n, c, a - ph + dh * 4 * r, dh, b - pw, dw, m_lo, m_hi)  # 6 rows, 0 outside
            for m in range(Wp):  # B^T d: combine the rows, whole rows at a time
                v = _bt(rows[0, m], rows[1, m], rows[2, m], rows[3, m], rows[4, m], rows[5, m])
                q[0, m], q[1, m], q[2, m], q[3, m], q[4, m], q[5, m] = v
            t0 = (r - r0) * TW
            for e in range(6):  # (B^T d) B: tile s combines columns 4s .. 4s+5
                e6 = uint64(6 * e)
                for s in range(TW):
                    v = _bt(q[e, 4 * s], q[e, 4 * s + 1], q[e, 4 * s + 2], q[e, 4 * s + 3], q[e, 4 * s + 4],
                            q[e, 4 * s + 5])
                    _store6(V, e6, uc, uint64(t0 + s), v)
    return V


@njit(cache=True, inline="always")
def _at(m0, m1, m2, m3, m4, m5):
    # A^T m for a column of six
    p, q = m1 + m2, m1 - m2
    r, s = m3 + m4, m3 - m4
    return m0 + p + r, q + _2 * s, p + _4 * r, q + _8 * s + m5


@njit(cache=True, nogil=True)
def _output4(M, n, a, b, dh, dw, r0, r1, TW, bias, y):
    # y[n, k, a + dh*(4r + i), b + dw*(4s + j)] = (A^T M[:, k, t] A)[i, j] + bias[k], inside y only
    K, Ho, Wo = y.shape[1], y.shape[2], y.shape[3]
    T = (r1 - r0) * TW
    u = np.empty((4, 6, T), dtype=M.dtype)
    z = np.empty(4 * TW, dtype=M.dtype)
    n_out = _valid_range(b, dw, Wo, 4 * TW)[1]  # the outputs of residue class b along a row
    un = uint64(n)
    for k in range(K):
        uk = uint64(k)
        bk = bias[k]
        for f in range(6):  # A^T m: combine the 6 rows of each tile, all the tile rows at once (long loops)
            uf = uint64(f)
            for t in range(T):
                ut = uint64(t)
                v = _at(M[uf, uk, ut], M[uf + 6, uk, ut], M[uf + 12, uk, ut], M[uf + 18, uk, ut],
                        M[uf + 24, uk, ut], M[uf + 30, uk, ut])
                u[0, f, t], u[1, f, t], u[2, f, t], u[3, f, t] = v
        for r in range(r0, r1):
            t0 = (r - r0) * TW
            for i in range(4):  # (A^T m) A: 4 outputs per tile along the row
                oh = a + dh * (4 * r + i)
                if oh >= Ho:
                    continue
                for s in range(TW):
                    t = t0 + s
                    v = _at(u[i, 0, t], u[i, 1, t], u[i, 2, t], u[i, 3, t], u[i, 4, t], u[i, 5, t])
                    z[4 * s] = v[0] + bk
                    z[4 * s + 1] = v[1] + bk
                    z[4 * s + 2] = v[2] + bk
                    z[4 * s + 3] = v[3] + bk
                uh = uint64(oh)
                if dw == 1:
                    for m in range(n_out):
                        y[un, uk, uh, uint64(b + m)] = z[m]
                else:
                    for m in range(n_out):
                        y[un, uk, uh, uint64(b + dw * m)] = z[m]
    return y


@njit(cache=True, inline="always")
def _a6(g0, g1, g2, g3):
    # A g for a column of four (A = (A^T)^T, six rows)
    p, q = g0 + g2, g1 + g3
    r, s = g0 + _4 * g2, _2 * g1 + _8 * g3
    return g0, p + q, p - q, r + s, r - s, g3


@njit(cache=True, nogil=True)
def _output_grad4(dout, n, a, b, dh, dw, r0, r1, TW, D):
    # D[6 xi + nu, k, t] = (A g A^T)[xi, nu] for the 4x4 tile g of dout at tile (r, s) of residue
    # class (a, b): g[i, j] = dout[n, k, a + dh*(4r + i), b + dw*(4s + j)], zero outside dout
    K, Wo = dout.shape[1], dout.shape[3]
    T = (r1 - r0) * TW
    z = np.empty((4, 4 * TW), dtype=D.dtype)
    e = np.empty((6, 4 * T), dtype=D.dtype)  # A g of every tile row, row after row: tile t's columns at 4t
    n_out = _valid_range(b, dw, Wo, 4 * TW)[1]
    for k in range(K):
        uk = uint64(k)
        for r in range(r0, r1):
            _load_rows(z, dout, n, k, a + dh * 4 * r, dh, b, dw, 0, n_out)  # the tile row's 4 rows, 0 outside
            m0 = 4 * (r - r0) * TW
            for m in range(4 * TW):  # A g: combine the 4 rows
                v = _a6(z[0, m], z[1, m], z[2, m], z[3, m])
                e[0, m0 + m], e[1, m0 + m], e[2, m0 + m], e[3, m0 + m], e[4, m0 + m], e[5, m0 + m] = v
        for f in range(6):  # (A g) A^T: tile t combines columns 4t .. 4t+3, all the tile rows in one loop
            f6 = uint64(6 * f)
            for t in range(T):
                v = _a6(e[f, 4 * t], e[f, 4 * t + 1], e[f, 4 * t + 2], e[f, 4 * t + 3])
                _store6(D, f6, uk, uint64(t), v)
    return D


@njit(cache=True, inline="always")
def _gt(s0, s1, s2, s3, s4, s5):
    # G^T s for a column of six, in float64 (products by the reciprocals)
    s0, s1, s2 = np.float64(s0), np.float64(s1), np.float64(s2)
    s3, s4, s5 = np.float64(s3), np.float64(s4), np.float64(s5)
    p, q = (s1 + s2) * (1 / 6), (s3 + s4) * (1 / 6)
    return s0 * 0.25 - p + q * 0.25, (s2 - s1) * (1 / 6) + (s3 - s4) * (1 / 12), q - p + s5


@_parallel_njit()
def _fold4(S, dw):
    # dw[k, c] = G^T S[:, k, c] G, S (36, K, C) -> dw (K, C, 3, 3), in float64, vectorised over c
    # as _weights4
    K, C = S.shape[1], S.shape[2]
    for k in prange(K):
        h = np.empty((3, 6, C), dtype=np.float64)  # G^T S[:, k, c]
        for j in range(6):
            for c in range(C):
                h[0, j, c], h[1, j, c], h[2, j, c] = _gt(S[j, k, c], S[6 + j, k, c], S[12 + j, k, c],
                                                         S[18 + j, k, c], S[24 + j, k, c], S[30 + j, k, c])
        for i in range(3):
            for c in range(C):
                dw[k, c, i, 0], dw[k, c, i, 1], dw[k, c, i, 2] = _gt(h[i, 0, c], h[i, 1, c], h[i, 2, c],
                                                                     h[i, 3, c], h[i, 4, c], h[i, 5, c])
    return dw
