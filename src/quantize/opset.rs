//! Upgrading the default-domain opset to 13, which per-axis QuantizeLinear/DequantizeLinear
//! need. Real exports are often opset 11. Only the ops whose signature or semantics changed
//! between 11 and 13 are rewritten: Squeeze/Unsqueeze/ReduceSum `axes` and Split `split`
//! move from attribute to input; Dropout's `ratio` attribute is dropped (inference is the
//! identity); Softmax/LogSoftmax/Hardmax are kept only when they act on the last axis (their
//! 2-D coercion changed at 13). Anything else that blocks the upgrade is an error naming
//! the node, and the caller falls back to per-tensor weights. Every other op keeps its
//! meaning across 11–13 (its later versions only add types or optional inputs), so when no
//! node needed a rewrite the upgrade only changes the version number; otherwise the caller
//! checks that the upgraded float model gives the same outputs as the original on a sample.

use crate::onnx::attr::NodeAttrs;
use crate::onnx::builder::Dim;
use crate::onnx::pb::ModelProto;
use crate::onnx::tensor::vec_i64;
use crate::onnx::{describe, GraphView, NameAlloc};
use anyhow::{bail, Context, Result};

/// The model at opset 13 and the number of nodes whose signature had to be rewritten.
pub fn upgrade_to_13(model: &ModelProto) -> Result<(ModelProto, usize)> {
    let from = super::default_opset(model);
    if from >= 13 {
        return Ok((model.clone(), 0));
    }
    if from < 11 {
        bail!("upgrading from opset {from} is not supported (only 11 and 12)");
    }
    let mut m = model.clone();
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let view = GraphView::new(graph);
    let mut names = NameAlloc::new(graph);
    let mut new_inits = Vec::new();
    let g = m.graph.as_mut().context("the model has no graph")?;
    let mut rewritten = 0;
    for n in g.node.iter_mut() {
        if !n.domain().is_empty() && n.domain() != "ai.onnx" {
            continue;
        }
        match n.op_type() {
            "Squeeze" | "Unsqueeze" | "ReduceSum" => {
                if let Some(axes) = n.attr_ints("axes")? {
                    let axes = axes.to_vec();
                    let name =
                        names.fresh(&format!("{}_axes", if n.name().is_empty() { n.op_type() } else { n.name() }));
                    new_inits.push(vec_i64(&name, &axes));
                    n.attribute.retain(|a| a.name() != "axes");
                    if n.input.is_empty() {
                        bail!("{} has no data input", describe(n));
                    }
                    n.input.truncate(1);
                    n.input.push(name);
                    rewritten += 1;
                }
            }
            "Split" => {
                if let Some(split) = n.attr_ints("split")? {
                    let split = split.to_vec();
                    let name = names.fresh(&format!("{}_split", if n.name().is_empty() { "Split" } else { n.name() }));
                    new_inits.push(vec_i64(&name, &split));
                    n.attribute.retain(|a| a.name() != "split");
                    n.input.truncate(1);
                    n.input.push(name);
                    rewritten += 1;
                }
            }
            "Dropout" => {
                let before = n.attribute.len();
                n.attribute.retain(|a| a.name() != "ratio");
                rewritten += usize::from(n.attribute.len() != before);
            }
            "Softmax" | "LogSoftmax" | "Hardmax" => {
                let axis = n.attr_int_or("axis", 1)?;
                if axis != -1 {
                    let rank = n.input.first().and_then(|i| view.shape(i)).map(|d: Vec<Dim>| d.len() as i64);
                    match rank {
                        Some(r) if axis == r - 1 => {}
                        Some(r) => bail!(
                            "{} works on axis {axis} of a rank-{r} tensor, whose meaning changed at opset 13",
                            describe(n)
                        ),
                        None => bail!("{}: the input rank is unknown, so axis {axis} cannot be upgraded", describe(n)),
                    }
                }
            }
            "Upsample" | "Scatter" => bail!("{} was removed from the standard after opset 11", describe(n)),
            _ => {}
        }
    }
    g.initializer.extend(new_inits);
    for o in m.opset_import.iter_mut() {
        if o.domain().is_empty() || o.domain() == "ai.onnx" {
            o.version = Some(13);
        }
    }
    if m.ir_version() < 7 {
        m.ir_version = Some(7);
    }
    Ok((m, rewritten))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::array::dtype;
    use crate::onnx::builder::{attr_int, attr_ints, graph, model, node, tensor_info};

    #[test]
    fn axes_move_to_inputs_and_softmax_is_checked() {
        let g = graph(
            "g",
            vec![
                node("Unsqueeze", "u", &["x"], &["y"], vec![attr_ints("axes", &[0])]),
                node("Softmax", "s", &["y"], &["z"], vec![attr_int("axis", 2)]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[2, 3])],
            vec![tensor_info("z", dtype::FLOAT, &[1, 2, 3])],
            vec![],
        );
        let mut g2 = g.clone();
        g2.value_info.push(tensor_info("y", dtype::FLOAT, &[1, 2, 3]));
        let m = model(g2, 11);
        let (up, rewritten) = upgrade_to_13(&m).unwrap();
        assert_eq!(rewritten, 1);
        let gu = up.graph.as_ref().unwrap();
        assert_eq!(gu.node[0].input, vec!["x".to_string(), "u_axes".to_string()]);
        assert!(gu.node[0].attribute.is_empty());
        assert_eq!(super::super::default_opset(&up), 13);
        // Without a known rank the Softmax blocks the upgrade, naming the node.
        let err = upgrade_to_13(&model(g, 11)).unwrap_err().to_string();
        assert!(err.contains("node 's' (Softmax)"), "{err}");
    }
}
