//! The one interface the tape calls. Every op's math lives behind it twice: once in the CPU
//! reference (`cpu.rs`, generic over f32/f64) and once in CUDA (`cuda/`). Models, the tape and
//! the trainer never mention a device; they are generic over `B: Backend`.
//!
//! Conventions shared by every method:
//! - Buffers are contiguous, row-major, NCHW for images; shapes travel in the `*Dims` structs.
//! - Methods whose name ends in `backward*` (and `accumulate*`) **add** into their outputs, so
//!   a tensor that feeds several ops collects the sum of its gradients (dfdx's rule).
//! - Reductions are deterministic: the same inputs give bitwise the same result on every run.

pub mod cpu;
pub mod cuda;
pub mod precision;
pub mod shapes;

pub use precision::Precision;
pub use shapes::{AdamStep, BatchNormDims, Conv2dDims, LinearDims, Unary};

use crate::rng::NoiseStream;
use crate::tensor::Float;

/// The reconstruction losses the trait's loss methods take (their math is in `ops::loss`).
pub use shapes::Recon;

/// A size in memory as every message prints it: binary units, one decimal ("3.2 GiB").
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// A device that stores tensors and computes every op of the engine: the step a batch takes
/// between an op on the [`crate::tape::Tape`] (which checks shapes and builds the dims) and the
/// CPU reference code in [`crate::ops`] or a CUDA kernel in `kernels/`. Implemented by
/// [`crate::Cpu`] and [`crate::Cuda`]; models and the trainer are generic over it.
///
/// Methods take raw buffers plus a dims struct, never tensors: shapes are the caller's job.
/// Unless its doc says it adds (`backward*`, `accumulate*`, `bias_add`, `axpy`), a method
/// overwrites its output. Work may be queued asynchronously (CUDA); [`Backend::download`]
/// and [`Backend::synchronize`] wait for it.
pub trait Backend: Clone + 'static {
    /// The element type every buffer holds: f32 to train, f64 to check gradients.
    type E: Float;
    /// A buffer of `E` on this device (`Vec<E>` on the CPU, a pooled device allocation on
    /// CUDA). Dropping it frees it, or returns it to the backend's pool.
    type Buf: 'static;
    /// A buffer of bytes on the device: a dataset's pixels stay `u8` there and become floats
    /// only when a batch is gathered ([`Backend::gather_rows_u8`]), a quarter of the memory of
    /// f32 pixels.
    type Bytes: 'static;
    /// A piece of device work recorded once and replayed ([`Backend::end_capture`]), with the
    /// memory its nodes point into; `()` on backends without graphs.
    type Graph: 'static;

    /// One line naming the device, for logs.
    fn describe(&self) -> String;
    /// Wait until queued work is done (no-op on the CPU).
    fn synchronize(&self) {}
    /// Bytes that new buffers can still take (the host's available memory on the CPU, the
    /// device's free memory on a GPU), when the device says; what training checks a batch's
    /// estimated size against before it allocates.
    fn free_memory(&self) -> Option<u64> {
        None
    }
    /// What the operands of linear layers and convolutions are rounded to before they are
    /// multiplied (`--precision`); f32 unless the backend was opened with another.
    fn precision(&self) -> Precision {
        Precision::F32
    }
    /// Device time taken by the work `f` queues. The default is the wall clock between two
    /// synchronizations; the CUDA backend records timing events on its stream instead, so host
    /// time before the first launch and after the last is not counted.
    fn time(&self, f: &mut dyn FnMut()) -> std::time::Duration {
        self.synchronize();
        let start = std::time::Instant::now();
        f();
        self.synchronize();
        start.elapsed()
    }

    // ---- memory ----
    /// A buffer of `len` elements, all zero (for outputs that are accumulated into).
    fn zeros(&self, len: usize) -> Self::Buf;
    /// A buffer whose contents are unspecified (maybe an earlier tensor's values), for an op
    /// that writes every element; skips zeroing what is overwritten anyway.
    fn empty(&self, len: usize) -> Self::Buf {
        self.zeros(len)
    }
    /// Hands back a buffer nobody needs any more, so `zeros`/`empty` can reuse it.
    fn recycle(&self, buf: Self::Buf) {
        drop(buf)
    }
    /// How many `zeros`/`empty` buffers of pool size this backend has had to allocate afresh
    /// because its pool had none to give (`None`: it does not count). A training step in the
    /// steady state allocates none.
    fn fresh_buffers(&self) -> Option<u64> {
        None
    }
    /// A new buffer holding a copy of `host`.
    fn upload(&self, host: &[Self::E]) -> Self::Buf;
    /// The contents of `buf` on the host, once the work queued before has finished.
    fn download(&self, buf: &Self::Buf) -> Vec<Self::E>;
    /// Number of elements of `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// dst = src (equal lengths).
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf);
    /// Sets every element of `buf` to `value` (zeroing gradients between steps).
    fn fill(&self, buf: &mut Self::Buf, value: Self::E);
    /// `dst[r, :] = src[idx[r], :]` for rows of `row_len` elements (batch gathering).
    fn gather_rows(&self, src: &Self::Buf, row_len: usize, idx: &[u32], dst: &mut Self::Buf);
    /// Puts bytes on the device. The CPU keeps a reference to the same allocation (no copy,
    /// so a dataset is in host memory once); a GPU copies them.
    fn upload_bytes(&self, host: &std::sync::Arc<Vec<u8>>) -> Self::Bytes;
    /// The number of bytes in a byte buffer.
    fn bytes_len(&self, buf: &Self::Bytes) -> usize;
    /// `dst[r, e] = src[idx[r]·row_len + e] / 255`: gathers rows of `u8` pixels as floats in
    /// [0, 1] (a training batch). The division is IEEE-exact on both sides, so the batch equals
    /// pixels converted on the host.
    fn gather_rows_u8(&self, src: &Self::Bytes, row_len: usize, idx: &[u32], dst: &mut Self::Buf);

    // ---- linear: y[n, out] = x[n, in] · W[out, in]ᵀ + b ----
    /// `y = x·Wᵀ + b`, overwriting y: x `[n, d_in]`, W `[d_out, d_in]`, b `[d_out]`, y
    /// `[n, d_out]` (see [`crate::ops::linear()`]).
    fn linear_forward(&self, x: &Self::Buf, w: &Self::Buf, b: Option<&Self::Buf>, y: &mut Self::Buf, d: LinearDims);
    /// dx += dy·W
    fn linear_backward_data(&self, dy: &Self::Buf, w: &Self::Buf, dx: &mut Self::Buf, d: LinearDims);
    /// dW += dyᵀ·x
    fn linear_backward_weight(&self, dy: &Self::Buf, x: &Self::Buf, dw: &mut Self::Buf, d: LinearDims);

    // ---- bias over a [outer, channels, inner] view ----
    /// `y[o, c, i] += b[c]`
    fn bias_add(&self, y: &mut Self::Buf, b: &Self::Buf, outer: usize, channels: usize, inner: usize);
    /// `db[c] += Σ_{o,i} dy[o, c, i]`
    fn bias_backward(&self, dy: &Self::Buf, db: &mut Self::Buf, outer: usize, channels: usize, inner: usize);

    // ---- conv2d (cross-correlation, NCHW, weight [c_out, c_in, kh, kw]) ----
    /// y = conv2d(x, W) + b, overwriting y: x `[n, c_in, h, w]`, y `[n, c_out, oh, ow]` (see
    /// [`crate::ops::conv2d()`]).
    fn conv2d_forward(&self, x: &Self::Buf, w: &Self::Buf, b: Option<&Self::Buf>, y: &mut Self::Buf, d: Conv2dDims);
    /// dx += conv2d input-gradient of dy (also the forward of a transposed convolution).
    fn conv2d_backward_data(&self, dy: &Self::Buf, w: &Self::Buf, dx: &mut Self::Buf, d: Conv2dDims);
    /// dW += weight-gradient of dy given input x.
    fn conv2d_backward_weight(&self, dy: &Self::Buf, x: &Self::Buf, dw: &mut Self::Buf, d: Conv2dDims);

    // ---- batch norm over [outer, channels, inner] ----
    /// Training-mode batch norm: normalizes x with the batch's per-channel mean and biased
    /// variance into y (overwritten), writes that mean and `1/√(var + eps)` to `save_mean` and
    /// `save_invstd` (`[channels]`, for the backward), and moves the running statistics toward
    /// the batch's in place (see [`crate::ops::batch_norm()`]).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_forward_train(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        y: &mut Self::Buf,
        save_mean: &mut Self::Buf,
        save_invstd: &mut Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        d: BatchNormDims,
    );
    /// Eval-mode batch norm: y = (x − running_mean)/√(running_var + eps)·γ + β, overwriting y.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_forward_eval(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &Self::Buf,
        running_var: &Self::Buf,
        y: &mut Self::Buf,
        d: BatchNormDims,
    );
    /// dx, dgamma, dbeta += the training-mode batch-norm gradients. With an activation fused
    /// (`d.act`), dy is the gradient at its output and `y` that output (the forward's y);
    /// otherwise `y` is `None`.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &self,
        dy: &Self::Buf,
        y: Option<&Self::Buf>,
        x: &Self::Buf,
        gamma: &Self::Buf,
        save_mean: &Self::Buf,
        save_invstd: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        dgamma: Option<&mut Self::Buf>,
        dbeta: Option<&mut Self::Buf>,
        d: BatchNormDims,
    );

    // ---- elementwise ----
    /// y = op(x) elementwise, overwriting y (the activations of [`crate::ops::unary()`]).
    fn unary_forward(&self, op: Unary, x: &Self::Buf, y: &mut Self::Buf);
    /// dx += dy · op'(x) (`y` is op(x), which most derivatives read instead of x)
    fn unary_backward(&self, op: Unary, x: &Self::Buf, y: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);
    /// y = a ⊙ b
    fn mul(&self, a: &Self::Buf, b: &Self::Buf, y: &mut Self::Buf);
    /// out += a ⊙ b
    fn mul_accumulate(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf);
    /// y += alpha · x
    fn axpy(&self, alpha: Self::E, x: &Self::Buf, y: &mut Self::Buf);
    /// `out[0] = Σ x`, in a fixed order.
    fn sum(&self, x: &Self::Buf, out: &mut Self::Buf);
    /// `dx[i] += alpha · dout[0]` (the backward of `sum`, and of any scalar broadcast).
    fn broadcast_scalar_accumulate(&self, dout: &Self::Buf, alpha: Self::E, dx: &mut Self::Buf);

    // ---- the VAE's own ops ----
    /// `z = mu + eps·exp(logvar/2)`; `kl[0] = -0.5·Σ(1 + logvar − mu² − exp(logvar))`
    fn reparam_kl_forward(
        &self,
        mu: &Self::Buf,
        logvar: &Self::Buf,
        eps: &Self::Buf,
        z: &mut Self::Buf,
        kl: &mut Self::Buf,
    );
    /// dmu, dlogvar += gradients from dz (optional) and the scalar dkl (optional).
    #[allow(clippy::too_many_arguments)]
    fn reparam_kl_backward(
        &self,
        mu: &Self::Buf,
        logvar: &Self::Buf,
        eps: &Self::Buf,
        dz: Option<&Self::Buf>,
        dkl: Option<&Self::Buf>,
        dmu: Option<&mut Self::Buf>,
        dlogvar: Option<&mut Self::Buf>,
    );
    /// `out[0] = Σ loss(x, target)` for the chosen reconstruction loss.
    fn recon_loss_forward(&self, kind: Recon, x: &Self::Buf, target: &Self::Buf, out: &mut Self::Buf);
    /// `dx += dout[0] · ∂loss/∂x`
    fn recon_loss_backward(&self, kind: Recon, x: &Self::Buf, target: &Self::Buf, dout: &Self::Buf, dx: &mut Self::Buf);

    // ---- optimizer ----
    /// One Adam/AdamW update of a parameter tensor in place.
    fn adam_step(&self, param: &mut Self::Buf, grad: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, s: AdamStep);
    /// [`Backend::adam_step`] on every tensor of `tensors`, unless `guard[0]` (the step's
    /// loss) is NaN or infinite, in which case nothing changes. Decided on the device, so the
    /// step need not wait for the loss to decide; the caller reads the loss afterwards and
    /// reports. The CUDA backend makes one launch for all tensors.
    fn adam_step_all(&self, tensors: &mut [AdamTensor<'_, Self>], s: AdamStep, guard: &Self::Buf) {
        if self.download(guard).first().is_some_and(|l| l.f64().is_finite()) {
            for t in tensors.iter_mut() {
                self.adam_step(t.param, t.grad, t.m, t.v, s);
            }
        }
    }
    /// Sets every element of every buffer to zero (a step's gradients, before its backward
    /// adds into them). The CUDA backend makes one launch for all.
    fn zero_all(&self, bufs: &mut [&mut Self::Buf]) {
        for b in bufs.iter_mut() {
            self.fill(b, Self::E::of(0.0));
        }
    }
    /// Standard-normal noise: `out[e]` = [`NoiseStream::value`]`(key, draw, e)` rounded to
    /// `E`, for every element (the reparameterization noise of draw `draw`). The CUDA backend
    /// draws it on the device, with the same integer arithmetic.
    fn normal_noise(&self, key: [u32; 2], draw: u64, out: &mut Self::Buf) {
        let n = self.len(out) as u64;
        let v: Vec<Self::E> = (0..n).map(|e| Self::E::of(NoiseStream::value(key, draw, e))).collect();
        *out = self.upload(&v);
    }
    /// `out[i] = parts[i][0]`: scalars from several buffers side by side, so the host reads
    /// them in one copy (a step's loss and its two terms).
    fn pack_scalars(&self, parts: &[&Self::Buf], out: &mut Self::Buf) {
        let v: Vec<Self::E> = parts.iter().map(|p| self.download(p)[0]).collect();
        *out = self.upload(&v);
    }

    // ---- graphs: a step recorded once and replayed (see `crate::graph`) ----

    /// Whether this backend records repeated steps as graphs (CUDA, unless `--no-graph`).
    /// The methods below are called only when it does.
    fn graphs(&self) -> bool {
        false
    }
    /// Starts recording: until [`Backend::end_capture`], work is recorded, not run, and every
    /// buffer comes from memory the graph will own. Nothing may be copied from or to the host
    /// meanwhile, and nothing allocated that the step's eager run did not.
    fn begin_capture(&self) {
        unreachable!("{} records no graphs", self.describe())
    }
    /// Ends the recording begun by [`Backend::begin_capture`].
    fn end_capture(&self) -> Self::Graph {
        unreachable!("{} records no graphs", self.describe())
    }
    /// Runs a recorded graph once, on the buffers it was recorded with.
    fn replay(&self, _graph: &Self::Graph) {
        unreachable!("{} records no graphs", self.describe())
    }
    /// Puts the constants of Adam step `s` where [`Backend::adam_step_all`] reads them, before
    /// a step that is captured or replayed (which cannot copy from the host); an eager
    /// `adam_step_all` does this itself. No-op where the constants travel by value.
    fn stage_adam(&self, _s: AdamStep) {}
}

/// The operands of one parameter tensor's Adam update (see [`Backend::adam_step_all`]).
pub struct AdamTensor<'a, B: Backend> {
    /// The parameter, updated in place.
    pub param: &'a mut B::Buf,
    /// Its gradient.
    pub grad: &'a B::Buf,
    /// Its first moment, updated in place.
    pub m: &'a mut B::Buf,
    /// Its second moment, updated in place.
    pub v: &'a mut B::Buf,
}
