//! Outlier-aware weight regularization: find the activation outliers a layer outputs, find
//! the few weight elements that make them, shrink those weights while keeping the layer's
//! function on the calibration data, then quantize.
//!
//! # Why
//! A per-tensor int8 activation scale is `max |y| / 127`. Real transformers produce a few
//! massive elements (MiniLM-L6: an FFN output reaches |y| = 194 at 173× its 99.9th
//! percentile, one token, one channel), which wipes out the resolution of every other value of
//! that tensor. Such an element is typically one product `x_ik·w_kj` of one large input and
//! one large weight, so editing a handful of weights removes it.
//!
//! # Candidates
//! `onnxq outliers` and `onnxq regularize` look at every regularizable layer. `onnxq quantize`
//! knows its placement and regularizes only the layers whose output values it quantizes
//! ([`placement_candidates`]): the layer's output, its own bias Add, or a tensor reached from
//! those through data movement, Relu or MaxPool carries Q/DQ. A layer whose output stays
//! float (under the transformer preset the attention-output and FFN MatMuls feeding the float
//! residual stream, and the FFN's first MatMul whose Gelu output is a different tensor) has no
//! scale to protect: editing it could only perturb the float model. Such layers are listed in
//! the report with the reason.
//!
//! # Method (per layer, in graph order, constants are flags)
//! For each layer `y = x·W` (`W` is `[K, N]`; MatMul with a 2-D constant weight, Gemm with
//! `transB` and `α` folded in, 2-D Conv with `W [M, C/g, kh, kw]` as `[K = C/g·kh·kw, M]`)
//! with input rows `x_i` (leading dims flattened; for Conv the im2col patches of each group
//! on a deterministic subsample of output positions, [`crate::im2col`], and every formula
//! below holds per group with the group's rows and columns; see [`layer`]):
//!
//! 1. **Statistics** (streamed over the samples, see [`collect`]): the exact
//!    `q = quantile_0.999(|Y|)` over all calibration elements of the layer (pre-bias), the
//!    Gram matrix `G = XᵀX` (f64), the column sums `Σ_i x_i`, the input rows of the outliers,
//!    and (guarded runs) a bounded, evenly spaced subset of all input rows. Detection (which
//!    layers have outliers, steps 1–2 without the Gram and rows) comes first and is cheap: a
//!    MatMul's `y` is its own output tensor and a Conv's is its output minus its constant bias
//!    `B` at the sampled positions, both read from the runtime instead of recomputed through
//!    im2col and a matrix product (`onnxq outliers` then gathers only the outliers' patches);
//!    only the layers found with outliers get the full statistics (step 6). In `quantize` and
//!    `regularize` the detection is a screen on the first quarter of the samples (at least
//!    [`MIN_SCREEN_SAMPLES`]); the sequential pass then takes every flagged layer's
//!    statistics, outliers included, on all of them.
//! 2. **Outliers**: `O = {(i, j) : |y_ij| > τ}`, `τ = c·q`, `c = 4`. Not `k` standard
//!    deviations: those flag Gaussian tails everywhere. Layers without outliers are left alone.
//! 3. **Relevance** ([`solve::relevance`]): each outlier's main contributor
//!    `k* = argmax_k x_ik·w_kj·sign(y_ij)`; with the excess `e_ij = |y_ij| − τ`,
//!    `R_kj = Σ_{outliers of j with k* = k} e_ij / Σ_{outliers of j} e_ij`, and the selected set
//!    `S_j = {k : R_kj ≥ 0.1}` (at most 8, largest first).
//! 4. **Regularization** of every column `j` with outliers:
//!    `w'_j = argmin_w ‖X w − t_j‖² + λ Σ_{k∈S_j} w_k² + δ ‖w − w_j‖²`,
//!    `t_j = clip(X w_j, −τ, τ)`, `λ = δ = tr(G)/K` (times `--reg-lambda`, `--reg-delta`).
//!    Closed form: `w'_j = w_j − (G + δI + λE_S E_Sᵀ)⁻¹ (λE_S w_S + Xᵀr_j)` with
//!    `r_j = X w_j − t_j`, non-zero only on outlier rows, so `Xᵀr_j = Σ_{i∈O_j} x_i r_ij`.
//!    `G + δI` is factored once per layer (per group) (Cholesky) and the rank-`|S_j|` term is
//!    applied per column with the Woodbury identity. The damping `δ` keeps the fit from
//!    overfitting the low-rank calibration rows, and the target clips the outliers instead of
//!    preserving them (a ridge that preserves `X w_j` would keep them by construction). Then
//!    `b_j += mean_{i∉O_j} x_i·(w_j − w'_j)` when the layer feeds a constant bias (the Add
//!    after a MatMul, Gemm's `C`, Conv's `B`); no bias is created otherwise. `shrink` mode
//!    instead scales the selected weights by `γ = 0.5`.
//! 5. **Local acceptance** (`--regularize auto`, [`LocalError`]): with `z = x·W + b` the
//!    original layer's float output and `z' = x·W' + b'` the edited one on the kept rows,
//!    `Q` / `Q'` uint8 fake quantization with the range of `z` / `z'` over the kept and the
//!    outlier rows, the edit is kept iff
//!    `Σ_{(i,j)∉O} (Q'(z'_ij) − z_ij)² < Σ_{(i,j)∉O} (Q(z_ij) − z_ij)²`: the ordinary values
//!    of the layer's output come out of int8 closer to the original float values, the float
//!    change of the edit included. The outlier elements themselves are left out (clipping
//!    them is the point; whether the model tolerates it is the global guard's question).
//! 6. The next layer's statistics are computed on the model with the edits kept so far:
//!    [`segment`] runs the graph piece by piece with a cached frontier, so the whole sequence
//!    costs one forward pass, which also gathers the calibration statistics of every tensor
//!    at or after the first layer with outliers (the earlier ones cannot change), i.e. the
//!    recalibration of the regularized model.
//! 7. **Global guard** ([`guard`], `--regularize auto`): plain quantization (ranges of the
//!    first pass) and the regularized model (ranges of step 6) are each quantized, run as
//!    fake-quant twins on the guard's samples and compared with the original float
//!    outputs (kept from the first pass); the regularized model is returned only if its
//!    worst-output SQNR is strictly higher, else the input model. The guard's samples are
//!    the first [`GUARD_SAMPLES`] (8) calibration samples (all of them when there are
//!    fewer), the first half of those bias correction measures on: the comparison is paired
//!    (both models on the same samples against the same reference), so its noise is that of
//!    the SQNR *difference*, and it keeps the guard's cost, two fake-quant passes over these
//!    samples, a quarter of a calibration pass each on 32 samples, bounded whatever the
//!    calibration set's size. `auto` is therefore never worse than plain quantization on the guard's samples
//!    (the report's `guard_samples`). The pipeline quantizes the returned model with the
//!    returned ranges (no further calibration).
//!
//! # Cost
//! `auto`: one statistics pass (the calibration plain quantization needs anyway, plus the
//! candidate layers' outlier detection from their outputs on the screen's samples, the
//! samples past it on a second plan without those outputs when the weights are small,
//! [`SPLIT_MAX_WEIGHT_BYTES`], and the float outputs of the guard's samples), nothing more
//! when no candidate layer has outliers; else one sequential
//! pass (statistics, Gram matrices, recalibration) and, when an edit was kept, two fake-quant
//! forward passes over the guard's samples. In the sequential pass a MatMul or Conv layer's
//! piece runs through the layer, so `y` comes from the runtime; a MatMul's output is then
//! kept for the next piece when the local acceptance keeps all its input rows (a kept edit
//! recomputes only the edited columns from them), else the next piece runs the layer again
//! with its edited weights ([`segment::Through`]). Calibration statistics are taken in the
//! runtime's buffers, Gram rows are multiplied [`collect::GRAM_ROWS`] at a time, and samples
//! run without barriers, folded in order while the others run ([`segment`],
//! [`crate::calibrate::for_each_index`]); the samples are looked at through a lock-free
//! [`collect::Sampler`] while the fold owns the accumulator. The plain model's twin is
//! quantized, loaded and run beside the sequential pass on background threads of the idle
//! scheduling class ([`crate::background`]: plan optimization is single-threaded, so it takes
//! the cores the pass leaves idle while it loads pieces and solves, without slowing the pass;
//! it is wasted when no edit is kept). It is awaited after the regularized twin's score;
//! usually it is done and dropped before the sequential pass ends (MiniLM-L6), otherwise both
//! twins are alive for a while. A twin loads
//! about as fast as the float model (one fused node per Q/DQ pair, [`crate::fakequant`]);
//! one twin with the constants where the two differ as inputs cost as much as two
//! (MiniLM-L6: ~620 differing scales). Both twins skip the float prefix ([`prefix`]: the
//! first pass keeps its frontier's values for the guard's samples), so neither copies
//! MiniLM-L6's 47 MB embedding table. Gram blocks and the factorization's products run on
//! [`crate::linalg`]. Ranges are searched only for the variant the
//! activation type reads
//! ([`crate::calibrate::quantizer_ranges`]). A forced strength and `onnxq regularize` run
//! the first two passes without calibration statistics. The report's `phase_seconds` and
//! `phase_cpu_seconds` give each phase's wall and CPU time (the plain twin's load and run count in
//! the sequential pass's).

pub mod collect;
pub mod guard;
pub mod layer;
pub mod prefix;
pub mod segment;
pub mod solve;

use crate::array::ArrayData;
use crate::calibrate::{self as cal, Calibration, Target, TensorEntry};
use crate::data::{DataOptions, InputSpec, SampleSet};
use crate::onnx::pb::ModelProto;
use crate::onnx::GraphView;
use crate::quantize::params::{ActParams, ActType};
use crate::quantize::{Preset, QuantOptions};
use crate::stats::{RangeMethod, TensorStats};
use anyhow::{bail, Context, Result};
use collect::{LayerAcc, LayerStats, SampleStats, Sampler};
use layer::{Layer, LayerKind, NotALayer};
use ndarray::{Array2, ArrayD, ArrayViewD, CowArray, Ix2};
use rayon::prelude::*;
use segment::{Through, Visit};
use serde::Serialize;
use solve::{Cholesky, Outlier};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

/// The first pass looks for the layers with outliers on the first quarter of the calibration
/// samples, at least this many (all of them when there are fewer): a screen that picks the
/// layers the sequential pass then examines on every sample. The layers' tensors it reads
/// are requested from the runtime only for these samples, so the others run without them
/// (PP-OCR det: the outputs of 83 Conv layers, kept from fusions and handed over, cost 12%
/// of its calibration).
pub const MIN_SCREEN_SAMPLES: usize = 8;

/// Models with at most this many bytes of weights run the first pass's samples past the
/// screen on a second plan without the layers' tensors ([`MIN_SCREEN_SAMPLES`]); larger ones
/// run one plan (two would hold the weights twice), which hands the layers' tensors over
/// for every sample, looked at only on the screen's.
pub const SPLIT_MAX_WEIGHT_BYTES: u64 = 32 << 20;

/// The number of samples the first pass looks for outliers on ([`MIN_SCREEN_SAMPLES`]).
pub fn screen_samples(n: usize) -> usize {
    n.min(MIN_SCREEN_SAMPLES.max(n.div_ceil(4)))
}

/// The global guard compares plain and regularized quantization on at most this many
/// calibration samples, the first ones (bias correction measures on the same ones). Its
/// comparison is paired, so few samples suffice to tell a real gain (MiniLM-L6: 2.1 → 8.3 dB
/// on 8 samples) from noise, and the guard's two twin passes stay cheap.
pub const GUARD_SAMPLES: usize = 8;

/// How selected weights are regularized.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Mode {
    /// The damped least-squares solve of the module docs.
    Solve,
    /// Scale the selected weights by `gamma`.
    Shrink { gamma: f64 },
}

/// The tuning constants of the method (module docs), with their defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Options {
    /// The quantile of `|y|` the threshold is based on (0.999).
    pub quantile: f64,
    /// `τ = tau_factor · quantile` (4).
    pub tau_factor: f64,
    /// Minimum relevance share `R_kj` for selection (0.1).
    pub min_share: f64,
    /// At most this many selected weights per column (8).
    pub max_per_column: usize,
    /// `λ = lambda · tr(G)/K` (1).
    pub lambda: f64,
    /// `δ = delta · tr(G)/K` (1).
    pub delta: f64,
    pub mode: Mode,
    #[serde(skip)]
    pub quiet: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            quantile: 0.999,
            tau_factor: 4.0,
            min_share: 0.1,
            max_per_column: 8,
            lambda: 1.0,
            delta: 1.0,
            mode: Mode::Solve,
            quiet: true,
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<()> {
        if !(self.quantile > 0.0 && self.quantile < 1.0) {
            bail!("the outlier quantile must be in (0, 1), got {}", self.quantile);
        }
        if !(self.tau_factor >= 1.0 && self.tau_factor.is_finite()) {
            bail!("the outlier threshold factor must be at least 1, got {}", self.tau_factor);
        }
        if !(0.0..=1.0).contains(&self.min_share) {
            bail!("the relevance share must be in [0, 1], got {}", self.min_share);
        }
        if self.max_per_column == 0 {
            bail!("at least one weight per column must be selectable");
        }
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            bail!("the regularization strength must be a non-negative number, got {}", self.lambda);
        }
        if !(self.delta > 0.0 && self.delta.is_finite()) {
            bail!("the damping must be positive, got {}", self.delta);
        }
        if let Mode::Shrink { gamma } = self.mode {
            if !(0.0..=1.0).contains(&gamma) {
                bail!("the shrink factor must be in [0, 1], got {gamma}");
            }
        }
        Ok(())
    }
}

/// `--regularize`: off, auto (guarded), or a forced strength (`λ` multiplier, unguarded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Regularize {
    Off,
    Auto,
    Strength(f64),
}

impl std::str::FromStr for Regularize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" | "none" => Ok(Regularize::Off),
            "auto" | "on" => Ok(Regularize::Auto),
            _ => match s.parse::<f64>() {
                Ok(v) if v >= 0.0 && v.is_finite() => Ok(Regularize::Strength(v)),
                _ => Err(format!("'{s}' is not auto, off or a non-negative strength")),
            },
        }
    }
}

impl std::fmt::Display for Regularize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Regularize::Off => write!(f, "off"),
            Regularize::Auto => write!(f, "auto"),
            Regularize::Strength(v) => write!(f, "{v}"),
        }
    }
}

// ---------------------------------------------------------------- reports

/// Outliers of one output column.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnOutliers {
    pub j: usize,
    pub count: usize,
    pub max_abs: f64,
    /// `Σ e_ij` over the column's outliers.
    pub excess: f64,
}

/// A weight element and its share of a column's outlier excess.
#[derive(Debug, Clone, Serialize)]
pub struct Contributor {
    /// Input index.
    pub k: usize,
    /// Output index.
    pub j: usize,
    /// `w_kj` (effective: Gemm's α and transB applied).
    pub weight: f32,
    /// `R_kj`.
    pub share: f64,
    /// `R_kj · Σ e_ij` of the column.
    pub excess: f64,
}

/// One layer's outlier analysis.
#[derive(Debug, Clone, Serialize)]
pub struct LayerOutliers {
    #[serde(flatten)]
    pub layer: Layer,
    pub rows: u64,
    pub elements: u64,
    /// `quantile(|y|)` (pre-bias).
    pub quantile: f64,
    pub tau: f64,
    pub abs_max: f64,
    /// `abs_max / τ`.
    pub max_over_tau: f64,
    pub outliers: usize,
    /// Columns with outliers, largest excess first.
    pub columns: Vec<ColumnOutliers>,
    /// Main contributing weights, largest excess first.
    pub top: Vec<Contributor>,
}

/// `onnxq outliers` output.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    pub model: String,
    pub samples: usize,
    pub quantile: f64,
    pub tau_factor: f64,
    pub layers: Vec<LayerOutliers>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_regularizable: Vec<NotALayer>,
}

/// One changed weight element.
#[derive(Debug, Clone, Serialize)]
pub struct WeightEdit {
    pub k: usize,
    pub j: usize,
    pub old: f32,
    pub new: f32,
}

/// A selected weight (`k ∈ S_j`).
#[derive(Debug, Clone, Serialize)]
pub struct Selected {
    pub k: usize,
    pub share: f64,
    pub old: f32,
    pub new: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ColumnEdit {
    pub j: usize,
    pub outliers: usize,
    /// Largest `|y_ij|` over the column's outliers, before and after (same input rows).
    pub peak_before: f64,
    pub peak_after: f64,
    pub selected: Vec<Selected>,
    /// Elements of the column that changed.
    pub changed: usize,
    /// `‖w_j − w'_j‖ / ‖w_j‖`.
    pub relative_change: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias_delta: Option<f32>,
    /// Every changed element, largest change first (omitted from the quantize report).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub edits: Vec<WeightEdit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerEdit {
    pub node: String,
    pub weight: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias: Option<String>,
    pub tau: f64,
    pub abs_max: f64,
    pub outliers: usize,
    pub mode: Mode,
    /// `λ` and `δ` (of the first group with outliers for grouped Conv).
    pub lambda: f64,
    pub delta: f64,
    pub columns: Vec<ColumnEdit>,
}

/// The local acceptance test of an edit: the squared error of the layer's int8-quantized
/// output against the original layer's float output, summed over the kept rows' elements that
/// are not outliers, without and with the edit.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LocalError {
    pub before: f64,
    pub after: f64,
}

/// What happened to one layer with outliers.
#[derive(Debug, Clone, Serialize)]
pub struct LayerDecision {
    pub node: String,
    pub accepted: bool,
    /// The local acceptance test (guarded runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_error: Option<LocalError>,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edit: Option<LayerEdit>,
}

/// The regularization section of a report.
#[derive(Debug, Clone, Serialize)]
pub struct RegularizationReport {
    pub mode: String,
    pub options: Options,
    pub samples: usize,
    /// Layers analysed: every regularizable layer, or under a placement (`onnxq quantize`)
    /// those whose output values the placement quantizes.
    pub candidate_layers: usize,
    /// Regularizable layers left alone because the placement keeps their output float.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub float_output_layers: Vec<NotALayer>,
    pub layers_with_outliers: usize,
    /// Plain quantization's worst-output SQNR on the guard's samples (guarded runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_sqnr_db: Option<f64>,
    /// The returned model's (guarded runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_sqnr_db: Option<f64>,
    /// Worst-output SQNR of the regularized float model against the original float model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub float_sqnr_db: Option<f64>,
    /// Samples the global guard compared on (the first [`GUARD_SAMPLES`]; guarded runs
    /// with an edit kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_samples: Option<usize>,
    /// Whether the returned model differs from the input.
    pub regularized: bool,
    pub layers: Vec<LayerDecision>,
    /// Forward passes over the samples (statistics, sequential pass, guard).
    pub passes: usize,
    /// Wall time of each phase (s).
    pub phase_seconds: BTreeMap<String, f64>,
    /// CPU time (user + system, all threads) of each phase (s); empty where unavailable.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub phase_cpu_seconds: BTreeMap<String, f64>,
    pub pieces: usize,
    pub seconds: f64,
}

// ---------------------------------------------------------------- forward pass

/// Per sample, per graph output: the float values (`None` for other element types).
pub type Outputs = Vec<Vec<Option<ArrayD<f32>>>>;

/// A tensor whose values a pass keeps, for its first `samples` samples; a `budgeted` one
/// only while the budgeted tensors' values fit in the pass's budget.
struct KeptTensor {
    name: String,
    samples: usize,
    budgeted: bool,
}

struct PassOut {
    calibration: Option<Calibration>,
    outputs: Outputs,
    layers: Vec<LayerStats>,
}

/// What an extra tensor of the statistics pass is for.
#[derive(Clone, Copy)]
enum Role {
    /// A MatMul or Conv layer's output (`y`, for Conv plus its bias), read from the runtime
    /// instead of recomputed.
    Output(usize),
    /// That layer's input: the rows of its outlier candidates.
    OutlierRows(usize),
    /// A Gemm or Conv layer's input: its statistics are computed from it.
    Input(usize),
    /// A tensor whose values are kept (graph outputs, frontiers).
    Kept,
}

/// One sample of the statistics pass.
#[derive(Default)]
struct PassSample {
    layers: Vec<Option<SampleStats>>,
    /// A layer's input when the runtime hands it over before the layer's output (the usual,
    /// topological order) and the pass reads `y` from that output: the outlier rows are
    /// picked once the output is seen.
    pending_rows: Vec<Option<ArrayD<f32>>>,
    outputs: Vec<Option<ArrayD<f32>>>,
}

/// How a statistics pass gets a layer's pre-bias output `y`.
enum Source {
    /// Computed from the layer's input rows and its weight `[K, N]`.
    Computed(Array2<f32>),
    /// A MatMul's output tensor, read from the runtime (it is `y`).
    MatMulOutput,
    /// A Conv's output tensor minus its bias input `B` (none: no `B`), read from the runtime
    /// at the positions [`layer::input_rows`] picks.
    ConvOutput(Option<Vec<f32>>),
}

/// How `l`'s `y` can be read from the runtime: a MatMul's output, or a Conv's output minus its
/// constant (or absent) bias; `None` when it must be computed (Gemm, grouped MatMul, a Conv
/// with a computed bias).
fn runtime_source(view: &GraphView, l: &Layer) -> Result<Option<Source>> {
    Ok(match l.kind {
        LayerKind::MatMul if l.groups == 1 => Some(Source::MatMulOutput),
        LayerKind::Conv => layer::conv_bias(view, l)?.map(Source::ConvOutput),
        _ => None,
    })
}

/// A layer of a statistics pass and how it gets `y`.
type PassLayer<'a> = (&'a Layer, Source);

/// The layers of a statistics pass and how each gets `y`: MatMul and Conv (with a constant or
/// no `B`) layers read it from the runtime (the Conv's outlier rows are then the only im2col
/// patches gathered); the others compute it, so only their weights are converted up front.
fn with_weights<'a>(model: &ModelProto, layers: &'a [Layer]) -> Result<Vec<PassLayer<'a>>> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    layers
        .iter()
        .map(|l| {
            let source = runtime_source(&view, l)?;
            Ok((
                l,
                match source {
                    Some(s) => s,
                    None => Source::Computed(layer::weight_matrix(model, l)?),
                },
            ))
        })
        .collect()
}

/// Adds the input rows of a sample's outlier candidates from the layer's input `x`: all rows
/// of a MatMul, only the candidates' patches of a Conv.
fn attach_input(l: &Layer, s: &mut SampleStats, x: &ArrayViewD<'_, f32>) -> Result<()> {
    if l.conv.is_some() {
        let ids = s.missing_rows();
        if !ids.is_empty() {
            s.add_rows(layer::conv_patch_rows(l, x.view(), &ids)?);
        }
        Ok(())
    } else {
        s.attach_rows(&[as_rows(x, l.k)?.view()])
    }
}

/// `value` as `[rows, width]` rows (a view when it is in standard layout).
pub(crate) fn as_rows<'a>(value: &'a ArrayViewD<'a, f32>, width: usize) -> Result<CowArray<'a, f32, Ix2>> {
    if width == 0 || value.ndim() == 0 || value.shape()[value.ndim() - 1] != width {
        bail!("a tensor of shape {:?} does not end with {width}", value.shape());
    }
    let rows = value.len() / width;
    Ok(match value.view().into_shape_with_order((rows, width)) {
        Ok(v) => CowArray::from(v),
        Err(_) => CowArray::from(value.as_standard_layout().into_owned().into_shape_with_order((rows, width))?),
    })
}

/// Brings a layer output kept by [`Through::Keep`] up to date after the layer's weight went
/// from `w` to `w_new`: in each sample's cached `y` (`rows` rows of `N`), the columns that
/// changed are recomputed from the kept input rows (all of them, in row order),
/// `y_rj = Σ_k x_rk·w'_kj` summed in `f64`; the other columns are the runtime's.
pub(crate) fn update_kept_output(
    seg: &mut segment::Segmenter,
    l: &Layer,
    st: &LayerStats,
    w: &Array2<f32>,
    w_new: &Array2<f32>,
    rows: usize,
) -> Result<()> {
    let changed: Vec<usize> = (0..l.n.min(w.ncols())).filter(|&j| w.column(j) != w_new.column(j)).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let (ids, x, _) = st.kept.first().context("internal error: no kept rows")?;
    if st.kept.len() != 1 || x.nrows() != ids.len() || ids.iter().enumerate().any(|(r, &id)| id != r as u64) {
        bail!("internal error: layer {}: the kept rows are not every input row", l.node);
    }
    let cols: Vec<Vec<f64>> =
        changed.iter().map(|&j| w_new.column(j).iter().map(|&v| f64::from(v)).collect()).collect();
    seg.update_cached(&l.output, |i, y| {
        let ArrayData::F32(y) = y else { bail!("the output of layer {} is not float", l.node) };
        let n = l.n;
        let y = y
            .as_slice_mut()
            .with_context(|| format!("internal error: the output of layer {} is not contiguous", l.node))?;
        if y.len() != rows * n || x.nrows() < (i + 1) * rows {
            bail!("internal error: layer {}: {} output values for {rows} rows of {n}", l.node, y.len());
        }
        for r in 0..rows {
            let xr = x.row(i * rows + r);
            for (c, &j) in cols.iter().zip(&changed) {
                y[r * n + j] = xr.iter().zip(c).map(|(&a, &b)| f64::from(a) * b).sum::<f64>() as f32;
            }
        }
        Ok(())
    })
}

/// One forward pass of `model_bytes` collecting, as asked: calibration statistics of
/// `targets` ([`cal::calibrate_with`]), the values of `outputs` for the first `keep` samples, and outlier
/// statistics (no Gram) of `layers`, all read in place from the runtime's buffers. A MatMul
/// or Conv layer's `y` comes from its own output tensor ([`Source`]), so it is not computed
/// twice; with `rows` the outliers' input rows are gathered too (detection alone needs none).
#[allow(clippy::too_many_arguments)]
fn forward_pass(
    model_bytes: &[u8],
    specs: &[InputSpec],
    set: &SampleSet,
    targets: &[Target],
    (layers, rows, screen, split): (&[PassLayer], bool, usize, bool),
    (kept_for, budget): (&[KeptTensor], u64),
    opts: &Options,
    what: &str,
) -> Result<PassOut> {
    // Each kept tensor's values are kept for its first `samples`; the budgeted ones only
    // while all their values fit in `budget` bytes, else none of them.
    let keep = kept_for.iter().map(|k| k.samples).max().unwrap_or(0);
    let (mut spent, mut over) = (0u64, false);
    let clear_budgeted = |values: &mut Vec<Option<ArrayD<f32>>>| {
        for (v, k) in values.iter_mut().zip(kept_for) {
            if k.budgeted {
                *v = None;
            }
        }
    };
    let mut extra: Vec<(String, Role)> = Vec::new();
    for (li, l) in layers.iter().enumerate() {
        if let Source::Computed(_) = l.1 {
            extra.push((l.0.input.clone(), Role::Input(li)));
        } else {
            extra.push((l.0.output.clone(), Role::Output(li)));
            if rows {
                extra.push((l.0.input.clone(), Role::OutlierRows(li)));
            }
        }
    }
    extra.extend(kept_for.iter().map(|o| (o.name.clone(), Role::Kept)));
    // The layers' tensors are looked at on the first `screen` samples; with `split`, they are
    // requested for those only (the others run a second plan). The kept ones are requested
    // for every sample (no second plan for them) and kept for their own.
    let names: Vec<(String, usize)> = extra
        .iter()
        .map(|(n, role)| match role {
            Role::Kept => (n.clone(), set.len()),
            _ if split => (n.clone(), screen),
            _ => (n.clone(), set.len()),
        })
        .collect();
    // The fold owns the accumulators; the samples are looked at with their samplers.
    let mut accs: Vec<LayerAcc> =
        layers.iter().map(|(l, _)| LayerAcc::new(screen, opts.quantile, opts.tau_factor, false, l.groups, 0)).collect();
    let samplers: Vec<Sampler> = accs.iter().map(LayerAcc::sampler).collect();
    let mut kept: Outputs = Vec::with_capacity(keep.min(set.len()));
    let visit = |i: usize, st: &mut PassSample, k: usize, value: Option<ArrayViewD<'_, f32>>| -> Result<()> {
        if st.layers.is_empty() {
            st.layers = (0..layers.len()).map(|_| None).collect();
            st.pending_rows = (0..layers.len()).map(|_| None).collect();
        }
        let (name, role) = extra.get(k).context("internal error: unknown extra output")?;
        if i >= screen && !matches!(role, Role::Kept) {
            return Ok(());
        }
        if let Role::Kept = role {
            // In `kept_for`'s order, whatever order the runtime computes them in.
            let slot = k + kept_for.len() - extra.len();
            if kept_for.get(slot).is_some_and(|k| i < k.samples) {
                st.outputs.resize(kept_for.len(), None);
                st.outputs[slot] = value.map(|v| v.to_owned());
            }
            return Ok(());
        }
        let Some(value) = value else { bail!("tensor '{name}' is not float") };
        let (Role::Output(li) | Role::OutlierRows(li) | Role::Input(li)) = *role else { return Ok(()) };
        let ((l, source), acc) = layers.get(li).zip(samplers.get(li)).context("internal error: unknown layer")?;
        let slot = st.layers.get_mut(li).context("internal error: unknown layer")?;
        let pending = st.pending_rows.get_mut(li).context("internal error: unknown layer")?;
        let r: Result<()> = (|| {
            match role {
                Role::Output(_) => {
                    let mut s = match source {
                        Source::ConvOutput(b) => {
                            let ys = layer::conv_output_rows(l, value.view(), b.as_deref())?;
                            acc.output_stats(&ys.iter().map(|y| y.view()).collect::<Vec<_>>())?
                        }
                        _ => acc.output_stats(&[as_rows(&value, l.n)?.view()])?,
                    };
                    if let Some(x) = pending.take() {
                        attach_input(l, &mut s, &x.view())?;
                    }
                    *slot = Some(s);
                }
                Role::OutlierRows(_) => match slot.as_mut() {
                    Some(s) => attach_input(l, s, &value)?,
                    None => *pending = Some(value.to_owned()),
                },
                _ => {
                    let Source::Computed(w) = source else { bail!("internal error: the layer's weight was not read") };
                    *slot = Some(acc.sample(layer::input_rows(l, value.view())?, w)?);
                }
            }
            Ok(())
        })();
        r.with_context(|| format!("layer {}: tensor '{name}'", l.node))
    };
    let calibration = cal::calibrate_with(
        model_bytes,
        specs,
        set,
        targets,
        &cal::CalibOptions { bins: 2048, quiet: opts.quiet },
        &names,
        visit,
        |i, st: PassSample| {
            if i < screen {
                for (acc, s) in accs.iter_mut().zip(st.layers) {
                    acc.merge(s.context("internal error: a layer's statistics are missing")?)?;
                }
            }
            if i < keep {
                let mut values = st.outputs;
                values.resize(kept_for.len(), None);
                if !over {
                    let bytes = |(v, k): (&Option<ArrayD<f32>>, &KeptTensor)| match v {
                        Some(a) if k.budgeted => 4 * a.len() as u64,
                        _ => 0,
                    };
                    spent += values.iter().zip(kept_for).map(bytes).sum::<u64>();
                    if spent > budget {
                        over = true;
                        kept.iter_mut().for_each(clear_budgeted);
                    }
                }
                if over {
                    clear_budgeted(&mut values);
                }
                kept.push(values);
            }
            Ok(())
        },
    )
    .with_context(|| format!("{what} pass"))?;
    let calibration = (!targets.is_empty()).then_some(calibration);
    Ok(PassOut { calibration, outputs: kept, layers: accs.into_iter().map(LayerAcc::finish).collect::<Result<_>>()? })
}

// ---------------------------------------------------------------- analysis

fn by_column(outliers: &[Outlier]) -> BTreeMap<usize, Vec<&Outlier>> {
    let mut m: BTreeMap<usize, Vec<&Outlier>> = BTreeMap::new();
    for o in outliers {
        m.entry(o.j).or_default().push(o);
    }
    m
}

/// The analysis of one layer from its statistics.
pub fn describe_layer(layer: &Layer, st: &LayerStats, w: &Array2<f32>, opts: &Options) -> Result<LayerOutliers> {
    let mut columns: Vec<ColumnOutliers> = by_column(&st.outliers)
        .into_iter()
        .map(|(j, os)| ColumnOutliers {
            j,
            count: os.len(),
            max_abs: os.iter().map(|o| f64::from(o.y.abs())).fold(0.0, f64::max),
            excess: os.iter().map(|o| (f64::from(o.y.abs()) - st.tau).max(0.0)).sum(),
        })
        .collect();
    columns.sort_by(|a, b| b.excess.total_cmp(&a.excess).then(a.j.cmp(&b.j)));
    let rel = solve::relevance(&st.outliers, &st.xrows, w, st.tau).with_context(|| format!("layer {}", layer.node))?;
    let mut top: Vec<Contributor> = rel
        .values()
        .flatten()
        .map(|r| Contributor {
            k: r.k,
            j: r.j,
            weight: w[[r.k, r.j]],
            share: r.share,
            excess: r.share * r.column_excess,
        })
        .collect();
    top.sort_by(|a, b| b.excess.total_cmp(&a.excess).then(a.j.cmp(&b.j)).then(a.k.cmp(&b.k)));
    top.truncate(opts.max_per_column.max(8) * 2);
    Ok(LayerOutliers {
        layer: layer.clone(),
        rows: st.rows,
        elements: st.elements,
        quantile: st.q,
        tau: st.tau,
        abs_max: st.abs_max,
        max_over_tau: if st.tau > 0.0 { st.abs_max / st.tau } else { 0.0 },
        outliers: st.outliers.len(),
        columns,
        top,
    })
}

fn specs_and_set(model: &ModelProto, data: &DataOptions) -> Result<(Vec<InputSpec>, SampleSet)> {
    let g = model.graph.as_ref().context("the model has no graph")?;
    let specs = cal::input_specs(g);
    let set = crate::data::open(&specs, data)?;
    Ok((specs, set))
}

/// `onnxq outliers`: one forward pass, every regularizable layer analysed.
pub fn analyze(model: &ModelProto, label: &str, data: &DataOptions, opts: &Options) -> Result<Analysis> {
    opts.validate()?;
    let (specs, set) = specs_and_set(model, data)?;
    let (layers, rejected) = layer::find_layers(model)?;
    let mut out = Analysis {
        model: label.to_string(),
        samples: set.len(),
        quantile: opts.quantile,
        tau_factor: opts.tau_factor,
        layers: Vec::new(),
        not_regularizable: rejected,
    };
    if layers.is_empty() {
        return Ok(out);
    }
    let pairs = with_weights(model, &layers)?;
    let bytes = crate::onnx::io::encode_for_runtime(model)?;
    let pass = forward_pass(
        &bytes,
        &specs,
        &set,
        &[],
        (&pairs, true, set.len(), false),
        (&[], 0),
        opts,
        "outlier statistics",
    )?;
    for ((l, w), st) in pairs.into_iter().zip(&pass.layers) {
        // Only the layers with outliers need their weight (relevance).
        let w = match w {
            Source::Computed(w) => w,
            _ if st.outliers.is_empty() => Array2::zeros((0, 0)),
            _ => layer::weight_matrix(model, l)?,
        };
        out.layers.push(describe_layer(l, st, &w, opts)?);
    }
    Ok(out)
}

// ---------------------------------------------------------------- regularization

struct Edit {
    w: Array2<f32>,
    bias: Option<Vec<f32>>,
    report: LayerEdit,
}

/// Computes the regularized weights (and bias) of one layer from its statistics.
fn compute_edit(
    layer: &Layer,
    st: &LayerStats,
    w: &Array2<f32>,
    bias: Option<Vec<f32>>,
    opts: &Options,
    full_edits: bool,
) -> Result<Edit> {
    let (kdim, ndim) = w.dim();
    let ng = ndim / st.groups.max(1);
    let rel = solve::relevance(&st.outliers, &st.xrows, w, st.tau)?;
    let mut new_w = w.clone();
    let mut new_b = bias.clone();
    let (mut lambda, mut delta) = (f64::NAN, f64::NAN);
    // Per group with outliers: the factorization of `G + δI`, the Woodbury cache, λ and δ.
    type Factor = (Cholesky, BTreeMap<usize, Vec<f64>>, f64);
    let mut factors: BTreeMap<usize, Factor> = BTreeMap::new();
    let mut columns = Vec::new();
    for (j, outs) in by_column(&st.outliers) {
        let gi = j / ng.max(1);
        let s = rel.get(&j).map(|r| solve::select(r, opts.min_share, opts.max_per_column)).unwrap_or_default();
        let wj: Vec<f64> = (0..kdim).map(|k| f64::from(w[[k, j]])).collect();
        let d: Vec<f64> = match opts.mode {
            Mode::Solve => {
                if let std::collections::btree_map::Entry::Vacant(slot) = factors.entry(gi) {
                    let grams = st.gram.as_ref().context("internal error: no Gram matrix")?;
                    let g = grams.get(gi).context("internal error: no Gram matrix for the group")?;
                    let scale = (0..kdim).map(|i| g[[i, i]]).sum::<f64>() / kdim as f64;
                    if !(scale > 0.0 && scale.is_finite()) {
                        bail!("the layer's input has no energy (tr(G)/K = {scale})");
                    }
                    if lambda.is_nan() {
                        (lambda, delta) = (opts.lambda * scale, opts.delta * scale);
                    }
                    let chol = Cholesky::damped(g, opts.delta * scale)?;
                    slot.insert((chol, BTreeMap::new(), opts.lambda * scale));
                }
                let (chol, inv_cols, lam) = factors.get_mut(&gi).context("internal error: no factorization")?;
                let mut xtr = vec![0f64; kdim];
                for o in &outs {
                    let x = st.xrows.get(&o.row).context("internal error: outlier row missing")?;
                    let r = f64::from(o.y.signum()) * (f64::from(o.y.abs()) - st.tau);
                    for (acc, &xv) in xtr.iter_mut().zip(x) {
                        *acc += f64::from(xv) * r;
                    }
                }
                solve::column_update(chol, inv_cols, &s, *lam, &wj, &xtr)?
            }
            Mode::Shrink { gamma } => {
                let mut d = vec![0f64; kdim];
                for &k in &s {
                    d[k] = (1.0 - gamma) * wj[k];
                }
                d
            }
        };
        for k in 0..kdim {
            new_w[[k, j]] = (wj[k] - d[k]) as f32;
        }
        // Bias: the mean change on the rows that are not outliers of this column.
        let rows_out: BTreeSet<u64> = outs.iter().map(|o| o.row).collect();
        let colsum = st.colsum.get(gi).filter(|c| c.len() == kdim);
        let bias_delta = match (&mut new_b, colsum) {
            (Some(b), Some(colsum)) if st.rows > rows_out.len() as u64 => {
                let mut mean = colsum.clone();
                for r in &rows_out {
                    let x = st.xrows.get(r).context("internal error: outlier row missing")?;
                    for (m, &xv) in mean.iter_mut().zip(x) {
                        *m -= f64::from(xv);
                    }
                }
                let count = (st.rows - rows_out.len() as u64) as f64;
                let delta_b: f64 = mean.iter().zip(&d).map(|(m, dk)| m / count * dk).sum();
                if let Some(bj) = b.get_mut(j) {
                    *bj = (f64::from(*bj) + delta_b) as f32;
                }
                Some(delta_b as f32)
            }
            _ => None,
        };
        let peak = |col: &dyn Fn(usize) -> f64| -> f64 {
            rows_out
                .iter()
                .filter_map(|r| st.xrows.get(r))
                .map(|x| x.iter().enumerate().map(|(k, &xv)| f64::from(xv) * col(k)).sum::<f64>().abs())
                .fold(0.0, f64::max)
        };
        let peak_before = outs.iter().map(|o| f64::from(o.y.abs())).fold(0.0, f64::max);
        let peak_after = peak(&|k| f64::from(new_w[[k, j]]));
        let norm: f64 = wj.iter().map(|v| v * v).sum::<f64>().sqrt();
        let dnorm: f64 = (0..kdim).map(|k| (wj[k] - f64::from(new_w[[k, j]])).powi(2)).sum::<f64>().sqrt();
        let share_of = |k: usize| rel.get(&j).and_then(|r| r.iter().find(|x| x.k == k)).map_or(0.0, |x| x.share);
        let selected =
            s.iter().map(|&k| Selected { k, share: share_of(k), old: w[[k, j]], new: new_w[[k, j]] }).collect();
        let mut edits: Vec<WeightEdit> = (0..kdim)
            .filter(|&k| new_w[[k, j]] != w[[k, j]])
            .map(|k| WeightEdit { k, j, old: w[[k, j]], new: new_w[[k, j]] })
            .collect();
        let changed = edits.len();
        edits.sort_by(|a, b| (b.new - b.old).abs().total_cmp(&(a.new - a.old).abs()).then(a.k.cmp(&b.k)));
        if !full_edits {
            edits.clear();
        }
        columns.push(ColumnEdit {
            j,
            outliers: outs.len(),
            peak_before,
            peak_after,
            selected,
            changed,
            relative_change: if norm > 0.0 { dnorm / norm } else { 0.0 },
            bias_delta,
            edits,
        });
    }
    if new_w.iter().chain(new_b.iter().flatten()).any(|v| !v.is_finite()) {
        bail!("the solve produced non-finite weights (non-finite calibration inputs?)");
    }
    Ok(Edit {
        w: new_w,
        bias: new_b,
        report: LayerEdit {
            node: layer.node.clone(),
            weight: layer.weight.clone(),
            bias: layer.bias.as_ref().map(|b| b.tensor.clone()),
            tau: st.tau,
            abs_max: st.abs_max,
            outliers: st.outliers.len(),
            mode: opts.mode,
            lambda: if lambda.is_nan() { 0.0 } else { lambda },
            delta: if delta.is_nan() { 0.0 } else { delta },
            columns,
        },
    })
}

/// The local acceptance test ([`LocalError`], module docs) of `edit` from the layer's
/// statistics: on the kept rows, `z = y + b` (the outputs kept with them) and
/// `z' = z + x·(W' − W) + (b' − b)`, where only the edited columns of `W' − W` are non-zero
/// (so `z'` differs from `z` on those columns only, and is not materialized elsewhere); on the
/// outlier rows both directly. Each is fake-quantized to uint8 with the range of its own values
/// over the kept rows and the outlier rows; the errors against `z` are summed over the kept
/// rows' non-outlier elements (in fixed chunks of rows, in parallel, added in order).
fn local_error(st: &LayerStats, w: &Array2<f32>, bias: Option<&[f32]>, edit: &Edit) -> Result<(f64, f64)> {
    let (_, n) = w.dim();
    let g = st.groups.max(1);
    let ng = n / g;
    let outlier: BTreeSet<(u64, usize)> = st.outliers.iter().map(|o| (o.row, o.j)).collect();
    let b_old = |j: usize| bias.and_then(|b| b.get(j)).copied().unwrap_or(0.0);
    let b_new = |j: usize| edit.bias.as_ref().and_then(|b| b.get(j)).copied().unwrap_or(b_old(j));
    let edited: Vec<usize> = edit.report.columns.iter().map(|c| c.j).collect();
    let (mut lo, mut hi) = ([0f32; 2], [0f32; 2]);
    let mut extend = |v: f32, vn: f32| {
        (lo[0], hi[0]) = (lo[0].min(v), hi[0].max(v));
        (lo[1], hi[1]) = (lo[1].min(vn), hi[1].max(vn));
    };
    // Per group: the bias of each column, and the change of each edited column on the kept rows
    // (`x·(w'_j − w_j) + b'_j − b_j`, by column within the group).
    type Shifts = Vec<(usize, ndarray::Array1<f32>)>;
    let mut groups: Vec<(Vec<f32>, Shifts)> = Vec::with_capacity(g);
    for gi in 0..g {
        let cols = gi * ng..(gi + 1) * ng;
        let rows: Vec<&Vec<f32>> =
            st.xrows.iter().filter(|(id, _)| (**id % g as u64) as usize == gi).map(|(_, x)| x).collect();
        if !rows.is_empty() {
            let k = rows[0].len();
            let xo = Array2::from_shape_vec((rows.len(), k), rows.into_iter().flatten().copied().collect())?;
            let (wo, wn) = (w.slice(ndarray::s![.., cols.clone()]), edit.w.slice(ndarray::s![.., cols.clone()]));
            let (z, zn) = (xo.dot(&wo), xo.dot(&wn));
            for (r, rn) in z.outer_iter().zip(zn.outer_iter()) {
                for (c, (&v, &vn)) in r.iter().zip(rn.iter()).enumerate() {
                    extend(v + b_old(gi * ng + c), vn + b_new(gi * ng + c));
                }
            }
        }
        let (ids, x, y) = st.kept.get(gi).context("internal error: no kept rows for the group")?;
        if y.dim() != (ids.len(), ng) {
            bail!("internal error: kept outputs of shape {:?}, expected [{}, {ng}]", y.dim(), ids.len());
        }
        let b0: Vec<f32> = cols.clone().map(b_old).collect();
        let mut shifts: Shifts = Vec::new();
        for &j in edited.iter().filter(|j| cols.contains(j)) {
            let d: ndarray::Array1<f32> = (0..w.nrows()).map(|k| edit.w[[k, j]] - w[[k, j]]).collect();
            let shift = b_new(j) - b_old(j);
            shifts.push((j - gi * ng, x.dot(&d).mapv(|v| v + shift)));
        }
        groups.push((b0, shifts));
    }
    // The kept rows in fixed chunks (in parallel, results taken in order): one row at a time,
    // `z` (with bias) and `z'` (`z` plus the edited columns' shifts) into buffers. Errors are
    // taken for every element (`fake_finite`, vectorized) and summed for the finite ones.
    const CHUNK: usize = 256;
    let mut parts: Vec<(usize, usize)> = Vec::new();
    for (gi, (ids, _, _)) in st.kept.iter().enumerate().take(g) {
        parts.extend((0..ids.len()).step_by(CHUNK).map(|r0| (gi, r0)));
    }
    /// What a chunk hands on for each kept row: its index, `z` and `z'`.
    type RowFn<'f> = dyn FnMut(usize, &[f32], &[f32]) + 'f;
    let rows_of = |(gi, r0): (usize, usize), f: &mut RowFn| {
        let ((ids, _, y), (b0, shifts)) = (&st.kept[gi], &groups[gi]);
        let (mut v, mut vn) = (vec![0f32; ng], vec![0f32; ng]);
        for r in r0..(r0 + CHUNK).min(ids.len()) {
            for ((v, &yv), &b) in v.iter_mut().zip(y.row(r)).zip(b0) {
                *v = yv + b;
            }
            vn.copy_from_slice(&v);
            for (c, s) in shifts {
                vn[*c] = v[*c] + s[r];
            }
            f(r, &v, &vn);
        }
    };
    // The ranges of `z` and `z'`.
    let ranges: Vec<([f32; 2], [f32; 2])> = parts
        .par_iter()
        .map(|&part| {
            let (mut lo, mut hi) = ([0f32; 2], [0f32; 2]);
            rows_of(part, &mut |_, v, vn| {
                for (k, row) in [v, vn].into_iter().enumerate() {
                    (lo[k], hi[k]) = crate::array::min_max(row, lo[k], hi[k]);
                }
            });
            (lo, hi)
        })
        .collect();
    for (l, h) in ranges {
        extend(l[0], l[1]);
        extend(h[0], h[1]);
    }
    let (p0, p1) = (ActParams::from_range(lo[0], hi[0], ActType::U8), ActParams::from_range(lo[1], hi[1], ActType::U8));
    let outlier_rows: BTreeSet<u64> = outlier.iter().map(|&(r, _)| r).collect();
    let sums: Vec<(f64, f64)> = parts
        .into_par_iter()
        .map(|part| {
            let (ids, gi) = (&st.kept[part.0].0, part.0);
            let (mut before, mut after) = (0f64, 0f64);
            let (mut e0, mut e1) = (vec![0f32; ng], vec![0f32; ng]);
            rows_of(part, &mut |r, v, vn| {
                for (((e0, e1), &v), &vn) in e0.iter_mut().zip(e1.iter_mut()).zip(v).zip(vn) {
                    (*e0, *e1) = (p0.fake_finite(v) - v, p1.fake_finite(vn) - v);
                }
                let id = ids[r];
                // Most rows hold no outlier: one lookup per row, per element only on outlier rows.
                let has = outlier_rows.contains(&id);
                for (c, ((&e0, &e1), (&v, &vn))) in e0.iter().zip(&e1).zip(v.iter().zip(vn)).enumerate() {
                    if (has && outlier.contains(&(id, gi * ng + c))) || !(v.is_finite() && vn.is_finite()) {
                        continue;
                    }
                    before += f64::from(e0).powi(2);
                    after += f64::from(e1).powi(2);
                }
            });
            (before, after)
        })
        .collect();
    Ok(sums.iter().fold((0f64, 0f64), |a, s| (a.0 + s.0, a.1 + s.1)))
}

fn fmt_err(v: f64) -> String {
    format!("{v:.4e}")
}

/// Quantization settings for the guard.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub quant: QuantOptions,
    pub method: RangeMethod,
}

/// The result of [`regularize`].
#[derive(Debug, Clone)]
pub struct Outcome {
    pub model: ModelProto,
    /// Calibrated ranges of the returned model (guarded runs: the ones the guard measured).
    pub ranges: Option<BTreeMap<String, TensorEntry>>,
    /// Calibrated ranges of the input model (guarded runs), for a final comparison with
    /// plain quantization through later pipeline steps.
    pub baseline_ranges: Option<BTreeMap<String, TensorEntry>>,
    /// Guarded runs: the input model's graph outputs (in graph order) on the guard's samples,
    /// from the first pass, for later comparisons on the same samples (bias correction).
    pub reference: Outputs,
    pub report: RegularizationReport,
}

/// What [`regularize`] should do besides editing.
#[derive(Debug, Clone, Default)]
pub struct RunSettings {
    /// Keep an edit only if the quantized SQNR improves (`--regularize auto`).
    pub guard: Option<GuardSettings>,
    /// Measure the float deviation of the result (one more pass).
    pub measure_float: bool,
    /// List every changed element in the report.
    pub full_edits: bool,
    /// The placement `onnxq quantize` will use: only layers whose output values it quantizes
    /// are candidates ([`placement_candidates`]). None: every regularizable layer.
    pub placement: Option<QuantOptions>,
    pub label: String,
    /// The samples of `data`, when the caller has already opened (and so checked) them: not
    /// read again if their inputs are the model's.
    pub samples: Option<std::sync::Arc<SampleSet>>,
}

/// Splits `layers` into the candidates under the placement `quant`, i.e. the layers whose
/// output values ([`layer::output_views`]: the output, its own bias Add, pass-through and
/// data-movement ops) include a tensor `quantize` puts Q/DQ on
/// ([`crate::quantize::activation_candidates`]), and the others with the reason. The method
/// exists because outliers in an activation blow up that activation's quantization scale; a
/// layer whose output stays float (under the transformer preset: the attention output and FFN
/// MatMuls feeding the residual stream) has no scale to protect, so editing it can only
/// perturb the float model.
pub fn placement_candidates(
    model: &ModelProto,
    layers: Vec<Layer>,
    quant: &QuantOptions,
) -> Result<(Vec<Layer>, Vec<NotALayer>)> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    let quantized = crate::quantize::activation_candidates(model, quant)?;
    let preset = match quant.preset {
        Preset::Auto => crate::quantize::detect_preset(&view),
        p => p,
    };
    let (mut keep, mut float) = (Vec::new(), Vec::new());
    for l in layers {
        if layer::output_views(&view, &l).iter().any(|t| quantized.contains(t)) {
            keep.push(l);
        } else {
            float.push(NotALayer {
                op_type: view.nodes().get(l.node_index).map(|n| n.op_type().to_string()).unwrap_or_default(),
                reason: format!("output stays float under the {preset} preset"),
                node: l.node,
            });
        }
    }
    Ok((keep, float))
}

/// CPU time of this process so far (user + system over all threads, s; 0 where
/// `/proc/self/stat` is unavailable).
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Clock ticks are 100 per second on Linux for every mainstream architecture.
    (ticks(11) + ticks(12)) / 100.0
}

/// Records the CPU time since `since` under `phase` (when measurable) and returns the time now.
fn phase_cpu(report: &mut RegularizationReport, phase: &str, since: f64) -> f64 {
    let now = cpu_seconds();
    if now > 0.0 {
        report.phase_cpu_seconds.insert(phase.into(), now - since);
    }
    now
}

fn fmt_db(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{v:.2}")
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Regularizes the layers with outliers (module docs), in graph order.
pub fn regularize(model: &ModelProto, data: &DataOptions, opts: &Options, run: &RunSettings) -> Result<Outcome> {
    opts.validate()?;
    let t0 = Instant::now();
    let c0 = cpu_seconds();
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let specs = cal::input_specs(graph);
    let set = crate::data::open_unless_checked(&specs, data, run.samples.as_ref())?;
    let facts = cal::input_facts(&specs, &set)?;
    let output_names: Vec<String> = graph.output.iter().map(|o| o.name().to_string()).collect();
    let (layers, _) = layer::find_layers(model)?;
    let (layers, float_output_layers) = match &run.placement {
        Some(q) => placement_candidates(model, layers, q)?,
        None => (layers, Vec::new()),
    };
    let mut report = RegularizationReport {
        mode: match &run.guard {
            Some(_) => "auto".into(),
            None => format!("forced (lambda {})", opts.lambda),
        },
        options: opts.clone(),
        samples: set.len(),
        candidate_layers: layers.len(),
        float_output_layers,
        layers_with_outliers: 0,
        baseline_sqnr_db: None,
        final_sqnr_db: None,
        float_sqnr_db: None,
        guard_samples: None,
        regularized: false,
        layers: Vec::new(),
        passes: 0,
        phase_seconds: BTreeMap::new(),
        phase_cpu_seconds: BTreeMap::new(),
        pieces: 0,
        seconds: 0.0,
    };
    if layers.is_empty() {
        report.seconds = t0.elapsed().as_secs_f64();
        return Ok(Outcome {
            model: model.clone(),
            ranges: None,
            baseline_ranges: None,
            reference: Vec::new(),
            report,
        });
    }
    let pairs = with_weights(model, &layers)?;
    let targets = match &run.guard {
        // The ranges the quantizer will read (the same set the plain pipeline calibrates).
        Some(g) => cal::quantization_targets(model, &g.quant)?,
        None => Vec::new(),
    };
    // The guard's samples: the first GUARD_SAMPLES (module docs); the float deviation
    // compares all of them.
    let keep = if run.measure_float {
        set.len()
    } else if run.guard.is_some() {
        set.len().min(GUARD_SAMPLES)
    } else {
        0
    };
    // The guard's twins skip the float prefix ([`prefix`]); the first pass keeps its
    // frontier's values for the guard's samples beside the reference outputs.
    let prefix = match &run.guard {
        Some(_) => prefix::Prefix::of(model, &targets.iter().map(|t| t.name.as_str()).collect())?,
        None => None,
    };
    // The sequential pass starts at the first candidate layer, from this pass's values of
    // what the nodes from there on read from before it ([`segment::frontier_before`]), kept
    // for every sample, when the nodes it then skips read at least 1 MiB of weights (MiniLM-L6:
    // the embeddings and their 47 MB table, which the first piece no longer loads) and as
    // long as those values take no more memory than these weights.
    let seed = {
        let view = GraphView::new(graph);
        let order = view.topo_order()?;
        let first = order.iter().copied().find(|&i| layers.iter().any(|l| l.node_index == i));
        let cut = first.map(|n| segment::frontier_before(model, n)).transpose()?;
        cut.filter(|f| f.skipped_weight_bytes >= prefix::MIN_PREFIX_WEIGHT_BYTES && !f.names.is_empty())
    };
    // What the pass keeps.
    let mut kept_for: Vec<KeptTensor> = Vec::new();
    let mut keep_values =
        |name: &str, samples: usize, budgeted: bool| match kept_for.iter_mut().find(|k| k.name == name) {
            Some(k) => {
                k.samples = k.samples.max(samples);
                k.budgeted &= budgeted;
            }
            None if samples > 0 => kept_for.push(KeptTensor { name: name.to_string(), samples, budgeted }),
            None => {}
        };
    output_names.iter().for_each(|o| keep_values(o, keep, false));
    if let Some(p) = &prefix {
        p.frontier.iter().for_each(|t| keep_values(t, keep.min(GUARD_SAMPLES), false));
    }
    if let Some(f) = &seed {
        f.names.iter().for_each(|t| keep_values(t, set.len(), true));
    }
    let seed_budget = seed.as_ref().map_or(0, |f| f.skipped_weight_bytes);
    let screen = screen_samples(set.len());
    // A second plan holds the weights again: only for models whose weights are small.
    let split = screen < set.len()
        && graph.initializer.iter().map(crate::dump::tensor_bytes).sum::<u64>() <= SPLIT_MAX_WEIGHT_BYTES;
    let bytes = crate::onnx::io::encode_for_runtime(model)?;
    let first = forward_pass(
        &bytes,
        &specs,
        &set,
        &targets,
        // Detection only, on the screen's samples: the sequential pass gathers the flagged
        // layers' statistics and rows on every sample.
        (&pairs, false, screen, split),
        (&kept_for, seed_budget),
        opts,
        if run.guard.is_some() { "calibrating" } else { "outlier statistics" },
    )
    .with_context(|| format!("statistics of {}", run.label))?;
    drop(pairs);
    report.passes += 1;
    report.phase_seconds.insert("1 statistics pass".into(), t0.elapsed().as_secs_f64());
    let c1 = phase_cpu(&mut report, "1 statistics pass", c0);
    let t1 = Instant::now();
    // The flagged layers and their input rows per sample.
    let (flagged, flagged_rows): (Vec<&Layer>, Vec<usize>) = layers
        .iter()
        .zip(&first.layers)
        .filter(|(_, st)| !st.outliers.is_empty())
        .map(|(l, st)| (l, (st.rows as usize).div_ceil(screen.max(1))))
        .unzip();
    report.layers_with_outliers = flagged.len();
    let base_cal = first.calibration;
    // Split the kept values: the reference outputs, the guard's frontier (a value the runtime
    // did not hold as f32 leaves the twins whole), the sequential pass's start (likewise).
    let mut rows = first.outputs;
    let seeded: BTreeSet<String> = seed.iter().flat_map(|f| f.names.iter().cloned()).collect();
    // A tensor kept for several uses is copied for all but its last one (the seed), which
    // moves it out.
    let mut take = |i: usize, name: &str, last_use: bool| -> Option<ArrayD<f32>> {
        let at = kept_for.iter().position(|k| k.name == name)?;
        let slot = rows.get_mut(i)?.get_mut(at)?;
        if last_use {
            slot.take()
        } else {
            slot.clone()
        }
    };
    let reference: Outputs =
        (0..keep).map(|i| output_names.iter().map(|o| take(i, o, !seeded.contains(o))).collect()).collect();
    let frontier = prefix.and_then(|p| {
        let values: Option<Vec<Vec<ArrayData>>> = (0..keep.min(GUARD_SAMPLES))
            .map(|i| p.frontier.iter().map(|t| take(i, t, !seeded.contains(t)).map(ArrayData::F32)).collect())
            .collect();
        values.filter(|v| !v.is_empty()).map(|v| (p, v))
    });
    // (`None` when over budget: the values were dropped.)
    let seed = seed.and_then(|f| {
        let cache: Option<Vec<HashMap<String, ArrayData>>> = (0..set.len())
            .map(|i| f.names.iter().map(|t| take(i, t, true).map(|v| (t.clone(), ArrayData::F32(v)))).collect())
            .collect();
        cache.map(|c| (f, c))
    });
    drop(rows);
    // Plain quantization's ranges (guarded runs), computed once.
    let plain_ranges = match (&base_cal, &run.guard) {
        (Some(c), Some(g)) => Some(guard::ranges(c, &g.method, g.quant.activations)),
        _ => None,
    };
    if flagged.is_empty() {
        report.seconds = t0.elapsed().as_secs_f64();
        return Ok(Outcome {
            model: model.clone(),
            baseline_ranges: plain_ranges.clone(),
            ranges: plain_ranges,
            reference,
            report,
        });
    }

    // The sequential pass: statistics (with Gram and kept rows) of each flagged layer on the
    // model edited so far, solve, local acceptance, and (guarded) the calibration statistics
    // of every target at or after the first flagged layer, which are then those of the
    // returned model.
    let view = GraphView::new(graph);
    let order = view.topo_order()?;
    let mut pos = vec![usize::MAX; graph.node.len()];
    for (p, &i) in order.iter().enumerate() {
        pos[i] = p;
    }
    let first_pos = flagged.iter().map(|l| pos[l.node_index]).min().unwrap_or(0);
    let collect: Vec<String> = targets
        .iter()
        .filter(|t| view.producer_index(&t.name).is_some_and(|p| pos.get(p).is_some_and(|&q| q >= first_pos)))
        .map(|t| t.name.clone())
        .collect();
    let collect_targets: Vec<&Target> = collect.iter().filter_map(|n| targets.iter().find(|t| &t.name == n)).collect();
    // One sample's statistics of a collected tensor, in the runtime's buffer, and all of them
    // by index in `collect` (the ones the piece did not produce `None`).
    let stat = |ci: usize, v: ArrayViewD<'_, f32>| -> Result<TensorStats> {
        let t = collect_targets.get(ci).context("internal error: unknown collected tensor")?;
        Ok(cal::view_stats(v, t, 2048))
    };
    let per_collected = |got: Vec<(usize, TensorStats)>| -> Vec<Option<TensorStats>> {
        let mut per = vec![None; collect_targets.len()];
        for (ci, s) in got {
            if let Some(slot) = per.get_mut(ci) {
                *slot = Some(s);
            }
        }
        per
    };
    // The global guard's samples and settings (guarded runs).
    let guard_set = match &run.guard {
        // (Already checked: not read again.)
        Some(_) if set.len() > GUARD_SAMPLES => Some(set.first(GUARD_SAMPLES)),
        _ => None,
    };
    let mut guard = run.guard.as_ref().map(|g| guard::Guard {
        set: guard_set.as_ref().unwrap_or(&set),
        facts: facts.clone(),
        qopts: g.quant.clone(),
        quiet: opts.quiet,
        output_names: output_names.clone(),
        reference: &reference,
        passes: 0,
        frontier,
    });
    // The sequential pass: the edited model, the pieces run, the decisions, and the fresh
    // statistics of `collect`.
    type Sequential = (ModelProto, usize, Vec<LayerDecision>, Vec<Option<TensorStats>>);
    let sequential = || -> Result<Sequential> {
        let mut fresh: Vec<Option<TensorStats>> = vec![None; collect.len()];
        let mut decisions: Vec<LayerDecision> = Vec::new();
        let mut fold_fresh = |per: Vec<Option<TensorStats>>| cal::fold_stats(&mut fresh, per);
        let mut cur = model.clone();
        let mut seg = match seed {
            Some((at, cache)) => segment::Segmenter::starting_at(&specs, &set, opts.quiet, &at, cache)?,
            None => segment::Segmenter::new(&specs, &set, opts.quiet),
        };
        let later: Vec<usize> = flagged.iter().map(|l| l.node_index).collect();
        let keep_budget = 1usize << 23;
        for (idx, l) in flagged.iter().enumerate() {
            let w = layer::weight_matrix(&cur, l)?;
            let keep = if run.guard.is_some() { (keep_budget / (set.len().max(1) * l.k * l.groups)).max(1) } else { 0 };
            let mut acc =
                LayerAcc::new(set.len(), opts.quantile, opts.tau_factor, opts.mode == Mode::Solve, l.groups, keep);
            let sampler = acc.sampler();
            // MatMul and Conv (constant or no bias) layers run through in their piece, and `y`
            // is read from the runtime instead of recomputed (as in the statistics pass). A
            // MatMul whose input rows are all kept (for the local acceptance) keeps its output
            // for the next piece, which then does not run it again: an accepted edit changes
            // only its edited columns, recomputed from those rows (`update_kept_output`).
            let cur_graph = cur.graph.as_ref().context("the model has no graph")?;
            let source = runtime_source(&GraphView::new(cur_graph), l)?;
            let through = match &source {
                None => Through::No,
                Some(Source::MatMulOutput) if keep > 0 && keep >= flagged_rows[idx] => Through::Keep,
                Some(_) => Through::Rerun,
            };
            seg.advance(
                &cur,
                (l.node_index, &l.input, through),
                &later[idx + 1..],
                &collect,
                stat,
                |Visit { value: x, output: y, collected }| {
                    let Some(ArrayData::F32(x)) = x else { bail!("input '{}' is not float", l.input) };
                    let rows = layer::input_rows(l, x.view())?;
                    let a = &sampler;
                    let s = match (&source, y) {
                        (Some(Source::MatMulOutput), Some(ArrayData::F32(y))) => {
                            a.sample_with(rows, vec![as_rows(&y.view(), l.n)?.into_owned()])?
                        }
                        (Some(Source::ConvOutput(b)), Some(ArrayData::F32(y))) => {
                            a.sample_with(rows, layer::conv_output_rows(l, y.view(), b.as_deref())?)?
                        }
                        (Some(_), _) => bail!("the output of layer {} is not float", l.node),
                        _ => a.sample(rows, &w)?,
                    };
                    Ok((s, per_collected(collected)))
                },
                |_, (s, per)| {
                    fold_fresh(per);
                    acc.merge(s)
                },
            )
            .with_context(|| format!("statistics of layer {}", l.node))?;
            let st = acc.finish()?;
            let decline = |reason: String| LayerDecision {
                node: l.node.clone(),
                accepted: false,
                local_error: None,
                reason,
                edit: None,
            };
            // The new weight when an edit is kept.
            let kept_edit: Option<Array2<f32>> = 'decide: {
                if st.outliers.is_empty() {
                    decisions.push(decline("no outliers once the earlier layers were regularized".into()));
                    break 'decide None;
                }
                let bias = layer::bias_values(&cur, l)?;
                let edit = match compute_edit(l, &st, &w, bias.clone(), opts, run.full_edits) {
                    Ok(e) => e,
                    Err(e) => {
                        decisions.push(decline(format!("not regularized: {e:#}")));
                        break 'decide None;
                    }
                };
                let decision = if run.guard.is_some() {
                    let (before, after) =
                        local_error(&st, &w, bias.as_deref(), &edit).with_context(|| format!("layer {}", l.node))?;
                    let accepted = after < before;
                    LayerDecision {
                        node: l.node.clone(),
                        accepted,
                        local_error: Some(LocalError { before, after }),
                        reason: format!(
                            "int8 output error {} -> {}: {}",
                            fmt_err(before),
                            fmt_err(after),
                            if accepted { "kept" } else { "reverted" }
                        ),
                        edit: Some(edit.report.clone()),
                    }
                } else {
                    LayerDecision {
                        node: l.node.clone(),
                        accepted: true,
                        local_error: None,
                        reason: "applied (unguarded)".into(),
                        edit: Some(edit.report.clone()),
                    }
                };
                if decision.accepted {
                    layer::write_weight(&mut cur, l, &edit.w)?;
                    if let Some(b) = &edit.bias {
                        layer::write_bias(&mut cur, l, b)?;
                    }
                }
                if !opts.quiet {
                    eprintln!(
                        "layer {}: {} outliers (max/tau {:.1}): {}",
                        l.node,
                        st.outliers.len(),
                        st.abs_max / st.tau.max(f64::MIN_POSITIVE),
                        decision.reason
                    );
                }
                let accepted = decision.accepted;
                decisions.push(decision);
                accepted.then_some(edit.w)
            };
            if through == Through::Keep {
                if let Some(w_new) = &kept_edit {
                    update_kept_output(&mut seg, l, &st, &w, w_new, flagged_rows[idx])?;
                }
                // No later piece produces the kept output: its statistics are taken here.
                if let Some(ci) = collect.iter().position(|c| c == &l.output) {
                    let seg = &seg;
                    let stats: Vec<Result<TensorStats>> = (0..set.len())
                        .into_par_iter()
                        .map(|i| match seg.cached(i, &l.output) {
                            Some(ArrayData::F32(y)) => stat(ci, y.view()),
                            _ => bail!("internal error: the output of layer {} is not cached", l.node),
                        })
                        .collect();
                    for s in stats {
                        fold_fresh(per_collected(vec![(ci, s?)]));
                    }
                }
            }
        }
        if decisions.iter().any(|d| d.accepted) && !collect.is_empty() {
            seg.finish(
                &cur,
                &collect,
                stat,
                |v| Ok(per_collected(v.collected)),
                |_, per| {
                    fold_fresh(per);
                    Ok(())
                },
            )
            .context("calibrating the regularized model")?;
        }
        Ok((cur, seg.pieces, decisions, fresh))
    };
    // Plain quantization's guard score (guarded runs) runs in the background
    // ([`crate::background`]) from the start of the sequential pass: its twin's plan
    // optimization (single-threaded) and its samples take the cores the sequential pass leaves
    // idle while it loads its pieces and solves, without holding the pass up. It is awaited
    // after the regularized twin's score (its threads promoted back to the normal policy
    // then), and wasted only when no edit is kept.
    let background = match (&guard, &plain_ranges) {
        (Some(_), Some(_)) => Some(crate::background::IdlePool::new(rayon::current_num_threads())?),
        _ => None,
    };
    type Scores = (Option<f64>, Option<f64>);
    let (seq, reg_ranges, scores) = std::thread::scope(|scope| -> Result<(_, _, Scores)> {
        let plain = match (guard.as_ref(), plain_ranges.as_ref(), background.as_ref()) {
            (Some(g), Some(pr), Some(pool)) => Some(scope.spawn(move || pool.install(|| g.score(model, pr)))),
            _ => None,
        };
        // Everything up to the plain score's join; the background threads are promoted
        // whether it succeeds or not, since the scope waits for them either way.
        let ours = (|| -> Result<_> {
            let (cur, pieces, decisions, fresh) = sequential()?;
            // When the pass ended: wall seconds since it started, process CPU seconds, instant.
            let ended = (t1.elapsed().as_secs_f64(), cpu_seconds(), Instant::now());
            let regularized = decisions.iter().any(|d| d.accepted);
            // Global guard: the regularized model's quantized SQNR must beat plain quantization's.
            // Its ranges are plain quantization's except for the tensors recalibrated above.
            let mut reg_ranges = plain_ranges.clone();
            if let (Some(r), Some(g), true) = (reg_ranges.as_mut(), &run.guard, regularized) {
                let entries: Vec<(String, TensorEntry)> = collect
                    .iter()
                    .zip(&fresh)
                    .collect::<Vec<_>>()
                    .into_par_iter()
                    .filter_map(|(n, s)| {
                        s.as_ref().map(|s| {
                            (n.clone(), TensorEntry::for_quantizer(s, &g.method, g.quant.activations == ActType::S8))
                        })
                    })
                    .collect();
                for (name, e) in entries {
                    if let Some(slot) = r.get_mut(&name) {
                        *slot = e;
                    }
                }
            }
            let f = match (guard.as_ref(), &reg_ranges, regularized) {
                (Some(g), Some(rr), true) => Some(g.score(&cur, rr)?),
                _ => None,
            };
            Ok(((cur, pieces, decisions, regularized, ended), reg_ranges, f))
        })();
        // Needed now: the background threads must not wait for an idle core any more.
        if let Some(pool) = &background {
            pool.promote();
        }
        let b = plain.map(|h| h.join().map_err(|_| anyhow::anyhow!("internal error: the plain guard score panicked")));
        // The pass's own failure first, then the plain score's.
        let (seq, reg_ranges, f) = ours?;
        let b = b.transpose()?.transpose()?;
        Ok((seq, reg_ranges, (b, f)))
    })?;
    let ((cur, pieces, decisions, mut regularized, (seq_seconds, c2, t2)), (b, f)) = (seq, scores);
    report.layers.extend(decisions);
    report.pieces = pieces;
    report.passes += 1;
    report.phase_seconds.insert("2 sequential pass".into(), seq_seconds);
    if c2 > 0.0 {
        report.phase_cpu_seconds.insert("2 sequential pass".into(), c2 - c1);
    }
    if let (Some(guard), Some(f), true) = (guard.as_mut(), f, regularized) {
        report.guard_samples = Some(guard.set.len());
        let b = b.context("internal error: no plain quantization to compare with")?;
        guard.passes += 2;
        report.passes += guard.passes;
        if !opts.quiet {
            eprintln!(
                "quantized worst-output SQNR on {} calibration samples: plain {} dB, regularized {} dB",
                guard.set.len(),
                fmt_db(b),
                fmt_db(f)
            );
        }
        report.baseline_sqnr_db = finite(b);
        if f <= b {
            regularized = false;
            report.layers.iter_mut().for_each(|d| d.accepted = false);
        }
        report.final_sqnr_db = finite(if regularized { f } else { b });
        report.phase_seconds.insert("3 guard".into(), t2.elapsed().as_secs_f64());
        phase_cpu(&mut report, "3 guard", c2);
    }
    let (out_model, ranges) = if regularized { (cur, reg_ranges) } else { (model.clone(), plain_ranges.clone()) };
    report.regularized = regularized;
    if run.measure_float && regularized {
        let bytes = crate::onnx::io::encode_for_runtime(&out_model)?;
        let all: Vec<KeptTensor> =
            output_names.iter().map(|o| KeptTensor { name: o.clone(), samples: set.len(), budgeted: false }).collect();
        let pass = forward_pass(&bytes, &specs, &set, &[], (&[], false, 0, false), (&all, 0), opts, "float deviation")?;
        report.passes += 1;
        let mut sums = vec![(0f64, 0f64, false); output_names.len()];
        for (r, c) in reference.iter().zip(&pass.outputs) {
            for ((acc, r), c) in sums.iter_mut().zip(r).zip(c) {
                if let (Some(r), Some(c)) = (r, c) {
                    let (r2, e2) = guard::error_sums(r, c.view());
                    acc.0 += r2;
                    acc.1 += e2;
                    acc.2 = true;
                }
            }
        }
        report.float_sqnr_db = Some(guard::worst_sqnr(&sums)).and_then(finite);
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(Outcome { model: out_model, ranges, baseline_ranges: plain_ranges, reference, report })
}

// ---------------------------------------------------------------- text

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells.iter().zip(&width).map(|(c, &w)| format!("{c:<w$}")).collect();
        format!("  {}\n", parts.join("  ").trim_end())
    };
    let mut out = line(&header.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn list<T>(items: &[T], max: usize, f: impl Fn(&T) -> String) -> String {
    let mut s: Vec<String> = items.iter().take(max).map(f).collect();
    if items.len() > max {
        s.push(format!("+{}", items.len() - max));
    }
    s.join(" ")
}

/// The `onnxq outliers` table.
pub fn render_analysis(a: &Analysis) -> String {
    let mut out = format!(
        "{}: {} regularizable layers, {} samples; outlier: |y| > tau = {} x quantile {} of |y| (pre-bias)\n\n",
        a.model,
        a.layers.len(),
        a.samples,
        a.tau_factor,
        a.quantile
    );
    let rows: Vec<Vec<String>> = a
        .layers
        .iter()
        .map(|l| {
            vec![
                l.layer.node.clone(),
                format!("{}x{}", l.layer.k, l.layer.n),
                format!("{:.4}", l.quantile),
                format!("{:.4}", l.tau),
                format!("{:.4}", l.abs_max),
                if l.outliers > 0 { format!("{:.1}", l.max_over_tau) } else { "-".into() },
                l.outliers.to_string(),
                list(&l.columns, 6, |c| c.j.to_string()),
            ]
        })
        .collect();
    out.push_str(&table(&["layer", "KxN", "quantile", "tau", "abs max", "max/tau", "outliers", "columns"], &rows));
    let with: Vec<&LayerOutliers> = a.layers.iter().filter(|l| l.outliers > 0).collect();
    if with.is_empty() {
        out.push_str("\nno layer has outliers\n");
    } else {
        out.push_str("\ntop contributing weights (input k, output j, weight, share of the column's outlier excess):\n");
        for l in with {
            out.push_str(&format!(
                "  {}: {}\n",
                l.layer.node,
                list(&l.top, 6, |c| format!("w[{},{}]={:.4} ({:.0}%)", c.k, c.j, c.weight, c.share * 100.0))
            ));
        }
    }
    for r in &a.not_regularizable {
        out.push_str(&format!("not regularizable: {} ({}): {}\n", r.node, r.op_type, r.reason));
    }
    out
}

/// Human summary of a regularization report (one line per layer with outliers).
pub fn render_report(r: &RegularizationReport) -> String {
    let mut out = format!(
        "regularization ({}): {} of {} layers have outliers\n",
        r.mode, r.layers_with_outliers, r.candidate_layers
    );
    if let Some(first) = r.float_output_layers.first() {
        let n = r.float_output_layers.len();
        out.push_str(&format!(
            "  {n} {} ({}): {}\n",
            if n == 1 { "layer is not a candidate" } else { "layers are not candidates" },
            first.reason,
            list(&r.float_output_layers, 4, |l| l.node.clone())
        ));
    }
    for d in &r.layers {
        let detail = d.edit.as_ref().map_or(String::new(), |e| {
            let sel: usize = e.columns.iter().map(|c| c.selected.len()).sum();
            let peak_after = e.columns.iter().map(|c| c.peak_after).fold(0.0, f64::max);
            format!(
                "{} outliers in {} columns, {} weights selected, outlier peak {:.3} -> {:.3}; ",
                e.outliers,
                e.columns.len(),
                sel,
                e.abs_max,
                peak_after
            )
        });
        out.push_str(&format!("  {}: {}{}\n", d.node, detail, d.reason));
    }
    if let (Some(b), Some(f)) = (r.baseline_sqnr_db, r.final_sqnr_db) {
        out.push_str(&format!(
            "  quantized SQNR on {} calibration samples: plain {} dB, {} {} dB\n",
            r.guard_samples.unwrap_or(r.samples),
            fmt_db(b),
            if r.regularized { "regularized" } else { "kept plain" },
            fmt_db(f)
        ));
    }
    if let Some(f) = r.float_sqnr_db {
        out.push_str(&format!("  float deviation of the regularized model: {} dB SQNR\n", fmt_db(f)));
    }
    out
}

/// The `onnxq quantize --regularize` step: `auto` runs the guarded regularization, a
/// strength runs it unguarded with `λ = strength · tr(G)/K`.
pub fn for_pipeline(
    model: &ModelProto,
    (data, samples): (&DataOptions, Option<std::sync::Arc<SampleSet>>),
    mode: Regularize,
    opts: &Options,
    quant: &QuantOptions,
    method: &RangeMethod,
    label: &str,
) -> Result<Outcome> {
    let label = label.to_string();
    match mode {
        Regularize::Off => bail!("internal error: regularization is off"),
        Regularize::Auto => {
            let guard = Some(GuardSettings { quant: quant.clone(), method: method.clone() });
            let run = RunSettings {
                guard,
                measure_float: false,
                full_edits: false,
                placement: Some(quant.clone()),
                label,
                samples,
            };
            regularize(model, data, opts, &run)
        }
        Regularize::Strength(s) => {
            let o = Options { lambda: s, ..opts.clone() };
            let run = RunSettings {
                guard: None,
                measure_float: false,
                full_edits: false,
                placement: Some(quant.clone()),
                label,
                samples,
            };
            regularize(model, data, &o, &run)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass keeps each tensor for its own number of samples, and the budgeted ones only
    /// while all their values fit in the budget.
    #[test]
    fn a_pass_keeps_values_per_tensor_within_the_budget() -> Result<()> {
        let (model, data) = crate::fixtures::checked_in("transformer", Some(4))?;
        let graph = model.graph.as_ref().context("graph")?;
        let output = graph.output.first().context("output")?.name().to_string();
        let hidden = graph.node.iter().find(|n| n.op_type() == "MatMul").context("MatMul")?.output[0].clone();
        let (specs, set) = specs_and_set(&model, &data)?;
        let bytes = crate::onnx::io::encode_for_runtime(&model)?;
        let kept = [
            KeptTensor { name: output.clone(), samples: 2, budgeted: false },
            KeptTensor { name: hidden.clone(), samples: 4, budgeted: true },
        ];
        let opts = Options { quiet: true, ..Default::default() };
        let pass =
            |budget| forward_pass(&bytes, &specs, &set, &[], (&[], false, 0, false), (&kept, budget), &opts, "test");
        let all = pass(u64::MAX)?.outputs;
        assert_eq!(all.len(), 4);
        for (i, row) in all.iter().enumerate() {
            assert_eq!(row[0].is_some(), i < 2, "sample {i}");
            assert!(row[1].is_some(), "sample {i}");
        }
        // Room for one sample's values of the budgeted tensor, not two: none is kept.
        let one = 4 * all[0][1].as_ref().map_or(0, |a| a.len()) as u64;
        let tight = pass(one + one / 2)?.outputs;
        for (i, row) in tight.iter().enumerate() {
            assert_eq!(row[0], all[i][0], "sample {i}");
            assert!(row[1].is_none(), "sample {i}");
        }
        Ok(())
    }
}
