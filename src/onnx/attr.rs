//! Typed access to node attributes. Every error names the node, its op type and the
//! attribute: `node 'conv1' (Conv), attribute 'axis': expected int`.

use super::pb::{attribute_proto::AttributeType, AttributeProto, NodeProto, TensorProto};
use anyhow::{bail, Result};

/// `node 'NAME' (OP)`, the way every message of the crate names a node.
pub fn describe(node: &NodeProto) -> String {
    format!("node '{}' ({})", node.name(), node.op_type())
}

/// The attribute's type, inferred from the populated field when `type` is missing (old models).
pub fn attr_type(a: &AttributeProto) -> AttributeType {
    if a.r#type.is_some() {
        return a.r#type();
    }
    if a.f.is_some() {
        AttributeType::Float
    } else if a.i.is_some() {
        AttributeType::Int
    } else if a.s.is_some() {
        AttributeType::String
    } else if a.t.is_some() {
        AttributeType::Tensor
    } else if a.g.is_some() {
        AttributeType::Graph
    } else if !a.floats.is_empty() {
        AttributeType::Floats
    } else if !a.ints.is_empty() {
        AttributeType::Ints
    } else if !a.strings.is_empty() {
        AttributeType::Strings
    } else if !a.tensors.is_empty() {
        AttributeType::Tensors
    } else {
        AttributeType::Undefined
    }
}

/// Typed attribute getters on a node. `Ok(None)` means the attribute is absent.
pub trait NodeAttrs {
    fn attr(&self, name: &str) -> Option<&AttributeProto>;
    fn attr_int(&self, name: &str) -> Result<Option<i64>>;
    fn attr_ints(&self, name: &str) -> Result<Option<&[i64]>>;
    fn attr_float(&self, name: &str) -> Result<Option<f32>>;
    fn attr_floats(&self, name: &str) -> Result<Option<&[f32]>>;
    fn attr_string(&self, name: &str) -> Result<Option<String>>;
    fn attr_tensor(&self, name: &str) -> Result<Option<&TensorProto>>;
    fn attr_int_or(&self, name: &str, default: i64) -> Result<i64> {
        Ok(self.attr_int(name)?.unwrap_or(default))
    }
    fn attr_float_or(&self, name: &str, default: f32) -> Result<f32> {
        Ok(self.attr_float(name)?.unwrap_or(default))
    }
}

fn wrong(node: &NodeProto, a: &AttributeProto, expected: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{}, attribute '{}': expected {expected}, found {}",
        describe(node),
        a.name(),
        attr_type(a).as_str_name().to_ascii_lowercase()
    )
}

impl NodeAttrs for NodeProto {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute.iter().find(|a| a.name() == name)
    }

    fn attr_int(&self, name: &str) -> Result<Option<i64>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if attr_type(a) == AttributeType::Int => Ok(Some(a.i())),
            Some(a) => Err(wrong(self, a, "int")),
        }
    }

    fn attr_ints(&self, name: &str) -> Result<Option<&[i64]>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if matches!(attr_type(a), AttributeType::Ints | AttributeType::Undefined) => Ok(Some(&a.ints)),
            Some(a) => Err(wrong(self, a, "ints")),
        }
    }

    fn attr_float(&self, name: &str) -> Result<Option<f32>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if attr_type(a) == AttributeType::Float => Ok(Some(a.f())),
            Some(a) => Err(wrong(self, a, "float")),
        }
    }

    fn attr_floats(&self, name: &str) -> Result<Option<&[f32]>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if matches!(attr_type(a), AttributeType::Floats | AttributeType::Undefined) => Ok(Some(&a.floats)),
            Some(a) => Err(wrong(self, a, "floats")),
        }
    }

    fn attr_string(&self, name: &str) -> Result<Option<String>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if attr_type(a) == AttributeType::String => match std::str::from_utf8(a.s()) {
                Ok(s) => Ok(Some(s.to_string())),
                Err(_) => bail!("{}, attribute '{}': string is not UTF-8", describe(self), name),
            },
            Some(a) => Err(wrong(self, a, "string")),
        }
    }

    fn attr_tensor(&self, name: &str) -> Result<Option<&TensorProto>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if attr_type(a) == AttributeType::Tensor => match a.t.as_ref() {
                Some(t) => Ok(Some(t)),
                None => bail!("{}, attribute '{}': tensor missing", describe(self), name),
            },
            Some(a) => Err(wrong(self, a, "tensor")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_int, attr_string, node};

    #[test]
    fn typed_getters_name_node_and_attribute() {
        let n = node("Conv", "conv1", &["x", "w"], &["y"], vec![attr_string("axis", "oops"), attr_int("group", 2)]);
        let err = n.attr_int("axis").unwrap_err().to_string();
        assert_eq!(err, "node 'conv1' (Conv), attribute 'axis': expected int, found string");
        assert_eq!(n.attr_int("group").unwrap(), Some(2));
        assert_eq!(n.attr_int_or("missing", 7).unwrap(), 7);
        assert!(n.attr_float("group").is_err());
    }
}
