//! The CUDA backend: the same `Backend` trait as the CPU reference, every op a hand-written
//! kernel from `kernels/`, compiled at run time by NVRTC (see [`compile`]) and launched on one
//! stream through cudarc. Shapes travel by value as kernel arguments (`#[repr(C)]` structs
//! mirrored in the `.cu` files), never through device memory, so steps stay graph-capturable.
//!
//! - Buffers come from a pool ([`pool`]): after the first training step no new device
//!   allocation happens.
//! - Reductions (sums, losses, KL, bias/batch-norm/weight gradients) combine partial results
//!   in a fixed order with no atomics: seeded runs are bitwise reproducible.
//! - `backward*` methods add into their outputs, as on the CPU.

pub mod compile;
pub mod pool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

pub use compile::{compile_all_for_arch, CompileReport, FileReport};
pub use pool::CudaBuf;
use pool::Pool;

use crate::backend::{Backend, Recon};
use crate::bench::Roofline;
use crate::ops::adam::AdamStep;
use crate::ops::batch_norm::BatchNormDims;
use crate::ops::conv2d::Conv2dDims;
use crate::ops::linear::LinearDims;
use crate::ops::unary::Unary;
use crate::tensor::Float;

/// The element types the CUDA backend instantiates (f32 and f64).
pub trait CudaFloat: Float + DeviceRepr + ValidAsZeroBits {}
impl CudaFloat for f32 {}
impl CudaFloat for f64 {}

/// One GPU as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (u32, u32),
    pub memory_bytes: u64,
}

fn driver_missing() -> String {
    "no NVIDIA driver found (libcuda.so could not be loaded): install the NVIDIA driver (CUDA 13 or newer) or use \
     the CPU backend"
        .to_string()
}

/// Both libraries the backend loads at run time must be present; cudarc panics otherwise.
fn libs_present() -> Result<(), String> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(driver_missing());
    }
    if !compile::nvrtc_present() {
        return Err(compile::nvrtc_missing());
    }
    Ok(())
}

/// The GPUs this machine has. Never panics: a missing driver or NVRTC is an `Err` whose one
/// line says what is missing and what to do.
pub fn probe() -> Result<Vec<GpuInfo>, String> {
    libs_present()?;
    catch_quietly(probe_inner)
        .unwrap_or_else(|| Err("the CUDA driver library is too old for this build (CUDA 13 needed)".to_string()))
}

/// Opens GPU `ordinal` after checking, through `probe`, that it exists: the one call the CLI
/// and the benches make. Errors are one line (no driver, no NVRTC, no such GPU, or a compile
/// error with NVRTC's log).
pub fn open<E: CudaFloat>(ordinal: usize) -> Result<Cuda<E>, String> {
    let gpus = probe()?;
    if !gpus.iter().any(|g| g.ordinal == ordinal) {
        return Err(match gpus.len() {
            0 => "no CUDA GPU found".to_string(),
            n => format!("there is no cuda:{ordinal}; this machine has {n} GPU(s), cuda:0..cuda:{}", n - 1),
        });
    }
    Cuda::new(ordinal)
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol in an old driver) into `None`
/// without letting the process's panic hook print it: the caller reports it as one line.
fn catch_quietly<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Option<R> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(f).ok();
    std::panic::set_hook(hook);
    r
}

fn probe_inner() -> Result<Vec<GpuInfo>, String> {
    use cudarc::driver::result::device;
    use cudarc::driver::sys::CUdevice_attribute as A;
    cudarc::driver::result::init()
        .map_err(|e| format!("the CUDA driver failed to initialize ({e:?}): check `nvidia-smi`"))?;
    let count = device::get_count().map_err(|e| format!("cuDeviceGetCount: {e:?}"))?;
    (0..count)
        .map(|i| {
            let err = |e| format!("querying CUDA device {i}: {e:?}");
            let dev = device::get(i).map_err(err)?;
            let name = device::get_name(dev).map_err(err)?;
            // SAFETY: dev is a valid device handle.
            let (memory_bytes, major, minor) = unsafe {
                (
                    device::total_mem(dev).map_err(err)?,
                    device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).map_err(err)?,
                    device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).map_err(err)?,
                )
            };
            Ok(GpuInfo {
                ordinal: i as usize,
                name,
                compute_capability: (major as u32, minor as u32),
                memory_bytes: memory_bytes as u64,
            })
        })
        .collect()
}

// Every kernel the backend launches, by base name; `<base>_f32` / `<base>_f64` are loaded
// once at start-up into a vector indexed by `Kernel`, so no launch looks a name up.
macro_rules! kernels {
    ($($v:ident = $name:literal),* $(,)?) => {
        #[derive(Clone, Copy, Debug)]
        enum Kernel { $($v),* }
        const KERNEL_NAMES: &[&str] = &[$($name),*];
    };
}
kernels! {
    Gemm = "gemm", GemmSplitK = "gemm_splitk", SplitKReduce = "splitk_reduce",
    ConvFwd = "conv2d_fwd", ConvBwdData = "conv2d_bwd_data", ConvBwdWeight = "conv2d_bwd_weight",
    BnFwdTrain = "bn_fwd_train", BnFwdEval = "bn_fwd_eval", BnBwd = "bn_bwd",
    UnaryFwd = "unary_fwd", UnaryBwd = "unary_bwd", Mul = "mul", MulAcc = "mul_acc", Axpy = "axpy",
    Fill = "fill", BroadcastAcc = "broadcast_acc", GatherRows = "gather_rows", BiasAdd = "bias_add",
    BiasBwd = "bias_bwd", SumPartial = "sum_partial", ReduceFinal = "reduce_final", FmaPeak = "fma_peak",
    ReparamKlFwd = "reparam_kl_fwd", ReparamBwdMu = "reparam_bwd_mu", ReparamBwdLogvar = "reparam_bwd_logvar",
    LossFwd = "loss_fwd", LossBwd = "loss_bwd", Adam = "adam",
}

/// Launches kernel `$k` with `$cfg` and the given arguments (references to places that live
/// past the statement: locals, `buf.s()`, `buf.sm()`).
macro_rules! launch {
    ($inner:expr, $k:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let inner = &$inner;
        let mut b = inner.stream.launch_builder(&inner.funcs[$k as usize]);
        $( b.arg($arg); )*
        // SAFETY: each argument list matches its kernel's signature in kernels/*.cu (types
        // and order), and the callers assert every buffer covers the index range the kernel
        // touches for the dims passed.
        unsafe { b.launch($cfg) }.unwrap_or_else(|e| panic!("CUDA launch of {:?} failed: {e:?}", $k));
    }};
}

// ---- kernel argument structs (twins of the structs in the .cu files) ----

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GemmArgs {
    m: i32,
    n: i32,
    k: i32,
    a_rs: i32,
    a_cs: i32,
    b_rs: i32,
    b_cs: i32,
    bias_mode: i32,
    accumulate: i32,
    kc: i32,
}
// SAFETY: plain #[repr(C)] data, laid out as the CUDA struct.
unsafe impl DeviceRepr for GemmArgs {}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConvArgs {
    n: i32,
    c_in: i32,
    h: i32,
    w: i32,
    c_out: i32,
    kh: i32,
    kw: i32,
    stride: i32,
    pad: i32,
    oh: i32,
    ow: i32,
    has_bias: i32,
    kc: i32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for ConvArgs {}

impl ConvArgs {
    fn of(d: &Conv2dDims) -> Self {
        // The kernels form these products in 32-bit int (GEMM sizes and the column and
        // reduction indices); element offsets are 64-bit.
        for v in [d.n * d.oh * d.ow, d.n * d.h * d.w, d.c_in * d.kh * d.kw, d.c_out * d.kh * d.kw] {
            i(v);
        }
        ConvArgs {
            n: i(d.n),
            c_in: i(d.c_in),
            h: i(d.h),
            w: i(d.w),
            c_out: i(d.c_out),
            kh: i(d.kh),
            kw: i(d.kw),
            stride: i(d.stride),
            pad: i(d.pad),
            oh: i(d.oh),
            ow: i(d.ow),
            has_bias: 0,
            kc: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct BnArgs {
    eps: f64,
    momentum: f64,
    outer: i32,
    channels: i32,
    inner: i32,
    has_dx: i32,
    has_dgamma: i32,
    has_dbeta: i32,
}
// SAFETY: as above (two doubles then six ints: no padding on either side).
unsafe impl DeviceRepr for BnArgs {}

impl BnArgs {
    fn of(d: &BatchNormDims) -> Self {
        BnArgs {
            eps: d.eps,
            momentum: d.momentum,
            outer: i(d.outer),
            channels: i(d.channels),
            inner: i(d.inner),
            has_dx: 0,
            has_dgamma: 0,
            has_dbeta: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AdamArgs<T> {
    beta1: T,
    beta2: T,
    one_minus_beta1: T,
    one_minus_beta2: T,
    eps: T,
    weight_decay: T,
    decay_factor: T,
    step_size: T,
    bc2_sqrt: T,
    mode: i32,
    n: i32,
}
// SAFETY: as above; T is f32 or f64.
unsafe impl<T: CudaFloat> DeviceRepr for AdamArgs<T> {}

/// A size as the kernels' 32-bit int.
fn i(v: usize) -> i32 {
    i32::try_from(v).unwrap_or_else(|_| panic!("size {v} exceeds the CUDA kernels' 32-bit index range"))
}

/// Threads per block of 1-D kernels (BLOCK in common.cuh).
const BLOCK: u32 = 256;
/// Tile sizes of the GEMM engine (TILE_M, TILE_N and TILE_THREADS in common.cuh).
const TILE: usize = 64;
const TILE_THREADS: u32 = 256;

/// Grid-stride elementwise launch: enough blocks to cover n once, capped (the loop covers
/// the rest).
fn cfg_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 8192) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Blocks of stage 1 of a deterministic reduction over n values: a function of n only.
fn reduce_blocks(n: usize) -> usize {
    n.div_ceil(BLOCK as usize).clamp(1, 1024)
}

/// One block of BLOCK threads per channel.
fn cfg_per_channel(channels: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (channels as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Tile grid of an M × N GEMM with `splits` K-chunks.
fn cfg_tiles(m: usize, n: usize, splits: usize) -> LaunchConfig {
    let (gx, gy) = (n.div_ceil(TILE), m.div_ceil(TILE));
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
fn split_k(m: usize, n: usize, k: usize) -> (usize, usize) {
    let tiles = m.div_ceil(TILE) * n.div_ceil(TILE);
    let wanted = 256usize.div_ceil(tiles.max(1));
    let splits = wanted.min((k / 512).max(1)).clamp(1, 64);
    let kc = k.div_ceil(splits).max(1).next_multiple_of(16);
    (k.div_ceil(kc).max(1), kc)
}

struct Inner<E: CudaFloat> {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: Vec<CudaFunction>,
    pool: Arc<Pool<E>>,
    /// Double-precision scratch of the reductions' partial sums.
    scratch: Arc<Pool<f64>>,
    /// Row indices of `gather_rows`, grown as needed.
    idx: Mutex<Option<CudaSlice<u32>>>,
    /// Stands in for absent optional operands (never read or written by the kernels).
    dummy: CudaSlice<E>,
    info: GpuInfo,
    bandwidth: OnceLock<f64>,
    gflops: OnceLock<f64>,
}

/// The CUDA backend on one GPU, computing in `E` (f32 to train, f64 to check gradients).
/// Clones share the device, its stream, the loaded kernels and the memory pool.
pub struct Cuda<E: CudaFloat> {
    inner: Arc<Inner<E>>,
}

impl<E: CudaFloat> Clone for Cuda<E> {
    fn clone(&self) -> Self {
        Cuda { inner: self.inner.clone() }
    }
}

impl<E: CudaFloat> Cuda<E> {
    /// Opens GPU `ordinal`, compiles (or loads from the cache) every kernel for its compute
    /// capability and loads them. Never panics; errors are one line (NVRTC's log on a compile
    /// error).
    pub fn new(ordinal: usize) -> Result<Self, String> {
        libs_present()?;
        catch_quietly(|| Self::open(ordinal))
            .unwrap_or_else(|| Err(format!("opening CUDA device {ordinal} panicked inside cudarc")))
    }

    fn open(ordinal: usize) -> Result<Self, String> {
        let info = probe_inner()?
            .into_iter()
            .find(|g| g.ordinal == ordinal)
            .ok_or_else(|| format!("there is no CUDA device {ordinal} (see `nvidia-smi`)"))?;
        let err = |what: &str| {
            let what = what.to_string();
            move |e| format!("CUDA device {ordinal}: {what}: {e:?}")
        };
        let ctx = CudaContext::new(ordinal).map_err(err("creating the context"))?;
        // One stream, no cross-stream events: automatic event tracking would only add
        // overhead, and would record events into captured graphs.
        // SAFETY: called before any allocation on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(err("creating a stream"))?;
        let (major, minor) = info.compute_capability;
        let arch = format!("sm_{major}{minor}");
        let mut by_name = HashMap::new();
        for f in compile::FILES {
            let load = |bin: Vec<u8>| ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin));
            let cubin = compile::cubin_cached(f, &arch)?;
            let module = match load(cubin.binary) {
                Ok(m) => m,
                // A cached CUBIN the driver refuses (damaged on disk): compile afresh, once.
                Err(_) if cubin.from_cache => load(compile::cubin_fresh(f, &arch)?.binary).map_err(err(f.name))?,
                Err(e) => return Err(err(f.name)(e)),
            };
            for k in f.kernels {
                by_name.insert(*k, module.clone());
            }
        }
        let funcs = KERNEL_NAMES
            .iter()
            .map(|k| {
                let name = format!("{k}_{}", E::NAME);
                by_name
                    .get(k)
                    .ok_or_else(|| format!("no kernel file defines {k}"))?
                    .load_function(&name)
                    .map_err(|e| format!("loading kernel {name}: {e:?}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let dummy = stream.alloc_zeros::<E>(1).map_err(err("allocating"))?;
        let inner = Inner {
            pool: Pool::new(stream.clone()),
            scratch: Pool::new(stream.clone()),
            ctx,
            stream,
            funcs,
            idx: Mutex::new(None),
            dummy,
            info,
            bandwidth: OnceLock::new(),
            gflops: OnceLock::new(),
        };
        Ok(Cuda { inner: Arc::new(inner) })
    }

    pub fn info(&self) -> &GpuInfo {
        &self.inner.info
    }

    /// Device allocations made so far by the pools (constant once training is warm).
    pub fn device_allocations(&self) -> usize {
        self.inner.pool.allocations() + self.inner.scratch.allocations()
    }

    fn sync_or_panic(&self) {
        self.inner.stream.synchronize().unwrap_or_else(|e| panic!("CUDA error: {e:?}"));
    }

    /// out[0] = scale · Σ part[..g] (stage 2 of every reduction).
    fn reduce_final(&self, part: &CudaBuf<f64>, g: usize, scale: f64, out: &mut CudaBuf<E>) {
        let gi = i(g);
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self.inner, Kernel::ReduceFinal, one; part.s(), &gi, &scale, out.sm());
    }

    /// C (+)= A·B through strided operands; see kernels/gemm.cu. Long reductions with few
    /// output tiles are split into deterministic chunks.
    fn gemm(&self, g: GemmArgs, a: &CudaBuf<E>, b: &CudaBuf<E>, c: &mut CudaBuf<E>, bias: Option<&CudaBuf<E>>) {
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        if m == 0 || n == 0 {
            return;
        }
        assert!(c.len() >= m * n, "gemm: output too small");
        let (splits, kc) = split_k(m, n, k);
        if splits <= 1 || bias.is_some() {
            let bias_s = bias.map_or(&self.inner.dummy, |b| b.s());
            launch!(self.inner, Kernel::Gemm, cfg_tiles(m, n, 1); &g, a.s(), b.s(), c.sm(), bias_s);
            return;
        }
        let mut part = self.inner.pool.take(splits * m * n);
        let gs = GemmArgs { kc: i(kc), ..g };
        launch!(self.inner, Kernel::GemmSplitK, cfg_tiles(m, n, splits); &gs, a.s(), b.s(), part.sm());
        let (si, len) = (i(splits), i(m * n));
        launch!(self.inner, Kernel::SplitKReduce, cfg_1d(m * n); part.s(), &si, &len, c.sm(), &g.accumulate);
    }

    fn measure_bandwidth(&self) -> f64 {
        let st = &self.inner.stream;
        let bytes = 256usize << 20;
        let n = bytes / std::mem::size_of::<E>();
        // SAFETY: contents are irrelevant to a copy benchmark.
        let (src, mut dst) = unsafe { (st.alloc::<E>(n).expect("alloc"), st.alloc::<E>(n).expect("alloc")) };
        st.memcpy_dtod(&src, &mut dst).expect("copy");
        self.sync_or_panic();
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t = Instant::now();
            st.memcpy_dtod(&src, &mut dst).expect("copy");
            self.sync_or_panic();
            best = best.min(t.elapsed().as_secs_f64());
        }
        // A copy reads and writes every byte.
        2.0 * bytes as f64 / best / 1e9
    }

    fn measure_gflops(&self) -> f64 {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let sms = self.inner.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap_or(100) as u32;
        let blocks = sms * 8;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let iters: i32 = if E::NAME == "f32" { 1 << 16 } else { 1 << 13 };
        let seed = E::of(0.5);
        let run = || launch!(self.inner, Kernel::FmaPeak, cfg; &self.inner.dummy, &iters, &seed);
        run();
        self.sync_or_panic();
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            run();
            self.sync_or_panic();
            best = best.min(t.elapsed().as_secs_f64());
        }
        // 8 chains × one FMA (2 FLOPs) per iteration per thread.
        (blocks as f64 * BLOCK as f64 * iters as f64 * 16.0) / best / 1e9
    }
}

impl<E: CudaFloat> Roofline for Cuda<E> {
    fn peak_bandwidth_gbs(&self) -> f64 {
        *self.inner.bandwidth.get_or_init(|| self.measure_bandwidth())
    }
    fn peak_gflops(&self) -> f64 {
        *self.inner.gflops.get_or_init(|| self.measure_gflops())
    }
}

/// Kernel code of an activation and its slope (leaky ReLU only).
fn unary_code<E: Float>(op: Unary) -> (i32, E) {
    match op {
        Unary::Relu => (0, E::zero()),
        Unary::Sigmoid => (1, E::zero()),
        Unary::Tanh => (2, E::zero()),
        Unary::LeakyRelu(s) => (3, E::of(s)),
    }
}

/// The device slice of an optional, non-empty output.
fn present<E: CudaFloat>(o: Option<&CudaBuf<E>>) -> Option<&CudaSlice<E>> {
    o.filter(|b| !b.is_empty()).map(CudaBuf::s)
}

fn recon_code(kind: Recon) -> i32 {
    match kind {
        Recon::Bce => 0,
        Recon::BceWithLogits => 1,
        Recon::Mse => 2,
    }
}

impl<E: CudaFloat> Backend for Cuda<E> {
    type E = E;
    type Buf = CudaBuf<E>;

    fn describe(&self) -> String {
        let g = &self.inner.info;
        format!("{} (sm_{}{}, {} GiB)", g.name, g.compute_capability.0, g.compute_capability.1, g.memory_bytes >> 30)
    }
    fn synchronize(&self) {
        self.sync_or_panic();
    }
    fn time(&self, f: &mut dyn FnMut()) -> std::time::Duration {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let stream = &self.inner.stream;
        let record = || stream.record_event(Some(CU_EVENT_DEFAULT)).unwrap_or_else(|e| panic!("CUDA error: {e:?}"));
        self.sync_or_panic();
        let start = record();
        f();
        let end = record();
        let ms = start.elapsed_ms(&end).unwrap_or_else(|e| panic!("CUDA error: {e:?}"));
        std::time::Duration::from_secs_f64(ms as f64 / 1e3)
    }

    fn zeros(&self, len: usize) -> CudaBuf<E> {
        let mut b = self.inner.pool.take(len);
        if len > 0 {
            self.inner.stream.memset_zeros(b.sm()).unwrap_or_else(|e| panic!("CUDA memset: {e:?}"));
        }
        b
    }
    fn upload(&self, host: &[E]) -> CudaBuf<E> {
        let mut b = self.inner.pool.take(host.len());
        if !host.is_empty() {
            self.inner.stream.memcpy_htod(host, b.sm()).unwrap_or_else(|e| panic!("CUDA upload: {e:?}"));
        }
        b
    }
    fn download(&self, buf: &CudaBuf<E>) -> Vec<E> {
        if buf.is_empty() {
            return vec![];
        }
        let v = self.inner.stream.clone_dtoh(buf.s()).unwrap_or_else(|e| panic!("CUDA download: {e:?}"));
        self.sync_or_panic();
        v
    }
    fn len(&self, buf: &CudaBuf<E>) -> usize {
        buf.len()
    }
    fn copy(&self, src: &CudaBuf<E>, dst: &mut CudaBuf<E>) {
        assert_eq!(src.len(), dst.len(), "copy: lengths differ");
        if !src.is_empty() {
            self.inner.stream.memcpy_dtod(src.s(), dst.sm()).unwrap_or_else(|e| panic!("CUDA copy: {e:?}"));
        }
    }
    fn fill(&self, buf: &mut CudaBuf<E>, value: E) {
        let n = buf.len();
        if n > 0 {
            let ni = i(n);
            launch!(self.inner, Kernel::Fill, cfg_1d(n); buf.sm(), &value, &ni);
        }
    }
    fn gather_rows(&self, src: &CudaBuf<E>, row_len: usize, idx: &[u32], dst: &mut CudaBuf<E>) {
        let n = idx.len() * row_len;
        if n == 0 {
            return;
        }
        let rows = src.len() / row_len;
        assert!(idx.iter().all(|&r| (r as usize) < rows), "gather_rows: index out of range");
        assert!(dst.len() >= n, "gather_rows: destination too small");
        let mut guard = self.inner.idx.lock().unwrap();
        if guard.as_ref().is_none_or(|s| s.len() < idx.len()) {
            // SAFETY: written by the copy below before any read.
            let s = unsafe { self.inner.stream.alloc::<u32>(idx.len().next_power_of_two()) };
            *guard = Some(s.unwrap_or_else(|e| panic!("CUDA alloc: {e:?}")));
        }
        let ib = guard.as_mut().unwrap();
        // Stream-ordered: a previous gather still reading the old indices finishes first.
        self.inner.stream.memcpy_htod(idx, ib).unwrap_or_else(|e| panic!("CUDA upload: {e:?}"));
        let (rl, ni) = (i(row_len), i(n));
        launch!(self.inner, Kernel::GatherRows, cfg_1d(n); src.s(), &*ib, &rl, dst.sm(), &ni);
    }

    fn linear_forward(
        &self,
        x: &CudaBuf<E>,
        w: &CudaBuf<E>,
        b: Option<&CudaBuf<E>>,
        y: &mut CudaBuf<E>,
        d: LinearDims,
    ) {
        assert!(x.len() >= d.n * d.d_in && w.len() >= d.d_out * d.d_in, "linear_forward: operand too small");
        // y[n, out] = x[n, in] · Wᵀ: B[k, j] = W[j, k] at w[k + j·in].
        let (din, dout) = (i(d.d_in), i(d.d_out));
        let g = GemmArgs {
            m: i(d.n),
            n: dout,
            k: din,
            a_rs: din,
            a_cs: 1,
            b_rs: 1,
            b_cs: din,
            bias_mode: if b.is_some() { 1 } else { 0 },
            accumulate: 0,
            kc: 0,
        };
        self.gemm(g, x, w, y, b);
    }
    fn linear_backward_data(&self, dy: &CudaBuf<E>, w: &CudaBuf<E>, dx: &mut CudaBuf<E>, d: LinearDims) {
        assert!(dy.len() >= d.n * d.d_out && w.len() >= d.d_out * d.d_in, "linear_backward_data: operand too small");
        // dx[n, in] += dy[n, out] · W[out, in]
        let (din, dout) = (i(d.d_in), i(d.d_out));
        let g = GemmArgs {
            m: i(d.n),
            n: din,
            k: dout,
            a_rs: dout,
            a_cs: 1,
            b_rs: din,
            b_cs: 1,
            accumulate: 1,
            ..Default::default()
        };
        self.gemm(g, dy, w, dx, None);
    }
    fn linear_backward_weight(&self, dy: &CudaBuf<E>, x: &CudaBuf<E>, dw: &mut CudaBuf<E>, d: LinearDims) {
        assert!(dy.len() >= d.n * d.d_out && x.len() >= d.n * d.d_in, "linear_backward_weight: operand too small");
        // dW[out, in] += dyᵀ[out, n] · x[n, in]: A[o, k] = dy[k, o] at dy[o + k·out].
        let (din, dout) = (i(d.d_in), i(d.d_out));
        let g = GemmArgs {
            m: dout,
            n: din,
            k: i(d.n),
            a_rs: 1,
            a_cs: dout,
            b_rs: din,
            b_cs: 1,
            accumulate: 1,
            ..Default::default()
        };
        self.gemm(g, dy, x, dw, None);
    }

    fn bias_add(&self, y: &mut CudaBuf<E>, b: &CudaBuf<E>, outer: usize, channels: usize, inner: usize) {
        let n = outer * channels * inner;
        if n == 0 {
            return;
        }
        assert!(y.len() >= n && b.len() >= channels, "bias_add: operand too small");
        let (ci, ii, ni) = (i(channels), i(inner), i(n));
        launch!(self.inner, Kernel::BiasAdd, cfg_1d(n); y.sm(), b.s(), &ci, &ii, &ni);
    }
    fn bias_backward(&self, dy: &CudaBuf<E>, db: &mut CudaBuf<E>, outer: usize, channels: usize, inner: usize) {
        if channels == 0 || outer * inner == 0 {
            return;
        }
        assert!(dy.len() >= outer * channels * inner && db.len() >= channels, "bias_backward: operand too small");
        let (oi, ci, ii) = (i(outer), i(channels), i(inner));
        launch!(self.inner, Kernel::BiasBwd, cfg_per_channel(channels); dy.s(), db.sm(), &oi, &ci, &ii);
    }

    fn conv2d_forward(
        &self,
        x: &CudaBuf<E>,
        w: &CudaBuf<E>,
        b: Option<&CudaBuf<E>>,
        y: &mut CudaBuf<E>,
        d: Conv2dDims,
    ) {
        assert!(
            x.len() >= d.x_len() && w.len() >= d.w_len() && y.len() >= d.y_len(),
            "conv2d_forward: operand too small"
        );
        if d.y_len() == 0 {
            return;
        }
        let a = ConvArgs { has_bias: b.is_some() as i32, ..ConvArgs::of(&d) };
        let bias = b.map_or(&self.inner.dummy, |b| b.s());
        let cfg = cfg_tiles(d.c_out, d.n * d.oh * d.ow, 1);
        launch!(self.inner, Kernel::ConvFwd, cfg; &a, x.s(), w.s(), bias, y.sm());
    }
    fn conv2d_backward_data(&self, dy: &CudaBuf<E>, w: &CudaBuf<E>, dx: &mut CudaBuf<E>, d: Conv2dDims) {
        assert!(
            dx.len() >= d.x_len() && w.len() >= d.w_len() && dy.len() >= d.y_len(),
            "conv2d_backward_data: operand too small"
        );
        if d.x_len() == 0 {
            return;
        }
        let a = ConvArgs::of(&d);
        let cfg = cfg_tiles(d.c_in, d.n * d.h * d.w, 1);
        launch!(self.inner, Kernel::ConvBwdData, cfg; &a, dy.s(), w.s(), dx.sm());
    }
    fn conv2d_backward_weight(&self, dy: &CudaBuf<E>, x: &CudaBuf<E>, dw: &mut CudaBuf<E>, d: Conv2dDims) {
        assert!(
            x.len() >= d.x_len() && dw.len() >= d.w_len() && dy.len() >= d.y_len(),
            "conv2d_backward_weight: operand too small"
        );
        let (m, n, k) = (d.c_out, d.c_in * d.kh * d.kw, d.n * d.oh * d.ow);
        if m * n == 0 || k == 0 {
            return;
        }
        let (splits, kc) = split_k(m, n, k);
        let a = ConvArgs { kc: i(kc), ..ConvArgs::of(&d) };
        let mut part = self.inner.pool.take(splits * m * n);
        launch!(self.inner, Kernel::ConvBwdWeight, cfg_tiles(m, n, splits); &a, dy.s(), x.s(), part.sm());
        let (si, len, acc) = (i(splits), i(m * n), 1i32);
        launch!(self.inner, Kernel::SplitKReduce, cfg_1d(m * n); part.s(), &si, &len, dw.sm(), &acc);
    }

    fn batch_norm_forward_train(
        &self,
        x: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        beta: &CudaBuf<E>,
        y: &mut CudaBuf<E>,
        save_mean: &mut CudaBuf<E>,
        save_invstd: &mut CudaBuf<E>,
        running_mean: &mut CudaBuf<E>,
        running_var: &mut CudaBuf<E>,
        d: BatchNormDims,
    ) {
        let n = d.outer * d.channels * d.inner;
        if n == 0 {
            return;
        }
        assert!(x.len() >= n && y.len() >= n && gamma.len() >= d.channels, "batch_norm_forward_train: too small");
        let a = BnArgs::of(&d);
        launch!(self.inner, Kernel::BnFwdTrain, cfg_per_channel(d.channels);
            &a, x.s(), gamma.s(), beta.s(), y.sm(), save_mean.sm(), save_invstd.sm(), running_mean.sm(), running_var.sm());
    }
    fn batch_norm_forward_eval(
        &self,
        x: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        beta: &CudaBuf<E>,
        running_mean: &CudaBuf<E>,
        running_var: &CudaBuf<E>,
        y: &mut CudaBuf<E>,
        d: BatchNormDims,
    ) {
        let n = d.outer * d.channels * d.inner;
        if n == 0 {
            return;
        }
        assert!(x.len() >= n && y.len() >= n && gamma.len() >= d.channels, "batch_norm_forward_eval: too small");
        let a = BnArgs::of(&d);
        launch!(self.inner, Kernel::BnFwdEval, cfg_1d(n);
            &a, x.s(), gamma.s(), beta.s(), running_mean.s(), running_var.s(), y.sm());
    }
    fn batch_norm_backward(
        &self,
        dy: &CudaBuf<E>,
        x: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        save_mean: &CudaBuf<E>,
        save_invstd: &CudaBuf<E>,
        dx: Option<&mut CudaBuf<E>>,
        dgamma: Option<&mut CudaBuf<E>>,
        dbeta: Option<&mut CudaBuf<E>>,
        d: BatchNormDims,
    ) {
        let n = d.outer * d.channels * d.inner;
        if n == 0 {
            return;
        }
        assert!(dy.len() >= n && x.len() >= n, "batch_norm_backward: too small");
        // Absent outputs are replaced by the dummy and flagged off.
        let dummy = &self.inner.dummy;
        let (dxs, dgs, dbs) = (present(dx.as_deref()), present(dgamma.as_deref()), present(dbeta.as_deref()));
        let a = BnArgs {
            has_dx: dxs.is_some() as i32,
            has_dgamma: dgs.is_some() as i32,
            has_dbeta: dbs.is_some() as i32,
            ..BnArgs::of(&d)
        };
        let (dxs, dgs, dbs) = (dxs.unwrap_or(dummy), dgs.unwrap_or(dummy), dbs.unwrap_or(dummy));
        launch!(self.inner, Kernel::BnBwd, cfg_per_channel(d.channels);
            &a, dy.s(), x.s(), gamma.s(), save_mean.s(), save_invstd.s(), dxs, dgs, dbs);
    }

    fn unary_forward(&self, op: Unary, x: &CudaBuf<E>, y: &mut CudaBuf<E>) {
        let n = x.len();
        if n == 0 {
            return;
        }
        assert!(y.len() >= n, "unary_forward: output too small");
        let (code, slope) = unary_code::<E>(op);
        let ni = i(n);
        launch!(self.inner, Kernel::UnaryFwd, cfg_1d(n); &code, &slope, x.s(), y.sm(), &ni);
    }
    fn unary_backward(&self, op: Unary, x: &CudaBuf<E>, y: &CudaBuf<E>, dy: &CudaBuf<E>, dx: &mut CudaBuf<E>) {
        let n = dx.len();
        if n == 0 {
            return;
        }
        assert!(x.len() >= n && y.len() >= n && dy.len() >= n, "unary_backward: operand too small");
        let (code, slope) = unary_code::<E>(op);
        let ni = i(n);
        launch!(self.inner, Kernel::UnaryBwd, cfg_1d(n); &code, &slope, x.s(), y.s(), dy.s(), dx.sm(), &ni);
    }
    fn mul(&self, a: &CudaBuf<E>, b: &CudaBuf<E>, y: &mut CudaBuf<E>) {
        let n = y.len();
        if n == 0 {
            return;
        }
        assert!(a.len() >= n && b.len() >= n, "mul: operand too small");
        let ni = i(n);
        launch!(self.inner, Kernel::Mul, cfg_1d(n); a.s(), b.s(), y.sm(), &ni);
    }
    fn mul_accumulate(&self, a: &CudaBuf<E>, b: &CudaBuf<E>, out: &mut CudaBuf<E>) {
        let n = out.len();
        if n == 0 {
            return;
        }
        assert!(a.len() >= n && b.len() >= n, "mul_accumulate: operand too small");
        let ni = i(n);
        launch!(self.inner, Kernel::MulAcc, cfg_1d(n); a.s(), b.s(), out.sm(), &ni);
    }
    fn axpy(&self, alpha: E, x: &CudaBuf<E>, y: &mut CudaBuf<E>) {
        let n = y.len();
        if n == 0 {
            return;
        }
        assert!(x.len() >= n, "axpy: x too small");
        let ni = i(n);
        launch!(self.inner, Kernel::Axpy, cfg_1d(n); &alpha, x.s(), y.sm(), &ni);
    }
    fn sum(&self, x: &CudaBuf<E>, out: &mut CudaBuf<E>) {
        let n = x.len();
        if n == 0 {
            self.fill(out, E::zero());
            return;
        }
        let g = reduce_blocks(n);
        let mut part = self.inner.scratch.take(g);
        let ni = i(n);
        let cfg = LaunchConfig { grid_dim: (g as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self.inner, Kernel::SumPartial, cfg; x.s(), &ni, part.sm());
        self.reduce_final(&part, g, 1.0, out);
    }
    fn broadcast_scalar_accumulate(&self, dout: &CudaBuf<E>, alpha: E, dx: &mut CudaBuf<E>) {
        let n = dx.len();
        if n == 0 {
            return;
        }
        let ni = i(n);
        launch!(self.inner, Kernel::BroadcastAcc, cfg_1d(n); dout.s(), &alpha, dx.sm(), &ni);
    }

    fn reparam_kl_forward(
        &self,
        mu: &CudaBuf<E>,
        logvar: &CudaBuf<E>,
        eps: &CudaBuf<E>,
        z: &mut CudaBuf<E>,
        kl: &mut CudaBuf<E>,
    ) {
        let n = mu.len();
        if n == 0 {
            self.fill(kl, E::zero());
            return;
        }
        assert!(logvar.len() >= n && eps.len() >= n && z.len() >= n, "reparam_kl_forward: operand too small");
        let g = reduce_blocks(n);
        let mut part = self.inner.scratch.take(g);
        let ni = i(n);
        let cfg = LaunchConfig { grid_dim: (g as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self.inner, Kernel::ReparamKlFwd, cfg; mu.s(), logvar.s(), eps.s(), z.sm(), &ni, part.sm());
        self.reduce_final(&part, g, -0.5, kl);
    }
    fn reparam_kl_backward(
        &self,
        mu: &CudaBuf<E>,
        logvar: &CudaBuf<E>,
        eps: &CudaBuf<E>,
        dz: Option<&CudaBuf<E>>,
        dkl: Option<&CudaBuf<E>>,
        dmu: Option<&mut CudaBuf<E>>,
        dlogvar: Option<&mut CudaBuf<E>>,
    ) {
        let n = mu.len();
        if n == 0 {
            return;
        }
        let dummy = &self.inner.dummy;
        let (dzs, hz) = dz.map_or((dummy, 0i32), |b| (b.s(), 1));
        let (dkls, hk) = dkl.map_or((dummy, 0i32), |b| (b.s(), 1));
        let ni = i(n);
        if let Some(dmu) = dmu {
            launch!(self.inner, Kernel::ReparamBwdMu, cfg_1d(n); mu.s(), dzs, &hz, dkls, &hk, dmu.sm(), &ni);
        }
        if let Some(dlv) = dlogvar {
            launch!(self.inner, Kernel::ReparamBwdLogvar, cfg_1d(n);
                logvar.s(), eps.s(), dzs, &hz, dkls, &hk, dlv.sm(), &ni);
        }
    }
    fn recon_loss_forward(&self, kind: Recon, x: &CudaBuf<E>, target: &CudaBuf<E>, out: &mut CudaBuf<E>) {
        let n = x.len();
        if n == 0 {
            self.fill(out, E::zero());
            return;
        }
        assert!(target.len() >= n, "recon_loss_forward: target too small");
        let g = reduce_blocks(n);
        let mut part = self.inner.scratch.take(g);
        let (code, ni) = (recon_code(kind), i(n));
        let cfg = LaunchConfig { grid_dim: (g as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self.inner, Kernel::LossFwd, cfg; &code, x.s(), target.s(), &ni, part.sm());
        self.reduce_final(&part, g, 1.0, out);
    }
    fn recon_loss_backward(
        &self,
        kind: Recon,
        x: &CudaBuf<E>,
        target: &CudaBuf<E>,
        dout: &CudaBuf<E>,
        dx: &mut CudaBuf<E>,
    ) {
        let n = dx.len();
        if n == 0 {
            return;
        }
        assert!(x.len() >= n && target.len() >= n, "recon_loss_backward: operand too small");
        let (code, ni) = (recon_code(kind), i(n));
        launch!(self.inner, Kernel::LossBwd, cfg_1d(n); &code, x.s(), target.s(), dout.s(), dx.sm(), &ni);
    }

    fn adam_step(
        &self,
        param: &mut CudaBuf<E>,
        grad: &CudaBuf<E>,
        m: &mut CudaBuf<E>,
        v: &mut CudaBuf<E>,
        s: AdamStep,
    ) {
        let n = param.len();
        if n == 0 {
            return;
        }
        assert!(grad.len() >= n && m.len() >= n && v.len() >= n, "adam_step: operand too small");
        // Constants converted to E exactly as AdamStep::apply does on the CPU.
        let (b1, b2) = (E::of(s.beta1), E::of(s.beta2));
        let a = AdamArgs {
            beta1: b1,
            beta2: b2,
            one_minus_beta1: E::one() - b1,
            one_minus_beta2: E::one() - b2,
            eps: E::of(s.eps),
            weight_decay: E::of(s.weight_decay),
            decay_factor: E::one() - E::of(s.lr * s.weight_decay),
            step_size: E::of(s.lr / s.bias_correction1),
            bc2_sqrt: E::of(s.bias_correction2_sqrt),
            mode: if s.weight_decay == 0.0 {
                0
            } else if s.decoupled {
                2
            } else {
                1
            },
            n: i(n),
        };
        launch!(self.inner, Kernel::Adam, cfg_1d(n); &a, param.sm(), grad.s(), m.sm(), v.sm());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_k_covers_the_reduction() {
        for &(m, n, k) in &[(32, 9, 100352), (784, 400, 128), (1, 1, 1), (64, 64, 0), (20, 400, 128), (3, 5, 17)] {
            let (s, kc) = split_k(m, n, k);
            assert!(s >= 1 && kc % 16 == 0 && kc >= 1);
            // Every chunk starts inside [0, k) (or there is one chunk) and together they cover it.
            assert!(s * kc >= k && (s == 1 || (s - 1) * kc < k), "{m}x{n}x{k}: {s} × {kc}");
        }
    }

    #[test]
    fn every_kernel_is_in_a_file() {
        for k in KERNEL_NAMES {
            assert!(compile::FILES.iter().any(|f| f.kernels.contains(k)), "{k} is in no kernel file");
        }
        let listed: usize = compile::FILES.iter().map(|f| f.kernels.len()).sum();
        assert_eq!(listed, KERNEL_NAMES.len());
    }
}
