//! Calibration: run samples through tract and fold per-tensor statistics in a streaming way.
//!
//! Owns the choice of which tensors to calibrate (every activation a quantizable node reads
//! or writes for `onnxq calibrate`; for `quantize`, only those whose range its placement reads,
//! [`quantization_targets`]), the sample loop (parallel across samples with rayon, folded in
//! sample order so results are identical for any thread count), and the stats JSON that
//! `onnxq calibrate` writes and `onnxq quantize --stats` reads back.
//!
//! Memory: samples are processed in chunks of a few per thread; each activation is reduced to
//! a [`TensorStats`] (histogram + moments) inside tract's run, as soon as its node has computed
//! it, read in place while it is still in cache ([`Plan::run_visit_f32`]); tract frees it after
//! its last consumer. Memory stays at what plain inference holds per running sample plus one
//! histogram per tensor and sample of a chunk, whatever the number of samples.

use crate::array::{dtype, ArrayData};
use crate::data::{InputSpec, SampleSet};
use crate::onnx::builder::{dims_of, elem_type_of, Dim};
use crate::onnx::pb::{GraphProto, ModelProto};
use crate::onnx::GraphView;
use crate::runtime::{InputFact, Plan};
use crate::stats::{RangeMethod, TensorStats};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Ops whose float inputs/outputs are quantization candidates (QDQ coverage). `Div` is here
/// because `quantize` turns a Div by a constant into a Mul before placing Q/DQ.
pub const QUANTIZABLE_OPS: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "MatMul",
    "Gemm",
    "Add",
    "Mul",
    "Div",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Resize",
    "Softmax",
    "Relu",
    "Clip",
    "Sigmoid",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Split",
    "Gather",
];

/// Which axis of a tensor holds its channels (for per-channel abs-max).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelAxis {
    /// Axis 1 (NCHW convolution outputs).
    One,
    /// The last axis (MatMul/Gemm outputs).
    Last,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub channel_axis: Option<ChannelAxis>,
    /// The tensor this one is a pure rearrangement of (the data input of a Reshape,
    /// Transpose, Flatten, Squeeze, Unsqueeze or Identity, whether or not that node is itself
    /// quantizable): both hold the same multiset of values in
    /// every sample, so when that tensor is calibrated too its statistics are copied instead
    /// of pinning this one as an extra tract output (pinned outputs stop tract from fusing).
    pub same_values_as: Option<String>,
    /// The tensors this one concatenates, in order (the inputs of a Concat; empty for other
    /// tensors): every sample's values are exactly theirs, so when each of them is calibrated
    /// this one's statistics are the merge of theirs instead of one more pinned output (see
    /// [`stats_sources`]).
    pub concat_of: Vec<String>,
    /// Keep per-channel statistics along the channel axis too (tensors that
    /// [`crate::quantize::equalize`] may rescale per channel after calibration).
    pub channel_stats: bool,
}

/// Histogram bins of each channel's own statistics ([`Target::channel_stats`]): 512 keeps
/// PP-OCR det's 1128 channels to 4.6 MB per sample's statistics; 1024 bins measured the same
/// within calibration noise (README).
pub const CHANNEL_BINS: usize = 512;

/// Ops whose output holds exactly the values of their first input, rearranged.
pub const REARRANGING_OPS: &[&str] = &["Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"];

/// Where a target's statistics come from (see [`stats_sources`]).
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// Computed from the tensor's own values: a pinned tract output.
    Direct,
    /// Copied from the [`Source::Direct`] target at this index.
    Same(usize),
    /// The merge of the statistics of the [`Source::Direct`] targets at these indices, in
    /// order (with repeats): the values of a Concat's output (or of a tensor rearranging it)
    /// are those of the Concat's inputs.
    Merged(Vec<usize>),
}

/// For each target, where its statistics come from. A target is an alias
/// ([`Target::same_values_as`]) only without a channel axis (per-channel abs-max depends on
/// the layout) and when its source is itself calibrated. A Concat output
/// ([`Target::concat_of`]) is merged only without a channel axis or per-channel statistics,
/// when every input is calibrated and none of them is a Concat output itself; the merge is
/// exact for everything but the last bits of the sums (the histogram is a function of the
/// multiset of values, `stats` module docs).
fn stats_sources(targets: &[Target]) -> Vec<Source> {
    let index: std::collections::HashMap<&str, usize> =
        targets.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
    let alias = |i: usize| -> Option<usize> {
        let t = &targets[i];
        if t.channel_axis.is_some() {
            return None;
        }
        index.get(t.same_values_as.as_deref()?).copied().filter(|&j| j != i)
    };
    // Follow the chain to a target that is no alias. A chain has fewer hops than there are
    // targets; one that does not end (a cycle, impossible in a valid graph) leaves the target
    // calibrated directly.
    let end = |i: usize| -> usize {
        let mut cur = i;
        for _ in 0..=targets.len() {
            match alias(cur) {
                None => return cur,
                Some(j) => cur = j,
            }
        }
        i
    };
    let ends: Vec<usize> = (0..targets.len()).map(end).collect();
    let merged = |i: usize| -> Option<Vec<usize>> {
        let t = &targets[i];
        if t.concat_of.is_empty() || t.channel_axis.is_some() || t.channel_stats {
            return None;
        }
        t.concat_of
            .iter()
            .map(|name| {
                let j = ends[*index.get(name.as_str())?];
                (j != i && targets[j].concat_of.is_empty()).then_some(j)
            })
            .collect()
    };
    (0..targets.len())
        .map(|i| match merged(ends[i]) {
            Some(parts) => Source::Merged(parts),
            None if ends[i] == i => Source::Direct,
            None => Source::Same(ends[i]),
        })
        .collect()
}

/// The targets that [`calibrate`] computes statistics of directly, so pins as tract outputs
/// (the others copy the statistics of the tensor they rearrange or merge those of the tensors
/// they concatenate), in target order.
pub fn pinned_targets(targets: &[Target]) -> Vec<&Target> {
    let sources = stats_sources(targets);
    targets.iter().zip(&sources).filter(|(_, s)| **s == Source::Direct).map(|(t, _)| t).collect()
}

/// Graph inputs (excluding those backed by initializers), as sample specs.
pub fn input_specs(g: &GraphProto) -> Vec<InputSpec> {
    let inits: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    g.input
        .iter()
        .filter(|vi| !inits.contains(vi.name()))
        .map(|vi| InputSpec {
            name: vi.name().to_string(),
            elem_type: elem_type_of(vi),
            dims: dims_of(vi).map(|d| {
                d.into_iter()
                    .map(|d| match d {
                        Dim::Fixed(v) if v >= 0 => crate::data::Dim::Fixed(v as usize),
                        Dim::Named(s) => crate::data::Dim::Named(s),
                        _ => crate::data::Dim::Unknown,
                    })
                    .collect()
            }),
        })
        .collect()
}

/// The default calibration targets: every activation read or written by a quantizable node
/// (weights excluded), plus the graph outputs, in first-use order.
pub fn default_targets(view: &GraphView) -> Result<Vec<Target>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let order = view.topo_order()?;
    let mut add = |name: &str, axis: Option<ChannelAxis>, out: &mut Vec<Target>| {
        if name.is_empty() || view.weight(name).is_some() || !seen.insert(name.to_string()) {
            return;
        }
        let et = view.elem_type(name);
        if et != 0 && et != dtype::FLOAT {
            return;
        }
        out.push(Target {
            name: name.to_string(),
            channel_axis: axis,
            same_values_as: None,
            concat_of: Vec::new(),
            channel_stats: false,
        });
    };
    // Output -> data input of every rearranging node, quantizable or not (an Identity is not,
    // yet its output often feeds a quantizable node).
    let mut rearranged: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    // Output -> inputs of every Concat.
    let mut concatenated: std::collections::HashMap<&str, &[String]> = std::collections::HashMap::new();
    for i in order {
        let n = &view.nodes()[i];
        if REARRANGING_OPS.contains(&n.op_type()) {
            if let (Some(src), Some(o)) = (n.input.first(), n.output.first()) {
                rearranged.insert(o.as_str(), src.as_str());
            }
        }
        if n.op_type() == "Concat" && !n.input.is_empty() && n.input.iter().all(|i| !i.is_empty()) {
            if let Some(o) = n.output.first() {
                concatenated.insert(o.as_str(), &n.input);
            }
        }
        if !QUANTIZABLE_OPS.contains(&n.op_type()) {
            continue;
        }
        for inp in &n.input {
            add(inp, None, &mut out);
        }
        let axis = match n.op_type() {
            "Conv" | "ConvTranspose" => Some(ChannelAxis::One),
            "MatMul" | "Gemm" => Some(ChannelAxis::Last),
            _ => None,
        };
        for o in &n.output {
            add(o, axis, &mut out);
        }
    }
    for o in &view.graph.output {
        add(o.name(), None, &mut out);
    }
    for t in &mut out {
        t.same_values_as = rearranged.get(t.name.as_str()).map(|s| s.to_string());
        t.concat_of = concatenated.get(t.name.as_str()).map_or_else(Vec::new, |inputs| inputs.to_vec());
    }
    // Integer tensors without declared types (shape arithmetic) come back from tract as ints
    // and are dropped by `calibrate`.
    Ok(out)
}

/// The default targets that `quantize` with `opts` reads a range of
/// ([`crate::quantize::RangeNeeds::ranges_read`]: not the activations whose parameters are
/// fixed or derived from another's, such as a decomposed Gelu's intermediates); calibrating
/// only these gives the same quantized model with fewer pinned tract outputs, which tract
/// may then fuse away.
pub fn quantization_targets(model: &ModelProto, opts: &crate::quantize::QuantOptions) -> Result<Vec<Target>> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let wanted = crate::quantize::range_needs(model, opts)?.ranges_read;
    let rescalable: std::collections::HashSet<String> = if opts.equalize {
        crate::quantize::equalize::candidates(model)?.into_iter().map(|p| p.tensor).collect()
    } else {
        Default::default()
    };
    Ok(default_targets(&GraphView::new(graph))?
        .into_iter()
        .filter(|t| wanted.contains(&t.name))
        .map(|mut t| {
            if rescalable.contains(&t.name) {
                // Direct (not an alias of another's statistics): channels need the layout.
                t.channel_axis = Some(ChannelAxis::One);
                t.channel_stats = true;
            }
            t
        })
        .collect())
}

#[derive(Debug, Clone)]
pub struct CalibOptions {
    pub bins: usize,
    pub quiet: bool,
}

impl Default for CalibOptions {
    fn default() -> Self {
        CalibOptions { bins: 2048, quiet: true }
    }
}

/// Input facts for a plan from the sample set's shapes (all samples must share them).
pub fn input_facts(specs: &[InputSpec], set: &SampleSet) -> Result<Vec<InputFact>> {
    if !set.uniform_shapes() {
        let first = set.shapes();
        for i in 0..set.len() {
            if let Some(s) = set.sample_shapes(i) {
                if let Some(k) = (0..s.len()).find(|&k| s[k] != first[k]) {
                    bail!(
                        "sample {}: input '{}' has shape {:?} but the first sample has {:?}; all samples must share input shapes (pad or bucket them)",
                        set.source(i).unwrap_or_default(),
                        specs.get(k).map(|s| s.name.as_str()).unwrap_or("?"),
                        s[k],
                        first[k]
                    );
                }
            }
        }
        bail!("the samples do not all have the same input shapes");
    }
    Ok(specs
        .iter()
        .zip(set.shapes())
        .map(|(s, shape)| InputFact { name: s.name.clone(), elem_type: s.elem_type, shape: shape.clone() })
        .collect())
}

/// A progress bar on stderr (hidden when quiet or not a terminal).
pub fn progress(len: usize, quiet: bool, what: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::with_draw_target(Some(len as u64), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} samples, {per_sec}, eta {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Runs every sample through `plan` (in parallel), maps each sample's outputs with `map`,
/// and folds the results with `fold` strictly in sample order.
pub fn for_each_sample<T: Send>(
    plan: &Plan,
    set: &SampleSet,
    pb: &indicatif::ProgressBar,
    map: impl Fn(usize, Vec<ArrayData>) -> Result<T> + Sync,
    fold: impl FnMut(usize, T) -> Result<()> + Send,
) -> Result<()> {
    for_each_sample_with(set, pb, |i, inputs| map(i, plan.run(inputs)?), fold)
}

/// Like [`for_each_sample`], with the running of a sample left to `run` (given the sample
/// index and its inputs), e.g. to look at outputs in place with [`Plan::run_visit_f32`].
///
/// One worker per thread takes the next sample as soon as it is free (no barrier between
/// groups of samples: a slow sample delays no other); a finished sample's result waits
/// until every earlier one is folded, and whichever worker finishes the next sample in
/// order folds it (and whatever follows in order meanwhile), outside the loop's lock: the
/// other workers keep handing in results and taking samples. A worker does not take a
/// sample more than [`FOLD_WINDOW`] per thread ahead of the folded ones, so at most that
/// many results wait. The first failure in sample order is returned.
pub fn for_each_sample_with<T: Send>(
    set: &SampleSet,
    pb: &indicatif::ProgressBar,
    run: impl Fn(usize, &[ArrayData]) -> Result<T> + Sync,
    fold: impl FnMut(usize, T) -> Result<()> + Send,
) -> Result<()> {
    for_each_index(
        set.len(),
        pb,
        |i| set.load(i).and_then(|sample| run(i, &sample.inputs).with_context(|| format!("sample {}", sample.source))),
        fold,
    )
}

/// The loop of [`for_each_sample_with`] over the indices `0..n`: `run(i)` does all of
/// sample `i`'s work (loading it included) on one worker, `fold` takes the results in order.
pub fn for_each_index<T: Send>(
    n: usize,
    pb: &indicatif::ProgressBar,
    run: impl Fn(usize) -> Result<T> + Sync,
    fold: impl FnMut(usize, T) -> Result<()> + Send,
) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex};
    struct Order<T> {
        /// Samples folded so far (the next one to fold).
        folded: usize,
        ready: BTreeMap<usize, Result<T>>,
        /// Whether a worker is folding (outside the lock); it also folds what arrives meanwhile.
        folding: bool,
        /// The first failure in sample order; nothing more is taken once it is set.
        failed: Option<anyhow::Error>,
    }
    let workers = rayon::current_num_threads().clamp(1, n.max(1));
    let window = FOLD_WINDOW * workers;
    let next = AtomicUsize::new(0);
    let order = Mutex::new(Order { folded: 0, ready: BTreeMap::new(), folding: false, failed: None });
    // Only the folding worker locks it (uncontended): the fold runs outside `order`'s lock,
    // so that the other workers can hand in results and take samples meanwhile.
    let fold = Mutex::new(fold);
    let advanced = Condvar::new();
    let lock = || order.lock().unwrap_or_else(|e| e.into_inner());
    let worker = || loop {
        // Wait until the next sample is within the window (or there is nothing left to do).
        let i = {
            let mut o = lock();
            loop {
                let i = next.load(Ordering::Relaxed);
                if o.failed.is_some() || i >= n {
                    return;
                }
                if i < o.folded + window {
                    next.store(i + 1, Ordering::Relaxed);
                    break i;
                }
                o = advanced.wait(o).unwrap_or_else(|e| e.into_inner());
            }
        };
        let r = run(i);
        pb.inc(1);
        let mut o = lock();
        if o.failed.is_some() {
            return;
        }
        o.ready.insert(i, r);
        if o.folding {
            continue;
        }
        o.folding = true;
        loop {
            let at = o.folded;
            let Some(r) = o.ready.remove(&at) else { break };
            drop(o);
            let done = r.and_then(|v| (fold.lock().unwrap_or_else(|e| e.into_inner()))(at, v));
            o = lock();
            o.folded += 1;
            if let Err(e) = done {
                o.failed = Some(e);
                o.ready.clear();
                break;
            }
            advanced.notify_all();
        }
        o.folding = false;
        drop(o);
        advanced.notify_all();
    };
    rayon::scope(|s| {
        for _ in 0..workers {
            s.spawn(|_| worker());
        }
    });
    pb.finish_and_clear();
    let o = order.into_inner().unwrap_or_else(|e| e.into_inner());
    match o.failed {
        Some(e) => Err(e),
        None if o.folded == n => Ok(()),
        None => bail!("internal error: {} of {n} samples folded", o.folded),
    }
}

/// Results a sample loop lets wait for their fold, per thread ([`for_each_sample_with`]).
pub const FOLD_WINDOW: usize = 2;

/// The statistics of every calibrated tensor.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// (tensor name, stats) in target order; non-float tensors are dropped.
    pub tensors: Vec<(String, TensorStats)>,
    pub samples: usize,
    pub seconds: f64,
}

impl Calibration {
    pub fn get(&self, name: &str) -> Option<&TensorStats> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }
}

/// Serialized bytes of the model for tract (weights by reference, see
/// [`crate::onnx::io::encode_for_runtime`]).
pub fn model_bytes(model: &crate::onnx::Model) -> Result<crate::onnx::io::RuntimeBytes> {
    crate::onnx::io::encode_for_runtime(&model.proto)
}

/// One sample's statistics of the target `t` from a view of its value.
pub fn view_stats(a: ndarray::ArrayViewD<'_, f32>, t: &Target, bins: usize) -> TensorStats {
    let axis = t.channel_axis.and_then(|ax| match ax {
        ChannelAxis::One => (a.ndim() >= 2).then_some(1),
        ChannelAxis::Last => a.ndim().checked_sub(1),
    });
    let mut s = TensorStats::new(bins, axis);
    if t.channel_stats {
        s = s.with_channel_stats(CHANNEL_BINS);
    }
    s.update(a);
    s
}

/// Folds one sample's statistics into the accumulators (call in sample order).
pub fn fold_stats(acc: &mut [Option<TensorStats>], per_sample: Vec<Option<TensorStats>>) {
    for (slot, s) in acc.iter_mut().zip(per_sample) {
        if let Some(s) = s {
            match slot {
                Some(a) => a.merge(&s),
                None => *slot = Some(s),
            }
        }
    }
}

/// Calibrates `targets` of the model given as serialized bytes (see [`model_bytes`] and
/// [`crate::onnx::io::encode_for_runtime`]).
pub fn calibrate(
    model_bytes: &[u8],
    specs: &[InputSpec],
    set: &SampleSet,
    targets: &[Target],
    opts: &CalibOptions,
) -> Result<Calibration> {
    calibrate_with(model_bytes, specs, set, targets, opts, &[], |_, _: &mut (), _, _| Ok(()), |_, _| Ok(()))
}

/// [`calibrate`] that also hands `extra` tensors to the caller in the same pass: per sample,
/// `visit(sample, state, k, value)` sees each `extra[k]` once, as soon as the runtime has
/// computed it (so in no fixed order of `k`: see [`Plan::run_visit_f32`]; a view into tract's
/// buffer, `None` when not float; a name may repeat and may also be a target), starting from
/// `S::default()`, and `fold` receives each sample's state in sample order.
///
/// `extra[k].1` is the number of first samples that need `extra[k]`. When some are needed by
/// fewer samples than others, the samples past them run a second plan without those tensors
/// (loaded before the last sample that needs them runs, while the others run), or nothing when
/// that plan would have no output: a tensor requested from tract is kept from fusions and
/// handed over, which costs time (PP-OCR det: the outputs of 83 Conv layers, +12% over its
/// calibration).
#[allow(clippy::too_many_arguments)]
pub fn calibrate_with<S: Default + Send>(
    model_bytes: &[u8],
    specs: &[InputSpec],
    set: &SampleSet,
    targets: &[Target],
    opts: &CalibOptions,
    extra: &[(String, usize)],
    visit: impl Fn(usize, &mut S, usize, Option<ndarray::ArrayViewD<'_, f32>>) -> Result<()> + Sync,
    mut fold: impl FnMut(usize, S) -> Result<()> + Send,
) -> Result<Calibration> {
    let t0 = Instant::now();
    if set.is_empty() {
        bail!("no calibration samples");
    }
    let sources = stats_sources(targets);
    // Only the targets calibrated directly become tract outputs.
    let direct: Vec<usize> = (0..targets.len()).filter(|&i| sources[i] == Source::Direct).collect();
    let mut names: Vec<String> = direct.iter().map(|&i| targets[i].name.clone()).collect();
    names.extend(extra.iter().map(|e| e.0.clone()));
    let facts = input_facts(specs, set)?;
    let n = set.len();
    // Samples before `split` run `plan` (every extra); the rest run the second plan, whose
    // extras are those needed by every sample (`rest[k']`: the index in `extra`).
    let split = extra.iter().map(|e| e.1).filter(|&m| m < n).max().unwrap_or(0);
    let rest: Vec<usize> = (0..extra.len()).filter(|&k| extra[k].1 >= n).collect();
    let rest_names: Vec<String> =
        names[..direct.len()].iter().cloned().chain(rest.iter().map(|&k| extra[k].0.clone())).collect();
    // Past the split with nothing requested (no target, no extra for them), nothing runs.
    let skip_rest = split > 0 && rest_names.is_empty();
    let second = (split > 0 && !skip_rest).then(|| (std::sync::OnceLock::<Result<Plan>>::new(), rest_names));
    let second_plan = || -> Result<&Plan> {
        let (cell, rest_names) = second.as_ref().context("internal error: no second plan")?;
        cell.get_or_init(|| Plan::load(model_bytes, None, &facts, rest_names))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
    };
    // Both plans are loaded side by side before any sample runs: loading one is a single
    // thread's work (tract's optimizer), so the second takes the otherwise idle core instead
    // of holding up a worker in the middle of the run. (PP-OCR det: 0.17 s each alone, about
    // 0.28 s each side by side, as they share one malloc arena; 6 alternated runs, 6.97 ->
    // 6.86 s, and the plan no longer lands in a heap fragmented by the samples: peak RSS 539
    // -> 458 MB.)
    let (plan, _) = rayon::join(
        || Plan::load(model_bytes, None, &facts, &names),
        || {
            if second.is_some() {
                // A failure is kept in the cell and reported by the first sample that needs it.
                let _ = second_plan();
            }
        },
    );
    let plan = plan?;
    let pb = progress(set.len(), opts.quiet, "calibrating");
    let mut acc: Vec<Option<TensorStats>> = vec![None; direct.len()];
    let bins = opts.bins;
    for_each_sample_with(
        set,
        &pb,
        |i, inputs| {
            // Statistics straight from tract's buffers: no copy of the (many, large) outputs.
            let mut state = S::default();
            let mut failed = None;
            if i >= split && skip_rest {
                return Ok((Vec::new(), S::default()));
            }
            let (plan, extra_of) =
                if i >= split && second.is_some() { (second_plan()?, Some(&rest)) } else { (&plan, None) };
            let stats = plan.run_visit_f32(inputs, |p, view| match direct.get(p) {
                Some(&t) => Some(view_stats(view?, &targets[t], bins)),
                None => {
                    let k = p - direct.len();
                    let k = extra_of.map_or(Some(k), |r| r.get(k).copied());
                    if let (None, Some(k)) = (&failed, k) {
                        failed = visit(i, &mut state, k, view).err();
                    }
                    None
                }
            })?;
            match failed {
                Some(e) => Err(e),
                None => Ok((stats, state)),
            }
        },
        |i, (per_sample, state)| {
            fold_stats(&mut acc, per_sample);
            fold(i, state)
        },
    )?;
    let slot_of: std::collections::HashMap<usize, usize> = direct.iter().enumerate().map(|(k, &i)| (i, k)).collect();
    let computed = |i: usize| acc[*slot_of.get(&i)?].as_ref();
    // A merged target's statistics: those of its parts, in order (only when all are there).
    let merged = |parts: &[usize]| -> Option<TensorStats> {
        let mut it = parts.iter().map(|&p| computed(p));
        let mut s = it.next()??.without_channels();
        for p in it {
            s.merge(&p?.without_channels());
        }
        Some(s)
    };
    // Per-channel statistics only for a target with a channel axis (never merged or an alias).
    let stats_of = |i: usize, t: &Target| -> Option<TensorStats> {
        let own =
            |j: usize| computed(j).map(|s| if t.channel_axis.is_none() { s.without_channels() } else { s.clone() });
        match &sources[i] {
            Source::Direct => own(i),
            Source::Same(j) => own(*j),
            Source::Merged(parts) => merged(parts),
        }
    };
    let tensors = targets.iter().enumerate().filter_map(|(i, t)| Some((t.name.clone(), stats_of(i, t)?))).collect();
    Ok(Calibration { tensors, samples: set.len(), seconds: t0.elapsed().as_secs_f64() })
}

/// One tensor's entry in the stats file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorEntry {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
    pub abs_max: f64,
    pub p99_9: f64,
    pub nan: u64,
    pub inf: u64,
    /// The range chosen by `method`, [lo, hi].
    pub range: [f32; 2],
    /// The symmetric range of the same method, [-m, m].
    pub range_symmetric: [f32; 2],
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channel_abs_max: Vec<f32>,
    /// Per-channel statistics, when the calibration kept them ([`Target::channel_stats`]);
    /// not part of the stats file.
    #[serde(skip)]
    pub channels: Option<std::sync::Arc<Vec<TensorStats>>>,
}

impl TensorEntry {
    /// The entry of one tensor's statistics, ranges by `method`.
    pub fn from_stats(s: &TensorStats, method: &RangeMethod) -> TensorEntry {
        Self::with_ranges(s, method, [true, true])
    }

    /// The entry the quantizer reads for activations of one signedness: the range of
    /// `method` only for that variant (`range_symmetric` when `symmetric`, else `range`); the
    /// other variant holds the min/max range (`[min, max]` or `±abs_max`), which costs nothing,
    /// where a range search (mse, entropy) costs a pass over the histogram per candidate.
    pub fn for_quantizer(s: &TensorStats, method: &RangeMethod, symmetric: bool) -> TensorEntry {
        Self::with_ranges(s, method, [!symmetric, symmetric])
    }

    /// `searched`: whether `range` and `range_symmetric` use `method` (else min/max).
    fn with_ranges(s: &TensorStats, method: &RangeMethod, searched: [bool; 2]) -> TensorEntry {
        let range_of =
            |sym: bool, searched: bool| s.range(if searched { method } else { &RangeMethod::MinMax }, 256, sym);
        let (lo, hi) = range_of(false, searched[0]);
        let (slo, shi) = range_of(true, searched[1]);
        TensorEntry {
            count: s.count(),
            min: s.min(),
            max: s.max(),
            mean: s.mean(),
            std: s.std(),
            abs_max: s.abs_max(),
            p99_9: s.quantile_abs(0.999),
            nan: s.nan_count(),
            inf: s.inf_count(),
            range: [lo, hi],
            range_symmetric: [slo, shi],
            channel_abs_max: s.channel_absmax().to_vec(),
            channels: (!s.channel_stats().is_empty()).then(|| std::sync::Arc::new(s.channel_stats().to_vec())),
        }
    }
}

/// The ranges `quantize` reads from a calibration (see [`TensorEntry::for_quantizer`]),
/// by tensor name.
pub fn quantizer_ranges(cal: &Calibration, method: &RangeMethod, symmetric: bool) -> BTreeMap<String, TensorEntry> {
    cal.tensors
        .par_iter()
        .map(|(name, s)| (name.clone(), TensorEntry::for_quantizer(s, method, symmetric)))
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

/// The stats file written by `onnxq calibrate` (schema documented in README).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsFile {
    pub onnxq_stats_version: u32,
    pub model: String,
    pub method: String,
    pub samples: usize,
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl StatsFile {
    pub fn from_calibration(model: &str, cal: &Calibration, method: &RangeMethod) -> Self {
        // Range searches (mse, entropy) dominate: one tensor per task, collected in order.
        let tensors = cal
            .tensors
            .par_iter()
            .map(|(name, s)| (name.clone(), TensorEntry::from_stats(s, method)))
            .collect::<Vec<_>>()
            .into_iter()
            .collect();
        StatsFile {
            onnxq_stats_version: 1,
            model: model.to_string(),
            method: method.to_string(),
            samples: cal.samples,
            tensors,
        }
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read stats file {}", path.display()))?;
        let f: StatsFile =
            serde_json::from_str(&text).with_context(|| format!("{} is not an onnxq stats file", path.display()))?;
        if f.onnxq_stats_version != 1 {
            bail!("{}: unsupported stats version {}", path.display(), f.onnxq_stats_version);
        }
        Ok(f)
    }
}

/// The stderr summary of `onnxq calibrate`: counts, time, and the top tensors by max/p99.9.
pub fn summary(cal: &Calibration) -> String {
    let mut ratios: Vec<(f64, &str, f64, f64)> = cal
        .tensors
        .iter()
        .filter_map(|(n, s)| {
            let p = s.quantile_abs(0.999);
            (p > 0.0).then(|| (s.abs_max() / p, n.as_str(), s.abs_max(), p))
        })
        .collect();
    ratios.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    let mut out = format!(
        "calibrated {} tensors on {} samples in {:.2} s\ntop tensors by max/p99.9 (outlier view):\n",
        cal.tensors.len(),
        cal.samples,
        cal.seconds
    );
    for (r, n, m, p) in ratios.iter().take(10) {
        out.push_str(&format!("  {r:>8.1}x  {n}  (abs max {m:.4}, p99.9 {p:.4})\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{graph, node, tensor_info};

    /// The outlier fixture's 16 calibration samples.
    fn fixture_samples() -> Result<SampleSet> {
        let (model, data) = crate::fixtures::checked_in("outliers", None)?;
        crate::data::open(&input_specs(model.graph.as_ref().context("graph")?), &data)
    }

    /// An extra tensor needed by the first samples only: the rest run a second plan without
    /// it, and every target's statistics are those of one plan for all samples.
    #[test]
    fn extras_needed_by_the_first_samples_only_leave_the_statistics_unchanged() -> Result<()> {
        let (model, _) = crate::fixtures::checked_in("outliers", None)?;
        let set = fixture_samples()?;
        let specs = input_specs(model.graph.as_ref().context("graph")?);
        let targets = quantization_targets(&model, &crate::quantize::QuantOptions::default())?;
        let bytes = crate::onnx::io::encode_for_runtime(&model)?;
        let g = model.graph.as_ref().context("graph")?;
        // A layer's output that is not a target (as the outlier pass requests them).
        let extra = g
            .node
            .iter()
            .map(|n| n.output[0].clone())
            .find(|o| targets.iter().all(|t| &t.name != o))
            .context("no tensor outside the targets")?;
        let opts = CalibOptions { bins: 2048, quiet: true };
        let run = |upto: usize| -> Result<(Calibration, Vec<usize>)> {
            let mut seen = Vec::new();
            let c = calibrate_with(
                &bytes,
                &specs,
                &set,
                &targets,
                &opts,
                &[(extra.clone(), upto)],
                |_, n: &mut usize, k, v| {
                    assert_eq!(k, 0);
                    *n += usize::from(v.is_some());
                    Ok(())
                },
                |_, n| {
                    seen.push(n);
                    Ok(())
                },
            )?;
            Ok((c, seen))
        };
        let (all, seen_all) = run(set.len())?;
        let (first, seen_first) = run(5)?;
        assert_eq!(seen_all, vec![1; 16]);
        assert_eq!(seen_first, (0..16).map(|i| usize::from(i < 5)).collect::<Vec<_>>());
        assert_eq!(all.tensors, first.tensors);
        assert!(!all.tensors.is_empty());
        Ok(())
    }

    /// Samples run on every thread without barriers, yet fold strictly in sample order, and
    /// the first failure in sample order is the one returned, whichever sample fails first
    /// in time.
    #[test]
    fn samples_fold_in_order_and_the_first_failure_in_order_wins() -> Result<()> {
        let set = fixture_samples()?;
        assert_eq!(set.len(), 16);
        let pb = indicatif::ProgressBar::hidden();
        // Later samples finish first: sample i sleeps (16 - i) ms.
        let slow = |i: usize| std::thread::sleep(std::time::Duration::from_millis((16 - i) as u64));
        let mut seen = Vec::new();
        for_each_sample_with(
            &set,
            &pb,
            |i, _| {
                slow(i);
                Ok(i)
            },
            |i, v| {
                assert_eq!(i, v);
                seen.push(i);
                Ok(())
            },
        )?;
        assert_eq!(seen, (0..16).collect::<Vec<_>>());
        let mut folded = 0;
        let err = for_each_sample_with(
            &set,
            &pb,
            |i, _| {
                slow(i);
                match i {
                    5 | 9 => bail!("run {i} failed"),
                    _ => Ok(i),
                }
            },
            |i, _| {
                folded = i + 1;
                if i == 7 {
                    bail!("fold {i} failed");
                }
                Ok(())
            },
        )
        .err()
        .context("no error")?;
        assert!(format!("{err:#}").contains("run 5 failed"), "{err:#}");
        assert_eq!(folded, 5);
        // A fold failure before any run failure is the one returned.
        let err = for_each_sample_with(&set, &pb, |i, _| Ok(i), |i, _| if i == 2 { bail!("fold 2") } else { Ok(()) })
            .err()
            .context("no error")?;
        assert_eq!(format!("{err}"), "fold 2");
        Ok(())
    }

    /// A slow fold does not hold up the other workers: while sample 0 is folded, samples 1 to
    /// 3 (the window of two workers) still run. (When the fold held the loop's lock, the other
    /// worker could not hand in sample 1 and the fold below timed out.)
    #[test]
    fn the_other_workers_run_while_a_sample_is_folded() -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
        let pb = indicatif::ProgressBar::hidden();
        let ran = AtomicUsize::new(0);
        let mut waited = Vec::new();
        pool.install(|| {
            for_each_index(
                8,
                &pb,
                |i| {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok(i)
                },
                |i, _| {
                    if i == 0 {
                        let t = std::time::Instant::now();
                        while ran.load(Ordering::SeqCst) < 4 && t.elapsed().as_secs() < 5 {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        waited.push(ran.load(Ordering::SeqCst));
                    }
                    Ok(())
                },
            )
        })?;
        assert_eq!(waited, vec![4], "samples run while sample 0 was folded: {waited:?}");
        Ok(())
    }

    /// An Identity (not a quantizable op) between two quantizable ones: its output takes the
    /// statistics of its input, as a Reshape's does, so it is not pinned as a tract output.
    #[test]
    fn identity_and_reshape_outputs_share_their_input_statistics() -> Result<()> {
        let f = dtype::FLOAT;
        let g = graph(
            "g",
            vec![
                node("Relu", "r", &["x"], &["a"], vec![]),
                node("Identity", "i", &["a"], &["b"], vec![]),
                node("Relu", "r2", &["b"], &["c"], vec![]),
                node("Flatten", "f", &["c"], &["d"], vec![]),
                node("Sigmoid", "s", &["d"], &["y"], vec![]),
            ],
            vec![tensor_info("x", f, &[1, 4])],
            vec![tensor_info("y", f, &[1, 4])],
            vec![],
        );
        let targets = default_targets(&GraphView::new(&g))?;
        let alias = |name: &str| targets.iter().find(|t| t.name == name).map(|t| t.same_values_as.clone());
        assert_eq!(alias("b"), Some(Some("a".to_string())));
        assert_eq!(alias("d"), Some(Some("c".to_string())));
        assert_eq!((alias("a"), alias("c"), alias("y")), (Some(None), Some(None), Some(None)));
        // Only the Relu outputs, the input and the graph output are calibrated directly.
        let direct: Vec<&str> = pinned_targets(&targets).iter().map(|t| t.name.as_str()).collect();
        assert_eq!(direct, ["x", "a", "c", "y"]);
        Ok(())
    }

    /// A Concat output whose inputs are all calibrated takes the merge of their statistics
    /// (and so does a tensor rearranging it): neither is pinned, and the result is what
    /// calibrating them directly gives, exactly but for the last bits of the sums.
    #[test]
    fn concat_outputs_merge_their_inputs_statistics() -> Result<()> {
        use crate::onnx::builder::{attr_int, model};
        let f = dtype::FLOAT;
        // 4 x 48 x 48 elements per input: large enough for the interleaved sub-histograms.
        let g = graph(
            "g",
            vec![
                node("Relu", "r", &["x"], &["a"], vec![]),
                node("Sigmoid", "s", &["x"], &["b"], vec![]),
                node("Concat", "c", &["a", "b", "a"], &["c"], vec![attr_int("axis", 1)]),
                node("Flatten", "f", &["c"], &["e"], vec![]),
                node("Sigmoid", "s2", &["e"], &["y"], vec![]),
            ],
            vec![tensor_info("x", f, &[1, 4, 48, 48])],
            vec![tensor_info("y", f, &[1, 36864])],
            vec![],
        );
        let targets = default_targets(&GraphView::new(&g))?;
        let c = targets.iter().find(|t| t.name == "c").context("no target c")?;
        assert_eq!(c.concat_of, ["a", "b", "a"]);
        let pinned: Vec<&str> = pinned_targets(&targets).iter().map(|t| t.name.as_str()).collect();
        assert_eq!(pinned, ["x", "a", "b", "y"]);
        // The same targets, each calibrated from its own values.
        let direct: Vec<Target> =
            targets.iter().map(|t| Target { same_values_as: None, concat_of: Vec::new(), ..t.clone() }).collect();
        assert_eq!(pinned_targets(&direct).len(), targets.len());
        let data = crate::data::DataOptions {
            sources: vec![crate::data::Source::Random { count: 3, seed: 7 }],
            ..Default::default()
        };
        let specs = input_specs(&g);
        let set = crate::data::open(&specs, &data)?;
        let bytes = crate::onnx::io::encode_for_runtime(&model(g.clone(), 13))?;
        let opts = CalibOptions { bins: 2048, quiet: true };
        let (merged, computed) =
            (calibrate(&bytes, &specs, &set, &targets, &opts)?, calibrate(&bytes, &specs, &set, &direct, &opts)?);
        assert_eq!(merged.tensors.len(), computed.tensors.len());
        for ((name, a), (other, b)) in merged.tensors.iter().zip(&computed.tensors) {
            assert_eq!(name, other);
            assert_eq!(a.histogram(), b.histogram(), "{name}");
            assert_eq!((a.count(), a.min(), a.max()), (b.count(), b.min(), b.max()), "{name}");
            assert!((a.sum_sq() - b.sum_sq()).abs() <= 1e-12 * b.sum_sq().abs(), "{name}");
            assert!((a.mean() - b.mean()).abs() <= 1e-12 * b.mean().abs().max(1e-300), "{name}");
        }
        let c = merged.tensors.iter().find(|(n, _)| n == "c").context("no statistics of c")?;
        assert_eq!(c.1.count(), 3 * 3 * 4 * 48 * 48);
        Ok(())
    }
}
