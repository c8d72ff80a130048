// scratchseg GPU kernels: cross entropy (softmax, loss and target weights; the
// gradient). Launched by loss.py.
// A template, compiled by runtime.py once per dtype (all the .cu files of this folder
// in one NVRTC module): T is typedef'd to float or double, and SUFFIX becomes f32 or
// f64 in every kernel name.

// Scores x (N, C, S), one block row per sample n, threads along the S positions:
// each thread takes one position through all C classes (reads along s coalesce).
extern "C" __global__ void ce_forward_SUFFIX(
    const T* __restrict__ x, const long long* __restrict__ target, const T* __restrict__ weight,
    T* __restrict__ p, T* __restrict__ loss, T* __restrict__ w_t,
    const int C, const int S, const long long ignore_index, const int has_weight)
{
    // z = x - max_c x; p = exp(z) / sum_c exp(z); t' = t, or class 0 where t is ignored;
    // w_t = weight[t] (1 without weights), 0 where ignored; loss = w_t * (log sum_c exp(z) - z[t'])
    const long long sample = (long long)blockIdx.x * C * S;
    for (int s = blockIdx.y * blockDim.x + threadIdx.x; s < S; s += gridDim.y * blockDim.x) {
        const T* xs = x + sample + s;
        T* ps = p + sample + s;
        T m = xs[0];
        for (int c = 1; c < C; ++c) m = xs[(long long)c * S] > m ? xs[(long long)c * S] : m;
        T total = (T)0;
        for (int c = 0; c < C; ++c) total += exp(xs[(long long)c * S] - m);
        for (int c = 0; c < C; ++c) ps[(long long)c * S] = exp(xs[(long long)c * S] - m) / total;
        const long long position = (long long)blockIdx.x * S + s;
        const long long t = target[position];
        const int valid = t != ignore_index;
        const int tc = valid ? (int)t : 0;
        const T wt = valid ? (has_weight ? weight[tc] : (T)1) : (T)0;
        loss[position] = wt * (log(total) - (xs[(long long)tc * S] - m));
        w_t[position] = wt;
    }
}

extern "C" __global__ void ce_backward_SUFFIX(
    const T* __restrict__ p, const long long* __restrict__ target, const T* __restrict__ w_t,
    const T* __restrict__ g, T* __restrict__ dx, const int C, const int S,
    const long long ignore_index, const int g_per_position)
{
    // with on = w_t * g (g: this position's upstream gradient, or one for all):
    // dx_c = p_c * on - [c == t'] * on
    const long long sample = (long long)blockIdx.x * C * S;
    for (int s = blockIdx.y * blockDim.x + threadIdx.x; s < S; s += gridDim.y * blockDim.x) {
        const long long position = (long long)blockIdx.x * S + s;
        const T on = w_t[position] * g[g_per_position ? position : 0];
        const long long t = target[position];
        const int tc = t != ignore_index ? (int)t : 0;
        for (int c = 0; c < C; ++c) {
            const long long k = sample + (long long)c * S + s;
            dx[k] = p[k] * on - (c == tc ? on : (T)0);
        }
    }
}
