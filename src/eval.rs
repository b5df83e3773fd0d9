//! `onnxq eval`: compares a candidate model (typically the quantized one) with a reference
//! model on the same samples, output by output and optionally tensor by tensor.
//!
//! Owns the error metrics (SQNR, cosine similarity, max abs error, relative L2 error, top-1
//! agreement, exact-match rate), their streaming accumulation, the per-layer matching and
//! "SQNR drop" ranking, and the text, JSON and SVG renderings.
//!
//! Both models run in tract. A candidate containing quantization ops runs through its float
//! fake-quant twin ([`crate::fakequant::twin`]), which keeps tensor names, so per-layer
//! matching is by name: every float tensor a REF node produces that a CAND (twin) node also
//! produces.
//!
//! Accumulation: each sample's outputs are reduced to f64 partial sums right after the run and
//! dropped; partial sums are folded strictly in sample order, so the results do not depend on
//! the thread count. SQNR = 10·log10(Σref² / Σ(ref−cand)²), relative L2 = sqrt(Σ(ref−cand)² /
//! Σref²), cosine is the mean over samples of the flattened cosine, top-1 agreement is the
//! fraction of rows (all axes but the last) whose argmax over the last axis agrees. Element
//! pairs where either side is extreme (NaN, infinite, or a mask sentinel of magnitude 1e30 or
//! more, like the -3.4e38 added to masked attention scores) are left out of the sums: a pair of
//! the same kind (both NaN, both huge positive, both huge negative) matches, any other pair is
//! counted as a mismatch. A perfect match has an infinite SQNR: `inf` in
//! text, `null` with `"identical": true` in JSON, never NaN.

use crate::array::{dtype, ArrayData};
use crate::calibrate::{input_specs, progress};
use crate::data::{DataOptions, InputSpec, SampleSet};
use crate::onnx::pb::{GraphProto, ModelProto};
use crate::onnx::{GraphView, Model};
use crate::runtime::{InputFact, Plan};
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// SQNR values above this are float32 rounding noise; the per-layer drop ranking treats
/// identical tensors and graph inputs as having this SQNR.
pub const SQNR_CAP_DB: f64 = 140.0;

/// How many of the largest drops are listed, marked and annotated.
const WORST_LISTED: usize = 10;
const WORST_MARKED: usize = 5;
/// Drops below this are float noise, not worth listing.
pub const MIN_DROP_DB: f64 = 0.5;

#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// Also compare intermediate tensors.
    pub per_layer: bool,
    pub quiet: bool,
}

/// Error metrics of one tensor over all samples.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    /// Every element equal (bit-for-bit up to the sign of zero).
    pub identical: bool,
    /// `null` when infinite (identical) or undefined (the reference is all zeros); always
    /// `null` for integer tensors.
    pub sqnr_db: Option<f64>,
    /// Mean over samples of the cosine similarity; `null` for integer tensors.
    pub cosine: Option<f64>,
    pub max_abs_error: f64,
    /// `null` for integer tensors and when the reference is all zeros but the candidate is not.
    pub rel_l2_error: Option<f64>,
    /// Fraction of rows whose argmax over the last axis agrees (float tensors whose last dim
    /// is above 1).
    pub top1_agreement: Option<f64>,
    /// Fraction of equal elements (integer tensors only).
    pub exact_match: Option<f64>,
    /// Element pairs where one side is extreme (NaN, infinite or a mask sentinel, |v| ≥ 1e30)
    /// and the other is not the same kind of value.
    pub extreme_mismatches: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputReport {
    pub name: String,
    pub elem_type: String,
    /// Shape in the first sample.
    pub shape: Vec<usize>,
    /// Elements compared over all samples.
    pub elements: u64,
    #[serde(flatten)]
    pub metrics: Metrics,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    /// 1-based position among the compared tensors, in REF's topological order.
    pub index: usize,
    pub tensor: String,
    /// The REF node producing the tensor.
    pub node: String,
    pub op_type: String,
    /// The CAND node producing the tensor reads dequantized data (or is an integer op).
    pub quantized: bool,
    #[serde(flatten)]
    pub metrics: Metrics,
    /// The best SQNR among the node's inputs that carry error (an input CAND lacks is traced
    /// back to its nearest compared ancestors; graph inputs, weights and identical tensors do
    /// not count), capped at `sqnr_cap_db`; the cap when no input carries error.
    pub input_sqnr_db: f64,
    /// `input_sqnr_db` minus this tensor's (capped) SQNR: the SQNR this node loses.
    pub drop_db: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Drop {
    pub tensor: String,
    pub node: String,
    pub op_type: String,
    pub sqnr_db: Option<f64>,
    pub drop_db: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub tensor: String,
    pub node: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub sqnr_cap_db: f64,
    /// Float tensors produced by REF nodes that CAND does not produce.
    pub unmatched: usize,
    pub layers: Vec<LayerRow>,
    /// The largest drops, largest first (drops of at least 0.5 dB only).
    pub worst: Vec<Drop>,
    /// Quantized CAND nodes with the largest drops: the first ones to keep in float.
    pub exclude_candidates: Vec<Drop>,
    /// Matched tensors that could not be compared (not float, or shapes differ).
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub reference: String,
    pub candidate: String,
    /// CAND contains quantization ops and ran through its float fake-quant twin.
    pub candidate_twin: bool,
    pub samples: usize,
    /// Every output identical.
    pub identical: bool,
    pub outputs: Vec<OutputReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_layer: Option<LayerReport>,
}

/// Streaming sums of one tensor's comparison.
#[derive(Debug, Clone, Default)]
struct Acc {
    int: bool,
    elem_type: i32,
    shape: Vec<usize>,
    samples: u64,
    elements: u64,
    sum_ref2: f64,
    sum_err2: f64,
    max_abs: f64,
    cos_sum: f64,
    top1_rows: u64,
    top1_agree: u64,
    exact: u64,
    extreme_mismatches: u64,
    /// Extreme pairs of the same kind whose values differ (they break `identical` only).
    extreme_unequal: u64,
}

fn float_values(a: &ArrayData) -> Option<Box<dyn Iterator<Item = f64> + '_>> {
    match a {
        ArrayData::F32(a) => Some(Box::new(a.iter().map(|&v| f64::from(v)))),
        ArrayData::F64(a) => Some(Box::new(a.iter().copied())),
        _ => None,
    }
}

fn int_values(a: &ArrayData) -> Option<Box<dyn Iterator<Item = i64> + '_>> {
    match a {
        ArrayData::I64(a) => Some(Box::new(a.iter().copied())),
        ArrayData::I32(a) => Some(Box::new(a.iter().map(|&v| i64::from(v)))),
        ArrayData::I8(a) => Some(Box::new(a.iter().map(|&v| i64::from(v)))),
        ArrayData::U8(a) => Some(Box::new(a.iter().map(|&v| i64::from(v)))),
        ArrayData::Bool(a) => Some(Box::new(a.iter().map(|&v| i64::from(v)))),
        _ => None,
    }
}

/// Magnitudes from here on are mask sentinels, not signal.
pub const SENTINEL_ABS: f64 = 1e30;

/// NaN, infinite, or a mask sentinel.
fn is_extreme(v: f64) -> bool {
    v.is_nan() || v.abs() >= SENTINEL_ABS
}

/// 0: an ordinary value, 1: NaN, 2: huge positive, 3: huge negative.
fn extreme_kind(v: f64) -> u8 {
    if v.is_nan() {
        1
    } else if v >= SENTINEL_ABS {
        2
    } else if v <= -SENTINEL_ABS {
        3
    } else {
        0
    }
}

/// Argmax of one row, updated element by element (first index wins ties; NaN never wins).
#[derive(Clone, Copy)]
struct ArgMax {
    index: usize,
    value: f64,
}

impl ArgMax {
    fn update(&mut self, i: usize, v: f64) {
        if i == 0 || v > self.value || (self.value.is_nan() && !v.is_nan()) {
            *self = ArgMax { index: i, value: v };
        }
    }
}

/// One sample's comparison of a tensor, or why it cannot be compared.
type Compared = std::result::Result<Acc, String>;

/// One sample's comparison of `r` (REF) and `c` (CAND); `Err` says why they cannot be compared.
fn compare(r: &ArrayData, c: &ArrayData) -> Compared {
    if r.shape() != c.shape() {
        return Err(format!("shape {:?} in REF but {:?} in CAND", r.shape(), c.shape()));
    }
    let mut acc = Acc { elem_type: r.elem_type(), shape: r.shape().to_vec(), samples: 1, ..Acc::default() };
    acc.elements = r.len() as u64;
    let type_err =
        || format!("element type {} in REF but {} in CAND", dtype::name(r.elem_type()), dtype::name(c.elem_type()));
    if let (Some(ri), Some(ci)) = (float_values(r), float_values(c)) {
        let last = r.shape().last().copied().unwrap_or(1);
        let rows = !r.shape().is_empty() && last > 1;
        let (mut dot, mut cand2) = (0f64, 0f64);
        let mut am = (ArgMax { index: 0, value: 0.0 }, ArgMax { index: 0, value: 0.0 });
        for (i, (a, b)) in ri.zip(ci).enumerate() {
            if !is_extreme(a) && !is_extreme(b) {
                let e = a - b;
                acc.sum_ref2 += a * a;
                acc.sum_err2 += e * e;
                acc.max_abs = acc.max_abs.max(e.abs());
                dot += a * b;
                cand2 += b * b;
            } else if extreme_kind(a) != extreme_kind(b) {
                acc.extreme_mismatches += 1;
            } else if !(a == b || (a.is_nan() && b.is_nan())) {
                acc.extreme_unequal += 1;
            }
            if rows {
                let col = i % last;
                am.0.update(col, a);
                am.1.update(col, b);
                if col == last - 1 {
                    acc.top1_rows += 1;
                    acc.top1_agree += u64::from(am.0.index == am.1.index);
                }
            }
        }
        acc.cos_sum = if acc.sum_err2 == 0.0 {
            1.0
        } else if acc.sum_ref2 == 0.0 || cand2 == 0.0 {
            0.0
        } else {
            (dot / (acc.sum_ref2.sqrt() * cand2.sqrt())).clamp(-1.0, 1.0)
        };
        return Ok(acc);
    }
    if let (Some(ri), Some(ci)) = (int_values(r), int_values(c)) {
        acc.int = true;
        for (a, b) in ri.zip(ci) {
            acc.exact += u64::from(a == b);
            acc.max_abs = acc.max_abs.max((a as f64 - b as f64).abs());
        }
        return Ok(acc);
    }
    Err(type_err())
}

impl Acc {
    fn merge(&mut self, o: Acc) {
        if self.samples == 0 {
            *self = o;
            return;
        }
        self.samples += o.samples;
        self.elements += o.elements;
        self.sum_ref2 += o.sum_ref2;
        self.sum_err2 += o.sum_err2;
        self.max_abs = self.max_abs.max(o.max_abs);
        self.cos_sum += o.cos_sum;
        self.top1_rows += o.top1_rows;
        self.top1_agree += o.top1_agree;
        self.exact += o.exact;
        self.extreme_mismatches += o.extreme_mismatches;
        self.extreme_unequal += o.extreme_unequal;
    }

    fn metrics(&self) -> Metrics {
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        if self.int {
            return Metrics {
                identical: self.exact == self.elements,
                sqnr_db: None,
                cosine: None,
                max_abs_error: self.max_abs,
                rel_l2_error: None,
                top1_agreement: None,
                exact_match: Some(ratio(self.exact, self.elements)),
                extreme_mismatches: 0,
            };
        }
        let (sr, se) = (self.sum_ref2, self.sum_err2);
        Metrics {
            identical: se == 0.0 && self.extreme_mismatches == 0 && self.extreme_unequal == 0,
            sqnr_db: (se > 0.0 && sr > 0.0).then(|| 10.0 * (sr / se).log10()),
            cosine: Some(if self.samples == 0 { 1.0 } else { self.cos_sum / self.samples as f64 }),
            max_abs_error: self.max_abs,
            rel_l2_error: if se == 0.0 { Some(0.0) } else { (sr > 0.0).then(|| (se / sr).sqrt()) },
            top1_agreement: (self.top1_rows > 0).then(|| ratio(self.top1_agree, self.top1_rows)),
            exact_match: None,
            extreme_mismatches: self.extreme_mismatches,
        }
    }
}

/// A REF tensor compared per layer.
#[derive(Debug, Clone)]
struct Layer {
    tensor: String,
    node: String,
    op_type: String,
    quantized: bool,
}

fn is_float_type(t: i32) -> bool {
    matches!(t, 0 | dtype::FLOAT | dtype::FLOAT16 | dtype::DOUBLE | 16)
}

/// Whether CAND's producer of `tensor` is a quantized node: an integer op, or a node reading a
/// DequantizeLinear output.
fn quantized_producer(cand: &GraphView, tensor: &str) -> bool {
    let Some(p) = cand.producer(tensor) else { return false };
    if matches!(p.op_type(), "MatMulInteger" | "ConvInteger" | "QLinearConv" | "QLinearMatMul") {
        return true;
    }
    p.input.iter().any(|i| cand.producer(i).is_some_and(|q| q.op_type() == "DequantizeLinear"))
}

/// The tensors compared per layer, in REF's topological order, and the count of unmatched ones.
fn match_layers(reference: &GraphProto, twin: &GraphProto, original: &GraphProto) -> Result<(Vec<Layer>, usize)> {
    let rv = GraphView::new(reference);
    let tv = GraphView::new(twin);
    let ov = GraphView::new(original);
    let mut layers = Vec::new();
    let mut unmatched = 0;
    let mut seen = HashSet::new();
    for i in rv.topo_order().context("REF")? {
        let n = &reference.node[i];
        if n.op_type() == "Constant" {
            continue;
        }
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if !is_float_type(rv.elem_type(o)) || !seen.insert(o.clone()) {
                continue;
            }
            if tv.producer(o).is_none() || tv.weight(o).is_some() || !is_float_type(tv.elem_type(o)) {
                unmatched += 1;
                continue;
            }
            layers.push(Layer {
                tensor: o.clone(),
                node: n.name().to_string(),
                op_type: n.op_type().to_string(),
                quantized: quantized_producer(&ov, o),
            });
        }
    }
    Ok((layers, unmatched))
}

fn model_label(m: &Model) -> String {
    m.path.as_ref().map_or_else(|| "<in memory>".to_string(), |p| p.display().to_string())
}

fn names_of<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = items.collect();
    format!("[{}]", v.join(", "))
}

/// Runs both models on the samples of `data` and compares them.
pub fn evaluate(reference: &Model, candidate: &Model, data: &DataOptions, opts: &EvalOptions) -> Result<Report> {
    let (rl, cl) = (model_label(reference), model_label(candidate));
    let rg = reference.proto.graph.as_ref().with_context(|| format!("REF {rl} has no graph"))?;
    let cg = candidate.proto.graph.as_ref().with_context(|| format!("CAND {cl} has no graph"))?;
    GraphView::new(rg).validate().with_context(|| format!("invalid model {rl}"))?;
    GraphView::new(cg).validate().with_context(|| format!("invalid model {cl}"))?;

    let ro: Vec<&str> = rg.output.iter().map(|o| o.name()).collect();
    let co: Vec<&str> = cg.output.iter().map(|o| o.name()).collect();
    if ro.iter().collect::<HashSet<_>>() != co.iter().collect::<HashSet<_>>() {
        bail!(
            "the models have different outputs: REF {rl} has {}, CAND {cl} has {}",
            names_of(ro.iter().copied()),
            names_of(co.iter().copied())
        );
    }
    let rspecs = input_specs(rg);
    let cspecs = input_specs(cg);
    let cmap: HashMap<&str, &InputSpec> = cspecs.iter().map(|s| (s.name.as_str(), s)).collect();
    if rspecs.len() != cspecs.len() || rspecs.iter().any(|s| !cmap.contains_key(s.name.as_str())) {
        bail!(
            "the models have different inputs: REF {rl} has {}, CAND {cl} has {}",
            names_of(rspecs.iter().map(|s| s.name.as_str())),
            names_of(cspecs.iter().map(|s| s.name.as_str()))
        );
    }

    let candidate_twin = crate::fakequant::needs_twin(&candidate.proto);
    let cand_proto: ModelProto = if candidate_twin {
        crate::fakequant::twin(&candidate.proto)
            .with_context(|| format!("cannot build the float fake-quant twin of CAND {cl}"))?
    } else {
        candidate.proto.clone()
    };
    let tg = cand_proto.graph.as_ref().context("the twin has no graph")?;
    let (layers, unmatched) = if opts.per_layer { match_layers(rg, tg, cg)? } else { (Vec::new(), 0) };

    let set = crate::data::open(&rspecs, data)?;
    let mut requested: Vec<String> = ro.iter().map(|s| s.to_string()).collect();
    requested.extend(layers.iter().map(|l| l.tensor.clone()));

    let rbytes = crate::calibrate::model_bytes(reference)?;
    let cbytes = crate::onnx::io::encode_for_runtime(&cand_proto)?;
    let plans = build_plans(&set, &rspecs, &cmap, &rbytes, &cbytes, &requested, (&rl, &cl))?;

    let n_out = ro.len();
    let mut outputs: Vec<Acc> = vec![Acc::default(); n_out];
    let mut layer_accs: Vec<Compared> = vec![Ok(Acc::default()); layers.len()];
    let pb = progress(set.len(), opts.quiet, "evaluating");
    let chunk = (rayon::current_num_threads() * 2).max(1);
    let mut start = 0;
    while start < set.len() {
        let end = (start + chunk).min(set.len());
        let results: Vec<Result<(String, Vec<Compared>)>> = (start..end)
            .into_par_iter()
            .map(|i| {
                let sample = set.load(i)?;
                let shapes: Vec<Vec<usize>> = sample.inputs.iter().map(|a| a.shape().to_vec()).collect();
                let pair = plans
                    .iter()
                    .find(|p| p.shapes == shapes)
                    .with_context(|| format!("sample {}: no plan for input shapes {shapes:?}", sample.source))?;
                // Side by side too: with fewer samples than threads (the opset check runs one)
                // the sample loop alone would leave a core idle.
                let (r, c) = rayon::join(
                    || {
                        pair.reference
                            .run(&sample.inputs)
                            .with_context(|| format!("sample {}: running REF {rl}", sample.source))
                    },
                    || {
                        pair.candidate
                            .run(&sample.inputs)
                            .with_context(|| format!("sample {}: running CAND {cl}", sample.source))
                    },
                );
                let (r, c) = (r?, c?);
                let cmp = r.iter().zip(&c).map(|(r, c)| compare(r, c)).collect();
                pb.inc(1);
                Ok((sample.source, cmp))
            })
            .collect();
        for r in results {
            let (source, cmp) = r?;
            for (k, res) in cmp.into_iter().enumerate() {
                if k < n_out {
                    let acc = res.map_err(|e| anyhow!("sample {source}: output '{}': {e}", ro[k]))?;
                    outputs[k].merge(acc);
                } else if let Some(slot) = layer_accs.get_mut(k - n_out) {
                    match (slot.as_mut(), res) {
                        (Ok(a), Ok(acc)) => a.merge(acc),
                        (Ok(_), Err(e)) => *slot = Err(format!("sample {source}: {e}")),
                        (Err(_), _) => {}
                    }
                }
            }
        }
        start = end;
    }
    pb.finish_and_clear();

    let outputs: Vec<OutputReport> = ro
        .iter()
        .zip(&outputs)
        .map(|(name, a)| OutputReport {
            name: name.to_string(),
            elem_type: dtype::name(a.elem_type).to_string(),
            shape: a.shape.clone(),
            elements: a.elements,
            metrics: a.metrics(),
        })
        .collect();
    let per_layer = if opts.per_layer { Some(layer_report(rg, &layers, layer_accs, unmatched)?) } else { None };
    Ok(Report {
        reference: rl,
        candidate: cl,
        candidate_twin,
        samples: set.len(),
        identical: outputs.iter().all(|o| o.metrics.identical),
        outputs,
        per_layer,
    })
}

struct PlanPair {
    shapes: Vec<Vec<usize>>,
    reference: Plan,
    candidate: Plan,
}

/// One pair of plans per distinct set of input shapes among the samples.
fn build_plans(
    set: &SampleSet,
    rspecs: &[InputSpec],
    cmap: &HashMap<&str, &InputSpec>,
    rbytes: &[u8],
    cbytes: &[u8],
    requested: &[String],
    (rl, cl): (&str, &str),
) -> Result<Vec<PlanPair>> {
    let mut plans: Vec<PlanPair> = Vec::new();
    for i in 0..set.len() {
        let shapes = set.sample_shapes(i).with_context(|| format!("sample #{i} has no checked shapes"))?;
        if plans.iter().any(|p| p.shapes == shapes) {
            continue;
        }
        let facts = |cand: bool| -> Vec<InputFact> {
            rspecs
                .iter()
                .zip(shapes)
                .map(|(s, shape)| {
                    let elem_type =
                        if cand { cmap.get(s.name.as_str()).map_or(s.elem_type, |c| c.elem_type) } else { s.elem_type };
                    InputFact { name: s.name.clone(), elem_type, shape: shape.clone() }
                })
                .collect()
        };
        // tract's plan optimization is single threaded: the two load side by side.
        let (reference, candidate) = rayon::join(
            || Plan::load(rbytes, None, &facts(false), requested).with_context(|| format!("cannot run REF {rl}")),
            || Plan::load(cbytes, None, &facts(true), requested).with_context(|| format!("cannot run CAND {cl}")),
        );
        let (reference, candidate) = (reference?, candidate?);
        plans.push(PlanPair { shapes: shapes.to_vec(), reference, candidate });
    }
    Ok(plans)
}

/// SQNR of a metrics row for the drop ranking: identical → the cap, clamped to ±cap.
fn capped(m: &Metrics) -> f64 {
    let v = match m.sqnr_db {
        Some(v) => v,
        None if m.rel_l2_error == Some(0.0) => SQNR_CAP_DB,
        None => -SQNR_CAP_DB,
    };
    v.clamp(-SQNR_CAP_DB, SQNR_CAP_DB)
}

fn layer_report(
    reference: &GraphProto,
    layers: &[Layer],
    accs: Vec<Compared>,
    unmatched: usize,
) -> Result<LayerReport> {
    let rv = GraphView::new(reference);
    let mut compared: HashMap<&str, (&Layer, Compared)> =
        layers.iter().zip(accs).map(|(l, a)| (l.tensor.as_str(), (l, a))).collect();
    let mut rows: Vec<LayerRow> = Vec::new();
    let mut skipped = Vec::new();
    // The best (capped) SQNR of the error reaching each REF tensor: a compared tensor's own,
    // and for tensors CAND lacks (a Relu folded into a Q, say) the best of their producer's
    // inputs, so a drop is measured from the nearest compared ancestors. Tensors without error
    // (graph inputs, weights, identical tensors) carry none: a node reading only those starts
    // from the cap, and an Add of a clean branch (attention mask, residual input) and a noisy
    // one is measured against the noisy one.
    let mut reach: HashMap<&str, f64> = HashMap::new();
    for i in rv.topo_order().context("REF")? {
        let n = &reference.node[i];
        let best_input = n
            .input
            .iter()
            .filter_map(|s| reach.get(s.as_str()).copied())
            .fold(None, |best: Option<f64>, v| Some(best.map_or(v, |b| b.max(v))));
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            let (l, acc) = match compared.remove(o.as_str()) {
                Some((l, Ok(a))) if a.int => (l, Err("integer tensor".to_string())),
                Some(x) => x,
                None => {
                    if let Some(b) = best_input {
                        reach.insert(o, b);
                    }
                    continue;
                }
            };
            let m = match acc {
                Ok(a) => a.metrics(),
                Err(reason) => {
                    skipped.push(Skipped { tensor: l.tensor.clone(), node: l.node.clone(), reason });
                    if let Some(b) = best_input {
                        reach.insert(o, b);
                    }
                    continue;
                }
            };
            let own = capped(&m);
            let input_sqnr = best_input.unwrap_or(SQNR_CAP_DB);
            if !m.identical {
                reach.insert(o, own);
            }
            rows.push(LayerRow {
                index: rows.len() + 1,
                tensor: l.tensor.clone(),
                node: l.node.clone(),
                op_type: l.op_type.clone(),
                quantized: l.quantized,
                metrics: m,
                input_sqnr_db: input_sqnr,
                drop_db: input_sqnr - own,
            });
        }
    }
    let mut order: Vec<&LayerRow> = rows.iter().filter(|r| r.drop_db >= MIN_DROP_DB).collect();
    order.sort_by(|a, b| b.drop_db.total_cmp(&a.drop_db).then(a.index.cmp(&b.index)));
    let drop = |r: &&LayerRow| Drop {
        tensor: r.tensor.clone(),
        node: r.node.clone(),
        op_type: r.op_type.clone(),
        sqnr_db: r.metrics.sqnr_db,
        drop_db: r.drop_db,
    };
    let worst = order.iter().take(WORST_LISTED).map(drop).collect();
    let mut seen_nodes = HashSet::new();
    let exclude_candidates = order
        .iter()
        .filter(|r| r.quantized && seen_nodes.insert(r.node.clone()))
        .take(WORST_LISTED)
        .map(drop)
        .collect();
    Ok(LayerReport { sqnr_cap_db: SQNR_CAP_DB, unmatched, layers: rows, worst, exclude_candidates, skipped })
}

fn sqnr_text(m: &Metrics) -> String {
    match (m.sqnr_db, m.exact_match) {
        (Some(v), _) => format!("{v:.2}"),
        (None, Some(_)) => "-".to_string(),
        (None, None) if m.rel_l2_error == Some(0.0) => "inf".to_string(),
        (None, None) => "-inf".to_string(),
    }
}

fn sci(v: f64) -> String {
    if v == 0.0 {
        "0".to_string()
    } else {
        format!("{v:.3e}")
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

/// Left-aligned columns separated by two spaces; `right` marks right-aligned columns.
fn table(header: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&width)
            .enumerate()
            .map(
                |(k, (c, &w))| {
                    if right.get(k).copied().unwrap_or(false) {
                        format!("{c:>w$}")
                    } else {
                        format!("{c:<w$}")
                    }
                },
            )
            .collect();
        format!("  {}\n", parts.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// The text summary; the per-layer table only when `layers` is set.
pub fn render_text(r: &Report, layers: bool) -> String {
    let mut out = format!(
        "REF   {}\nCAND  {}{}\n{} samples\n\n",
        r.reference,
        r.candidate,
        if r.candidate_twin { " (run as its float fake-quant twin)" } else { "" },
        r.samples
    );
    let rows: Vec<Vec<String>> = r
        .outputs
        .iter()
        .map(|o| {
            let m = &o.metrics;
            let shape: Vec<String> = o.shape.iter().map(|d| d.to_string()).collect();
            vec![
                o.name.clone(),
                o.elem_type.clone(),
                format!("[{}]", shape.join(",")),
                sqnr_text(m),
                opt(m.cosine, |v| format!("{v:.6}")),
                sci(m.max_abs_error),
                opt(m.rel_l2_error, sci),
                opt(m.top1_agreement.or(m.exact_match), |v| format!("{:.2}%", v * 100.0)),
            ]
        })
        .collect();
    out.push_str(&table(
        &["output", "type", "shape", "SQNR dB", "cosine", "max abs err", "rel L2", "top-1/exact"],
        &rows,
        &[false, false, false, true, true, true, true, true],
    ));
    for o in &r.outputs {
        if o.metrics.extreme_mismatches > 0 {
            out.push_str(&format!(
                "  warning: output '{}': {} element(s) are NaN, infinite or beyond 1e30 on one side only\n",
                o.name, o.metrics.extreme_mismatches
            ));
        }
    }
    out.push('\n');
    out.push_str(if r.identical { "REF and CAND outputs are identical\n" } else { "REF and CAND outputs differ\n" });
    if let (true, Some(l)) = (layers, &r.per_layer) {
        out.push('\n');
        out.push_str(&render_layers(l));
    }
    out
}

fn render_layers(l: &LayerReport) -> String {
    let mut out = format!(
        "per-layer SQNR in REF topological order ({} tensors; drop = best SQNR among noisy inputs - SQNR, capped at {} dB)\n",
        l.layers.len(),
        l.sqnr_cap_db
    );
    let marked: HashSet<&str> = l.worst.iter().take(WORST_MARKED).map(|d| d.tensor.as_str()).collect();
    let rows: Vec<Vec<String>> = l
        .layers
        .iter()
        .map(|r| {
            vec![
                r.index.to_string(),
                r.tensor.clone(),
                r.node.clone(),
                r.op_type.clone(),
                if r.quantized { "q".to_string() } else { String::new() },
                sqnr_text(&r.metrics),
                opt(r.metrics.cosine, |v| format!("{v:.6}")),
                format!("{:.2}", r.drop_db),
                if marked.contains(r.tensor.as_str()) { "<<".to_string() } else { String::new() },
            ]
        })
        .collect();
    out.push_str(&table(
        &["#", "tensor", "node", "op", "quant", "SQNR dB", "cosine", "drop dB", ""],
        &rows,
        &[true, false, false, false, false, true, true, true, false],
    ));
    if l.unmatched > 0 {
        out.push_str(&format!("  {} REF tensor(s) have no counterpart in CAND\n", l.unmatched));
    }
    for s in &l.skipped {
        out.push_str(&format!("  skipped '{}' (node '{}'): {}\n", s.tensor, s.node, s.reason));
    }
    let list = |d: &[Drop]| -> String {
        d.iter()
            .take(WORST_MARKED)
            .map(|d| format!("{} ({} '{}', drop {:.2} dB)", d.tensor, d.op_type, d.node, d.drop_db))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if l.worst.is_empty() {
        out.push_str(&format!("\nno tensor loses {MIN_DROP_DB} dB of SQNR or more\n"));
    } else {
        out.push_str(&format!("\nlargest drops: {}\n", list(&l.worst)));
    }
    if l.exclude_candidates.is_empty() {
        out.push_str("exclude candidates: none (no quantized node loses SQNR)\n");
    } else {
        out.push_str(&format!(
            "exclude candidates (quantized nodes, largest drop first): {}\n",
            list(&l.exclude_candidates)
        ));
    }
    out
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving at most `max_ticks` ticks.
fn nice_step(span: f64, max_ticks: usize) -> f64 {
    let raw = (span / max_ticks.max(1) as f64).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(10.0 * mag)
}

/// A line chart of per-layer SQNR along REF's topological order, the largest drops annotated.
pub fn render_svg(l: &LayerReport, title: &str) -> String {
    let (w, h) = (960.0f64, 480.0f64);
    let (left, right, top, bottom) = (70.0, 30.0, 50.0, 70.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        xml_escape(title)
    );
    if l.layers.is_empty() {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no tensors to compare</text>\n</svg>\n",
            w / 2.0,
            h / 2.0
        ));
        return s;
    }
    // Identical tensors sit on an "inf" line one tick above the finite values.
    let finite: Vec<f64> = l.layers.iter().filter(|r| !r.metrics.identical).map(|r| capped(&r.metrics)).collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if finite.is_empty() { (0.0, 0.0) } else { (lo, hi) };
    // At least 10 dB of vertical span, so float noise does not look like a cliff.
    let step = nice_step((hi - lo).max(10.0), 8);
    let ymin = (lo / step).floor() * step;
    let ymax_finite = ((hi / step).ceil() * step).max(ymin + (10.0 / step).ceil() * step);
    let any_identical = l.layers.iter().any(|r| r.metrics.identical);
    let y_inf = ymax_finite + step;
    let ymax = if any_identical { y_inf } else { ymax_finite };
    let values: Vec<f64> =
        l.layers.iter().map(|r| if r.metrics.identical { y_inf } else { capped(&r.metrics) }).collect();
    let n = values.len();
    let x_of = |i: usize| if n == 1 { left + pw / 2.0 } else { left + pw * i as f64 / (n - 1) as f64 };
    let y_of = |v: f64| top + ph * (1.0 - (v - ymin) / (ymax - ymin));
    // Grid and y ticks.
    let mut t = ymin;
    let mut guard = 0;
    while t <= ymax_finite + step * 1e-9 && guard < 100 {
        let y = y_of(t);
        s.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left + pw,
            left - 6.0,
            y + 4.0,
            if step >= 1.0 { format!("{t:.0}") } else { format!("{t:.1}") }
        ));
        t += step;
        guard += 1;
    }
    if any_identical {
        let y = y_of(y_inf);
        s.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#bbbbbb\" stroke-dasharray=\"4,3\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">identical</text>\n",
            left + pw,
            left - 6.0,
            y + 4.0
        ));
    }
    // X ticks: layer numbers.
    let xstep = (nice_step(n as f64, 15).ceil() as usize).max(1);
    for i in (0..n).step_by(xstep) {
        let x = x_of(i);
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            top + ph,
            top + ph + 5.0,
            top + ph + 19.0,
            i + 1
        ));
    }
    // Axes and labels.
    s.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">tensor (REF topological order)</text>\n\
         <text x=\"18\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.1})\">SQNR (dB)</text>\n",
        top + ph,
        top + ph,
        left + pw,
        top + ph,
        left + pw / 2.0,
        h - 20.0,
        top + ph / 2.0,
        top + ph / 2.0
    ));
    // The line and points (hollow: identical, on the "identical" line).
    let pts: Vec<String> = values.iter().enumerate().map(|(i, &v)| format!("{:.1},{:.1}", x_of(i), y_of(v))).collect();
    s.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n",
        pts.join(" ")
    ));
    for (i, (r, &v)) in l.layers.iter().zip(&values).enumerate() {
        let fill = if r.metrics.identical { "white" } else { "#1f77b4" };
        s.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{fill}\" stroke=\"#1f77b4\"><title>{} ({}): {} dB</title></circle>\n",
            x_of(i),
            y_of(v),
            xml_escape(&r.tensor),
            xml_escape(&r.op_type),
            sqnr_text(&r.metrics)
        ));
    }
    // The largest drops, annotated.
    for (k, d) in l.worst.iter().take(WORST_MARKED).enumerate() {
        let Some(i) = l.layers.iter().position(|r| r.tensor == d.tensor) else { continue };
        let (x, y) = (x_of(i), y_of(values[i]));
        let ty = (y - 14.0 - 14.0 * k as f64).max(top + 10.0);
        let anchor = if x > left + pw * 0.8 { "end" } else { "start" };
        s.push_str(&format!(
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\"/>\n\
             <line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{x:.1}\" y2=\"{ty:.1}\" stroke=\"#d62728\" stroke-dasharray=\"2,2\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" fill=\"#d62728\" stroke=\"white\" \
             stroke-width=\"3\" paint-order=\"stroke\">{} (drop {:.1} dB)</text>\n",
            ty - 3.0,
            xml_escape(&d.tensor),
            d.drop_db
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// Writes the per-layer chart atomically.
pub fn write_plot(path: &Path, r: &Report) -> Result<()> {
    let l = r.per_layer.as_ref().context("the plot needs the per-layer comparison")?;
    let title = format!("per-layer SQNR of {} against {}", r.candidate, r.reference);
    let svg = render_svg(l, &title);
    crate::onnx::io::write_atomic(path, |w| w.write_all(svg.as_bytes()).map_err(Into::into))
        .with_context(|| format!("cannot write the plot {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn f(shape: &[usize], v: Vec<f32>) -> ArrayData {
        ArrayData::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
    }

    #[test]
    fn metrics_of_identical_and_noisy_tensors() {
        let a = f(&[2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.0]);
        let m = compare(&a, &a).unwrap().metrics();
        assert!(m.identical);
        assert_eq!(m.sqnr_db, None);
        assert_eq!(m.cosine, Some(1.0));
        assert_eq!(m.rel_l2_error, Some(0.0));
        assert_eq!(m.top1_agreement, Some(1.0));
        assert_eq!(sqnr_text(&m), "inf");
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"sqnr_db\":null") && !json.contains("NaN"), "{json}");

        // Error 0.1 on one element of [1,2,3,-1,0.5,0] → Σref² = 15.25, Σerr² = 0.01.
        let b = f(&[2, 3], vec![1.0, 2.0, 3.1, -1.0, 0.5, 0.0]);
        let mut acc = compare(&a, &b).unwrap();
        let m = acc.metrics();
        let e2 = (3.1f32 as f64 - 3.0).powi(2);
        assert!((m.sqnr_db.unwrap() - 10.0 * (15.25 / e2).log10()).abs() < 1e-9);
        assert!((m.rel_l2_error.unwrap() - (e2 / 15.25).sqrt()).abs() < 1e-12);
        assert!((m.max_abs_error - (3.1f32 as f64 - 3.0)).abs() < 1e-12);
        assert_eq!(m.top1_agreement, Some(1.0));
        // Argmax of row 0 flips, row 1 does not.
        let c = f(&[2, 3], vec![1.0, 3.5, 3.0, -1.0, 0.5, 0.0]);
        acc.merge(compare(&a, &c).unwrap());
        let m = acc.metrics();
        assert_eq!(m.top1_agreement, Some(0.75));
        assert!(m.cosine.unwrap() < 1.0 && m.cosine.unwrap() > 0.9);

        // Zero reference: no SQNR, no NaN anywhere.
        let z = f(&[3], vec![0.0; 3]);
        let m = compare(&z, &z).unwrap().metrics();
        assert!(m.identical && m.rel_l2_error == Some(0.0) && m.cosine == Some(1.0));
        let m = compare(&z, &f(&[3], vec![0.0, 1.0, 0.0])).unwrap().metrics();
        assert!(!m.identical && m.sqnr_db.is_none() && m.rel_l2_error.is_none());
        assert_eq!(sqnr_text(&m), "-inf");

        // Non-finite values are counted, not summed.
        let n = f(&[3], vec![f32::NAN, 1.0, f32::INFINITY]);
        let m = compare(&n, &n).unwrap().metrics();
        assert!(m.identical, "{m:?}");
        let m = compare(&n, &f(&[3], vec![0.0, 1.0, 2.0])).unwrap().metrics();
        assert_eq!(m.extreme_mismatches, 2);
        // Mask sentinels: same-kind pairs match and stay out of the sums.
        let r = f(&[4], vec![1.0, -3.4e38, -3.4e38, 2.0]);
        let m = compare(&r, &f(&[4], vec![1.1, -3.4e38, f32::NEG_INFINITY, 2.0])).unwrap().metrics();
        let e2 = (1.1f32 as f64 - 1.0).powi(2);
        assert!((m.sqnr_db.unwrap() - 10.0 * (5.0 / e2).log10()).abs() < 1e-9, "{m:?}");
        assert_eq!(m.extreme_mismatches, 0);
        let m = compare(&r, &f(&[4], vec![1.0, -3.4e38, -3.3e38, 2.0])).unwrap().metrics();
        assert!(!m.identical && m.rel_l2_error == Some(0.0));
        let m = compare(&r, &f(&[4], vec![1.0, 5.0, -3.4e38, 2.0])).unwrap().metrics();
        assert_eq!(m.extreme_mismatches, 1);
        assert!(!m.identical);

        // Integers: exact-match rate; mismatched shapes and types are reasons, not panics.
        let i = ArrayData::I64(ArrayD::from_shape_vec(IxDyn(&[4]), vec![1, 2, 3, 4]).unwrap());
        let j = ArrayData::I64(ArrayD::from_shape_vec(IxDyn(&[4]), vec![1, 2, 0, 4]).unwrap());
        let m = compare(&i, &j).unwrap().metrics();
        assert_eq!(m.exact_match, Some(0.75));
        assert!(!m.identical);
        assert!(compare(&i, &f(&[4], vec![0.0; 4])).unwrap_err().contains("int64"));
        assert!(compare(&a, &f(&[6], vec![0.0; 6])).unwrap_err().contains("shape"));
    }

    #[test]
    fn svg_is_well_formed_and_escaped() {
        let m = |sqnr: Option<f64>, identical: bool| Metrics {
            identical,
            sqnr_db: sqnr,
            cosine: Some(1.0),
            max_abs_error: 0.0,
            rel_l2_error: Some(if identical { 0.0 } else { 0.1 }),
            top1_agreement: None,
            exact_match: None,
            extreme_mismatches: 0,
        };
        let layers: Vec<LayerRow> = [(None, true), (Some(30.0), false), (Some(12.5), false)]
            .into_iter()
            .enumerate()
            .map(|(i, (s, id))| LayerRow {
                index: i + 1,
                tensor: format!("t<{i}>&"),
                node: format!("n{i}"),
                op_type: "Conv".into(),
                quantized: true,
                metrics: m(s, id),
                input_sqnr_db: SQNR_CAP_DB,
                drop_db: 1.0,
            })
            .collect();
        let worst = vec![Drop {
            tensor: "t<2>&".into(),
            node: "n2".into(),
            op_type: "Conv".into(),
            sqnr_db: Some(12.5),
            drop_db: 17.5,
        }];
        let l = LayerReport {
            sqnr_cap_db: SQNR_CAP_DB,
            unmatched: 0,
            layers,
            worst,
            exclude_candidates: vec![],
            skipped: vec![],
        };
        let svg = render_svg(&l, "a & b");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t&lt;2&gt;&amp; (drop 17.5 dB)") && svg.contains("a &amp; b"));
        assert!(!svg.contains("NaN"));
        assert_eq!(svg.matches("<circle").count(), 4);
        let empty = LayerReport { layers: vec![], worst: vec![], ..l };
        assert!(render_svg(&empty, "x").contains("no tensors"));
        assert_eq!(nice_step(140.0, 8), 20.0);
        assert_eq!(nice_step(7.0, 15), 0.5);
    }
}
