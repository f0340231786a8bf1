//! Scratch memory for the CPU ops, kept between calls: an op that needs a few hundred KB of
//! working space per task takes it here instead of from the allocator, so a training step
//! that repeats the same ops faults no fresh pages (perf had the kernel zeroing new pages at
//! 7% of a conv-bn step, `clear_page_erms`).

use std::sync::Mutex;

use crate::tensor::Float;

/// Buffers handed back, reused by the next `with` (as `f64`: aligned for both element types).
static POOL: Mutex<Vec<Vec<f64>>> = Mutex::new(Vec::new());
/// Buffers kept at most: a few per task of the widest parallel op.
const KEEP: usize = 64;

/// Runs `f` on a scratch slice of `len` elements whose contents are left over from earlier
/// use (every caller writes what it reads, or clears it).
pub fn with<E: Float, R>(len: usize, f: impl FnOnce(&mut [E]) -> R) -> R {
    let words = (len * std::mem::size_of::<E>()).div_ceil(8);
    let mut buf = {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        // The smallest buffer that is large enough, else the largest (grown below).
        let best = (0..pool.len())
            .filter(|&i| pool[i].len() >= words)
            .min_by_key(|&i| pool[i].len())
            .or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()));
        best.map(|i| pool.swap_remove(i)).unwrap_or_default()
    };
    if buf.len() < words {
        buf.resize(words, 0.0);
    }
    let out = f(&mut bytemuck::cast_slice_mut::<f64, E>(&mut buf)[..len]);
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < KEEP {
        pool.push(buf);
    }
    out
}
