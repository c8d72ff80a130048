"""The permutohedral lattice (Adams, Baek & Davis 2010): Gaussian filtering in a d-dimensional feature space.

Filtering N values (each a row of C numbers) with a Gaussian of the
distances between N feature vectors f_i in R^d,

    out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j,

costs N^2 directly. The lattice does it in O(N (d+1) C) per pass: each point is
*splatted* onto the d+1 vertices of the lattice simplex that holds it
(barycentric weights), the vertex values are *blurred* with the kernel
[1/2, 1, 1/2] along each of the d+1 lattice directions in turn, and each point
*slices* (reads back) the blurred values of its d+1 vertices with the same
weights. Only the vertices that some point touches exist (a hash table); a
blur tap that falls on a missing vertex reads zero, as in the reference
implementation of Kraehenbuehl & Koltun (densecrf), whose constants this
follows: the features are scaled by sqrt(2/3) (d+1) / sqrt((k+1)(k+2)) per
axis k, and the slice is multiplied by alpha = 1 / (1 + 2^-d).

What comes out is ``c_i * sum_j k~(f_i, f_j) v_j`` with ``k~`` close to the
Gaussian but neither exactly Gaussian nor exactly shift-invariant, and an
unknown scale. Hence the two extras a user of the lattice needs:

* ``norm``        -- the filter of all-ones, ``L(1)_i``: divide by it, and the
  scale cancels (``L(v)_i / L(1)_i`` is a weighted mean of the v_j);
* ``self_weight`` -- ``s_i``, the weight with which the lattice hands point i
  its own value back (``L(v)_i`` contains ``s_i v_i``): subtract ``s_i v_i``,
  and the sum runs over j != i. It is computed exactly for the lattice as
  built, blur taps on missing vertices included (``_self_weights``).

``message(v, weight, out)`` does both in the slice: ``out += weight (L(v) -
s v) / L(1)``, the normalised mean-field message over j != i, in one pass.

``scratchseg.crf`` (the dense CRF) is the user; the accuracy against the
exact Gaussian is measured and stated there (``tests/test_crf.py``). This is
not a twin of a reference function (it approximates, so it is not registered
in ``KERNELS``); it is reached by ``scratchseg.crf.dense_crf(..., filter='lattice')``.

    >>> import numpy as np
    >>> f = np.random.default_rng(0).random((50, 3)) * 4        # 50 points in R^3
    >>> lat = PermutohedralLattice(f)
    >>> out = lat.filter(np.ones((50, 2)))                      # (N, C) -> (N, C)
    >>> out.shape, bool(np.allclose(out[:, 0], lat.norm))
    ((50, 2), True)
"""

from __future__ import annotations

import math

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit, prange

from .runtime import _launch, _parallel_njit

__all__ = ["PermutohedralLattice"]

_EMPTY = -1  # a free slot of the hash table


# ------------------------------------------------------------------ building
@njit(cache=True, nogil=True)
def _embed(features, scale, rem0, rank, bary):
    """Per point: the remainder-0 vertex ``rem0``, the ``rank`` of each coordinate, the barycentric weights.

    features (N, d); rem0, rank (N, d+1) int64; bary (N, d+1). Adams et al. 2010, section 3 and p. 10.
    """
    N, d = features.shape
    d1 = d + 1
    elevated = np.empty(d1)
    b = np.empty(d1 + 1)
    for i in range(N):
        # elevate onto the hyperplane sum(x) = 0 of R^(d+1): x = E f (E's columns are the lattice basis)
        sm = 0.0
        for j in range(d, 0, -1):
            cf = features[i, j - 1] * scale[j - 1]
            elevated[j] = sm - j * cf
            sm += cf
        elevated[0] = sm
        # the nearest point whose coordinates are all multiples of d+1 (a remainder-0 point)
        total = 0
        for t in range(d1):
            v = elevated[t] / d1
            up = math.ceil(v) * d1
            down = math.floor(v) * d1
            r0 = int(up) if up - elevated[t] < elevated[t] - down else int(down)
            rem0[i, t] = r0
            total += r0 // d1
        # the simplex: rank[t] = position of coordinate t in the sorted order of the differences
        for t in range(d1):
            rank[i, t] = 0
        for t in range(d):
            dt = elevated[t] - rem0[i, t]
            for u in range(t + 1, d1):
                if dt < elevated[u] - rem0[i, u]:
                    rank[i, t] += 1
                else:
                    rank[i, u] += 1
        # rounding may leave the point off the plane (sum != 0): move it back
        for t in range(d1):
            rank[i, t] += total
            if rank[i, t] < 0:
                rank[i, t] += d1
                rem0[i, t] += d1
            elif rank[i, t] > d:
                rank[i, t] -= d1
                rem0[i, t] -= d1
        for t in range(d1 + 1):
            b[t] = 0.0
        for t in range(d1):
            v = (elevated[t] - rem0[i, t]) / d1
            b[d - rank[i, t]] += v
            b[d - rank[i, t] + 1] -= v
        b[0] += 1.0 + b[d1]  # wrap around
        for r in range(d1):
            bary[i, r] = b[r]


@njit(cache=True, inline="always")
def _canonical(r, q, d1):
    """Coordinate of rank q of the canonical simplex's vertex r (remainder r): r, or r - (d+1) for the last r ranks."""
    return r if q <= d1 - 1 - r else r - d1


@njit(cache=True, inline="always")
def _slot(code, bits):
    # Fibonacci hashing: the top ``bits`` bits of code * 2^64 / golden ratio
    h = np.uint64(code) * np.uint64(11400714819323198485)
    return np.int64(h >> np.uint64(64 - bits))


@njit(cache=True, inline="always")
def _lookup(code, keys, ids, bits):
    """Vertex id of ``code`` (1..M), or 0 (the empty vertex) when it is not in the table."""
    mask = keys.size - 1
    h = _slot(code, bits)
    while True:
        k = keys[h]
        if k == code:
            return ids[h]
        if k == _EMPTY:
            return 0
        h = (h + 1) & mask


@njit(cache=True, nogil=True)
def _insert_vertices(rem0, rank, lo, stride, keys, ids, bits, offsets, vertex_codes):
    """Give every simplex vertex of every point an id (1..M, first seen first); the number M of vertices.

    A vertex's key is its first d coordinates (the last is minus their sum),
    packed into one int64 ``code`` = sum_t (key_t - lo_t) stride_t.
    """
    N, d1 = rank.shape
    d = d1 - 1
    mask = keys.size - 1
    M = 0
    for i in range(N):
        for r in range(d1):
            code = 0
            for t in range(d):
                code += (rem0[i, t] + _canonical(r, rank[i, t], d1) - lo[t]) * stride[t]
            h = _slot(code, bits)
            while True:
                k = keys[h]
                if k == code:
                    offsets[i, r] = ids[h]
                    break
                if k == _EMPTY:
                    M += 1
                    keys[h] = code
                    ids[h] = M
                    vertex_codes[M] = code
                    offsets[i, r] = M
                    break
                h = (h + 1) & mask
    return M


@njit(cache=True, nogil=True)
def _find_neighbours(vertex_codes, M, step, keys, ids, bits, nbr):
    """nbr[v, j, 0] = the vertex v + D_j, nbr[v, j, 1] = v - D_j (0 where missing); D_j = (d+1) e_j - 1.

    Vertex-major, so that the walks of ``_self_weights`` find all of a
    vertex's neighbours in one or two cache lines.
    """
    d1 = nbr.shape[1]
    for j in range(d1):
        nbr[0, j, 0] = 0
        nbr[0, j, 1] = 0
    for v in range(1, M + 1):
        for j in range(d1):
            nbr[v, j, 0] = _lookup(vertex_codes[v] + step[j], keys, ids, bits)
            nbr[v, j, 1] = _lookup(vertex_codes[v] - step[j], keys, ids, bits)


@njit(cache=True, inline="always")
def _walk(start, target, steps, side, nbr):
    """Weight with which the blur carries a value from vertex ``target`` to ``start``.

    The path takes one tap along each direction j in the bit set ``steps``,
    the tap +D_j (side 0) or -D_j (side 1). The blur runs directions 0..d in
    turn, so the value reaching ``start`` at the end came, walking backwards,
    from start +- D_d, then +- D_(d-1), ...: every point on the way must
    exist (a missing vertex holds nothing). Each tap weighs 1/2.
    """
    x = start
    w = 1.0
    for j in range(nbr.shape[1] - 1, -1, -1):
        if (steps >> j) & 1:
            x = nbr[x, j, side]
            w *= 0.5
            if x == 0:
                return 0.0
    return w if x == target else 0.0


@njit(cache=True, nogil=True)
def _loop_weights(nbr, out):
    """out[v] = B(v, v) - 1: the two blur paths that leave vertex v and come back (+D_j, or -D_j, along every j)."""
    every = (1 << nbr.shape[1]) - 1
    out[0] = 0.0
    for v in range(1, nbr.shape[0]):
        out[v] = _walk(v, v, every, 0, nbr) + _walk(v, v, every, 1, nbr)


@njit(cache=True, inline="always")
def _simplex_paths(i, rank, offsets, nbr, loops, G):
    """G[r, r'] = B(v_r, v_r') for the simplex of point i (vertex ids ``offsets[i]``).

    Vertex r' of a simplex is vertex r plus sum_j k_j D_j with k = -sgn 1_S or
    k = +sgn 1_(not S) (two paths, since sum_j D_j = 0), where S holds the
    coordinates of rank in (d - max(r, r'), d - min(r, r')] and sgn = +1 if
    r' > r else -1; for r' = r the paths are k = 0 (weight 1) and the two
    loops of ``_loop_weights``.
    """
    d1 = rank.shape[1]
    d = d1 - 1
    every = (1 << d1) - 1
    below = np.zeros(d1 + 1, np.int64)  # below[q]: the set of coordinates of rank < q
    for t in range(d1):
        below[rank[i, t] + 1] |= 1 << t
    for q in range(1, d1 + 1):
        below[q] |= below[q - 1]
    for r in range(d1):
        v = offsets[i, r]
        G[r, r] = 1.0 + loops[v]
        for r2 in range(d1):
            if r2 == r:
                continue
            lo = min(r, r2)
            hi = max(r, r2)
            S = below[d - lo + 1] ^ below[d - hi + 1]  # ranks in (d - hi, d - lo]
            up = 1 if r2 > r else 0  # along S: -D_j when r' > r (side 1), +D_j when r' < r (side 0)
            w = offsets[i, r2]
            G[r, r2] = _walk(v, w, S, up, nbr) + _walk(v, w, every ^ S, 1 - up, nbr)


@_parallel_njit()
def _self_weights(rank, offsets, bary, nbr, loops, alpha, out):
    """out[i] = s_i = alpha sum_{r, r'} b_r b_r' B(v_r, v_r'): what point i's own value adds to its slice.

    (Neighbouring pixels share a simplex, and so B, too rarely to pay for
    remembering it: 12% of the points of a 512x512 photo's bilateral lattice.)
    """
    N, d1 = rank.shape
    for i in prange(N):
        G = np.empty((d1, d1))
        _simplex_paths(i, rank, offsets, nbr, loops, G)
        s = 0.0
        for r in range(d1):
            for r2 in range(d1):
                s += bary[i, r] * bary[i, r2] * G[r, r2]
        out[i] = alpha * s


# ----------------------------------------------------------------- filtering
@njit(cache=True, nogil=True)
def _points_by_vertex(offsets, bary, M, start, point, weight):
    """The splat's transpose, for a gather: vertex v receives weight[e] * values[point[e]] for e in start[v]:start[v+1].

    A counting sort of the (point, vertex) pairs by vertex; start (M+2,), point and weight (N (d+1),).
    """
    N, d1 = offsets.shape
    start[:] = 0
    for i in range(N):
        for r in range(d1):
            start[offsets[i, r] + 1] += 1
    for v in range(1, M + 2):
        start[v] += start[v - 1]
    fill = start[:-1].copy()
    for i in range(N):
        for r in range(d1):
            v = offsets[i, r]
            point[fill[v]] = i
            weight[fill[v]] = bary[i, r]
            fill[v] += 1


@_parallel_njit()
def _splat(values, start, point, weight, lat):
    """lat[v] = sum of b * values[i] over the points i that have v as a simplex vertex (b: i's weight for v).

    A gather per vertex (the points sorted by vertex, ``_points_by_vertex``)
    rather than a scatter per point: the vertices are independent tasks, and
    each row of C values is read and written whole.
    """
    M1, C = lat.shape
    for v in prange(M1):
        for c in range(C):
            lat[v, c] = 0.0
        for e in range(start[v], start[v + 1]):
            i = point[e]
            w = weight[e]
            for c in range(C):
                lat[v, c] += w * values[i, c]


@_parallel_njit()
def _blur_direction(src, nbr, j, dst):
    """dst[v] = src[v] + (src[v + D_j] + src[v - D_j]) / 2 for every vertex; row 0 (the empty vertex) stays 0."""
    M1, C = src.shape
    for v in prange(1, M1):
        n1 = nbr[v, j, 0]
        n2 = nbr[v, j, 1]
        for c in range(C):
            dst[v, c] = src[v, c] + 0.5 * (src[n1, c] + src[n2, c])


@_parallel_njit()
def _slice(lat, offsets, bary, alpha, out):
    """out[i] = alpha sum_r b_r lat[o_r]: each point reads its d+1 vertices back."""
    N, C = out.shape
    d1 = offsets.shape[1]
    for i in prange(N):
        for c in range(C):
            out[i, c] = 0.0
        for r in range(d1):
            o = offsets[i, r]
            w = alpha * bary[i, r]
            for c in range(C):
                out[i, c] += w * lat[o, c]


@_parallel_njit()
def _slice_message(lat, offsets, bary, alpha, values, self_weight, inv_norm, weight, out):
    """out[i] += weight (alpha sum_r b_r lat[o_r] - s_i values[i]) / L(1)_i: the slice, the message's
    normalisation and the mean-field sum in one pass."""
    N, C = out.shape
    d1 = offsets.shape[1]
    for i in prange(N):
        scale = weight * inv_norm[i]
        s = scale * self_weight[i]
        for c in range(C):
            out[i, c] -= s * values[i, c]
        for r in range(d1):
            o = offsets[i, r]
            w = scale * alpha * bary[i, r]
            for c in range(C):
                out[i, c] += w * lat[o, c]


# ---------------------------------------------------------------- the lattice
class PermutohedralLattice:
    """The lattice of N feature vectors, built once; ``filter`` then costs O(N (d+1) C) per call.

    Args:
        features: (N, d) float array, each axis already divided by the
            standard deviation of its Gaussian (the kernel is exp(-|f_i - f_j|^2 / 2)).

    Attributes:
        num_vertices: M, the lattice vertices touched by the points (at most N (d+1)).
        norm:         (N,) float64, L(1)_i, the filter of all-ones (> 0 for every point).
        self_weight:  (N,) float64, s_i, the share of L(v)_i that is s_i v_i.
    """

    def __init__(self, features):
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
            raise ValueError(f"features must be an (N, d) array with N, d >= 1, got shape {features.shape}")
        if not np.all(np.isfinite(features)):
            raise ValueError("features must be finite (found NaN or inf)")
        features = np.ascontiguousarray(features, dtype=np.float64)
        N, d = features.shape
        d1 = d + 1
        if N * d1 >= 2**31:
            raise ValueError(f"{N} points of {d} features need {N * d1} simplex corners; the lattice's int32 "
                             "vertex ids hold fewer than 2**31: filter the image in parts")
        self.d = d
        self.num_points = N
        # densecrf's constants: the blur [1/2, 1, 1/2]^(d+1) then matches a unit Gaussian on the features
        inv_std = math.sqrt(2.0 / 3.0) * d1
        scale = np.array([inv_std / math.sqrt((k + 1) * (k + 2)) for k in range(d)])
        rem0 = np.empty((N, d1), np.int64)
        rank = np.empty((N, d1), np.int64)
        bary = np.empty((N, d1), np.float64)
        _embed(features, scale, rem0, rank, bary)

        # pack a vertex key (d ints) into one int64: mixed radix over the range the keys can reach
        # (vertices lie within d+1 of their point's rem0, neighbours and blur paths within 2(d+1) more)
        margin = 3 * d1
        lo = rem0[:, :d].min(axis=0) - margin
        radix = [int(h) - int(l) + 1 for h, l in zip(rem0[:, :d].max(axis=0) + margin, lo)]
        if math.prod(radix) >= 2**62:
            raise ValueError(
                f"the features span too wide a range for the lattice's 64-bit vertex keys "
                f"(key ranges {radix} per axis; their product must stay below 2**62): "
                "use larger standard deviations or fewer feature dimensions"
            )
        stride = np.ones(d, np.int64)
        for t in range(d - 2, -1, -1):
            stride[t] = stride[t + 1] * radix[t + 1]
        # D_j = (d+1) e_j - 1 in full coordinates; on the first d it moves the code by this much
        step = np.full(d1, -int(stride.sum()), np.int64)
        step[:d] += d1 * stride

        bits = max(4, int(math.ceil(math.log2(2 * N * d1))))  # table at most half full
        keys = np.full(1 << bits, _EMPTY, np.int64)
        ids = np.zeros(1 << bits, np.int32)
        offsets = np.empty((N, d1), np.int32)
        vertex_codes = np.empty(N * d1 + 1, np.int64)
        M = int(_insert_vertices(rem0, rank, lo.astype(np.int64), stride, keys, ids, bits, offsets, vertex_codes))
        nbr = np.empty((M + 1, d1, 2), np.int32)
        _find_neighbours(vertex_codes, M, step, keys, ids, bits, nbr)

        self.num_vertices = M
        self.alpha = 1.0 / (1.0 + 2.0**-d)  # densecrf's constant; it cancels wherever norm divides
        self._offsets = offsets
        self._nbr = nbr
        self._start = np.empty(M + 2, np.int64)
        self._point = np.empty(N * d1, np.int32)
        weight = np.empty(N * d1, np.float64)
        _points_by_vertex(offsets, bary, M, self._start, self._point, weight)
        self._weights = {np.dtype(np.float64): (bary, weight)}  # per dtype: the slice's and the splat's
        self._message_weights = {}  # per dtype: (self_weight, 1 / norm)
        loops = np.empty(M + 1, np.float64)
        _loop_weights(nbr, loops)
        self.self_weight = np.empty(N, np.float64)
        _launch(_self_weights, N * d1 * d1 * d1, rank, offsets, bary, nbr, loops, self.alpha, self.self_weight)
        self.norm = self.filter(np.ones((N, 1), np.float64))[:, 0]

    def filter(self, values):
        """L(v): splat, blur along the d+1 directions, slice.

        Shape:
            values (N, C) float32 or float64 -> out (N, C) of the same dtype
            (float32 runs in float32 throughout: half the memory traffic).

        out_i ~= c_i sum_j k(f_i, f_j) v_j, self included (see the module docstring).
        """
        values = self._check(values)
        dtype = values.dtype
        lat = self._splat_blur(values)
        out = np.empty(values.shape, dtype)
        _launch(_slice, out.size, lat, self._offsets, self._weights_of(dtype)[0], dtype.type(self.alpha), out)
        return out

    def message(self, values, weight=1.0, out=None):
        """out += weight * (L(v)_i - s_i v_i) / L(1)_i: the normalised sum over j != i, added to ``out``.

        What ``scratchseg.crf`` needs of the lattice in every mean-field
        iteration, with the slice, the normalisation and the sum fused into
        one pass over the (N, C) values (one instead of five).

        Shape:
            values (N, C) float32 or float64; out (N, C) of its dtype (a new
            array of zeros when None) -> out.
        """
        values = self._check(values)
        dtype = values.dtype
        if out is None:
            out = np.zeros(values.shape, dtype)
        if out.shape != values.shape or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {dtype} array of shape {values.shape}, "
                             f"got {out.dtype} {out.shape}")
        lat = self._splat_blur(values)
        bary = self._weights_of(dtype)[0]
        self_weight, inv_norm = self._message_weights.get(dtype, (None, None))
        if self_weight is None:
            self_weight, inv_norm = self._message_weights[dtype] = (self.self_weight.astype(dtype),
                                                                    (1.0 / self.norm).astype(dtype))
        _launch(_slice_message, out.size, lat, self._offsets, bary, dtype.type(self.alpha), values, self_weight,
                inv_norm, dtype.type(weight), out)
        return out

    def _check(self, values):
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[0] != self.num_points:
            raise ValueError(f"values must be an (N, C) array with N = {self.num_points} points, "
                             f"got shape {values.shape}")
        dtype = values.dtype if values.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        return np.ascontiguousarray(values, dtype=dtype)

    def _weights_of(self, dtype):
        """(barycentric weights (N, d+1), the splat's weights by vertex (N (d+1),)) in ``dtype``."""
        if dtype not in self._weights:
            self._weights[dtype] = tuple(w.astype(dtype) for w in self._weights[np.dtype(np.float64)])
        return self._weights[dtype]

    def _splat_blur(self, values):
        """The lattice's values (M+1, C) after the splat and the d+1 blurs."""
        M1, C = self.num_vertices + 1, values.shape[1]
        lat = np.empty((M1, C), values.dtype)  # the splat writes every row
        tmp = np.zeros((M1, C), values.dtype)  # the blur never writes row 0 (the empty vertex): it stays 0
        _launch(_splat, values.size, values, self._start, self._point, self._weights_of(values.dtype)[1], lat)
        for j in range(self.d + 1):
            _launch(_blur_direction, M1 * C, lat, self._nbr, j, tmp)
            lat, tmp = tmp, lat
        return lat
