//! Every op computed in f32 agrees with the same op in f64, forward and backward.
//!
//! Tolerance: |f32 − f64| ≤ 1e-4·(1 + |f64|). Inputs are O(1) and every output or gradient here
//! is a sum of at most a few hundred O(1) terms; f32 rounding (2⁻²⁴ ≈ 6e-8 per operation) grows
//! at most linearly with the term count, so 1e-4 relative leaves a wide margin while still
//! catching any real disagreement (a wrong index or formula is off by O(1)).

use crate::common;

use vaecuda::Cpu;

#[test]
fn every_op_agrees_across_precisions() {
    let (b32, b64) = (Cpu::<f32>::default(), Cpu::<f64>::default());
    let mut failures = vec![];
    for case in common::all_cases() {
        let (y32, g32) = common::forward_backward(&b32, &case);
        let (y64, g64) = common::forward_backward(&b64, &case);
        let mut worst = 0.0f64;
        for (a, b) in y32.iter().chain(g32.iter().flatten()).zip(y64.iter().chain(g64.iter().flatten())) {
            let d = (a - b).abs() / (1.0 + b.abs());
            // f64::max drops NaN, so a NaN difference is made infinite to fail loudly.
            worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
        }
        if worst > 1e-4 {
            failures.push(format!("{}: worst relative difference {worst:e}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
