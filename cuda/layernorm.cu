// LayerNorm (eps 1e-5) forward, fused residual add + LayerNorm forward, and backward, on fp32 or
// bf16 storage with fp32 arithmetic. Twins of the CPU backend's layernorm_forward,
// residual_layernorm_forward and layernorm_backward (src/kernels/cpu/norm.rs).
//
// Shapes: inp, out, resid, a, b, dout, dinp [rows, C] of the storage type T; weight, bias [C] of
// T; dweight, dbias [C] fp32 for either T (parameter gradients are always fp32, Megatron's rule);
// mean, rstd [rows] fp32; scratch [nblocks, 2C] fp32.
//
// Memory contract: forward overwrites out, resid, mean and rstd. Backward ACCUMULATES into dinp
// (it sits on the residual stream; a bf16 dinp is read, added to in fp32 and rounded once) and
// into the fp32 dweight/dbias (parameter gradients, added to in fp32 with no bf16 rounding).
//
// Kernels (every name exists for _f32 and _bf16; `_vec` variants need C a multiple of
// 16 / sizeof(T) and 16-byte aligned pointers, and move 16 bytes per lane per access):
// - layernorm_forward[_vec]_T(out, mean, rstd, inp, weight, bias, rows, C)
// - residual_layernorm_forward[_vec]_T(resid, out, mean, rstd, a, b, weight, bias, rows, C):
//   resid = a + b (rounded to T), out = LN(resid as stored), so forward and backward see the same
//   input.
//   Both: one warp per row, blockDim.x / 32 rows per block, grid ceil(rows / (blockDim.x / 32)).
//   Two-pass statistics (mean, then Σ(x − mean)²): the row is re-read from L1/L2, not HBM.
// - layernorm_backward[_vec]_T(dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rpb):
//   block i owns rows [i·rpb, min((i+1)·rpb, rows)); grid ceil(rows / rpb), any blockDim multiple
//   of 32. Phase A: one warp per row (rows of the block strided by warps) adds the input gradient
//   into dinp. Phase B: thread-per-channel partial sums of dweight (Σ dout·norm) and dbias
//   (Σ dout) over the block's rows, in row order, written to scratch[i, 0:C] and scratch[i, C:2C].
//   The phases touch disjoint outputs, so no barrier separates them; phase B re-reads dout and inp
//   while they are still in L2.
// - layernorm_backward_reduce_T(dweight, dbias, scratch, nblocks, C): dweight, dbias fp32 for
//   both T (the _bf16 name is kept for the host's dtype-suffixed launch; the two are identical).
//   Column k of the 2C scratch
//   columns is lane k % 32 of block k / 32; grid ceil(2C / 32). Warp w sums the partials of
//   blocks w, w + warps, … in order, then warp 0 adds the per-warp sums in warp order to the
//   gradient. The result depends only on (rows, C, rpb, blockDim): no atomics, bitwise
//   reproducible.

#define LN_EPS 1e-5f


// What a value becomes once stored as T and read back.
template <typename T> __device__ __forceinline__ float ln_round(float x) { return to_f32(from_f32<T>(x)); }

// Passes 2 and 3 of the forward for one row held by one warp: `sum` is this lane's share of Σx.
template <typename T, bool VEC>
__device__ __forceinline__ void ln_normalize_row(T* __restrict__ o, const T* x, const T* __restrict__ weight,
                                                 const T* __restrict__ bias, unsigned int C, float sum,
                                                 float* mean_out, float* rstd_out) {
    typedef vec_io<T, VEC> io;
    const int P = io::P;
    const unsigned int lane = threadIdx.x & 31;
    const float mu = warp_sum(sum) / (float)C;
    float sq = 0.0f;
    for (unsigned int j = lane * P; j < C; j += 32 * P) {
        float v[P];
        io::load(v, x + j);
        for (int k = 0; k < P; ++k) {
            float d = v[k] - mu;
            sq += d * d;
        }
    }
    const float rs = rsqrtf(warp_sum(sq) / (float)C + LN_EPS);
    for (unsigned int j = lane * P; j < C; j += 32 * P) {
        float v[P], w[P], b[P];
        io::load(v, x + j);
        io::load(w, weight + j);
        io::load(b, bias + j);
        for (int k = 0; k < P; ++k) v[k] = (v[k] - mu) * rs * w[k] + b[k];
        io::store(o + j, v);
    }
    if (lane == 0) {
        *mean_out = mu;
        *rstd_out = rs;
    }
}

template <typename T, bool VEC>
__device__ __forceinline__ void ln_forward_impl(T* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                                                const T* __restrict__ inp, const T* __restrict__ weight,
                                                const T* __restrict__ bias, unsigned int rows, unsigned int C) {
    typedef vec_io<T, VEC> io;
    const int P = io::P;
    const unsigned int lane = threadIdx.x & 31;
    const unsigned long long row = (unsigned long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp leaves together; this kernel has no block barrier
    const T* x = inp + row * C;
    float s = 0.0f;
    for (unsigned int j = lane * P; j < C; j += 32 * P) {
        float v[P];
        io::load(v, x + j);
        for (int k = 0; k < P; ++k) s += v[k];
    }
    ln_normalize_row<T, VEC>(out + row * C, x, weight, bias, C, s, mean + row, rstd + row);
}

template <typename T, bool VEC>
__device__ __forceinline__ void ln_residual_forward_impl(T* resid, T* __restrict__ out, float* __restrict__ mean,
                                                         float* __restrict__ rstd, const T* __restrict__ a,
                                                         const T* __restrict__ b, const T* __restrict__ weight,
                                                         const T* __restrict__ bias, unsigned int rows, unsigned int C) {
    typedef vec_io<T, VEC> io;
    const int P = io::P;
    const unsigned int lane = threadIdx.x & 31;
    const unsigned long long row = (unsigned long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    T* r = resid + row * C;
    float s = 0.0f;
    for (unsigned int j = lane * P; j < C; j += 32 * P) {
        float va[P], vb[P];
        io::load(va, a + row * C + j);
        io::load(vb, b + row * C + j);
        for (int k = 0; k < P; ++k) va[k] += vb[k];
        io::store(r + j, va);
        for (int k = 0; k < P; ++k) s += ln_round<T>(va[k]);
    }
    // The later passes re-read resid: each lane reads back only the elements it wrote.
    ln_normalize_row<T, VEC>(out + row * C, r, weight, bias, C, s, mean + row, rstd + row);
}

template <typename T, bool VEC>
__device__ __forceinline__ void ln_backward_impl(T* __restrict__ dinp, float* __restrict__ scratch,
                                                 const T* __restrict__ dout, const T* __restrict__ inp,
                                                 const T* __restrict__ weight, const float* __restrict__ mean,
                                                 const float* __restrict__ rstd, unsigned int rows, unsigned int C,
                                                 unsigned int rpb) {
    typedef vec_io<T, VEC> io;
    const int P = io::P;
    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned long long r0 = (unsigned long long)blockIdx.x * rpb;
    const unsigned long long r1 = r0 + rpb < rows ? r0 + rpb : rows;
    const float inv_c = 1.0f / (float)C;

    // Phase A: dinp += (dnorm − mean(dnorm) − norm · mean(dnorm · norm)) · rstd, one warp per row.
    for (unsigned long long row = r0 + warp; row < r1; row += warps) {
        const T* x = inp + row * C;
        const T* g = dout + row * C;
        const float mu = mean[row], rs = rstd[row];
        float s1 = 0.0f, s2 = 0.0f;
        for (unsigned int j = lane * P; j < C; j += 32 * P) {
            float v[P], gv[P], w[P];
            io::load(v, x + j);
            io::load(gv, g + j);
            io::load(w, weight + j);
            for (int k = 0; k < P; ++k) {
                float dnorm = gv[k] * w[k];
                s1 += dnorm;
                s2 += dnorm * ((v[k] - mu) * rs);
            }
        }
        const float m1 = warp_sum(s1) * inv_c, m2 = warp_sum(s2) * inv_c;
        T* d = dinp + row * C;
        for (unsigned int j = lane * P; j < C; j += 32 * P) {
            float v[P], gv[P], w[P], dv[P];
            io::load(v, x + j);
            io::load(gv, g + j);
            io::load(w, weight + j);
            io::load(dv, d + j);
            for (int k = 0; k < P; ++k) dv[k] += (gv[k] * w[k] - m1 - (v[k] - mu) * rs * m2) * rs;
            io::store(d + j, dv);
        }
    }

    // Phase B: this block's partial dweight and dbias, rows summed in order.
    float* part = scratch + (unsigned long long)blockIdx.x * 2 * C;
    for (unsigned int j = threadIdx.x * P; j < C; j += blockDim.x * P) {
        float dw[P], db[P];
        for (int k = 0; k < P; ++k) dw[k] = db[k] = 0.0f;
        for (unsigned long long row = r0; row < r1; ++row) {
            float v[P], gv[P];
            io::load(v, inp + row * C + j);
            io::load(gv, dout + row * C + j);
            const float mu = mean[row], rs = rstd[row];
            for (int k = 0; k < P; ++k) {
                dw[k] += gv[k] * ((v[k] - mu) * rs);
                db[k] += gv[k];
            }
        }
        if constexpr (VEC) {
            for (int k = 0; k < P; k += 4) {
                vec_io<float, true>::store(part + j + k, dw + k);
                vec_io<float, true>::store(part + C + j + k, db + k);
            }
        } else {
            part[j] = dw[0];
            part[C + j] = db[0];
        }
    }
}

__device__ __forceinline__ void ln_backward_reduce_impl(float* __restrict__ dweight, float* __restrict__ dbias,
                                                        const float* __restrict__ scratch, unsigned int nblocks,
                                                        unsigned int C) {
    __shared__ float sums[32][33];
    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned long long cols = 2ull * C;
    const unsigned long long col = (unsigned long long)blockIdx.x * 32 + lane;
    float s = 0.0f;
    if (col < cols)
        for (unsigned int b = warp; b < nblocks; b += warps) s += scratch[b * cols + col];
    sums[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && col < cols) {
        float t = 0.0f;
        for (unsigned int w = 0; w < warps; ++w) t += sums[w][lane];
        float* dst = col < C ? dweight + col : dbias + (col - C);
        *dst += t;
    }
}

#define LN_KERNELS(T, SUF, VEC)                                                                                    \
    extern "C" __global__ void layernorm_forward_##SUF(T* out, float* mean, float* rstd, const T* inp,            \
                                                       const T* weight, const T* bias, unsigned int rows,        \
                                                       unsigned int C) {                                         \
        ln_forward_impl<T, VEC>(out, mean, rstd, inp, weight, bias, rows, C);                                    \
    }                                                                                                            \
    EXPORT_KERNEL(layernorm_forward_##SUF);                                                                      \
    extern "C" __global__ void residual_layernorm_forward_##SUF(T* resid, T* out, float* mean, float* rstd,      \
                                                                const T* a, const T* b, const T* weight,         \
                                                                const T* bias, unsigned int rows,                \
                                                                unsigned int C) {                                \
        ln_residual_forward_impl<T, VEC>(resid, out, mean, rstd, a, b, weight, bias, rows, C);                   \
    }                                                                                                            \
    EXPORT_KERNEL(residual_layernorm_forward_##SUF);                                                             \
    extern "C" __global__ void layernorm_backward_##SUF(T* dinp, float* scratch, const T* dout, const T* inp,    \
                                                        const T* weight, const float* mean, const float* rstd,   \
                                                        unsigned int rows, unsigned int C, unsigned int rpb) {   \
        ln_backward_impl<T, VEC>(dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rpb);                    \
    }                                                                                                            \
    EXPORT_KERNEL(layernorm_backward_##SUF);

LN_KERNELS(float, f32, false)
LN_KERNELS(bf16, bf16, false)
LN_KERNELS(float, vec_f32, true)
LN_KERNELS(bf16, vec_bf16, true)

extern "C" __global__ void layernorm_backward_reduce_f32(float* dweight, float* dbias, const float* scratch,
                                                         unsigned int nblocks, unsigned int C) {
    ln_backward_reduce_impl(dweight, dbias, scratch, nblocks, C);
}
EXPORT_KERNEL(layernorm_backward_reduce_f32);
extern "C" __global__ void layernorm_backward_reduce_bf16(float* dweight, float* dbias, const float* scratch,
                                                          unsigned int nblocks, unsigned int C) {
    ln_backward_reduce_impl(dweight, dbias, scratch, nblocks, C);
}
EXPORT_KERNEL(layernorm_backward_reduce_bf16);
