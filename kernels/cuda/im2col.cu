// scratchseg GPU kernels: unfolding (im2col, and col2im, its adjoint as a gather).
// Launched by im2col.py and conv.py.
// A template, compiled by runtime.py once per dtype (all the .cu files of this folder
// in one NVRTC module): T is typedef'd to float or double, and SUFFIX becomes f32 or
// f64 in every kernel name.

// The unfolding kernels run 32 x 8 thread tiles: threadIdx.x walks along an
// output row (wo, or w for col2im), threadIdx.y picks one of 8 rows (ho, or h).
// blockIdx.x is one row of the result (a (c, i, j) tap row, or an (n, c)
// plane) and blockIdx.y walks the tiles down it (and, for im2col, across the
// samples). Every division happens once per thread and tile, none per
// element: per-element divisions of a flat index, not memory, set the pace.

// Unfold samples n0, n0 + 1, ..., n0 + nb - 1: tap row r = (c, i, j) of sample n starts at
// cols + r*tap_stride + (n - n0)*n_stride, holding x[n, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw]
// (0 outside) at ho*Wo + wo. (tap_stride, n_stride) is (nb*P, P) for the (C*kh*kw, nb*P)
// layout and (P, R*P) for the sample-major (nb, C*kh*kw, P) one.
extern "C" __global__ void im2col_SUFFIX(
    const T* __restrict__ x, T* __restrict__ cols,
    const int C, const int H, const int W,
    const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw,
    const int Ho, const int Wo, const int n0, const int nb,
    const long long tap_stride, const long long n_stride)
{
    const int r = blockIdx.x;                      // tap row (c, i, j)
    const int j = r % kw, i = (r / kw) % kh, c = r / (kh * kw);
    const int tiles = (Ho + blockDim.y - 1) / blockDim.y;  // tiles of output rows per sample
    for (int t = blockIdx.y; t < nb * tiles; t += gridDim.y) {
        const int nn = t / tiles;                  // n - n0
        const int ho = (t - nn * tiles) * blockDim.y + threadIdx.y;
        if (ho >= Ho) continue;
        const int h = ho * sh - ph + i * dh;
        const bool row_inside = h >= 0 && h < H;
        const long long src = (((long long)(n0 + nn) * C + c) * H + h) * W;  // row h of plane (n, c), read only inside
        T* dst = cols + r * tap_stride + nn * n_stride + (long long)ho * Wo;
        for (int wo = threadIdx.x; wo < Wo; wo += blockDim.x) {
            const int w = wo * sw - pw + j * dw;
            dst[wo] = (row_inside && w >= 0 && w < W) ? x[src + w] : (T)0;
        }
    }
}

// The adjoint of the unfolding, as a gather: pixel (h, w) of plane (n, c) sums
// the column entries of every tap (i, j) and output (ho, wo) that read it,
// i.e. ho*sh - ph + i*dh == h and wo*sw - pw + j*dw == w. `tap_stride` is the
// distance between tap rows and `n_stride` between samples, in elements:
// (N*P, P) for the (C*kh*kw, N*P) layout, (P, R*P) for the sample-major one.
extern "C" __global__ void col2im_SUFFIX(
    const T* __restrict__ cols, T* __restrict__ dx,
    const int C, const int H, const int W,
    const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw,
    const int Ho, const int Wo, const int n0,
    const long long tap_stride, const long long n_stride)
{
    const int nn = blockIdx.x / C, c = blockIdx.x - nn * C;  // plane (n - n0, c)
    const T* base = cols + (long long)nn * n_stride + (long long)c * kh * kw * tap_stride;
    T* plane = dx + ((long long)(n0 + nn) * C + c) * H * W;
    const int tiles = (H + blockDim.y - 1) / blockDim.y;
    for (int t = blockIdx.y; t < tiles; t += gridDim.y) {
        const int h = t * blockDim.y + threadIdx.y;
        if (h >= H) continue;
        for (int w = threadIdx.x; w < W; w += blockDim.x) {
            T acc = (T)0;
            for (int i = 0; i < kh; ++i) {
                int ho = h + ph - i * dh;          // = ho * sh for a tap that reads row h
                if (ho < 0) continue;
                if (sh != 1) {
                    if (ho % sh != 0) continue;
                    ho /= sh;
                }
                if (ho >= Ho) continue;
                for (int j = 0; j < kw; ++j) {
                    int wo = w + pw - j * dw;      // = wo * sw
                    if (wo < 0) continue;
                    if (sw != 1) {
                        if (wo % sw != 0) continue;
                        wo /= sw;
                    }
                    if (wo >= Wo) continue;
                    acc += base[(long long)(i * kw + j) * tap_stride + (long long)ho * Wo + wo];
                }
            }
            plane[(long long)h * W + w] = acc;
        }
    }
}
