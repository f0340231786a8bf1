// conv2d (cross-correlation, NCHW, weight [c_out, c_in, kh, kw], zero padding) as implicit
// GEMM on the tile engine of common.cuh: the im2col matrix is never materialized, the
// loaders compute each element's address. conv_transpose2d needs no kernels of its own: it
// is the adjoint of a convolution (see src/ops/conv_transpose2d.rs), so its forward is
// conv2d_bwd_data, its backward-data is conv2d_fwd and its backward-weight is
// conv2d_bwd_weight with x and dy swapped, exactly as on the CPU.
//
// Notation: K = c_in·kh·kw (a weight row), L = oh·ow (output pixels of one image).
// A column index k of the weight decomposes as k = (c·kh + p)·kw + q.
//
// No loader divides per element: every index is split by a FastDiv (common.cuh) set up once
// per thread from the shape. Each kernel comes in the three tile shapes of common.cuh
// (suffix "" 64 × 64, _m16 16 × 64, _n16 64 × 16), picked per launch by the host.
#include "common.cuh"

// The divisors of a convolution's index arithmetic, set up once per thread.
struct ConvDiv {
    FastDiv khw, kw, L, ow;
    __device__ __forceinline__ explicit ConvDiv(const ConvArgs& a)
        : khw(a.kh * a.kw), kw(a.kw), L(a.oh * a.ow), ow(a.ow) {}
};

// Addresses are split into an image's base (64-bit, from the index the tile engine holds
// fixed for a thread's elements, so computed once per block or tile) and an offset inside it:
// a channel's plane by one wide multiply, a pixel in the plane in 32 bits (a plane's size is
// an int throughout, as L = oh·ow is). A 64-bit multiply chain per element was most of a
// loader's instructions.

// The image `img` of x.
template <typename T>
__device__ __forceinline__ const T* x_image(const T* x, const ConvArgs& a, int img) {
    return x + (long long)img * a.c_in * (a.h * a.w);
}

// x at im2col row k = (c·kh + p)·kw + q, output pixel l = i·ow + j of image `xi`: the input
// at row i·s − pad + p, column j·s − pad + q; 0 in the padding.
template <typename T>
__device__ __forceinline__ T x_tap(const T* xi, const ConvArgs& a, const ConvDiv& dv, int k, int l) {
    const int c = dv.khw.div(k), r = k - c * (a.kh * a.kw);
    const int p = dv.kw.div(r), q = r - p * a.kw;
    const int i = dv.ow.div(l), j = l - i * a.ow;
    const int yy = i * a.stride - a.pad + p, xx = j * a.stride - a.pad + q;
    if (yy < 0 || yy >= a.h || xx < 0 || xx >= a.w) return T(0);
    return xi[(long long)c * (a.h * a.w) + (yy * a.w + xx)];
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
    ConvDiv dv;
    bool k_fast;
    __device__ T operator()(int k, int col) const {
        const int img = dv.L.div(col);
        return x_tap(x_image(x, a, img), a, dv, k, col - img * (a.oh * a.ow));
    }
};
template <typename T>
struct FwdStore {  // y[img, co, l] = v + b[co]  (overwrites; b is null without bias)
    T* y;
    const T* b;
    ConvArgs a;
    ConvDiv dv;
    __device__ void operator()(int co, int col, T v) const {
        const int L = a.oh * a.ow;
        const int img = dv.L.div(col), l = col - img * L;
        if (b) v += b[co];
        y[((long long)img * a.c_out + co) * L + l] = v;
    }
};

// Grid: (ceil(n·L / TN), ceil(c_out / TM)).
template <typename T, class Eng>
__device__ void conv2d_fwd_impl(ConvArgs a, const T* x, const T* w, const T* b, T* y) {
    const int K = a.c_in * a.kh * a.kw;
    const ConvDiv dv(a);
    FwdW<T> la{w, K, true};
    FwdX<T> lb{x, a, dv, false};
    FwdStore<T> st{y, b, a, dv};
    Eng::run(a.c_out, a.n * a.oh * a.ow, 0, K, la, lb, st);
}

// ---- backward-data, in gather form (no atomics), split by output phase: ----
// dx[img, c, yy, xx] += Σ_{co, p, q} W[co, c, p, q]·dy[img, co, i, j]
// over the taps with i·s − pad + p = yy and j·s − pad + q = xx. Only taps with
// p ≡ yy + pad (mod s) reach row yy, so the rows of one phase φy = (yy + pad) mod s
// (yy = φy − pad + s·t) see exactly the taps p = φy + s·u, at i = t − u: a dense GEMM
// without the zero taps of the plain gather form (which multiplies all kh·kw taps, of which
// a stride-s convolution uses about one in s²). Grid z runs over the s² phases (φy, φx);
// each phase is its own GEMM with M = c_in, N = n·nh·nw (its pixels), K = c_out·uh·uw (its
// taps), k = (co·uh + u)·uw + v and col = (img·nh + ty)·nw + tx. Stride 1 is one phase with
// every tap: the plain gather form.

// One phase along one axis: rows yy = f − pad + s·(t0 + t), t in [0, n); taps p = f + s·u,
// u in [0, taps).
struct PhaseAxis {
    int f, t0, n, taps;
    __device__ __forceinline__ PhaseAxis(int f_, int size, int k, int stride, int pad) {
        f = f_;
        // The first t with f − pad + s·t ≥ 0, and the end of those with f − pad + s·t < size.
        t0 = f >= pad ? 0 : (pad - f + stride - 1) / stride;
        const int t_end = size + pad - f > 0 ? (size + pad - f + stride - 1) / stride : 0;
        n = max(0, t_end - t0);
        taps = k > f ? (k - f + stride - 1) / stride : 0;
    }
};

// The phase of block z: per block, not per element.
struct Phase {
    PhaseAxis y, x;
    FastDiv uhw, uw, nhw, nw;
    __device__ __forceinline__ Phase(const ConvArgs& a, int z)
        : y(z / a.stride, a.h, a.kh, a.stride, a.pad),
          x(z % a.stride, a.w, a.kw, a.stride, a.pad),
          uhw(max(1, y.taps * x.taps)),
          uw(max(1, x.taps)),
          nhw(max(1, y.n * x.n)),
          nw(max(1, x.n)) {}
};

template <typename T>
struct BdW {  // A(c, k) = W[co, c, p, q] with p = φy + s·u, q = φx + s·v
    const T* w;
    ConvArgs a;
    Phase ph;
    bool k_fast;
    __device__ T operator()(int c, int k) const {
        const int co = ph.uhw.div(k), r = k - co * (ph.y.taps * ph.x.taps);
        const int u = ph.uw.div(r), v = r - u * ph.x.taps;
        const int p = ph.y.f + a.stride * u, q = ph.x.f + a.stride * v;
        return w[(long long)co * (a.c_in * a.kh * a.kw) + ((c * a.kh + p) * a.kw + q)];
    }
};
template <typename T>
struct BdDy {  // B(k, col) = dy[img, co, t0y + ty − u, t0x + tx − v], 0 outside dy
    const T* dy;
    ConvArgs a;
    Phase ph;
    bool k_fast;
    __device__ T operator()(int k, int col) const {
        const int co = ph.uhw.div(k), r = k - co * (ph.y.taps * ph.x.taps);
        const int u = ph.uw.div(r), v = r - u * ph.x.taps;
        const int img = ph.nhw.div(col), pix = col - img * (ph.y.n * ph.x.n);
        const int ty = ph.nw.div(pix), tx = pix - ty * ph.x.n;
        const int i = ph.y.t0 + ty - u, j = ph.x.t0 + tx - v;
        if (i < 0 || i >= a.oh || j < 0 || j >= a.ow) return T(0);
        const T* dyi = dy + (long long)img * a.c_out * (a.oh * a.ow);
        return dyi[(long long)co * (a.oh * a.ow) + (i * a.ow + j)];
    }
};
template <typename T>
struct BdStore {  // dx[img, c, yy, xx] += v with yy = φy − pad + s·(t0y + ty)
    T* dx;
    ConvArgs a;
    Phase ph;
    __device__ void operator()(int c, int col, T v) const {
        const int img = ph.nhw.div(col), pix = col - img * (ph.y.n * ph.x.n);
        const int ty = ph.nw.div(pix), tx = pix - ty * ph.x.n;
        const int yy = ph.y.f - a.pad + a.stride * (ph.y.t0 + ty);
        const int xx = ph.x.f - a.pad + a.stride * (ph.x.t0 + tx);
        const long long at = (((long long)img * a.c_in + c) * a.h + yy) * a.w + xx;
        dx[at] += v;
    }
};

// Grid: (ceil(max over phases of n·nh·nw / TN), ceil(c_in / TM), stride²).
template <typename T, class Eng>
__device__ void conv2d_bwd_data_impl(ConvArgs a, const T* dy, const T* w, T* dx) {
    const Phase ph(a, blockIdx.z);
    const int N = a.n * ph.y.n * ph.x.n, K = a.c_out * ph.y.taps * ph.x.taps;
    // A phase with fewer pixels than the largest one leaves blocks past its N, and a phase
    // without taps (kernel narrower than the stride) adds nothing: the whole block returns.
    if ((int)blockIdx.x * Eng::TN >= N || K == 0) return;
    BdW<T> la{w, a, ph, true};
    BdDy<T> lb{dy, a, ph, false};
    BdStore<T> st{dx, a, ph};
    Eng::run(a.c_in, N, 0, K, la, lb, st);
}

// ---- backward-weight: dW[co, k] += Σ_img Σ_l dy[img, co, l]·col_img[k, l] ----
// GEMM M = c_out, N = c_in·kh·kw, reduction over n·L (index t = img·L + l), split into
// fixed chunks of kc (grid z) whose partials `splitk_reduce` (gemm.cu) adds in order.
template <typename T>
struct BwDy {  // A(co, t) = dy[img, co, l]
    const T* dy;
    ConvArgs a;
    ConvDiv dv;
    bool k_fast;
    __device__ T operator()(int co, int t) const {
        const int L = a.oh * a.ow;
        const int img = dv.L.div(t);
        const T* dyi = dy + (long long)img * a.c_out * L;
        return dyi[(long long)co * L + (t - img * L)];
    }
};
template <typename T>
struct BwX {  // B(t, k) = col_img[k, l]
    const T* x;
    ConvArgs a;
    ConvDiv dv;
    bool k_fast;
    __device__ T operator()(int t, int k) const {
        const int img = dv.L.div(t);
        return x_tap(x_image(x, a, img), a, dv, k, t - img * (a.oh * a.ow));
    }
};

// Grid: (ceil(K / TN), ceil(c_out / TM), splits); part is [splits, c_out, K].
template <typename T, class Eng>
__device__ void conv2d_bwd_weight_impl(ConvArgs a, const T* dy, const T* x, T* part) {
    const int K = a.c_in * a.kh * a.kw;
    const ConvDiv dv(a);
    BwDy<T> la{dy, a, dv, true};
    BwX<T> lb{x, a, dv, true};
    PartialStore<T> st{part, a.c_out, K};
    int kb, ke;
    split_range(a.n * a.oh * a.ow, a.kc, blockIdx.z, &kb, &ke);
    Eng::run(a.c_out, K, kb, ke, la, lb, st);
}

// One engine's convolution kernels: V is the name's suffix ("" for the 64 × 64 FMA tile).
#define TILE_KERNELS(T, S, V, ENG, THREADS, MIN_BLOCKS)                                             \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                               \
        conv2d_fwd##V##_##S(ConvArgs a, const T* x, const T* w, const T* b, T* y) {                 \
        conv2d_fwd_impl<T, ENG>(a, x, w, b, y);                                                     \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                               \
        conv2d_bwd_data##V##_##S(ConvArgs a, const T* dy, const T* w, T* dx) {                      \
        conv2d_bwd_data_impl<T, ENG>(a, dy, w, dx);                                                 \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                               \
        conv2d_bwd_weight##V##_##S(ConvArgs a, const T* dy, const T* x, T* part) {                  \
        conv2d_bwd_weight_impl<T, ENG>(a, dy, x, part);                                             \
    }

#define COMMA ,
#define FILE_KERNELS(T, S)                                                                           \
    TILE_KERNELS(T, S, , FmaEngine<T COMMA TILE_M COMMA TILE_N>, TILE_THREADS, TILE_MIN_BLOCKS)     \
    TILE_KERNELS(T, S, _m16, FmaEngine<T COMMA TILE_SMALL COMMA TILE_N>, TILE_SMALL_THREADS,        \
                 TILE_SMALL_MIN_BLOCKS)                                                             \
    TILE_KERNELS(T, S, _n16, FmaEngine<T COMMA TILE_M COMMA TILE_SMALL>, TILE_SMALL_THREADS,        \
                 TILE_SMALL_MIN_BLOCKS)                                                             \
    TILE_KERNELS(T, S, _tf32, TcEngine<T COMMA PREC_TF32>, TILE_THREADS, TILE_MIN_BLOCKS)           \
    TILE_KERNELS(T, S, _bf16, TcEngine<T COMMA PREC_BF16>, TILE_THREADS, TILE_MIN_BLOCKS)

FILE_KERNELS(float, f32)
FILE_KERNELS(double, f64)
