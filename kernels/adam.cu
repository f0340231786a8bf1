// One Adam/AdamW step in place, operation for operation as AdamStep::apply in
// src/ops/adam.rs. The host converts every constant to T first (as E::of does on the CPU).
// `adam` updates one tensor; `adam_multi` every parameter of a model in one launch, from a
// table of their addresses; `zero_multi` zeroes every gradient in one launch; `pack3` puts
// a step's three loss scalars side by side so the host reads them in one copy.
#include "common.cuh"

// AdamArgs<T> (the contract): mode ADAM_L2 adds wd·p to the gradient, ADAM_DECOUPLED scales
// p by decay_factor = 1 − lr·wd first (AdamW). One element; both kernels call this, so the
// one-tensor and the all-tensor steps cannot drift apart.
template <typename T>
__device__ __forceinline__ void adam_element(const AdamArgs<T>& a, T* p, const T* g, T* m, T* v, long long i) {
    T pi = p[i], gi = g[i];
    if (a.mode == ADAM_DECOUPLED) pi *= a.decay_factor;
    else if (a.mode == ADAM_L2) gi += pi * a.weight_decay;
    const T mi = a.beta1 * m[i] + a.one_minus_beta1 * gi;
    const T vi = a.beta2 * v[i] + a.one_minus_beta2 * gi * gi;
    const T denom = sqrt_t(vi) / a.bc2_sqrt + a.eps;
    p[i] = pi - a.step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
}

template <typename T>
__device__ void adam_impl(AdamArgs<T> a, T* p, const T* g, T* m, T* v) {
    GRID_STRIDE(i, a.n) { adam_element(a, p, g, m, v, i); }
}

// The entry of a multi-tensor table that block `b` works on: the last whose first block is
// at most b (entries are in order of first block, one per tensor: a few dozen at most, so a
// linear scan). Every entry starts with its first block and its length.
__device__ __forceinline__ const unsigned long long* table_entry(const unsigned long long* table, int entries,
                                                                 int words, unsigned long long b) {
    int e = 0;
    while (e + 1 < entries && table[(long long)(e + 1) * words] <= b) ++e;
    return table + (long long)e * words;
}

// The chunk of its tensor that this block covers: [begin, end).
__device__ __forceinline__ void block_chunk(const unsigned long long* entry, long long* begin, long long* end) {
    const long long n = (long long)entry[1];
    *begin = ((long long)blockIdx.x - (long long)entry[0]) * MULTI_CHUNK;
    *end = *begin + MULTI_CHUNK < n ? *begin + MULTI_CHUNK : n;
}

// Every tensor of `table` (ADAM_TABLE_WORDS words each: first block, length, p, g, m, v),
// one block per MULTI_CHUNK elements. The step's constants come from device memory (`args`,
// written by the host before the launch), so the launch's parameters do not change from
// step to step. `guard` is the step's loss: when it is not finite (NaN or ±∞) no block
// changes anything, and the host, reading the loss after the step, reports it. `elems` (all
// tensors' elements) is there for the launch trace, which prices the launch by it.
template <typename T>
__device__ void adam_multi_impl(const AdamArgs<T>* args, const unsigned long long* table, int tensors, int elems,
                                const T* guard) {
    (void)elems;
    // x − x is 0 for every finite x and NaN for NaN and ±∞ (no fast math here).
    const T loss = guard[0];
    if (!(loss - loss == T(0))) return;
    const AdamArgs<T> a = *args;
    const unsigned long long* e = table_entry(table, tensors, ADAM_TABLE_WORDS, blockIdx.x);
    T* p = (T*)e[2];
    const T* g = (const T*)e[3];
    T* m = (T*)e[4];
    T* v = (T*)e[5];
    long long begin, end;
    block_chunk(e, &begin, &end);
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) adam_element(a, p, g, m, v, i);
}

// Zeroes every buffer of `table` (ZERO_TABLE_WORDS words each: first block, length, address),
// one block per MULTI_CHUNK elements: the gradients before a step's backward adds into them.
template <typename T>
__device__ void zero_multi_impl(const unsigned long long* table, int buffers, int elems) {
    (void)elems;
    const unsigned long long* e = table_entry(table, buffers, ZERO_TABLE_WORDS, blockIdx.x);
    T* y = (T*)e[2];
    long long begin, end;
    block_chunk(e, &begin, &end);
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) y[i] = T(0);
}

#define FILE_KERNELS(T, S)                                                                           \
    extern "C" __global__ void adam_##S(AdamArgs<T> a, T* p, const T* g, T* m, T* v) {               \
        adam_impl<T>(a, p, g, m, v);                                                                 \
    }                                                                                                \
    extern "C" __global__ void adam_multi_##S(const AdamArgs<T>* args, const unsigned long long* table, \
                                              int tensors, int elems, const T* guard) {              \
        adam_multi_impl<T>(args, table, tensors, elems, guard);                                      \
    }                                                                                                \
    extern "C" __global__ void zero_multi_##S(const unsigned long long* table, int buffers, int elems) { \
        zero_multi_impl<T>(table, buffers, elems);                                                   \
    }                                                                                                \
    extern "C" __global__ void pack3_##S(const T* a, const T* b, const T* c, T* out) {               \
        if (blockIdx.x == 0 && threadIdx.x == 0) {                                                   \
            out[0] = a[0];                                                                           \
            out[1] = b[0];                                                                           \
            out[2] = c[0];                                                                           \
        }                                                                                            \
    }

FILE_KERNELS(float, f32)
FILE_KERNELS(double, f64)
