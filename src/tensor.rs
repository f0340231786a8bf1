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
    fn of(v: f64) -> Self;
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
pub struct Tensor<B: crate::backend::Backend> {
    pub shape: Vec<usize>,
    pub buf: B::Buf,
}

impl<B: crate::backend::Backend> Tensor<B> {
    pub fn zeros(backend: &B, shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), buf: backend.zeros(numel(shape)) }
    }
    /// A tensor whose values are unspecified, for an op that overwrites all of them.
    pub fn empty(backend: &B, shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), buf: backend.empty(numel(shape)) }
    }
    pub fn from_host(backend: &B, shape: &[usize], data: &[B::E]) -> Self {
        assert_eq!(numel(shape), data.len(), "data length does not match shape {shape:?}");
        Tensor { shape: shape.to_vec(), buf: backend.upload(data) }
    }
    pub fn to_host(&self, backend: &B) -> Vec<B::E> {
        backend.download(&self.buf)
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn duplicate(&self, backend: &B) -> Self {
        let mut buf = backend.zeros(self.numel());
        backend.copy(&self.buf, &mut buf);
        Tensor { shape: self.shape.clone(), buf }
    }
}
