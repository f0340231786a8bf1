//! The kernel table: every kernel the backend launches, the file that defines it and its
//! parameter list, written once. From it come
//! - the typed launch methods of [`Launcher`] (one per kernel; the compiler checks every call),
//! - the `extern "C"` declarations in the prelude of every kernel file ([`declarations`]), so a
//!   `.cu` definition whose parameters differ from this table fails to compile,
//! - the list of `<name>_f32`/`<name>_f64` symbols each file must define (the NVRTC test and
//!   the emulated device's host build use it).
//!
//! Kernels are looked up once at start-up into a vector indexed by [`Kernel`]; no launch looks
//! a name up. The launch geometry helpers (`cfg_1d`, `cfg_tiles`, `split_k`) live here too.

use std::fmt::Write;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg};

use super::contract::{AdamArgs, BnArgs, ConvArgs, GemmArgs, BLOCK, TILE_K, TILE_M, TILE_N, TILE_THREADS};
use super::{trace, CudaFloat};

/// What one kernel parameter is, on both sides.
macro_rules! rust_param {
    (In) => { &CudaSlice<E> };
    (Out) => { &mut CudaSlice<E> };
    (InOpt) => { Option<&CudaSlice<E>> };
    (OutOpt) => { Option<&mut CudaSlice<E>> };
    (InAcc) => { &CudaSlice<f64> };
    (OutAcc) => { &mut CudaSlice<f64> };
    (InIdx) => { &CudaSlice<u32> };
    (InBytes) => { &CudaSlice<u8> };
    (Int) => { i32 };
    (Elem) => { E };
    (F64) => { f64 };
    (Gemm) => { GemmArgs };
    (Conv) => { ConvArgs };
    (Bn) => { BnArgs };
    (Adam) => { AdamArgs<E> };
}
macro_rules! c_param {
    (In) => {
        "const T*"
    };
    (Out) => {
        "T*"
    };
    (InOpt) => {
        "const T*"
    };
    (OutOpt) => {
        "T*"
    };
    (InAcc) => {
        "const acc_t*"
    };
    (OutAcc) => {
        "acc_t*"
    };
    (InIdx) => {
        "const unsigned*"
    };
    (InBytes) => {
        "const unsigned char*"
    };
    (Int) => {
        "int"
    };
    (Elem) => {
        "T"
    };
    (F64) => {
        "double"
    };
    (Gemm) => {
        "GemmArgs"
    };
    (Conv) => {
        "ConvArgs"
    };
    (Bn) => {
        "BnArgs"
    };
    (Adam) => {
        "AdamArgs<T>"
    };
}
/// Pushes one argument: device slices by their pointer, absent optional ones as a null pointer
/// (the kernels test for it and never touch it), values by reference.
macro_rules! push_param {
    ($b:ident, $null:ident, In, $p:ident) => {
        $b.arg($p)
    };
    ($b:ident, $null:ident, Out, $p:ident) => {
        $b.arg($p)
    };
    ($b:ident, $null:ident, InAcc, $p:ident) => {
        $b.arg($p)
    };
    ($b:ident, $null:ident, OutAcc, $p:ident) => {
        $b.arg($p)
    };
    ($b:ident, $null:ident, InIdx, $p:ident) => {
        $b.arg($p)
    };
    ($b:ident, $null:ident, InBytes, $p:ident) => {
        $b.arg($p)
    };
    ($b:ident, $null:ident, InOpt, $p:ident) => {
        match $p {
            Some(s) => $b.arg(s),
            None => $b.arg(&$null),
        }
    };
    ($b:ident, $null:ident, OutOpt, $p:ident) => {
        match $p {
            Some(s) => $b.arg(s),
            None => $b.arg(&$null),
        }
    };
    ($b:ident, $null:ident, $other:ident, $p:ident) => {
        $b.arg(&$p)
    };
}

/// What the launch trace records of one argument (see [`super::trace::Arg`]).
macro_rules! trace_param {
    (In, $p:ident) => {
        trace::Arg::Buf { elems: $p.len(), elem_bytes: std::mem::size_of::<E>() }
    };
    (Out, $p:ident) => {
        trace::Arg::Buf { elems: $p.len(), elem_bytes: std::mem::size_of::<E>() }
    };
    (InAcc, $p:ident) => {
        trace::Arg::Buf { elems: $p.len(), elem_bytes: 8 }
    };
    (OutAcc, $p:ident) => {
        trace::Arg::Buf { elems: $p.len(), elem_bytes: 8 }
    };
    (InIdx, $p:ident) => {
        trace::Arg::Buf { elems: $p.len(), elem_bytes: 4 }
    };
    (InBytes, $p:ident) => {
        trace::Arg::Buf { elems: $p.len(), elem_bytes: 1 }
    };
    (InOpt, $p:ident) => {
        $p.as_ref()
            .map_or(trace::Arg::Null, |s| trace::Arg::Buf { elems: s.len(), elem_bytes: std::mem::size_of::<E>() })
    };
    (OutOpt, $p:ident) => {
        $p.as_ref()
            .map_or(trace::Arg::Null, |s| trace::Arg::Buf { elems: s.len(), elem_bytes: std::mem::size_of::<E>() })
    };
    (Int, $p:ident) => {
        trace::Arg::Int($p)
    };
    (Elem, $p:ident) => {
        trace::Arg::Float(crate::tensor::Float::f64($p))
    };
    (F64, $p:ident) => {
        trace::Arg::Float($p)
    };
    (Gemm, $p:ident) => {
        trace::Arg::Gemm($p)
    };
    (Conv, $p:ident) => {
        trace::Arg::Conv($p)
    };
    (Bn, $p:ident) => {
        trace::Arg::Bn($p)
    };
    (Adam, $p:ident) => {
        trace::Arg::Adam { n: $p.n }
    };
}

macro_rules! kernel_table {
    ($($file:literal { $($variant:ident $name:ident ($($p:ident: $kind:ident),*);)* })*) => {
        /// Every kernel, in table order (the index into the loaded functions).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Kernel { $($(#[doc = concat!("`", stringify!($name), "` (kernels/", $file, ").")] $variant),*),* }

        /// One kernel of the table.
        #[derive(Debug)]
        pub struct KernelSpec {
            /// Base name; the files define `<name>_f32` and `<name>_f64`.
            pub name: &'static str,
            /// The file under `kernels/` that defines it.
            pub file: &'static str,
            /// (parameter name, CUDA type with `T` for the element type).
            pub params: &'static [(&'static str, &'static str)],
        }

        /// The table itself, in [`Kernel`] order: what the loader looks up (`<name>_f32` or
        /// `<name>_f64` in `file`'s module), what [`declarations`] renders and what
        /// [`symbols_in`] lists.
        pub const KERNELS: &[KernelSpec] = &[$($(
            KernelSpec { name: stringify!($name), file: $file, params: &[$((stringify!($p), c_param!($kind))),*] }
        ),*),*];

        impl<E: CudaFloat> Launcher<E> {
            $($(
                #[doc = concat!("Launches `", stringify!($name), "` (kernels/", $file, ").")]
                #[allow(clippy::too_many_arguments)]
                pub fn $name(&self, cfg: LaunchConfig, $($p: rust_param!($kind)),*) -> Result<(), DriverError> {
                    if trace::on() {
                        let args = vec![$(trace_param!($kind, $p)),*];
                        trace::push(|| trace::EventKind::Launch(trace::Launch {
                            kernel: Kernel::$variant,
                            grid: [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2],
                            block: [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2],
                            dynamic_shared_bytes: cfg.shared_mem_bytes,
                            elem_bytes: std::mem::size_of::<E>(),
                            args,
                        }));
                    }
                    let null: u64 = 0;
                    let _ = &null;
                    let mut b = self.stream.launch_builder(&self.funcs[Kernel::$variant as usize]);
                    $(push_param!(b, null, $kind, $p);)*
                    // SAFETY: the argument list is the kernel's parameter list from the table,
                    // which the prelude declares and the .cu definition must match (NVRTC
                    // rejects a mismatch); callers check that every buffer covers the index
                    // range the kernel touches for the dims passed.
                    unsafe { b.launch(cfg) }.map(|_| ())
                }
            )*)*
        }
    };
}

kernel_table! {
    "gemm.cu" {
        Gemm gemm(g: Gemm, a: In, b: In, c: Out, bias: InOpt);
        GemmSplitK gemm_splitk(g: Gemm, a: In, b: In, part: Out);
        SplitKReduce splitk_reduce(part: In, splits: Int, len: Int, c: Out, accumulate: Int);
    }
    "conv2d.cu" {
        ConvFwd conv2d_fwd(a: Conv, x: In, w: In, b: InOpt, y: Out);
        ConvBwdData conv2d_bwd_data(a: Conv, dy: In, w: In, dx: Out);
        ConvBwdWeight conv2d_bwd_weight(a: Conv, dy: In, x: In, part: Out);
    }
    "batchnorm.cu" {
        BnStatsPartial bn_stats_partial(a: Bn, x: In, part: OutAcc);
        BnFwdApply bn_fwd_apply(a: Bn, act: Int, slope: Elem, x: In, gamma: In, beta: In, part: InAcc, y: Out,
                                save_mean: Out, save_invstd: Out, running_mean: Out, running_var: Out);
        BnFwdEval bn_fwd_eval(a: Bn, act: Int, slope: Elem, x: In, gamma: In, beta: In, rm: In, rv: In, y: Out);
        BnBwdPartial bn_bwd_partial(a: Bn, act: Int, slope: Elem, dy: In, y: InOpt, x: In, mean: In, invstd: In,
                                    part: OutAcc);
        BnBwdApply bn_bwd_apply(a: Bn, act: Int, slope: Elem, dy: In, y: InOpt, x: In, gamma: In, mean: In,
                                invstd: In, part: InAcc, dx: OutOpt, dgamma: OutOpt, dbeta: OutOpt);
    }
    "elementwise.cu" {
        UnaryFwd unary_fwd(op: Int, slope: Elem, x: In, y: Out, n: Int);
        UnaryBwd unary_bwd(op: Int, slope: Elem, x: In, y: In, dy: In, dx: Out, n: Int);
        Mul mul(a: In, b: In, y: Out, n: Int);
        MulAcc mul_acc(a: In, b: In, y: Out, n: Int);
        Axpy axpy(alpha: Elem, x: In, y: Out, n: Int);
        Fill fill(y: Out, v: Elem, n: Int);
        BroadcastAcc broadcast_acc(dout: In, alpha: Elem, dx: Out, n: Int);
        GatherRows gather_rows(src: In, idx: InIdx, row_len: Int, dst: Out, n: Int);
        GatherRowsU8 gather_rows_u8(src: InBytes, idx: InIdx, row_len: Int, dst: Out, n: Int);
        BiasAdd bias_add(y: Out, b: In, channels: Int, inner: Int, n: Int);
        BiasBwd bias_bwd(dy: In, part: OutAcc, db: Out, outer: Int, channels: Int, inner: Int, chunk: Int);
        ChunkSum chunk_sum(part: InAcc, chunks: Int, channels: Int, out: Out);
        SumPartial sum_partial(x: In, n: Int, part: OutAcc);
        ReduceFinal reduce_final(part: InAcc, g: Int, scale: F64, out: Out);
        FmaPeak fma_peak(out: Out, iters: Int, seed: Elem);
    }
    "vae_loss.cu" {
        ReparamKlFwd reparam_kl_fwd(mu: In, logvar: In, eps: In, z: Out, n: Int, part: OutAcc);
        ReparamBwdMu reparam_bwd_mu(mu: In, dz: InOpt, dkl: InOpt, dmu: Out, n: Int);
        ReparamBwdLogvar reparam_bwd_logvar(logvar: In, eps: In, dz: InOpt, dkl: InOpt, dlv: Out, n: Int);
        LossFwd loss_fwd(kind: Int, x: In, t: In, n: Int, part: OutAcc);
        LossBwd loss_bwd(kind: Int, x: In, t: In, dout: In, dx: Out, n: Int);
    }
    "adam.cu" {
        Adam adam(a: Adam, p: Out, g: In, m: Out, v: Out);
    }
}

/// The loaded kernels of one element type, on the backend's stream.
pub struct Launcher<E: CudaFloat> {
    pub(crate) stream: std::sync::Arc<CudaStream>,
    /// Indexed by `Kernel`.
    pub(crate) funcs: Vec<CudaFunction>,
    pub(crate) _e: std::marker::PhantomData<E>,
}

/// The element types every kernel is instantiated for: (symbol suffix, CUDA type).
pub const ELEMENT_TYPES: [(&str, &str); 2] = [("f32", "float"), ("f64", "double")];

/// The kernels `file` defines.
pub fn kernels_in(file: &str) -> impl Iterator<Item = &'static KernelSpec> + '_ {
    KERNELS.iter().filter(move |k| k.file == file)
}

/// The `extern "C"` symbols `file` must define: `<name>_f32` and `<name>_f64` for each kernel.
pub fn symbols_in(file: &str) -> Vec<String> {
    kernels_in(file).flat_map(|k| ELEMENT_TYPES.map(|(suffix, _)| format!("{}_{suffix}", k.name))).collect()
}

/// The declaration of every kernel of `file`, for both element types: pasted after the contract
/// in front of the file, so its definitions must match the table.
pub fn declarations(file: &str) -> String {
    let mut s = String::from("// Kernel signatures, generated from src/backend/cuda/kernels.rs.\n");
    for k in kernels_in(file) {
        for (suffix, ty) in ELEMENT_TYPES {
            let params: Vec<String> = k
                .params
                .iter()
                .map(|(name, cty)| format!("{} {name}", cty.replace("<T>", &format!("<{ty}>")).replacen('T', ty, 1)))
                .collect();
            let _ = writeln!(s, "extern \"C\" __global__ void {}_{suffix}({});", k.name, params.join(", "));
        }
    }
    s
}

// ---- launch geometry ----

/// Most blocks a 1-D grid-stride launch uses; its loop covers the rest.
const MAX_1D_BLOCKS: usize = 8192;
/// Most blocks of stage 1 of a reduction.
const MAX_REDUCE_BLOCKS: usize = 1024;

/// Grid-stride elementwise launch: enough blocks to cover n once, capped (the loop covers
/// the rest).
pub fn cfg_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_1D_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Blocks of stage 1 of a deterministic reduction over n values: a function of n only.
pub fn reduce_blocks(n: usize) -> usize {
    n.div_ceil(BLOCK as usize).clamp(1, MAX_REDUCE_BLOCKS)
}

/// `blocks` blocks of BLOCK threads.
pub fn cfg_blocks(blocks: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// A grid of (chunks, channels) blocks of BLOCK threads: the per-channel reductions.
pub fn cfg_channel_chunks(chunks: usize, channels: usize) -> LaunchConfig {
    assert!(channels <= 65535, "a per-channel reduction over more than 65535 channels");
    LaunchConfig { grid_dim: (chunks as u32, channels as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The SMs of the GPU the chunked reductions are shaped for (an H100's or H200's 132). A
/// constant, never the device's count: the split, and so every sum, must be the same on any
/// GPU (see `channel_chunks`).
pub const REDUCE_SMS: usize = 132;
/// Fewest values in a chunk of a per-channel reduction: two per thread, so a block's fixed
/// cost (stage 2's merge of the partials, two barriers) stays small against its loads.
const MIN_CHUNK: usize = 2 * BLOCK as usize;
/// Most chunks per channel: enough for one channel alone to fill REDUCE_SMS SMs; stage 2
/// merges a channel's partials in every block (eight per lane of one warp at most).
pub const MAX_CHUNKS: usize = 256;

/// How to cut each of `channels` per-channel reductions of m values (batch norm's statistics
/// and backward, a bias gradient) into chunks for a grid of (chunks, channels) blocks:
/// (chunks, values per chunk; the last one ragged). Depends on the shapes only. Of the chunk
/// counts that keep chunks at least MIN_CHUNK long (and at most MAX_CHUNKS of them), one whose
/// grid has at least REDUCE_SMS blocks if any does, and of those the one that keeps the SMs
/// busiest (blocks / (SMs · ⌈blocks / SMs⌉), every block the same work), the fewest chunks
/// among equals. One channel of a few values gets one chunk.
pub fn channel_chunks(channels: usize, m: usize) -> (usize, usize) {
    let most = (m / MIN_CHUNK).clamp(1, MAX_CHUNKS);
    let score = |k: usize| {
        let blocks = channels.max(1) * k;
        let fill = blocks as f64 / (REDUCE_SMS * blocks.div_ceil(REDUCE_SMS)) as f64;
        (blocks >= REDUCE_SMS, fill)
    };
    let mut best = 1;
    for k in 2..=most {
        let ((wave, fill), (best_wave, best_fill)) = (score(k), score(best));
        if (wave && !best_wave) || (wave == best_wave && fill > best_fill + 1e-9) {
            best = k;
        }
    }
    let len = m.div_ceil(best).max(1);
    (m.div_ceil(len).max(1), len)
}

/// Tile grid of an M × N GEMM with `splits` K-chunks.
pub fn cfg_tiles(m: usize, n: usize, splits: usize) -> LaunchConfig {
    let (gx, gy) = (n.div_ceil(TILE_N), m.div_ceil(TILE_M));
    assert!(gy <= 65535 && splits <= 65535, "GEMM grid too large");
    LaunchConfig {
        grid_dim: (gx as u32, gy as u32, splits as u32),
        block_dim: (TILE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// How to cut a reduction of length k for an m × n output into deterministic chunks:
/// (number of chunks, chunk length, a multiple of TILE_K). Depends on the dims only, never
/// on the device, so results are the same bitwise on every GPU. Few output tiles and a long
/// reduction (weight gradients over a batch) get more chunks, each at least 512 long.
pub fn split_k(m: usize, n: usize, k: usize) -> (usize, usize) {
    let tiles = m.div_ceil(TILE_M) * n.div_ceil(TILE_N);
    let wanted = 256usize.div_ceil(tiles.max(1));
    let splits = wanted.min((k / 512).max(1)).clamp(1, 64);
    let kc = k.div_ceil(splits).max(1).next_multiple_of(TILE_K);
    (k.div_ceil(kc).max(1), kc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_k_covers_the_reduction() {
        for &(m, n, k) in &[(32, 9, 100352), (784, 400, 128), (1, 1, 1), (64, 64, 0), (20, 400, 128), (3, 5, 17)] {
            let (s, kc) = split_k(m, n, k);
            assert!(s >= 1 && kc % TILE_K == 0 && kc >= 1);
            // Every chunk starts inside [0, k) (or there is one chunk) and together they cover it.
            assert!(s * kc >= k && (s == 1 || (s - 1) * kc < k), "{m}x{n}x{k}: {s} × {kc}");
        }
    }

    #[test]
    fn channel_chunks_cover_each_channel_and_fill_the_gpu() {
        for &(channels, m) in
            &[(32, 128 * 196), (64, 128 * 49), (128, 128 * 16), (2, 3 * 700), (300, 21), (1, 1), (5, 0), (400, 128)]
        {
            let (k, len) = channel_chunks(channels, m);
            assert!((1..=MAX_CHUNKS).contains(&k) && len >= 1, "{channels}x{m}: {k} × {len}");
            // Every chunk starts inside [0, m) (or there is one) and together they cover it.
            assert!(k * len >= m && (k == 1 || (k - 1) * len < m), "{channels}x{m}: {k} × {len}");
            assert!(k == 1 || len >= MIN_CHUNK - 1, "{channels}x{m}: chunks of {len}");
        }
        // The conv-bn VAE's layers at batch 128: at least one full wave of 132 SMs, even for a
        // lone channel.
        assert_eq!(channel_chunks(32, 128 * 196), (33, 761));
        assert_eq!(channel_chunks(1, 128 * 784), (132, 761));
        let (k, _) = channel_chunks(64, 128 * 49);
        assert!(64 * k >= REDUCE_SMS, "{k}");
    }

    #[test]
    fn declarations_spell_both_element_types() {
        let d = declarations("adam.cu");
        assert!(d.contains("extern \"C\" __global__ void adam_f32(AdamArgs<float> a, float* p, const float* g, float* m, float* v);"), "{d}");
        assert!(d.contains("void adam_f64(AdamArgs<double> a, double* p, const double* g"), "{d}");
        let d = declarations("elementwise.cu");
        assert!(d.contains("void reduce_final_f32(const acc_t* part, int g, double scale, float* out);"), "{d}");
        assert_eq!(
            symbols_in("gemm.cu"),
            ["gemm_f32", "gemm_f64", "gemm_splitk_f32", "gemm_splitk_f64", "splitk_reduce_f32", "splitk_reduce_f64"]
        );
    }
}
