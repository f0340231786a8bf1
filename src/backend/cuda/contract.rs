//! The Rust↔CUDA contract, written once, here: the launch constants, the enum codes and the
//! `#[repr(C)]` argument structs that the kernels and the launchers share. [`prelude`] renders
//! them as the CUDA text pasted in front of every kernel file (with the kernel signatures of
//! `kernels.rs`), so `kernels/*.cu` declare none of them and cannot drift from Rust.
//!
//! For the structs the prelude also carries `static_assert`s of every field offset and of the
//! size, computed by Rust (`offset_of!`/`size_of`): the CUDA compiler itself checks that it lays
//! each struct out as Rust does. `tests/nvrtc_compile.rs` proves that a struct or a kernel
//! signature changed on one side only fails to compile.

use std::fmt::Write;
use std::mem::{offset_of, size_of};

use cudarc::driver::DeviceRepr;

use crate::ops::elementwise::PIXEL_MAX;
use crate::ops::loss::{BCE_GRAD_EPS, BCE_LOG_CLAMP};

/// Threads per block of the 1-D elementwise and reduction kernels (a power of two: the tree
/// reductions in `common.cuh` halve it).
pub const BLOCK: u32 = 256;
/// Output tile of the GEMM engine (`tile_gemm` in `common.cuh`): TILE_M × TILE_N, walking K in
/// steps of TILE_K, with TILE_THREADS threads each owning a 4 × 4 micro-tile.
pub const TILE_M: usize = 64;
/// Columns of a GEMM output tile (see [`TILE_M`]).
pub const TILE_N: usize = 64;
/// Depth of one step along K: the slice of A and B staged in shared memory at a time; split-K
/// chunk lengths are multiples of it.
pub const TILE_K: usize = 16;
/// Threads per GEMM block: `(TILE_M/4)·(TILE_N/4)`, one per 4 × 4 micro-tile.
pub const TILE_THREADS: u32 = 256;
/// Blocks of the tile kernels one SM is designed to hold (`__launch_bounds__(TILE_THREADS,
/// TILE_MIN_BLOCKS)`): two, so one block's tile loads overlap the other's FMAs. It caps
/// registers at 65536 / (256 · 2) = 128. Without it ptxas picked 64 registers for
/// `gemm_splitk_f32` on sm_90 and spilled (found by `tests/gpu_model.rs`).
pub const TILE_MIN_BLOCKS: u32 = 2;
/// The short side of the small tiles (16 × 64 for a small M, 64 × 16 for a small N; see
/// `choose_tile` in `kernels.rs`): one output channel or a 20-wide latent head pads to 16
/// rows or columns instead of 64.
pub const TILE_SMALL: usize = 16;
/// Threads of a small-tile block: `(16/4)·(64/4)`, one per 4 × 4 micro-tile as in the 64 × 64
/// tile.
pub const TILE_SMALL_THREADS: u32 = 64;
/// Small-tile blocks one SM is designed to hold: eight (512 threads, as two 64 × 64 blocks),
/// which caps registers at 65536 / (64 · 8) = 128, the 64 × 64 tile's cap.
pub const TILE_SMALL_MIN_BLOCKS: u32 = 8;
/// Blocks of the `__launch_bounds__(BLOCK, BLOCK_MIN_BLOCKS)` reduction kernels one SM is
/// designed to hold: four (1024 threads, half the SM's, to hide memory latency); it caps
/// registers at 64. Without a minimum ptxas chose 40 registers for `reparam_kl_fwd_f32` on
/// sm_90 and spilled around the double-precision `exp`.
pub const BLOCK_MIN_BLOCKS: u32 = 4;

/// Elements one block of the multi-tensor kernels (`adam_multi`, `zero_multi`) handles: each
/// tensor of their table is cut into chunks of this many, one block per chunk, so a launch
/// over every parameter of a model fills the GPU in proportion to its elements, whatever the
/// sizes of the tensors (four per thread of a [`BLOCK`]).
pub const MULTI_CHUNK: usize = 4 * BLOCK as usize;
/// 64-bit words per tensor in `adam_multi`'s table: first block, length, then the device
/// addresses of the parameter, its gradient and its two moments.
pub const ADAM_TABLE_WORDS: usize = 6;
/// 64-bit words per tensor in `zero_multi`'s table: first block, length, address.
pub const ZERO_TABLE_WORDS: usize = 3;

/// The `#define`s of the prelude: every constant both sides use.
fn defines() -> Vec<(&'static str, String)> {
    vec![
        ("BLOCK", BLOCK.to_string()),
        ("TILE_M", TILE_M.to_string()),
        ("TILE_N", TILE_N.to_string()),
        ("TILE_K", TILE_K.to_string()),
        ("TILE_THREADS", TILE_THREADS.to_string()),
        ("TILE_MIN_BLOCKS", TILE_MIN_BLOCKS.to_string()),
        ("TILE_SMALL", TILE_SMALL.to_string()),
        ("TILE_SMALL_THREADS", TILE_SMALL_THREADS.to_string()),
        ("TILE_SMALL_MIN_BLOCKS", TILE_SMALL_MIN_BLOCKS.to_string()),
        ("BLOCK_MIN_BLOCKS", BLOCK_MIN_BLOCKS.to_string()),
        // Debug formatting keeps the decimal point or exponent: a valid double literal.
        ("BCE_LOG_CLAMP", format!("({BCE_LOG_CLAMP:?})")),
        ("BCE_GRAD_EPS", format!("({BCE_GRAD_EPS:?})")),
        // The u8 pixel value that maps to 1.0 (`gather_rows_u8`).
        ("PIXEL_MAX", PIXEL_MAX.to_string()),
        ("MULTI_CHUNK", MULTI_CHUNK.to_string()),
        ("ADAM_TABLE_WORDS", ADAM_TABLE_WORDS.to_string()),
        ("ZERO_TABLE_WORDS", ZERO_TABLE_WORDS.to_string()),
    ]
}

/// An enum passed to kernels as an `int`: each variant's value and its CUDA name are written
/// here once; the prelude defines the names.
macro_rules! codes {
    ($(#[doc = $doc:literal])* $name:ident { $($variant:ident = $value:literal => $cuda:literal),* $(,)? }) => {
        $(#[doc = $doc])*
        #[repr(i32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $(#[doc = concat!("`", $cuda, "` (= ", stringify!($value), ") in the kernels.")] $variant = $value),* }
        impl $name {
            /// (CUDA name, value) of every variant.
            pub const CUDA: &'static [(&'static str, i32)] = &[$(($cuda, $value)),*];
            /// The `int` a kernel receives for this variant.
            pub fn code(self) -> i32 {
                self as i32
            }
        }
    };
}

codes! {
    /// Which activation `unary_fwd`/`unary_bwd` apply (and the batch-norm kernels after the
    /// affine transform, where `Identity` is plain batch norm).
    UnaryCode { Relu = 0 => "UNARY_RELU", Sigmoid = 1 => "UNARY_SIGMOID", Tanh = 2 => "UNARY_TANH",
                LeakyRelu = 3 => "UNARY_LEAKY_RELU", Identity = 4 => "UNARY_IDENTITY" }
}
codes! {
    /// Which reconstruction loss `loss_fwd`/`loss_bwd` compute.
    ReconCode { Bce = 0 => "RECON_BCE", BceWithLogits = 1 => "RECON_BCE_WITH_LOGITS", Mse = 2 => "RECON_MSE" }
}
codes! {
    /// The weight decay of an Adam step.
    AdamMode { Plain = 0 => "ADAM_PLAIN", L2 = 1 => "ADAM_L2", Decoupled = 2 => "ADAM_DECOUPLED" }
}
codes! {
    /// Where `gemm` adds its bias.
    BiasMode { None = 0 => "BIAS_NONE", PerColumn = 1 => "BIAS_PER_COLUMN", PerRow = 2 => "BIAS_PER_ROW" }
}

/// The C spelling of a field type.
macro_rules! c_type {
    (i32) => {
        "int"
    };
    (f64) => {
        "double"
    };
    (T) => {
        "T"
    };
}

/// A kernel argument struct: the Rust definition, and `Self::cuda()`, its CUDA twin with the
/// layout assertions. A struct generic over the element type (`<T>`) becomes a template.
macro_rules! device_struct {
    ($(#[doc = $doc:literal])* $name:ident { $($(#[doc = $fdoc:literal])* $field:ident: $ty:tt),* $(,)? }) => {
        $(#[doc = $doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq)]
        pub struct $name { $($(#[doc = $fdoc])* pub $field: $ty),* }
        // SAFETY: plain #[repr(C)] data of ints and floats, laid out as the CUDA struct (which
        // the prelude's static_asserts check).
        unsafe impl DeviceRepr for $name {}
        impl $name {
            /// The CUDA definition of this struct, with the static_asserts of its layout (part
            /// of [`prelude`]).
            pub fn cuda() -> String {
                let fields: &[(&str, &str, usize)] = &[$((stringify!($field), c_type!($ty), offset_of!($name, $field))),*];
                render_struct(stringify!($name), None, &[(stringify!($name), size_of::<$name>(), fields.to_vec())])
            }
        }
    };
    ($(#[doc = $doc:literal])* $name:ident<T> { $($(#[doc = $fdoc:literal])* $field:ident: $ty:tt),* $(,)? }) => {
        $(#[doc = $doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq)]
        pub struct $name<T> { $($(#[doc = $fdoc])* pub $field: $ty),* }
        // SAFETY: as above; T is f32 or f64.
        unsafe impl<T: crate::backend::cuda::CudaFloat> DeviceRepr for $name<T> {}
        impl $name<f32> {
            /// The CUDA template of this struct, with the static_asserts of the layout of both
            /// instantiations, `<float>` and `<double>` (part of [`prelude`]).
            pub fn cuda() -> String {
                let layout = |ty: &'static str, size: usize, offsets: Vec<usize>| {
                    let names = [$(stringify!($field)),*];
                    let types = [$(c_type!($ty)),*];
                    (ty, size, names.iter().zip(types).zip(offsets).map(|((n, t), o)| (*n, t, o)).collect::<Vec<_>>())
                };
                render_struct(stringify!($name), Some("T"), &[
                    layout(concat!(stringify!($name), "<float>"), size_of::<$name<f32>>(),
                        vec![$(offset_of!($name<f32>, $field)),*]),
                    layout(concat!(stringify!($name), "<double>"), size_of::<$name<f64>>(),
                        vec![$(offset_of!($name<f64>, $field)),*]),
                ])
            }
        }
    };
}

type Layout = (&'static str, usize, Vec<(&'static str, &'static str, usize)>);

/// `struct Name { fields };` (a template over `param` when given) and the assertions of each
/// instantiation's layout: its size; each field's place in the declaration order (a constant
/// aggregate initialized with 1, 2, 3, ... must hold i + 1 in field i: works on every NVRTC);
/// and each field's byte offset where the compiler has `__builtin_offsetof` (NVRTC 13.2 has
/// not, 13.5 has).
fn render_struct(name: &str, param: Option<&str>, layouts: &[Layout]) -> String {
    let mut s = String::new();
    if let Some(p) = param {
        let _ = writeln!(s, "template <typename {p}>");
    }
    let _ = writeln!(s, "struct {name} {{");
    for (field, ty, _) in &layouts[0].2 {
        let _ = writeln!(s, "    {ty} {field};");
    }
    s.push_str("};\n");
    for (ty, size, fields) in layouts {
        let _ = writeln!(s, "static_assert(sizeof({ty}) == {size}, \"{ty}: size differs from the Rust struct\");");
        let values: Vec<String> = (1..=fields.len()).map(|v| v.to_string()).collect();
        let probe = format!("{ty}{{{}}}", values.join(", "));
        for (i, (field, _, _)) in fields.iter().enumerate() {
            let _ = writeln!(
                s,
                "static_assert({probe}.{field} == {}, \"{ty}::{field}: order of fields differs from the Rust struct\");",
                i + 1
            );
        }
        s.push_str("#if defined(__has_builtin)\n#if __has_builtin(__builtin_offsetof)\n");
        for (field, _, offset) in fields {
            let _ = writeln!(
                s,
                "static_assert(__builtin_offsetof({ty}, {field}) == {offset}, \"{ty}::{field}: offset differs from the Rust struct\");"
            );
        }
        s.push_str("#endif\n#endif\n");
    }
    s
}

device_struct! {
    /// `gemm`/`gemm_splitk`: C[m, n] = (accumulate ? C : 0) + Σ_k A[m, k]·B[k, n] (+ bias), with
    /// A[m, k] at a[m·a_rs + k·a_cs] and B[k, n] at b[k·b_rs + n·b_cs].
    GemmArgs {
        /// Rows of A and C.
        m: i32,
        /// Columns of B and C.
        n: i32,
        /// The reduction length: columns of A, rows of B.
        k: i32,
        /// Row stride of A, in elements.
        a_rs: i32,
        /// Column stride of A (1: rows are contiguous; a transposed A has `a_rs` = 1).
        a_cs: i32,
        /// Row stride of B.
        b_rs: i32,
        /// Column stride of B.
        b_cs: i32,
        /// A `BiasMode` code.
        bias_mode: i32,
        /// 1: C += product.
        accumulate: i32,
        /// Split-K chunk length (`gemm_splitk` only).
        kc: i32,
    }
}

device_struct! {
    /// The shape of a convolution (see `ops::conv2d::Conv2dDims`), as the kernels' ints.
    ConvArgs {
        /// Batch size.
        n: i32,
        /// Input channels.
        c_in: i32,
        /// Input height.
        h: i32,
        /// Input width.
        w: i32,
        /// Output channels.
        c_out: i32,
        /// Kernel height.
        kh: i32,
        /// Kernel width.
        kw: i32,
        /// Stride, both ways.
        stride: i32,
        /// Zero padding on every side.
        pad: i32,
        /// Output height.
        oh: i32,
        /// Output width.
        ow: i32,
        /// Split-K chunk length (backward-weight only).
        kc: i32,
    }
}

device_struct! {
    /// Batch norm over an [outer, channels, inner] view (doubles first: no padding).
    BnArgs {
        /// Added to the variance under the square root.
        eps: f64,
        /// Weight of the batch in the running statistics.
        momentum: f64,
        /// Batch size.
        outer: i32,
        /// Channels: one statistic each.
        channels: i32,
        /// Positions per channel per sample (`h·w`, or 1).
        inner: i32,
        /// Values per chunk of a channel in the training kernels' grid of (chunks, channels)
        /// blocks (see `kernels::channel_chunks`); unused in eval mode.
        chunk: i32,
        /// Chunks per channel: the number of partials each channel's stage 2 combines.
        chunks: i32,
    }
}

device_struct! {
    /// One Adam/AdamW step, every constant already converted to the element type.
    AdamArgs<T> {
        /// β₁, the first moment's decay.
        beta1: T,
        /// β₂, the second moment's decay.
        beta2: T,
        /// 1 − β₁, rounded once on the host as the CPU path rounds it.
        one_minus_beta1: T,
        /// 1 − β₂.
        one_minus_beta2: T,
        /// ε, added to the denominator.
        eps: T,
        /// Weight decay (Adam's L2 mode adds `weight_decay·p` to the gradient).
        weight_decay: T,
        /// 1 − lr·wd (AdamW).
        decay_factor: T,
        /// lr / (1 − β₁ᵗ).
        step_size: T,
        /// √(1 − β₂ᵗ).
        bc2_sqrt: T,
        /// An `AdamMode` code.
        mode: i32,
        /// Elements of the parameter tensor.
        n: i32,
    }
}

/// The contract as CUDA: constants, enum codes and structs (the kernel signatures follow it,
/// from `kernels::declarations`).
pub fn prelude() -> String {
    let mut s = String::from("// Generated from src/backend/cuda/contract.rs: edit it there, not here.\n");
    for (name, value) in defines() {
        let _ = writeln!(s, "#define {name} {value}");
    }
    for codes in [UnaryCode::CUDA, ReconCode::CUDA, AdamMode::CUDA, BiasMode::CUDA] {
        for (name, value) in codes {
            let _ = writeln!(s, "#define {name} {value}");
        }
    }
    for decl in [GemmArgs::cuda(), ConvArgs::cuda(), BnArgs::cuda(), AdamArgs::<f32>::cuda()] {
        s.push_str(&decl);
    }
    s
}

/// A size as the kernels' 32-bit int; larger sizes are a bug the caller reports.
pub fn int(v: usize) -> i32 {
    i32::try_from(v).unwrap_or_else(|_| panic!("size {v} exceeds the CUDA kernels' 32-bit index range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_render_with_their_rust_offsets() {
        let g = GemmArgs::cuda();
        assert!(g.contains("struct GemmArgs {\n    int m;\n"), "{g}");
        assert!(g.contains("static_assert(__builtin_offsetof(GemmArgs, kc) == 36"), "{g}");
        assert!(g.contains("static_assert(sizeof(GemmArgs) == 40"), "{g}");
        let a = AdamArgs::<f32>::cuda();
        assert!(a.starts_with("template <typename T>\nstruct AdamArgs {\n    T beta1;"), "{a}");
        assert!(a.contains("sizeof(AdamArgs<double>) == 80"), "{a}");
        assert!(a.contains("__builtin_offsetof(AdamArgs<float>, mode) == 36"), "{a}");
    }

    #[test]
    fn prelude_defines_constants_and_codes() {
        let p = prelude();
        for line in
            ["#define TILE_K 16", "#define BCE_LOG_CLAMP (-100.0)", "#define BCE_GRAD_EPS (1e-12)", "#define ADAM_L2 1"]
        {
            assert!(p.contains(line), "missing {line:?} in\n{p}");
        }
    }
}
