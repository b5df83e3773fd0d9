//! The global guard of `--regularize auto`: the worst-output SQNR, on the guard's samples (the
//! first [`super::GUARD_SAMPLES`] calibration samples), of the int8 model that
//! `quantize::quantize` makes from a float model and its calibrated ranges, against the
//! original float model. The quantized model runs as its fake-quant twin
//! ([`crate::fakequant::twin`], one fused node per Q/DQ pair) and its outputs are compared
//! in place. One forward pass of the twin per score,
//! each twin loaded, run and dropped in turn; the original model's outputs are computed once,
//! in the first calibration pass, and kept. With a [`Prefix`], the twins run without the float
//! prefix, fed its frontier's values (also kept from the first pass).

use super::prefix::{Cut, Feed, Prefix};
use crate::array::ArrayData;
use crate::calibrate::{self as cal, Calibration};
use crate::data::SampleSet;
use crate::onnx::pb::ModelProto;
use crate::quantize::params::ActType;
use crate::quantize::{self, QuantOptions};
use crate::runtime::{InputFact, Plan};
use crate::stats::RangeMethod;
use anyhow::{Context, Result};
use ndarray::{ArrayD, ArrayViewD};
use std::collections::BTreeMap;

pub struct Guard<'a> {
    pub set: &'a SampleSet,
    pub facts: Vec<InputFact>,
    pub qopts: QuantOptions,
    pub quiet: bool,
    /// Graph output names of the original model.
    pub output_names: Vec<String>,
    /// Per sample, per graph output: the original float values.
    pub reference: &'a [Vec<Option<ArrayD<f32>>>],
    /// Forward passes run by the guard.
    pub passes: usize,
    /// The float prefix the twins skip, and per sample its frontier's values.
    pub frontier: Option<(Prefix, Vec<Vec<ArrayData>>)>,
}

/// A loaded twin, and where its inputs come from when it was cut (sample inputs otherwise).
struct Loaded {
    plan: Plan,
    feeds: Option<Vec<Feed>>,
}

/// Ranges of a calibration, as the pipeline derives them for activations of `act`.
pub fn ranges(calibration: &Calibration, method: &RangeMethod, act: ActType) -> BTreeMap<String, cal::TensorEntry> {
    cal::quantizer_ranges(calibration, method, act == ActType::S8)
}

impl Guard<'_> {
    /// The fake-quant twin of `model` quantized with `ranges`, loaded for the original
    /// model's graph outputs.
    fn plan(&self, model: &ModelProto, ranges: &BTreeMap<String, cal::TensorEntry>) -> Result<Loaded> {
        let (q, _) = quantize::quantize(model, ranges, &self.qopts).context("quantizing the regularized model")?;
        let twin = crate::fakequant::twin(&q).context("building the fake-quant twin")?;
        drop(q);
        self.load(twin)
    }

    /// A fake-quant twin loaded for the original model's graph outputs, without the float
    /// prefix when there is one and the twin holds it unchanged. The twin is dropped once
    /// encoded, so its float weights live only until tract has copied them
    /// ([`Plan::load_owned`]).
    fn load(&self, twin: ModelProto) -> Result<Loaded> {
        let cut = match self.frontier.as_ref().and_then(|(p, v)| v.first().map(|v| (p, v))) {
            Some((prefix, values)) => prefix.cut(&twin, &self.facts, values)?,
            None => None,
        };
        let (model, facts, feeds) = match cut {
            Some(Cut { model, facts, feeds }) => {
                // The whole twin's folded weights must not outlive it (see `Plan::load_owned`).
                drop(twin);
                (model, facts, Some(feeds))
            }
            None => (twin, self.facts.clone(), None),
        };
        let bytes = crate::onnx::io::encode_for_runtime(&model)?;
        drop(model);
        let plan = Plan::load_owned(bytes, &facts, &self.output_names).with_context(|| {
            let without = if feeds.is_some() { " without its float prefix" } else { "" };
            format!("cannot run the quantized model{without}")
        })?;
        Ok(Loaded { plan, feeds })
    }

    /// The worst-output SQNR of `model` quantized with `ranges` (its twin loaded, run on the
    /// guard's samples, and dropped: one twin's weights in memory at a time). Takes `&self`,
    /// so it can run beside other work; the caller counts the pass.
    pub fn score(&self, model: &ModelProto, ranges: &BTreeMap<String, cal::TensorEntry>) -> Result<f64> {
        let plan = self.plan(model, ranges)?;
        Ok(self.sqnrs(&[plan])?[0])
    }

    /// The worst-output SQNR of `twin`, a quantized model's fake-quant twin (one pass).
    pub fn sqnr_of_twin(&mut self, twin: ModelProto) -> Result<f64> {
        let plan = self.load(twin)?;
        self.passes += 1;
        Ok(self.sqnrs(&[plan])?[0])
    }

    /// The worst-output SQNR of each loaded twin, all run on each sample in one loop.
    fn sqnrs(&self, plans: &[Loaded]) -> Result<Vec<f64>> {
        let bar = cal::progress(self.set.len(), self.quiet, "guard");
        let n_out = self.output_names.len();
        let mut sums = vec![vec![(0f64, 0f64, false); n_out]; plans.len()];
        let reference = self.reference;
        // The twins' outputs are compared in place in the runtime's buffers.
        cal::for_each_sample_with(
            self.set,
            &bar,
            |i, inputs| {
                let refs = reference.get(i).context("internal error: no reference outputs")?;
                plans
                    .iter()
                    .map(|Loaded { plan, feeds }| {
                        let fed: Vec<ArrayData>;
                        let inputs = match feeds {
                            None => inputs,
                            Some(feeds) => {
                                let values = self.frontier.as_ref().and_then(|(_, v)| v.get(i));
                                fed = feeds
                                    .iter()
                                    .map(|f| match f {
                                        Feed::Sample(k) => inputs.get(*k).cloned(),
                                        Feed::Frontier(k) => values.and_then(|v| v.get(*k)).cloned(),
                                    })
                                    .collect::<Option<_>>()
                                    .context("internal error: a twin input is missing")?;
                                &fed
                            }
                        };
                        plan.run_visit_f32(inputs, |p, c| match (refs.get(p), c) {
                            (Some(Some(r)), Some(c)) => Some(error_sums(r, c)),
                            _ => None,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            },
            |_, per| {
                for (sums, per) in sums.iter_mut().zip(per) {
                    for (acc, s) in sums.iter_mut().zip(per) {
                        if let Some((r2, e2)) = s {
                            acc.0 += r2;
                            acc.1 += e2;
                            acc.2 = true;
                        }
                    }
                }
                Ok(())
            },
        )?;
        Ok(sums.iter().map(|s| worst_sqnr(s)).collect())
    }
}

/// `(Σ r², Σ (r − c)²)` over finite pairs of a float output (`Σ (r − c)² = ∞` when the shapes
/// differ).
pub fn error_sums(r: &ArrayD<f32>, c: ArrayViewD<'_, f32>) -> (f64, f64) {
    if r.shape() != c.shape() {
        return (1.0, f64::INFINITY);
    }
    let (mut r2, mut e2) = (0f64, 0f64);
    for (&a, &b) in r.iter().zip(c.iter()) {
        if a.is_finite() && b.is_finite() {
            let (a, b) = (f64::from(a), f64::from(b));
            r2 += a * a;
            e2 += (a - b) * (a - b);
        }
    }
    (r2, e2)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The transformer fixture's prefix is the start of its mask arithmetic (no weights, so it
    /// is cut only without a threshold): its twins, cut, score exactly as the whole twins do.
    #[test]
    fn twins_without_the_prefix_score_as_the_whole_twins() -> Result<()> {
        let (model, data) = crate::fixtures::checked_in("transformer", Some(8))?;
        let specs = cal::input_specs(model.graph.as_ref().context("graph")?);
        let set = crate::data::open(&specs, &data)?;
        let facts = cal::input_facts(&specs, &set)?;
        let qopts = QuantOptions::default();
        let targets = cal::quantization_targets(&model, &qopts)?;
        let bytes = crate::onnx::io::encode_for_runtime(&model)?;
        let calibration =
            cal::calibrate(&bytes, &specs, &set, &targets, &cal::CalibOptions { bins: 2048, quiet: true })?;
        let quantized: HashSet<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        let prefix = Prefix::with_min_weight(&model, &quantized, 0)?.context("no prefix")?;
        assert_eq!(prefix.frontier, ["mask_invert"]);

        // The float outputs and the frontier's values, as the first pass keeps them.
        let outputs: Vec<String> =
            model.graph.as_ref().context("graph")?.output.iter().map(|o| o.name().to_string()).collect();
        let wanted: Vec<String> = outputs.iter().chain(&prefix.frontier).cloned().collect();
        let plan = Plan::load(&bytes, None, &facts, &wanted)?;
        let (mut reference, mut frontier) = (Vec::new(), Vec::new());
        for i in 0..set.len() {
            let mut values = plan.run(&set.load(i)?.inputs)?;
            frontier.push(values.split_off(outputs.len()));
            reference.push(
                values
                    .into_iter()
                    .map(|v| match v {
                        ArrayData::F32(a) => Some(a),
                        _ => None,
                    })
                    .collect(),
            );
        }
        let mut guard = Guard {
            set: &set,
            facts,
            qopts,
            quiet: true,
            output_names: outputs,
            reference: &reference,
            passes: 0,
            frontier: None,
        };
        for method in [RangeMethod::MinMax, RangeMethod::Mse] {
            let r = ranges(&calibration, &method, guard.qopts.activations);
            guard.frontier = None;
            let whole = guard.score(&model, &r)?;
            let (q, _) = quantize::quantize(&model, &r, &guard.qopts)?;
            let twin = crate::fakequant::twin(&q)?;
            let cut = prefix.cut(&twin, &guard.facts, &frontier[0])?.context("the twin was not cut")?;
            let g = cut.model.graph.as_ref().context("graph")?;
            // The mask is inverted in the prefix and quantized there: the twin reads it, not the
            // integer mask.
            assert!(g.node.iter().all(|n| n.name() != "mask_cast" && n.name() != "mask_invert"));
            assert!(g.input.iter().all(|i| i.name() != "attention_mask"));
            assert_eq!(cut.feeds, [Feed::Sample(0), Feed::Frontier(0)]);
            guard.frontier = Some((prefix.clone(), frontier.clone()));
            let without = guard.score(&model, &r)?;
            assert!(whole.is_finite());
            assert_eq!(whole.to_bits(), without.to_bits(), "{whole} vs {without}");
        }
        Ok(())
    }
}
