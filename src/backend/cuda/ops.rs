//! `impl Backend for Cuda`: each method checks that its buffers cover the shapes it was given,
//! then makes one or two typed launches from the kernel table (`kernels.rs`). A failed launch or
//! copy is raised as a [`GpuError`] (the trait's methods cannot return one).

use cudarc::driver::{CudaSlice, DriverError, LaunchConfig};

use super::contract::{
    int, AdamArgs, AdamMode, BiasMode, BnArgs, ConvArgs, GemmArgs, ReconCode, UnaryCode, ADAM_TABLE_WORDS, BLOCK,
    MULTI_CHUNK, ZERO_TABLE_WORDS,
};
use super::kernels::{
    cfg_1d, cfg_blocks, cfg_channel_chunks, cfg_tiles, channel_chunks, choose_tile, conv_phases, reduce_blocks,
    split_k, Tile, TILES,
};
use super::pool::{alloc_error, CudaBuf, CudaBytes, PrivateMemory};
use super::trace::{self, CopyDir, EventKind};
use super::{Cuda, CudaFloat, CudaStepGraph, GpuError};
use crate::backend::{AdamTensor, Backend, Precision, Recon};
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
    /// Leaves capture mode (the pools' private lists, the kept tables) and returns what a
    /// graph recorded meanwhile must hold.
    #[allow(clippy::type_complexity)]
    fn finish_capture(&self) -> (PrivateMemory<E>, PrivateMemory<f64>, Vec<std::sync::Arc<CudaSlice<u64>>>) {
        let tables = self.inner.capture.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        (self.inner.pool.end_private(), self.inner.scratch.end_private(), tables)
    }

    /// The tile shapes the matrix products may use at this backend's precision: the
    /// tensor-core kernels come in 64 × 64 only.
    fn tiles(&self) -> &'static [Tile] {
        match self.precision {
            Precision::F32 => &TILES,
            Precision::Tf32 | Precision::Bf16 => &[Tile::Square],
        }
    }

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

    /// The device address of a buffer, for the multi-tensor kernels' tables. The backend has
    /// one stream and no event tracking, so nothing waits here.
    fn address(&self, b: &CudaBuf<E>) -> u64 {
        use cudarc::driver::DevicePtr;
        let (ptr, _no_wait) = b.s().device_ptr(&self.inner.stream);
        ptr
    }

    /// Runs `launch` with the device copy of the table `words`, uploading it the first time
    /// these words are asked for (see `Inner::tables`).
    fn with_table(&self, words: Vec<u64>, launch: impl FnOnce(&CudaSlice<u64>)) {
        let mut tables = self.inner.tables.lock().unwrap_or_else(|p| p.into_inner());
        // Tables of buffers long gone would pile up in a process that builds many models (the
        // tests); dropping them is stream-ordered, after any launch still reading them.
        // (Not while a graph is captured: freeing memory would be recorded into it. Tables a
        // graph uses stay alive through the graph's own references.)
        let capturing = self.inner.capture.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if !tables.contains_key(&words) && tables.len() >= 64 && !capturing {
            tables.clear();
        }
        let table = match tables.entry(words) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let bytes = (e.key().len() * 8) as u64;
                trace::push(|| EventKind::Copy { dir: CopyDir::HostToDevice, bytes });
                let t = self.check(self.inner.stream.clone_htod(e.key()), "copying a tensor table to the GPU");
                e.insert(std::sync::Arc::new(t))
            }
        };
        // A graph being captured points at this table: it holds it from now on.
        if let Some(kept) = self.inner.capture.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            kept.push(table.clone());
        }
        launch(table)
    }

    /// out[0] = scale · Σ part[..g] (stage 2 of every reduction).
    fn reduce_final(&self, part: &CudaBuf<f64>, g: usize, scale: f64, out: &mut CudaBuf<E>) {
        self.launched(self.k().reduce_final(cfg_blocks(1), part.s(), int(g), scale, out.sm()), "reduce_final");
    }

    /// C (+)= A·B through strided operands; see kernels/gemm.cu. The tile shape and the
    /// number of deterministic K chunks come from the shape (`split_k`): chunks when the
    /// output tiles alone leave multiprocessors idle, with the bias (per column only: the
    /// linear forward's) added once by the in-order reduction.
    fn gemm(&self, g: GemmArgs, a: &CudaBuf<E>, b: &CudaBuf<E>, c: &mut CudaBuf<E>, bias: Option<&CudaBuf<E>>) {
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        if m == 0 || n == 0 {
            return;
        }
        assert!(c.len() >= m * n, "gemm: output too small");
        let (tile, splits, kc) = split_k(self.tiles(), m, n, k, false);
        if splits <= 1 {
            let (cfg, bias) = (cfg_tiles(tile, m, n, 1), bias.map(CudaBuf::s));
            let k = self.k();
            let r = match (self.precision, tile) {
                (Precision::Tf32, _) => k.gemm_tf32(cfg, g, a.s(), b.s(), c.sm(), bias),
                (Precision::Bf16, _) => k.gemm_bf16(cfg, g, a.s(), b.s(), c.sm(), bias),
                (_, Tile::Square) => k.gemm(cfg, g, a.s(), b.s(), c.sm(), bias),
                (_, Tile::Short) => k.gemm_m16(cfg, g, a.s(), b.s(), c.sm(), bias),
                (_, Tile::Narrow) => k.gemm_n16(cfg, g, a.s(), b.s(), c.sm(), bias),
            };
            return self.launched(r, "gemm");
        }
        let mut part = self.inner.pool.take(splits * m * n);
        let gs = GemmArgs { kc: int(kc), ..g };
        let cfg = cfg_tiles(tile, m, n, splits);
        let k = self.k();
        let r = match (self.precision, tile) {
            (Precision::Tf32, _) => k.gemm_splitk_tf32(cfg, gs, a.s(), b.s(), part.sm()),
            (Precision::Bf16, _) => k.gemm_splitk_bf16(cfg, gs, a.s(), b.s(), part.sm()),
            (_, Tile::Square) => k.gemm_splitk(cfg, gs, a.s(), b.s(), part.sm()),
            (_, Tile::Short) => k.gemm_splitk_m16(cfg, gs, a.s(), b.s(), part.sm()),
            (_, Tile::Narrow) => k.gemm_splitk_n16(cfg, gs, a.s(), b.s(), part.sm()),
        };
        self.launched(r, "gemm_splitk");
        match bias {
            Some(bias) => {
                assert!(
                    g.bias_mode == BiasMode::PerColumn.code() && g.accumulate == 0,
                    "gemm: a split product adds a bias per column into an overwritten output only"
                );
                let (m_i, n_i) = (int(m), int(n));
                // One row of columns per block row: rows along y, columns along x.
                let cfg = LaunchConfig {
                    grid_dim: (n.div_ceil(BLOCK as usize) as u32, m.min(65535) as u32, 1),
                    block_dim: (BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                };
                let r = self.k().splitk_reduce_bias(cfg, part.s(), int(splits), m_i, n_i, c.sm(), bias.s());
                self.launched(r, "splitk_reduce_bias");
            }
            None => {
                let r = self.k().splitk_reduce(cfg_1d(m * n), part.s(), int(splits), int(m * n), c.sm(), g.accumulate);
                self.launched(r, "splitk_reduce");
            }
        }
    }
}

impl<E: CudaFloat> Backend for Cuda<E> {
    type E = E;
    type Buf = CudaBuf<E>;
    type Bytes = CudaBytes;
    type Graph = CudaStepGraph<E>;

    fn describe(&self) -> String {
        let g = &self.inner.info;
        let products = match self.precision {
            Precision::F32 => String::new(),
            p => format!(", matrix products on tensor cores at {}", p.name()),
        };
        format!(
            "{} (sm_{}{}, {} GiB{products})",
            g.name,
            g.compute_capability.0,
            g.compute_capability.1,
            g.memory_bytes >> 30
        )
    }
    fn precision(&self) -> Precision {
        self.precision
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
        let (m, n) = (d.c_out, d.n * d.oh * d.ow);
        let tile = choose_tile(self.tiles(), m, n, d.c_in * d.kh * d.kw, 1);
        let (cfg, a, b) = (cfg_tiles(tile, m, n, 1), ConvArgs::of(&d), b.map(CudaBuf::s));
        let k = self.k();
        let r = match (self.precision, tile) {
            (Precision::Tf32, _) => k.conv2d_fwd_tf32(cfg, a, x.s(), w.s(), b, y.sm()),
            (Precision::Bf16, _) => k.conv2d_fwd_bf16(cfg, a, x.s(), w.s(), b, y.sm()),
            (_, Tile::Square) => k.conv2d_fwd(cfg, a, x.s(), w.s(), b, y.sm()),
            (_, Tile::Short) => k.conv2d_fwd_m16(cfg, a, x.s(), w.s(), b, y.sm()),
            (_, Tile::Narrow) => k.conv2d_fwd_n16(cfg, a, x.s(), w.s(), b, y.sm()),
        };
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
        // One GEMM per output phase (grid z), each over its own pixels and taps; the grid
        // covers the largest, and the tile is chosen for the phases' shapes together.
        let a = ConvArgs::of(&d);
        let phases = conv_phases(&a);
        let (pixels, taps) = phases.iter().fold((0, 0), |(p, t), &(pp, tt)| (p.max(pp), t.max(tt)));
        let n = d.n * pixels;
        let tile = choose_tile(self.tiles(), d.c_in, n, d.c_out * taps, phases.len());
        let cfg = cfg_tiles(tile, d.c_in, n.max(1), phases.len());
        let k = self.k();
        let r = match (self.precision, tile) {
            (Precision::Tf32, _) => k.conv2d_bwd_data_tf32(cfg, a, dy.s(), w.s(), dx.sm()),
            (Precision::Bf16, _) => k.conv2d_bwd_data_bf16(cfg, a, dy.s(), w.s(), dx.sm()),
            (_, Tile::Square) => k.conv2d_bwd_data(cfg, a, dy.s(), w.s(), dx.sm()),
            (_, Tile::Short) => k.conv2d_bwd_data_m16(cfg, a, dy.s(), w.s(), dx.sm()),
            (_, Tile::Narrow) => k.conv2d_bwd_data_n16(cfg, a, dy.s(), w.s(), dx.sm()),
        };
        self.launched(r, "conv2d_bwd_data");
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
        let (tile, splits, kc) = split_k(self.tiles(), m, n, k, true);
        let a = ConvArgs { kc: int(kc), ..ConvArgs::of(&d) };
        let mut part = self.inner.pool.take(splits * m * n);
        let cfg = cfg_tiles(tile, m, n, splits);
        let kn = self.k();
        let r = match (self.precision, tile) {
            (Precision::Tf32, _) => kn.conv2d_bwd_weight_tf32(cfg, a, dy.s(), x.s(), part.sm()),
            (Precision::Bf16, _) => kn.conv2d_bwd_weight_bf16(cfg, a, dy.s(), x.s(), part.sm()),
            (_, Tile::Square) => kn.conv2d_bwd_weight(cfg, a, dy.s(), x.s(), part.sm()),
            (_, Tile::Short) => kn.conv2d_bwd_weight_m16(cfg, a, dy.s(), x.s(), part.sm()),
            (_, Tile::Narrow) => kn.conv2d_bwd_weight_n16(cfg, a, dy.s(), x.s(), part.sm()),
        };
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
        let a = adam_args::<E>(s, n);
        self.launched(self.k().adam(cfg_1d(n), a, param.sm(), grad.s(), m.sm(), v.sm()), "adam");
    }

    fn adam_step_all(&self, tensors: &mut [AdamTensor<'_, Self>], s: AdamStep, guard: &CudaBuf<E>) {
        let _op = trace::op("adam_step_all", || format!("{} tensors", tensors.len()));
        let (mut words, mut blocks, mut elems, mut count) = (vec![], 0usize, 0usize, 0usize);
        for t in tensors.iter() {
            let n = t.param.len();
            if n == 0 {
                continue;
            }
            assert!(t.grad.len() >= n && t.m.len() >= n && t.v.len() >= n, "adam_step_all: operand too small");
            let addresses = [&*t.param, t.grad, &*t.m, &*t.v].map(|b| self.address(b));
            words.extend([blocks as u64, n as u64]);
            words.extend(addresses);
            blocks += n.div_ceil(MULTI_CHUNK);
            elems += n;
            count += 1;
        }
        if count == 0 {
            return;
        }
        debug_assert_eq!(words.len(), count * ADAM_TABLE_WORDS);
        assert!(!guard.is_empty(), "adam_step_all: no loss to guard the step with");
        let staged = self.inner.adam_args.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|a| a.1);
        if staged != Some(s) {
            if self.inner.capture.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                GpuError::Graph("Adam's constants were not staged before the capture".into()).raise()
            }
            self.stage_adam(s);
        }
        let args = self.inner.adam_args.lock().unwrap_or_else(|p| p.into_inner());
        let dev_args = &args.as_ref().expect("staged above").0;
        self.with_table(words, |table| {
            let r = self.k().adam_multi(cfg_blocks(blocks), dev_args, table, int(count), int(elems), guard.s());
            self.launched(r, "adam_multi");
        });
    }

    fn zero_all(&self, bufs: &mut [&mut CudaBuf<E>]) {
        let _op = trace::op("zero_all", || format!("{} buffers", bufs.len()));
        let (mut words, mut blocks, mut elems, mut count) = (vec![], 0usize, 0usize, 0usize);
        for b in bufs.iter().filter(|b| !b.is_empty()) {
            words.extend([blocks as u64, b.len() as u64, self.address(b)]);
            blocks += b.len().div_ceil(MULTI_CHUNK);
            elems += b.len();
            count += 1;
        }
        if count == 0 {
            return;
        }
        debug_assert_eq!(words.len(), count * ZERO_TABLE_WORDS);
        self.with_table(words, |table| {
            self.launched(self.k().zero_multi(cfg_blocks(blocks), table, int(count), int(elems)), "zero_multi");
        });
    }

    fn normal_noise(&self, key: [u32; 2], draw: u64, out: &mut CudaBuf<E>) {
        let _op = trace::op("normal_noise", || format!("{}", out.len()));
        let n = out.len();
        if n == 0 {
            return;
        }
        // The u32 words travel as the bits of ints (the kernel casts them back).
        let w = |x: u32| x as i32;
        let (k0, k1, d0, d1) = (w(key[0]), w(key[1]), w(draw as u32), w((draw >> 32) as u32));
        let r = self.k().philox_normal(cfg_1d(n.div_ceil(2)), out.sm(), int(n), k0, k1, d0, d1);
        self.launched(r, "philox_normal");
    }

    fn pack_scalars(&self, parts: &[&CudaBuf<E>], out: &mut CudaBuf<E>) {
        let _op = trace::op("pack_scalars", || format!("{}", parts.len()));
        assert!(out.len() >= parts.len() && parts.iter().all(|p| !p.is_empty()), "pack_scalars: operand too small");
        if let [a, b, c] = parts {
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
            return self.launched(self.k().pack3(cfg, a.s(), b.s(), c.s(), out.sm()), "pack3");
        }
        for (i, p) in parts.iter().enumerate() {
            trace::push(|| EventKind::Copy { dir: CopyDir::DeviceToDevice, bytes: std::mem::size_of::<E>() as u64 });
            let r = self.inner.stream.memcpy_dtod(&p.s().slice(0..1), &mut out.sm().slice_mut(i..i + 1));
            self.check(r, "copying on the GPU");
        }
    }

    fn graphs(&self) -> bool {
        self.graphs
    }

    fn begin_capture(&self) {
        let _op = trace::op("begin_capture", String::new);
        self.inner.pool.begin_private();
        self.inner.scratch.begin_private();
        *self.inner.capture.lock().unwrap_or_else(|p| p.into_inner()) = Some(vec![]);
        // Thread-local: only this thread's unsafe calls (a host copy, an allocation, a
        // synchronization) are refused meanwhile; other threads' streams carry on.
        let mode = cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        if let Err(e) = self.inner.stream.begin_capture(mode) {
            drop(self.finish_capture());
            GpuError::Graph(format!("beginning the capture: {e:?}")).raise()
        }
    }

    fn end_capture(&self) -> CudaStepGraph<E> {
        let _op = trace::op("end_capture", String::new);
        let flags = cudarc::driver::sys::CUgraphInstantiate_flags(0);
        let ended = self.inner.stream.end_capture(flags);
        let (memory, scratch, tables) = self.finish_capture();
        match ended {
            Ok(Some(graph)) => CudaStepGraph { graph, _memory: memory, _scratch: scratch, _tables: tables },
            Ok(None) => GpuError::Graph("the capture recorded nothing".into()).raise(),
            // The call the capture refused raised its own error first; this is for the rest.
            Err(e) => GpuError::Graph(format!("ending the capture: {e:?}")).raise(),
        }
    }

    fn replay(&self, graph: &CudaStepGraph<E>) {
        let _op = trace::op("replay", String::new);
        trace::push(|| EventKind::GraphLaunch);
        self.check(graph.graph.launch(), "launching a CUDA graph");
    }

    fn stage_adam(&self, s: AdamStep) {
        let mut args = self.inner.adam_args.lock().unwrap_or_else(|p| p.into_inner());
        if args.as_ref().is_some_and(|a| a.1 == s) {
            return; // the device holds these constants already
        }
        let mut slice = match args.take() {
            Some((slice, _)) => slice,
            // SAFETY: written by the copy below before any kernel reads it.
            None => self.check(unsafe { self.inner.stream.alloc::<AdamArgs<E>>(1) }, "allocating the Adam constants"),
        };
        // `n` is the per-tensor kernel's; adam_multi takes its element count as an argument.
        let host = [adam_args::<E>(s, 0)];
        trace::push(|| EventKind::Copy {
            dir: CopyDir::HostToDevice,
            bytes: std::mem::size_of::<AdamArgs<E>>() as u64,
        });
        self.check(self.inner.stream.memcpy_htod(&host, &mut slice), "copying the Adam constants to the GPU");
        *args = Some((slice, s));
    }
}

/// Adam's constants for `n` elements, converted to E exactly as `AdamStep::apply` does on the
/// CPU.
fn adam_args<E: CudaFloat>(s: AdamStep, n: usize) -> AdamArgs<E> {
    let (b1, b2) = (E::of(s.beta1), E::of(s.beta2));
    let mode = match (s.weight_decay != 0.0, s.decoupled) {
        (false, _) => AdamMode::Plain,
        (true, false) => AdamMode::L2,
        (true, true) => AdamMode::Decoupled,
    };
    AdamArgs {
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
    }
}
