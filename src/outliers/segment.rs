//! Sequential calibration in one forward pass: the graph (in topological order) is cut before
//! each layer to regularize, and each piece runs on all samples as its own small model whose
//! inputs are the cached *frontier* of the previous pieces. After a layer's statistics are
//! folded its weights may change, and the next piece (which starts with that layer's node)
//! sees the new weights. Every node therefore runs once per sample, instead of once per
//! layer as re-running the whole model after each change would.
//!
//! Frontier rules: a tensor crossing a cut is cached when it depends on the graph inputs and
//! is (statically inferred to be) float; integer/boolean tensors (shapes, masks, indices) and
//! constant-only tensors are recomputed instead, by pulling their producing nodes into the
//! piece that needs them, so tract still sees constant shapes. Graph inputs are fed from the
//! samples to every piece that reads them.
//!
//! Besides the tensor a layer reads, each piece can hand out *collected* tensors (those among
//! a given list that the piece's own nodes produce), so that calibration statistics of the
//! edited model are gathered in the same pass; [`Segmenter::finish`] runs the rest of the
//! graph after the last layer for them. A collected tensor is read in the runtime's buffer
//! (a `stat` closure, no copy); only the cached frontier, the layer's input and output are
//! copied out. A piece can run *through* its layer and hand over the layer's output: then
//! either the next piece runs that node again, with the weights it has by then
//! ([`Through::Rerun`]), or the output is cached as it is and the next piece starts after
//! the node ([`Through::Keep`]); the caller brings the cached output up to date with
//! [`Segmenter::update_cached`] when it changes the node's weights.
//!
//! Samples run in parallel without barriers ([`crate::calibrate::for_each_index`]): the worker
//! that runs a sample also brings that sample's cache up to date (a cached tensor no later
//! piece reads is moved into the runtime, not copied), and the mapped results are folded in
//! sample order.

use crate::array::{dtype, ArrayData};
use crate::calibrate::progress;
use crate::data::{InputSpec, SampleSet};
use crate::onnx::attr::NodeAttrs;
use crate::onnx::builder::value_info;
use crate::onnx::pb::{GraphProto, ModelProto, NodeProto};
use crate::onnx::GraphView;
use crate::runtime::{InputFact, Plan};
use anyhow::{bail, Context, Result};
use ndarray::ArrayViewD;
use rayon::prelude::*;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

/// Static element-type inference (0 = unknown, treated as float).
struct Types<'a> {
    view: &'a GraphView<'a>,
    memo: HashMap<String, i32>,
}

impl<'a> Types<'a> {
    fn new(view: &'a GraphView<'a>) -> Self {
        Types { view, memo: HashMap::new() }
    }

    fn of(&mut self, name: &str) -> i32 {
        if let Some(&t) = self.memo.get(name) {
            return t;
        }
        // Guard against cycles (invalid graphs) while recursing.
        self.memo.insert(name.to_string(), 0);
        let declared = self.view.elem_type(name);
        let t = if declared != 0 { declared } else { self.infer(name) };
        self.memo.insert(name.to_string(), t);
        t
    }

    fn infer(&mut self, name: &str) -> i32 {
        let view = self.view;
        let Some(crate::onnx::graph::Origin::Node { node, slot }) = view.origin(name) else { return 0 };
        let n = &view.nodes()[node];
        let first = |s: &mut Self, k: usize| n.input.get(k).filter(|i| !i.is_empty()).map_or(0, |i| s.of(i));
        match n.op_type() {
            "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => dtype::INT64,
            "TopK" if slot == 1 => dtype::INT64,
            "Cast" => n.attr_int_or("to", 0).map_or(0, |v| v as i32),
            "CastLike" => first(self, 1),
            "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And" | "Or" | "Xor"
            | "IsNaN" | "IsInf" => dtype::BOOL,
            "Constant" => n.attr_tensor("value").ok().flatten().map_or(0, |t| t.data_type()),
            "ConstantOfShape" => n.attr_tensor("value").ok().flatten().map_or(dtype::FLOAT, |t| t.data_type()),
            "Where" => first(self, 1),
            "QuantizeLinear" | "DynamicQuantizeLinear" => dtype::UINT8,
            "DequantizeLinear" => dtype::FLOAT,
            "MatMulInteger" | "ConvInteger" => dtype::INT32,
            _ => (0..n.input.len()).map(|k| first(self, k)).find(|&t| t != 0).unwrap_or(0),
        }
    }
}

/// Static facts about the graph the pieces are cut from.
pub(super) struct Layout<'a> {
    view: &'a GraphView<'a>,
    /// Position of each node in the topological order.
    pub(super) pos: Vec<usize>,
    pub(super) order: Vec<usize>,
    /// Whether each node output may be fed from a cache (frontier rules, module docs).
    pub(super) cacheable: HashMap<String, bool>,
    /// Implicit (subgraph) inputs of each node.
    implicit: HashMap<usize, Vec<String>>,
}

impl<'a> Layout<'a> {
    pub(super) fn new(view: &'a GraphView<'a>) -> Result<Self> {
        let order = view.topo_order()?;
        let nodes = view.nodes();
        let mut pos = vec![0usize; nodes.len()];
        for (p, &i) in order.iter().enumerate() {
            pos[i] = p;
        }
        let mut implicit: HashMap<usize, Vec<String>> = HashMap::new();
        let mut dynamic = vec![false; nodes.len()];
        for &i in &order {
            let n = &nodes[i];
            let mut free = Vec::new();
            for a in &n.attribute {
                for g in a.g.iter().chain(&a.graphs) {
                    subgraph_free(g, &mut free);
                }
            }
            let reads = n.input.iter().filter(|s| !s.is_empty()).chain(free.iter());
            let mut dy = false;
            for t in reads {
                dy |= match view.origin(t) {
                    Some(crate::onnx::graph::Origin::GraphInput) => true,
                    Some(crate::onnx::graph::Origin::Node { node, .. }) => dynamic[node],
                    _ => false,
                };
            }
            dynamic[i] = dy;
            if !free.is_empty() {
                implicit.insert(i, free);
            }
        }
        let mut types = Types::new(view);
        let mut cacheable = HashMap::new();
        for &i in &order {
            for o in nodes[i].output.iter().filter(|o| !o.is_empty()) {
                let t = types.of(o);
                let float = matches!(t, 0 | dtype::FLOAT);
                cacheable.insert(o.clone(), dynamic[i] && float && nodes[i].op_type() != "Constant");
            }
        }
        Ok(Layout { view, pos, order, cacheable, implicit })
    }

    /// What node `i` reads: its inputs and what its subgraphs read from the enclosing scope.
    pub(super) fn reads(&self, i: usize) -> Vec<String> {
        let n = &self.view.nodes()[i];
        let mut v: Vec<String> = n.input.iter().filter(|s| !s.is_empty()).cloned().collect();
        if let Some(f) = self.implicit.get(&i) {
            v.extend(f.iter().cloned());
        }
        v
    }

    pub(super) fn producer(&self, t: &str) -> Option<usize> {
        match self.view.origin(t)? {
            crate::onnx::graph::Origin::Node { node, .. } => Some(node),
            _ => None,
        }
    }

    /// Resolves what tensor `t`, read at or after position `cut`, needs from before `cut`:
    /// cached tensors go to `cached`, recomputed producers to `pulled`.
    fn resolve(&self, t: &str, cut: usize, cached: &mut BTreeSet<String>, pulled: &mut BTreeSet<usize>) {
        let Some(p) = self.producer(t) else { return };
        if self.pos[p] >= cut {
            return;
        }
        if self.cacheable.get(t).copied().unwrap_or(false) {
            cached.insert(t.to_string());
            return;
        }
        if pulled.insert(p) {
            for r in self.reads(p) {
                self.resolve(&r, cut, cached, pulled);
            }
        }
    }
}

/// Names a subgraph reads from enclosing scopes.
fn subgraph_free(g: &GraphProto, out: &mut Vec<String>) {
    let mut defined: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    defined.extend(g.input.iter().map(|v| v.name()));
    for n in &g.node {
        defined.extend(n.output.iter().map(|s| s.as_str()));
    }
    for n in &g.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            if !defined.contains(i.as_str()) && !out.contains(i) {
                out.push(i.clone());
            }
        }
        for a in &n.attribute {
            for sg in a.g.iter().chain(&a.graphs) {
                let mut inner = Vec::new();
                subgraph_free(sg, &mut inner);
                for name in inner {
                    if !defined.contains(name.as_str()) && !out.contains(&name) {
                        out.push(name);
                    }
                }
            }
        }
    }
}

/// The position of `name` among a piece's outputs, added at the end when it is not there yet.
fn output_slot(outputs: &mut Vec<String>, name: &str) -> usize {
    match outputs.iter().position(|o| o == name) {
        Some(at) => at,
        None => {
            outputs.push(name.to_string());
            outputs.len() - 1
        }
    }
}

/// Where a piece starting at a given node cuts the graph ([`frontier_before`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontier {
    /// The node's topological position.
    pub start: usize,
    /// The tensors the piece reads from before `start` and takes from the cache (frontier
    /// rules, module docs); the integer and constant ones are recomputed by the piece.
    pub names: Vec<String>,
    /// Bytes of the weights that only nodes the piece skips read (neither recomputed nor at
    /// or after `start`): what the piece no longer loads.
    pub skipped_weight_bytes: u64,
}

/// The cut of `model` before node `first` ([`Frontier`]).
pub fn frontier_before(model: &ModelProto, first: usize) -> Result<Frontier> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    let lay = Layout::new(&view)?;
    let start = *lay.pos.get(first).context("internal error: node out of range")?;
    let (mut cached, mut pulled) = (BTreeSet::new(), BTreeSet::new());
    for &i in &lay.order[start..] {
        for r in lay.reads(i) {
            lay.resolve(&r, start, &mut cached, &mut pulled);
        }
    }
    let run: HashSet<usize> = lay.order[start..].iter().chain(&pulled).copied().collect();
    let still_read: HashSet<String> = run.iter().flat_map(|&i| lay.reads(i)).collect();
    // Each weight once, by name.
    let skipped: BTreeSet<String> = lay.order[..start]
        .iter()
        .filter(|i| !run.contains(i))
        .flat_map(|&i| lay.reads(i))
        .filter(|r| !still_read.contains(r) && view.weight(r).is_some())
        .collect();
    let skipped_weight_bytes = skipped.iter().filter_map(|r| view.weight(r)).map(crate::dump::tensor_bytes).sum();
    Ok(Frontier { start, names: cached.into_iter().collect(), skipped_weight_bytes })
}

/// Whether a piece runs the layer node it ends before, and what the next piece does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Through {
    /// The piece stops before the node.
    No,
    /// The piece runs the node and hands over its output; the next piece runs it again.
    Rerun,
    /// The piece runs the node, hands over its output and caches it; the next piece starts
    /// after the node.
    Keep,
}

/// What a piece hands to the map for one sample (whose index `fold` receives).
pub struct Visit<'v, S> {
    /// The tensor the piece ends at (`None` after the last layer).
    pub value: Option<&'v ArrayData>,
    /// The layer's output, when the piece runs through the layer.
    pub output: Option<&'v ArrayData>,
    /// `stat` of each collected float tensor the piece produced (its index in `collect`),
    /// computed in the runtime's buffer as soon as the tensor was (no copy).
    pub collected: Vec<(usize, S)>,
}

/// Runs a model piece by piece over the samples.
pub struct Segmenter<'a> {
    specs: &'a [InputSpec],
    set: &'a SampleSet,
    /// Per sample: cached frontier tensors.
    cache: Vec<HashMap<String, ArrayData>>,
    /// Topological position where the next piece starts.
    start: usize,
    quiet: bool,
    /// Pieces run so far.
    pub pieces: usize,
}

impl<'a> Segmenter<'a> {
    pub fn new(specs: &'a [InputSpec], set: &'a SampleSet, quiet: bool) -> Self {
        Segmenter { specs, set, cache: (0..set.len()).map(|_| HashMap::new()).collect(), start: 0, quiet, pieces: 0 }
    }

    /// A segmenter whose first piece starts at the cut `at` ([`frontier_before`] of the model
    /// later calls pass, or of one with the same graph structure) instead of at the graph
    /// inputs: `cache[i]` holds sample `i`'s values of `at.names` (e.g. kept by an earlier
    /// full pass of the same model, so the nodes before the cut do not run again).
    pub fn starting_at(
        specs: &'a [InputSpec],
        set: &'a SampleSet,
        quiet: bool,
        at: &Frontier,
        cache: Vec<HashMap<String, ArrayData>>,
    ) -> Result<Self> {
        let (start, names) = (at.start, &at.names);
        if cache.len() != set.len() {
            bail!("internal error: {} cached samples for {} samples", cache.len(), set.len());
        }
        if let Some(t) = names.iter().find(|t| cache.iter().any(|c| !c.contains_key(t.as_str()))) {
            bail!("internal error: tensor '{t}' was not cached");
        }
        Ok(Segmenter { specs, set, cache, start, quiet, pieces: 0 })
    }

    /// Runs the model from where the previous call stopped up to (not including) node
    /// `upto`, and hands each sample's value of the tensor `want` (an input of `upto`) and of
    /// the `collect` tensors the piece produces (with their index in `collect`) to `map` (in
    /// parallel); `fold` receives the results in sample order. `later` are the node indices
    /// of layers still to come (what must stay cached). `model` must keep the same graph
    /// structure between calls (only constant values may change).
    ///
    /// With `through` other than [`Through::No`], the piece also runs node `upto` itself and
    /// hands over its first output (the layer's `y` as the runtime computes it, instead of
    /// recomputing it). That output is not collected from this piece. With
    /// [`Through::Rerun`] the next piece runs the node again, with whatever weights it has
    /// by then; with [`Through::Keep`] the output is cached instead (also when it is in
    /// `collect`: the caller takes its statistics) and the next piece starts after the node.
    #[allow(clippy::too_many_arguments)]
    pub fn advance<S: Send, T: Send>(
        &mut self,
        model: &ModelProto,
        (upto, want, through): (usize, &str, Through),
        later: &[usize],
        collect: &[String],
        stat: impl Fn(usize, ArrayViewD<'_, f32>) -> Result<S> + Sync,
        map: impl Fn(Visit<S>) -> Result<T> + Sync,
        fold: impl FnMut(usize, T) -> Result<()> + Send,
    ) -> Result<()> {
        self.run(model, Some((upto, want, through)), later, collect, stat, map, fold)
    }

    /// Runs the rest of the graph (after the last `advance`) for the `collect` tensors.
    pub fn finish<S: Send, T: Send>(
        &mut self,
        model: &ModelProto,
        collect: &[String],
        stat: impl Fn(usize, ArrayViewD<'_, f32>) -> Result<S> + Sync,
        map: impl Fn(Visit<S>) -> Result<T> + Sync,
        fold: impl FnMut(usize, T) -> Result<()> + Send,
    ) -> Result<()> {
        self.run(model, None, &[], collect, stat, map, fold)
    }

    #[allow(clippy::too_many_arguments)]
    fn run<S: Send, T: Send>(
        &mut self,
        model: &ModelProto,
        upto: Option<(usize, &str, Through)>,
        later: &[usize],
        collect: &[String],
        stat: impl Fn(usize, ArrayViewD<'_, f32>) -> Result<S> + Sync,
        map: impl Fn(Visit<S>) -> Result<T> + Sync,
        mut fold: impl FnMut(usize, T) -> Result<()> + Send,
    ) -> Result<()> {
        let graph = model.graph.as_ref().context("the model has no graph")?;
        let view = GraphView::new(graph);
        let lay = Layout::new(&view)?;
        let end = match upto {
            Some((node, _, _)) => *lay.pos.get(node).context("internal error: layer node out of range")?,
            None => lay.order.len(),
        };
        if end < self.start {
            bail!("internal error: layers must be visited in topological order");
        }
        // Where the next piece starts.
        let resume = if matches!(upto, Some((_, _, Through::Keep))) { end + 1 } else { end };
        let mut last = later.iter().filter_map(|&i| lay.pos.get(i).copied()).max().unwrap_or(end).max(end);
        if !collect.is_empty() {
            // The rest of the graph runs later (`finish`): keep what it reads.
            last = last.max(lay.order.len().saturating_sub(1));
        }

        // What must be cached after this piece: everything read at positions [resume, last].
        let mut keep = BTreeSet::new();
        let mut scratch = BTreeSet::new();
        for &i in lay.order.get(resume..=last).unwrap_or(&[]) {
            for r in lay.reads(i) {
                lay.resolve(&r, resume, &mut keep, &mut scratch);
            }
        }

        // The piece: nodes at [start, end) plus the producers pulled in for recomputation.
        let mut cached_in = BTreeSet::new();
        let mut pulled = BTreeSet::new();
        let range: Vec<usize> = lay.order[self.start..end].to_vec();
        // The layer node when the piece runs through it (and its output's name).
        let through = match upto {
            Some((node, _, Through::Rerun | Through::Keep)) => {
                let y = view.nodes()[node].output.first().filter(|o| !o.is_empty());
                Some((node, y.context("internal error: the layer node has no output")?.clone()))
            }
            _ => None,
        };
        for &i in &range {
            for r in lay.reads(i) {
                lay.resolve(&r, self.start, &mut cached_in, &mut pulled);
            }
        }
        // `want` itself may come from before the piece.
        let want = upto.map_or("", |u| u.1);
        let mut want_cached = false;
        if upto.is_some() && lay.producer(want).is_some_and(|p| lay.pos[p] < self.start) {
            if lay.cacheable.get(want).copied().unwrap_or(false) {
                want_cached = true;
            } else {
                lay.resolve(want, self.start, &mut cached_in, &mut pulled);
            }
        }
        let want_from_input = upto.is_some() && view.is_graph_input(want);
        if let Some((node, _)) = &through {
            for r in lay.reads(*node) {
                lay.resolve(&r, self.start, &mut cached_in, &mut pulled);
            }
        }
        let mut nodes: Vec<usize> =
            pulled.iter().copied().chain(range.iter().copied()).chain(through.iter().map(|t| t.0)).collect();
        nodes.sort_by_key(|&i| lay.pos[i]);
        nodes.dedup();
        let produced: HashSet<&str> =
            nodes.iter().flat_map(|&i| view.nodes()[i].output.iter().map(|s| s.as_str())).collect();
        let mut outputs: Vec<String> = Vec::new();
        let want_computed = upto.is_some() && !want_cached && !want_from_input && produced.contains(want);
        if upto.is_some() && !want_cached && !want_from_input && !want_computed {
            bail!("internal error: tensor '{want}' is neither computed, cached nor a graph input");
        }
        if want_computed {
            outputs.push(want.to_string());
        }
        let y_at = through.as_ref().map(|(_, y)| output_slot(&mut outputs, y));
        // Whether the piece's own nodes (the layer node aside) produce `t`.
        let made_in_range = |t: &str| range.iter().any(|&i| view.nodes()[i].output.iter().any(|o| o == t));
        // With `Keep`, the layer's output is cached too.
        let kept_y = through.as_ref().filter(|_| resume > end).map(|(_, y)| y.as_str());
        let new_cached: Vec<String> =
            keep.iter().filter(|t| made_in_range(t) || kept_y == Some(t.as_str())).cloned().collect();
        for t in &new_cached {
            output_slot(&mut outputs, t);
        }
        // Collected tensors the piece's own nodes produce: (position in `outputs`, index).
        let mut collected: Vec<(usize, usize)> = Vec::new();
        for (ci, t) in collect.iter().enumerate().filter(|(_, t)| made_in_range(t)) {
            collected.push((output_slot(&mut outputs, t), ci));
        }

        // Inputs: graph inputs read by the piece (spec order), then cached tensors.
        let mut reads: HashSet<String> = HashSet::new();
        for &i in &nodes {
            reads.extend(lay.reads(i));
        }
        let graph_inputs: Vec<usize> = (0..self.specs.len()).filter(|&k| reads.contains(&self.specs[k].name)).collect();
        let cache_inputs: Vec<String> = cached_in.iter().cloned().collect();
        for t in &cache_inputs {
            if self.cache.first().is_some_and(|c| !c.contains_key(t)) {
                bail!("internal error: tensor '{t}' was not cached");
            }
        }

        let plan = if outputs.is_empty() {
            None
        } else {
            let (bytes, facts) = self.piece(model, &view, &nodes, &graph_inputs, &cache_inputs, &outputs)?;
            let plan = Plan::load(&bytes, None, &facts, &outputs).with_context(|| match upto {
                Some((node, _, _)) => {
                    format!("cannot run the model piece ending before node '{}'", view.nodes()[node].name())
                }
                None => "cannot run the last model piece".to_string(),
            })?;
            self.pieces += 1;
            Some(plan)
        };
        let need_sample = want_from_input || !graph_inputs.is_empty();
        // Outputs copied out of the runtime: the tensor the piece ends at, the layer's output,
        // and what the next pieces read; the collected ones are only visited.
        let copy: Vec<bool> = outputs
            .iter()
            .enumerate()
            .map(|(at, o)| (want_computed && at == 0) || y_at == Some(at) || new_cached.contains(o))
            .collect();
        let mut collected_at: Vec<Option<usize>> = vec![None; outputs.len()];
        for &(at, ci) in &collected {
            collected_at[at] = Some(ci);
        }
        let pb = progress(self.set.len(), self.quiet, "outlier statistics");
        let (set, specs) = (self.set, self.specs);
        // Each sample's cache, locked by the one worker that runs the sample (uncontended).
        let cells: Vec<Mutex<HashMap<String, ArrayData>>> =
            std::mem::take(&mut self.cache).into_iter().map(Mutex::new).collect();
        // One sample: runs the piece, visits and maps, then updates the sample's cache (what
        // the next pieces read), so that only the mapped result waits for the fold.
        let one = |i: usize| -> Result<T> {
            let sample = if need_sample { Some(set.load(i)?) } else { None };
            let source = set.source(i).unwrap_or_default();
            let mut cache =
                cells.get(i).context("internal error: sample cache")?.lock().unwrap_or_else(|e| e.into_inner());
            let (mut outs, mut stats) = (Vec::new(), Vec::new());
            if let Some(plan) = &plan {
                let mut inputs = Vec::with_capacity(graph_inputs.len() + cache_inputs.len());
                for &k in &graph_inputs {
                    let s = sample.as_ref().context("internal error: sample not loaded")?;
                    inputs.push(s.inputs[k].clone());
                }
                // A cached tensor no later piece reads (and not handed to `map`) is moved in.
                for t in &cache_inputs {
                    let still_read = keep.contains(t) || (want_cached && t == want);
                    let v = if still_read { cache.get(t).cloned() } else { cache.remove(t) };
                    inputs.push(v.with_context(|| format!("sample {source}: tensor '{t}' was not cached"))?);
                }
                let (copies, visited) = plan
                    .run_each(&inputs, &copy, |at, view| {
                        let ci = collected_at.get(at).copied().flatten()?;
                        Some(stat(ci, view?).map(|s| (ci, s)))
                    })
                    .with_context(|| format!("sample {source}"))?;
                outs = copies;
                stats = visited.into_iter().flatten().collect::<Result<Vec<_>>>()?;
            }
            let value = if upto.is_none() {
                None
            } else if want_computed {
                Some(outs.first().and_then(Option::as_ref).context("internal error: missing output")?)
            } else if want_cached {
                Some(cache.get(want).with_context(|| format!("sample {source}: tensor '{want}' was not cached"))?)
            } else {
                let k = specs.iter().position(|s| s.name == want).context("internal error: input spec")?;
                Some(&sample.as_ref().context("internal error: sample not loaded")?.inputs[k])
            };
            let output = y_at.and_then(|at| outs.get(at)).and_then(Option::as_ref);
            let r = map(Visit { value, output, collected: stats })
                .with_context(|| format!("sample {source}: tensor '{want}'"))?;
            let names = plan.as_ref().map(|p| p.outputs()).unwrap_or(&[]);
            let fresh: Vec<(String, ArrayData)> = names
                .iter()
                .zip(outs)
                .filter(|(name, _)| new_cached.contains(name))
                .filter_map(|(name, v)| v.map(|v| (name.clone(), v)))
                .collect();
            cache.retain(|name, _| keep.contains(name));
            cache.extend(fresh);
            Ok(r)
        };
        // No barrier between samples ([`crate::calibrate::for_each_index`]); the results are
        // folded in sample order.
        let done = crate::calibrate::for_each_index(self.set.len(), &pb, one, &mut fold);
        self.cache = cells.into_iter().map(|c| c.into_inner().unwrap_or_else(|e| e.into_inner())).collect();
        done?;
        self.start = resume;
        Ok(())
    }

    /// Changes every sample's cached value of tensor `name` with `f(sample, value)` (samples
    /// in parallel, each on its own): e.g. a layer's output kept by [`Through::Keep`], after
    /// the layer's weights changed.
    pub fn update_cached(&mut self, name: &str, f: impl Fn(usize, &mut ArrayData) -> Result<()> + Sync) -> Result<()> {
        self.cache.par_iter_mut().enumerate().try_for_each(|(i, c)| {
            let v = c.get_mut(name).with_context(|| format!("internal error: tensor '{name}' is not cached"))?;
            f(i, v)
        })
    }

    /// Sample `i`'s cached value of tensor `name`.
    pub fn cached(&self, i: usize, name: &str) -> Option<&ArrayData> {
        self.cache.get(i)?.get(name)
    }

    /// Serializes the piece as a model and its input facts.
    fn piece(
        &self,
        model: &ModelProto,
        view: &GraphView,
        nodes: &[usize],
        graph_inputs: &[usize],
        cache_inputs: &[String],
        outputs: &[String],
    ) -> Result<(crate::onnx::io::RuntimeBytes, Vec<InputFact>)> {
        let graph = view.graph;
        let node_list: Vec<NodeProto> = nodes.iter().map(|&i| graph.node[i].clone()).collect();
        let mut needed: HashSet<String> = HashSet::new();
        for n in &node_list {
            needed.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
            for a in &n.attribute {
                let mut free = Vec::new();
                for g in a.g.iter().chain(&a.graphs) {
                    subgraph_free(g, &mut free);
                }
                needed.extend(free);
            }
        }
        let initializer = graph
            .initializer
            .iter()
            .filter(|t| needed.contains(t.name()) && view.weight(t.name()).is_some())
            .cloned()
            .collect();
        let shapes = self.set.shapes();
        let mut facts = Vec::new();
        let mut inputs = Vec::new();
        for &k in graph_inputs {
            let s = &self.specs[k];
            let shape = shapes.get(k).cloned().context("internal error: sample shapes")?;
            let dims: Vec<crate::onnx::builder::Dim> =
                shape.iter().map(|&d| crate::onnx::builder::Dim::Fixed(d as i64)).collect();
            inputs.push(value_info(&s.name, s.elem_type, Some(&dims)));
            facts.push(InputFact { name: s.name.clone(), elem_type: s.elem_type, shape });
        }
        let first = self.cache.first();
        for t in cache_inputs {
            let a =
                first.and_then(|c| c.get(t)).with_context(|| format!("internal error: tensor '{t}' was not cached"))?;
            let dims: Vec<crate::onnx::builder::Dim> =
                a.shape().iter().map(|&d| crate::onnx::builder::Dim::Fixed(d as i64)).collect();
            inputs.push(value_info(t, a.elem_type(), Some(&dims)));
            facts.push(InputFact { name: t.clone(), elem_type: a.elem_type(), shape: a.shape().to_vec() });
        }
        let out_infos = outputs.iter().map(|o| value_info(o, 0, None)).collect();
        let sub = GraphProto {
            name: Some(format!("{}_piece", graph.name())),
            node: node_list,
            input: inputs,
            output: out_infos,
            initializer,
            ..Default::default()
        };
        let mut m = ModelProto { graph: None, ..model.clone() };
        m.graph = Some(sub);
        let bytes = crate::onnx::io::encode_for_runtime(&m)?;
        Ok((bytes, facts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{graph, model, node, tensor_info};
    use crate::onnx::tensor::{from_f32, vec_i64};
    use ndarray::{ArrayD, IxDyn};

    /// x → MatMul(W1) → Relu → Shape/Reshape round trip → MatMul(W2) → Add(x-derived) → MatMul(W3)
    fn chain() -> ModelProto {
        let w = |name: &str, s: f32| {
            from_f32(
                name,
                &ArrayD::from_shape_vec(IxDyn(&[4, 4]), (0..16).map(|v| (v as f32 - 7.0) * s).collect()).expect("w"),
            )
        };
        let g = graph(
            "chain",
            vec![
                node("MatMul", "m1", &["x", "W1"], &["a"], vec![]),
                node("Relu", "r", &["a"], &["b"], vec![]),
                node("Shape", "sh", &["b"], &["s"], vec![]),
                node("Reshape", "rs", &["b", "flat"], &["bf"], vec![]),
                node("Reshape", "back", &["bf", "s"], &["c"], vec![]),
                node("MatMul", "m2", &["c", "W2"], &["d"], vec![]),
                node("Add", "res", &["d", "x"], &["e"], vec![]),
                node("MatMul", "m3", &["e", "W3"], &["y"], vec![]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[2, 4])],
            vec![tensor_info("y", dtype::FLOAT, &[2, 4])],
            vec![w("W1", 0.1), w("W2", -0.05), w("W3", 0.2), vec_i64("flat", &[-1])],
        );
        model(g, 13)
    }

    /// The node indices of `chain`'s m2 and m3.
    fn m2_m3(m: &ModelProto) -> Result<(usize, usize)> {
        let g = m.graph.as_ref().context("g")?;
        let idx = |name: &str| g.node.iter().position(|n| n.name() == name).context("node");
        Ok((idx("m2")?, idx("m3")?))
    }

    /// A collected tensor's statistic in these tests: its value.
    fn to_array(_: usize, v: ArrayViewD<'_, f32>) -> Result<ArrayData> {
        Ok(ArrayData::F32(v.to_owned()))
    }

    /// One piece ([`Segmenter::advance`] to `upto`, or [`Segmenter::finish`] with `None`)
    /// whose mapped values are returned in sample order.
    fn piece_values<S: Send, T: Send>(
        seg: &mut Segmenter,
        m: &ModelProto,
        upto: Option<(usize, &str, Through)>,
        (later, collect): (&[usize], &[String]),
        stat: impl Fn(usize, ArrayViewD<'_, f32>) -> Result<S> + Sync,
        map: impl Fn(Visit<S>) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let mut got = Vec::new();
        let fold = |_, v| {
            got.push(v);
            Ok(())
        };
        match upto {
            Some(upto) => seg.advance(m, upto, later, collect, stat, map, fold)?,
            None => seg.finish(m, collect, stat, map, fold)?,
        }
        Ok(got)
    }

    /// Each sample's value of tensor `name` in the whole model `m`, run by the runtime.
    fn values(m: &ModelProto, specs: &[InputSpec], set: &SampleSet, name: &str) -> Result<Vec<ArrayData>> {
        let bytes = crate::onnx::io::encode_for_runtime(m)?;
        let plan = Plan::load(&bytes, None, &crate::calibrate::input_facts(specs, set)?, &[name.to_string()])?;
        (0..set.len()).map(|i| Ok(plan.run(&set.load(i)?.inputs)?.remove(0))).collect()
    }

    /// Three random samples of `chain`'s input `x` written to a fresh folder (kept alive by the
    /// returned guard), opened.
    fn samples(seed: u64) -> Result<(tempfile::TempDir, Vec<InputSpec>, SampleSet)> {
        let dir = tempfile::tempdir()?;
        let mut rng = crate::rng::Rng::new(seed);
        for i in 0..3 {
            let x =
                ArrayData::F32(ArrayD::from_shape_vec(IxDyn(&[2, 4]), (0..8).map(|_| rng.normal() as f32).collect())?);
            crate::npy::write_npz(&dir.path().join(format!("{i}.npz")), &[("x", &x)])?;
        }
        let specs = crate::calibrate::input_specs(chain().graph.as_ref().context("g")?);
        let set = crate::data::open(
            &specs,
            &crate::data::DataOptions {
                sources: vec![crate::data::Source::Path(dir.path().into())],
                ..Default::default()
            },
        )?;
        Ok((dir, specs, set))
    }

    #[test]
    fn a_segmenter_started_from_a_frontier_matches_one_started_at_the_inputs() -> Result<()> {
        let (_dir, specs, set) = samples(4)?;
        let m = chain();
        let (m2, m3) = m2_m3(&m)?;
        // Before m2: `c` is cached (float, from the input); `x` is a graph input.
        let f = frontier_before(&m, m2)?;
        assert_eq!(f.names, ["c"]);
        assert_eq!(f.start, 5);
        // m1 and the Shape/Reshape pair before m2 are skipped (the Shape is recomputed only
        // for a later reader, none here), with W1 and `flat`.
        assert_eq!(f.skipped_weight_bytes, 16 * 4 + 8);
        let c = values(&m, &specs, &set, "c")?;
        let cache = c.into_iter().map(|v| HashMap::from([("c".to_string(), v)])).collect();
        let mut seeded = Segmenter::starting_at(&specs, &set, true, &f, cache)?;
        let mut plain = Segmenter::new(&specs, &set, true);
        let y = ["y".to_string()];
        for seg in [&mut seeded, &mut plain] {
            let got_e = piece_values(
                seg,
                &m,
                Some((m3, "e", Through::No)),
                (&[], &y),
                |_, v| Ok(v.to_owned()),
                |v| v.value.cloned().context("value"),
            )?;
            assert_eq!(got_e, values(&m, &specs, &set, "e")?);
            let got_y = piece_values(seg, &m, None, (&[], &y), to_array, |v| Ok(v.collected))?;
            let want = values(&m, &specs, &set, "y")?;
            for (g, w) in got_y.iter().zip(&want) {
                assert_eq!(g, &vec![(0, w.clone())]);
            }
        }
        // A cache missing a frontier tensor is refused.
        let empty = (0..set.len()).map(|_| HashMap::new()).collect();
        assert!(Segmenter::starting_at(&specs, &set, true, &f, empty).is_err());
        Ok(())
    }

    #[test]
    fn pieces_reproduce_the_full_model_and_see_edits() -> Result<()> {
        let (_dir, specs, set) = samples(1)?;
        let mut m = chain();
        // Reference: the full model with all intermediates.
        let full = |m: &ModelProto| -> Result<Vec<Vec<ArrayData>>> {
            let bytes = crate::onnx::io::encode_for_runtime(m)?;
            let facts = crate::calibrate::input_facts(&specs, &set)?;
            let names: Vec<String> = ["c", "e"].iter().map(|s| s.to_string()).collect();
            let plan = Plan::load(&bytes, None, &facts, &names)?;
            (0..set.len()).map(|i| plan.run(&set.load(i)?.inputs)).collect()
        };
        let before = full(&m)?;
        let (m2, m3) = m2_m3(&m)?;
        let mut seg = Segmenter::new(&specs, &set, true);
        let got_c = piece_values(
            &mut seg,
            &m,
            Some((m2, "c", Through::No)),
            (&[m3], &[]),
            |_, v| Ok(v.to_owned()),
            |v| v.value.cloned().context("value"),
        )?;
        assert_eq!(got_c.len(), 3);
        for (g, b) in got_c.iter().zip(&before) {
            assert_eq!(g, &b[0]);
        }
        // Edit W2 between pieces: the next piece must see it.
        let gm = m.graph.as_mut().context("g")?;
        let w2 = gm.initializer.iter_mut().find(|t| t.name() == "W2").context("W2")?;
        *w2 = from_f32("W2", &ArrayD::from_elem(IxDyn(&[4, 4]), 0.5f32));
        let after = full(&m)?;
        let got_e = piece_values(
            &mut seg,
            &m,
            Some((m3, "e", Through::No)),
            (&[], &["y".to_string()]),
            |_, v| Ok(v.to_owned()),
            |v| {
                assert_eq!(v.collected.len(), 0, "y is produced by m3, after this piece");
                v.value.cloned().context("value")
            },
        )?;
        for (g, a) in got_e.iter().zip(&after) {
            assert_eq!(g, &a[1]);
        }
        assert_ne!(after[0][1], before[0][1]);
        // The rest of the graph, collecting the output.
        let got_y = piece_values(
            &mut seg,
            &m,
            None,
            (&[], &["y".to_string()]),
            |_, v| Ok(ArrayData::F32(v.to_owned())),
            |v| {
                assert!(v.value.is_none());
                Ok(v.collected)
            },
        )?;
        let bytes = crate::onnx::io::encode_for_runtime(&m)?;
        let facts = crate::calibrate::input_facts(&specs, &set)?;
        let plan = Plan::load(&bytes, None, &facts, &["y".to_string()])?;
        for (i, g) in got_y.iter().enumerate() {
            let want = plan.run(&set.load(i)?.inputs)?;
            assert_eq!(g.len(), 1);
            assert_eq!(g[0].0, 0);
            assert_eq!(g[0].1, want[0]);
        }
        Ok(())
    }

    #[test]
    fn a_piece_running_through_a_layer_hands_its_output_and_the_next_piece_reruns_it() -> Result<()> {
        let (_dir, specs, set) = samples(2)?;
        let mut m = chain();
        let before = values(&m, &specs, &set, "d")?;
        let (m2, m3) = m2_m3(&m)?;
        let collect = ["d".to_string()];
        let mut seg = Segmenter::new(&specs, &set, true);
        let got = piece_values(&mut seg, &m, Some((m2, "c", Through::Rerun)), (&[m3], &collect), to_array, |v| {
            // `d` is m2's output: handed over as the layer's output, not collected (the next
            // piece computes it again with the weights m2 has by then).
            assert!(v.collected.is_empty());
            Ok((v.value.cloned().context("c")?, v.output.cloned().context("d")?))
        })?;
        for ((_, d), want) in got.iter().zip(&before) {
            assert_eq!(d, want);
        }
        let gm = m.graph.as_mut().context("g")?;
        let w2 = gm.initializer.iter_mut().find(|t| t.name() == "W2").context("W2")?;
        *w2 = from_f32("W2", &ArrayD::from_elem(IxDyn(&[4, 4]), 0.5f32));
        let after = values(&m, &specs, &set, "d")?;
        let again =
            piece_values(&mut seg, &m, Some((m3, "e", Through::No)), (&[], &collect), to_array, |v| Ok(v.collected))?;
        for (c, want) in again.iter().zip(&after) {
            assert_eq!(c.len(), 1);
            assert_eq!(c[0].0, 0);
            assert_eq!(&c[0].1, want, "the edited m2 ran again");
        }
        assert_ne!(after[0], before[0]);
        Ok(())
    }

    #[test]
    fn a_piece_keeping_a_layers_output_caches_it_and_the_next_piece_reads_the_update() -> Result<()> {
        let (_dir, specs, set) = samples(3)?;
        let m = chain();
        let (d_before, e_before) = (values(&m, &specs, &set, "d")?, values(&m, &specs, &set, "e")?);
        let (m2, m3) = m2_m3(&m)?;
        let collect = ["d".to_string(), "e".to_string()];
        let mut seg = Segmenter::new(&specs, &set, true);
        let got = piece_values(&mut seg, &m, Some((m2, "c", Through::Keep)), (&[m3], &collect), to_array, |v| {
            assert!(v.collected.is_empty(), "d is the kept output, e comes after");
            v.output.cloned().context("d")
        })?;
        assert_eq!(got, d_before);
        for (i, d) in d_before.iter().enumerate() {
            assert_eq!(seg.cached(i, "d"), Some(d), "the layer's output is cached");
        }
        // The caller changes the cached output (as if m2's weights had changed); the next
        // piece starts after m2 and reads it: e = d + x.
        seg.update_cached("d", |i, d| {
            let ArrayData::F32(a) = d else { bail!("d") };
            a.mapv_inplace(|v| v + i as f32 + 1.0);
            Ok(())
        })?;
        let again = piece_values(&mut seg, &m, Some((m3, "e", Through::No)), (&[], &collect), to_array, |v| {
            Ok((v.value.cloned().context("e")?, v.collected))
        })?;
        for (i, ((e, collected), want)) in again.iter().zip(&e_before).enumerate() {
            let (ArrayData::F32(e), ArrayData::F32(want)) = (e, want) else { bail!("float") };
            let shifted = want.mapv(|v| v + i as f32 + 1.0);
            assert!(e.iter().zip(&shifted).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0)), "{e} vs {shifted}");
            // Only e is collected here: m2 did not run again.
            assert_eq!(collected.len(), 1);
            assert_eq!(collected[0].0, 1);
        }
        Ok(())
    }

    #[test]
    fn a_kept_output_brought_up_to_date_after_an_edit_matches_the_runtime() -> Result<()> {
        use crate::outliers::{as_rows, collect::LayerAcc, layer, update_kept_output};
        let (_dir, specs, set) = samples(4)?;
        let mut m = chain();
        let (layers, _) = layer::find_layers(&m)?;
        let l = layers.iter().find(|l| l.node == "m2").context("m2")?.clone();
        let (_, m3) = m2_m3(&m)?;
        // Every input row kept, as the sequential pass keeps them.
        let mut acc = LayerAcc::new(set.len(), 0.999, 4.0, false, 1, 1 << 10);
        let sampler = acc.sampler();
        let mut seg = Segmenter::new(&specs, &set, true);
        seg.advance(
            &m,
            (l.node_index, &l.input, Through::Keep),
            &[m3],
            &[],
            |_, _| Ok(()),
            |v| {
                let (Some(ArrayData::F32(x)), Some(ArrayData::F32(y))) = (v.value, v.output) else { bail!("float") };
                sampler.sample_with(
                    vec![as_rows(&x.view(), l.k)?.into_owned()],
                    vec![as_rows(&y.view(), l.n)?.into_owned()],
                )
            },
            |_, s| acc.merge(s),
        )?;
        let st = acc.finish()?;
        let before: Vec<ArrayData> =
            (0..set.len()).map(|i| seg.cached(i, "d").cloned().context("d")).collect::<Result<_>>()?;
        let w = layer::weight_matrix(&m, &l)?;
        let mut w_new = w.clone();
        w_new.column_mut(2).mapv_inplace(|v| 0.3 - 2.0 * v);
        update_kept_output(&mut seg, &l, &st, &w, &w_new, 2)?;
        layer::write_weight(&mut m, &l, &w_new)?;
        let wanted = values(&m, &specs, &set, "d")?;
        let mut changed = false;
        for (i, (old, want)) in before.iter().zip(&wanted).enumerate() {
            let (Some(ArrayData::F32(got)), ArrayData::F32(want), ArrayData::F32(old)) =
                (seg.cached(i, "d"), want, old)
            else {
                bail!("float")
            };
            for ((r, j), &g) in got.view().into_dimensionality::<ndarray::Ix2>()?.indexed_iter() {
                if j == 2 {
                    assert!((g - want[[r, j]]).abs() <= 1e-5 * want[[r, j]].abs().max(1.0), "{g} vs {}", want[[r, j]]);
                    changed |= g != old[[r, j]];
                } else {
                    assert_eq!(g, old[[r, j]], "the other columns are the runtime's");
                }
            }
        }
        assert!(changed, "the edited column changed");
        Ok(())
    }
}
