//! Layers (parameter holders with PyTorch's names and default initialization) and the VAEs.

pub mod layers;
pub mod vae;

pub use layers::{BatchNorm, Conv2d, ConvTranspose2d, Linear};
pub use vae::{Arch, LossConfig, ModelConfig, OutputActivation, ParamNames, TermReduction, Vae, VaeLoss};
