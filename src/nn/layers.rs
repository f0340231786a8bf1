//! Layers own nothing but parameter ids into the [`ParamStore`]; their names are the PyTorch
//! `state_dict` keys (`<prefix>.weight`, `<prefix>.bias`, ...). Initialization follows PyTorch's
//! defaults: `nn.Linear`/`nn.Conv2d`/`nn.ConvTranspose2d` draw weight and bias from
//! U(−1/√fan_in, 1/√fan_in) (kaiming_uniform with a = √5), batch norm starts at γ = 1, β = 0,
//! running mean 0 and running variance 1.

use crate::backend::Backend;
use crate::ops::{self, unary::Unary};
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

/// `nn.Linear`: y = x·Wᵀ + b on `[n, d_in]` inputs, through [`ops::linear()`].
#[derive(Clone, Debug)]
pub struct Linear {
    /// `<name>.weight`, `[d_out, d_in]`.
    pub weight: ParamId,
    /// `<name>.bias`, `[d_out]`.
    pub bias: ParamId,
}

impl Linear {
    /// Adds `<name>.weight` and `<name>.bias` to `store`, drawn from U(−1/√d_in, 1/√d_in) with
    /// `rng` (weight first, then bias: the order fixes which draws each gets).
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
    /// Records `x·Wᵀ + b` on the tape: x `[n, d_in]` → `[n, d_out]`.
    pub fn forward<B: Backend>(&self, tape: &mut Tape<B>, x: Var) -> Var {
        let (w, b) = (tape.param(self.weight), tape.param(self.bias));
        ops::linear(tape, x, w, Some(b))
    }
}

/// `nn.Conv2d` with a square kernel, the same stride and padding both ways, through
/// [`ops::conv2d()`].
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `<name>.weight`, `[c_out, c_in, k, k]`.
    pub weight: ParamId,
    /// `<name>.bias`, `[c_out]` (always present from [`Conv2d::new`]; `None` would mean
    /// `bias=False`).
    pub bias: Option<ParamId>,
    /// Step between output pixels, in input pixels.
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
}

impl Conv2d {
    /// Adds `<name>.weight` and `<name>.bias` to `store`, drawn from U(−1/√fan_in, 1/√fan_in),
    /// fan_in = `c_in·k·k`.
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
    /// Records the convolution on the tape: `[n, c_in, h, w]` → `[n, c_out, oh, ow]`.
    pub fn forward<B: Backend>(&self, tape: &mut Tape<B>, x: Var) -> Var {
        let w = tape.param(self.weight);
        let b = self.bias.map(|b| tape.param(b));
        ops::conv2d(tape, x, w, b, self.stride, self.pad)
    }
}

/// `nn.ConvTranspose2d` with a square kernel (the decoders' upsampling), through
/// [`ops::conv_transpose2d()`].
#[derive(Clone, Debug)]
pub struct ConvTranspose2d {
    /// `<name>.weight`, `[c_in, c_out, k, k]` (PyTorch's layout for transposed convolutions).
    pub weight: ParamId,
    /// `<name>.bias`, `[c_out]` (always present from [`ConvTranspose2d::new`]).
    pub bias: Option<ParamId>,
    /// Upsampling factor.
    pub stride: usize,
    /// Output pixels cropped from every side.
    pub pad: usize,
    /// Extra output rows and columns at the bottom and right, so the decoder can mirror the
    /// encoder's odd sizes (7 → 14 needs 1 with k = 3, s = 2, pad = 1).
    pub output_padding: usize,
}

impl ConvTranspose2d {
    /// Adds `<name>.weight` and `<name>.bias` to `store`, drawn from U(−1/√fan_in, 1/√fan_in)
    /// with PyTorch's fan_in for this layer, `c_out·k·k`.
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
    /// Records the transposed convolution on the tape: `[n, c_in, h, w]` → `[n, c_out, oh, ow]`.
    pub fn forward<B: Backend>(&self, tape: &mut Tape<B>, x: Var) -> Var {
        let w = tape.param(self.weight);
        let b = self.bias.map(|b| tape.param(b));
        ops::conv_transpose2d(tape, x, w, b, self.stride, self.pad, self.output_padding)
    }
}

/// `nn.BatchNorm2d`/`nn.BatchNorm1d`: normalizes each channel, then scales by γ and shifts
/// by β, through [`ops::batch_norm()`]; keeps running statistics for eval mode.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// `<name>.weight`: γ, `[channels]`, trainable, starts at 1.
    pub weight: ParamId,
    /// `<name>.bias`: β, `[channels]`, trainable, starts at 0.
    pub bias: ParamId,
    /// `<name>.running_mean`, `[channels]`, not trainable, starts at 0.
    pub running_mean: ParamId,
    /// `<name>.running_var` (unbiased), `[channels]`, not trainable, starts at 1.
    pub running_var: ParamId,
    /// Key of `num_batches_tracked` in the store's counters.
    pub tracked: String,
    /// Weight of each batch in the running statistics (0.1, PyTorch's default).
    pub momentum: f64,
    /// Added to the variance before the square root (1e-5, PyTorch's default).
    pub eps: f64,
}

impl BatchNorm {
    /// Adds the four tensors and the `<name>.num_batches_tracked` counter (0) to `store`, with
    /// PyTorch's initial values; draws no random numbers.
    pub fn new<B: Backend>(store: &mut ParamStore<B>, backend: &B, name: &str, channels: usize) -> Self {
        let weight = const_param(store, backend, &format!("{name}.weight"), channels, 1.0, true);
        let bias = const_param(store, backend, &format!("{name}.bias"), channels, 0.0, true);
        let running_mean = const_param(store, backend, &format!("{name}.running_mean"), channels, 0.0, false);
        let running_var = const_param(store, backend, &format!("{name}.running_var"), channels, 1.0, false);
        let tracked = format!("{name}.num_batches_tracked");
        store.counters.insert(tracked.clone(), 0);
        BatchNorm { weight, bias, running_mean, running_var, tracked, momentum: 0.1, eps: 1e-5 }
    }
    /// Records batch norm of x (`[n, c]` or `[n, c, h, w]`) on the tape. On a training tape
    /// it uses the batch's statistics, updates the running ones in the store and counts the
    /// batch in `num_batches_tracked`; otherwise it uses the running statistics.
    pub fn forward<B: Backend>(&self, tape: &mut Tape<B>, x: Var) -> Var {
        self.forward_act(tape, x, None)
    }
    /// [`BatchNorm::forward`] followed by the activation `act` in one fused op
    /// ([`ops::batch_norm_act()`]): the same values and gradients as `forward` then the
    /// activation, with one pass over the data fewer each way.
    pub fn forward_act<B: Backend>(&self, tape: &mut Tape<B>, x: Var, act: Option<Unary>) -> Var {
        if tape.training {
            *tape.params.counters.get_mut(&self.tracked).expect("batch-norm counter") += 1;
        }
        let (g, b) = (tape.param(self.weight), tape.param(self.bias));
        ops::batch_norm_act(tape, x, g, b, self.running_mean, self.running_var, self.momentum, self.eps, act)
    }
}
