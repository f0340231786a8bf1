// Standard-normal noise drawn on the device by a counter-based generator: value e of draw d
// is output e mod 2 of Box–Muller on Philox4x32-10([e/2 low, e/2 high, d low, d high], key).
// The same integer arithmetic and the same double-precision operations, in the same order,
// as NoiseStream::value in src/rng.rs (the CPU's noise), so both backends train on the same
// numbers.
#include "common.cuh"

// Philox4x32-10 (Salmon et al., SC 2011) in place on the counter (c0, c1, c2, c3). Scalars
// and an unrolled loop: a counter array indexed in a loop went to local memory on sm_90.
__device__ __forceinline__ void philox4x32_10(unsigned& c0, unsigned& c1, unsigned& c2, unsigned& c3, unsigned k0,
                                              unsigned k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned long long p0 = 0xD2511F53ull * c0;
        const unsigned long long p1 = 0xCD9E8D57ull * c2;
        const unsigned n0 = (unsigned)(p1 >> 32) ^ c1 ^ k0;
        const unsigned n2 = (unsigned)(p0 >> 32) ^ c3 ^ k1;
        c0 = n0;
        c1 = (unsigned)p1;
        c2 = n2;
        c3 = (unsigned)p0;
    }
}

// A 53-bit uniform in [0, 1) from two words.
__device__ __forceinline__ double unit53(unsigned hi, unsigned lo) {
    return (double)((((unsigned long long)hi << 32) | lo) >> 11) * (1.0 / 9007199254740992.0);
}

// One thread per pair of values (one Philox call, both Box–Muller outputs); an odd n leaves
// the last pair's second value unused.
template <typename T>
__device__ void philox_normal_impl(T* y, int n, int key0, int key1, int draw_lo, int draw_hi) {
    GRID_STRIDE(pair, ((long long)n + 1) / 2) {
        unsigned c0 = (unsigned)pair, c1 = (unsigned)(pair >> 32), c2 = (unsigned)draw_lo, c3 = (unsigned)draw_hi;
        philox4x32_10(c0, c1, c2, c3, (unsigned)key0, (unsigned)key1);
        const double u1 = 1.0 - unit53(c0, c1);
        const double u2 = unit53(c2, c3);
        const double r = sqrt(-2.0 * log(u1));
        // sin and cos of 2π·u2 as sincospi(2·u2): its argument needs no reduction, where
        // sin and cos of an arbitrary double keep a slow path (Payne–Hanek) whose scratch
        // array lives in local memory.
        double s, c;
        sincospi(2.0 * u2, &s, &c);
        y[2 * pair] = (T)(r * c);
        if (2 * pair + 1 < n) y[2 * pair + 1] = (T)(r * s);
    }
}

#define FILE_KERNELS(T, S)                                                                              \
    extern "C" __global__ void philox_normal_##S(T* y, int n, int key0, int key1, int draw_lo, int draw_hi) { \
        philox_normal_impl<T>(y, n, key0, key1, draw_lo, draw_hi);                                      \
    }

FILE_KERNELS(float, f32)
FILE_KERNELS(double, f64)
