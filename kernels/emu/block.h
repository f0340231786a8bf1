// Running one block (part of runtime.h): poisoned shared memory, then the scheduler that runs
// the block's fibers between barriers and warp-level calls.
#pragma once
#include "warps.h"

#include <dlfcn.h>
#include <link.h>
#include <string.h>

#include <utility>

namespace emu {

// This module's thread-local block on the calling CPU thread: every __shared__ variable of
// its kernels (thread_local statics) and the runtime object `rt`, nothing else.
inline void find_tls() {
    struct Search {
        uintptr_t code;
        char* lo;
        size_t len;
    } s{(uintptr_t)(void*)&find_tls, nullptr, 0};
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* arg) {
            Search* s = (Search*)arg;
            bool ours = false;
            size_t tls = 0;
            for (int i = 0; i < info->dlpi_phnum; ++i) {
                const ElfW(Phdr)& p = info->dlpi_phdr[i];
                uintptr_t at = info->dlpi_addr + p.p_vaddr;
                if (p.p_type == PT_LOAD && s->code >= at && s->code < at + p.p_memsz) ours = true;
                if (p.p_type == PT_TLS) tls = p.p_memsz;
            }
            if (!ours) return 0;
            s->lo = (char*)info->dlpi_tls_data;
            s->len = tls;
            return 1;
        },
        &s);
    char* me = (char*)&rt;
    if (!s.lo || me < s.lo || me + sizeof rt > s.lo + s.len) {
        fprintf(stderr, "emulated device: cannot find the kernel module's shared memory (thread-local block)\n");
        abort();
    }
    rt.tls_lo = s.lo;
    rt.tls_len = s.len;
}

// Every block's shared memory starts as 0xFF bytes (NaN as float and double, -1 as an int),
// as garbage does on a GPU: a read of shared memory no thread of this block wrote shows.
inline void poison_shared(const EmuLaunch* L, EmuWhere* w) {
    if (!rt.tls_lo) find_tls();
    char* me = (char*)&rt;
    memset(rt.tls_lo, 0xFF, (size_t)(me - rt.tls_lo));
    memset(me + sizeof rt, 0xFF, (size_t)(rt.tls_lo + rt.tls_len - (me + sizeof rt)));
    // Dynamic shared memory ends flush against a guard page (a fault past its end names it).
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t MAX_DYNAMIC = ((227 << 10) + page - 1) / page * page;  // whole pages below the guard
    if (!rt.dynamic_map) {
        rt.dynamic_len = MAX_DYNAMIC + page;
        void* m = mmap(nullptr, rt.dynamic_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "emulated device: cannot map dynamic shared memory\n");
            abort();
        }
        rt.dynamic_map = (char*)m;
        mprotect(rt.dynamic_map + MAX_DYNAMIC, page, PROT_NONE);
    }
    const size_t bytes = (L->dynamic_shared + 15) & ~(size_t)15;
    rt.dynamic = rt.dynamic_map + MAX_DYNAMIC - bytes;
    memset(rt.dynamic, 0xFF, bytes);
    w->dynamic_lo = (uintptr_t)rt.dynamic;
    w->dynamic_hi = (uintptr_t)(rt.dynamic_map + MAX_DYNAMIC);
}

inline void* dynamic_shared() { return rt.dynamic; }

inline void set_order(const EmuLaunch* L, uint64_t linear, unsigned phase, unsigned pass) {
    const unsigned n = rt.threads;
    for (unsigned t = 0; t < n; ++t) rt.heap->order[t] = L->order == EMU_REVERSE ? n - 1 - t : t;
    if (L->order == EMU_SHUFFLED) {
        uint64_t r = mix(L->seed ^ mix(linear * 0x100000001B3ull + phase * 0x9E3779B9ull + pass));
        for (unsigned t = n - 1; t > 0; --t) {
            r = mix(r);
            std::swap(rt.heap->order[t], rt.heap->order[r % (t + 1)]);
        }
    }
}

inline int run_block(const EmuLaunch* L, uint64_t linear, EmuWhere* w) {
    if (!rt.heap) rt.heap = new BlockState();
    rt.launch = L;
    rt.where = w;
    rt.grid_dim = {L->grid[0], L->grid[1], L->grid[2]};
    rt.block_dim = {L->block[0], L->block[1], L->block[2]};
    rt.block_idx = {(unsigned)(linear % L->grid[0]), (unsigned)(linear / L->grid[0] % L->grid[1]),
                    (unsigned)(linear / ((uint64_t)L->grid[0] * L->grid[1]))};
    w->block[0] = rt.block_idx.x, w->block[1] = rt.block_idx.y, w->block[2] = rt.block_idx.z;
    poison_shared(L, w);
    const unsigned n = L->block[0] * L->block[1] * L->block[2];
    rt.threads = n;
    rt.heap->fibers.assign(n, Fiber{});
    memset(rt.heap->waiting, 0, sizeof rt.heap->waiting);
    memset(rt.heap->exited, 0, sizeof rt.heap->exited);
    rt.heap->order.resize(n);
    for (unsigned t = 0; t < n; ++t) {
        rt.heap->fibers[t].idx = {t % L->block[0], t / L->block[0] % L->block[1], t / (L->block[0] * L->block[1])};
        rt.heap->fibers[t].linear = t;
    }
    for (unsigned phase = 0;; ++phase) {
        // Run every fiber that can run, in the launch's order, until none can: each runs to
        // its next barrier, warp-level call or end.
        for (unsigned pass = 0;; ++pass) {
            set_order(L, linear, phase, pass);
            rt.woken = 0;
            for (unsigned t : rt.heap->order) {
                Fiber& f = rt.heap->fibers[t];
                if (f.state != NOT_STARTED && f.state != READY) continue;
                if (f.state == NOT_STARTED) {
                    f.stack = take_stack();
                    f.sp = start_stack(f.stack);
                }
                rt.current = &f;
                w->thread[0] = f.idx.x, w->thread[1] = f.idx.y, w->thread[2] = f.idx.z;
                emu_switch_stack(&rt.scheduler_sp, f.sp);
                if (f.state == FINISHED) {
                    rt.heap->free_stacks.push_back(f.stack);
                    f.stack = nullptr;
                    rt.heap->exited[f.linear / WARP] |= 1u << (f.linear % WARP);
                } else if (f.state == AT_WARP && warp_arrived(f) != 0) {
                    return 1;  // the suspended fibers are abandoned with their stacks (the context is dead)
                }
            }
            // Another pass only for fibers a completed warp-level call woke (the first pass
            // runs every fiber to where it waits).
            if (rt.woken == 0 && !complete_activemasks()) break;
        }
        // Nothing can run: every fiber has finished or waits at a barrier.
        const Fiber* waiting = nullptr;
        for (const Fiber& f : rt.heap->fibers) {
            if (f.state == AT_WARP) return warp_stuck(f);
        }
        for (const Fiber& f : rt.heap->fibers) {
            if (f.state != AT_BARRIER) continue;
            if (!waiting) {
                waiting = &f;
            } else if (waiting->bar_line != f.bar_line || strcmp(waiting->bar_file, f.bar_file) != 0) {
                return block_error(
                    "threads of block (%u,%u,%u) wait at different barriers: thread (%u,%u,%u) at %s:%d, "
                    "thread (%u,%u,%u) at %s:%d",
                    rt.block_idx.x, rt.block_idx.y, rt.block_idx.z, waiting->idx.x, waiting->idx.y, waiting->idx.z,
                    waiting->bar_file, waiting->bar_line, f.idx.x, f.idx.y, f.idx.z, f.bar_file, f.bar_line);
            }
        }
        if (!waiting) return 0;  // every thread finished
        for (Fiber& f : rt.heap->fibers) {
            if (f.state == AT_BARRIER) f.state = READY;
        }
    }
}

}  // namespace emu
