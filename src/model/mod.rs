//! A performance model of the GPU on paper: every launch of a real training step, recorded by
//! the backend's launch trace ([`crate::backend::cuda::trace`]), priced on an H200 from its
//! grid, the kernel's resources in the sm_90 CUBIN and the datasheet's rates. Every figure it
//! prints is *modelled*, not measured; the GPU issue measures the same launches when a GPU is
//! lent, and the two are recorded side by side per kernel.
//!
//! | file | what |
//! |---|---|
//! | `machine.rs` | the H200's rates and launch costs, sm_90/sm_80 limits, occupancy; each constant with its source |
//! | `cubin.rs` | registers, launch bounds, shared and local memory, spills of every kernel, from the CUBIN NVRTC makes |
//! | `sass.rs` | FFMA share of the hottest loop, tensor-core and 128-bit instructions, from `nvdisasm` when installed |
//! | `work.rs` | useful and executed FLOPs and the fewest bytes of one launch, from its kernel and arguments |
//! | `price.rs` | the formula below, applied to a trace |
//! | `report.rs` | one traced step per architecture, its table, and the chart |
//!
//! # The formula
//!
//! A roofline per launch, with the losses a roofline hides made explicit. For a launch of `B`
//! blocks that asks `F` useful FLOPs, executes `Fx ≥ F` (tile padding, zero taps), does `F64`
//! double-precision operations and must move `Q` bytes:
//!
//! ```text
//! o      = blocks per SM        the least of 2048/threads, 32, 65536/(registers·threads), 228 KB/shared
//! waves  = ⌈B / (S · o)⌉        S = 132 SMs (reported; the time below does not need it)
//! fill   = B / (S · ⌈B / S⌉)    the busiest SM runs ⌈B/S⌉ blocks; the share of SM time kept busy
//! η      = FFMA share of the kernel's hottest loop (tile kernels; 1 for the others); for a
//!          tensor-core kernel, min(1, H·c/I) of its hottest mma loop (H mma of I
//!          instructions, c = clocks one mma holds a partition's tensor unit, from the peaks)
//! issue  = min(1, w / 4)        w = warps on the busiest SM: min(⌈B/S⌉, o) blocks of the
//!                               launch's warps; an SM's four schedulers need four warps
//!
//! t_roof = max(F/P + F64/P64,      Q/BW)     the roofline
//! t_eff  = max(F/(η·P) + F64/P64,  Q/BW)     useful work at the kernel's efficiency
//! t_pad  = max(Fx/(η·P) + F64/P64, Q/BW)     plus tile padding and zero taps
//! t      = t_pad / (fill · issue) + g        plus idle SMs and schedulers, plus the gap
//! ```
//!
//! with `P` the FP32 peak (67 TFLOP/s; FP64 kernels use `P64` = 34; tensor-core kernels the
//! TF32 peak, 494.5, or the BF16 one, 989.5), `BW` the memory bandwidth
//! (4.8 TB/s) and `g` the device gap per kernel (0.9 µs eager, 0.5 µs in a graph). A memset of
//! `Q` bytes costs `Q/BW + g`, a copy its bytes over PCIe (or half the bandwidth on the device)
//! plus `g`. The host issues every launch, memset and copy in `h` = 4 µs while the device runs
//! behind it, and each host wait (the loss read back) costs `w` = 5.8 µs:
//!
//! ```text
//! step (eager) = max(Σ t, n_issued · h) + n_waits · w
//! step (graph) = graph launch (1.8 µs) + Σ_inside (t with g = 0.5 µs)
//!                + max(Σ_outside t, n_outside · h) + n_waits · w
//! epoch        = ⌈60000 / batch⌉ · step
//! ```
//!
//! A step replayed as one graph (what `vae train` runs) leaves some work outside the graph,
//! issued by the host one call at a time ([`price::Replay`], [`report::training_replay`]):
//! the batch's indices and gather and the noise before it, Adam's constants staged before it,
//! the batch and the noise copied into the graph's input buffers, and the loss read back
//! after it. `tests/gpu_model.rs` checks that list against the trace of a replayed step.
//!
//! The breakdown the report prints is `Σ t_roof` (roofline), `Σ (t_eff − t_roof)` (efficiency),
//! `Σ (t_pad − t_eff)` (padding and zero taps), `Σ (t_pad/(fill·issue) − t_pad)` (idle SMs and schedulers), and the
//! gaps, memsets, copies, waits and the host's excess over the device (launch and host
//! overhead); they add up to the eager step.
//!
//! What it leaves out, on purpose: caches (every byte is priced at DRAM bandwidth, so small
//! working sets are priced pessimistically), instruction latency beyond the issue-bound η,
//! clocks below the boost clock the peaks assume, and the host's own work between launches.
//! A lone block is assumed to get its SM's whole issue rate and bandwidth share (`1/S`), and
//! an idle SM to pull no bandwidth: optimistic for a grid of a few blocks doing arithmetic
//! (eight warps hide latency poorly), and it prices a few blocks streaming a large tensor at
//! `Q/(BW · fill)`. The constants and their sources are in
//! [`machine`]; they change only with a cited source or a GPU measurement, recorded with the
//! model's figures before and after.

pub mod cubin;
pub mod machine;
pub mod price;
pub mod report;
pub mod sass;
pub mod work;

pub use machine::{Machine, SmLimits, H200, SM_80, SM_90};
pub use price::{price, Replay, StepPrice};
pub use report::{ModelReport, StaticFacts};
