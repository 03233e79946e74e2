// Token + position embedding (GPT-2's encoder) forward and deterministic backward, on fp32 or bf16
// storage with fp32 arithmetic. Twins of the CPU backend's encoder_forward / encoder_backward.
//
// Shapes: tokens [B, T] u32; out, dout [B, T, C] of T; wte [V, C] and wpe [≥ T, C] of T; dwte
// [V, C] and dwpe [≥ T, C] fp32 for either T (parameter gradients are always fp32, Megatron's
// rule). N = B·T positions.
//
// Memory contract: forward overwrites out; backward ACCUMULATES into dwte and dwpe (parameter
// gradients), read, added to in fp32 and written as fp32 with no bf16 rounding.
//
// Kernels (every name exists for _f32 and _bf16; `_vec` variants need C a multiple of
// 16 / sizeof(T) and 16-byte aligned pointers, and move 16 bytes per thread per access; a "pack"
// is the P = 1 or 16 / sizeof(T) consecutive channels one thread handles):
// - encoder_forward[_vec]_T(out, tokens, wte, wpe, N, T, C, V): one thread per pack of out, grid
//   ceil(N·C/P / blockDim.x). A token id ≥ V (which the host cannot check without reading the
//   device's tokens) yields a row of NaN instead of an out-of-bounds read.
// - encoder_backward_wpe[_vec]_T(dwpe, dout, B, T, C): one thread per pack of dwpe[0:T] (a pack
//   of dwpe is P fp32 values: one 16-byte access per 4 channels in the _vec variants):
//   dwpe[t] += dout[0, t] + dout[1, t] + … in batch order; grid ceil(T·C/P / blockDim.x).
// - encoder_backward_wte[_vec]_T(dwte, dout, positions, run_tokens, run_starts, C): the token
//   gradient without atomics. The host sorts the positions 0..N stably by token id (so positions
//   of one token stay in increasing order) and splits them into runs of equal token:
//     positions[N]      the sorted positions,
//     run_tokens[U]     the token id of each of the U distinct tokens,
//     run_starts[U + 1] where each run starts in `positions` (run_starts[U] = N).
//   Block (u, y) owns channels [y·blockDim.x·P, (y+1)·blockDim.x·P) of row run_tokens[u]: each
//   thread starts from dwte's current value and adds dout[pos] for the run's positions in
//   increasing order, four rows' loads in flight at a time, then stores once. Every row of dwte is
//   written by exactly one block, and the order of the additions is the order of the positions,
//   as in the CPU backend: in fp32 the result is bitwise the CPU backend's. Grid (U, chunks).


// Loads and stores of a pack of P fp32 gradient values: scalar, or P / 4 16-byte accesses.
template <int P, bool VEC> struct emb_grad_io {
    static __device__ __forceinline__ void load(float* f, const float* p) {
        if constexpr (VEC) {
            for (int k = 0; k < P; k += 4) vec_io<float, true>::load(f + k, p + k);
        } else {
            for (int k = 0; k < P; ++k) f[k] = p[k];
        }
    }
    static __device__ __forceinline__ void store(float* p, const float* f) {
        if constexpr (VEC) {
            for (int k = 0; k < P; k += 4) vec_io<float, true>::store(p + k, f + k);
        } else {
            for (int k = 0; k < P; ++k) p[k] = f[k];
        }
    }
};

template <typename T, bool VEC>
__device__ __forceinline__ void emb_forward_impl(T* __restrict__ out, const unsigned int* __restrict__ tokens,
                                                 const T* __restrict__ wte, const T* __restrict__ wpe,
                                                 unsigned int n, unsigned int seq, unsigned int C, unsigned int V) {
    typedef vec_io<T, VEC> io;
    const int P = io::P;
    const unsigned int packs = C / P;
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned long long)n * packs) return;
    const unsigned long long row = i / packs;
    const unsigned int j = (unsigned int)(i % packs) * P;
    const unsigned int tok = tokens[row], t = (unsigned int)(row % seq);
    float e[P];
    if (tok < V) {
        float p[P];
        io::load(e, wte + (unsigned long long)tok * C + j);
        io::load(p, wpe + (unsigned long long)t * C + j);
        for (int k = 0; k < P; ++k) e[k] += p[k];
    } else {
        for (int k = 0; k < P; ++k) e[k] = __int_as_float(0x7fc00000);  // quiet NaN
    }
    io::store(out + row * C + j, e);
}

template <typename T, bool VEC>
__device__ __forceinline__ void emb_backward_wpe_impl(float* __restrict__ dwpe, const T* __restrict__ dout,
                                                      unsigned int batch, unsigned int seq, unsigned int C) {
    typedef vec_io<T, VEC> io;
    const int P = io::P;
    typedef emb_grad_io<io::P, VEC> gio;
    const unsigned int packs = C / P;
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned long long)seq * packs) return;
    const unsigned long long t = i / packs;
    const unsigned int j = (unsigned int)(i % packs) * P;
    float acc[P];
    gio::load(acc, dwpe + t * C + j);
    for (unsigned int b = 0; b < batch; ++b) {
        float g[P];
        io::load(g, dout + ((unsigned long long)b * seq + t) * C + j);
        for (int k = 0; k < P; ++k) acc[k] += g[k];
    }
    gio::store(dwpe + t * C + j, acc);
}

template <typename T, bool VEC>
__device__ __forceinline__ void emb_backward_wte_impl(float* __restrict__ dwte, const T* __restrict__ dout,
                                                      const unsigned int* __restrict__ positions,
                                                      const unsigned int* __restrict__ run_tokens,
                                                      const unsigned int* __restrict__ run_starts, unsigned int C) {
    typedef vec_io<T, VEC> io;
    const int P = io::P;
    typedef emb_grad_io<io::P, VEC> gio;
    const unsigned int j = (blockIdx.y * blockDim.x + threadIdx.x) * P;
    if (j >= C) return;
    const unsigned int u = blockIdx.x;
    const unsigned int start = run_starts[u], end = run_starts[u + 1];
    float* dst = dwte + (unsigned long long)run_tokens[u] * C + j;
    float acc[P];
    gio::load(acc, dst);
    unsigned int i = start;
    // Four rows at a time: their loads overlap, the additions keep position order.
    for (; i + 4 <= end; i += 4) {
        float g[4][P];
        for (int q = 0; q < 4; ++q) io::load(g[q], dout + (unsigned long long)positions[i + q] * C + j);
        for (int q = 0; q < 4; ++q)
            for (int k = 0; k < P; ++k) acc[k] += g[q][k];
    }
    for (; i < end; ++i) {
        float g[P];
        io::load(g, dout + (unsigned long long)positions[i] * C + j);
        for (int k = 0; k < P; ++k) acc[k] += g[k];
    }
    gio::store(dst, acc);
}

#define EMB_KERNELS(T, SUF, VEC)                                                                                   \
    extern "C" __global__ void encoder_forward_##SUF(T* out, const unsigned int* tokens, const T* wte,           \
                                                     const T* wpe, unsigned int n, unsigned int seq,             \
                                                     unsigned int C, unsigned int V) {                           \
        emb_forward_impl<T, VEC>(out, tokens, wte, wpe, n, seq, C, V);                                           \
    }                                                                                                            \
    EXPORT_KERNEL(encoder_forward_##SUF);                                                                        \
    extern "C" __global__ void encoder_backward_wpe_##SUF(float* dwpe, const T* dout, unsigned int batch,       \
                                                          unsigned int seq, unsigned int C) {                    \
        emb_backward_wpe_impl<T, VEC>(dwpe, dout, batch, seq, C);                                                \
    }                                                                                                            \
    EXPORT_KERNEL(encoder_backward_wpe_##SUF);                                                                   \
    extern "C" __global__ void encoder_backward_wte_##SUF(float* dwte, const T* dout,                            \
                                                          const unsigned int* positions,                         \
                                                          const unsigned int* run_tokens,                        \
                                                          const unsigned int* run_starts, unsigned int C) {      \
        emb_backward_wte_impl<T, VEC>(dwte, dout, positions, run_tokens, run_starts, C);                         \
    }                                                                                                            \
    EXPORT_KERNEL(encoder_backward_wte_##SUF);

EMB_KERNELS(float, f32, false)
EMB_KERNELS(bf16, bf16, false)
EMB_KERNELS(float, vec_f32, true)
EMB_KERNELS(bf16, vec_bf16, true)
