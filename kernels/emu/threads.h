// The threads of a block as fibers (part of runtime.h; see there for the design).
#pragma once
#include "abi.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <vector>

#ifndef __VECTOR_TYPES_H__  // else CUDA's vector_types.h has it (see checks.h)
struct uint3 {
    unsigned x, y, z;
};
#endif

namespace emu {

// x86-64: switch stacks saving only what the ABI says a callee keeps (rbx, rbp, r12–r15, the
// SSE and x87 control words): a few nanoseconds, no system call (ucontext's swapcontext
// makes one per switch to save the signal mask).
#if defined(__x86_64__)
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
.text
.p2align 4
.type emu_switch_stack,@function
.hidden emu_switch_stack
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch_stack, .-emu_switch_stack
)");
#else
#error "the emulated device's fibers are written for x86-64"
#endif

// Where a fiber is.
enum FiberState {
    NOT_STARTED,
    READY,     // suspended, free to run on (a warp-level call it waited at has completed)
    AT_BARRIER,
    AT_WARP,   // waiting at a warp-level call for the other lanes of its mask
    FINISHED,
};

// The kinds of warp-level call.
enum WarpOp { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL, SYNCWARP, ACTIVEMASK, MMA_TF32, MMA_BF16 };

// What a lane brought to a warp-level call, and what it takes away.
struct WarpCall {
    WarpOp op;
    unsigned mask;
    uint64_t value;  // the shuffled value's bits, or the vote's predicate
    int b, width;    // source lane, delta or lane mask; segment width
    const char* name;
    const char* file;
    int line;
    uint64_t result;
    const void* in;  // a tensor-core call's fragments (on the waiting fiber's stack), and
    void* out;       // where its result goes
};

// A cp.async in flight: its bytes, read at issue, land at the wait that completes its group.
struct AsyncCopy {
    void* dst;
    unsigned char data[16];
    int bytes;
};

struct Fiber {
    uint3 idx;
    unsigned linear;         // x + y·bx + z·bx·by: the lane is linear % 32, the warp linear / 32
    void* sp = nullptr;      // saved stack pointer while suspended
    char* stack = nullptr;   // its stack while it is alive
    FiberState state = NOT_STARTED;
    const char* bar_file = nullptr;
    int bar_line = 0;
    WarpCall call{};
    std::vector<AsyncCopy> copies;  // issued, not yet landed (async.h)
    std::vector<size_t> groups;     // committed groups: the end of each in `copies`
};

// What the runtime keeps on the heap per CPU thread.
struct BlockState {
    std::vector<Fiber> fibers;
    std::vector<unsigned> order;
    std::vector<char*> free_stacks;
    // Per warp (at most 1,024 / 32 of them), as lane bit masks: the lanes waiting at a
    // warp-level call, and the lanes that have exited. A call is checked lane by lane only
    // when every lane of its mask waits somewhere, so a warp's 32 arrivals cost 32 + 32
    // steps instead of 32 × 32.
    unsigned waiting[32];
    unsigned exited[32];
};

// Everything the runtime keeps per CPU thread, in one object: the rest of this module's
// thread-local storage is the kernels' __shared__ variables, which each block poisons. Trivial
// to construct and destroy, so reaching it (threadIdx reads rt.current) costs no TLS
// initialization check.
struct Runtime {
    void* scheduler_sp = nullptr;
    const EmuLaunch* launch = nullptr;
    EmuWhere* where = nullptr;
    BlockState* heap = nullptr;
    Fiber* current = nullptr;
    uint3 block_idx{}, block_dim{}, grid_dim{};
    unsigned threads = 0;
    unsigned woken = 0;  // fibers made READY by completed warp-level calls in this pass
    char* tls_lo = nullptr;  // this module's thread-local block on this CPU thread
    size_t tls_len = 0;
    char* dynamic_map = nullptr;  // dynamic shared memory: data pages, then a guard page
    size_t dynamic_len = 0;
    char* dynamic = nullptr;      // the block's dynamic shared memory, ending at the guard
};

inline thread_local Runtime rt;

// 256 KiB per fiber (a debug build's frames are large), with a guard page below.
constexpr size_t STACK_BYTES = 256 << 10;

inline char* take_stack() {
    if (!rt.heap->free_stacks.empty()) {
        char* s = rt.heap->free_stacks.back();
        rt.heap->free_stacks.pop_back();
        return s;
    }
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* m = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        fprintf(stderr, "emulated device: cannot map a fiber stack\n");
        abort();
    }
    mprotect(m, page, PROT_NONE);
    char* lo = (char*)m;
    char* hi = lo + STACK_BYTES + page;
    EmuWhere* w = rt.where;
    if (w->stack_lo == 0 || (uintptr_t)lo < w->stack_lo) w->stack_lo = (uintptr_t)lo;
    if ((uintptr_t)hi > w->stack_hi) w->stack_hi = (uintptr_t)hi;
    return lo;
}

// Every fiber starts here, on its own stack: runs the kernel, then returns to the scheduler
// for good.
[[noreturn]] inline void fiber_main() {
    const EmuKernel* k = rt.launch->kernel;
    k->invoke(k->fn, rt.launch->params);
    Fiber* f = rt.current;
    f->state = FINISHED;
    emu_switch_stack(&f->sp, rt.scheduler_sp);
    __builtin_unreachable();
}

// A fresh stack laid out as emu_switch_stack leaves a suspended one: control words, six
// callee-saved registers, then fiber_main as the return address (16-byte aligned on entry).
inline void* start_stack(char* lo) {
    uint64_t* sp = (uint64_t*)(lo + STACK_BYTES + (size_t)sysconf(_SC_PAGESIZE));
    *--sp = 0;                             // fiber_main's own (never used) return address
    *--sp = (uint64_t)(void*)&fiber_main;  // where the first switch "returns" to
    for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp, rbx, r12–r15
    *--sp = 0x037F00001F80ull;             // MXCSR 0x1F80 (low word), x87 control word 0x037F
    return sp;
}

// Suspends the running fiber (its state says where it waits) and returns to the scheduler.
inline void suspend() {
    Fiber* f = rt.current;
    emu_switch_stack(&f->sp, rt.scheduler_sp);
}

inline void syncthreads(const char* file, int line) {
    Fiber* f = rt.current;
    f->state = AT_BARRIER;
    f->bar_file = file;
    f->bar_line = line;
    suspend();
}

inline uint64_t mix(uint64_t x) {  // splitmix64
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Fails the block: the message goes to the driver, which fails the launch with it.
inline int block_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline int block_error(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rt.where->error, sizeof rt.where->error, fmt, ap);
    va_end(ap);
    return 1;
}

}  // namespace emu
