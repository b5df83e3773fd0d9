//! Float-exact graph clean-up before calibration, so every value is quantized once:
//! - `Identity` nodes are removed (consumers read the Identity's input), except those that
//!   produce a graph output;
//! - a `Conv` followed by an `Add` of a per-channel (or scalar) constant is folded into the
//!   convolution's bias (exporters such as Paddle's emit the bias as a separate Add, which
//!   would otherwise put a second quantizer between Conv and Relu and keep ONNX Runtime from
//!   fusing QLinearConv with an int32 bias). A `ConvTranspose`'s bias Add is left alone:
//!   ONNX Runtime has no fused int8 ConvTranspose, so the transposed convolution runs in float
//!   either way, and the separate Add fuses into a QLinearAdd.
//!
//! - a `Div` by a one-element constant `c` becomes a `Mul` by `1/c` (ONNX Runtime fuses
//!   QLinearMul but has no int8 Div: the attention scale `QKᵀ/√d` and Gelu's `x/√2` would
//!   otherwise run in float between a DequantizeLinear and a QuantizeLinear).
//!
//! The first two rewrites are exact in float arithmetic up to the order of one addition, the
//! third up to one rounding of `1/c`.

use crate::array::dtype;
use crate::onnx::graph::Origin;
use crate::onnx::pb::ModelProto;
use crate::onnx::tensor::{from_f32, to_f32};
use crate::onnx::{GraphView, NameAlloc};
use anyhow::{Context, Result};
use ndarray::{ArrayD, IxDyn};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Prepared {
    pub identities_removed: usize,
    pub biases_folded: usize,
    pub divisions_as_products: usize,
}

/// The per-channel values of a constant that broadcasts along axis 1 of a rank-`rank`
/// tensor with `c` channels, or None when it does not have that shape.
fn channel_values(t: &crate::onnx::pb::TensorProto, rank: usize, c: usize) -> Option<Vec<f32>> {
    if t.data_type() != dtype::FLOAT {
        return None;
    }
    let a = to_f32(t).ok()?;
    let dims = a.shape();
    if a.len() == 1 {
        return Some(vec![a.iter().next().copied()?; c]);
    }
    if dims.len() > rank || a.len() != c {
        return None;
    }
    // Right-aligned broadcasting: the channel axis of the output sits at index
    // dims.len() - (rank - 1) of the constant.
    let ch = dims.len().checked_sub(rank - 1)?;
    if dims.iter().enumerate().all(|(i, &d)| if i == ch { d == c } else { d == 1 }) {
        Some(a.iter().copied().collect())
    } else {
        None
    }
}

pub fn prepare(model: &ModelProto) -> Result<(ModelProto, Prepared)> {
    let mut m = model.clone();
    let mut stats = Prepared::default();
    let g = m.graph.as_mut().context("the model has no graph")?;

    // 1. Identity removal.
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name().to_string()).collect();
    let mut alias: HashMap<String, String> = HashMap::new();
    g.node.retain(|n| {
        if n.op_type() == "Identity"
            && n.domain().is_empty()
            && n.input.len() == 1
            && n.output.len() == 1
            && !outputs.contains(&n.output[0])
        {
            alias.insert(n.output[0].clone(), n.input[0].clone());
            stats.identities_removed += 1;
            false
        } else {
            true
        }
    });
    let resolve = |mut s: String| {
        while let Some(a) = alias.get(&s) {
            s = a.clone();
        }
        s
    };
    for n in g.node.iter_mut() {
        for i in n.input.iter_mut() {
            if alias.contains_key(i.as_str()) {
                *i = resolve(i.clone());
            }
        }
    }
    g.value_info.retain(|vi| !alias.contains_key(vi.name()));

    // 2. Conv + Add(constant) -> Conv with bias.
    loop {
        let snapshot = g.clone();
        let view = GraphView::new(&snapshot);
        let mut names = NameAlloc::new(&snapshot);
        let mut fold: Option<(usize, usize, Vec<f32>, usize)> = None;
        for (ai, add) in snapshot.node.iter().enumerate() {
            if add.op_type() != "Add" || add.input.len() != 2 || add.output.len() != 1 || !add.domain().is_empty() {
                continue;
            }
            for (x, cst) in [(0usize, 1usize), (1, 0)] {
                let Some(Origin::Node { node: ci, .. }) = view.origin(&add.input[x]) else { continue };
                let conv = &snapshot.node[ci];
                if conv.op_type() != "Conv" || !conv.domain().is_empty() {
                    continue;
                }
                let out = &conv.output[0];
                if view.consumers(out).len() != 1 || view.is_graph_output(out) {
                    continue;
                }
                let Some(w) = conv.input.get(1).and_then(|w| view.weight(w)) else { continue };
                let Some(c) = w.dims.first().and_then(|&c| usize::try_from(c).ok()) else { continue };
                let rank = w.dims.len();
                let Some(k) = view.weight(&add.input[cst]) else { continue };
                let Some(vals) = channel_values(k, rank, c) else { continue };
                fold = Some((ci, ai, vals, c));
                break;
            }
            if fold.is_some() {
                break;
            }
        }
        let Some((ci, ai, vals, c)) = fold else { break };
        let conv = snapshot.node[ci].clone();
        let add_out = snapshot.node[ai].output[0].clone();
        let old_bias = match conv.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => {
                let t = view
                    .weight(b)
                    .with_context(|| format!("bias '{b}' of {} is not a constant", crate::onnx::describe(&conv)))?;
                to_f32(t)?.iter().copied().collect::<Vec<f32>>()
            }
            None => vec![0.0; c],
        };
        if old_bias.len() != c {
            break;
        }
        let bias: Vec<f32> = old_bias.iter().zip(&vals).map(|(a, b)| a + b).collect();
        let bname = names.fresh(&format!("{}_bias", if conv.name().is_empty() { "conv" } else { conv.name() }));
        g.initializer.push(from_f32(&bname, &ArrayD::from_shape_vec(IxDyn(&[c]), bias).unwrap_or_default()));
        let n = &mut g.node[ci];
        n.input.resize(2, String::new());
        n.input.push(bname);
        n.output[0] = add_out;
        g.node.remove(ai);
        stats.biases_folded += 1;
    }
    // 3. Div by a one-element constant -> Mul by its reciprocal (ONNX Runtime fuses Mul, not
    // Div, into an int8 kernel; `x·(1/c)` differs from `x/c` by at most one rounding).
    let mut reciprocals: HashMap<String, String> = HashMap::new();
    let mut names = NameAlloc::new(g);
    let weights: HashMap<String, (f32, Vec<usize>)> = {
        let view = GraphView::new(g);
        g.node
            .iter()
            .filter(|n| n.op_type() == "Div" && n.domain().is_empty() && n.input.len() == 2)
            .filter_map(|n| {
                let t = view.weight(&n.input[1])?;
                // Only a one-element divisor is decoded (a big constant is not copied to find out).
                let one = t.data_type() == dtype::FLOAT && crate::dump::element_count(t) == 1;
                let a = one.then(|| to_f32(t).ok()).flatten()?;
                let c = a.iter().next().copied()?;
                let ok = c.is_finite() && c != 0.0 && (1.0 / c).is_finite();
                ok.then(|| (n.input[1].clone(), (c, a.shape().to_vec())))
            })
            .collect()
    };
    let mut new_inits = Vec::new();
    for n in g.node.iter_mut() {
        if n.op_type() != "Div" || !n.domain().is_empty() || n.input.len() != 2 {
            continue;
        }
        let Some((c, dims)) = weights.get(&n.input[1]) else { continue };
        let r = reciprocals.entry(n.input[1].clone()).or_insert_with(|| {
            let name = names.fresh(&format!("{}_reciprocal", n.input[1]));
            new_inits.push(from_f32(&name, &ArrayD::from_elem(IxDyn(dims), 1.0 / c)));
            name
        });
        n.op_type = Some("Mul".to_string());
        n.input[1] = r.clone();
        stats.divisions_as_products += 1;
    }
    g.initializer.extend(new_inits);
    // Drop initializers nothing reads any more.
    let used = crate::onnx::graph::used_names(g);
    let input_names: HashSet<String> = g.input.iter().map(|i| i.name().to_string()).collect();
    g.initializer.retain(|t| used.contains(t.name()) || input_names.contains(t.name()));
    Ok((m, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_ints, graph, model, node, tensor_info};

    #[test]
    fn folds_bias_add_and_removes_identity() {
        let w = from_f32("w", &ArrayD::from_elem(IxDyn(&[2, 1, 1, 1]), 1.0));
        let b = from_f32("b", &ArrayD::from_shape_vec(IxDyn(&[1, 2, 1, 1]), vec![0.5, -1.0]).unwrap());
        let g = graph(
            "g",
            vec![
                node("Conv", "c", &["x", "w"], &["c"], vec![attr_ints("kernel_shape", &[1, 1])]),
                node("Add", "a", &["c", "b"], &["a"], vec![]),
                node("Identity", "i", &["a"], &["i"], vec![]),
                node("Relu", "r", &["i"], &["y"], vec![]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[1, 1, 2, 2])],
            vec![tensor_info("y", dtype::FLOAT, &[1, 2, 2, 2])],
            vec![w, b],
        );
        let (m, s) = prepare(&model(g, 13)).unwrap();
        assert_eq!(s, Prepared { identities_removed: 1, biases_folded: 1, divisions_as_products: 0 });
        let g = m.graph.unwrap();
        assert_eq!(g.node.len(), 2);
        assert_eq!(g.node[0].input, vec!["x".to_string(), "w".into(), "c_bias".into()]);
        assert_eq!(g.node[0].output, vec!["a".to_string()]);
        assert_eq!(g.node[1].input, vec!["a".to_string()]);
        let bias = g.initializer.iter().find(|t| t.name() == "c_bias").unwrap();
        assert_eq!(to_f32(bias).unwrap().iter().copied().collect::<Vec<_>>(), vec![0.5, -1.0]);
        assert!(!g.initializer.iter().any(|t| t.name() == "b"));
    }

    #[test]
    fn leaves_the_bias_add_of_a_conv_transpose() {
        let w = from_f32("w", &ArrayD::from_elem(IxDyn(&[1, 2, 1, 1]), 1.0));
        let b = from_f32("b", &ArrayD::from_shape_vec(IxDyn(&[1, 2, 1, 1]), vec![0.5, -1.0]).unwrap());
        let g = graph(
            "g",
            vec![
                node("ConvTranspose", "c", &["x", "w"], &["c"], vec![attr_ints("kernel_shape", &[1, 1])]),
                node("Add", "a", &["c", "b"], &["y"], vec![]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[1, 1, 2, 2])],
            vec![tensor_info("y", dtype::FLOAT, &[1, 2, 2, 2])],
            vec![w, b],
        );
        let (m, s) = prepare(&model(g, 13)).unwrap();
        assert_eq!(s, Prepared::default());
        assert_eq!(m.graph.unwrap().node.len(), 2);
    }

    #[test]
    fn division_by_a_constant_becomes_a_product() {
        let two = from_f32("two", &ArrayD::from_elem(IxDyn(&[1]), 4.0));
        let t = from_f32("t", &ArrayD::from_elem(IxDyn(&[2]), 2.0));
        let zero = from_f32("zero", &ArrayD::from_elem(IxDyn(&[]), 0.0));
        let g = graph(
            "g",
            vec![
                node("Div", "d", &["x", "two"], &["a"], vec![]),
                node("Div", "e", &["a", "two"], &["b"], vec![]),
                node("Div", "f", &["b", "t"], &["c"], vec![]),
                node("Div", "z", &["c", "zero"], &["y"], vec![]),
            ],
            vec![tensor_info("x", dtype::FLOAT, &[2])],
            vec![tensor_info("y", dtype::FLOAT, &[2])],
            vec![two, t, zero],
        );
        let (m, s) = prepare(&model(g, 13)).unwrap();
        assert_eq!(s.divisions_as_products, 2, "one-element, non-zero divisors only");
        let g = m.graph.unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Mul", "Mul", "Div", "Div"]);
        assert_eq!(g.node[0].input[1], g.node[1].input[1], "one reciprocal per constant");
        let r = g.initializer.iter().find(|t| t.name() == g.node[0].input[1]).unwrap();
        assert_eq!(r.dims, vec![1]);
        assert_eq!(to_f32(r).unwrap().iter().copied().collect::<Vec<_>>(), vec![0.25]);
        assert!(!g.initializer.iter().any(|t| t.name() == "two"));
    }
}
