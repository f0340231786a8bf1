//! t-SNE of latent means to 2-D, through the `bhtsne` crate's Barnes-Hut fit
//! (vantage-point-tree neighbours, θ = 0.5), run on one thread so that it is reproducible. We
//! seed the initial layout from our own RNG so that `--seed` decides the picture, and report
//! each iteration to a callback (the progress bar).

use crate::rng::Rng;

/// t-SNE settings.
#[derive(Clone, Copy, Debug)]
pub struct TsneOptions {
    /// Effective number of neighbours (5–50 is usual); needs n > 3·perplexity.
    pub perplexity: f64,
    /// Gradient-descent iterations (the first 250 with early exaggeration).
    pub iterations: usize,
    /// Seed of the initial layout.
    pub seed: u64,
    /// Barnes-Hut accuracy: 0 is exact and slow, 0.5 the usual trade-off.
    pub theta: f64,
}

impl Default for TsneOptions {
    fn default() -> Self {
        TsneOptions { perplexity: 30.0, iterations: 1000, seed: 0, theta: 0.5 }
    }
}

fn euclidean(a: &&[f32], b: &&[f32]) -> f32 {
    a.iter().zip(b.iter()).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
}

/// Embeds `n` points of `dim` coordinates (row-major) in 2-D; `progress(iteration)` is called
/// after each iteration. The largest perplexity the data allows is used when `perplexity` is
/// too large for `n`.
pub fn tsne2(data: &[f64], n: usize, dim: usize, o: TsneOptions, progress: impl FnMut(usize) + Send) -> Vec<[f64; 2]> {
    assert_eq!(data.len(), n * dim, "tsne2: data is not n × dim");
    if n < 4 {
        // Too few points for neighbourhoods: a line is as good a map as any.
        return (0..n).map(|i| [i as f64, 0.0]).collect();
    }
    let x: Vec<f32> = data.iter().map(|&v| v as f32).collect();
    let rows: Vec<&[f32]> = x.chunks(dim).collect();
    let mut rng = Rng::new(o.seed);
    // The usual initialisation: N(0, 1e-4 I).
    let init: Vec<f32> = (0..2 * n).map(|_| (1e-2 * rng.normal()) as f32).collect();
    let perplexity = o.perplexity.min((n - 1) as f64 / 3.0).max(1.0) as f32;
    let mut progress = progress;
    let fit = move || {
        let mut t: bhtsne::tSNE<f32, &[f32]> = bhtsne::tSNE::new(&rows);
        t.perplexity(perplexity)
            .epochs(o.iterations.max(1))
            .initial_embedding(init)
            .epoch_callback(move |e, _| progress(e + 1))
            .barnes_hut(o.theta.max(1e-3) as f32, euclidean);
        t.embedding()
    };
    // bhtsne's parallel sums split work as rayon's threads steal it, so their rounding (and
    // the map) would change from run to run; one thread makes a seed give one map.
    let y = match rayon::ThreadPoolBuilder::new().num_threads(1).stack_size(8 << 20).build() {
        Ok(pool) => pool.install(fit),
        Err(_) => fit(),
    };
    y.chunks(2).map(|p| [p[0] as f64, p[1] as f64]).collect()
}

/// Leave-one-out k-nearest-neighbour accuracy of labelled 2-D points (brute force): how
/// well an embedding keeps classes apart.
pub fn knn_accuracy(points: &[[f64; 2]], labels: &[usize], k: usize) -> f64 {
    let n = points.len();
    let mut right = 0;
    for i in 0..n {
        let mut d: Vec<(f64, usize)> = (0..n)
            .filter(|&j| j != i)
            .map(|j| ((points[i][0] - points[j][0]).powi(2) + (points[i][1] - points[j][1]).powi(2), labels[j]))
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut votes = std::collections::HashMap::new();
        for &(_, l) in d.iter().take(k) {
            *votes.entry(l).or_insert(0) += 1;
        }
        let best = votes.into_iter().max_by_key(|&(l, v)| (v, std::cmp::Reverse(l))).map(|(l, _)| l);
        right += usize::from(best == Some(labels[i]));
    }
    right as f64 / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separated_clusters_stay_apart() {
        // Five Gaussian clusters in 10-D, centres 10 apart, unit spread.
        let (n, dim, k) = (500, 10, 5);
        let mut rng = Rng::new(7);
        let centres: Vec<Vec<f64>> = (0..k).map(|_| (0..dim).map(|_| rng.uniform(-10.0, 10.0)).collect()).collect();
        let labels: Vec<usize> = (0..n).map(|i| i % k).collect();
        let data: Vec<f64> =
            labels.iter().flat_map(|&l| centres[l].iter().map(|c| c + rng.normal()).collect::<Vec<_>>()).collect();
        let mut last = 0;
        let o = TsneOptions { iterations: 500, ..Default::default() };
        let y = tsne2(&data, n, dim, o, |e| last = e);
        assert_eq!(last, 500);
        assert!(y.iter().all(|p| p[0].is_finite() && p[1].is_finite()));
        let acc = knn_accuracy(&y, &labels, 10);
        assert!(acc >= 0.95, "kNN accuracy of the embedding {acc}");
    }
}
