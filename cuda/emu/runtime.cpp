// Launching emulated kernels (see emu.h). Compiled in one translation unit after emu.h, the
// prelude and every kernel file; exported to Rust as `troupe_emu_launch`.
//
// A block's threads are fibers on the launching thread: each has a stack of its own (mapped once,
// with a guard page below it, and reused by every launch) and is switched to and from by
// `troupe_emu_switch`, which saves the callee-saved registers and the stack pointer — all a
// cooperative switch between C++ frames needs on x86-64 System V (the floating-point control
// state is the thread's and no fiber changes it). The launch resumes the unfinished fibers in
// turn; a fiber runs until it waits at a barrier (emu.h) or its kernel returns.
//
// The order is the launch's schedule: in order (blocks and, in each round between barriers,
// threads by increasing index), reversed, shuffled (a fresh permutation of the threads every
// round and of the blocks every launch, from a seed), or warp by warp (each round, the warps in
// a random order, each run alone until all its threads wait at a block barrier or end — as if
// the others were descheduled; round-robin over all threads keeps warps in step at every warp
// shuffle, ldmatrix or mma, which hides races between warps). A kernel whose threads synchronise as
// they must gives the same bits under every schedule; one with a race — a thread reading what
// another writes between the same two barriers, or a block reading another block's output —
// gives different ones, which in order alone it can hide (thread t reading what thread t − 1
// wrote without a barrier reads it, in order, as if there were one).
#include <cstdio>
#include <mutex>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#error "the kernel emulator's fibers switch stacks with x86-64 code"
#endif

// troupe_emu_switch(&save_sp, next_sp): pushes the callee-saved registers, stores the stack
// pointer in *save_sp, loads next_sp and pops the registers saved there, returning into the
// other fiber (or, for a new fiber, into its entry, see `Fibers::start`).
asm(R"(
    .text
    .p2align 4
    .type troupe_emu_switch, @function
troupe_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size troupe_emu_switch, .-troupe_emu_switch
)");
extern "C" void troupe_emu_switch(void** save_sp, void* next_sp);

namespace troupe_emu {
static std::mutex launch_mutex;  // `__shared__` statics and the fibers allow one launch at a time

// Stack of one fiber. Kernels keep a few KiB of locals (the largest, the head-size-256
// attention, under 8 KiB); -O2 frames and the emulator's helpers fit many times over.
constexpr size_t kStackBytes = 256 * 1024;

struct Fibers {
    unsigned char* stacks = nullptr;  // capacity × (guard page + stack)
    unsigned capacity = 0;
    size_t page = 4096;
    std::vector<void*> sp;           // saved stack pointer of each fiber
    std::vector<unsigned char> done;  // its kernel returned
    void* launcher_sp = nullptr;     // the launching thread's, while a fiber runs
    unsigned running = 0;
    const Entry* entry = nullptr;
    void** args = nullptr;

    size_t slot() const { return page + kStackBytes; }

    // Stacks for n fibers (mapped lazily: untouched pages cost nothing).
    bool reserve(unsigned n) {
        if (n <= capacity) return true;
        page = (size_t)sysconf(_SC_PAGESIZE);
        void* m = mmap(nullptr, slot() * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return false;
        unsigned char* base = static_cast<unsigned char*>(m);
        for (unsigned i = 0; i < n; ++i)
            if (mprotect(base + i * slot(), page, PROT_NONE) != 0) return false;  // overflow faults
        if (stacks) munmap(stacks, slot() * capacity);
        stacks = base;
        capacity = n;
        return true;
    }

    [[noreturn]] static void entry_point();

    // Fiber t's stack as if `troupe_emu_switch` had saved it just before entering
    // `entry_point` (six zero registers, then the entry as the return address, then a dummy
    // return address for entry_point's own frame, keeping the ABI's 16-byte alignment).
    void start(unsigned t) {
        unsigned char* top = stacks + (size_t)(t + 1) * slot();
        void** s = reinterpret_cast<void**>(top);
        *--s = nullptr;
        *--s = reinterpret_cast<void*>(&entry_point);
        for (int r = 0; r < 6; ++r) *--s = nullptr;
        sp[t] = s;
        done[t] = 0;
    }

    void resume(unsigned t) {
        running = t;
        troupe_emu_switch(&launcher_sp, sp[t]);
    }
};
static Fibers* fibers = new Fibers;  // leaked: its stacks live as long as the process

void fiber_yield() { troupe_emu_switch(&fibers->sp[fibers->running], fibers->launcher_sp); }

void Fibers::entry_point() {
    Fibers& f = *fibers;
    f.entry->call(f.entry->fn, f.args);
    f.done[f.running] = 1;
    troupe_emu_switch(&f.sp[f.running], f.launcher_sp);
    __builtin_unreachable();  // a finished fiber is never resumed
}
}  // namespace troupe_emu

namespace troupe_emu {
// splitmix64: the shuffled schedule's random numbers.
static unsigned long long next_random(unsigned long long& state) {
    unsigned long long z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
template <typename T>
static void shuffle(std::vector<T>& v, unsigned long long& state) {
    for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random(state) % i]);
}
}  // namespace troupe_emu

// `schedule`: 0 in order, 1 reversed, 2 shuffled from `seed`, 3 warp by warp from `seed` (see
// the top of this file).
extern "C" int troupe_emu_launch(const char* name, const unsigned int* grid3, const unsigned int* block3,
                                 unsigned long long smem_bytes, void** args, char* err, unsigned long long err_len,
                                 int schedule, unsigned long long seed) {
    using namespace troupe_emu;
    auto fail = [&](const std::string& msg) {
        std::snprintf(err, err_len, "%s", msg.c_str());
        return 1;
    };
    const Entry* entry = nullptr;
    std::size_t index = 0;
    for (std::size_t i = 0; i < registry().size(); ++i)
        if (std::strcmp(registry()[i].name, name) == 0) entry = &registry()[i], index = i;
    if (!entry) return fail(std::string("no kernel named ") + name);
    if (index >= MAX_KERNELS) return fail("more kernels than the emulator's statistics hold");
    Launch l;
    l.ldmatrix = &ldmatrix_stats[index];
    l.grid = dim3{grid3[0], grid3[1], grid3[2]};
    l.block = dim3{block3[0], block3[1], block3[2]};
    l.threads = block3[0] * block3[1] * block3[2];
    if (l.threads == 0 || l.threads > 1024 || l.threads % 32 != 0)
        return fail("block of " + std::to_string(l.threads) + " threads: the emulator needs a multiple of 32, at most 1024");
    if (smem_bytes > 227 * 1024) return fail("more than 227 KiB of dynamic shared memory (the sm_90 limit)");
    if (schedule < 0 || schedule > 3) return fail("unknown schedule " + std::to_string(schedule));
    unsigned long long blocks = (unsigned long long)grid3[0] * grid3[1] * grid3[2];
    unsigned long long random = seed;
    std::vector<unsigned long long> block_order;
    if (schedule >= 2) {
        block_order.resize(blocks);
        for (unsigned long long b = 0; b < blocks; ++b) block_order[b] = b;
        shuffle(block_order, random);
    }
    std::vector<unsigned> thread_order(l.threads);
    for (unsigned t = 0; t < l.threads; ++t) thread_order[t] = schedule == 1 ? l.threads - 1 - t : t;
    std::lock_guard<std::mutex> guard(launch_mutex);
    Fibers& f = *fibers;
    if (!f.reserve(l.threads)) return fail("mapping " + std::to_string(l.threads) + " fiber stacks failed");
    f.sp.assign(l.threads, nullptr);
    f.done.assign(l.threads, 0);
    f.entry = entry;
    f.args = args;
    l.block_barrier.expected = l.threads;
    l.warp_barriers.assign(l.threads / 32, Barrier{});
    for (Barrier& w : l.warp_barriers) w.expected = 32;
    l.warp_slots.assign(l.threads, 0);
    l.warp_slots64.assign(l.threads, 0);
    // Uninitialised shared memory reads as NaN, so a kernel that forgets to write it fails tests.
    l.dyn_smem.assign(smem_bytes + 16, 0xff);
    current = &l;
    for (unsigned long long i = 0; i < blocks; ++i) {
        const unsigned long long b = schedule >= 2 ? block_order[i] : schedule == 1 ? blocks - 1 - i : i;
        block_idx = dim3{(unsigned int)(b % l.grid.x), (unsigned int)((b / l.grid.x) % l.grid.y),
                         (unsigned int)(b / ((unsigned long long)l.grid.x * l.grid.y))};
        // Copies a thread left in flight at its end are dropped with its block.
        l.async_open.assign(l.threads, {});
        l.async_groups.assign(l.threads, {});
        for (unsigned t = 0; t < l.threads; ++t) f.start(t);
        unsigned left = l.threads;
        while (left > 0) {
            const unsigned long long before = arrivals;
            unsigned finished = 0;
            auto run = [&](unsigned t) {
                linear_tid = t;
                thread_idx = dim3{t % l.block.x, (t / l.block.x) % l.block.y, t / (l.block.x * l.block.y)};
                f.resume(t);
                finished += f.done[t];
            };
            if (schedule == 2) shuffle(thread_order, random);
            if (schedule == 3) {
                std::vector<unsigned> warps(l.threads / 32);
                for (unsigned w = 0; w < warps.size(); ++w) warps[w] = w;
                shuffle(warps, random);
                for (unsigned w : warps) {
                    // The warp alone, until none of its threads gets further (all wait at the
                    // block barrier, or have ended).
                    for (bool progress = true; progress;) {
                        progress = false;
                        for (unsigned t = 32 * w; t < 32 * w + 32; ++t) {
                            if (f.done[t]) continue;
                            const unsigned long long a = arrivals;
                            run(t);
                            progress = progress || f.done[t] || arrivals != a;
                        }
                    }
                }
            } else {
                for (unsigned t : thread_order)
                    if (!f.done[t]) run(t);
            }
            left -= finished;
            if (left > 0 && finished == 0 && arrivals == before) {
                current = nullptr;
                return fail(std::string("kernel ") + name + " deadlocked in block " + std::to_string(b) + ": " +
                            std::to_string(left) +
                            " threads wait at a __syncthreads or warp shuffle that the others never reach");
            }
        }
    }
    current = nullptr;
    return 0;
}

// Self-tests of the emulator itself (no GPU twin; see src/gpu/emu.rs): odd threads skip the
// block barrier (a deadlock, reported as an error), and a rotation through shared memory (every
// fiber's store is visible after the barrier, in every block).
extern "C" __global__ void emu_selftest_skipped_barrier() {
    if (threadIdx.x % 2 == 0) __syncthreads();
}
EXPORT_KERNEL(emu_selftest_skipped_barrier);
extern "C" __global__ void emu_selftest_rotate(float* out, const float* in) {
    __shared__ float s[1024];
    const unsigned n = blockDim.x, t = threadIdx.x, base = blockIdx.x * n;
    s[t] = in[base + t];
    __syncthreads();
    out[base + t] = s[(t + 1) % n];
}
EXPORT_KERNEL(emu_selftest_rotate);
// A race: thread t reads what thread t − 1 wrote with no barrier between. In order the writer
// always runs first and the race is hidden; reversed, every reader runs before its writer.
extern "C" __global__ void emu_selftest_race(float* out, const float* in) {
    __shared__ float s[1024];
    const unsigned t = threadIdx.x, base = blockIdx.x * blockDim.x;
    s[t] = in[base + t];
    out[base + t] = t > 0 ? s[t - 1] : 0.0f;
}
EXPORT_KERNEL(emu_selftest_race);
// A race between warps: thread t reads what thread t + 32 (the next warp) wrote, with only a
// warp shuffle between. Round-robin over all threads keeps the warps in step at the shuffle, so
// every write lands before any read in every thread order; warp by warp, a warp reads before
// the next one has written.
extern "C" __global__ void emu_selftest_warp_race(float* out, const float* in) {
    __shared__ float s[1024];
    const unsigned n = blockDim.x, t = threadIdx.x, base = blockIdx.x * n;
    s[t] = in[base + t];
    const float mine = __shfl_xor_sync(FULL_MASK, s[t], 1);
    out[base + t] = mine + s[(t + 32) % n];
}
EXPORT_KERNEL(emu_selftest_warp_race);

// cp.async in the emulator: each thread copies 16 bytes (4 floats) of `in` into dynamic shared
// memory, twice over in two groups, and records what it reads there before its first wait
// (seen[0]), after retiring the first group (seen[1]) and after the second (seen[2]); the copies
// of rows at or past `valid` fill with zeros.
extern "C" __global__ void emu_selftest_cp_async(float* seen, const float* in, unsigned valid) {
    DYN_SMEM(float, s);
    const unsigned t = threadIdx.x, base = (blockIdx.x * blockDim.x + t) * 4;
    float* mine = s + 4 * t;
    cp_async16(mine, in + base, t < valid ? 16 : 0);
    cp_async_commit();
    cp_async16(mine, in + base + 4 * blockDim.x * gridDim.x, t < valid ? 16 : 0);
    cp_async_commit();
    float* out = seen + base * 3;
    for (int i = 0; i < 4; ++i) out[i] = mine[i];
    cp_async_wait<1>();
    for (int i = 0; i < 4; ++i) out[4 + i] = mine[i];
    cp_async_wait<0>();
    for (int i = 0; i < 4; ++i) out[8 + i] = mine[i];
}
EXPORT_KERNEL(emu_selftest_cp_async);

extern "C" int troupe_emu_kernel_count() { return (int)troupe_emu::registry().size(); }
// The ldmatrix phases and extra wavefronts of kernel `name` so far (see LdmatrixStats in emu.h);
// 1 if there is no such kernel.
extern "C" int troupe_emu_ldmatrix_stats(const char* name, unsigned long long* phases, unsigned long long* extra) {
    using namespace troupe_emu;
    for (std::size_t i = 0; i < registry().size() && i < MAX_KERNELS; ++i)
        if (std::strcmp(registry()[i].name, name) == 0) {
            *phases = ldmatrix_stats[i].phases.load();
            *extra = ldmatrix_stats[i].extra.load();
            return 0;
        }
    return 1;
}
extern "C" const char* troupe_emu_kernel_name(int i) { return troupe_emu::registry()[(size_t)i].name; }
