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

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <numeric>
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
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_MISALIGNED_ADDRESS = 716,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_UNMATCHED = 903,
    CUDA_ERROR_STREAM_CAPTURE_UNJOINED = 904,
    CUDA_ERROR_STREAM_CAPTURE_ISOLATION = 905,
    CUDA_ERROR_STREAM_CAPTURE_IMPLICIT = 906,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
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

// Stream capture (graphs.h), which the calls below consult.
enum { NODE_KERNEL, NODE_MEMSET, NODE_COPY };
bool capturing(void* stream);
bool strict_capture_active();
CUresult refuse_in_capture(void* stream, CUresult code, const char* what);
bool capture_memory(void* stream, int kind, CUdeviceptr dst, CUdeviceptr src, size_t bytes, unsigned char value,
                    CUresult* result);

}  // namespace

#include "memory.h"
#include "modules.h"
#include "launch.h"
#include "graphs.h"

// ---- controls for the tests and the CLI (not part of the CUDA API) ----

EXPORT int vaecuda_emu_version(void) { return 1; }

// Loads the kernel modules (newline-separated paths) and registers their kernels.
EXPORT void vaecuda_emu_set_order(int o, uint64_t seed) {
    order = o;
    order_seed = seed;
}

EXPORT void vaecuda_emu_set_memory_limit(uint64_t bytes) {
    std::lock_guard<std::mutex> g(mu);
    memory_limit = bytes ? bytes : default_limit();
}

EXPORT uint64_t vaecuda_emu_launches(void) { return launches.load(); }

// For the emulator's own tests only: forgets a sticky error, so that one process can check
// many failing launches (a real context stays dead).
EXPORT void vaecuda_emu_clear_error(void) {
    std::lock_guard<std::mutex> g(mu);
    sticky = CUDA_SUCCESS;
    sticky_message.clear();
}

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
EXPORT CUresult cuCtxSynchronize(void) {
    if (strict_capture_active()) return refuse_in_capture(nullptr, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuCtxSynchronize");
    return check_sticky();
}

EXPORT CUresult cuStreamCreate(void** s, unsigned) {
    *s = new Stream();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
EXPORT CUresult cuStreamDestroy_v2(void* s) {
    delete (Stream*)s;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamSynchronize(void* s) {
    if (capturing(s)) return refuse_in_capture(s, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamSynchronize");
    return check_sticky();
}
EXPORT CUresult cuStreamQuery(void* s) {
    if (capturing(s)) return refuse_in_capture(s, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamQuery");
    return check_sticky();
}
EXPORT CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    if (capturing(s) && !event_in_capture(e))
        return refuse_in_capture(s, CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
                                 "waiting on an event recorded outside the capture (cudarc's event tracking across "
                                 "streams does this; disable it for captured work)");
    if (!capturing(s) && event_in_capture(e))
        return fail(CUDA_ERROR_NOT_SUPPORTED, "forking a capture into another stream through an event is not modelled");
    return check_sticky();
}

EXPORT CUresult cuEventCreate(void** e, unsigned) {
    *e = new Event();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventRecord(void* e, void* s) {
    set_event_in_capture(e, capturing(s));
    if (!capturing(s)) ((Event*)e)->ms = now_ms();
    return check_sticky();
}
EXPORT CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
EXPORT CUresult cuEventSynchronize(void* e) {
    if (event_in_capture(e)) return refuse_in_capture(nullptr, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuEventSynchronize on a captured event");
    return check_sticky();
}
EXPORT CUresult cuEventQuery(void* e) {
    if (event_in_capture(e)) return refuse_in_capture(nullptr, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuEventQuery on a captured event");
    return check_sticky();
}
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
        case CUDA_ERROR_ILLEGAL_STATE: *s = "CUDA_ERROR_ILLEGAL_STATE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_ILLEGAL_ADDRESS: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
        case CUDA_ERROR_MISALIGNED_ADDRESS: *s = "CUDA_ERROR_MISALIGNED_ADDRESS"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        case CUDA_ERROR_STREAM_CAPTURE_UNMATCHED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED"; break;
        case CUDA_ERROR_STREAM_CAPTURE_UNJOINED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNJOINED"; break;
        case CUDA_ERROR_STREAM_CAPTURE_ISOLATION: *s = "CUDA_ERROR_STREAM_CAPTURE_ISOLATION"; break;
        case CUDA_ERROR_STREAM_CAPTURE_IMPLICIT: *s = "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT"; break;
        case CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD: *s = "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD"; break;
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
