//! Adam/AdamW over every trainable tensor of a [`ParamStore`]; the per-element math is in
//! `ops::adam` (CPU) and `kernels/adam.cu` (GPU).

use crate::backend::Backend;
use crate::ops::adam::AdamStep;
use crate::tape::ParamStore;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
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
    pub config: AdamConfig,
    pub step: u64,
    pub m: Vec<Option<B::Buf>>,
    pub v: Vec<Option<B::Buf>>,
}

impl<B: Backend> Adam<B> {
    pub fn new(config: AdamConfig, backend: &B, store: &ParamStore<B>) -> Self {
        let moments = || {
            (0..store.len())
                .map(|i| store.trainable[i].then(|| backend.zeros(store.values[i].numel())))
                .collect::<Vec<_>>()
        };
        Adam { config, step: 0, m: moments(), v: moments() }
    }

    /// Applies one update to every trainable parameter that has a gradient.
    pub fn step(&mut self, backend: &B, store: &mut ParamStore<B>) {
        self.step += 1;
        let c = self.config;
        let s = AdamStep::new(c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.decoupled, self.step);
        for i in 0..store.len() {
            if let (Some(g), Some(m), Some(v)) = (&store.grads[i], &mut self.m[i], &mut self.v[i]) {
                backend.adam_step(&mut store.values[i].buf, &g.buf, m, v, s);
            }
        }
    }
}
