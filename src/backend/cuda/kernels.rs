//! The kernel table: every kernel the backend launches, the file that defines it and its
//! parameter list, written once. From it come
//! - the typed launch methods of [`Launcher`] (one per kernel; the compiler checks every call),
//! - the `extern "C"` declarations in the prelude of every kernel file ([`declarations`]), so a
//!   `.cu` definition whose parameters differ from this table fails to compile,
//! - the list of `<name>_f32`/`<name>_f64` symbols each file must define (the NVRTC test and
//!   the emulated device's host build use it).
//!
//! A kernel is looked up by name once, at its first launch, into a slot indexed by [`Kernel`];
//! later launches look nothing up. The launch geometry helpers (`cfg_1d`, `cfg_tiles`,
//! `split_k`) live here too.

use std::fmt::Write;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};

use super::contract::{
    AdamArgs, BnArgs, ConvArgs, GemmArgs, BLOCK, TILE_K, TILE_M, TILE_N, TILE_SMALL, TILE_SMALL_THREADS, TILE_THREADS,
};
use super::{compile, trace, CudaFloat, GpuError};

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
    (InAdam) => { &CudaSlice<AdamArgs<E>> };
    (InWords) => { &CudaSlice<u64> };
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
    (InAdam) => {
        "const AdamArgs<T>*"
    };
    (InWords) => {
        "const unsigned long long*"
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
    ($b:ident, $null:ident, InAdam, $p:ident) => {
        $b.arg($p)
    };
    ($b:ident, $null:ident, InWords, $p:ident) => {
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
    (InAdam, $p:ident) => {
        trace::Arg::Buf { elems: $p.len(), elem_bytes: std::mem::size_of::<AdamArgs<E>>() }
    };
    (InWords, $p:ident) => {
        trace::Arg::Buf { elems: $p.len(), elem_bytes: 8 }
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

        /// Every kernel, in table order ([`KERNELS`]'s order).
        pub const ALL_KERNELS: &[Kernel] = &[$($(Kernel::$variant),*),*];

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
                    let mut b = self.stream.launch_builder(self.function(Kernel::$variant));
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
        GemmM16 gemm_m16(g: Gemm, a: In, b: In, c: Out, bias: InOpt);
        GemmSplitKM16 gemm_splitk_m16(g: Gemm, a: In, b: In, part: Out);
        GemmN16 gemm_n16(g: Gemm, a: In, b: In, c: Out, bias: InOpt);
        GemmSplitKN16 gemm_splitk_n16(g: Gemm, a: In, b: In, part: Out);
        GemmTf32 gemm_tf32(g: Gemm, a: In, b: In, c: Out, bias: InOpt);
        GemmSplitKTf32 gemm_splitk_tf32(g: Gemm, a: In, b: In, part: Out);
        GemmBf16 gemm_bf16(g: Gemm, a: In, b: In, c: Out, bias: InOpt);
        GemmSplitKBf16 gemm_splitk_bf16(g: Gemm, a: In, b: In, part: Out);
        SplitKReduce splitk_reduce(part: In, splits: Int, len: Int, c: Out, accumulate: Int);
        SplitKReduceBias splitk_reduce_bias(part: In, splits: Int, rows: Int, cols: Int, c: Out, bias: In);
    }
    "conv2d.cu" {
        ConvFwd conv2d_fwd(a: Conv, x: In, w: In, b: InOpt, y: Out);
        ConvBwdData conv2d_bwd_data(a: Conv, dy: In, w: In, dx: Out);
        ConvBwdWeight conv2d_bwd_weight(a: Conv, dy: In, x: In, part: Out);
        ConvFwdM16 conv2d_fwd_m16(a: Conv, x: In, w: In, b: InOpt, y: Out);
        ConvBwdDataM16 conv2d_bwd_data_m16(a: Conv, dy: In, w: In, dx: Out);
        ConvBwdWeightM16 conv2d_bwd_weight_m16(a: Conv, dy: In, x: In, part: Out);
        ConvFwdN16 conv2d_fwd_n16(a: Conv, x: In, w: In, b: InOpt, y: Out);
        ConvBwdDataN16 conv2d_bwd_data_n16(a: Conv, dy: In, w: In, dx: Out);
        ConvBwdWeightN16 conv2d_bwd_weight_n16(a: Conv, dy: In, x: In, part: Out);
        ConvFwdTf32 conv2d_fwd_tf32(a: Conv, x: In, w: In, b: InOpt, y: Out);
        ConvBwdDataTf32 conv2d_bwd_data_tf32(a: Conv, dy: In, w: In, dx: Out);
        ConvBwdWeightTf32 conv2d_bwd_weight_tf32(a: Conv, dy: In, x: In, part: Out);
        ConvFwdBf16 conv2d_fwd_bf16(a: Conv, x: In, w: In, b: InOpt, y: Out);
        ConvBwdDataBf16 conv2d_bwd_data_bf16(a: Conv, dy: In, w: In, dx: Out);
        ConvBwdWeightBf16 conv2d_bwd_weight_bf16(a: Conv, dy: In, x: In, part: Out);
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
        AdamMulti adam_multi(args: InAdam, table: InWords, tensors: Int, elems: Int, guard: In);
        ZeroMulti zero_multi(table: InWords, buffers: Int, elems: Int);
        Pack3 pack3(a: In, b: In, c: In, out: Out);
    }
    "rng.cu" {
        PhiloxNormal philox_normal(y: Out, n: Int, key0: Int, key1: Int, draw_lo: Int, draw_hi: Int);
    }
}

/// The kernels of one element type, on the backend's stream. A kernel file is compiled (or
/// read from the disk cache) and loaded when one of its kernels is first launched: a program
/// that needs four of the seven files compiles four, and a test that breaks one file on purpose
/// rebuilds only the files it runs.
pub struct Launcher<E: CudaFloat> {
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    /// The compute capability the files are compiled for (`sm_90`).
    arch: String,
    /// Indexed like `compile::FILES`.
    modules: Vec<OnceLock<Arc<CudaModule>>>,
    /// Indexed by `Kernel`.
    funcs: Vec<OnceLock<CudaFunction>>,
    _e: std::marker::PhantomData<E>,
}

impl<E: CudaFloat> Launcher<E> {
    /// Launchers on `stream` of kernels compiled for `arch`, none loaded yet.
    pub(crate) fn new(ctx: Arc<CudaContext>, stream: Arc<CudaStream>, arch: String) -> Self {
        Launcher {
            stream,
            ctx,
            arch,
            modules: compile::FILES.iter().map(|_| OnceLock::new()).collect(),
            funcs: KERNELS.iter().map(|_| OnceLock::new()).collect(),
            _e: std::marker::PhantomData,
        }
    }

    /// The module of kernel file `file`, loaded on first use.
    pub(crate) fn module(&self, file: &str) -> Result<&Arc<CudaModule>, GpuError> {
        let i = compile::FILES.iter().position(|f| f.name == file).expect("the kernel table names a kernel file");
        if let Some(m) = self.modules[i].get() {
            return Ok(m);
        }
        let module = super::load_kernel_file(&self.ctx, &compile::FILES[i], &self.arch)?;
        // Another thread may have loaded it meanwhile: either module serves.
        Ok(self.modules[i].get_or_init(|| module))
    }

    /// Kernel `k` of element type `E`, its file loaded on first use. A file that does not
    /// compile or load is raised as a `GpuError` (the launchers cannot return one).
    fn function(&self, k: Kernel) -> &CudaFunction {
        self.funcs[k as usize].get_or_init(|| {
            let spec = &KERNELS[k as usize];
            let name = format!("{}_{}", spec.name, E::NAME);
            self.module(spec.file)
                .and_then(|m| m.load_function(&name).map_err(|e| GpuError::driver(format!("loading kernel {name}"), e)))
                .unwrap_or_else(|e| e.raise())
        })
    }
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

/// The engine of a tile kernel: FMA (f32 or f64 products) or tensor cores at TF32 or BF16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// FFMA/DFMA on the CUDA cores, exact products.
    Fma,
    /// `mma.sync` m16n8k8 TF32.
    Tf32,
    /// `mma.sync` m16n8k16 BF16.
    Bf16,
}

impl Engine {
    /// The engine of a kernel of the table (Fma for the kernels outside the tile engine): the
    /// tensor-core kernels are the `_tf32` and `_bf16` variants.
    pub fn of(k: Kernel) -> Engine {
        let name = KERNELS[k as usize].name;
        if name.contains("_tf32") {
            Engine::Tf32
        } else if name.contains("_bf16") {
            Engine::Bf16
        } else {
            Engine::Fma
        }
    }
}

/// The kernels of the tile engine, by base name: every other tile kernel is one of these with
/// a precision (`_tf32`, `_bf16`) or a tile shape (`_m16`, `_n16`) appended.
pub const TILE_FAMILIES: [&str; 5] = ["gemm", "gemm_splitk", "conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"];

/// The tile-engine family of a kernel (`gemm_splitk_m16` → `gemm_splitk`), None for the
/// kernels outside the tile engine: what the model's work formulas go by.
pub fn tile_family(k: Kernel) -> Option<Kernel> {
    let mut name = KERNELS[k as usize].name;
    for suffix in ["_m16", "_n16", "_tf32", "_bf16"] {
        name = name.strip_suffix(suffix).unwrap_or(name);
    }
    TILE_FAMILIES.contains(&name).then(|| ALL_KERNELS[KERNELS.iter().position(|s| s.name == name).expect("a family")])
}

/// The output tile of a tile-engine kernel (`tile_gemm` in kernels/common.cuh): every kernel of
/// `gemm.cu` and `conv2d.cu` but the reductions comes in these three shapes, the 64 × 64 one
/// under the plain name and the others with the suffix `_m16` or `_n16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// 64 × 64, 256 threads.
    Square,
    /// 16 × 64 (a small M: one output channel, a latent head's weight gradient), 64 threads.
    Short,
    /// 64 × 16 (a small N: a latent head's output), 64 threads.
    Narrow,
}

/// Every tile shape, in the order the tile chooser prefers on a tie.
pub const TILES: [Tile; 3] = [Tile::Square, Tile::Short, Tile::Narrow];

impl Tile {
    /// Rows of C per block.
    pub fn m(self) -> usize {
        match self {
            Tile::Square | Tile::Narrow => TILE_M,
            Tile::Short => TILE_SMALL,
        }
    }
    /// Columns of C per block.
    pub fn n(self) -> usize {
        match self {
            Tile::Square | Tile::Short => TILE_N,
            Tile::Narrow => TILE_SMALL,
        }
    }
    /// Threads per block: one per 4 × 4 micro-tile.
    pub fn threads(self) -> u32 {
        match self {
            Tile::Square => TILE_THREADS,
            Tile::Short | Tile::Narrow => TILE_SMALL_THREADS,
        }
    }
    /// The tile shape of a kernel of the table, None for the kernels outside the tile engine
    /// (the tensor-core kernels run the 64 × 64 tile).
    pub fn of(k: Kernel) -> Option<Tile> {
        let name = KERNELS[k as usize].name;
        tile_family(k).map(|_| match () {
            _ if name.ends_with("_m16") => Tile::Short,
            _ if name.ends_with("_n16") => Tile::Narrow,
            _ => Tile::Square,
        })
    }
}

/// Threads per block every launch of `k` uses.
pub fn block_threads(k: Kernel) -> u32 {
    Tile::of(k).map_or(BLOCK, Tile::threads)
}

/// Threads per block every launch of the kernel whose symbol is `symbol` (`gemm_m16_f32`)
/// uses; None for a symbol not in the table.
pub fn block_threads_of_symbol(symbol: &str) -> Option<u32> {
    KERNELS.iter().zip(ALL_KERNELS).find_map(|(spec, &k)| {
        ELEMENT_TYPES.iter().any(|(suffix, _)| symbol == format!("{}_{suffix}", spec.name)).then(|| block_threads(k))
    })
}

/// A grid of (chunks, channels) blocks of BLOCK threads: the per-channel reductions.
pub fn cfg_channel_chunks(chunks: usize, channels: usize) -> LaunchConfig {
    assert!(channels <= 65535, "a per-channel reduction over more than 65535 channels");
    LaunchConfig { grid_dim: (chunks as u32, channels as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The SMs the chunked reductions are shaped for: the tiles' [`TARGET_SMS`], a constant,
/// never the device's count: the split, and so every sum, must be the same on any GPU (see
/// `channel_chunks`).
pub const REDUCE_SMS: usize = TARGET_SMS;
/// Fewest values in a chunk of a per-channel reduction: two per thread, so a block's fixed
/// cost (stage 2's merge of the partials, two barriers) stays small against its loads.
const MIN_REDUCE_CHUNK: usize = 2 * BLOCK as usize;
/// Most chunks per channel: enough for one channel alone to fill REDUCE_SMS SMs; stage 2
/// merges a channel's partials in every block (eight per lane of one warp at most).
pub const MAX_CHUNKS: usize = 256;

/// How to cut each of `channels` per-channel reductions of m values (batch norm's statistics
/// and backward, a bias gradient) into chunks for a grid of (chunks, channels) blocks:
/// (chunks, values per chunk; the last one ragged). Depends on the shapes only. Of the chunk
/// counts that keep chunks at least MIN_REDUCE_CHUNK long (and at most MAX_CHUNKS of them), one whose
/// grid has at least REDUCE_SMS blocks if any does, and of those the one that keeps the SMs
/// busiest (blocks / (SMs · ⌈blocks / SMs⌉), every block the same work), the fewest chunks
/// among equals. One channel of a few values gets one chunk.
pub fn channel_chunks(channels: usize, m: usize) -> (usize, usize) {
    let most = (m / MIN_REDUCE_CHUNK).clamp(1, MAX_CHUNKS);
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

/// Tile grid of `batches` M × N GEMMs (split-K chunks or convolution phases along z).
pub fn cfg_tiles(tile: Tile, m: usize, n: usize, batches: usize) -> LaunchConfig {
    let (gx, gy) = (n.div_ceil(tile.n()), m.div_ceil(tile.m()));
    assert!(gy <= 65535 && batches <= 65535, "GEMM grid too large");
    LaunchConfig {
        grid_dim: (gx as u32, gy as u32, batches as u32),
        block_dim: (tile.threads(), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The multiprocessors a grid should fill (the H200's 132, src/model/machine.rs). A constant,
/// not the device's count: launch shapes, and so the order of every sum, depend on the
/// problem's shape only, so results are bitwise the same on every GPU.
pub const TARGET_SMS: usize = 132;

/// Shortest split-K chunk: four k-steps, below which a chunk's tile loads and its partial's
/// write and reread outweigh its multiply-adds.
const MIN_CHUNK: usize = 4 * TILE_K;

/// What a split's extra reduction launch costs, counted as multiply-adds of one SM so that
/// it weighs against tile work: about 2 µs of launch gap and idle tail at the ~5·10^10
/// multiply-adds per second one SM runs (67 TFLOP/s / 132 SMs / 2 per FMA at η ≈ 0.2). A
/// rough constant that only decides between launch shapes (never results' correctness).
const REDUCE_LAUNCH_FMAS: f64 = 1e5;
/// Multiply-adds of one SM that moving one byte through device memory is worth in a reduction
/// pass: 5·10^10 FMA/s per SM over 4.8 TB/s shared by 132 SMs (≈ 36 GB/s each).
const FMAS_PER_BYTE: f64 = 1.4;

/// What a small tile's extra operand staging costs, as a factor on its multiply-adds (see
/// `tile_cost`): a rough weight that only decides between launch shapes.
const SMALL_TILE_STAGING: f64 = 1.25;

/// The cost, in multiply-adds of the busiest SM, of `batches` M × N GEMMs of depth `kc` each on
/// `tile`: the blocks fill waves of TARGET_SMS, each block runs its padded tile; and a block
/// of fewer than four warps cannot keep an SM's four schedulers busy, so a lone small tile
/// (two warps) is counted at half the SM's rate at best.
fn tile_cost(tile: Tile, m: usize, n: usize, kc: usize, batches: usize) -> f64 {
    let blocks = m.div_ceil(tile.m()) * n.div_ceil(tile.n()) * batches;
    // A small tile stages (16 + 64)·16 operands per 16·64·16 multiply-adds, 2.5 times the
    // 64 × 64 tile's share of loads per multiply-add: counted as a quarter more time, so it
    // is chosen only where it saves padding or fills idle SMs, not on a tie.
    let staging = if tile == Tile::Square { 1.0 } else { SMALL_TILE_STAGING };
    let per_block = staging * (tile.m() * tile.n() * kc.next_multiple_of(TILE_K).max(TILE_K)) as f64;
    let warps = tile.threads() as usize / 32;
    let lone_block = per_block * 4.0 / warps.min(4) as f64;
    (blocks.div_ceil(TARGET_SMS).max(1) as f64 * per_block).max(lone_block)
}

/// The tile for an unsplit M × N × K product (or `batches` of them side by side), among
/// `tiles` (the tensor-core kernels have the 64 × 64 one only): the shape whose busiest SM
/// runs the fewest padded multiply-adds, 64 × 64 on a tie (its blocks keep
/// more warps per SM). A function of the shape only.
pub fn choose_tile(tiles: &[Tile], m: usize, n: usize, k: usize, batches: usize) -> Tile {
    let mut best = (f64::INFINITY, Tile::Square);
    for &t in tiles {
        let c = tile_cost(t, m, n, k, batches);
        if c < best.0 {
            best = (c, t);
        }
    }
    best.1
}

/// How to run an M × N product with a reduction of length k that may be split into
/// deterministic chunks, on one of `tiles`: (tile, number of chunks, chunk length, a multiple of TILE_K). The
/// chunks fill the TARGET_SMS multiprocessors where the work allows; each split pays one
/// more launch (the in-order reduction) and its partials' traffic. Depends on the dims only,
/// never on the device, so results are the same bitwise on every GPU. `always_reduce`: the
/// caller runs the reduction pass even for one chunk (weight gradients accumulate through it).
pub fn split_k(tiles: &[Tile], m: usize, n: usize, k: usize, always_reduce: bool) -> (Tile, usize, usize) {
    let mut best = (f64::INFINITY, Tile::Square, 1, k.next_multiple_of(TILE_K).max(TILE_K));
    for &t in tiles {
        let max_splits = (k / MIN_CHUNK).clamp(1, 64);
        for want in 1..=max_splits {
            let kc = k.div_ceil(want).max(1).next_multiple_of(TILE_K);
            let splits = k.div_ceil(kc).max(1);
            if splits != want {
                continue; // the same cut as a smaller count
            }
            let mut c = tile_cost(t, m, n, kc, splits);
            if splits > 1 || always_reduce {
                c += REDUCE_LAUNCH_FMAS + FMAS_PER_BYTE * (2 * splits + 1) as f64 * (m * n * 4) as f64 / 132.0;
            }
            if c < best.0 {
                best = (c, t, splits, kc);
            }
        }
    }
    (best.1, best.2, best.3)
}

/// The s² output phases of a stride-s backward-data convolution (see conv2d.cu): for each,
/// (pixels per image, taps) = (nh·nw, uh·uw). Grid z of `conv2d_bwd_data` is the phase, and
/// its GEMM is c_in × (n·nh·nw) × (c_out·uh·uw). The same arithmetic as `PhaseAxis` there.
pub fn conv_phases(a: &ConvArgs) -> Vec<(usize, usize)> {
    let axis = |f: i32, size: i32, k: i32| {
        let (s, pad) = (a.stride, a.pad);
        let t0 = if f >= pad { 0 } else { (pad - f + s - 1) / s };
        let t_end = if size + pad - f > 0 { (size + pad - f + s - 1) / s } else { 0 };
        let taps = if k > f { (k - f + s - 1) / s } else { 0 };
        ((t_end - t0).max(0) as usize, taps as usize)
    };
    let mut v = vec![];
    for fy in 0..a.stride {
        for fx in 0..a.stride {
            let (ny, uy) = axis(fy, a.h, a.kh);
            let (nx, ux) = axis(fx, a.w, a.kw);
            v.push((ny * nx, uy * ux));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_k_covers_the_reduction() {
        for &(m, n, k) in &[(32, 9, 100352), (784, 400, 128), (1, 1, 1), (64, 64, 0), (20, 400, 128), (3, 5, 17)] {
            let (_, s, kc) = split_k(&TILES, m, n, k, false);
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
            assert!(k == 1 || len >= MIN_REDUCE_CHUNK - 1, "{channels}x{m}: chunks of {len}");
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
        let gemm = symbols_in("gemm.cu");
        assert_eq!(gemm[..4], ["gemm_f32", "gemm_f64", "gemm_splitk_f32", "gemm_splitk_f64"]);
        assert!(gemm.contains(&"gemm_m16_f32".to_string()) && gemm.contains(&"splitk_reduce_bias_f64".to_string()));
    }

    /// The tile chooser on the shapes the GPU suite relies on to reach every tile shape, and
    /// the block sizes that follow.
    #[test]
    fn tiles_fit_the_shape() {
        // A one-channel output: 16 rows, not 64.
        assert_eq!(choose_tile(&TILES, 1, 16 * 784, 288, 1), Tile::Short);
        // 2 × 62 tiles of 64 × 64 fill the GPU: no small tiles.
        assert_eq!(choose_tile(&TILES, 128, 3920, 4, 1), Tile::Square);
        // A 20-wide latent head's output: 16 columns.
        assert_eq!(choose_tile(&TILES, 8000, 10, 8, 1), Tile::Narrow);
        // The MLP's 128 × 784 → 400 forward: 14 tiles of 64 × 64 would leave 118 SMs idle;
        // split along K instead.
        let (_, splits, _) = split_k(&TILES, 128, 400, 784, false);
        assert!(splits > 1);
        // Only the 64 × 64 tile where the tensor-core kernels run.
        assert_eq!(choose_tile(&[Tile::Square], 1, 16 * 784, 288, 1), Tile::Square);
        assert_eq!(block_threads(Kernel::GemmM16), 64);
        assert_eq!(block_threads(Kernel::GemmTf32), 256);
        assert_eq!(block_threads(Kernel::ConvBwdWeightN16), 64);
        assert_eq!(Tile::of(Kernel::GemmSplitKM16), Some(Tile::Short));
        assert_eq!(Tile::of(Kernel::ConvBwdDataBf16), Some(Tile::Square));
        assert_eq!(Tile::of(Kernel::SplitKReduce), None);
        assert_eq!(tile_family(Kernel::ConvBwdDataN16), Some(Kernel::ConvBwdData));
        assert_eq!(tile_family(Kernel::GemmSplitKTf32), Some(Kernel::GemmSplitK));
        assert_eq!(tile_family(Kernel::BiasAdd), None);
        assert_eq!((Engine::of(Kernel::GemmSplitKBf16), Engine::of(Kernel::ConvFwdM16)), (Engine::Bf16, Engine::Fma));
        assert_eq!(block_threads_of_symbol("conv2d_bwd_data_n16_f64"), Some(64));
        assert_eq!(block_threads_of_symbol("adam_f32"), Some(BLOCK));
    }

    /// The phases of a stride-2, 3 × 3, pad-1 convolution of a 7 × 6 input (4 × 3 output):
    /// rows yy = 2t − 1 (phase 0: yy = 1, 3, 5; taps p = 0, 2) and yy = 2t (phase 1: yy = 0, 2,
    /// 4, 6; tap p = 1); columns likewise (phase 0: xx = 1, 3, 5; phase 1: xx = 0, 2, 4). Every
    /// pixel is in exactly one phase and every tap in exactly one.
    #[test]
    fn conv_phases_partition_pixels_and_taps() {
        let a = ConvArgs { n: 1, c_in: 1, h: 7, w: 6, c_out: 1, kh: 3, kw: 3, stride: 2, pad: 1, oh: 4, ow: 3, kc: 0 };
        assert_eq!(conv_phases(&a), vec![(3 * 3, 2 * 2), (3 * 3, 2), (4 * 3, 2), (4 * 3, 1)]);
        let total: (usize, usize) = conv_phases(&a).iter().fold((0, 0), |s, p| (s.0 + p.0, s.1 + p.1));
        assert_eq!(total, (7 * 6, 9));
    }
}
