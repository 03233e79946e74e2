// Causal multi-head self-attention, flash-attention style, on CUDA cores (no tensor-core
// intrinsics). GPU twins of the CPU backend's attention_forward / attention_backward
// (src/kernels/cpu/attention.rs); host launchers in src/gpu/ops/attention.rs.
//
// Dimensions: B batch, T sequence, C = NH·HS channels, NH heads, HS head size (32, 64 or 128).
// qkv[B,T,3C] is Q | K | V with heads contiguous inside each; out[B,T,C]; lse[B,NH,T] (always fp32)
// is the log-sum-exp of each softmax row; dsum[B,NH,T] (fp32 scratch) is D_t = Σ_d dO·O.
// qkv/out/dout/dqkv are fp32 or bf16 storage; all arithmetic is fp32. Scale 1/sqrt(HS).
//
// Memory contract: forward overwrites out and lse; backward overwrites dqkv (all three parts, every
// row) and dsum. dqkv must not alias qkv, dout or out. No T×T matrix exists in device memory.
//
//   forward, per block of BQ query rows:  for each key tile (BK rows) up to the diagonal:
//     S = scale·Q Kᵀ (masked j > i), running max m and sum l, O = O·e^(m_old−m) + P V;
//     out = O / l, lse = m + ln l.
//   backward:  (1) dsum:  D_i = Σ_d dO_i·O_i, one warp per (b, t, h) row;
//     (2) dkv, per block of BK key rows, looping over the query tiles at or below the diagonal:
//         P = exp(S − lse), dP = dO Vᵀ, dS = P ∘ (dP − D); dV += Pᵀ dO; dK += scale·dSᵀ Q;
//     (3) dq, per block of BQ query rows, looping over the key tiles up to the diagonal:
//         the same P and dS, dQ += scale·dS K.
//   Every output element is summed by one thread in an order fixed by the shapes and the tile
//   sizes: no atomics, bitwise deterministic. Fully masked tiles are never visited.
//
// Scores are kept in the log2 domain (Q is multiplied by scale·log2 e as it is loaded, exp2f
// throughout); lse is stored in natural-log units.
//
// Launch geometry (mirrored by src/gpu/ops/attention.rs; keep both in step):
//   grid (B·NH, tiles along T, 1) — the tile index runs heaviest first (the diagonal tiles of the
//   last query rows in forward and dq, key tile 0 in dkv), so the long blocks start in the first
//   wave; block 16·TY threads: thread (ty, tx) = (threadIdx.x / 16, threadIdx.x % 16) owns rows
//   ty + TY·a of the tile and columns tx + 16·c.
//     kernel      HS   tile rows       TY  threads  dynamic shared memory (floats ×4 bytes)
//     forward     32   BQ 64, BK 64    16  256      (BQ+2BK)·HS + BQ·BK        = 40 KiB
//     forward     64   BQ 64, BK 64    16  256      (BQ+2BK)·HS (P reuses K)   = 48 KiB
//     forward    128   BQ 32, BK 32     8  128      (BQ+2BK)·HS (P reuses K)   = 48 KiB
//     dkv         32   BK 64, BQ 32    16  256      (2BK+2BQ)·HS + 2BK·BQ + 2BQ = 40.25 KiB
//     dkv         64   BK 32, BQ 32     8  128      same formula               = 40.25 KiB
//     dkv        128   BK 16, BQ 16     8  128      same formula               = 34.125 KiB
//     dq          32   BQ 64, BK 64    16  256      (2BQ+2BK)·HS + BQ·BK       = 48 KiB
//     dq          64   BQ 64, BK 32    16  256      (2BQ+2BK)·HS (dS reuses V) = 48 KiB
//     dq         128   BQ 32, BK 16     8  128      (2BQ+2BK)·HS (dS reuses V) = 48 KiB
//     dsum        any  grid (ceil(B·T·NH / 8), 1, 1), 256 threads, no shared memory.
//   Every block stays within 48 KiB of dynamic shared memory, so no launch needs
//   cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES). The price is small tiles at HS = 128,
//   mostly in backward (16×16 in dkv): correct but well below what 64×64 tiles would reach.
//
// Shared tiles hold fp32 values, row-major with a XOR swizzle (column c of row r lives at
// r·W + (c ^ (r mod 32))), so that the column reads of 16 different rows by one half-warp and the
// row writes of the loaders hit 16 or 32 different banks without padding. Global loads are
// scalar and coalesced along the head dimension; vectorised (16-byte) loads and cp.async double
// buffering are the next steps if these kernels show up in profiles.

#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

// Tile sizes (see the table above).
template <int HS> struct AttnFwdTiles;
template <> struct AttnFwdTiles<32> { static constexpr int BQ = 64, BK = 64, TY = 16; };
template <> struct AttnFwdTiles<64> { static constexpr int BQ = 64, BK = 64, TY = 16; };
template <> struct AttnFwdTiles<128> { static constexpr int BQ = 32, BK = 32, TY = 8; };
template <int HS> struct AttnDkvTiles;
template <> struct AttnDkvTiles<32> { static constexpr int BK = 64, BQ = 32, TY = 16; };
template <> struct AttnDkvTiles<64> { static constexpr int BK = 32, BQ = 32, TY = 8; };
template <> struct AttnDkvTiles<128> { static constexpr int BK = 16, BQ = 16, TY = 8; };
template <int HS> struct AttnDqTiles;
template <> struct AttnDqTiles<32> { static constexpr int BQ = 64, BK = 64, TY = 16; };
template <> struct AttnDqTiles<64> { static constexpr int BQ = 64, BK = 32, TY = 16; };
template <> struct AttnDqTiles<128> { static constexpr int BQ = 32, BK = 16, TY = 8; };

// Index of (row r, column c) in a swizzled tile of width W (a power of two, at least 16).
template <int W>
__device__ __forceinline__ int attn_swz(int r, int c) {
    static_assert(W >= 16 && (W & (W - 1)) == 0, "tile widths are powers of two, at least 16");
    return r * W + (c ^ (r & ((W < 32 ? W : 32) - 1)));
}

// Loads rows [row0, row0 + ROWS) of a head's HS columns (element (t, d) at src[t·stride + d])
// into a swizzled fp32 tile, multiplied by `mul`; rows at or past T read as 0.
template <typename T, int HS, int ROWS, int NT>
__device__ __forceinline__ void attn_load_tile(float* dst, const T* __restrict__ src, long long stride, int row0,
                                               int T_len, float mul) {
    for (int idx = threadIdx.x; idx < ROWS * HS; idx += NT) {
        int r = idx / HS, d = idx % HS, t = row0 + r;
        float v = t < T_len ? to_f32(src[(long long)t * stride + d]) * mul : 0.0f;
        dst[attn_swz<HS>(r, d)] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename T, int HS>
__device__ __forceinline__ void attention_forward_impl(T* __restrict__ out, float* __restrict__ lse,
                                                       const T* __restrict__ qkv, int T_len, int NH) {
    constexpr int BQ = AttnFwdTiles<HS>::BQ, BK = AttnFwdTiles<HS>::BK, TY = AttnFwdTiles<HS>::TY;
    constexpr int NT = 16 * TY, RQ = BQ / TY, CK = BK / 16, CO = HS / 16;
    constexpr bool P_IN_K = BQ <= HS;  // P (BQ×BK) fits where K was once the scores are done
    DYN_SMEM(float, smem);
    float* Qs = smem;         // [BQ][HS], scaled by scale·log2 e
    float* Ks = Qs + BQ * HS;  // [BK][HS]
    float* Vs = Ks + BK * HS;  // [BK][HS]
    float* Ps = P_IN_K ? Ks : Vs + BK * HS;  // [BQ][BK]
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int b = blockIdx.x / NH, h = blockIdx.x % NH;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;
    const int C = NH * HS;
    const long long stride = 3LL * C;
    const T* base = qkv + (long long)b * T_len * stride + (long long)h * HS;

    attn_load_tile<T, HS, BQ, NT>(Qs, base, stride, q0, T_len, ATTN_LOG2E / sqrtf((float)HS));
    float o[RQ][CO], m[RQ], l[RQ];
#pragma unroll
    for (int a = 0; a < RQ; ++a) {
        m[a] = -INFINITY;
        l[a] = 0.0f;  // this thread's columns only; the row's lanes are summed at the end
#pragma unroll
        for (int c = 0; c < CO; ++c) o[a][c] = 0.0f;
    }
    const int key_tiles = (min(q0 + BQ, T_len) - 1) / BK + 1;  // up to the diagonal
    for (int kt = 0; kt < key_tiles; ++kt) {
        const int k0 = kt * BK;
        __syncthreads();  // the previous tile's readers of K, V and P are done
        attn_load_tile<T, HS, BK, NT>(Ks, base + C, stride, k0, T_len, 1.0f);
        attn_load_tile<T, HS, BK, NT>(Vs, base + 2 * C, stride, k0, T_len, 1.0f);
        __syncthreads();
        float s[RQ][CK];
#pragma unroll
        for (int a = 0; a < RQ; ++a)
#pragma unroll
            for (int j = 0; j < CK; ++j) s[a][j] = 0.0f;
#pragma unroll 8
        for (int d = 0; d < HS; ++d) {
            float qv[RQ], kv[CK];
#pragma unroll
            for (int a = 0; a < RQ; ++a) qv[a] = Qs[attn_swz<HS>(ty + TY * a, d)];
#pragma unroll
            for (int j = 0; j < CK; ++j) kv[j] = Ks[attn_swz<HS>(tx + 16 * j, d)];
#pragma unroll
            for (int a = 0; a < RQ; ++a)
#pragma unroll
                for (int j = 0; j < CK; ++j) s[a][j] += qv[a] * kv[j];
        }
        if (k0 + BK - 1 > q0 || k0 + BK > T_len) {  // the diagonal tile or the tail of T
#pragma unroll
            for (int a = 0; a < RQ; ++a)
#pragma unroll
                for (int j = 0; j < CK; ++j) {
                    int key = k0 + tx + 16 * j;
                    if (key > q0 + ty + TY * a || key >= T_len) s[a][j] = -INFINITY;
                }
        }
        if (P_IN_K) __syncthreads();  // everyone has read K before P overwrites it
#pragma unroll
        for (int a = 0; a < RQ; ++a) {
            float mt = s[a][0];
#pragma unroll
            for (int j = 1; j < CK; ++j) mt = fmaxf(mt, s[a][j]);
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(FULL_MASK, mt, off));
            const float m_new = fmaxf(m[a], mt);
            // A row with no visible key yet keeps m = -inf; key 0 is visible to every row, so
            // this only guards the arithmetic (-inf - -inf).
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;
            const float alpha = exp2f(m[a] - m_use);
            m[a] = m_new;
            l[a] *= alpha;
#pragma unroll
            for (int c = 0; c < CO; ++c) o[a][c] *= alpha;
#pragma unroll
            for (int j = 0; j < CK; ++j) {
                float p = exp2f(s[a][j] - m_use);
                l[a] += p;
                Ps[attn_swz<BK>(ty + TY * a, tx + 16 * j)] = p;
            }
        }
        __syncthreads();
#pragma unroll 4
        for (int k = 0; k < BK; ++k) {
            float pv[RQ], vv[CO];
#pragma unroll
            for (int a = 0; a < RQ; ++a) pv[a] = Ps[attn_swz<BK>(ty + TY * a, k)];
#pragma unroll
            for (int c = 0; c < CO; ++c) vv[c] = Vs[attn_swz<HS>(k, tx + 16 * c)];
#pragma unroll
            for (int a = 0; a < RQ; ++a)
#pragma unroll
                for (int c = 0; c < CO; ++c) o[a][c] += pv[a] * vv[c];
        }
    }
#pragma unroll
    for (int a = 0; a < RQ; ++a) {
        float sum = l[a];
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(FULL_MASK, sum, off);
        const int t = q0 + ty + TY * a;
        if (t < T_len) {
            const float inv = 1.0f / sum;
            T* dst = out + ((long long)b * T_len + t) * C + (long long)h * HS;
#pragma unroll
            for (int c = 0; c < CO; ++c) dst[tx + 16 * c] = from_f32<T>(o[a][c] * inv);
            if (tx == 0) lse[((long long)b * NH + h) * T_len + t] = m[a] * ATTN_LN2 + logf(sum);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward (1): D_i = Σ_d dO[i,d]·O[i,d], one warp per (b, t, h) row of HS elements.

template <typename T>
__device__ __forceinline__ void attention_backward_dsum_impl(float* __restrict__ dsum, const T* __restrict__ out,
                                                             const T* __restrict__ dout, int BT, int T_len, int NH,
                                                             int HS) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // (b·T + t)·NH + h
    const bool valid = row < (long long)BT * NH;
    float acc = 0.0f;
    if (valid)
        for (int d = lane; d < HS; d += 32) acc += to_f32(out[row * HS + d]) * to_f32(dout[row * HS + d]);
    acc = warp_sum(acc);
    if (valid && lane == 0) {
        const long long bt = row / NH;
        const int h = (int)(row % NH);
        const long long b = bt / T_len, t = bt % T_len;
        dsum[(b * NH + h) * T_len + t] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward (2): dK and dV of one key tile, looping over the query tiles at or below the diagonal.

template <typename T, int HS>
__device__ __forceinline__ void attention_backward_dkv_impl(T* __restrict__ dqkv, const T* __restrict__ dout,
                                                            const T* __restrict__ qkv, const float* __restrict__ lse,
                                                            const float* __restrict__ dsum, int T_len, int NH) {
    constexpr int BK = AttnDkvTiles<HS>::BK, BQ = AttnDkvTiles<HS>::BQ, TY = AttnDkvTiles<HS>::TY;
    constexpr int NT = 16 * TY, RK = BK / TY, CQ = BQ / 16, CO = HS / 16;
    DYN_SMEM(float, smem);
    float* Ks = smem;           // [BK][HS]
    float* Vs = Ks + BK * HS;   // [BK][HS]
    float* Qs = Vs + BK * HS;   // [BQ][HS], scaled by scale·log2 e
    float* dOs = Qs + BQ * HS;  // [BQ][HS]
    float* Ps = dOs + BQ * HS;  // [BK][BQ] (key-major: Pᵀ)
    float* dSs = Ps + BK * BQ;  // [BK][BQ]
    float* Ls = dSs + BK * BQ;  // [BQ] lse · log2 e
    float* Ds = Ls + BQ;        // [BQ]
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int b = blockIdx.x / NH, h = blockIdx.x % NH;
    const int k0 = blockIdx.y * BK;  // key tile 0 has the most query tiles: it goes first
    const int C = NH * HS;
    const long long stride = 3LL * C;
    const T* base = qkv + (long long)b * T_len * stride + (long long)h * HS;
    const T* dout_base = dout + (long long)b * T_len * C + (long long)h * HS;
    const long long row_stats = ((long long)b * NH + h) * T_len;

    attn_load_tile<T, HS, BK, NT>(Ks, base + C, stride, k0, T_len, 1.0f);
    attn_load_tile<T, HS, BK, NT>(Vs, base + 2 * C, stride, k0, T_len, 1.0f);
    float dk[RK][CO], dv[RK][CO];
#pragma unroll
    for (int a = 0; a < RK; ++a)
#pragma unroll
        for (int c = 0; c < CO; ++c) dk[a][c] = dv[a][c] = 0.0f;
    const float qmul = ATTN_LOG2E / sqrtf((float)HS);
    const int query_tiles = (T_len + BQ - 1) / BQ;
    for (int qt = k0 / BQ; qt < query_tiles; ++qt) {
        const int q0 = qt * BQ;
        __syncthreads();  // the previous tile's readers of Q, dO, P and dS are done
        attn_load_tile<T, HS, BQ, NT>(Qs, base, stride, q0, T_len, qmul);
        attn_load_tile<T, HS, BQ, NT>(dOs, dout_base, C, q0, T_len, 1.0f);
        for (int i = threadIdx.x; i < BQ; i += NT) {
            const int t = q0 + i;
            Ls[i] = t < T_len ? lse[row_stats + t] * ATTN_LOG2E : 0.0f;
            Ds[i] = t < T_len ? dsum[row_stats + t] : 0.0f;
        }
        __syncthreads();
        float s[RK][CQ], dp[RK][CQ];
#pragma unroll
        for (int a = 0; a < RK; ++a)
#pragma unroll
            for (int j = 0; j < CQ; ++j) s[a][j] = dp[a][j] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < HS; ++d) {
            float kv[RK], vv[RK], qv[CQ], gv[CQ];
#pragma unroll
            for (int a = 0; a < RK; ++a) {
                kv[a] = Ks[attn_swz<HS>(ty + TY * a, d)];
                vv[a] = Vs[attn_swz<HS>(ty + TY * a, d)];
            }
#pragma unroll
            for (int j = 0; j < CQ; ++j) {
                qv[j] = Qs[attn_swz<HS>(tx + 16 * j, d)];
                gv[j] = dOs[attn_swz<HS>(tx + 16 * j, d)];
            }
#pragma unroll
            for (int a = 0; a < RK; ++a)
#pragma unroll
                for (int j = 0; j < CQ; ++j) {
                    s[a][j] += kv[a] * qv[j];
                    dp[a][j] += vv[a] * gv[j];
                }
        }
#pragma unroll
        for (int a = 0; a < RK; ++a)
#pragma unroll
            for (int j = 0; j < CQ; ++j) {
                const int il = tx + 16 * j, key = k0 + ty + TY * a, query = q0 + il;
                const float p = (query < T_len && key <= query) ? exp2f(s[a][j] - Ls[il]) : 0.0f;
                Ps[attn_swz<BQ>(ty + TY * a, il)] = p;
                dSs[attn_swz<BQ>(ty + TY * a, il)] = p * (dp[a][j] - Ds[il]);
            }
        __syncthreads();
#pragma unroll 4
        for (int i = 0; i < BQ; ++i) {
            float pv[RK], sv[RK], gv[CO], qv[CO];
#pragma unroll
            for (int a = 0; a < RK; ++a) {
                pv[a] = Ps[attn_swz<BQ>(ty + TY * a, i)];
                sv[a] = dSs[attn_swz<BQ>(ty + TY * a, i)];
            }
#pragma unroll
            for (int c = 0; c < CO; ++c) {
                gv[c] = dOs[attn_swz<HS>(i, tx + 16 * c)];
                qv[c] = Qs[attn_swz<HS>(i, tx + 16 * c)];
            }
#pragma unroll
            for (int a = 0; a < RK; ++a)
#pragma unroll
                for (int c = 0; c < CO; ++c) {
                    dv[a][c] += pv[a] * gv[c];
                    dk[a][c] += sv[a] * qv[c];
                }
        }
    }
    // Q was scaled by scale·log2 e: dK = scale·dSᵀ Q = ln 2 · dSᵀ Qs.
#pragma unroll
    for (int a = 0; a < RK; ++a) {
        const int t = k0 + ty + TY * a;
        if (t < T_len) {
            T* dst = dqkv + ((long long)b * T_len + t) * stride + (long long)h * HS;
#pragma unroll
            for (int c = 0; c < CO; ++c) {
                dst[C + tx + 16 * c] = from_f32<T>(dk[a][c] * ATTN_LN2);
                dst[2 * C + tx + 16 * c] = from_f32<T>(dv[a][c]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward (3): dQ of one query tile, looping over the key tiles up to the diagonal.

template <typename T, int HS>
__device__ __forceinline__ void attention_backward_dq_impl(T* __restrict__ dqkv, const T* __restrict__ dout,
                                                           const T* __restrict__ qkv, const float* __restrict__ lse,
                                                           const float* __restrict__ dsum, int T_len, int NH) {
    constexpr int BQ = AttnDqTiles<HS>::BQ, BK = AttnDqTiles<HS>::BK, TY = AttnDqTiles<HS>::TY;
    constexpr int NT = 16 * TY, RQ = BQ / TY, CK = BK / 16, CO = HS / 16;
    constexpr bool DS_IN_V = BQ <= HS;  // dS (BQ×BK) fits where V was once dP is done
    DYN_SMEM(float, smem);
    float* Qs = smem;           // [BQ][HS], scaled by scale·log2 e
    float* dOs = Qs + BQ * HS;  // [BQ][HS]
    float* Ks = dOs + BQ * HS;  // [BK][HS]
    float* Vs = Ks + BK * HS;   // [BK][HS]
    float* dSs = DS_IN_V ? Vs : Vs + BK * HS;  // [BQ][BK]
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int b = blockIdx.x / NH, h = blockIdx.x % NH;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;
    const int C = NH * HS;
    const long long stride = 3LL * C;
    const T* base = qkv + (long long)b * T_len * stride + (long long)h * HS;
    const long long row_stats = ((long long)b * NH + h) * T_len;

    attn_load_tile<T, HS, BQ, NT>(Qs, base, stride, q0, T_len, ATTN_LOG2E / sqrtf((float)HS));
    attn_load_tile<T, HS, BQ, NT>(dOs, dout + (long long)b * T_len * C + (long long)h * HS, C, q0, T_len, 1.0f);
    float lse2[RQ], dr[RQ], dq[RQ][CO];
#pragma unroll
    for (int a = 0; a < RQ; ++a) {
        const int t = q0 + ty + TY * a;
        lse2[a] = t < T_len ? lse[row_stats + t] * ATTN_LOG2E : 0.0f;
        dr[a] = t < T_len ? dsum[row_stats + t] : 0.0f;
#pragma unroll
        for (int c = 0; c < CO; ++c) dq[a][c] = 0.0f;
    }
    const int key_tiles = (min(q0 + BQ, T_len) - 1) / BK + 1;
    for (int kt = 0; kt < key_tiles; ++kt) {
        const int k0 = kt * BK;
        __syncthreads();  // the previous tile's readers of K and dS are done
        attn_load_tile<T, HS, BK, NT>(Ks, base + C, stride, k0, T_len, 1.0f);
        attn_load_tile<T, HS, BK, NT>(Vs, base + 2 * C, stride, k0, T_len, 1.0f);
        __syncthreads();
        float s[RQ][CK], dp[RQ][CK];
#pragma unroll
        for (int a = 0; a < RQ; ++a)
#pragma unroll
            for (int j = 0; j < CK; ++j) s[a][j] = dp[a][j] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < HS; ++d) {
            float qv[RQ], gv[RQ], kv[CK], vv[CK];
#pragma unroll
            for (int a = 0; a < RQ; ++a) {
                qv[a] = Qs[attn_swz<HS>(ty + TY * a, d)];
                gv[a] = dOs[attn_swz<HS>(ty + TY * a, d)];
            }
#pragma unroll
            for (int j = 0; j < CK; ++j) {
                kv[j] = Ks[attn_swz<HS>(tx + 16 * j, d)];
                vv[j] = Vs[attn_swz<HS>(tx + 16 * j, d)];
            }
#pragma unroll
            for (int a = 0; a < RQ; ++a)
#pragma unroll
                for (int j = 0; j < CK; ++j) {
                    s[a][j] += qv[a] * kv[j];
                    dp[a][j] += gv[a] * vv[j];
                }
        }
        if (DS_IN_V) __syncthreads();  // everyone has read V before dS overwrites it
#pragma unroll
        for (int a = 0; a < RQ; ++a)
#pragma unroll
            for (int j = 0; j < CK; ++j) {
                const int query = q0 + ty + TY * a, key = k0 + tx + 16 * j;
                const float p = (query < T_len && key <= query) ? exp2f(s[a][j] - lse2[a]) : 0.0f;
                dSs[attn_swz<BK>(ty + TY * a, tx + 16 * j)] = p * (dp[a][j] - dr[a]);
            }
        __syncthreads();
#pragma unroll 4
        for (int k = 0; k < BK; ++k) {
            float sv[RQ], kv[CO];
#pragma unroll
            for (int a = 0; a < RQ; ++a) sv[a] = dSs[attn_swz<BK>(ty + TY * a, k)];
#pragma unroll
            for (int c = 0; c < CO; ++c) kv[c] = Ks[attn_swz<HS>(k, tx + 16 * c)];
#pragma unroll
            for (int a = 0; a < RQ; ++a)
#pragma unroll
                for (int c = 0; c < CO; ++c) dq[a][c] += sv[a] * kv[c];
        }
    }
    const float scale = 1.0f / sqrtf((float)HS);
#pragma unroll
    for (int a = 0; a < RQ; ++a) {
        const int t = q0 + ty + TY * a;
        if (t < T_len) {
            T* dst = dqkv + ((long long)b * T_len + t) * stride + (long long)h * HS;
#pragma unroll
            for (int c = 0; c < CO; ++c) dst[tx + 16 * c] = from_f32<T>(dq[a][c] * scale);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels: one per (head size, storage type) for the tiled ones, one per storage type for dsum.

#define ATTN_KERNELS(HS, TN, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(16 * AttnFwdTiles<HS>::TY)                                      \
        attention_forward_hs##HS##_##TN(T* out, float* lse, const T* qkv, int T_len, int NH) {                    \
        attention_forward_impl<T, HS>(out, lse, qkv, T_len, NH);                                                  \
    }                                                                                                             \
    EXPORT_KERNEL(attention_forward_hs##HS##_##TN);                                                               \
    extern "C" __global__ void __launch_bounds__(16 * AttnDkvTiles<HS>::TY) attention_backward_dkv_hs##HS##_##TN( \
        T* dqkv, const T* dout, const T* qkv, const float* lse, const float* dsum, int T_len, int NH) {           \
        attention_backward_dkv_impl<T, HS>(dqkv, dout, qkv, lse, dsum, T_len, NH);                                \
    }                                                                                                             \
    EXPORT_KERNEL(attention_backward_dkv_hs##HS##_##TN);                                                          \
    extern "C" __global__ void __launch_bounds__(16 * AttnDqTiles<HS>::TY) attention_backward_dq_hs##HS##_##TN(   \
        T* dqkv, const T* dout, const T* qkv, const float* lse, const float* dsum, int T_len, int NH) {           \
        attention_backward_dq_impl<T, HS>(dqkv, dout, qkv, lse, dsum, T_len, NH);                                 \
    }                                                                                                             \
    EXPORT_KERNEL(attention_backward_dq_hs##HS##_##TN);

ATTN_KERNELS(32, f32, float)
ATTN_KERNELS(64, f32, float)
ATTN_KERNELS(128, f32, float)
ATTN_KERNELS(32, bf16, bf16)
ATTN_KERNELS(64, bf16, bf16)
ATTN_KERNELS(128, bf16, bf16)

extern "C" __global__ void attention_backward_dsum_f32(float* dsum, const float* out, const float* dout, int BT,
                                                       int T_len, int NH, int HS) {
    attention_backward_dsum_impl(dsum, out, dout, BT, T_len, NH, HS);
}
EXPORT_KERNEL(attention_backward_dsum_f32);
extern "C" __global__ void attention_backward_dsum_bf16(float* dsum, const bf16* out, const bf16* dout, int BT,
                                                        int T_len, int NH, int HS) {
    attention_backward_dsum_impl(dsum, out, dout, BT, T_len, NH, HS);
}
EXPORT_KERNEL(attention_backward_dsum_bf16);
