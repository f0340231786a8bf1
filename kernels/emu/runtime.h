// CUDA on the host: pasted in front of a kernel file's program text (the same text NVRTC
// compiles) to build it for the emulated device (src/backend/cuda/emu.rs). It maps the CUDA
// keywords the kernels use onto C++, and runs a block's threads as fibers:
//
// - Each CUDA thread is a fiber with its own stack. A block runs on one CPU thread in phases:
//   in each phase every unfinished fiber runs until its next __syncthreads() or its end, one
//   fiber after another, in the launch's order (forward, reverse, or shuffled anew for every
//   block and phase). So the threads of a block meet at each barrier exactly as on a GPU,
//   while anything a missing barrier leaves unordered comes out differently in another order.
// - __shared__ variables are thread_local statics: shared by the fibers of the block running
//   on this CPU thread, separate between blocks running at once on other CPU threads.
// - threadIdx is the running fiber's index; blockIdx, blockDim and gridDim are the block's.
//
// What it does not model: warps (no lockstep, no warp-synchronous code, no shuffles), the
// GPU memory model and atomics, timing, tensor cores. The kernels use none of them.
#pragma once
#include "abi.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <utility>
#include <vector>

// ---- the CUDA keywords ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static thread_local

struct uint3 {
    unsigned x, y, z;
};

// CUDA's integer and floating min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

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

struct Fiber {
    uint3 idx;
    void* sp = nullptr;     // saved stack pointer while suspended
    char* stack = nullptr;  // its stack while it is alive
    int state = 0;          // 0: not started, 1: waiting at a barrier, 2: finished
    const char* bar_file = nullptr;
    int bar_line = 0;
};

// The block running on this CPU thread.
struct Block {
    void* scheduler_sp = nullptr;
    const EmuLaunch* launch = nullptr;
    EmuWhere* where = nullptr;
    std::vector<Fiber> fibers;
    std::vector<unsigned> order;
    std::vector<char*> free_stacks;
};

inline thread_local Block block;
inline thread_local Fiber* current = nullptr;
inline thread_local uint3 block_idx, block_dim, grid_dim;

// 256 KiB per fiber (a debug build's frames are large), with a guard page below.
constexpr size_t STACK_BYTES = 256 << 10;

inline char* take_stack() {
    Block& b = block;
    if (!b.free_stacks.empty()) {
        char* s = b.free_stacks.back();
        b.free_stacks.pop_back();
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
    EmuWhere* w = b.where;
    if (w->stack_lo == 0 || (uintptr_t)lo < w->stack_lo) w->stack_lo = (uintptr_t)lo;
    if ((uintptr_t)hi > w->stack_hi) w->stack_hi = (uintptr_t)hi;
    return lo;
}

// Every fiber starts here, on its own stack: runs the kernel, then returns to the scheduler
// for good.
[[noreturn]] inline void fiber_main() {
    Block& b = block;
    const EmuKernel* k = b.launch->kernel;
    k->invoke(k->fn, b.launch->params);
    Fiber* f = current;
    f->state = 2;
    emu_switch_stack(&f->sp, b.scheduler_sp);
    __builtin_unreachable();
}

// A fresh stack laid out as emu_switch_stack leaves a suspended one: control words, six
// callee-saved registers, then fiber_main as the return address (16-byte aligned on entry).
inline void* start_stack(char* lo) {
    uint64_t* sp = (uint64_t*)(lo + STACK_BYTES + (size_t)sysconf(_SC_PAGESIZE));
    *--sp = 0;                            // fiber_main's own (never used) return address
    *--sp = (uint64_t)(void*)&fiber_main;  // where the first switch "returns" to
    for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp, rbx, r12–r15
    *--sp = 0x037F00001F80ull;             // MXCSR 0x1F80 (low word), x87 control word 0x037F
    return sp;
}

inline void syncthreads(const char* file, int line) {
    Fiber* f = current;
    f->state = 1;
    f->bar_file = file;
    f->bar_line = line;
    emu_switch_stack(&f->sp, block.scheduler_sp);
}

inline uint64_t mix(uint64_t x) {  // splitmix64
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

inline int run_block(const EmuLaunch* L, uint64_t linear, EmuWhere* w) {
    Block& b = block;
    b.launch = L;
    b.where = w;
    grid_dim = {L->grid[0], L->grid[1], L->grid[2]};
    block_dim = {L->block[0], L->block[1], L->block[2]};
    block_idx = {(unsigned)(linear % L->grid[0]), (unsigned)(linear / L->grid[0] % L->grid[1]),
                 (unsigned)(linear / ((uint64_t)L->grid[0] * L->grid[1]))};
    w->block[0] = block_idx.x, w->block[1] = block_idx.y, w->block[2] = block_idx.z;
    const unsigned n = L->block[0] * L->block[1] * L->block[2];
    b.fibers.assign(n, Fiber{});
    b.order.resize(n);
    for (unsigned t = 0; t < n; ++t) {
        b.fibers[t].idx = {t % L->block[0], t / L->block[0] % L->block[1], t / (L->block[0] * L->block[1])};
    }
    for (unsigned phase = 0;; ++phase) {
        for (unsigned t = 0; t < n; ++t) b.order[t] = L->order == EMU_REVERSE ? n - 1 - t : t;
        if (L->order == EMU_SHUFFLED) {
            uint64_t r = mix(L->seed ^ mix(linear * 0x100000001B3ull + phase));
            for (unsigned t = n - 1; t > 0; --t) {
                r = mix(r);
                std::swap(b.order[t], b.order[r % (t + 1)]);
            }
        }
        const Fiber* waiting = nullptr;  // the first fiber found at a barrier in this phase
        for (unsigned t : b.order) {
            Fiber& f = b.fibers[t];
            if (f.state == 2) continue;
            if (f.state == 0) {
                f.stack = take_stack();
                f.sp = start_stack(f.stack);
            }
            current = &f;
            w->thread[0] = f.idx.x, w->thread[1] = f.idx.y, w->thread[2] = f.idx.z;
            emu_switch_stack(&b.scheduler_sp, f.sp);
            if (f.state == 2) {
                b.free_stacks.push_back(f.stack);
                f.stack = nullptr;
                continue;
            }
            if (!waiting) {
                waiting = &f;
            } else if (waiting->bar_line != f.bar_line || strcmp(waiting->bar_file, f.bar_file) != 0) {
                snprintf(w->error, sizeof w->error,
                         "threads of block (%u,%u,%u) wait at different barriers: thread (%u,%u,%u) at %s:%d, "
                         "thread (%u,%u,%u) at %s:%d",
                         block_idx.x, block_idx.y, block_idx.z, waiting->idx.x, waiting->idx.y, waiting->idx.z,
                         waiting->bar_file, waiting->bar_line, f.idx.x, f.idx.y, f.idx.z, f.bar_file, f.bar_line);
                // The suspended fibers are abandoned with their stacks (the context is dead).
                return 1;
            }
        }
        if (!waiting) return 0;  // every thread finished
    }
}

// Calls a kernel with the parameter block of cuLaunchKernel: p[i] points at argument i.
template <class F>
struct Invoke;
template <class... A>
struct Invoke<void (*)(A...)> {
    template <size_t... I>
    static void go(void (*f)(A...), void** p, std::index_sequence<I...>) {
        f(*static_cast<A*>(p[I])...);
    }
    static void call(void* fn, void** p) { go(reinterpret_cast<void (*)(A...)>(fn), p, std::index_sequence_for<A...>{}); }
};

}  // namespace emu

#define threadIdx (::emu::current->idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)

// The module's table, generated after the program text (src/backend/cuda/emu.rs).
#define EMU_MODULE_BEGIN static const EmuKernel emu_kernels[] = {
#define EMU_KERNEL(name) {#name, (void*)&name, &::emu::Invoke<decltype(&name)>::call},
#define EMU_MODULE_END                                                                            \
    };                                                                                            \
    extern "C" __attribute__((visibility("default"))) const EmuModule* vaecuda_emu_module(void) { \
        static const EmuModule m = {emu_kernels, (int)(sizeof emu_kernels / sizeof emu_kernels[0]), \
                                    &::emu::run_block};                                           \
        return &m;                                                                                \
    }
