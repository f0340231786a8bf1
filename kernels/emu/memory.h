// Device memory of the emulated driver (part of driver.cpp): host memory between guard pages.

namespace {

// ---- device memory: guard pages around every allocation ----
struct Alloc {
    char* map;        // the whole mapping, guards included
    size_t map_len;
    uintptr_t start;  // what the caller got
    size_t bytes;
};
std::map<uintptr_t, Alloc> allocs;  // by start
const size_t PAGE = (size_t)sysconf(_SC_PAGESIZE);

const size_t SLACK_ALIGN = 16;

// The allocation that contains [p, p + n), or nullptr.
const Alloc* find_alloc(uintptr_t p, size_t n) {
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return nullptr;
    --it;
    const Alloc& a = it->second;
    return (p >= a.start && p + n <= a.start + a.bytes) ? &a : nullptr;
}

// After a launch: the first allocation whose slack (the bytes between its end and the next
// multiple of 16, where the guard page cannot reach) a kernel wrote, described; the slack is
// poisoned again. Empty when none was.
std::string slack_written() {
    std::lock_guard<std::mutex> g(mu);
    for (auto& [start, a] : allocs) {
        unsigned char* end = (unsigned char*)(a.start + a.bytes);
        size_t slack = (SLACK_ALIGN - a.bytes % SLACK_ALIGN) % SLACK_ALIGN;
        for (size_t i = 0; i < slack; ++i) {
            if (end[i] == 0xFF) continue;
            char buf[256];
            snprintf(buf, sizeof buf, "wrote past the end of a %zu-byte device allocation, at byte %zu", a.bytes,
                     a.bytes + i);
            memset(end, 0xFF, slack);
            return buf;
        }
    }
    return "";
}

}  // namespace

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (CUresult s = check_sticky()) return s;
    if (strict_capture_active()) return refuse_in_capture(nullptr, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuMemAlloc");
    if (bytes == 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc of 0 bytes");
    {
        std::lock_guard<std::mutex> g(mu);
        if (memory_used + bytes > memory_limit) return CUDA_ERROR_OUT_OF_MEMORY;
    }
    // Whole pages for the data, one guard page on each side; the data ends flush against the
    // upper guard, rounded to 16 bytes: a float4 or double2 at the start is aligned, as on a
    // GPU (cuMemAlloc aligns to 256). The slack past the end stays 0xFF; a launch that
    // changes it wrote past the end (slack_written).
    size_t rounded = (bytes + SLACK_ALIGN - 1) & ~(SLACK_ALIGN - 1);
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
EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* s) {
    if (capturing(s)) return fail(CUDA_ERROR_NOT_SUPPORTED, "allocating in a captured stream (a graph memory node) is not modelled");
    return cuMemAlloc_v2(p, bytes);
}
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
EXPORT CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void* stream) {
    if (CUresult s = check_sticky()) return s;
    if (CUresult r = device_range(p, n, "cuMemsetD8")) return r;
    CUresult captured;
    if (capture_memory(stream, NODE_MEMSET, p, 0, n, v, &captured)) return captured;
    memset((void*)p, v, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) { return cuMemsetD8Async(p, v, n, nullptr); }
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
    if (CUresult s = check_sticky()) return s;
    if (capturing(stream))
        return refuse_in_capture(stream, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "a copy from pageable host memory");
    if (CUresult r = device_range(dst, n, "cuMemcpyHtoD")) return r;
    memcpy((void*)dst, src, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr);
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
    if (CUresult s = check_sticky()) return s;
    if (capturing(stream))
        return refuse_in_capture(stream, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "a copy to pageable host memory");
    if (CUresult r = device_range(src, n, "cuMemcpyDtoH")) return r;
    memcpy(dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr); }
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
    if (CUresult s = check_sticky()) return s;
    if (CUresult r = device_range(src, n, "cuMemcpyDtoD (source)")) return r;
    if (CUresult r = device_range(dst, n, "cuMemcpyDtoD (destination)")) return r;
    CUresult captured;
    if (capture_memory(stream, NODE_COPY, dst, src, n, 0, &captured)) return captured;
    memmove((void*)dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
}

