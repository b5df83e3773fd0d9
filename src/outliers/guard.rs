//! The global guard of `--regularize auto`: the worst-output SQNR, on the guard's samples (the
//! first [`super::GUARD_SAMPLES`] calibration samples), of the int8 model that
//! `quantize::quantize` makes from a float model and its calibrated ranges, against the
//! original float model. The quantized model runs as its fast fake-quant twin
//! ([`crate::fakequant::fast_twin`]: `x·(1/s)` instead of the exact `x/s`, which moves only
//! quotients within about an ulp of a rounding tie, far below the differences the guard
//! compares) and its outputs are compared in place. One forward pass of the twin per score,
//! the two compared twins in one sample loop; the original model's outputs are computed once,
//! in the first calibration pass, and kept.

use crate::array::ArrayData;
use crate::calibrate::{self as cal, Calibration};
use crate::data::SampleSet;
use crate::onnx::builder::{value_info, Dim};
use crate::onnx::pb::ModelProto;
use crate::onnx::tensor::to_array;
use crate::quantize::params::ActType;
use crate::quantize::{self, QuantOptions};
use crate::runtime::{InputFact, Plan};
use crate::stats::RangeMethod;
use anyhow::{Context, Result};
use ndarray::{ArrayD, ArrayViewD};
use std::collections::{BTreeMap, BTreeSet};

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
}

/// Ranges of a calibration, as the pipeline derives them for activations of `act`.
pub fn ranges(calibration: &Calibration, method: &RangeMethod, act: ActType) -> Ranges {
    cal::quantizer_ranges(calibration, method, act == ActType::S8)
}

/// A quantized model's ranges, by tensor name.
pub type Ranges = BTreeMap<String, cal::TensorEntry>;

/// The twins of two quantized variants of one model (same graph, other constant values) as
/// one loadable model: the first twin with every initializer where the second's differs
/// turned into a graph input, plus those inputs' facts and each variant's values of them.
struct SharedTwin {
    model: ModelProto,
    facts: Vec<InputFact>,
    values: [Vec<ArrayData>; 2],
}

/// [`SharedTwin`] of twins `a` and `b`, or `None` when they differ in more than initializer
/// values (nodes, graph inputs or outputs, initializer names, types or shapes), or a
/// differing initializer cannot be read.
fn shared_twin(mut a: ModelProto, b: &ModelProto) -> Result<Option<SharedTwin>> {
    let (Some(ga), Some(gb)) = (a.graph.as_mut(), b.graph.as_ref()) else { return Ok(None) };
    let same_structure = a.opset_import == b.opset_import
        && ga.node == gb.node
        && ga.input == gb.input
        && ga.output == gb.output
        && ga.value_info == gb.value_info
        && ga.sparse_initializer == gb.sparse_initializer
        && ga.initializer.len() == gb.initializer.len();
    if !same_structure {
        return Ok(None);
    }
    let mut differ = Vec::new();
    for (k, (ia, ib)) in ga.initializer.iter().zip(&gb.initializer).enumerate() {
        if ia == ib {
            continue;
        }
        if ia.name() != ib.name() || ia.dims != ib.dims || ia.data_type() != ib.data_type() {
            return Ok(None);
        }
        let (Ok(va), Ok(vb)) = (to_array(ia), to_array(ib)) else { return Ok(None) };
        differ.push((k, va, vb));
    }
    let mut facts = Vec::with_capacity(differ.len());
    let mut values = [Vec::with_capacity(differ.len()), Vec::with_capacity(differ.len())];
    for (k, va, vb) in &differ {
        let t = &ga.initializer[*k];
        let dims: Vec<Dim> = t.dims.iter().map(|&d| Dim::Fixed(d)).collect();
        ga.input.push(value_info(t.name(), t.data_type(), Some(&dims)));
        facts.push(InputFact { name: t.name().to_string(), elem_type: t.data_type(), shape: va.shape().to_vec() });
        values[0].push(va.clone());
        values[1].push(vb.clone());
    }
    let params: BTreeSet<usize> = differ.iter().map(|(k, _, _)| *k).collect();
    let mut k = 0;
    ga.initializer.retain(|_| {
        k += 1;
        !params.contains(&(k - 1))
    });
    Ok(Some(SharedTwin { model: a, facts, values }))
}

impl Guard<'_> {
    /// The fast fake-quant twin of `model` quantized with `ranges`.
    fn twin(&self, model: &ModelProto, ranges: &Ranges) -> Result<ModelProto> {
        let (q, _) = quantize::quantize(model, ranges, &self.qopts).context("quantizing the regularized model")?;
        crate::fakequant::fast_twin(&q).context("building the fake-quant twin")
    }

    /// Loads a twin for the original model's graph outputs, with `extra` inputs after the
    /// graph's own.
    fn load(&self, twin: &ModelProto, extra: &[InputFact]) -> Result<Plan> {
        let bytes = crate::onnx::io::encode_for_runtime(twin)?;
        let facts: Vec<InputFact> = self.facts.iter().chain(extra).cloned().collect();
        Plan::load(&bytes, None, &facts, &self.output_names).context("cannot run the quantized model")
    }

    /// The worst-output SQNRs of `a` and `b`, each a float model quantized with its ranges.
    /// The variants of one model usually differ only in constant values (weights, biases,
    /// scales): then one twin is loaded with those constants as inputs and run with each
    /// variant's values (tract's plan optimization costs more than the guard's runs);
    /// otherwise each twin is loaded. The two run on each sample one after the other, so the
    /// two scores cost one sample loop.
    pub fn compare(&mut self, a: (&ModelProto, &Ranges), b: (&ModelProto, &Ranges)) -> Result<(f64, f64)> {
        let (ta, tb) = (self.twin(a.0, a.1)?, self.twin(b.0, b.1)?);
        let s = match shared_twin(ta.clone(), &tb)? {
            Some(shared) => {
                let plan = self.load(&shared.model, &shared.facts)?;
                let [va, vb] = &shared.values;
                self.sqnrs(&[(&plan, va), (&plan, vb)])?
            }
            None => {
                let (pa, pb) = (self.load(&ta, &[])?, self.load(&tb, &[])?);
                self.sqnrs(&[(&pa, &[]), (&pb, &[])])?
            }
        };
        Ok((s[0], s[1]))
    }

    /// The worst-output SQNR of `twin`, a quantized model's fake-quant twin (one pass).
    pub fn sqnr_of_twin(&mut self, twin: &ModelProto) -> Result<f64> {
        let plan = self.load(twin, &[])?;
        Ok(self.sqnrs(&[(&plan, &[])])?[0])
    }

    /// The worst-output SQNR of each run, a loaded twin and the values of its inputs after
    /// the graph's own, all run on each sample in one loop.
    fn sqnrs(&mut self, runs: &[(&Plan, &[ArrayData])]) -> Result<Vec<f64>> {
        let bar = cal::progress(self.set.len(), self.quiet, "guard");
        let n_out = self.output_names.len();
        let mut sums = vec![vec![(0f64, 0f64, false); n_out]; runs.len()];
        let reference = self.reference;
        // The twins' outputs are compared in place in the runtime's buffers.
        cal::for_each_sample_with(
            self.set,
            &bar,
            |i, inputs| {
                let refs = reference.get(i).context("internal error: no reference outputs")?;
                runs.iter()
                    .map(|(plan, extra)| {
                        let all: Vec<ArrayData>;
                        let inputs = if extra.is_empty() {
                            inputs
                        } else {
                            all = inputs.iter().chain(extra.iter()).cloned().collect();
                            &all
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
        self.passes += runs.len();
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
