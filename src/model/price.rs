//! Pricing a launch trace on a [`Machine`]: the formula of the module documentation
//! ([`crate::model`]), applied event by event.

use std::collections::BTreeMap;

use super::cubin::KernelFacts;
use super::machine::Machine;
use super::sass::SassFacts;
use super::work::{work_of, Work};
use crate::backend::cuda::kernels::{Engine, KERNELS};
use crate::backend::cuda::trace::{CopyDir, Event, EventKind};

/// FFMA share of the tile engine's inner step as written in `kernels/common.cuh`, used when
/// no disassembler is installed: each of the 16 k-steps loads 4 + 4 operands from shared
/// memory and does 4 × 4 FFMA, 16 of 24 instructions (address arithmetic, global loads and
/// barriers not counted, so the SASS share is lower).
pub const TILE_FMA_SHARE_FROM_SOURCE: f64 = 16.0 / 24.0;

/// Warp schedulers of one SM: an sm_80/sm_90 SM is four processing blocks, each issuing for its
/// own warps (NVIDIA H100 Tensor Core GPU Architecture whitepaper, 2022, "H100 SM
/// architecture"; the A100 whitepaper, 2020, the same for sm_80). An SM that holds fewer
/// than four warps leaves schedulers idle: it issues at (warps / 4) of its rate at best.
pub const SCHEDULERS_PER_SM: u32 = 4;

/// What the model knows of one kernel function on the priced architecture.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelModel {
    /// From the CUBIN and ptxas.
    pub facts: KernelFacts,
    /// From the disassembly, when nvdisasm is installed.
    pub sass: Option<SassFacts>,
}

/// The tensor-pipe share of a tensor-core kernel's hottest loop assumed where no disassembler
/// is installed: a guess (half the tensor peak), not derived; under CI nvdisasm is installed
/// and the SASS decides.
pub const TENSOR_SHARE_WITHOUT_SASS: f64 = 0.5;

impl KernelModel {
    /// η of a tensor-core kernel: the share of the tensor peak its hottest loop allows. Each
    /// warp instruction takes one issue slot of its SM partition; one `mma.sync` keeps the
    /// partition's tensor unit busy for (its FLOPs) / (the unit's FLOPs per clock) clocks, and
    /// that rate is the FP32 one (32 FMA = 64 FLOPs per partition per clock, see sass.rs)
    /// scaled by the datasheet's peaks: `64 · peak / fp32_flops`. So a loop of I instructions
    /// with H of them mma reaches min(1, H · clocks per mma / I) of the peak. An m16n8k8 TF32
    /// mma is 2·16·8·8 = 2048 FLOPs, an m16n8k16 BF16 one 4096.
    pub fn tensor_efficiency(&self, engine: Engine, m: &Machine) -> f64 {
        let (flops_per_mma, peak) = match engine {
            Engine::Tf32 => (2048.0, m.tf32_flops),
            Engine::Bf16 => (4096.0, m.bf16_flops),
            Engine::Fma => return 1.0,
        };
        let clocks_per_mma = flops_per_mma / (64.0 * peak / m.fp32_flops);
        match &self.sass {
            Some(s) if s.loop_tensor > 0 => {
                (s.loop_tensor as f64 * clocks_per_mma / s.tensor_loop_instructions as f64).min(1.0)
            }
            _ => TENSOR_SHARE_WITHOUT_SASS,
        }
    }

    /// η: the share of the FP32 peak the kernel's instruction mix allows (tile kernels: the
    /// FFMA share of the hottest loop; 1 for the others, which are priced by their bytes).
    pub fn efficiency(&self, tiled: bool) -> f64 {
        if !tiled {
            return 1.0;
        }
        match &self.sass {
            Some(s) if s.loop_fma > 0 => s.loop_fma_share(),
            _ => TILE_FMA_SHARE_FROM_SOURCE,
        }
    }
}

/// The cost of one event, split the way the report breaks a step down. Seconds of device time;
/// each field is the extra over the one before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Cost {
    /// The roofline: useful FLOPs at the peak rate or the fewest bytes at the memory
    /// bandwidth, whichever is longer.
    pub roofline: f64,
    /// Extra for running the useful FLOPs at the kernel's efficiency η instead of the peak.
    pub efficiency: f64,
    /// Extra for the FLOPs that tile padding and zero taps add.
    pub padding: f64,
    /// Extra for multiprocessor slots left idle by an under-filled grid (or a last wave).
    pub idle: f64,
    /// Fixed device cost: the gap between kernels, memsets, copies, host waits.
    pub overhead: f64,
}

impl Cost {
    /// The sum of the parts.
    pub fn total(&self) -> f64 {
        self.roofline + self.efficiency + self.padding + self.idle + self.overhead
    }
    fn add(&mut self, o: &Cost) {
        self.roofline += o.roofline;
        self.efficiency += o.efficiency;
        self.padding += o.padding;
        self.idle += o.idle;
        self.overhead += o.overhead;
    }
}

/// One launch, priced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PricedLaunch {
    /// The kernel symbol, `conv2d_fwd_f32`.
    pub kernel: String,
    /// Its file's stem: the family (`conv2d`, `gemm`, ...).
    pub family: &'static str,
    /// The backend method and shape it served.
    pub op: String,
    /// Blocks in the grid.
    pub blocks: u64,
    /// Blocks one SM holds at once (occupancy).
    pub blocks_per_sm: u32,
    /// Waves: ⌈blocks / (SMs · blocks per SM)⌉.
    pub waves: u64,
    /// The share of the SMs' time the grid keeps busy: blocks / (SMs · ⌈blocks / SMs⌉).
    pub fill: f64,
    /// η, as [`KernelModel::efficiency`].
    pub efficiency: f64,
    /// What it must do.
    pub work: Work,
    /// Its device time, eager (the gap included).
    pub cost: Cost,
}

/// A whole trace, priced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepPrice {
    /// Every kernel launch.
    pub launches: Vec<PricedLaunch>,
    /// Memsets in the trace.
    pub memsets: usize,
    /// Copies in the trace (host to device, device to host, on the device).
    pub copies: usize,
    /// Host waits in the trace.
    pub syncs: usize,
    /// Device time of everything, eager launches, by part.
    pub device: Cost,
    /// Host time to issue every launch, memset and copy eagerly.
    pub host_issue_s: f64,
    /// The step, eager: device and host overlap, so the longer of the two, plus the waits.
    pub eager_s: f64,
    /// Host-bound share of the eager step: what the host's issuing adds over the device time.
    pub host_bound_s: f64,
    /// The step as it runs replayed as one CUDA graph (`graph::Replayer`): the graph's
    /// launch and its nodes at graph gaps, plus what stays outside it at eager cost (see
    /// [`Replay`]), plus the waits.
    pub graph_s: f64,
    /// Of `graph_s`: the part outside the graph (the longer of its device and host time).
    pub outside_graph_s: f64,
}

/// What a step replayed as one CUDA graph leaves outside the graph (`graph::Replayer`): the
/// events of some backend methods (the batch's gather and the noise before it, the loss read
/// back after it), every copy to or from the host (a graph holds none: Adam's constants are
/// staged before the replay), and the copies of its inputs into the graph's own buffers.
/// These run eagerly, each issued by the host on its own.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// Backend methods whose events run before or after the graph, eagerly.
    pub outside_ops: Vec<&'static str>,
    /// Bytes of each input copied into the graph's buffers before a replay, on the device.
    pub input_copy_bytes: Vec<u64>,
}

impl Replay {
    /// Whether `ev` runs outside the graph.
    pub fn is_outside(&self, ev: &Event) -> bool {
        let host_copy = matches!(ev.kind, EventKind::Copy { dir, .. } if dir != CopyDir::DeviceToDevice);
        host_copy || self.outside_ops.contains(&ev.op)
    }
}

/// Prices `events` with the kernels' `models` (by symbol) on `m`, eagerly and as replayed
/// with `replay` left outside the graph. Panics on a launch of a kernel the models lack
/// (they come from the same kernel table).
pub fn price(events: &[Event], models: &BTreeMap<String, KernelModel>, m: &Machine, replay: &Replay) -> StepPrice {
    let mut launches = vec![];
    let (mut memsets, mut copies, mut syncs) = (0, 0, 0);
    let mut device = Cost::default();
    let mut graph_device = 0.0;
    let mut host = 0.0;
    // The part of a replayed step outside the graph: device time and host issue.
    let (mut outside_device, mut outside_host) = (0.0, 0.0);
    // The inputs' copies into the graph's buffers: read and written, so at half the bandwidth.
    for &bytes in &replay.input_copy_bytes {
        outside_device += bytes as f64 / (m.dram_bytes_per_s / 2.0) + m.device_gap_eager_s;
        outside_host += m.host_issue_s;
    }
    let mut in_graph = |ev: &Event, t: f64| {
        if replay.is_outside(ev) {
            outside_device += t + m.device_gap_eager_s;
            outside_host += m.host_issue_s;
        } else {
            graph_device += t + m.device_gap_graph_s;
        }
    };
    for ev in events {
        match &ev.kind {
            EventKind::Launch(l) => {
                let spec = &KERNELS[l.kernel as usize];
                let name = format!("{}_{}", spec.name, if l.elem_bytes == 8 { "f64" } else { "f32" });
                let km = models.get(&name).unwrap_or_else(|| panic!("no CUBIN facts for {name}"));
                let work = work_of(l);
                // Tensor-core kernels run at the TF32 or BF16 peak, at their own η.
                let engine = Engine::of(l.kernel);
                let eta = match engine {
                    Engine::Fma => km.efficiency(work.tiled),
                    tc => km.tensor_efficiency(tc, m),
                };
                let o =
                    m.sm.blocks_per_sm(
                        l.threads_per_block(),
                        km.facts.registers,
                        km.facts.shared_bytes + l.dynamic_shared_bytes,
                    )
                    .max(1);
                let blocks = l.blocks().max(1);
                let waves = blocks.div_ceil(m.sms as u64 * o as u64);
                // The busiest SM runs ⌈B/S⌉ blocks; the others idle for part of that time.
                let fill = blocks as f64 / (m.sms as u64 * blocks.div_ceil(m.sms as u64)) as f64;
                let p32 = match (engine, l.elem_bytes) {
                    (_, 8) => m.fp64_flops,
                    (Engine::Tf32, _) => m.tf32_flops,
                    (Engine::Bf16, _) => m.bf16_flops,
                    (Engine::Fma, _) => m.fp32_flops,
                };
                let fp64 = work.fp64_flops / m.fp64_flops;
                let mem = work.bytes / m.dram_bytes_per_s;
                let roof = (work.useful_flops / p32 + fp64).max(mem);
                let eff = (work.useful_flops / (p32 * eta) + fp64).max(mem);
                let pad = (work.executed_flops / (p32 * eta) + fp64).max(mem);
                // The busiest SM holds ⌈B/S⌉ blocks (at most o at once); with fewer than four
                // warps among them it cannot issue at its full rate (the small tiles' lone
                // two-warp blocks; every 256-thread block has eight).
                let warps =
                    (blocks.div_ceil(m.sms as u64).min(o as u64) as u32 * l.threads_per_block().div_ceil(32)).max(1);
                let issue = (warps as f64 / SCHEDULERS_PER_SM as f64).min(1.0);
                let filled = pad / fill / issue;
                let cost = Cost {
                    roofline: roof,
                    efficiency: eff - roof,
                    padding: pad - eff,
                    idle: filled - pad,
                    overhead: m.device_gap_eager_s,
                };
                device.add(&cost);
                in_graph(ev, filled);
                host += m.host_issue_s;
                let family = spec.file.trim_end_matches(".cu");
                let op = format!("{} {}", ev.op, ev.shape);
                launches.push(PricedLaunch {
                    kernel: name,
                    family,
                    op,
                    blocks,
                    blocks_per_sm: o,
                    waves,
                    fill,
                    efficiency: eta,
                    work,
                    cost,
                });
            }
            EventKind::Memset { bytes } => {
                memsets += 1;
                let t = *bytes as f64 / m.dram_bytes_per_s;
                device.overhead += t + m.device_gap_eager_s;
                in_graph(ev, t);
                host += m.host_issue_s;
            }
            EventKind::Copy { dir, bytes } => {
                copies += 1;
                let bw = if *dir == CopyDir::DeviceToDevice { m.dram_bytes_per_s / 2.0 } else { m.pcie_bytes_per_s };
                let t = *bytes as f64 / bw;
                device.overhead += t + m.device_gap_eager_s;
                in_graph(ev, t);
                host += m.host_issue_s;
            }
            EventKind::Synchronize => syncs += 1,
            EventKind::GraphLaunch => {
                panic!("the model prices eager traces; this one replays a CUDA graph (trace with graphs off)")
            }
        }
    }
    let waits = syncs as f64 * m.sync_s;
    let dev = device.total();
    let eager_s = dev.max(host) + waits;
    device.overhead += waits;
    StepPrice {
        launches,
        memsets,
        copies,
        syncs,
        device,
        host_issue_s: host,
        eager_s,
        host_bound_s: (host - dev).max(0.0),
        graph_s: m.graph_launch_s + graph_device + outside_device.max(outside_host) + waits,
        outside_graph_s: outside_device.max(outside_host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::contract::GemmArgs;
    use crate::backend::cuda::kernels::Kernel;
    use crate::backend::cuda::trace::{Arg, Launch};
    use crate::model::machine::H200;

    fn models(registers: u32) -> BTreeMap<String, KernelModel> {
        KERNELS
            .iter()
            .map(|k| {
                let name = format!("{}_f32", k.name);
                let facts = KernelFacts { name: name.clone(), registers, ..Default::default() };
                (name, KernelModel { facts, sass: None })
            })
            .collect()
    }

    /// A one-block fill of `n` floats: a launch whose device time is nearly all gap.
    fn fill(n: usize) -> Launch {
        Launch {
            kernel: Kernel::Fill,
            grid: [1, 1, 1],
            block: [256, 1, 1],
            dynamic_shared_bytes: 0,
            elem_bytes: 4,
            args: vec![Arg::Buf { elems: n, elem_bytes: 4 }, Arg::Float(0.0), Arg::Int(n as i32)],
        }
    }

    fn event(kind: EventKind) -> Event {
        Event { op: "test", shape: String::new(), kind }
    }

    /// A 4096³ GEMM: 4096 blocks on 132 SMs × 4 blocks are 8 waves; the busiest SM runs 32
    /// blocks (fill 4096 / 4224), no padding; its time is the FLOPs at η = 2/3 of the peak,
    /// over that fill, plus the gap.
    #[test]
    fn a_large_gemm_is_priced_by_hand() {
        let g = GemmArgs { m: 4096, n: 4096, k: 4096, ..Default::default() };
        let l = Launch {
            kernel: Kernel::Gemm,
            grid: [64, 64, 1],
            block: [256, 1, 1],
            dynamic_shared_bytes: 0,
            elem_bytes: 4,
            args: vec![Arg::Gemm(g), Arg::Null, Arg::Null, Arg::Null, Arg::Null],
        };
        let p = price(&[event(EventKind::Launch(l))], &models(64), &H200, &Replay::default());
        let pl = &p.launches[0];
        assert_eq!((pl.blocks_per_sm, pl.waves), (4, 8));
        let flops = 2.0 * 4096f64.powi(3);
        let want = flops / (67e12 * 2.0 / 3.0) / (4096.0 / 4224.0) + 0.9e-6;
        assert!((pl.cost.total() - want).abs() < 1e-12, "{} vs {want}", pl.cost.total());
        assert!((pl.cost.roofline - flops / 67e12).abs() < 1e-12);
        assert_eq!(pl.cost.padding, 0.0);
        // One launch issued in 4 µs, far less than its device time: not host-bound.
        assert_eq!(p.host_bound_s, 0.0);
        assert!((p.eager_s - want).abs() < 1e-12);
    }

    /// A replayed step: the launches of an outside method, host copies and the inputs' copies
    /// are issued one by one outside the graph; the rest runs inside it at graph gaps.
    #[test]
    fn a_replay_prices_what_stays_outside_the_graph_eagerly() {
        let at = |op: &'static str, kind: EventKind| Event { op, shape: String::new(), kind };
        let ev = vec![
            at("normal_noise", EventKind::Launch(fill(100))),
            at("adam_step_all", EventKind::Copy { dir: CopyDir::HostToDevice, bytes: 44 }),
            at("unary_forward", EventKind::Launch(fill(100))),
            at("unary_forward", EventKind::Launch(fill(100))),
        ];
        let replay = Replay { outside_ops: vec!["normal_noise"], input_copy_bytes: vec![4800] };
        let p = price(&ev, &models(16), &H200, &replay);
        let inside = price(&ev[2..], &models(16), &H200, &Replay::default());
        // Inside: the two launches at graph gaps, and the graph's launch.
        let graph_inside = inside.graph_s;
        // Outside: three host calls (the noise, the constants, the input copy), host-bound.
        assert!((p.outside_graph_s - 3.0 * 4.0e-6).abs() < 1e-12, "{}", p.outside_graph_s);
        assert!((p.graph_s - (graph_inside + p.outside_graph_s)).abs() < 1e-12, "{} vs {graph_inside}", p.graph_s);
        // The eager step is the same with or without a replay's account.
        assert_eq!(p.eager_s, price(&ev, &models(16), &H200, &Replay::default()).eager_s);
    }

    /// Many tiny launches are host-bound: the step is the issue time, plus the waits.
    #[test]
    fn tiny_launches_are_host_bound() {
        let mut ev: Vec<Event> = (0..10).map(|_| event(EventKind::Launch(fill(100)))).collect();
        ev.push(event(EventKind::Synchronize));
        let p = price(&ev, &models(16), &H200, &Replay::default());
        assert!((p.eager_s - (10.0 * 4.0e-6 + 5.8e-6)).abs() < 1e-12, "{}", p.eager_s);
        assert!(p.host_bound_s > 0.0 && p.graph_s < p.eager_s);
        assert_eq!(p.syncs, 1);
    }
}
