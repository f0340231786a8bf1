// Batch norm over an [outer, channels, inner] view (src/ops/batch_norm.rs), statistics in
// double like the CPU reference. The training kernels reduce each channel over the whole GPU:
// a grid of (chunks, channels) blocks (common.cuh, ChunkWalk; chunks from kernels.rs,
// `channel_chunks`), stage 1 writing one partial per block, stage 2 combining a channel's
// partials in a fixed order in every block of that channel before applying them to its chunk.
// Every kernel applies (forward) or differentiates (backward) an activation after the affine
// transform, `act` a UNARY_* code (UNARY_IDENTITY: plain batch norm), so the conv-bn VAE's
// bn → ReLU is one pass each way. The backward reads the activation's derivative from its
// output y alone: the host fuses only activations for which that is exact (ops::batch_norm).
#include "common.cuh"

// The moments of channel c from its `chunks` partials (3 doubles each: n, mean, M2), merged
// in a fixed tree: lane l merges chunks l, l + 32, ... in order, then warp_moments. All 32
// lanes of warp 0 call it; lane 0 gets the result. Every block of a channel merges the same
// partials in the same order, so all of them apply the same statistics to the bit.
__device__ Moments channel_moments(const acc_t* part, int c, int chunks) {
    Moments v{0, 0, 0};
    for (int k = threadIdx.x; k < chunks; k += WARP) {
        const acc_t* p = part + 3 * ((long long)c * chunks + k);
        v = merge_moments(v, Moments{p[0], p[1], p[2]});
    }
    return warp_moments(v);
}

// Stage 1 of the training statistics: block (k, c) writes the moments of chunk k of channel c
// to part[c·chunks + k]. Each thread sums its values shifted by its own first value K:
// s1 = Σ(v − K), s2 = Σ(v − K)², then mean = K + s1/n and M2 = s2 − s1²/n. The cancellation in
// that difference loses about log2((mean − K)²/var) bits, and since K is one of the thread's
// own n values, (mean − K)² ≤ (n − 1)·var (Samuelson's inequality): at most log2(n) of the 53
// bits, n being a thread's share of a chunk (a few dozen). No division per element, unlike
// Welford's update; the threads' moments are then merged exactly as Welford's would be.
template <typename T>
__device__ void bn_stats_partial_impl(BnArgs a, const T* x, acc_t* part) {
    __shared__ Moments sh[BLOCK_WARPS];
    ChunkWalk w(a.outer, a.channels, a.inner, a.chunk);
    acc_t n = 0, s1 = 0, s2 = 0;
    const acc_t k0 = w.more() ? (acc_t)x[w.at()] : acc_t(0);
    for (; w.more(); w.next()) {
        const acc_t d = (acc_t)x[w.at()] - k0;
        n += 1;
        s1 += d;
        s2 += d * d;
    }
    Moments mo{n, 0, 0};
    if (n > 0) {
        const acc_t dm = s1 / n;
        mo.mean = k0 + dm;
        mo.m2 = fmax(s2 - s1 * dm, acc_t(0));
    }
    mo = block_moments(mo, sh);
    if (threadIdx.x == 0) {
        acc_t* p = part + 3 * ((long long)w.c * a.chunks + blockIdx.x);
        p[0] = mo.n;
        p[1] = mo.mean;
        p[2] = mo.m2;
    }
}

// Stage 2: block (k, c) merges channel c's partials, then normalizes chunk k. Block (0, c)
// also writes the saved mean and 1/√(var + eps) and moves the running statistics (the only
// block that touches them, so no race).
template <typename T>
__device__ void bn_fwd_apply_impl(BnArgs a, int act, T slope, const T* x, const T* gamma, const T* beta,
                                  const acc_t* part, T* y, T* save_mean, T* save_invstd, T* running_mean,
                                  T* running_var) {
    __shared__ acc_t stat[2];
    const int c = blockIdx.y;
    if (threadIdx.x < WARP) {
        const Moments mo = channel_moments(part, c, a.chunks);
        if (threadIdx.x == 0) {
            const acc_t m = (acc_t)a.outer * a.inner, var = mo.m2 / m;
            const acc_t invstd = 1.0 / sqrt(var + a.eps);
            stat[0] = mo.mean;
            stat[1] = invstd;
            if (blockIdx.x == 0) {
                save_mean[c] = (T)mo.mean;
                save_invstd[c] = (T)invstd;
                const acc_t unbiased = m > 1 ? mo.m2 / (m - 1) : var;
                running_mean[c] = (T)((1.0 - a.momentum) * (acc_t)running_mean[c] + a.momentum * mo.mean);
                running_var[c] = (T)((1.0 - a.momentum) * (acc_t)running_var[c] + a.momentum * unbiased);
            }
        }
    }
    __syncthreads();
    const acc_t mu = stat[0], is = stat[1], g = (acc_t)gamma[c], b = (acc_t)beta[c];
    for (ChunkWalk w(a.outer, a.channels, a.inner, a.chunk); w.more(); w.next()) {
        const long long k = w.at();
        y[k] = unary_f(act, (T)(((acc_t)x[k] - mu) * is * g + b), slope);
    }
}

// Eval mode, over the training kernels' grid of (chunks, channels) blocks: block (k, c)
// normalizes chunk k of channel c with the running statistics (no division per element).
template <typename T>
__device__ void bn_fwd_eval_impl(BnArgs a, int act, T slope, const T* x, const T* gamma, const T* beta, const T* rm,
                                 const T* rv, T* y) {
    const int c = blockIdx.y;
    const acc_t mu = (acc_t)rm[c], is = 1.0 / sqrt((acc_t)rv[c] + a.eps), g = (acc_t)gamma[c], b = (acc_t)beta[c];
    for (ChunkWalk w(a.outer, a.channels, a.inner, a.chunk); w.more(); w.next()) {
        const long long k = w.at();
        y[k] = unary_f(act, (T)(((acc_t)x[k] - mu) * is * g + b), slope);
    }
}

// The gradient at the activation's input: dy·act'(·) from the forward's output y (null for
// plain batch norm), rounded to T as the unfused activation's backward would store it.
template <typename T>
__device__ __forceinline__ acc_t bn_grad_in(int act, T slope, const T* y, const T* dy, long long k) {
    return (acc_t)(y ? unary_df(act, y[k], y[k], dy[k], slope) : dy[k]);
}

// With g that gradient: dβ = Σ g, dγ = Σ g·x̂, dx += γ·invstd/m·(m·g − dβ − x̂·dγ),
// x̂ = (x − mean)·invstd. Stage 1: block (k, c) writes chunk k's (Σ g, Σ g·x̂) to
// part[c·chunks + k].
template <typename T>
__device__ void bn_bwd_partial_impl(BnArgs a, int act, T slope, const T* dy, const T* y, const T* x, const T* mean,
                                    const T* invstd, acc_t* part) {
    __shared__ acc_t sh[BLOCK_WARPS];
    ChunkWalk w(a.outer, a.channels, a.inner, a.chunk);
    const acc_t mu = (acc_t)mean[w.c], is = (acc_t)invstd[w.c];
    acc_t sdy = 0, sdyx = 0;
    for (; w.more(); w.next()) {
        const long long k = w.at();
        const acc_t d = bn_grad_in(act, slope, y, dy, k);
        sdy += d;
        sdyx += d * ((acc_t)x[k] - mu) * is;
    }
    sdy = block_sum(sdy, sh);
    sdyx = block_sum(sdyx, sh);
    if (threadIdx.x == 0) {
        acc_t* p = part + 2 * ((long long)w.c * a.chunks + blockIdx.x);
        p[0] = sdy;
        p[1] = sdyx;
    }
}

// Stage 2: block (k, c) adds channel c's partials in a fixed tree (lane l: chunks l, l + 32,
// ... in order, then warp_sum); block (0, c) adds them to dβ and dγ; every block then writes dx
// over chunk k. Absent outputs are null pointers and untouched; without dx the host launches
// one block per channel.
template <typename T>
__device__ void bn_bwd_apply_impl(BnArgs a, int act, T slope, const T* dy, const T* y, const T* x, const T* gamma,
                                  const T* mean, const T* invstd, const acc_t* part, T* dx, T* dgamma, T* dbeta) {
    __shared__ acc_t tot[2];
    const int c = blockIdx.y;
    if (threadIdx.x < WARP) {
        acc_t sdy = 0, sdyx = 0;
        for (int k = threadIdx.x; k < a.chunks; k += WARP) {
            const acc_t* p = part + 2 * ((long long)c * a.chunks + k);
            sdy += p[0];
            sdyx += p[1];
        }
        sdy = warp_sum(sdy);
        sdyx = warp_sum(sdyx);
        if (threadIdx.x == 0) {
            tot[0] = sdy;
            tot[1] = sdyx;
            if (blockIdx.x == 0) {
                if (dbeta) dbeta[c] = (T)((acc_t)dbeta[c] + sdy);
                if (dgamma) dgamma[c] = (T)((acc_t)dgamma[c] + sdyx);
            }
        }
    }
    __syncthreads();
    if (!dx) return;
    const acc_t sdy = tot[0], sdyx = tot[1];
    const acc_t mu = (acc_t)mean[c], is = (acc_t)invstd[c];
    const acc_t md = (acc_t)a.outer * a.inner, scale = (acc_t)gamma[c] * is / md;
    for (ChunkWalk w(a.outer, a.channels, a.inner, a.chunk); w.more(); w.next()) {
        const long long k = w.at();
        const acc_t xhat = ((acc_t)x[k] - mu) * is;
        dx[k] += (T)(scale * (md * bn_grad_in(act, slope, y, dy, k) - sdy - xhat * sdyx));
    }
}

#define FILE_KERNELS(T, S)                                                                                    \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)                                    \
        bn_stats_partial_##S(BnArgs a, const T* x, acc_t* part) {                                            \
        bn_stats_partial_impl<T>(a, x, part);                                                                \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)                                    \
        bn_fwd_apply_##S(BnArgs a, int act, T slope, const T* x, const T* gamma, const T* beta,              \
                         const acc_t* part, T* y, T* save_mean, T* save_invstd, T* running_mean,             \
                         T* running_var) {                                                                   \
        bn_fwd_apply_impl<T>(a, act, slope, x, gamma, beta, part, y, save_mean, save_invstd, running_mean,   \
                             running_var);                                                                   \
    }                                                                                                        \
    extern "C" __global__ void bn_fwd_eval_##S(BnArgs a, int act, T slope, const T* x, const T* gamma,      \
                                               const T* beta, const T* rm, const T* rv, T* y) {              \
        bn_fwd_eval_impl<T>(a, act, slope, x, gamma, beta, rm, rv, y);                                       \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)                                    \
        bn_bwd_partial_##S(BnArgs a, int act, T slope, const T* dy, const T* y, const T* x, const T* mean,   \
                           const T* invstd, acc_t* part) {                                                   \
        bn_bwd_partial_impl<T>(a, act, slope, dy, y, x, mean, invstd, part);                                 \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)                                    \
        bn_bwd_apply_##S(BnArgs a, int act, T slope, const T* dy, const T* y, const T* x, const T* gamma,    \
                         const T* mean, const T* invstd, const acc_t* part, T* dx, T* dgamma, T* dbeta) {    \
        bn_bwd_apply_impl<T>(a, act, slope, dy, y, x, gamma, mean, invstd, part, dx, dgamma, dbeta);         \
    }

FILE_KERNELS(float, f32)
FILE_KERNELS(double, f64)
