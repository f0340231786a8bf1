//! The modelled report: one training step of each architecture traced on a CUDA backend (a
//! GPU or the emulated device), priced on the H200, printed as tables and drawn as a chart.

use std::collections::BTreeMap;
use std::fmt;

use super::cubin::{compile_facts, KernelFacts};
use super::machine::Machine;
use super::price::{price, Cost, KernelModel, Replay, StepPrice};
use super::sass::{find_tool, sass_facts};
use crate::backend::cuda::trace::{record, Event};
use crate::backend::cuda::{Cuda, GpuError};
use crate::backend::Backend;
use crate::data::DeviceData;
use crate::nn::{Arch, ModelConfig};
use crate::optim::AdamConfig;
use crate::rng::Rng;
use crate::train::{LossConfig, Trainer};

/// MNIST's training images: an epoch's steps are ⌈60000 / batch⌉.
pub const MNIST_TRAIN_IMAGES: usize = 60_000;

/// Every kernel's static facts on one architecture.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StaticFacts {
    /// `sm_90`, `sm_80`.
    pub arch: String,
    /// By symbol (`gemm_f32`).
    pub kernels: BTreeMap<String, KernelModel>,
    /// The disassembler the SASS facts came from, or `None` (η from the source).
    pub disassembler: Option<String>,
}

impl StaticFacts {
    /// Compiles every kernel file for `arch` with NVRTC (no GPU needed) and reads the CUBIN,
    /// ptxas's report and, where nvdisasm is installed, the SASS.
    pub fn of(arch: &str) -> Result<StaticFacts, GpuError> {
        let mut kernels = BTreeMap::new();
        for f in compile_facts(arch)? {
            let sass = match sass_facts(&f.cubin) {
                None => BTreeMap::new(),
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    return Err(GpuError::Unavailable(format!(
                        "disassembling kernels/{} for the model's SASS facts: {e}; point VAECUDA_CUDA_TOOLS at a \
                         working CUDA bin folder, or take nvdisasm off the PATH to use the source's FFMA share",
                        f.file
                    )))
                }
            };
            for facts in f.kernels {
                let s = sass.get(&facts.name).cloned();
                kernels.insert(facts.name.clone(), KernelModel { facts, sass: s });
            }
        }
        let disassembler = find_tool("nvdisasm").map(|p| p.display().to_string());
        Ok(StaticFacts { arch: arch.to_string(), kernels, disassembler })
    }

    /// The facts of every `_f32` kernel (what training launches), in name order.
    pub fn f32_kernels(&self) -> impl Iterator<Item = &KernelFacts> {
        self.kernels.values().map(|k| &k.facts).filter(|f| f.name.ends_with("_f32"))
    }
}

/// The events of one training step of `arch` at `batch` on `be`, as `vae train` takes it: a
/// batch of `u8` pixels gathered on the device, forward, backward, Adam, the loss read back.
/// The step traced is the second (the first warms the memory pool; both launch the same).
pub fn trace_step(be: &Cuda<f32>, arch: Arch, batch: usize) -> Vec<Event> {
    trace_step_after(be, arch, batch, WARM_UP_BATCH)
}

/// The batch of the untraced first step: it only has to create the gradient buffers (the
/// first step allocates and zeroes them where later steps zero them in place), which do not
/// depend on the batch; a small one keeps the emulated device's time down. Checked on
/// 2026-12-01: a warm-up at 2 and one at 128 give the same events for all three architectures
/// (`warm_up_batch_does_not_change_the_trace` in `tests/gpu_model.rs` keeps checking the MLP).
pub const WARM_UP_BATCH: usize = 2;

/// [`trace_step`] with a first, untraced step at batch `warm_up`.
pub fn trace_step_after(be: &Cuda<f32>, arch: Arch, batch: usize, warm_up: usize) -> Vec<Event> {
    // Eagerly: a replayed graph's launches are not traced (the model prices the step as one
    // graph from the eager trace, with `training_replay` outside the graph).
    trace_after(&be.with_graphs(false), arch, batch, &[warm_up])
}

/// The events of a training step of `arch` at `batch` replayed as one CUDA graph: two steps
/// at `batch` come first (run eagerly, then captured), the third is traced. What
/// `tests/gpu_model.rs` checks [`training_replay`] against.
pub fn trace_replayed_step(be: &Cuda<f32>, arch: Arch, batch: usize) -> Vec<Event> {
    trace_after(&be.with_graphs(true), arch, batch, &[batch, batch])
}

/// The events of a training step at `batch` on a fresh trainer, after untraced steps at
/// the batches `before`.
fn trace_after(be: &Cuda<f32>, arch: Arch, batch: usize, before: &[usize]) -> Vec<Event> {
    let config = ModelConfig::mnist(arch);
    let mut t = Trainer::new(be.clone(), config, LossConfig::default(), AdamConfig::default(), 0);
    let mut rng = Rng::new(1);
    let images = before.iter().copied().fold(batch, usize::max);
    let pixels: Vec<u8> = (0..images * 784).map(|_| (rng.next_f64() * 256.0) as u8).collect();
    let data: DeviceData<Cuda<f32>> =
        DeviceData { pixels: be.upload_bytes(&std::sync::Arc::new(pixels)), len: images, shape: [1, 28, 28] };
    let mut step = |n: usize| {
        let idx: Vec<u32> = (0..n as u32).collect();
        let x = data.batch(be, &idx);
        t.step(x, 1.0).expect("a finite loss on random pixels");
    };
    for &n in before {
        step(n);
    }
    be.synchronize();
    record(|| step(batch)).1
}

/// What a training step replayed as a CUDA graph leaves outside it (`Trainer::step`): the
/// batch gathered on the device (its indices uploaded) and the noise drawn before, the loss
/// read back after, Adam's constants staged before (a host copy, outside by rule), and the
/// batch and the noise copied into the graph's input buffers.
/// `tests/gpu_model.rs` checks this against the trace of a replayed step.
pub fn training_replay(arch: Arch, batch: usize) -> Replay {
    let config = ModelConfig::mnist(arch);
    let f32_bytes = std::mem::size_of::<f32>();
    let image = config.channels * config.height * config.width;
    Replay {
        outside_ops: vec!["gather_rows_u8", "normal_noise", "download"],
        input_copy_bytes: vec![(batch * image * f32_bytes) as u64, (batch * config.latent * f32_bytes) as u64],
    }
}

/// One architecture's priced step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ArchPrice {
    /// `mlp`, `conv`, `conv-bn`.
    pub arch: String,
    /// Images per step.
    pub batch: usize,
    /// Steps per MNIST epoch.
    pub steps_per_epoch: usize,
    /// The priced trace.
    pub step: StepPrice,
}

impl ArchPrice {
    /// Modelled epoch, eager launches, seconds.
    pub fn epoch_eager_s(&self) -> f64 {
        self.step.eager_s * self.steps_per_epoch as f64
    }
    /// Modelled epoch, one graph per step, seconds.
    pub fn epoch_graph_s(&self) -> f64 {
        self.step.graph_s * self.steps_per_epoch as f64
    }
    /// The eager step's parts, in the report's order: (name, seconds). They add up to
    /// `step.eager_s`.
    pub fn breakdown(&self) -> [(&'static str, f64); 5] {
        let d: &Cost = &self.step.device;
        [
            ("roofline", d.roofline),
            ("useful work at the kernel's efficiency", d.efficiency),
            ("tile padding and zero taps", d.padding),
            ("SMs idle in under-filled grids", d.idle),
            ("launch and host overhead", d.overhead + self.step.host_bound_s),
        ]
    }
    /// Device time by kernel family (the file under `kernels/`), eager, seconds, largest first.
    pub fn by_family(&self) -> Vec<(&'static str, f64)> {
        let mut m: BTreeMap<&'static str, f64> = BTreeMap::new();
        for l in &self.step.launches {
            *m.entry(l.family).or_default() += l.cost.total();
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }
}

/// What `vae bench --model h200` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelReport {
    /// The machine priced.
    pub machine: Machine,
    /// The device the steps were traced on.
    pub traced_on: String,
    /// The static facts the launches were priced with (sm_90).
    pub facts: StaticFacts,
    /// One per architecture.
    pub archs: Vec<ArchPrice>,
}

/// Traces one step of each architecture at `batch` on `be` and prices it on `machine` with
/// the sm_90 facts.
pub fn model_report(be: &Cuda<f32>, machine: Machine, batch: usize) -> Result<ModelReport, GpuError> {
    let facts = StaticFacts::of(machine.sm.arch)?;
    let archs = [Arch::Mlp, Arch::Conv, Arch::ConvBn]
        .into_iter()
        .map(|arch| {
            let events = trace_step(be, arch, batch);
            ArchPrice {
                arch: arch.name().to_string(),
                batch,
                steps_per_epoch: MNIST_TRAIN_IMAGES.div_ceil(batch),
                step: price(&events, &facts.kernels, &machine, &training_replay(arch, batch)),
            }
        })
        .collect();
    Ok(ModelReport { machine, traced_on: be.describe(), facts, archs })
}

/// Microseconds, for the tables.
fn us(s: f64) -> f64 {
    s * 1e6
}

impl fmt::Display for ModelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        writeln!(
            f,
            "MODELLED, not measured: {} ({} SMs, FP32 {:.0} TFLOP/s, {:.1} TB/s; src/model/machine.rs has the sources)",
            m.name,
            m.sms,
            m.fp32_flops / 1e12,
            m.dram_bytes_per_s / 1e12
        )?;
        let eta = match &self.facts.disassembler {
            Some(p) => format!("η from the {} SASS ({p})", self.facts.arch),
            None => "η from the source (nvdisasm not installed)".to_string(),
        };
        writeln!(f, "launches traced on {}; resources from the {} CUBIN; {eta}", self.traced_on, self.facts.arch)?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<8} {:>5} {:>8} {:>7} {:>6} {:>5} {:>16} {:>16} {:>16} {:>16}",
            "arch",
            "batch",
            "launches",
            "memsets",
            "copies",
            "syncs",
            "modelled step µs",
            "(one graph) µs",
            "modelled epoch s",
            "(one graph) s"
        )?;
        for a in &self.archs {
            let s = &a.step;
            writeln!(
                f,
                "{:<8} {:>5} {:>8} {:>7} {:>6} {:>5} {:>16.1} {:>16.1} {:>16.3} {:>16.3}",
                a.arch,
                a.batch,
                s.launches.len(),
                s.memsets,
                s.copies,
                s.syncs,
                us(s.eager_s),
                us(s.graph_s),
                a.epoch_eager_s(),
                a.epoch_graph_s()
            )?;
        }
        writeln!(f)?;
        write!(f, "{}", StaticTable(&self.facts))?;
        for a in &self.archs {
            writeln!(f)?;
            writeln!(
                f,
                "{}: modelled step {:.1} µs (eager), epoch {:.3} s ({} steps)",
                a.arch,
                us(a.step.eager_s),
                a.epoch_eager_s(),
                a.steps_per_epoch
            )?;
            for (name, t) in a.breakdown() {
                writeln!(f, "  modelled {:<40} {:>9.1} µs {:>5.1}%", name, us(t), 100.0 * t / a.step.eager_s)?;
            }
            writeln!(
                f,
                "  as one graph: modelled step {:.1} µs, of which {:.1} µs outside the graph (the batch's \
                 indices and gather, the noise, Adam's constants, the inputs' copies, the loss read back: \
                 each issued by the host on its own)",
                us(a.step.graph_s),
                us(a.step.outside_graph_s)
            )?;
            writeln!(
                f,
                "  {:<25} {:>5} {:>12} {:>3} {:>6} {:>9} {:>10} {:>12} {:>7}",
                "kernel", "calls", "blocks", "o", "fill%", "η", "exec/use", "modelled µs", "share"
            )?;
            for r in kernel_rows(&a.step) {
                writeln!(
                    f,
                    "  {:<25} {:>5} {:>12} {:>3} {:>6.1} {:>9} {:>10.2} {:>12.1} {:>6.1}%",
                    r.kernel,
                    r.calls,
                    if r.min_blocks == r.max_blocks {
                        r.min_blocks.to_string()
                    } else {
                        format!("{}–{}", r.min_blocks, r.max_blocks)
                    },
                    r.blocks_per_sm,
                    100.0 * r.fill,
                    if r.tiled { format!("{:.3}", r.efficiency) } else { "-".to_string() },
                    r.executed_over_useful,
                    us(r.device_s),
                    100.0 * r.device_s / a.step.eager_s
                )?;
            }
        }
        Ok(())
    }
}

/// The static facts of the `_f32` kernels as a table (what `vae bench --model` prints).
pub struct StaticTable<'a>(pub &'a StaticFacts);

impl fmt::Display for StaticTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let limits = super::machine::SmLimits::of(&s.arch);
        writeln!(
            f,
            "static facts ({} CUBIN; o = blocks per SM at the kernel's block size, 256 threads or a small tile's 64; loop FMA = FFMA+DFMA share of the hottest loop):",
            s.arch
        )?;
        writeln!(
            f,
            "  {:<25} {:>4} {:>6} {:>3} {:>6} {:>6} {:>7} {:>9} {:>9} {:>9} {:>6}",
            "kernel", "regs", "bounds", "o", "smem", "local", "spills", "loop FMA", "LDG.128", "LDS.128", "tensor"
        )?;
        for k in s.kernels.values().filter(|k| k.facts.name.ends_with("_f32")) {
            let x = &k.facts;
            let threads = crate::backend::cuda::kernels::block_threads_of_symbol(&x.name).unwrap_or(256);
            let o = limits.map_or(0, |l| l.blocks_per_sm(threads, x.registers, x.shared_bytes));
            let (share, ldg, lds, tensor) = match &k.sass {
                Some(q) => (
                    format!("{:.3}", q.loop_fma_share()),
                    format!("{}/{}", q.ldg128, q.ldg),
                    format!("{}/{}", q.lds128, q.lds),
                    q.tensor.to_string(),
                ),
                None => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            writeln!(
                f,
                "  {:<25} {:>4} {:>6} {:>3} {:>6} {:>6} {:>7} {:>9} {:>9} {:>9} {:>6}",
                x.name,
                x.registers,
                x.max_threads.map_or("-".to_string(), |t| t.to_string()),
                o,
                x.shared_bytes,
                x.frame_bytes,
                x.spill_store_bytes + x.spill_load_bytes,
                share,
                ldg,
                lds,
                tensor
            )?;
        }
        Ok(())
    }
}

/// One row of the per-kernel table: a kernel's launches in a step, summed.
#[derive(Clone, Debug)]
pub struct KernelRow {
    /// The symbol.
    pub kernel: String,
    /// Launches in the step.
    pub calls: usize,
    /// Smallest and largest grid.
    pub min_blocks: u64,
    /// Largest grid.
    pub max_blocks: u64,
    /// Blocks per SM (the same for every launch: one block size).
    pub blocks_per_sm: u32,
    /// Fill, weighted by each launch's time.
    pub fill: f64,
    /// η.
    pub efficiency: f64,
    /// Whether it is a tile kernel (η applies; the others are priced by their bytes).
    pub tiled: bool,
    /// Executed over useful FLOPs (1 for kernels without FLOPs of their own).
    pub executed_over_useful: f64,
    /// Modelled device time, eager, seconds.
    pub device_s: f64,
}

/// The per-kernel rows of a step, costliest first.
pub fn kernel_rows(s: &StepPrice) -> Vec<KernelRow> {
    let mut m: BTreeMap<&str, Vec<&super::price::PricedLaunch>> = BTreeMap::new();
    for l in &s.launches {
        m.entry(&l.kernel).or_default().push(l);
    }
    let mut rows: Vec<KernelRow> = m
        .into_iter()
        .map(|(k, ls)| {
            let device_s: f64 = ls.iter().map(|l| l.cost.total()).sum();
            let useful: f64 = ls.iter().map(|l| l.work.useful_flops).sum();
            let executed: f64 = ls.iter().map(|l| l.work.executed_flops).sum();
            KernelRow {
                kernel: k.to_string(),
                calls: ls.len(),
                min_blocks: ls.iter().map(|l| l.blocks).min().unwrap_or(0),
                max_blocks: ls.iter().map(|l| l.blocks).max().unwrap_or(0),
                blocks_per_sm: ls[0].blocks_per_sm,
                fill: ls.iter().map(|l| l.fill * l.cost.total()).sum::<f64>() / device_s.max(1e-30),
                efficiency: ls[0].efficiency,
                tiled: ls[0].work.tiled,
                executed_over_useful: if useful > 0.0 { executed / useful } else { 1.0 },
                device_s,
            }
        })
        .collect();
    rows.sort_by(|a, b| b.device_s.total_cmp(&a.device_s));
    rows
}

/// The report as a chart: the modelled eager step of each architecture as stacked bars, split
/// by cause (left) and by kernel family (right), in µs.
pub fn chart(r: &ModelReport) -> anyhow::Result<image::RgbImage> {
    use crate::charts::{stacked_bar_chart, BarPanel};
    use crate::image_out::PALETTE;
    let bars: Vec<String> = r.archs.iter().map(|a| a.arch.clone()).collect();
    let causes = (0..5)
        .map(|k| {
            let name = r.archs.first().map_or("", |a| a.breakdown()[k].0).to_string();
            (name, PALETTE[k], r.archs.iter().map(|a| us(a.breakdown()[k].1)).collect())
        })
        .collect();
    let mut families: Vec<&'static str> = vec![];
    for a in &r.archs {
        for (f, _) in a.by_family() {
            if !families.contains(&f) {
                families.push(f);
            }
        }
    }
    let mut parts: Vec<(String, crate::image_out::Color, Vec<f64>)> = families
        .iter()
        .enumerate()
        .map(|(k, f)| {
            let v = r.archs.iter().map(|a| us(a.by_family().iter().find(|x| x.0 == *f).map_or(0.0, |x| x.1))).collect();
            (format!("{f}.cu kernels"), PALETTE[k % PALETTE.len()], v)
        })
        .collect();
    let rest = r
        .archs
        .iter()
        .map(|a| us(a.step.eager_s - a.step.launches.iter().map(|l| l.cost.total()).sum::<f64>()))
        .collect();
    parts.push(("memsets, copies, waits, host".to_string(), PALETTE[7], rest));
    let panels = [
        BarPanel {
            title: "by cause".into(), y_desc: "modelled µs per step".into(), bars: bars.clone(), parts: causes
        },
        BarPanel { title: "by kernel family".into(), y_desc: "modelled µs per step".into(), bars, parts },
    ];
    let title = format!(
        "MODELLED {} training step at batch {} (eager launches; not measured)",
        r.machine.name,
        r.archs.first().map_or(0, |a| a.batch)
    );
    stacked_bar_chart(&title, &panels, 1500, 620)
}
