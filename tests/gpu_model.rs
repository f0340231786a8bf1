//! The H200 model in CI (`src/model/`): every kernel's CUBIN for sm_90 and sm_80 is checked
//! (no register spills, no local memory, ptxas and the ELF agree on registers, launch bounds
//! match the block every launch uses, and registers and shared memory fit the occupancy each
//! kernel is designed for), and one training step of each architecture at batch 128 is traced
//! on the CUDA backend (the emulated device without a GPU) and its modelled time printed in
//! the log. Needs NVRTC (`scripts/test.sh` installs it); under CI a missing NVRTC or device
//! fails instead of skipping.

use crate::common;

use vaecuda::backend::cuda::compile::nvrtc_present;
use vaecuda::backend::cuda::contract::{BLOCK, TILE_THREADS};
use vaecuda::backend::cuda::kernels::{block_threads_of_symbol, ELEMENT_TYPES, KERNELS};
use vaecuda::model::cubin::{compile_facts, KernelFacts};
use vaecuda::model::report::model_report;
use vaecuda::model::{SmLimits, H200};

/// Writes past the test harness's capture, so CI's log shows it (as `tests/kill_resume.rs`).
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn nvrtc_or_skip() -> bool {
    if nvrtc_present() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "NVRTC is missing under CI: run through scripts/test.sh");
    eprintln!("note: NVRTC not found, kernels not checked (source scripts/nvrtc-env.sh)");
    false
}

fn static_checks(arch: &str) {
    if !nvrtc_or_skip() {
        return;
    }
    let files = compile_facts(arch).unwrap_or_else(|e| panic!("{e}"));
    let kernels: Vec<KernelFacts> = files.iter().flat_map(|f| f.kernels.iter().cloned()).collect();
    assert_eq!(kernels.len(), KERNELS.len() * ELEMENT_TYPES.len(), "a kernel of the table has no facts on {arch}");
    let problems = problems(arch, &kernels);
    assert!(problems.is_empty(), "{arch}:\n{}", problems.join("\n"));
    report!("{arch}: {} kernels, none spills or uses local memory, each fits its designed occupancy", kernels.len());
    sass_checks(arch, &files);
}

/// What is wrong with `kernels` on `arch`: spills, local memory, registers the CUBIN and
/// ptxas disagree on, launch bounds other than the block every launch uses or without a
/// designed occupancy, and registers or shared memory that miss that occupancy.
fn problems(arch: &str, kernels: &[KernelFacts]) -> Vec<String> {
    let limits = SmLimits::of(arch).expect("known architecture");
    let mut problems = vec![];
    // Every launch uses blocks of this many threads (cfg_1d, cfg_blocks, cfg_tiles).
    assert_eq!(BLOCK, TILE_THREADS);
    for k in kernels {
        let n = &k.name;
        if k.spill_store_bytes + k.spill_load_bytes > 0 {
            problems.push(format!("{n}: spills {} B stored, {} B loaded", k.spill_store_bytes, k.spill_load_bytes));
        }
        if k.frame_bytes > 0 {
            problems.push(format!("{n}: {} B stack frame (local memory)", k.frame_bytes));
        }
        if k.registers == 0 || k.registers != k.ptxas_registers {
            problems.push(format!("{n}: {} registers in the CUBIN, {} by ptxas", k.registers, k.ptxas_registers));
        }
        // Every launch of a kernel uses one block size: BLOCK, or a small tile's 64 threads.
        let threads = block_threads_of_symbol(n).unwrap_or_else(|| panic!("{n} is not in the kernel table"));
        if k.max_threads.is_some_and(|t| t != threads) {
            problems.push(format!("{n}: __launch_bounds__({:?}) but every launch uses {threads}", k.max_threads));
        }
        let want = k.designed_blocks_per_sm(limits.registers);
        if k.max_threads.is_some() && want < 2 {
            problems.push(format!(
                "{n}: __launch_bounds__ without a minimum of blocks per SM: ptxas then picks registers by its own \
                 heuristic (it spilled gemm_splitk_f32 on sm_90); state the designed occupancy"
            ));
        }
        let o = limits.blocks_per_sm(threads, k.registers, k.shared_bytes);
        if o < want {
            problems.push(format!(
                "{n}: {} registers and {} B shared memory give {o} blocks of {threads} per SM on {arch}; designed for {want}",
                k.registers, k.shared_bytes
            ));
        }
    }
    problems
}

/// What the disassembly says of the tile engine, where nvdisasm is installed (under CI it
/// must be: scripts/nvrtc-env.sh installs it): the k-step loop holds the 16 × 16 unrolled
/// FFMAs of the 4 × 4 micro-tile, and no kernel uses the tensor cores yet.
fn sass_checks(arch: &str, files: &[vaecuda::model::cubin::CompiledFile]) {
    use vaecuda::model::sass::sass_facts;
    let mut lines = vec![];
    for f in files {
        let Some(sass) = sass_facts(&f.cubin) else {
            assert!(std::env::var_os("CI").is_none(), "nvdisasm is missing under CI: run through scripts/test.sh");
            eprintln!("note: nvdisasm not found, SASS not checked (source scripts/nvrtc-env.sh)");
            return;
        };
        let sass = sass.unwrap_or_else(|e| panic!("{e}"));
        for k in &f.kernels {
            assert!(sass.contains_key(&k.name), "{}: nvdisasm did not list {}", f.file, k.name);
        }
        for (name, s) in &sass {
            // Only the tensor-core kernels (priced at the TF32/BF16 peak by their engine) may
            // hold mma instructions, and their hottest loop must: 8 m16n8k8 TF32 or 4
            // m16n8k16 BF16 per k-step of 16.
            if name.ends_with("_tf32_f64") || name.ends_with("_bf16_f64") {
                continue; // empty: no f64 backend launches a tensor-core kernel
            }
            let tc = name.contains("_tf32_f32") || name.contains("_bf16_f32");
            if tc {
                let want = if name.contains("_tf32") { 8 } else { 4 };
                assert!(s.loop_tensor >= want, "{name}: {} mma in its hottest loop, not {want}", s.loop_tensor);
                lines.push(format!("{name} {} mma in {} instructions", s.loop_tensor, s.tensor_loop_instructions));
                continue;
            }
            assert_eq!(s.tensor, 0, "{name} uses tensor cores: the model prices it at the FP32 rate");
            let tile_kernels = ["gemm", "gemm_splitk", "conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"];
            if tile_kernels.iter().any(|t| ["", "_m16", "_n16"].iter().any(|v| *name == format!("{t}{v}_f32"))) {
                assert!(
                    s.loop_fma >= 256,
                    "{name}: the hottest loop holds {} FFMA, not the 256 of one k-step",
                    s.loop_fma
                );
                assert!(s.loop_fma_share() > 0.0 && s.loop_fma_share() <= 1.0);
                lines.push(format!(
                    "{name} {:.3} ({} of {}; LDG.128 {}/{}, LDS.128 {}/{})",
                    s.loop_fma_share(),
                    s.loop_fma,
                    s.loop_instructions,
                    s.ldg128,
                    s.ldg,
                    s.lds128,
                    s.lds
                ));
            }
        }
    }
    report!("{arch} SASS, FFMA share of the tile loop (tensor kernels: mma in it): {}", lines.join("; "));
}

#[test]
fn no_kernel_spills_and_each_fits_its_occupancy_on_sm90() {
    static_checks("sm_90");
}

#[test]
fn no_kernel_spills_and_each_fits_its_occupancy_on_sm80() {
    static_checks("sm_80");
}

/// The modelled step of each architecture, in the log. The figures are the model's, not a
/// measurement; the test checks that the trace is a whole training step and that the
/// breakdown adds up.
#[test]
fn modelled_step_of_each_architecture() {
    if !nvrtc_or_skip() {
        return;
    }
    let Some(be) = common::cuda_device::<f32>() else { return };
    let started = std::time::Instant::now();
    let r = model_report(&be, H200, 128).unwrap_or_else(|e| panic!("{e}"));
    for a in &r.archs {
        let s = &a.step;
        let parts: f64 = a.breakdown().iter().map(|p| p.1).sum();
        assert!((parts - s.eager_s).abs() < 1e-9 * s.eager_s.max(1.0), "{}: parts {parts} vs {}", a.arch, s.eager_s);
        assert!(s.eager_s > 0.0 && s.graph_s > 0.0 && s.graph_s <= s.eager_s);
        assert!(s.outside_graph_s > 0.0 && s.outside_graph_s < s.graph_s);
        // Every launch is labelled with the backend method and shape it served.
        if let Some(l) = s.launches.iter().find(|l| l.op.starts_with("- ")) {
            panic!("{}: {} launched outside any labelled backend method ({:?})", a.arch, l.kernel, l.op);
        }
        // A step launches Adam once for all parameter tensors, zeroes the gradients in one
        // launch, draws its noise on the device, and reads the loss back once, at the end.
        let count = |k: &str| s.launches.iter().filter(|l| l.kernel == k).count();
        let (adams, zeros, noise) = (count("adam_multi_f32"), count("zero_multi_f32"), count("philox_normal_f32"));
        assert!(
            adams == 1 && count("adam_f32") == 0 && zeros == 1 && noise == 1 && s.syncs == 1,
            "{}: {adams} adam_multi, {} adam, {zeros} zero_multi, {noise} philox_normal launches, {} syncs",
            a.arch,
            count("adam_f32"),
            s.syncs
        );
        report!(
            "modelled H200 step, {} at batch 128: {:.1} µs eager ({:.3} s/epoch), {:.1} µs as one graph ({:.1} µs of it outside); {} launches, {} memsets, {} copies",
            a.arch,
            s.eager_s * 1e6,
            a.epoch_eager_s(),
            s.graph_s * 1e6,
            s.outside_graph_s * 1e6,
            s.launches.len(),
            s.memsets,
            s.copies
        );
    }
    report!("(traced and priced in {:.1} s on {})", started.elapsed().as_secs_f64(), r.traced_on);
}

/// The static check fails on a planted spill: the tile kernels' designed occupancy raised to
/// 8 blocks of 256 threads caps them at 32 registers, far below the 4 × 4 micro-tile's needs.
#[test]
fn the_static_check_catches_a_planted_spill() {
    use vaecuda::backend::cuda::compile::{compile_program_with, program_source, KernelFile, FILES, PTXAS_REPORT};
    use vaecuda::model::cubin::{facts_of, merge_ptxas_report};
    if !nvrtc_or_skip() {
        return;
    }
    let gemm = FILES.iter().find(|f| f.name == "gemm.cu").unwrap();
    // Only the f32 FMA tiles are kept (the check looks at gemm_f32): a third of the compile.
    let source = gemm
        .source
        .replace("TILE_MIN_BLOCKS)", "8)")
        .replace("FILE_KERNELS(double, f64)", "")
        .lines()
        .filter(|l| !l.contains("TcEngine<"))
        .collect::<Vec<_>>()
        .join("\n");
    let planted = KernelFile { name: "gemm.cu", source: Box::leak(source.into()) };
    let text = program_source(&planted).unwrap();
    let c = compile_program_with("gemm.cu", &text, "sm_90", &[PTXAS_REPORT]).unwrap_or_else(|e| panic!("{e}"));
    let mut kernels = facts_of(&c.binary).unwrap();
    merge_ptxas_report(&mut kernels, &c.log);
    let found = problems("sm_90", &kernels);
    assert!(found.iter().any(|p| p.starts_with("gemm_f32: spills")), "the planted spill passed: {found:?}");
}

/// The traced step is the same whatever the batch of the untraced first step (which only
/// creates the gradient buffers): what lets the report warm up at batch 2 (checked for all
/// three architectures when that was chosen; the MLP here, where it costs a second).
#[test]
fn warm_up_batch_does_not_change_the_trace() {
    use vaecuda::backend::cuda::trace::EventKind;
    use vaecuda::model::report::trace_step_after;
    use vaecuda::nn::Arch;
    if !nvrtc_or_skip() {
        return;
    }
    let Some(be) = common::cuda_device::<f32>() else { return };
    let warm_full = trace_step_after(&be, Arch::Mlp, 128, 128);
    let warm_small = trace_step_after(&be, Arch::Mlp, 128, 2);
    assert!(warm_full.iter().filter(|e| matches!(e.kind, EventKind::Launch(_))).count() > 40);
    assert!(warm_full == warm_small, "the MLP step traced after a warm-up at 2 differs from one after 128");
}

/// What the model prices outside the graph of a replayed step (`training_replay`: the gather,
/// the noise, the host copies, the inputs' copies, the loss read back) is what a replayed
/// step does outside its graph: traced with graphs on, the third step at a batch is one
/// graph launch and exactly those events.
#[test]
fn a_replayed_step_leaves_outside_the_graph_what_the_model_prices() {
    use vaecuda::backend::cuda::trace::{Event, EventKind};
    use vaecuda::model::report::{trace_replayed_step, trace_step_after, training_replay};
    use vaecuda::nn::Arch;
    if !nvrtc_or_skip() {
        return;
    }
    let Some(be) = common::cuda_device::<f32>() else { return };
    let batch = 16;
    // What an event asked of the device, without the label of the method that asked it.
    let what = |e: &Event| match &e.kind {
        EventKind::Launch(l) => format!("launch {:?} grid {:?}", l.kernel, l.grid),
        other => format!("{other:?}"),
    };
    let replay = training_replay(Arch::Mlp, batch);
    let eager = trace_step_after(&be, Arch::Mlp, batch, batch);
    let mut expected: Vec<String> = eager.iter().filter(|e| replay.is_outside(e)).map(what).collect();
    expected.extend(replay.input_copy_bytes.iter().map(|&bytes| {
        what(&Event {
            op: "copy",
            shape: String::new(),
            kind: EventKind::Copy { dir: vaecuda::backend::cuda::trace::CopyDir::DeviceToDevice, bytes },
        })
    }));
    let replayed = trace_replayed_step(&be, Arch::Mlp, batch);
    let graphs = replayed.iter().filter(|e| e.kind == EventKind::GraphLaunch).count();
    let mut outside: Vec<String> = replayed.iter().filter(|e| e.kind != EventKind::GraphLaunch).map(what).collect();
    expected.sort();
    outside.sort();
    assert_eq!(graphs, 1, "a replayed step is one graph launch: {replayed:#?}");
    assert_eq!(outside, expected, "outside the graph, the replayed step differs from what the model prices");
    assert!(outside.len() >= 6, "too few events outside the graph to be a whole step: {outside:?}");
}
