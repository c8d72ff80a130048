// scratchseg GPU kernels: the ReLU gradient. Launched by activation.py.
// A template, compiled by runtime.py once per dtype (all the .cu files of this folder
// in one NVRTC module): T is typedef'd to float or double, and SUFFIX becomes f32 or
// f64 in every kernel name.

extern "C" __global__ void relu_backward_SUFFIX(
    const T* __restrict__ dout, const T* __restrict__ out, T* __restrict__ dx, const long long size)
{
    // dx = dout where out > 0, else 0
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < size;
         k += (long long)blockDim.x * gridDim.x)
        dx[k] = out[k] > (T)0 ? dout[k] : (T)0;
}
