//! vaecuda: a variational autoencoder trainer on hand-written CUDA kernels, with a CPU
//! reference backend that computes every op the same way.
//!
//! Reading order: [`tensor`] → [`backend`] (the interface) → [`ops`] (one file per op, CPU
//! reference and tape function side by side) → [`tape`] → [`nn`] (layers and the three VAEs)
//! → [`optim`] → [`train`]. Around them: [`data`] (IDX and image folders), [`checkpoint`]
//! (safetensors), [`eval`] (ELBO, importance weighting, encode/decode), [`image_out`] (image
//! grids), [`charts`] (labelled charts, plotters) and [`tsne`] (2-D maps of the latent space).

pub mod backend;
pub mod bench;
pub mod charts;
pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod gradcheck;
pub mod image_out;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod tape;
pub mod tensor;
pub mod tsne;

pub use backend::cpu::Cpu;
pub use backend::cuda::Cuda;
pub use backend::Backend;
pub use tape::{ParamStore, Tape, Var};
pub use tensor::{Float, Tensor};
pub mod train;
