// Shared by every kernel file. NVRTC compiles each .cu as its own program with this header
// pasted in front (see src/backend/cuda/compile.rs), so there are no system headers here.
// In front of this header comes the contract generated from src/backend/cuda/contract.rs:
// the launch constants (BLOCK, TILE_M, TILE_N, TILE_K, TILE_THREADS), the enum codes
// (UNARY_*, RECON_*, ADAM_*, BIAS_*), BCE_LOG_CLAMP / BCE_GRAD_EPS and the argument structs
// (GemmArgs, ConvArgs, BnArgs, AdamArgs<T>). After it come the declarations of the file's
// kernels from the kernel table (src/backend/cuda/kernels.rs), which its definitions must match.
//
// Conventions:
// - Every kernel is a template over the element type T, instantiated for float and double
//   with extern "C" names <op>_f32 / <op>_f64 by the INSTANTIATE macros below.
// - Shapes arrive as int arguments by value (never through device memory).
// - Reductions accumulate in double (acc_t) like the CPU reference, and combine partial sums
//   in a fixed tree order: no atomics, so results are bitwise reproducible.

typedef double acc_t;

// Grid-stride loop over [0, n): correct for any grid size, including ragged tails.
#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)

// ---- block reductions: warp shuffles inside a warp, shared memory only across warps ----
//
// Every sum below adds in a tree fixed by the lane and warp numbers alone (never by timing),
// in double (acc_t), so a result is the same to the bit on every run and every GPU. Accuracy:
// each tree level adds two partial sums, so a total of n values carries a rounding error of at
// most about log2(n)·2^-53 relative to Σ|v|: far below the f32 outputs' 2^-24, which is why
// the tests compare with the CPU's f64 sums (in another order) at f32 tolerances.

constexpr int WARP = 32;
constexpr int BLOCK_WARPS = BLOCK / WARP;
static_assert(BLOCK % WARP == 0 && BLOCK_WARPS <= WARP, "block reductions assume whole warps, at most 32 of them");

// Sum over the 32 lanes of a warp: lane l adds lane l + o for o = 16, 8, 4, 2, 1. Lane 0 gets
// the total; lane l < o only ever reads lanes < 2·o, which were complete at the level above,
// so the other lanes' (partial) values do not matter. Every lane of the warp must call it.
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Sum of one value per thread over a block of BLOCK threads: each warp by shuffles, then warp
// 0 adds the BLOCK_WARPS warp sums (lanes past them add 0). Every thread must call it; the
// total is returned to thread 0 (others get partial sums). `shared` holds BLOCK_WARPS values
// and may be reused as soon as this returns.
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared /* [BLOCK_WARPS] */) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    v = warp_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) v = warp_sum(lane < BLOCK_WARPS ? shared[lane] : acc_t(0));
    __syncthreads();  // every read of shared is done: the caller may reuse it
    return v;
}

// Mean and variance statistics of a set of values, as (count, mean, M2 = Σ(v − mean)²).
struct Moments {
    acc_t n, mean, m2;
};

// The moments of two disjoint sets together (Chan, Golub and LeVeque's pairwise update): as
// accurate as a two-pass computation, whatever the sizes. An empty side returns the other.
__device__ __forceinline__ Moments merge_moments(Moments a, Moments b) {
    if (b.n == 0) return a;
    if (a.n == 0) return b;
    const acc_t n = a.n + b.n, d = b.mean - a.mean;
    return Moments{n, a.mean + d * (b.n / n), a.m2 + b.m2 + d * d * (a.n * (b.n / n))};
}

// warp_sum's tree for moments: lane 0 gets the moments of the whole warp.
__device__ __forceinline__ Moments warp_moments(Moments v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) {
        Moments u;
        u.n = __shfl_down_sync(0xffffffffu, v.n, o);
        u.mean = __shfl_down_sync(0xffffffffu, v.mean, o);
        u.m2 = __shfl_down_sync(0xffffffffu, v.m2, o);
        v = merge_moments(v, u);
    }
    return v;
}

// block_sum's scheme for moments: thread 0 gets the moments of the whole block.
__device__ __forceinline__ Moments block_moments(Moments v, Moments* shared /* [BLOCK_WARPS] */) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    v = warp_moments(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) v = warp_moments(lane < BLOCK_WARPS ? shared[lane] : Moments{0, 0, 0});
    __syncthreads();
    return v;
}

// ---- chunked per-channel reductions over an [outer, channels, inner] view ----
//
// A channel's m = outer·inner values e = o·inner + i (at ((o·channels + c)·inner + i)) are cut
// into chunks of `chunk` consecutive e (the last one ragged); block (k, c) of a grid
// (chunks, channels) reduces chunk k of channel c. The host picks `chunk` from the shapes
// alone (kernels.rs, `channel_chunks`), so the split, and the sums, are the same on every GPU.
// ChunkWalk visits a thread's elements e = begin + t, begin + t + BLOCK, ... without a
// division per element: one division per thread to start, then BLOCK = q·inner + r
// steps (o, i) by (q, r) with one carry.
struct ChunkWalk {
    // e and end in 64 bits: e + BLOCK may pass 2^31 on the last step of a huge channel.
    long long e, end;
    int o, i, q, r, inner, channels, c;
    __device__ __forceinline__ ChunkWalk(int outer, int channels_, int inner_, int chunk)
        : inner(inner_), channels(channels_), c(blockIdx.y) {
        const long long begin = (long long)blockIdx.x * chunk;
        end = min((long long)outer * inner, begin + chunk);
        e = begin + threadIdx.x;
        o = (int)(e / inner);
        i = (int)(e % inner);
        q = BLOCK / inner;
        r = BLOCK % inner;
    }
    __device__ __forceinline__ bool more() const { return e < end; }
    // Offset of the current element in the [outer, channels, inner] tensor.
    __device__ __forceinline__ long long at() const { return ((long long)o * channels + c) * inner + i; }
    __device__ __forceinline__ void next() {
        e += BLOCK;
        o += q;
        i += r;
        if (i >= inner) {
            i -= inner;
            ++o;
        }
    }
};

__device__ __forceinline__ float exp_t(float x) { return expf(x); }
__device__ __forceinline__ double exp_t(double x) { return exp(x); }
__device__ __forceinline__ float tanh_t(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_t(double x) { return tanh(x); }
__device__ __forceinline__ float sqrt_t(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_t(double x) { return sqrt(x); }

// ---- activations: the math of src/ops/unary.rs, repeated (elementwise.cu, batchnorm.cu) ----
// op: a UNARY_* code; slope is leaky ReLU's; UNARY_IDENTITY is no activation
template <typename T>
__device__ __forceinline__ T unary_f(int op, T x, T slope) {
    switch (op) {
        case UNARY_RELU: return x > T(0) ? x : T(0);
        case UNARY_SIGMOID: return T(1) / (T(1) + exp_t(-x));
        case UNARY_TANH: return tanh_t(x);
        case UNARY_IDENTITY: return x;
        default: return x > T(0) ? x : x * slope;
    }
}
// dy·f'(x), from x and y = f(x)
template <typename T>
__device__ __forceinline__ T unary_df(int op, T x, T y, T dy, T slope) {
    switch (op) {
        case UNARY_RELU: return y > T(0) ? dy : T(0);
        case UNARY_SIGMOID: return dy * y * (T(1) - y);
        case UNARY_TANH: return dy * (T(1) - y * y);
        case UNARY_IDENTITY: return dy;
        default: return x > T(0) ? dy : dy * slope;
    }
}

// ---- the tiled GEMM engine (used by gemm.cu and conv2d.cu) ----
//
// C[m, n] = Σ_{k in [k_begin, k_end)} A(m, k) · B(k, n), M × N outputs per grid.
// A block of TILE_THREADS = 256 threads computes a TILE_M × TILE_N = 64 × 64 tile of C,
// walking K in steps of TILE_K = 16 through shared memory. Thread (ty, tx) = (tid / 16,
// tid % 16) owns the 4 × 4 register micro-tile of rows m0 + ty + 16·i and columns
// n0 + tx + 16·j (i, j in 0..4): strided so that a warp reads 16 consecutive B columns
// (no bank conflicts) and writes 16 consecutive C columns (coalesced).
//
// Operands are read through loader functors, so the same engine does plain GEMM with any
// transposes (strided loads) and implicit-GEMM convolutions (index math in the loader):
//   struct Loader { bool k_fast; T operator()(int mn, int k) const; };
// `k_fast` says which index is contiguous in memory, so consecutive threads load
// consecutive addresses. Out-of-range elements (ragged M, N, K tails) load as 0 and the
// loader is never called for them. The store functor is called once per in-range (m, n).
// (TILE_M = TILE_N = 64, TILE_K = 16 and TILE_THREADS = 256 come from the contract; the
// 16 × 16 thread grid and 4 × 4 micro-tiles below assume those values.)
static_assert(TILE_M == 64 && TILE_N == 64 && TILE_THREADS == 256, "tile_gemm assumes 64x64 tiles, 256 threads");

template <typename T, class LA, class LB, class ST>
__device__ __forceinline__ void tile_gemm(int M, int N, int k_begin, int k_end, const LA& la, const LB& lb,
                                          const ST& st) {
    // +1 padding: the k-fast store pattern (consecutive threads → consecutive kk) hits
    // distinct banks.
    __shared__ T As[TILE_K][TILE_M + 1];
    __shared__ T Bs[TILE_K][TILE_N + 1];
    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;
    T acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = T(0);

    for (int k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        // A tile: TILE_M × TILE_K elements, TILE_M·TILE_K / TILE_THREADS = 4 per thread.
        for (int e = tid; e < TILE_M * TILE_K; e += TILE_THREADS) {
            int mm, kk;
            if (la.k_fast) { mm = e / TILE_K; kk = e % TILE_K; }
            else           { kk = e / TILE_M; mm = e % TILE_M; }
            const int gm = m0 + mm, gk = k0 + kk;
            As[kk][mm] = (gm < M && gk < k_end) ? la(gm, gk) : T(0);
        }
        // B tile: TILE_K × TILE_N elements.
        for (int e = tid; e < TILE_N * TILE_K; e += TILE_THREADS) {
            int nn, kk;
            if (lb.k_fast) { nn = e / TILE_K; kk = e % TILE_K; }
            else           { kk = e / TILE_N; nn = e % TILE_N; }
            const int gn = n0 + nn, gk = k0 + kk;
            Bs[kk][nn] = (gn < N && gk < k_end) ? lb(gk, gn) : T(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE_K; ++kk) {
            T a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < M && n < N) st(m, n, acc[i][j]);
        }
}

// The K range of split `z` when K is cut into chunks of kc (the last one ragged).
__device__ __forceinline__ void split_range(int K, int kc, int z, int* kb, int* ke) {
    *kb = z * kc;
    *ke = min(K, *kb + kc);
}

// Store functor of a split-K pass: chunk z writes its partial product to part[z][m][n].
template <typename T>
struct PartialStore {
    T* part;
    int M, N;
    __device__ void operator()(int m, int n, T v) const {
        part[((long long)blockIdx.z * M + m) * N + n] = v;
    }
};

// Every kernel file ends with FILE_KERNELS(float, f32) FILE_KERNELS(double, f64), where
// FILE_KERNELS defines the extern "C" wrappers that call the templates.
