// scratchseg GPU kernels: max pooling forward (max and winning tap) and backward
// (a gather). Launched by pooling.py.
// A template, compiled by runtime.py once per dtype (all the .cu files of this folder
// in one NVRTC module): T is typedef'd to float or double, and SUFFIX becomes f32 or
// f64 in every kernel name.

extern "C" __global__ void max_pool_forward_SUFFIX(
    const T* __restrict__ x, T* __restrict__ best, int* __restrict__ arg,
    const int H, const int W, const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw, const int Ho, const int Wo,
    const T neg_inf)
{
    // best = max over the window (taps outside the input are -inf); arg = i*kw + j of the
    // first maximum, or of the last NaN (a NaN propagates), as the reference's running max
    const T* plane = x + (long long)blockIdx.x * H * W;          // plane (n, c)
    const long long out_base = (long long)blockIdx.x * Ho * Wo;
    for (int p = blockIdx.y * blockDim.x + threadIdx.x; p < Ho * Wo; p += gridDim.y * blockDim.x) {
        const int ho = p / Wo, wo = p - ho * Wo;
        T m = neg_inf;
        int a = 0;
        for (int i = 0; i < kh; ++i) {
            const int h = ho * sh - ph + i * dh;
            for (int j = 0; j < kw; ++j) {
                const int w = wo * sw - pw + j * dw;
                const T v = (h >= 0 && h < H && w >= 0 && w < W) ? plane[h * W + w] : neg_inf;
                const int tap = i * kw + j;
                if (tap == 0 || v != v || v > m) {  // strictly greater: ties keep the first max
                    m = v;
                    a = tap;
                }
            }
        }
        best[out_base + p] = m;
        arg[out_base + p] = a;
    }
}

extern "C" __global__ void max_pool_backward_SUFFIX(
    const T* __restrict__ dout, const int* __restrict__ arg, T* __restrict__ dx,
    const int H, const int W, const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw, const int Ho, const int Wo)
{
    // dx[h, w] = sum of dout over the windows whose winning tap (i, j) lies on (h, w)
    const long long out_base = (long long)blockIdx.x * Ho * Wo;
    T* plane = dx + (long long)blockIdx.x * H * W;
    for (int pix = blockIdx.y * blockDim.x + threadIdx.x; pix < H * W; pix += gridDim.y * blockDim.x) {
        const int h = pix / W, w = pix - h * W;
        T acc = (T)0;
        for (int i = 0; i < kh; ++i) {
            const int hs = h + ph - i * dh;
            if (hs < 0 || hs % sh != 0) continue;
            const int ho = hs / sh;
            if (ho >= Ho) continue;
            for (int j = 0; j < kw; ++j) {
                const int ws = w + pw - j * dw;
                if (ws < 0 || ws % sw != 0) continue;
                const int wo = ws / sw;
                if (wo >= Wo) continue;
                const long long o = out_base + ho * Wo + wo;
                if (arg[o] == i * kw + j) acc += dout[o];
            }
        }
        plane[pix] = acc;
    }
}
