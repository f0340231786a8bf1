//! The CUDA backend: the same `Backend` trait as the CPU reference, every op a hand-written
//! kernel from `kernels/`, compiled at run time by NVRTC and launched on one stream through
//! cudarc. The same code drives a real GPU and the emulated device ([`emu`]), which runs the
//! kernels on the CPU under a stand-in driver library.
//!
//! | file | what |
//! |---|---|
//! | [`contract`] | what Rust and CUDA share, written once: constants, enum codes, argument structs |
//! | [`kernels`] | the kernel table (name, file, parameters), typed launchers, launch geometry |
//! | [`compile`] | embedding the sources, NVRTC, the on-disk CUBIN cache |
//! | [`device`] | finding and opening a GPU |
//! | [`error`] | [`GpuError`]: unavailable, compile, driver, out of memory |
//! | [`pool`] | the device memory pool |
//! | `ops.rs` | `impl Backend for Cuda`: shapes checked, then one or two launches per method |
//! | [`emu`] | the emulated device: builds the stand-in driver and the host kernels, loads them |
//!
//! Shapes travel by value as kernel arguments, never through device memory, so steps stay
//! graph-capturable. Reductions combine partial results in a fixed order with no atomics:
//! seeded runs are bitwise reproducible. `backward*` methods add into their outputs, as on the
//! CPU.

pub mod compile;
pub mod contract;
pub mod device;
pub mod emu;
pub mod error;
pub mod kernels;
mod ops;
pub mod pool;
pub mod trace;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, ValidAsZeroBits};

pub use compile::{compile_all_for_arch, CompileReport, FileReport};
pub use device::{open, probe, GpuInfo};
pub use error::GpuError;
pub use pool::{CudaBuf, CudaBytes};

use crate::backend::AdamStep;
use crate::tensor::Float;
use kernels::Launcher;
use pool::Pool;

/// The element types the CUDA backend instantiates (f32 and f64).
pub trait CudaFloat: Float + DeviceRepr + ValidAsZeroBits {}
impl CudaFloat for f32 {}
impl CudaFloat for f64 {}

struct Inner<E: CudaFloat> {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Launcher<E>,
    pool: Arc<Pool<E>>,
    /// Double-precision scratch of the reductions' partial sums.
    scratch: Arc<Pool<f64>>,
    /// Row indices of `gather_rows`, grown as needed.
    idx: Mutex<Option<CudaSlice<u32>>>,
    /// The multi-tensor kernels' tables of device addresses, by their contents: uploaded the
    /// first time a set of buffers is seen, then found here (a model's parameters, gradients
    /// and moments live as long as the model, so after the first steps every lookup hits and
    /// a step copies nothing to the device for them).
    /// Shared (`Arc`) so that a graph whose nodes point at a table keeps it alive.
    tables: Mutex<HashMap<Vec<u64>, Arc<CudaSlice<u64>>>>,
    /// The constants of the Adam step staged last, which `adam_multi` reads from device
    /// memory (allocated once, so its address is the same in every captured graph), and the
    /// step they are for.
    adam_args: Mutex<Option<(CudaSlice<contract::AdamArgs<E>>, AdamStep)>>,
    /// While a graph is captured: the tables its nodes use, for the graph to hold.
    capture: Mutex<Option<Vec<Arc<CudaSlice<u64>>>>>,
    info: GpuInfo,
}

/// The CUDA backend on one GPU, computing in `E` (f32 to train, f64 to check gradients).
/// Clones share the device, its stream, the loaded kernels and the memory pool.
pub struct Cuda<E: CudaFloat> {
    inner: Arc<Inner<E>>,
    /// The precision of the matrix products (`--precision`): f32 runs the FMA tile engine,
    /// TF32 and BF16 the tensor-core kernels (f32 backends only).
    precision: crate::backend::Precision,
    /// Whether repeated steps are captured as CUDA graphs and replayed (`--no-graph` turns it
    /// off); see `crate::graph`.
    graphs: bool,
}

impl<E: CudaFloat> Clone for Cuda<E> {
    fn clone(&self) -> Self {
        Cuda { inner: self.inner.clone(), precision: self.precision, graphs: self.graphs }
    }
}

/// A training or evaluation step captured once and replayed ([`crate::graph`]): the CUDA
/// graph and everything its nodes point into. Fields drop in order: the graph first, then
/// the memory.
pub struct CudaStepGraph<E: CudaFloat> {
    graph: cudarc::driver::CudaGraph,
    _memory: pool::PrivateMemory<E>,
    _scratch: pool::PrivateMemory<f64>,
    _tables: Vec<Arc<CudaSlice<u64>>>,
}

// SAFETY: the driver lets a graph be used from any thread provided calls on it are not made
// concurrently ("Graph object thread safety", CUDA driver API). Send only moves ownership
// (a trainer stepping on a rayon worker); without Sync no two threads share one.
unsafe impl<E: CudaFloat> Send for CudaStepGraph<E> {}

/// Compiles `file` for `arch` (or reads its CUBIN from the disk cache) and loads it into
/// `ctx`; on the emulated device, the file's host build is made and registered first.
fn load_kernel_file(
    ctx: &Arc<CudaContext>,
    file: &'static compile::KernelFile,
    arch: &str,
) -> Result<Arc<cudarc::driver::CudaModule>, GpuError> {
    if emu::is_installed() {
        emu::load_kernel_file(file)?;
    }
    let err = |e| GpuError::driver(format!("loading kernels/{}", file.name), e);
    let load = |bin: Vec<u8>| ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin));
    let cubin = compile::cubin_cached(file, arch)?;
    match load(cubin.binary) {
        Ok(m) => Ok(m),
        // A cached CUBIN the driver refuses (damaged on disk): compile afresh, once.
        Err(_) if cubin.from_cache => load(compile::cubin_fresh(file, arch)?.binary).map_err(err),
        Err(e) => Err(err(e)),
    }
}

impl<E: CudaFloat> Cuda<E> {
    /// Opens GPU `ordinal`. Each kernel file is compiled for its compute capability (or loaded
    /// from the disk cache) when one of its kernels is first launched
    /// ([`Cuda::load_all_kernels`] does all of them at once). Never panics.
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        device::libs_present()?;
        device::catch_quietly(|| Self::open(ordinal)).unwrap_or_else(|| {
            Err(GpuError::Unavailable(format!(
                "opening CUDA device {ordinal} panicked inside cudarc (driver too old?)"
            )))
        })
    }

    fn open(ordinal: usize) -> Result<Self, GpuError> {
        let info = device::probe_inner()?
            .into_iter()
            .find(|g| g.ordinal == ordinal)
            .ok_or_else(|| GpuError::Unavailable(format!("there is no CUDA device {ordinal} (see `nvidia-smi`)")))?;
        let err = |what: &str| {
            let what = format!("{what} on CUDA device {ordinal}");
            move |e| GpuError::driver(what, e)
        };
        let ctx = CudaContext::new(ordinal).map_err(err("creating the context"))?;
        // One stream, no cross-stream events: automatic event tracking would only add
        // overhead, and would record events into captured graphs.
        // SAFETY: called before any allocation on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(err("creating a stream"))?;
        let (major, minor) = info.compute_capability;
        // Kernel files compile (or load from the disk cache) on first use, each into its own
        // module (see `Launcher`); NVRTC must be there before anything runs.
        compile::nvrtc_version()?;
        let kernels = Launcher::new(ctx.clone(), stream.clone(), format!("sm_{major}{minor}"));
        let inner = Inner {
            kernels,
            pool: Pool::new(stream.clone()),
            scratch: Pool::new(stream.clone()),
            ctx,
            stream,
            idx: Mutex::new(None),
            tables: Mutex::new(HashMap::new()),
            adam_args: Mutex::new(None),
            capture: Mutex::new(None),
            info,
        };
        Ok(Cuda { inner: Arc::new(inner), precision: crate::backend::Precision::F32, graphs: true })
    }

    /// Compiles (or loads from the disk cache) and loads every kernel file now, instead of on
    /// first use: for a program that wants a kernel that does not compile, or a slow first
    /// compile, to show at its start rather than in its first step (`vae` does this).
    pub fn load_all_kernels(&self) -> Result<(), GpuError> {
        // The files side by side: NVRTC and the emulator's host builds are single-threaded.
        std::thread::scope(|s| {
            let jobs: Vec<_> = compile::FILES.iter().map(|f| s.spawn(|| self.k().module(f.name).map(|_| ()))).collect();
            jobs.into_iter().try_for_each(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })
    }

    /// This backend with its matrix products (linear layers, convolutions) at `precision`:
    /// TF32 and BF16 run them on the tensor cores (`mma.sync`), operands rounded as the CPU
    /// backend rounds them at that precision, sums in f32. Shares the device with `self`.
    /// Panics for an f64 backend at a precision other than f32 (f64 exists to check gradients
    /// exactly).
    pub fn with_precision(&self, precision: crate::backend::Precision) -> Self {
        assert!(
            precision == crate::backend::Precision::F32 || std::mem::size_of::<E>() == 4,
            "tensor-core precisions are for f32 backends"
        );
        Cuda { inner: self.inner.clone(), precision, graphs: self.graphs }
    }

    /// This backend with CUDA graphs on (the default) or off (`--no-graph`: every step runs
    /// eagerly, one launch at a time, which is what a debugger or a profiler wants). Shares the
    /// device with `self`.
    pub fn with_graphs(&self, graphs: bool) -> Self {
        Cuda { inner: self.inner.clone(), precision: self.precision, graphs }
    }

    /// The GPU this backend runs on, as probed when it was opened.
    pub fn info(&self) -> &GpuInfo {
        &self.inner.info
    }

    /// Device allocations made so far by the pools (constant once training is warm).
    pub fn device_allocations(&self) -> usize {
        self.inner.pool.allocations() + self.inner.scratch.allocations()
    }

    /// The GPU's streaming multiprocessors (for sizing the roofline probe).
    pub fn multiprocessors(&self) -> u32 {
        use cudarc::driver::sys::CUdevice_attribute as A;
        self.inner.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap_or(100).max(1) as u32
    }

    /// Launches the FMA-bound roofline probe (`fma_peak`, kernels/elementwise.cu): `blocks`
    /// blocks of [`contract::BLOCK`] threads, each doing `iters` × 8 FMAs. See
    /// [`crate::bench::Roofline`].
    pub fn fma_probe(&self, blocks: u32, iters: i32) {
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (contract::BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut sink = self.inner.pool.take(1);
        self.check(self.k().fma_peak(cfg, sink.sm(), iters, E::of(0.5)), "launching fma_peak");
    }

    /// The typed kernel launchers.
    fn k(&self) -> &Launcher<E> {
        &self.inner.kernels
    }

    /// Raises a failed driver call as a [`GpuError`] (see `GpuError::raise`).
    fn check<T>(&self, r: Result<T, cudarc::driver::DriverError>, during: &str) -> T {
        r.unwrap_or_else(|e| GpuError::driver(during, e).raise())
    }

    fn sync_or_raise(&self) {
        trace::push(|| trace::EventKind::Synchronize);
        self.check(self.inner.stream.synchronize(), "waiting for the GPU");
    }
}
