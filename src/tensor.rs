//! Element types and the device-agnostic tensor: a shape plus a backend buffer.
//!
//! Tensors are always contiguous and row-major; images are NCHW.

use std::fmt::Debug;

/// The element types the engine computes in. f32 trains; f64 proves gradients.
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + Copy
    + Default
    + Debug
    + Send
    + Sync
    + bytemuck::Pod
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + 'static
{
    /// Short name used in kernel instantiations and messages ("f32", "f64").
    const NAME: &'static str;
    /// Name of the same type in CUDA C ("float", "double").
    const CUDA_NAME: &'static str;
    /// Converts from f64 (rounding to nearest for f32): how constants, initial weights and
    /// host data (noise, pixels) enter generic code.
    fn of(v: f64) -> Self;
    /// Widens to f64: how generic code reads a value back for host-side math, and how the CPU
    /// reductions accumulate (always in f64, whatever `Self` is).
    fn f64(self) -> f64;
    /// The slice as f32 when `Self` is f32, else `None`: how generic CPU code picks a fast path
    /// written for f32 only (conv2d's AVX-512 kernels), while f64 stays on the reference.
    fn as_f32_slice(v: &[Self]) -> Option<&[f32]>;
    /// `as_f32_slice` for a slice the fast path writes.
    fn as_f32_slice_mut(v: &mut [Self]) -> Option<&mut [f32]>;
}

impl Float for f32 {
    const NAME: &'static str = "f32";
    const CUDA_NAME: &'static str = "float";
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    fn as_f32_slice(v: &[f32]) -> Option<&[f32]> {
        Some(v)
    }
    fn as_f32_slice_mut(v: &mut [f32]) -> Option<&mut [f32]> {
        Some(v)
    }
}

impl Float for f64 {
    const NAME: &'static str = "f64";
    const CUDA_NAME: &'static str = "double";
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    fn as_f32_slice(_: &[f64]) -> Option<&[f32]> {
        None
    }
    fn as_f32_slice_mut(_: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
}

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A contiguous tensor living wherever its backend keeps buffers.
///
/// A tensor is plain data: it records nothing. On a [`crate::tape::Tape`] it is referred to by a
/// [`crate::tape::Var`], and the ops of [`crate::ops`] read and write it through the
/// [`Backend`](crate::backend::Backend) methods.
pub struct Tensor<B: crate::backend::Backend> {
    /// Dimensions, outermost first (row-major; images are `[n, c, h, w]`). Their product is the
    /// length of `buf`.
    pub shape: Vec<usize>,
    /// The elements, row-major, in the backend's buffer type: a `Vec<E>` on [`crate::Cpu`],
    /// a device buffer ([`crate::backend::cuda::CudaBuf`]) on [`crate::Cuda`].
    pub buf: B::Buf,
}

impl<B: crate::backend::Backend> Tensor<B> {
    /// A tensor of `shape` filled with zeros.
    pub fn zeros(backend: &B, shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), buf: backend.zeros(numel(shape)) }
    }
    /// A tensor whose values are unspecified, for an op that overwrites all of them.
    pub fn empty(backend: &B, shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), buf: backend.empty(numel(shape)) }
    }
    /// Uploads `data` (row-major, `numel(shape)` values; panics otherwise) as a tensor of
    /// `shape`: how inputs, noise and initial weights reach the device.
    pub fn from_host(backend: &B, shape: &[usize], data: &[B::E]) -> Self {
        assert_eq!(numel(shape), data.len(), "data length does not match shape {shape:?}");
        Tensor { shape: shape.to_vec(), buf: backend.upload(data) }
    }
    /// Copies the values back to the host, row-major (on CUDA this waits for the queued work
    /// that produces them).
    pub fn to_host(&self, backend: &B) -> Vec<B::E> {
        backend.download(&self.buf)
    }
    /// Number of elements: the product of `shape`.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    /// A copy with its own buffer, on the same backend (an op whose output starts as one of
    /// its inputs, such as [`crate::ops::add`], copies it first).
    pub fn duplicate(&self, backend: &B) -> Self {
        let mut buf = backend.zeros(self.numel());
        backend.copy(&self.buf, &mut buf);
        Tensor { shape: self.shape.clone(), buf }
    }
}
