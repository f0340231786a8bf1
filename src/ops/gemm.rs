//! The CPU GEMM every CPU op lowers to (linear directly, conv2d through im2col): the blocked,
//! multithreaded `gemm` crate, with how its work is split across cores chosen here for the
//! VAE's shapes. Lives among the ops, not in the backend, because the ops' CPU code calls it.

use crate::tensor::Float;

/// Where a `gemm` may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Large products use all cores.
    All,
    /// The calling thread only: for products inside a loop that is already parallel.
    Caller,
}

/// c[m, n] (+)= a[m, k] · b[k, n], each operand addressed through (row, column) strides so
/// transposes cost nothing; c is row-major.
#[allow(clippy::too_many_arguments)]
pub fn gemm<E: Float>(
    threads: Threads,
    m: usize,
    n: usize,
    k: usize,
    a: &[E],
    a_rs: usize,
    a_cs: usize,
    b: &[E],
    b_rs: usize,
    b_cs: usize,
    c: &mut [E],
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= m * n, "gemm: output too small");
    if k == 0 {
        if !accumulate {
            c[..m * n].iter_mut().for_each(|v| *v = E::zero());
        }
        return;
    }
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs, "gemm: lhs too small");
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs, "gemm: rhs too small");
    let big = threads == Threads::All && m * n * k >= 1 << 18;
    // SAFETY (every call of `run`): the asserts above keep every strided access inside the
    // slices, and the blocks written in parallel are disjoint.
    let c_ptr = SendPtr(c.as_mut_ptr());
    // The block rows i0..i1, columns j0..j1 of c.
    let run = |(i0, i1): (usize, usize), (j0, j1): (usize, usize), par: ::gemm::Parallelism| unsafe {
        ::gemm::gemm(
            i1 - i0,
            j1 - j0,
            k,
            c_ptr.get().add(i0 * n + j0),
            1,
            n as isize,
            accumulate,
            a.as_ptr().add(i0 * a_rs),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr().add(j0 * b_cs),
            b_cs as isize,
            b_rs as isize,
            E::one(),
            E::one(),
            false,
            false,
            false,
            par,
        )
    };
    // `blocks` ranges of at most `block` (a multiple of 16) covering 0..len, in parallel.
    let split = |len: usize, blocks: usize, f: &(dyn Fn((usize, usize)) + Sync)| {
        use rayon::prelude::*;
        let block = len.div_ceil(blocks).next_multiple_of(16);
        (0..len.div_ceil(block)).into_par_iter().for_each(|i| f((i * block, ((i + 1) * block).min(len))));
    };
    let (rows, cols) = ((0, m), (0, n));
    if big && k >= 4 * m.max(n) {
        // Long reductions into a small output (a linear layer's forward with 6272 inputs): the
        // gemm crate's own threading ran this 3x slower than one thread per block of output
        // columns. A fixed block count keeps the result independent of the thread count.
        split(n, 4, &|cols| run(rows, cols, ::gemm::Parallelism::None));
    } else if big && m.max(n) <= 2048 {
        // The MLP's layers (128×784·784×400 and the like): the gemm crate's own threading was
        // no faster than one thread on these (520 vs 540 µs); two halves of the output, split
        // along its longer side, took 290–390 µs. Two blocks whatever the thread count.
        if n >= m {
            split(n, 2, &|cols| run(rows, cols, ::gemm::Parallelism::None));
        } else {
            split(m, 2, &|rows| run(rows, cols, ::gemm::Parallelism::None));
        }
    } else if big {
        run(rows, cols, ::gemm::Parallelism::Rayon(rayon::current_num_threads()));
    } else {
        run(rows, cols, ::gemm::Parallelism::None);
    }
}

/// A raw pointer that may cross to rayon's threads; used only for disjoint writes.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::{gemm, Threads};

    /// Every threading branch of `gemm` (one thread, long reduction, split columns, split
    /// rows, the crate's own threading) against a plain triple loop, with a transposed
    /// operand and with accumulation into a nonzero output.
    #[test]
    fn gemm_matches_the_triple_loop_on_every_branch() {
        let mut rng = crate::rng::Rng::new(11);
        // (m, n, k): small; long K; n ≥ m split; m > n split; m > 2048 (crate threading)
        for (m, n, k) in [(5, 7, 3), (8, 40, 4096), (64, 100, 64), (100, 64, 64), (2100, 20, 8)] {
            let a: Vec<f64> = (0..m * k).map(|_| rng.normal()).collect(); // [m, k] row-major
            let bt: Vec<f64> = (0..n * k).map(|_| rng.normal()).collect(); // b = btᵀ, [n, k]
            let c0: Vec<f64> = (0..m * n).map(|_| rng.normal()).collect();
            let mut want = c0.clone();
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] += (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f64>();
                }
            }
            let mut c = c0.clone();
            gemm(Threads::All, m, n, k, &a, k, 1, &bt, 1, k, &mut c, true);
            for (i, (&got, &w)) in c.iter().zip(&want).enumerate() {
                assert!((got - w).abs() <= 1e-12 * (k as f64).sqrt() * 10.0, "({m}, {n}, {k}) [{i}]: {got} vs {w}");
            }
            let mut c = vec![f64::NAN; m * n];
            gemm(Threads::All, m, n, k, &a, k, 1, &bt, 1, k, &mut c, false);
            for i in 0..m * n {
                assert!(
                    (c[i] - (want[i] - c0[i])).abs() <= 1e-11 * (k as f64).sqrt(),
                    "({m}, {n}, {k}) [{i}] overwrite"
                );
            }
        }
    }
}
