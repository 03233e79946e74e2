// Launching emulated kernels (see emu.h). Compiled in one translation unit after emu.h, the
// prelude and every kernel file; exported to Rust as `troupe_emu_launch`.
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <mutex>
#include <thread>

namespace troupe_emu {
static std::mutex launch_mutex;  // `__shared__` statics allow one launch at a time

// Worker threads kept across launches (creating a thousand threads per launch dominated the
// emulator's time). Launch n runs the job on workers 0..n; the others wake and sleep again.
// Leaked on purpose: workers block forever in `wait`, and a static destructor would have to join
// them at exit.
struct Pool {
    std::mutex m;
    std::condition_variable wake, done;
    unsigned long long generation = 0;
    unsigned active = 0, remaining = 0;
    const std::function<void(unsigned)>* job = nullptr;
    unsigned workers = 0;

    void ensure(unsigned n) {
        while (workers < n) {
            unsigned id = workers++;
            std::thread([this, id] { serve(id); }).detach();
        }
    }

    void serve(unsigned id) {
        unsigned long long seen = 0;
        for (;;) {
            const std::function<void(unsigned)>* j;
            {
                std::unique_lock<std::mutex> lk(m);
                wake.wait(lk, [&] { return generation != seen; });
                seen = generation;
                if (id >= active) continue;
                j = job;
            }
            (*j)(id);
            std::lock_guard<std::mutex> lk(m);
            if (--remaining == 0) done.notify_all();
        }
    }

    void run(unsigned n, const std::function<void(unsigned)>& f) {
        std::unique_lock<std::mutex> lk(m);
        ensure(n);
        job = &f;
        active = n;
        remaining = n;
        ++generation;
        wake.notify_all();
        done.wait(lk, [&] { return remaining == 0; });
    }
};
static Pool* pool = new Pool;
}  // namespace troupe_emu

extern "C" int troupe_emu_launch(const char* name, const unsigned int* grid3, const unsigned int* block3,
                                 unsigned long long smem_bytes, void** args, char* err, unsigned long long err_len) {
    using namespace troupe_emu;
    auto fail = [&](const std::string& msg) {
        std::snprintf(err, err_len, "%s", msg.c_str());
        return 1;
    };
    const Entry* entry = nullptr;
    for (const Entry& e : registry())
        if (std::strcmp(e.name, name) == 0) entry = &e;
    if (!entry) return fail(std::string("no kernel named ") + name);
    Launch l;
    l.grid = dim3{grid3[0], grid3[1], grid3[2]};
    l.block = dim3{block3[0], block3[1], block3[2]};
    l.threads = block3[0] * block3[1] * block3[2];
    if (l.threads == 0 || l.threads > 1024 || l.threads % 32 != 0)
        return fail("block of " + std::to_string(l.threads) + " threads: the emulator needs a multiple of 32, at most 1024");
    if (smem_bytes > 227 * 1024) return fail("more than 227 KiB of dynamic shared memory (the sm_90 limit)");
    unsigned long long blocks = (unsigned long long)grid3[0] * grid3[1] * grid3[2];
    std::lock_guard<std::mutex> guard(launch_mutex);
    l.block_barrier = std::make_unique<std::barrier<>>(l.threads);
    for (unsigned int w = 0; w < l.threads / 32; ++w) l.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    l.warp_slots.assign(l.threads, 0);
    l.warp_slots64.assign(l.threads, 0);
    // Uninitialised shared memory reads as NaN, so a kernel that forgets to write it fails tests.
    l.dyn_smem.assign(smem_bytes + 16, 0xff);
    std::barrier<> end_of_block(l.threads);
    std::function<void(unsigned)> body = [&](unsigned t) {
        current = &l;
        linear_tid = t;
        thread_idx = dim3{t % l.block.x, (t / l.block.x) % l.block.y, t / (l.block.x * l.block.y)};
        for (unsigned long long b = 0; b < blocks; ++b) {
            block_idx = dim3{(unsigned int)(b % l.grid.x), (unsigned int)((b / l.grid.x) % l.grid.y),
                             (unsigned int)(b / ((unsigned long long)l.grid.x * l.grid.y))};
            entry->call(entry->fn, args);
            end_of_block.arrive_and_wait();
        }
    };
    pool->run(l.threads, body);
    return 0;
}

extern "C" int troupe_emu_kernel_count() { return (int)troupe_emu::registry().size(); }
extern "C" const char* troupe_emu_kernel_name(int i) { return troupe_emu::registry()[(size_t)i].name; }
