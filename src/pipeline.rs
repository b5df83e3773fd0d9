//! The `onnxq quantize` pipeline, end to end: load → (opset upgrade, checked on the samples)
//! → calibrate (or read `--stats`) → place and insert Q/DQ → optionally leave the most
//! harmful tensors float (`--keep-float N`) → save atomically with a JSON report.
//! `--dynamic` skips calibration: load → int8 weights + run-time activation quantization → save.

use crate::calibrate::{self as cal, StatsFile, TensorEntry};
use crate::data::{DataOptions, SampleSet};
use crate::onnx::pb::ModelProto;
use crate::onnx::{GraphView, Model, SaveOptions};
use crate::quantize::{self, QuantOptions, Report};
use crate::stats::RangeMethod;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

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
    pub kept_float: Vec<TensorCost>,
    pub quantization: Report,
    pub seconds: f64,
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
    let r = Model { proto: reference.clone(), path: None, file_size: 0, external_tensors: 0 };
    let c = Model { proto: cand.clone(), path: None, file_size: 0, external_tensors: 0 };
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

pub fn run(model_path: &std::path::Path, out_path: &std::path::Path, opts: &PipelineOptions) -> Result<PipelineReport> {
    let t0 = std::time::Instant::now();
    let loaded = crate::onnx::load(model_path)?;
    let graph = loaded.proto.graph.as_ref().context("the model has no graph")?;
    GraphView::new(graph).validate().with_context(|| format!("invalid model {}", model_path.display()))?;
    let (mut model, prepared) = quantize::prepare::prepare(&loaded.proto)?;
    let mut qopts = opts.quant.clone();
    qopts.method = opts.method.to_string();
    let mut opset_note = None;
    let samples;

    if opts.dynamic {
        let (q, report) = quantize::dynamic::quantize_dynamic(&model, &qopts)?;
        return finish(model_path, out_path, opts, q, report, (None, prepared), Vec::new(), 0, t0);
    }

    if qopts.weights_only {
        if quantize::default_opset(&model) < 13 && qopts.per_channel {
            if let Ok(up) = quantize::opset::upgrade_to_13(&model) {
                opset_note = Some(format!(
                    "upgraded opset {} -> 13 (not verified: no samples)",
                    quantize::default_opset(&model)
                ));
                model = up;
            }
        }
        let (q, report) = quantize::quantize(&model, &BTreeMap::new(), &qopts)?;
        return finish(model_path, out_path, opts, q, report, (opset_note, prepared), Vec::new(), 0, t0);
    }

    // Opset upgrade for per-channel weights, verified on the samples.
    let data = opts.data.as_ref();
    let opset = quantize::default_opset(&model);
    if qopts.per_channel && opset < 13 {
        match quantize::opset::upgrade_to_13(&model) {
            Ok(up) => match data {
                Some(d) => {
                    let check = DataOptions { max_samples: Some(d.max_samples.unwrap_or(4).min(4)), ..d.clone() };
                    let sqnr = output_sqnr(&model, &up, &check).context("checking the opset-13 upgrade")?;
                    if sqnr >= 80.0 {
                        opset_note =
                            Some(format!("upgraded opset {opset} -> 13, float outputs match ({} dB)", fmt_db(sqnr)));
                        model = up;
                    } else {
                        opset_note = Some(format!("opset {opset} -> 13 upgrade changed the float outputs ({sqnr:.1} dB): kept opset {opset}, per-tensor weights"));
                    }
                }
                None => {
                    opset_note = Some(format!("upgraded opset {opset} -> 13 (not verified: no samples)"));
                    model = up;
                }
            },
            Err(e) => opset_note = Some(format!("cannot upgrade opset {opset} to 13: {e:#}")),
        }
    }

    // Ranges: from --stats or a fresh calibration.
    let ranges: BTreeMap<String, TensorEntry> = match (&opts.stats, data) {
        (Some(p), _) => {
            let f = StatsFile::read(p)?;
            if !opts.quiet {
                eprintln!("using ranges from {} ({}, {} samples)", p.display(), f.method, f.samples);
            }
            samples = f.samples;
            f.tensors
        }
        (None, Some(d)) => {
            let (specs, set) = specs_and_set(&model, d)?;
            let g = model.graph.as_ref().context("the model has no graph")?;
            let targets = cal::default_targets(&GraphView::new(g))?;
            let bytes = crate::onnx::io::encode(&model)?;
            let c = cal::calibrate(&bytes, &specs, &set, &targets, &cal::CalibOptions { bins: 2048, quiet: opts.quiet })
                .with_context(|| format!("calibration of {} failed", model_path.display()))?;
            samples = c.samples;
            if !opts.quiet {
                eprintln!("calibrated {} tensors on {} samples in {:.2} s", c.tensors.len(), c.samples, c.seconds);
            }
            StatsFile::from_calibration("", &c, &opts.method).tensors
        }
        (None, None) => bail!("static quantization needs calibration data: pass --data PATH, --random N, --stats FILE, or use --weights-only"),
    };

    let (mut q, mut report) = quantize::quantize(&model, &ranges, &qopts)?;
    let mut kept = Vec::new();
    if opts.keep_float > 0 {
        let d =
            data.context("--keep-float needs calibration data (--data or --random) to measure each tensor's cost")?;
        kept = rank_tensor_costs(&model, &ranges, &qopts, &report, d, opts.keep_float_samples)?;
        kept.truncate(opts.keep_float);
        qopts.keep_float.extend(kept.iter().map(|c| c.tensor.clone()));
        let (q2, r2) = quantize::quantize(&model, &ranges, &qopts)?;
        q = q2;
        report = r2;
    }
    finish(model_path, out_path, opts, q, report, (opset_note, prepared), kept, samples, t0)
}

/// Quantizes each activation tensor alone and measures the worst-output SQNR it costs;
/// returns the tensors sorted from most to least harmful.
fn rank_tensor_costs(
    model: &ModelProto,
    ranges: &BTreeMap<String, TensorEntry>,
    qopts: &QuantOptions,
    report: &Report,
    data: &DataOptions,
    max_samples: usize,
) -> Result<Vec<TensorCost>> {
    let d = DataOptions { max_samples: Some(data.max_samples.unwrap_or(max_samples).min(max_samples)), ..data.clone() };
    let acts: Vec<&str> = report.tensors.iter().filter(|t| t.kind == "activation").map(|t| t.name.as_str()).collect();
    let mut costs = Vec::new();
    for t in &acts {
        // Only this tensor: every other activation is kept float.
        let mut o = qopts.clone();
        o.keep_float.extend(acts.iter().filter(|a| *a != t).map(|a| a.to_string()));
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
    if same_file(model_path, out_path) {
        bail!("refusing to overwrite the input model {}: choose another -o", model_path.display());
    }
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
        kept_float: kept,
        quantization: report,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
