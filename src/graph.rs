//! Steps recorded once and replayed. A training step (or an evaluation batch) makes the same
//! launches with the same arguments every time its shapes come again, so on CUDA it is
//! captured as one CUDA graph the second time in a row a shape comes, and replayed from then
//! on: the host issues one `cuGraphLaunch` where it issued about a hundred launches, memsets
//! and copies (the model in `src/model/` prices both). `--no-graph` runs every step eagerly.
//!
//! What changes from one step to the next must not be baked into the graph's nodes:
//! - the batch and its noise: copied into the graph's own input buffers before each replay
//!   (two device-to-device copies; the graph reads its inputs at the same addresses every
//!   time);
//! - Adam's constants, which change every step with the bias corrections: staged in device
//!   memory before the replay ([`Backend::stage_adam`]);
//! - everything else a step passes by value (shapes, the KL weight) is part of the [`Key`], so
//!   a step under a KL warm-up, whose weight changes every step, simply runs eagerly.
//!
//! A graph replays exactly the launches of the step it recorded, with the same arguments, so
//! graph and eager runs give bitwise-equal results (tests/gpu_vs_cpu.rs checks it on the
//! emulated device). The first step of a shape runs eagerly: it creates the gradient buffers
//! and fills the memory pool, so the capture, which may not allocate, finds every buffer it
//! needs; the graph then owns that memory (see `backend::cuda::pool`).

use crate::backend::Backend;
use crate::tensor::Tensor;

/// What decides whether a captured graph can serve a step: its kind and everything the step
/// bakes into its launches.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    what: &'static str,
    shapes: Vec<Vec<usize>>,
    scalars: Vec<u64>,
}

impl Key {
    /// The key of a `what` step on inputs of `shapes`, with the values it passes by value
    /// (as bits, so NaN equals NaN and a graph is never served a different weight).
    pub fn new(what: &'static str, shapes: &[&[usize]], scalars: &[f64]) -> Self {
        Key {
            what,
            shapes: shapes.iter().map(|s| s.to_vec()).collect(),
            scalars: scalars.iter().map(|v| v.to_bits()).collect(),
        }
    }
}

/// A step's output buffer, and its input tensors handed back (see [`Replayer::run`]).
pub type Ran<B> = (<B as Backend>::Buf, Vec<Tensor<B>>);

struct Captured<B: Backend> {
    graph: B::Graph,
    /// The buffers the graph reads its inputs from.
    inputs: Vec<Tensor<B>>,
    /// The buffer it writes its output to.
    output: B::Buf,
}

/// Runs a step eagerly, or captures it, or replays its graph (see the module doc).
pub struct Replayer<B: Backend> {
    last: Option<Key>,
    /// Oldest first; at most [`Replayer::MAX_GRAPHS`].
    captured: Vec<(Key, Captured<B>)>,
}

impl<B: Backend> Default for Replayer<B> {
    fn default() -> Self {
        Replayer { last: None, captured: vec![] }
    }
}

/// Runs `work` once, reads its output back and hands the tensors back to the backend's pool:
/// the inputs `work` returns would otherwise be freed, and the pool would be one input
/// short in the next step, which allocated it afresh (`vae bench`'s new buffers per step).
fn eagerly<B: Backend>(be: &B, work: impl FnOnce(Vec<Tensor<B>>) -> Ran<B>, inputs: Vec<Tensor<B>>) -> Vec<B::E> {
    let (output, inputs) = work(inputs);
    let host = be.download(&output);
    for buf in inputs.into_iter().map(|t| t.buf).chain([output]) {
        be.recycle(buf);
    }
    host
}

impl<B: Backend> Replayer<B> {
    /// Graphs kept at once (each owns a step's worth of device memory): a run's full batch,
    /// its ragged last batch and an evaluation shape or two. Past that the oldest is dropped.
    pub const MAX_GRAPHS: usize = 4;

    /// Runs `work` on `inputs` and returns its output, read back to the host. `work` must
    /// hand its input tensors back (with [`crate::Tape::take_value`]) and must not copy from
    /// or to the host; `stage` puts what changes every step into device memory and runs
    /// before a captured or replayed step.
    pub fn run(
        &mut self,
        be: &B,
        key: Key,
        inputs: Vec<Tensor<B>>,
        stage: impl FnOnce(),
        work: impl FnOnce(Vec<Tensor<B>>) -> Ran<B>,
    ) -> Vec<B::E> {
        if !be.graphs() {
            return eagerly(be, work, inputs);
        }
        if let Some((_, c)) = self.captured.iter_mut().find(|(k, _)| *k == key) {
            for (dst, src) in c.inputs.iter_mut().zip(&inputs) {
                be.copy(&src.buf, &mut dst.buf);
            }
            drop(inputs);
            stage();
            be.replay(&c.graph);
            self.last = Some(key);
            return be.download(&c.output);
        }
        if self.last.as_ref() != Some(&key) {
            self.last = Some(key);
            return eagerly(be, work, inputs);
        }
        stage();
        be.begin_capture();
        let (output, inputs) = work(inputs);
        let graph = be.end_capture();
        // Capturing recorded the work without running it.
        be.replay(&graph);
        let host = be.download(&output);
        if self.captured.len() == Self::MAX_GRAPHS {
            self.captured.remove(0);
        }
        self.captured.push((key, Captured { graph, inputs, output }));
        host
    }

    /// The graphs held now.
    pub fn graphs(&self) -> usize {
        self.captured.len()
    }
}
