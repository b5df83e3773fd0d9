//! Bias correction: quantization shifts the mean of each output channel of a convolution or
//! Gemm — rounded weights Ŵ and clipped, rounded inputs x̃ — and the shift accumulates
//! through the network; depthwise convolutions with few weights per channel suffer most.
//!
//! The shift is measured locally, for each layer on the inputs it actually sees in the
//! quantized model: the check samples (the first 8 calibration samples, the regularization guard's) run once through the
//! fake-quant twin, which exposes both the float input `x` of every input quantizer and its
//! dequantized value `x̃`; the same pass compares the twin's outputs with the float model's
//! (computed earlier and passed in, see [`Check`]), which is the "before" score of the
//! caller's keep-or-discard test, so that test costs one more twin pass (the corrected model).
//! With per-input-channel means E[x_k] and E[x̃_k], the expected output shift of channel m is
//!
//! `Δ_m = Σ_k Σ_s (Ŵ[m,k,s]·E[x̃_k] − W[m,k,s]·E[x_k])`
//!
//! (k over the input channels of m's group, s over the kernel taps; zero padding at borders
//! is ignored), and the float bias becomes `b'_m = b_m − Δ_m`. Because each layer's shift is
//! taken on its own inputs, corrections do not double count what upstream layers shifted.
//! The caller re-quantizes (the int32 bias absorbs the change) and keeps the result only if
//! it measures better on the calibration samples.

use crate::array::dtype;
use crate::calibrate::for_each_sample_with;
use crate::data::SampleSet;
use crate::onnx::attr::NodeAttrs;
use crate::onnx::pb::ModelProto;
use crate::onnx::tensor::{from_f32, to_f32};
use crate::onnx::GraphView;
use crate::outliers::guard::{error_sums, worst_sqnr};
use crate::runtime::{InputFact, Plan};
use anyhow::{Context, Result};
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};
use std::collections::BTreeMap;

struct Target {
    node: String,
    /// Float input before its quantizer, and the dequantized value the layer reads.
    x: String,
    x_dq: String,
    /// Name of the (folded) dequantized weight in the twin.
    w_hat: String,
    gemm_trans_b: Option<bool>,
}

fn targets(q: &ModelProto) -> Vec<Target> {
    let Some(g) = q.graph.as_ref() else { return Vec::new() };
    let view = GraphView::new(g);
    let is = |name: &str, op: &str| view.producer(name).is_some_and(|p| p.op_type() == op);
    g.node
        .iter()
        .filter_map(|n| {
            let gemm = match n.op_type() {
                "Conv" => None,
                "Gemm" if n.attr_int_or("transA", 0).ok()? == 0 => Some(n.attr_int_or("transB", 0).ok()? != 0),
                _ => return None,
            };
            let (x_dq, w, b) = (n.input.first()?, n.input.get(1)?, n.input.get(2)?);
            if !is(x_dq, "DequantizeLinear") || !is(w, "DequantizeLinear") || b.is_empty() {
                return None;
            }
            let q_out = view.producer(x_dq)?.input.first()?;
            let qn = view.producer(q_out).filter(|p| p.op_type() == "QuantizeLinear")?;
            Some(Target {
                node: n.name().to_string(),
                x: qn.input.first()?.clone(),
                x_dq: x_dq.clone(),
                w_hat: w.clone(),
                gemm_trans_b: gemm,
            })
        })
        .collect()
}

/// Per-input-channel sums of one value (axis 1 for NCHW, the last axis for [.., K]) through a
/// Relu where `relu` says so, and the number of elements per channel.
fn channel_sums(v: Option<ArrayViewD<'_, f32>>, last: bool, relu: bool) -> (Vec<f64>, u64) {
    let Some(a) = v.filter(|a| a.ndim() >= 2) else { return (Vec::new(), 0) };
    let axis = if last { a.ndim() - 1 } else { 1 };
    let per = (a.len() / a.shape()[axis].max(1)) as u64;
    let lo = if relu { 0.0 } else { f64::NEG_INFINITY };
    (a.axis_iter(Axis(axis)).map(|c| c.iter().map(|&v| (v as f64).max(lo)).sum()).collect(), per)
}

/// One sample of the measuring pass: channel sums of the requested tensors, and
/// `(Σ r², Σ (r − c)²)` of each graph output against the reference.
type SampleSums = (Vec<(Vec<f64>, u64)>, Vec<Option<(f64, f64)>>);

/// One pass of the twin (module docs) over `check`'s samples: the per-input-channel
/// means (axis 1 for NCHW, last axis for [.., K]) of the requested tensors, through a Relu
/// where `relu` says so (a Relu folded into the quantizer is absent from the quantized graph,
/// but the float layer reads its output), and the twin's worst-output SQNR against the
/// reference outputs, compared in place.
fn channel_means(
    twin: &ModelProto,
    names: &[String],
    last_axis: &[bool],
    relu: &[bool],
    check: &Check,
) -> Result<(Vec<Vec<f64>>, f64)> {
    let mut requested = names.to_vec();
    requested.extend(check.output_names.iter().cloned());
    let bytes = crate::onnx::io::encode_for_runtime(twin)?;
    let plan = Plan::load(&bytes, None, &check.facts, &requested)?;
    let mut acc: Vec<(Vec<f64>, u64)> = vec![(Vec::new(), 0); names.len()];
    let mut errors = vec![(0f64, 0f64, false); check.output_names.len()];
    for_each_sample_with(
        check.set,
        &indicatif::ProgressBar::hidden(),
        |i, inputs| {
            let refs = check.reference.get(i).context("internal error: no reference outputs")?;
            let mut sums: SampleSums = (vec![(Vec::new(), 0); names.len()], vec![None; check.output_names.len()]);
            plan.run_visit_f32(inputs, |p, v| match (names.len()..requested.len()).contains(&p) {
                false => sums.0[p] = channel_sums(v, last_axis[p], relu[p]),
                true => {
                    let k = p - names.len();
                    if let (Some(Some(r)), Some(c)) = (refs.get(k), v) {
                        sums.1[k] = Some(error_sums(r, c));
                    }
                }
            })?;
            Ok(sums)
        },
        |_, (s, e)| {
            for (a, (v, n)) in acc.iter_mut().zip(s) {
                if a.0.is_empty() {
                    a.0 = vec![0.0; v.len()];
                }
                if a.0.len() == v.len() {
                    a.0.iter_mut().zip(&v).for_each(|(x, y)| *x += y);
                    a.1 += n;
                }
            }
            for (acc, e) in errors.iter_mut().zip(e) {
                if let Some((r2, e2)) = e {
                    *acc = (acc.0 + r2, acc.1 + e2, true);
                }
            }
            Ok(())
        },
    )?;
    let means =
        acc.into_iter().map(|(s, n)| s.into_iter().map(|v| if n > 0 { v / n as f64 } else { 0.0 }).collect()).collect();
    Ok((means, worst_sqnr(&errors)))
}

/// Output-channel shift of a layer from its input-channel means.
fn shift(
    w: &ArrayD<f32>,
    w_hat: &ArrayD<f32>,
    ex: &[f64],
    ex_hat: &[f64],
    groups: usize,
    gemm: Option<bool>,
) -> Option<Vec<f64>> {
    if w.shape() != w_hat.shape() {
        return None;
    }
    match gemm {
        Some(trans_b) => {
            // B is [K, N] (or [N, K] when transB).
            let (k, n) = if trans_b { (w.shape()[1], w.shape()[0]) } else { (w.shape()[0], w.shape()[1]) };
            if ex.len() != k || ex_hat.len() != k {
                return None;
            }
            Some(
                (0..n)
                    .map(|j| {
                        (0..k)
                            .map(|i| {
                                let (a, b) = if trans_b { ([j, i], [j, i]) } else { ([i, j], [i, j]) };
                                w_hat[IxDyn(&a)] as f64 * ex_hat[i] - w[IxDyn(&b)] as f64 * ex[i]
                            })
                            .sum()
                    })
                    .collect(),
            )
        }
        None => {
            // W is [M, C/groups, kernel...].
            let m = w.shape()[0];
            let cg = *w.shape().get(1)?;
            if groups == 0 || !m.is_multiple_of(groups) || ex.len() != cg * groups || ex_hat.len() != ex.len() {
                return None;
            }
            let per_group = m / groups;
            Some(
                w.axis_iter(Axis(0))
                    .zip(w_hat.axis_iter(Axis(0)))
                    .enumerate()
                    .map(|(o, (wo, who))| {
                        let base = (o / per_group) * cg;
                        wo.axis_iter(Axis(0))
                            .zip(who.axis_iter(Axis(0)))
                            .enumerate()
                            .map(|(k, (wk, whk))| {
                                whk.iter().map(|&v| v as f64).sum::<f64>() * ex_hat[base + k]
                                    - wk.iter().map(|&v| v as f64).sum::<f64>() * ex[base + k]
                            })
                            .sum()
                    })
                    .collect(),
            )
        }
    }
}

/// The samples bias correction measures on and the float model's outputs on them.
pub struct Check<'a> {
    pub set: &'a SampleSet,
    pub facts: Vec<InputFact>,
    /// Graph output names, the order of `reference`'s entries.
    pub output_names: Vec<String>,
    /// Per sample of `set`, per graph output: the float model's values.
    pub reference: &'a [Vec<Option<ArrayD<f32>>>],
}

/// Returns the float model with corrected biases (to quantize again), how many changed, and
/// the worst-output SQNR of `quantized` on `check`'s samples (`NaN` when nothing is corrected:
/// no pass runs).
pub fn correct(float_model: &ModelProto, quantized: &ModelProto, check: &Check) -> Result<(ModelProto, usize, f64)> {
    let ts = targets(quantized);
    if ts.is_empty() {
        return Ok((float_model.clone(), 0, f64::NAN));
    }
    let twin = crate::fakequant::twin(quantized)?;
    // Does the float layer read x through a Relu that quantization folded away?
    let fg = float_model.graph.as_ref().context("the model has no graph")?;
    let fview = GraphView::new(fg);
    let through_relu = |t: &Target| {
        fg.node
            .iter()
            .find(|n| n.name() == t.node)
            .and_then(|n| n.input.first())
            .and_then(|i| fview.producer(i))
            .is_some_and(|p| p.op_type() == "Relu" && p.input.first() == Some(&t.x))
    };
    let mut names: Vec<String> = Vec::new();
    let mut last: Vec<bool> = Vec::new();
    let mut relu: Vec<bool> = Vec::new();
    let mut slot: BTreeMap<(String, bool), usize> = BTreeMap::new();
    let mut keys: Vec<((String, bool), (String, bool))> = Vec::new();
    for t in &ts {
        let pair = ((t.x.clone(), through_relu(t)), (t.x_dq.clone(), false));
        for (n, r) in [&pair.0, &pair.1] {
            if let std::collections::btree_map::Entry::Vacant(e) = slot.entry((n.clone(), *r)) {
                e.insert(names.len());
                names.push(n.clone());
                last.push(t.gemm_trans_b.is_some());
                relu.push(*r);
            }
        }
        keys.push(pair);
    }
    let (means, sqnr) = channel_means(&twin, &names, &last, &relu, check)?;
    let tg = twin.graph.as_ref().context("the twin has no graph")?;
    let tview = GraphView::new(tg);
    let mut out = float_model.clone();
    let g = out.graph.as_mut().context("the model has no graph")?;
    let mut changed = 0;
    for (t, (kx, kdq)) in ts.iter().zip(&keys) {
        let Some(ni) = g.node.iter().position(|n| n.name() == t.node) else { continue };
        let n = g.node[ni].clone();
        let (Some(w), Some(b)) = (n.input.get(1), n.input.get(2).filter(|b| !b.is_empty())) else { continue };
        let Some(wt) = g.initializer.iter().find(|i| i.name() == w) else { continue };
        let Some(what) = tview.weight(&t.w_hat) else { continue };
        let (w, w_hat) = (to_f32(wt)?, to_f32(what)?);
        let groups = n.attr_int_or("group", 1)?.max(1) as usize;
        let Some(d) = shift(&w, &w_hat, &means[slot[kx]], &means[slot[kdq]], groups, t.gemm_trans_b) else {
            continue;
        };
        let Some(bi) = g.initializer.iter().position(|i| i.name() == b && i.data_type() == dtype::FLOAT) else {
            continue;
        };
        let bv = to_f32(&g.initializer[bi])?;
        if bv.len() != d.len() {
            continue;
        }
        let nb: Vec<f32> = bv.iter().zip(&d).map(|(&b, &s)| (b as f64 - s) as f32).collect();
        g.initializer[bi] = from_f32(b, &ArrayD::from_shape_vec(IxDyn(&[nb.len()]), nb).unwrap_or_default());
        changed += 1;
    }
    Ok((out, changed, sqnr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depthwise_and_gemm_shifts() {
        // Depthwise 2 channels, 1x2 kernels.
        let w = ArrayD::from_shape_vec(IxDyn(&[2, 1, 1, 2]), vec![1.0, 1.0, 2.0, 0.0]).unwrap();
        let wh = ArrayD::from_shape_vec(IxDyn(&[2, 1, 1, 2]), vec![1.0, 1.5, 2.0, 0.0]).unwrap();
        let d = shift(&w, &wh, &[1.0, 3.0], &[1.0, 3.5], 2, None).unwrap();
        assert_eq!(d, vec![0.5, 1.0]);
        // Gemm without transB: B [2, 1].
        let b = ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![1.0, 2.0]).unwrap();
        let bh = ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![1.0, 2.5]).unwrap();
        assert_eq!(shift(&b, &bh, &[1.0, 2.0], &[1.0, 2.0], 1, Some(false)).unwrap(), vec![1.0]);
        assert!(shift(&b, &bh, &[1.0], &[1.0], 1, Some(false)).is_none());
    }
}
