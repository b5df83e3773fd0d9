//! Per-channel equalization of the activation between two convolutions.
//!
//! ONNX Runtime's int8 kernels take one scale per activation tensor, so a channel whose values
//! are ten times smaller than the tensor's largest channel is quantized with a tenth of the
//! levels. Between `y = Conv₁(x)` (optionally followed by `Relu`) and a convolution `Conv₂`
//! that is `y`'s only reader, each channel `c` can be divided by any `s_c > 0` for free in
//! float: `Conv₁`'s output channel `c` (its weights `W₁[c]` and bias `b₁[c]`) is divided by
//! `s_c`, `Relu` commutes with a positive scaling, and the weights of `Conv₂` that read
//! channel `c` are multiplied by `s_c`. The float model is the same function; only where the
//! quantization noise lands changes.
//!
//! - `Conv₂` depthwise (each output channel reads one input channel): its per-channel weight
//!   scales absorb `s_c` exactly, so the activation is fully equalized, `s_c ∝ r_c` (`r_c` the
//!   channel's calibrated `max |y_c|`).
//! - otherwise (dense or grouped `Conv₂`, `ConvTranspose`): growing a weight column of `Conv₂`
//!   coarsens its output channel's weight grid, so the two are balanced as SmoothQuant does
//!   with `α = ½`: `s_c ∝ √(r_c / w_c)`, `w_c` the largest `|weight|` reading channel `c`.
//!
//! Scales are normalized to `max s_c = 1`, and `r_c`, `w_c` are floored at 10⁻³ of their
//! maximum (a dead channel is not blown up without bound). Only `Conv₁`'s own, unshared
//! constant weight and bias are edited, and only `Conv₂`'s.
//!
//! Ranges: calibration keeps each candidate's per-channel statistics
//! ([`crate::calibrate::Target::channel_stats`]), so the rescaled tensor's mse range is
//! computed without another pass ([`crate::stats::scaled_range`]: the same candidate search,
//! with each channel's error taken on its own histogram). Only with mse ranges (the default):
//! percentile and entropy would need the rescaled tensor's own histogram, and under minmax
//! every rescaled channel reaches the range's ends (on PP-OCR it lost 0.29 dB there).
//!
//! Measured on the bench PP-OCR detector (27 such tensors; ONNX Runtime, 32 held-out
//! samples): see README.

use crate::calibrate::TensorEntry;
use crate::onnx::attr::NodeAttrs;
use crate::onnx::pb::ModelProto;
use crate::onnx::tensor::to_f32;
use crate::onnx::GraphView;
use crate::quantize::params::ActType;
use crate::stats::{scaled_range, RangeMethod, TensorStats};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// A tensor that can be rescaled per channel: `Conv₁ [→ Relu] → tensor → Conv₂`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// The activation between the two (the Relu's output, or `Conv₁`'s).
    pub tensor: String,
    /// `Conv₁`'s output when a Relu follows it (that tensor is rescaled too).
    pub pre_activation: Option<String>,
    pub producer: usize,
    pub consumer: usize,
    /// Channels of `tensor`.
    pub channels: usize,
    /// `Conv₂` reads each input channel into its own output channels only.
    pub depthwise: bool,
}

/// What [`apply`] did to one tensor (report).
#[derive(Debug, Clone, Serialize)]
pub struct Equalized {
    pub tensor: String,
    pub producer: String,
    pub consumer: String,
    pub channels: usize,
    /// `α` of `s_c ∝ r_c^α / w_c^(1−α)`.
    pub alpha: f64,
    /// Smallest `s_c` (the largest is 1): channel `c` is multiplied by `1/s_c`.
    pub min_scale: f64,
    /// The range before (of the tensor as calibrated) and after rescaling.
    pub range_before: [f32; 2],
    pub range_after: [f32; 2],
}

/// A rescalable tensor left as it is (report).
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub tensor: String,
    pub reason: String,
}

/// The tensors `model` allows to rescale (static: the graph and its constants).
pub fn candidates(model: &ModelProto) -> Result<Vec<Pair>> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    let nodes = view.nodes();
    // A constant only this node reads.
    let own_constant = |name: &str| -> bool {
        !name.is_empty()
            && view.weight(name).is_some()
            && view.consumers(name).len() == 1
            && !view.is_graph_output(name)
    };
    // The only reader of `t` (reading it once), if `t` is not a graph output.
    let sole_reader = |t: &str| -> Option<usize> {
        match view.consumers(t) {
            [(i, _)] if !view.is_graph_output(t) => Some(*i),
            _ => None,
        }
    };
    let mut out = Vec::new();
    for (p, n) in nodes.iter().enumerate() {
        if n.op_type() != "Conv" || n.domain() != "" {
            continue;
        }
        let (Some(w1), Some(y)) = (n.input.get(1), n.output.first()) else { continue };
        let bias_ok = n.input.get(2).is_none_or(|b| b.is_empty() || own_constant(b));
        if !own_constant(w1) || !bias_ok {
            continue;
        }
        let Some(w1t) = view.weight(w1) else { continue };
        let channels = match w1t.dims.first() {
            Some(&c) if c > 0 && w1t.dims.len() >= 3 => c as usize,
            _ => continue,
        };
        let Some(mut reader) = sole_reader(y) else { continue };
        let (mut tensor, mut pre_activation) = (y.clone(), None);
        if nodes[reader].op_type() == "Relu" {
            let Some(r) = nodes[reader].output.first() else { continue };
            let Some(next) = sole_reader(r) else { continue };
            (tensor, pre_activation, reader) = (r.clone(), Some(y.clone()), next);
        }
        let c2 = &nodes[reader];
        if !matches!(c2.op_type(), "Conv" | "ConvTranspose") || c2.domain() != "" {
            continue;
        }
        if c2.input.first() != Some(&tensor) || c2.input.iter().filter(|i| **i == tensor).count() != 1 {
            continue;
        }
        let Some(w2) = c2.input.get(1).filter(|w| own_constant(w)) else { continue };
        let Some(w2t) = view.weight(w2) else { continue };
        if w2t.dims.len() < 3 || w2t.dims.iter().any(|&d| d <= 0) {
            continue;
        }
        let group = c2.attr_int_or("group", 1).unwrap_or(0);
        if group < 1 {
            continue;
        }
        let reads = match c2.op_type() {
            // W₂ [M, C/g, k…]
            "Conv" => w2t.dims[1] * group,
            // W₂ [C, M/g, k…]
            _ => w2t.dims[0],
        };
        if reads != channels as i64 || (c2.op_type() == "ConvTranspose" && group != 1) {
            continue;
        }
        let depthwise = c2.op_type() == "Conv" && w2t.dims[1] == 1;
        out.push(Pair { tensor, pre_activation, producer: p, consumer: reader, channels, depthwise });
    }
    Ok(out)
}

/// Rescales every candidate whose entry in `ranges` carries per-channel statistics and
/// replaces that entry with the rescaled tensor's (ranges by `method` for activations of
/// `act`). Returns what was done and, for candidates left alone, why.
pub fn apply(
    model: &mut ModelProto,
    ranges: &mut BTreeMap<String, TensorEntry>,
    method: &RangeMethod,
    act: ActType,
) -> Result<(Vec<Equalized>, Vec<Skipped>)> {
    let pairs = candidates(model)?;
    let mut done = Vec::new();
    let mut skipped = Vec::new();
    if *method != RangeMethod::Mse {
        for p in pairs {
            let reason = match method {
                RangeMethod::MinMax => {
                    "--method minmax: every rescaled channel reaches the range's ends (PP-OCR lost 0.29 dB)".to_string()
                }
                _ => format!("--method {method} needs the rescaled tensor's own histogram"),
            };
            skipped.push(Skipped { tensor: p.tensor, reason });
        }
        return Ok((done, skipped));
    }
    for p in pairs {
        let Some(entry) = ranges.get(&p.tensor) else { continue };
        let Some(chans) = entry.channels.clone() else { continue };
        if p.pre_activation.as_ref().is_some_and(|y| ranges.contains_key(y)) {
            skipped.push(Skipped {
                tensor: p.tensor.clone(),
                reason: "the Conv output before the Relu is quantized too".into(),
            });
            continue;
        }
        if chans.len() != p.channels {
            skipped.push(Skipped {
                tensor: p.tensor.clone(),
                reason: format!("{} channels calibrated, {} expected", chans.len(), p.channels),
            });
            continue;
        }
        let (producer, consumer) = {
            let g = model.graph.as_ref().context("the model has no graph")?;
            (g.node[p.producer].clone(), g.node[p.consumer].clone())
        };
        let label = |n: &crate::onnx::pb::NodeProto| n.name().to_string();
        let w2_name = consumer.input[1].clone();
        let w2 = {
            let g = model.graph.as_ref().context("the model has no graph")?;
            let view = GraphView::new(g);
            let t = view.weight(&w2_name).with_context(|| format!("weight '{w2_name}' not found"))?;
            to_f32(t).with_context(|| format!("node '{}': reading weight '{w2_name}'", label(&consumer)))?
        };
        let r: Vec<f64> = chans.iter().map(TensorStats::abs_max).collect();
        let conv = consumer.op_type() == "Conv";
        let w: Vec<f64> = column_abs_max(&w2, p.channels, conv);
        let alpha = if p.depthwise { 1.0 } else { 0.5 };
        let Some(s) = channel_scales(&r, &w, alpha) else {
            skipped.push(Skipped { tensor: p.tensor.clone(), reason: "no finite non-zero channel range".into() });
            continue;
        };
        let inv: Vec<f64> = s.iter().map(|v| 1.0 / v).collect();
        let symmetric = act == ActType::S8;
        let Some((lo, hi)) = scaled_range(&chans, &inv, method, 256, symmetric) else { continue };
        let (mlo, mhi) = scaled_range(&chans, &inv, &RangeMethod::MinMax, 256, !symmetric).unwrap_or((lo, hi));
        let before = if symmetric { entry.range_symmetric } else { entry.range };
        let new_entry = rescaled_entry(
            entry,
            &chans,
            &inv,
            if symmetric { ([mlo, mhi], [lo, hi]) } else { ([lo, hi], [mlo, mhi]) },
        );

        // Conv₁: output channel c divided by s_c (weights [C, …], bias [C]).
        scale_rows(model, &producer.input[1], &inv, p.channels)
            .with_context(|| format!("node '{}': rescaling its weight", label(&producer)))?;
        if let Some(b) = producer.input.get(2).filter(|b| !b.is_empty()) {
            scale_rows(model, b, &inv, p.channels)
                .with_context(|| format!("node '{}': rescaling its bias", label(&producer)))?;
        }
        // Conv₂: what reads channel c multiplied by s_c.
        scale_input_channels(model, &w2_name, &w2, &s, conv)
            .with_context(|| format!("node '{}': rescaling its weight", label(&consumer)))?;
        done.push(Equalized {
            tensor: p.tensor.clone(),
            producer: label(&producer),
            consumer: label(&consumer),
            channels: p.channels,
            alpha,
            min_scale: s.iter().copied().fold(f64::INFINITY, f64::min),
            range_before: before,
            range_after: [lo, hi],
        });
        ranges.insert(p.tensor, new_entry);
    }
    Ok((done, skipped))
}

/// For `Conv₂`'s weight of `shape`, the input channel each element (by C-order index) reads:
/// `Conv` `[M, C/g, k…]`, element `[o, cl, …]` reads channel `(o / (M/g))·(C/g) + cl`;
/// `ConvTranspose` `[C, M/g, k…]`, element `[c, …]` reads channel `c`.
fn read_channel(shape: &[usize], channels: usize, conv: bool) -> impl Fn(usize) -> usize {
    let (rows, per) = (shape.first().copied().unwrap_or(1), shape.get(1).copied().unwrap_or(1).max(1));
    let inner: usize = shape.iter().skip(2).product::<usize>().max(1);
    let m_per = (rows / (channels / per).max(1)).max(1);
    move |i| {
        let (row, col) = (i / (per * inner), (i / inner) % per);
        if conv {
            (row / m_per) * per + col
        } else {
            row
        }
    }
}

/// Per input channel of `Conv₂`'s weight, the largest `|w|` reading it ([`read_channel`]).
fn column_abs_max(w: &ndarray::ArrayD<f32>, channels: usize, conv: bool) -> Vec<f64> {
    let mut out = vec![0f64; channels];
    let channel = read_channel(w.shape(), channels, conv);
    for (i, &v) in w.iter().enumerate() {
        if let Some(slot) = out.get_mut(channel(i)) {
            *slot = slot.max(f64::from(v.abs()));
        }
    }
    out
}

/// `s_c ∝ r_c^α / w_c^(1−α)` normalized to `max s_c = 1`, with `r` and `w` floored at 10⁻³ of
/// their maxima. `None` when no channel has a finite positive range.
pub fn channel_scales(r: &[f64], w: &[f64], alpha: f64) -> Option<Vec<f64>> {
    let floor = |v: &[f64]| -> Option<Vec<f64>> {
        let m = v.iter().copied().filter(|x| x.is_finite()).fold(0f64, f64::max);
        (m > 0.0).then(|| v.iter().map(|&x| if x.is_finite() { x.max(m * 1e-3) } else { m }).collect())
    };
    let r = floor(r)?;
    let w = if alpha < 1.0 { floor(w)? } else { vec![1.0; r.len()] };
    let raw: Vec<f64> = r.iter().zip(&w).map(|(r, w)| r.powf(alpha) / w.powf(1.0 - alpha)).collect();
    let top = raw.iter().copied().fold(0f64, f64::max);
    (top > 0.0 && top.is_finite()).then(|| raw.iter().map(|v| v / top).collect())
}

/// The entry of the tensor whose channel `c` is `chans[c]` times `scale[c]`: exact count,
/// min/max, moments and per-channel abs-max; `p99_9` is an upper bound (the largest channel
/// p99.9 after scaling); the ranges as given.
fn rescaled_entry(
    old: &TensorEntry,
    chans: &[TensorStats],
    scale: &[f64],
    ranges: ([f32; 2], [f32; 2]),
) -> TensorEntry {
    let seen = || chans.iter().zip(scale).filter(|(c, _)| c.count() > 0);
    let count: u64 = seen().map(|(c, _)| c.count()).sum();
    let min = seen().map(|(c, s)| c.min() * s).fold(f64::INFINITY, f64::min);
    let max = seen().map(|(c, s)| c.max() * s).fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = seen().map(|(c, s)| c.sum() * s).sum();
    let sum_sq: f64 = seen().map(|(c, s)| c.sum_sq() * s * s).sum();
    let n = count.max(1) as f64;
    let mean = sum / n;
    let std = (sum_sq / n - mean * mean).max(0.0).sqrt();
    TensorEntry {
        count,
        min: if count > 0 { min } else { 0.0 },
        max: if count > 0 { max } else { 0.0 },
        mean,
        std,
        abs_max: if count > 0 { min.abs().max(max.abs()) } else { 0.0 },
        p99_9: seen().map(|(c, s)| c.quantile_abs(0.999) * s).fold(0f64, f64::max),
        nan: old.nan,
        inf: old.inf,
        range: ranges.0,
        range_symmetric: ranges.1,
        channel_abs_max: chans.iter().zip(scale).map(|(c, s)| (c.abs_max() * s) as f32).collect(),
        channels: None,
    }
}

/// Multiplies the leading-axis row `c` of constant `name` by `factor[c]`.
fn scale_rows(model: &mut ModelProto, name: &str, factor: &[f64], channels: usize) -> Result<()> {
    let g = model.graph.as_ref().context("the model has no graph")?;
    let t = GraphView::new(g).weight(name).with_context(|| format!("constant '{name}' not found"))?;
    let a = to_f32(t).with_context(|| format!("reading '{name}'"))?;
    if a.is_empty() || a.shape().first() != Some(&channels) {
        anyhow::bail!("'{name}' of shape {:?} has no {channels} leading rows", a.shape());
    }
    let per = a.len() / channels;
    let values: Vec<f32> =
        a.as_standard_layout().iter().enumerate().map(|(i, &v)| (f64::from(v) * factor[i / per]) as f32).collect();
    crate::outliers::layer::replace(model, name, values)
}

/// Multiplies the weights of `Conv₂` that read input channel `c` by `s[c]` ([`read_channel`]).
fn scale_input_channels(
    model: &mut ModelProto,
    name: &str,
    w: &ndarray::ArrayD<f32>,
    s: &[f64],
    conv: bool,
) -> Result<()> {
    let channel = read_channel(w.shape(), s.len(), conv);
    let values = w.iter().enumerate().map(|(i, &v)| (f64::from(v) * s.get(channel(i)).copied().unwrap_or(1.0)) as f32);
    crate::outliers::layer::replace(model, name, values.collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::array::{dtype, ArrayData};
    use crate::calibrate::TensorEntry;
    use crate::onnx::builder::{attr_int, attr_ints, graph, model, node, tensor_info};
    use crate::onnx::tensor::from_f32;
    use crate::runtime::{InputFact, Plan};
    use ndarray::{ArrayD, IxDyn};

    /// `x [1, 2, 8, 8] → conv1 (1×1, 4 channels of ranges about 1, 30, 0.1, 3) → Relu → t →
    /// conv2 (3×3, pads 1) → y`, dense (3 outputs) or depthwise (4 outputs, group 4).
    fn chain(depthwise: bool) -> ModelProto {
        let mut rng = crate::rng::Rng::new(7);
        let gains = [1.0f32, 30.0, 0.1, 3.0];
        let w1: Vec<f32> = (0..8).map(|i| gains[i / 2] * (rng.normal() as f32)).collect();
        let b1: Vec<f32> = gains.iter().map(|g| 0.2 * g).collect();
        let (m, per) = if depthwise { (4, 1) } else { (3, 4) };
        let w2: Vec<f32> = (0..m * per * 9).map(|_| rng.normal() as f32 * 0.3).collect();
        let arr = |v: Vec<f32>, d: &[usize]| {
            ArrayD::from_shape_vec(IxDyn(d), v).unwrap_or_else(|_| ArrayD::zeros(IxDyn(&[0])))
        };
        let inits = vec![
            from_f32("w1", &arr(w1, &[4, 2, 1, 1])),
            from_f32("b1", &arr(b1, &[4])),
            from_f32("w2", &arr(w2, &[m, per, 3, 3])),
        ];
        let mut conv2 = vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", &[1, 1, 1, 1])];
        if depthwise {
            conv2.push(attr_int("group", 4));
        }
        let nodes = vec![
            node("Conv", "conv1", &["x", "w1", "b1"], &["c1"], vec![attr_ints("kernel_shape", &[1, 1])]),
            node("Relu", "relu", &["c1"], &["t"], vec![]),
            node("Conv", "conv2", &["t", "w2"], &["y"], conv2),
        ];
        let inputs = vec![tensor_info("x", dtype::FLOAT, &[1, 2, 8, 8])];
        model(graph("g", nodes, inputs, vec![tensor_info("y", dtype::FLOAT, &[1, m as i64, 8, 8])], inits), 13)
    }

    fn run(m: &ModelProto, x: &ArrayData, outputs: &[&str]) -> Vec<ArrayD<f32>> {
        let bytes = crate::onnx::io::encode_for_runtime(m).unwrap();
        let fact = InputFact { name: "x".into(), elem_type: dtype::FLOAT, shape: vec![1, 2, 8, 8] };
        let names: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
        let plan = Plan::load(&bytes, None, &[fact], &names).unwrap();
        plan.run(std::slice::from_ref(x)).unwrap().into_iter().map(|a| crate::onnx::tensor::array_to_f32(&a)).collect()
    }

    /// Statistics of `t` as the calibration keeps them for a rescalable tensor.
    fn stats_of(t: &ArrayD<f32>) -> TensorStats {
        let mut s = TensorStats::new(2048, Some(1)).with_channel_stats(crate::calibrate::CHANNEL_BINS);
        s.update(t.view());
        s
    }

    #[test]
    fn rescaling_keeps_the_float_function_and_evens_out_the_channels() {
        let mut rng = crate::rng::Rng::new(11);
        let x = ArrayData::F32(
            ArrayD::from_shape_vec(IxDyn(&[1, 2, 8, 8]), (0..128).map(|_| rng.normal() as f32).collect())
                .unwrap_or_else(|_| ArrayD::zeros(IxDyn(&[0]))),
        );
        for depthwise in [false, true] {
            let m0 = chain(depthwise);
            assert_eq!(candidates(&m0).unwrap().len(), 1);
            let before = run(&m0, &x, &["t", "y"]);
            let st = stats_of(&before[0]);
            let mut ranges: BTreeMap<String, TensorEntry> =
                [("t".to_string(), TensorEntry::for_quantizer(&st, &RangeMethod::Mse, false))].into();
            let mut m = m0.clone();
            let (done, skipped) = apply(&mut m, &mut ranges, &RangeMethod::Mse, ActType::U8).unwrap();
            assert_eq!((done.len(), skipped.len()), (1, 0), "{skipped:?}");
            let after = run(&m, &x, &["t", "y"]);
            // Same function: conv2's output is unchanged.
            let err = (&after[1] - &before[1]).mapv(|v| v * v).sum().sqrt();
            let norm = before[1].mapv(|v| v * v).sum().sqrt();
            assert!(err <= 1e-5 * norm, "depthwise {depthwise}: |Δy| {err} vs |y| {norm}");
            // The rescaled tensor's entry describes what the model now computes.
            let e = &ranges["t"];
            let actual = stats_of(&after[0]);
            assert!((e.max - actual.max()).abs() <= 1e-5 * actual.max(), "{} vs {}", e.max, actual.max());
            for (c, (&want, got)) in e.channel_abs_max.iter().zip(actual.channel_stats()).enumerate() {
                assert!((f64::from(want) - got.abs_max()).abs() <= 1e-4 * got.abs_max(), "channel {c}");
            }
            let direct = TensorEntry::for_quantizer(&actual, &RangeMethod::Mse, false);
            let (a, b) = (f64::from(e.range[1]), f64::from(direct.range[1]));
            assert!((a - b).abs() <= 0.05 * b, "depthwise {depthwise}: scaled mse {a} vs direct {b}");
            // The channels' ranges are evened out: fully for depthwise (α = 1).
            let ch: Vec<f64> = actual.channel_stats().iter().map(TensorStats::abs_max).collect();
            let spread =
                |v: &[f64]| v.iter().copied().fold(0f64, f64::max) / v.iter().copied().fold(f64::INFINITY, f64::min);
            let ch0: Vec<f64> = st.channel_stats().iter().map(TensorStats::abs_max).collect();
            if depthwise {
                assert!(spread(&ch) < 1.0001, "{ch:?}");
            } else {
                assert!(spread(&ch) < spread(&ch0).sqrt() * 1.5, "{ch:?} from {ch0:?}");
            }
            // The weights were edited, the input model was not.
            assert_ne!(m, m0);
        }
    }

    #[test]
    fn percentile_ranges_leave_the_model_alone() {
        let mut m = chain(false);
        let m0 = m.clone();
        let mut ranges = BTreeMap::new();
        let (done, skipped) = apply(&mut m, &mut ranges, &RangeMethod::Percentile(99.9), ActType::U8).unwrap();
        assert!(done.is_empty() && skipped.len() == 1);
        assert_eq!(m, m0);
    }

    #[test]
    fn scales_balance_activation_and_weight_ranges() {
        // α = ½: s ∝ √(r/w), normalized to max 1.
        let s = channel_scales(&[4.0, 1.0], &[1.0, 1.0], 0.5).unwrap_or_default();
        assert_eq!(s.len(), 2);
        assert!((s[0] - 1.0).abs() < 1e-12 && (s[1] - 0.5).abs() < 1e-12, "{s:?}");
        // α = 1 ignores the weights; a dead channel is floored at 10⁻³.
        let s = channel_scales(&[2.0, 0.0], &[0.0, 5.0], 1.0).unwrap_or_default();
        assert!((s[0] - 1.0).abs() < 1e-12 && (s[1] - 1e-3).abs() < 1e-15, "{s:?}");
        assert!(channel_scales(&[0.0, f64::NAN], &[1.0, 1.0], 0.5).is_none());
    }
}
