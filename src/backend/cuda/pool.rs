//! Device memory pool: freed buffers go back to a free list keyed by their exact length and
//! are handed out again, so once a training step has run, the next ones (same shapes) make no
//! new `cuMemAlloc`. The pool never returns memory to the driver while the backend lives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, DriverError};

use super::error::GpuError;

/// The free lists of one element type on one stream. The CUDA backend holds two: one for
/// tensors (`T` = the element type) and one for the f64 partial sums of reductions.
pub struct Pool<T: DeviceRepr> {
    stream: Arc<CudaStream>,
    free: Mutex<HashMap<usize, Vec<CudaSlice<T>>>>,
    /// Real device allocations made so far (for tests and logs).
    allocations: AtomicUsize,
}

impl<T: DeviceRepr> Pool<T> {
    /// An empty pool allocating on `stream`; shared (`Arc`) because every buffer it hands out
    /// holds it, to return to it on drop.
    pub fn new(stream: Arc<CudaStream>) -> Arc<Self> {
        Arc::new(Pool { stream, free: Mutex::new(HashMap::new()), allocations: AtomicUsize::new(0) })
    }

    /// A buffer of `len` elements with undefined contents.
    pub fn take(self: &Arc<Self>, len: usize) -> CudaBuf<T> {
        let slice = (len > 0).then(|| {
            let reused = self.free.lock().unwrap().get_mut(&len).and_then(Vec::pop);
            reused.unwrap_or_else(|| {
                self.allocations.fetch_add(1, Ordering::Relaxed);
                // SAFETY: the contents are undefined until written; every caller writes
                // (zero-fills, uploads or runs a kernel that overwrites) before reading.
                unsafe { self.stream.alloc::<T>(len) }.unwrap_or_else(|e| self.alloc_failed(len, e).raise())
            })
        });
        CudaBuf { slice, len, pool: self.clone() }
    }

    /// The error of a failed allocation of `len` elements: out of memory, with how much was
    /// asked and how much is free, or the driver's error.
    fn alloc_failed(&self, len: usize, e: DriverError) -> GpuError {
        alloc_error(&self.stream, (len * std::mem::size_of::<T>()) as u64, e)
    }

    /// Real device allocations (`cuMemAlloc` calls) made so far; reused buffers do not count.
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::Relaxed)
    }
}

/// The error of a failed allocation of `requested_bytes`: out of memory, with how much was
/// asked and how much is free, or the driver's error.
pub(crate) fn alloc_error(stream: &CudaStream, requested_bytes: u64, e: DriverError) -> GpuError {
    if e.0 != CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return GpuError::driver(format!("allocating {requested_bytes} bytes of device memory"), e);
    }
    let (free, total) = stream.context().mem_get_info().unwrap_or((0, 0));
    GpuError::OutOfMemory { requested_bytes, free_bytes: free as u64, total_bytes: total as u64 }
}

/// Bytes on the device (a dataset's `u8` pixels), outside the pool: uploaded once, freed
/// when dropped. Zero-length buffers own no memory.
pub struct CudaBytes {
    pub(crate) slice: Option<CudaSlice<u8>>,
    pub(crate) len: usize,
}

impl CudaBytes {
    /// The number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A device buffer of `len` elements that returns to its pool when dropped. Zero-length
/// buffers own no memory.
pub struct CudaBuf<T: DeviceRepr> {
    slice: Option<CudaSlice<T>>,
    len: usize,
    pool: Arc<Pool<T>>,
}

impl<T: DeviceRepr> CudaBuf<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer has no elements (and so no device memory).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device slice (callers skip zero-length buffers before asking).
    pub fn s(&self) -> &CudaSlice<T> {
        self.slice.as_ref().expect("zero-length CUDA buffer has no device memory")
    }
    /// The device slice, mutably: what a kernel launch's output parameter takes.
    pub fn sm(&mut self) -> &mut CudaSlice<T> {
        self.slice.as_mut().expect("zero-length CUDA buffer has no device memory")
    }
}

impl<T: DeviceRepr> Drop for CudaBuf<T> {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            self.pool.free.lock().unwrap().entry(self.len).or_default().push(s);
        }
    }
}
