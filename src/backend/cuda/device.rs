//! Finding a GPU: which CUDA driver is loaded (the real one, or the emulated device of
//! [`super::emu`]), which devices it has, and opening one. Nothing here panics: cudarc panics
//! when a library is missing, so the libraries are probed first, and a panic inside cudarc (a
//! missing symbol in an old driver) is caught and reported as one line.

use super::compile;
use super::error::GpuError;
use super::{Cuda, CudaFloat};

/// One GPU as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// The device's index: `--device cuda:N` and [`open`] take it.
    pub ordinal: usize,
    /// The name the driver reports (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// (major, minor): the kernels are compiled for `sm_<major><minor>`.
    pub compute_capability: (u32, u32),
    /// Total device memory, in bytes.
    pub memory_bytes: u64,
}

fn driver_missing() -> GpuError {
    GpuError::Unavailable(
        "no NVIDIA driver found (libcuda.so could not be loaded): install the NVIDIA driver (CUDA 13 or newer), \
         use the CPU, or run the kernels on the CPU with --device emu"
            .to_string(),
    )
}

/// Both libraries the backend loads at run time must be present; cudarc panics otherwise.
pub(crate) fn libs_present() -> Result<(), GpuError> {
    // SAFETY: only tries to dlopen the library (or finds the emulated driver loaded).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(driver_missing());
    }
    if !compile::nvrtc_present() {
        return Err(compile::nvrtc_missing());
    }
    Ok(())
}

/// The GPUs this machine has (or the emulated device, once installed).
pub fn probe() -> Result<Vec<GpuInfo>, GpuError> {
    libs_present()?;
    catch_quietly(probe_inner).unwrap_or_else(|| {
        Err(GpuError::Unavailable("the CUDA driver library is too old for this build (CUDA 13 needed)".to_string()))
    })
}

/// Opens GPU `ordinal` after checking, through `probe`, that it exists: the one call the CLI
/// and the benches make. No driver, no NVRTC or no GPU is `GpuError::Unavailable`; a kernel
/// that fails to compile or a driver error is not.
pub fn open<E: CudaFloat>(ordinal: usize) -> Result<Cuda<E>, GpuError> {
    let gpus = probe()?;
    if !gpus.iter().any(|g| g.ordinal == ordinal) {
        return Err(GpuError::Unavailable(match gpus.len() {
            0 => "the CUDA driver is installed but reports no GPU (see `nvidia-smi`)".to_string(),
            n => format!("there is no cuda:{ordinal}; this machine has {n} GPU(s), cuda:0..cuda:{}", n - 1),
        }));
    }
    Cuda::new(ordinal)
}

thread_local! {
    /// Set while `catch_quietly` runs on this thread.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol in an old driver) into `None`
/// without letting the process's panic hook print it: the caller reports it as one line.
/// Only this thread's panics are silenced (the hook is wrapped once, not swapped per call:
/// another thread's panic at that moment would have lost its message).
pub(crate) fn catch_quietly<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Option<R> {
    static WRAP: std::sync::Once = std::sync::Once::new();
    WRAP.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info)
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(f).ok();
    QUIET.with(|q| q.set(false));
    r
}

pub(crate) fn probe_inner() -> Result<Vec<GpuInfo>, GpuError> {
    use cudarc::driver::result::device;
    use cudarc::driver::sys::CUdevice_attribute as A;
    use cudarc::driver::sys::CUresult;
    match cudarc::driver::result::init() {
        Ok(()) => {}
        // A driver without a usable GPU (no device, or none this process may see).
        Err(e) if matches!(e.0, CUresult::CUDA_ERROR_NO_DEVICE | CUresult::CUDA_ERROR_NOT_PERMITTED) => {
            return Err(GpuError::Unavailable(format!("the CUDA driver found no usable GPU ({e:?})")))
        }
        Err(e) => return Err(GpuError::driver("initializing the CUDA driver (check `nvidia-smi`)", e)),
    }
    let count = device::get_count().map_err(|e| GpuError::driver("counting CUDA devices", e))?;
    (0..count)
        .map(|i| {
            let err = |e| GpuError::driver(format!("querying CUDA device {i}"), e);
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
