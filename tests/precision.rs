//! `--precision` on the CPU: a matrix product at TF32 or BF16 is exactly the f32 product of
//! operands rounded as tensor cores round them (rna for TF32, rne for BF16), in every pass of
//! linear layers and convolutions; and the rounding changes the result (so these tests can
//! fail).

use vaecuda::backend::{Backend, Precision};
use vaecuda::ops::conv2d::Conv2dDims;
use vaecuda::ops::linear::LinearDims;
use vaecuda::rng::Rng;
use vaecuda::Cpu;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform(-1.0, 1.0) as f32).collect()
}

fn rounded(p: Precision, v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| p.round(x)).collect()
}

/// Runs `op` on the backend at `p` with (a, b), and on the f32 backend with (a, b) rounded
/// and as they are; the first two must be bitwise equal and differ from the third.
fn check(
    p: Precision,
    what: &str,
    a: &[f32],
    b: &[f32],
    out: usize,
    op: impl Fn(&Cpu<f32>, &Vec<f32>, &Vec<f32>, &mut Vec<f32>),
) {
    let run = |be: &Cpu<f32>, a: &[f32], b: &[f32]| {
        let mut y = vec![0.5f32; out]; // accumulating passes add to it
        op(be, &a.to_vec(), &b.to_vec(), &mut y);
        y
    };
    let at_p = run(&Cpu::with_precision(p), a, b);
    let by_hand = run(&Cpu::default(), &rounded(p, a), &rounded(p, b));
    let exact = run(&Cpu::default(), a, b);
    assert!(
        at_p.iter().zip(&by_hand).all(|(x, y)| x.to_bits() == y.to_bits()),
        "{what} at {p:?}: not the product of rounded operands"
    );
    assert!(at_p != exact, "{what} at {p:?}: rounding the operands changed nothing");
}

#[test]
fn matrix_products_see_operands_rounded_as_tensor_cores_do() {
    for p in [Precision::Tf32, Precision::Bf16] {
        let l = LinearDims { n: 9, d_in: 37, d_out: 13 };
        let (x, w, dy) = (random(9 * 37, 1), random(13 * 37, 2), random(9 * 13, 3));
        check(p, "linear forward", &x, &w, 9 * 13, |be, x, w, y| be.linear_forward(x, w, None, y, l));
        check(p, "linear backward data", &dy, &w, 9 * 37, |be, dy, w, dx| be.linear_backward_data(dy, w, dx, l));
        check(p, "linear backward weight", &dy, &x, 13 * 37, |be, dy, x, dw| be.linear_backward_weight(dy, x, dw, l));

        let d = Conv2dDims::new(2, 5, 9, 9, 7, 3, 3, 2, 1);
        let (x, w, dy) = (random(d.x_len(), 4), random(d.w_len(), 5), random(d.y_len(), 6));
        check(p, "conv forward", &x, &w, d.y_len(), |be, x, w, y| be.conv2d_forward(x, w, None, y, d));
        check(p, "conv backward data", &dy, &w, d.x_len(), |be, dy, w, dx| be.conv2d_backward_data(dy, w, dx, d));
        check(p, "conv backward weight", &dy, &x, d.w_len(), |be, dy, x, dw| be.conv2d_backward_weight(dy, x, dw, d));
    }
    assert_eq!(Cpu::<f32>::with_precision(Precision::Bf16).precision(), Precision::Bf16);
    assert!(Cpu::<f32>::with_precision(Precision::Tf32).describe().contains("rounded to tf32"));
}
