// troupe CUDA prelude: prepended to every kernel file, both when NVRTC compiles the kernels for
// a GPU and when the CPU emulator (cuda/emu/emu.h, TROUPE_EMU defined) compiles them as C++.
// It must therefore use no CUDA header: bf16 is stored as a 16-bit integer and converted by bit
// manipulation (round to nearest even, NaN kept quiet), which is exact and costs two integer ops.
//
// Conventions for every kernel file:
// - Kernels are `extern "C" __global__` with plain pointer/scalar parameters and are followed by
//   `EXPORT_KERNEL(name);` (registers them with the emulator; nothing on a GPU).
// - Block sizes are multiples of 32 and every thread of a warp reaches every shuffle; every thread
//   of a block reaches every __syncthreads() (no early return before a barrier).
// - Dynamic shared memory is declared with `DYN_SMEM(type, name);`.
// - Reductions run in an order fixed by the shapes and the launch geometry: results never depend
//   on timing (no float atomics).
#ifndef TROUPE_EMU
#define EXPORT_KERNEL(name)
// One file-scope declaration of the dynamic shared memory: declared inside both extern "C"
// kernels and C++ templates it would have two linkages (an NVRTC warning).
extern __shared__ __align__(16) unsigned char troupe_dyn_smem_[];
#define DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(troupe_dyn_smem_)
#endif

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

typedef unsigned short bf16;

__device__ __forceinline__ float bf16_to_f32(bf16 h) { return __uint_as_float(((unsigned int)h) << 16); }

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x0040u); // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// Loads and stores that read fp32 or bf16 storage as fp32 values.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return bf16_to_f32(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return f32_to_bf16(x); }

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Warp-level tensor-core product D = A·B + C (PTX `mma.sync.aligned.m16n8k16.row.col.f32.bf16.
// bf16.f32`): A 16×16 and B 16×8 in bf16, C and D 16×8 in fp32. Every lane of the warp must call
// it with the same shape of arguments (a warp-collective: on the emulator it meets the other
// lanes at a warp barrier). d may be c (in-place accumulation).
//
// Fragment layouts, from the PTX ISA, section "Matrix Fragments for mma.m16n8k16 with floating
// point type" (lane = 0..31, g = lane >> 2, t = lane & 3; each 32-bit register holds two bf16,
// the lower column / k index in the lower 16 bits):
//   A (16×16, row-major):  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                          a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B (16×8, K×N, "col": a register holds two consecutive k):
//                          b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C, D (16×8 fp32):      c[0] = C[g][2t]   c[1] = C[g][2t+1]   c[2] = C[g+8][2t]   c[3] = C[g+8][2t+1]
// The emulator (cuda/emu/emu.h) implements the same layouts; the kernel mma_selftest_bf16
// (cuda/attention_tc.cu) and its test check them against a host product on a GPU.
#ifndef TROUPE_EMU
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                               const float (&c)[4]) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    // No bf16 mma before sm_80: the module still compiles (the other kernels stay usable) and a
    // kernel that reaches this traps instead of computing garbage.
    (void)a, (void)b;
    for (int i = 0; i < 4; ++i) d[i] = c[i];
    asm volatile("trap;");
#endif
}
#endif

// Warp-level loads of 8×8 matrices of 16-bit elements from shared memory (PTX `ldmatrix.sync.
// aligned.m8n8.xN{.trans}.shared.b16`, sm_75+), from the PTX ISA, section "Warp-level matrix load
// instruction: ldmatrix": lane 8·i + r gives the address of row r of matrix i (8 consecutive
// elements, 16-byte aligned; with N < 4 the higher lanes' addresses are not read, but are given);
// register i of lane 4·r + w receives elements (r, 2w) and (r, 2w + 1) of matrix i, the first in
// the lower 16 bits — or, with TRANS, elements (2w, r) and (2w + 1, r). So one x4 load of the four
// 8×8 quarters of a row-major 16×16 tile (rows 0–7 and 8–15 of columns 0–7, then of 8–15) is an
// mma A fragment, and a TRANS load of a k-major tile a B fragment (see mma_bf16_16816). A
// warp-collective like mma_bf16_16816; the emulator implements the same layout, and the kernel
// ldmatrix_selftest (cuda/attention_tc.cu) checks it against element-wise loads on a GPU.
#ifndef TROUPE_EMU
template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix_b16(unsigned (&r)[N], const bf16* row) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if __CUDA_ARCH__ >= 750
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    if constexpr (N == 4 && !TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    } else if constexpr (N == 4) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    } else if constexpr (N == 2 && !TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
    } else if constexpr (N == 2) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(a));
    } else if constexpr (!TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a));
    }
#else
    // No ldmatrix before sm_75 (nor bf16 mma before sm_80, which its callers need): trap as there.
    (void)row;
    for (int i = 0; i < N; ++i) r[i] = 0u;
    asm volatile("trap;");
#endif
}
#endif

// 16 bytes moved as one vector access on the GPU (ld/st.global.v4); memcpy in the emulator,
// whose buffers are only 8-byte aligned. Callers check 16-byte alignment before taking a vector
// path.
struct __align__(16) pack16 {
    unsigned int w[4];
};

__device__ __forceinline__ pack16 load16(const void* p) {
#ifdef TROUPE_EMU
    pack16 r;
    std::memcpy(&r, p, 16);
    return r;
#else
    return *reinterpret_cast<const pack16*>(p);
#endif
}

__device__ __forceinline__ void store16(void* p, pack16 v) {
#ifdef TROUPE_EMU
    std::memcpy(p, &v, 16);
#else
    *reinterpret_cast<pack16*>(p) = v;
#endif
}

// Asynchronous 16-byte copies from global to shared memory (PTX cp.async.cg.shared.global with a
// source size, sm_80+): cp_async16(dst, src, bytes) starts copying `bytes` (16, or 0 to fill the
// 16 bytes at dst with zeros; src must be a valid 16-byte-aligned global address either way, dst
// a 16-byte-aligned shared one); cp_async_commit() closes the group of the copies this thread
// started since its last commit (an empty group is fine); cp_async_wait<N>() waits until at most
// N of this thread's committed groups are still in flight. Another thread's copies are visible
// after a __syncthreads that follows its wait. TROUPE_NO_CP_ASYNC (or a GPU before sm_80)
// makes the copy synchronous and the commit and wait nothing. The emulator delivers a copy at
// the earliest (as it starts) in odd blocks and the latest (the wait that retires it) in even
// ones, so a missing wait or barrier shows either way.
#ifndef TROUPE_EMU
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
#if __CUDA_ARCH__ >= 800 && !defined(TROUPE_NO_CP_ASYNC)
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(bytes) : "memory");
#else
    pack16 v = {{0u, 0u, 0u, 0u}};
    if (bytes > 0) v = load16(src);
    store16(dst, v);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800 && !defined(TROUPE_NO_CP_ASYNC)
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800 && !defined(TROUPE_NO_CP_ASYNC)
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
#endif

// Loads and stores of P consecutive elements of T as fp32: P = 1 (any C) or one 16-byte pack.
template <typename T, bool VEC> struct vec_io;

template <typename T> struct vec_io<T, false> {
    static constexpr int P = 1;
    static __device__ __forceinline__ void load(float* f, const T* p) { f[0] = to_f32(p[0]); }
    static __device__ __forceinline__ void store(T* p, const float* f) { p[0] = from_f32<T>(f[0]); }
};

template <> struct vec_io<float, true> {
    static constexpr int P = 4;
    static __device__ __forceinline__ void load(float* f, const float* p) {
        pack16 u = load16(p);
        for (int k = 0; k < 4; ++k) f[k] = __uint_as_float(u.w[k]);
    }
    static __device__ __forceinline__ void store(float* p, const float* f) {
        pack16 u;
        for (int k = 0; k < 4; ++k) u.w[k] = __float_as_uint(f[k]);
        store16(p, u);
    }
};

template <> struct vec_io<bf16, true> {
    static constexpr int P = 8;
    static __device__ __forceinline__ void load(float* f, const bf16* p) {
        pack16 u = load16(p);
        for (int k = 0; k < 4; ++k) {
            f[2 * k] = __uint_as_float(u.w[k] << 16);  // little-endian: element 2k is the low half
            f[2 * k + 1] = __uint_as_float(u.w[k] & 0xffff0000u);
        }
    }
    static __device__ __forceinline__ void store(bf16* p, const float* f) {
        pack16 u;
        for (int k = 0; k < 4; ++k)
            u.w[k] = (unsigned int)f32_to_bf16(f[2 * k]) | ((unsigned int)f32_to_bf16(f[2 * k + 1]) << 16);
        store16(p, u);
    }
};
