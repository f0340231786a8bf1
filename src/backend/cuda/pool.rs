//! Device memory pool: freed buffers go back to a free list keyed by their exact length and
//! are handed out again, so once a training step has run, the next ones (same shapes) make no
//! new `cuMemAlloc`. The pool never returns memory to the driver while the backend lives.
//!
//! A CUDA graph bakes the addresses of every buffer its step used into its nodes, so those
//! buffers must never be handed to anyone else while the graph lives. While a graph is being
//! captured the pool works from free lists of the graph's own ([`Pool::begin_private`]):
//! every buffer taken then goes home to them when dropped, and the graph holds them
//! ([`PrivateMemory`]) until it is dropped. This is PyTorch's design too (a private memory
//! pool per captured graph).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, DriverError};

use super::error::GpuError;

/// Free buffers by exact length.
type FreeLists<T> = Mutex<HashMap<usize, Vec<CudaSlice<T>>>>;

fn pop<T: DeviceRepr>(lists: &FreeLists<T>, len: usize) -> Option<CudaSlice<T>> {
    lists.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&len).and_then(Vec::pop)
}

/// The free lists of a graph being captured: where its buffers come from and go home to.
struct Private<T: DeviceRepr> {
    /// Where buffers taken during the capture return: the graph's memory from then on.
    home: Arc<FreeLists<T>>,
    /// The shared free buffers at the start of the capture, lent to it: the capture takes
    /// from them (it must not allocate: a GPU would record an allocation into the graph) and
    /// those it did not take go back to the shared lists when it ends.
    lent: HashMap<usize, Vec<CudaSlice<T>>>,
}

/// The memory a captured graph's nodes point into: hold it as long as the graph.
pub struct PrivateMemory<T: DeviceRepr> {
    _home: Arc<FreeLists<T>>,
}

/// The free lists of one element type on one stream. The CUDA backend holds two: one for
/// tensors (`T` = the element type) and one for the f64 partial sums of reductions.
pub struct Pool<T: DeviceRepr> {
    stream: Arc<CudaStream>,
    shared: Arc<FreeLists<T>>,
    /// Set while a graph is captured (see the module doc).
    private: Mutex<Option<Private<T>>>,
    /// Real device allocations made so far (for tests and logs).
    allocations: AtomicUsize,
}

impl<T: DeviceRepr> Pool<T> {
    /// An empty pool allocating on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Arc<Self> {
        Arc::new(Pool {
            stream,
            shared: Arc::new(Mutex::new(HashMap::new())),
            private: Mutex::new(None),
            allocations: AtomicUsize::new(0),
        })
    }

    /// A buffer of `len` elements with undefined contents.
    pub fn take(self: &Arc<Self>, len: usize) -> CudaBuf<T> {
        let mut private = self.private.lock().unwrap_or_else(|p| p.into_inner());
        let home = private.as_ref().map_or(&self.shared, |p| &p.home).clone();
        let slice = (len > 0).then(|| {
            let reused = match private.as_mut() {
                Some(p) => pop(&p.home, len).or_else(|| p.lent.get_mut(&len).and_then(Vec::pop)),
                None => pop(&self.shared, len),
            };
            reused.unwrap_or_else(|| {
                if private.is_some() {
                    GpuError::Graph(format!("it asked for a buffer of {len} elements its eager run did not need"))
                        .raise()
                }
                self.allocations.fetch_add(1, Ordering::Relaxed);
                // SAFETY: the contents are undefined until written; every caller writes
                // (zero-fills, uploads or runs a kernel that overwrites) before reading.
                unsafe { self.stream.alloc::<T>(len) }.unwrap_or_else(|e| self.alloc_failed(len, e).raise())
            })
        });
        CudaBuf { slice, len, home }
    }

    /// From now until [`Pool::end_private`], buffers come from (and return to) free lists of
    /// a graph being captured, starting from the shared free buffers lent to it.
    pub fn begin_private(&self) {
        let mut private = self.private.lock().unwrap_or_else(|p| p.into_inner());
        assert!(private.is_none(), "one graph is captured at a time");
        let lent = std::mem::take(&mut *self.shared.lock().unwrap_or_else(|p| p.into_inner()));
        *private = Some(Private { home: Arc::new(Mutex::new(HashMap::new())), lent });
    }

    /// Ends [`Pool::begin_private`]: the lent buffers the capture did not take go back to the
    /// shared lists; the ones it took now belong to the graph.
    pub fn end_private(&self) -> PrivateMemory<T> {
        let p = self.private.lock().unwrap_or_else(|p| p.into_inner()).take().expect("a private capture");
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        for (len, mut bufs) in p.lent {
            shared.entry(len).or_default().append(&mut bufs);
        }
        PrivateMemory { _home: p.home }
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

/// A device buffer of `len` elements that returns to its pool's free lists when dropped (the
/// shared ones, or those of the graph it was captured into). Zero-length buffers own no
/// memory.
pub struct CudaBuf<T: DeviceRepr> {
    slice: Option<CudaSlice<T>>,
    len: usize,
    home: Arc<FreeLists<T>>,
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
            self.home.lock().unwrap_or_else(|p| p.into_inner()).entry(self.len).or_default().push(s);
        }
    }
}
