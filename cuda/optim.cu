// Optimizer-side kernels, twins of the CPU backend's adamw, sum_squares, scale, add_assign and of
// the bias half of matmul_backward_weight; plus fp32 ↔ bf16 casts. Storage fp32 or bf16 (kernel
// name suffixes), arithmetic fp32 (sums of squares: double).
//
// Memory contract: AdamW updates the fp32 master weights and fp32 moments in place and, when the
// copy pointer is non-null, overwrites the model's copy of the parameter (fp32 or bf16);
// `scale` and `add` update in place; casts overwrite; bias gradients accumulate (`dbias += …`).
//
// Launches (all deterministic: results depend on the shapes and the launch geometry only):
// - Elementwise kernels (adamw_*, scale_*, add_*, cast_*): 1-D grid-stride loops, any grid, any
//   block that is a multiple of 32. When every pointer is aligned to its 4-element pack the body
//   moves 4 elements per load/store (16 B for fp32), and a scalar loop handles the tail.
// - sum_squares_partial_*: G blocks (any G) write G double partials, each the sum of its
//   grid-stride slice; sum_squares_finish (one block) sums `count` partials in a fixed order.
// - bias_grad_partial_*: grid (ceil(N / 256), chunks), block (32, 16): block (c, k) sums rows
//   [k·rows_per_chunk, (k+1)·rows_per_chunk) of the 256 columns [256·c, 256·c + 256) into fp32
//   partials[k, N] (details at the kernel); bias_grad_finish_*: 1-D grid over N adds
//   Σ_k partials[k, n] (k ascending) to dbias[n].

template <typename T, int N>
struct alignas(sizeof(T) * N) OptimPack {
    T v[N];
};

#define OPTIM_W 4  // elements per vector access

__device__ __forceinline__ bool optim_aligned(const void* p, unsigned long long bytes) {
    return (reinterpret_cast<unsigned long long>(p) % bytes) == 0;
}

// Runs vec(pack index) over the first n / OPTIM_W packs when `aligned`, then scalar(i) over the
// rest, as a grid-stride loop.
template <typename Vec, typename Scalar>
__device__ __forceinline__ void optim_grid_loop(unsigned long long n, bool aligned, Vec vec, Scalar scalar) {
    unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long packs = aligned ? n / OPTIM_W : 0;
    for (unsigned long long i = tid; i < packs; i += stride) vec(i);
    for (unsigned long long i = packs * OPTIM_W + tid; i < n; i += stride) scalar(i);
}

// ---------------------------------------------------------------------------------------------
// AdamW. The host computes, exactly as the CPU backend does (in fp32):
//   step_size = lr / (1 − β1^t), bc2_sqrt = sqrt(1 − β2^t), decay = 1 − lr·wd,
// and each element follows the CPU backend's order of operations:
//   g = grad·grad_scale; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g·g;
//   p = p·decay − step_size·m / (sqrt(v)/bc2_sqrt + eps).
// `grad_scale` folds gradient clipping into the update (1 leaves g unchanged, bit for bit).

struct OptimAdam {
    float beta1, beta2, eps, step_size, bc2_sqrt, decay, grad_scale;
    __device__ __forceinline__ float update(float& p, float& m, float& v, float grad) const {
        float g = grad * grad_scale;
        m = beta1 * m + (1.0f - beta1) * g;
        v = beta2 * v + (1.0f - beta2) * g * g;
        float denom = sqrtf(v) / bc2_sqrt + eps;
        p = p * decay - step_size * m / denom;
        return p;
    }
};

// The AdamW loop over n elements; `adam_of(e, k)` gives the hyperparameters of element e + k for
// a pack starting at e (k < OPTIM_W), `adam_at(i)` those of element i on the scalar path.
template <typename G, typename C, typename PackAdam, typename ElemAdam>
__device__ __forceinline__ void adamw_loop(float* __restrict__ params, float* __restrict__ m, float* __restrict__ v,
                                           C* __restrict__ copy, const G* __restrict__ grads, unsigned long long n,
                                           PackAdam adam_of, ElemAdam adam_at) {
    bool aligned = optim_aligned(params, 16) && optim_aligned(m, 16) && optim_aligned(v, 16) &&
                   optim_aligned(grads, sizeof(G) * OPTIM_W) && optim_aligned(copy, sizeof(C) * OPTIM_W);
    typedef OptimPack<float, OPTIM_W> F4;
    typedef OptimPack<G, OPTIM_W> G4;
    typedef OptimPack<C, OPTIM_W> C4;
    optim_grid_loop(
        n, aligned,
        [&](unsigned long long i) {
            const unsigned long long e = i * OPTIM_W;
            F4 p = reinterpret_cast<F4*>(params)[i], mm = reinterpret_cast<F4*>(m)[i], vv = reinterpret_cast<F4*>(v)[i];
            G4 g = reinterpret_cast<const G4*>(grads)[i];
            C4 c;
            for (int k = 0; k < OPTIM_W; ++k) {
                const OptimAdam a = adam_of(e, k);
                c.v[k] = from_f32<C>(a.update(p.v[k], mm.v[k], vv.v[k], to_f32(g.v[k])));
            }
            reinterpret_cast<F4*>(params)[i] = p;
            reinterpret_cast<F4*>(m)[i] = mm;
            reinterpret_cast<F4*>(v)[i] = vv;
            if (copy != nullptr) reinterpret_cast<C4*>(copy)[i] = c;
        },
        [&](unsigned long long i) {
            const OptimAdam a = adam_at(i);
            float p = params[i], mm = m[i], vv = v[i];
            float out = a.update(p, mm, vv, to_f32(grads[i]));
            params[i] = p;
            m[i] = mm;
            v[i] = vv;
            if (copy != nullptr) copy[i] = from_f32<C>(out);
        });
}

template <typename G, typename C>
__device__ __forceinline__ void adamw_impl(float* __restrict__ params, float* __restrict__ m, float* __restrict__ v,
                                           C* __restrict__ copy, const G* __restrict__ grads, OptimAdam a,
                                           unsigned long long n) {
    adamw_loop(
        params, m, v, copy, grads, n, [&](unsigned long long, int) { return a; },
        [&](unsigned long long) { return a; });
}

#define OPTIM_ADAMW(GN, G, CN, C)                                                                                       \
    extern "C" __global__ void adamw_grad_##GN##_copy_##CN(float* params, float* m, float* v, C* copy, const G* grads, \
                                                           float beta1, float beta2, float eps, float step_size,       \
                                                           float bc2_sqrt, float decay, float grad_scale,              \
                                                           unsigned long long n) {                                     \
        OptimAdam a = {beta1, beta2, eps, step_size, bc2_sqrt, decay, grad_scale};                                     \
        adamw_impl(params, m, v, copy, grads, a, n);                                                                   \
    }                                                                                                                  \
    EXPORT_KERNEL(adamw_grad_##GN##_copy_##CN)
OPTIM_ADAMW(f32, float, f32, float);
OPTIM_ADAMW(f32, float, bf16, bf16);
OPTIM_ADAMW(bf16, bf16, f32, float);
OPTIM_ADAMW(bf16, bf16, bf16, bf16);

// AdamW over a whole arena of tensors in one launch: the tensors differ only in whether weight
// decay applies, so the launch takes the arena's runs of tensors with the same flag (run r
// covers [run_start[r], run_start[r + 1]), run_start[0] = 0, at most OPTIM_MAX_RUNS) and gives
// each element the `decay` factor or 1 — the per-tensor launches' arithmetic, bit for bit (a
// tensor without decay gets 1 − lr·0 = 1 there too). The run table is staged in shared memory
// and searched once per 4-element pack (per element where a pack straddles two runs).
#define OPTIM_MAX_RUNS 1024

template <typename G, typename C>
__device__ __forceinline__ void adamw_runs_impl(float* __restrict__ params, float* __restrict__ m,
                                                float* __restrict__ v, C* __restrict__ copy,
                                                const G* __restrict__ grads, OptimAdam a,
                                                const unsigned long long* __restrict__ run_start,
                                                const unsigned* __restrict__ run_decay, unsigned runs,
                                                unsigned long long n, unsigned long long* s_start, unsigned* s_decay) {
    for (unsigned r = threadIdx.x; r < runs; r += blockDim.x) {
        s_start[r] = run_start[r];
        s_decay[r] = run_decay[r];
    }
    __syncthreads();
    // The run holding element i: the last r with s_start[r] <= i.
    auto run_of = [&](unsigned long long i) {
        unsigned lo = 0, hi = runs;
        while (hi - lo > 1) {
            unsigned mid = (lo + hi) / 2;
            if (s_start[mid] <= i) lo = mid; else hi = mid;
        }
        return lo;
    };
    auto adam_of = [&](unsigned r) {
        OptimAdam b = a;
        if (s_decay[r] == 0u) b.decay = 1.0f;
        return b;
    };
    // A pack's run is searched once (its first element) and reused while the pack stays in it.
    unsigned long long cached_e = ~0ull, cached_end = 0;
    unsigned cached_r = 0;
    adamw_loop(
        params, m, v, copy, grads, n,
        [&](unsigned long long e, int k) {
            if (e != cached_e) {
                cached_e = e;
                cached_r = run_of(e);
                cached_end = cached_r + 1 < runs ? s_start[cached_r + 1] : n;
            }
            return adam_of(e + k < cached_end ? cached_r : run_of(e + k));
        },
        [&](unsigned long long i) { return adam_of(run_of(i)); });
}

#define OPTIM_ADAMW_RUNS(GN, G, CN, C)                                                                                 \
    extern "C" __global__ void adamw_runs_grad_##GN##_copy_##CN(                                                       \
        float* params, float* m, float* v, C* copy, const G* grads, float beta1, float beta2, float eps,               \
        float step_size, float bc2_sqrt, float decay, float grad_scale, const unsigned long long* run_start,           \
        const unsigned* run_decay, unsigned runs, unsigned long long n) {                                              \
        __shared__ unsigned long long s_start[OPTIM_MAX_RUNS];                                                         \
        __shared__ unsigned s_decay[OPTIM_MAX_RUNS];                                                                   \
        OptimAdam a = {beta1, beta2, eps, step_size, bc2_sqrt, decay, grad_scale};                                     \
        adamw_runs_impl(params, m, v, copy, grads, a, run_start, run_decay, runs, n, s_start, s_decay);                \
    }                                                                                                                  \
    EXPORT_KERNEL(adamw_runs_grad_##GN##_copy_##CN)
OPTIM_ADAMW_RUNS(f32, float, f32, float);
OPTIM_ADAMW_RUNS(f32, float, bf16, bf16);

// ---------------------------------------------------------------------------------------------
// Σ x² in double.

__device__ __forceinline__ double optim_warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Sum over the block, returned to every thread; `scratch` is 32 doubles of shared memory.
__device__ __forceinline__ double optim_block_sum_f64(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = optim_warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double t = lane < warps ? scratch[lane] : 0.0;
    return optim_warp_sum_f64(t);
}

template <typename T>
__device__ __forceinline__ void sum_squares_partial_impl(double* __restrict__ partials, const T* __restrict__ x,
                                                         unsigned long long n, double* scratch) {
    typedef OptimPack<T, OPTIM_W> P;
    double acc = 0.0;
    optim_grid_loop(
        n, optim_aligned(x, sizeof(P)),
        [&](unsigned long long i) {
            P p = reinterpret_cast<const P*>(x)[i];
            for (int k = 0; k < OPTIM_W; ++k) {
                double d = (double)to_f32(p.v[k]);
                acc += d * d;
            }
        },
        [&](unsigned long long i) {
            double d = (double)to_f32(x[i]);
            acc += d * d;
        });
    acc = optim_block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

extern "C" __global__ void sum_squares_partial_f32(double* partials, const float* x, unsigned long long n) {
    __shared__ double scratch[32];
    sum_squares_partial_impl(partials, x, n, scratch);
}
EXPORT_KERNEL(sum_squares_partial_f32);
extern "C" __global__ void sum_squares_partial_bf16(double* partials, const bf16* x, unsigned long long n) {
    __shared__ double scratch[32];
    sum_squares_partial_impl(partials, x, n, scratch);
}
EXPORT_KERNEL(sum_squares_partial_bf16);

// out[0] = Σ partials[0..count). Launch: one block.
extern "C" __global__ void sum_squares_finish(double* out, const double* partials, unsigned int count) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (unsigned int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    acc = optim_block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) out[0] = acc;
}
EXPORT_KERNEL(sum_squares_finish);

// ---------------------------------------------------------------------------------------------
// x *= s, dst += src, casts.

template <typename T>
__device__ __forceinline__ void scale_impl(T* __restrict__ x, float s, unsigned long long n) {
    typedef OptimPack<T, OPTIM_W> P;
    optim_grid_loop(
        n, optim_aligned(x, sizeof(P)),
        [&](unsigned long long i) {
            P p = reinterpret_cast<P*>(x)[i];
            for (int k = 0; k < OPTIM_W; ++k) p.v[k] = from_f32<T>(to_f32(p.v[k]) * s);
            reinterpret_cast<P*>(x)[i] = p;
        },
        [&](unsigned long long i) { x[i] = from_f32<T>(to_f32(x[i]) * s); });
}

template <typename T>
__device__ __forceinline__ void add_impl(T* __restrict__ dst, const T* __restrict__ src, unsigned long long n) {
    typedef OptimPack<T, OPTIM_W> P;
    optim_grid_loop(
        n, optim_aligned(dst, sizeof(P)) && optim_aligned(src, sizeof(P)),
        [&](unsigned long long i) {
            P d = reinterpret_cast<P*>(dst)[i];
            P s = reinterpret_cast<const P*>(src)[i];
            for (int k = 0; k < OPTIM_W; ++k) d.v[k] = from_f32<T>(to_f32(d.v[k]) + to_f32(s.v[k]));
            reinterpret_cast<P*>(dst)[i] = d;
        },
        [&](unsigned long long i) { dst[i] = from_f32<T>(to_f32(dst[i]) + to_f32(src[i])); });
}

template <typename O, typename I>
__device__ __forceinline__ void cast_impl(O* __restrict__ out, const I* __restrict__ inp, unsigned long long n) {
    typedef OptimPack<O, OPTIM_W> PO;
    typedef OptimPack<I, OPTIM_W> PI;
    optim_grid_loop(
        n, optim_aligned(out, sizeof(PO)) && optim_aligned(inp, sizeof(PI)),
        [&](unsigned long long i) {
            PI a = reinterpret_cast<const PI*>(inp)[i];
            PO b;
            for (int k = 0; k < OPTIM_W; ++k) b.v[k] = from_f32<O>(to_f32(a.v[k]));
            reinterpret_cast<PO*>(out)[i] = b;
        },
        [&](unsigned long long i) { out[i] = from_f32<O>(to_f32(inp[i])); });
}

extern "C" __global__ void scale_f32(float* x, float s, unsigned long long n) { scale_impl(x, s, n); }
EXPORT_KERNEL(scale_f32);
extern "C" __global__ void scale_bf16(bf16* x, float s, unsigned long long n) { scale_impl(x, s, n); }
EXPORT_KERNEL(scale_bf16);
extern "C" __global__ void add_f32(float* dst, const float* src, unsigned long long n) { add_impl(dst, src, n); }
EXPORT_KERNEL(add_f32);
extern "C" __global__ void add_bf16(bf16* dst, const bf16* src, unsigned long long n) { add_impl(dst, src, n); }
EXPORT_KERNEL(add_bf16);
extern "C" __global__ void cast_f32_to_bf16(bf16* out, const float* inp, unsigned long long n) { cast_impl(out, inp, n); }
EXPORT_KERNEL(cast_f32_to_bf16);
extern "C" __global__ void cast_bf16_to_f32(float* out, const bf16* inp, unsigned long long n) { cast_impl(out, inp, n); }
EXPORT_KERNEL(cast_bf16_to_f32);

// ---------------------------------------------------------------------------------------------
// Bias gradient: dbias[n] += Σ_rows dout[rows, N] (column sums), fp32 partials, fixed order.
//
// A partial block covers BIAS_COLS = 256 columns and one chunk of rows. Its 16 warps take the
// chunk's rows in 16 interleaved phases (warp y: rows r0 + y, r0 + y + 16, …), and each lane owns
// 8 columns of the tile:
// - vector path (N a multiple of the 16-byte pack, dout 16-byte aligned, so every row starts
//   aligned): lane x owns the packs at tile columns p·32·V + x·V + [0, V), p < 8 / V, with V = 8
//   for bf16 (one 16-byte load per row) or 4 for fp32 (two): each warp load reads 512 contiguous
//   bytes of a row;
// - scalar path (any other N or alignment): lane x owns tile columns x + 32·j, j < 8, one element
//   per load (still coalesced: a warp load reads 32 consecutive elements).
// Rows are loaded BIAS_UNROLL phases at a time before they are added (independent loads in flight).
// Either way each (phase, column) accumulator adds its rows in ascending order, starting from 0, so
// both paths give the same bits; the 16 phases of a column are then summed in phase order through
// shared memory into partials[chunk, column]. The host sizes the grid (bias_grad in
// src/gpu/ops/optim.rs) as a function of rows and N only.

#define BIAS_COLS 256     // columns per block
#define BIAS_PER_LANE 8   // columns per lane (BIAS_COLS / 32)
#define BIAS_WARPS 16     // warps per block = row phases
#define BIAS_UNROLL 4     // row phases' rows loaded per batch before they are added
#define BIAS_THREADS (32 * BIAS_WARPS)

template <typename T>
__device__ __forceinline__ void bias_grad_partial_impl(float* __restrict__ partials, const T* __restrict__ dout,
                                                       unsigned int rows, unsigned int N, unsigned int rows_per_chunk,
                                                       float (*tile)[BIAS_COLS]) {
    constexpr int V = 16 / (int)sizeof(T);   // elements per 16-byte pack
    constexpr int PACKS = BIAS_PER_LANE / V; // packs per lane and row
    typedef OptimPack<T, V> P;
    const unsigned int lane = threadIdx.x, phase = threadIdx.y;
    const unsigned int c0 = blockIdx.x * BIAS_COLS;
    const unsigned long long r0 = (unsigned long long)blockIdx.y * rows_per_chunk;
    const unsigned long long r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    const bool vec = N % V == 0 && optim_aligned(dout, 16); // the same for every thread of the grid
    unsigned int col[BIAS_PER_LANE]; // the lane's columns, relative to c0
    float acc[BIAS_PER_LANE];
#pragma unroll
    for (int k = 0; k < BIAS_PER_LANE; ++k) {
        col[k] = vec ? (k / V) * 32 * V + lane * V + k % V : lane + 32 * k;
        acc[k] = 0.0f;
    }
    if (vec) {
        bool live[PACKS]; // N % V == 0: a pack is wholly inside or wholly past N
#pragma unroll
        for (int p = 0; p < PACKS; ++p) live[p] = c0 + col[p * V] < N;
        for (unsigned long long r = r0 + phase; r < r1; r += BIAS_UNROLL * BIAS_WARPS) {
            P x[BIAS_UNROLL][PACKS] = {};
#pragma unroll
            for (int u = 0; u < BIAS_UNROLL; ++u) {
                unsigned long long ru = r + (unsigned long long)u * BIAS_WARPS;
#pragma unroll
                for (int p = 0; p < PACKS; ++p)
                    if (ru < r1 && live[p]) x[u][p] = *reinterpret_cast<const P*>(dout + ru * N + c0 + col[p * V]);
            }
#pragma unroll
            for (int u = 0; u < BIAS_UNROLL; ++u) {
                if (r + (unsigned long long)u * BIAS_WARPS >= r1) break;
#pragma unroll
                for (int p = 0; p < PACKS; ++p)
#pragma unroll
                    for (int v = 0; v < V; ++v) acc[p * V + v] += to_f32(x[u][p].v[v]);
            }
        }
        // Packs past N added zeros to accumulators that start at +0 (no -0): they stay +0 and are
        // not written below.
    } else {
        for (unsigned long long r = r0 + phase; r < r1; r += BIAS_UNROLL * BIAS_WARPS) {
            T x[BIAS_UNROLL][BIAS_PER_LANE] = {};
#pragma unroll
            for (int u = 0; u < BIAS_UNROLL; ++u) {
                unsigned long long ru = r + (unsigned long long)u * BIAS_WARPS;
#pragma unroll
                for (int k = 0; k < BIAS_PER_LANE; ++k)
                    if (ru < r1 && c0 + col[k] < N) x[u][k] = dout[ru * N + c0 + col[k]];
            }
#pragma unroll
            for (int u = 0; u < BIAS_UNROLL; ++u) {
                if (r + (unsigned long long)u * BIAS_WARPS >= r1) break;
#pragma unroll
                for (int k = 0; k < BIAS_PER_LANE; ++k) acc[k] += to_f32(x[u][k]);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < BIAS_PER_LANE; ++k) tile[phase][col[k]] = acc[k];
    __syncthreads();
    const unsigned int t = phase * 32 + lane; // one thread per tile column
    if (t < BIAS_COLS && c0 + t < N) {
        float sum = tile[0][t];
#pragma unroll
        for (int y = 1; y < BIAS_WARPS; ++y) sum += tile[y][t];
        partials[(unsigned long long)blockIdx.y * N + c0 + t] = sum;
    }
}

#define BIAS_FINISH_BATCH 8 // partials loaded per column before they are added

template <typename D>
__device__ __forceinline__ void bias_grad_finish_impl(D* __restrict__ dbias, const float* __restrict__ partials,
                                                      unsigned int chunks, unsigned int N) {
    unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < N) {
        const float* col = partials + c;
        float sum = 0.0f;
        unsigned int k = 0;
        for (; k + BIAS_FINISH_BATCH <= chunks; k += BIAS_FINISH_BATCH) {
            float x[BIAS_FINISH_BATCH];
#pragma unroll
            for (int i = 0; i < BIAS_FINISH_BATCH; ++i) x[i] = col[(unsigned long long)(k + i) * N];
#pragma unroll
            for (int i = 0; i < BIAS_FINISH_BATCH; ++i) sum += x[i];
        }
        for (; k < chunks; ++k) sum += col[(unsigned long long)k * N];
        dbias[c] = from_f32<D>(to_f32(dbias[c]) + sum);
    }
}

extern "C" __global__ void __launch_bounds__(BIAS_THREADS, 2)
    bias_grad_partial_f32(float* partials, const float* dout, unsigned int rows, unsigned int N,
                          unsigned int rows_per_chunk) {
    __shared__ float tile[BIAS_WARPS][BIAS_COLS];
    bias_grad_partial_impl(partials, dout, rows, N, rows_per_chunk, tile);
}
EXPORT_KERNEL(bias_grad_partial_f32);
extern "C" __global__ void __launch_bounds__(BIAS_THREADS, 2)
    bias_grad_partial_bf16(float* partials, const bf16* dout, unsigned int rows, unsigned int N,
                           unsigned int rows_per_chunk) {
    __shared__ float tile[BIAS_WARPS][BIAS_COLS];
    bias_grad_partial_impl(partials, dout, rows, N, rows_per_chunk, tile);
}
EXPORT_KERNEL(bias_grad_partial_bf16);
extern "C" __global__ void bias_grad_finish_f32(float* dbias, const float* partials, unsigned int chunks, unsigned int N) {
    bias_grad_finish_impl(dbias, partials, chunks, N);
}
EXPORT_KERNEL(bias_grad_finish_f32);
extern "C" __global__ void bias_grad_finish_bf16(bf16* dbias, const float* partials, unsigned int chunks, unsigned int N) {
    bias_grad_finish_impl(dbias, partials, chunks, N);
}
EXPORT_KERNEL(bias_grad_finish_bf16);
