// The CPU emulator of troupe's CUDA kernels: just enough of CUDA C++ for the kernels in cuda/*.cu
// to compile as C++20 with g++ and run on the CPU, one fiber (a stack of its own, switched in user
// space) per CUDA thread of a block, for tests on machines without a GPU. It checks algorithms and launch geometry, not GPU performance
// or memory-model corner cases (every thread sees every store at once; there are no data races
// that a GPU would expose but the emulator hides, as long as kernels synchronise as they must).
//
// Model: a launch runs the blocks of the grid one after another, on the launching thread; the
// threads of a block are fibers that the launch resumes in turn (runtime.cpp). They meet at
// __syncthreads() (a barrier of the block size) and exchange values in warp shuffles through a
// per-warp slot array guarded by a per-warp barrier; waiting at a barrier yields to the next
// fiber, so a block's threads interleave only at barriers (no OS threads, no preemption). A
// round of all fibers in which none arrives at a barrier or ends is a deadlock (a thread skipped a
// barrier), reported as the launch's error. `__shared__` variables become function-local statics:
// one copy, used by the one block running at a time.
#define TROUPE_EMU 1
#include <algorithm>
#include <atomic>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

// The running fiber's coordinates: plain globals, set by the launch before it resumes a fiber
// (one launch runs at a time, on one thread).
namespace troupe_emu {
struct Launch;
inline dim3 thread_idx;
inline dim3 block_idx;
inline Launch* current = nullptr;
inline unsigned int linear_tid = 0;
// Gives the thread to the next fiber of the block (runtime.cpp).
void fiber_yield();
// Counts barrier arrivals: the launch's progress, for deadlock detection.
inline unsigned long long arrivals = 0;

// A barrier of `expected` fibers: the last to arrive opens it; the others yield until it is.
struct Barrier {
    unsigned int expected = 0, count = 0;
    unsigned long long generation = 0;
    void arrive_and_wait() {
        const unsigned long long g = generation;
        ++arrivals;
        if (++count == expected) {
            count = 0;
            ++generation;
            return;
        }
        while (generation == g) fiber_yield();
    }
};
}  // namespace troupe_emu

#define threadIdx (troupe_emu::thread_idx)
#define blockIdx (troupe_emu::block_idx)
#define blockDim (troupe_emu::launch_block_dim())
#define gridDim (troupe_emu::launch_grid_dim())

namespace troupe_emu {
struct Launch {
    dim3 grid, block;
    unsigned int threads;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<uint32_t> warp_slots;  // 32 lanes per warp, 4-byte payloads
    std::vector<uint64_t> warp_slots64;
    alignas(64) std::vector<unsigned char> dyn_smem;
    // cp.async: per thread, the copies started since its last commit, and its committed groups
    // (oldest first) — copies land only when a wait retires their group (cp_async_wait).
    struct AsyncCopy {
        void* dst;
        const void* src;
        int bytes;
    };
    std::vector<std::vector<AsyncCopy>> async_open;
    std::vector<std::deque<std::vector<AsyncCopy>>> async_groups;
    struct LdmatrixStats* ldmatrix = nullptr;  // the kernel's (runtime.cpp sets it)
};

// Shared-memory bank conflicts of a kernel's ldmatrix loads, over all its launches in this
// process: each 8×8 matrix is one phase of 8 row reads of 16 bytes; the rows of a phase whose
// addresses share a 16-byte bank group ((address / 16) mod 8: 4 of the 32 four-byte banks) are
// served in turn, so a phase costs as many wavefronts as its most shared group has rows.
// `extra` counts the wavefronts beyond one per phase (0 when conflict-free).
struct LdmatrixStats {
    std::atomic<unsigned long long> phases{0}, extra{0};
};
constexpr std::size_t MAX_KERNELS = 1024;
inline LdmatrixStats ldmatrix_stats[MAX_KERNELS];
inline const dim3& launch_block_dim() { return current->block; }
inline const dim3& launch_grid_dim() { return current->grid; }
inline unsigned char* dyn_smem() { return current->dyn_smem.data(); }

template <typename T>
inline T shfl(T v, unsigned int src_lane) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 4- or 8-byte values");
    Launch* l = current;
    unsigned int warp = linear_tid / 32, lane = linear_tid % 32;
    auto& bar = l->warp_barriers[warp];
    T out;
    if constexpr (sizeof(T) == 4) {
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        l->warp_slots[warp * 32 + lane] = bits;
        bar.arrive_and_wait();
        bits = l->warp_slots[warp * 32 + (src_lane & 31)];
        std::memcpy(&out, &bits, 4);
    } else {
        uint64_t bits;
        std::memcpy(&bits, &v, 8);
        l->warp_slots64[warp * 32 + lane] = bits;
        bar.arrive_and_wait();
        bits = l->warp_slots64[warp * 32 + (src_lane & 31)];
        std::memcpy(&out, &bits, 8);
    }
    bar.arrive_and_wait();
    (void)lane;
    return out;
}
}  // namespace troupe_emu

#define DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(troupe_emu::dyn_smem())

inline void __syncthreads() { troupe_emu::current->block_barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned int = 0xffffffffu) {
    troupe_emu::current->warp_barriers[troupe_emu::linear_tid / 32].arrive_and_wait();
}
template <typename T>
inline T __shfl_xor_sync(unsigned int, T v, int mask, int = 32) {
    return troupe_emu::shfl(v, (troupe_emu::linear_tid % 32) ^ (unsigned int)mask);
}
template <typename T>
inline T __shfl_down_sync(unsigned int, T v, unsigned int delta, int = 32) {
    unsigned int lane = troupe_emu::linear_tid % 32;
    T other = troupe_emu::shfl(v, std::min(lane + delta, 31u));
    return lane + delta < 32 ? other : v;
}
template <typename T>
inline T __shfl_sync(unsigned int, T v, int src, int = 32) {
    return troupe_emu::shfl(v, (unsigned int)src);
}

// The warp-level tensor-core product mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (see
// mma_bf16_16816 in cuda/prelude.cuh for the fragment layouts, from the PTX ISA). Every lane
// deposits its A and B fragments in its warp's slots, the warp meets at its barrier, each lane
// computes its four outputs from the whole 16×16 A and 16×8 B (products of bf16 values are exact
// in fp32; summed in fp32 in k order 0..15, starting from C), and the warp meets again so that no
// lane overwrites the slots while another still reads them. The slots are one static array: one
// launch runs at a time (runtime.cpp), and a block has at most 32 warps.
namespace troupe_emu {
inline uint32_t mma_slots[32][32][6];  // [warp][lane][a0..a3, b0, b1]
inline float mma_half(uint32_t reg, unsigned hi) { return __builtin_bit_cast(float, ((reg >> (16 * hi)) & 0xffffu) << 16); }
}  // namespace troupe_emu

inline void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
    using namespace troupe_emu;
    Launch* l = current;
    unsigned int warp = linear_tid / 32, lane = linear_tid % 32;
    auto& bar = l->warp_barriers[warp];
    uint32_t* mine = mma_slots[warp][lane];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    mine[4] = b[0];
    mine[5] = b[1];
    bar.arrive_and_wait();
    // A[r][k]: lane (r % 8)·4 + (k % 8) / 2, register (r ≥ 8) + 2·(k ≥ 8), half k % 2.
    auto A = [&](unsigned r, unsigned k) {
        return mma_half(mma_slots[warp][(r % 8) * 4 + (k % 8) / 2][(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
    };
    // B[k][n]: lane n·4 + (k % 8) / 2, register 4 + (k ≥ 8), half k % 2.
    auto B = [&](unsigned k, unsigned n) {
        return mma_half(mma_slots[warp][n * 4 + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)], k % 2);
    };
    const unsigned g = lane >> 2, t = lane & 3;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const unsigned row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float acc = c[i];
        for (unsigned k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        out[i] = acc;
    }
    bar.arrive_and_wait();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.xN{.trans}.shared.b16 (see ldmatrix_b16 in cuda/prelude.cuh for the
// layout, from the PTX ISA): every lane deposits its row address in its warp's 64-bit slots, the
// warp meets at its barrier, each lane gathers its N words from the rows of lanes 8·i..8·i + 7,
// and the warp meets again before any lane reuses its slot. A row address that is not 16-byte
// aligned (the hardware's rule) stops the process with the kernel's bug named.
template <int N, bool TRANS>
inline void ldmatrix_b16(unsigned (&r)[N], const unsigned short* row) {
    using namespace troupe_emu;
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    Launch* l = current;
    const unsigned int warp = linear_tid / 32, lane = linear_tid % 32;
    if (lane < 8 * N && reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        std::fprintf(stderr, "emulated ldmatrix: lane %u of warp %u gave a row address that is not 16-byte aligned\n",
                     lane, warp);
        std::abort();
    }
    auto& bar = l->warp_barriers[warp];
    l->warp_slots64[warp * 32 + lane] = reinterpret_cast<uint64_t>(row);
    bar.arrive_and_wait();
    if (lane == 0 && l->ldmatrix) {
        for (int i = 0; i < N; ++i) {
            unsigned rows_in[8] = {};
            unsigned most = 0;
            for (int k = 0; k < 8; ++k) most = std::max(most, ++rows_in[(l->warp_slots64[warp * 32 + 8 * i + k] / 16) % 8]);
            l->ldmatrix->phases.fetch_add(1, std::memory_order_relaxed);
            l->ldmatrix->extra.fetch_add(most - 1, std::memory_order_relaxed);
        }
    }
    const unsigned int g = lane >> 2, w = lane & 3;
    unsigned out[N];
    for (int i = 0; i < N; ++i) {
        auto at = [&](unsigned int k) { return reinterpret_cast<const unsigned short*>(l->warp_slots64[warp * 32 + 8 * i + k]); };
        const unsigned lo = TRANS ? at(2 * w)[g] : at(g)[2 * w];
        const unsigned hi = TRANS ? at(2 * w + 1)[g] : at(g)[2 * w + 1];
        out[i] = lo | (hi << 16);
    }
    bar.arrive_and_wait();
    for (int i = 0; i < N; ++i) r[i] = out[i];
}

// cp.async (see cp_async16 in cuda/prelude.cuh), delivered at one of the two extremes a GPU
// allows, by block: in odd blocks (linear index) a copy lands as it starts, the earliest — so a
// kernel that starts overwriting a tile other warps still read has it change under them; in even
// blocks it lands when the thread's cp_async_wait retires its group, the latest — so a kernel
// that reads its tile before waiting (and the barrier after) reads the old contents (NaN on a
// fresh launch). Any launch of two or more blocks checks both.
inline void cp_async_deliver(void* dst, const void* src, int bytes) {
    unsigned char tmp[16] = {};
    if (bytes > 0) std::memcpy(tmp, src, (size_t)bytes);
    std::memcpy(dst, tmp, 16);
}
inline void cp_async16(void* dst, const void* src, int bytes) {
    using namespace troupe_emu;
    const dim3& g = current->grid;
    const unsigned long long block =
        block_idx.x + (unsigned long long)g.x * (block_idx.y + (unsigned long long)g.y * block_idx.z);
    if (block % 2 == 1) {
        cp_async_deliver(dst, src, bytes);
        return;
    }
    current->async_open[linear_tid].push_back(Launch::AsyncCopy{dst, src, bytes});
}
inline void cp_async_commit() {
    using namespace troupe_emu;
    auto& open = current->async_open[linear_tid];
    current->async_groups[linear_tid].push_back(std::move(open));
    open.clear();
}
template <int N>
inline void cp_async_wait() {
    using namespace troupe_emu;
    auto& groups = current->async_groups[linear_tid];
    while (groups.size() > (size_t)N) {
        for (const Launch::AsyncCopy& c : groups.front()) cp_async_deliver(c.dst, c.src, c.bytes);
        groups.pop_front();
    }
}

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return std::min(1.0f, std::max(0.0f, x)); }
using std::max;
using std::min;

template <typename T>
inline T atomicAdd(T* addr, T v) {
    return std::atomic_ref<T>(*addr).fetch_add(v);
}

namespace troupe_emu {
using Trampoline = void (*)(void* fn, void** args);
struct Entry {
    const char* name;
    void* fn;
    Trampoline call;
};
inline std::vector<Entry>& registry() {
    static std::vector<Entry> r;
    return r;
}
template <typename... A, std::size_t... I>
inline void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <typename... A>
inline void trampoline(void* fn, void** args) {
    call_with(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
}
template <typename... A>
inline Trampoline trampoline_for(void (*)(A...)) {
    return &trampoline<A...>;
}
struct Register {
    template <typename F>
    Register(const char* name, F* f) {
        registry().push_back(Entry{name, reinterpret_cast<void*>(f), trampoline_for(f)});
    }
};
}  // namespace troupe_emu

#define EXPORT_KERNEL(name) static troupe_emu::Register troupe_emu_reg_##name(#name, &name)
