//! vaecuda: a variational autoencoder trainer on hand-written CUDA kernels, with a CPU
//! reference backend that computes every op the same way.
//!
//! # The path a batch takes
//!
//! 1. **Data**: [`data::Source`] finds the images (the bundled MNIST, IDX files, an image
//!    folder: [`data::folder`], decoded once and cached); pixels stay `u8` and
//!    [`data::DeviceData`] uploads them once and gathers each batch on the device, converting
//!    it to floats there.
//! 2. **Model**: [`nn::Vae`] (MLP, conv, conv + batch norm, PyTorch's names and
//!    initialization) builds the negative ELBO of a batch from [`ops`]: `encode` → [`ops::reparam_kl()`]
//!    (sample z and the KL term in one op) → `decode_logits` → a reconstruction loss
//!    ([`ops::loss`]). The math is in [`nn::vae`].
//! 3. **Tape**: every op records its output and a backward closure on the [`Tape`];
//!    [`Tape::backward`] runs them in reverse, adding into the gradients of the parameters
//!    in the [`ParamStore`]. [`gradcheck`] proves each backward against finite differences.
//! 4. **Backend**: each op calls one method of the [`Backend`] trait: the CPU reference
//!    ([`Cpu`], f32 and f64) or CUDA ([`Cuda`], f32 and f64).
//! 5. **Kernel**: on CUDA that method makes a typed launch from the kernel table
//!    ([`backend::cuda::kernels`]) of a kernel in `kernels/*.cu`, compiled by NVRTC with the
//!    Rust↔CUDA contract ([`backend::cuda::contract`]) in front; without a GPU the same kernel
//!    runs on the emulated device ([`backend::cuda::emu`]).
//! 6. **Update**: [`optim::Adam`] steps every parameter ([`train::Trainer`] does 2–6 per
//!    batch; the `vae` command adds epochs, checkpoints ([`checkpoint`]) and metrics).
//!
//! Around them: [`eval`] (ELBO, importance weighting, encode/decode), [`image_out`] (image
//! grids), [`charts`] (labelled charts) and [`tsne`] (2-D maps of the latent space), [`mod@bench`]
//! (kernel and step throughput). The numbered programs in `examples/` walk the same path.
//!
//! ```
//! use vaecuda::{ops, Backend, Cpu, ParamStore, Tape, Tensor};
//! let be = Cpu::<f64>::default();
//! let mut store = ParamStore::default();
//! let w = store.add("w", Tensor::from_host(&be, &[1, 2], &[3.0, -1.0]), true);
//! let mut tape = Tape::new(&be, &mut store, true);
//! let x = tape.input(Tensor::from_host(&be, &[1, 2], &[2.0, 5.0]));
//! let wv = tape.param(w);
//! let y = ops::linear(&mut tape, x, wv, None); // y = x·wᵀ = 3·2 − 1·5 = 1
//! let loss = ops::sum(&mut tape, y);
//! assert_eq!(tape.to_host(loss), [1.0]);
//! tape.backward(loss);
//! drop(tape);
//! assert_eq!(store.grads[w].as_ref().unwrap().to_host(&be), [2.0, 5.0]); // ∂y/∂w = x
//! ```

// Every public item is documented, and stays so (CI runs clippy with -D warnings).
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod charts;
pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod failpoint;
pub mod gradcheck;
pub mod graph;
pub mod image_out;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod run;
pub mod tape;
pub mod tensor;
pub mod tsne;

pub use backend::cpu::Cpu;
pub use backend::cuda::Cuda;
pub use backend::Backend;
pub use tape::{ParamStore, Tape, Var};
pub use tensor::{Float, Tensor};
pub mod train;
