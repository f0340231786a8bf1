//! The bias of linear and conv2d layers over an [outer, channels, inner] view (inner = 1 for a
//! linear layer, h·w for a convolution): the CPU forward (add) and backward (per-channel sum).
//! The tape-level ops call them through `Backend::bias_add` / `Backend::bias_backward`.

use crate::tensor::Float;

/// `y[o, c, i] += b[c]`
pub fn bias_add<E: Float>(y: &mut [E], b: &[E], outer: usize, channels: usize, inner: usize) {
    assert!(y.len() == outer * channels * inner && b.len() == channels, "bias_add: shapes differ");
    for row in y.chunks_exact_mut(channels * inner) {
        if inner == 1 {
            row.iter_mut().zip(b).for_each(|(v, &bc)| *v += bc);
        } else {
            for (plane, &bc) in row.chunks_exact_mut(inner).zip(b) {
                plane.iter_mut().for_each(|v| *v += bc);
            }
        }
    }
}

/// `db[c] += Σ_{o,i} dy[o, c, i]`, in f64, rows taken in order (deterministic whatever the
/// thread count). Channels are split into blocks, one task each, and every task walks the rows
/// front to back so its reads stay contiguous: with inner = 1 (a linear layer's bias) a
/// channel-at-a-time loop would stride across rows and cost more than the GEMMs around it.
pub fn bias_backward<E: Float>(dy: &[E], db: &mut [E], outer: usize, channels: usize, inner: usize) {
    use rayon::prelude::*;
    debug_assert_eq!(dy.len(), outer * channels * inner);
    let block = channels.div_ceil(rayon::current_num_threads()).max(1);
    let block = if dy.len() < 1 << 16 { channels.max(1) } else { block };
    db.par_chunks_mut(block).enumerate().for_each(|(bi, db)| {
        let c0 = bi * block;
        let mut sums = vec![0.0f64; db.len()];
        for o in 0..outer {
            let row = &dy[(o * channels + c0) * inner..][..db.len() * inner];
            if inner == 1 {
                sums.iter_mut().zip(row).for_each(|(s, v)| *s += v.f64());
            } else {
                for (s, plane) in sums.iter_mut().zip(row.chunks_exact(inner)) {
                    *s += plane.iter().map(|v| v.f64()).sum::<f64>();
                }
            }
        }
        for (d, s) in db.iter_mut().zip(sums) {
            *d += E::of(s);
        }
    });
}
