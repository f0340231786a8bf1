// Launches of the emulated driver (part of driver.cpp): a pool of CPU threads runs the blocks.

namespace {

// Stream capture (graphs.h).
bool capturing(void* stream);
CUresult capture_launch(Function* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, void* stream, void** params, void** extra);

// ---- running a launch: a pool of CPU threads takes blocks in turn ----
struct Worker {
    EmuWhere where;
    sigjmp_buf jmp;
    volatile sig_atomic_t in_kernel = 0;
    void* fault_addr = nullptr;
    int fault_write = -1;  // 1 write, 0 read, -1 unknown
    char alt_stack[64 << 10];
};
thread_local Worker* worker = nullptr;

struct Job {
    EmuLaunch launch;
    const EmuModule* module;
    uint64_t blocks;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> stop{false};
    uint64_t stride = 1, offset = 0;  // the shuffled order of blocks
    std::mutex mu;
    CUresult code = CUDA_SUCCESS;
    std::string message;
};

void on_fault(int sig, siginfo_t* si, void* uc);
struct sigaction previous_segv, previous_bus;

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        sigaction(SIGBUS, &sa, &previous_bus);
    });
}

void on_fault(int sig, siginfo_t* si, void* uc) {
    Worker* w = worker;
    if (w && w->in_kernel) {
        w->in_kernel = 0;
        w->fault_addr = si->si_addr;
#if defined(__x86_64__)
        // Bit 1 of the page-fault error code: the access was a write.
        w->fault_write = (((ucontext_t*)uc)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#endif
        siglongjmp(w->jmp, 1);
    }
    // Not a kernel's: give the fault back to whoever handled it before (it happens again on
    // return).
    sigaction(sig, sig == SIGSEGV ? &previous_segv : &previous_bus, nullptr);
}

// What a fault at `addr` touched, in words.
std::string describe_fault(const Worker& w) {
    uintptr_t a = (uintptr_t)w.fault_addr;
    char buf[512];
    const char* access = w.fault_write == 1 ? "wrote" : w.fault_write == 0 ? "read" : "touched";
    std::lock_guard<std::mutex> g(mu);
    if (a >= w.where.stack_lo && a < w.where.stack_hi) {
        snprintf(buf, sizeof buf, "overflowed its stack (at %#lx)", (unsigned long)a);
        return buf;
    }
    if (a >= w.where.dynamic_hi && a < w.where.dynamic_hi + PAGE) {
        snprintf(buf, sizeof buf, "%s past the end of the dynamic shared memory of its block (%zu bytes, extern __shared__)",
                 access, (size_t)(w.where.dynamic_hi - w.where.dynamic_lo));
        return buf;
    }
    const Alloc* best = nullptr;
    for (auto& [start, al] : allocs) {
        if (a >= (uintptr_t)al.map && a < (uintptr_t)al.map + al.map_len) best = &al;
    }
    if (best && a >= best->start + best->bytes) {
        snprintf(buf, sizeof buf, "%s past the end of a %zu-byte device allocation, at byte %zu (4-byte element [%zu] of %zu)",
                 access, best->bytes, (size_t)(a - best->start), (size_t)(a - best->start) / 4, best->bytes / 4);
    } else if (best) {
        snprintf(buf, sizeof buf, "%s %zu bytes before the start of a %zu-byte device allocation", access,
                 (size_t)(best->start - a), best->bytes);
    } else {
        snprintf(buf, sizeof buf, "%s address %#lx, which is in no device allocation (a null or wild pointer)", access,
                 (unsigned long)a);
    }
    return buf;
}

// The b-th block to run: blocks run in the launch's order too (shuffled: an affine permutation
// of the grid, new for every launch), so a block that depends on another block of the same
// launch (which a GPU never promises to have run) gives order-dependent results.
uint64_t block_in_order(const Job& job, uint64_t b) {
    const uint64_t n = job.blocks;
    if (job.launch.order == EMU_REVERSE) return n - 1 - b;
    if (job.launch.order != EMU_SHUFFLED || n < 2) return b;
    return (job.stride * b + job.offset) % n;
}

void work(Job* job, Worker* w) {
    worker = w;
    // A fiber's stack overflowing needs another stack to report it on.
    stack_t current;
    if (sigaltstack(nullptr, &current) == 0 && (current.ss_flags & SS_DISABLE)) {
        stack_t ss;
        ss.ss_sp = w->alt_stack;
        ss.ss_size = sizeof w->alt_stack;
        ss.ss_flags = 0;
        sigaltstack(&ss, nullptr);
    }
    memset(&w->where, 0, sizeof w->where);
    w->where.launch = &job->launch;
    w->where.abort_block = [](EmuWhere*) {
        worker->in_kernel = 0;  // a later fault outside a kernel is not a kernel's
        siglongjmp(worker->jmp, 2);
    };
    if (int how = sigsetjmp(w->jmp, 1)) {
        const EmuWhere& at = w->where;
        if (how == 2) {  // a check inside the kernel failed (checks.h)
            std::lock_guard<std::mutex> g(job->mu);
            if (job->code == CUDA_SUCCESS) {
                job->code = at.abort_code;
                job->message = std::string("kernel ") + job->launch.kernel->name + ": " + at.error;
            }
            job->stop = true;
            return;
        }
        std::string what = describe_fault(*w);
        char buf[1024];
        snprintf(buf, sizeof buf,
                 "an illegal memory access was encountered: kernel %s, block (%u,%u,%u), thread (%u,%u,%u) %s",
                 job->launch.kernel->name, at.block[0], at.block[1], at.block[2], at.thread[0], at.thread[1],
                 at.thread[2], what.c_str());
        std::lock_guard<std::mutex> g(job->mu);
        if (job->code == CUDA_SUCCESS) {
            job->code = CUDA_ERROR_ILLEGAL_ADDRESS;
            job->message = buf;
        }
        job->stop = true;
        return;
    }
    for (;;) {
        if (job->stop) return;
        uint64_t b = job->next.fetch_add(1);
        if (b >= job->blocks) return;
        w->in_kernel = 1;
        int rc = job->module->run_block(&job->launch, block_in_order(*job, b), &w->where);
        w->in_kernel = 0;
        if (rc != 0) {
            std::lock_guard<std::mutex> g(job->mu);
            if (job->code == CUDA_SUCCESS) {
                job->code = CUDA_ERROR_LAUNCH_FAILED;
                job->message = std::string("kernel ") + job->launch.kernel->name + ": " + w->where.error;
            }
            job->stop = true;
            return;
        }
    }
}

// Persistent CPU threads (the caller works too): a block's fiber stacks stay mapped between
// launches.
struct Pool {
    std::vector<std::thread> threads;
    std::mutex m;
    std::condition_variable wake, done;
    Job* job = nullptr;
    uint64_t generation = 0;
    int busy = 0;

    explicit Pool(int extra) {
        for (int i = 0; i < extra; ++i) {
            threads.emplace_back([this] {
                static thread_local Worker* mine = new Worker();
                uint64_t seen = 0;
                for (;;) {
                    Job* j;
                    {
                        std::unique_lock<std::mutex> l(m);
                        wake.wait(l, [&] { return generation != seen; });
                        seen = generation;
                        j = job;
                    }
                    work(j, mine);
                    std::lock_guard<std::mutex> l(m);
                    if (--busy == 0) done.notify_all();
                }
            });
        }
    }

    void run(Job* j) {
        static thread_local Worker* caller = new Worker();
        if (threads.empty() || j->blocks < 2) {
            work(j, caller);
            return;
        }
        {
            std::lock_guard<std::mutex> l(m);
            job = j;
            busy = (int)threads.size();
            ++generation;
        }
        wake.notify_all();
        work(j, caller);
        std::unique_lock<std::mutex> l(m);
        done.wait(l, [&] { return busy == 0; });
    }
};

Pool& pool() {
    static Pool* p = [] {
        int n = (int)std::thread::hardware_concurrency();
        if (const char* e = getenv("VAECUDA_EMU_THREADS")) n = atoi(e);
        return new Pool(n > 1 ? n - 1 : 0);
    }();
    return *p;
}

// A deliberate launcher bug for the tests that prove the suite catches one:
// VAECUDA_EMU_MUTATE=short-grid:<kernel> runs that kernel with one block fewer along x (or y).
bool short_grid(const char* kernel) {
    const char* m = getenv("VAECUDA_EMU_MUTATE");
    return m && strncmp(m, "short-grid:", 11) == 0 && strcmp(m + 11, kernel) == 0;
}

struct Context {
    int device = 0;
};
Context primary;
thread_local void* current_context = nullptr;

struct Stream {};
struct Event {
    double ms = 0;
};
double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

}  // namespace

// Runs one launch now (the stream is synchronous). Checks what a driver checks first.
CUresult launch(Function* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                unsigned shared_bytes, void** params, void** extra) {
    if (CUresult s = check_sticky()) return s;
    const char* name = fn->name.c_str();
    uint64_t threads = (uint64_t)bx * by * bz;
    if (threads == 0 || threads > 1024 || bx > 1024 || by > 1024 || bz > 64 || gx == 0 || gy == 0 || gz == 0 ||
        gy > 65535 || gz > 65535)
        return fail(CUDA_ERROR_INVALID_VALUE, "%s: invalid launch grid (%u,%u,%u) x block (%u,%u,%u)", name, gx, gy, gz,
                    bx, by, bz);
    if (!params || extra)
        return fail(CUDA_ERROR_NOT_SUPPORTED, "%s: `extra` launch parameters are not supported", name);
    if (threads > fn->info.max_threads)
        return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                    "%s: a block of %llu threads is more than its __launch_bounds__ of %u", name,
                    (unsigned long long)threads, fn->info.max_threads);
    if (threads > max_threads_of(fn))
        return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                    "%s: a block of %llu threads needs more than the 65,536 registers of a block (%u per thread)",
                    name, (unsigned long long)threads, fn->info.registers);
    if (shared_bytes > fn->max_dynamic_shared)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    "%s: %u bytes of dynamic shared memory is more than the kernel's limit of %u (raise it with "
                    "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES), up to %u bytes with %u static)",
                    name, shared_bytes, fn->max_dynamic_shared, MAX_SHARED_OPTIN - fn->info.static_shared,
                    fn->info.static_shared);
    if (short_grid(name)) {
        if (gx > 1) --gx;
        else if (gy > 1) --gy;
    }
    // One launch at a time, as on one stream: the pool runs one job.
    static std::mutex launching;
    std::lock_guard<std::mutex> one_at_a_time(launching);
    Job job;
    job.launch = EmuLaunch{fn->host.kernel, params, {gx, gy, gz}, {bx, by, bz}, order.load(), order_seed.load(),
                           shared_bytes};
    job.module = fn->host.module;
    job.blocks = (uint64_t)gx * gy * gz;
    const uint64_t n = launches++;
    if (job.blocks > 1) {  // a stride coprime to the number of blocks
        uint64_t r = order_seed.load() ^ (n * 0x9E3779B97F4A7C15ull);
        r ^= r >> 29, r *= 0xBF58476D1CE4E5B9ull, r ^= r >> 32;
        job.offset = r % job.blocks;
        job.stride = 1 + (r >> 17) % (job.blocks - 1);
        while (std::gcd(job.stride, job.blocks) != 1) ++job.stride;
    }
    pool().run(&job);
    if (job.code != CUDA_SUCCESS) return set_sticky(job.code, job.message);
    std::string past = slack_written();
    if (!past.empty())
        return set_sticky(CUDA_ERROR_ILLEGAL_ADDRESS, std::string("an illegal memory access was encountered: kernel ") +
                                                          name + " (a thread of the launch) " + past);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned shared_bytes, void* stream, void** params, void** extra) {
    if (capturing(stream)) return capture_launch((Function*)f, gx, gy, gz, bx, by, bz, shared_bytes, stream, params, extra);
    return launch((Function*)f, gx, gy, gz, bx, by, bz, shared_bytes, params, extra);
}
