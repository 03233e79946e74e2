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
// - bias_grad_partial_*: grid (ceil(N / 32), chunks), block (32, 8): block (c, k) sums rows
//   [k·rows_per_chunk, (k+1)·rows_per_chunk) of 32 columns into fp32 partials[k, N];
//   bias_grad_finish_*: 1-D grid over N adds Σ_k partials[k, n] (k ascending) to dbias[n].

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

template <typename G, typename C>
__device__ __forceinline__ void adamw_impl(float* __restrict__ params, float* __restrict__ m, float* __restrict__ v,
                                           C* __restrict__ copy, const G* __restrict__ grads, OptimAdam a,
                                           unsigned long long n) {
    bool aligned = optim_aligned(params, 16) && optim_aligned(m, 16) && optim_aligned(v, 16) &&
                   optim_aligned(grads, sizeof(G) * OPTIM_W) && optim_aligned(copy, sizeof(C) * OPTIM_W);
    typedef OptimPack<float, OPTIM_W> F4;
    typedef OptimPack<G, OPTIM_W> G4;
    typedef OptimPack<C, OPTIM_W> C4;
    optim_grid_loop(
        n, aligned,
        [&](unsigned long long i) {
            F4 p = reinterpret_cast<F4*>(params)[i], mm = reinterpret_cast<F4*>(m)[i], vv = reinterpret_cast<F4*>(v)[i];
            G4 g = reinterpret_cast<const G4*>(grads)[i];
            C4 c;
            for (int k = 0; k < OPTIM_W; ++k) c.v[k] = from_f32<C>(a.update(p.v[k], mm.v[k], vv.v[k], to_f32(g.v[k])));
            reinterpret_cast<F4*>(params)[i] = p;
            reinterpret_cast<F4*>(m)[i] = mm;
            reinterpret_cast<F4*>(v)[i] = vv;
            if (copy != nullptr) reinterpret_cast<C4*>(copy)[i] = c;
        },
        [&](unsigned long long i) {
            float p = params[i], mm = m[i], vv = v[i];
            float out = a.update(p, mm, vv, to_f32(grads[i]));
            params[i] = p;
            m[i] = mm;
            v[i] = vv;
            if (copy != nullptr) copy[i] = from_f32<C>(out);
        });
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

#define BIAS_TILE_X 32  // columns per block (one per lane: a warp reads 32 consecutive columns)
#define BIAS_TILE_Y 8   // row phases per block

template <typename T>
__device__ __forceinline__ void bias_grad_partial_impl(float* __restrict__ partials, const T* __restrict__ dout,
                                                       unsigned int rows, unsigned int N, unsigned int rows_per_chunk,
                                                       float (*tile)[BIAS_TILE_X]) {
    unsigned int c = blockIdx.x * BIAS_TILE_X + threadIdx.x;
    unsigned long long r0 = (unsigned long long)blockIdx.y * rows_per_chunk;
    unsigned long long r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    float acc = 0.0f;
    if (c < N)
        for (unsigned long long r = r0 + threadIdx.y; r < r1; r += BIAS_TILE_Y) acc += to_f32(dout[r * N + c]);
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < N) {
        float sum = tile[0][threadIdx.x];
        for (int y = 1; y < BIAS_TILE_Y; ++y) sum += tile[y][threadIdx.x];
        partials[(unsigned long long)blockIdx.y * N + c] = sum;
    }
}

template <typename D>
__device__ __forceinline__ void bias_grad_finish_impl(D* __restrict__ dbias, const float* __restrict__ partials,
                                                      unsigned int chunks, unsigned int N) {
    unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < N) {
        float sum = 0.0f;
        for (unsigned int k = 0; k < chunks; ++k) sum += partials[(unsigned long long)k * N + c];
        dbias[c] = from_f32<D>(to_f32(dbias[c]) + sum);
    }
}

extern "C" __global__ void bias_grad_partial_f32(float* partials, const float* dout, unsigned int rows, unsigned int N,
                                                 unsigned int rows_per_chunk) {
    __shared__ float tile[BIAS_TILE_Y][BIAS_TILE_X];
    bias_grad_partial_impl(partials, dout, rows, N, rows_per_chunk, tile);
}
EXPORT_KERNEL(bias_grad_partial_f32);
extern "C" __global__ void bias_grad_partial_bf16(float* partials, const bf16* dout, unsigned int rows, unsigned int N,
                                                  unsigned int rows_per_chunk) {
    __shared__ float tile[BIAS_TILE_Y][BIAS_TILE_X];
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
