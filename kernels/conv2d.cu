// conv2d (cross-correlation, NCHW, weight [c_out, c_in, kh, kw], zero padding) as implicit
// GEMM on the tile engine of common.cuh: the im2col matrix is never materialized, the
// loaders compute each element's address. conv_transpose2d needs no kernels of its own: it
// is the adjoint of a convolution (see src/ops/conv_transpose2d.rs), so its forward is
// conv2d_bwd_data, its backward-data is conv2d_fwd and its backward-weight is
// conv2d_bwd_weight with x and dy swapped, exactly as on the CPU.
//
// Notation: K = c_in·kh·kw (a weight row), L = oh·ow (output pixels of one image).
// A column index k of the weight decomposes as k = (c·kh + p)·kw + q.
#include "common.cuh"

// x at image `img`, channel c, row i·s − pad + p, column j·s − pad + q; 0 in the padding.
template <typename T>
__device__ __forceinline__ T x_tap(const T* x, const ConvArgs& a, int img, int k, int l) {
    const int khw = a.kh * a.kw;
    const int c = k / khw, r = k % khw, p = r / a.kw, q = r % a.kw;
    const int i = l / a.ow, j = l % a.ow;
    const int yy = i * a.stride - a.pad + p, xx = j * a.stride - a.pad + q;
    if (yy < 0 || yy >= a.h || xx < 0 || xx >= a.w) return T(0);
    return x[(((long long)img * a.c_in + c) * a.h + yy) * a.w + xx];
}

// ---- forward: y[img, co, l] = Σ_k W[co, k]·col_img[k, l] (+ b[co]) ----
// GEMM M = c_out, N = n·L (images side by side), K = c_in·kh·kw.
template <typename T>
struct FwdW {  // A(co, k) = W[co, k]
    const T* w;
    int K;
    bool k_fast;
    __device__ T operator()(int co, int k) const { return w[(long long)co * K + k]; }
};
template <typename T>
struct FwdX {  // B(k, col) with col = img·L + l
    const T* x;
    ConvArgs a;
    bool k_fast;
    __device__ T operator()(int k, int col) const {
        const int L = a.oh * a.ow;
        return x_tap(x, a, col / L, k, col % L);
    }
};
template <typename T>
struct FwdStore {  // y[img, co, l] = v + b[co]  (overwrites; b is null without bias)
    T* y;
    const T* b;
    ConvArgs a;
    __device__ void operator()(int co, int col, T v) const {
        const int L = a.oh * a.ow;
        const int img = col / L, l = col % L;
        if (b) v += b[co];
        y[((long long)img * a.c_out + co) * L + l] = v;
    }
};

// Grid: (ceil(n·L / TILE_N), ceil(c_out / TILE_M)).
template <typename T>
__device__ void conv2d_fwd_impl(ConvArgs a, const T* x, const T* w, const T* b, T* y) {
    const int K = a.c_in * a.kh * a.kw;
    FwdW<T> la{w, K, true};
    FwdX<T> lb{x, a, false};
    FwdStore<T> st{y, b, a};
    tile_gemm<T>(a.c_out, a.n * a.oh * a.ow, 0, K, la, lb, st);
}

// ---- backward-data, in gather form (no atomics): ----
// dx[img, c, yy, xx] += Σ_{co, p, q} W[co, c, p, q]·dy[img, co, i, j]
// over the taps with i·s − pad + p = yy and j·s − pad + q = xx, i.e. i = (yy + pad − p)/s
// when that is a whole number in [0, oh) (same for j).
// GEMM M = c_in, N = n·h·w, K = c_out·kh·kw with k = (co·kh + p)·kw + q.
template <typename T>
struct BdW {  // A(c, k) = W[co, c, p, q]
    const T* w;
    ConvArgs a;
    bool k_fast;
    __device__ T operator()(int c, int k) const {
        const int khw = a.kh * a.kw;
        const int co = k / khw, r = k % khw;
        return w[((long long)co * a.c_in + c) * khw + r];
    }
};
template <typename T>
struct BdDy {  // B(k, col) with col = img·h·w + yy·w + xx
    const T* dy;
    ConvArgs a;
    bool k_fast;
    __device__ T operator()(int k, int col) const {
        const int khw = a.kh * a.kw, hw = a.h * a.w;
        const int co = k / khw, r = k % khw, p = r / a.kw, q = r % a.kw;
        const int img = col / hw, pix = col % hw, yy = pix / a.w, xx = pix % a.w;
        const int ti = yy + a.pad - p, tj = xx + a.pad - q;  // = i·s, j·s
        if (ti < 0 || tj < 0 || ti % a.stride != 0 || tj % a.stride != 0) return T(0);
        const int i = ti / a.stride, j = tj / a.stride;
        if (i >= a.oh || j >= a.ow) return T(0);
        return dy[(((long long)img * a.c_out + co) * a.oh + i) * a.ow + j];
    }
};
template <typename T>
struct BdStore {  // dx[img, c, pix] += v
    T* dx;
    ConvArgs a;
    __device__ void operator()(int c, int col, T v) const {
        const int hw = a.h * a.w;
        const int img = col / hw, pix = col % hw;
        const long long at = ((long long)img * a.c_in + c) * hw + pix;
        dx[at] += v;
    }
};

// Grid: (ceil(n·h·w / TILE_N), ceil(c_in / TILE_M)).
template <typename T>
__device__ void conv2d_bwd_data_impl(ConvArgs a, const T* dy, const T* w, T* dx) {
    BdW<T> la{w, a, true};
    BdDy<T> lb{dy, a, false};
    BdStore<T> st{dx, a};
    tile_gemm<T>(a.c_in, a.n * a.h * a.w, 0, a.c_out * a.kh * a.kw, la, lb, st);
}

// ---- backward-weight: dW[co, k] += Σ_img Σ_l dy[img, co, l]·col_img[k, l] ----
// GEMM M = c_out, N = c_in·kh·kw, reduction over n·L (index t = img·L + l), split into
// fixed chunks of kc (grid z) whose partials `splitk_reduce` (gemm.cu) adds in order.
template <typename T>
struct BwDy {  // A(co, t) = dy[img, co, l]
    const T* dy;
    ConvArgs a;
    bool k_fast;
    __device__ T operator()(int co, int t) const {
        const int L = a.oh * a.ow;
        return dy[((long long)(t / L) * a.c_out + co) * L + t % L];
    }
};
template <typename T>
struct BwX {  // B(t, k) = col_img[k, l]
    const T* x;
    ConvArgs a;
    bool k_fast;
    __device__ T operator()(int t, int k) const {
        const int L = a.oh * a.ow;
        return x_tap(x, a, t / L, k, t % L);
    }
};

// Grid: (ceil(K / TILE_N), ceil(c_out / TILE_M), splits); part is [splits, c_out, K].
template <typename T>
__device__ void conv2d_bwd_weight_impl(ConvArgs a, const T* dy, const T* x, T* part) {
    const int K = a.c_in * a.kh * a.kw;
    BwDy<T> la{dy, a, true};
    BwX<T> lb{x, a, true};
    PartialStore<T> st{part, a.c_out, K};
    int kb, ke;
    split_range(a.n * a.oh * a.ow, a.kc, blockIdx.z, &kb, &ke);
    tile_gemm<T>(a.c_out, K, kb, ke, la, lb, st);
}

#define FILE_KERNELS(T, S)                                                                           \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS, TILE_MIN_BLOCKS)                     \
        conv2d_fwd_##S(ConvArgs a, const T* x, const T* w, const T* b, T* y) {                      \
        conv2d_fwd_impl<T>(a, x, w, b, y);                                                          \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS, TILE_MIN_BLOCKS)                     \
        conv2d_bwd_data_##S(ConvArgs a, const T* dy, const T* w, T* dx) {                           \
        conv2d_bwd_data_impl<T>(a, dy, w, dx);                                                      \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS, TILE_MIN_BLOCKS)                     \
        conv2d_bwd_weight_##S(ConvArgs a, const T* dy, const T* x, T* part) {                       \
        conv2d_bwd_weight_impl<T>(a, dy, x, part);                                                  \
    }

FILE_KERNELS(float, f32)
FILE_KERNELS(double, f64)
