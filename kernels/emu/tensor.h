// Tensor cores (part of runtime.h): the warp-wide matrix multiply-accumulates of PTX
// `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32` and
// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` (below), for kernels that wrap the instruction
// in a device function and call this host body when VAECUDA_EMULATED is defined:
//
//     #ifdef VAECUDA_EMULATED
//         emu_mma_m16n8k8_tf32(d, a, b, c);    // float d[4], unsigned a[4], b[2], float c[4]
//     #else
//         asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 ..." ...);
//     #endif
//
// It is a warp-level call: all 32 lanes must make it (mask 0xffffffff, as `.aligned` requires).
// The fragments follow the PTX ISA's tables for m16n8k8 with .tf32 (groupID = lane / 4,
// tig = lane % 4): a0 A[g][tig], a1 A[g+8][tig], a2 A[g][tig+4], a3 A[g+8][tig+4]; b0 B[tig][g],
// b1 B[tig+4][g]; c0/d0 C[g][2·tig], c1 C[g][2·tig+1], c2 C[g+8][2·tig], c3 C[g+8][2·tig+1].
// Operands are tf32 bit patterns: the 13 low bits are ignored, as the hardware ignores them
// (convert with emu_cvt_rna_tf32, the host body of cvt.rna.tf32.f32: nearest, ties away from
// zero). Products are exact and the sum is formed in double, then rounded to f32 once; the
// hardware instead aligns the products to the largest and truncates inside the sum, so its
// last bit can differ (see kernels/README.md).
#pragma once
#include "warps.h"

#include <string.h>

#define VAECUDA_EMULATED 1

namespace emu {

// The input one lane brings to an mma (TF32 and BF16 have the same registers: four of A, two
// of B, four f32 of C).
struct MmaIn {
    uint32_t a[4], b[2];
    float c[4];
};

inline float tf32_value(uint32_t bits) {
    bits &= 0xffffe000u;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// D = A·B + C over `k` products, rounded once to f32, into each lane's d (rows g, g, g+8, g+8 and
// columns 2t, 2t+1, 2t, 2t+1, as both shapes' accumulator tables place them).
inline void mma_write_d(unsigned warp, const double (*A)[16], const double (*B)[8], const double (*C)[8], int k) {
    for (unsigned l = 0; l < WARP; ++l) {
        float* d = (float*)rt.heap->fibers[warp * WARP + l].call.out;
        const unsigned g = l / 4, t = l % 4;
        const unsigned rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
        for (int r = 0; r < 4; ++r) {
            double s = C[rows[r]][cols[r]];
            for (int j = 0; j < k; ++j) s += A[rows[r]][j] * B[j][cols[r]];
            d[r] = (float)s;
        }
    }
}

// The accumulator fragment c0..c3 of lane (g, t) into C.
inline void mma_read_c(const MmaIn& in, unsigned g, unsigned t, double (*C)[8]) {
    C[g][2 * t] = in.c[0], C[g][2 * t + 1] = in.c[1], C[g + 8][2 * t] = in.c[2], C[g + 8][2 * t + 1] = in.c[3];
}

// Every lane of the warp has arrived: D = A·B + C from the fragments, back into each lane's d.
inline void mma_complete(unsigned warp) {
    double A[16][16], B[16][8], C[16][8];
    for (unsigned l = 0; l < WARP; ++l) {
        const MmaIn& in = *(const MmaIn*)rt.heap->fibers[warp * WARP + l].call.in;
        const unsigned g = l / 4, t = l % 4;
        A[g][t] = tf32_value(in.a[0]), A[g + 8][t] = tf32_value(in.a[1]);
        A[g][t + 4] = tf32_value(in.a[2]), A[g + 8][t + 4] = tf32_value(in.a[3]);
        B[t][g] = tf32_value(in.b[0]), B[t + 4][g] = tf32_value(in.b[1]);
        mma_read_c(in, g, t, C);
    }
    mma_write_d(warp, A, B, C, 8);
}

// One lane's part of a warp-wide mma (`op` MMA_TF32 or MMA_BF16): its registers in, its d out.
inline void mma_at(WarpOp op, const char* file, int line, float* d, const unsigned* a, const unsigned* b,
                   const float* c) {
    MmaIn in;
    memcpy(in.a, a, sizeof in.a);
    memcpy(in.b, b, sizeof in.b);
    memcpy(in.c, c, sizeof in.c);
    float out[4];
    warp_call(op, 0xffffffffu, 0, 0, 32, file, line, &in, out);
    memcpy(d, out, sizeof out);
}

// cvt.rna.tf32.f32: the f32 rounded to a 10-bit mantissa, to nearest, ties away from zero
// (add half of the dropped part's weight to the magnitude, then drop it). Infinities and NaN
// pass unchanged.
inline uint32_t cvt_rna_tf32(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0x1000u) & 0xffffe000u;
}

// ---- BF16: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 ----
// Each .b32 operand register packs two bf16, the lower-numbered element in the low half.
// The PTX ISA's tables for m16n8k16 with .bf16 (g = lane / 4, t = lane % 4): a_i (i = 0..7, in
// registers i/2) is A[g + 8·((i/2) % 2)][2t + (i % 2) + 8·(i / 4)]; b_i (i = 0..3, registers
// i/2) is B[2t + (i % 2) + 8·(i / 2)][g]; c/d as for m16n8k8. Products are exact and summed in
// double, rounded once to f32 (the same documented difference from the hardware as TF32).

inline float bf16_value(uint32_t packed, unsigned high) {
    uint32_t bits = (high ? packed >> 16 : packed & 0xffffu) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline void mma_bf16_complete(unsigned warp) {
    double A[16][16], B[16][8], C[16][8];
    for (unsigned l = 0; l < WARP; ++l) {
        const MmaIn& in = *(const MmaIn*)rt.heap->fibers[warp * WARP + l].call.in;
        const unsigned g = l / 4, t = l % 4;
        for (unsigned i = 0; i < 8; ++i) A[g + 8 * ((i / 2) % 2)][2 * t + i % 2 + 8 * (i / 4)] = bf16_value(in.a[i / 2], i % 2);
        for (unsigned i = 0; i < 4; ++i) B[2 * t + i % 2 + 8 * (i / 2)][g] = bf16_value(in.b[i / 2], i % 2);
        mma_read_c(in, g, t, C);
    }
    mma_write_d(warp, A, B, C, 16);
}

// f32 → bf16 bits, to nearest, ties to even (cvt.rn.bf16.f32); NaN becomes the quiet 0x7fff.
inline uint32_t cvt_rn_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return 0x7fffu;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// cvt.rn.bf16x2.f32 d, hi, lo: hi converted into the upper half of d, lo into the lower.
inline uint32_t cvt_rn_bf16x2(float hi, float lo) { return cvt_rn_bf16(hi) << 16 | cvt_rn_bf16(lo); }

}  // namespace emu

#define emu_mma_m16n8k8_tf32(d, a, b, c) ::emu::mma_at(::emu::MMA_TF32, __FILE__, __LINE__, (d), (a), (b), (c))
#define emu_cvt_rna_tf32(x) ::emu::cvt_rna_tf32(x)
#define emu_mma_m16n8k16_bf16(d, a, b, c) ::emu::mma_at(::emu::MMA_BF16, __FILE__, __LINE__, (d), (a), (b), (c))
#define emu_cvt_rn_bf16x2(hi, lo) ::emu::cvt_rn_bf16x2((hi), (lo))
