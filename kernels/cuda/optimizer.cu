// scratchseg GPU kernels: the SGD update. Launched by optimizer.py.
// A template, compiled by runtime.py once per dtype (all the .cu files of this folder
// in one NVRTC module): T is typedef'd to float or double, and SUFFIX becomes f32 or
// f64 in every kernel name.

extern "C" __global__ void sgd_SUFFIX(
    T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ buf, const long long size,
    const T lr, const T momentum, const T dampening, const T weight_decay,
    const int maximize, const int first, const int nesterov)
{
    // g = grad (negated when maximize) + weight_decay * p
    // buf = g on the first step, else momentum * buf + (1 - dampening) * g   (when momentum != 0)
    // g = g + momentum * buf (nesterov) or buf;  p = p - lr * g
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < size;
         k += (long long)blockDim.x * gridDim.x) {
        T g = maximize ? -grad[k] : grad[k];
        if (weight_decay != (T)0) g = g + weight_decay * p[k];
        if (momentum != (T)0) {
            const T b = first ? g : momentum * buf[k] + ((T)1 - dampening) * g;
            buf[k] = b;
            g = nesterov ? g + momentum * b : b;
        }
        p[k] = p[k] - lr * g;
    }
}
