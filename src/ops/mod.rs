//! Every op of the engine, one file each. A file holds, in order: the op's dims struct, its CPU
//! reference forward/backward (the truth the CUDA kernels are tested against), and the function
//! that runs it on a tape and records its backward. The PyTorch semantics are in each doc comment.
//! `gemm.rs` (the CPU GEMM) and `bias.rs` (bias add and its gradient) are CPU code the other
//! ops share. The CPU backend only dispatches here; nothing here depends on it.

pub mod adam;
pub mod batch_norm;
pub mod bias;
pub mod conv2d;
#[cfg(target_arch = "x86_64")]
pub mod conv2d_avx512;
pub mod conv2d_direct;
#[cfg(target_arch = "x86_64")]
pub mod conv2d_one_channel;
#[cfg(target_arch = "x86_64")]
pub mod conv2d_stride2;
pub mod conv_transpose2d;
pub mod elementwise;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod reparam_kl;
pub(crate) mod scratch;
pub mod unary;
pub mod vmath;

pub use batch_norm::{batch_norm, batch_norm_act};
pub use conv2d::conv2d;
pub use conv_transpose2d::conv_transpose2d;
pub use elementwise::{add, flatten, mean, mul, reshape, scale, sum};
pub use linear::linear;
pub use loss::{bce, bce_with_logits, mse, recon_loss, Recon, Reduction};
pub use reparam_kl::reparam_kl;
pub use unary::{leaky_relu, relu, sigmoid, tanh, unary};

/// Elementwise CPU work is split into chunks of this many items, one rayon task each, so both
/// cores are busy on real sizes and small tensors stay on one thread.
pub(crate) const PAR_MIN: usize = 1 << 14;

/// Runs `f`, compiled for AVX2 when the CPU has it. The binary targets baseline x86-64 (it must
/// run on any machine it is copied to), where the elementwise loops vectorize only 4 wide
/// and `sqrt`/division not at all in practice; the Adam update alone took a quarter of an
/// MLP step. The closure must be inlined into the feature-enabled frame for the loops inside
/// it to be compiled 8 wide, and LLVM declines to inline a large closure on its own: give it
/// as `simd(#[inline(always)] || ...)` (batch norm's loops ran as scalar SSE2 code without
/// that), and make the functions it calls `#[inline(always)]` too. No FMA is enabled: Rust never contracts a·b + c, so results are
/// bit-identical either way.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU was just checked to support AVX2.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// For a test of an AVX-512 path: whether it can run on this CPU. Where it cannot, under CI
/// (whose machines have AVX-512) the test fails, rather than pass having checked nothing;
/// elsewhere it says so and is skipped.
#[cfg(test)]
pub(crate) fn avx512_tests_can_run(what: &str) -> bool {
    if widest_simd() == Simd::Avx512 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{what}: no AVX-512F under CI, so this test checks nothing");
    eprintln!("{what}: this CPU has no AVX-512F (or {NO_AVX512_ENV} is set); the path is never used here");
    false
}

/// The widest vector instructions the CPU paths may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    /// AVX-512F (and AVX2).
    Avx512,
    /// AVX2, no AVX-512.
    Avx2,
    /// Baseline x86-64 (SSE2), or another architecture.
    Baseline,
}

/// The variable that keeps the CPU paths off AVX-512 (`VAECUDA_CPU_NO_AVX512=1`): to
/// measure what a laptop without it gets, on a machine that has it.
pub const NO_AVX512_ENV: &str = "VAECUDA_CPU_NO_AVX512";

/// What this CPU offers ([`Simd`]), checked once; AVX-512 counts only when
/// [`NO_AVX512_ENV`] is unset.
pub(crate) fn widest_simd() -> Simd {
    static WIDEST: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *WIDEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::env::var_os(NO_AVX512_ENV).is_none()
            {
                return Simd::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    })
}
