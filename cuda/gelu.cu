// GELU, tanh approximation (GPT-2's gelu_new), forward and backward, on fp32 or bf16 storage
// with fp32 arithmetic. Twin of the CPU backend's gelu_forward/gelu_backward.
// Launch: 1-D grid of ceil(n / 256) blocks of 256 threads (any block size that is a multiple of 32).

#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)

template <typename T>
__device__ __forceinline__ void gelu_forward_impl(T* __restrict__ out, const T* __restrict__ inp, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float x = to_f32(inp[i]);
        float u = GELU_SCALE * (x + 0.044715f * x * x * x);
        out[i] = from_f32<T>(0.5f * x * (1.0f + tanhf(u)));
    }
}

template <typename T>
__device__ __forceinline__ void gelu_backward_impl(T* __restrict__ dinp, const T* __restrict__ inp,
                                                   const T* __restrict__ dout, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float x = to_f32(inp[i]);
        float u = GELU_SCALE * (x + 0.044715f * x * x * x);
        float th = tanhf(u);
        float local = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = from_f32<T>(local * to_f32(dout[i]));
    }
}

extern "C" __global__ void gelu_forward_f32(float* out, const float* inp, unsigned long long n) { gelu_forward_impl(out, inp, n); }
EXPORT_KERNEL(gelu_forward_f32);
extern "C" __global__ void gelu_forward_bf16(bf16* out, const bf16* inp, unsigned long long n) { gelu_forward_impl(out, inp, n); }
EXPORT_KERNEL(gelu_forward_bf16);
extern "C" __global__ void gelu_backward_f32(float* dinp, const float* inp, const float* dout, unsigned long long n) {
    gelu_backward_impl(dinp, inp, dout, n);
}
EXPORT_KERNEL(gelu_backward_f32);
extern "C" __global__ void gelu_backward_bf16(bf16* dinp, const bf16* inp, const bf16* dout, unsigned long long n) {
    gelu_backward_impl(dinp, inp, dout, n);
}
EXPORT_KERNEL(gelu_backward_bf16);
