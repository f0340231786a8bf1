//! `reparam_kl`: the VAE's fused sampling step. From mu, logvar and standard-normal noise eps
//! (all [n, z]) it produces both
//!   z  = mu + eps·exp(logvar/2)                      (the reparameterization trick), and
//!   kl = −0.5·Σ(1 + logvar − mu² − exp(logvar))      (KL(q(z|x) ‖ N(0, I)), summed over all),
//! so one kernel reads mu and logvar once. Backward from both outputs:
//!   dmu     = dz + dkl·mu
//!   dlogvar = dz·eps·exp(logvar/2)/2 + dkl·(exp(logvar) − 1)/2

use rayon::prelude::*;

use crate::backend::Backend;
use crate::ops::elementwise::cpu_reduce;
use crate::ops::PAR_MIN;
use crate::tape::{Tape, Var};
use crate::tensor::{Float, Tensor};

// ---- CPU reference ----

/// Writes `z[i] = mu[i] + eps[i]·exp(logvar[i]/2)` and returns the KL summed over every
/// element (all images and latent dimensions), accumulated in f64.
pub fn cpu_forward<E: Float>(mu: &[E], logvar: &[E], eps: &[E], z: &mut [E]) -> E {
    z.par_iter_mut()
        .with_min_len(PAR_MIN)
        .enumerate()
        .for_each(|(i, z)| *z = mu[i] + eps[i] * (logvar[i] * E::of(0.5)).exp());
    let s = cpu_reduce(mu.len(), |i| {
        let (m, lv) = (mu[i].f64(), logvar[i].f64());
        1.0 + lv - m * m - lv.exp()
    });
    E::of(-0.5 * s)
}

/// Adds into `dmu` and `dlogvar` (each only if asked for) the gradients from `dz` (per
/// element, when z's gradient exists) and from `dkl` (the scalar gradient of the KL output);
/// the formulas are in the module doc.
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward<E: Float>(
    mu: &[E],
    logvar: &[E],
    eps: &[E],
    dz: Option<&[E]>,
    dkl: Option<E>,
    dmu: Option<&mut [E]>,
    dlogvar: Option<&mut [E]>,
) {
    let half = E::of(0.5);
    let dkl = dkl.unwrap_or(E::zero());
    if let Some(dmu) = dmu {
        for i in 0..mu.len() {
            dmu[i] += dz.map_or(E::zero(), |d| d[i]) + dkl * mu[i];
        }
    }
    if let Some(dlv) = dlogvar {
        for i in 0..mu.len() {
            let from_z = dz.map_or(E::zero(), |d| d[i] * eps[i] * (logvar[i] * half).exp() * half);
            dlv[i] += from_z + dkl * half * (logvar[i].exp() - E::one());
        }
    }
}

// ---- on the tape ----

/// Samples z and computes the KL term in one op. mu, logvar and eps are `[n, z]` (eps drawn
/// from N(0, 1) by the caller, e.g. [`crate::train::Trainer::draw_noise`]). Returns
/// (z `[n, z]`, kl `[1]`), the KL summed over the batch and the latent dimensions, in nats.
/// Gradients flow to mu and logvar from both outputs; eps is noise and gets none.
pub fn reparam_kl<B: Backend>(tape: &mut Tape<B>, mu: Var, logvar: Var, eps: Var) -> (Var, Var) {
    let s = tape.shape(mu).to_vec();
    assert!(tape.shape(logvar) == s && tape.shape(eps) == s, "reparam_kl: mu, logvar and eps must have one shape");
    let mut z = Tensor::empty(&tape.backend, &s);
    let mut kl = Tensor::zeros(&tape.backend, &[1]);
    tape.backend.reparam_kl_forward(
        &tape.value(mu).buf,
        &tape.value(logvar).buf,
        &tape.value(eps).buf,
        &mut z.buf,
        &mut kl.buf,
    );
    let out = tape.record(&[mu, logvar], vec![z, kl], move |ctx, g| {
        let be = ctx.backend;
        let (m, lv, e) = (ctx.value(mu), ctx.value(logvar), ctx.value(eps));
        let (dz, dkl) = (g[0].as_ref().map(|t| &t.buf), g[1].as_ref().map(|t| &t.buf));
        let [dmu, dlv] = ctx.grads([mu, logvar]);
        be.reparam_kl_backward(&m.buf, &lv.buf, &e.buf, dz, dkl, dmu.map(|t| &mut t.buf), dlv.map(|t| &mut t.buf));
    });
    (out[0], out[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_by_hand() {
        // mu = [1, 0], logvar = [0, ln 4], eps = [2, -1]:
        // z = [1 + 2·1, 0 − 1·2] = [3, −2]
        // kl = −0.5·[(1 + 0 − 1 − 1) + (1 + ln 4 − 0 − 4)] = −0.5·(−1 − 3 + ln 4) = 2 − ln 2
        let mut z = [f64::NAN; 2];
        let kl = cpu_forward(&[1.0, 0.0], &[0.0, 4f64.ln()], &[2.0, -1.0], &mut z);
        assert!((z[0] - 3.0).abs() < 1e-15 && (z[1] + 2.0).abs() < 1e-15);
        assert!((kl - (2.0 - 2f64.ln())).abs() < 1e-15);
    }
}
