// Dense GEMM for `linear` (forward, backward-data, backward-weight): the tile engine of
// common.cuh with strided operand loaders, so every transpose is free.
//   C[m, n] = (accumulate ? C[m, n] : 0) + Σ_k A[m, k]·B[k, n] (+ bias)
// A[m, k] lives at a[m·a_rs + k·a_cs], B[k, n] at b[k·b_rs + n·b_cs]; C is row-major M × N.
#include "common.cuh"

template <typename T>
struct StridedA {
    const T* p;
    int rs, cs;
    bool k_fast;
    static constexpr bool KDESC = false;
    using KD = NoKDesc;
    using MD = NoKDesc;
    __device__ T operator()(int m, int k) const { return p[(long long)m * rs + (long long)k * cs]; }
};
template <typename T>
struct StridedB {
    const T* p;
    int rs, cs;
    bool k_fast;
    static constexpr bool KDESC = false;
    using KD = NoKDesc;
    using MD = NoKDesc;
    __device__ T operator()(int k, int n) const { return p[(long long)k * rs + (long long)n * cs]; }
};

template <typename T>
struct GemmStore {
    T* c;
    const T* bias;
    int N, bias_mode, accumulate;
    __device__ void operator()(int m, int n, T v) const {
        const long long at = (long long)m * N + n;
        if (bias_mode == BIAS_PER_COLUMN) v += bias[n];
        else if (bias_mode == BIAS_PER_ROW) v += bias[m];
        c[at] = accumulate ? c[at] + v : v;
    }
};

// Grid: (ceil(N / TN), ceil(M / TM)) of the engine's tile.
template <typename T, class Eng>
__device__ void gemm_impl(GemmArgs g, const T* a, const T* b, T* c, const T* bias) {
    StridedA<T> la{a, g.a_rs, g.a_cs, g.a_cs == 1};
    StridedB<T> lb{b, g.b_rs, g.b_cs, g.b_rs == 1};
    GemmStore<T> st{c, bias, g.n, g.bias_mode, g.accumulate};
    Eng::run(g.m, g.n, 0, g.k, la, lb, st);
}

// Split-K: grid z = number of chunks; chunk z covers k in [z·kc, min(K, (z+1)·kc)) and
// writes part[z][m][n]. `splitk_reduce` then sums the chunks in order (deterministic).
template <typename T, class Eng>
__device__ void gemm_splitk_impl(GemmArgs g, const T* a, const T* b, T* part) {
    StridedA<T> la{a, g.a_rs, g.a_cs, g.a_cs == 1};
    StridedB<T> lb{b, g.b_rs, g.b_cs, g.b_rs == 1};
    PartialStore<T> st{part, g.m, g.n};
    int kb, ke;
    split_range(g.k, g.kc, blockIdx.z, &kb, &ke);
    Eng::run(g.m, g.n, kb, ke, la, lb, st);
}

// c[i] = (accumulate ? c[i] : 0) + Σ_{z = 0..splits-1} part[z][i], z in increasing order.
template <typename T>
__device__ void splitk_reduce_impl(const T* part, int splits, int len, T* c, int accumulate) {
    GRID_STRIDE(i, len) {
        acc_t s = 0;
        for (int z = 0; z < splits; ++z) s += (acc_t)part[(long long)z * len + i];
        c[i] = accumulate ? (T)((acc_t)c[i] + s) : (T)s;
    }
}

// The forward of a linear layer split along K: c[r][col] = Σ_{z = 0..splits-1} part[z][r][col]
// + bias[col], the chunks in increasing order and the bias added once, after them, as the
// unsplit kernel adds it after its sum. Rows and columns are separate loops (blockIdx.y over
// rows), so no element needs a division to find its column.
template <typename T>
__device__ void splitk_reduce_bias_impl(const T* part, int splits, int rows, int cols, T* c, const T* bias) {
    const long long len = (long long)rows * cols;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        for (int col = blockIdx.x * blockDim.x + threadIdx.x; col < cols; col += blockDim.x * gridDim.x) {
            const long long i = (long long)r * cols + col;
            acc_t s = 0;
            for (int z = 0; z < splits; ++z) s += (acc_t)part[z * len + i];
            c[i] = (T)((T)s + bias[col]);
        }
    }
}

// One engine's GEMM kernels: V is the name's suffix ("" for the 64 × 64 FMA tile).
#define TILE_KERNELS(T, S, V, ENG, THREADS, MIN_BLOCKS)                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                              \
        gemm##V##_##S(GemmArgs g, const T* a, const T* b, T* c, const T* bias) {                   \
        gemm_impl<T, ENG>(g, a, b, c, bias);                                                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                              \
        gemm_splitk##V##_##S(GemmArgs g, const T* a, const T* b, T* part) {                        \
        gemm_splitk_impl<T, ENG>(g, a, b, part);                                                   \
    }

#define COMMA ,
#define FILE_KERNELS(T, S)                                                                          \
    TILE_KERNELS(T, S, , FmaEngine<T COMMA TILE_M COMMA TILE_N>, TILE_THREADS, TILE_MIN_BLOCKS)    \
    TILE_KERNELS(T, S, _m16, FmaEngine<T COMMA TILE_SMALL COMMA TILE_N>, TILE_SMALL_THREADS,       \
                 TILE_SMALL_MIN_BLOCKS)                                                            \
    TILE_KERNELS(T, S, _n16, FmaEngine<T COMMA TILE_M COMMA TILE_SMALL>, TILE_SMALL_THREADS,       \
                 TILE_SMALL_MIN_BLOCKS)                                                            \
    TILE_KERNELS(T, S, _tf32, TcEngine<T COMMA PREC_TF32>, TILE_THREADS, TILE_MIN_BLOCKS)          \
    TILE_KERNELS(T, S, _bf16, TcEngine<T COMMA PREC_BF16>, TILE_THREADS, TILE_MIN_BLOCKS)          \
    extern "C" __global__ void splitk_reduce_##S(const T* part, int splits, int len, T* c, int acc) { \
        splitk_reduce_impl<T>(part, splits, len, c, acc);                                          \
    }                                                                                              \
    extern "C" __global__ void splitk_reduce_bias_##S(const T* part, int splits, int rows, int cols, T* c, \
                                                      const T* bias) {                             \
        splitk_reduce_bias_impl<T>(part, splits, rows, cols, c, bias);                             \
    }

FILE_KERNELS(float, f32)
FILE_KERNELS(double, f64)
