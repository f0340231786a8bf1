// Warps (part of runtime.h): a block's threads form warps of 32 by linear thread index, and
// the warp-level intrinsics meet their lanes as the GPU does, with PTX shfl.sync's semantics.
//
// A lane that reaches a warp-level call stores its input and suspends; when every lane of the
// call's mask is waiting at the same call with the same mask, the scheduler computes every
// result from the stored inputs (all inputs are read before any result is written) and the
// lanes run on, each until its next call, in the launch's thread order: lanes are not in
// lockstep between calls. What the CUDA programming guide leaves undefined fails the launch:
// a mask without the calling lane; lanes of one call with different masks; a lane of the mask
// that has exited, does not exist, or waits elsewhere (at a barrier or another call; found when
// nothing else can run); a shuffle from a lane outside the mask; a width that is not a power of
// two up to 32.
#pragma once
#include "threads.h"

#include <string.h>

namespace emu {

constexpr int WARP = 32;

inline const char* op_name(WarpOp op) {
    switch (op) {
        case SHFL_IDX: return "__shfl_sync";
        case SHFL_UP: return "__shfl_up_sync";
        case SHFL_DOWN: return "__shfl_down_sync";
        case SHFL_XOR: return "__shfl_xor_sync";
        case BALLOT: return "__ballot_sync";
        case ANY: return "__any_sync";
        case ALL: return "__all_sync";
        case SYNCWARP: return "__syncwarp";
        case ACTIVEMASK: return "__activemask";
        case MMA_TF32: return "mma.sync.m16n8k8.tf32";
        case MMA_BF16: return "mma.sync.m16n8k16.bf16";
    }
    return "?";
}

// "lane 5 of warp 1 (thread (37,0,0))"
inline const char* lane_words(const Fiber& f, char* buf, size_t n) {
    snprintf(buf, n, "lane %u of warp %u (thread (%u,%u,%u))", f.linear % WARP, f.linear / WARP, f.idx.x, f.idx.y,
             f.idx.z);
    return buf;
}

// Where a fiber waits, in words, for the messages.
inline const char* waits_where(const Fiber& f, char* buf, size_t n) {
    switch (f.state) {
        case FINISHED: snprintf(buf, n, "has exited"); break;
        case AT_BARRIER: snprintf(buf, n, "waits at __syncthreads() at %s:%d", f.bar_file, f.bar_line); break;
        case AT_WARP:
            snprintf(buf, n, "waits at %s(mask 0x%08x) at %s:%d", op_name(f.call.op), f.call.mask, f.call.file,
                     f.call.line);
            break;
        default: snprintf(buf, n, "has not arrived"); break;
    }
    return buf;
}

// The source lane of a shuffle per the PTX ISA's shfl.sync: c packs the segment mask (bits
// 12:8) and the clamp (bits 4:0) as CUDA's intrinsics set them; a source out of range (pval
// false) gives the lane its own value.
inline unsigned shfl_source(WarpOp op, unsigned lane, int b, int width) {
    const unsigned segmask = (unsigned)(WARP - width) & 31u;
    const unsigned clamp = op == SHFL_UP ? 0u : 31u;
    const unsigned bval = (unsigned)b & 31u;
    const int max_lane = (int)((lane & segmask) | (clamp & ~segmask));
    const int min_lane = (int)(lane & segmask);
    int j;
    bool pval;
    switch (op) {
        case SHFL_UP: j = (int)lane - (int)bval; pval = j >= max_lane; break;
        case SHFL_DOWN: j = (int)lane + (int)bval; pval = j <= max_lane; break;
        case SHFL_XOR: j = (int)(lane ^ bval); pval = j <= max_lane; break;
        default: j = min_lane | (int)(bval & ~segmask); pval = j <= max_lane; break;
    }
    return pval ? (unsigned)j : lane;
}

// The tensor-core call completes its warp (tensor.h).
inline void mma_complete(unsigned warp);
inline void mma_bf16_complete(unsigned warp);

// Whether lane g waits at the same warp-level call as c (a __syncwarp meets any __syncwarp).
inline bool at_same_call(const Fiber& g, const WarpCall& c) {
    return g.state == AT_WARP && g.call.op == c.op &&
           (c.op == SYNCWARP || (g.call.line == c.line && (g.call.file == c.file || strcmp(g.call.file, c.file) == 0)));
}

// Fiber f has just suspended at a warp-level call: checks it, and completes the call when every
// lane of its mask waits there. Returns nonzero (with the block's error set) on undefined
// behaviour.
inline int warp_arrived(Fiber& f) {
    const WarpCall& c = f.call;
    const unsigned lane = f.linear % WARP, warp = f.linear / WARP;
    char who[96], other[160];
    rt.heap->waiting[warp] |= 1u << lane;
    if (c.op == ACTIVEMASK) return 0;  // completed when nothing else can run (complete_activemasks)
    if (!(c.mask >> lane & 1u)) {
        return block_error("%s at %s:%d: block (%u,%u,%u), %s: the mask 0x%08x does not contain the calling lane",
                           c.name, c.file, c.line, rt.block_idx.x, rt.block_idx.y, rt.block_idx.z,
                           lane_words(f, who, sizeof who), c.mask);
    }
    if ((c.op == MMA_TF32 || c.op == MMA_BF16) && c.mask != 0xffffffffu) {
        return block_error("%s at %s:%d: block (%u,%u,%u), %s: all 32 lanes must take part (mask 0x%08x)", c.name,
                           c.file, c.line, rt.block_idx.x, rt.block_idx.y, rt.block_idx.z,
                           lane_words(f, who, sizeof who), c.mask);
    }
    if (c.op <= SHFL_XOR && (c.width < 1 || c.width > WARP || (c.width & (c.width - 1)))) {
        return block_error("%s at %s:%d: block (%u,%u,%u), %s: width %d is not a power of two from 1 to 32", c.name,
                           c.file, c.line, rt.block_idx.x, rt.block_idx.y, rt.block_idx.z,
                           lane_words(f, who, sizeof who), c.width);
    }
    // Lanes of the mask that cannot come: they do not exist, or they have exited.
    const unsigned lanes_here = rt.threads - warp * WARP;
    const unsigned exist = lanes_here >= WARP ? 0xffffffffu : (1u << lanes_here) - 1u;
    if (unsigned missing = c.mask & ~exist) {
        return block_error("%s at %s:%d: block (%u,%u,%u), %s: the mask 0x%08x names lane %u, which does not "
                           "exist (the block has %u threads)",
                           c.name, c.file, c.line, rt.block_idx.x, rt.block_idx.y, rt.block_idx.z,
                           lane_words(f, who, sizeof who), c.mask, (unsigned)__builtin_ctz(missing), rt.threads);
    }
    if (unsigned gone = c.mask & rt.heap->exited[warp]) {
        return block_error("%s at %s:%d: block (%u,%u,%u), %s: lane %u of the mask 0x%08x has exited", c.name,
                           c.file, c.line, rt.block_idx.x, rt.block_idx.y, rt.block_idx.z,
                           lane_words(f, who, sizeof who), (unsigned)__builtin_ctz(gone), c.mask);
    }
    // A lane of the mask still running (or at a barrier) may yet come: wait for it (a lane that
    // never comes is found when nothing can run, in warp_stuck).
    if ((rt.heap->waiting[warp] & c.mask) != c.mask) return 0;
    // Every lane of the mask waits at some warp-level call: the same one, with the same mask?
    bool everyone = true;
    for (unsigned l = 0; l < WARP; ++l) {
        if (!(c.mask >> l & 1u)) continue;
        const Fiber& g = rt.heap->fibers[warp * WARP + l];
        const bool same_call = at_same_call(g, c);
        if (same_call && g.call.mask != c.mask) {
            return block_error("%s at %s:%d: block (%u,%u,%u): lanes of one call disagree on the mask: %s has 0x%08x, "
                               "%s has 0x%08x",
                               c.name, c.file, c.line, rt.block_idx.x, rt.block_idx.y, rt.block_idx.z,
                               lane_words(f, who, sizeof who), c.mask, lane_words(g, other, sizeof other),
                               g.call.mask);
        }
        everyone &= same_call;
    }
    if (!everyone) return 0;
    // Everyone is here: compute every result, then release the lanes.
    if (c.op == MMA_TF32) mma_complete(warp);
    if (c.op == MMA_BF16) mma_bf16_complete(warp);
    uint64_t votes = 0;
    bool any = false, all = true;
    for (unsigned l = 0; l < WARP; ++l) {
        if (!(c.mask >> l & 1u)) continue;
        const bool p = rt.heap->fibers[warp * WARP + l].call.value != 0;
        votes |= (uint64_t)p << l;
        any |= p;
        all &= p;
    }
    for (unsigned l = 0; l < WARP; ++l) {
        if (!(c.mask >> l & 1u)) continue;
        Fiber& g = rt.heap->fibers[warp * WARP + l];
        switch (c.op) {
            case SHFL_IDX: case SHFL_UP: case SHFL_DOWN: case SHFL_XOR: {
                const unsigned src = shfl_source(c.op, l, g.call.b, g.call.width);
                if (!(c.mask >> src & 1u)) {
                    return block_error("%s at %s:%d: block (%u,%u,%u), %s reads lane %u, which is not in the mask "
                                       "0x%08x",
                                       c.name, c.file, c.line, rt.block_idx.x, rt.block_idx.y, rt.block_idx.z,
                                       lane_words(g, who, sizeof who), src, c.mask);
                }
                g.call.result = rt.heap->fibers[warp * WARP + src].call.value;
                break;
            }
            case BALLOT: g.call.result = votes; break;
            case ANY: g.call.result = any; break;
            case ALL: g.call.result = all; break;
            default: break;
        }
    }
    for (unsigned l = 0; l < WARP; ++l) {
        if (c.mask >> l & 1u) rt.heap->fibers[warp * WARP + l].state = READY;
    }
    rt.heap->waiting[warp] &= ~c.mask;
    rt.woken += __builtin_popcount(c.mask);
    return 0;
}

// Nothing can run: each __activemask() returns the lanes of its warp waiting at that same call.
// Returns whether any was completed.
inline bool complete_activemasks() {
    bool done = false;
    for (Fiber& f : rt.heap->fibers) {
        if (f.state != AT_WARP || f.call.op != ACTIVEMASK) continue;
        const unsigned warp = f.linear / WARP;
        unsigned mask = 0;
        for (unsigned l = 0; l < WARP && warp * WARP + l < rt.threads; ++l) {
            const Fiber& g = rt.heap->fibers[warp * WARP + l];
            if (g.state == AT_WARP && g.call.op == ACTIVEMASK && g.call.line == f.call.line &&
                strcmp(g.call.file, f.call.file) == 0)
                mask |= 1u << l;
        }
        f.call.result = mask;
        done = true;
    }
    for (Fiber& f : rt.heap->fibers) {
        if (f.state == AT_WARP && f.call.op == ACTIVEMASK) {
            f.state = READY;
            rt.heap->waiting[f.linear / WARP] &= ~(1u << (f.linear % WARP));
        }
    }
    return done;
}

// Nothing can run and some lane still waits at a warp-level call: says which lane of its mask
// is elsewhere. Always returns nonzero.
inline int warp_stuck(const Fiber& f) {
    const WarpCall& c = f.call;
    const unsigned warp = f.linear / WARP;
    char who[96], where[200];
    for (unsigned l = 0; l < WARP; ++l) {
        if (!(c.mask >> l & 1u)) continue;
        const Fiber& g = rt.heap->fibers[warp * WARP + l];
        if (!at_same_call(g, c)) {
            return block_error("%s at %s:%d: block (%u,%u,%u), %s waits for lane %u of the mask 0x%08x, which %s",
                               c.name, c.file, c.line, rt.block_idx.x, rt.block_idx.y, rt.block_idx.z,
                               lane_words(f, who, sizeof who), l, c.mask, waits_where(g, where, sizeof where));
        }
    }
    return block_error("%s at %s:%d: block (%u,%u,%u): a warp-level call that never completed", c.name, c.file,
                       c.line, rt.block_idx.x, rt.block_idx.y, rt.block_idx.z);
}

// The calling lane waits at a warp-level call and returns its result.
inline uint64_t warp_call(WarpOp op, unsigned mask, uint64_t value, int b, int width, const char* file, int line,
                          const void* in = nullptr, void* out = nullptr) {
    Fiber* f = rt.current;
    f->call = WarpCall{op, mask, value, b, width, op_name(op), file, line, 0, in, out};
    f->state = AT_WARP;
    suspend();
    return f->call.result;
}

template <class T>
inline T shfl(WarpOp op, const char* file, int line, unsigned mask, T var, int b, int width = WARP) {
    static_assert(sizeof(T) <= 8, "a shuffled value has at most 64 bits");
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof(T));
    bits = warp_call(op, mask, bits, b, width, file, line);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

}  // namespace emu

#undef warpSize  // cuda_bf16.h defines it too
#define warpSize 32
#define __shfl_sync(...) ::emu::shfl(::emu::SHFL_IDX, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl(::emu::SHFL_UP, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl(::emu::SHFL_DOWN, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl(::emu::SHFL_XOR, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred) \
    ((unsigned)::emu::warp_call(::emu::BALLOT, (mask), (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, pred) ((int)::emu::warp_call(::emu::ANY, (mask), (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, pred) ((int)::emu::warp_call(::emu::ALL, (mask), (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __activemask() ((unsigned)::emu::warp_call(::emu::ACTIVEMASK, 0, 0, 0, 32, __FILE__, __LINE__))
// A call site, then the optional mask: __syncwarp() and __syncwarp(mask).
#define __syncwarp(...) ::emu::SyncwarpAt{__FILE__, __LINE__}(__VA_ARGS__)
namespace emu {
struct SyncwarpAt {
    const char* file;
    int line;
    void operator()(unsigned mask = 0xffffffffu) const { warp_call(SYNCWARP, mask, 0, 0, 32, file, line); }
};
}  // namespace emu
