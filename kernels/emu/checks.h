// What a GPU leaves undefined, turned into launch failures (part of runtime.h): the host
// builds are compiled with -fsanitize=bounds,alignment,signed-integer-overflow, and these are
// the sanitizer's handlers (its ABI, no sanitizer runtime linked): an index past a shared (or
// local) array, a misaligned vector access, and signed integer overflow each fail the launch
// with the kernel, block, thread and source line. The CUDA vector types carry the GPU's
// alignment, so the alignment check catches a misaligned float4 as the GPU faults on it.
#pragma once
#include "threads.h"

#include <stdint.h>

namespace emu {

struct SourceLocation {
    const char* file;
    unsigned line, column;
};
struct TypeDescriptor {
    unsigned short kind, info;  // kind 0: integer; info bit 0: signed, info >> 1: log2 of the bits
    char name[1];
};
struct OutOfBoundsData {
    SourceLocation loc;
    const TypeDescriptor* array_type;
    const TypeDescriptor* index_type;
};
struct OverflowData {
    SourceLocation loc;
    const TypeDescriptor* type;
};
struct TypeMismatchData {
    SourceLocation loc;
    const TypeDescriptor* type;
    unsigned char log_alignment, check_kind;
};

// An integer operand as the sanitizer passes it (inline up to 64 bits).
inline long long int_value(const TypeDescriptor* t, uintptr_t v) {
    const unsigned bits = 1u << (t->info >> 1);
    if (!(t->info & 1) || bits >= 64) return (long long)v;
    const unsigned shift = 64 - bits;
    return (long long)((uint64_t)v << shift) >> shift;
}

enum { ILLEGAL_ADDRESS = 700, MISALIGNED_ADDRESS = 716, LAUNCH_FAILED = 719 };

[[noreturn]] inline void check_failed(int code, const SourceLocation& at, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));
inline void check_failed(int code, const SourceLocation& at, const char* fmt, ...) {
    EmuWhere* w = rt.where;
    char what[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(w->error, sizeof w->error, "block (%u,%u,%u), thread (%u,%u,%u) at %s:%u: %s", rt.block_idx.x,
             rt.block_idx.y, rt.block_idx.z, w->thread[0], w->thread[1], w->thread[2], at.file, at.line, what);
    w->abort_code = code;
    w->abort_block(w);
    __builtin_unreachable();
}

inline void overflow(OverflowData* d, uintptr_t a, uintptr_t b, char op) {
    const unsigned bits = 1u << (d->type->info >> 1);
    check_failed(LAUNCH_FAILED, d->loc, "signed %u-bit integer overflow: %lld %c %lld (an index that needs a wider type)",
                 bits, int_value(d->type, a), op, int_value(d->type, b));
}

}  // namespace emu

#define EMU_HANDLER extern "C" __attribute__((used, noinline))
EMU_HANDLER void __ubsan_handle_out_of_bounds(::emu::OutOfBoundsData* d, uintptr_t index) {
    ::emu::check_failed(::emu::ILLEGAL_ADDRESS, d->loc, "index %lld is outside the array (of type %s)",
                        ::emu::int_value(d->index_type, index), d->array_type->name);
}
EMU_HANDLER void __ubsan_handle_out_of_bounds_abort(::emu::OutOfBoundsData* d, uintptr_t index) {
    __ubsan_handle_out_of_bounds(d, index);
}
EMU_HANDLER void __ubsan_handle_add_overflow(::emu::OverflowData* d, uintptr_t a, uintptr_t b) {
    ::emu::overflow(d, a, b, '+');
}
EMU_HANDLER void __ubsan_handle_sub_overflow(::emu::OverflowData* d, uintptr_t a, uintptr_t b) {
    ::emu::overflow(d, a, b, '-');
}
EMU_HANDLER void __ubsan_handle_mul_overflow(::emu::OverflowData* d, uintptr_t a, uintptr_t b) {
    ::emu::overflow(d, a, b, '*');
}
EMU_HANDLER void __ubsan_handle_divrem_overflow(::emu::OverflowData* d, uintptr_t a, uintptr_t b) {
    ::emu::overflow(d, a, b, '/');
}
EMU_HANDLER void __ubsan_handle_negate_overflow(::emu::OverflowData* d, uintptr_t a) {
    ::emu::overflow(d, 0, a, '-');
}
EMU_HANDLER void __ubsan_handle_add_overflow_abort(::emu::OverflowData* d, uintptr_t a, uintptr_t b) {
    ::emu::overflow(d, a, b, '+');
}
EMU_HANDLER void __ubsan_handle_sub_overflow_abort(::emu::OverflowData* d, uintptr_t a, uintptr_t b) {
    ::emu::overflow(d, a, b, '-');
}
EMU_HANDLER void __ubsan_handle_mul_overflow_abort(::emu::OverflowData* d, uintptr_t a, uintptr_t b) {
    ::emu::overflow(d, a, b, '*');
}
EMU_HANDLER void __ubsan_handle_divrem_overflow_abort(::emu::OverflowData* d, uintptr_t a, uintptr_t b) {
    ::emu::overflow(d, a, b, '/');
}
EMU_HANDLER void __ubsan_handle_negate_overflow_abort(::emu::OverflowData* d, uintptr_t a) {
    ::emu::overflow(d, 0, a, '-');
}
EMU_HANDLER void __ubsan_handle_type_mismatch_v1(::emu::TypeMismatchData* d, uintptr_t p) {
    const char* how = d->check_kind == 0 ? "load of" : d->check_kind == 1 ? "store to" : "access to";
    if (p == 0) ::emu::check_failed(::emu::ILLEGAL_ADDRESS, d->loc, "%s a null %s pointer", how, d->type->name);
    ::emu::check_failed(::emu::MISALIGNED_ADDRESS, d->loc, "misaligned %s %s at address %#lx (it needs %u-byte alignment)",
                        how, d->type->name, (unsigned long)p, 1u << d->log_alignment);
}
EMU_HANDLER void __ubsan_handle_type_mismatch_v1_abort(::emu::TypeMismatchData* d, uintptr_t p) {
    __ubsan_handle_type_mismatch_v1(d, p);
}

// ---- CUDA's vector types, with the GPU's alignment ----
// Unless CUDA's own vector_types.h came first (through cuda_fp16.h or cuda_bf16.h): it
// declares the same types with the same alignment (__builtin_align__ is aligned() on a host).
#ifndef __VECTOR_TYPES_H__
#define EMU_VECTOR2(T, name, align)                                                          \
    struct __attribute__((aligned(align))) name {                                            \
        T x, y;                                                                              \
    };                                                                                       \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define EMU_VECTOR4(T, name, align)                                                          \
    struct __attribute__((aligned(align))) name {                                            \
        T x, y, z, w;                                                                        \
    };                                                                                       \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
EMU_VECTOR2(float, float2, 8)
EMU_VECTOR4(float, float4, 16)
EMU_VECTOR2(double, double2, 16)
EMU_VECTOR2(int, int2, 8)
EMU_VECTOR4(int, int4, 16)
EMU_VECTOR2(unsigned, uint2, 8)
EMU_VECTOR4(unsigned, uint4, 16)
EMU_VECTOR2(long long, longlong2, 16)
EMU_VECTOR2(unsigned long long, ulonglong2, 16)
EMU_VECTOR2(short, short2, 4)
EMU_VECTOR4(short, short4, 8)
EMU_VECTOR4(unsigned char, uchar4, 4)
EMU_VECTOR4(signed char, char4, 4)
#endif  // __VECTOR_TYPES_H__
