//! Every op of the engine, one file each. A file holds, in order: the op's dims struct, its CPU
//! reference forward/backward (the truth the CUDA kernels are tested against), and the function
//! that runs it on a tape and records its backward. The PyTorch semantics are in each doc comment.

pub mod adam;
pub mod batch_norm;
pub mod conv2d;
pub mod conv_transpose2d;
pub mod elementwise;
pub mod linear;
pub mod loss;
pub mod reparam_kl;
pub mod unary;

pub use batch_norm::batch_norm;
pub use conv2d::conv2d;
pub use conv_transpose2d::conv_transpose2d;
pub use elementwise::{add, flatten, mean, mul, reshape, scale, sum};
pub use linear::linear;
pub use loss::{bce, bce_with_logits, mse, recon_loss, Reduction};
pub use reparam_kl::reparam_kl;
pub use unary::{leaky_relu, relu, sigmoid, tanh, unary};

/// Runs `f` over `n` items split into chunks of at least `min_len`, in parallel when large.
/// Used by the CPU reference for elementwise work so both cores are busy on real sizes.
pub(crate) const PAR_MIN: usize = 1 << 14;
