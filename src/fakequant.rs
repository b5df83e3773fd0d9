//! The float fake-quant twin of a quantized model: the same graph with every
//! QuantizeLinear/DequantizeLinear (and the dynamic-quantization ops DynamicQuantizeLinear,
//! MatMulInteger, ConvInteger) replaced by float ops that compute exactly what the ONNX
//! definitions say, so tract can evaluate a quantized model faithfully.
//!
//! Why: tract 0.23.9 applies Q/DQ per tensor only (it reads `scale[0]`) and its declutter
//! rewrites `Q → DQ → Softmax → Q` into a lookup table that is not what ONNX Runtime computes.
//!
//! The rewrites (everything else is copied unchanged, graph inputs and outputs keep their names):
//! - `DequantizeLinear` of a constant (initializer or Constant node) is folded into a float
//!   initializer named after its output: `y = (x - zp) * scale`, per axis when the scale is 1-D.
//! - `QuantizeLinear` becomes `clip(round_half_even(x / scale) + zp, qmin, qmax)` computed in
//!   float (the quantized values are small integers, exact in f32); its integer output tensor
//!   disappears and only `DequantizeLinear` may read it. Each reading `DequantizeLinear` becomes
//!   `(q - zp) * scale` whose final `Mul` carries the DQ's output name.
//! - A per-tensor `QuantizeLinear` of a float32 tensor read only by per-tensor
//!   `DequantizeLinear`s (every activation pair `quantize` writes) is not spelled out: each
//!   reading DQ becomes one `OnnxqFakeQuantize` node (domain `ai.onnxq.twin`, the op
//!   [`crate::runtime`] registers with tract) computing both formulas in one pass, with the
//!   f32 division ONNX specifies. A twin of six to eight float ops per pair made tract's plan
//!   optimization several times slower (MiniLM-L6: about 1.9 CPU-s per twin load).
//! - `DequantizeLinear` of any other integer tensor becomes `(Cast(x) - zp) * scale`.
//! - `DynamicQuantizeLinear` becomes its float formula (ReduceMin/ReduceMax over all axes);
//!   `MatMulInteger`/`ConvInteger` become `MatMul`/`Conv` of `(a - a_zp)` and `(b - b_zp)` in
//!   double (integer sums are exact there) followed by a Cast to float, which equals the
//!   `Cast(int32 → float)` that always follows them (other readers of the int32 are errors).
//!
//! Numerics: tract rewrites every float `Div` into a multiplication by the reciprocal, which
//! is off by one ulp for some quotients and then rounds ties the wrong way. `x / scale` is
//! therefore computed in double and cast back to float: an f32 quotient is never a midpoint
//! between two f32 values and lies at least ~2^-50 (relative) away from one, while the double
//! reciprocal-multiply errs by at most ~2^-52, so the cast yields the correctly rounded f32
//! quotient ONNX specifies.
//!
//! Not handled: quantization inside subgraphs (If/Loop bodies are copied as they are), blocked
//! quantization (`block_size`), float8/int4 types, non-float32 scales, non-constant Q/DQ scales
//! and zero points.

use crate::array::{dtype, ArrayData};
use crate::onnx::attr::{describe, NodeAttrs};
use crate::onnx::builder::{attr_float, attr_int, node, Dim};
use crate::onnx::pb::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};
use crate::onnx::tensor::{from_f32, from_f64, to_array, to_f32};
use crate::onnx::{GraphView, NameAlloc};
use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Op types the twin rewrites.
pub const QUANT_OPS: &[&str] =
    &["QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"];

const UINT16: i32 = 4;
const INT16: i32 = 5;
const UINT4: i32 = 21;
const INT4: i32 = 22;

fn default_domain(n: &NodeProto) -> bool {
    matches!(n.domain(), "" | "ai.onnx")
}

/// Whether the model's main graph contains ops the twin rewrites.
pub fn needs_twin(model: &ModelProto) -> bool {
    model.graph.as_ref().is_some_and(|g| g.node.iter().any(|n| default_domain(n) && QUANT_OPS.contains(&n.op_type())))
}

/// The opset the model imports for the default domain (0 when it imports none).
fn default_opset(model: &ModelProto) -> i64 {
    model.opset_import.iter().filter(|o| matches!(o.domain(), "" | "ai.onnx")).map(|o| o.version()).max().unwrap_or(0)
}

/// Builds the float fake-quant twin of `model` (see the module docs). A model without
/// quantization ops comes back unchanged.
pub fn twin(model: &ModelProto) -> Result<ModelProto> {
    build(model)
}

fn build(model: &ModelProto) -> Result<ModelProto> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    if !needs_twin(model) {
        return Ok(model.clone());
    }
    let opset = default_opset(model);
    if opset < 11 {
        bail!("the float twin of a quantized model needs opset 11 or newer (Round, Clip with inputs); the model imports opset {opset}");
    }
    let view = GraphView::new(graph);
    let mut tw = Twin::new(&view);
    tw.plan_names()?;
    for n in &graph.node {
        if !default_domain(n) {
            tw.nodes.push(n.clone());
            continue;
        }
        match n.op_type() {
            "QuantizeLinear" => tw.quantize(n)?,
            "DequantizeLinear" => tw.dequantize(n)?,
            "DynamicQuantizeLinear" => tw.dynamic_quantize(n)?,
            "MatMulInteger" | "ConvInteger" => tw.integer_op(n)?,
            _ => tw.nodes.push(n.clone()),
        }
    }
    tw.fold_constants()?;
    let fused = !tw.fused.is_empty();
    let new_graph = tw.finish(graph);
    GraphView::new(&new_graph).validate().context("the float twin of the model is not a valid graph")?;
    let mut out = model.clone();
    out.graph = Some(new_graph);
    if fused {
        out.opset_import.push(crate::onnx::pb::OperatorSetIdProto {
            domain: Some(crate::runtime::FAKE_QUANTIZE_DOMAIN.into()),
            version: Some(1),
        });
    }
    Ok(out)
}

/// Constant scale and zero point of a Q/DQ node.
#[derive(Debug, Clone)]
struct QParams {
    scale: Vec<f32>,
    /// Same length as `scale`.
    zp: Vec<i64>,
    /// Element type of the zero point (uint8 when absent).
    zp_type: i32,
    axis: i64,
    /// A 1-D scale with more than one element.
    per_axis: bool,
}

/// The integer range `[qmin, qmax]` a QuantizeLinear with parameters `p` saturates to.
fn quantize_range(n: &NodeProto, p: &QParams) -> Result<(f32, f32)> {
    let ty = match n.attr_int("output_dtype")?.unwrap_or(0) {
        0 => p.zp_type,
        t if n.input.get(2).is_some_and(|s| !s.is_empty()) && t as i32 != p.zp_type => {
            bail!("{}: output_dtype {t} differs from the zero point's type", describe(n))
        }
        t => t as i32,
    };
    qrange(n, ty)
}

/// Integer values of a decoded tensor.
fn ints(a: &ArrayData) -> Option<ArrayD<i64>> {
    Some(match a {
        ArrayData::I64(a) => a.clone(),
        ArrayData::I32(a) => a.mapv(i64::from),
        ArrayData::I8(a) => a.mapv(i64::from),
        ArrayData::U8(a) => a.mapv(i64::from),
        _ => return None,
    })
}

/// The range of a quantized element type.
fn qrange(n: &NodeProto, ty: i32) -> Result<(f32, f32)> {
    Ok(match ty {
        dtype::UINT8 => (0.0, 255.0),
        dtype::INT8 => (-128.0, 127.0),
        UINT16 => (0.0, 65535.0),
        INT16 => (-32768.0, 32767.0),
        UINT4 => (0.0, 15.0),
        INT4 => (-8.0, 7.0),
        other => {
            bail!("{}: quantized element type {} is not supported by the float twin", describe(n), dtype::name(other))
        }
    })
}

/// Normalizes a possibly negative axis for a tensor of rank `rank`.
fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

struct Twin<'g, 'v> {
    view: &'v GraphView<'g>,
    alloc: NameAlloc,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Integer tensor name → name of the float tensor holding the same values.
    float_of: HashMap<String, String>,
    /// Tensors that disappear or change type (their value_info entries are dropped).
    retyped: HashSet<String>,
    /// Constants read by rewritten nodes: dropped when nothing reads them any more.
    consumed: BTreeSet<String>,
    /// Per-tensor QuantizeLinear outputs (of a float input) read only by per-tensor
    /// DequantizeLinear: each such pair becomes one fused node (module docs).
    fused: HashSet<String>,
    /// DequantizeLinear nodes of constants, folded together at the end ([`Twin::fold_constants`]).
    folds: Vec<Fold<'g>>,
}

/// A DequantizeLinear of a constant whose float initializer goes to `inits[at]`.
struct Fold<'g> {
    at: usize,
    node: NodeProto,
    weight: &'g TensorProto,
    params: QParams,
}

impl<'g, 'v> Twin<'g, 'v> {
    fn new(view: &'v GraphView<'g>) -> Self {
        Twin {
            view,
            alloc: NameAlloc::new(view.graph),
            nodes: Vec::new(),
            inits: Vec::new(),
            float_of: HashMap::new(),
            retyped: HashSet::new(),
            consumed: BTreeSet::new(),
            fused: HashSet::new(),
            folds: Vec::new(),
        }
    }

    /// Folds the DequantizeLinear nodes of constants recorded by [`Twin::dequantize`] in
    /// parallel (the weights of a whole model, a third of a twin's build alone), each into
    /// its slot of the initializers; the first error in graph order is returned.
    fn fold_constants(&mut self) -> Result<()> {
        use rayon::prelude::*;
        let folds = std::mem::take(&mut self.folds);
        let folded: Vec<Result<TensorProto>> = folds
            .par_iter()
            .map(|f| {
                let y = f.node.output.first().map_or("", String::as_str);
                Ok(from_f32(y, &fold_dequantize(&f.node, f.weight, &f.params)?))
            })
            .collect();
        for (f, t) in folds.iter().zip(folded) {
            *self.inits.get_mut(f.at).context("internal error: folded constant slot")? = t?;
        }
        Ok(())
    }

    /// Names the float versions of every integer tensor produced by QuantizeLinear and
    /// DynamicQuantizeLinear, and checks who reads those integer tensors.
    fn plan_names(&mut self) -> Result<()> {
        let view = self.view;
        for n in view.nodes() {
            if !default_domain(n) {
                continue;
            }
            let outs: Vec<&String> = match n.op_type() {
                "QuantizeLinear" => n.output.first().into_iter().collect(),
                // y and y_zero_point; y_scale stays a float tensor under its own name.
                "DynamicQuantizeLinear" => [n.output.first(), n.output.get(2)].into_iter().flatten().collect(),
                _ => continue,
            };
            for o in outs.into_iter().filter(|o| !o.is_empty()) {
                if view.is_graph_output(o) {
                    bail!(
                        "{}: its integer output '{o}' is a graph output, which the float twin cannot reproduce",
                        describe(n)
                    );
                }
                for &(ci, slot) in view.consumers(o) {
                    let c = &view.nodes()[ci];
                    let ok = default_domain(c)
                        && match c.op_type() {
                            "DequantizeLinear" => slot == 0,
                            "MatMulInteger" | "ConvInteger" => slot < 4,
                            _ => false,
                        };
                    if !ok {
                        bail!(
                            "{}: its quantized output '{o}' is read by {}; in the float twin only \
                             DequantizeLinear, MatMulInteger and ConvInteger may read a quantized tensor",
                            describe(n),
                            describe(c)
                        );
                    }
                }
                if n.op_type() == "QuantizeLinear" && self.fusable(n, o)? {
                    self.fused.insert(o.clone());
                }
                let f = self.alloc.fresh(&format!("{o}_float"));
                self.float_of.insert(o.clone(), f);
                self.retyped.insert(o.clone());
            }
        }
        Ok(())
    }

    /// Whether the QuantizeLinear `q` (output `o`) and every reader of `o` (all
    /// DequantizeLinear, checked by the caller) quantize per tensor a tensor that is float32
    /// (or of undeclared type: quantized activations are float32).
    fn fusable(&mut self, q: &NodeProto, o: &str) -> Result<bool> {
        let view = self.view;
        let x = q.input.first().map_or("", String::as_str);
        if x.is_empty() || !matches!(view.elem_type(x), 0 | dtype::FLOAT) || self.qparams(q)?.per_axis {
            return Ok(false);
        }
        for &(ci, _) in view.consumers(o) {
            let c = &view.nodes()[ci];
            if c.op_type() != "DequantizeLinear" || self.qparams(c)?.per_axis {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A constant input of `n` (None when the optional input is absent).
    fn const_input(&mut self, n: &NodeProto, slot: usize, what: &str) -> Result<Option<&'g TensorProto>> {
        let Some(name) = n.input.get(slot).filter(|s| !s.is_empty()) else { return Ok(None) };
        let t = self.view.weight(name).with_context(|| {
            format!("{}: {what} '{name}' is not a constant (initializer or Constant node)", describe(n))
        })?;
        self.consumed.insert(name.clone());
        Ok(Some(t))
    }

    fn qparams(&mut self, n: &NodeProto) -> Result<QParams> {
        if n.attr_int("block_size")?.unwrap_or(0) != 0 {
            bail!("{}: blocked quantization (block_size) is not supported by the float twin", describe(n));
        }
        let st =
            self.const_input(n, 1, "scale")?.with_context(|| format!("{}: the scale input is missing", describe(n)))?;
        if st.data_type() != dtype::FLOAT {
            bail!(
                "{}: scale '{}' is {}; the float twin supports float32 scales only",
                describe(n),
                st.name(),
                dtype::name(st.data_type())
            );
        }
        let scale = to_f32(st).with_context(|| format!("{}: reading scale '{}'", describe(n), st.name()))?;
        if scale.ndim() > 1 || scale.is_empty() {
            bail!(
                "{}: scale '{}' has shape {:?}; expected a scalar or a 1-D tensor",
                describe(n),
                st.name(),
                scale.shape()
            );
        }
        let scale: Vec<f32> = scale.iter().copied().collect();
        let (zp, zp_type) = match self.const_input(n, 2, "zero point")? {
            None => (vec![0; scale.len()], dtype::UINT8),
            Some(t) => {
                let a = to_array(t).with_context(|| format!("{}: reading zero point '{}'", describe(n), t.name()))?;
                let v = ints(&a).with_context(|| {
                    format!(
                        "{}: zero point '{}' is {}, not an integer",
                        describe(n),
                        t.name(),
                        dtype::name(t.data_type())
                    )
                })?;
                if v.len() != scale.len() || v.ndim() > 1 {
                    bail!(
                        "{}: zero point '{}' has shape {:?} but scale '{}' has {} elements",
                        describe(n),
                        t.name(),
                        v.shape(),
                        st.name(),
                        scale.len()
                    );
                }
                (v.iter().copied().collect(), t.data_type())
            }
        };
        let per_axis = scale.len() > 1;
        Ok(QParams { scale, zp, zp_type, axis: n.attr_int_or("axis", 1)?, per_axis })
    }

    /// The rank of the first of `names` whose shape the model declares.
    fn rank_of(&self, names: &[&str]) -> Option<usize> {
        names.iter().filter(|s| !s.is_empty()).find_map(|s| self.view.shape(s)).map(|d| d.len())
    }

    /// Shape the per-tensor/per-axis parameters take to broadcast against `tensor`.
    fn param_shape(&self, n: &NodeProto, p: &QParams, tensor: &str, rank_from: &[&str]) -> Result<Vec<usize>> {
        if !p.per_axis {
            return Ok(vec![]);
        }
        let c = p.scale.len();
        let Some(rank) = self.rank_of(rank_from) else {
            if p.axis == -1 {
                return Ok(vec![c]);
            }
            bail!(
                "{}: per-axis quantization (axis {}) of '{tensor}' needs the tensor's rank, which the model \
                 does not declare (add value_info, e.g. with ONNX shape inference)",
                describe(n),
                p.axis
            );
        };
        let a = norm_axis(p.axis, rank).with_context(|| {
            format!("{}: axis {} is out of range for '{tensor}' of rank {rank}", describe(n), p.axis)
        })?;
        if let Some(Dim::Fixed(d)) = rank_from.iter().find_map(|s| self.view.shape(s)).and_then(|d| d.get(a).cloned()) {
            if d != c as i64 {
                bail!("{}: '{tensor}' has {d} elements on axis {a} but the scale has {c}", describe(n));
            }
        }
        let mut shape = vec![1; rank];
        shape[a] = c;
        Ok(shape)
    }

    fn init_f32(&mut self, base: &str, values: Vec<f32>, shape: &[usize]) -> Result<String> {
        let name = self.alloc.fresh(base);
        let a = ArrayD::from_shape_vec(IxDyn(shape), values).context("parameter shape")?;
        self.inits.push(from_f32(&name, &a));
        Ok(name)
    }

    fn init_f64(&mut self, base: &str, values: Vec<f64>, shape: &[usize]) -> Result<String> {
        let name = self.alloc.fresh(base);
        let a = ArrayD::from_shape_vec(IxDyn(shape), values).context("parameter shape")?;
        self.inits.push(from_f64(&name, &a));
        Ok(name)
    }

    /// Adds a one-output node named like its output.
    fn emit(&mut self, op: &str, base: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.alloc.fresh(base);
        self.nodes.push(node(op, &out, inputs, &[&out], attrs));
        out
    }

    /// Adds the node that produces a tensor of the original graph, reusing the replaced node's
    /// name when it has one.
    fn emit_final(
        &mut self,
        op: &str,
        replaced: &NodeProto,
        inputs: &[&str],
        output: &str,
        attrs: Vec<AttributeProto>,
    ) {
        let name = if replaced.name().is_empty() {
            self.alloc.fresh(&format!("{output}_{op}"))
        } else {
            replaced.name().to_string()
        };
        self.nodes.push(node(op, &name, inputs, &[output], attrs));
    }

    /// `a / b` in float32, correctly rounded (computed in double, see the module docs); `b` must
    /// already be a double tensor.
    fn exact_div(&mut self, base: &str, a: &str, b64: &str) -> String {
        let a64 = self.emit("Cast", &format!("{base}_f64"), &[a], vec![attr_int("to", dtype::DOUBLE as i64)]);
        let d64 = self.emit("Div", &format!("{base}_div_f64"), &[&a64, b64], vec![]);
        self.emit("Cast", &format!("{base}_div"), &[&d64], vec![attr_int("to", dtype::FLOAT as i64)])
    }

    fn quantize(&mut self, n: &NodeProto) -> Result<()> {
        let (Some(x), Some(qo)) = (n.input.first().filter(|s| !s.is_empty()), n.output.first()) else {
            bail!("{}: expected an input and an output", describe(n));
        };
        let Some(qf) = self.float_of.get(qo).cloned() else {
            // The quantized output is read by nobody: drop the node.
            return Ok(());
        };
        if self.fused.contains(qo) {
            // Each reading DequantizeLinear computes the pair (`dequantize`).
            return Ok(());
        }
        let p = self.qparams(n)?;
        let (qmin, qmax) = quantize_range(n, &p)?;
        let shape = self.param_shape(n, &p, x, &[x, qo])?;
        let s64 = self.init_f64(&format!("{qo}_scale_f64"), p.scale.iter().map(|&s| f64::from(s)).collect(), &shape)?;
        let div = self.exact_div(qo, x, &s64);
        let round = self.emit("Round", &format!("{qo}_round"), &[&div], vec![]);
        let zp = self.init_f32(&format!("{qo}_zero_point"), p.zp.iter().map(|&z| z as f32).collect(), &shape)?;
        let add = self.emit("Add", &format!("{qo}_add_zero_point"), &[&round, &zp], vec![]);
        let lo = self.init_f32(&format!("{qo}_qmin"), vec![qmin], &[])?;
        let hi = self.init_f32(&format!("{qo}_qmax"), vec![qmax], &[])?;
        self.emit_final("Clip", n, &[&add, &lo, &hi], &qf, vec![]);
        Ok(())
    }

    fn dequantize(&mut self, n: &NodeProto) -> Result<()> {
        let (Some(x), Some(y)) = (n.input.first().filter(|s| !s.is_empty()), n.output.first()) else {
            bail!("{}: expected an input and an output", describe(n));
        };
        let p = self.qparams(n)?;
        if let Some(t) = self.view.weight(x) {
            self.consumed.insert(x.clone());
            // Folded with the others at the end; its slot keeps the initializers' order.
            self.folds.push(Fold { at: self.inits.len(), node: n.clone(), weight: t, params: p });
            self.inits.push(TensorProto::default());
            return Ok(());
        }
        if self.fused.contains(x) {
            let q = self.view.producer(x).with_context(|| format!("{}: no producer of '{x}'", describe(n)))?;
            let qin = q.input.first().map_or("", String::as_str);
            let pq = self.qparams(q)?;
            let (qmin, qmax) = quantize_range(q, &pq)?;
            let attrs = vec![
                attr_float("q_scale", pq.scale[0]),
                attr_float("q_zero_point", pq.zp[0] as f32),
                attr_float("qmin", qmin),
                attr_float("qmax", qmax),
                attr_float("dq_scale", p.scale[0]),
                attr_float("dq_zero_point", p.zp[0] as f32),
            ];
            self.emit_final(crate::runtime::FAKE_QUANTIZE_OP, n, &[qin], y, attrs);
            if let Some(last) = self.nodes.last_mut() {
                last.domain = Some(crate::runtime::FAKE_QUANTIZE_DOMAIN.into());
            }
            return Ok(());
        }
        let (xf, rank_from): (String, Vec<&str>) = match self.float_of.get(x) {
            Some(f) => {
                let q = self.view.producer(x);
                let qin = q.and_then(|q| q.input.first()).map_or("", String::as_str);
                (f.clone(), vec![x.as_str(), qin, y.as_str()])
            }
            None => (
                self.emit("Cast", &format!("{y}_cast"), &[x], vec![attr_int("to", dtype::FLOAT as i64)]),
                vec![x.as_str(), y.as_str()],
            ),
        };
        let shape = self.param_shape(n, &p, x, &rank_from)?;
        let zp = self.init_f32(&format!("{y}_zero_point"), p.zp.iter().map(|&z| z as f32).collect(), &shape)?;
        let scale = self.init_f32(&format!("{y}_scale"), p.scale.clone(), &shape)?;
        let sub = self.emit("Sub", &format!("{y}_sub"), &[&xf, &zp], vec![]);
        self.emit_final("Mul", n, &[&sub, &scale], y, vec![]);
        Ok(())
    }

    fn dynamic_quantize(&mut self, n: &NodeProto) -> Result<()> {
        let Some(x) = n.input.first().filter(|s| !s.is_empty()) else {
            bail!("{}: the input is missing", describe(n));
        };
        let get = |k: usize| n.output.get(k).filter(|s| !s.is_empty()).cloned();
        let (y, ys, yzp) = (get(0), get(1), get(2));
        let base = y.clone().or_else(|| ys.clone()).unwrap_or_else(|| format!("{x}_dynamic"));
        let keep0 = vec![attr_int("keepdims", 0)];
        let mn = self.emit("ReduceMin", &format!("{base}_min"), &[x], keep0.clone());
        let mx = self.emit("ReduceMax", &format!("{base}_max"), &[x], keep0);
        let zero = self.init_f32(&format!("{base}_zero"), vec![0.0], &[])?;
        let mn0 = self.emit("Min", &format!("{base}_min0"), &[&mn, &zero], vec![]);
        let mx0 = self.emit("Max", &format!("{base}_max0"), &[&mx, &zero], vec![]);
        let range = self.emit("Sub", &format!("{base}_range"), &[&mx0, &mn0], vec![]);
        let levels = self.init_f64(&format!("{base}_levels"), vec![255.0], &[])?;
        // y_scale = (max(0, max x) - min(0, min x)) / 255
        let scale_div = self.exact_div(&format!("{base}_scale"), &range, &levels);
        let scale = match &ys {
            Some(ys) => {
                self.emit_final("Identity", n, &[&scale_div], ys, vec![]);
                ys.clone()
            }
            None => scale_div,
        };
        let scale64 =
            self.emit("Cast", &format!("{base}_scale_f64"), &[&scale], vec![attr_int("to", dtype::DOUBLE as i64)]);
        let lo = self.init_f32(&format!("{base}_qmin"), vec![0.0], &[])?;
        let hi = self.init_f32(&format!("{base}_qmax"), vec![255.0], &[])?;
        // y_zero_point = round(saturate(0 - min(0, min x) / y_scale))
        let zdiv = self.exact_div(&format!("{base}_zp"), &mn0, &scale64);
        let zneg = self.emit("Sub", &format!("{base}_zp_neg"), &[&zero, &zdiv], vec![]);
        let zclip = self.emit("Clip", &format!("{base}_zp_clip"), &[&zneg, &lo, &hi], vec![]);
        let zpf = match yzp.as_ref().and_then(|z| self.float_of.get(z)).cloned() {
            Some(f) => {
                self.nodes.push(node("Round", &f, &[&zclip], &[&f], vec![]));
                f
            }
            None => self.emit("Round", &format!("{base}_zp_round"), &[&zclip], vec![]),
        };
        // y = saturate(round(x / y_scale) + y_zero_point)
        if let Some(yf) = y.as_ref().and_then(|y| self.float_of.get(y)).cloned() {
            let div = self.exact_div(&format!("{base}_x"), x, &scale64);
            let round = self.emit("Round", &format!("{base}_round"), &[&div], vec![]);
            let add = self.emit("Add", &format!("{base}_add_zero_point"), &[&round, &zpf], vec![]);
            self.nodes.push(node("Clip", &yf, &[&add, &lo, &hi], &[&yf], vec![]));
        }
        Ok(())
    }

    /// A double tensor with the values of input `slot` of an integer op (None when absent).
    /// `zp_shape` reshapes a constant 1-D zero point with more than one element.
    fn int_operand(
        &mut self,
        n: &NodeProto,
        slot: usize,
        zp_shape: Option<&dyn Fn(usize) -> Result<Vec<usize>>>,
    ) -> Result<Option<String>> {
        let Some(name) = n.input.get(slot).filter(|s| !s.is_empty()) else { return Ok(None) };
        if let Some(t) = self.view.weight(name) {
            self.consumed.insert(name.clone());
            let a = to_array(t).with_context(|| format!("{}: reading '{name}'", describe(n)))?;
            let v = ints(&a).with_context(|| {
                format!("{}: '{name}' is {}, not an integer tensor", describe(n), dtype::name(t.data_type()))
            })?;
            let mut shape = v.shape().to_vec();
            if let Some(f) = zp_shape {
                if v.len() > 1 {
                    shape = f(v.len())?;
                }
            }
            let values = v.iter().map(|&x| x as f64).collect();
            return Ok(Some(self.init_f64(&format!("{name}_f64"), values, &shape)?));
        }
        let src = self.float_of.get(name).cloned().unwrap_or_else(|| name.clone());
        Ok(Some(self.emit("Cast", &format!("{name}_f64"), &[&src], vec![attr_int("to", dtype::DOUBLE as i64)])))
    }

    fn integer_op(&mut self, n: &NodeProto) -> Result<()> {
        let conv = n.op_type() == "ConvInteger";
        let Some(y) = n.output.first().filter(|s| !s.is_empty()) else {
            bail!("{}: the output is missing", describe(n));
        };
        if self.view.is_graph_output(y) {
            bail!("{}: its int32 output '{y}' is a graph output, which the float twin cannot reproduce", describe(n));
        }
        for &(ci, _) in self.view.consumers(y) {
            let c = &self.view.nodes()[ci];
            if c.op_type() != "Cast" {
                bail!(
                    "{}: its int32 output '{y}' is read by {}; the float twin supports only a Cast after {}",
                    describe(n),
                    describe(c),
                    n.op_type()
                );
            }
        }
        let a = self.int_operand(n, 0, None)?.with_context(|| format!("{}: input A is missing", describe(n)))?;
        let b = self.int_operand(n, 1, None)?.with_context(|| format!("{}: input B is missing", describe(n)))?;
        let row_zp = |len: usize| -> Result<Vec<usize>> { Ok(vec![len, 1]) };
        let view = self.view;
        let w_name = n.input.get(1).cloned().unwrap_or_default();
        let desc = describe(n);
        let channel_zp = |len: usize| -> Result<Vec<usize>> {
            let rank = view.shape(&w_name).map(|d| d.len()).with_context(|| {
                format!("{desc}: a per-channel weight zero point needs the rank of '{w_name}', which the model does not declare")
            })?;
            let mut s = vec![1; rank.max(1)];
            s[0] = len;
            Ok(s)
        };
        let azp = self.int_operand(n, 2, if conv { None } else { Some(&row_zp) })?;
        let bzp = self.int_operand(n, 3, if conv { Some(&channel_zp) } else { None })?;
        let a = match azp {
            Some(z) => self.emit("Sub", &format!("{y}_a"), &[&a, &z], vec![]),
            None => a,
        };
        let b = match bzp {
            Some(z) => self.emit("Sub", &format!("{y}_b"), &[&b, &z], vec![]),
            None => b,
        };
        let out64 = if conv {
            self.emit("Conv", &format!("{y}_f64"), &[&a, &b], n.attribute.clone())
        } else {
            self.emit("MatMul", &format!("{y}_f64"), &[&a, &b], vec![])
        };
        self.emit_final("Cast", n, &[&out64], y, vec![attr_int("to", dtype::FLOAT as i64)]);
        self.retyped.insert(y.clone());
        Ok(())
    }

    /// The rewritten graph: new nodes, the original initializers minus constants nothing reads
    /// any more, the new initializers, and value infos of retyped tensors dropped.
    fn finish(self, g: &GraphProto) -> GraphProto {
        let mut used: HashSet<&str> = HashSet::new();
        for n in &self.nodes {
            used.extend(n.input.iter().map(String::as_str));
            for a in &n.attribute {
                for sg in a.g.iter().chain(&a.graphs) {
                    let mut outer = Vec::new();
                    free_names(sg, &mut outer);
                    used.extend(outer);
                }
            }
        }
        used.extend(g.output.iter().map(|o| o.name()));
        let graph_inputs: HashSet<&str> = g.input.iter().map(|i| i.name()).collect();
        let dead = |name: &str| self.consumed.contains(name) && !used.contains(name) && !graph_inputs.contains(name);
        let nodes: Vec<NodeProto> = self
            .nodes
            .iter()
            .filter(|n| !(n.op_type() == "Constant" && n.output.len() == 1 && dead(&n.output[0])))
            .cloned()
            .collect();
        let mut initializer: Vec<TensorProto> = g.initializer.iter().filter(|t| !dead(t.name())).cloned().collect();
        initializer.extend(self.inits.iter().cloned());
        let value_info = g.value_info.iter().filter(|v| !self.retyped.contains(v.name())).cloned().collect();
        GraphProto { node: nodes, initializer, value_info, ..g.clone() }
    }
}

/// Names a subgraph reads from enclosing scopes (approximately: every input it does not define).
fn free_names<'a>(g: &'a GraphProto, out: &mut Vec<&'a str>) {
    let mut defined: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    defined.extend(g.input.iter().map(|v| v.name()));
    for n in &g.node {
        defined.extend(n.output.iter().map(String::as_str));
    }
    for n in &g.node {
        out.extend(n.input.iter().map(String::as_str).filter(|i| !defined.contains(i)));
        for a in &n.attribute {
            for sg in a.g.iter().chain(&a.graphs) {
                free_names(sg, out);
            }
        }
    }
}

/// `(x - zp) * scale` of a constant, per tensor or along the node's axis (ONNX
/// DequantizeLinear: the difference is taken in integers, converted to float, then scaled).
fn fold_dequantize(n: &NodeProto, x: &TensorProto, p: &QParams) -> Result<ArrayD<f32>> {
    let a = to_array(x).with_context(|| format!("{}: reading '{}'", describe(n), x.name()))?;
    // Straight from the stored integers (int8 weights: no i64 copy of the tensor).
    match &a {
        ArrayData::I8(v) => fold_ints(n, x, p, v),
        ArrayData::U8(v) => fold_ints(n, x, p, v),
        ArrayData::I32(v) => fold_ints(n, x, p, v),
        ArrayData::I64(v) => fold_ints(n, x, p, v),
        _ => bail!("{}: input '{}' is {}, not an integer tensor", describe(n), x.name(), dtype::name(x.data_type())),
    }
}

/// [`fold_dequantize`] of the integers `v`: `(q − zp)·s`, per axis when `p` is.
fn fold_ints<T: Copy + Into<i64>>(n: &NodeProto, x: &TensorProto, p: &QParams, v: &ArrayD<T>) -> Result<ArrayD<f32>> {
    if !p.per_axis {
        let (zp, s) = (p.zp[0], p.scale[0]);
        return Ok(v.mapv(|q| (q.into() - zp) as f32 * s));
    }
    let c = p.scale.len();
    let axis = norm_axis(p.axis, v.ndim()).with_context(|| {
        format!("{}: axis {} is out of range for '{}' of rank {}", describe(n), p.axis, x.name(), v.ndim())
    })?;
    if v.shape()[axis] != c {
        bail!("{}: '{}' has {} elements on axis {axis} but the scale has {c}", describe(n), x.name(), v.shape()[axis]);
    }
    // In memory order: element `i` is on channel `(i / inner) % c`, `inner` the size of the
    // dims after the axis (a weight's output channels last: the channel cycles along each row).
    let inner: usize = v.shape()[axis + 1..].iter().product();
    let v = v.as_standard_layout();
    let src = v.as_slice().context("internal error: integer tensor not contiguous")?;
    if src.is_empty() || c == 0 {
        return Ok(ArrayD::zeros(v.raw_dim()));
    }
    let mut out = Vec::with_capacity(src.len());
    if inner == 1 {
        for row in src.chunks(c) {
            out.extend(row.iter().zip(p.zp.iter().zip(&p.scale)).map(|(&q, (&zp, &s))| (q.into() - zp) as f32 * s));
        }
    } else {
        crate::quantize::params::for_each_channel_run(src, c, inner, |ch, run| {
            let (zp, s) = (p.zp[ch], p.scale[ch]);
            out.extend(run.iter().map(|&q| (q.into() - zp) as f32 * s));
        });
    }
    Ok(ArrayD::from_shape_vec(v.raw_dim(), out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{graph, model, tensor_info, value_info};
    use crate::onnx::tensor::{scalar_f32, scalar_i8, scalar_u8, vec_f32, vec_i32, vec_i8, vec_u8};
    use crate::runtime::{InputFact, Plan};
    use ndarray::Array2;

    fn run(m: &ModelProto, inputs: &[(&str, ArrayD<f32>)], outputs: &[&str]) -> Vec<ArrayData> {
        let bytes = crate::onnx::io::encode(m).unwrap();
        let facts: Vec<InputFact> = inputs
            .iter()
            .map(|(n, a)| InputFact { name: n.to_string(), elem_type: dtype::FLOAT, shape: a.shape().to_vec() })
            .collect();
        let outs: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
        let plan = Plan::load(&bytes, None, &facts, &outs).unwrap();
        let data: Vec<ArrayData> = inputs.iter().map(|(_, a)| ArrayData::F32(a.clone())).collect();
        plan.run(&data).unwrap()
    }

    fn f32s(a: &ArrayData) -> Vec<f32> {
        a.as_f32().expect("float output").iter().copied().collect()
    }

    /// ONNX QuantizeLinear then DequantizeLinear, written out in Rust.
    fn qdq_ref(x: f32, s: f32, zp: i64, lo: f32, hi: f32) -> f32 {
        let q = ((x / s).round_ties_even() + zp as f32).clamp(lo, hi);
        (q - zp as f32) * s
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * w.abs().max(1.0), "element {i}: got {g}, want {w}\n{got:?}\n{want:?}");
        }
    }

    fn validate(m: &ModelProto) {
        GraphView::new(m.graph.as_ref().unwrap()).validate().unwrap();
        assert!(!needs_twin(m));
    }

    /// x[2,8] → Q(u8, zp 10) → DQ → y, plus a second pair with an awkward scale on the same x.
    fn per_tensor_model(scale2: f32) -> ModelProto {
        let g = graph(
            "g",
            vec![
                node("QuantizeLinear", "q", &["x", "s", "zp"], &["x_quantized"], vec![]),
                node("DequantizeLinear", "dq", &["x_quantized", "s", "zp"], &["y"], vec![]),
                node("QuantizeLinear", "q2", &["x", "s2", "zp2"], &["x_q2"], vec![]),
                node("DequantizeLinear", "dq2", &["x_q2", "s2", "zp2"], &["y2"], vec![]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[2, 8])],
            vec![tensor_info("y", dtype::FLOAT, &[2, 8]), tensor_info("y2", dtype::FLOAT, &[2, 8])],
            vec![scalar_f32("s", 0.5), scalar_u8("zp", 10), scalar_f32("s2", scale2), scalar_i8("zp2", -3)],
        );
        model(g, 13)
    }

    #[test]
    fn per_tensor_ties_round_to_even_and_clip() {
        let m = twin(&per_tensor_model(0.1)).unwrap();
        validate(&m);
        // Each per-tensor Q → DQ pair is one fused node, in its own domain.
        let ops: Vec<(&str, &str)> = m.graph.as_ref().unwrap().node.iter().map(|n| (n.op_type(), n.domain())).collect();
        let fused = (crate::runtime::FAKE_QUANTIZE_OP, crate::runtime::FAKE_QUANTIZE_DOMAIN);
        assert_eq!(ops, [fused, fused]);
        assert!(m.opset_import.iter().any(|o| o.domain() == fused.1));
        let outs = m.graph.as_ref().unwrap().output.iter().map(|o| o.name().to_string()).collect::<Vec<_>>();
        assert_eq!(outs, ["y", "y2"]);
        // x/0.5: 2.5 → 2, 3.5 → 4, -2.5 → -2, -3.5 → -4, 0.5 → 0, 1.5 → 2; clipping at 0 and 255.
        let xs = [1.25, 1.75, -1.25, -1.75, 0.25, 0.75, 200.0, -10.0, -5.0, -5.25, 122.5, 122.75, 0.0, -0.1, 3.3, 7.0];
        let x = Array2::from_shape_vec((2, 8), xs.to_vec()).unwrap().into_dyn();
        let got = run(&m, &[("x", x)], &["y", "y2"]);
        let want: Vec<f32> = xs.iter().map(|&v| qdq_ref(v, 0.5, 10, 0.0, 255.0)).collect();
        assert_eq!(&f32s(&got[0])[..4], &[1.0, 2.0, -1.0, -2.0]);
        assert_eq!(f32s(&got[0])[6], 122.5); // (255 - 10) * 0.5
        assert_eq!(f32s(&got[0])[7], -5.0); // (0 - 10) * 0.5
        assert_close(&f32s(&got[0]), &want, 1e-6);
        let want2: Vec<f32> = xs.iter().map(|&v| qdq_ref(v, 0.1, -3, -128.0, 127.0)).collect();
        assert_close(&f32s(&got[1]), &want2, 1e-6);
    }

    /// Quotients close to .5 with a scale whose reciprocal is inexact: the twin must round the
    /// true f32 quotient, bit for bit.
    #[test]
    fn division_is_exact_for_awkward_scales() {
        for scale in [0.1f32, 0.0123, 0.3, 1.0 / 3.0, 0.017_453_292, 7.1e-3] {
            let m = twin(&per_tensor_model(scale)).unwrap();
            let mut xs = Vec::new();
            for k in -400i32..400 {
                let t = (k as f32 + 0.5) * scale;
                xs.extend([t, f32::from_bits(t.to_bits() + 1), f32::from_bits(t.to_bits().wrapping_sub(1))]);
            }
            xs.truncate(16 * 140);
            let n = xs.len() / 16;
            let x = Array2::from_shape_vec((1, n * 16), xs.clone()).unwrap().into_dyn();
            // The model declares [2, 8] but only the runtime facts matter.
            let x = x.into_shape_with_order(IxDyn(&[n * 2, 8])).unwrap();
            let got = run(&m, &[("x", x)], &["y2"]);
            let want: Vec<f32> = xs.iter().map(|&v| qdq_ref(v, scale, -3, -128.0, 127.0)).collect();
            let got = f32s(&got[0]);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "scale {scale}, x = {:e}: got {g}, want {w}", xs[i]);
            }
        }
    }

    struct WeightsCase {
        model: ModelProto,
        w: Vec<i8>,
        ws: Vec<f32>,
        bias: Vec<i32>,
        w2: Vec<i8>,
        w2s: Vec<f32>,
    }

    /// MatMul by an int8 weight dequantized per output column (axis 1), an int32 bias, then a
    /// second weight quantized per row (axis 0) of a [3, 2] matrix.
    fn weights_model() -> WeightsCase {
        let w: Vec<i8> = vec![-128, -5, 0, 7, 127, 3, 1, -1, 64, -64, 2, 100];
        let ws = vec![0.02f32, 0.5, 0.003];
        let bias = vec![1000i32, -2000, 7];
        let w2: Vec<i8> = vec![1, -2, 3, -4, 127, -128];
        let w2s = vec![0.25f32, 0.1, 0.05];
        let w_t = {
            let mut t = vec_i8("w_q", &w);
            t.dims = vec![4, 3];
            t
        };
        let w2_t = {
            let mut t = vec_i8("w2_q", &w2);
            t.dims = vec![3, 2];
            t
        };
        let bias_s: Vec<f32> = ws.iter().map(|s| s * 0.1).collect();
        let g = graph(
            "g",
            vec![
                node("DequantizeLinear", "dq_w", &["w_q", "w_s", "w_zp"], &["w"], vec![attr_int("axis", 1)]),
                node("DequantizeLinear", "dq_b", &["b_q", "b_s"], &["b"], vec![attr_int("axis", 0)]),
                node("DequantizeLinear", "dq_w2", &["w2_q", "w2_s", "w2_zp"], &["w2"], vec![attr_int("axis", -2)]),
                node("MatMul", "mm", &["x", "w"], &["h"], vec![]),
                node("Add", "bias", &["h", "b"], &["hb"], vec![]),
                node("MatMul", "mm2", &["hb", "w2"], &["y"], vec![]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[2, 4])],
            vec![tensor_info("y", dtype::FLOAT, &[2, 2])],
            vec![
                w_t,
                vec_f32("w_s", &ws),
                vec_i8("w_zp", &[0, 1, -2]),
                vec_i32("b_q", &bias),
                vec_f32("b_s", &bias_s),
                w2_t,
                vec_f32("w2_s", &w2s),
                vec_i8("w2_zp", &[0, 0, 1]),
            ],
        );
        WeightsCase { model: model(g, 13), w, ws, bias, w2, w2s }
    }

    #[test]
    fn per_axis_weights_and_int32_bias_fold() {
        let WeightsCase { model: m, w, ws, bias, w2, w2s } = weights_model();
        let t = twin(&m).unwrap();
        validate(&t);
        let g = t.graph.as_ref().unwrap();
        let v = GraphView::new(g);
        // Folded into initializers under the DQ output names; the int constants are gone.
        let wf: Vec<f32> = to_f32(v.initializer("w").unwrap()).unwrap().iter().copied().collect();
        let wzp = [0i64, 1, -2];
        let want_w: Vec<f32> = (0..12).map(|i| (w[i] as i64 - wzp[i % 3]) as f32 * ws[i % 3]).collect();
        assert_eq!(wf, want_w);
        let bf: Vec<f32> = to_f32(v.initializer("b").unwrap()).unwrap().iter().copied().collect();
        let want_b: Vec<f32> = (0..3).map(|i| bias[i] as f32 * (ws[i] * 0.1)).collect();
        assert_eq!(bf, want_b);
        let w2f: Vec<f32> = to_f32(v.initializer("w2").unwrap()).unwrap().iter().copied().collect();
        let w2zp = [0i64, 0, 1];
        let want_w2: Vec<f32> = (0..6).map(|i| (w2[i] as i64 - w2zp[i / 2]) as f32 * w2s[i / 2]).collect();
        assert_eq!(w2f, want_w2);
        for gone in ["w_q", "w_s", "w_zp", "b_q", "b_s", "w2_q"] {
            assert!(v.initializer(gone).is_none(), "{gone} should be dropped");
        }
        assert_eq!(g.node.len(), 3);

        let xs = [0.5f32, -1.0, 2.0, 0.25, 1.5, 0.0, -0.75, 3.0];
        let x = Array2::from_shape_vec((2, 4), xs.to_vec()).unwrap().into_dyn();
        let got = f32s(&run(&t, &[("x", x)], &["y"])[0]);
        let mut want = vec![0f32; 4];
        for r in 0..2 {
            let hb: Vec<f32> =
                (0..3).map(|c| (0..4).map(|k| xs[r * 4 + k] * want_w[k * 3 + c]).sum::<f32>() + want_b[c]).collect();
            for c in 0..2 {
                want[r * 2 + c] = (0..3).map(|k| hb[k] * want_w2[k * 2 + c]).sum();
            }
        }
        assert_close(&got, &want, 1e-6);
    }

    /// Runtime per-axis Q/DQ on axis 1 of a rank-3 activation, and on axis -1 without a rank.
    #[test]
    fn per_axis_activation_and_shared_q() {
        let scales = [0.5f32, 0.1, 0.03];
        let zps: [i8; 3] = [0, -3, 100];
        let mk = |x_dims: Option<&[Dim]>, axis: i64| {
            let g = graph(
                "g",
                vec![
                    node("QuantizeLinear", "q", &["x", "s", "zp"], &["xq"], vec![attr_int("axis", axis)]),
                    node("DequantizeLinear", "dq_a", &["xq", "s", "zp"], &["ya"], vec![attr_int("axis", axis)]),
                    node("DequantizeLinear", "dq_b", &["xq", "s", "zp"], &["yb"], vec![attr_int("axis", axis)]),
                    node("Relu", "relu", &["yb"], &["yr"], vec![]),
                ],
                vec![value_info("x", dtype::FLOAT, x_dims)],
                vec![value_info("ya", dtype::FLOAT, None), value_info("yr", dtype::FLOAT, None)],
                vec![vec_f32("s", &scales), vec_i8("zp", &zps)],
            );
            model(g, 13)
        };
        let dims = [Dim::Fixed(2), Dim::Fixed(3), Dim::Named("t".into())];
        let m = twin(&mk(Some(&dims), 1)).unwrap();
        validate(&m);
        let xs: Vec<f32> = (0..24).map(|i| (i as f32 - 11.0) * 0.37 + if i % 5 == 0 { 0.05 } else { 0.0 }).collect();
        let x = ArrayD::from_shape_vec(IxDyn(&[2, 3, 4]), xs.clone()).unwrap();
        let got = run(&m, &[("x", x.clone())], &["ya", "yr"]);
        let want: Vec<f32> =
            (0..24).map(|i| qdq_ref(xs[i], scales[(i / 4) % 3], zps[(i / 4) % 3] as i64, -128.0, 127.0)).collect();
        assert_close(&f32s(&got[0]), &want, 1e-6);
        let relu: Vec<f32> = want.iter().map(|v| v.max(0.0)).collect();
        assert_close(&f32s(&got[1]), &relu, 1e-6);

        // Axis -1 works without a declared rank; axis 1 does not, and the error names the node.
        let m = twin(&mk(None, -1)).unwrap();
        let x = ArrayD::from_shape_vec(IxDyn(&[8, 3]), xs.clone()).unwrap();
        let got = run(&m, &[("x", x)], &["ya"]);
        let want: Vec<f32> = (0..24).map(|i| qdq_ref(xs[i], scales[i % 3], zps[i % 3] as i64, -128.0, 127.0)).collect();
        assert_close(&f32s(&got[0]), &want, 1e-6);
        let err = format!("{:#}", twin(&mk(None, 1)).unwrap_err());
        assert!(err.contains("node 'q' (QuantizeLinear)") && err.contains("rank"), "{err}");
    }

    #[test]
    fn quantized_tensor_read_by_other_ops_is_an_error() {
        let g = graph(
            "g",
            vec![
                node("QuantizeLinear", "q", &["x", "s", "zp"], &["xq"], vec![]),
                node("DequantizeLinear", "dq", &["xq", "s", "zp"], &["y"], vec![]),
                node("Cast", "peek", &["xq"], &["z"], vec![attr_int("to", 1)]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[4])],
            vec![tensor_info("y", dtype::FLOAT, &[4]), tensor_info("z", dtype::FLOAT, &[4])],
            vec![scalar_f32("s", 0.5), scalar_u8("zp", 0)],
        );
        let err = format!("{:#}", twin(&model(g.clone(), 13)).unwrap_err());
        assert!(err.contains("'xq'") && err.contains("node 'peek' (Cast)"), "{err}");
        let err = format!("{:#}", twin(&model(g, 10)).unwrap_err());
        assert!(err.contains("opset 11"), "{err}");
    }

    /// A DQ of a runtime uint8 graph input; a model without quantization is returned as is.
    #[test]
    fn runtime_integer_input_and_plain_models() {
        let g = graph(
            "g",
            vec![node("DequantizeLinear", "dq", &["xq", "s", "zp"], &["y"], vec![])],
            vec![tensor_info("xq", dtype::UINT8, &[3])],
            vec![tensor_info("y", dtype::FLOAT, &[3])],
            vec![scalar_f32("s", 0.25), scalar_u8("zp", 128)],
        );
        let m = twin(&model(g, 13)).unwrap();
        validate(&m);
        let bytes = crate::onnx::io::encode(&m).unwrap();
        let facts = [InputFact { name: "xq".into(), elem_type: dtype::UINT8, shape: vec![3] }];
        let plan = Plan::load(&bytes, None, &facts, &["y".into()]).unwrap();
        let out = plan.run(&[ArrayData::U8(ndarray::arr1(&[0u8, 128, 255]).into_dyn())]).unwrap();
        assert_eq!(f32s(&out[0]), [-32.0, 0.0, 31.75]);

        let plain = crate::fixtures::all().remove(0).model;
        assert_eq!(twin(&plain).unwrap(), plain);
    }

    /// DynamicQuantizeLinear + MatMulInteger + Cast + Mul, the pattern of ONNX Runtime's
    /// dynamic quantization, against the formulas written out in Rust.
    #[test]
    fn dynamic_quantization_matmul_integer() {
        let w: Vec<u8> = vec![0, 255, 128, 3, 77, 200, 129, 127, 1, 90, 180, 64];
        let wzp = [128u8, 100, 127];
        let ws = 0.01f32;
        let w_t = {
            let mut t = vec_u8("w_q", &w);
            t.dims = vec![4, 3];
            t
        };
        let g = graph(
            "g",
            vec![
                node("DynamicQuantizeLinear", "dql", &["x"], &["xq", "xs", "xzp"], vec![]),
                node("MatMulInteger", "mmi", &["xq", "w_q", "xzp", "w_zp"], &["acc"], vec![]),
                node("Cast", "cast", &["acc"], &["accf"], vec![attr_int("to", 1)]),
                node("Mul", "scale_prod", &["xs", "w_s"], &["sp"], vec![]),
                node("Mul", "rescale", &["accf", "sp"], &["y"], vec![]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[2, 4])],
            vec![tensor_info("y", dtype::FLOAT, &[2, 3]), tensor_info("xs", dtype::FLOAT, &[])],
            vec![w_t, vec_u8("w_zp", &wzp), scalar_f32("w_s", ws)],
        );
        let m = twin(&model(g, 13)).unwrap();
        validate(&m);
        for xs in [
            vec![0.5f32, -1.0, 2.0, 0.25, 1.5, 0.0, -0.75, 3.0],
            vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
            vec![-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8],
        ] {
            let x = Array2::from_shape_vec((2, 4), xs.clone()).unwrap().into_dyn();
            let got = run(&m, &[("x", x)], &["y", "xs"]);
            let (mn, mx) = xs.iter().fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
            let scale = (mx - mn) / 255.0;
            let zp = (0.0 - mn / scale).clamp(0.0, 255.0).round_ties_even();
            let q: Vec<f32> = xs.iter().map(|&v| ((v / scale).round_ties_even() + zp).clamp(0.0, 255.0)).collect();
            let mut want = vec![0f32; 6];
            for r in 0..2 {
                for c in 0..3 {
                    let acc: i32 =
                        (0..4).map(|k| (q[r * 4 + k] as i32 - zp as i32) * (w[k * 3 + c] as i32 - wzp[c] as i32)).sum();
                    want[r * 3 + c] = acc as f32 * (scale * ws);
                }
            }
            assert_eq!(f32s(&got[1]), [scale]);
            assert_close(&f32s(&got[0]), &want, 1e-6);
        }
    }

    /// ConvInteger with padding (padding contributes `0 - zp`... i.e. nothing, as in the ONNX
    /// reference: the zero point is subtracted before padding) and a per-channel weight zero point.
    #[test]
    fn dynamic_quantization_conv_integer() {
        let (c, m_out, h, wd) = (2usize, 3usize, 3usize, 3usize);
        let w: Vec<i8> = (0..m_out * c * 4).map(|i| ((i as i32 * 37) % 201 - 100) as i8).collect();
        let wzp: [i8; 3] = [0, 5, -7];
        let mut w_t = vec_i8("w_q", &w);
        w_t.dims = vec![m_out as i64, c as i64, 2, 2];
        let conv_attrs = vec![
            crate::onnx::builder::attr_ints("kernel_shape", &[2, 2]),
            crate::onnx::builder::attr_ints("pads", &[1, 1, 1, 1]),
        ];
        let g = graph(
            "g",
            vec![
                node("DynamicQuantizeLinear", "dql", &["x"], &["xq", "xs", "xzp"], vec![]),
                node("ConvInteger", "convi", &["xq", "w_q", "xzp", "w_zp"], &["acc"], conv_attrs),
                node("Cast", "cast", &["acc"], &["y"], vec![attr_int("to", 1)]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[1, c as i64, h as i64, wd as i64])],
            vec![value_info("y", dtype::FLOAT, None)],
            vec![w_t, vec_i8("w_zp", &wzp)],
        );
        let m = twin(&model(g, 13)).unwrap();
        validate(&m);
        let xs: Vec<f32> = (0..c * h * wd).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.1).collect();
        let x = ArrayD::from_shape_vec(IxDyn(&[1, c, h, wd]), xs.clone()).unwrap();
        let got = run(&m, &[("x", x)], &["y"]);
        let got_a = got[0].as_f32().unwrap();
        assert_eq!(got_a.shape(), &[1, m_out, h + 1, wd + 1]);
        let (mn, mx) = xs.iter().fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        let scale = (mx - mn) / 255.0;
        let zp = (0.0 - mn / scale).clamp(0.0, 255.0).round_ties_even();
        let q: Vec<i32> =
            xs.iter().map(|&v| (((v / scale).round_ties_even() + zp).clamp(0.0, 255.0)) as i32 - zp as i32).collect();
        for o in 0..m_out {
            for oy in 0..h + 1 {
                for ox in 0..wd + 1 {
                    let mut acc = 0i32;
                    for ci in 0..c {
                        for ky in 0..2 {
                            for kx in 0..2 {
                                let (iy, ix) = (oy as i64 + ky as i64 - 1, ox as i64 + kx as i64 - 1);
                                if iy < 0 || ix < 0 || iy >= h as i64 || ix >= wd as i64 {
                                    continue;
                                }
                                let xv = q[ci * h * wd + iy as usize * wd + ix as usize];
                                let wv = w[((o * c + ci) * 2 + ky) * 2 + kx] as i32 - wzp[o] as i32;
                                acc += xv * wv;
                            }
                        }
                    }
                    assert_eq!(got_a[[0, o, oy, ox]], acc as f32, "channel {o} at ({oy}, {ox})");
                }
            }
        }
    }
}
