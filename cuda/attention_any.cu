// Causal multi-head self-attention for ANY head size 1..=256: the simple fallback that
// src/gpu/ops/attention.rs launches when the head size has no tiled kernel (cuda/attention.cu:
// 32, 64, 128; cuda/attention_tc.cu: 64, 128). Correct and deterministic, not fast.
//
// Same layouts and semantics as cuda/attention.cu: qkv[B,T,3C] is Q | K | V with heads contiguous
// inside each; out[B,T,C]; lse[B,NH,T] (fp32) the natural-log log-sum-exp of each causal softmax
// row; dsum[B,NH,T] (fp32) D_t = Σ_d dO·O, written by attention_backward_dsum_{f32,bf16} of
// cuda/attention.cu (which works for any HS). qkv/out/dout/dqkv are fp32 or bf16 storage; all
// arithmetic is fp32; scale 1/sqrt(HS). Forward overwrites out and lse; backward overwrites dqkv
// (all three parts, every row). dqkv must not alias qkv, dout or out.
//
// One thread per row, the HS-long vectors in per-thread arrays of ATTN_ANY_MAX_HS floats (local
// memory) with the runtime HS as the loop bound:
//   forward    one thread per (b, h, query t): online softmax over keys j = 0..t;
//   dq         one thread per (b, h, query i): over keys j = 0..i, P = exp(S − lse),
//              dS = P (dP − D), dQ += scale·dS K;
//   dkv        one thread per (b, h, key j): over queries i = j..T−1, dV += P dO, dK += scale·dS Q.
// Every output element is summed by one thread in increasing key (query) order: no atomics, no
// shared memory, no barriers, bitwise deterministic. Scores are in the log2 domain (Q times
// scale·log2 e, computed the same way in all three kernels, exp2f), lse in natural-log units.
//
// Launch geometry (mirrored by src/gpu/ops/attention.rs): grid (B·NH, ceil(T / 128), 1), 128
// threads, no dynamic shared memory; block y covers rows 128·y .. 128·y + 127 of one (b, h). The
// threads of a warp walk the same keys (forward, dq) or queries (dkv) in step, so their K/V (Q/dO)
// reads are broadcasts of one row, coalesced along the head dimension across iterations.

#define ATTN_ANY_MAX_HS 256
#define ATTN_ANY_THREADS 128
#define ATTN_ANY_LOG2E 1.4426950408889634f
#define ATTN_ANY_LN2 0.6931471805599453f

template <typename T>
__device__ __forceinline__ void attention_any_forward_impl(T* __restrict__ out, float* __restrict__ lse,
                                                           const T* __restrict__ qkv, int T_len, int NH, int HS) {
    const int b = blockIdx.x / NH, h = blockIdx.x % NH;
    const int t = blockIdx.y * ATTN_ANY_THREADS + threadIdx.x;
    if (t >= T_len) return;
    const int C = NH * HS;
    const long long stride = 3LL * C;
    const T* base = qkv + (long long)b * T_len * stride + (long long)h * HS;
    const float qmul = ATTN_ANY_LOG2E / sqrtf((float)HS);
    float q[ATTN_ANY_MAX_HS], o[ATTN_ANY_MAX_HS];
    for (int d = 0; d < HS; ++d) {
        q[d] = to_f32(base[(long long)t * stride + d]) * qmul;
        o[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j <= t; ++j) {
        const T* k = base + (long long)j * stride + C;
        const T* v = k + C;
        float s = 0.0f;
        for (int d = 0; d < HS; ++d) s += q[d] * to_f32(k[d]);
        const float m_new = fmaxf(m, s);
        const float alpha = exp2f(m - m_new);  // 0 for the first key (m = -inf)
        const float p = exp2f(s - m_new);
        m = m_new;
        l = l * alpha + p;
        for (int d = 0; d < HS; ++d) o[d] = o[d] * alpha + p * to_f32(v[d]);
    }
    const float inv = 1.0f / l;
    T* dst = out + ((long long)b * T_len + t) * C + (long long)h * HS;
    for (int d = 0; d < HS; ++d) dst[d] = from_f32<T>(o[d] * inv);
    lse[((long long)b * NH + h) * T_len + t] = m * ATTN_ANY_LN2 + logf(l);
}

template <typename T>
__device__ __forceinline__ void attention_any_backward_dq_impl(T* __restrict__ dqkv, const T* __restrict__ dout,
                                                               const T* __restrict__ qkv,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ dsum, int T_len, int NH,
                                                               int HS) {
    const int b = blockIdx.x / NH, h = blockIdx.x % NH;
    const int i = blockIdx.y * ATTN_ANY_THREADS + threadIdx.x;
    if (i >= T_len) return;
    const int C = NH * HS;
    const long long stride = 3LL * C;
    const T* base = qkv + (long long)b * T_len * stride + (long long)h * HS;
    const T* g = dout + ((long long)b * T_len + i) * C + (long long)h * HS;
    const long long row = ((long long)b * NH + h) * T_len + i;
    const float lse2 = lse[row] * ATTN_ANY_LOG2E, D = dsum[row];
    const float qmul = ATTN_ANY_LOG2E / sqrtf((float)HS);
    float q[ATTN_ANY_MAX_HS], go[ATTN_ANY_MAX_HS], dq[ATTN_ANY_MAX_HS];
    for (int d = 0; d < HS; ++d) {
        q[d] = to_f32(base[(long long)i * stride + d]) * qmul;
        go[d] = to_f32(g[d]);
        dq[d] = 0.0f;
    }
    for (int j = 0; j <= i; ++j) {
        const T* k = base + (long long)j * stride + C;
        const T* v = k + C;
        float s = 0.0f, dp = 0.0f;
        for (int d = 0; d < HS; ++d) {
            s += q[d] * to_f32(k[d]);
            dp += go[d] * to_f32(v[d]);
        }
        const float ds = exp2f(s - lse2) * (dp - D);
        for (int d = 0; d < HS; ++d) dq[d] += ds * to_f32(k[d]);
    }
    const float scale = 1.0f / sqrtf((float)HS);
    T* dst = dqkv + ((long long)b * T_len + i) * stride + (long long)h * HS;
    for (int d = 0; d < HS; ++d) dst[d] = from_f32<T>(dq[d] * scale);
}

template <typename T>
__device__ __forceinline__ void attention_any_backward_dkv_impl(T* __restrict__ dqkv, const T* __restrict__ dout,
                                                                const T* __restrict__ qkv,
                                                                const float* __restrict__ lse,
                                                                const float* __restrict__ dsum, int T_len, int NH,
                                                                int HS) {
    const int b = blockIdx.x / NH, h = blockIdx.x % NH;
    const int j0 = blockIdx.y * ATTN_ANY_THREADS;  // the block's first key
    const int j = j0 + threadIdx.x;
    if (j >= T_len) return;
    const int C = NH * HS;
    const long long stride = 3LL * C;
    const T* base = qkv + (long long)b * T_len * stride + (long long)h * HS;
    const T* gbase = dout + (long long)b * T_len * C + (long long)h * HS;
    const long long row0 = ((long long)b * NH + h) * T_len;
    const float qmul = ATTN_ANY_LOG2E / sqrtf((float)HS);
    float k[ATTN_ANY_MAX_HS], v[ATTN_ANY_MAX_HS], dk[ATTN_ANY_MAX_HS], dv[ATTN_ANY_MAX_HS];
    for (int d = 0; d < HS; ++d) {
        k[d] = to_f32(base[(long long)j * stride + C + d]);
        v[d] = to_f32(base[(long long)j * stride + 2 * C + d]);
        dk[d] = dv[d] = 0.0f;
    }
    // Every thread of the block walks the same queries from the block's first key, so that a
    // warp reads one Q and dO row at a time; queries before the thread's own key are skipped.
    for (int i = j0; i < T_len; ++i) {
        if (i < j) continue;
        const T* q = base + (long long)i * stride;
        const T* g = gbase + (long long)i * C;
        float s = 0.0f, dp = 0.0f;
        for (int d = 0; d < HS; ++d) {
            s += (to_f32(q[d]) * qmul) * k[d];  // the same products as forward and dq
            dp += to_f32(g[d]) * v[d];
        }
        const float p = exp2f(s - lse[row0 + i] * ATTN_ANY_LOG2E);
        const float ds = p * (dp - dsum[row0 + i]);
        for (int d = 0; d < HS; ++d) {
            dv[d] += p * to_f32(g[d]);
            dk[d] += ds * to_f32(q[d]);
        }
    }
    const float scale = 1.0f / sqrtf((float)HS);
    T* dst = dqkv + ((long long)b * T_len + j) * stride + (long long)h * HS;
    for (int d = 0; d < HS; ++d) {
        dst[C + d] = from_f32<T>(dk[d] * scale);
        dst[2 * C + d] = from_f32<T>(dv[d]);
    }
}

#define ATTN_ANY_KERNELS(TN, T)                                                                                \
    extern "C" __global__ void __launch_bounds__(ATTN_ANY_THREADS)                                             \
        attention_any_forward_##TN(T* out, float* lse, const T* qkv, int T_len, int NH, int HS) {              \
        attention_any_forward_impl<T>(out, lse, qkv, T_len, NH, HS);                                           \
    }                                                                                                          \
    EXPORT_KERNEL(attention_any_forward_##TN);                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_ANY_THREADS) attention_any_backward_dq_##TN(             \
        T* dqkv, const T* dout, const T* qkv, const float* lse, const float* dsum, int T_len, int NH, int HS) { \
        attention_any_backward_dq_impl<T>(dqkv, dout, qkv, lse, dsum, T_len, NH, HS);                          \
    }                                                                                                          \
    EXPORT_KERNEL(attention_any_backward_dq_##TN);                                                             \
    extern "C" __global__ void __launch_bounds__(ATTN_ANY_THREADS) attention_any_backward_dkv_##TN(            \
        T* dqkv, const T* dout, const T* qkv, const float* lse, const float* dsum, int T_len, int NH, int HS) { \
        attention_any_backward_dkv_impl<T>(dqkv, dout, qkv, lse, dsum, T_len, NH, HS);                         \
    }                                                                                                          \
    EXPORT_KERNEL(attention_any_backward_dkv_##TN);

ATTN_ANY_KERNELS(f32, float)
ATTN_ANY_KERNELS(bf16, bf16)
