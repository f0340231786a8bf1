// CUDA graphs in the emulated driver (part of driver.cpp): stream capture records launches,
// memsets and device-to-device copies; a graph replays them in order. What a GPU refuses
// during capture is refused here with the same error codes, and invalidates the capture as
// it does there (cuStreamEndCapture then fails with CUDA_ERROR_STREAM_CAPTURE_INVALIDATED):
// a synchronize or query of the stream or context, a copy to or from host memory (the
// emulator has no pinned memory, so every host buffer is pageable), an allocation (outside
// relaxed mode), and waiting on an event recorded outside the capture (cudarc's event
// tracking across streams does that). Capturing the legacy NULL stream is refused too.
// Not modelled: forking a capture into other streams through events, memory-allocation
// nodes (cuMemAllocAsync while capturing), graph editing and cuGraphExecUpdate.

namespace {

// One recorded operation.
struct GraphNode {
    int kind;  // NODE_KERNEL, NODE_MEMSET, NODE_COPY
    Function* fn = nullptr;
    unsigned grid[3] = {}, block[3] = {}, shared = 0;
    std::vector<std::vector<char>> args;  // each argument's value, copied at capture
    CUdeviceptr dst = 0, src = 0;
    size_t bytes = 0;
    unsigned char value = 0;
};
struct Graph {
    std::vector<GraphNode> nodes;
};
struct GraphExec {
    std::vector<GraphNode> nodes;
};

struct Capture {
    int mode = 0;  // CU_STREAM_CAPTURE_MODE_GLOBAL 0, THREAD_LOCAL 1, RELAXED 2
    std::thread::id thread;  // the thread that began it (THREAD_LOCAL restricts that one only)
    bool invalidated = false;
    Graph graph;
};
std::map<void*, Capture> captures;  // by stream; guarded by mu
std::vector<void*> events_in_capture;  // events last recorded on a capturing stream

bool event_in_capture(void* e) {
    std::lock_guard<std::mutex> g(mu);
    return std::find(events_in_capture.begin(), events_in_capture.end(), e) != events_in_capture.end();
}
void set_event_in_capture(void* e, bool in) {
    std::lock_guard<std::mutex> g(mu);
    auto it = std::find(events_in_capture.begin(), events_in_capture.end(), e);
    if (in && it == events_in_capture.end()) events_in_capture.push_back(e);
    if (!in && it != events_in_capture.end()) events_in_capture.erase(it);
}

bool capturing(void* stream) {
    std::lock_guard<std::mutex> g(mu);
    return stream && captures.count(stream);
}

// Whether capture `c` forbids this thread "unsafe" calls (allocations, context
// synchronization): a GLOBAL one forbids every thread, a THREAD_LOCAL one the thread that
// began it, a RELAXED one none. Called with mu held.
bool strict_for_this_thread(const Capture& c) {
    return c.mode == 0 || (c.mode == 1 && c.thread == std::this_thread::get_id());
}

// Any capture that forbids this thread "unsafe" calls now.
bool strict_capture_active() {
    std::lock_guard<std::mutex> g(mu);
    for (auto& [s, c] : captures)
        if (strict_for_this_thread(c)) return true;
    return false;
}

// Refuses `what` during the capture of `stream` (or of any stream in strict mode when
// stream is null), invalidating it, with the code a GPU returns.
CUresult refuse_in_capture(void* stream, CUresult code, const char* what) {
    std::lock_guard<std::mutex> g(mu);
    for (auto& [s, c] : captures) {
        if (stream ? s == stream : strict_for_this_thread(c)) c.invalidated = true;
    }
    last_message[code] = std::string(what) + " is not allowed while a stream is being captured into a CUDA graph (it "
                                             "would be refused on a GPU too); the capture is invalidated";
    return code;
}

CUresult capture_launch(Function* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, void* stream, void** params, void** extra) {
    if (!params || extra) return fail(CUDA_ERROR_NOT_SUPPORTED, "%s: `extra` launch parameters", fn->name.c_str());
    GraphNode n;
    n.kind = NODE_KERNEL;
    n.fn = fn;
    n.grid[0] = gx, n.grid[1] = gy, n.grid[2] = gz;
    n.block[0] = bx, n.block[1] = by, n.block[2] = bz;
    n.shared = shared_bytes;
    const EmuKernel* k = fn->host.kernel;
    for (int i = 0; i < k->param_count; ++i) {
        const char* v = (const char*)params[i];
        n.args.emplace_back(v, v + k->param_sizes[i]);
    }
    std::lock_guard<std::mutex> g(mu);
    Capture& c = captures.at(stream);
    if (c.invalidated) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    c.graph.nodes.push_back(std::move(n));
    return CUDA_SUCCESS;
}

// A memset or device copy on a capturing stream: recorded. Returns false when not capturing.
bool capture_memory(void* stream, int kind, CUdeviceptr dst, CUdeviceptr src, size_t bytes,
                    unsigned char value, CUresult* result) {
    std::lock_guard<std::mutex> g(mu);
    auto it = stream ? captures.find(stream) : captures.end();
    if (it == captures.end()) return false;
    if (it->second.invalidated) {
        *result = CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        return true;
    }
    GraphNode n;
    n.kind = kind;
    n.dst = dst, n.src = src, n.bytes = bytes, n.value = value;
    it->second.graph.nodes.push_back(std::move(n));
    *result = CUDA_SUCCESS;
    return true;
}

}  // namespace

EXPORT CUresult cuStreamBeginCapture_v2(void* stream, int mode) {
    if (CUresult s = check_sticky()) return s;
    if (!stream)
        return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                    "the legacy NULL stream cannot be captured into a CUDA graph: capture a stream of its own");
    std::lock_guard<std::mutex> g(mu);
    if (captures.count(stream)) {
        last_message[CUDA_ERROR_ILLEGAL_STATE] = "cuStreamBeginCapture: the stream is already being captured";
        return CUDA_ERROR_ILLEGAL_STATE;
    }
    Capture c;
    c.mode = mode;
    c.thread = std::this_thread::get_id();
    captures.emplace(stream, std::move(c));
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamBeginCapture(void* stream, int mode) { return cuStreamBeginCapture_v2(stream, mode); }

EXPORT CUresult cuStreamEndCapture(void* stream, void** graph) {
    std::lock_guard<std::mutex> g(mu);
    auto it = stream ? captures.find(stream) : captures.end();
    if (it == captures.end()) {
        last_message[CUDA_ERROR_ILLEGAL_STATE] = "cuStreamEndCapture: the stream is not being captured";
        return CUDA_ERROR_ILLEGAL_STATE;
    }
    bool invalid = it->second.invalidated;
    Graph* made = invalid ? nullptr : new Graph{std::move(it->second.graph.nodes)};
    captures.erase(it);
    *graph = made;
    if (invalid) {
        last_message[CUDA_ERROR_STREAM_CAPTURE_INVALIDATED] =
            "cuStreamEndCapture: the capture was invalidated by a call a capture does not allow (see the error it "
            "returned)";
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamIsCapturing(void* stream, int* status) {
    std::lock_guard<std::mutex> g(mu);
    auto it = stream ? captures.find(stream) : captures.end();
    *status = it == captures.end() ? 0 : it->second.invalidated ? 2 : 1;  // NONE, ACTIVE, INVALIDATED
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    if (!graph) return CUDA_ERROR_INVALID_VALUE;
    *exec = new GraphExec{((Graph*)graph)->nodes};
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGraphLaunch(void* exec, void* stream) {
    if (CUresult s = check_sticky()) return s;
    if (capturing(stream)) return fail(CUDA_ERROR_NOT_SUPPORTED, "launching a graph into a capture is not modelled");
    std::vector<GraphNode>& nodes = ((GraphExec*)exec)->nodes;
    // VAECUDA_EMU_MUTATE=graph-drop-last replays every node but the last: a planted bug that
    // the graph-against-eager tests must catch.
    const char* m = getenv("VAECUDA_EMU_MUTATE");
    const size_t count = nodes.size() - (m && !strcmp(m, "graph-drop-last") && !nodes.empty() ? 1 : 0);
    for (size_t i = 0; i < count; ++i) {
        GraphNode& n = nodes[i];
        CUresult r = CUDA_SUCCESS;
        if (n.kind == NODE_KERNEL) {
            std::vector<void*> params;
            for (auto& a : n.args) params.push_back(a.data());
            r = launch(n.fn, n.grid[0], n.grid[1], n.grid[2], n.block[0], n.block[1], n.block[2], n.shared,
                       params.data(), nullptr);
        } else if (n.kind == NODE_MEMSET) {
            r = cuMemsetD8Async(n.dst, n.value, n.bytes, nullptr);
        } else {
            r = cuMemcpyDtoDAsync_v2(n.dst, n.src, n.bytes, nullptr);
        }
        if (r != CUDA_SUCCESS) return r;
    }
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphUpload(void*, void*) { return check_sticky(); }
EXPORT CUresult cuGraphExecDestroy(void* exec) {
    delete (GraphExec*)exec;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphDestroy(void* graph) {
    delete (Graph*)graph;
    return CUDA_SUCCESS;
}
