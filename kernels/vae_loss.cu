// The VAE's own ops: fused reparameterization + KL, and the reconstruction losses.
// Scalar results are reduced deterministically: stage 1 here writes one double per block,
// stage 2 is `reduce_final` in elementwise.cu (launched by the host right after).
// Per-element math repeats src/ops/reparam_kl.rs and src/ops/loss.rs (losses in double, as
// the CPU reference computes them in f64).
#include "common.cuh"

// z = mu + eps·exp(logvar/2) (in T, like the CPU), and part[block] = Σ over this block's
// elements of (1 + logvar − mu² − exp(logvar)) in double; the host scales the total by −0.5.
template <typename T>
__device__ void reparam_kl_fwd_impl(const T* mu, const T* logvar, const T* eps, T* z, int n, acc_t* part) {
    __shared__ acc_t sh[BLOCK_WARPS];
    acc_t s = 0;
    GRID_STRIDE(i, n) {
        const T m = mu[i], lv = logvar[i];
        z[i] = m + eps[i] * exp_t(lv * T(0.5));
        const acc_t md = (acc_t)m, lvd = (acc_t)lv;
        s += 1.0 + lvd - md * md - exp(lvd);
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// dmu += dz + dkl·mu. dz and dkl are null when those gradients do not exist. dkl is a device
// scalar.
template <typename T>
__device__ void reparam_bwd_mu_impl(const T* mu, const T* dz, const T* dkl, T* dmu, int n) {
    const T k = dkl ? dkl[0] : T(0);
    GRID_STRIDE(i, n) dmu[i] += (dz ? dz[i] : T(0)) + k * mu[i];
}
// dlogvar += dz·eps·exp(logvar/2)/2 + dkl·(exp(logvar) − 1)/2
template <typename T>
__device__ void reparam_bwd_logvar_impl(const T* logvar, const T* eps, const T* dz, const T* dkl, T* dlv, int n) {
    const T k = dkl ? dkl[0] : T(0);
    const T half = T(0.5);
    GRID_STRIDE(i, n) {
        const T lv = logvar[i];
        const T from_z = dz ? dz[i] * eps[i] * exp_t(lv * half) * half : T(0);
        dlv[i] += from_z + k * half * (exp_t(lv) - T(1));
    }
}

// ---- reconstruction losses; kind: a RECON_* code (BCE_LOG_CLAMP and BCE_GRAD_EPS are
// PyTorch's, from src/ops/loss.rs through the contract) ----

__device__ __forceinline__ double loss_elem(int kind, double x, double t) {
    switch (kind) {
        case RECON_BCE: return -(t * fmax(log(x), BCE_LOG_CLAMP) + (1.0 - t) * fmax(log(1.0 - x), BCE_LOG_CLAMP));
        case RECON_BCE_WITH_LOGITS: return fmax(x, 0.0) - x * t + log1p(exp(-fabs(x)));
        default: return (x - t) * (x - t);
    }
}
__device__ __forceinline__ double loss_grad(int kind, double x, double t) {
    switch (kind) {
        case RECON_BCE: return (x - t) / fmax(x * (1.0 - x), BCE_GRAD_EPS);
        case RECON_BCE_WITH_LOGITS: return 1.0 / (1.0 + exp(-x)) - t;
        default: return 2.0 * (x - t);
    }
}

template <typename T>
__device__ void loss_fwd_impl(int kind, const T* x, const T* t, int n, acc_t* part) {
    __shared__ acc_t sh[BLOCK_WARPS];
    acc_t s = 0;
    GRID_STRIDE(i, n) s += loss_elem(kind, (double)x[i], (double)t[i]);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}
// dx += dout[0]·∂loss/∂x
template <typename T>
__device__ void loss_bwd_impl(int kind, const T* x, const T* t, const T* dout, T* dx, int n) {
    const double g = (double)dout[0];
    GRID_STRIDE(i, n) dx[i] += (T)(g * loss_grad(kind, (double)x[i], (double)t[i]));
}

#define FILE_KERNELS(T, S)                                                                                    \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)                                    \
        reparam_kl_fwd_##S(const T* mu, const T* logvar, const T* eps, T* z, int n, acc_t* part) {           \
        reparam_kl_fwd_impl<T>(mu, logvar, eps, z, n, part);                                                 \
    }                                                                                                        \
    extern "C" __global__ void reparam_bwd_mu_##S(const T* mu, const T* dz, const T* dkl, T* dmu, int n) {  \
        reparam_bwd_mu_impl<T>(mu, dz, dkl, dmu, n);                                                         \
    }                                                                                                        \
    extern "C" __global__ void reparam_bwd_logvar_##S(const T* logvar, const T* eps, const T* dz,            \
                                                      const T* dkl, T* dlv, int n) {                         \
        reparam_bwd_logvar_impl<T>(logvar, eps, dz, dkl, dlv, n);                                            \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)                                    \
        loss_fwd_##S(int kind, const T* x, const T* t, int n, acc_t* part) {                                 \
        loss_fwd_impl<T>(kind, x, t, n, part);                                                               \
    }                                                                                                        \
    extern "C" __global__ void loss_bwd_##S(int kind, const T* x, const T* t, const T* dout, T* dx, int n) { \
        loss_bwd_impl<T>(kind, x, t, dout, dx, n);                                                           \
    }

FILE_KERNELS(float, f32)
FILE_KERNELS(double, f64)
