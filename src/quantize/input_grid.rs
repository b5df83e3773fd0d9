//! Lattice-aligned uint8 quantization of graph inputs that feed convolutions.
//!
//! Images reach a model already quantized: after `x = (p/255 − μ)/σ` every value lies on a
//! lattice `x = min + k·d`, `k` integer. When the lattice has at most 256 points spanning
//! `[min, max]` with `d = (max − min)/255`, the uint8 grid of that very range would represent
//! it exactly, except that ONNX wants an integer zero point: the grid is `(q − z)·d` and the
//! data sit at `(k + f)·d` with `f = frac(−min/d)`. With `(x − 0.5)/0.5` preprocessing `f = ½`:
//! every pixel is rounded by half a step, an error of power `d²/4` (three times the usual
//! `d²/12`) that is a function of the pixel value, so it survives the first convolution's
//! averaging. On the bench PP-OCR detector this costs about 0.3 dB of output SQNR.
//!
//! The fix is exact in float: shift the input by `δ = −z·d − min` with
//! `z = clamp(round(−min/d), 0, 255)` so the lattice lands on the grid `(q − z)·d`, and undo the
//! shift inside each consuming `Conv` (weights `W`, bias `b`, padding `P`):
//!
//! `Conv_P(x; W, b) = Conv_0(Pad_P(x + δ, value δ); W, b − δ·Σ_{c,k} W[o, c, k])`
//!
//! because a convolution of a constant field `δ` is `δ·Σ W[o]` at every output position, and
//! padding with `δ` instead of 0 keeps that true at the borders. The padded tensor is then
//! quantized with the range `[−z·d, (255 − z)·d]` (scale `d`, zero point `z`), which
//! represents every calibration value exactly. ONNX Runtime runs the Add and Pad in float on
//! the input (cheap next to the convolution) and still fuses QLinearConv.
//!
//! Applied only to uint8 activations, only to float graph inputs whose every consumer is a
//! `Conv` with constant float weights (and bias) and explicit padding, and only when the
//! calibration values of the input are such a lattice and misaligned by more than 1% of a
//! step. `--no-input-grid` turns it off.

use crate::array::{dtype, ArrayData};
use crate::onnx::builder::{attr_string, node};
use crate::onnx::pb::ModelProto;
use crate::onnx::tensor::{from_f32, scalar_f32, to_f32, vec_i64};
use crate::onnx::{GraphView, NameAlloc};
use anyhow::{Context, Result};
use ndarray::{ArrayD, Axis, IxDyn};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Streaming lattice detection over the values of one tensor: keeps at most 256 distinct
/// values, so memory is bounded whatever the number of samples.
#[derive(Debug, Default, Clone)]
pub struct LatticeScan {
    /// Bit patterns of the distinct values seen (with -0 folded into +0).
    distinct: BTreeSet<u32>,
    /// More than 256 distinct values, or a non-finite one: not a lattice.
    rejected: bool,
    /// A direct-mapped cache of values already in `distinct` (`u32::MAX`, a NaN, marks an
    /// empty slot), so that the set is searched once per slot miss rather than per value.
    recent: Vec<u32>,
}

/// How a lattice input is moved onto the uint8 grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridShift {
    /// Lattice step `d` = the quantization scale.
    pub step: f32,
    /// Added to the input, `δ = −z·d − min`.
    pub shift: f32,
    /// Zero point `z`.
    pub zero_point: i32,
}

impl GridShift {
    /// The quantization range of the shifted input, `[−z·d, (255 − z)·d]`.
    pub fn range(&self) -> [f32; 2] {
        [-(self.zero_point as f32) * self.step, (255 - self.zero_point) as f32 * self.step]
    }
}

impl LatticeScan {
    /// Slots of the cache of recently seen values (the hash keeps the top 10 bits).
    const SLOTS: usize = 1024;

    /// One pass without unpredictable branches: each value's slot in the direct-mapped cache
    /// almost always holds it already; only a miss searches the set.
    pub fn push_all(&mut self, values: impl IntoIterator<Item = f32>) {
        if self.rejected {
            return;
        }
        if self.recent.is_empty() {
            self.recent = vec![u32::MAX; Self::SLOTS];
        }
        for v in values {
            let bits = (v + 0.0).to_bits();
            // NaN and ±Inf: the exponent bits are all ones.
            if bits & 0x7f80_0000 == 0x7f80_0000 {
                self.rejected = true;
                return;
            }
            let slot = (bits.wrapping_mul(0x9e37_79b1) >> 22) as usize & (Self::SLOTS - 1);
            if self.recent[slot] == bits {
                continue;
            }
            self.recent[slot] = bits;
            self.distinct.insert(bits);
            if self.distinct.len() > 256 {
                self.rejected = true;
                return;
            }
        }
    }

    /// Adds the values `other` saw (as if they had been pushed here).
    pub fn merge(&mut self, other: LatticeScan) {
        self.rejected |= other.rejected;
        if !self.rejected {
            self.distinct.extend(other.distinct);
            self.rejected = self.distinct.len() > 256;
        }
    }

    /// The shift that aligns the values with the uint8 grid of their min/max range, or None
    /// when they are not such a lattice or are aligned already.
    pub fn finish(&self) -> Option<GridShift> {
        if self.rejected || self.distinct.len() < 2 {
            return None;
        }
        let mut v: Vec<f64> = self.distinct.iter().map(|&b| f32::from_bits(b) as f64).collect();
        v.sort_by(f64::total_cmp);
        let (min, max) = (*v.first()?, *v.last()?);
        let step = (max - min) / 255.0;
        if !(step.is_finite() && step > 0.0) {
            return None;
        }
        let on_grid = v.iter().all(|&x| {
            let k = (x - min) / step;
            (k - k.round()).abs() <= 1e-3
        });
        if !on_grid {
            return None;
        }
        let z = (-min / step).round().clamp(0.0, 255.0);
        let shift = -z * step - min;
        if shift.abs() <= 0.01 * step {
            return None;
        }
        Some(GridShift { step: step as f32, shift: shift as f32, zero_point: z as i32 })
    }
}

/// What was done to one graph input.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlignedInput {
    pub input: String,
    pub step: f32,
    pub shift: f32,
    pub zero_point: i32,
    /// The Conv nodes that now read the shifted (and padded) input.
    pub convs: Vec<String>,
    /// The inserted Add and Pad nodes: they run in float (quantizing the Add's input would
    /// bring back the misaligned rounding).
    pub float_nodes: Vec<String>,
}

/// The rewritten model, the ranges its new tensors must be quantized with, and a summary.
pub struct Aligned {
    pub model: ModelProto,
    pub ranges: BTreeMap<String, [f32; 2]>,
    pub inputs: Vec<AlignedInput>,
}

/// Opens the samples of `data` (checking them all, [`crate::data::open`]), scans the float
/// graph inputs over them as they are read (no model run, no second read), and applies
/// [`rewrite`] to every one that qualifies. Returns None when nothing changed, and the checked
/// samples (the rewrite keeps the graph inputs, so they serve the rewritten model too).
pub fn align_inputs(
    model: &ModelProto,
    data: &crate::data::DataOptions,
) -> Result<(Option<Aligned>, crate::data::SampleSet)> {
    let g = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(g);
    let specs = crate::calibrate::input_specs(g);
    // Only inputs a rewrite could apply to are scanned.
    let candidates: Vec<usize> =
        specs.iter().enumerate().filter(|(_, s)| convs_reading(&view, &s.name).is_some()).map(|(i, _)| i).collect();
    // Samples are scanned in parallel and the scans merged (a union of value sets: the
    // result does not depend on the order).
    let scan_sample = |_: usize, inputs: &[ArrayData]| -> Result<Vec<LatticeScan>> {
        Ok(candidates
            .iter()
            .map(|&c| {
                let mut scan = LatticeScan::default();
                match inputs.get(c) {
                    // The set of values does not depend on their order: memory order.
                    Some(ArrayData::F32(a)) => match a.as_slice_memory_order() {
                        Some(s) => scan.push_all(s.iter().copied()),
                        None => scan.push_all(a.iter().copied()),
                    },
                    _ => scan.rejected = true,
                }
                scan
            })
            .collect())
    };
    // The samples are checked even when no input qualifies: bad data is reported here, first
    // (without a scan, generated samples need not be generated).
    if candidates.is_empty() {
        return Ok((None, crate::data::open(&specs, data)?));
    }
    let (set, per_sample) = crate::data::open_with(&specs, data, &scan_sample)?;
    let mut scans = vec![LatticeScan::default(); candidates.len()];
    for per in per_sample {
        scans.iter_mut().zip(per).for_each(|(scan, s)| scan.merge(s));
    }
    let mut out = Aligned { model: model.clone(), ranges: BTreeMap::new(), inputs: Vec::new() };
    for (scan, &c) in scans.iter().zip(&candidates) {
        let (Some(shift), Some(spec)) = (scan.finish(), set.specs().get(c)) else { continue };
        if let Some(a) = rewrite(&out.model, &spec.name, shift)? {
            out.model = a.model;
            out.ranges.extend(a.ranges);
            out.inputs.extend(a.inputs);
        }
    }
    Ok((if out.inputs.is_empty() { None } else { Some(out) }, set))
}

/// The Conv nodes reading graph input `x`, when every consumer is a Conv this rewrite can
/// handle (constant float weight and bias, no `auto_pad`, reads `x` as its data input).
fn convs_reading(view: &GraphView, x: &str) -> Option<Vec<usize>> {
    // The inserted nodes are kept float through `--exclude`, whose patterns are globs.
    if x.contains(['*', '?'])
        || !view.is_graph_input(x)
        || view.weight(x).is_some()
        || view.is_graph_output(x)
        || view.elem_type(x) != dtype::FLOAT
    {
        return None;
    }
    let nodes = view.nodes();
    let cons = view.consumers(x);
    if cons.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for &(ci, slot) in cons {
        let n = nodes.get(ci)?;
        let auto_pad = n.attribute.iter().find(|a| a.name() == "auto_pad").map(|a| a.s().to_vec());
        let ok = n.op_type() == "Conv"
            && n.domain().is_empty()
            && slot == 0
            && auto_pad.is_none_or(|s| s.is_empty() || s == b"NOTSET")
            && n.input.get(1).and_then(|w| view.weight(w)).is_some_and(|w| w.data_type() == dtype::FLOAT)
            && n.input.get(2).filter(|b| !b.is_empty()).is_none_or(|b| view.weight(b).is_some());
        if !ok {
            return None;
        }
        out.push(ci);
    }
    Some(out)
}

/// Shifts graph input `x` by `s.shift` and compensates in every consuming Conv (see the
/// module docs). Returns None when a consumer does not qualify; `inputs` has one entry.
pub fn rewrite(model: &ModelProto, x: &str, s: GridShift) -> Result<Option<Aligned>> {
    let g = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(g);
    let Some(convs) = convs_reading(&view, x) else { return Ok(None) };
    let mut names = NameAlloc::new(g);
    let mut m = model.clone();
    let mg = m.graph.as_mut().context("the model has no graph")?;
    let shift_name = names.fresh(&format!("{x}_grid_shift"));
    let shifted = names.fresh(&format!("{x}_grid"));
    mg.initializer.push(scalar_f32(&shift_name, s.shift));
    let mut new_nodes = vec![node("Add", &shifted, &[x, &shift_name], &[&shifted], vec![])];
    let mut ranges = BTreeMap::new();
    // One Pad per distinct padding.
    let mut padded: BTreeMap<Vec<i64>, String> = BTreeMap::new();
    let mut done = Vec::new();
    let mut float_nodes = vec![shifted.clone()];
    for &ci in &convs {
        let conv = &g.node[ci];
        let what = crate::onnx::describe(conv);
        let wname = conv.input.get(1).context("checked above")?;
        let w = to_f32(view.weight(wname).with_context(|| format!("{what}: weight '{wname}'"))?)
            .with_context(|| format!("{what}: weight '{wname}'"))?;
        if w.ndim() < 3 {
            return Ok(None);
        }
        let pads: Vec<i64> = conv
            .attribute
            .iter()
            .find(|a| a.name() == "pads")
            .map(|a| a.ints.clone())
            .unwrap_or_else(|| vec![0; 2 * (w.ndim() - 2)]);
        if pads.len() != 2 * (w.ndim() - 2) || pads.iter().any(|&p| p < 0) {
            return Ok(None);
        }
        let c_out = w.shape()[0];
        let sums = weight_sums(&w);
        let old_bias: Vec<f32> = match conv.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => to_f32(view.weight(b).context("checked above")?)
                .with_context(|| format!("{what}: bias '{b}'"))?
                .iter()
                .copied()
                .collect(),
            None => vec![0.0; c_out],
        };
        if old_bias.len() != c_out || sums.len() != c_out {
            return Ok(None);
        }
        let bias: Vec<f32> = old_bias.iter().zip(&sums).map(|(b, w)| b - s.shift * w).collect();
        let bname = names.fresh(&format!("{}_grid_bias", if conv.name().is_empty() { "conv" } else { conv.name() }));
        mg.initializer.push(from_f32(&bname, &ArrayD::from_shape_vec(IxDyn(&[c_out]), bias)?));
        let input = if pads.iter().all(|&p| p == 0) {
            shifted.clone()
        } else if let Some(p) = padded.get(&pads) {
            p.clone()
        } else {
            let half = pads.len() / 2;
            let mut full = vec![0i64, 0];
            full.extend(&pads[..half]);
            full.extend([0, 0]);
            full.extend(&pads[half..]);
            let out = names.fresh(&format!("{x}_grid_padded"));
            let pname = names.fresh(&format!("{out}_pads"));
            let vname = names.fresh(&format!("{out}_value"));
            mg.initializer.push(vec_i64(&pname, &full));
            mg.initializer.push(scalar_f32(&vname, s.shift));
            new_nodes.push(node(
                "Pad",
                &out,
                &[&shifted, &pname, &vname],
                &[&out],
                vec![attr_string("mode", "constant")],
            ));
            padded.insert(pads.clone(), out.clone());
            float_nodes.push(out.clone());
            out
        };
        ranges.insert(input.clone(), s.range());
        let n = &mut mg.node[ci];
        n.attribute.retain(|a| a.name() != "pads");
        n.input[0] = input;
        n.input.resize(2, String::new());
        n.input.push(bname);
        done.push(conv.name().to_string());
    }
    // The new nodes read only the graph input and initializers: they go first.
    let rest = std::mem::take(&mut mg.node);
    mg.node = new_nodes.into_iter().chain(rest).collect();
    let used = crate::onnx::graph::used_names(mg);
    let inputs: BTreeSet<String> = mg.input.iter().map(|i| i.name().to_string()).collect();
    mg.initializer.retain(|t| used.contains(t.name()) || inputs.contains(t.name()));
    let a = AlignedInput {
        input: x.into(),
        step: s.step,
        shift: s.shift,
        zero_point: s.zero_point,
        convs: done,
        float_nodes,
    };
    Ok(Some(Aligned { model: m, ranges, inputs: vec![a] }))
}

/// `Σ_{c,k} W[o, c, k]` for every output channel `o` (axis 0), summed in f64.
fn weight_sums(w: &ArrayD<f32>) -> Vec<f32> {
    w.axis_iter(Axis(0)).map(|o| o.iter().map(|&v| v as f64).sum::<f64>() as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_ints, graph, model, tensor_info};
    use crate::quantize::params::{ActParams, ActType};
    use crate::runtime::{InputFact, Plan};

    /// `(x − 0.5)/0.5` of 8-bit pixels `p/255`.
    fn pixels() -> Vec<f32> {
        (0..=255).map(|p| (p as f32 / 255.0 - 0.5) / 0.5).collect()
    }

    fn scan(v: &[f32]) -> Option<GridShift> {
        let mut s = LatticeScan::default();
        s.push_all(v.iter().copied());
        s.finish()
    }

    #[test]
    fn shifted_pixels_quantize_exactly_where_the_minmax_grid_loses_half_a_step() {
        let x = pixels();
        // Brute force over every value: the plain min/max uint8 grid rounds each pixel by
        // half a step.
        let plain = ActParams::from_range(-1.0, 1.0, ActType::U8);
        let worst_plain = x.iter().map(|&v| (plain.fake(v) - v).abs()).fold(0.0f32, f32::max);
        assert!((worst_plain - plain.scale / 2.0).abs() < 1e-6, "{worst_plain}");
        let s = scan(&x).unwrap();
        assert!((s.step - 2.0 / 255.0).abs() < 1e-7);
        assert!((s.shift.abs() - 1.0 / 255.0).abs() < 1e-7, "{s:?}");
        let [lo, hi] = s.range();
        let p = ActParams::from_range(lo, hi, ActType::U8);
        assert_eq!(p.zero_point, s.zero_point);
        let worst = x.iter().map(|&v| (p.fake(v + s.shift) - (v + s.shift)).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "{worst}");
        // Chunked feeding (with repeats) gives the same answer.
        let mut c = LatticeScan::default();
        for chunk in x.chunks(7).rev() {
            c.push_all(chunk.iter().chain(chunk).copied());
        }
        assert_eq!(c.finish(), Some(s));
    }

    #[test]
    fn merged_scans_decide_as_one_scan() {
        let x = pixels();
        let (a, b) = x.split_at(x.len() / 3);
        let merged = |a: &[f32], b: &[f32]| {
            let (mut s, mut t) = (LatticeScan::default(), LatticeScan::default());
            s.push_all(a.iter().copied());
            t.push_all(b.iter().copied());
            s.merge(t);
            s.finish()
        };
        assert_eq!(merged(a, b), scan(&x));
        assert!(merged(a, b).is_some());
        // Too many distinct values only together, or a NaN on one side: rejected.
        let many: Vec<f32> = (0..=256).map(|k| k as f32 / 256.0 - 0.3).collect();
        assert_eq!(merged(&many[..200], &many[200..]), None);
        assert_eq!(merged(a, &[f32::NAN]), None);
    }

    #[test]
    fn only_misaligned_lattices_are_shifted() {
        // Already on the grid (zero point 0): nothing to do.
        assert_eq!(scan(&(0..=255).map(|k| k as f32 / 255.0).collect::<Vec<_>>()), None);
        // 257 distinct values, a value off the lattice, a NaN, a constant: not a lattice.
        assert_eq!(scan(&(0..=256).map(|k| k as f32 / 256.0 - 0.3).collect::<Vec<_>>()), None);
        let mut off = pixels();
        off[10] += 0.3 * 2.0 / 255.0;
        assert_eq!(scan(&off), None);
        let mut nan = pixels();
        nan.push(f32::NAN);
        assert_eq!(scan(&nan), None);
        assert_eq!(scan(&[0.5, 0.5]), None);
        // A sparse lattice (every 5th pixel) still spans the grid of its min/max.
        let sparse: Vec<f32> = pixels().into_iter().step_by(5).collect();
        assert!(scan(&sparse).is_some());
    }

    #[test]
    fn rewrite_keeps_the_float_outputs() {
        let w1: Vec<f32> = (0..3 * 2 * 3 * 3).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
        let w2: Vec<f32> = (0..4 * 2).map(|i| (i as f32 - 3.5) / 4.0).collect();
        let g = graph(
            "g",
            vec![
                node(
                    "Conv",
                    "c1",
                    &["x", "w1", "b1"],
                    &["y1"],
                    vec![attr_ints("pads", &[1, 1, 1, 1]), attr_ints("strides", &[2, 2])],
                ),
                node("Conv", "c2", &["x", "w2"], &["y2"], vec![]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[1, 2, 5, 5])],
            vec![tensor_info("y1", dtype::FLOAT, &[1, 3, 3, 3]), tensor_info("y2", dtype::FLOAT, &[1, 4, 5, 5])],
            vec![
                from_f32("w1", &ArrayD::from_shape_vec(IxDyn(&[3, 2, 3, 3]), w1).unwrap()),
                from_f32("b1", &ArrayD::from_shape_vec(IxDyn(&[3]), vec![0.1, -0.2, 0.3]).unwrap()),
                from_f32("w2", &ArrayD::from_shape_vec(IxDyn(&[4, 2, 1, 1]), w2).unwrap()),
            ],
        );
        let m = model(g, 13);
        let px = pixels();
        let x: Vec<f32> = (0..50).map(|i| px[(i * 53 + 11) % 256]).collect();
        let x = ArrayData::F32(ArrayD::from_shape_vec(IxDyn(&[1, 2, 5, 5]), x).unwrap());
        let s = scan(&px).unwrap();
        let Aligned { model: r, ranges, inputs } = rewrite(&m, "x", s).unwrap().unwrap();
        let a = &inputs[0];
        assert_eq!(a.convs, vec!["c1".to_string(), "c2".into()]);
        assert_eq!(a.float_nodes, vec!["x_grid".to_string(), "x_grid_padded".into()]);
        assert_eq!(ranges.keys().collect::<Vec<_>>(), vec!["x_grid", "x_grid_padded"]);
        GraphView::new(r.graph.as_ref().unwrap()).validate().unwrap();
        let run = |m: &ModelProto| {
            let bytes = crate::onnx::io::encode(m).unwrap();
            let facts = [InputFact { name: "x".into(), elem_type: dtype::FLOAT, shape: vec![1, 2, 5, 5] }];
            let plan = Plan::load(&bytes, None, &facts, &["y1".to_string(), "y2".into()]).unwrap();
            plan.run(std::slice::from_ref(&x)).unwrap()
        };
        for (a, b) in run(&m).iter().zip(run(&r)) {
            let (a, b) = (a.as_f32().unwrap(), b.as_f32().unwrap());
            assert_eq!(a.shape(), b.shape());
            let d = a.iter().zip(b.iter()).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
            assert!(d < 1e-5, "max difference {d}");
        }
        // A consumer that is not a Conv blocks the rewrite.
        let mut g2 = m.graph.clone().unwrap();
        g2.node.push(node("Relu", "r", &["x"], &["z"], vec![]));
        assert!(rewrite(&model(g2, 13), "x", s).unwrap().is_none());
    }
}
