// CUDA on the host: pasted in front of a kernel file's program text (the same text NVRTC
// compiles) to build it for the emulated device (src/backend/cuda/emu.rs). It maps the CUDA
// keywords the kernels use onto C++, and runs a block's threads as fibers:
//
// - Each CUDA thread is a fiber with its own stack (threads.h). A block runs on one CPU
//   thread in phases (block.h): in each phase every unfinished fiber runs until its next
//   __syncthreads(), warp-level call or end, one fiber after another, in the launch's order
//   (forward, reverse, or shuffled anew for every block, phase and pass). So the threads of a
//   block meet at each barrier exactly as on a GPU, while anything a missing barrier leaves
//   unordered comes out differently in another order.
// - Warps of 32 by linear thread index; shuffles, votes, __syncwarp and __activemask meet the
//   lanes of their mask with PTX semantics, and a wrong mask is an error (warps.h). Lanes are
//   not in lockstep between warp-level calls.
// - __shared__ variables are thread-local statics (shared by the fibers of the block running
//   on this CPU thread, separate between blocks running at once on other CPU threads),
//   poisoned with 0xFF bytes at the start of every block; `extern __shared__` arrays (the
//   build rewrites their declaration) live in a buffer that ends at a guard page (block.h).
// - Indexes past arrays, misaligned vector accesses and signed overflow fail the launch
//   (checks.h, with the sanitizer flags of emu.rs); locals start as a pattern, not zero.
// - threadIdx is the running fiber's index; blockIdx, blockDim and gridDim are the block's.
//
// - Tensor cores: mma.sync m16n8k8 TF32 as a warp-level call with the PTX fragment layout
//   (tensor.h), for kernels that wrap the instruction in a device function.
//
// - Asynchronous copies: cp.async with commit and wait groups (async.h); the data lands at
//   the wait.
//
// What it does not model: the GPU memory model and atomics, timing, WMMA.
#pragma once
#include "abi.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <utility>

// ---- the CUDA keywords ----
// CUDA's headers (cuda_fp16.h, cuda_bf16.h, included before this file) define them for a
// host compiler their own way; these take over.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __restrict__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
// The bound itself is read from the CUBIN by the driver, which enforces it at launch.
#define __launch_bounds__(...)
#define __restrict__ __restrict
// At block scope thread_local implies static.
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))

// CUDA's sincospi (sin πx and cos πx; the host's libm has none): computed here as sin and cos
// of π·x rounded to double. A GPU reduces the argument exactly, so its results may differ
// from these in the last bit of the double (see "What it cannot show" in kernels/README.md).
inline void sincospi(double x, double* s, double* c) {
    *s = sin(3.141592653589793 * x);
    *c = cos(3.141592653589793 * x);
}

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

#include "threads.h"
#include "warps.h"
#include "block.h"
#include "checks.h"
#include "tensor.h"
#include "async.h"

namespace emu {

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
    static constexpr unsigned sizes[sizeof...(A) + 1] = {(unsigned)sizeof(A)..., 0};
    static constexpr int count = (int)sizeof...(A);
};

}  // namespace emu

#define threadIdx (::emu::rt.current->idx)
#define blockIdx (::emu::rt.block_idx)
#define blockDim (::emu::rt.block_dim)
#define gridDim (::emu::rt.grid_dim)
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
// What `extern __shared__ T name[];` becomes in the host build (emu.rs rewrites the line).
#define EMU_DYNAMIC_SHARED(T, name) T* const name = static_cast<T*>(::emu::dynamic_shared())

// The module's table, generated after the program text (src/backend/cuda/emu.rs).
#define EMU_MODULE_BEGIN static const EmuKernel emu_kernels[] = {
#define EMU_KERNEL(name)                                                                      \
    {#name, (void*)&name, &::emu::Invoke<decltype(&name)>::call, ::emu::Invoke<decltype(&name)>::sizes, \
     ::emu::Invoke<decltype(&name)>::count},
#define EMU_MODULE_END                                                                            \
    };                                                                                            \
    extern "C" __attribute__((visibility("default"))) const EmuModule* vaecuda_emu_module(void) { \
        static const EmuModule m = {emu_kernels, (int)(sizeof emu_kernels / sizeof emu_kernels[0]), \
                                    &::emu::run_block};                                           \
        return &m;                                                                                \
    }
