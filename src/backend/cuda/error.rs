//! What can go wrong with a GPU, as a type: the CLI falls back to the CPU for
//! [`GpuError::Unavailable`] only; everything else is an error the user must see.

use std::fmt;

/// A GPU error, each variant's message one line that says what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuError {
    /// No GPU to use: the driver, NVRTC, a device (or, for the emulated device, a C++
    /// compiler) is missing. The one case where `--device auto` uses the CPU instead.
    Unavailable(String),
    /// NVRTC (or, on the emulated device, the host C++ compiler) rejected our kernels: a bug
    /// in `kernels/`, never a reason to fall back silently. `log` is the compiler's.
    Compile {
        /// The kernel file (under `kernels/`) that failed.
        file: String,
        /// The compiler's messages.
        log: String,
    },
    /// The driver reported an error during `during`.
    Driver {
        /// What the backend was doing, as a phrase ("copying to the GPU").
        during: String,
        /// The driver's error code, as cudarc prints it.
        error: String,
    },
    /// An allocation did not fit in device memory.
    OutOfMemory {
        /// Size of the allocation that failed.
        requested_bytes: u64,
        /// Device memory free at that moment, by the driver's count.
        free_bytes: u64,
        /// The device's total memory.
        total_bytes: u64,
    },
    /// Capturing a step as a CUDA graph failed: a bug in vaecuda (the step did something a
    /// graph cannot hold); `--no-graph` runs the step eagerly instead.
    Graph(String),
}

impl GpuError {
    /// A [`GpuError::Driver`] for a failed call made while `during` (its message reads
    /// "CUDA driver error while `during`: ...").
    pub fn driver(during: impl Into<String>, error: impl fmt::Debug) -> Self {
        GpuError::Driver { during: during.into(), error: format!("{error:?}") }
    }
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuError::Unavailable(why) => write!(f, "{why}"),
            GpuError::Compile { file, log } => {
                write!(f, "the CUDA kernels failed to compile (kernels/{file}); this is a bug in vaecuda: {log}")
            }
            GpuError::Driver { during, error } => write!(f, "CUDA driver error while {during}: {error}"),
            GpuError::OutOfMemory { requested_bytes, free_bytes, total_bytes } => write!(
                f,
                "out of GPU memory: asked for {} with {} free of {}; try a smaller --batch-size",
                crate::backend::human_bytes(*requested_bytes),
                crate::backend::human_bytes(*free_bytes),
                crate::backend::human_bytes(*total_bytes)
            ),
            GpuError::Graph(why) => write!(
                f,
                "capturing the step as a CUDA graph failed ({why}); this is a bug in vaecuda: \
                 --no-graph runs without graphs"
            ),
        }
    }
}

impl std::error::Error for GpuError {}

thread_local! {
    /// The last error raised on this thread, so the panic hook can tell a raised GpuError from
    /// another panic with the same text.
    static RAISED: std::cell::RefCell<Option<GpuError>> = const { std::cell::RefCell::new(None) };
}

impl GpuError {
    /// Raises this error from inside a `Backend` method (which cannot return one): a panic
    /// whose message is the error's (so a test harness prints it), remembered as a GpuError so
    /// `vae` reports it as one line ([`GpuError::from_panic`]) rather than as an internal error.
    pub fn raise(self) -> ! {
        let message = self.to_string();
        RAISED.with(|r| *r.borrow_mut() = Some(self));
        std::panic::panic_any(message)
    }
    /// The error a panic carried, if it was raised with [`GpuError::raise`] on this thread.
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Option<GpuError> {
        let message = payload.downcast_ref::<String>()?;
        RAISED.with(|r| r.borrow().clone().filter(|e| &e.to_string() == message))
    }
}
