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
// A block computes a TM × TN tile of C with (TM/4)·(TN/4) threads, each owning a 4 × 4
// register micro-tile, walking K in steps of TILE_K = 16 through shared memory. Three shapes
// are instantiated (the host picks one per launch from the GEMM's shape, `choose_tile` in
// src/backend/cuda/kernels.rs): 64 × 64 with TILE_THREADS = 256 threads, and for a small M
// or N the 16 × 64 and 64 × 16 tiles with TILE_SMALL_THREADS = 64 threads, so one output
// channel or a 20-wide latent head pads to 16 instead of 64.
//
// What the loop is shaped for: an SM partition issues one warp instruction per clock, so an
// FP32 tile runs at the FFMA share of its k-loop's instructions (the H200 model prices it so,
// src/model/sass.rs). Everything in the loop that is not an FFMA is paid for in FFMAs not
// issued, hence:
// - Thread (ty, tx) = (tid / TX, tid % TX), TX = TN/4, owns the four consecutive rows
//   m0 + 4·ty + i and columns n0 + 4·tx + j, so each k-step reads its a and b as one 16-byte
//   shared load each (LDS.128; two for double): 16 FFMA per 2 loads, where four scalar loads
//   per operand took 8. The rows of the staged tiles are padded by 4 elements, not 1, to keep
//   those vectors 16-byte aligned; a quarter-warp's eight vectors then cover 128 consecutive
//   bytes (no bank conflicts on the loads that run 16 times per tile).
// - Two shared buffers and a register prefetch: the global loads of tile t+1 are issued
//   before tile t's FFMAs and stored to the other buffer after them, so their latency hides
//   behind the math and one barrier per tile suffices (the buffer written in step t was last
//   read in step t−1, before the previous barrier).
// - Which index of an operand is contiguous in memory (`k_fast`) is a template parameter of
//   the loop, dispatched once per block, not a branch per element. Each thread stages a
//   fixed set of elements: of a k-fast operand one column kk = tid % TILE_K of rows
//   tid / TILE_K + r·(THREADS / TILE_K); of the other one row mm = tid % TM (or TN) of columns
//   tid / TM + r·(THREADS / TM), so consecutive threads still load consecutive addresses,
//   and one of an element's two indices is the same for all of a thread's elements.
// - That shared index is what the loaders' tables (below) exploit: a convolution gather's
//   FastDivs and address arithmetic run once per tile or block, not once per element.
// A tile of the 16-wide shapes stages 20 elements per thread for the same 256 FFMA as the
// 64 × 64 tile's 8 (a tile's loads per FMA go as 1/TM + 1/TN), so its loop share stays lower
// whatever the loaders do.
//
// Operands are read through loader functors, so the same engine does plain GEMM with any
// transposes (strided loads) and implicit-GEMM convolutions (index math in the loader):
//   struct Loader { bool k_fast; T operator()(int mn, int k) const; ... };
// Out-of-range elements (ragged M, N, K tails) load as 0 and the loader is never called for
// them. The store functor is called once per in-range (m, n). The sum of each output runs
// over k in increasing order, one FMA per k, whatever the tile: fixed by the shapes alone.
static_assert(TILE_M == 64 && TILE_N == 64 && TILE_THREADS == 256, "the 64x64 tile has 256 threads");
static_assert(TILE_SMALL == 16 && TILE_SMALL_THREADS == 64, "the 16-wide tiles have 64 threads");

// A loader may split an element's address into a part that depends on k alone and a part
// that depends on mn alone: `KDESC = true`, `KD kdesc(int k)`, `MD mdesc(int mn)` and
// `T at(const KD&, const MD&)`, so that an element costs only what joins the two (for a
// convolution: a tap's bounds and a 64-bit add, where it was four FastDivs, the bounds and a
// 64-bit multiply chain). The part a thread's elements share is computed by the thread in
// registers; the part that differs between them comes from a table in shared memory that
// the block fills once:
// - an operand that is not k-fast (one mn per thread, several k): its mn part once per
//   thread before the loop; its k part for each tile's TILE_K values of k, in a table of two
//   buffers filled a tile ahead (so no barrier is added to the loop);
// - a k-fast operand (one k per thread and tile, several mn): its k part once per tile; its
//   mn part for the tile's TM (or TN) values of mn, in a table filled once per block.
// (The compiler does not hoist these itself: they sit under each element's bounds check.)
// A loader without the split says `KDESC = false`, `using KD = NoKDesc` and `using MD =
// NoKDesc`.
struct NoKDesc {
    int unused;
};

// Row padding of the staged tiles: a multiple of 4 elements keeps every row 16-byte aligned.
#define TILE_PAD 4

// Four consecutive elements of shared memory at a 16-byte aligned address, as 128-bit loads.
__device__ __forceinline__ void lds4(const float* p, float (&v)[4]) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
__device__ __forceinline__ void lds4(const double* p, double (&v)[4]) {
    const double2 q0 = reinterpret_cast<const double2*>(p)[0];
    const double2 q1 = reinterpret_cast<const double2*>(p)[1];
    v[0] = q0.x; v[1] = q0.y; v[2] = q1.x; v[3] = q1.y;
}

// The elements thread `tid` stages of a D × TILE_K operand tile (D = TM or TN): element r is
// at (mn, kk). See the engine's comment for why the split depends on K_FAST only.
template <int D, int THREADS, bool K_FAST>
struct Staging {
    static constexpr int R = D * TILE_K / THREADS;
    static_assert(THREADS % TILE_K == 0 && D % (THREADS / TILE_K) == 0 && THREADS % D == 0 &&
                      TILE_K % (THREADS / D) == 0,
                  "a tile's elements split evenly over its threads");
    static __device__ __forceinline__ int mn(int tid, int r) {
        return K_FAST ? tid / TILE_K + r * (THREADS / TILE_K) : tid % D;
    }
    static __device__ __forceinline__ int kk(int tid, int r) {
        return K_FAST ? tid % TILE_K : tid / D + r * (THREADS / D);
    }
};

template <typename T, int TM, int TN, bool AK, bool BK, class LA, class LB, class ST, int NB, class KTA,
          class KTB, class MTA, class MTB>
__device__ __forceinline__ void tile_gemm_loop(int M, int N, int k_begin, int k_end, const LA& la, const LB& lb,
                                               const ST& st, T (&As)[NB][TILE_K][TM + TILE_PAD],
                                               T (&Bs)[NB][TILE_K][TN + TILE_PAD], KTA& Ka, KTB& Kb, MTA& Ma,
                                               MTB& Mb) {
    constexpr int TX = TN / 4, THREADS = (TM / 4) * TX;
    using SA = Staging<TM, THREADS, AK>;
    using SB = Staging<TN, THREADS, BK>;
    // Whether an operand's k parts (TA, TB) or mn parts (UA, UB) come from the block's
    // tables (see NoKDesc).
    constexpr bool TA = !AK && LA::KDESC, TB = !BK && LB::KDESC;
    constexpr bool UA = AK && LA::KDESC, UB = BK && LB::KDESC;
    const int tid = threadIdx.x;
    const int tx = tid % TX, ty = tid / TX;
    const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    T acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = T(0);

    // The mn parts of a tabled operand's addresses: one mn per thread (clamped into range:
    // a thread past the edge loads nothing but still describes a valid index).
    typename LA::MD ma{};
    typename LB::MD mb{};
    // The k parts of a k-fast operand's elements in the tile being fetched: one k per thread.
    typename LA::KD ka{};
    typename LB::KD kb_{};
    if constexpr (TA) ma = la.mdesc(min(m0 + SA::mn(tid, 0), M - 1));
    if constexpr (TB) mb = lb.mdesc(min(n0 + SB::mn(tid, 0), N - 1));
    // This thread's element r of the A and B tiles at k0, whose k table is number kb.
    auto a_at = [&](int k0, int kb, int r) {
        const int gm = m0 + SA::mn(tid, r), gk = k0 + SA::kk(tid, r);
        const bool in = (gm < M && gk < k_end);
        if constexpr (TA) {
            const typename LA::KD d = Ka[kb][SA::kk(tid, r)];
            return in ? la.at(d, ma) : T(0);
        } else if constexpr (UA) {
            const typename LA::MD d = Ma[SA::mn(tid, r)];
            return in ? la.at(ka, d) : T(0);
        } else {
            return in ? la(gm, gk) : T(0);
        }
    };
    auto b_at = [&](int k0, int kb, int r) {
        const int gn = n0 + SB::mn(tid, r), gk = k0 + SB::kk(tid, r);
        const bool in = (gn < N && gk < k_end);
        if constexpr (TB) {
            const typename LB::KD d = Kb[kb][SB::kk(tid, r)];
            return in ? lb.at(d, mb) : T(0);
        } else if constexpr (UB) {
            const typename LB::MD d = Mb[SB::mn(tid, r)];
            return in ? lb.at(kb_, d) : T(0);
        } else {
            return in ? lb(gk, gn) : T(0);
        }
    };
    // The k tables of the tile at k0 into table kb, by the block's first TILE_K threads (k
    // past the end described as the last k: never loaded, but a valid index).
    auto describe = [&](int k0, int kb) {
        if (TA || TB) {
            if (tid < TILE_K) {
                const int k = min(k0 + tid, k_end - 1);
                if constexpr (TA) Ka[kb][tid] = la.kdesc(k);
                if constexpr (TB) Kb[kb][tid] = lb.kdesc(k);
            }
        }
    };
    // The prefetch registers: this thread's elements of the next tile, held across the
    // k-step's FFMAs (`fetch`, then `stage`). A double tile does not hold them: its values
    // take two registers each, and the 16-wide tiles' 16 elements of the long operand per
    // thread spill. Nor does it take two buffers: eight blocks of a 16-wide double tile
    // would not fit sm_80's shared memory. It refills its one buffer after a barrier,
    // staging each element as it arrives (`fill`, a loop not unrolled): f64 is the
    // reference precision here, not the fast one.
    constexpr bool HOLD = NB == 2;
    static_assert(NB == (sizeof(T) == 4 ? 2 : 1), "float double-buffers, double does not");
    T ra[SA::R], rb[SB::R];
    // A k-fast operand's k part of the tile at k0 (k past the end: the last k, not loaded).
    auto k_parts = [&](int k0) {
        if constexpr (UA) ka = la.kdesc(min(k0 + SA::kk(tid, 0), k_end - 1));
        if constexpr (UB) kb_ = lb.kdesc(min(k0 + SB::kk(tid, 0), k_end - 1));
    };
    auto fetch = [&](int k0, int kb) {
        k_parts(k0);
#pragma unroll
        for (int r = 0; r < SA::R; ++r) ra[r] = a_at(k0, kb, r);
#pragma unroll
        for (int r = 0; r < SB::R; ++r) rb[r] = b_at(k0, kb, r);
    };
    auto stage = [&](int buf) {
#pragma unroll
        for (int r = 0; r < SA::R; ++r) As[buf][SA::kk(tid, r)][SA::mn(tid, r)] = ra[r];
#pragma unroll
        for (int r = 0; r < SB::R; ++r) Bs[buf][SB::kk(tid, r)][SB::mn(tid, r)] = rb[r];
    };
    auto fill = [&](int k0, int kb, int buf) {
        k_parts(k0);
#pragma unroll 1
        for (int r = 0; r < SA::R; ++r) As[buf][SA::kk(tid, r)][SA::mn(tid, r)] = a_at(k0, kb, r);
#pragma unroll 1
        for (int r = 0; r < SB::R; ++r) Bs[buf][SB::kk(tid, r)][SB::mn(tid, r)] = b_at(k0, kb, r);
    };

    const int tiles = k_end > k_begin ? (k_end - k_begin + TILE_K - 1) / TILE_K : 0;
    // Tile t is staged from k table t & 1 (into buffer t & 1, or a double tile's one buffer);
    // the table of tile t + 2 is written in step t, after the fetch that read that table
    // (tile t's, in step t − 1) and before the barrier that ends the step.
    if (TA || TB || UA || UB) {
        if (tiles > 0) {
            describe(k_begin, 0);
            describe(k_begin + TILE_K, 1);
        }
        if constexpr (UA)
            for (int i = tid; i < TM; i += THREADS) Ma[i] = la.mdesc(min(m0 + i, M - 1));
        if constexpr (UB)
            for (int i = tid; i < TN; i += THREADS) Mb[i] = lb.mdesc(min(n0 + i, N - 1));
        __syncthreads();
    }
    if (tiles > 0) {
        if constexpr (HOLD) {
            fetch(k_begin, 0);
            stage(0);
        } else {
            fill(k_begin, 0, 0);
        }
    }
    __syncthreads();
    for (int t = 0; t < tiles; ++t) {
        const int buf = HOLD ? t & 1 : 0;
        const bool more = t + 1 < tiles;
        if constexpr (HOLD) {
            if (more) fetch(k_begin + (t + 1) * TILE_K, buf ^ 1);
        }
#pragma unroll
        for (int kk = 0; kk < TILE_K; ++kk) {
            T a[4], b[4];
            lds4(&As[buf][kk][4 * ty], a);
            lds4(&Bs[buf][kk][4 * tx], b);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        if constexpr (HOLD) {
            if (more) stage(buf ^ 1);
        } else if (more) {
            __syncthreads();  // every thread has read the one buffer before it is refilled
            fill(k_begin + (t + 1) * TILE_K, (t + 1) & 1, 0);
        }
        if (t + 2 < tiles) describe(k_begin + (t + 2) * TILE_K, t & 1);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int m = m0 + 4 * ty + i, n = n0 + 4 * tx + j;
            if (m < M && n < N) st(m, n, acc[i][j]);
        }
}

template <typename T, int TM, int TN, class LA, class LB, class ST>
__device__ __forceinline__ void tile_gemm(int M, int N, int k_begin, int k_end, const LA& la, const LB& lb,
                                          const ST& st) {
    static_assert(TM % 16 == 0 && TN % 16 == 0, "4 x 4 micro-tiles over a tile of whole warps");
    // Declared here, once, not in the loop's instantiations (each would get its own).
    // Two staging buffers for float, one for double (see HOLD in the loop).
    constexpr int NB = sizeof(T) == 4 ? 2 : 1;
    __shared__ __align__(16) T As[NB][TILE_K][TM + TILE_PAD];
    __shared__ __align__(16) T Bs[NB][TILE_K][TN + TILE_PAD];
    // The loaders' tables (see NoKDesc); one element where a loader has none.
    __shared__ __align__(16) typename LA::KD Ka[2][LA::KDESC ? TILE_K : 1];
    __shared__ __align__(16) typename LB::KD Kb[2][LB::KDESC ? TILE_K : 1];
    __shared__ __align__(16) typename LA::MD Ma[LA::KDESC ? TM : 1];
    __shared__ __align__(16) typename LB::MD Mb[LB::KDESC ? TN : 1];
    // The convolution loaders' k_fast are constants, so only one branch survives there.
    // Any staging order is correct; k_fast only picks the coalesced one. So f64, the
    // reference precision, takes one order whatever the operands', and the pair no caller
    // makes (A m-fast, B k-fast: a linear layer's three products are k-k, k-n and m-n; the
    // convolutions' k-n, k-n and k-k) shares the m-n copy. Every copy of the loop is NVRTC
    // time in every file, every kernel and every planted-bug build.
    if (sizeof(T) == 4 && la.k_fast) {
        if (lb.k_fast) tile_gemm_loop<T, TM, TN, true, true>(M, N, k_begin, k_end, la, lb, st, As, Bs, Ka, Kb, Ma, Mb);
        else           tile_gemm_loop<T, TM, TN, true, false>(M, N, k_begin, k_end, la, lb, st, As, Bs, Ka, Kb, Ma, Mb);
    } else {
        tile_gemm_loop<T, TM, TN, false, false>(M, N, k_begin, k_end, la, lb, st, As, Bs, Ka, Kb, Ma, Mb);
    }
}

// Unsigned division by a divisor fixed for the whole launch, without a divide instruction per
// element: q = (hi32(n·mul) + n) >> shift, the "round-up" method of Granlund and Montgomery
// (PLDI 1994; Hacker's Delight, 2nd ed., 10-9), with shift = ⌈log2 d⌉ and
// mul = ⌊2^32·(2^shift − d)/d⌋ + 1. Exact for 0 ≤ n < 2^31 and 1 ≤ d < 2^31 (then
// hi32(n·mul) ≤ n, so the sum fits 32 bits); checked exhaustively for d < 5000 and n < 10^4
// and on random n up to 2^31 − 1 when it was written, and by every convolution test. The
// set-up costs one 64-bit division, made once per thread before the K loop.
struct FastDiv {
    unsigned d, mul, shift;
    __device__ __forceinline__ explicit FastDiv(int divisor) {
        d = (unsigned)divisor;
        shift = 0;
        while ((1u << shift) < d) ++shift;
        mul = (unsigned)(((1ull << 32) * ((1ull << shift) - d)) / d + 1);
    }
    __device__ __forceinline__ int div(int n) const {
        const unsigned hi = (unsigned)(((unsigned long long)mul * (unsigned)n) >> 32);
        return (int)((hi + (unsigned)n) >> shift);
    }
};

// ---- the tensor-core tile (--precision tf32 / bf16) ----
//
// The same 64 × 64 tile, loaders and stores as tile_gemm, on `mma.sync`: operands are rounded
// as they are staged in shared memory (TF32: cvt.rna, nearest, ties away; BF16: cvt.rn,
// nearest even), exactly as the CPU backend rounds them at that precision, and the products
// are accumulated in f32, over k in increasing order of k-slices. The 8 warps of 256 threads
// form a 2 × 4 grid, each warp owning a 32 × 16 block of C: 2 × 2 accumulator fragments of
// 16 × 8. Fragments follow the PTX ISA's tables (see kernels/README.md, "Tensor cores");
// g = lane / 4, t = lane % 4.
//
// What the loop is shaped for: one warp instruction issues per clock per SM partition and an
// mma keeps the tensor unit busy for a few clocks, so the tile runs at the share of its loop
// that mma can fill (the H200 model prices it so, src/model/price.rs). Hence operands are
// staged in fragment order (a lane's fragment is one LDS.128 or LDS.64, where element-wise
// reads took 4 + 2 loads and packing), each thread stages a fixed set of elements whose shared
// slots are computed once per block, and two buffers with a register prefetch overlap the
// next tile's global loads with this tile's mma, one barrier per tile.
//
// NVRTC has no mma.h, so the instructions are inline PTX; on the emulated device
// (VAECUDA_EMULATED) their host bodies.
#define PREC_TF32 0
#define PREC_BF16 1
#ifdef VAECUDA_EMULATED
__device__ __forceinline__ unsigned cvt_tf32(float x) { return emu_cvt_rna_tf32(x); }
// The bf16 of x in the upper half of a word (the lower half zero).
__device__ __forceinline__ unsigned cvt_bf16_hi(float x) { return emu_cvt_rn_bf16x2(x, 0.0f); }
__device__ __forceinline__ void mma_tf32(float* d, const unsigned* a, const unsigned* b, const float* c) {
    emu_mma_m16n8k8_tf32(d, a, b, c);
}
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, const unsigned* b, const float* c) {
    emu_mma_m16n8k16_bf16(d, a, b, c);
}
#else
__device__ __forceinline__ unsigned cvt_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ unsigned cvt_bf16_hi(float x) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x), "f"(0.0f));
    return r;
}
__device__ __forceinline__ void mma_tf32(float* d, const unsigned* a, const unsigned* b, const float* c) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
                   "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, const unsigned* b, const float* c) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
                   "f"(c[2]), "f"(c[3]));
}
#endif

// Where a staged operand element goes in shared memory: in the order the warps read their
// fragments, so a lane reads all of one fragment with one 16-byte (A) or 8-byte (B) load and a
// warp's load covers consecutive bytes (no bank conflicts). A tile's 64 rows (of A) or columns
// (of B) are 4 blocks of 16 rows or 8 blocks of 8 columns; a fragment of block i, k-slice s, is
// 32 lanes × its registers, lane = 4·g + t.
// TF32 (m16n8k8, words): A's register (row ≥ 8) + 2·(k ≥ 4) of lane (row % 8, k % 4), fragment
// (s, i) at word ((s·4 + i)·32 + lane)·4; B's register (k ≥ 4) of lane (column % 8, k % 4),
// fragment (s, j) at ((s·8 + j)·32 + lane)·2.
// BF16 (m16n8k16, half-words; one k-slice of 16): register (row ≥ 8) + 2·(k ≥ 8) of lane
// (row % 8, (k % 8) / 2) for A and register (k ≥ 8) of lane (column % 8, (k % 8) / 2) for B,
// the even k in the low half (the lower-numbered element, as the PTX ISA packs them).
template <int PREC>
__device__ __forceinline__ int tc_slot_a(int mm, int kk) {
    const int i = mm >> 4, mr = mm & 15;
    if (PREC == PREC_TF32) {
        const int s = kk >> 3, kr = kk & 7;
        const int lane = (mr & 7) * 4 + (kr & 3), reg = (mr >> 3) + 2 * (kr >> 2);
        return ((s * 4 + i) * 32 + lane) * 4 + reg;
    }
    const int lane = (mr & 7) * 4 + ((kk & 7) >> 1), reg = (mr >> 3) + 2 * (kk >> 3);
    return ((i * 32 + lane) * 4 + reg) * 2 + (kk & 1);
}
template <int PREC>
__device__ __forceinline__ int tc_slot_b(int kk, int nn) {
    const int j = nn >> 3;
    if (PREC == PREC_TF32) {
        const int s = kk >> 3, kr = kk & 7;
        const int lane = (nn & 7) * 4 + (kr & 3), reg = kr >> 2;
        return ((s * 8 + j) * 32 + lane) * 2 + reg;
    }
    const int lane = (nn & 7) * 4 + ((kk & 7) >> 1), reg = kk >> 3;
    return ((j * 32 + lane) * 2 + reg) * 2 + (kk & 1);
}

// One staged operand value at shared slot `slot` of `buf`: a TF32 word, or a BF16 half-word.
template <int PREC>
__device__ __forceinline__ void tc_store(unsigned* buf, int slot, float x) {
    if (PREC == PREC_TF32) buf[slot] = cvt_tf32(x);
    else reinterpret_cast<unsigned short*>(buf)[slot] = (unsigned short)(cvt_bf16_hi(x) >> 16);
}

// Words of one staged operand tile: 64 × TILE_K TF32 words (BF16 uses half of them).
#define TC_TILE_WORDS (TILE_M * TILE_K)

template <int PREC, bool AK, bool BK, class LA, class LB, class ST>
__device__ __forceinline__ void tile_gemm_mma_loop(int M, int N, int k_begin, int k_end, const LA& la, const LB& lb,
                                                   const ST& st, unsigned (&As)[2][TC_TILE_WORDS],
                                                   unsigned (&Bs)[2][TC_TILE_WORDS]) {
    // Each thread stages the elements tile_gemm's threads do (Staging): fixed per thread, so
    // their shared slots are worked out once per block.
    using SA = Staging<TILE_M, TILE_THREADS, AK>;
    using SB = Staging<TILE_N, TILE_THREADS, BK>;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = lane / 4, t = lane % 4;
    // This warp's 32 × 16 block of C: row blocks fi, fi + 1 (of 16) and column blocks fj, fj + 1
    // (of 8).
    const int fi = (warp / 4) * 2, fj = (warp % 4) * 2;
    const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;
    float acc[2][2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    int slot_a[SA::R], slot_b[SB::R];
#pragma unroll
    for (int r = 0; r < SA::R; ++r) slot_a[r] = tc_slot_a<PREC>(SA::mn(tid, r), SA::kk(tid, r));
#pragma unroll
    for (int r = 0; r < SB::R; ++r) slot_b[r] = tc_slot_b<PREC>(SB::kk(tid, r), SB::mn(tid, r));
    // The prefetch registers: this thread's elements of the next tile, loaded before the
    // current tile's mma and stored (rounded) after them, into the buffer not being read.
    float ra[SA::R], rb[SB::R];
    auto prefetch = [&](int k0) {
#pragma unroll
        for (int r = 0; r < SA::R; ++r) {
            const int gm = m0 + SA::mn(tid, r), gk = k0 + SA::kk(tid, r);
            const bool inside = gm < M && gk < k_end;
            ra[r] = inside ? la(gm, gk) : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < SB::R; ++r) {
            const int gn = n0 + SB::mn(tid, r), gk = k0 + SB::kk(tid, r);
            const bool inside = gn < N && gk < k_end;
            rb[r] = inside ? lb(gk, gn) : 0.0f;
        }
    };
    auto stage_into = [&](int buf) {
#pragma unroll
        for (int r = 0; r < SA::R; ++r) tc_store<PREC>(As[buf], slot_a[r], ra[r]);
#pragma unroll
        for (int r = 0; r < SB::R; ++r) tc_store<PREC>(Bs[buf], slot_b[r], rb[r]);
    };

    const int tiles = k_end > k_begin ? (k_end - k_begin + TILE_K - 1) / TILE_K : 0;
    if (tiles > 0) {
        prefetch(k_begin);
        stage_into(0);
    }
    __syncthreads();
    for (int tile = 0; tile < tiles; ++tile) {
        const int buf = tile & 1;
        const bool more = tile + 1 < tiles;
        if (more) prefetch(k_begin + (tile + 1) * TILE_K);
        // K-slices of the tile: two of 8 (TF32), one of 16 (BF16).
#pragma unroll
        for (int s = 0; s < (PREC == PREC_TF32 ? 2 : 1); ++s) {
            unsigned a[2][4], b[2][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const uint4 q = *reinterpret_cast<const uint4*>(&As[buf][((s * 4 + fi + i) * 32 + lane) * 4]);
                a[i][0] = q.x, a[i][1] = q.y, a[i][2] = q.z, a[i][3] = q.w;
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const uint2 q = *reinterpret_cast<const uint2*>(&Bs[buf][((s * 8 + fj + j) * 32 + lane) * 2]);
                b[j][0] = q.x, b[j][1] = q.y;
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    if (PREC == PREC_TF32) mma_tf32(acc[i][j], a[i], b[j], acc[i][j]);
                    else mma_bf16(acc[i][j], a[i], b[j], acc[i][j]);
                }
        }
        // The buffer written here was last read before the previous barrier.
        if (more) stage_into(buf ^ 1);
        __syncthreads();
    }
    // c0..c3 of fragment (i, j): C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int m = m0 + (fi + i) * 16 + g + 8 * (r / 2), n = n0 + (fj + j) * 8 + 2 * t + r % 2;
                if (m < M && n < N) st(m, n, acc[i][j][r]);
            }
}

template <int PREC, class LA, class LB, class ST>
__device__ __forceinline__ void tile_gemm_mma(int M, int N, int k_begin, int k_end, const LA& la, const LB& lb,
                                              const ST& st) {
    // Declared once here, not in the loop's three instantiations (each would get its own).
    __shared__ __align__(16) unsigned As[2][TC_TILE_WORDS];
    __shared__ __align__(16) unsigned Bs[2][TC_TILE_WORDS];
    // k_fast picks the staging order once per block (a constant for the convolution loaders);
    // the pair no caller makes shares the m-n copy, as in tile_gemm.
    if (la.k_fast) {
        if (lb.k_fast) tile_gemm_mma_loop<PREC, true, true>(M, N, k_begin, k_end, la, lb, st, As, Bs);
        else           tile_gemm_mma_loop<PREC, true, false>(M, N, k_begin, k_end, la, lb, st, As, Bs);
    } else {
        tile_gemm_mma_loop<PREC, false, false>(M, N, k_begin, k_end, la, lb, st, As, Bs);
    }
}

// The FP32/FP64 tile engine of one tile shape, as a type the kernel templates take (so one
// template serves every tile shape and the tensor-core engines).
template <typename T, int TM_, int TN_>
struct FmaEngine {
    static constexpr int TM = TM_, TN = TN_;
    template <class LA, class LB, class ST>
    static __device__ __forceinline__ void run(int M, int N, int kb, int ke, const LA& la, const LB& lb,
                                               const ST& st) {
        tile_gemm<T, TM_, TN_>(M, N, kb, ke, la, lb, st);
    }
};

// The tile engine a tensor-core kernel runs: mma.sync for float. f64 has no tensor-core path:
// the table instantiates every kernel for both types, but the backend launches these only from
// f32 backends (`Cuda::with_precision` refuses an f64 one), so the f64 symbols are left empty
// rather than compiled again as copies of the FP64 64 × 64 tile (NVRTC time, every CI run).
template <typename T, int PREC>
struct TcEngine {
    static constexpr int TM = TILE_M, TN = TILE_N;
    template <class LA, class LB, class ST>
    static __device__ __forceinline__ void run(int, int, int, int, const LA&, const LB&, const ST&) {}
};
template <int PREC>
struct TcEngine<float, PREC> {
    static constexpr int TM = TILE_M, TN = TILE_N;
    template <class LA, class LB, class ST>
    static __device__ __forceinline__ void run(int M, int N, int kb, int ke, const LA& la, const LB& lb,
                                               const ST& st) {
        tile_gemm_mma<PREC>(M, N, kb, ke, la, lb, st);
    }
};

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
