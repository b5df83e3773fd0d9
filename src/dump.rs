//! `onnxq dump`: a readable (or JSON) account of a model: header, inputs and outputs, op
//! histogram, node table, weights (initializers and Constant tensors) with optional value
//! statistics, totals, and a producer/consumer view of chosen nodes.

use crate::array::dtype;
use crate::onnx::attr::attr_type;
use crate::onnx::builder::{dims_of, elem_type_of, format_dims};
use crate::onnx::pb::{attribute_proto::AttributeType, AttributeProto, TensorProto};
use crate::onnx::{GraphView, Model};
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    pub weights: bool,
    pub nodes: Vec<String>,
}

#[derive(Serialize)]
pub struct Dump {
    pub ir_version: i64,
    pub opset_import: Vec<Opset>,
    pub producer_name: String,
    pub producer_version: String,
    pub graph_name: String,
    pub file_bytes: u64,
    pub external_tensors: usize,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub op_histogram: BTreeMap<String, usize>,
    pub nodes: Vec<NodeInfo>,
    pub weights: Vec<WeightInfo>,
    pub totals: Totals,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selected: Vec<NodeDetail>,
}

#[derive(Serialize)]
pub struct Opset {
    pub domain: String,
    pub version: i64,
}

#[derive(Serialize)]
pub struct IoInfo {
    pub name: String,
    pub dtype: String,
    pub shape: String,
}

#[derive(Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Serialize)]
pub struct WeightInfo {
    pub name: String,
    /// "initializer" or "constant"
    pub kind: &'static str,
    pub dtype: String,
    pub shape: Vec<i64>,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<ValueStats>,
}

#[derive(Serialize, Clone, Copy)]
pub struct ValueStats {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
    pub abs_max: f64,
}

#[derive(Serialize)]
pub struct Totals {
    pub nodes: usize,
    pub weights: usize,
    pub parameters: u64,
    pub weight_bytes: u64,
}

#[derive(Serialize)]
pub struct NodeDetail {
    pub node: NodeInfo,
    /// For each input: (tensor, producing node or "graph input"/"initializer"/"constant").
    pub producers: Vec<(String, String)>,
    /// For each output: the consuming nodes.
    pub consumers: Vec<(String, Vec<String>)>,
}

fn render_attr(a: &AttributeProto) -> String {
    let list = |v: Vec<String>| {
        if v.len() > 8 {
            format!("[{}, ... ({} values)]", v[..8].join(","), v.len())
        } else {
            format!("[{}]", v.join(","))
        }
    };
    match attr_type(a) {
        AttributeType::Int => a.i().to_string(),
        AttributeType::Float => format!("{}", a.f()),
        AttributeType::String => format!("\"{}\"", String::from_utf8_lossy(a.s())),
        AttributeType::Ints => list(a.ints.iter().map(|v| v.to_string()).collect()),
        AttributeType::Floats => list(a.floats.iter().map(|v| v.to_string()).collect()),
        AttributeType::Strings => {
            list(a.strings.iter().map(|s| format!("\"{}\"", String::from_utf8_lossy(s))).collect())
        }
        AttributeType::Tensor => match &a.t {
            Some(t) => format!("<tensor {} {:?}>", dtype::name(t.data_type()), t.dims),
            None => "<tensor>".into(),
        },
        AttributeType::Graph => "<graph>".into(),
        AttributeType::Graphs => format!("<{} graphs>", a.graphs.len()),
        other => format!("<{}>", other.as_str_name().to_ascii_lowercase()),
    }
}

/// Number of elements declared by a tensor's dims (saturating on absurd declarations).
pub fn element_count(t: &TensorProto) -> u64 {
    t.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d.max(0) as u64))
}

/// Bytes of a tensor's payload.
pub fn tensor_bytes(t: &TensorProto) -> u64 {
    if let Some(r) = &t.raw_data {
        return r.len() as u64;
    }
    let n = element_count(t);
    dtype::size(t.data_type()).map(|s| n.saturating_mul(s as u64)).unwrap_or(0)
}

fn value_stats(t: &TensorProto) -> Option<ValueStats> {
    let a = crate::onnx::tensor::to_f32(t).ok()?;
    if a.is_empty() {
        return None;
    }
    let (mut min, mut max, mut sum, mut sq) = (f64::INFINITY, f64::NEG_INFINITY, 0f64, 0f64);
    for &v in a.iter() {
        let v = v as f64;
        min = min.min(v);
        max = max.max(v);
        sum += v;
        sq += v * v;
    }
    let n = a.len() as f64;
    let mean = sum / n;
    let std = (sq / n - mean * mean).max(0.0).sqrt();
    Some(ValueStats { min, max, mean, std, abs_max: min.abs().max(max.abs()) })
}

fn node_info(n: &crate::onnx::pb::NodeProto) -> NodeInfo {
    NodeInfo {
        name: n.name().to_string(),
        op_type: if n.domain().is_empty() {
            n.op_type().to_string()
        } else {
            format!("{}::{}", n.domain(), n.op_type())
        },
        inputs: n.input.clone(),
        outputs: n.output.clone(),
        attributes: n.attribute.iter().map(|a| (a.name().to_string(), render_attr(a))).collect(),
    }
}

pub fn build(model: &Model, opts: &DumpOptions) -> Result<Dump> {
    let p = &model.proto;
    let Some(g) = p.graph.as_ref() else { bail!("the model has no graph") };
    let view = GraphView::new(g);
    let io = |vi: &crate::onnx::pb::ValueInfoProto| IoInfo {
        name: vi.name().to_string(),
        dtype: dtype::name(elem_type_of(vi)).to_string(),
        shape: format_dims(&dims_of(vi)),
    };
    let init_names: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    let inputs = g.input.iter().filter(|i| !init_names.contains(i.name())).map(io).collect();
    let outputs = g.output.iter().map(io).collect();
    let mut op_histogram = BTreeMap::new();
    for n in &g.node {
        *op_histogram.entry(node_info(n).op_type).or_insert(0) += 1;
    }
    let nodes: Vec<NodeInfo> = g.node.iter().map(node_info).collect();
    let mut weights = Vec::new();
    let mut push = |t: &TensorProto, name: &str, kind| {
        weights.push(WeightInfo {
            name: name.to_string(),
            kind,
            dtype: dtype::name(t.data_type()).to_string(),
            shape: t.dims.clone(),
            bytes: tensor_bytes(t),
            stats: if opts.weights { value_stats(t) } else { None },
        })
    };
    for t in &g.initializer {
        push(t, t.name(), "initializer");
    }
    for n in &g.node {
        if n.op_type() == "Constant" {
            if let Some(o) = n.output.first() {
                if let Some(t) = view.constant(o) {
                    push(t, o, "constant");
                }
            }
        }
    }
    let totals = Totals {
        nodes: g.node.len(),
        weights: weights.len(),
        parameters: weights.iter().map(|w| w.shape.iter().fold(1u64, |a, &d| a.saturating_mul(d.max(0) as u64))).sum(),
        weight_bytes: weights.iter().map(|w| w.bytes).sum(),
    };
    let mut selected = Vec::new();
    for want in &opts.nodes {
        let Some(n) = g.node.iter().find(|n| n.name() == want) else {
            bail!("no node named '{want}' in the model");
        };
        let producers = n
            .input
            .iter()
            .filter(|i| !i.is_empty())
            .map(|i| {
                let from = match view.origin(i) {
                    Some(crate::onnx::graph::Origin::GraphInput) => "graph input".to_string(),
                    Some(crate::onnx::graph::Origin::Initializer) => "initializer".to_string(),
                    Some(crate::onnx::graph::Origin::Node { node, .. }) => {
                        let p = &g.node[node];
                        if p.op_type() == "Constant" {
                            format!("constant '{}'", p.name())
                        } else {
                            format!("'{}' ({})", p.name(), p.op_type())
                        }
                    }
                    None => "unresolved".to_string(),
                };
                (i.clone(), from)
            })
            .collect();
        let consumers = n
            .output
            .iter()
            .map(|o| {
                let mut users: Vec<String> = view
                    .consumers(o)
                    .iter()
                    .map(|&(c, _)| format!("'{}' ({})", g.node[c].name(), g.node[c].op_type()))
                    .collect();
                if view.is_graph_output(o) {
                    users.push("graph output".into());
                }
                (o.clone(), users)
            })
            .collect();
        selected.push(NodeDetail { node: node_info(n), producers, consumers });
    }
    Ok(Dump {
        ir_version: p.ir_version(),
        opset_import: p
            .opset_import
            .iter()
            .map(|o| Opset { domain: o.domain().to_string(), version: o.version() })
            .collect(),
        producer_name: p.producer_name().to_string(),
        producer_version: p.producer_version().to_string(),
        graph_name: g.name().to_string(),
        file_bytes: model.file_size,
        external_tensors: model.external_tensors,
        inputs,
        outputs,
        op_histogram,
        nodes,
        weights,
        totals,
        selected,
    })
}

/// Human-readable bytes (`1.5 MiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn node_line(out: &mut String, n: &NodeInfo) {
    let attrs: Vec<String> = n.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        out,
        "  {:<28} {:<20} {} -> {}{}",
        n.name,
        n.op_type,
        n.inputs.join(", "),
        n.outputs.join(", "),
        if attrs.is_empty() { String::new() } else { format!("  {{{}}}", attrs.join(", ")) }
    );
}

pub fn render_text(d: &Dump) -> String {
    let mut out = String::new();
    let opsets: Vec<String> = d
        .opset_import
        .iter()
        .map(|o| format!("{}:{}", if o.domain.is_empty() { "ai.onnx" } else { &o.domain }, o.version))
        .collect();
    let _ = writeln!(out, "ir_version {}  opset {}", d.ir_version, opsets.join(" "));
    let _ = writeln!(out, "producer   {} {}", d.producer_name, d.producer_version);
    let _ = writeln!(out, "graph      {}", d.graph_name);
    let ext = if d.external_tensors > 0 {
        format!(" ({} tensors in external data)", d.external_tensors)
    } else {
        String::new()
    };
    let _ = writeln!(out, "file size  {}{}", human_bytes(d.file_bytes), ext);
    let _ = writeln!(out, "\ninputs:");
    for i in &d.inputs {
        let _ = writeln!(out, "  {:<28} {:<8} {}", i.name, i.dtype, i.shape);
    }
    let _ = writeln!(out, "outputs:");
    for i in &d.outputs {
        let _ = writeln!(out, "  {:<28} {:<8} {}", i.name, i.dtype, i.shape);
    }
    let _ = writeln!(out, "\nops ({} nodes):", d.totals.nodes);
    let mut hist: Vec<(&String, &usize)> = d.op_histogram.iter().collect();
    hist.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in hist {
        let _ = writeln!(out, "  {op:<24} {n}");
    }
    let _ = writeln!(out, "\nnodes:");
    for n in &d.nodes {
        node_line(&mut out, n);
    }
    let _ = writeln!(out, "\nweights:");
    for w in &d.weights {
        let shape = format!("{:?}", w.shape);
        let _ =
            write!(out, "  {:<36} {:<11} {:<8} {:<18} {:>10}", w.name, w.kind, w.dtype, shape, human_bytes(w.bytes));
        if let Some(s) = &w.stats {
            let _ = write!(
                out,
                "  min {:.4} max {:.4} mean {:.4} std {:.4} absmax {:.4}",
                s.min, s.max, s.mean, s.std, s.abs_max
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "\ntotals: {} nodes, {} weights, {} parameters, {}",
        d.totals.nodes,
        d.totals.weights,
        d.totals.parameters,
        human_bytes(d.totals.weight_bytes)
    );
    for s in &d.selected {
        let _ = writeln!(out, "\nnode '{}' ({})", s.node.name, s.node.op_type);
        for (k, v) in &s.node.attributes {
            let _ = writeln!(out, "  attribute {k} = {v}");
        }
        for (t, from) in &s.producers {
            let _ = writeln!(out, "  input  {t:<28} <- {from}");
        }
        for (t, users) in &s.consumers {
            let users = if users.is_empty() { "(unused)".to_string() } else { users.join(", ") };
            let _ = writeln!(out, "  output {t:<28} -> {users}");
        }
    }
    out
}
