//! The guard: the worst-output SQNR, on the calibration samples, of the int8 model that
//! `quantize::quantize` makes from a float candidate with ranges recalibrated on that
//! candidate, against the original float model (run through the fake-quant twin, as
//! `pipeline::output_sqnr` and `onnxq eval` do).
//!
//! Cost savers: the original model's outputs are computed once (in the first calibration
//! pass) and kept; a candidate that differs from the accepted model only in some layers'
//! constants is recalibrated only on the tensors downstream of those layers — the others'
//! statistics are those of the accepted model, bit for bit.

use crate::array::ArrayData;
use crate::calibrate::{self as cal, Calibration, Target};
use crate::data::{InputSpec, SampleSet};
use crate::onnx::pb::ModelProto;
use crate::onnx::GraphView;
use crate::quantize::{self, QuantOptions};
use crate::runtime::{InputFact, Plan};
use crate::stats::RangeMethod;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashSet};

/// A float candidate, quantized and scored.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Worst-output SQNR (dB) of its quantized model against the original float model.
    pub sqnr_db: f64,
    pub calibration: Calibration,
}

pub struct Guard<'a> {
    pub specs: &'a [InputSpec],
    pub set: &'a SampleSet,
    pub facts: Vec<InputFact>,
    pub targets: Vec<Target>,
    pub qopts: QuantOptions,
    pub method: RangeMethod,
    pub bins: usize,
    pub quiet: bool,
    /// Graph output names of the original model.
    pub output_names: Vec<String>,
    /// Per sample, per graph output: the original float values.
    pub reference: Vec<Vec<ArrayData>>,
    /// Forward passes run by the guard.
    pub passes: usize,
    /// The activations plain quantization wanted a range for (quantized or blocked by their
    /// range); only those are recalibrated. `None`: every target.
    pub wanted: Option<HashSet<String>>,
}

/// Ranges of a calibration, as the pipeline derives them.
pub fn ranges(calibration: &Calibration, method: &RangeMethod) -> BTreeMap<String, cal::TensorEntry> {
    cal::StatsFile::from_calibration("", calibration, method).tensors
}

/// Tensors whose value depends on the outputs of `nodes` (the nodes' outputs included).
pub fn downstream(model: &ModelProto, nodes: &[usize]) -> Result<HashSet<String>> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    let mut out: HashSet<String> = HashSet::new();
    let mut stack: Vec<usize> = nodes.to_vec();
    let mut seen: HashSet<usize> = HashSet::new();
    while let Some(i) = stack.pop() {
        if !seen.insert(i) {
            continue;
        }
        let Some(n) = graph.node.get(i) else { continue };
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            out.insert(o.clone());
            for &(c, _) in view.consumers(o) {
                stack.push(c);
            }
        }
    }
    Ok(out)
}

impl Guard<'_> {
    /// Scores `candidate`, whose constants differ from those of the model calibrated in
    /// `accepted` only in the nodes `changed` (every tensor is recalibrated when `None`).
    pub fn score(&mut self, candidate: &ModelProto, accepted: &Calibration, changed: &[usize]) -> Result<Scored> {
        let down = downstream(candidate, changed)?;
        let wanted = |n: &str| self.wanted.as_ref().is_none_or(|w| w.contains(n));
        let targets: Vec<Target> =
            self.targets.iter().filter(|t| down.contains(&t.name) && wanted(&t.name)).cloned().collect();
        let bytes = crate::onnx::io::encode_for_runtime(candidate)?;
        let mut calibration = accepted.clone();
        if !targets.is_empty() {
            let fresh = cal::calibrate(
                &bytes,
                self.specs,
                self.set,
                &targets,
                &cal::CalibOptions { bins: self.bins, quiet: self.quiet },
            )
            .context("recalibrating the regularized model")?;
            self.passes += 1;
            let mut by_name: BTreeMap<String, crate::stats::TensorStats> = fresh.tensors.into_iter().collect();
            for (name, stats) in calibration.tensors.iter_mut() {
                if let Some(s) = by_name.remove(name) {
                    *stats = s;
                }
            }
            // Tensors that only the candidate has (none when the structure is unchanged).
            calibration.tensors.extend(by_name);
            calibration.seconds += fresh.seconds;
        }
        let sqnr_db = self.sqnr_of(candidate, &calibration)?;
        Ok(Scored { sqnr_db, calibration })
    }

    /// Quantizes `model` with the ranges of `calibration` and measures its worst-output SQNR.
    pub fn sqnr_of(&mut self, model: &ModelProto, calibration: &Calibration) -> Result<f64> {
        let r = ranges(calibration, &self.method);
        let (q, report) = quantize::quantize(model, &r, &self.qopts).context("quantizing the regularized model")?;
        if self.wanted.is_none() {
            let mut w: HashSet<String> =
                report.tensors.iter().filter(|t| t.kind == "activation").map(|t| t.name.clone()).collect();
            w.extend(report.skipped.iter().map(|s| s.name.clone()));
            self.wanted = Some(w);
        }
        let twin = crate::fakequant::twin(&q).context("building the fake-quant twin")?;
        let bytes = crate::onnx::io::encode_for_runtime(&twin)?;
        let plan =
            Plan::load(&bytes, None, &self.facts, &self.output_names).context("cannot run the quantized model")?;
        let pb = cal::progress(self.set.len(), self.quiet, "guard");
        let n_out = self.output_names.len();
        let mut sums = vec![(0f64, 0f64, false); n_out];
        let reference = &self.reference;
        cal::for_each_sample(
            &plan,
            self.set,
            &pb,
            |i, outs| {
                let refs = reference.get(i).context("internal error: no reference outputs")?;
                Ok(outs.iter().zip(refs).map(|(c, r)| error_sums(r, c)).collect::<Vec<_>>())
            },
            |_, per| {
                for (acc, s) in sums.iter_mut().zip(per) {
                    if let Some((r2, e2)) = s {
                        acc.0 += r2;
                        acc.1 += e2;
                        acc.2 = true;
                    }
                }
                Ok(())
            },
        )?;
        self.passes += 1;
        Ok(worst_sqnr(&sums))
    }
}

/// `(Σ r², Σ (r − c)²)` over finite pairs of float outputs; `None` for non-float ones.
pub fn error_sums(r: &ArrayData, c: &ArrayData) -> Option<(f64, f64)> {
    let (ArrayData::F32(r), ArrayData::F32(c)) = (r, c) else { return None };
    if r.shape() != c.shape() {
        return Some((1.0, f64::INFINITY));
    }
    let (mut r2, mut e2) = (0f64, 0f64);
    for (&a, &b) in r.iter().zip(c.iter()) {
        if a.is_finite() && b.is_finite() {
            let (a, b) = (f64::from(a), f64::from(b));
            r2 += a * a;
            e2 += (a - b) * (a - b);
        }
    }
    Some((r2, e2))
}

/// The worst SQNR over outputs (`+inf` when every compared output is identical).
pub fn worst_sqnr(sums: &[(f64, f64, bool)]) -> f64 {
    sums.iter()
        .filter(|s| s.2)
        .map(|&(r2, e2, _)| {
            if e2 == 0.0 {
                f64::INFINITY
            } else if r2 == 0.0 {
                f64::NEG_INFINITY
            } else {
                10.0 * (r2 / e2).log10()
            }
        })
        .fold(f64::INFINITY, f64::min)
}
