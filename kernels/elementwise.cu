// Elementwise ops, bias add/backward, row gathering and the deterministic sum.
// 1-D kernels use grid-stride loops (any grid covers any n); the launcher picks the grid.
#include "common.cuh"

// ---- activations (unary_f, unary_df: common.cuh, shared with batchnorm.cu) ----
template <typename T>
__device__ void unary_fwd_impl(int op, T slope, const T* x, T* y, int n) {
    GRID_STRIDE(i, n) y[i] = unary_f(op, x[i], slope);
}
template <typename T>
__device__ void unary_bwd_impl(int op, T slope, const T* x, const T* y, const T* dy, T* dx, int n) {
    GRID_STRIDE(i, n) dx[i] += unary_df(op, x[i], y[i], dy[i], slope);
}

// ---- arithmetic ----
template <typename T>
__device__ void mul_impl(const T* a, const T* b, T* y, int n) {
    GRID_STRIDE(i, n) y[i] = a[i] * b[i];
}
template <typename T>
__device__ void mul_acc_impl(const T* a, const T* b, T* y, int n) {
    GRID_STRIDE(i, n) y[i] += a[i] * b[i];
}
template <typename T>
__device__ void axpy_impl(T alpha, const T* x, T* y, int n) {
    GRID_STRIDE(i, n) y[i] += alpha * x[i];
}
template <typename T>
__device__ void fill_impl(T* y, T v, int n) {
    GRID_STRIDE(i, n) y[i] = v;
}
// dx[i] += alpha·dout[0]: the scalar is read on the device, so no host sync is needed.
template <typename T>
__device__ void broadcast_acc_impl(const T* dout, T alpha, T* dx, int n) {
    const T g = alpha * dout[0];
    GRID_STRIDE(i, n) dx[i] += g;
}

// dst[r, e] = src[idx[r], e] for rows of row_len elements; n = rows·row_len. The row of an
// element by FastDiv (a multiply-high and a shift; i < n < 2^31), not by a 64-bit division,
// which costs tens of instructions per element.
template <typename T>
__device__ void gather_rows_impl(const T* src, const unsigned* idx, int row_len, T* dst, int n) {
    const FastDiv rows(max(row_len, 1));  // (n = 0 when a row is empty: no division runs)
    GRID_STRIDE(i, n) {
        const int r = rows.div((int)i), e = (int)i - r * row_len;
        dst[i] = src[(long long)idx[r] * row_len + e];
    }
}

// The same over u8 pixels, converted to T in [0, 1]: dst[i] = src[...] / PIXEL_MAX. A true
// division (NVRTC's default -prec-div=true), so float pixels equal the host's b / 255.0f.
template <typename T>
__device__ void gather_rows_u8_impl(const unsigned char* src, const unsigned* idx, int row_len, T* dst, int n) {
    const FastDiv rows(max(row_len, 1));
    GRID_STRIDE(i, n) {
        const int r = rows.div((int)i), e = (int)i - r * row_len;
        dst[i] = T(src[(long long)idx[r] * row_len + e]) / T(PIXEL_MAX);
    }
}

// ---- bias over an [outer, channels, inner] view ----
// y[o, c, i] += b[c]: element k belongs to channel (k / inner) % channels, by two FastDivs.
template <typename T>
__device__ void bias_add_impl(T* y, const T* b, int channels, int inner, int n) {
    const FastDiv per_inner(max(inner, 1)), per_channels(max(channels, 1));  // (n = 0 if either is 0)
    GRID_STRIDE(k, n) {
        const int q = per_inner.div((int)k);
        y[k] += b[q - per_channels.div(q) * channels];
    }
}
// db[c] += Σ_{o, i} dy[o, c, i], over the whole GPU in two stages. Stage 1 (`bias_bwd`, a
// grid of (chunks, channels) blocks, common.cuh's ChunkWalk) writes chunk k's sum of channel c
// to part[c·chunks + k]; stage 2 (`chunk_sum`) adds each channel's partials in order. With one
// chunk per channel (a linear layer's bias: m = the batch) stage 1 adds into db itself and the
// host launches no stage 2.
template <typename T>
__device__ void bias_bwd_impl(const T* dy, acc_t* part, T* db, int outer, int channels, int inner, int chunk) {
    __shared__ acc_t sh[BLOCK_WARPS];
    ChunkWalk w(outer, channels, inner, chunk);
    acc_t s = 0;
    for (; w.more(); w.next()) s += (acc_t)dy[w.at()];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        if (gridDim.x == 1) db[w.c] = (T)((acc_t)db[w.c] + s);
        else part[(long long)w.c * gridDim.x + blockIdx.x] = s;
    }
}
// out[c] += Σ_k part[c·chunks + k], k = 0, 1, ... in order: one thread per channel (a chunk
// count is small, at most kernels.rs's MAX_CHUNKS).
template <typename T>
__device__ void chunk_sum_impl(const acc_t* part, int chunks, int channels, T* out) {
    GRID_STRIDE(c, channels) {
        acc_t s = 0;
        for (int k = 0; k < chunks; ++k) s += part[c * chunks + k];
        out[c] = (T)((acc_t)out[c] + s);
    }
}

// ---- deterministic sum, two stages ----
// Stage 1 (grid G fixed by n on the host): block b sums elements b·BLOCK + t + k·G·BLOCK
// into part[b]. Stage 2 (`reduce_final`, one block): out[0] = scale·Σ_b part[b], in a fixed
// tree. vae_loss.cu reuses stage 2 for the loss and KL reductions.
template <typename T>
__device__ void sum_partial_impl(const T* x, int n, acc_t* part) {
    __shared__ acc_t sh[BLOCK_WARPS];
    acc_t s = 0;
    GRID_STRIDE(i, n) s += (acc_t)x[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}
template <typename T>
__device__ void reduce_final_impl(const acc_t* part, int g, double scale, T* out) {
    __shared__ acc_t sh[BLOCK_WARPS];
    acc_t s = 0;
    for (int b = threadIdx.x; b < g; b += BLOCK) s += part[b];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[0] = (T)(scale * s);
}

#define FILE_KERNELS(T, S)                                                                                  \
    extern "C" __global__ void unary_fwd_##S(int op, T slope, const T* x, T* y, int n) {                  \
        unary_fwd_impl<T>(op, slope, x, y, n);                                                             \
    }                                                                                                      \
    extern "C" __global__ void unary_bwd_##S(int op, T slope, const T* x, const T* y, const T* dy, T* dx, \
                                             int n) {                                                      \
        unary_bwd_impl<T>(op, slope, x, y, dy, dx, n);                                                     \
    }                                                                                                      \
    extern "C" __global__ void mul_##S(const T* a, const T* b, T* y, int n) { mul_impl<T>(a, b, y, n); }  \
    extern "C" __global__ void mul_acc_##S(const T* a, const T* b, T* y, int n) {                         \
        mul_acc_impl<T>(a, b, y, n);                                                                       \
    }                                                                                                      \
    extern "C" __global__ void axpy_##S(T alpha, const T* x, T* y, int n) { axpy_impl<T>(alpha, x, y, n); } \
    extern "C" __global__ void fill_##S(T* y, T v, int n) { fill_impl<T>(y, v, n); }                      \
    extern "C" __global__ void broadcast_acc_##S(const T* dout, T alpha, T* dx, int n) {                  \
        broadcast_acc_impl<T>(dout, alpha, dx, n);                                                         \
    }                                                                                                      \
    extern "C" __global__ void gather_rows_##S(const T* src, const unsigned* idx, int row_len, T* dst,    \
                                               int n) {                                                    \
        gather_rows_impl<T>(src, idx, row_len, dst, n);                                                    \
    }                                                                                                      \
    extern "C" __global__ void gather_rows_u8_##S(const unsigned char* src, const unsigned* idx, int row_len, \
                                                  T* dst, int n) {                                            \
        gather_rows_u8_impl<T>(src, idx, row_len, dst, n);                                                 \
    }                                                                                                      \
    extern "C" __global__ void bias_add_##S(T* y, const T* b, int channels, int inner, int n) {           \
        bias_add_impl<T>(y, b, channels, inner, n);                                                        \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)                                  \
        bias_bwd_##S(const T* dy, acc_t* part, T* db, int outer, int channels, int inner, int chunk) {     \
        bias_bwd_impl<T>(dy, part, db, outer, channels, inner, chunk);                                     \
    }                                                                                                      \
    extern "C" __global__ void chunk_sum_##S(const acc_t* part, int chunks, int channels, T* out) {        \
        chunk_sum_impl<T>(part, chunks, channels, out);                                                    \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS) sum_partial_##S(const T* x, int n, acc_t* part) { \
        sum_partial_impl<T>(x, n, part);                                                                   \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)                                  \
        reduce_final_##S(const acc_t* part, int g, double scale, T* out) {                                 \
        reduce_final_impl<T>(part, g, scale, out);                                                         \
    }

FILE_KERNELS(float, f32)
FILE_KERNELS(double, f64)

// ---- roofline probe: an FMA-bound loop (8 independent chains hide the FMA latency) ----
// Each thread does iters·8 FMAs (2 FLOPs each). The store is guarded by a condition the
// compiler cannot decide, so the loop is not optimized away and nothing is written.
template <typename T>
__device__ void fma_peak_impl(T* out, int iters, T seed) {
    T a[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) a[c] = seed + T(c) * T(1e-3) + T(threadIdx.x) * T(1e-6);
    const T m = T(0.999999), k = T(1e-7);
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int c = 0; c < 8; ++c) a[c] = a[c] * m + k;
    }
    T s = T(0);
#pragma unroll
    for (int c = 0; c < 8; ++c) s += a[c];
    if (s == T(-12345)) out[0] = s;
}
extern "C" __global__ void fma_peak_f32(float* out, int iters, float seed) { fma_peak_impl<float>(out, iters, seed); }
extern "C" __global__ void fma_peak_f64(double* out, int iters, double seed) { fma_peak_impl<double>(out, iters, seed); }
