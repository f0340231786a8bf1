// The emulated CUDA driver: a stand-in libcuda.so (soname "libcuda.so") with the driver API
// functions cudarc calls, running the kernels of kernels/*.cu on the CPU. Built and loaded by
// src/backend/cuda/emu.rs; see there for the design.
//
// - Device memory is host memory. Each allocation gets its own pages with an inaccessible
//   guard page on both sides, and ends flush against the one above, so a kernel that reads
//   or writes even one element past the end faults; fresh allocations are filled with 0xFF
//   bytes (NaN as f32 and f64, 4294967295 as an index), so reading memory nobody wrote shows.
// - A fault inside a kernel is caught, the launch fails with CUDA_ERROR_ILLEGAL_ADDRESS and
//   cuGetErrorString says which kernel, block and thread touched what; as on a GPU the error
//   is sticky: every later call fails with it.
// - Streams run every call before returning; events read the clock.
// - cuModuleLoadData reads the kernel names out of the CUBIN's symbol table and binds each to
//   its host build (the kernel modules registered by vaecuda_emu_register_modules).
// - Blocks of a launch run in parallel on the CPU's cores (VAECUDA_EMU_THREADS to choose how
//   many); each block runs on one CPU thread.
#include "abi.h"

#include <dlfcn.h>
#include <elf.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#define EXPORT extern "C" __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

namespace {

// ---- what the emulated device says it is: an H100's limits, so the same code runs ----
const char* const DEVICE_NAME = "vaecuda emulated CUDA device (kernels on the CPU)";
const int CC_MAJOR = 9, CC_MINOR = 0, SM_COUNT = 132;

std::mutex mu;  // guards everything below that is not atomic
CUresult sticky = CUDA_SUCCESS;
std::string sticky_message;
std::atomic<uint64_t> launches{0};
std::atomic<int> order{EMU_SHUFFLED};
std::atomic<uint64_t> order_seed{0x5EEDu};

uint64_t parse_bytes(const char* s) {
    if (!s || !*s) return 0;
    char* end = nullptr;
    double v = strtod(s, &end);
    switch (end && *end ? *end : ' ') {
        case 'k': case 'K': v *= 1024.0; break;
        case 'm': case 'M': v *= 1024.0 * 1024; break;
        case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
        default: break;
    }
    return (uint64_t)v;
}
uint64_t default_limit() {
    uint64_t env = parse_bytes(getenv("VAECUDA_EMU_MEMORY"));
    return env ? env : (8ull << 30);
}
uint64_t memory_limit = default_limit();
uint64_t memory_used = 0;

// ---- device memory: guard pages around every allocation ----
struct Alloc {
    char* map;        // the whole mapping, guards included
    size_t map_len;
    uintptr_t start;  // what the caller got
    size_t bytes;
};
std::map<uintptr_t, Alloc> allocs;  // by start
const size_t PAGE = (size_t)sysconf(_SC_PAGESIZE);

// The allocation that contains [p, p + n), or nullptr.
const Alloc* find_alloc(uintptr_t p, size_t n) {
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return nullptr;
    --it;
    const Alloc& a = it->second;
    return (p >= a.start && p + n <= a.start + a.bytes) ? &a : nullptr;
}

CUresult set_sticky(CUresult code, const std::string& message) {
    std::lock_guard<std::mutex> g(mu);
    if (sticky == CUDA_SUCCESS) {
        sticky = code;
        sticky_message = message;
    }
    return code;
}

// The most recent detailed message per error code, for cuGetErrorString.
std::string last_message[1024];
CUresult fail(CUresult code, const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    std::lock_guard<std::mutex> g(mu);
    if (code >= 0 && code < 1024) last_message[code] = buf;
    return code;
}

CUresult check_sticky() {
    std::lock_guard<std::mutex> g(mu);
    return sticky;
}

// ---- kernel modules ----
struct HostKernel {
    const EmuKernel* kernel;
    const EmuModule* module;
};
std::unordered_map<std::string, HostKernel> host_kernels;

struct Module {
    std::vector<std::string> names;  // kernels the CUBIN defines
};
struct Function {
    std::string name;
    HostKernel host;
};

// The kernel entry points of a CUBIN: global function symbols in sections ".text.<name>".
bool cubin_kernels(const void* image, std::vector<std::string>& out, std::string& why) {
    const unsigned char* b = (const unsigned char*)image;
    const Elf64_Ehdr* eh = (const Elf64_Ehdr*)b;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64) {
        why = "not a 64-bit ELF image (a CUBIN)";
        return false;
    }
    if (eh->e_machine != 190 /* EM_CUDA */) {
        why = "an ELF image for another machine than CUDA";
        return false;
    }
    const Elf64_Shdr* sh = (const Elf64_Shdr*)(b + eh->e_shoff);
    const char* shstr = (const char*)(b + sh[eh->e_shstrndx].sh_offset);
    for (int i = 0; i < eh->e_shnum; ++i) {
        if (sh[i].sh_type != SHT_SYMTAB) continue;
        const Elf64_Sym* syms = (const Elf64_Sym*)(b + sh[i].sh_offset);
        const char* strtab = (const char*)(b + sh[sh[i].sh_link].sh_offset);
        size_t count = sh[i].sh_size / sizeof(Elf64_Sym);
        for (size_t s = 0; s < count; ++s) {
            const Elf64_Sym& sym = syms[s];
            if (ELF64_ST_TYPE(sym.st_info) != STT_FUNC || ELF64_ST_BIND(sym.st_info) != STB_GLOBAL) continue;
            if (sym.st_shndx == SHN_UNDEF || sym.st_shndx >= eh->e_shnum) continue;
            std::string name = strtab + sym.st_name;
            if (std::string(shstr + sh[sym.st_shndx].sh_name) == ".text." + name) out.push_back(name);
        }
    }
    if (out.empty()) {
        why = "the CUBIN defines no kernel";
        return false;
    }
    return true;
}

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
    if (sigsetjmp(w->jmp, 1)) {
        const EmuWhere& at = w->where;
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
        int rc = job->module->run_block(&job->launch, b, &w->where);
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

// ---- controls for the tests and the CLI (not part of the CUDA API) ----

EXPORT int vaecuda_emu_version(void) { return 1; }

// Loads the kernel modules (newline-separated paths) and registers their kernels.
EXPORT int vaecuda_emu_register_modules(const char* paths) {
    std::string all(paths);
    size_t at = 0;
    while (at <= all.size()) {
        size_t nl = all.find('\n', at);
        std::string path = all.substr(at, nl == std::string::npos ? std::string::npos : nl - at);
        at = nl == std::string::npos ? all.size() + 1 : nl + 1;
        if (path.empty()) continue;
        void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        EmuModuleFn get = h ? (EmuModuleFn)dlsym(h, "vaecuda_emu_module") : nullptr;
        if (!get) {
            fprintf(stderr, "emulated device: cannot load kernel module %s: %s\n", path.c_str(), dlerror());
            return 1;
        }
        const EmuModule* m = get();
        std::lock_guard<std::mutex> g(mu);
        for (int k = 0; k < m->count; ++k) host_kernels[m->kernels[k].name] = HostKernel{&m->kernels[k], m};
    }
    return 0;
}

EXPORT void vaecuda_emu_set_order(int o, uint64_t seed) {
    order = o;
    order_seed = seed;
}

EXPORT void vaecuda_emu_set_memory_limit(uint64_t bytes) {
    std::lock_guard<std::mutex> g(mu);
    memory_limit = bytes ? bytes : default_limit();
}

EXPORT uint64_t vaecuda_emu_launches(void) { return launches.load(); }

// ---- the CUDA driver API, as far as cudarc uses it ----

EXPORT CUresult cuInit(unsigned) {
    install_fault_handler();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "%s", DEVICE_NAME);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    std::lock_guard<std::mutex> g(mu);
    *bytes = memory_limit;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetAttribute(int* v, int attrib, CUdevice) {
    switch (attrib) {
        case 1: *v = 1024; break;                  // max threads per block
        case 2: case 3: *v = 1024; break;          // max block dim x, y
        case 4: *v = 64; break;                    // max block dim z
        case 5: *v = 2147483647; break;            // max grid dim x
        case 6: case 7: *v = 65535; break;         // max grid dim y, z
        case 8: *v = 48 << 10; break;              // shared memory per block
        case 10: *v = 32; break;                   // warp size
        case 16: *v = SM_COUNT; break;             // multiprocessors
        case 41: *v = 1; break;                    // unified addressing
        case 75: *v = CC_MAJOR; break;
        case 76: *v = CC_MINOR; break;
        default: *v = 0; break;                    // memory pools (115) and the rest: no
    }
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
    *ctx = &primary;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
EXPORT CUresult cuCtxSetCurrent(void* ctx) {
    current_context = ctx;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = current_context;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
EXPORT CUresult cuCtxPopCurrent_v2(void** ctx) {
    if (ctx) *ctx = current_context;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSynchronize(void) { return check_sticky(); }

EXPORT CUresult cuStreamCreate(void** s, unsigned) {
    *s = new Stream();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
EXPORT CUresult cuStreamDestroy_v2(void* s) {
    delete (Stream*)s;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamSynchronize(void*) { return check_sticky(); }
EXPORT CUresult cuStreamQuery(void*) { return check_sticky(); }
EXPORT CUresult cuStreamWaitEvent(void*, void*, unsigned) { return check_sticky(); }

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (CUresult s = check_sticky()) return s;
    if (bytes == 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc of 0 bytes");
    {
        std::lock_guard<std::mutex> g(mu);
        if (memory_used + bytes > memory_limit) return CUDA_ERROR_OUT_OF_MEMORY;
    }
    // Whole pages for the data, one guard page on each side; the data ends flush against the
    // upper guard (rounded to 4 bytes, the smallest element the kernels use).
    size_t rounded = (bytes + 3) & ~(size_t)3;
    size_t data_pages = (rounded + PAGE - 1) / PAGE;
    size_t len = (data_pages + 2) * PAGE;
    char* m = (char*)mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* data_end = m + (data_pages + 1) * PAGE;
    if (mprotect(m + PAGE, data_pages * PAGE, PROT_READ | PROT_WRITE) != 0) {
        munmap(m, len);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    char* start = data_end - rounded;
    // NaN: memory nobody wrote must not pass for data. The slack below the start too, so a
    // small negative index reads NaN where it cannot reach the lower guard page.
    memset(m + PAGE, 0xFF, data_pages * PAGE);
    std::lock_guard<std::mutex> g(mu);
    allocs[(uintptr_t)start] = Alloc{m, len, (uintptr_t)start, bytes};
    memory_used += bytes;
    *p = (CUdeviceptr)start;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(mu);
    auto it = allocs.find((uintptr_t)p);
    if (it == allocs.end()) return CUDA_ERROR_INVALID_VALUE;
    munmap(it->second.map, it->second.map_len);
    memory_used -= it->second.bytes;
    allocs.erase(it);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }
EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> g(mu);
    *free_bytes = memory_limit > memory_used ? memory_limit - memory_used : 0;
    *total = memory_limit;
    return CUDA_SUCCESS;
}

// Copies and fills check their device range as a GPU's copy engine would fault on it.
static CUresult device_range(CUdeviceptr p, size_t n, const char* what) {
    std::lock_guard<std::mutex> g(mu);
    if (find_alloc((uintptr_t)p, n)) return CUDA_SUCCESS;
    last_message[CUDA_ERROR_INVALID_VALUE] = std::string(what) + ": the device range is not inside one allocation";
    return CUDA_ERROR_INVALID_VALUE;
}
EXPORT CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void*) {
    if (CUresult s = check_sticky()) return s;
    if (CUresult r = device_range(p, n, "cuMemsetD8")) return r;
    memset((void*)p, v, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) { return cuMemsetD8Async(p, v, n, nullptr); }
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) {
    if (CUresult s = check_sticky()) return s;
    if (CUresult r = device_range(dst, n, "cuMemcpyHtoD")) return r;
    memcpy((void*)dst, src, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr);
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) {
    if (CUresult s = check_sticky()) return s;
    if (CUresult r = device_range(src, n, "cuMemcpyDtoH")) return r;
    memcpy(dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr); }
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) {
    if (CUresult s = check_sticky()) return s;
    if (CUresult r = device_range(src, n, "cuMemcpyDtoD (source)")) return r;
    if (CUresult r = device_range(dst, n, "cuMemcpyDtoD (destination)")) return r;
    memmove((void*)dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
}

EXPORT CUresult cuModuleLoadData(void** module, const void* image) {
    if (CUresult s = check_sticky()) return s;
    std::vector<std::string> names;
    std::string why;
    if (!cubin_kernels(image, names, why)) return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: %s", why.c_str());
    std::lock_guard<std::mutex> g(mu);
    for (const std::string& n : names) {
        if (!host_kernels.count(n)) {
            last_message[CUDA_ERROR_INVALID_IMAGE] =
                "the CUBIN's kernel " + n + " has no host build (are the emulator's kernel modules out of date?)";
            return CUDA_ERROR_INVALID_IMAGE;
        }
    }
    *module = new Module{names};
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleUnload(void* module) {
    delete (Module*)module;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    Module* m = (Module*)module;
    bool in_cubin = false;
    for (const std::string& n : m->names) in_cubin |= n == name;
    if (!in_cubin) return fail(CUDA_ERROR_NOT_FOUND, "the module defines no kernel named %s", name);
    std::lock_guard<std::mutex> g(mu);
    *f = new Function{name, host_kernels.at(name)};
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncGetAttribute(int* v, int attrib, void*) {
    *v = attrib == 0 ? 1024 : 0;  // max threads per block; registers, local memory: none
    return CUDA_SUCCESS;
}

EXPORT CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned shared_bytes, void*, void** params, void** extra) {
    if (CUresult s = check_sticky()) return s;
    Function* fn = (Function*)f;
    const char* name = fn->name.c_str();
    uint64_t threads = (uint64_t)bx * by * bz;
    if (threads == 0 || threads > 1024 || bx > 1024 || by > 1024 || bz > 64 || gx == 0 || gy == 0 || gz == 0 ||
        gy > 65535 || gz > 65535)
        return fail(CUDA_ERROR_INVALID_VALUE, "%s: invalid launch grid (%u,%u,%u) x block (%u,%u,%u)", name, gx, gy, gz,
                    bx, by, bz);
    if (shared_bytes != 0 || !params || extra)
        return fail(CUDA_ERROR_NOT_SUPPORTED, "%s: dynamic shared memory and `extra` launch parameters", name);
    if (short_grid(name)) {
        if (gx > 1) --gx;
        else if (gy > 1) --gy;
    }
    // One launch at a time, as on one stream: the pool runs one job.
    static std::mutex launching;
    std::lock_guard<std::mutex> one_at_a_time(launching);
    Job job;
    job.launch = EmuLaunch{fn->host.kernel, params, {gx, gy, gz}, {bx, by, bz}, order.load(), order_seed.load()};
    job.module = fn->host.module;
    job.blocks = (uint64_t)gx * gy * gz;
    launches++;
    pool().run(&job);
    if (job.code != CUDA_SUCCESS) return set_sticky(job.code, job.message);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventCreate(void** e, unsigned) {
    *e = new Event();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventRecord(void* e, void*) {
    ((Event*)e)->ms = now_ms();
    return check_sticky();
}
EXPORT CUresult cuEventSynchronize(void*) { return check_sticky(); }
EXPORT CUresult cuEventQuery(void*) { return check_sticky(); }
EXPORT CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
    *ms = (float)(((Event*)end)->ms - ((Event*)start)->ms);
    return check_sticky();
}
EXPORT CUresult cuEventElapsedTime(float* ms, void* start, void* end) { return cuEventElapsedTime_v2(ms, start, end); }

EXPORT CUresult cuGetErrorName(CUresult code, const char** s) {
    switch (code) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_ILLEGAL_ADDRESS: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}

// The detailed message of the error, when the emulator has one (which kernel, block, thread).
EXPORT CUresult cuGetErrorString(CUresult code, const char** s) {
    std::lock_guard<std::mutex> g(mu);
    if (code == sticky && !sticky_message.empty()) {
        *s = sticky_message.c_str();
    } else if (code >= 0 && code < 1024 && !last_message[code].empty()) {
        *s = last_message[code].c_str();
    } else {
        return cuGetErrorName(code, s);
    }
    return CUDA_SUCCESS;
}
