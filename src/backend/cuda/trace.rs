//! The launch trace: what the CUDA backend asks of the device, one event per kernel launch,
//! memset, copy and synchronization, with the backend method (op) and shape it served.
//!
//! Off by default and cheap when off (one thread-local flag read per call). [`record`] turns
//! it on for the duration of a closure, on the calling thread only (the backend issues every
//! call from the thread that calls it, and tests running in parallel must not see each
//! other's launches). It sits in the backend's launch path, above the driver, so it records
//! the same events on a real GPU and on the emulated device. [`crate::model`] prices a trace.

use std::cell::{Cell, RefCell};

use super::contract::{BnArgs, ConvArgs, GemmArgs};
use super::kernels::Kernel;

/// One argument of a recorded launch: what the performance model needs to know of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A device buffer of `elems` elements of `elem_bytes` bytes each.
    Buf {
        /// Its length in elements.
        elems: usize,
        /// Bytes per element.
        elem_bytes: usize,
    },
    /// An absent optional buffer (a null pointer).
    Null,
    /// An `int`.
    Int(i32),
    /// A floating-point scalar.
    Float(f64),
    /// The GEMM argument struct.
    Gemm(GemmArgs),
    /// The convolution argument struct.
    Conv(ConvArgs),
    /// The batch-norm argument struct.
    Bn(BnArgs),
    /// The Adam argument struct: only its length matters here.
    Adam {
        /// Parameters updated.
        n: i32,
    },
}

/// A kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// Which kernel of the table.
    pub kernel: Kernel,
    /// Grid dimensions (blocks).
    pub grid: [u32; 3],
    /// Block dimensions (threads).
    pub block: [u32; 3],
    /// Dynamic shared memory, bytes.
    pub dynamic_shared_bytes: u32,
    /// Bytes per element of the instantiation (4: `_f32`, 8: `_f64`).
    pub elem_bytes: usize,
    /// Its arguments, in the table's order.
    pub args: Vec<Arg>,
}

impl Launch {
    /// Blocks in the grid.
    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|&g| g as u64).product()
    }
    /// Threads per block.
    pub fn threads_per_block(&self) -> u32 {
        self.block.iter().product()
    }
}

/// Which way a copy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyDir {
    /// Host to device.
    HostToDevice,
    /// Device to host.
    DeviceToHost,
    /// Device to device.
    DeviceToDevice,
}

/// What one event asked of the device.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    /// A kernel launch.
    Launch(Launch),
    /// A memset of `bytes` bytes (to zero).
    Memset {
        /// Bytes set.
        bytes: u64,
    },
    /// A copy of `bytes` bytes.
    Copy {
        /// Direction.
        dir: CopyDir,
        /// Bytes copied.
        bytes: u64,
    },
    /// The host waited for the stream to finish.
    Synchronize,
    /// A captured CUDA graph was replayed: its nodes are not traced again (trace a step with
    /// graphs off to see them; the model prices eager traces).
    GraphLaunch,
}

/// One recorded event, with the backend method it served.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The `Backend` method (`conv2d_forward`, `adam_step`, ...), or `-` outside any.
    pub op: &'static str,
    /// The shape that method was called with (`128x32x14x14 → 64 k4 s2`), or empty.
    pub shape: String,
    /// What was asked.
    pub kind: EventKind,
}

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static EVENTS: RefCell<Vec<Event>> = const { RefCell::new(Vec::new()) };
    static OP: RefCell<(&'static str, String)> = const { RefCell::new(("-", String::new())) };
}

/// Runs `f` with the recorder on for this thread and returns its result and every event the
/// CUDA backend issued meanwhile, in order. Nested calls are not supported (the inner one
/// takes the events).
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Vec<Event>) {
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            ON.with(|o| o.set(false));
        }
    }
    EVENTS.with(|e| e.borrow_mut().clear());
    ON.with(|o| o.set(true));
    let off = Off;
    let r = f();
    drop(off);
    (r, EVENTS.with(|e| std::mem::take(&mut *e.borrow_mut())))
}

/// Whether this thread is recording.
#[inline]
pub(crate) fn on() -> bool {
    ON.with(Cell::get)
}

/// Records an event under the current op (when recording).
pub(crate) fn push(kind: impl FnOnce() -> EventKind) {
    if on() {
        let (op, shape) = OP.with(|o| o.borrow().clone());
        let kind = kind();
        EVENTS.with(|e| e.borrow_mut().push(Event { op, shape, kind }));
    }
}

/// Labels the events until it is dropped with the backend method `name` and the shape
/// `shape()` (computed only when recording). The label it replaced comes back on drop, so a
/// method that calls another keeps its own label afterwards.
pub(crate) fn op(name: &'static str, shape: impl FnOnce() -> String) -> OpGuard {
    if !on() {
        return OpGuard(None);
    }
    let prev = OP.with(|o| std::mem::replace(&mut *o.borrow_mut(), (name, shape())));
    OpGuard(Some(prev))
}

/// Restores the previous op label on drop (see [`op`]).
pub(crate) struct OpGuard(Option<(&'static str, String)>);

impl Drop for OpGuard {
    fn drop(&mut self) {
        if let Some(prev) = self.0.take() {
            OP.with(|o| *o.borrow_mut() = prev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_inside_the_closure_and_labels_by_op() {
        push(|| EventKind::Synchronize);
        let ((), events) = record(|| {
            push(|| EventKind::Memset { bytes: 8 });
            let _g = op("outer", || "3x4".into());
            {
                let _h = op("inner", String::new);
                push(|| EventKind::Synchronize);
            }
            push(|| EventKind::Copy { dir: CopyDir::HostToDevice, bytes: 4 });
        });
        push(|| EventKind::Synchronize);
        let got: Vec<(&str, &str)> = events.iter().map(|e| (e.op, e.shape.as_str())).collect();
        assert_eq!(got, [("-", ""), ("inner", ""), ("outer", "3x4")]);
        assert_eq!(events[0].kind, EventKind::Memset { bytes: 8 });
        assert!(!on());
    }
}
