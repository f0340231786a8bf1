//! The CPU reference backend: plain slices, generic over f32/f64. It owns the buffers (and
//! their pool) and only dispatches: every method calls the op file that documents and computes
//! it (`crate::ops`), so each piece of CPU math has one home. It is the truth the CUDA kernels
//! are checked against, and a real fallback: GEMMs go to the blocked, multithreaded `gemm`
//! crate (`ops/gemm.rs`), everything else runs on rayon.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::backend::Backend;
use crate::backend::Precision;
use crate::ops::adam::AdamStep;
use crate::ops::batch_norm::BatchNormDims;
use crate::ops::conv2d::Conv2dDims;
use crate::ops::linear::LinearDims;
use crate::ops::loss::Recon;
use crate::ops::unary::Unary;
use crate::ops::{adam, batch_norm, bias, conv2d, elementwise, linear, loss, reparam_kl, unary};
use crate::tensor::Float;

/// The CPU backend. Clones share a pool of recycled buffers: a training step allocates the
/// same tensors every time, and taking them from the pool instead of the allocator avoids
/// zeroing fresh pages and memsetting outputs that are overwritten anyway (perf put page
/// clearing and memset at ~15% of a conv VAE step).
#[derive(Clone, Debug, Default)]
pub struct Cpu<E: Float> {
    pool: Arc<Mutex<HashMap<usize, Vec<Vec<E>>>>>,
    /// Buffers of pool size allocated because the pool had none ([`Backend::fresh_buffers`]).
    fresh: Arc<std::sync::atomic::AtomicU64>,
    /// Testing: `empty` returns NaN everywhere, so an op that leaves part of an `empty`
    /// output unwritten shows up as NaN.
    poison_empty: bool,
    /// What the operands of linear layers and convolutions are rounded to before they are
    /// multiplied ([`Precision`]): f32, or as tensor cores round them, to measure a
    /// precision's quality without a GPU.
    precision: Precision,
}

/// Buffers of one length the pool keeps at most (a step needs a few dozen of each size).
const POOL_PER_LENGTH: usize = 64;
/// Shorter buffers are not pooled: the allocator serves them from memory it already holds.
const POOLED_MIN_LEN: usize = 1 << 12;

impl<E: Float> Cpu<E> {
    /// A backend whose `empty` buffers are all NaN (see `poison_empty`); for tests.
    pub fn with_poisoned_empty() -> Self {
        Cpu { poison_empty: true, ..Default::default() }
    }
    /// A backend whose matrix products see their operands rounded to `precision`.
    pub fn with_precision(precision: Precision) -> Self {
        Cpu { precision, ..Default::default() }
    }
    /// `buf` as a matrix product's operand sees it: itself at f32, else a rounded copy (from
    /// the pool; hand it back with `recycle`).
    fn operand<'a>(&self, buf: &'a [E]) -> std::borrow::Cow<'a, [E]> {
        if self.precision == Precision::F32 {
            return std::borrow::Cow::Borrowed(buf);
        }
        let mut out = self.empty(buf.len());
        let p = self.precision;
        use rayon::prelude::*;
        out.par_chunks_mut(1 << 14).zip(buf.par_chunks(1 << 14)).for_each(|(o, i)| {
            for (o, &v) in o.iter_mut().zip(i) {
                *o = E::of(p.round(v.f64() as f32) as f64);
            }
        });
        std::borrow::Cow::Owned(out)
    }
    /// Returns a rounded operand's buffer to the pool.
    fn done(&self, operand: std::borrow::Cow<'_, [E]>) {
        if let std::borrow::Cow::Owned(v) = operand {
            self.recycle(v);
        }
    }
    fn take(&self, len: usize) -> Option<Vec<E>> {
        let taken = self.pool.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&len).and_then(Vec::pop);
        if taken.is_none() && len >= POOLED_MIN_LEN {
            self.fresh.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        taken
    }
}

impl<E: Float> Backend for Cpu<E> {
    type E = E;
    type Buf = Vec<E>;
    type Bytes = Arc<Vec<u8>>;
    type Graph = ();

    fn describe(&self) -> String {
        let products = match self.precision {
            Precision::F32 => String::new(),
            p => format!(", matrix-product operands rounded to {}", p.name()),
        };
        format!("CPU ({} threads, {}{products})", rayon::current_num_threads(), E::NAME)
    }
    fn free_memory(&self) -> Option<u64> {
        available_memory()
    }
    fn precision(&self) -> Precision {
        self.precision
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
    fn fresh_buffers(&self) -> Option<u64> {
        Some(self.fresh.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn recycle(&self, buf: Vec<E>) {
        if buf.len() >= POOLED_MIN_LEN {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            let list = pool.entry(buf.len()).or_default();
            if list.len() < POOL_PER_LENGTH {
                list.push(buf);
            }
        }
    }
    fn upload(&self, host: &[E]) -> Vec<E> {
        // From the pool too: a training step uploads its batch, and the tape recycles it.
        match self.take(host.len()) {
            Some(mut v) => {
                v.copy_from_slice(host);
                v
            }
            None => host.to_vec(),
        }
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
    fn upload_bytes(&self, host: &Arc<Vec<u8>>) -> Arc<Vec<u8>> {
        host.clone()
    }
    fn bytes_len(&self, buf: &Arc<Vec<u8>>) -> usize {
        buf.len()
    }
    fn gather_rows_u8(&self, src: &Arc<Vec<u8>>, row_len: usize, idx: &[u32], dst: &mut Vec<E>) {
        elementwise::cpu_gather_rows_u8(src, row_len, idx, dst)
    }

    // The matrix products: at a precision other than f32 both operands are rounded first
    // (`operand`), as tensor cores would see them; the bias and the sums stay f32.
    fn linear_forward(&self, x: &Vec<E>, w: &Vec<E>, b: Option<&Vec<E>>, y: &mut Vec<E>, d: LinearDims) {
        let (x, w) = (self.operand(x), self.operand(w));
        linear::cpu_forward(&x, &w, b.map(|b| &b[..]), y, d);
        self.done(x);
        self.done(w);
    }
    fn linear_backward_data(&self, dy: &Vec<E>, w: &Vec<E>, dx: &mut Vec<E>, d: LinearDims) {
        let (dy, w) = (self.operand(dy), self.operand(w));
        linear::cpu_backward_data(&dy, &w, dx, d);
        self.done(dy);
        self.done(w);
    }
    fn linear_backward_weight(&self, dy: &Vec<E>, x: &Vec<E>, dw: &mut Vec<E>, d: LinearDims) {
        let (dy, x) = (self.operand(dy), self.operand(x));
        linear::cpu_backward_weight(&dy, &x, dw, d);
        self.done(dy);
        self.done(x);
    }
    fn bias_add(&self, y: &mut Vec<E>, b: &Vec<E>, outer: usize, channels: usize, inner: usize) {
        bias::bias_add(y, b, outer, channels, inner)
    }
    fn bias_backward(&self, dy: &Vec<E>, db: &mut Vec<E>, outer: usize, channels: usize, inner: usize) {
        bias::bias_backward(dy, db, outer, channels, inner)
    }
    fn conv2d_forward(&self, x: &Vec<E>, w: &Vec<E>, b: Option<&Vec<E>>, y: &mut Vec<E>, d: Conv2dDims) {
        let (x, w) = (self.operand(x), self.operand(w));
        conv2d::cpu_forward(&x, &w, b.map(|b| &b[..]), y, d);
        self.done(x);
        self.done(w);
    }
    fn conv2d_backward_data(&self, dy: &Vec<E>, w: &Vec<E>, dx: &mut Vec<E>, d: Conv2dDims) {
        let (dy, w) = (self.operand(dy), self.operand(w));
        conv2d::cpu_backward_data(&dy, &w, dx, d);
        self.done(dy);
        self.done(w);
    }
    fn conv2d_backward_weight(&self, dy: &Vec<E>, x: &Vec<E>, dw: &mut Vec<E>, d: Conv2dDims) {
        let (dy, x) = (self.operand(dy), self.operand(x));
        conv2d::cpu_backward_weight(&dy, &x, dw, d);
        self.done(dy);
        self.done(x);
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
        y: Option<&Vec<E>>,
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
            y.map(|v| &v[..]),
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

/// The variable that caps the memory [`available_memory`] reports (bytes, or with a K, M or G
/// suffix: `VAECUDA_CPU_MEMORY=8G`): to keep a run within part of a shared machine, and to
/// test the refusals without filling the machine.
pub const MEMORY_CAP_ENV: &str = "VAECUDA_CPU_MEMORY";

/// Memory this process can still take, in bytes: the kernel's estimate of what can be
/// allocated without swapping (`MemAvailable` in /proc/meminfo), and no more than the room
/// left under a cgroup (v2) limit, as in a container, or the cap in [`MEMORY_CAP_ENV`].
/// `None` where none of them can be read.
pub fn available_memory() -> Option<u64> {
    let cap = std::env::var(MEMORY_CAP_ENV).ok().and_then(|v| {
        let v = v.trim();
        let (digits, unit) = match v.char_indices().last()? {
            (i, 'K' | 'k') => (&v[..i], 1u64 << 10),
            (i, 'M' | 'm') => (&v[..i], 1 << 20),
            (i, 'G' | 'g') => (&v[..i], 1 << 30),
            _ => (v, 1),
        };
        digits.parse::<u64>().ok().map(|n| n.saturating_mul(unit))
    });
    let measured = measured_available_memory();
    match (measured, cap) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut it = line.split_whitespace().skip(1);
    let v: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") => Some(v * 1024),
        None => Some(v),
        _ => None,
    }
}

fn measured_available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| parse_meminfo(&t));
    let read = |f: &str| std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(f)).ok();
    let cgroup = match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(cur)) => match (max.trim().parse::<u64>(), cur.trim().parse::<u64>()) {
            (Ok(max), Ok(cur)) => Some(max.saturating_sub(cur)),
            _ => None, // "max": no limit
        },
        _ => None,
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `--precision` on the CPU: a matrix product at TF32 or BF16 is exactly the f32 product of
/// operands rounded as tensor cores round them (rna for TF32, rne for BF16), in every pass of
/// linear layers and convolutions; and the rounding changes the result (so the test can fail).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.uniform(-1.0, 1.0) as f32).collect()
    }

    fn rounded(p: Precision, v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| p.round(x)).collect()
    }

    /// Runs `op` on the backend at `p` with (a, b), and on the f32 backend with (a, b) rounded
    /// and as they are; the first two must be bitwise equal and differ from the third.
    fn check(
        p: Precision,
        what: &str,
        a: &[f32],
        b: &[f32],
        out: usize,
        op: impl Fn(&Cpu<f32>, &Vec<f32>, &Vec<f32>, &mut Vec<f32>),
    ) {
        let run = |be: &Cpu<f32>, a: &[f32], b: &[f32]| {
            let mut y = vec![0.5f32; out]; // accumulating passes add to it
            op(be, &a.to_vec(), &b.to_vec(), &mut y);
            y
        };
        let at_p = run(&Cpu::with_precision(p), a, b);
        let by_hand = run(&Cpu::default(), &rounded(p, a), &rounded(p, b));
        let exact = run(&Cpu::default(), a, b);
        assert!(
            at_p.iter().zip(&by_hand).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what} at {p:?}: not the product of rounded operands"
        );
        assert!(at_p != exact, "{what} at {p:?}: rounding the operands changed nothing");
    }

    #[test]
    fn matrix_products_see_operands_rounded_as_tensor_cores_do() {
        for p in [Precision::Tf32, Precision::Bf16] {
            let l = LinearDims { n: 9, d_in: 37, d_out: 13 };
            let (x, w, dy) = (random(9 * 37, 1), random(13 * 37, 2), random(9 * 13, 3));
            check(p, "linear forward", &x, &w, 9 * 13, |be, x, w, y| be.linear_forward(x, w, None, y, l));
            check(p, "linear backward data", &dy, &w, 9 * 37, |be, dy, w, dx| be.linear_backward_data(dy, w, dx, l));
            check(p, "linear backward weight", &dy, &x, 13 * 37, |be, dy, x, dw| {
                be.linear_backward_weight(dy, x, dw, l)
            });

            let d = Conv2dDims::new(2, 5, 9, 9, 7, 3, 3, 2, 1);
            let (x, w, dy) = (random(d.x_len(), 4), random(d.w_len(), 5), random(d.y_len(), 6));
            check(p, "conv forward", &x, &w, d.y_len(), |be, x, w, y| be.conv2d_forward(x, w, None, y, d));
            check(p, "conv backward data", &dy, &w, d.x_len(), |be, dy, w, dx| be.conv2d_backward_data(dy, w, dx, d));
            check(p, "conv backward weight", &dy, &x, d.w_len(), |be, dy, x, dw| {
                be.conv2d_backward_weight(dy, x, dw, d)
            });
        }
        assert_eq!(Cpu::<f32>::with_precision(Precision::Bf16).precision(), Precision::Bf16);
        assert!(Cpu::<f32>::with_precision(Precision::Tf32).describe().contains("rounded to tf32"));
    }
}
