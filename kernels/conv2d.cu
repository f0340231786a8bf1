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

// Every gather is split into a part that depends on the GEMM's k alone and a part that
// depends on its m or n alone (`kdesc`, `mdesc`), joined per element by `at`: the tile
// engine computes each part once per tile or block (see NoKDesc in common.cuh), so an element
// costs a bounds check and an add. An image's base is 64-bit, an offset inside an image a
// wide multiply of the channel plus a 32-bit pixel offset (a plane's size is an int
// throughout, as L = oh·ow is). The `operator()` every loader also has (for the tensor-core
// tile) joins the same parts.

// The image `img` of x.
template <typename T>
__device__ __forceinline__ const T* x_image(const T* x, const ConvArgs& a, int img) {
    return x + (long long)img * a.c_in * (a.h * a.w);
}

// x at im2col row k = (c·kh + p)·kw + q, output pixel l = i·ow + j: the input at row
// i·s − pad + p, column j·s − pad + q; 0 in the padding. Its k part: the tap (p, q) with its
// offset in an image, (c·h + p)·w + q; its pixel part: the image and the window's corner
// (y0, x0) = (i·s − pad, j·s − pad) with that corner's offset.
struct __align__(16) XTap {
    long long off;
    int p, q;
};
template <typename T>
struct XPix {
    const T* xi;
    int y0, x0, at;
};
__device__ __forceinline__ XTap x_tap_part(const ConvArgs& a, const ConvDiv& dv, int k) {
    const int c = dv.khw.div(k), r = k - c * (a.kh * a.kw);
    const int p = dv.kw.div(r), q = r - p * a.kw;
    return XTap{(long long)c * (a.h * a.w) + (p * a.w + q), p, q};
}
template <typename T>
__device__ __forceinline__ XPix<T> x_pix_part(const T* x, const ConvArgs& a, const ConvDiv& dv, int col) {
    const int img = dv.L.div(col), l = col - img * (a.oh * a.ow);
    const int i = dv.ow.div(l), j = l - i * a.ow;
    const int y0 = i * a.stride - a.pad, x0 = j * a.stride - a.pad;
    return XPix<T>{x_image(x, a, img), y0, x0, y0 * a.w + x0};
}
template <typename T>
__device__ __forceinline__ T x_join(const ConvArgs& a, const XTap& d, const XPix<T>& m) {
    // Unsigned: a row or column above the padding's edge is negative, so huge.
    if ((unsigned)(m.y0 + d.p) >= (unsigned)a.h || (unsigned)(m.x0 + d.q) >= (unsigned)a.w) return T(0);
    return m.xi[d.off + m.at];
}

// ---- forward: y[img, co, l] = Σ_k W[co, k]·col_img[k, l] (+ b[co]) ----
// GEMM M = c_out, N = n·L (images side by side), K = c_in·kh·kw.
template <typename T>
struct FwdW {  // A(co, k) = W[co, k]
    const T* w;
    int K;
    bool k_fast;
    static constexpr bool KDESC = false;
    using KD = NoKDesc;
    using MD = NoKDesc;
    __device__ T operator()(int co, int k) const { return w[(long long)co * K + k]; }
};
template <typename T>
struct FwdX {  // B(k, col) with col = img·L + l
    const T* x;
    ConvArgs a;
    ConvDiv dv;
    bool k_fast;
    // k: the tap; mn: the output pixel.
    static constexpr bool KDESC = true;
    using KD = XTap;
    using MD = XPix<T>;
    __device__ KD kdesc(int k) const { return x_tap_part(a, dv, k); }
    __device__ MD mdesc(int col) const { return x_pix_part(x, a, dv, col); }
    __device__ T at(const KD& d, const MD& m) const { return x_join(a, d, m); }
    __device__ T operator()(int k, int col) const { return at(kdesc(k), mdesc(col)); }
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
    // k: the tap's offset in W, co·c_in·kh·kw + p·kw + q; mn: the input channel's, c·kh·kw.
    static constexpr bool KDESC = true;
    struct KD {
        long long off;
    };
    struct MD {
        int off;
    };
    __device__ KD kdesc(int k) const {
        const int co = ph.uhw.div(k), r = k - co * (ph.y.taps * ph.x.taps);
        const int u = ph.uw.div(r), v = r - u * ph.x.taps;
        const int p = ph.y.f + a.stride * u, q = ph.x.f + a.stride * v;
        return KD{(long long)co * (a.c_in * a.kh * a.kw) + (p * a.kw + q)};
    }
    __device__ MD mdesc(int c) const { return MD{c * (a.kh * a.kw)}; }
    __device__ T at(const KD& d, const MD& m) const { return w[d.off + m.off]; }
    __device__ T operator()(int c, int k) const { return at(kdesc(k), mdesc(c)); }
};
template <typename T>
struct BdDy {  // B(k, col) = dy[img, co, t0y + ty − u, t0x + tx − v], 0 outside dy
    const T* dy;
    ConvArgs a;
    Phase ph;
    bool k_fast;
    // A tap (u, v) of the phase and its offset in an image of dy, co·oh·ow − (u·ow + v) for
    // output channel co (added to the offset of the pixel (i0, j0) of tap (0, 0)).
    static constexpr bool KDESC = true;
    struct __align__(16) KD {
        long long off;
        int u, v;
    };
    __device__ KD kdesc(int k) const {
        const int co = ph.uhw.div(k), r = k - co * (ph.y.taps * ph.x.taps);
        const int u = ph.uw.div(r), v = r - u * ph.x.taps;
        return KD{(long long)co * (a.oh * a.ow) - (u * a.ow + v), u, v};
    }
    // A pixel of the phase: its image, the dy pixel (i0, j0) of tap (0, 0) and its offset.
    struct MD {
        const T* dyi;
        int i0, j0, at;
    };
    __device__ MD mdesc(int col) const {
        const int img = ph.nhw.div(col), pix = col - img * (ph.y.n * ph.x.n);
        const int ty = ph.nw.div(pix), tx = pix - ty * ph.x.n;
        const int i0 = ph.y.t0 + ty, j0 = ph.x.t0 + tx;
        return MD{dy + (long long)img * a.c_out * (a.oh * a.ow), i0, j0, i0 * a.ow + j0};
    }
    __device__ T at(const KD& d, const MD& m) const {
        // Unsigned: a tap before the first row or column is negative, so huge.
        if ((unsigned)(m.i0 - d.u) >= (unsigned)a.oh || (unsigned)(m.j0 - d.v) >= (unsigned)a.ow) return T(0);
        return m.dyi[d.off + m.at];
    }
    __device__ T operator()(int k, int col) const { return at(kdesc(k), mdesc(col)); }
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
    // k (here t): the pixel's address in channel 0 of its image; mn: the channel's offset.
    static constexpr bool KDESC = true;
    struct KD {
        const T* p;
    };
    struct MD {
        long long off;
    };
    __device__ KD kdesc(int t) const {
        const int L = a.oh * a.ow;
        const int img = dv.L.div(t);
        return KD{dy + (long long)img * a.c_out * L + (t - img * L)};
    }
    __device__ MD mdesc(int co) const { return MD{(long long)co * (a.oh * a.ow)}; }
    __device__ T at(const KD& d, const MD& m) const { return d.p[m.off]; }
    __device__ T operator()(int co, int t) const { return at(kdesc(t), mdesc(co)); }
};
template <typename T>
struct BwX {  // B(t, k) = col_img[k, l]
    const T* x;
    ConvArgs a;
    ConvDiv dv;
    bool k_fast;
    // k (here t): the output pixel; mn (a weight column): the tap.
    static constexpr bool KDESC = true;
    using KD = XPix<T>;
    using MD = XTap;
    __device__ KD kdesc(int t) const { return x_pix_part(x, a, dv, t); }
    __device__ MD mdesc(int k) const { return x_tap_part(a, dv, k); }
    __device__ T at(const KD& m, const MD& d) const { return x_join(a, d, m); }
    __device__ T operator()(int t, int k) const { return at(kdesc(t), mdesc(k)); }
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
