// One Adam/AdamW step in place, operation for operation as AdamStep::apply in
// src/ops/adam.rs. The host converts every constant to T first (as E::of does on the CPU).
#include "common.cuh"

// Mirror of `AdamArgs<T>` in src/backend/cuda/mod.rs.
template <typename T>
struct AdamArgs {
    T beta1, beta2, one_minus_beta1, one_minus_beta2;
    T eps, weight_decay;
    T decay_factor;  // 1 − lr·wd (AdamW)
    T step_size;     // lr / (1 − β₁ᵗ)
    T bc2_sqrt;      // √(1 − β₂ᵗ)
    int mode;        // 0: no decay, 1: Adam L2 (g += wd·p), 2: AdamW (p *= 1 − lr·wd)
    int n;
};

template <typename T>
__device__ void adam_impl(AdamArgs<T> a, T* p, const T* g, T* m, T* v) {
    GRID_STRIDE(i, a.n) {
        T pi = p[i], gi = g[i];
        if (a.mode == 2) pi *= a.decay_factor;
        else if (a.mode == 1) gi += pi * a.weight_decay;
        const T mi = a.beta1 * m[i] + a.one_minus_beta1 * gi;
        const T vi = a.beta2 * v[i] + a.one_minus_beta2 * gi * gi;
        const T denom = sqrt_t(vi) / a.bc2_sqrt + a.eps;
        p[i] = pi - a.step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}

#define FILE_KERNELS(T, S)                                                                           \
    extern "C" __global__ void adam_##S(AdamArgs<T> a, T* p, const T* g, T* m, T* v) {               \
        adam_impl<T>(a, p, g, m, v);                                                                 \
    }

FILE_KERNELS(float, f32)
FILE_KERNELS(double, f64)
