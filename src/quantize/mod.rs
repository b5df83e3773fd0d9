//! Static int8 QDQ quantization: decides where QuantizeLinear/DequantizeLinear go
//! (placement) and rewrites the graph (insertion), following ONNX Runtime's QDQ conventions
//! so its graph optimizer fuses the result into int8 kernels.
//!
//! Placement is marking first, inserting later:
//! 1. every selected node marks what it wants quantized: activation inputs/outputs, its
//!    constant weight (int8, symmetric, per channel by default) and its bias (int32 with
//!    scale = input scale × weight scale);
//! 2. data-movement ops (Reshape, Transpose, ...) whose input is quantized quantize their
//!    output with the same parameters, so ONNX Runtime can drop the pair and stay in int8;
//! 3. a Relu whose input comes from a quantized compute node is removed when its output is
//!    quantized as uint8 with zero point 0 (QuantizeLinear then clamps exactly like Relu);
//! 4. tensors whose range is dominated by sentinel values (attention masks of −1e4 … −3.4e38)
//!    and tensors the user keeps float are never quantized with that range, and the report
//!    says so. Under the cnn preset, `Add(scores, mask)` read only by Softmax is quantized
//!    anyway without that range: the sum on the scores' grid (a masked score saturates at its
//!    lowest level), the mask over `[−2·(hi − lo), 0]` of the scores' calibrated range (0
//!    exact; the sentinel clips to the lowest level, which pushes any score below `lo`), so
//!    ONNX Runtime fuses QLinearAdd and QLinearSoftmax;
//! 5. the constant operand of a quantized Add/Mul is quantized like an activation (per
//!    tensor over its min/max, ONNX Runtime's way), so ONNX Runtime fuses QLinearAdd/QLinearMul
//!    (e.g. the separate bias Add of a ConvTranspose or MatMul); a one-element constant is
//!    quantized with scale |v| and value ±1 (exact), and chains move on one grid instead
//!    of rounding twice: `y = x·c` (c > 0) takes `scale(x)·c` and x's zero point, an Erf/Tanh
//!    output takes the fixed uint8 grid scale 1/127, zero point 127, on which `y = x + 1`
//!    only moves the zero point (the decomposed Gelu `x·0.5·(1+erf(x/√2))` then rounds the
//!    Erf output and the product, nothing else). When `c` is a power of two and the Mul is
//!    x's only reader, the grid goes the other way, the same grid since binning commutes
//!    with such a scaling ([`crate::stats`]): x takes `scale(y)/c` and y's zero point, so the
//!    range read is y's (the Gelu's output, the next layer's input), not the product's;
//! 6. a calibrated range is cut to its readers' saturation window ([`saturation_window`]:
//!    HardSigmoid, Clip, a Sigmoid or Erf with a fixed output grid, seen through data
//!    movement and `x·c`, and a decomposed Gelu, whose `1 + erf(x/√2)` is exactly 0 on the
//!    Erf's grid below x ≈ −2.9) plus one step each side when every reader saturates there:
//!    the levels go where the readers can tell values apart (PP-OCR det: HardSigmoid and
//!    Sigmoid +0.08 dB in ONNX Runtime, +0.33 dB in the fake-quant twin; the 13 Gelu inputs,
//!    calibrated down to −7.4, +0.21 dB more);
//! 7. graph outputs stay float, except a final Sigmoid's (QLinearSigmoid), which gets a
//!    DequantizeLinear that carries the output's name, on the fixed grid of [0, 1] (scale 1/255).
//!
//! Calibration measures only what the placement reads ([`range_needs`], the placement run
//! without statistics): the activations taking their own range ([`ParamSource::Range`]) and
//! those whose range decides whether something is quantized (sentinel tests of an attention
//! mask's operands, residual-stream groups). Fixed and derived activations, and the input of
//! a Relu that folds (the Relu output's range is read), need no statistics, so they are not
//! pinned as tract outputs, which lets tract fuse them away (its GeluExact, Conv + Relu).
//! Their parameters do not depend on a range: a derived tensor is quantized when its source
//! is, whatever its own values (so `y = x·c` with c > 1 may be quantized past
//! [`SENTINEL`] on x's grid).
//!
//! Presets choose what is marked. `cnn` marks every op ONNX Runtime has an int8 kernel for.
//! `transformer` marks only the inputs and weights of Conv/MatMul/Gemm, and nodes outside
//! the selection read the exact float values. `transformer-fused` (what `auto` picks for a
//! graph with LayerNorm or attention) marks like `cnn`, except in the residual stream
//! ([`residual_stream`]: the tensors LayerNorm normalizes and the branch outputs added into
//! them). There, a group stays float when one of its tensors would keep less than
//! [`STREAM_MIN_SQNR_DB`] from its int8 step alone ([`step_sqnr_db`]), and a float residual
//! sum reads the exact LayerNorm output. ONNX Runtime then fuses the attention and FFN
//! internals while the massive activations of the stream stay float.
//!
//! Insertion: one QuantizeLinear per quantized tensor, right after its producer, and one
//! DequantizeLinear per consuming node (ONNX Runtime fuses a DQ only when it has a single
//! consumer). A quantized tensor `T` keeps its name for the float value its producer
//! computes; the pair's outputs are `T_quantized` and `T_dequantized` (then `_1`, `_2`, ...).
//! Weights become `W_quantized` int8 initializers read by `W_dequantized`, biases
//! `B_quantized` int32.

pub mod bias_correction;
pub mod dynamic;
pub mod equalize;
pub mod gptq;
pub mod input_grid;
pub mod opset;
pub mod params;
pub mod prepare;

use crate::array::dtype;
use crate::calibrate::TensorEntry;
use crate::onnx::attr::NodeAttrs;
use crate::onnx::builder::{attr_int, node};
use crate::onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};
use crate::onnx::tensor::{
    from_i32, from_i8, from_u8, scalar_f32, scalar_i8, scalar_u8, to_f32, vec_f32, vec_i32, vec_i8,
};
use crate::onnx::{describe, GraphView, NameAlloc};
use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use params::{quantize_bias, quantize_weight, ActParams, ActType};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

/// Values at or beyond this magnitude are treated as sentinels (masks), not data.
pub const SENTINEL: f64 = 1e4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    Auto,
    Cnn,
    Transformer,
    TransformerFused,
}

impl Preset {
    /// ONNX Runtime's placement (every op with an int8 kernel), possibly minus the residual
    /// stream: cnn and transformer-fused.
    fn fuses(self) -> bool {
        matches!(self, Preset::Cnn | Preset::TransformerFused | Preset::Auto)
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preset::Auto => "auto",
            Preset::Cnn => "cnn",
            Preset::Transformer => "transformer",
            Preset::TransformerFused => "transformer-fused",
        })
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Preset::Auto),
            "cnn" => Ok(Preset::Cnn),
            "transformer" => Ok(Preset::Transformer),
            "transformer-fused" => Ok(Preset::TransformerFused),
            _ => Err(format!("unknown preset '{s}' (expected auto, cnn, transformer or transformer-fused)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuantOptions {
    pub preset: Preset,
    pub per_channel: bool,
    pub activations: ActType,
    /// Only these op types (None: the preset's).
    pub op_types: Option<Vec<String>>,
    pub exclude_op_types: Vec<String>,
    /// Node names or glob patterns (`*`, `?`).
    pub exclude: Vec<String>,
    /// Int8 weights, float activations.
    pub weights_only: bool,
    /// Activation tensors to leave in float.
    pub keep_float: BTreeSet<String>,
    /// Name of the range method, for the report.
    pub method: String,
    /// Layer Hessians for GPTQ weight rounding ([`gptq`]); nearest rounding without.
    pub hessians: Option<std::sync::Arc<gptq::Hessians>>,
    /// Rescale activations between two convolutions per channel before quantizing
    /// ([`equalize`]); calibration then keeps those tensors' per-channel statistics.
    pub equalize: bool,
}

impl Default for QuantOptions {
    fn default() -> Self {
        QuantOptions {
            preset: Preset::Auto,
            per_channel: true,
            activations: ActType::U8,
            op_types: None,
            exclude_op_types: Vec::new(),
            exclude: Vec::new(),
            weights_only: false,
            keep_float: BTreeSet::new(),
            method: "minmax".into(),
            hessians: None,
            equalize: false,
        }
    }
}

const COMPUTE_OPS: &[&str] = &["Conv", "ConvTranspose", "MatMul", "Gemm"];
const BINARY_OPS: &[&str] = &["Add", "Mul"];
const UNARY_OPS: &[&str] = &["MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Softmax", "Sigmoid", "Concat"];
/// Ops that move int8 values unchanged: their output shares the input's parameters.
pub const MOVE_OPS: &[&str] =
    &["Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Expand", "Tile"];

fn preset_ops(p: Preset) -> Vec<&'static str> {
    match p {
        Preset::Cnn | Preset::Auto | Preset::TransformerFused => {
            let mut v: Vec<&str> = COMPUTE_OPS.to_vec();
            v.extend(BINARY_OPS);
            v.extend(UNARY_OPS);
            v.extend(MOVE_OPS);
            v.push("Relu");
            v
        }
        Preset::Transformer => COMPUTE_OPS.to_vec(),
    }
}

/// The residual stream of a transformer, in groups that stay float together: each tensor a
/// LayerNorm normalizes (`LayerNormalization`'s input, or the `x` of a decomposed
/// `x − ReduceMean(x)`) alone, and for a residual sum `Add(a, b)` among them, each operand
/// that is not itself a LayerNorm output together with the activation operand of that
/// operand's bias Add (the MatMul output). An `Add` of two activations one of which is
/// already in the stream is a residual sum too (pre-LN blocks, whose last sum is a graph
/// output rather than a LayerNorm input). Also returns the (sum node, LayerNorm output)
/// reads: a residual sum that stays float reads the exact LayerNorm output, not its DQ.
pub fn residual_stream(view: &GraphView, decomposed: &BTreeSet<usize>) -> ResidualStream {
    let nodes = view.nodes();
    let ln_output = |t: &str| {
        view.producer_index(t).is_some_and(|p| nodes[p].op_type() == "LayerNormalization" || decomposed.contains(&p))
    };
    let mut rs = ResidualStream::default();
    let add_group = |rs: &mut ResidualStream, members: Vec<String>| {
        let members: Vec<String> = members.into_iter().filter(|t| !rs.group_of.contains_key(t)).collect();
        if !members.is_empty() {
            let g = rs.groups.len();
            rs.group_of.extend(members.iter().map(|t| (t.clone(), g)));
            rs.groups.push(members);
        }
    };
    let mut sums: Vec<usize> = Vec::new();
    for n in nodes {
        let Some(x) = normalized(view, n) else { continue };
        add_group(&mut rs, vec![x.clone()]);
        sums.extend(view.producer_index(x).filter(|&p| nodes[p].op_type() == "Add"));
    }
    let is_sum =
        |n: &NodeProto| n.op_type() == "Add" && n.input.len() == 2 && n.input.iter().all(|t| view.weight(t).is_none());
    // Sums reached from the stream, until none is new (each Add joins at most once).
    loop {
        let more: Vec<usize> = (0..nodes.len())
            .filter(|&i| !sums.contains(&i) && is_sum(&nodes[i]))
            .filter(|&i| nodes[i].input.iter().any(|t| rs.group_of.contains_key(t)))
            .collect();
        if more.is_empty() {
            break;
        }
        for &i in &more {
            add_group(&mut rs, nodes[i].output.clone());
        }
        sums.extend(more);
    }
    for &si in &sums {
        let sum = &nodes[si];
        for operand in sum.input.iter().filter(|t| view.weight(t).is_none()) {
            if ln_output(operand) {
                rs.exact_reads.insert((si, operand.clone()));
                continue;
            }
            let mut group = vec![operand.clone()];
            let bias_add = view.producer(operand).filter(|p| p.op_type() == "Add" && p.input.len() == 2);
            if let Some(add) = bias_add.filter(|a| a.input.iter().any(|t| view.weight(t).is_some())) {
                group.extend(add.input.iter().filter(|t| view.weight(t).is_none()).cloned());
            }
            add_group(&mut rs, group);
        }
    }
    rs
}

/// The tensor a LayerNorm normalizes: a `LayerNormalization`'s input, or the `x` of a
/// `ReduceMean(x)` that a `Sub(x, ·)` reads (the decomposed form).
fn normalized<'a>(view: &GraphView, n: &'a NodeProto) -> Option<&'a String> {
    let x = n.input.first()?;
    match n.op_type() {
        "LayerNormalization" => Some(x),
        "ReduceMean" => (!mean_subtractions(view, n).is_empty()).then_some(x),
        _ => None,
    }
}

/// The `Sub(x, ·)` nodes reading `ReduceMean(x)`'s output (`n` is the ReduceMean).
fn mean_subtractions(view: &GraphView, n: &NodeProto) -> Vec<usize> {
    let nodes = view.nodes();
    let (Some(x), Some(o)) = (n.input.first(), n.output.first()) else { return Vec::new() };
    view.consumers(o)
        .iter()
        .map(|&(c, _)| c)
        .filter(|&c| nodes[c].op_type() == "Sub" && nodes[c].input.first() == Some(x))
        .collect()
}

/// A residual-stream group stays float (transformer-fused preset) when one of its tensors
/// would keep less than this SQNR from the int8 step alone ([`step_sqnr_db`]). On the bench
/// MiniLM-L6 the residual sums after the FFN and the FFN outputs of its last layers fall
/// below (15–23 dB), the attention sums and outputs stay above (≥ 28 dB): quantizing the
/// groups under 25 dB took the last hidden state from 13.9 to 10.0 dB in ONNX Runtime.
pub const STREAM_MIN_SQNR_DB: f64 = 25.0;

/// The SQNR a tensor keeps from its quantization step alone: `10·log10(E[x²] / (s²/12))`,
/// with `s` the scale the quantizer derives from the calibrated range (`E[x²] = std² +
/// mean²`; clipping is ignored). `+∞` for a tensor that is all zeros.
pub fn step_sqnr_db(r: &TensorEntry, ty: ActType) -> f64 {
    let [lo, hi] = match ty {
        ActType::U8 => r.range,
        ActType::S8 => r.range_symmetric,
    };
    let s = ActParams::from_range(lo, hi, ty).scale as f64;
    let power = r.std * r.std + r.mean * r.mean;
    if power.is_nan() || power <= 0.0 {
        return f64::INFINITY;
    }
    10.0 * (power / (s * s / 12.0)).log10()
}

/// See [`residual_stream`].
#[derive(Debug, Clone, Default)]
pub struct ResidualStream {
    pub groups: Vec<Vec<String>>,
    pub group_of: BTreeMap<String, usize>,
    pub exact_reads: BTreeSet<(usize, String)>,
}

/// `auto`: transformer-fused when the graph has LayerNormalization (or its decomposition:
/// ReduceMean feeding Sub) or attention (Softmax between two activation MatMuls), else cnn.
pub fn detect_preset(view: &GraphView) -> Preset {
    let nodes = view.nodes();
    let has_ln = nodes.iter().any(|n| {
        n.op_type() == "LayerNormalization"
            || (n.op_type() == "ReduceMean"
                && n.output.iter().any(|o| view.consumers(o).iter().any(|&(c, _)| nodes[c].op_type() == "Sub")))
    });
    let act_matmul = nodes
        .iter()
        .any(|n| n.op_type() == "MatMul" && n.input.len() == 2 && n.input.iter().all(|i| view.weight(i).is_none()));
    let softmax = nodes.iter().any(|n| n.op_type() == "Softmax");
    if has_ln || (act_matmul && softmax) {
        Preset::TransformerFused
    } else {
        Preset::Cnn
    }
}

/// Nodes that belong to a decomposed Gelu (`x·0.5·(1+erf(x/√2))`: the scaling `Div`/`Mul`
/// and the `Erf`) or LayerNorm (`ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div` then the
/// affine `Mul`, `Add`): their values are precision-sensitive and they have no int8 kernels,
/// so they stay float. The Gelu's tail (`+1`, `·x`, `·0.5`) is not listed: ONNX Runtime runs
/// it as QLinearAdd/QLinearMul, and the placement quantizes it so that only the Erf output
/// and the product get rounded (see [`plan`]).
pub fn decomposition_nodes(view: &GraphView) -> BTreeSet<usize> {
    let nodes = view.nodes();
    let mut out = BTreeSet::new();
    let sole_consumer = |i: usize, ops: &[&str]| -> Option<usize> {
        let o = nodes[i].output.first()?;
        match view.consumers(o) {
            [(c, _)] if ops.contains(&nodes[*c].op_type()) => Some(*c),
            _ => None,
        }
    };
    let with_constant = |i: usize| nodes[i].input.iter().any(|x| view.weight(x).is_some());
    for (i, n) in nodes.iter().enumerate() {
        match n.op_type() {
            "Erf" => {
                out.insert(i);
                if let Some(p) = n.input.first().and_then(|x| view.producer_index(x)) {
                    if matches!(nodes[p].op_type(), "Div" | "Mul") && with_constant(p) {
                        out.insert(p);
                    }
                }
            }
            "ReduceMean" => {
                for c in mean_subtractions(view, n) {
                    let sub = &nodes[c];
                    out.insert(i);
                    out.insert(c);
                    let Some(sub_out) = sub.output.first() else { continue };
                    for &(d, _) in view.consumers(sub_out) {
                        match nodes[d].op_type() {
                            "Pow" | "Mul" => {
                                out.insert(d);
                                let mut cur = d;
                                for op in [["ReduceMean"], ["Add"], ["Sqrt"]] {
                                    match sole_consumer(cur, &op) {
                                        Some(e) => {
                                            out.insert(e);
                                            cur = e;
                                        }
                                        None => break,
                                    }
                                }
                            }
                            "Div" => {
                                out.insert(d);
                                if let Some(m) = sole_consumer(d, &["Mul"]).filter(|&m| with_constant(m)) {
                                    out.insert(m);
                                    if let Some(a) = sole_consumer(m, &["Add"]).filter(|&a| with_constant(a)) {
                                        out.insert(a);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Minimal glob: `*` any run, `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

// ---------------------------------------------------------------- report

#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    /// activation, weight, bias
    pub kind: &'static str,
    pub dtype: &'static str,
    /// One scale per channel for per-channel tensors.
    pub scale: Vec<f32>,
    pub zero_point: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub axis: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<[f32; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Node or tensor name.
    pub name: String,
    pub op_type: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub nodes: usize,
    pub nodes_quantized: usize,
    pub activations_quantized: usize,
    pub weights_quantized: usize,
    pub biases_quantized: usize,
    pub relu_removed: usize,
    pub weight_bytes_before: u64,
    pub weight_bytes_after: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub preset: Preset,
    pub per_channel: bool,
    pub activations: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub tensors: Vec<TensorReport>,
    pub skipped: Vec<Skipped>,
    pub totals: Totals,
}

// ---------------------------------------------------------------- marking

/// How an activation tensor gets its parameters.
#[derive(Debug, Clone)]
enum ActSource {
    Own,
    /// Same params as another quantized tensor (data movement).
    SameAs(String),
    /// Relu output folded into its producer's Q: the Q reads `input`.
    FoldedRelu {
        input: String,
    },
    /// The input of a Relu expected to fold into its producer's Q: replaced by the Relu
    /// output's, so no range of its own is read; when the Relu does not fold after all, it
    /// takes its own range (see [`plan`]).
    BeforeRelu,
    /// Parameters fixed by the op's value range, not by calibration.
    Fixed(ActParams),
    /// `scale = scale(of)·factor`, `zero point = zero_point(of) − shift`: the output of a Mul
    /// by a positive constant or an Add of a constant that is a whole number of steps lies on
    /// the input's grid moved along, so ONNX Runtime's QLinearMul/QLinearAdd reproduce it
    /// without a second rounding.
    Derived {
        of: String,
        factor: f32,
        shift: i32,
    },
}

impl ActSource {
    /// Whether the placement reads this tensor's own range (see [`Ctx::act_blocker`]).
    fn reads_range(&self) -> bool {
        matches!(self, ActSource::Own | ActSource::FoldedRelu { .. })
    }

    fn param_source(&self) -> ParamSource {
        match self {
            ActSource::Own | ActSource::FoldedRelu { .. } | ActSource::BeforeRelu => ParamSource::Range,
            ActSource::Fixed(_) => ParamSource::Fixed,
            ActSource::SameAs(of) | ActSource::Derived { of, .. } => ParamSource::DerivedFrom(of.clone()),
        }
    }
}

/// Where a quantized activation's scale and zero point come from, so whether calibration has
/// to measure it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamSource {
    /// Its own calibrated range.
    Range,
    /// The op's value range (an Erf/Tanh output, a final Sigmoid, an attention mask).
    Fixed,
    /// Another quantized tensor's parameters, the same or moved along exactly (a data
    /// movement, `y = x·c`, `y = x + k·step`; module docs, point 5).
    DerivedFrom(String),
}

/// uint8 parameters of a tensor in [-1, 1] (Erf, Tanh) on which adding ±1 moves the zero
/// point by a whole 127 steps: scale 1/127, zero point 127 (range [-1, 128/127]).
const UNIT_U8: ActParams = ActParams { scale: 1.0 / 127.0, zero_point: 127, ty: ActType::U8 };

/// The single value of a one-element float constant.
fn scalar_value(t: &TensorProto) -> Option<f32> {
    if crate::dump::element_count(t) != 1 {
        return None;
    }
    const_values(t)?.first().copied()
}

/// The value of `name` when it is a one-element constant greater than 0 (a scaling `x·c`
/// that keeps x's grid, moved along).
fn positive_scalar(view: &GraphView, name: &str) -> Option<f32> {
    view.weight(name).and_then(scalar_value).filter(|&c| c > 0.0)
}

/// The values of a float constant when all are finite.
fn const_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type() != dtype::FLOAT {
        return None;
    }
    let v: Vec<f32> = to_f32(t).ok()?.iter().copied().collect();
    v.iter().all(|x| x.is_finite()).then_some(v)
}

struct Plan {
    /// Activation tensors to quantize, in insertion order.
    acts: Vec<(String, ActSource)>,
    act_set: HashSet<String>,
    /// (node index, input slot) → weight axis (None: per tensor) for weights to quantize.
    weights: BTreeMap<(usize, usize), Option<usize>>,
    /// (node index, input slot) of biases to quantize as int32.
    biases: BTreeSet<(usize, usize)>,
    /// (node index, input slot) of one-element constant operands of Add/Mul, quantized
    /// exactly (one uint8/int8 step equals the value) so ONNX Runtime fuses the op.
    consts: BTreeSet<(usize, usize)>,
    /// Relu nodes removed (index).
    removed: BTreeSet<usize>,
    selected: BTreeSet<usize>,
    skipped: Vec<Skipped>,
    /// Which nodes outside the selection read a quantized tensor's float value instead of
    /// its DQ.
    float_readers: FloatReaders,
}

/// Nodes outside the selection that read the float value of a quantized tensor.
#[derive(Debug, Clone)]
enum FloatReaders {
    /// None: every reader goes through a DQ, ONNX Runtime's way, which lets the producer fuse
    /// with its Q.
    Never,
    /// All of them (transformer preset: the residual stream reads the exact LayerNorm output).
    All,
    /// These (node, tensor) reads: a residual sum reads the exact LayerNorm output.
    Only(BTreeSet<(usize, String)>),
}

fn weight_axis(n: &NodeProto, slot: usize, rank: usize) -> Result<Option<usize>> {
    Ok(match (n.op_type(), slot) {
        ("Conv", 1) => Some(0),
        ("ConvTranspose", 1) => Some(1),
        ("MatMul", 1) if rank >= 2 => Some(rank - 1),
        ("Gemm", 1) => Some(if n.attr_int_or("transB", 0)? != 0 { 0 } else { 1 }),
        _ => None,
    }
    // A malformed weight of too low a rank gets one scale rather than an out-of-range axis.
    .filter(|&axis| axis < rank))
}

struct Ctx<'a> {
    view: &'a GraphView<'a>,
    ranges: &'a BTreeMap<String, TensorEntry>,
    opts: &'a QuantOptions,
    /// Placement without statistics: every float tensor counts as having a usable range,
    /// and the names asked about are recorded here.
    assume_ranges: Option<std::cell::RefCell<Asked>>,
}

/// The tensors a placement without statistics asked about (see [`Ctx::assume_ranges`]).
#[derive(Default)]
struct Asked {
    /// Every activation considered for quantization.
    tensors: BTreeSet<String>,
    /// Those whose range would be read.
    ranges: BTreeSet<String>,
}

impl Asked {
    /// Records that `name` was considered, and whether its range would be read.
    fn note(&mut self, name: &str, reads_range: bool) {
        self.tensors.insert(name.to_string());
        if reads_range {
            self.ranges.insert(name.to_string());
        }
    }
}

impl Ctx<'_> {
    /// The calibrated range of `name` (without statistics: None, and the read is recorded).
    fn range(&self, name: &str) -> Option<&TensorEntry> {
        if let Some(asked) = &self.assume_ranges {
            asked.borrow_mut().note(name, true);
            return None;
        }
        self.ranges.get(name)
    }

    /// Why an activation tensor cannot be quantized, or None when it can. `own_range`: its
    /// parameters come from its own calibrated range, which must then exist and not be
    /// dominated by sentinels; fixed or derived parameters ([`ParamSource`]) read no range.
    fn act_blocker(&self, name: &str, own_range: bool) -> Option<String> {
        if self.opts.keep_float.contains(name) {
            return Some("kept float (--keep-float)".into());
        }
        let et = self.view.elem_type(name);
        if et != 0 && et != dtype::FLOAT {
            return Some(format!("element type {} is not float", dtype::name(et)));
        }
        if let Some(asked) = &self.assume_ranges {
            asked.borrow_mut().note(name, own_range);
            return None;
        }
        if !own_range {
            return None;
        }
        let Some(r) = self.ranges.get(name) else {
            return Some("no calibration range".into());
        };
        if r.abs_max >= SENTINEL || !r.abs_max.is_finite() {
            return Some(format!(
                "range dominated by sentinel values (abs max {:.3e}, p99.9 {:.3e}): left in float",
                r.abs_max, r.p99_9
            ));
        }
        None
    }
}

/// For `Add(scores, mask)` whose output only Softmax reads, where the mask's calibrated values
/// are sentinels (|v| ≥ [`SENTINEL`]) and the scores' are not: (scores, mask, the mask's
/// parameters over `[−2·(hi − lo), 0]` of the scores' calibrated range: 0 exact, the sentinel
/// clipped to the lowest level, which pushes any score below `lo`).
fn masked_scores(ctx: &Ctx, n: &NodeProto) -> Option<(String, String, ActParams)> {
    let view = ctx.view;
    let [a, b] = n.input.as_slice() else { return None };
    let out = n.output.first()?;
    let readers = view.consumers(out);
    if readers.is_empty()
        || view.is_graph_output(out)
        || !readers.iter().all(|&(c, _)| view.nodes()[c].op_type() == "Softmax")
        || view.weight(a).is_some()
        || view.weight(b).is_some()
    {
        return None;
    }
    let sentinel = |t: &str| ctx.range(t).is_some_and(|r| r.abs_max >= SENTINEL && r.min.is_finite());
    let (x, m) = match (sentinel(a), sentinel(b)) {
        (false, true) => (a, b),
        (true, false) => (b, a),
        _ => return None,
    };
    if ctx.act_blocker(x, true).is_some() || ctx.opts.keep_float.contains(m) || ctx.opts.keep_float.contains(out) {
        return None;
    }
    // The mask's lowest level only has to push any score below the scores' range: twice
    // their span (a scale ratio of the sentinel's own, ~1e36, overflows ONNX Runtime's
    // QLinearAdd).
    let [lo, hi] = ctx.range(x)?.range;
    let low = -2.0 * (hi - lo);
    // A finite, negative low end gives a finite, positive scale (from_range falls back to
    // scale 1 otherwise, which would drop the mask).
    (low.is_finite() && low < 0.0)
        .then(|| (x.clone(), m.clone(), ActParams::from_range(low, 0.0, ctx.opts.activations)))
}

/// `x → (Mul node, y, c)` for each `y = Mul(x, c)` with `c` a positive power of two (a
/// one-element constant) that is the only reader of the activation `x` (neither a graph
/// input nor output), `y` being no graph output and outside the residual stream `rs`. Such
/// an x, when it would take its own range, takes y's grid scaled by `1/c` instead of y taking
/// x's scaled by `c`: the same grid either way (binning commutes with a power-of-two
/// scaling, see [`crate::stats`]), but y's range is what the next layer reads anyway, so x
/// (the decomposed Gelu's product `x·(1+erf(x/√2))` before its `·0.5`) needs no statistics.
fn power_of_two_scalings(view: &GraphView, rs: &ResidualStream) -> BTreeMap<String, (usize, String, f32)> {
    let power_of_two = |c: f32| c > 0.0 && c.is_normal() && c.to_bits() & 0x007f_ffff == 0 && (1.0 / c).is_normal();
    let mut out = BTreeMap::new();
    for (i, n) in view.nodes().iter().enumerate() {
        let ([a, b], [y]) = (n.input.as_slice(), n.output.as_slice()) else { continue };
        if n.op_type() != "Mul" || view.is_graph_output(y) || rs.group_of.contains_key(y) {
            continue;
        }
        let c_of = |t: &str| view.weight(t).and_then(scalar_value).filter(|&c| power_of_two(c));
        let (x, c) = match (c_of(a), c_of(b)) {
            (None, Some(c)) if view.weight(a).is_none() => (a, c),
            (Some(c), None) if view.weight(b).is_none() => (b, c),
            _ => continue,
        };
        if view.consumers(x).len() == 1 && !view.is_graph_output(x) && !view.is_graph_input(x) {
            out.insert(x.clone(), (i, y.clone(), c));
        }
    }
    out
}

fn plan(ctx: &Ctx, preset: Preset, order: &[usize]) -> Result<Plan> {
    let view = ctx.view;
    let opts = ctx.opts;
    let nodes = view.nodes();
    let cnn_like = preset.fuses();
    let ops: Vec<&str> = match &opts.op_types {
        Some(list) => list.iter().map(|s| s.as_str()).collect(),
        None if opts.weights_only => COMPUTE_OPS.to_vec(),
        None => preset_ops(preset),
    };
    let mut p = Plan {
        acts: Vec::new(),
        act_set: HashSet::new(),
        weights: BTreeMap::new(),
        biases: BTreeSet::new(),
        consts: BTreeSet::new(),
        removed: BTreeSet::new(),
        selected: BTreeSet::new(),
        skipped: Vec::new(),
        float_readers: FloatReaders::Never,
    };
    let decomposed = decomposition_nodes(view);
    let rs = if preset == Preset::TransformerFused { residual_stream(view, &decomposed) } else { Default::default() };
    // Why a residual-stream tensor stays float: a member of its group would be rounded too
    // coarsely. Placement without statistics assumes every group is quantized.
    let float_group = |name: &str| -> Option<String> {
        let members = &rs.groups[*rs.group_of.get(name)?];
        if let Some(asked) = &ctx.assume_ranges {
            let mut asked = asked.borrow_mut();
            members.iter().for_each(|t| asked.note(t, true));
            return None;
        }
        let (t, db) = members
            .iter()
            .filter_map(|t| ctx.ranges.get(t).map(|r| (t, step_sqnr_db(r, opts.activations))))
            .find(|&(_, db)| db < STREAM_MIN_SQNR_DB)?;
        Some(format!(
            "residual stream: the int8 step of '{t}' leaves {db:.1} dB SQNR (< {STREAM_MIN_SQNR_DB} dB): kept float"
        ))
    };
    p.float_readers = match preset {
        Preset::TransformerFused => FloatReaders::Only(rs.exact_reads.clone()),
        Preset::Transformer => FloatReaders::All,
        _ => FloatReaders::Never,
    };
    let mut blocked: BTreeMap<String, String> = BTreeMap::new();
    let rescaled = power_of_two_scalings(view, &rs);
    // The only input of a Relu → the Relu, for Relus that fold into their producer's Q (module
    // docs, point 3) when that producer is quantized. Only a plain one-in, one-out Relu: removing a node
    // with extra outputs would leave them unproduced.
    let relu_folds: BTreeMap<String, usize> = match opts.activations {
        ActType::U8 => nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.op_type() == "Relu")
            .filter_map(|(i, n)| match (n.input.as_slice(), n.output.as_slice()) {
                ([inp], [out]) if view.consumers(inp).len() == 1 && !view.is_graph_output(inp) => {
                    (!view.is_graph_output(out)).then(|| (inp.clone(), i))
                }
                _ => None,
            })
            .collect(),
        ActType::S8 => BTreeMap::new(),
    };
    let want_act = |p: &mut Plan, blocked: &mut BTreeMap<String, String>, name: &str, src: ActSource| -> bool {
        if name.is_empty() || view.weight(name).is_some() {
            return false;
        }
        if p.act_set.contains(name) {
            return true;
        }
        // `y = x·2^k` read only there: x takes y's grid scaled back, so y's range is read. A
        // Relu's only input: the Relu's output range is read when it folds.
        let src = match (src, rescaled.get(name)) {
            (ActSource::Own, Some((_, y, c))) => ActSource::Derived { of: y.clone(), factor: 1.0 / c, shift: 0 },
            (ActSource::Own, None) if relu_folds.contains_key(name) => ActSource::BeforeRelu,
            (src, _) => src,
        };
        if let Some(why) = ctx.act_blocker(name, src.reads_range()).or_else(|| float_group(name)) {
            blocked.entry(name.to_string()).or_insert(why);
            return false;
        }
        p.act_set.insert(name.to_string());
        p.acts.push((name.to_string(), src));
        true
    };
    for &i in order {
        let n = &nodes[i];
        let op = n.op_type();
        if !n.domain().is_empty() && n.domain() != "ai.onnx" {
            continue;
        }
        if !ops.contains(&op) {
            continue;
        }
        // Under the cnn-like presets, a Gelu's `x·c` (c > 0, a Div by 1/c before `prepare`) is
        // quantized on x's grid scaled by c: the same integers, so no extra rounding, and
        // ONNX Runtime runs it as a QLinearMul instead of a float Mul between DQ and Q.
        let exact_scaling = cnn_like && op == "Mul" && n.input.iter().any(|x| positive_scalar(view, x).is_some());
        if decomposed.contains(&i) && opts.op_types.is_none() && !exact_scaling {
            p.skipped.push(Skipped {
                name: n.name().into(),
                op_type: op.into(),
                reason: "part of a decomposed LayerNorm/Gelu: kept float".into(),
            });
            continue;
        }
        if opts.exclude_op_types.iter().any(|e| e == op) {
            p.skipped.push(Skipped { name: n.name().into(), op_type: op.into(), reason: "--exclude-op-types".into() });
            continue;
        }
        if opts.exclude.iter().any(|g| glob_match(g, n.name())) {
            p.skipped.push(Skipped { name: n.name().into(), op_type: op.into(), reason: "--exclude".into() });
            continue;
        }
        // Scores + attention mask, read only by Softmax (cnn preset): the sum on the scores'
        // grid, where a masked position saturates at the scores' lowest value, the mask on its
        // own bounded grid (see [`masked_scores`]): ONNX Runtime runs QLinearAdd and
        // QLinearSoftmax instead of leaving the attention's Softmax input float.
        let masked = match (op, cnn_like) {
            ("Add", true) => masked_scores(ctx, n),
            _ => None,
        };
        if let Some((x, m, mask)) = masked {
            if want_act(&mut p, &mut blocked, &x, ActSource::Own) {
                for (t, src) in [(m, ActSource::Fixed(mask)), (n.output[0].clone(), ActSource::SameAs(x))] {
                    if p.act_set.insert(t.clone()) {
                        p.acts.push((t, src));
                    }
                }
                p.selected.insert(i);
            }
            continue;
        }
        match op {
            "Conv" | "ConvTranspose" | "MatMul" | "Gemm" => {
                if op == "Gemm" && n.attr_int_or("transA", 0)? != 0 {
                    p.skipped.push(Skipped { name: n.name().into(), op_type: op.into(), reason: "transA=1".into() });
                    continue;
                }
                let w = n.input.get(1).map(|s| s.as_str()).unwrap_or("");
                let wt = view.weight(w);
                // A weight with no elements has nothing to quantize (and its other dims may
                // be huge: [0, 2^40] would mean 2^40 per-channel scales).
                let w_float = wt.is_some_and(|t| t.data_type() == dtype::FLOAT && crate::dump::element_count(t) > 0);
                if opts.weights_only {
                    if !w_float {
                        continue;
                    }
                    let rank = wt.map(|t| t.dims.len()).unwrap_or(0);
                    let axis = if opts.per_channel { weight_axis(n, 1, rank)? } else { None };
                    p.weights.insert((i, 1), axis);
                    p.selected.insert(i);
                    continue;
                }
                let a = n.input.first().map(|s| s.as_str()).unwrap_or("");
                let a_ok = want_act(&mut p, &mut blocked, a, ActSource::Own);
                if !a_ok {
                    p.skipped.push(Skipped {
                        name: n.name().into(),
                        op_type: op.into(),
                        reason: format!(
                            "input '{a}' stays float ({})",
                            blocked.get(a).cloned().unwrap_or_else(|| "constant".into())
                        ),
                    });
                    continue;
                }
                let w_ok = if wt.is_some() {
                    if !w_float {
                        false
                    } else {
                        let rank = wt.map(|t| t.dims.len()).unwrap_or(0);
                        let axis = if opts.per_channel { weight_axis(n, 1, rank)? } else { None };
                        p.weights.insert((i, 1), axis);
                        true
                    }
                } else if op == "MatMul" {
                    want_act(&mut p, &mut blocked, w, ActSource::Own)
                } else {
                    false
                };
                if !w_ok {
                    p.skipped.push(Skipped {
                        name: n.name().into(),
                        op_type: op.into(),
                        reason: format!("second input '{w}' cannot be quantized"),
                    });
                    continue;
                }
                p.selected.insert(i);
                if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) {
                    let bt = view.weight(b);
                    if bt.is_some_and(|t| t.data_type() == dtype::FLOAT && t.dims.len() == 1) && wt.is_some() {
                        if op == "Gemm" && (n.attr_float_or("beta", 1.0)? - 1.0).abs() > 0.0 {
                            // QGemm wants beta = 1 for an int32 bias; keep it float.
                        } else {
                            p.biases.insert((i, 2));
                        }
                    }
                }
                if cnn_like {
                    for o in &n.output {
                        if !view.is_graph_output(o) {
                            want_act(&mut p, &mut blocked, o, ActSource::Own);
                        }
                    }
                }
            }
            "Relu" => {
                // Fold into the producer's Q when the producer is a selected node and the
                // Relu is its only consumer (`relu_folds`).
                let ([inp], [out]) = (n.input.as_slice(), n.output.as_slice()) else { continue };
                // A producer that is itself a folded (removed) Relu cannot host a second fold:
                // nothing would produce this Relu's output.
                let producer_selected = view
                    .producer_index(inp)
                    .is_some_and(|pi| p.selected.contains(&pi) && !p.removed.contains(&pi) && p.act_set.contains(inp));
                if relu_folds.get(inp) == Some(&i) && producer_selected && ctx.act_blocker(out, true).is_none() {
                    // The producer's own output Q is replaced by the Relu's.
                    p.act_set.remove(inp.as_str());
                    p.acts.retain(|(t, _)| t != inp);
                    want_act(&mut p, &mut blocked, out, ActSource::FoldedRelu { input: inp.clone() });
                    p.removed.insert(i);
                    p.selected.insert(i);
                }
            }
            _ if MOVE_OPS.contains(&op) => {
                let Some(inp) = n.input.first() else { continue };
                if p.act_set.contains(inp.as_str()) {
                    let src = p.acts.iter().find(|(t, _)| t == inp).map(|(t, s)| match s {
                        ActSource::SameAs(root) => root.clone(),
                        _ => t.clone(),
                    });
                    if let Some(root) = src {
                        for o in n.output.iter().filter(|o| !view.is_graph_output(o)) {
                            want_act(&mut p, &mut blocked, o, ActSource::SameAs(root.clone()));
                        }
                        p.selected.insert(i);
                    }
                }
            }
            _ if n.output.iter().any(|o| float_group(o).is_some()) => {
                let why = n.output.iter().find_map(|o| float_group(o)).unwrap_or_default();
                p.skipped.push(Skipped { name: n.name().into(), op_type: op.into(), reason: why });
            }
            _ => {
                // Binary/unary/variadic ops: all float activation inputs and the output.
                let data_slots = match op {
                    "Resize" => 1,
                    _ => n.input.len(),
                };
                let data_inputs: Vec<(usize, &String)> =
                    n.input.iter().enumerate().take(data_slots).filter(|(_, s)| !s.is_empty()).collect();
                let binary = BINARY_OPS.contains(&op) && data_inputs.len() == 2;
                let mut ok = true;
                // The one constant operand of an Add/Mul and its value, when it has one element.
                let mut constant: Option<f32> = None;
                let mut const_slots = Vec::new();
                for &(slot, inp) in &data_inputs {
                    if let Some(t) = view.weight(inp) {
                        // The constant operand of an Add/Mul is quantized too (a one-element
                        // one exactly), so ONNX Runtime fuses QLinearAdd/QLinearMul; constant
                        // operands of other ops stay float.
                        if let Some(v) = const_values(t).filter(|_| binary) {
                            const_slots.push(slot);
                            constant = match v.as_slice() {
                                &[c] => Some(c),
                                _ => None,
                            };
                        }
                        continue;
                    }
                    // Erf/Tanh outputs lie in [-1, 1]: a fixed grid on which the Gelu's `+1`
                    // is exact.
                    let bounded = view.producer(inp).is_some_and(|pn| matches!(pn.op_type(), "Erf" | "Tanh"));
                    let src = if bounded && opts.activations == ActType::U8 {
                        ActSource::Fixed(UNIT_U8)
                    } else {
                        ActSource::Own
                    };
                    ok &= want_act(&mut p, &mut blocked, inp, src);
                }
                if ok {
                    p.consts.extend(const_slots.iter().map(|&slot| (i, slot)));
                    // A graph output is quantized only for a final Sigmoid (ONNX Runtime's
                    // QLinearSigmoid), on the fixed grid of [0, 1]: at most 1/510 per value.
                    let final_sigmoid = |o: &str| op == "Sigmoid" && cnn_like && view.consumers(o).is_empty();
                    for o in n.output.iter().filter(|o| !view.is_graph_output(o) || final_sigmoid(o)) {
                        let first = data_inputs.iter().map(|&(_, x)| x).find(|x| view.weight(x).is_none());
                        let src = match (op, first, constant) {
                            // The whole [0, 1]: a calibrated range may clip the map's rare high
                            // values, which are its signal (entropy kept [0, 0.13] of PP-OCR's).
                            ("Sigmoid", _, _) if view.is_graph_output(o) => ActSource::Fixed(match opts.activations {
                                ActType::U8 => ActParams { scale: 1.0 / 255.0, zero_point: 0, ty: ActType::U8 },
                                ActType::S8 => ActParams { scale: 1.0 / 127.0, zero_point: 0, ty: ActType::S8 },
                            }),
                            ("MaxPool", Some(i0), _) => ActSource::SameAs(i0.clone()),
                            // Nearest-neighbour resizing copies input values: the input's grid
                            // holds them exactly (a grid of its own would round them again).
                            ("Resize", Some(i0), _) if n.attr_string("mode")?.is_none_or(|m| m == "nearest") => {
                                ActSource::SameAs(i0.clone())
                            }
                            ("Mul", Some(x), Some(c)) if c > 0.0 => {
                                match p.acts.iter().find(|(t, _)| t == x).map(|(_, s)| s.param_source()) {
                                    // x takes its grid from this output (power_of_two_scalings).
                                    Some(ParamSource::DerivedFrom(of)) if &of == o => ActSource::Own,
                                    _ => ActSource::Derived { of: x.clone(), factor: c, shift: 0 },
                                }
                            }
                            ("Add", Some(x), Some(c)) => match p.acts.iter().find(|(t, _)| t == x).map(|(_, s)| s) {
                                Some(ActSource::Fixed(fp)) => {
                                    let k = c / fp.scale;
                                    let (lo, hi) = fp.qmin_qmax();
                                    let zp = fp.zero_point - k.round() as i32;
                                    if (k - k.round()).abs() < 1e-3 && (lo..=hi).contains(&zp) {
                                        ActSource::Derived { of: x.clone(), factor: 1.0, shift: k.round() as i32 }
                                    } else {
                                        ActSource::Own
                                    }
                                }
                                _ => ActSource::Own,
                            },
                            _ => ActSource::Own,
                        };
                        want_act(&mut p, &mut blocked, o, src);
                    }
                    p.selected.insert(i);
                }
            }
        }
    }
    // A tensor that was to take its parameters from a later one that stayed float (the output
    // `y` of `y = x·2^k`, a Relu that did not fold) takes its own range after all, or, when
    // that is unusable, stays float too (and so does the Mul reading it).
    let pending = |s: &ActSource| match s {
        ActSource::BeforeRelu => true,
        ActSource::Derived { of, .. } => !p.act_set.contains(of),
        _ => false,
    };
    let unresolved: Vec<usize> = (0..p.acts.len()).filter(|&k| pending(&p.acts[k].1)).collect();
    for k in unresolved.into_iter().rev() {
        let x = p.acts[k].0.clone();
        match ctx.act_blocker(&x, true) {
            None => p.acts[k].1 = ActSource::Own,
            Some(why) => {
                p.acts.remove(k);
                p.act_set.remove(&x);
                if let Some((mul, _, _)) = rescaled.get(&x) {
                    p.selected.remove(mul);
                    p.consts.retain(|&(i, _)| i != *mul);
                }
                blocked.insert(x, why);
            }
        }
    }
    for (name, why) in blocked {
        let op = view.producer(&name).map(|n| n.op_type().to_string()).unwrap_or_else(|| "input".into());
        p.skipped.push(Skipped { name, op_type: op, reason: why });
    }
    Ok(p)
}

// ---------------------------------------------------------------- rewrite

fn act_scalar_tensors(name_scale: &str, name_zp: &str, p: &ActParams) -> (TensorProto, TensorProto) {
    let zp = match p.ty {
        ActType::U8 => scalar_u8(name_zp, p.zero_point.clamp(0, 255) as u8),
        ActType::S8 => scalar_i8(name_zp, p.zero_point.clamp(-128, 127) as i8),
    };
    (scalar_f32(name_scale, p.scale), zp)
}

/// Quantizes a model. `ranges` come from calibration (empty for weights-only).
pub fn quantize(
    model: &ModelProto,
    ranges: &BTreeMap<String, TensorEntry>,
    opts: &QuantOptions,
) -> Result<(ModelProto, Report)> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    view.validate().context("the input model is not valid")?;
    let order = view.topo_order()?;
    let preset = match opts.preset {
        Preset::Auto => detect_preset(&view),
        p => p,
    };
    let mut warnings = Vec::new();
    let mut opts = opts.clone();
    let opset = default_opset(model);
    if opset < 10 {
        bail!("the model imports opset {opset}; QuantizeLinear needs opset 10 or later");
    }
    if opts.per_channel && opset < 13 {
        warnings.push(format!(
            "per-channel weights need opset 13 and the model imports opset {opset}: using per-tensor weights (the quantize command upgrades the opset when it can)"
        ));
        opts.per_channel = false;
    }
    let ctx = Ctx { view: &view, ranges, opts: &opts, assume_ranges: None };
    let pl = plan(&ctx, preset, &order)?;
    let mut out_graph = rewrite(graph, &view, &pl, &opts, ranges)?;
    let mut totals = out_graph.1;
    totals.nodes = graph.node.len();
    totals.nodes_quantized = pl.selected.len();
    totals.relu_removed = pl.removed.len();
    let report = Report {
        preset,
        per_channel: opts.per_channel,
        activations: if opts.weights_only {
            "float"
        } else {
            match opts.activations {
                ActType::U8 => "uint8",
                ActType::S8 => "int8",
            }
        },
        warnings,
        tensors: std::mem::take(&mut out_graph.2),
        skipped: pl.skipped.clone(),
        totals,
    };
    let mut out = model.clone();
    out.graph = Some(out_graph.0);
    GraphView::new(out.graph.as_ref().context("graph")?)
        .validate()
        .context("internal error: the quantized graph is invalid")?;
    Ok((out, report))
}

/// What the placement needs from calibration, found without statistics (see [`range_needs`]).
#[derive(Debug, Clone, Default)]
pub struct RangeNeeds {
    /// Every activation the placement quantizes or looks at (a superset of what it
    /// quantizes: Relu folding and fusion choices look at neighbours too).
    pub consulted: BTreeSet<String>,
    /// Where each activation it quantizes takes its parameters from.
    pub sources: BTreeMap<String, ParamSource>,
    /// The tensors whose calibrated range it reads: those taking their own range, and those
    /// whose range decides whether something is quantized (residual-stream groups, the
    /// sentinel test of a tensor that a folded Relu or a fusion depends on).
    pub ranges_read: BTreeSet<String>,
}

/// The placement's needs when every float tensor has a usable range. Ranges can only block
/// tensors, never make the placement look elsewhere, so [`quantize`] reads no statistics
/// outside `ranges_read`, and calibration can skip the rest: fixed and derived activations
/// ([`ParamSource`]) are quantized without a range of their own.
pub fn range_needs(model: &ModelProto, opts: &QuantOptions) -> Result<RangeNeeds> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    let order = view.topo_order()?;
    let preset = match opts.preset {
        Preset::Auto => detect_preset(&view),
        p => p,
    };
    let none = BTreeMap::new();
    let ctx = Ctx { view: &view, ranges: &none, opts, assume_ranges: Some(Default::default()) };
    let pl = plan(&ctx, preset, &order)?;
    let asked = ctx.assume_ranges.map(|a| a.into_inner()).unwrap_or_default();
    let mut consulted = asked.tensors;
    consulted.extend(pl.acts.iter().map(|(name, _)| name.clone()));
    let sources = pl.acts.iter().map(|(name, s)| (name.clone(), s.param_source())).collect();
    Ok(RangeNeeds { consulted, sources, ranges_read: asked.ranges })
}

/// Every activation tensor the placement quantizes or consults ([`RangeNeeds::consulted`]).
pub fn activation_candidates(model: &ModelProto, opts: &QuantOptions) -> Result<BTreeSet<String>> {
    Ok(range_needs(model, opts)?.consulted)
}

pub fn default_opset(m: &ModelProto) -> i64 {
    m.opset_import.iter().find(|o| o.domain().is_empty() || o.domain() == "ai.onnx").map(|o| o.version()).unwrap_or(0)
}

/// The interval outside of which the readers of the quantized tensor `t` cannot tell values
/// apart, when every reader (through data movement and positive scalings `x·c`) saturates:
/// `HardSigmoid(α, β)` is constant beyond `[−β/α, (1−β)/α]`, `Clip` beyond its bounds, a
/// `Sigmoid` whose output is quantized on a fixed grid `(s, zp)` outputs its lowest
/// (highest) level below `logit((qmin − zp + ½)·s)` (above `logit((qmax − zp − ½)·s)`), an
/// `Erf` on a fixed grid the levels of −1 and 1 beyond the `erf⁻¹` of where they begin, and
/// the product `x·(1 + erf(x·c))` of a decomposed Gelu is exactly 0 wherever that Erf
/// outputs −1 (a window open above). The hull over the readers;
/// None when any reader is something else, reads the float value, or is a graph output.
/// Clipping the calibrated range to this window changes no reader's output and spends the
/// 256 levels where they matter (PP-OCR's squeeze-excitation gates feed HardSigmoid from
/// ranges up to [−13.9, 5.7], its final logits Sigmoid from [−20.3, 10.4]).
fn saturation_window(view: &GraphView, pl: &Plan, t: &str, ty: ActType) -> Option<(f32, f32)> {
    if !matches!(pl.float_readers, FloatReaders::Never) {
        return None;
    }
    // The fixed output grid of a node's output.
    let fixed_grid = |out: &str| -> Option<ActParams> {
        pl.acts.iter().find_map(|(a, src)| match src {
            ActSource::Fixed(fp) if a == out && fp.ty == ty => Some(*fp),
            _ => None,
        })
    };
    // Where the lowest (highest) level of a fixed output grid begins, in output units.
    let fixed_levels = |out: &str| -> Option<(f32, f32)> {
        let fp = fixed_grid(out)?;
        let (qlo, qhi) = fp.qmin_qmax();
        let (plo, phi) = ((qlo - fp.zero_point) as f32 + 0.5, (qhi - fp.zero_point) as f32 - 0.5);
        Some((plo * fp.scale, phi * fp.scale))
    };
    // An Erf on a fixed output grid: the inputs below (above) which it outputs the level of
    // −1 (of 1), and that level's value.
    let erf_window = |erf: &NodeProto| -> Option<((f32, f32), f32)> {
        let fp = fixed_grid(erf.output.first()?)?;
        let (q0, q1) = (fp.quantize(-1.0), fp.quantize(1.0));
        let at = |q: f32| (q - fp.zero_point as f32) * fp.scale;
        let (plo, phi) = (at(q0 as f32 + 0.5), at(q1 as f32 - 0.5));
        if !(plo > -1.0 && phi < 1.0 && plo < phi) {
            return None;
        }
        Some(((erf_inverse(plo as f64) as f32, erf_inverse(phi as f64) as f32), at(q0 as f32)))
    };
    let mut hull: Option<(f32, f32)> = None;
    // Tensors reached from t, each with the factor f > 0 it holds t scaled by.
    let mut stack = vec![(t.to_string(), 1.0f32)];
    let mut seen = HashSet::new();
    while let Some((x, f)) = stack.pop() {
        if view.is_graph_output(&x) {
            return None;
        }
        if !seen.insert(x.clone()) {
            continue;
        }
        for &(ci, slot) in view.consumers(&x) {
            let n = &view.nodes()[ci];
            let out = n.output.first()?;
            let other = n.input.get(1 - slot.min(1)).map(String::as_str).unwrap_or_default();
            let w = match n.op_type() {
                op if slot == 0 && crate::calibrate::REARRANGING_OPS.contains(&op) => {
                    stack.push((out.clone(), f));
                    continue;
                }
                // `x·c`, c > 0: the window of its output over c.
                "Mul" if n.input.len() == 2 && positive_scalar(view, other).is_some() => {
                    stack.push((out.clone(), f * positive_scalar(view, other)?));
                    continue;
                }
                "HardSigmoid" => {
                    let alpha = n.attr_float("alpha").ok()?.unwrap_or(0.2);
                    let beta = n.attr_float("beta").ok()?.unwrap_or(0.5);
                    if alpha.is_nan() || alpha <= 0.0 {
                        return None;
                    }
                    (-beta / alpha, (1.0 - beta) / alpha)
                }
                "Clip" if slot == 0 => {
                    let bound = |k: usize, attr: &str, dflt: f32| -> Option<f32> {
                        match n.input.get(k).filter(|s| !s.is_empty()) {
                            Some(b) => view.weight(b).and_then(scalar_value),
                            None => Some(n.attr_float(attr).ok()?.unwrap_or(dflt)),
                        }
                    };
                    (bound(1, "min", f32::NEG_INFINITY)?, bound(2, "max", f32::INFINITY)?)
                }
                "Sigmoid" => {
                    let (plo, phi) = fixed_levels(out)?;
                    if plo.is_nan() || phi.is_nan() || plo <= 0.0 || phi >= 1.0 || plo >= phi {
                        return None;
                    }
                    let logit = |p: f32| (p / (1.0 - p)).ln();
                    (logit(plo), logit(phi))
                }
                "Erf" => erf_window(n)?.0,
                // The product of a decomposed Gelu, `x·(1 + erf(x·c))`: its second factor is
                // exactly 0 on the Erf's fixed grid wherever the Erf outputs its lowest
                // level, −1, so x below that point is never told apart.
                "Mul" if n.input.len() == 2 => {
                    let (c, erf) = gelu_scaling(view, &x, other)?;
                    let ((zlo, _), lowest) = erf_window(erf)?;
                    // That level must be −1 itself (the Add makes it 0).
                    if (lowest + 1.0).abs() > 1e-5 {
                        return None;
                    }
                    (zlo / c, f32::INFINITY)
                }
                _ => return None,
            };
            let w = (w.0 / f, w.1 / f);
            if w.0.is_nan() || w.1.is_nan() || w.0 >= w.1 {
                return None;
            }
            hull = Some(match hull {
                None => w,
                Some((a, b)) => (a.min(w.0), b.max(w.1)),
            });
        }
    }
    hull
}

/// When `g = 1 + erf(x·c)` (an `Add` of the constant 1 to an `Erf` of `x·c`, c > 0 a scalar
/// constant): c and the Erf.
fn gelu_scaling<'a>(view: &'a GraphView, x: &str, g: &str) -> Option<(f32, &'a NodeProto)> {
    let add = view.producer(g)?;
    if add.op_type() != "Add" || add.input.len() != 2 {
        return None;
    }
    let one = add.input.iter().any(|i| view.weight(i).and_then(scalar_value) == Some(1.0));
    let erf = add.input.iter().find_map(|i| view.producer(i).filter(|p| p.op_type() == "Erf"))?;
    let scaled = view.producer(erf.input.first()?)?;
    match (one, scaled.op_type(), scaled.input.as_slice()) {
        (true, "Mul", [a, c]) | (true, "Mul", [c, a]) if a == x => Some((positive_scalar(view, c)?, erf)),
        _ => None,
    }
}

/// `erf⁻¹(v)` for `v ∈ (−1, 1)`, by bisection on [`erf`] (to f64 resolution).
fn erf_inverse(v: f64) -> f64 {
    let (mut lo, mut hi) = (-6.0f64, 6.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if erf(mid) < v {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The error function, to a relative error below 1.2·10⁻⁷ (the Chebyshev fit of `erfc` in
/// Numerical Recipes, §6.2).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

type Rewritten = (GraphProto, Totals, Vec<TensorReport>);
/// (quantized, scale, zero point) initializer names and the scales of one quantized weight.
type WeightNames = (String, String, String, Vec<f32>);

/// The `[lo, hi]` an activation's own parameters cover: its calibrated range for `ty`.
fn own_range(ranges: &BTreeMap<String, TensorEntry>, t: &str, ty: ActType) -> Result<(f32, f32)> {
    let r = ranges.get(t).with_context(|| format!("tensor '{t}': no range"))?;
    Ok(match ty {
        ActType::U8 => (r.range[0], r.range[1]),
        ActType::S8 => (r.range_symmetric[0], r.range_symmetric[1]),
    })
}

/// A tensor's own calibrated range, cut to its readers' saturation window
/// ([`saturation_window`]) with one step of margin on each side: rounding the zero point
/// shifts the grid by up to half a step, and a window edge inside the grid would map
/// saturated values to a level short of the readers' plateau. Also a note for the report
/// (empty when nothing was cut).
fn cut_own_range(
    view: &GraphView,
    pl: &Plan,
    ranges: &BTreeMap<String, TensorEntry>,
    t: &str,
    opts: &QuantOptions,
) -> Result<(f32, f32, String)> {
    let (lo, hi) = own_range(ranges, t, opts.activations)?;
    Ok(match saturation_window(view, pl, t, opts.activations) {
        Some((a, b)) if lo < a || hi > b => {
            // The window's step, or the cut range's when the window is open on one side.
            let step = if a.is_finite() && b.is_finite() { b - a } else { hi.min(b) - lo.max(a) } / 254.0;
            let (a, b) = (a - step, b + step);
            let (clo, chi) = (lo.max(a).min(0.0), hi.min(b).max(0.0));
            let (clo, chi) = match opts.activations {
                ActType::U8 => (clo, chi),
                ActType::S8 => (-chi.max(-clo), chi.max(-clo)),
            };
            (clo, chi, format!(", clipped to its readers' saturation window [{a}, {b}]"))
        }
        _ => (lo, hi, String::new()),
    })
}

/// One quantized activation's parameters, the range they cover and how they were found
/// (the range method, or `fixed`, `same as T`, `derived from T`), as the report lists them.
#[derive(Clone)]
struct ActChoice {
    prm: ActParams,
    range: [f32; 2],
    method: String,
}

/// The parameters of every quantized activation ([`ActChoice`]). A derived tensor whose
/// source is not quantized takes its own range.
fn act_params(
    view: &GraphView,
    pl: &Plan,
    ranges: &BTreeMap<String, TensorEntry>,
    opts: &QuantOptions,
) -> Result<HashMap<String, ActChoice>> {
    let sources: HashMap<&str, &ActSource> = pl.acts.iter().map(|(t, s)| (t.as_str(), s)).collect();
    let mut done: HashMap<String, ActChoice> = HashMap::new();
    for (t, _) in &pl.acts {
        // The chain of sources down to one whose parameters are known, then back up.
        let mut chain = vec![t.as_str()];
        while let Some(&cur) = chain.last() {
            let next = match sources.get(cur) {
                Some(ActSource::SameAs(of) | ActSource::Derived { of, .. }) => Some(of.as_str()),
                _ => None,
            };
            match next {
                Some(of) if sources.contains_key(of) && !done.contains_key(of) && !chain.contains(&of) => {
                    chain.push(of)
                }
                _ => break,
            }
        }
        for cur in chain.into_iter().rev() {
            if done.contains_key(cur) {
                continue;
            }
            let base = |of: &str| done.get(of).map(|c| c.prm);
            let found = match sources.get(cur) {
                Some(ActSource::Fixed(fp)) => Some((*fp, "fixed".to_string())),
                Some(ActSource::SameAs(of)) => base(of).map(|ap| (ap, format!("same as {of}"))),
                Some(ActSource::Derived { of, factor, shift }) => base(of).map(|ap| {
                    let prm = ActParams { scale: ap.scale * factor, zero_point: ap.zero_point - shift, ty: ap.ty };
                    (prm, format!("derived from {of}"))
                }),
                _ => None,
            };
            let choice = match found {
                Some((prm, method)) => {
                    let (qlo, qhi) = prm.qmin_qmax();
                    let at = |q: i32| (q - prm.zero_point) as f32 * prm.scale;
                    ActChoice { prm, range: [at(qlo), at(qhi)], method }
                }
                None => {
                    let (lo, hi, note) = cut_own_range(view, pl, ranges, cur, opts)?;
                    let prm = ActParams::from_range(lo, hi, opts.activations);
                    ActChoice { prm, range: [lo, hi], method: format!("{}{note}", opts.method) }
                }
            };
            done.insert(cur.to_string(), choice);
        }
    }
    Ok(done)
}

fn rewrite(
    graph: &GraphProto,
    view: &GraphView,
    pl: &Plan,
    opts: &QuantOptions,
    ranges: &BTreeMap<String, TensorEntry>,
) -> Result<Rewritten> {
    let mut names = NameAlloc::new(graph);
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut reports: Vec<TensorReport> = Vec::new();
    let mut totals = Totals::default();

    // 1. Activation parameters: (scale name, zp name, params) per quantized tensor, the
    // parameters resolved first (a tensor may derive from one quantized after it).
    let params = act_params(view, pl, ranges, opts)?;
    let mut act: HashMap<String, (String, String, ActParams)> = HashMap::new();
    for (t, src) in &pl.acts {
        match src {
            ActSource::SameAs(root) if act.contains_key(root) => {
                let v = act[root].clone();
                act.insert(t.clone(), v);
            }
            _ => {
                let ActChoice { prm, range, method } =
                    params.get(t).cloned().with_context(|| format!("tensor '{t}': no parameters"))?;
                let sn = names.fresh(&format!("{t}_scale"));
                let zn = names.fresh(&format!("{t}_zero_point"));
                let (s, z) = act_scalar_tensors(&sn, &zn, &prm);
                new_inits.push(s);
                new_inits.push(z);
                reports.push(TensorReport {
                    name: t.clone(),
                    kind: "activation",
                    dtype: if prm.ty == ActType::U8 { "uint8" } else { "int8" },
                    scale: vec![prm.scale],
                    zero_point: prm.zero_point,
                    axis: None,
                    range: Some(range),
                    method: Some(method),
                });
                act.insert(t.clone(), (sn, zn, prm));
            }
        }
    }
    totals.activations_quantized = pl.acts.len();

    // 2. Weights: one quantized copy per (weight, axis), the first node reading it naming it.
    // They are quantized in parallel (each alone, so the values do not depend on the thread
    // count), then named and added in the placement's order.
    let mut wq: HashMap<(String, Option<usize>), WeightNames> = HashMap::new();
    let mut bytes_before: HashSet<String> = HashSet::new();
    let mut unique: Vec<(&NodeProto, &String, Option<usize>)> = Vec::new();
    let mut seen: HashSet<(&String, Option<usize>)> = HashSet::new();
    for (&(ni, slot), &axis) in &pl.weights {
        let n = &view.nodes()[ni];
        let w = &n.input[slot];
        if seen.insert((w, axis)) {
            unique.push((n, w, axis));
        }
    }
    type Quantized<'t> = (&'t TensorProto, params::QuantWeight, Option<String>);
    let quantized: Vec<Result<Quantized>> = {
        use rayon::prelude::*;
        unique
            .par_iter()
            .map(|&(n, w, axis)| -> Result<Quantized> {
                let t = view.weight(w).with_context(|| format!("{}: weight '{w}' not found", describe(n)))?;
                let a = to_f32(t).with_context(|| format!("{}: weight '{w}'", describe(n)))?;
                crate::onnx::io::release_pages(t.raw_data.as_deref().unwrap_or_default());
                let mut q = quantize_weight(&a, axis);
                let mut rounding = None;
                // The Hessians are keyed by weights read by one node only, so `n` is their layer.
                if let Some(h) = opts.hessians.as_ref().and_then(|h| h.by_weight.get(w.as_str())) {
                    let before = q.values.clone();
                    q = gptq::requantize(&a, q, h)
                        .with_context(|| format!("{}: GPTQ rounding of '{w}'", describe(n)))?;
                    rounding = (q.values != before).then(|| "gptq".to_string());
                }
                Ok((t, q, rounding))
            })
            .collect()
    };
    for ((_, w, axis), r) in unique.into_iter().zip(quantized) {
        let (t, q, rounding) = r?;
        let key = (w.clone(), axis);
        if bytes_before.insert(w.clone()) {
            totals.weight_bytes_before += crate::dump::tensor_bytes(t);
        }
        let qn = names.fresh(&format!("{w}_quantized"));
        let sn = names.fresh(&format!("{w}_scale"));
        let zn = names.fresh(&format!("{w}_zero_point"));
        new_inits.push(from_i8(&qn, &q.values));
        totals.weight_bytes_after += q.values.len() as u64;
        match axis {
            Some(_) => {
                new_inits.push(vec_f32(&sn, &q.scales));
                new_inits.push(vec_i8(&zn, &vec![0i8; q.scales.len()]));
            }
            None => {
                new_inits.push(scalar_f32(&sn, q.scales[0]));
                new_inits.push(scalar_i8(&zn, 0));
            }
        }
        reports.push(TensorReport {
            name: w.clone(),
            kind: "weight",
            dtype: "int8",
            scale: q.scales.clone(),
            zero_point: 0,
            axis,
            range: None,
            method: rounding,
        });
        totals.weights_quantized += 1;
        wq.insert(key, (qn, sn, zn, q.scales));
    }

    // 2b. One-element constant operands of Add/Mul: one step of the grid equals the value
    // (scale |v|, quantized value ±1), so the dequantized constant is exactly v.
    let mut cq: HashMap<String, (String, String, String)> = HashMap::new();
    for &(ni, slot) in &pl.consts {
        let c = &view.nodes()[ni].input[slot];
        let t = view.weight(c).with_context(|| format!("constant '{c}' not found"))?;
        if cq.contains_key(c) {
            continue;
        }
        let Some(vals) = const_values(t) else { continue };
        let (prm, range) = match vals.as_slice() {
            &[v] => {
                let (scale, zp) = match (v == 0.0, v > 0.0, opts.activations) {
                    (true, _, _) => (1.0, 0),
                    (false, true, _) => (v, 0),
                    (false, false, ActType::U8) => (-v, 1),
                    (false, false, ActType::S8) => (-v, 0),
                };
                (ActParams { scale, zero_point: zp, ty: opts.activations }, [v, v])
            }
            _ => {
                let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                (ActParams::from_range(lo, hi, opts.activations), [lo, hi])
            }
        };
        let scale = prm.scale;
        let zp = prm.zero_point;
        let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        let q: Vec<i32> = vals.iter().map(|&v| prm.quantize(v)).collect();
        let qn = names.fresh(&format!("{c}_quantized"));
        let sn = names.fresh(&format!("{c}_scale"));
        let zn = names.fresh(&format!("{c}_zero_point"));
        let shape = IxDyn(&dims);
        new_inits.push(match opts.activations {
            ActType::U8 => from_u8(&qn, &ArrayD::from_shape_vec(shape, q.iter().map(|&q| q as u8).collect())?),
            ActType::S8 => from_i8(&qn, &ArrayD::from_shape_vec(shape, q.iter().map(|&q| q as i8).collect())?),
        });
        let (st, zt) = act_scalar_tensors(&sn, &zn, &prm);
        new_inits.push(st);
        new_inits.push(zt);
        reports.push(TensorReport {
            name: c.clone(),
            kind: "constant",
            dtype: if prm.ty == ActType::U8 { "uint8" } else { "int8" },
            scale: vec![scale],
            zero_point: zp,
            axis: None,
            range: Some(range),
            method: None,
        });
        cq.insert(c.clone(), (qn, sn, zn));
    }

    // 3. Build the node list.
    let mut out_nodes: Vec<NodeProto> = Vec::new();
    let mut q_out: HashMap<String, String> = HashMap::new(); // tensor -> its Q output
    let emit_q = |t: &str,
                  read: &str,
                  names: &mut NameAlloc,
                  out_nodes: &mut Vec<NodeProto>,
                  q_out: &mut HashMap<String, String>,
                  act: &HashMap<String, (String, String, ActParams)>| {
        if let Some((s, z, _)) = act.get(t) {
            let qn = names.fresh(&format!("{t}_quantized"));
            let node_name = names.fresh(&format!("{t}_QuantizeLinear"));
            out_nodes.push(node("QuantizeLinear", &node_name, &[read, s, z], &[&qn], vec![]));
            q_out.insert(t.to_string(), qn);
        }
    };
    // Graph inputs that are quantized get their Q first.
    for vi in &graph.input {
        if view.is_graph_input(vi.name()) && act.contains_key(vi.name()) {
            emit_q(vi.name(), vi.name(), &mut names, &mut out_nodes, &mut q_out, &act);
        }
    }
    // Folded Relus: the Q of the Relu output reads the Relu input.
    let folded: HashMap<&str, &str> = pl
        .acts
        .iter()
        .filter_map(|(t, s)| match s {
            ActSource::FoldedRelu { input } => Some((input.as_str(), t.as_str())),
            _ => None,
        })
        .collect();
    let mut bias_inits_added = 0usize;
    let order = view.topo_order()?;
    for &ni in &order {
        if pl.removed.contains(&ni) {
            continue;
        }
        let mut n = view.nodes()[ni].clone();
        let consumer_quantized = pl.selected.contains(&ni);
        // Rewire inputs.
        for slot in 0..n.input.len() {
            let inp = n.input[slot].clone();
            if inp.is_empty() {
                continue;
            }
            if let Some(&axis) = pl.weights.get(&(ni, slot)) {
                let (qn, sn, zn, _) = &wq[&(inp.clone(), axis)];
                let dqn = names.fresh(&format!("{inp}_dequantized"));
                let node_name = names.fresh(&format!("{inp}_DequantizeLinear"));
                let attrs = match axis {
                    Some(a) => vec![attr_int("axis", a as i64)],
                    None => vec![],
                };
                out_nodes.push(node("DequantizeLinear", &node_name, &[qn, sn, zn], &[&dqn], attrs));
                n.input[slot] = dqn;
                continue;
            }
            if let Some((qn, sn, zn)) = cq.get(&inp).filter(|_| pl.consts.contains(&(ni, slot))) {
                let dqn = names.fresh(&format!("{inp}_dequantized"));
                let node_name = names.fresh(&format!("{inp}_DequantizeLinear"));
                out_nodes.push(node("DequantizeLinear", &node_name, &[qn, sn, zn], &[&dqn], vec![]));
                n.input[slot] = dqn;
                continue;
            }
            if pl.biases.contains(&(ni, slot)) {
                // Needs the input's activation scale and the weight's scales.
                let a_name = &view.nodes()[ni].input[0];
                let w_axis = pl.weights.get(&(ni, 1)).copied();
                let (Some((_, _, ap)), Some(w_axis)) = (act.get(a_name), w_axis) else { continue };
                let w_scales = &wq[&(view.nodes()[ni].input[1].clone(), w_axis)].3;
                let bt = view.weight(&inp).with_context(|| format!("bias '{inp}'"))?;
                let b = to_f32(bt).with_context(|| format!("{}: bias '{inp}'", describe(&n)))?;
                let bv: Vec<f32> = b.iter().copied().collect();
                let Some((qb, scales)) = quantize_bias(&bv, ap.scale, w_scales) else { continue };
                let qn = names.fresh(&format!("{inp}_quantized"));
                let sn = names.fresh(&format!("{inp}_scale"));
                let zn = names.fresh(&format!("{inp}_zero_point"));
                new_inits.push(from_i32(&qn, &ArrayD::from_shape_vec(IxDyn(&[qb.len()]), qb).unwrap_or_default()));
                let per_channel = scales.len() > 1;
                if per_channel {
                    new_inits.push(vec_f32(&sn, &scales));
                    new_inits.push(vec_i32(&zn, &vec![0; scales.len()]));
                } else {
                    new_inits.push(scalar_f32(&sn, scales[0]));
                    new_inits.push(from_i32(&zn, &ArrayD::from_elem(IxDyn(&[]), 0)));
                }
                bias_inits_added += 1;
                let dqn = names.fresh(&format!("{inp}_dequantized"));
                let node_name = names.fresh(&format!("{inp}_DequantizeLinear"));
                let attrs = if per_channel { vec![attr_int("axis", 0)] } else { vec![] };
                out_nodes.push(node("DequantizeLinear", &node_name, &[&qn, &sn, &zn], &[&dqn], attrs));
                reports.push(TensorReport {
                    name: inp.clone(),
                    kind: "bias",
                    dtype: "int32",
                    scale: scales,
                    zero_point: 0,
                    axis: per_channel.then_some(0),
                    range: None,
                    method: None,
                });
                n.input[slot] = dqn;
                continue;
            }
            // Activation: a quantized tensor read by any node goes through its own DQ.
            let keep_float = !consumer_quantized
                && match &pl.float_readers {
                    FloatReaders::Never => false,
                    FloatReaders::All => true,
                    FloatReaders::Only(reads) => reads.contains(&(ni, inp.clone())),
                };
            if act.contains_key(&inp) && !keep_float {
                let t = inp.clone();
                if let (Some(qn), Some((s, z, _))) = (q_out.get(&t), act.get(&t)) {
                    let dqn = names.fresh(&format!("{t}_dequantized"));
                    let node_name = names.fresh(&format!("{t}_DequantizeLinear"));
                    out_nodes.push(node("DequantizeLinear", &node_name, &[qn, s, z], &[&dqn], vec![]));
                    n.input[slot] = dqn;
                }
            }
        }
        // Emit the node, then Q for its quantized outputs. A quantized graph output keeps its
        // name on the DequantizeLinear; the node writes `{name}_float`.
        let outputs = n.output.clone();
        let mut graph_outs = Vec::new();
        for o in n.output.iter_mut().filter(|o| view.is_graph_output(o) && act.contains_key(o.as_str())) {
            let f = names.fresh(&format!("{o}_float"));
            graph_outs.push((o.clone(), f.clone()));
            *o = f;
        }
        out_nodes.push(n);
        for (o, f) in &graph_outs {
            emit_q(o, f, &mut names, &mut out_nodes, &mut q_out, &act);
            if let (Some(qn), Some((s, z, _))) = (q_out.get(o), act.get(o)) {
                let node_name = names.fresh(&format!("{o}_DequantizeLinear"));
                out_nodes.push(node("DequantizeLinear", &node_name, &[qn, s, z], &[o], vec![]));
            }
        }
        for o in outputs.iter().filter(|o| !o.is_empty()) {
            if act.contains_key(o.as_str()) && !graph_outs.iter().any(|(g, _)| g == o) {
                emit_q(o, o, &mut names, &mut out_nodes, &mut q_out, &act);
            }
            if let Some(relu_out) = folded.get(o.as_str()) {
                emit_q(relu_out, o, &mut names, &mut out_nodes, &mut q_out, &act);
            }
        }
    }
    totals.biases_quantized = bias_inits_added;

    // 4. Initializers: keep the ones still read, add the new ones.
    let mut g = graph.clone();
    g.node = out_nodes;
    let used = crate::onnx::graph::used_names(&g);
    g.initializer.retain(|t| used.contains(t.name()));
    g.initializer.extend(new_inits);
    // Constant nodes whose weight is no longer read are dropped.
    g.node.retain(|n| n.op_type() != "Constant" || n.output.iter().any(|o| used.contains(o)));
    // Graph inputs listed for initializers that are gone (IR < 4 style) are dropped too.
    let inits: HashSet<String> = g.initializer.iter().map(|t| t.name().to_string()).collect();
    let orig_inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    g.input.retain(|vi| !orig_inits.contains(vi.name()) || inits.contains(vi.name()));
    // Value infos of removed tensors would mislead shape inference: keep only produced ones.
    let produced: HashSet<&str> = g.node.iter().flat_map(|n| n.output.iter().map(|s| s.as_str())).collect();
    g.value_info.retain(|vi| produced.contains(vi.name()));
    Ok((g, totals, reports))
}

/// A one-screen summary of a report.
pub fn summary(r: &Report) -> String {
    let t = &r.totals;
    let mut s = format!(
        "preset {}, weights {} int8, activations {}\n{} of {} nodes quantized: {} activations, {} weights, {} biases, {} Relu folded\nweights {} -> {}\n",
        r.preset,
        if r.per_channel { "per-channel" } else { "per-tensor" },
        r.activations,
        t.nodes_quantized,
        t.nodes,
        t.activations_quantized,
        t.weights_quantized,
        t.biases_quantized,
        t.relu_removed,
        crate::dump::human_bytes(t.weight_bytes_before),
        crate::dump::human_bytes(t.weight_bytes_after),
    );
    for w in &r.warnings {
        s.push_str(&format!("warning: {w}\n"));
    }
    let sentinel: Vec<&Skipped> = r.skipped.iter().filter(|k| k.reason.contains("sentinel")).collect();
    if !sentinel.is_empty() {
        s.push_str(&format!(
            "{} tensors left float because sentinel values (masks) dominate their range, e.g. '{}'\n",
            sentinel.len(),
            sentinel[0].name
        ));
    }
    let kept: Vec<&Skipped> = r.skipped.iter().filter(|k| k.reason.contains("--keep-float")).collect();
    for k in kept {
        s.push_str(&format!("kept float: '{}'\n", k.name));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(lo: f32, hi: f32) -> TensorEntry {
        TensorEntry {
            count: 1,
            min: lo as f64,
            max: hi as f64,
            mean: 0.0,
            std: 1.0,
            abs_max: lo.abs().max(hi.abs()) as f64,
            p99_9: hi as f64,
            nan: 0,
            inf: 0,
            range: [lo, hi],
            range_symmetric: [-hi, hi],
            channel_abs_max: Vec::new(),
            channels: None,
        }
    }

    /// A model of `nodes` (constants `inits`) reading the input x `[1, 4]` and writing `out`
    /// `[1, cols]`.
    fn x_model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>, out: &str, cols: i64, opset: i64) -> ModelProto {
        use crate::onnx::builder::{graph, model, tensor_info};
        let inputs = vec![tensor_info("x", dtype::FLOAT, &[1, 4])];
        model(graph("g", nodes, inputs, vec![tensor_info(out, dtype::FLOAT, &[1, cols])], inits), opset)
    }

    /// Calibrated ranges by tensor name.
    fn ranges_of(entries: &[(&str, TensorEntry)]) -> BTreeMap<String, TensorEntry> {
        entries.iter().map(|(n, e)| (n.to_string(), e.clone())).collect()
    }

    #[test]
    fn a_final_sigmoid_is_quantized_and_keeps_the_output_name() {
        let m = x_model(
            vec![node("Mul", "sq", &["x", "x"], &["m"], vec![]), node("Sigmoid", "sig", &["m"], &["y"], vec![])],
            vec![],
            "y",
            4,
            13,
        );
        let ranges: BTreeMap<String, TensorEntry> =
            ranges_of(&[("x", entry(-2.0, 2.0)), ("m", entry(0.0, 4.0)), ("y", entry(0.5, 0.98))]);
        let (q, report) = quantize(&m, &ranges, &QuantOptions::default()).unwrap();
        let g = q.graph.unwrap();
        let sig = g.node.iter().find(|n| n.name() == "sig").unwrap();
        assert_eq!(sig.input[0], "m_dequantized");
        assert_eq!(sig.output[0], "y_float");
        let dq = g.node.iter().find(|n| n.output.first().map(|o| o.as_str()) == Some("y")).unwrap();
        assert_eq!(dq.op_type(), "DequantizeLinear", "the graph output is the DequantizeLinear's");
        let y = report.tensors.iter().find(|t| t.name == "y").unwrap();
        assert_eq!(
            (y.scale.as_slice(), y.zero_point),
            ([1.0f32 / 255.0].as_slice(), 0),
            "all of [0, 1], not (0.5, 0.98)"
        );
        assert_eq!(g.output[0].name(), "y");
    }

    /// A tensor read only by HardSigmoid (through an Identity) gets its calibrated range cut to
    /// the window where HardSigmoid is not constant, one step of margin each side; one that
    /// another op also reads keeps its range.
    #[test]
    fn ranges_are_cut_to_the_readers_saturation_window() {
        use crate::onnx::builder::attr_float;
        let hs = |name: &str, x: &str, y: &str| {
            node("HardSigmoid", name, &[x], &[y], vec![attr_float("alpha", 1.0 / 6.0), attr_float("beta", 0.5)])
        };
        let m = x_model(
            vec![
                node("Mul", "mul", &["x", "x"], &["m"], vec![]),
                node("Identity", "id", &["m"], &["mi"], vec![]),
                hs("hs", "mi", "g1"),
                node("Add", "add", &["x", "x"], &["a"], vec![]),
                hs("hs2", "a", "g2"),
                node("Mul", "gate", &["g1", "a"], &["p"], vec![]),
                node("Mul", "out", &["p", "g2"], &["y"], vec![]),
            ],
            vec![],
            "y",
            4,
            13,
        );
        let ranges = ranges_of(&[
            ("x", entry(-4.0, 4.0)),
            ("m", entry(-20.0, 10.0)),
            ("mi", entry(-20.0, 10.0)),
            ("a", entry(-8.0, 8.0)),
            ("g1", entry(0.0, 1.0)),
            ("g2", entry(0.0, 1.0)),
            ("p", entry(-8.0, 8.0)),
        ]);
        let (_, report) = quantize(&m, &ranges, &QuantOptions::default()).unwrap();
        let range = |t: &str| report.tensors.iter().find(|r| r.name == t).and_then(|r| r.range).unwrap();
        let step = 6.0 / 254.0;
        let [lo, hi] = range("m");
        assert!((lo + 3.0 + step).abs() < 1e-5 && (hi - 3.0 - step).abs() < 1e-5, "m: [{lo}, {hi}]");
        assert_eq!(range("a"), [-8.0, 8.0], "a is also read by a Mul");
    }

    /// A decomposed Gelu `y = ((1 + erf(x·(1/√2)))·x)·0.5` (tensors d, e, a, p, y) and its
    /// constants.
    fn gelu_nodes() -> (Vec<NodeProto>, Vec<TensorProto>) {
        let nodes = vec![
            node("Mul", "div", &["x", "inv_sqrt2"], &["d"], vec![]),
            node("Erf", "erf", &["d"], &["e"], vec![]),
            node("Add", "add", &["e", "one"], &["a"], vec![]),
            node("Mul", "mul", &["a", "x"], &["p"], vec![]),
            node("Mul", "half", &["p", "c_half"], &["y"], vec![]),
        ];
        let c = std::f32::consts::FRAC_1_SQRT_2;
        (nodes, vec![scalar_f32("inv_sqrt2", c), scalar_f32("one", 1.0), scalar_f32("c_half", 0.5)])
    }

    /// A decomposed Gelu's input is cut below where its Erf, on the fixed grid, outputs −1
    /// (`1 + erf` is then exactly 0, and so is the product): the lowest level of x still maps
    /// the Erf to −1, and the upper side is left alone.
    #[test]
    fn a_gelu_input_is_cut_where_its_erf_saturates() {
        for (a, want) in [(0.5, 0.520_499_877_8), (2.0, 0.995_322_265_0), (-1.3, -0.934_007_944_9)] {
            assert!((erf(a) - want).abs() < 2e-7, "erf({a}) = {}", erf(a));
            assert!((erf_inverse(want) - a).abs() < 1e-5, "erf⁻¹({want}) = {}", erf_inverse(want));
        }
        let c = std::f32::consts::FRAC_1_SQRT_2;
        let (mut nodes, inits) = gelu_nodes();
        nodes.push(node("Relu", "r", &["y"], &["z"], vec![]));
        let m = x_model(nodes, inits, "z", 4, 13);
        let ranges = ranges_of(&[("x", entry(-9.0, 4.0)), ("y", entry(-0.17, 4.0))]);
        let opts = QuantOptions { preset: Preset::Cnn, ..Default::default() };
        let (_, report) = quantize(&m, &ranges, &opts).unwrap();
        let t = report.tensors.iter().find(|r| r.name == "x").unwrap();
        let [lo, hi] = t.range.unwrap();
        assert!(hi == 4.0 && lo > -3.0 && lo < -2.88, "x: [{lo}, {hi}]");
        let x = ActParams { scale: t.scale[0], zero_point: t.zero_point, ty: ActType::U8 };
        let lowest = (0 - x.zero_point) as f32 * x.scale;
        assert_eq!(UNIT_U8.quantize(erf((lowest * c) as f64) as f32), 0, "x's lowest level {lowest}");
        assert!(t.method.as_deref().unwrap_or_default().contains("saturation window"));
    }

    /// Two post-LN blocks `s = Add(x·W + b, h)`, `LayerNorm(s)`: the first branch's bias-Add
    /// output is rounded coarsely (range ±200 at std 1: 7 dB), so its group (the MatMul output
    /// too) stays float, its sum is not quantized and reads the exact LayerNorm output; the
    /// second block is quantized like ONNX Runtime's placement, sum included.
    #[test]
    fn transformer_fused_keeps_coarse_residual_groups_float() {
        use crate::onnx::tensor::vec_f32;
        let w = |name: &str, dims: &[i64], v: f32| {
            let n: i64 = dims.iter().product();
            let mut t = vec_f32(name, &vec![v; n as usize]);
            t.dims = dims.to_vec();
            t
        };
        let inits = vec![
            w("g", &[4], 1.0),
            w("beta", &[4], 0.0),
            w("w1", &[4, 4], 0.5),
            w("b1", &[4], 0.1),
            w("w2", &[4, 4], 0.25),
            w("b2", &[4], 0.2),
        ];
        let ln = |name: &str, x: &str, y: &str| node("LayerNormalization", name, &[x, "g", "beta"], &[y], vec![]);
        let nodes = vec![
            ln("ln0", "x", "h0"),
            node("MatMul", "mm1", &["h0", "w1"], &["m1"], vec![]),
            node("Add", "bias1", &["m1", "b1"], &["a1"], vec![]),
            node("Add", "sum1", &["a1", "h0"], &["s1"], vec![]),
            ln("ln1", "s1", "h1"),
            node("MatMul", "mm2", &["h1", "w2"], &["m2"], vec![]),
            node("Add", "bias2", &["m2", "b2"], &["a2"], vec![]),
            node("Add", "sum2", &["a2", "h1"], &["s2"], vec![]),
            ln("ln2", "s2", "y"),
        ];
        let m = x_model(nodes, inits, "y", 4, 17);
        let view = GraphView::new(m.graph.as_ref().unwrap());
        assert_eq!(detect_preset(&view), Preset::TransformerFused);
        let rs = residual_stream(&view, &decomposition_nodes(&view));
        let group = |t: &str| rs.groups[rs.group_of[t]].clone();
        assert_eq!(group("a1"), ["a1", "m1"]);
        assert_eq!(group("s2"), ["s2"]);
        assert!(!rs.group_of.contains_key("h0"), "a LayerNorm output is not the stream");
        let mut ranges: BTreeMap<String, TensorEntry> = ["x", "h0", "m1", "s1", "h1", "m2", "a2", "s2"]
            .into_iter()
            .map(|n| (n.to_string(), entry(-4.0, 4.0)))
            .collect();
        ranges.insert("a1".into(), entry(-200.0, 200.0));
        assert!(step_sqnr_db(&ranges["a1"], ActType::U8) < 8.0);
        assert!(step_sqnr_db(&ranges["s2"], ActType::U8) > 40.0);
        let (q, report) = quantize(&m, &ranges, &QuantOptions::default()).unwrap();
        assert_eq!(report.preset, Preset::TransformerFused);
        let quantized: BTreeSet<&str> = report.tensors.iter().map(|t| t.name.as_str()).collect();
        for t in ["h0", "h1", "m2", "a2", "s2"] {
            assert!(quantized.contains(t), "{t} quantized");
        }
        for t in ["a1", "m1", "s1"] {
            assert!(!quantized.contains(t), "{t} stays float");
        }
        let why = report.skipped.iter().find(|s| s.name == "bias1").map(|s| s.reason.as_str()).unwrap_or("");
        assert!(why.contains("residual stream") && why.contains("'a1'"), "{why}");
        let g = q.graph.unwrap();
        let reads = |name: &str| g.node.iter().find(|n| n.name() == name).unwrap().input.clone();
        assert_eq!(reads("sum1"), ["a1", "h0"], "the float sum reads the exact LayerNorm output");
        assert_eq!(reads("sum2"), ["a2_dequantized", "h1_dequantized_1"]);
        assert_eq!(reads("ln2")[0], "s2_dequantized");
    }

    /// A decomposed Gelu `((1 + erf(x/√2))·x)·0.5` feeding a MatMul: only x and the Gelu's
    /// output have their range read (the Erf output is fixed, the rest derived, the product
    /// from the output); the model is the one all ranges give. When the output stays float,
    /// the product takes its own range.
    #[test]
    fn a_decomposed_gelu_reads_only_its_input_and_output_ranges() {
        use crate::onnx::tensor::vec_f32;
        let mut w = vec_f32("w", &[0.5; 8]);
        w.dims = vec![4, 2];
        let (mut nodes, mut inits) = gelu_nodes();
        nodes.push(node("MatMul", "mm", &["y", "w"], &["z"], vec![]));
        inits.push(w);
        let m = x_model(nodes, inits, "z", 2, 13);
        let opts = QuantOptions { preset: Preset::Cnn, ..Default::default() };
        let needs = range_needs(&m, &opts).unwrap();
        let from = |t: &str| ParamSource::DerivedFrom(t.into());
        let expected = [("x", ParamSource::Range), ("d", from("x")), ("e", ParamSource::Fixed), ("a", from("e"))];
        for (t, src) in expected.into_iter().chain([("p", from("y")), ("y", ParamSource::Range)]) {
            assert_eq!(needs.sources.get(t), Some(&src), "{t}");
        }
        assert_eq!(needs.ranges_read, ["x", "y"].map(String::from).into_iter().collect());
        // Ranges as calibration measures them: y's exactly half of p's.
        let all = ranges_of(&[
            ("x", entry(-4.0, 4.0)),
            ("d", entry(-2.8, 2.8)),
            ("e", entry(-1.0, 1.0)),
            ("a", entry(0.0, 2.0)),
            ("p", entry(-0.34, 8.0)),
            ("y", entry(-0.17, 4.0)),
        ]);
        let read: BTreeMap<String, TensorEntry> =
            all.iter().filter(|(t, _)| needs.ranges_read.contains(*t)).map(|(t, e)| (t.clone(), e.clone())).collect();
        let (q_all, r_all) = quantize(&m, &all, &opts).unwrap();
        let (q_read, r_read) = quantize(&m, &read, &opts).unwrap();
        assert_eq!(q_all, q_read, "the same model from the ranges read alone");
        let params = |r: &Report, t: &str| {
            let t = r.tensors.iter().find(|x| x.name == t).unwrap();
            (t.scale[0], t.zero_point, t.method.clone().unwrap_or_default())
        };
        let (sp, zp, how) = params(&r_read, "p");
        assert_eq!((sp, zp, how.as_str()), (params(&r_all, "y").0 * 2.0, params(&r_all, "y").1, "derived from y"));
        // y kept float: p takes its own range, which is then read.
        let keep = QuantOptions { keep_float: ["y".to_string()].into(), ..opts };
        let needs = range_needs(&m, &keep).unwrap();
        assert_eq!(needs.sources.get("p"), Some(&ParamSource::Range));
        assert!(needs.ranges_read.contains("p") && !needs.sources.contains_key("y"));
        let (_, r) = quantize(&m, &all, &keep).unwrap();
        assert_eq!(params(&r, "p").0, ActParams::from_range(-0.34, 8.0, ActType::U8).scale);
    }

    /// A Relu folded into its producer's Q: the producer's output range is not read (the
    /// Relu output's is); an excluded Relu does not fold, and then it is.
    #[test]
    fn a_folded_relu_input_needs_no_range() {
        use crate::onnx::tensor::vec_f32;
        let w = |name: &str| {
            let mut t = vec_f32(name, &[0.5; 16]);
            t.dims = vec![4, 4];
            t
        };
        let nodes = vec![
            node("MatMul", "mm1", &["x", "w1"], &["h"], vec![]),
            node("Relu", "relu", &["h"], &["r"], vec![]),
            node("MatMul", "mm2", &["r", "w2"], &["z"], vec![]),
        ];
        let m = x_model(nodes, vec![w("w1"), w("w2")], "z", 4, 13);
        let all = ranges_of(&[("x", entry(-1.0, 1.0)), ("h", entry(-3.0, 2.0)), ("r", entry(0.0, 2.0))]);
        for (exclude, read) in [(vec![], vec!["r", "x"]), (vec!["relu".to_string()], vec!["h", "r", "x"])] {
            let opts = QuantOptions { preset: Preset::Cnn, exclude, ..Default::default() };
            let needs = range_needs(&m, &opts).unwrap();
            assert_eq!(needs.ranges_read.iter().map(|t| t.as_str()).collect::<Vec<_>>(), read);
            let only: BTreeMap<String, TensorEntry> = all
                .iter()
                .filter(|(t, _)| needs.ranges_read.contains(*t))
                .map(|(t, e)| (t.clone(), e.clone()))
                .collect();
            let (q, r) = quantize(&m, &only, &opts).unwrap();
            assert_eq!(q, quantize(&m, &all, &opts).unwrap().0, "the same model from the ranges read alone");
            assert_eq!(r.totals.relu_removed, usize::from(read.len() == 2));
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("conv*", "conv1"));
        assert!(glob_match("*dense*", "/encoder/layer.0/output/dense/MatMul"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("conv", "conv1"));
    }
}
