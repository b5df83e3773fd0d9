//! Which nodes are regularizable layers, their weights as a `[K, N]` matrix (`y = x·W`), the
//! bias the output feeds, and writing edited weights and biases back into the model.
//!
//! - `MatMul(X, W)` with a 2-D float initializer/Constant `W [K, N]`;
//! - `Gemm(A, B, C)` with `transA = 0` and a 2-D float constant `B`: `W = α·B` (`α·Bᵀ` when
//!   `transB = 1`); its bias is `C` scaled by `β`;
//! - 2-D `Conv(X, W, B)` with a float constant `W [M, C/g, kh, kw]`: `W` is `[K, M]` with
//!   `K = C/g·kh·kw` and `W[k, m] = W[m, k]` (flattened); the rows of `X` are the im2col
//!   patches ([`crate::im2col`]) of each group on a deterministic subsample of output
//!   positions, and group `gi` owns the columns `gi·M/g .. (gi+1)·M/g` (depthwise: `K =
//!   kh·kw`, one column per group). Its bias is the constant `B [M]`.
//!
//! A weight read by anything else than the layer (shared weights) is not edited. The bias of
//! a MatMul is the constant operand of the single `Add` that reads its output, when that
//! constant has `N` elements laid out along the last axis and nothing else reads it.

use crate::array::dtype;
use crate::im2col::{subsample, ConvGeometry, Resolved};
use crate::onnx::attr::{describe, NodeAttrs};
use crate::onnx::pb::{ModelProto, TensorProto};
use crate::onnx::tensor::{from_f32, to_f32};
use crate::onnx::GraphView;
use anyhow::{bail, Context, Result};
use ndarray::{Array2, ArrayD, ArrayViewD, IxDyn};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    MatMul,
    Gemm,
    Conv,
}

/// Where a layer's bias lives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BiasSite {
    /// The constant tensor holding it.
    pub tensor: String,
    /// The node adding it (the Add, or the Gemm itself).
    pub node: String,
    /// The bias contributes `scale · b_j` to the output (Gemm's β, 1 for Add).
    pub scale: f64,
}

/// A regularizable layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Layer {
    /// Node name (or `#index` when unnamed).
    pub node: String,
    #[serde(skip)]
    pub node_index: usize,
    pub kind: LayerKind,
    /// Activation input `X`.
    pub input: String,
    pub output: String,
    /// Weight tensor name.
    pub weight: String,
    pub k: usize,
    pub n: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias: Option<BiasSite>,
    #[serde(skip)]
    pub trans_b: bool,
    #[serde(skip)]
    pub alpha: f64,
    /// Groups (1 except for grouped Conv).
    pub groups: usize,
    #[serde(skip)]
    pub conv: Option<ConvGeometry>,
}

/// A node that looked like a layer but cannot be regularized, and why.
#[derive(Debug, Clone, Serialize)]
pub struct NotALayer {
    pub node: String,
    pub op_type: String,
    pub reason: String,
}

fn node_label(view: &GraphView, i: usize) -> String {
    let n = &view.nodes()[i];
    if n.name().is_empty() {
        format!("#{i}")
    } else {
        n.name().to_string()
    }
}

/// A constant read only by the node `node` (at any slot).
fn sole_reader(view: &GraphView, name: &str, node: usize) -> bool {
    !view.is_graph_output(name) && view.consumers(name).iter().all(|&(c, _)| c == node)
}

/// Finds the regularizable layers, in topological order, and the candidates rejected.
pub fn find_layers(model: &ModelProto) -> Result<(Vec<Layer>, Vec<NotALayer>)> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    let order = view.topo_order()?;
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    for i in order {
        let n = &view.nodes()[i];
        let op = n.op_type();
        let kind = match op {
            "MatMul" => LayerKind::MatMul,
            "Gemm" => LayerKind::Gemm,
            "Conv" => LayerKind::Conv,
            _ => continue,
        };
        if !matches!(n.domain(), "" | "ai.onnx") {
            continue;
        }
        let mut reject = |reason: String| {
            rejected.push(NotALayer { node: node_label(&view, i), op_type: op.to_string(), reason });
        };
        let (Some(x), Some(w)) = (n.input.first(), n.input.get(1)) else { continue };
        let Some(out) = n.output.first().filter(|o| !o.is_empty()) else { continue };
        let Some(wt) = view.weight(w) else {
            continue; // activation × activation: not a weighted layer
        };
        if view.weight(x).is_some() {
            reject("both inputs are constants".into());
            continue;
        }
        if wt.data_type() != dtype::FLOAT {
            reject(format!("weight '{w}' is {}, not float", dtype::name(wt.data_type())));
            continue;
        }
        if !sole_reader(&view, w, i) {
            reject(format!("weight '{w}' is shared with other nodes"));
            continue;
        }
        // The node's own bias input (Conv's B, Gemm's C): a float constant of the right layout
        // read only by this node.
        let own_bias = |len: usize, scale: f64| {
            n.input.get(2).filter(|c| !c.is_empty()).and_then(|c| {
                let t = view.weight(c)?;
                (t.data_type() == dtype::FLOAT && bias_layout(&t.dims, len) && sole_reader(&view, c, i))
                    .then(|| BiasSite { tensor: c.clone(), node: node_label(&view, i), scale })
            })
        };
        let (k, nn, trans_b, alpha, conv, bias) = if kind == LayerKind::Conv {
            let geo = match ConvGeometry::from_node(n, &wt.dims) {
                Ok(g) => g,
                Err(e) => {
                    reject(format!("{e:#}"));
                    continue;
                }
            };
            let m = geo.out_channels;
            (geo.k(), m, false, 1.0, Some(geo), own_bias(m, 1.0))
        } else {
            if wt.dims.len() != 2 {
                reject(format!("weight '{w}' has rank {}, not 2", wt.dims.len()));
                continue;
            }
            let (d0, d1) = (wt.dims[0].max(0) as usize, wt.dims[1].max(0) as usize);
            let (mut trans_b, mut alpha, mut beta) = (false, 1.0f64, 1.0f64);
            if kind == LayerKind::Gemm {
                if n.attr_int_or("transA", 0)? != 0 {
                    reject("transA = 1".into());
                    continue;
                }
                trans_b = n.attr_int_or("transB", 0)? != 0;
                alpha = f64::from(n.attr_float_or("alpha", 1.0)?);
                beta = f64::from(n.attr_float_or("beta", 1.0)?);
                if alpha == 0.0 || !alpha.is_finite() {
                    reject(format!("alpha = {alpha}"));
                    continue;
                }
            }
            let (k, nn) = if trans_b { (d1, d0) } else { (d0, d1) };
            if k == 0 || nn == 0 {
                reject(format!("weight '{w}' is empty"));
                continue;
            }
            let bias = match kind {
                LayerKind::Gemm if beta != 0.0 => own_bias(nn, beta),
                LayerKind::MatMul => matmul_bias(&view, out, nn),
                _ => None,
            };
            (k, nn, trans_b, alpha, None, bias)
        };
        layers.push(Layer {
            node: node_label(&view, i),
            node_index: i,
            kind,
            input: x.clone(),
            output: out.clone(),
            weight: w.clone(),
            k,
            n: nn,
            bias,
            trans_b,
            alpha,
            groups: conv.as_ref().map_or(1, |g: &ConvGeometry| g.groups),
            conv,
        });
    }
    Ok((layers, rejected))
}

/// Ops through which a layer's output values reach another tensor unchanged (large values
/// included): data movement (the input's values rearranged or selected), Relu (positive
/// values unchanged) and MaxPool (a selection). Other activations (Gelu, Sigmoid, ...) make
/// a different tensor with its own statistics.
const PASS_THROUGH: &[&str] = &["Identity", "Relu", "MaxPool"];

/// The tensors that hold the layer's output values as a quantized tensor would see them:
/// its output, the output of its own bias Add, and everything reached from those through
/// [`PASS_THROUGH`] ops and `quantize::MOVE_OPS` (data input only), in discovery order.
pub fn output_views(view: &GraphView, layer: &Layer) -> Vec<String> {
    let mut seen = vec![layer.output.clone()];
    if let (LayerKind::MatMul, Some(site)) = (layer.kind, &layer.bias) {
        let add = view
            .consumers(&layer.output)
            .iter()
            .map(|&(c, _)| &view.nodes()[c])
            .find(|n| n.op_type() == "Add" && n.input.contains(&site.tensor));
        if let Some(o) = add.and_then(|n| n.output.first()) {
            seen.push(o.clone());
        }
    }
    let mut i = 0;
    while let Some(t) = seen.get(i).cloned() {
        i += 1;
        for &(c, slot) in view.consumers(&t) {
            let n = &view.nodes()[c];
            let op = n.op_type();
            if slot != 0 || !(PASS_THROUGH.contains(&op) || crate::quantize::MOVE_OPS.contains(&op)) {
                continue;
            }
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if !seen.contains(o) {
                    seen.push(o.clone());
                }
            }
        }
    }
    seen
}

/// `[N]` or `[1, .., 1, N]`.
fn bias_layout(dims: &[i64], n: usize) -> bool {
    match dims.split_last() {
        Some((&last, rest)) => last == n as i64 && rest.iter().all(|&d| d == 1),
        None => false,
    }
}

fn matmul_bias(view: &GraphView, out: &str, n: usize) -> Option<BiasSite> {
    if view.is_graph_output(out) {
        return None;
    }
    let consumers = view.consumers(out);
    let [(add, slot)] = consumers else { return None };
    let add_node = view.nodes().get(*add)?;
    if add_node.op_type() != "Add" || add_node.input.len() != 2 || *slot > 1 {
        return None;
    }
    let other = &add_node.input[1 - *slot];
    let t = view.weight(other)?;
    (t.data_type() == dtype::FLOAT && bias_layout(&t.dims, n) && sole_reader(view, other, *add)).then(|| BiasSite {
        tensor: other.clone(),
        node: node_label(view, *add),
        scale: 1.0,
    })
}

/// The layer's effective weight `[K, N]` (`y = x·W`, Gemm's α folded in).
pub fn weight_matrix(model: &ModelProto, layer: &Layer) -> Result<Array2<f32>> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    let t = view.weight(&layer.weight).with_context(|| format!("weight '{}' not found", layer.weight))?;
    let a = to_f32(t).with_context(|| format!("layer {}: reading weight '{}'", layer.node, layer.weight))?;
    let a = if layer.kind == LayerKind::Conv {
        // [M, C/g, kh, kw] → [M, K]
        let len = a.len();
        a.as_standard_layout().into_owned().into_shape_with_order((layer.n, len / layer.n.max(1))).with_context(
            || format!("layer {}: weight '{}' does not have {} output channels", layer.node, layer.weight, layer.n),
        )?
    } else {
        a.into_dimensionality::<ndarray::Ix2>().with_context(|| format!("weight '{}' is not 2-D", layer.weight))?
    };
    let mut w = if layer.trans_b || layer.kind == LayerKind::Conv { a.t().to_owned() } else { a };
    if layer.alpha != 1.0 {
        let alpha = layer.alpha as f32;
        w.mapv_inplace(|v| v * alpha);
    }
    if w.dim() != (layer.k, layer.n) {
        bail!(
            "layer {}: weight '{}' has shape {:?}, expected [{}, {}]",
            layer.node,
            layer.weight,
            w.dim(),
            layer.k,
            layer.n
        );
    }
    Ok(w.as_standard_layout().to_owned())
}

/// The layer's bias values (`scale` folded in), `[N]`.
pub fn bias_values(model: &ModelProto, layer: &Layer) -> Result<Option<Vec<f32>>> {
    let Some(site) = &layer.bias else { return Ok(None) };
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    let t = view.weight(&site.tensor).with_context(|| format!("bias '{}' not found", site.tensor))?;
    let a = to_f32(t).with_context(|| format!("layer {}: reading bias '{}'", layer.node, site.tensor))?;
    Ok(Some(a.iter().map(|&v| (f64::from(v) * site.scale) as f32).collect()))
}

/// Finds a constant tensor (initializer or Constant node value) for editing.
fn constant_mut<'a>(model: &'a mut ModelProto, name: &str) -> Result<&'a mut TensorProto> {
    let graph = model.graph.as_mut().context("the model has no graph")?;
    if let Some(pos) = graph.initializer.iter().position(|t| t.name() == name) {
        return Ok(&mut graph.initializer[pos]);
    }
    for n in graph.node.iter_mut() {
        if n.op_type() == "Constant" && n.output.first().is_some_and(|o| o == name) {
            let label = describe(n);
            let attr = n
                .attribute
                .iter_mut()
                .find(|a| a.name() == "value")
                .with_context(|| format!("{label}: no 'value' attribute to edit"))?;
            return attr.t.as_mut().with_context(|| format!("{label}: 'value' holds no tensor"));
        }
    }
    bail!("constant '{name}' not found")
}

/// Replaces a constant's values, keeping its name and dims.
pub(crate) fn replace(model: &mut ModelProto, name: &str, values: Vec<f32>) -> Result<()> {
    let t = constant_mut(model, name)?;
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    let tensor_name = t.name().to_string();
    let a = ArrayD::from_shape_vec(IxDyn(&dims), values)
        .with_context(|| format!("tensor '{name}': new values do not fit shape {dims:?}"))?;
    let mut new = from_f32(&tensor_name, &a);
    new.doc_string = t.doc_string.take();
    *t = new;
    Ok(())
}

/// Writes the effective weight `[K, N]` back (undoing α and transB).
pub fn write_weight(model: &mut ModelProto, layer: &Layer, w: &Array2<f32>) -> Result<()> {
    if w.dim() != (layer.k, layer.n) {
        bail!("layer {}: new weight has shape {:?}, expected [{}, {}]", layer.node, w.dim(), layer.k, layer.n);
    }
    let inv = (1.0 / layer.alpha) as f32;
    let stored = if layer.trans_b || layer.kind == LayerKind::Conv { w.t().to_owned() } else { w.clone() };
    let values: Vec<f32> =
        stored.as_standard_layout().iter().map(|&v| if layer.alpha != 1.0 { v * inv } else { v }).collect();
    replace(model, &layer.weight, values)
        .with_context(|| format!("layer {}: writing weight '{}'", layer.node, layer.weight))
}

/// Writes the bias back; `b` is the effective bias (scale folded in), `[N]`.
pub fn write_bias(model: &mut ModelProto, layer: &Layer, b: &[f32]) -> Result<()> {
    let Some(site) = &layer.bias else { bail!("layer {} has no bias to edit", layer.node) };
    let values: Vec<f32> = b.iter().map(|&v| (f64::from(v) / site.scale) as f32).collect();
    replace(model, &site.tensor, values)
        .with_context(|| format!("layer {}: writing bias '{}'", layer.node, site.tensor))
}

/// Conv output positions per sample whose patches are statistics rows: enough for the Gram
/// matrices (cost `rows·K²·g`) and outputs (`rows·K·M`) to stay near 2²⁵ flops per sample.
pub fn conv_positions(layer: &Layer) -> usize {
    let (k, g, m) = (layer.k.max(1), layer.groups.max(1), layer.n.max(1));
    (1usize << 25).checked_div(k * k * g + k * m).unwrap_or(1).clamp(128, 4096)
}

/// A Conv layer's bias input `B` when it is a constant, `[M]`: `Some(None)` without `B`,
/// `None` when `B` is computed (then its output minus `B` cannot be had without running it).
pub fn conv_bias(view: &GraphView, layer: &Layer) -> Result<Option<Option<Vec<f32>>>> {
    let node = view.nodes().get(layer.node_index).context("internal error: layer node out of range")?;
    let Some(b) = node.input.get(2).filter(|b| !b.is_empty()) else { return Ok(Some(None)) };
    let Some(t) = view.weight(b) else { return Ok(None) };
    let v = to_f32(t).with_context(|| format!("layer {}: reading bias '{b}'", layer.node))?;
    if v.len() != layer.n {
        bail!("layer {}: bias '{b}' has {} values for {} output channels", layer.node, v.len(), layer.n);
    }
    Ok(Some(Some(v.iter().copied().collect())))
}

/// A Conv layer's pre-bias outputs `y = Y − B` at the rows [`input_rows`] gives, from its
/// output `Y [N, M, OH, OW]` and its bias `B`: one `[positions, M/g]` matrix per group (in
/// column-major memory order: each channel's plane is read in order), where position
/// `p = (n·OH + oy)·OW + ox` reads `Y[n, gi·M/g + m, oy, ox]`.
pub fn conv_output_rows(layer: &Layer, out: ArrayViewD<f32>, bias: Option<&[f32]>) -> Result<Vec<Array2<f32>>> {
    let geo = layer.conv.as_ref().context("internal error: not a conv layer")?;
    let shape = out.shape().to_vec();
    let y4 = out
        .into_dimensionality::<ndarray::Ix4>()
        .with_context(|| format!("conv output of shape {shape:?} is not [N, M, OH, OW]"))?;
    let (n, m, oh, ow) = y4.dim();
    if m != geo.out_channels || bias.is_some_and(|b| b.len() != m) {
        bail!("conv output of shape {shape:?} for {} output channels", geo.out_channels);
    }
    let y4 = y4.as_standard_layout();
    let data = y4.as_slice().context("internal error: conv output not contiguous")?;
    let plane = oh * ow;
    // Offset of each picked position in channel 0's plane of its batch item.
    let at: Vec<usize> =
        subsample(n * plane, conv_positions(layer)).iter().map(|&p| p / plane * m * plane + p % plane).collect();
    let ng = geo.group_out();
    let mut ys = Vec::with_capacity(geo.groups);
    for gi in 0..geo.groups {
        let mut t = Array2::<f32>::zeros((ng, at.len()));
        for (j, mut col) in t.outer_iter_mut().enumerate() {
            let c = gi * ng + j;
            let b = bias.map_or(0.0, |b| b[c]);
            for (v, &a) in col.iter_mut().zip(&at) {
                *v = data.get(a + c * plane).copied().unwrap_or(f32::NAN) - b;
            }
        }
        ys.push(t.reversed_axes());
    }
    Ok(ys)
}

/// A Conv layer's input rows of the given row ids alone (`i·g + gi`: group `gi` at the `i`-th
/// of the positions [`input_rows`] picks), from its input `x`.
pub fn conv_patch_rows(layer: &Layer, x: ArrayViewD<f32>, ids: &[usize]) -> Result<Vec<(usize, Vec<f32>)>> {
    let geo = layer.conv.as_ref().context("internal error: not a conv layer")?;
    let (x4, r, pos) = conv_input(layer, geo, x)?;
    let g = geo.groups.max(1);
    ids.iter()
        .map(|&id| {
            let p = *pos.get(id / g).with_context(|| format!("outlier row {id} is outside the layer's input rows"))?;
            let mut v = vec![0f32; geo.k()];
            geo.patch(&x4, &r, id % g, p, &mut v);
            Ok((id, v))
        })
        .collect()
}

/// A Conv layer's input as `[N, C, H, W]`, its resolved geometry, and the output positions
/// [`conv_positions`] picks (the rows [`input_rows`] and [`conv_patch_rows`] read).
fn conv_input<'a>(
    layer: &Layer,
    geo: &ConvGeometry,
    x: ArrayViewD<'a, f32>,
) -> Result<(ndarray::ArrayView4<'a, f32>, Resolved, Vec<usize>)> {
    conv_input_at(geo, x, conv_positions(layer))
}

fn conv_input_at<'a>(
    geo: &ConvGeometry,
    x: ArrayViewD<'a, f32>,
    positions: usize,
) -> Result<(ndarray::ArrayView4<'a, f32>, Resolved, Vec<usize>)> {
    let shape = x.shape().to_vec();
    let x4 = x
        .into_dimensionality::<ndarray::Ix4>()
        .with_context(|| format!("conv input of shape {shape:?} is not [N, C, H, W]"))?;
    let r = geo.resolve(x4.shape())?;
    let pos = subsample(r.positions(), positions);
    Ok((x4, r, pos))
}

/// A sample's input rows of the layer: `[rows, K]` (leading dims flattened) for MatMul and
/// Gemm; for Conv the im2col patches of each group at the positions [`conv_positions`] picks.
pub fn input_rows(layer: &Layer, x: ArrayViewD<f32>) -> Result<Vec<Array2<f32>>> {
    input_rows_at(layer, x, conv_positions(layer))
}

/// [`input_rows`] with at most `positions` Conv output positions per sample (evenly spaced).
pub fn input_rows_at(layer: &Layer, x: ArrayViewD<f32>, positions: usize) -> Result<Vec<Array2<f32>>> {
    match &layer.conv {
        Some(geo) => {
            let (x4, _, pos) = conv_input_at(geo, x, positions)?;
            (0..geo.groups).map(|gi| geo.rows(&x4, gi, &pos)).collect()
        }
        None => {
            let k = layer.k;
            if x.ndim() == 0 || x.shape()[x.ndim() - 1] != k {
                bail!("input of shape {:?} does not end with the weight's K = {k}", x.shape());
            }
            let rows = x.len() / k;
            Ok(vec![x.as_standard_layout().into_owned().into_shape_with_order((rows, k))?])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_int, attr_ints, graph, model, node, tensor_info};
    use ndarray::Array4;

    /// The Conv output read from the runtime, minus `B`, gives the same rows as the im2col
    /// patches times the weight (grouped, strided, two batch items), and the patches of
    /// single rows equal those rows.
    #[test]
    fn conv_output_rows_match_the_patches_times_the_weight() -> Result<()> {
        let mut rng = crate::rng::Rng::new(7);
        let (c, m, g) = (4usize, 6usize, 2usize);
        let w = ArrayD::from_shape_fn(IxDyn(&[m, c / g, 3, 3]), |_| rng.normal() as f32);
        let b = ArrayD::from_shape_fn(IxDyn(&[m]), |_| rng.normal() as f32);
        let attrs = vec![attr_ints("pads", &[1, 1, 1, 1]), attr_ints("strides", &[2, 2]), attr_int("group", g as i64)];
        let gp = graph(
            "conv",
            vec![node("Conv", "conv", &["x", "w", "b"], &["y"], attrs)],
            vec![tensor_info("x", dtype::FLOAT, &[2, c as i64, 7, 7])],
            vec![tensor_info("y", dtype::FLOAT, &[2, m as i64, 4, 4])],
            vec![from_f32("w", &w), from_f32("b", &b)],
        );
        let md = model(gp, 13);
        let (layers, _) = find_layers(&md)?;
        let l = layers.first().context("no layer")?;
        let x = ArrayD::from_shape_fn(IxDyn(&[2, c, 7, 7]), |_| rng.normal() as f32);
        let rows = input_rows(l, x.view())?;
        let wm = weight_matrix(&md, l)?;
        let ng = m / g;
        // Y from the rows: position p = (n·4 + oy)·4 + ox.
        let mut y = Array4::<f32>::zeros((2, m, 4, 4));
        for (gi, r) in rows.iter().enumerate() {
            assert_eq!(r.nrows(), 32, "every position is a row");
            let z = r.dot(&wm.slice(ndarray::s![.., gi * ng..(gi + 1) * ng]));
            for ((p, j), &v) in z.indexed_iter() {
                y[[p / 16, gi * ng + j, (p / 4) % 4, p % 4]] = v + b[[gi * ng + j]];
            }
        }
        let view = GraphView::new(md.graph.as_ref().context("graph")?);
        let bias = conv_bias(&view, l)?.context("constant bias")?;
        let got = conv_output_rows(l, y.view().into_dyn(), bias.as_deref())?;
        for (gi, r) in rows.iter().enumerate() {
            let want = r.dot(&wm.slice(ndarray::s![.., gi * ng..(gi + 1) * ng]));
            let diff = (&got[gi] - &want).mapv(f32::abs).fold(0f32, |a, &v| a.max(v));
            assert!(diff < 1e-5, "group {gi}: {diff}");
        }
        let ids = [0usize, 5, 2 * 17 + 1, 63];
        for (id, patch) in conv_patch_rows(l, x.view(), &ids)? {
            assert_eq!(patch, rows[id % g].row(id / g).to_vec(), "row {id}");
        }
        Ok(())
    }
}
