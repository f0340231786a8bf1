// Asynchronous copies (part of runtime.h): host bodies of PTX `cp.async` (global to shared,
// 4, 8 or 16 bytes), `cp.async.commit_group` and `cp.async.wait_group N`, for kernels that
// wrap the instructions in device functions and call these when VAECUDA_EMULATED is defined:
//
//     emu_cp_async(dst_shared, src_global, bytes);  // cp.async.ca/cg.shared.global
//     emu_cp_async_commit();                        // cp.async.commit_group
//     emu_cp_async_wait(n);                         // cp.async.wait_group n
//
// The source is read when the copy is issued; the destination is poisoned (0xFF) at once and
// the data lands only at the wait that completes its group (all but the newest n committed
// groups), so a read of the destination before its wait reads NaN. Copies are per thread, as
// on the GPU: another thread sees them only after the issuing thread's wait and a barrier.
// Both addresses must be aligned to the size, or the launch fails as misaligned.
#pragma once
#include "checks.h"

#include <string.h>

namespace emu {

inline void cp_async_at(const char* file, int line, void* dst, const void* src, int bytes) {
    const SourceLocation at{file, (unsigned)line, 0};
    if (bytes != 4 && bytes != 8 && bytes != 16)
        check_failed(LAUNCH_FAILED, at, "cp.async copies 4, 8 or 16 bytes, not %d", bytes);
    if ((uintptr_t)dst % bytes || (uintptr_t)src % bytes)
        check_failed(MISALIGNED_ADDRESS, at, "cp.async of %d bytes from %p to %p: both must be %d-byte aligned", bytes,
                     src, dst, bytes);
    AsyncCopy c{dst, {}, bytes};
    memcpy(c.data, src, (size_t)bytes);
    memset(dst, 0xFF, (size_t)bytes);
    rt.current->copies.push_back(c);
}

inline void cp_async_commit() {
    Fiber* f = rt.current;
    f->groups.push_back(f->copies.size());
}

// Lands every copy of the committed groups but the newest n.
inline void cp_async_wait(int n) {
    Fiber* f = rt.current;
    if (n < 0) n = 0;
    if ((size_t)n >= f->groups.size()) return;
    const size_t done_groups = f->groups.size() - (size_t)n;
    const size_t done_copies = f->groups[done_groups - 1];
    for (size_t i = 0; i < done_copies; ++i) memcpy(f->copies[i].dst, f->copies[i].data, (size_t)f->copies[i].bytes);
    f->copies.erase(f->copies.begin(), f->copies.begin() + (long)done_copies);
    f->groups.erase(f->groups.begin(), f->groups.begin() + (long)done_groups);
    for (size_t& end : f->groups) end -= done_copies;
}

}  // namespace emu

#define emu_cp_async(dst, src, bytes) ::emu::cp_async_at(__FILE__, __LINE__, (dst), (src), (bytes))
#define emu_cp_async_commit() ::emu::cp_async_commit()
#define emu_cp_async_wait(n) ::emu::cp_async_wait(n)
