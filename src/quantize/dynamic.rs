//! Dynamic int8 quantization (no calibration): int8 weights stored in the model, activations
//! quantized at run time by `DynamicQuantizeLinear`, the graph ONNX Runtime's
//! `quantize_dynamic` emits and its optimizer fuses into `MatMulIntegerToFloat` /
//! `DynamicQuantizeMatMul`.
//!
//! For every selected `MatMul` whose second input is a constant float `[K, N]` weight
//! (and `Gemm` with a constant `B`, `transA = 0`, rewritten as a MatMul plus an `Add` of its
//! bias, with `B` transposed when `transB = 1` and `alpha` folded into the weight):
//!
//! ```text
//! x ─ DynamicQuantizeLinear ─┬─ x_quantized (uint8) ─┐
//!                            ├─ x_zero_point ────────┤
//!                            │     W_quantized (int8)┼─ MatMulInteger ─ Cast(float) ─┐
//!                            │     W_zero_point ─────┘                              Mul ─ [Add bias] ─ y
//!                            └─ x_scale ─ Mul(x_scale, W_scale) ─────────────────────┘
//! ```
//!
//! which is node for node what ONNX Runtime's `quantize_dynamic` writes: its
//! `MatMulIntegerToFloatFusion` matches a `Mul` with a `Cast ← MatMulInteger` parent and a
//! `Mul` (of the two scales, `x_scale` first) parent, each with a single consumer, plus an
//! optional following `Add` of a constant 1-D bias; `DynamicQuantizeMatMulFusion` then absorbs
//! the `DynamicQuantizeLinear` when it feeds nothing else. As in ONNX Runtime, one
//! `DynamicQuantizeLinear` per activation is shared by all its quantized readers (the Q, K and
//! V projections of attention), which then stay `MatMulIntegerToFloat`.
//!
//! Weights are symmetric int8 in [-127, 127], per output column (`W_scale` and int8 zero
//! `W_zero_point` of shape `[N]`) or per tensor (scalars) with `per_channel = false`.
//! `Conv` becomes `ConvInteger` the same way, per output channel: the scale is reshaped to
//! `[M, 1, ...]` and the weight zero point is a scalar 0 (ONNX Runtime's ConvInteger accepts
//! only a per-tensor zero point; with symmetric weights a scalar 0 is exact).
//!
//! Tensor names are stable: the last node of each rewrite produces the original node's output.
//! New names follow ONNX Runtime's: `x_quantized`, `x_scale`, `x_zero_point` from node
//! `x_QuantizeLinear`; `W_quantized`, `W_scale`, `W_zero_point` (`W_T_...` for a transposed
//! Gemm weight); node `NAME_quant` (the integer op) with output `y_output_quantized`, then
//! `y_output_quantized_cast_output`, `NAME_quant_scales_mul_output`.

use super::params::quantize_weight;
use super::{default_opset, detect_preset, glob_match, Preset, QuantOptions, Report, Skipped, TensorReport, Totals};
use crate::array::dtype;
use crate::onnx::attr::NodeAttrs;
use crate::onnx::builder::{attr_int, node};
use crate::onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};
use crate::onnx::tensor::{from_f32, from_i8, scalar_f32, scalar_i8, to_f32, vec_f32, vec_i8};
use crate::onnx::{describe, GraphView, NameAlloc};
use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Op types dynamic quantization rewrites.
pub const DYNAMIC_OPS: &[&str] = &["MatMul", "Gemm", "Conv"];

/// The opset `DynamicQuantizeLinear` needs.
pub const MIN_OPSET: i64 = 11;

/// What a selected node becomes.
#[derive(Debug, Clone)]
struct Job {
    /// The float activation quantized at run time.
    x: String,
    weight: WeightKey,
    /// Float tensor added after the rescale (Gemm C, Conv bias), with how to make it.
    bias: Option<Bias>,
    conv: bool,
}

/// A quantized weight is shared by every node reading the same tensor the same way.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct WeightKey {
    name: String,
    /// Gemm transB = 1: stored transposed, as [K, N].
    transpose: bool,
    /// Gemm alpha folded into the weight (bits of the f32; 1.0 when none).
    alpha_bits: u32,
}

#[derive(Debug, Clone)]
enum Bias {
    /// Added as is (Gemm C with beta = 1, constant or not).
    Tensor(String),
    /// A constant scaled by beta (Gemm) and/or reshaped to [M, 1, ...] (Conv).
    Constant { name: String, scale: f32, shape: Vec<usize> },
}

struct Quantized {
    q: String,
    scale: String,
    zero_point: String,
}

fn skip(skipped: &mut Vec<Skipped>, n: &NodeProto, reason: String) {
    skipped.push(Skipped { name: n.name().into(), op_type: n.op_type().into(), reason });
}

/// Why activation `x` (input 0 of `n`) cannot go through DynamicQuantizeLinear.
fn act_blocker(view: &GraphView, opts: &QuantOptions, x: &str) -> Option<String> {
    if x.is_empty() {
        return Some("input A is missing".into());
    }
    if view.weight(x).is_some() {
        return Some(format!("input '{x}' is a constant"));
    }
    if opts.keep_float.contains(x) {
        return Some(format!("input '{x}' kept float (--keep-float)"));
    }
    let et = view.elem_type(x);
    if et != 0 && et != dtype::FLOAT {
        return Some(format!("input '{x}' is {}, not float", dtype::name(et)));
    }
    None
}

/// Decides what one node becomes, or why it stays float.
fn plan_node(view: &GraphView, opts: &QuantOptions, i: usize) -> Result<std::result::Result<Job, String>> {
    let n = &view.nodes()[i];
    let op = n.op_type();
    let x = n.input.first().cloned().unwrap_or_default();
    if let Some(why) = act_blocker(view, opts, &x) {
        return Ok(Err(why));
    }
    let w = n.input.get(1).cloned().unwrap_or_default();
    let Some(wt) = view.weight(&w) else {
        return Ok(Err(format!("weight '{w}' is not a constant (initializer or Constant node)")));
    };
    if wt.data_type() != dtype::FLOAT {
        return Ok(Err(format!("weight '{w}' is {}, not float", dtype::name(wt.data_type()))));
    }
    let rank = wt.dims.len();
    let desc = describe(n);
    match op {
        "MatMul" => {
            if rank != 2 {
                return Ok(Err(format!("weight '{w}' has rank {rank}; only 2-D [K, N] weights are quantized")));
            }
            let weight = WeightKey { name: w, transpose: false, alpha_bits: 1f32.to_bits() };
            Ok(Ok(Job { x, weight, bias: None, conv: false }))
        }
        "Gemm" => {
            if n.attr_int_or("transA", 0)? != 0 {
                return Ok(Err("transA=1".into()));
            }
            if rank != 2 {
                return Ok(Err(format!("weight '{w}' has rank {rank}, expected 2")));
            }
            let alpha = n.attr_float_or("alpha", 1.0)?;
            let beta = n.attr_float_or("beta", 1.0)?;
            if !alpha.is_finite() || !beta.is_finite() {
                bail!("{desc}: alpha {alpha} / beta {beta} is not finite");
            }
            let transpose = n.attr_int_or("transB", 0)? != 0;
            let bias = match n.input.get(2).filter(|c| !c.is_empty()) {
                None => None,
                Some(c) if beta == 1.0 => Some(Bias::Tensor(c.clone())),
                Some(c) => match view.weight(c) {
                    Some(ct) if ct.data_type() == dtype::FLOAT => Some(Bias::Constant {
                        name: c.clone(),
                        scale: beta,
                        shape: ct.dims.iter().map(|&d| d.max(0) as usize).collect(),
                    }),
                    _ => return Ok(Err(format!("beta = {beta} with a non-constant or non-float C '{c}'"))),
                },
            };
            let weight = WeightKey { name: w, transpose, alpha_bits: alpha.to_bits() };
            Ok(Ok(Job { x, weight, bias, conv: false }))
        }
        "Conv" => {
            if rank < 3 {
                return Ok(Err(format!("weight '{w}' has rank {rank}, expected at least 3")));
            }
            let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
                None => None,
                Some(b) => match view.weight(b) {
                    Some(bt) if bt.data_type() == dtype::FLOAT && bt.dims.len() == 1 && bt.dims[0] == wt.dims[0] => {
                        let mut shape = vec![1usize; rank - 1];
                        shape[0] = bt.dims[0].max(0) as usize;
                        Some(Bias::Constant { name: b.clone(), scale: 1.0, shape })
                    }
                    _ => {
                        return Ok(Err(format!(
                            "bias '{b}' is not a constant float 1-D tensor of {} elements",
                            wt.dims[0]
                        )))
                    }
                },
            };
            let weight = WeightKey { name: w, transpose: false, alpha_bits: 1f32.to_bits() };
            Ok(Ok(Job { x, weight, bias, conv: true }))
        }
        _ => Ok(Err(format!("{op} is not quantized dynamically"))),
    }
}

/// Dynamically quantizes `model` (see the module docs): no ranges needed.
pub fn quantize_dynamic(model: &ModelProto, opts: &QuantOptions) -> Result<(ModelProto, Report)> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    view.validate().context("the input model is not valid")?;
    let order = view.topo_order()?;
    let opset = default_opset(model);
    if opset < MIN_OPSET {
        bail!("the model imports opset {opset}; DynamicQuantizeLinear needs opset {MIN_OPSET} or later");
    }
    let preset = match opts.preset {
        Preset::Auto => detect_preset(&view),
        p => p,
    };
    let mut warnings = Vec::new();
    let ops: Vec<&str> = match &opts.op_types {
        Some(list) => {
            let other: Vec<&str> = list.iter().map(|s| s.as_str()).filter(|s| !DYNAMIC_OPS.contains(s)).collect();
            if !other.is_empty() {
                warnings.push(format!(
                    "--op-types {}: dynamic quantization rewrites only {}",
                    other.join(","),
                    DYNAMIC_OPS.join(", ")
                ));
            }
            DYNAMIC_OPS.iter().copied().filter(|o| list.iter().any(|l| l == o)).collect()
        }
        None => DYNAMIC_OPS.to_vec(),
    };

    // 1. Selection.
    let mut skipped = Vec::new();
    let mut jobs: HashMap<usize, Job> = HashMap::new();
    for &i in &order {
        let n = &view.nodes()[i];
        if !matches!(n.domain(), "" | "ai.onnx") || !ops.contains(&n.op_type()) {
            continue;
        }
        if opts.exclude_op_types.iter().any(|e| e == n.op_type()) {
            skip(&mut skipped, n, "--exclude-op-types".into());
            continue;
        }
        if opts.exclude.iter().any(|g| glob_match(g, n.name())) {
            skip(&mut skipped, n, "--exclude".into());
            continue;
        }
        match plan_node(&view, opts, i)? {
            Ok(job) => {
                jobs.insert(i, job);
            }
            Err(why) => skip(&mut skipped, n, why),
        }
    }

    // 2. Rewrite.
    let mut names = NameAlloc::new(graph);
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut reports: Vec<TensorReport> = Vec::new();
    let mut totals = Totals { nodes: graph.node.len(), nodes_quantized: jobs.len(), ..Totals::default() };
    let mut weights: HashMap<(WeightKey, bool), Quantized> = HashMap::new();
    let mut bytes_counted: HashSet<String> = HashSet::new();
    let mut dql: HashMap<String, Quantized> = HashMap::new();
    let mut out_nodes: Vec<NodeProto> = Vec::new();
    for &i in &order {
        let n = &view.nodes()[i];
        let Some(job) = jobs.get(&i) else {
            out_nodes.push(n.clone());
            continue;
        };
        let desc = describe(n);
        let y = n.output.first().filter(|s| !s.is_empty()).with_context(|| format!("{desc}: no output"))?;
        // The activation's DynamicQuantizeLinear, shared by all its quantized readers.
        if !dql.contains_key(&job.x) {
            let x = &job.x;
            let q = Quantized {
                q: names.fresh(&format!("{x}_quantized")),
                scale: names.fresh(&format!("{x}_scale")),
                zero_point: names.fresh(&format!("{x}_zero_point")),
            };
            let node_name = names.fresh(&format!("{x}_QuantizeLinear"));
            out_nodes.push(node("DynamicQuantizeLinear", &node_name, &[x], &[&q.q, &q.scale, &q.zero_point], vec![]));
            dql.insert(x.clone(), q);
        }
        let xq = &dql[&job.x];
        // The int8 weight.
        let wkey = (job.weight.clone(), job.conv);
        if !weights.contains_key(&wkey) {
            let k = &job.weight;
            let t = view.weight(&k.name).with_context(|| format!("{desc}: weight '{}' not found", k.name))?;
            let mut a = to_f32(t).with_context(|| format!("{desc}: reading weight '{}'", k.name))?;
            if bytes_counted.insert(k.name.clone()) {
                totals.weight_bytes_before += crate::dump::tensor_bytes(t);
            }
            if k.transpose {
                a = a.reversed_axes();
            }
            let alpha = f32::from_bits(k.alpha_bits);
            if alpha != 1.0 {
                a.mapv_inplace(|v| v * alpha);
            }
            if a.iter().any(|v| !v.is_finite()) {
                bail!("{desc}: weight '{}' holds NaN or infinite values", k.name);
            }
            let axis = match (opts.per_channel, job.conv) {
                (false, _) => None,
                (true, true) => Some(0),
                (true, false) => Some(1),
            };
            let qw = quantize_weight(&a, axis);
            let base = if k.transpose { format!("{}_T", k.name) } else { k.name.clone() };
            let q = Quantized {
                q: names.fresh(&format!("{base}_quantized")),
                scale: names.fresh(&format!("{base}_scale")),
                zero_point: names.fresh(&format!("{base}_zero_point")),
            };
            new_inits.push(from_i8(&q.q, &qw.values));
            totals.weight_bytes_after += qw.values.len() as u64;
            match axis {
                None => {
                    new_inits.push(scalar_f32(&q.scale, qw.scales[0]));
                    new_inits.push(scalar_i8(&q.zero_point, 0));
                }
                Some(_) if job.conv => {
                    // [M, 1, ...] to broadcast over the output channels of [N, M, ...].
                    let mut shape = vec![1usize; a.ndim() - 1];
                    shape[0] = qw.scales.len();
                    let s = ArrayD::from_shape_vec(IxDyn(&shape), qw.scales.clone())
                        .with_context(|| format!("{desc}: weight scale shape"))?;
                    new_inits.push(from_f32(&q.scale, &s));
                    new_inits.push(scalar_i8(&q.zero_point, 0));
                }
                Some(_) => {
                    new_inits.push(vec_f32(&q.scale, &qw.scales));
                    new_inits.push(vec_i8(&q.zero_point, &vec![0i8; qw.scales.len()]));
                }
            }
            reports.push(TensorReport {
                name: k.name.clone(),
                kind: "weight",
                dtype: "int8",
                scale: qw.scales,
                zero_point: 0,
                axis,
                range: None,
                method: None,
            });
            totals.weights_quantized += 1;
            weights.insert(wkey.clone(), q);
        }
        let wq = &weights[&wkey];

        // The integer op, its Cast, the scale product and the rescale.
        let base = if n.name().is_empty() { y.clone() } else { n.name().to_string() };
        let acc = names.fresh(&format!("{y}_output_quantized"));
        let int_name = names.fresh(&format!("{base}_quant"));
        let inputs = [xq.q.as_str(), wq.q.as_str(), xq.zero_point.as_str(), wq.zero_point.as_str()];
        if job.conv {
            out_nodes.push(node("ConvInteger", &int_name, &inputs, &[&acc], n.attribute.clone()));
        } else {
            out_nodes.push(node("MatMulInteger", &int_name, &inputs, &[&acc], vec![]));
        }
        let cast_out = names.fresh(&format!("{acc}_cast_output"));
        let cast_name = names.fresh(&format!("{acc}_cast"));
        out_nodes.push(node("Cast", &cast_name, &[&acc], &[&cast_out], vec![attr_int("to", dtype::FLOAT as i64)]));
        let sm_name = names.fresh(&format!("{int_name}_scales_mul"));
        let sm_out = names.fresh(&format!("{sm_name}_output"));
        out_nodes.push(node("Mul", &sm_name, &[&xq.scale, &wq.scale], &[&sm_out], vec![]));
        let mul_name = names.fresh(&format!("{int_name}_output_scale_mul"));
        match &job.bias {
            None => out_nodes.push(node("Mul", &mul_name, &[&cast_out, &sm_out], &[y], vec![])),
            Some(b) => {
                let scaled = names.fresh(&format!("{y}_output_scaled"));
                out_nodes.push(node("Mul", &mul_name, &[&cast_out, &sm_out], &[&scaled], vec![]));
                let bias_name = match b {
                    Bias::Tensor(t) => t.clone(),
                    Bias::Constant { name, scale, shape } => {
                        let t = view.weight(name).with_context(|| format!("{desc}: bias '{name}' not found"))?;
                        let v = to_f32(t).with_context(|| format!("{desc}: reading bias '{name}'"))?;
                        let v: Vec<f32> = v.iter().map(|x| x * scale).collect();
                        let a = ArrayD::from_shape_vec(IxDyn(shape), v).with_context(|| {
                            format!("{desc}: bias '{name}' has {:?} elements, cannot take shape {shape:?}", t.dims)
                        })?;
                        let nn = names.fresh(&format!("{name}_{}", if job.conv { "reshaped" } else { "scaled" }));
                        new_inits.push(from_f32(&nn, &a));
                        nn
                    }
                };
                let add_name = names.fresh(&format!("{int_name}_bias_add"));
                out_nodes.push(node("Add", &add_name, &[&scaled, &bias_name], &[y], vec![]));
            }
        }
    }
    totals.activations_quantized = dql.len();
    if jobs.is_empty() {
        warnings.push("no node was quantized".into());
    }

    let g = finish_graph(graph, out_nodes, new_inits);
    let mut out = model.clone();
    out.graph = Some(g);
    GraphView::new(out.graph.as_ref().context("graph")?)
        .validate()
        .context("internal error: the dynamically quantized graph is invalid")?;
    let report = Report {
        preset,
        per_channel: opts.per_channel,
        activations: "dynamic",
        warnings,
        tensors: reports,
        skipped,
        totals,
    };
    Ok((out, report))
}

/// The rewritten graph: new nodes, initializers still read plus the new ones, Constant nodes
/// and IR < 4 graph inputs of weights no longer read dropped, value infos of tensors no
/// longer produced dropped.
fn finish_graph(graph: &GraphProto, nodes: Vec<NodeProto>, new_inits: Vec<TensorProto>) -> GraphProto {
    let mut g = graph.clone();
    g.node = nodes;
    let mut used: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(g.output.iter().map(|o| o.name().to_string()))
        .collect();
    // Names read inside subgraphs (If/Loop bodies) may be outer-scope weights.
    for n in &g.node {
        for a in &n.attribute {
            for sg in a.g.iter().chain(&a.graphs) {
                subgraph_reads(sg, &mut used);
            }
        }
    }
    g.initializer.retain(|t| used.contains(t.name()));
    g.initializer.extend(new_inits);
    g.node.retain(|n| n.op_type() != "Constant" || n.output.iter().any(|o| used.contains(o)));
    let inits: BTreeSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    let orig_inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let input: Vec<_> =
        g.input.iter().filter(|vi| !orig_inits.contains(vi.name()) || inits.contains(vi.name())).cloned().collect();
    let produced: HashSet<&str> = g.node.iter().flat_map(|n| n.output.iter().map(|s| s.as_str())).collect();
    let value_info: Vec<_> = g.value_info.iter().filter(|vi| produced.contains(vi.name())).cloned().collect();
    g.input = input;
    g.value_info = value_info;
    g
}

/// Every name a subgraph's nodes read, recursively (a superset of its outer-scope reads).
fn subgraph_reads(g: &GraphProto, out: &mut HashSet<String>) {
    for n in &g.node {
        out.extend(n.input.iter().cloned());
        for a in &n.attribute {
            for sg in a.g.iter().chain(&a.graphs) {
                subgraph_reads(sg, out);
            }
        }
    }
}
