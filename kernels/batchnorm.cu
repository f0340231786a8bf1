// Batch norm over an [outer, channels, inner] view (src/ops/batch_norm.rs), statistics in
// double like the CPU reference. Training kernels run one block of BLOCK threads per channel
// (grid = channels): thread t visits the channel's elements e = t, t + BLOCK, ... where
// e = o·inner + i addresses x[(o·channels + c)·inner + i].
#include "common.cuh"

__device__ __forceinline__ long long bn_at(const BnArgs& a, int c, long long e) {
    const long long o = e / a.inner, i = e % a.inner;
    return (o * a.channels + c) * a.inner + i;
}

// Mean and biased variance in ONE pass: each thread keeps a Welford (count, mean, M2) over
// its elements, then the block merges the threads' triples pairwise in a fixed tree (Chan
// et al.'s formula), which is as accurate as the two-pass sum and deterministic.
template <typename T>
__device__ void bn_fwd_train_impl(BnArgs a, const T* x, const T* gamma, const T* beta, T* y, T* save_mean,
                                  T* save_invstd, T* running_mean, T* running_var) {
    __shared__ double sn[BLOCK], smean[BLOCK], sm2[BLOCK];
    const int c = blockIdx.x, t = threadIdx.x;
    const long long m = (long long)a.outer * a.inner;
    double cnt = 0, mean = 0, m2 = 0;
    for (long long e = t; e < m; e += BLOCK) {
        const double v = (double)x[bn_at(a, c, e)];
        cnt += 1;
        const double d = v - mean;
        mean += d / cnt;
        m2 += d * (v - mean);
    }
    sn[t] = cnt; smean[t] = mean; sm2[t] = m2;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) {
            const double na = sn[t], nb = sn[t + s], n = na + nb;
            if (nb > 0) {
                const double d = smean[t + s] - smean[t];
                smean[t] = smean[t] + d * (nb / n);
                sm2[t] = sm2[t] + sm2[t + s] + d * d * (na * nb / n);
                sn[t] = n;
            }
        }
        __syncthreads();
    }
    const double mu = smean[0], var = sm2[0] / (double)m;
    const double invstd = 1.0 / sqrt(var + a.eps);
    if (t == 0) {
        save_mean[c] = (T)mu;
        save_invstd[c] = (T)invstd;
        const double unbiased = m > 1 ? sm2[0] / (double)(m - 1) : var;
        running_mean[c] = (T)((1.0 - a.momentum) * (double)running_mean[c] + a.momentum * mu);
        running_var[c] = (T)((1.0 - a.momentum) * (double)running_var[c] + a.momentum * unbiased);
    }
    const double g = (double)gamma[c], b = (double)beta[c];
    for (long long e = t; e < m; e += BLOCK) {
        const long long k = bn_at(a, c, e);
        y[k] = (T)(((double)x[k] - mu) * invstd * g + b);
    }
}

// Eval mode: elementwise over all outer·channels·inner values, channel (k / inner) % channels.
template <typename T>
__device__ void bn_fwd_eval_impl(BnArgs a, const T* x, const T* gamma, const T* beta, const T* rm, const T* rv,
                                 T* y) {
    const long long n = (long long)a.outer * a.channels * a.inner;
    GRID_STRIDE(k, n) {
        const int c = (int)((k / a.inner) % a.channels);
        const double invstd = 1.0 / sqrt((double)rv[c] + a.eps);
        y[k] = (T)(((double)x[k] - (double)rm[c]) * invstd * (double)gamma[c] + (double)beta[c]);
    }
}

// dβ = Σ dy, dγ = Σ dy·x̂, dx += γ·invstd/m·(m·dy − dβ − x̂·dγ), x̂ = (x − mean)·invstd.
// Absent outputs are null pointers and untouched.
template <typename T>
__device__ void bn_bwd_impl(BnArgs a, const T* dy, const T* x, const T* gamma, const T* mean, const T* invstd,
                            T* dx, T* dgamma, T* dbeta) {
    __shared__ acc_t sh[BLOCK];
    const int c = blockIdx.x, t = threadIdx.x;
    const long long m = (long long)a.outer * a.inner;
    const double mu = (double)mean[c], is = (double)invstd[c];
    double sdy = 0, sdyx = 0;
    for (long long e = t; e < m; e += BLOCK) {
        const long long k = bn_at(a, c, e);
        const double d = (double)dy[k];
        sdy += d;
        sdyx += d * ((double)x[k] - mu) * is;
    }
    sdy = block_sum(sdy, sh);
    sdyx = block_sum(sdyx, sh);
    // block_sum returns the total to thread 0 only: share it.
    __shared__ double tot[2];
    if (t == 0) {
        tot[0] = sdy;
        tot[1] = sdyx;
        if (dbeta) dbeta[c] = (T)((double)dbeta[c] + sdy);
        if (dgamma) dgamma[c] = (T)((double)dgamma[c] + sdyx);
    }
    __syncthreads();
    if (!dx) return;
    sdy = tot[0];
    sdyx = tot[1];
    const double md = (double)m, scale = (double)gamma[c] * is / md;
    for (long long e = t; e < m; e += BLOCK) {
        const long long k = bn_at(a, c, e);
        const double xhat = ((double)x[k] - mu) * is;
        dx[k] = (T)((double)dx[k] + scale * (md * (double)dy[k] - sdy - xhat * sdyx));
    }
}

#define FILE_KERNELS(T, S)                                                                                    \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)                                    \
        bn_fwd_train_##S(BnArgs a, const T* x, const T* gamma, const T* beta, T* y, T* save_mean,            \
                         T* save_invstd, T* running_mean, T* running_var) {                                  \
        bn_fwd_train_impl<T>(a, x, gamma, beta, y, save_mean, save_invstd, running_mean, running_var);      \
    }                                                                                                        \
    extern "C" __global__ void bn_fwd_eval_##S(BnArgs a, const T* x, const T* gamma, const T* beta,         \
                                               const T* rm, const T* rv, T* y) {                             \
        bn_fwd_eval_impl<T>(a, x, gamma, beta, rm, rv, y);                                                   \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)                                    \
        bn_bwd_##S(BnArgs a, const T* dy, const T* x, const T* gamma, const T* mean, const T* invstd, T* dx, \
                   T* dgamma, T* dbeta) {                                                                    \
        bn_bwd_impl<T>(a, dy, x, gamma, mean, invstd, dx, dgamma, dbeta);                                    \
    }

FILE_KERNELS(float, f32)
FILE_KERNELS(double, f64)
