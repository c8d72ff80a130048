// scratchseg GPU kernels: batch norm in training mode (forward, backward) and the
// running statistics. Launched by normalization.py.
// A template, compiled by runtime.py once per dtype (all the .cu files of this folder
// in one NVRTC module): T is typedef'd to float or double, and SUFFIX becomes f32 or
// f64 in every kernel name.

// One block per channel c of x viewed as (N, C, L): the block sums the
// channel's M = N*L values in float64, then writes the channel's outputs.
// The loops are unrolled so that each thread has several loads in flight.

__device__ double block_sum(double v, double* shared)  // shared: 33 doubles; every thread gets the total
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    __syncthreads();                               // the previous call's readers are done with shared
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? shared[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) shared[32] = v;
    }
    __syncthreads();
    return shared[32];
}

extern "C" __global__ void bn_forward_SUFFIX(
    const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
    T* __restrict__ out, T* __restrict__ xhat, T* __restrict__ mean, T* __restrict__ var,
    T* __restrict__ inv_std, const int N, const int C, const int L, const double eps,
    const int has_gamma, const int has_beta)
{
    // mean = sum x / M; var = sum (x - mean)^2 / M; xhat = (x - mean) / sqrt(var + eps);
    // out = gamma * xhat + beta
    __shared__ double shared[33];
    const int c = blockIdx.x;
    const double M = (double)N * L;
    double s = 0.0;
    for (int n = 0; n < N; ++n) {
        const T* row = x + ((long long)n * C + c) * L;
        #pragma unroll 4
        for (int k = threadIdx.x; k < L; k += blockDim.x) s += (double)row[k];
    }
    const double mu = block_sum(s, shared) / M;
    double ss = 0.0;
    for (int n = 0; n < N; ++n) {
        const T* row = x + ((long long)n * C + c) * L;
        #pragma unroll 4
        for (int k = threadIdx.x; k < L; k += blockDim.x) {
            const double d = (double)row[k] - mu;
            ss += d * d;
        }
    }
    const double v = block_sum(ss, shared) / M;
    const double inv = 1.0 / sqrt(v + eps);
    const T g = has_gamma ? gamma[c] : (T)1, b = has_beta ? beta[c] : (T)0;
    for (int n = 0; n < N; ++n) {
        const long long base = ((long long)n * C + c) * L;
        #pragma unroll 4
        for (int k = threadIdx.x; k < L; k += blockDim.x) {
            const T h = (T)(((double)x[base + k] - mu) * inv);
            xhat[base + k] = h;
            out[base + k] = h * g + b;
        }
    }
    if (threadIdx.x == 0) {
        mean[c] = (T)mu;
        var[c] = (T)v;
        inv_std[c] = (T)inv;
    }
}

extern "C" __global__ void bn_backward_SUFFIX(
    const T* __restrict__ dout, const T* __restrict__ xhat, const T* __restrict__ inv_std,
    const T* __restrict__ gamma, T* __restrict__ dx, T* __restrict__ sum_dout,
    T* __restrict__ sum_dout_xhat, const int N, const int C, const int L,
    const int has_gamma, const int training, const int need_dx)
{
    // sum_dout = sum dout, sum_dout_xhat = sum dout * xhat; with scale = gamma * inv_std:
    // training: dx = scale * (dout - sum_dout / M - xhat * sum_dout_xhat / M); eval: dx = scale * dout
    __shared__ double shared[33];
    const int c = blockIdx.x;
    const double M = (double)N * L;
    double s1 = 0.0, s2 = 0.0;
    for (int n = 0; n < N; ++n) {
        const long long base = ((long long)n * C + c) * L;
        #pragma unroll 4
        for (int k = threadIdx.x; k < L; k += blockDim.x) {
            const double d = (double)dout[base + k];
            s1 += d;
            s2 += d * (double)xhat[base + k];
        }
    }
    s1 = block_sum(s1, shared);
    s2 = block_sum(s2, shared);
    if (threadIdx.x == 0) {
        sum_dout[c] = (T)s1;
        sum_dout_xhat[c] = (T)s2;
    }
    if (!need_dx) return;
    const T scale = has_gamma ? gamma[c] * inv_std[c] : inv_std[c];
    const T a = training ? (T)(s1 / M) : (T)0, b = training ? (T)(s2 / M) : (T)0;
    for (int n = 0; n < N; ++n) {
        const long long base = ((long long)n * C + c) * L;
        #pragma unroll 4
        for (int k = threadIdx.x; k < L; k += blockDim.x)
            dx[base + k] = (dout[base + k] - a - xhat[base + k] * b) * scale;
    }
}

extern "C" __global__ void bn_running_SUFFIX(
    T* __restrict__ running_mean, T* __restrict__ running_var, const T* __restrict__ mean,
    const T* __restrict__ var, const int C, const T momentum, const T unbias,
    const int has_mean, const int has_var)
{
    // running = (1 - momentum) * running + momentum * batch statistic (the variance unbiased)
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += blockDim.x * gridDim.x) {
        if (has_mean) running_mean[c] = running_mean[c] * ((T)1 - momentum) + momentum * mean[c];
        if (has_var) running_var[c] = running_var[c] * ((T)1 - momentum) + momentum * (var[c] * unbias);
    }
}
