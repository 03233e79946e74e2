// Fused softmax cross-entropy, twin of the CPU backend's crossentropy_forward_backward and
// crossentropy_forward. Dimensions: `rows` rows (B·T flattened), V real vocabulary entries, Vp ≥ V
// the padded row length of the logits (the columns V..Vp are padding and excluded from the softmax).
//
// Memory contract: `losses[rows]` (fp32) are overwritten; in the fused kernel the logits are
// **replaced by dlogits** = dloss·(softmax − onehot(target)), exactly 0 in the padded columns.
// Storage of logits/dlogits is fp32 or bf16 (`_f32` / `_bf16`); arithmetic is fp32.
//
// A target ≥ V is never read: its row's loss is NaN (so the mean loss shows it) and its dlogits are
// dloss·softmax without the one-hot term (finite; the NaN loss is the signal).
//
// Launch: one block per row (grid = rows), XENT_BLOCK = 512 threads (any multiple of 32 up to 1024
// works), no dynamic shared memory. Each row is read twice (fused kernel): pass 1 keeps an online
// (max, Σexp) pair per thread over 16-byte vector loads when the row is 16-byte aligned, merges the
// pairs across the block in a fixed butterfly order; pass 2 writes the gradient. Deterministic:
// the result depends only on the shapes and the block size.

template <typename T>
struct alignas(16) XentPack {
    T v[16 / sizeof(T)];
};

// (m, s) ← the pair describing the union of (m, s) and (m2, s2): max, and the sum of exp(x − max).
// Symmetric in its arguments, so both lanes of a butterfly step get the same bits.
__device__ __forceinline__ void xent_merge(float& m, float& s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;  // both empty (or all −inf): nothing to add
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// Adds the values of `x[0..w)` to the running (m, s).
__device__ __forceinline__ void xent_accumulate(float& m, float& s, const float* x, int w) {
    float pm = x[0];
    for (int k = 1; k < w; ++k) pm = fmaxf(pm, x[k]);
    float mn = fmaxf(m, pm);
    if (mn == -INFINITY) return;
    float acc = 0.0f;
    for (int k = 0; k < w; ++k) acc += expf(x[k] - mn);
    s = s * expf(m - mn) + acc;
    m = mn;
}

// Max and Σexp(x − max) over row[0..V), returned to every thread of the block.
// `sm`, `ss`: 32 floats of shared memory each.
template <typename T>
__device__ __forceinline__ void xent_row_stats(const T* row, unsigned int V, float& m_out, float& s_out, float* sm,
                                               float* ss) {
    constexpr int W = 16 / sizeof(T);
    float m = -INFINITY, s = 0.0f;
    unsigned int vec_end = 0;
    if ((reinterpret_cast<unsigned long long>(row) & 15ull) == 0) {
        unsigned int packs = V / W;
        vec_end = packs * W;
        const XentPack<T>* p = reinterpret_cast<const XentPack<T>*>(row);
        for (unsigned int i = threadIdx.x; i < packs; i += blockDim.x) {
            XentPack<T> pk = p[i];
            float x[W];
            for (int k = 0; k < W; ++k) x[k] = to_f32(pk.v[k]);
            xent_accumulate(m, s, x, W);
        }
    }
    for (unsigned int j = vec_end + threadIdx.x; j < V; j += blockDim.x) {
        float x = to_f32(row[j]);
        xent_accumulate(m, s, &x, 1);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(FULL_MASK, m, o);
        float s2 = __shfl_xor_sync(FULL_MASK, s, o);
        xent_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // the scratch may still be read by an earlier call
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? sm[lane] : -INFINITY;
    s = lane < warps ? ss[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(FULL_MASK, m, o);
        float s2 = __shfl_xor_sync(FULL_MASK, s, o);
        xent_merge(m, s, m2, s2);
    }
    m_out = m;
    s_out = s;
}

// The target's logit, or NaN for a target outside the vocabulary (never read out of bounds).
template <typename T>
__device__ __forceinline__ float xent_target_logit(const T* row, unsigned int tgt, unsigned int V) {
    return tgt < V ? to_f32(row[tgt]) : __int_as_float(0x7fc00000);
}

template <typename T>
__device__ __forceinline__ void xent_fused_impl(T* __restrict__ logits, float* __restrict__ losses,
                                                const unsigned int* __restrict__ targets, float dloss, unsigned int V,
                                                unsigned int Vp, float* sm, float* ss) {
    constexpr int W = 16 / sizeof(T);
    T* row = logits + (unsigned long long)blockIdx.x * Vp;
    unsigned int tgt = targets[blockIdx.x];
    // Read before any thread overwrites the row (pass 2 starts after the barriers of pass 1).
    float x_t = threadIdx.x == 0 ? xent_target_logit(row, tgt, V) : 0.0f;
    float m, s;
    xent_row_stats(row, V, m, s, sm, ss);
    if (threadIdx.x == 0) losses[blockIdx.x] = logf(s) - (x_t - m);
    float k = dloss / s;
    unsigned int vec_end = 0;
    if ((reinterpret_cast<unsigned long long>(row) & 15ull) == 0) {
        unsigned int packs = V / W;
        vec_end = packs * W;
        XentPack<T>* p = reinterpret_cast<XentPack<T>*>(row);
        for (unsigned int i = threadIdx.x; i < packs; i += blockDim.x) {
            XentPack<T> pk = p[i];
            for (int q = 0; q < W; ++q) {
                float g = expf(to_f32(pk.v[q]) - m) * k;
                if (i * W + q == tgt) g -= dloss;
                pk.v[q] = from_f32<T>(g);
            }
            p[i] = pk;
        }
    }
    for (unsigned int j = vec_end + threadIdx.x; j < V; j += blockDim.x) {
        float g = expf(to_f32(row[j]) - m) * k;
        if (j == tgt) g -= dloss;
        row[j] = from_f32<T>(g);
    }
    for (unsigned int j = V + threadIdx.x; j < Vp; j += blockDim.x) row[j] = from_f32<T>(0.0f);
}

template <typename T>
__device__ __forceinline__ void xent_forward_impl(float* __restrict__ losses, const T* __restrict__ logits,
                                                  const unsigned int* __restrict__ targets, unsigned int V,
                                                  unsigned int Vp, float* sm, float* ss) {
    const T* row = logits + (unsigned long long)blockIdx.x * Vp;
    float m, s;
    xent_row_stats(row, V, m, s, sm, ss);
    if (threadIdx.x == 0) losses[blockIdx.x] = logf(s) - (xent_target_logit(row, targets[blockIdx.x], V) - m);
}

extern "C" __global__ void crossentropy_forward_backward_f32(float* logits, float* losses, const unsigned int* targets,
                                                             float dloss, unsigned int V, unsigned int Vp) {
    __shared__ float sm[32], ss[32];
    xent_fused_impl(logits, losses, targets, dloss, V, Vp, sm, ss);
}
EXPORT_KERNEL(crossentropy_forward_backward_f32);
extern "C" __global__ void crossentropy_forward_backward_bf16(bf16* logits, float* losses, const unsigned int* targets,
                                                              float dloss, unsigned int V, unsigned int Vp) {
    __shared__ float sm[32], ss[32];
    xent_fused_impl(logits, losses, targets, dloss, V, Vp, sm, ss);
}
EXPORT_KERNEL(crossentropy_forward_backward_bf16);
extern "C" __global__ void crossentropy_forward_f32(float* losses, const float* logits, const unsigned int* targets,
                                                    unsigned int V, unsigned int Vp) {
    __shared__ float sm[32], ss[32];
    xent_forward_impl(losses, logits, targets, V, Vp, sm, ss);
}
EXPORT_KERNEL(crossentropy_forward_f32);
extern "C" __global__ void crossentropy_forward_bf16(float* losses, const bf16* logits, const unsigned int* targets,
                                                     unsigned int V, unsigned int Vp) {
    __shared__ float sm[32], ss[32];
    xent_forward_impl(losses, logits, targets, V, Vp, sm, ss);
}
EXPORT_KERNEL(crossentropy_forward_bf16);
