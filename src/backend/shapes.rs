//! The shapes and choices the backend's methods take: plain data, defined here beneath the
//! backend so that it imports nothing from the ops above it (the ops use the backend; the
//! backend does not use the ops). Each op's file re-exports its own and holds the math on it:
//! constructors and element counts (`ops::conv2d`), the CPU formulas (`ops::unary`,
//! `ops::adam`), the losses (`ops::loss`).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// The shape of one convolution, built by [`Conv2dDims::new`] (which works out `oh`, `ow`) and
/// passed by value to the backend; on CUDA it becomes the kernels'
/// [`crate::backend::cuda::contract::ConvArgs`]. Also describes a transposed convolution, as
/// the convolution it is the adjoint of ([`crate::ops::conv_transpose2d::ConvTranspose2dDims::as_conv`]).
pub struct Conv2dDims {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height, in pixels.
    pub h: usize,
    /// Input width, in pixels.
    pub w: usize,
    /// Output channels (the number of filters).
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Step between output pixels, in input pixels, both ways (at least 1).
    pub stride: usize,
    /// Zeros added on every side of the input, both ways.
    pub pad: usize,
    /// Output height: `⌊(h + 2·pad − kh) / stride⌋ + 1`.
    pub oh: usize,
    /// Output width: `⌊(w + 2·pad − kw) / stride⌋ + 1`.
    pub ow: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// The shape of one `linear` call, passed by value down to the backend (and, on CUDA, into
/// the GEMM kernel's arguments).
pub struct LinearDims {
    /// Rows of x and y: the batch size.
    pub n: usize,
    /// Input features: columns of x and of W.
    pub d_in: usize,
    /// Output features: rows of W, columns of y, length of b.
    pub d_out: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
/// The shape and constants of one batch-norm call: x viewed as `[outer, channels, inner]`
/// (`[n, c, h·w]` for images, `[n, c, 1]` for features). On CUDA it becomes
/// [`crate::backend::cuda::contract::BnArgs`].
pub struct BatchNormDims {
    /// Batch size n.
    pub outer: usize,
    /// Channels: one mean, variance, γ and β each.
    pub channels: usize,
    /// Positions per channel per sample (`h·w`, or 1).
    pub inner: usize,
    /// Added to the variance before the square root (PyTorch's default 1e-5).
    pub eps: f64,
    /// Weight of the batch statistics in the running-average update (PyTorch's default 0.1).
    pub momentum: f64,
    /// An activation applied after the affine transform in the same pass, y = act(γ·x̂ + β)
    /// (the conv-bn VAE's bn → ReLU), or `None`. Its backward reads the derivative from y, so
    /// only activations whose derivative y determines are allowed ([`Unary::reads_output`]).
    pub act: Option<Unary>,
}

/// Everything one update needs, bias corrections already worked out on the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first-moment (mean of g) estimate m, e.g. 0.9.
    pub beta1: f64,
    /// Decay of the second-moment (mean of g²) estimate v, e.g. 0.999.
    pub beta2: f64,
    /// Added to the bias-corrected `√v` in the denominator, so a zero v does not divide by 0.
    pub eps: f64,
    /// Weight decay: added to the gradient as `wd·p` (Adam) or applied as `p·(1 − lr·wd)`
    /// (AdamW, see `decoupled`); 0 turns it off.
    pub weight_decay: f64,
    /// AdamW's decoupled decay instead of Adam's L2 term.
    pub decoupled: bool,
    /// 1 − β₁ᵗ
    pub bias_correction1: f64,
    /// √(1 − β₂ᵗ)
    pub bias_correction2_sqrt: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
/// Which activation an elementwise op applies. Passed by value to
/// [`super::Backend::unary_forward`]/[`super::Backend::unary_backward`]; on CUDA it becomes a
/// [`crate::backend::cuda::contract::UnaryCode`] plus the slope argument.
pub enum Unary {
    /// `max(x, 0)`.
    Relu,
    /// `1/(1 + e^{−x})`, in (0, 1): turns the decoder's logits into pixel probabilities.
    Sigmoid,
    /// The hyperbolic tangent, in (−1, 1).
    Tanh,
    /// `x` for x > 0, else `slope·x`; the field is the slope (PyTorch's default is 0.01).
    LeakyRelu(f64),
}

impl Unary {
    /// Whether `f'(x)` follows from `y = f(x)` alone, so a fused backward can read y instead
    /// of x: true for ReLU, sigmoid, tanh and a leaky ReLU of slope ≥ 0 (whose y > 0 exactly
    /// when x > 0); false for a negative slope.
    pub fn reads_output(self) -> bool {
        match self {
            Unary::LeakyRelu(s) => s >= 0.0,
            _ => true,
        }
    }
}

/// How losses are formed from probabilities or logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recon {
    /// Binary cross-entropy on probabilities, log clamped at -100 as PyTorch does.
    Bce,
    /// Binary cross-entropy on logits, in the stable form.
    BceWithLogits,
    /// Squared error.
    Mse,
}
