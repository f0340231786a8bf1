//! `impl Backend for Cuda`: each method checks that its buffers cover the shapes it was given,
//! then makes one or two typed launches from the kernel table (`kernels.rs`). A failed launch or
//! copy is raised as a [`GpuError`] (the trait's methods cannot return one).

use cudarc::driver::{CudaSlice, DriverError};

use super::contract::{int, AdamArgs, AdamMode, BiasMode, BnArgs, ConvArgs, GemmArgs, ReconCode, UnaryCode};
use super::kernels::{cfg_1d, cfg_blocks, cfg_channel_chunks, cfg_tiles, channel_chunks, reduce_blocks, split_k};
use super::pool::{alloc_error, CudaBuf, CudaBytes};
use super::trace::{self, CopyDir, EventKind};
use super::{Cuda, CudaFloat};
use crate::backend::{Backend, Recon};
use crate::ops::adam::AdamStep;
use crate::ops::batch_norm::BatchNormDims;
use crate::ops::conv2d::Conv2dDims;
use crate::ops::linear::LinearDims;
use crate::ops::unary::Unary;

impl ConvArgs {
    fn of(d: &Conv2dDims) -> Self {
        // The kernels form these products in 32-bit int (GEMM sizes and the column and
        // reduction indices); element offsets are 64-bit.
        for v in [d.n * d.oh * d.ow, d.n * d.h * d.w, d.c_in * d.kh * d.kw, d.c_out * d.kh * d.kw] {
            int(v);
        }
        ConvArgs {
            n: int(d.n),
            c_in: int(d.c_in),
            h: int(d.h),
            w: int(d.w),
            c_out: int(d.c_out),
            kh: int(d.kh),
            kw: int(d.kw),
            stride: int(d.stride),
            pad: int(d.pad),
            oh: int(d.oh),
            ow: int(d.ow),
            kc: 0,
        }
    }
}

impl BnArgs {
    /// The kernels' arguments, with the chunks of the training kernels' grid
    /// (`channel_chunks`).
    fn of(d: &BatchNormDims) -> Self {
        let (chunks, chunk) = channel_chunks(d.channels, d.m());
        BnArgs {
            eps: d.eps,
            momentum: d.momentum,
            outer: int(d.outer),
            channels: int(d.channels),
            inner: int(d.inner),
            chunk: int(chunk),
            chunks: int(chunks),
        }
    }
}

impl UnaryCode {
    /// The kernel code of an activation and its slope (leaky ReLU only).
    fn of<E: CudaFloat>(op: Unary) -> (i32, E) {
        match op {
            Unary::Relu => (UnaryCode::Relu.code(), E::zero()),
            Unary::Sigmoid => (UnaryCode::Sigmoid.code(), E::zero()),
            Unary::Tanh => (UnaryCode::Tanh.code(), E::zero()),
            Unary::LeakyRelu(s) => (UnaryCode::LeakyRelu.code(), E::of(s)),
        }
    }
    /// The code and slope of an optional activation (none: the identity).
    fn of_opt<E: CudaFloat>(op: Option<Unary>) -> (i32, E) {
        op.map_or((UnaryCode::Identity.code(), E::zero()), UnaryCode::of::<E>)
    }
}

impl ReconCode {
    fn of(kind: Recon) -> i32 {
        match kind {
            Recon::Bce => ReconCode::Bce,
            Recon::BceWithLogits => ReconCode::BceWithLogits,
            Recon::Mse => ReconCode::Mse,
        }
        .code()
    }
}

/// The shape label of a linear op in the launch trace: `n x in → out`.
fn linear_shape(d: &LinearDims) -> String {
    format!("{}x{} → {}", d.n, d.d_in, d.d_out)
}
/// The shape label of a convolution: `n x c x h x w → c_out kK sS`.
fn conv_shape(d: &Conv2dDims) -> String {
    format!("{}x{}x{}x{} → {} k{} s{}", d.n, d.c_in, d.h, d.w, d.c_out, d.kh, d.stride)
}
/// The shape label of a batch norm: `outer x channels x inner`.
fn bn_shape(d: &BatchNormDims) -> String {
    format!("{}x{}x{}", d.outer, d.channels, d.inner)
}

/// The device slice of an optional, non-empty operand.
fn present<E: CudaFloat>(o: Option<&CudaBuf<E>>) -> Option<&CudaSlice<E>> {
    o.filter(|b| !b.is_empty()).map(CudaBuf::s)
}
fn present_mut<E: CudaFloat>(o: Option<&mut CudaBuf<E>>) -> Option<&mut CudaSlice<E>> {
    o.filter(|b| !b.is_empty()).map(CudaBuf::sm)
}

impl<E: CudaFloat> Cuda<E> {
    /// Raises a failed launch of `kernel` (see `GpuError::raise`).
    fn launched(&self, r: Result<(), DriverError>, kernel: &str) {
        self.check(r, &format!("launching {kernel}_{}", E::NAME))
    }

    /// The row indices of a gather, copied into the device index buffer (grown as needed); the
    /// guard holds it until the launch is queued.
    fn gather_indices(&self, idx: &[u32]) -> std::sync::MutexGuard<'_, Option<CudaSlice<u32>>> {
        let mut guard = self.inner.idx.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|s| s.len() < idx.len()) {
            // SAFETY: written by the copy below before any read.
            let s = unsafe { self.inner.stream.alloc::<u32>(idx.len().next_power_of_two()) };
            *guard = Some(self.check(s, "allocating the gather index buffer"));
        }
        let ib = guard.as_mut().expect("allocated above");
        // Stream-ordered: a previous gather still reading the old indices finishes first.
        trace::push(|| EventKind::Copy { dir: CopyDir::HostToDevice, bytes: (idx.len() * 4) as u64 });
        self.check(self.inner.stream.memcpy_htod(idx, ib), "copying gather indices to the GPU");
        guard
    }

    /// out[0] = scale · Σ part[..g] (stage 2 of every reduction).
    fn reduce_final(&self, part: &CudaBuf<f64>, g: usize, scale: f64, out: &mut CudaBuf<E>) {
        self.launched(self.k().reduce_final(cfg_blocks(1), part.s(), int(g), scale, out.sm()), "reduce_final");
    }

    /// C (+)= A·B through strided operands; see kernels/gemm.cu. Long reductions with few
    /// output tiles are split into deterministic chunks.
    fn gemm(&self, g: GemmArgs, a: &CudaBuf<E>, b: &CudaBuf<E>, c: &mut CudaBuf<E>, bias: Option<&CudaBuf<E>>) {
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        if m == 0 || n == 0 {
            return;
        }
        assert!(c.len() >= m * n, "gemm: output too small");
        let (splits, kc) = split_k(m, n, k);
        if splits <= 1 || bias.is_some() {
            let r = self.k().gemm(cfg_tiles(m, n, 1), g, a.s(), b.s(), c.sm(), bias.map(CudaBuf::s));
            return self.launched(r, "gemm");
        }
        let mut part = self.inner.pool.take(splits * m * n);
        let gs = GemmArgs { kc: int(kc), ..g };
        self.launched(self.k().gemm_splitk(cfg_tiles(m, n, splits), gs, a.s(), b.s(), part.sm()), "gemm_splitk");
        let r = self.k().splitk_reduce(cfg_1d(m * n), part.s(), int(splits), int(m * n), c.sm(), g.accumulate);
        self.launched(r, "splitk_reduce");
    }
}

impl<E: CudaFloat> Backend for Cuda<E> {
    type E = E;
    type Buf = CudaBuf<E>;
    type Bytes = CudaBytes;

    fn describe(&self) -> String {
        let g = &self.inner.info;
        format!("{} (sm_{}{}, {} GiB)", g.name, g.compute_capability.0, g.compute_capability.1, g.memory_bytes >> 30)
    }
    fn synchronize(&self) {
        self.sync_or_raise();
    }
    fn free_memory(&self) -> Option<u64> {
        // Buffers parked in our pool count as taken: the estimate errs toward refusing.
        self.inner.stream.context().mem_get_info().ok().map(|(free, _)| free as u64)
    }
    fn time(&self, f: &mut dyn FnMut()) -> std::time::Duration {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let stream = &self.inner.stream;
        let record = || self.check(stream.record_event(Some(CU_EVENT_DEFAULT)), "recording a timing event");
        self.sync_or_raise();
        let start = record();
        f();
        let end = record();
        let ms = self.check(start.elapsed_ms(&end), "reading a timing event");
        std::time::Duration::from_secs_f64(ms as f64 / 1e3)
    }

    fn zeros(&self, len: usize) -> CudaBuf<E> {
        let _op = trace::op("zeros", || format!("{len}"));
        let mut b = self.inner.pool.take(len);
        if len > 0 {
            trace::push(|| EventKind::Memset { bytes: (len * std::mem::size_of::<E>()) as u64 });
            self.check(self.inner.stream.memset_zeros(b.sm()), "zeroing device memory");
        }
        b
    }
    /// No memset: the buffer holds whatever it held (a recycled tensor's values, or on the
    /// emulated device NaN), and the op that asked for it writes every element. The GPU suite
    /// compares every op with its CPU twin, whose `empty` is NaN-poisoned in the tests, so an
    /// op that leaves part of its output unwritten fails there.
    fn empty(&self, len: usize) -> CudaBuf<E> {
        let _op = trace::op("empty", || format!("{len}"));
        self.inner.pool.take(len)
    }
    fn upload(&self, host: &[E]) -> CudaBuf<E> {
        let _op = trace::op("upload", || format!("{}", host.len()));
        let mut b = self.inner.pool.take(host.len());
        if !host.is_empty() {
            trace::push(|| EventKind::Copy { dir: CopyDir::HostToDevice, bytes: std::mem::size_of_val(host) as u64 });
            self.check(self.inner.stream.memcpy_htod(host, b.sm()), "copying to the GPU");
        }
        b
    }
    fn download(&self, buf: &CudaBuf<E>) -> Vec<E> {
        let _op = trace::op("download", || format!("{}", buf.len()));
        if buf.is_empty() {
            return vec![];
        }
        trace::push(|| EventKind::Copy {
            dir: CopyDir::DeviceToHost,
            bytes: (buf.len() * std::mem::size_of::<E>()) as u64,
        });
        let v = self.check(self.inner.stream.clone_dtoh(buf.s()), "copying from the GPU");
        self.sync_or_raise();
        v
    }
    fn len(&self, buf: &CudaBuf<E>) -> usize {
        buf.len()
    }
    fn copy(&self, src: &CudaBuf<E>, dst: &mut CudaBuf<E>) {
        let _op = trace::op("copy", || format!("{}", src.len()));
        assert_eq!(src.len(), dst.len(), "copy: lengths differ");
        if !src.is_empty() {
            trace::push(|| EventKind::Copy {
                dir: CopyDir::DeviceToDevice,
                bytes: (src.len() * std::mem::size_of::<E>()) as u64,
            });
            self.check(self.inner.stream.memcpy_dtod(src.s(), dst.sm()), "copying on the GPU");
        }
    }
    fn fill(&self, buf: &mut CudaBuf<E>, value: E) {
        let _op = trace::op("fill", || format!("{}", buf.len()));
        let n = buf.len();
        if n > 0 {
            self.launched(self.k().fill(cfg_1d(n), buf.sm(), value, int(n)), "fill");
        }
    }
    fn gather_rows(&self, src: &CudaBuf<E>, row_len: usize, idx: &[u32], dst: &mut CudaBuf<E>) {
        let _op = trace::op("gather_rows", || format!("{} rows x {row_len}", idx.len()));
        let n = idx.len() * row_len;
        if n == 0 {
            return;
        }
        let rows = src.len() / row_len;
        assert!(idx.iter().all(|&r| (r as usize) < rows), "gather_rows: index out of range");
        assert!(dst.len() >= n, "gather_rows: destination too small");
        let ib = self.gather_indices(idx);
        let r =
            self.k().gather_rows(cfg_1d(n), src.s(), ib.as_ref().expect("uploaded"), int(row_len), dst.sm(), int(n));
        self.launched(r, "gather_rows");
    }
    fn upload_bytes(&self, host: &std::sync::Arc<Vec<u8>>) -> CudaBytes {
        let _op = trace::op("upload_bytes", || format!("{}", host.len()));
        let len = host.len();
        let slice = (len > 0).then(|| {
            // SAFETY: written by the copy below before any read.
            let s = unsafe { self.inner.stream.alloc::<u8>(len) };
            let mut s = s.unwrap_or_else(|e| alloc_error(&self.inner.stream, len as u64, e).raise());
            trace::push(|| EventKind::Copy { dir: CopyDir::HostToDevice, bytes: len as u64 });
            self.check(self.inner.stream.memcpy_htod(&host[..], &mut s), "copying bytes to the GPU");
            s
        });
        CudaBytes { slice, len }
    }
    fn bytes_len(&self, buf: &CudaBytes) -> usize {
        buf.len()
    }
    fn gather_rows_u8(&self, src: &CudaBytes, row_len: usize, idx: &[u32], dst: &mut CudaBuf<E>) {
        let _op = trace::op("gather_rows_u8", || format!("{} rows x {row_len}", idx.len()));
        let n = idx.len() * row_len;
        if n == 0 {
            return;
        }
        let rows = src.len() / row_len;
        assert!(idx.iter().all(|&r| (r as usize) < rows), "gather_rows_u8: index out of range");
        assert!(dst.len() >= n, "gather_rows_u8: destination too small");
        let s = src.slice.as_ref().expect("rows exist, so the buffer is not empty");
        let ib = self.gather_indices(idx);
        let r = self.k().gather_rows_u8(cfg_1d(n), s, ib.as_ref().expect("uploaded"), int(row_len), dst.sm(), int(n));
        self.launched(r, "gather_rows_u8");
    }

    fn linear_forward(
        &self,
        x: &CudaBuf<E>,
        w: &CudaBuf<E>,
        b: Option<&CudaBuf<E>>,
        y: &mut CudaBuf<E>,
        d: LinearDims,
    ) {
        let _op = trace::op("linear_forward", || linear_shape(&d));
        assert!(x.len() >= d.n * d.d_in && w.len() >= d.d_out * d.d_in, "linear_forward: operand too small");
        // y[n, out] = x[n, in] · Wᵀ: B[k, j] = W[j, k] at w[k + j·in].
        let (din, dout) = (int(d.d_in), int(d.d_out));
        let bias_mode = if b.is_some() { BiasMode::PerColumn } else { BiasMode::None }.code();
        let g = GemmArgs {
            m: int(d.n),
            n: dout,
            k: din,
            a_rs: din,
            a_cs: 1,
            b_rs: 1,
            b_cs: din,
            bias_mode,
            ..Default::default()
        };
        self.gemm(g, x, w, y, b);
    }
    fn linear_backward_data(&self, dy: &CudaBuf<E>, w: &CudaBuf<E>, dx: &mut CudaBuf<E>, d: LinearDims) {
        let _op = trace::op("linear_backward_data", || linear_shape(&d));
        assert!(dy.len() >= d.n * d.d_out && w.len() >= d.d_out * d.d_in, "linear_backward_data: operand too small");
        // dx[n, in] += dy[n, out] · W[out, in]
        let (din, dout) = (int(d.d_in), int(d.d_out));
        let g = GemmArgs {
            m: int(d.n),
            n: din,
            k: dout,
            a_rs: dout,
            a_cs: 1,
            b_rs: din,
            b_cs: 1,
            accumulate: 1,
            ..Default::default()
        };
        self.gemm(g, dy, w, dx, None);
    }
    fn linear_backward_weight(&self, dy: &CudaBuf<E>, x: &CudaBuf<E>, dw: &mut CudaBuf<E>, d: LinearDims) {
        let _op = trace::op("linear_backward_weight", || linear_shape(&d));
        assert!(dy.len() >= d.n * d.d_out && x.len() >= d.n * d.d_in, "linear_backward_weight: operand too small");
        // dW[out, in] += dyᵀ[out, n] · x[n, in]: A[o, k] = dy[k, o] at dy[o + k·out].
        let (din, dout) = (int(d.d_in), int(d.d_out));
        let g = GemmArgs {
            m: dout,
            n: din,
            k: int(d.n),
            a_rs: 1,
            a_cs: dout,
            b_rs: din,
            b_cs: 1,
            accumulate: 1,
            ..Default::default()
        };
        self.gemm(g, dy, x, dw, None);
    }

    fn bias_add(&self, y: &mut CudaBuf<E>, b: &CudaBuf<E>, outer: usize, channels: usize, inner: usize) {
        let _op = trace::op("bias_add", || format!("{outer}x{channels}x{inner}"));
        let n = outer * channels * inner;
        if n == 0 {
            return;
        }
        assert!(y.len() >= n && b.len() >= channels, "bias_add: operand too small");
        let r = self.k().bias_add(cfg_1d(n), y.sm(), b.s(), int(channels), int(inner), int(n));
        self.launched(r, "bias_add");
    }
    fn bias_backward(&self, dy: &CudaBuf<E>, db: &mut CudaBuf<E>, outer: usize, channels: usize, inner: usize) {
        let _op = trace::op("bias_backward", || format!("{outer}x{channels}x{inner}"));
        if channels == 0 || outer * inner == 0 {
            return;
        }
        assert!(dy.len() >= outer * channels * inner && db.len() >= channels, "bias_backward: operand too small");
        let (chunks, chunk) = channel_chunks(channels, outer * inner);
        let mut part = self.inner.scratch.take(chunks * channels);
        let r = self.k().bias_bwd(
            cfg_channel_chunks(chunks, channels),
            dy.s(),
            part.sm(),
            db.sm(),
            int(outer),
            int(channels),
            int(inner),
            int(chunk),
        );
        self.launched(r, "bias_bwd");
        if chunks > 1 {
            let r = self.k().chunk_sum(cfg_1d(channels), part.s(), int(chunks), int(channels), db.sm());
            self.launched(r, "chunk_sum");
        }
    }

    fn conv2d_forward(
        &self,
        x: &CudaBuf<E>,
        w: &CudaBuf<E>,
        b: Option<&CudaBuf<E>>,
        y: &mut CudaBuf<E>,
        d: Conv2dDims,
    ) {
        let _op = trace::op("conv2d_forward", || conv_shape(&d));
        assert!(
            x.len() >= d.x_len() && w.len() >= d.w_len() && y.len() >= d.y_len(),
            "conv2d_forward: operand too small"
        );
        if d.y_len() == 0 {
            return;
        }
        let cfg = cfg_tiles(d.c_out, d.n * d.oh * d.ow, 1);
        let r = self.k().conv2d_fwd(cfg, ConvArgs::of(&d), x.s(), w.s(), b.map(CudaBuf::s), y.sm());
        self.launched(r, "conv2d_fwd");
    }
    fn conv2d_backward_data(&self, dy: &CudaBuf<E>, w: &CudaBuf<E>, dx: &mut CudaBuf<E>, d: Conv2dDims) {
        let _op = trace::op("conv2d_backward_data", || conv_shape(&d));
        assert!(
            dx.len() >= d.x_len() && w.len() >= d.w_len() && dy.len() >= d.y_len(),
            "conv2d_backward_data: operand too small"
        );
        if d.x_len() == 0 {
            return;
        }
        let cfg = cfg_tiles(d.c_in, d.n * d.h * d.w, 1);
        self.launched(self.k().conv2d_bwd_data(cfg, ConvArgs::of(&d), dy.s(), w.s(), dx.sm()), "conv2d_bwd_data");
    }
    fn conv2d_backward_weight(&self, dy: &CudaBuf<E>, x: &CudaBuf<E>, dw: &mut CudaBuf<E>, d: Conv2dDims) {
        let _op = trace::op("conv2d_backward_weight", || conv_shape(&d));
        assert!(
            x.len() >= d.x_len() && dw.len() >= d.w_len() && dy.len() >= d.y_len(),
            "conv2d_backward_weight: operand too small"
        );
        let (m, n, k) = (d.c_out, d.c_in * d.kh * d.kw, d.n * d.oh * d.ow);
        if m * n == 0 || k == 0 {
            return;
        }
        let (splits, kc) = split_k(m, n, k);
        let a = ConvArgs { kc: int(kc), ..ConvArgs::of(&d) };
        let mut part = self.inner.pool.take(splits * m * n);
        let r = self.k().conv2d_bwd_weight(cfg_tiles(m, n, splits), a, dy.s(), x.s(), part.sm());
        self.launched(r, "conv2d_bwd_weight");
        let r = self.k().splitk_reduce(cfg_1d(m * n), part.s(), int(splits), int(m * n), dw.sm(), 1);
        self.launched(r, "splitk_reduce");
    }

    fn batch_norm_forward_train(
        &self,
        x: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        beta: &CudaBuf<E>,
        y: &mut CudaBuf<E>,
        save_mean: &mut CudaBuf<E>,
        save_invstd: &mut CudaBuf<E>,
        running_mean: &mut CudaBuf<E>,
        running_var: &mut CudaBuf<E>,
        d: BatchNormDims,
    ) {
        let _op = trace::op("batch_norm_forward_train", || bn_shape(&d));
        let n = d.outer * d.channels * d.inner;
        if n == 0 {
            return;
        }
        assert!(x.len() >= n && y.len() >= n && gamma.len() >= d.channels, "batch_norm_forward_train: too small");
        let a = BnArgs::of(&d);
        let grid = cfg_channel_chunks(a.chunks as usize, d.channels);
        let mut part = self.inner.scratch.take(3 * a.chunks as usize * d.channels);
        self.launched(self.k().bn_stats_partial(grid, a, x.s(), part.sm()), "bn_stats_partial");
        let (act, slope) = UnaryCode::of_opt::<E>(d.act);
        let r = self.k().bn_fwd_apply(
            grid,
            a,
            act,
            slope,
            x.s(),
            gamma.s(),
            beta.s(),
            part.s(),
            y.sm(),
            save_mean.sm(),
            save_invstd.sm(),
            running_mean.sm(),
            running_var.sm(),
        );
        self.launched(r, "bn_fwd_apply");
    }
    fn batch_norm_forward_eval(
        &self,
        x: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        beta: &CudaBuf<E>,
        running_mean: &CudaBuf<E>,
        running_var: &CudaBuf<E>,
        y: &mut CudaBuf<E>,
        d: BatchNormDims,
    ) {
        let _op = trace::op("batch_norm_forward_eval", || bn_shape(&d));
        let n = d.outer * d.channels * d.inner;
        if n == 0 {
            return;
        }
        assert!(x.len() >= n && y.len() >= n && gamma.len() >= d.channels, "batch_norm_forward_eval: too small");
        let (act, slope) = UnaryCode::of_opt::<E>(d.act);
        let a = BnArgs::of(&d);
        let r = self.k().bn_fwd_eval(
            cfg_channel_chunks(a.chunks as usize, d.channels),
            a,
            act,
            slope,
            x.s(),
            gamma.s(),
            beta.s(),
            running_mean.s(),
            running_var.s(),
            y.sm(),
        );
        self.launched(r, "bn_fwd_eval");
    }
    fn batch_norm_backward(
        &self,
        dy: &CudaBuf<E>,
        y: Option<&CudaBuf<E>>,
        x: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        save_mean: &CudaBuf<E>,
        save_invstd: &CudaBuf<E>,
        dx: Option<&mut CudaBuf<E>>,
        dgamma: Option<&mut CudaBuf<E>>,
        dbeta: Option<&mut CudaBuf<E>>,
        d: BatchNormDims,
    ) {
        let _op = trace::op("batch_norm_backward", || bn_shape(&d));
        let n = d.outer * d.channels * d.inner;
        if n == 0 {
            return;
        }
        assert!(dy.len() >= n && x.len() >= n, "batch_norm_backward: too small");
        assert!(
            d.act.is_some() == y.is_some() && y.is_none_or(|y| y.len() >= n),
            "batch_norm_backward: the activation's output y is given exactly when one is fused"
        );
        let (act, slope) = UnaryCode::of_opt::<E>(d.act);
        let y = y.map(CudaBuf::s);
        let a = BnArgs::of(&d);
        let grid = cfg_channel_chunks(a.chunks as usize, d.channels);
        let mut part = self.inner.scratch.take(2 * a.chunks as usize * d.channels);
        let r =
            self.k().bn_bwd_partial(grid, a, act, slope, dy.s(), y, x.s(), save_mean.s(), save_invstd.s(), part.sm());
        self.launched(r, "bn_bwd_partial");
        let dx = present_mut(dx);
        // Without dx only stage 2's sums are left: one block per channel.
        let grid = if dx.is_some() { grid } else { cfg_channel_chunks(1, d.channels) };
        let r = self.k().bn_bwd_apply(
            grid,
            a,
            act,
            slope,
            dy.s(),
            y,
            x.s(),
            gamma.s(),
            save_mean.s(),
            save_invstd.s(),
            part.s(),
            dx,
            present_mut(dgamma),
            present_mut(dbeta),
        );
        self.launched(r, "bn_bwd_apply");
    }

    fn unary_forward(&self, op: Unary, x: &CudaBuf<E>, y: &mut CudaBuf<E>) {
        let _op = trace::op("unary_forward", || format!("{op:?} {}", x.len()));
        let n = x.len();
        if n == 0 {
            return;
        }
        assert!(y.len() >= n, "unary_forward: output too small");
        let (code, slope) = UnaryCode::of::<E>(op);
        self.launched(self.k().unary_fwd(cfg_1d(n), code, slope, x.s(), y.sm(), int(n)), "unary_fwd");
    }
    fn unary_backward(&self, op: Unary, x: &CudaBuf<E>, y: &CudaBuf<E>, dy: &CudaBuf<E>, dx: &mut CudaBuf<E>) {
        let _op = trace::op("unary_backward", || format!("{op:?} {}", dx.len()));
        let n = dx.len();
        if n == 0 {
            return;
        }
        assert!(x.len() >= n && y.len() >= n && dy.len() >= n, "unary_backward: operand too small");
        let (code, slope) = UnaryCode::of::<E>(op);
        let r = self.k().unary_bwd(cfg_1d(n), code, slope, x.s(), y.s(), dy.s(), dx.sm(), int(n));
        self.launched(r, "unary_bwd");
    }
    fn mul(&self, a: &CudaBuf<E>, b: &CudaBuf<E>, y: &mut CudaBuf<E>) {
        let _op = trace::op("mul", || format!("{}", y.len()));
        let n = y.len();
        if n == 0 {
            return;
        }
        assert!(a.len() >= n && b.len() >= n, "mul: operand too small");
        self.launched(self.k().mul(cfg_1d(n), a.s(), b.s(), y.sm(), int(n)), "mul");
    }
    fn mul_accumulate(&self, a: &CudaBuf<E>, b: &CudaBuf<E>, out: &mut CudaBuf<E>) {
        let _op = trace::op("mul_accumulate", || format!("{}", out.len()));
        let n = out.len();
        if n == 0 {
            return;
        }
        assert!(a.len() >= n && b.len() >= n, "mul_accumulate: operand too small");
        self.launched(self.k().mul_acc(cfg_1d(n), a.s(), b.s(), out.sm(), int(n)), "mul_acc");
    }
    fn axpy(&self, alpha: E, x: &CudaBuf<E>, y: &mut CudaBuf<E>) {
        let _op = trace::op("axpy", || format!("{}", y.len()));
        let n = y.len();
        if n == 0 {
            return;
        }
        assert!(x.len() >= n, "axpy: x too small");
        self.launched(self.k().axpy(cfg_1d(n), alpha, x.s(), y.sm(), int(n)), "axpy");
    }
    fn sum(&self, x: &CudaBuf<E>, out: &mut CudaBuf<E>) {
        let _op = trace::op("sum", || format!("{}", x.len()));
        let n = x.len();
        if n == 0 {
            self.fill(out, E::zero());
            return;
        }
        let g = reduce_blocks(n);
        let mut part = self.inner.scratch.take(g);
        self.launched(self.k().sum_partial(cfg_blocks(g), x.s(), int(n), part.sm()), "sum_partial");
        self.reduce_final(&part, g, 1.0, out);
    }
    fn broadcast_scalar_accumulate(&self, dout: &CudaBuf<E>, alpha: E, dx: &mut CudaBuf<E>) {
        let _op = trace::op("broadcast_scalar_accumulate", || format!("{}", dx.len()));
        let n = dx.len();
        if n == 0 {
            return;
        }
        let r = self.k().broadcast_acc(cfg_1d(n), dout.s(), alpha, dx.sm(), int(n));
        self.launched(r, "broadcast_acc");
    }

    fn reparam_kl_forward(
        &self,
        mu: &CudaBuf<E>,
        logvar: &CudaBuf<E>,
        eps: &CudaBuf<E>,
        z: &mut CudaBuf<E>,
        kl: &mut CudaBuf<E>,
    ) {
        let _op = trace::op("reparam_kl_forward", || format!("{}", mu.len()));
        let n = mu.len();
        if n == 0 {
            self.fill(kl, E::zero());
            return;
        }
        assert!(logvar.len() >= n && eps.len() >= n && z.len() >= n, "reparam_kl_forward: operand too small");
        let g = reduce_blocks(n);
        let mut part = self.inner.scratch.take(g);
        let r = self.k().reparam_kl_fwd(cfg_blocks(g), mu.s(), logvar.s(), eps.s(), z.sm(), int(n), part.sm());
        self.launched(r, "reparam_kl_fwd");
        self.reduce_final(&part, g, -0.5, kl);
    }
    fn reparam_kl_backward(
        &self,
        mu: &CudaBuf<E>,
        logvar: &CudaBuf<E>,
        eps: &CudaBuf<E>,
        dz: Option<&CudaBuf<E>>,
        dkl: Option<&CudaBuf<E>>,
        dmu: Option<&mut CudaBuf<E>>,
        dlogvar: Option<&mut CudaBuf<E>>,
    ) {
        let _op = trace::op("reparam_kl_backward", || format!("{}", mu.len()));
        let n = mu.len();
        if n == 0 {
            return;
        }
        let (dz, dkl) = (present(dz), present(dkl));
        if let Some(dmu) = dmu {
            self.launched(self.k().reparam_bwd_mu(cfg_1d(n), mu.s(), dz, dkl, dmu.sm(), int(n)), "reparam_bwd_mu");
        }
        if let Some(dlv) = dlogvar {
            let r = self.k().reparam_bwd_logvar(cfg_1d(n), logvar.s(), eps.s(), dz, dkl, dlv.sm(), int(n));
            self.launched(r, "reparam_bwd_logvar");
        }
    }
    fn recon_loss_forward(&self, kind: Recon, x: &CudaBuf<E>, target: &CudaBuf<E>, out: &mut CudaBuf<E>) {
        let _op = trace::op("recon_loss_forward", || format!("{kind:?} {}", x.len()));
        let n = x.len();
        if n == 0 {
            self.fill(out, E::zero());
            return;
        }
        assert!(target.len() >= n, "recon_loss_forward: target too small");
        let g = reduce_blocks(n);
        let mut part = self.inner.scratch.take(g);
        let r = self.k().loss_fwd(cfg_blocks(g), ReconCode::of(kind), x.s(), target.s(), int(n), part.sm());
        self.launched(r, "loss_fwd");
        self.reduce_final(&part, g, 1.0, out);
    }
    fn recon_loss_backward(
        &self,
        kind: Recon,
        x: &CudaBuf<E>,
        target: &CudaBuf<E>,
        dout: &CudaBuf<E>,
        dx: &mut CudaBuf<E>,
    ) {
        let _op = trace::op("recon_loss_backward", || format!("{kind:?} {}", dx.len()));
        let n = dx.len();
        if n == 0 {
            return;
        }
        assert!(x.len() >= n && target.len() >= n, "recon_loss_backward: operand too small");
        let r = self.k().loss_bwd(cfg_1d(n), ReconCode::of(kind), x.s(), target.s(), dout.s(), dx.sm(), int(n));
        self.launched(r, "loss_bwd");
    }

    fn adam_step(
        &self,
        param: &mut CudaBuf<E>,
        grad: &CudaBuf<E>,
        m: &mut CudaBuf<E>,
        v: &mut CudaBuf<E>,
        s: AdamStep,
    ) {
        let _op = trace::op("adam_step", || format!("{}", param.len()));
        let n = param.len();
        if n == 0 {
            return;
        }
        assert!(grad.len() >= n && m.len() >= n && v.len() >= n, "adam_step: operand too small");
        // Constants converted to E exactly as AdamStep::apply does on the CPU.
        let (b1, b2) = (E::of(s.beta1), E::of(s.beta2));
        let mode = match (s.weight_decay != 0.0, s.decoupled) {
            (false, _) => AdamMode::Plain,
            (true, false) => AdamMode::L2,
            (true, true) => AdamMode::Decoupled,
        };
        let a = AdamArgs {
            beta1: b1,
            beta2: b2,
            one_minus_beta1: E::one() - b1,
            one_minus_beta2: E::one() - b2,
            eps: E::of(s.eps),
            weight_decay: E::of(s.weight_decay),
            decay_factor: E::one() - E::of(s.lr * s.weight_decay),
            step_size: E::of(s.lr / s.bias_correction1),
            bc2_sqrt: E::of(s.bias_correction2_sqrt),
            mode: mode.code(),
            n: int(n),
        };
        self.launched(self.k().adam(cfg_1d(n), a, param.sm(), grad.s(), m.sm(), v.sm()), "adam");
    }
}
