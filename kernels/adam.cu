// One Adam/AdamW step in place, operation for operation as AdamStep::apply in
// src/ops/adam.rs. The host converts every constant to T first (as E::of does on the CPU).
#include "common.cuh"

// AdamArgs<T> (the contract): mode ADAM_L2 adds wd·p to the gradient, ADAM_DECOUPLED scales
// p by decay_factor = 1 − lr·wd first (AdamW).
template <typename T>
__device__ void adam_impl(AdamArgs<T> a, T* p, const T* g, T* m, T* v) {
    GRID_STRIDE(i, a.n) {
        T pi = p[i], gi = g[i];
        if (a.mode == ADAM_DECOUPLED) pi *= a.decay_factor;
        else if (a.mode == ADAM_L2) gi += pi * a.weight_decay;
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
