//! The benchmark cases run and report sensible work counts (timings are for `vae bench`, not
//! for tests).

use vaecuda::bench::{kernel_cases, Roofline};
use vaecuda::Cpu;

#[test]
fn every_kernel_case_runs_on_the_cpu() {
    let be = Cpu::<f32>::default();
    let cases = kernel_cases(&be, false);
    let families: std::collections::BTreeSet<_> = cases.iter().map(|c| c.family).collect();
    for f in ["gemm", "conv2d", "batchnorm", "elementwise", "reduction", "adam", "vae_loss"] {
        assert!(families.contains(f), "no {f} case");
    }
    for mut c in cases {
        (c.run)();
        assert!(c.bytes > 0.0, "{} moves no bytes", c.name);
    }
}

#[test]
fn roofline_probes_measure_something() {
    let be = Cpu::<f32>::default();
    let (bw, fl) = (be.peak_bandwidth_gbs(), be.peak_gflops());
    assert!(bw.is_finite() && bw > 0.1, "bandwidth {bw}");
    assert!(fl.is_finite() && fl > 0.1, "gflops {fl}");
}
