// What the emulated driver (driver.cpp) and the host builds of the kernel files (runtime.h)
// agree on. Each side is its own shared library, so only plain C types cross.
#pragma once
#include <stdint.h>

extern "C" {

// Calls a kernel's host function `fn` with the parameter block of cuLaunchKernel (an array
// of pointers to each argument's value).
typedef void (*EmuInvoke)(void* fn, void** params);

// One kernel of a module: its extern "C" name ("gemm_f32"), host function and arguments.
struct EmuKernel {
    const char* name;
    void* fn;
    EmuInvoke invoke;
    const unsigned* param_sizes;  // bytes of each argument (a graph copies them at capture)
    int param_count;
};

// The order in which a block's threads run between two barriers or warp-level calls.
enum EmuOrder { EMU_FORWARD = 0, EMU_REVERSE = 1, EMU_SHUFFLED = 2 };

// One kernel launch.
struct EmuLaunch {
    const EmuKernel* kernel;
    void** params;
    unsigned grid[3], block[3];
    int order;               // an EmuOrder
    uint64_t seed;           // of the shuffled orders (threads, and blocks)
    unsigned dynamic_shared;  // bytes of `extern __shared__` memory per block
};

// What one CPU thread is running, kept current by the module so that a fault can be reported
// with the kernel, block and thread it happened in.
struct EmuWhere {
    const EmuLaunch* launch;
    unsigned block[3], thread[3];
    // Fiber stacks of this CPU thread, [lo, hi): a fault there is a kernel's stack overflow.
    uintptr_t stack_lo, stack_hi;
    // Dynamic shared memory of this CPU thread's block, [lo, hi), with a guard page above.
    uintptr_t dynamic_lo, dynamic_hi;
    // Set by the module when a block fails without a fault (threads waiting at different
    // barriers, a warp-level call with a wrong mask), or before abort_block.
    char error[768];
    // A check inside a kernel failed (an index past a shared array, a misaligned vector
    // access, a signed overflow): the module sets `error` and `abort_code` (a CUresult) and
    // calls this, which does not return (the driver jumps back to its worker loop).
    int abort_code;
    void (*abort_block)(EmuWhere* where);
};

// A kernel module: its kernels, and how to run one block of a launch on the calling thread
// (x fastest in `linear`). run_block returns 0, or nonzero with `where->error` set.
struct EmuModule {
    const EmuKernel* kernels;
    int count;
    int (*run_block)(const EmuLaunch* launch, uint64_t linear, EmuWhere* where);
};

// Every module exports `const EmuModule* vaecuda_emu_module(void)`.
typedef const EmuModule* (*EmuModuleFn)(void);
}
