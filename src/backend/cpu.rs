//! The CPU reference backend: plain slices, generic over f32/f64, each method delegating to the
//! op file that documents it. It is the truth the CUDA kernels are checked against, and a real
//! fallback: GEMM is the blocked, multithreaded `gemm` crate, everything else runs on rayon.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::backend::{Backend, Recon};
use crate::ops::adam::AdamStep;
use crate::ops::batch_norm::BatchNormDims;
use crate::ops::conv2d::Conv2dDims;
#[cfg(target_arch = "x86_64")]
use crate::ops::conv2d_avx512;
use crate::ops::linear::LinearDims;
use crate::ops::unary::Unary;
use crate::ops::{adam, batch_norm, conv2d, elementwise, linear, loss, reparam_kl, unary};
use crate::tensor::Float;

/// The CPU backend. Clones share a pool of recycled buffers: a training step allocates the
/// same tensors every time, and taking them from the pool instead of the allocator avoids
/// zeroing fresh pages and memsetting outputs that are overwritten anyway (perf put page
/// clearing and memset at ~15% of a conv VAE step).
#[derive(Clone, Debug, Default)]
pub struct Cpu<E: Float> {
    pool: Arc<Mutex<HashMap<usize, Vec<Vec<E>>>>>,
    /// Testing: `empty` returns NaN everywhere, so an op that leaves part of an `empty`
    /// output unwritten shows up as NaN.
    poison_empty: bool,
}

/// Buffers of one length the pool keeps at most (a step needs a few dozen of each size).
const POOL_PER_LENGTH: usize = 64;

impl<E: Float> Cpu<E> {
    /// A backend whose `empty` buffers are all NaN (see `poison_empty`); for tests.
    pub fn with_poisoned_empty() -> Self {
        Cpu { poison_empty: true, ..Default::default() }
    }
    fn take(&self, len: usize) -> Option<Vec<E>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&len).and_then(Vec::pop)
    }
}

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
    let run = |(i0, i1): (usize, usize), (j0, j1): (usize, usize), par: gemm::Parallelism| unsafe {
        gemm::gemm(
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
        split(n, 4, &|cols| run(rows, cols, gemm::Parallelism::None));
    } else if big && m.max(n) <= 2048 {
        // The MLP's layers (128×784·784×400 and the like): the gemm crate's own threading was
        // no faster than one thread on these (520 vs 540 µs); two halves of the output, split
        // along its longer side, took 290–390 µs. Two blocks whatever the thread count.
        if n >= m {
            split(n, 2, &|cols| run(rows, cols, gemm::Parallelism::None));
        } else {
            split(m, 2, &|rows| run(rows, cols, gemm::Parallelism::None));
        }
    } else if big {
        run(rows, cols, gemm::Parallelism::Rayon(rayon::current_num_threads()));
    } else {
        run(rows, cols, gemm::Parallelism::None);
    }
}

/// The slice as f32 when E is f32 (the fast paths are f32-only; f64 stays on the reference).
#[cfg(target_arch = "x86_64")]
fn as_f32<E: Float>(v: &[E]) -> Option<&[f32]> {
    (std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>()).then(|| bytemuck::cast_slice(v))
}
#[cfg(target_arch = "x86_64")]
fn as_f32_mut<E: Float>(v: &mut [E]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>()).then(|| bytemuck::cast_slice_mut(v))
}

/// Whether conv2d runs on its AVX-512 path (`ops::conv2d_avx512`): an f32 CPU with AVX-512F
/// and a layer big enough for its register tiles. `VAECUDA_CPU_REFERENCE=1` forces the
/// reference, to compare the two.
#[cfg(target_arch = "x86_64")]
fn fast_conv(d: &Conv2dDims) -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| conv2d_avx512::available() && std::env::var_os("VAECUDA_CPU_REFERENCE").is_none())
        && conv2d_avx512::suits(d)
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

/// y[o, c, i] += b[c]
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

/// db[c] += Σ_{o,i} dy[o, c, i], in f64, rows taken in order (deterministic whatever the
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

impl<E: Float> Backend for Cpu<E> {
    type E = E;
    type Buf = Vec<E>;

    fn describe(&self) -> String {
        format!("CPU ({} threads, {})", rayon::current_num_threads(), E::NAME)
    }
    fn zeros(&self, len: usize) -> Vec<E> {
        match self.take(len) {
            Some(mut v) => {
                self.fill(&mut v, E::zero());
                v
            }
            None => vec![E::zero(); len],
        }
    }
    fn empty(&self, len: usize) -> Vec<E> {
        if self.poison_empty {
            return vec![E::nan(); len];
        }
        self.take(len).unwrap_or_else(|| vec![E::zero(); len])
    }
    fn recycle(&self, buf: Vec<E>) {
        if buf.len() >= 1 << 12 {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            let list = pool.entry(buf.len()).or_default();
            if list.len() < POOL_PER_LENGTH {
                list.push(buf);
            }
        }
    }
    fn upload(&self, host: &[E]) -> Vec<E> {
        host.to_vec()
    }
    fn download(&self, buf: &Vec<E>) -> Vec<E> {
        buf.clone()
    }
    fn len(&self, buf: &Vec<E>) -> usize {
        buf.len()
    }
    fn copy(&self, src: &Vec<E>, dst: &mut Vec<E>) {
        dst.copy_from_slice(src);
    }
    fn fill(&self, buf: &mut Vec<E>, value: E) {
        // Both cores: zeroing a step's gradient buffers (12.8 MB for one conv activation)
        // was the largest memset in the conv VAE's profile.
        use rayon::prelude::*;
        buf.par_chunks_mut(1 << 16).for_each(|c| c.fill(value));
    }
    fn gather_rows(&self, src: &Vec<E>, row_len: usize, idx: &[u32], dst: &mut Vec<E>) {
        for (r, &i) in idx.iter().enumerate() {
            dst[r * row_len..][..row_len].copy_from_slice(&src[i as usize * row_len..][..row_len]);
        }
    }

    fn linear_forward(&self, x: &Vec<E>, w: &Vec<E>, b: Option<&Vec<E>>, y: &mut Vec<E>, d: LinearDims) {
        linear::cpu_forward(x, w, b.map(|b| &b[..]), y, d)
    }
    fn linear_backward_data(&self, dy: &Vec<E>, w: &Vec<E>, dx: &mut Vec<E>, d: LinearDims) {
        linear::cpu_backward_data(dy, w, dx, d)
    }
    fn linear_backward_weight(&self, dy: &Vec<E>, x: &Vec<E>, dw: &mut Vec<E>, d: LinearDims) {
        linear::cpu_backward_weight(dy, x, dw, d)
    }
    fn bias_add(&self, y: &mut Vec<E>, b: &Vec<E>, outer: usize, channels: usize, inner: usize) {
        bias_add(y, b, outer, channels, inner)
    }
    fn bias_backward(&self, dy: &Vec<E>, db: &mut Vec<E>, outer: usize, channels: usize, inner: usize) {
        bias_backward(dy, db, outer, channels, inner)
    }
    fn conv2d_forward(&self, x: &Vec<E>, w: &Vec<E>, b: Option<&Vec<E>>, y: &mut Vec<E>, d: Conv2dDims) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(x), Some(w), Some(y)) = (as_f32(x), as_f32(w), as_f32_mut(y)) {
            if fast_conv(&d) {
                return conv2d_avx512::forward(x, w, b.and_then(|b| as_f32(b)), y, &d);
            }
        }
        conv2d::cpu_forward(x, w, b.map(|b| &b[..]), y, d)
    }
    fn conv2d_backward_data(&self, dy: &Vec<E>, w: &Vec<E>, dx: &mut Vec<E>, d: Conv2dDims) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(dy), Some(w), Some(dx)) = (as_f32(dy), as_f32(w), as_f32_mut(dx)) {
            if fast_conv(&d) {
                return conv2d_avx512::backward_data(dy, w, dx, &d);
            }
        }
        conv2d::cpu_backward_data(dy, w, dx, d)
    }
    fn conv2d_backward_weight(&self, dy: &Vec<E>, x: &Vec<E>, dw: &mut Vec<E>, d: Conv2dDims) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(dy), Some(x), Some(dw)) = (as_f32(dy), as_f32(x), as_f32_mut(dw)) {
            if fast_conv(&d) {
                return conv2d_avx512::backward_weight(dy, x, dw, &d);
            }
        }
        conv2d::cpu_backward_weight(dy, x, dw, d)
    }

    fn batch_norm_forward_train(
        &self,
        x: &Vec<E>,
        gamma: &Vec<E>,
        beta: &Vec<E>,
        y: &mut Vec<E>,
        save_mean: &mut Vec<E>,
        save_invstd: &mut Vec<E>,
        running_mean: &mut Vec<E>,
        running_var: &mut Vec<E>,
        d: BatchNormDims,
    ) {
        batch_norm::cpu_forward_train(x, gamma, beta, y, save_mean, save_invstd, running_mean, running_var, d)
    }
    fn batch_norm_forward_eval(
        &self,
        x: &Vec<E>,
        gamma: &Vec<E>,
        beta: &Vec<E>,
        running_mean: &Vec<E>,
        running_var: &Vec<E>,
        y: &mut Vec<E>,
        d: BatchNormDims,
    ) {
        batch_norm::cpu_forward_eval(x, gamma, beta, running_mean, running_var, y, d)
    }
    fn batch_norm_backward(
        &self,
        dy: &Vec<E>,
        x: &Vec<E>,
        gamma: &Vec<E>,
        save_mean: &Vec<E>,
        save_invstd: &Vec<E>,
        dx: Option<&mut Vec<E>>,
        dgamma: Option<&mut Vec<E>>,
        dbeta: Option<&mut Vec<E>>,
        d: BatchNormDims,
    ) {
        batch_norm::cpu_backward(
            dy,
            x,
            gamma,
            save_mean,
            save_invstd,
            dx.map(|v| &mut v[..]),
            dgamma.map(|v| &mut v[..]),
            dbeta.map(|v| &mut v[..]),
            d,
        )
    }

    fn unary_forward(&self, op: Unary, x: &Vec<E>, y: &mut Vec<E>) {
        unary::cpu_forward(op, x, y)
    }
    fn unary_backward(&self, op: Unary, x: &Vec<E>, y: &Vec<E>, dy: &Vec<E>, dx: &mut Vec<E>) {
        unary::cpu_backward(op, x, y, dy, dx)
    }
    fn mul(&self, a: &Vec<E>, b: &Vec<E>, y: &mut Vec<E>) {
        elementwise::cpu_mul(a, b, y)
    }
    fn mul_accumulate(&self, a: &Vec<E>, b: &Vec<E>, out: &mut Vec<E>) {
        elementwise::cpu_mul_accumulate(a, b, out)
    }
    fn axpy(&self, alpha: E, x: &Vec<E>, y: &mut Vec<E>) {
        elementwise::cpu_axpy(alpha, x, y)
    }
    fn sum(&self, x: &Vec<E>, out: &mut Vec<E>) {
        out[0] = elementwise::cpu_sum(x);
    }
    fn broadcast_scalar_accumulate(&self, dout: &Vec<E>, alpha: E, dx: &mut Vec<E>) {
        let g = alpha * dout[0];
        dx.iter_mut().for_each(|v| *v += g);
    }

    fn reparam_kl_forward(&self, mu: &Vec<E>, logvar: &Vec<E>, eps: &Vec<E>, z: &mut Vec<E>, kl: &mut Vec<E>) {
        kl[0] = reparam_kl::cpu_forward(mu, logvar, eps, z);
    }
    fn reparam_kl_backward(
        &self,
        mu: &Vec<E>,
        logvar: &Vec<E>,
        eps: &Vec<E>,
        dz: Option<&Vec<E>>,
        dkl: Option<&Vec<E>>,
        dmu: Option<&mut Vec<E>>,
        dlogvar: Option<&mut Vec<E>>,
    ) {
        reparam_kl::cpu_backward(
            mu,
            logvar,
            eps,
            dz.map(|v| &v[..]),
            dkl.map(|v| v[0]),
            dmu.map(|v| &mut v[..]),
            dlogvar.map(|v| &mut v[..]),
        )
    }
    fn recon_loss_forward(&self, kind: Recon, x: &Vec<E>, target: &Vec<E>, out: &mut Vec<E>) {
        out[0] = loss::cpu_forward(kind, x, target);
    }
    fn recon_loss_backward(&self, kind: Recon, x: &Vec<E>, target: &Vec<E>, dout: &Vec<E>, dx: &mut Vec<E>) {
        loss::cpu_backward(kind, x, target, dout[0], dx)
    }
    fn adam_step(&self, param: &mut Vec<E>, grad: &Vec<E>, m: &mut Vec<E>, v: &mut Vec<E>, s: AdamStep) {
        adam::cpu_step(param, grad, m, v, s)
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
