//! The autograd tape, micrograd-style: every op pushes its output values and a closure that,
//! given the gradients of those outputs, adds into the gradients of its inputs. `backward` runs
//! the closures once, in reverse. Nothing else lives here.
//!
//! Parameters are not on the tape: they live in a [`ParamStore`] that the tape borrows for one
//! step, so the optimizer can update them once the tape is dropped. Dropping the tape frees
//! every activation of the step, so each step starts clean.

use crate::backend::Backend;
use crate::tensor::{numel, Float, Tensor};

/// A handle to a value: an activation on the tape, or a parameter in the store.
///
/// A `Var` is a plain index, cheap to copy into backward closures; the tensor it names is read
/// through [`Tape::value`] (or [`BackwardCtx::value`] during backward).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Var {
    /// The i-th tensor recorded on this tape (an input or an op's output); valid only for the
    /// tape that made it.
    Value(usize),
    /// Entry i of the [`ParamStore`] the tape borrows (a [`ParamId`]).
    Param(usize),
}

/// Index of a named tensor in a [`ParamStore`], in the order [`ParamStore::add`] was called.
/// Layers ([`crate::nn::layers`]) hold these; [`Tape::param`] turns one into a [`Var`].
pub type ParamId = usize;

/// Named tensors: trainable parameters and non-trainable state (batch-norm running statistics).
/// Names are those of the PyTorch `state_dict`, so they double as checkpoint tensor names.
///
/// The four vectors are parallel, indexed by [`ParamId`].
pub struct ParamStore<B: Backend> {
    /// `state_dict` key of each entry (`fc1.weight`, `encoder.0.1.running_var`, ...).
    pub names: Vec<String>,
    /// The tensors themselves, in the layouts PyTorch uses (`nn.Linear` weights `[out, in]`,
    /// convolution weights `[c_out, c_in, kh, kw]`).
    pub values: Vec<Tensor<B>>,
    /// The gradient of each trainable entry, same shape as its value: `None` until a backward
    /// first reaches it, then kept (and zeroed by [`ParamStore::zero_grads`]) from step to step.
    /// [`crate::optim::Adam`] reads them.
    pub grads: Vec<Option<Tensor<B>>>,
    /// Whether the entry is learned (weights, biases, batch-norm γ and β) or only state the
    /// forward pass updates (running statistics): backward and Adam skip the latter.
    pub trainable: Vec<bool>,
    /// Integer state kept on the host (batch norm's `num_batches_tracked`), by name.
    pub counters: std::collections::BTreeMap<String, u64>,
}

impl<B: Backend> Default for ParamStore<B> {
    fn default() -> Self {
        ParamStore { names: vec![], values: vec![], grads: vec![], trainable: vec![], counters: Default::default() }
    }
}

impl<B: Backend> ParamStore<B> {
    /// Appends a named tensor and returns its id; panics if `name` is already taken.
    pub fn add(&mut self, name: &str, value: Tensor<B>, trainable: bool) -> ParamId {
        assert!(self.find(name).is_none(), "duplicate parameter name {name}");
        self.names.push(name.to_string());
        self.values.push(value);
        self.grads.push(None);
        self.trainable.push(trainable);
        self.names.len() - 1
    }
    /// The id of the entry called `name` (a linear search: for loading checkpoints, not for
    /// the training loop).
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.names.iter().position(|n| n == name)
    }
    /// Number of entries, trainable or not.
    pub fn len(&self) -> usize {
        self.names.len()
    }
    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        (0..self.len()).filter(|&i| self.trainable[i]).map(|i| self.values[i].numel()).sum()
    }
    /// Gives every trainable entry without a gradient a zeroed one, so that every step, the
    /// first included, zeroes and updates the same buffers (what a step captured as a CUDA
    /// graph needs: its first, eager, run then leaves nothing new for the capture to upload).
    pub fn create_grads(&mut self, backend: &B) {
        for i in 0..self.len() {
            if self.trainable[i] && self.grads[i].is_none() {
                let shape = self.values[i].shape.clone();
                self.grads[i] = Some(Tensor { buf: backend.zeros(numel(&shape)), shape });
            }
        }
    }
    /// Sets every existing gradient to zero (buffers are kept, so a step allocates nothing).
    pub fn zero_grads(&mut self, backend: &B) {
        let mut bufs: Vec<&mut B::Buf> = self.grads.iter_mut().flatten().map(|g| &mut g.buf).collect();
        backend.zero_all(&mut bufs);
    }
}

type BackwardFn<B> = Box<dyn FnOnce(&mut BackwardCtx<'_, B>, &[Option<Tensor<B>>])>;

struct Node<B: Backend> {
    outputs: Vec<usize>,
    backward: BackwardFn<B>,
}

/// What a backward closure sees: values (read-only) and gradient slots (created zeroed on
/// first use, so closures always accumulate).
pub struct BackwardCtx<'a, B: Backend> {
    /// The tape's backend, for the backward methods a closure calls.
    pub backend: &'a B,
    values: &'a [Tensor<B>],
    param_values: &'a [Tensor<B>],
    grads: &'a mut [Option<Tensor<B>>],
    param_grads: &'a mut [Option<Tensor<B>>],
    needs_grad: &'a [bool],
    trainable: &'a [bool],
}

impl<'a, B: Backend> BackwardCtx<'a, B> {
    /// The forward value of `v` (an activation kept on the tape, or a parameter).
    pub fn value(&self, v: Var) -> &'a Tensor<B> {
        match v {
            Var::Value(i) => &self.values[i],
            Var::Param(i) => &self.param_values[i],
        }
    }
    /// The gradient slot of `v`, or `None` when nobody asked for that gradient.
    pub fn grad(&mut self, v: Var) -> Option<&mut Tensor<B>> {
        let (slot, shape) = match v {
            Var::Value(i) if self.needs_grad[i] => (&mut self.grads[i], &self.values[i].shape),
            Var::Param(i) if self.trainable[i] => (&mut self.param_grads[i], &self.param_values[i].shape),
            _ => return None,
        };
        let backend = self.backend;
        Some(slot.get_or_insert_with(|| Tensor::zeros(backend, shape)))
    }
    /// The gradient slots of several distinct vars at once, for an op whose backward writes
    /// them in one call (batch norm's dx, dγ, dβ). Panics if a var is asked for twice: two
    /// `&mut` to one slot cannot exist.
    pub fn grads<const N: usize>(&mut self, vars: [Var; N]) -> [Option<&mut Tensor<B>>; N] {
        for (k, v) in vars.iter().enumerate() {
            assert!(!vars[..k].contains(v), "BackwardCtx::grads: {v:?} is asked for twice");
        }
        // Create the slots first, then lend them in one pass over each store: `iter_mut`
        // hands out disjoint borrows, so no unsafe code is needed.
        let wanted = vars.map(|v| self.grad(v).is_some());
        let mut lent = std::array::from_fn(|_| None);
        let values = self.grads.iter_mut().enumerate().map(|(i, g)| (Var::Value(i), g));
        let params = self.param_grads.iter_mut().enumerate().map(|(i, g)| (Var::Param(i), g));
        for (v, slot) in values.chain(params) {
            if let Some(k) = vars.iter().position(|&w| w == v).filter(|&k| wanted[k]) {
                lent[k] = slot.as_mut();
            }
        }
        lent
    }
}

/// The record of one forward pass, for one step: the tensors it made ([`Var::Value`]), the
/// backward closure of every op ([`Tape::record`]), and a borrow of the [`ParamStore`] whose
/// parameters the ops read ([`Var::Param`]). Made per step by [`crate::train::Trainer::step`]
/// ([`Tape::new`]) or per evaluation ([`Tape::no_grad`]); dropping it recycles its buffers.
pub struct Tape<'p, B: Backend> {
    /// The backend every op on this tape runs on (a cheap clone of the caller's).
    pub backend: B,
    /// The parameters and running statistics, borrowed for the step; batch norm updates its
    /// running statistics here during the forward pass.
    pub params: &'p mut ParamStore<B>,
    values: Vec<Tensor<B>>,
    needs_grad: Vec<bool>,
    grads: Vec<Option<Tensor<B>>>,
    nodes: Vec<Node<B>>,
    grad_enabled: bool,
    /// Training mode (batch norm uses batch statistics and updates running ones).
    pub training: bool,
}

impl<'p, B: Backend> Tape<'p, B> {
    /// A tape that records for backward; `training` selects batch-norm behaviour.
    pub fn new(backend: &B, params: &'p mut ParamStore<B>, training: bool) -> Self {
        Tape {
            backend: backend.clone(),
            params,
            values: vec![],
            needs_grad: vec![],
            grads: vec![],
            nodes: vec![],
            grad_enabled: true,
            training,
        }
    }
    /// Evaluation: eval-mode batch norm, and no backward closures are recorded.
    pub fn no_grad(backend: &B, params: &'p mut ParamStore<B>) -> Self {
        let mut t = Self::new(backend, params, false);
        t.grad_enabled = false;
        t
    }

    /// The [`Var`] of parameter `id`, to pass to ops (no copy is made).
    pub fn param(&self, id: ParamId) -> Var {
        Var::Param(id)
    }
    /// A data input; no gradient is computed for it.
    pub fn input(&mut self, t: Tensor<B>) -> Var {
        self.push_value(t, false)
    }
    /// An input whose gradient `backward` fills (read it with [`Tape::grad`]).
    pub fn input_with_grad(&mut self, t: Tensor<B>) -> Var {
        let g = self.grad_enabled;
        self.push_value(t, g)
    }
    fn push_value(&mut self, t: Tensor<B>, needs_grad: bool) -> Var {
        self.values.push(t);
        self.needs_grad.push(needs_grad);
        self.grads.push(None);
        Var::Value(self.values.len() - 1)
    }

    /// Moves recorded value `v` out of the tape, leaving an empty tensor in its place: for a
    /// caller that keeps an input's buffer after the tape is gone (a captured graph reads its
    /// inputs there on every replay). Call it last: nothing may read `v` afterwards.
    pub fn take_value(&mut self, v: Var) -> Tensor<B> {
        let Var::Value(i) = v else { panic!("take_value takes a recorded value, not a parameter") };
        std::mem::replace(&mut self.values[i], Tensor { shape: vec![0], buf: self.backend.empty(0) })
    }

    /// The tensor `v` names: a recorded value or a parameter.
    pub fn value(&self, v: Var) -> &Tensor<B> {
        match v {
            Var::Value(i) => &self.values[i],
            Var::Param(i) => &self.params.values[i],
        }
    }
    /// Values to read and parameters to update in one call (batch norm reads x, γ and β while
    /// it updates its running statistics). Panics if a parameter is both read and updated, or
    /// updated twice.
    pub fn values_and_params_mut<const R: usize, const W: usize>(
        &mut self,
        read: [Var; R],
        write: [ParamId; W],
    ) -> ([&Tensor<B>; R], [&mut Tensor<B>; W]) {
        let mut reads: [Option<&Tensor<B>>; R] = [None; R];
        let mut writes: [Option<&mut Tensor<B>>; W] = std::array::from_fn(|_| None);
        for (r, v) in reads.iter_mut().zip(read) {
            if let Var::Value(i) = v {
                *r = Some(&self.values[i]);
            }
        }
        // One pass over the store: each parameter is lent either mutably or shared, never both.
        for (i, t) in self.params.values.iter_mut().enumerate() {
            if let Some(k) = write.iter().position(|&w| w == i) {
                assert!(!read.contains(&Var::Param(i)), "parameter {i} is both read and updated");
                writes[k] = Some(t);
            } else {
                let t: &Tensor<B> = t;
                reads.iter_mut().zip(read).filter(|(_, v)| *v == Var::Param(i)).for_each(|(r, _)| *r = Some(t));
            }
        }
        (
            reads.map(|r| r.expect("read a parameter that does not exist")),
            writes.map(|w| w.expect("a parameter to update is missing or named twice")),
        )
    }
    /// The shape of `v`, which ops check and derive their dims from.
    pub fn shape(&self, v: Var) -> &[usize] {
        &self.value(v).shape
    }
    /// The values of `v` copied to the host (how a step reads its loss).
    pub fn to_host(&self, v: Var) -> Vec<B::E> {
        self.value(v).to_host(&self.backend)
    }
    /// Whether backward will compute a gradient for `v`: a value recorded as needing one (an
    /// [`Tape::input_with_grad`], or an op output with such an input), or a trainable parameter
    /// while gradients are enabled. [`Tape::record`] keeps a closure only if an input answers yes.
    pub fn requires_grad(&self, v: Var) -> bool {
        match v {
            Var::Value(i) => self.needs_grad[i],
            Var::Param(i) => self.grad_enabled && self.params.trainable[i],
        }
    }
    /// The handle the next recorded output will get, so a backward closure can read its own
    /// output (sigmoid's derivative is written in terms of y).
    pub fn next_var(&self) -> Var {
        Var::Value(self.values.len())
    }
    /// Elements held by the tape's values (inputs and activations, not parameters): what a
    /// forward pass keeps alive until the step ends, and what its gradients will double.
    pub fn value_elements(&self) -> usize {
        self.values.iter().map(Tensor::numel).sum()
    }
    /// Number of recorded backward closures (0 under `no_grad`).
    pub fn recorded(&self) -> usize {
        self.nodes.len()
    }

    /// Records an op: its output tensors and the closure that propagates their gradients.
    /// The closure is dropped unread when no input needs a gradient.
    pub fn record(
        &mut self,
        inputs: &[Var],
        outputs: Vec<Tensor<B>>,
        backward: impl FnOnce(&mut BackwardCtx<'_, B>, &[Option<Tensor<B>>]) + 'static,
    ) -> Vec<Var> {
        let needs = self.grad_enabled && inputs.iter().any(|&v| self.requires_grad(v));
        let vars: Vec<Var> = outputs.into_iter().map(|t| self.push_value(t, needs)).collect();
        if needs {
            let outputs = vars.iter().map(|v| if let Var::Value(i) = v { *i } else { unreachable!() }).collect();
            self.nodes.push(Node { outputs, backward: Box::new(backward) });
        }
        vars
    }
    /// `record` for the common single-output op.
    pub fn record1(
        &mut self,
        inputs: &[Var],
        output: Tensor<B>,
        backward: impl FnOnce(&mut BackwardCtx<'_, B>, &Tensor<B>) + 'static,
    ) -> Var {
        self.record(inputs, vec![output], move |ctx, g| {
            if let Some(dy) = &g[0] {
                backward(ctx, dy)
            }
        })[0]
    }

    /// Fills the gradient of every trainable parameter (accumulating into the store's
    /// gradient buffers) and of every input that asked, from a scalar `loss`.
    pub fn backward(&mut self, loss: Var) {
        let Var::Value(li) = loss else { panic!("backward needs a computed loss, not a parameter") };
        assert_eq!(numel(&self.values[li].shape), 1, "backward needs a scalar loss");
        assert!(self.needs_grad[li], "the loss does not depend on anything that needs a gradient");
        // d loss / d loss = 1, filled on the device: a copy from the host could not be part
        // of a step captured as a CUDA graph.
        let mut seed = Tensor { shape: vec![1], buf: self.backend.empty(1) };
        self.backend.fill(&mut seed.buf, B::E::of(1.0));
        self.grads[li] = Some(seed);
        let nodes = std::mem::take(&mut self.nodes);
        let mut ctx = BackwardCtx {
            backend: &self.backend,
            values: &self.values,
            param_values: &self.params.values,
            grads: &mut self.grads,
            param_grads: &mut self.params.grads,
            needs_grad: &self.needs_grad,
            trainable: &self.params.trainable,
        };
        for node in nodes.into_iter().rev() {
            let out_grads: Vec<Option<Tensor<B>>> = node.outputs.iter().map(|&i| ctx.grads[i].take()).collect();
            if out_grads.iter().any(Option::is_some) {
                (node.backward)(&mut ctx, &out_grads);
            }
            for g in out_grads.into_iter().flatten() {
                ctx.backend.recycle(g.buf);
            }
        }
    }
    /// Gradient of an input recorded with [`Tape::input_with_grad`], after `backward`.
    pub fn grad(&self, v: Var) -> Option<&Tensor<B>> {
        match v {
            Var::Value(i) => self.grads[i].as_ref(),
            Var::Param(i) => self.params.grads[i].as_ref(),
        }
    }
}

/// A finished step hands its activations and leftover gradients back to the backend, which
/// may reuse them for the next step (the CPU backend keeps a pool; see `Backend::recycle`).
impl<B: Backend> Drop for Tape<'_, B> {
    fn drop(&mut self) {
        for t in self.values.drain(..) {
            self.backend.recycle(t.buf);
        }
        for t in self.grads.drain(..).flatten() {
            self.backend.recycle(t.buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    /// A context over two activations that need gradients, one that does not, and one
    /// trainable parameter; `f` runs inside it.
    fn with_ctx(f: impl FnOnce(&mut BackwardCtx<'_, Cpu<f64>>)) {
        let be = Cpu::<f64>::default();
        let values: Vec<Tensor<Cpu<f64>>> = [1, 2, 3].iter().map(|&n| Tensor::zeros(&be, &[n])).collect();
        let param_values = vec![Tensor::zeros(&be, &[4])];
        let (mut grads, mut param_grads) = (vec![None, None, None], vec![None]);
        f(&mut BackwardCtx {
            backend: &be,
            values: &values,
            param_values: &param_values,
            grads: &mut grads,
            param_grads: &mut param_grads,
            needs_grad: &[true, true, false],
            trainable: &[true],
        });
    }

    #[test]
    fn grads_lends_distinct_slots_together() {
        with_ctx(|ctx| {
            let [a, p, none, b] = ctx.grads([Var::Value(1), Var::Param(0), Var::Value(2), Var::Value(0)]);
            let (a, p, b) = (a.unwrap(), p.unwrap(), b.unwrap());
            assert!(none.is_none(), "a var that needs no gradient gets no slot");
            assert_eq!((a.shape.as_slice(), p.shape.as_slice(), b.shape.as_slice()), (&[2][..], &[4][..], &[1][..]));
            // Both are writable at once, and the writes land in the right slots.
            a.buf[1] = 5.0;
            b.buf[0] = 7.0;
        });
        with_ctx(|ctx| {
            ctx.grads([Var::Value(1), Var::Value(0)])[0].as_mut().unwrap().buf[1] = 5.0;
            assert_eq!(ctx.grad(Var::Value(1)).unwrap().buf, [0.0, 5.0]);
        });
    }

    #[test]
    #[should_panic(expected = "asked for twice")]
    fn grads_refuses_a_var_twice() {
        with_ctx(|ctx| {
            ctx.grads([Var::Value(0), Var::Param(0), Var::Value(0)]);
        });
    }

    /// A store of three parameters [1], [2], [3] and a tape with one [4] input.
    fn with_tape(f: impl FnOnce(&mut Tape<'_, Cpu<f64>>, Var)) {
        let be = Cpu::<f64>::default();
        let mut store = ParamStore::default();
        for (k, n) in [1, 2, 3].into_iter().enumerate() {
            store.add(&format!("p{k}"), Tensor::zeros(&be, &[n]), false);
        }
        let mut tape = Tape::new(&be, &mut store, true);
        let x = tape.input(Tensor::zeros(&be, &[4]));
        f(&mut tape, x)
    }

    #[test]
    fn values_and_params_mut_reads_and_updates_together() {
        with_tape(|tape, x| {
            let ([xv, p0, p2], [p1]) = tape.values_and_params_mut([x, Var::Param(0), Var::Param(2)], [1]);
            assert_eq!((xv.shape[0], p0.shape[0], p2.shape[0]), (4, 1, 3));
            p1.buf[1] = 5.0;
            assert_eq!(tape.params.values[1].buf, [0.0, 5.0]);
        });
    }

    #[test]
    #[should_panic(expected = "both read and updated")]
    fn values_and_params_mut_refuses_to_read_what_it_updates() {
        with_tape(|tape, x| {
            tape.values_and_params_mut([x, Var::Param(1)], [1]);
        });
    }
}
