//! Adam/AdamW over every trainable tensor of a [`ParamStore`]; the per-element math is in
//! `ops::adam` (CPU) and `kernels/adam.cu` (GPU).

use crate::backend::{AdamTensor, Backend};
use crate::ops::adam::AdamStep;
use crate::tape::ParamStore;

/// The optimizer's hyperparameters, fixed for a run (saved with the run so `--resume`
/// repeats them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// First-moment decay β₁ (default 0.9).
    pub beta1: f64,
    /// Second-moment decay β₂ (default 0.999).
    pub beta2: f64,
    /// Term added to the denominator, ε (default 1e-8).
    pub eps: f64,
    /// Weight decay (default 0: none); how it applies depends on `decoupled`.
    pub weight_decay: f64,
    /// AdamW (decoupled weight decay) instead of Adam's L2 penalty.
    pub decoupled: bool,
}

impl Default for AdamConfig {
    /// `torch.optim.Adam`'s defaults.
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
    }
}

/// Optimizer state: the step count and first/second moments per parameter (same order as the
/// store; `None` for non-trainable entries).
pub struct Adam<B: Backend> {
    /// The hyperparameters.
    pub config: AdamConfig,
    /// Updates applied so far; the next update is number `step + 1` (its bias corrections
    /// depend on it, so a resumed run restores it).
    pub step: u64,
    /// First moments (running mean of the gradient), one buffer per trainable entry, the
    /// parameter's length.
    pub m: Vec<Option<B::Buf>>,
    /// Second moments (running mean of the squared gradient), laid out as `m`.
    pub v: Vec<Option<B::Buf>>,
}

impl<B: Backend> Adam<B> {
    /// A fresh optimizer for the trainable entries of `store`: step 0, moments zero.
    pub fn new(config: AdamConfig, backend: &B, store: &ParamStore<B>) -> Self {
        let moments = || {
            (0..store.len())
                .map(|i| store.trainable[i].then(|| backend.zeros(store.values[i].numel())))
                .collect::<Vec<_>>()
        };
        Adam { config, step: 0, m: moments(), v: moments() }
    }

    /// Applies one update to every trainable parameter that has a gradient, unless
    /// `guard[0]` (the step's loss, on the device) is NaN or infinite: then nothing changes,
    /// decided on the device without waiting for the loss (one launch on CUDA). The step
    /// count advances either way; a caller that then reads a non-finite loss takes it back
    /// (see [`crate::train::Trainer::step`]). [`Adam::advance`] then [`Adam::apply`].
    pub fn step(&mut self, backend: &B, store: &mut ParamStore<B>, guard: &B::Buf) {
        let s = self.advance();
        self.apply(backend, store, guard, s);
    }

    /// Counts the next update and returns its constants (the bias corrections depend on the
    /// count): the half of [`Adam::step`] that runs on the host, before a captured step.
    pub fn advance(&mut self) -> AdamStep {
        self.step += 1;
        let c = self.config;
        AdamStep::new(c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.decoupled, self.step)
    }

    /// Update `s` (from [`Adam::advance`]) on the device, guarded by `guard` as [`Adam::step`].
    pub fn apply(&mut self, backend: &B, store: &mut ParamStore<B>, guard: &B::Buf, s: AdamStep) {
        let mut tensors: Vec<AdamTensor<'_, B>> = store
            .values
            .iter_mut()
            .zip(&store.grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .filter_map(|((p, g), (m, v))| match (g, m, v) {
                (Some(g), Some(m), Some(v)) => Some(AdamTensor { param: &mut p.buf, grad: &g.buf, m, v }),
                _ => None,
            })
            .collect();
        backend.adam_step_all(&mut tensors, s, guard);
    }
}
