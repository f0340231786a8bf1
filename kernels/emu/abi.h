// What the emulated driver (driver.cpp) and the host builds of the kernel files (runtime.h)
// agree on. Each side is its own shared library, so only plain C types cross.
#pragma once
#include <stdint.h>

extern "C" {

// Calls a kernel's host function `fn` with the parameter block of cuLaunchKernel (an array
// of pointers to each argument's value).
typedef void (*EmuInvoke)(void* fn, void** params);

// One kernel of a module: its extern "C" name ("gemm_f32") and host function.
struct EmuKernel {
    const char* name;
    void* fn;
    EmuInvoke invoke;
};

// The order in which a block's threads run between two barriers.
enum EmuOrder { EMU_FORWARD = 0, EMU_REVERSE = 1, EMU_SHUFFLED = 2 };

// One kernel launch.
struct EmuLaunch {
    const EmuKernel* kernel;
    void** params;
    unsigned grid[3], block[3];
    int order;      // an EmuOrder
    uint64_t seed;  // of the shuffled order
};

// What one CPU thread is running, kept current by the module so that a fault can be reported
// with the kernel, block and thread it happened in.
struct EmuWhere {
    const EmuLaunch* launch;
    unsigned block[3], thread[3];
    // Fiber stacks of this CPU thread, [lo, hi): a fault there is a kernel's stack overflow.
    uintptr_t stack_lo, stack_hi;
    // Set by the module when a block fails without a fault (threads waiting at different
    // barriers).
    char error[512];
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
