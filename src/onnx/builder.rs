//! Small constructors for ONNX messages, shared by the rewriters, the fixture generator and
//! tests, so nobody spells out proto2 `Option` fields by hand.

use super::pb::{
    attribute_proto::AttributeType, tensor_shape_proto::dimension::Value as DimValue, tensor_shape_proto::Dimension,
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};

/// A dimension of a declared shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    Fixed(i64),
    Named(String),
    Unknown,
}

impl From<i64> for Dim {
    fn from(v: i64) -> Self {
        Dim::Fixed(v)
    }
}

impl From<&str> for Dim {
    fn from(v: &str) -> Self {
        Dim::Named(v.to_string())
    }
}

pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.to_string()),
        name: Some(name.to_string()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn attr(name: &str, ty: AttributeType) -> AttributeProto {
    AttributeProto { name: Some(name.to_string()), r#type: Some(ty as i32), ..Default::default() }
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { i: Some(v), ..attr(name, AttributeType::Int) }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { ints: v.to_vec(), ..attr(name, AttributeType::Ints) }
}

pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { f: Some(v), ..attr(name, AttributeType::Float) }
}

pub fn attr_floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto { floats: v.to_vec(), ..attr(name, AttributeType::Floats) }
}

pub fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto { s: Some(v.as_bytes().to_vec()), ..attr(name, AttributeType::String) }
}

pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto { t: Some(t), ..attr(name, AttributeType::Tensor) }
}

/// A `ValueInfoProto` for a tensor of `elem_type` (ONNX code) and shape; `None` = unknown rank.
pub fn value_info(name: &str, elem_type: i32, dims: Option<&[Dim]>) -> ValueInfoProto {
    let shape = dims.map(|dims| TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                value: match d {
                    Dim::Fixed(v) => Some(DimValue::DimValue(*v)),
                    Dim::Named(s) => Some(DimValue::DimParam(s.clone())),
                    Dim::Unknown => None,
                },
                ..Default::default()
            })
            .collect(),
    });
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: Some(elem_type), shape })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Shorthand for a fixed-shape tensor `ValueInfoProto`.
pub fn tensor_info(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
    let d: Vec<Dim> = dims.iter().map(|&v| Dim::Fixed(v)).collect();
    value_info(name, elem_type, Some(&d))
}

/// A model around `graph` importing the default domain at `opset`.
pub fn model(graph: GraphProto, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("onnxq".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(graph),
        ..Default::default()
    }
}

pub fn graph(
    name: &str,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
) -> GraphProto {
    GraphProto {
        name: Some(name.to_string()),
        node: nodes,
        input: inputs,
        output: outputs,
        initializer: initializers,
        ..Default::default()
    }
}

/// Reads declared dims of a `ValueInfoProto` (None when it is not a tensor or has no shape).
pub fn dims_of(vi: &ValueInfoProto) -> Option<Vec<Dim>> {
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else { return None };
    let shape = t.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .map(|d| match &d.value {
                Some(DimValue::DimValue(v)) => Dim::Fixed(*v),
                Some(DimValue::DimParam(s)) if !s.is_empty() => Dim::Named(s.clone()),
                _ => Dim::Unknown,
            })
            .collect(),
    )
}

/// The element type code of a `ValueInfoProto` (0 when unknown or not a tensor).
pub fn elem_type_of(vi: &ValueInfoProto) -> i32 {
    match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t.elem_type(),
        _ => 0,
    }
}

/// `[1,3,"batch",?]` style rendering of declared dims.
pub fn format_dims(dims: &Option<Vec<Dim>>) -> String {
    match dims {
        None => "?".to_string(),
        Some(d) => {
            let parts: Vec<String> = d
                .iter()
                .map(|d| match d {
                    Dim::Fixed(v) => v.to_string(),
                    Dim::Named(s) => s.clone(),
                    Dim::Unknown => "?".to_string(),
                })
                .collect();
            format!("[{}]", parts.join(","))
        }
    }
}
