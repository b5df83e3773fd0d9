//! The `onnxq quantize` pipeline, end to end: load → (opset upgrade, checked on the first sample)
//! → lattice graph inputs shifted onto the uint8 grid (`quantize::input_grid`) → calibrate
//! (or read `--stats`) → (`--weight-rounding gptq`: layer Hessians from one pass over 8
//! samples, `quantize::gptq`) → place and insert Q/DQ → optionally leave the most harmful tensors float
//! (`--keep-float N`) → save atomically with a JSON report. Bias correction (opt-in) compares
//! on the first 8 samples (`outliers::GUARD_SAMPLES`) against the float outputs the
//! regularization pass kept.
//! `--dynamic` skips calibration: load → int8 weights + run-time activation quantization → save.

use crate::calibrate::{self as cal, StatsFile, TensorEntry};
use crate::data::{DataOptions, SampleSet};
use crate::onnx::pb::ModelProto;
use crate::onnx::{Model, SaveOptions};
use crate::quantize::{self, QuantOptions, Report};
use crate::stats::RangeMethod;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub quant: QuantOptions,
    pub method: RangeMethod,
    pub data: Option<DataOptions>,
    pub stats: Option<PathBuf>,
    pub keep_float: usize,
    /// Samples used to measure each tensor's cost for --keep-float.
    pub keep_float_samples: usize,
    pub save: SaveOptions,
    pub quiet: bool,
    /// Dynamic quantization (int8 weights, activations quantized at run time): no data.
    pub dynamic: bool,
    /// Empirical per-channel bias correction after quantization (kept only if it helps).
    pub bias_correction: bool,
    /// Shift lattice-valued graph inputs onto the uint8 grid (`quantize::input_grid`).
    pub input_grid: bool,
    /// Outlier-aware weight regularization before static quantization.
    pub regularize: crate::outliers::Regularize,
    pub outlier: crate::outliers::Options,
    /// GPTQ weight rounding (`quantize::gptq`) in static quantization with data.
    pub gptq: bool,
}

/// One tensor's measured cost for `--keep-float`.
#[derive(Debug, Clone, Serialize)]
pub struct TensorCost {
    pub tensor: String,
    /// Output SQNR (worst output) with only this tensor quantized.
    pub sqnr_db: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    pub model: String,
    pub output: String,
    pub method: String,
    pub samples: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opset_upgrade: Option<String>,
    pub prepared: quantize::prepare::Prepared,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub input_grid: Vec<quantize::input_grid::AlignedInput>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub equalized: Vec<quantize::equalize::Equalized>,
    /// Rescalable tensors left as they are, with the reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub equalize_skipped: Vec<quantize::equalize::Skipped>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept_float: Vec<TensorCost>,
    pub quantization: Report,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regularization: Option<crate::outliers::RegularizationReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias_correction: Option<BiasCorrectionReport>,
    pub seconds: f64,
    /// Wall time of each step that ran (s): load, opset check, input grid, regularization,
    /// calibration, gptq (`--weight-rounding gptq`), quantize, bias correction, guard, keep
    /// float, save.
    pub phase_seconds: BTreeMap<String, f64>,
}

/// Wall-time bookkeeping of the pipeline's steps.
struct Phases {
    last: std::time::Instant,
    seconds: BTreeMap<String, f64>,
}

impl Phases {
    fn new() -> Phases {
        Phases { last: std::time::Instant::now(), seconds: BTreeMap::new() }
    }

    /// Charges the time since the previous mark to `step` (added up when a step repeats).
    fn mark(&mut self, step: &str) {
        let now = std::time::Instant::now();
        *self.seconds.entry(step.to_string()).or_default() += (now - self.last).as_secs_f64();
        self.last = now;
    }
}

fn specs_and_set(model: &ModelProto, data: &DataOptions) -> Result<(Vec<crate::data::InputSpec>, SampleSet)> {
    let g = model.graph.as_ref().context("the model has no graph")?;
    let specs = cal::input_specs(g);
    let set = crate::data::open(&specs, data)?;
    Ok((specs, set))
}

/// Worst-output SQNR of `cand` against `reference` over the samples (both run in tract;
/// `cand` through its fake-quant twin when it holds Q/DQ).
pub fn output_sqnr(reference: &ModelProto, cand: &ModelProto, data: &DataOptions) -> Result<f64> {
    let r = Model::in_memory(reference.clone());
    let c = Model::in_memory(cand.clone());
    let rep = crate::eval::evaluate(&r, &c, data, &crate::eval::EvalOptions { per_layer: false, quiet: true })?;
    // Identical outputs count as infinite SQNR; integer outputs are ignored.
    let worst = rep
        .outputs
        .iter()
        .filter(|o| o.metrics.cosine.is_some() || o.metrics.identical)
        .map(|o| if o.metrics.identical { f64::INFINITY } else { o.metrics.sqnr_db.unwrap_or(f64::NEG_INFINITY) })
        .fold(f64::INFINITY, f64::min);
    Ok(worst)
}

/// "1 node", "3 nodes".
fn nodes(n: usize) -> String {
    format!("{n} node{}", if n == 1 { "" } else { "s" })
}

/// The model static quantization calibrates (see [`calibration_model`]).
pub struct CalibrationModel {
    pub model: ModelProto,
    /// What happened to the opset.
    pub opset_note: Option<String>,
    /// The exact ranges of the shifted input tensors (they replace the calibrated ones).
    pub grid_ranges: BTreeMap<String, [f32; 2]>,
    pub grid_inputs: Vec<quantize::input_grid::AlignedInput>,
    /// The calibration samples, already checked (when the input grid opened them).
    pub samples: Option<Arc<SampleSet>>,
}

/// The model `onnxq quantize` calibrates, from the prepared one ([`quantize::prepare`]): the
/// opset upgraded to 13 when per-channel weights need it (when a node's signature had to be
/// rewritten, only if the float outputs on the first sample of `data` stay the same), and
/// with `input_grid` (uint8 activations only), lattice-valued graph inputs moved onto the uint8 grid (their ranges are then fixed, so
/// this needs fresh calibration, not `--stats`; the nodes that must read the unshifted
/// input join `qopts.exclude`). `mark(step)` is called after each step.
pub fn calibration_model(
    mut model: ModelProto,
    qopts: &mut QuantOptions,
    data: Option<&DataOptions>,
    input_grid: bool,
    quiet: bool,
    mark: &mut dyn FnMut(&str),
) -> Result<CalibrationModel> {
    let mut opset_note = None;
    let opset = quantize::default_opset(&model);
    if qopts.per_channel && opset < 13 {
        match quantize::opset::upgrade_to_13(&model) {
            // No node's signature differs: only the version number changed, nothing to check.
            Ok((up, 0)) => {
                opset_note = Some(format!("upgraded opset {opset} -> 13 (version only: no node needed a rewrite)"));
                model = up;
            }
            Ok((up, rewritten)) => match data {
                // The rewrite is what could go wrong: check it on a sample.
                Some(d) => {
                    // The upgrade rewrites structure (axes attributes to inputs, Softmax's
                    // coercion): a wrong rewrite changes the outputs of any sample, so one is
                    // enough to tell.
                    let check = DataOptions { max_samples: Some(1), ..d.clone() };
                    let sqnr = output_sqnr(&model, &up, &check).context("checking the opset-13 upgrade")?;
                    if sqnr >= 80.0 {
                        opset_note = Some(format!(
                            "upgraded opset {opset} -> 13 ({} rewritten), float outputs match ({} dB)",
                            nodes(rewritten),
                            fmt_db(sqnr)
                        ));
                        model = up;
                    } else {
                        opset_note = Some(format!("opset {opset} -> 13 upgrade changed the float outputs ({sqnr:.1} dB): kept opset {opset}, per-tensor weights"));
                    }
                }
                None => {
                    opset_note = Some(format!(
                        "upgraded opset {opset} -> 13 ({} rewritten, not verified: no samples)",
                        nodes(rewritten)
                    ));
                    model = up;
                }
            },
            Err(e) => opset_note = Some(format!("cannot upgrade opset {opset} to 13: {e:#}")),
        }
    }
    mark("opset check");

    let mut grid_ranges = BTreeMap::new();
    let mut grid_inputs = Vec::new();
    let mut samples = None;
    if let (true, quantize::params::ActType::U8, Some(d)) = (input_grid, qopts.activations, data) {
        let (aligned, set) = quantize::input_grid::align_inputs(&model, d)?;
        samples = Some(Arc::new(set));
        if let Some(a) = aligned {
            if !quiet {
                for i in &a.inputs {
                    eprintln!(
                        "input '{}' is a lattice of step {:.6e}: shifted by {:.6e} onto the uint8 grid (zero point {}) for {} Conv",
                        i.input,
                        i.step,
                        i.shift,
                        i.zero_point,
                        i.convs.len()
                    );
                }
            }
            qopts.exclude.extend(a.inputs.iter().flat_map(|i| i.float_nodes.iter().cloned()));
            model = a.model;
            grid_ranges = a.ranges;
            grid_inputs = a.inputs;
        }
    }
    mark("input grid");
    Ok(CalibrationModel { model, opset_note, grid_ranges, grid_inputs, samples })
}

pub fn run(model_path: &std::path::Path, out_path: &std::path::Path, opts: &PipelineOptions) -> Result<PipelineReport> {
    let t0 = std::time::Instant::now();
    let mut phases = Phases::new();
    let loaded = crate::onnx::load_valid(model_path)?;
    let (mut model, prepared) = quantize::prepare::prepare(&loaded.proto)?;
    phases.mark("load");
    let mut qopts = opts.quant.clone();
    qopts.method = opts.method.to_string();
    let mut opset_note = None;
    let samples;

    if opts.gptq && (opts.dynamic || opts.data.is_none()) {
        bail!(
            "--weight-rounding gptq weighs rounding errors by the layers' inputs: it needs calibration samples (--data or --random) and does not apply to --dynamic"
        );
    }
    if opts.dynamic {
        let (q, report) = quantize::dynamic::quantize_dynamic(&model, &qopts)?;
        return finish(model_path, out_path, opts, q, report, (None, prepared), Vec::new(), 0, t0);
    }

    if qopts.weights_only {
        if quantize::default_opset(&model) < 13 && qopts.per_channel {
            if let Ok((up, _)) = quantize::opset::upgrade_to_13(&model) {
                opset_note = Some(format!(
                    "upgraded opset {} -> 13 (not verified: no samples)",
                    quantize::default_opset(&model)
                ));
                model = up;
            }
        }
        if let (true, Some(d)) = (opts.gptq, opts.data.as_ref()) {
            qopts.hessians = Some(hessians(&model, d, model_path)?);
        }
        let (q, report) = quantize::quantize(&model, &BTreeMap::new(), &qopts)?;
        return finish(model_path, out_path, opts, q, report, (opset_note, prepared), Vec::new(), 0, t0);
    }

    let data = opts.data.as_ref();
    let staged =
        calibration_model(model, &mut qopts, data, opts.input_grid && opts.stats.is_none(), opts.quiet, &mut |step| {
            phases.mark(step)
        })?;
    let (opset_note, grid_ranges, grid_inputs) = (staged.opset_note, staged.grid_ranges, staged.grid_inputs);
    let checked = staged.samples;
    let mut model = staged.model;

    // Outlier-aware weight regularization; when guarded it returns the ranges it measured.
    let mut regularization: Option<crate::outliers::RegularizationReport> = None;
    let mut reg_ranges = None;
    let mut plain_alternative = None;
    let mut reference = Vec::new();
    if opts.regularize != crate::outliers::Regularize::Off {
        if opts.stats.is_some() {
            bail!("--regularize changes weights, so ranges must be recalibrated: pass --data or --random instead of --stats");
        }
        let d = data.context("--regularize needs calibration data (--data or --random)")?;
        let label = model_path.display().to_string();
        let o = crate::outliers::for_pipeline(
            &model,
            (d, checked.clone()),
            opts.regularize,
            &opts.outlier,
            &qopts,
            &opts.method,
            &label,
        )
        .with_context(|| format!("outlier regularization of {label} failed"))?;
        if o.report.regularized {
            plain_alternative = o.baseline_ranges.map(|r| (model.clone(), r));
        }
        reference = o.reference;
        model = o.model;
        reg_ranges = o.ranges.map(|r| (r, o.report.samples));
        regularization = Some(o.report);
    }

    phases.mark("regularization");

    // Ranges: from --stats or a fresh calibration.
    let mut ranges: BTreeMap<String, TensorEntry> = match (&opts.stats, data) {
        _ if reg_ranges.is_some() => {
            let (r, n) = reg_ranges.take().unwrap_or_default();
            samples = n;
            r
        }
        (Some(p), _) => {
            let f = StatsFile::read(p)?;
            if !opts.quiet {
                eprintln!("using ranges from {} ({}, {} samples)", p.display(), f.method, f.samples);
            }
            samples = f.samples;
            f.tensors
        }
        (None, Some(d)) => {
            // The input grid keeps the graph inputs: its checked samples serve.
            let specs = cal::input_specs(model.graph.as_ref().context("the model has no graph")?);
            let set = crate::data::open_unless_checked(&specs, d, checked.as_ref())?;
            // Only what the placement can quantize: fewer pinned outputs, same model.
            let targets = cal::quantization_targets(&model, &qopts)?;
            // Weights reach tract by reference (no copy, no 2 GiB protobuf limit).
            let bytes = crate::onnx::io::encode_for_runtime(&model)?;
            let c = cal::calibrate(&bytes, &specs, &set, &targets, &cal::CalibOptions { bins: 2048, quiet: opts.quiet })
                .with_context(|| format!("calibration of {} failed", model_path.display()))?;
            samples = c.samples;
            if !opts.quiet {
                eprintln!("calibrated {} tensors on {} samples in {:.2} s", c.tensors.len(), c.samples, c.seconds);
            }
            cal::quantizer_ranges(&c, &opts.method, qopts.activations == quantize::params::ActType::S8)
        }
        (None, None) => bail!("static quantization needs calibration data: pass --data PATH, --random N, --stats FILE, or use --weights-only"),
    };

    for (name, r) in &grid_ranges {
        if let Some(e) = ranges.get_mut(name) {
            e.range = *r;
        }
    }
    if let Some((_, plain_ranges)) = plain_alternative.as_mut() {
        for (name, r) in &grid_ranges {
            if let Some(e) = plain_ranges.get_mut(name) {
                e.range = *r;
            }
        }
    }
    phases.mark("calibration");
    // Per-channel rescaling between convolutions (the float function is unchanged; the
    // rescaled tensors' ranges come from the per-channel statistics just gathered).
    let mut equalized = (Vec::new(), Vec::new());
    if qopts.equalize {
        let act = qopts.activations;
        equalized = quantize::equalize::apply(&mut model, &mut ranges, &opts.method, act)?;
        if let Some((plain, plain_ranges)) = plain_alternative.as_mut() {
            quantize::equalize::apply(plain, plain_ranges, &opts.method, act)?;
        }
        if !opts.quiet && !equalized.0.is_empty() {
            let min = equalized.0.iter().map(|e| e.min_scale).fold(f64::INFINITY, f64::min);
            eprintln!(
                "equalized {} activations between convolutions per channel (channel scales {:.3}..1)",
                equalized.0.len(),
                min
            );
        }
    }
    phases.mark("equalize");
    if let (true, Some(d)) = (opts.gptq, data) {
        qopts.hessians = Some(hessians(&model, d, model_path)?);
    }
    phases.mark("gptq");
    let (mut q, mut report) = quantize::quantize(&model, &ranges, &qopts)?;
    phases.mark("quantize");
    let mut bias_correction = None;
    // Bias correction's samples and the float outputs on them (the regularization pass's
    // when it kept them: its guard uses the same samples).
    let check = match (opts.bias_correction, data) {
        (true, Some(d)) => Some(CheckSamples::new(&model, d, reference)?),
        _ => None,
    };
    if let Some(c) = &check {
        let r = correct_biases(&model, &ranges, &qopts, &q, c)?;
        if let Some((m2, q2, r2)) = r.1 {
            model = m2;
            q = q2;
            report = r2;
        }
        if !opts.quiet && r.0.corrected > 0 {
            eprintln!(
                "bias correction on {} nodes: {} ({} -> {} dB on calibration samples)",
                r.0.corrected,
                if r.0.applied { "kept" } else { "discarded" },
                fmt_db(r.0.sqnr_before_db),
                fmt_db(r.0.sqnr_after_db)
            );
        }
        bias_correction = Some(r.0);
    }
    phases.mark("bias correction");
    // Global guard of `--regularize auto` through bias correction: when that step changed
    // anything, plain quantization takes the same steps and the better model on the
    // calibration samples wins.
    if let (Some((plain, plain_ranges)), Some(c), Some(bc)) = (plain_alternative, &check, &bias_correction) {
        if bc.corrected > 0 {
            let (pq, pr) = quantize::quantize(&plain, &plain_ranges, &qopts)?;
            let pbc = correct_biases(&plain, &plain_ranges, &qopts, &pq, c)?;
            let (pm, pq, pr) = pbc.1.unwrap_or((plain.clone(), pq, pr));
            let (s_reg, s_plain) = (c.sqnr(&q)?, c.sqnr(&pq)?);
            if let Some(r) = regularization.as_mut() {
                r.final_sqnr_db = Some(s_reg.max(s_plain)).filter(|v| v.is_finite());
                if s_plain >= s_reg {
                    r.regularized = false;
                    r.layers.iter_mut().for_each(|l| l.accepted = false);
                    (model, q, report, ranges) = (pm, pq, pr, plain_ranges);
                    bias_correction = Some(pbc.0);
                }
            }
        }
    }
    phases.mark("guard");
    let mut kept = Vec::new();
    if opts.keep_float > 0 {
        let d =
            data.context("--keep-float needs calibration data (--data or --random) to measure each tensor's cost")?;
        kept = rank_tensor_costs(
            &model,
            &ranges,
            &qopts,
            &report,
            d,
            opts.keep_float_samples,
            (4 * opts.keep_float).max(12),
        )?;
        kept.truncate(opts.keep_float);
        qopts.keep_float.extend(kept.iter().map(|c| c.tensor.clone()));
        let (q2, r2) = quantize::quantize(&model, &ranges, &qopts)?;
        q = q2;
        report = r2;
    }
    phases.mark("keep float");
    let mut out = finish(model_path, out_path, opts, q, report, (opset_note, prepared), kept, samples, t0)?;
    phases.mark("save");
    phases.seconds.retain(|_, s| *s >= 0.0005);
    out.phase_seconds = phases.seconds;
    out.regularization = regularization;
    out.bias_correction = bias_correction;
    out.input_grid = grid_inputs;
    (out.equalized, out.equalize_skipped) = equalized;
    Ok(out)
}

/// The layer Hessians GPTQ rounding weighs errors by ([`quantize::gptq::collect`]).
fn hessians(
    model: &ModelProto,
    data: &DataOptions,
    path: &std::path::Path,
) -> Result<std::sync::Arc<quantize::gptq::Hessians>> {
    let h = quantize::gptq::collect(model, data)
        .with_context(|| format!("estimating the layer Hessians of {} for GPTQ rounding", path.display()))?;
    Ok(std::sync::Arc::new(h))
}

/// What bias correction did.
#[derive(Debug, Clone, Serialize)]
pub struct BiasCorrectionReport {
    pub corrected: usize,
    pub applied: bool,
    /// Worst-output SQNR on the calibration samples used, before and after.
    pub sqnr_before_db: f64,
    pub sqnr_after_db: f64,
    pub samples: usize,
}

type Corrected = (ModelProto, ModelProto, Report);

/// The samples bias correction (and the final guard) compares on: the first
/// [`crate::outliers::GUARD_SAMPLES`] calibration samples, with the float model's outputs on
/// them.
struct CheckSamples {
    set: SampleSet,
    facts: Vec<crate::runtime::InputFact>,
    output_names: Vec<String>,
    reference: crate::outliers::Outputs,
}

impl CheckSamples {
    /// `reference`: the outputs of `model` on those samples when already computed (the
    /// regularization pass keeps them), otherwise empty and computed here in one float pass.
    fn new(model: &ModelProto, data: &DataOptions, reference: crate::outliers::Outputs) -> Result<CheckSamples> {
        let d = DataOptions {
            max_samples: Some(data.max_samples.unwrap_or(usize::MAX).min(crate::outliers::GUARD_SAMPLES)),
            ..data.clone()
        };
        let (specs, set) = specs_and_set(model, &d)?;
        let facts = cal::input_facts(&specs, &set)?;
        let g = model.graph.as_ref().context("the model has no graph")?;
        let output_names: Vec<String> = g.output.iter().map(|o| o.name().to_string()).collect();
        let reference = if reference.len() == set.len() {
            reference
        } else {
            let bytes = crate::onnx::io::encode_for_runtime(model)?;
            let plan = crate::runtime::Plan::load(&bytes, None, &facts, &output_names)?;
            let mut outs = Vec::with_capacity(set.len());
            cal::for_each_sample(
                &plan,
                &set,
                &indicatif::ProgressBar::hidden(),
                |_, o| Ok(o.into_iter().map(|a| a.as_f32().cloned()).collect::<Vec<_>>()),
                |_, o| {
                    outs.push(o);
                    Ok(())
                },
            )?;
            outs
        };
        Ok(CheckSamples { set, facts, output_names, reference })
    }

    fn for_bias_correction(&self) -> quantize::bias_correction::Check<'_> {
        quantize::bias_correction::Check {
            set: &self.set,
            facts: self.facts.clone(),
            output_names: self.output_names.clone(),
            reference: &self.reference,
        }
    }

    /// Worst-output SQNR of the quantized model `q` (one pass of its exact twin: the fast
    /// one rounds the ties that bilinear Resize and average pooling make, 0.4 dB off on
    /// PP-OCR det).
    fn sqnr(&self, q: &ModelProto) -> Result<f64> {
        let mut g = crate::outliers::guard::Guard {
            set: &self.set,
            facts: self.facts.clone(),
            qopts: QuantOptions::default(),
            quiet: true,
            output_names: self.output_names.clone(),
            reference: &self.reference,
            passes: 0,
            frontier: None,
        };
        g.sqnr_of_twin(crate::fakequant::twin(q)?)
    }
}

/// Corrects biases from the per-channel output means of the float model and the quantized
/// twin on the check samples; keeps the correction only if the worst-output SQNR on those
/// samples improves.
fn correct_biases(
    model: &ModelProto,
    ranges: &BTreeMap<String, TensorEntry>,
    qopts: &QuantOptions,
    q: &ModelProto,
    check: &CheckSamples,
) -> Result<(BiasCorrectionReport, Option<Corrected>)> {
    let (corrected, changes, before) = quantize::bias_correction::correct(model, q, &check.for_bias_correction())?;
    let mut r = BiasCorrectionReport {
        corrected: changes,
        applied: false,
        sqnr_before_db: f64::NAN,
        sqnr_after_db: f64::NAN,
        samples: check.set.len(),
    };
    if changes == 0 {
        return Ok((r, None));
    }
    let (q2, r2) = quantize::quantize(&corrected, ranges, qopts)?;
    r.sqnr_before_db = before;
    r.sqnr_after_db = check.sqnr(&q2)?;
    r.applied = r.sqnr_after_db > r.sqnr_before_db;
    Ok(if r.applied { (r, Some((corrected, q2, r2))) } else { (r, None) })
}

/// Relative rounding noise of quantizing a tensor with `range`: (step²/12) / E[x²].
fn local_noise(e: &TensorEntry, range: [f32; 2]) -> f64 {
    let step = (range[1] as f64 - range[0] as f64) / 255.0;
    let power = e.std * e.std + e.mean * e.mean;
    if power > 0.0 {
        step * step / 12.0 / power
    } else {
        0.0
    }
}

/// Ranks the quantized activations by what each costs the outputs when quantized alone
/// (worst-output SQNR on up to `max_samples` samples), most harmful first. Only the
/// `candidates` tensors with the largest relative rounding noise are measured, which keeps
/// the cost to a few dozen short evaluations on large graphs.
fn rank_tensor_costs(
    model: &ModelProto,
    ranges: &BTreeMap<String, TensorEntry>,
    qopts: &QuantOptions,
    report: &Report,
    data: &DataOptions,
    max_samples: usize,
    candidates: usize,
) -> Result<Vec<TensorCost>> {
    let d = DataOptions { max_samples: Some(data.max_samples.unwrap_or(max_samples).min(max_samples)), ..data.clone() };
    let acts: Vec<&str> = report.tensors.iter().filter(|t| t.kind == "activation").map(|t| t.name.as_str()).collect();
    let mut by_noise: Vec<(f64, &str)> = report
        .tensors
        .iter()
        .filter(|t| t.kind == "activation")
        .filter_map(|t| Some((local_noise(ranges.get(&t.name)?, t.range?), t.name.as_str())))
        .collect();
    by_noise.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    let mut costs = Vec::new();
    for (_, t) in by_noise.into_iter().take(candidates) {
        // Only this tensor: every other activation is kept float.
        let mut o = qopts.clone();
        o.keep_float.extend(acts.iter().filter(|a| **a != t).map(|a| a.to_string()));
        let (q, _) = quantize::quantize(model, ranges, &o)?;
        let s = output_sqnr(model, &q, &d)?;
        costs.push(TensorCost { tensor: t.to_string(), sqnr_db: s });
    }
    costs.sort_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db).then(a.tensor.cmp(&b.tensor)));
    Ok(costs)
}

fn fmt_db(v: f64) -> String {
    if v.is_infinite() {
        "inf".into()
    } else {
        format!("{v:.1}")
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    model_path: &std::path::Path,
    out_path: &std::path::Path,
    opts: &PipelineOptions,
    q: ModelProto,
    report: Report,
    (opset_note, prepared): (Option<String>, quantize::prepare::Prepared),
    kept: Vec<TensorCost>,
    samples: usize,
    t0: std::time::Instant,
) -> Result<PipelineReport> {
    crate::onnx::refuse_overwrite(model_path, out_path)?;
    crate::onnx::save(&q, out_path, &opts.save)?;
    Ok(PipelineReport {
        model: model_path.display().to_string(),
        output: out_path.display().to_string(),
        method: if opts.dynamic {
            "dynamic".into()
        } else if opts.quant.weights_only {
            "none".into()
        } else {
            opts.method.to_string()
        },
        samples,
        opset_upgrade: opset_note,
        prepared,
        input_grid: Vec::new(),
        equalized: Vec::new(),
        equalize_skipped: Vec::new(),
        kept_float: kept,
        quantization: report,
        regularization: None,
        bias_correction: None,
        seconds: t0.elapsed().as_secs_f64(),
        phase_seconds: BTreeMap::new(),
    })
}
