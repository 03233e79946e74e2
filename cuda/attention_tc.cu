// Causal multi-head self-attention for bf16 storage on tensor cores: every matrix product is the
// warp-level mma.sync m16n8k16 (bf16 inputs, fp32 accumulation; mma_bf16_16816 in prelude.cuh),
// softmax statistics and accumulators are fp32. Same layouts, semantics and memory contract as the
// SIMT kernels of cuda/attention.cu (read its header first); host launchers in
// src/gpu/ops/attention.rs, which pick these kernels for bf16 and head sizes 64 and 128.
//
//   forward, per block of 64 query rows (4 warps × 16 rows), for each key tile up to the diagonal:
//     S = Q Kᵀ (mma, Q fragments kept in registers), online softmax in the log2 domain on the
//     accumulator fragments, P rounded to bf16 and fed straight back as the A operand of
//     O += P V (the C fragment of two adjacent 8-column tiles is the A fragment of one 16-deep
//     k step); out = O / l, lse = m·ln 2 + ln l (natural log, fp32).
//   backward (after the dsum kernel of attention.cu, reused as is):
//     dkv, per block of 64 key rows (4 warps × 16 keys), looping over the query tiles at or below
//       the diagonal: Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, Pᵀ = exp2(Sᵀ·c − lse₂), dSᵀ = Pᵀ ∘ (dPᵀ − D);
//       dK += dSᵀ Q, dV += Pᵀ dO (Pᵀ and dSᵀ rounded to bf16 as A operands); dK scaled at the end.
//     dq, per block of 64 query rows (4 warps × 16 rows), looping over the key tiles up to the
//       diagonal: dP = dO Vᵀ, S = Q Kᵀ, the same P and dS, dQ += dS K; dQ scaled at the end.
//   Each warp owns 16 rows of its block's tile and accumulates their outputs alone, in an order
//   fixed by the shapes: no atomics, bitwise deterministic. Tiles (and warps) that the causal
//   mask hides entirely are skipped; T need not be a multiple of any tile (rows ≥ T load as 0 and
//   are masked where they would contribute).
//
// Rounding compared with the SIMT kernels: Q, K, V, dO are bf16 already; S, dP, the softmax and
// every accumulator are fp32 as there; the extra roundings are P (forward and dV) and dS (dK and
// dQ) to bf16 before they enter a product. l sums the unrounded fp32 P, so lse has fp32 accuracy.
//
// Launch geometry (mirrored by src/gpu/ops/attention.rs; keep both in step): grid (B·NH, tiles of
// 64 rows along T, 1), 128 threads (4 warps) per block; forward and dq run their query tiles
// heaviest first (blockIdx.y = 0 is the last tile), dkv its key tiles from 0. Shared memory holds
// bf16 tiles row-major with a row stride of HS + 8 elements (the 16-byte pad makes every fragment
// load below conflict-free: 8 rows × 4 words land in 32 different banks):
//     kernel   HS   own tile   other tile          dynamic shared memory
//     forward   64  Q (regs)   K, V 64 rows        2·64·72·2                    = 18 KiB
//     forward  128  Q (regs)   K, V 64 rows        2·64·136·2                   = 34 KiB
//     dkv       64  K, V 64    Q, dO 64 + lse, D   (2·64 + 2·64)·72·2 + 2·64·4  = 36.5 KiB
//     dkv      128  K, V 64    Q, dO 16 + lse, D   (2·64 + 2·16)·136·2 + 2·16·4 = 42.625 KiB
//     dq        64  Q, dO 64   K, V 64             (2·64 + 2·64)·72·2           = 36 KiB
//     dq       128  Q, dO 64   K, V 16             (2·64 + 2·16)·136·2          = 42.5 KiB
//   All within 48 KiB (no cuFuncSetAttribute). At HS 128 the 16-row other tiles keep the backward
//   inside that limit and its accumulators in registers (dK and dV: 2·64 fp32 per lane).
//
// Operands come from the shared tiles by ldmatrix, one instruction per fragment: A fragments
// (row-major 16×16) by an x4 load, B fragments whose k runs along a stored row (Kᵀ in Q Kᵀ) by
// an x2 load, and those whose k runs down a column (V in P V, dO in Pᵀ dO, Q in dSᵀ Q, K in dS K)
// by a transposing x2 load — 8 rows of 16 bytes per phase, conflict-free with the padded stride.
// Element-wise loads (32-bit, or two 16-bit packed) give the same registers: TROUPE_NO_LDMATRIX
// builds those instead, and ldmatrix_selftest compares the two. Tiles move from global memory in
// 16-byte copies (the host checks that qkv, out, dout and dqkv are 16-byte aligned, and falls
// back to the SIMT kernels otherwise); results are stored as bf16 pairs. Tiles are loaded by
// cp.async, each of a loop's two tiles while the other is in use (see the loops): K during the
// forward's softmax and P V, V during its Q Kᵀ; in dkv Q during dV's product and dO during Sᵀ; in
// dq V during S, dS and dQ and K during dP — no second buffer, so no more shared memory.

#define ATTN_TC_LOG2E 1.4426950408889634f
#define ATTN_TC_LN2 0.6931471805599453f
#define ATTN_TC_THREADS 128  // 4 warps, 16 rows of the block's own 64-row tile each
#define ATTN_TC_OWN 64       // rows of a block's own tile

// Rows of the tiles a block loops over (see the table above).
template <int HS> struct AttnTcTiles;
template <> struct AttnTcTiles<64> { static constexpr int FWD_BK = 64, DKV_BQ = 64, DQ_BK = 64; };
template <> struct AttnTcTiles<128> { static constexpr int FWD_BK = 64, DKV_BQ = 16, DQ_BK = 16; };

// 32-bit words of bf16 storage. The emulator copies bytes (no alignment or aliasing assumptions);
// on a GPU these are plain loads and stores. (Tiles move in 16-byte copies: cp_async16.)
#ifdef TROUPE_EMU
__device__ __forceinline__ unsigned attn_tc_ld32(const bf16* p) {
    unsigned v;
    std::memcpy(&v, p, 4);
    return v;
}
__device__ __forceinline__ void attn_tc_st32(bf16* p, unsigned v) { std::memcpy(p, &v, 4); }
#else
__device__ __forceinline__ unsigned attn_tc_ld32(const bf16* p) { return *reinterpret_cast<const unsigned*>(p); }
__device__ __forceinline__ void attn_tc_st32(bf16* p, unsigned v) { *reinterpret_cast<unsigned*>(p) = v; }
#endif

// Two fp32 values as a bf16 pair, `lo` in the low half (round to nearest even).
__device__ __forceinline__ unsigned attn_tc_pack(float lo, float hi) {
#if defined(TROUPE_EMU) || __CUDA_ARCH__ < 800
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
#else
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // first source → high half
    return r;
#endif
}

// Starts loading rows [row0, row0 + ROWS) of a head's HS columns (row t at src + t·stride) into a
// shared tile with row stride HS + 8, by cp.async: this thread's 16-byte chunks start copying
// (rows at or past T fill with zeros, read from row 0's address); they land by the cp_async_wait
// that retires the group the caller commits next.
template <int HS, int ROWS>
__device__ __forceinline__ void attn_tc_load_tile_async(bf16* dst, const bf16* __restrict__ src, long long stride,
                                                        int row0, int T_len) {
    constexpr int CH = HS / 8;  // 16-byte chunks per row
    for (int idx = threadIdx.x; idx < ROWS * CH; idx += ATTN_TC_THREADS) {
        const int r = idx / CH, c = idx % CH, t = row0 + r;
        const bool in = t < T_len;
        cp_async16(dst + r * (HS + 8) + c * 8, src + (long long)(in ? t : 0) * stride + c * 8, in ? 16 : 0);
    }
}

// The log2-domain lse and the D of rows [row0, row0 + ROWS) into shared memory (0 past T), by
// plain loads: visible after the next __syncthreads.
template <int ROWS>
__device__ __forceinline__ void attn_tc_load_row_stats(float* Ls, float* Ds, const float* __restrict__ lse,
                                                       const float* __restrict__ dsum, int row0, int T_len) {
    for (int i = threadIdx.x; i < ROWS; i += ATTN_TC_THREADS) {
        const int q = row0 + i;
        Ls[i] = q < T_len ? lse[q] * ATTN_TC_LOG2E : 0.0f;
        Ds[i] = q < T_len ? dsum[q] : 0.0f;
    }
}

// Fragment loads from the shared tiles, in two forms with the same results: element-wise (`_lds`:
// 32-bit shared loads, or two 16-bit ones packed, as the fragment layouts of prelude.cuh say) and
// warp-collective (`_ldm`: one ldmatrix per fragment, a quarter to an eighth of the instructions).
// The kernels use ldmatrix unless TROUPE_NO_LDMATRIX is defined (the NVRTC build defines it when
// the environment variable of that name is set: a fallback should a GPU disagree with the
// emulator); ldmatrix_selftest compares the two on the device. Row addresses are 16-byte aligned:
// tiles start at the (aligned) dynamic shared memory, rows are (HS + 8)·2 bytes apart and the
// column offsets are multiples of 8 elements.

// The A fragment of rows [r0, r0 + 16) and columns [k0, k0 + 16) of a row-major tile.
template <int LD>
__device__ __forceinline__ void attn_tc_frag_a_lds(unsigned (&a)[4], const bf16* tile, int r0, int k0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16* p = tile + (r0 + g) * LD + k0 + 2 * t;
    a[0] = attn_tc_ld32(p);
    a[1] = attn_tc_ld32(p + 8 * LD);
    a[2] = attn_tc_ld32(p + 8);
    a[3] = attn_tc_ld32(p + 8 * LD + 8);
}

// The same with one x4 ldmatrix: lanes 0–7 address rows r0..r0+7 at k0 (a[0]), 8–15 rows
// r0+8..r0+15 at k0 (a[1]), 16–23 rows r0..r0+7 at k0+8 (a[2]), 24–31 rows r0+8..r0+15 at k0+8.
template <int LD>
__device__ __forceinline__ void attn_tc_frag_a_ldm(unsigned (&a)[4], const bf16* tile, int r0, int k0) {
    const int lane = threadIdx.x & 31;
    ldmatrix_b16<4, false>(a, tile + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + k0 + (lane >> 4) * 8);
}

// The B fragment B[k][n] = tile[n0 + n][k0 + k] (k along a stored row: the Kᵀ of Q Kᵀ).
template <int LD>
__device__ __forceinline__ void attn_tc_frag_b_rows_lds(unsigned (&b)[2], const bf16* tile, int n0, int k0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16* p = tile + (n0 + g) * LD + k0 + 2 * t;
    b[0] = attn_tc_ld32(p);
    b[1] = attn_tc_ld32(p + 8);
}

// The same with one x2 ldmatrix: lanes 0–7 address rows n0..n0+7 at k0 (b[0]), 8–15 the same
// rows at k0 + 8 (b[1]); lanes 16–31 repeat those addresses.
template <int LD>
__device__ __forceinline__ void attn_tc_frag_b_rows_ldm(unsigned (&b)[2], const bf16* tile, int n0, int k0) {
    const int lane = threadIdx.x & 31;
    ldmatrix_b16<2, false>(b, tile + (n0 + (lane & 7)) * LD + k0 + ((lane >> 3) & 1) * 8);
}

// The B fragment B[k][n] = tile[k0 + k][n0 + n] (k down a stored column: the V of P V).
template <int LD>
__device__ __forceinline__ void attn_tc_frag_b_cols_lds(unsigned (&b)[2], const bf16* tile, int k0, int n0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16* p = tile + (k0 + 2 * t) * LD + n0 + g;
    b[0] = (unsigned)p[0] | ((unsigned)p[LD] << 16);
    b[1] = (unsigned)p[8 * LD] | ((unsigned)p[9 * LD] << 16);
}

// The same with one transposing x2 ldmatrix: lanes 0–7 address rows k0..k0+7 at n0 (b[0]),
// 8–15 rows k0+8..k0+15 (b[1]); lanes 16–31 repeat those addresses.
template <int LD>
__device__ __forceinline__ void attn_tc_frag_b_cols_ldm(unsigned (&b)[2], const bf16* tile, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    ldmatrix_b16<2, true>(b, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n0);
}

// What the kernels call.
#ifdef TROUPE_NO_LDMATRIX
constexpr bool ATTN_TC_LDMATRIX = false;
#else
constexpr bool ATTN_TC_LDMATRIX = true;
#endif

template <int LD>
__device__ __forceinline__ void attn_tc_frag_a(unsigned (&a)[4], const bf16* tile, int r0, int k0) {
    if constexpr (ATTN_TC_LDMATRIX) attn_tc_frag_a_ldm<LD>(a, tile, r0, k0);
    else attn_tc_frag_a_lds<LD>(a, tile, r0, k0);
}

template <int LD>
__device__ __forceinline__ void attn_tc_frag_b_rows(unsigned (&b)[2], const bf16* tile, int n0, int k0) {
    if constexpr (ATTN_TC_LDMATRIX) attn_tc_frag_b_rows_ldm<LD>(b, tile, n0, k0);
    else attn_tc_frag_b_rows_lds<LD>(b, tile, n0, k0);
}

template <int LD>
__device__ __forceinline__ void attn_tc_frag_b_cols(unsigned (&b)[2], const bf16* tile, int k0, int n0) {
    if constexpr (ATTN_TC_LDMATRIX) attn_tc_frag_b_cols_ldm<LD>(b, tile, k0, n0);
    else attn_tc_frag_b_cols_lds<LD>(b, tile, k0, n0);
}

// The A fragment of a 16×16 block made of two adjacent 16×8 accumulator tiles (columns 0..7 from
// c0, 8..15 from c1), rounded to bf16: a C fragment pair is an A fragment.
__device__ __forceinline__ void attn_tc_c_to_a(unsigned (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = attn_tc_pack(c0[0], c0[1]);
    a[1] = attn_tc_pack(c0[2], c0[3]);
    a[2] = attn_tc_pack(c1[0], c1[1]);
    a[3] = attn_tc_pack(c1[2], c1[3]);
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <int HS>
__device__ __forceinline__ void attention_tc_forward_impl(bf16* __restrict__ out, float* __restrict__ lse,
                                                          const bf16* __restrict__ qkv, int T_len, int NH) {
    constexpr int BQ = ATTN_TC_OWN, BK = AttnTcTiles<HS>::FWD_BK, LD = HS + 8;
    constexpr int KS = HS / 16, NK = BK / 8, ND = HS / 8;
    DYN_SMEM(bf16, smem);
    bf16* Ks = smem;          // [BK][LD]
    bf16* Vs = Ks + BK * LD;  // [BK][LD]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.x / NH, h = blockIdx.x % NH;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;
    const int row0 = q0 + 16 * warp;  // the warp's first query row
    const bool active = row0 < T_len;  // warp-uniform
    const int C = NH * HS;
    const long long stride = 3LL * C;
    const bf16* base = qkv + (long long)b * T_len * stride + (long long)h * HS;
    const float sl2 = ATTN_TC_LOG2E / sqrtf((float)HS);  // scale · log2 e, applied to fp32 S

    // The warp's Q rows as A fragments, straight from global memory (rows ≥ T are 0).
    unsigned qf[KS][4];
    {
        const int ra = row0 + g, rb = row0 + g + 8;
        const bf16* pa = base + (long long)ra * stride + 2 * t;
        const bf16* pb = base + (long long)rb * stride + 2 * t;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            qf[ks][0] = ra < T_len ? attn_tc_ld32(pa + ks * 16) : 0u;
            qf[ks][1] = rb < T_len ? attn_tc_ld32(pb + ks * 16) : 0u;
            qf[ks][2] = ra < T_len ? attn_tc_ld32(pa + ks * 16 + 8) : 0u;
            qf[ks][3] = rb < T_len ? attn_tc_ld32(pb + ks * 16 + 8) : 0u;
        }
    }
    float o[ND][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[nd][i] = 0.0f;

    // K and V arrive by cp.async in groups committed in the order K(0), V(0), K(1), V(1), …: the
    // load of K(kt + 1) runs during tile kt's softmax and P V, that of V(kt + 1) during the next
    // tile's Q Kᵀ (FlashAttention-2's overlap, with no second buffer). Every thread commits a
    // group at each point, empty where there is no next tile, so "at most one group in flight"
    // always means the same tile.
    const int key_tiles = (min(q0 + BQ, T_len) - 1) / BK + 1;  // up to the diagonal
    attn_tc_load_tile_async<HS, BK>(Ks, base + C, stride, 0, T_len);
    cp_async_commit();
    attn_tc_load_tile_async<HS, BK>(Vs, base + 2 * C, stride, 0, T_len);
    cp_async_commit();
    for (int kt = 0; kt < key_tiles; ++kt) {
        const int k0 = kt * BK;
        const bool more = kt + 1 < key_tiles;
        // The warp has rows at or after the tile's first key (warp-uniform).
        const bool work = active && k0 <= row0 + 15;
        cp_async_wait<1>();  // this thread's part of K(kt) landed (V(kt) may be in flight)
        __syncthreads();     // and every thread's

        float s[NK][4];
#pragma unroll
        for (int nk = 0; nk < NK; ++nk)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[nk][i] = 0.0f;
        if (work) {
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
#pragma unroll
                for (int nk = 0; nk < NK; ++nk) {
                    unsigned kb[2];
                    attn_tc_frag_b_rows<LD>(kb, Ks, nk * 8, ks * 16);
                    mma_bf16_16816(s[nk], qf[ks], kb, s[nk]);
                }
        }
        __syncthreads();  // every warp is done reading K(kt): K(kt + 1) may land there
        if (more) attn_tc_load_tile_async<HS, BK>(Ks, base + C, stride, k0 + BK, T_len);
        cp_async_commit();
        if (work) {
            // Scale into the log2 domain; mask keys after the row (keys ≥ T are after every row
            // < T; rows ≥ T are never stored).
            const bool diag = k0 + BK - 1 > row0;
#pragma unroll
            for (int nk = 0; nk < NK; ++nk)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    s[nk][i] *= sl2;
                    if (diag && k0 + nk * 8 + 2 * t + (i & 1) > row0 + g + 8 * (i >> 1)) s[nk][i] = -INFINITY;
                }
            // Online softmax for the lane's two rows (r = 0: row g, r = 1: row g + 8); the four
            // lanes of a quad hold one row's columns.
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mt = -INFINITY;
#pragma unroll
                for (int nk = 0; nk < NK; ++nk) mt = fmaxf(mt, fmaxf(s[nk][2 * r], s[nk][2 * r + 1]));
                mt = fmaxf(mt, __shfl_xor_sync(FULL_MASK, mt, 1));
                mt = fmaxf(mt, __shfl_xor_sync(FULL_MASK, mt, 2));
                const float m_new = fmaxf(m[r], mt);
                // Key k0 is visible to every row of the tile, so m_new is finite; this only
                // guards the arithmetic (-inf - -inf).
                const float m_use = m_new == -INFINITY ? 0.0f : m_new;
                const float alpha = exp2f(m[r] - m_use);
                m[r] = m_new;
                l[r] *= alpha;
#pragma unroll
                for (int nd = 0; nd < ND; ++nd) {
                    o[nd][2 * r] *= alpha;
                    o[nd][2 * r + 1] *= alpha;
                }
#pragma unroll
                for (int nk = 0; nk < NK; ++nk) {
                    const float p0 = exp2f(s[nk][2 * r] - m_use), p1 = exp2f(s[nk][2 * r + 1] - m_use);
                    l[r] += p0 + p1;
                    s[nk][2 * r] = p0;
                    s[nk][2 * r + 1] = p1;
                }
            }
        }
        cp_async_wait<1>();  // V(kt) landed (K(kt + 1) may be in flight)
        __syncthreads();
        if (work) {
            // O += P V, P rounded to bf16 as the A operand.
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                unsigned pa[4];
                attn_tc_c_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
                for (int nd = 0; nd < ND; ++nd) {
                    unsigned vb[2];
                    attn_tc_frag_b_cols<LD>(vb, Vs, kk * 16, nd * 8);
                    mma_bf16_16816(o[nd], pa, vb, o[nd]);
                }
            }
        }
        __syncthreads();  // every warp is done reading V(kt): V(kt + 1) may land there
        if (more) attn_tc_load_tile_async<HS, BK>(Vs, base + 2 * C, stride, k0 + BK, T_len);
        cp_async_commit();
    }
    cp_async_wait<0>();  // (the last two groups are empty)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
    }
    if (active) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row0 + g + 8 * r;
            if (row < T_len) {
                const float inv = 1.0f / l[r];
                bf16* dst = out + ((long long)b * T_len + row) * C + (long long)h * HS + 2 * t;
#pragma unroll
                for (int nd = 0; nd < ND; ++nd)
                    attn_tc_st32(dst + nd * 8, attn_tc_pack(o[nd][2 * r] * inv, o[nd][2 * r + 1] * inv));
                if (t == 0) lse[((long long)b * NH + h) * T_len + row] = m[r] * ATTN_TC_LN2 + logf(l[r]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward: dK and dV of one key tile, looping over the query tiles at or below the diagonal.

template <int HS>
__device__ __forceinline__ void attention_tc_backward_dkv_impl(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                                               const bf16* __restrict__ qkv,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ dsum, int T_len, int NH) {
    constexpr int BK = ATTN_TC_OWN, BQ = AttnTcTiles<HS>::DKV_BQ, LD = HS + 8;
    constexpr int KS = HS / 16, NQ = BQ / 8, ND = HS / 8;
    DYN_SMEM(bf16, smem);
    bf16* Ks = smem;            // [BK][LD]
    bf16* Vs = Ks + BK * LD;    // [BK][LD]
    bf16* Qs = Vs + BK * LD;    // [BQ][LD]
    bf16* dOs = Qs + BQ * LD;   // [BQ][LD]
    float* Ls = reinterpret_cast<float*>(dOs + BQ * LD);  // [BQ] lse · log2 e
    float* Ds = Ls + BQ;                                  // [BQ]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.x / NH, h = blockIdx.x % NH;
    const int k0 = blockIdx.y * BK;  // key tile 0 has the most query tiles: it goes first
    const int key0 = k0 + 16 * warp;  // the warp's first key
    const bool active = key0 < T_len;
    const int C = NH * HS;
    const long long stride = 3LL * C;
    const bf16* base = qkv + (long long)b * T_len * stride + (long long)h * HS;
    const bf16* dout_base = dout + (long long)b * T_len * C + (long long)h * HS;
    const long long row_stats = ((long long)b * NH + h) * T_len;
    const float sl2 = ATTN_TC_LOG2E / sqrtf((float)HS);

    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk[nd][i] = dv[nd][i] = 0.0f;

    // The block's K and V and the query tiles' Q and dO arrive by cp.async in groups committed
    // in the order {K, V, Q(first)}, dO(first), Q(next), dO(next), …: Q(qt + 1) loads during tile
    // qt's dV product, dO(qt + 1) during the next tile's Sᵀ (the forward's overlap, with no second
    // buffer; dK's product, the last reader of Q, goes before dV's). Every thread commits a group
    // at each point, empty where there is no next tile. The rows' lse and D go through registers
    // into shared memory by plain loads next to their Q.
    const int query_tiles = (T_len + BQ - 1) / BQ;
    const int first = k0 / BQ;
    attn_tc_load_tile_async<HS, BK>(Ks, base + C, stride, k0, T_len);
    attn_tc_load_tile_async<HS, BK>(Vs, base + 2 * C, stride, k0, T_len);
    attn_tc_load_tile_async<HS, BQ>(Qs, base, stride, first * BQ, T_len);
    cp_async_commit();
    attn_tc_load_tile_async<HS, BQ>(dOs, dout_base, C, first * BQ, T_len);
    cp_async_commit();
    attn_tc_load_row_stats<BQ>(Ls, Ds, lse + row_stats, dsum + row_stats, first * BQ, T_len);
    for (int qt = first; qt < query_tiles; ++qt) {
        const int q0 = qt * BQ;
        const bool more = qt + 1 < query_tiles;
        // The warp's keys see some query of the tile (warp-uniform; warps past T have none).
        const bool work = active && q0 + BQ - 1 >= key0;
        cp_async_wait<1>();  // this thread's part of Q(qt) landed (dO(qt) may be in flight)
        __syncthreads();     // and every thread's, with lse and D

        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: 16 keys × BQ queries.
        float s[NQ][4], dp[NQ][4];
#pragma unroll
        for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[nq][i] = dp[nq][i] = 0.0f;
        if (work) {
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                unsigned ka[4];
                attn_tc_frag_a<LD>(ka, Ks, 16 * warp, ks * 16);
#pragma unroll
                for (int nq = 0; nq < NQ; ++nq) {
                    unsigned qb[2];
                    attn_tc_frag_b_rows<LD>(qb, Qs, nq * 8, ks * 16);
                    mma_bf16_16816(s[nq], ka, qb, s[nq]);
                }
            }
        }
        cp_async_wait<0>();  // dO(qt) landed
        __syncthreads();
        if (work) {
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                unsigned va[4];
                attn_tc_frag_a<LD>(va, Vs, 16 * warp, ks * 16);
#pragma unroll
                for (int nq = 0; nq < NQ; ++nq) {
                    unsigned ob[2];
                    attn_tc_frag_b_rows<LD>(ob, dOs, nq * 8, ks * 16);
                    mma_bf16_16816(dp[nq], va, ob, dp[nq]);
                }
            }
            // Pᵀ (into s) and dSᵀ (into dp); queries ≥ T and before the key contribute nothing.
#pragma unroll
            for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int qi = nq * 8 + 2 * t + (i & 1), query = q0 + qi, key = key0 + g + 8 * (i >> 1);
                    const float p = (query < T_len && key <= query) ? exp2f(s[nq][i] * sl2 - Ls[qi]) : 0.0f;
                    s[nq][i] = p;
                    dp[nq][i] = p * (dp[nq][i] - Ds[qi]);
                }
            // dK += dSᵀ Q over the tile's queries 16 at a time.
#pragma unroll
            for (int kq = 0; kq < BQ / 16; ++kq) {
                unsigned sa[4];
                attn_tc_c_to_a(sa, dp[2 * kq], dp[2 * kq + 1]);
#pragma unroll
                for (int nd = 0; nd < ND; ++nd) {
                    unsigned qb[2];
                    attn_tc_frag_b_cols<LD>(qb, Qs, kq * 16, nd * 8);
                    mma_bf16_16816(dk[nd], sa, qb, dk[nd]);
                }
            }
        }
        __syncthreads();  // every warp is done reading Q(qt), lse and D: the next tile's may land
        if (more) {
            attn_tc_load_tile_async<HS, BQ>(Qs, base, stride, q0 + BQ, T_len);
            attn_tc_load_row_stats<BQ>(Ls, Ds, lse + row_stats, dsum + row_stats, q0 + BQ, T_len);
        }
        cp_async_commit();
        if (work) {
            // dV += Pᵀ dO over the tile's queries 16 at a time.
#pragma unroll
            for (int kq = 0; kq < BQ / 16; ++kq) {
                unsigned pa[4];
                attn_tc_c_to_a(pa, s[2 * kq], s[2 * kq + 1]);
#pragma unroll
                for (int nd = 0; nd < ND; ++nd) {
                    unsigned ob[2];
                    attn_tc_frag_b_cols<LD>(ob, dOs, kq * 16, nd * 8);
                    mma_bf16_16816(dv[nd], pa, ob, dv[nd]);
                }
            }
        }
        __syncthreads();  // every warp is done reading dO(qt): dO(qt + 1) may land there
        if (more) attn_tc_load_tile_async<HS, BQ>(dOs, dout_base, C, q0 + BQ, T_len);
        cp_async_commit();
    }
    cp_async_wait<0>();  // (the last two groups are empty)
    if (active) {
        const float scale = 1.0f / sqrtf((float)HS);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = key0 + g + 8 * r;
            if (key < T_len) {
                bf16* dst = dqkv + ((long long)b * T_len + key) * stride + (long long)h * HS + 2 * t;
#pragma unroll
                for (int nd = 0; nd < ND; ++nd) {
                    attn_tc_st32(dst + C + nd * 8, attn_tc_pack(dk[nd][2 * r] * scale, dk[nd][2 * r + 1] * scale));
                    attn_tc_st32(dst + 2 * C + nd * 8, attn_tc_pack(dv[nd][2 * r], dv[nd][2 * r + 1]));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward: dQ of one query tile, looping over the key tiles up to the diagonal.

template <int HS>
__device__ __forceinline__ void attention_tc_backward_dq_impl(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                                              const bf16* __restrict__ qkv,
                                                              const float* __restrict__ lse,
                                                              const float* __restrict__ dsum, int T_len, int NH) {
    constexpr int BQ = ATTN_TC_OWN, BK = AttnTcTiles<HS>::DQ_BK, LD = HS + 8;
    constexpr int KS = HS / 16, NK = BK / 8, ND = HS / 8;
    DYN_SMEM(bf16, smem);
    bf16* Qs = smem;            // [BQ][LD]
    bf16* dOs = Qs + BQ * LD;   // [BQ][LD]
    bf16* Ks = dOs + BQ * LD;   // [BK][LD]
    bf16* Vs = Ks + BK * LD;    // [BK][LD]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.x / NH, h = blockIdx.x % NH;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;
    const int row0 = q0 + 16 * warp;
    const bool active = row0 < T_len;
    const int C = NH * HS;
    const long long stride = 3LL * C;
    const bf16* base = qkv + (long long)b * T_len * stride + (long long)h * HS;
    const long long row_stats = ((long long)b * NH + h) * T_len;
    const float sl2 = ATTN_TC_LOG2E / sqrtf((float)HS);

    // The block's Q and dO and the key tiles' K and V arrive by cp.async in groups committed in
    // the order {Q, dO, V(0)}, K(0), V(1), K(1), …: V(kt + 1) loads during tile kt's S, dS and dQ,
    // K(kt + 1) during the next tile's dP (dP goes first: V's only reader is done when K(kt) has
    // landed, and V(kt + 1) starts behind that barrier). Every thread commits a group at each point, empty where there is no next tile.
    attn_tc_load_tile_async<HS, BQ>(Qs, base, stride, q0, T_len);
    attn_tc_load_tile_async<HS, BQ>(dOs, dout + (long long)b * T_len * C + (long long)h * HS, C, q0, T_len);
    attn_tc_load_tile_async<HS, BK>(Vs, base + 2 * C, stride, 0, T_len);
    cp_async_commit();
    attn_tc_load_tile_async<HS, BK>(Ks, base + C, stride, 0, T_len);
    cp_async_commit();
    float lse2[2], dr[2], dq[ND][4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        lse2[r] = row < T_len ? lse[row_stats + row] * ATTN_TC_LOG2E : 0.0f;
        dr[r] = row < T_len ? dsum[row_stats + row] : 0.0f;
    }
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
        for (int i = 0; i < 4; ++i) dq[nd][i] = 0.0f;

    const int key_tiles = (min(q0 + BQ, T_len) - 1) / BK + 1;
    for (int kt = 0; kt < key_tiles; ++kt) {
        const int k0 = kt * BK;
        const bool more = kt + 1 < key_tiles;
        // The warp has rows at or after the tile's first key (warp-uniform).
        const bool work = active && k0 <= row0 + 15;
        cp_async_wait<1>();  // this thread's part of V(kt) landed (K(kt) may be in flight)
        __syncthreads();     // and every thread's

        // dP = dO Vᵀ and S = Q Kᵀ: 16 rows × BK keys.
        float s[NK][4], dp[NK][4];
#pragma unroll
        for (int nk = 0; nk < NK; ++nk)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[nk][i] = dp[nk][i] = 0.0f;
        if (work) {
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                unsigned oa[4];
                attn_tc_frag_a<LD>(oa, dOs, 16 * warp, ks * 16);
#pragma unroll
                for (int nk = 0; nk < NK; ++nk) {
                    unsigned vb[2];
                    attn_tc_frag_b_rows<LD>(vb, Vs, nk * 8, ks * 16);
                    mma_bf16_16816(dp[nk], oa, vb, dp[nk]);
                }
            }
        }
        cp_async_wait<0>();  // K(kt) landed
        __syncthreads();     // and every warp is done reading V(kt): V(kt + 1) may land there
        if (more) attn_tc_load_tile_async<HS, BK>(Vs, base + 2 * C, stride, k0 + BK, T_len);
        cp_async_commit();
        if (work) {
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                unsigned qa[4];
                attn_tc_frag_a<LD>(qa, Qs, 16 * warp, ks * 16);
#pragma unroll
                for (int nk = 0; nk < NK; ++nk) {
                    unsigned kb[2];
                    attn_tc_frag_b_rows<LD>(kb, Ks, nk * 8, ks * 16);
                    mma_bf16_16816(s[nk], qa, kb, s[nk]);
                }
            }
        }
        if (work) {
            // dS (into dp); keys after the row contribute nothing (rows ≥ T are never stored).
#pragma unroll
            for (int nk = 0; nk < NK; ++nk)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int key = k0 + nk * 8 + 2 * t + (i & 1), row = row0 + g + 8 * (i >> 1);
                    const float p = key <= row ? exp2f(s[nk][i] * sl2 - lse2[i >> 1]) : 0.0f;
                    dp[nk][i] = p * (dp[nk][i] - dr[i >> 1]);
                }
            // dQ += dS K over the tile's keys 16 at a time.
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                unsigned sa[4];
                attn_tc_c_to_a(sa, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
                for (int nd = 0; nd < ND; ++nd) {
                    unsigned kb[2];
                    attn_tc_frag_b_cols<LD>(kb, Ks, kk * 16, nd * 8);
                    mma_bf16_16816(dq[nd], sa, kb, dq[nd]);
                }
            }
        }
        __syncthreads();  // every warp is done reading K(kt): K(kt + 1) may land there
        if (more) attn_tc_load_tile_async<HS, BK>(Ks, base + C, stride, k0 + BK, T_len);
        cp_async_commit();
    }
    cp_async_wait<0>();  // (the last two groups are empty)
    if (active) {
        const float scale = 1.0f / sqrtf((float)HS);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row0 + g + 8 * r;
            if (row < T_len) {
                bf16* dst = dqkv + ((long long)b * T_len + row) * stride + (long long)h * HS + 2 * t;
#pragma unroll
                for (int nd = 0; nd < ND; ++nd)
                    attn_tc_st32(dst + nd * 8, attn_tc_pack(dq[nd][2 * r] * scale, dq[nd][2 * r + 1] * scale));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels: one per head size (bf16 storage only).

#define ATTN_TC_KERNELS(HS)                                                                                    \
    extern "C" __global__ void __launch_bounds__(ATTN_TC_THREADS)                                             \
        attention_tc_forward_hs##HS##_bf16(bf16* out, float* lse, const bf16* qkv, int T_len, int NH) {        \
        attention_tc_forward_impl<HS>(out, lse, qkv, T_len, NH);                                               \
    }                                                                                                          \
    EXPORT_KERNEL(attention_tc_forward_hs##HS##_bf16);                                                         \
    extern "C" __global__ void __launch_bounds__(ATTN_TC_THREADS) attention_tc_backward_dkv_hs##HS##_bf16(     \
        bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dsum, int T_len, int NH) { \
        attention_tc_backward_dkv_impl<HS>(dqkv, dout, qkv, lse, dsum, T_len, NH);                             \
    }                                                                                                          \
    EXPORT_KERNEL(attention_tc_backward_dkv_hs##HS##_bf16);                                                    \
    extern "C" __global__ void __launch_bounds__(ATTN_TC_THREADS) attention_tc_backward_dq_hs##HS##_bf16(      \
        bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dsum, int T_len, int NH) { \
        attention_tc_backward_dq_impl<HS>(dqkv, dout, qkv, lse, dsum, T_len, NH);                              \
    }                                                                                                          \
    EXPORT_KERNEL(attention_tc_backward_dq_hs##HS##_bf16);

ATTN_TC_KERNELS(64)
ATTN_TC_KERNELS(128)

// ---------------------------------------------------------------------------------------------
// Self-test of mma_bf16_16816's fragment layouts (one warp, 32 threads): d = a·b + c with a
// 16×16 and b 16×8 (K×N) row-major bf16, c and d 16×8 row-major fp32. Each lane gathers its
// fragments element by element as prelude.cuh documents them; a layout mistake (in the emulator
// or in the documentation) shows up as a wrong d on a GPU.
extern "C" __global__ void mma_selftest_bf16(float* d, const bf16* a, const bf16* b, const float* c) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    unsigned af[4], bfr[2];
    float cf[4], df[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);  // a[1], a[3]: rows g + 8
        af[i] = (unsigned)a[row * 16 + col] | ((unsigned)a[row * 16 + col + 1] << 16);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int k = 2 * t + 8 * i;
        bfr[i] = (unsigned)b[k * 8 + g] | ((unsigned)b[(k + 1) * 8 + g] << 16);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) cf[i] = c[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
    mma_bf16_16816(df, af, bfr, cf);
#pragma unroll
    for (int i = 0; i < 4; ++i) d[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = df[i];
}
EXPORT_KERNEL(mma_selftest_bf16);

// Self-test of the ldmatrix fragment loads (one warp, 32 threads, 768 bytes of dynamic shared
// memory): src is a 16×16 bf16 tile, row-major, copied into shared memory with the kernels' padded
// row stride (16 + 8 elements). Each lane loads an A fragment of the tile (rows 0–15, columns
// 0–15), a B fragment along rows (n0 = 8, k0 = 0) and one down columns (k0 = 0, n0 = 8), element
// by element into out[lane·16 + 0..8] and with ldmatrix into out[lane·16 + 8..16]: the two halves
// must be equal, and the first must be the layout of prelude.cuh (checked on the host).
extern "C" __global__ void ldmatrix_selftest(unsigned* out, const bf16* src) {
    constexpr int LD = 24;
    DYN_SMEM(bf16, tile);
    for (int i = threadIdx.x; i < 16 * 16; i += 32) tile[(i / 16) * LD + i % 16] = src[i];
    for (int i = threadIdx.x; i < 16; i += 32)
        for (int c = 16; c < LD; ++c) tile[i * LD + c] = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    unsigned a[4], br[2], bc[2];
    attn_tc_frag_a_lds<LD>(a, tile, 0, 0);
    attn_tc_frag_b_rows_lds<LD>(br, tile, 8, 0);
    attn_tc_frag_b_cols_lds<LD>(bc, tile, 0, 8);
    unsigned* mine = out + lane * 16;
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    for (int i = 0; i < 2; ++i) mine[4 + i] = br[i], mine[6 + i] = bc[i];
    attn_tc_frag_a_ldm<LD>(a, tile, 0, 0);
    attn_tc_frag_b_rows_ldm<LD>(br, tile, 8, 0);
    attn_tc_frag_b_cols_ldm<LD>(bc, tile, 0, 8);
    for (int i = 0; i < 4; ++i) mine[8 + i] = a[i];
    for (int i = 0; i < 2; ++i) mine[12 + i] = br[i], mine[14 + i] = bc[i];
}
EXPORT_KERNEL(ldmatrix_selftest);
