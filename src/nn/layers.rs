//! Layers own nothing but parameter ids into the [`ParamStore`]; their names are the PyTorch
//! `state_dict` keys (`<prefix>.weight`, `<prefix>.bias`, ...). Initialization follows PyTorch's
//! defaults: `nn.Linear`/`nn.Conv2d`/`nn.ConvTranspose2d` draw weight and bias from
//! U(−1/√fan_in, 1/√fan_in) (kaiming_uniform with a = √5), batch norm starts at γ = 1, β = 0,
//! running mean 0 and running variance 1.

use crate::backend::Backend;
use crate::ops;
use crate::rng::Rng;
use crate::tape::{ParamId, ParamStore, Tape, Var};
use crate::tensor::{numel, Float, Tensor};

fn uniform_param<B: Backend>(
    store: &mut ParamStore<B>,
    backend: &B,
    name: &str,
    shape: &[usize],
    bound: f64,
    rng: &mut Rng,
) -> ParamId {
    let data: Vec<B::E> = (0..numel(shape)).map(|_| B::E::of(rng.uniform(-bound, bound))).collect();
    store.add(name, Tensor::from_host(backend, shape, &data), true)
}

fn const_param<B: Backend>(
    store: &mut ParamStore<B>,
    backend: &B,
    name: &str,
    n: usize,
    v: f64,
    trainable: bool,
) -> ParamId {
    store.add(name, Tensor::from_host(backend, &[n], &vec![B::E::of(v); n]), trainable)
}

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: ParamId,
    pub bias: ParamId,
}

impl Linear {
    pub fn new<B: Backend>(
        store: &mut ParamStore<B>,
        backend: &B,
        name: &str,
        d_in: usize,
        d_out: usize,
        rng: &mut Rng,
    ) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let weight = uniform_param(store, backend, &format!("{name}.weight"), &[d_out, d_in], bound, rng);
        let bias = uniform_param(store, backend, &format!("{name}.bias"), &[d_out], bound, rng);
        Linear { weight, bias }
    }
    pub fn forward<B: Backend>(&self, tape: &mut Tape<B>, x: Var) -> Var {
        let (w, b) = (tape.param(self.weight), tape.param(self.bias));
        ops::linear(tape, x, w, Some(b))
    }
}

#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new<B: Backend>(
        store: &mut ParamStore<B>,
        backend: &B,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        rng: &mut Rng,
    ) -> Self {
        let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
        let weight = uniform_param(store, backend, &format!("{name}.weight"), &[c_out, c_in, k, k], bound, rng);
        let bias = Some(uniform_param(store, backend, &format!("{name}.bias"), &[c_out], bound, rng));
        Conv2d { weight, bias, stride, pad }
    }
    pub fn forward<B: Backend>(&self, tape: &mut Tape<B>, x: Var) -> Var {
        let w = tape.param(self.weight);
        let b = self.bias.map(|b| tape.param(b));
        ops::conv2d(tape, x, w, b, self.stride, self.pad)
    }
}

#[derive(Clone, Debug)]
pub struct ConvTranspose2d {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub stride: usize,
    pub pad: usize,
    pub output_padding: usize,
}

impl ConvTranspose2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new<B: Backend>(
        store: &mut ParamStore<B>,
        backend: &B,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        output_padding: usize,
        rng: &mut Rng,
    ) -> Self {
        // PyTorch computes fan_in of a transposed conv from weight.size(1) = c_out.
        let bound = 1.0 / ((c_out * k * k) as f64).sqrt();
        let weight = uniform_param(store, backend, &format!("{name}.weight"), &[c_in, c_out, k, k], bound, rng);
        let bias = Some(uniform_param(store, backend, &format!("{name}.bias"), &[c_out], bound, rng));
        ConvTranspose2d { weight, bias, stride, pad, output_padding }
    }
    pub fn forward<B: Backend>(&self, tape: &mut Tape<B>, x: Var) -> Var {
        let w = tape.param(self.weight);
        let b = self.bias.map(|b| tape.param(b));
        ops::conv_transpose2d(tape, x, w, b, self.stride, self.pad, self.output_padding)
    }
}

#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub weight: ParamId,
    pub bias: ParamId,
    pub running_mean: ParamId,
    pub running_var: ParamId,
    /// Key of `num_batches_tracked` in the store's counters.
    pub tracked: String,
    pub momentum: f64,
    pub eps: f64,
}

impl BatchNorm {
    pub fn new<B: Backend>(store: &mut ParamStore<B>, backend: &B, name: &str, channels: usize) -> Self {
        let weight = const_param(store, backend, &format!("{name}.weight"), channels, 1.0, true);
        let bias = const_param(store, backend, &format!("{name}.bias"), channels, 0.0, true);
        let running_mean = const_param(store, backend, &format!("{name}.running_mean"), channels, 0.0, false);
        let running_var = const_param(store, backend, &format!("{name}.running_var"), channels, 1.0, false);
        let tracked = format!("{name}.num_batches_tracked");
        store.counters.insert(tracked.clone(), 0);
        BatchNorm { weight, bias, running_mean, running_var, tracked, momentum: 0.1, eps: 1e-5 }
    }
    pub fn forward<B: Backend>(&self, tape: &mut Tape<B>, x: Var) -> Var {
        if tape.training {
            *tape.params.counters.get_mut(&self.tracked).expect("batch-norm counter") += 1;
        }
        let (g, b) = (tape.param(self.weight), tape.param(self.bias));
        ops::batch_norm(tape, x, g, b, self.running_mean, self.running_var, self.momentum, self.eps)
    }
}
