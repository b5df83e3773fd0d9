//! The guard's twins without the float prefix. The nodes that no quantized activation
//! reaches (a transformer's embedding lookups, its mask arithmetic) compute the same values in
//! the float model and in every quantized model's fake-quant twin. [`Prefix::of`] finds them
//! and their *frontier*, the tensors they hand to the rest of the graph; the first calibration
//! pass keeps the frontier's values for the guard's samples, and [`Prefix::cut`] removes the
//! prefix from each twin, whose inputs become those tensors. A twin then neither copies nor
//! runs the prefix's weights (MiniLM-L6: the 47 MB word-embedding table, at each twin load).
//!
//! Frontier rules are the sequential pass's ([`super::segment`]): float tensors that depend on
//! the graph inputs are fed; integer, boolean and constant-only tensors are recomputed by
//! keeping their producers in the twin. The cut is made only where the twin provably holds
//! the float model's prefix: each twin node producing a prefix tensor must be the float
//! model's node unchanged and read unchanged initializers; otherwise the twin runs whole.

use super::segment::Layout;
use crate::array::ArrayData;
use crate::onnx::builder::{value_info, Dim};
use crate::onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};
use crate::onnx::GraphView;
use crate::runtime::InputFact;
use anyhow::{Context, Result};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Prefix weights below this many bytes are not worth a cut.
pub(super) const MIN_PREFIX_WEIGHT_BYTES: u64 = 1 << 20;

/// The float prefix of a model under quantization (module docs).
#[derive(Debug, Clone)]
pub struct Prefix {
    /// The prefix nodes, as the float model has them, by output name.
    nodes: HashMap<String, NodeProto>,
    /// The initializers the prefix nodes read, by name.
    weights: HashMap<String, TensorProto>,
    /// The frontier, in graph order.
    pub frontier: Vec<String>,
}

/// Where each input of a cut twin comes from, in the order of its graph inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// The sample's graph input at this index (the calibration set's order).
    Sample(usize),
    /// The frontier tensor at this index of [`Prefix::frontier`].
    Frontier(usize),
}

/// A twin without its prefix: the model, its inputs' facts and where each input comes from.
pub struct Cut {
    pub model: ModelProto,
    pub facts: Vec<InputFact>,
    pub feeds: Vec<Feed>,
}

/// Whether two initializers hold the same tensor (a shared payload is not compared).
fn same_tensor(a: &TensorProto, b: &TensorProto) -> bool {
    match (&a.raw_data, &b.raw_data) {
        (Some(x), Some(y)) if x.as_ptr() == y.as_ptr() && x.len() == y.len() => {
            TensorProto { raw_data: None, ..a.clone() } == TensorProto { raw_data: None, ..b.clone() }
        }
        _ => a == b,
    }
}

impl Prefix {
    /// The prefix of `model` when the activations in `quantized` (graph inputs or node
    /// outputs) may be quantized. `None` when there is nothing worth cutting: no prefix, a
    /// prefix holding under 1 MiB of weights, a graph output made inside the prefix, or
    /// subgraphs in it.
    pub fn of(model: &ModelProto, quantized: &HashSet<&str>) -> Result<Option<Prefix>> {
        Prefix::with_min_weight(model, quantized, MIN_PREFIX_WEIGHT_BYTES as usize)
    }

    /// [`Prefix::of`] with another weight threshold (bytes).
    pub fn with_min_weight(model: &ModelProto, quantized: &HashSet<&str>, min_bytes: usize) -> Result<Option<Prefix>> {
        let graph = model.graph.as_ref().context("the model has no graph")?;
        let view = GraphView::new(graph);
        let lay = Layout::new(&view)?;
        let nodes = view.nodes();
        // Graph order: a node is outside the prefix when it reads a quantized activation, a
        // tensor made outside the prefix, or carries a subgraph.
        let mut outside = vec![false; nodes.len()];
        for &i in &lay.order {
            let n = &nodes[i];
            let sub = n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty());
            outside[i] = sub
                || lay
                    .reads(i)
                    .iter()
                    .any(|t| quantized.contains(t.as_str()) || lay.producer(t).is_some_and(|p| outside[p]));
        }
        let inside = |t: &str| lay.producer(t).is_some_and(|p| !outside[p]);
        if graph.output.iter().any(|o| inside(o.name())) {
            return Ok(None);
        }
        // The frontier: what the nodes outside read from the prefix, through recomputed
        // (non-cacheable) tensors.
        let mut frontier = BTreeSet::new();
        let mut pulled = BTreeSet::new();
        let mut stack: Vec<String> = lay.order.iter().filter(|&&i| outside[i]).flat_map(|&i| lay.reads(i)).collect();
        while let Some(t) = stack.pop() {
            let Some(p) = lay.producer(&t).filter(|&p| !outside[p]) else { continue };
            if lay.cacheable.get(&t).copied().unwrap_or(false) {
                frontier.insert(t);
            } else if pulled.insert(p) {
                stack.extend(lay.reads(p));
            }
        }
        let mut weight_bytes = 0;
        let mut weights = HashMap::new();
        let mut by_output = HashMap::new();
        for &i in lay.order.iter().filter(|&&i| !outside[i]) {
            for r in lay.reads(i) {
                if let Some(w) = view.weight(&r) {
                    weight_bytes += w.raw_data.as_ref().map_or(0, |b| b.len()) + 4 * w.float_data.len();
                    weights.insert(r, w.clone());
                }
            }
            for o in nodes[i].output.iter().filter(|o| !o.is_empty()) {
                by_output.insert(o.clone(), nodes[i].clone());
            }
        }
        if by_output.is_empty() || weight_bytes < min_bytes {
            return Ok(None);
        }
        let mut frontier: Vec<String> = frontier.into_iter().collect();
        frontier.sort_by_key(|t| lay.producer(t).map_or(usize::MAX, |p| lay.pos[p]));
        Ok(Some(Prefix { nodes: by_output, weights, frontier }))
    }

    /// `twin` without the prefix. Its inputs: the twin's graph inputs the remaining nodes
    /// read (facts from `inputs`, by name), then the frontier tensors they read (facts from
    /// `values`, one sample's frontier). `None` when the twin does not hold
    /// the prefix unchanged (module docs).
    pub fn cut(&self, twin: &ModelProto, inputs: &[InputFact], values: &[ArrayData]) -> Result<Option<Cut>> {
        let graph = twin.graph.as_ref().context("the twin has no graph")?;
        let view = GraphView::new(graph);
        let lay = Layout::new(&view)?;
        let nodes = view.nodes();
        // Twin nodes making prefix tensors must be the float model's, reading its weights.
        let mut prefix = vec![false; nodes.len()];
        for (i, n) in nodes.iter().enumerate() {
            let made: Vec<&NodeProto> =
                n.output.iter().filter(|o| !o.is_empty()).filter_map(|o| self.nodes.get(o)).collect();
            if made.is_empty() {
                continue;
            }
            if made.len() != n.output.iter().filter(|o| !o.is_empty()).count() || made.iter().any(|m| *m != n) {
                return Ok(None);
            }
            for r in lay.reads(i) {
                match (view.weight(&r), self.weights.get(&r)) {
                    (Some(w), Some(f)) if same_tensor(w, f) => {}
                    (None, None) => {}
                    _ => return Ok(None),
                }
            }
            prefix[i] = true;
        }
        let fed: HashMap<&str, usize> = self.frontier.iter().enumerate().map(|(k, t)| (t.as_str(), k)).collect();
        // Keep every other node, and the prefix nodes making what they read that is not fed.
        let mut keep: Vec<bool> = prefix.iter().map(|p| !p).collect();
        let mut used_fed = BTreeSet::new();
        let mut stack: Vec<String> = (0..nodes.len()).filter(|&i| keep[i]).flat_map(|i| lay.reads(i)).collect();
        while let Some(t) = stack.pop() {
            if let Some(&k) = fed.get(t.as_str()) {
                used_fed.insert(k);
                continue;
            }
            if let Some(p) = lay.producer(&t).filter(|&p| !keep[p]) {
                keep[p] = true;
                stack.extend(lay.reads(p));
            }
        }
        if keep.iter().all(|&k| k) {
            return Ok(None);
        }
        // A fed tensor a kept node also makes would have two producers.
        if used_fed.iter().any(|&k| lay.producer(&self.frontier[k]).is_some_and(|p| keep[p])) {
            return Ok(None);
        }
        let node: Vec<NodeProto> = (0..nodes.len()).filter(|&i| keep[i]).map(|i| nodes[i].clone()).collect();
        let mut read: HashSet<String> = HashSet::new();
        for i in (0..nodes.len()).filter(|&i| keep[i]) {
            read.extend(lay.reads(i));
        }
        let made: HashSet<String> = node.iter().flat_map(|n| n.output.iter().cloned()).collect();
        let (mut input, mut facts, mut feeds) = (Vec::new(), Vec::new(), Vec::new());
        for vi in graph.input.iter().filter(|v| read.contains(v.name()) && view.weight(v.name()).is_none()) {
            let k = inputs.iter().position(|f| f.name == vi.name());
            let k = k.with_context(|| format!("internal error: no facts for twin input '{}'", vi.name()))?;
            input.push(vi.clone());
            facts.push(inputs[k].clone());
            feeds.push(Feed::Sample(k));
        }
        for &k in &used_fed {
            let (t, v) = (&self.frontier[k], values.get(k).context("internal error: frontier value missing")?);
            let dims: Vec<Dim> = v.shape().iter().map(|&d| Dim::Fixed(d as i64)).collect();
            input.push(value_info(t, v.elem_type(), Some(&dims)));
            facts.push(InputFact { name: t.clone(), elem_type: v.elem_type(), shape: v.shape().to_vec() });
            feeds.push(Feed::Frontier(k));
        }
        let sub = GraphProto {
            node,
            input,
            initializer: graph.initializer.iter().filter(|t| read.contains(t.name())).cloned().collect(),
            value_info: graph.value_info.iter().filter(|v| made.contains(v.name())).cloned().collect(),
            output: graph.output.clone(),
            name: graph.name.clone(),
            ..Default::default()
        };
        let mut out = ModelProto { graph: None, ..twin.clone() };
        out.graph = Some(sub);
        Ok(Some(Cut { model: out, facts, feeds }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::array::dtype;
    use crate::onnx::builder::{graph, model, node, tensor_info};
    use crate::onnx::tensor::{from_f32, vec_i64};
    use crate::runtime::Plan;
    use anyhow::bail;
    use ndarray::{ArrayD, IxDyn};

    /// ids → Gather(E) = e → Add(P) = h (quantized) → Reshape [8, 64] → MatMul(W) → Reshape to
    /// `Shape(e)`'s first two dims and −1 → y. `E` has `rows` rows of 64 floats; the int64
    /// shape is made in the prefix from `e`, so a cut must keep `Shape` and feed `e`.
    fn embed(rows: usize, w_scale: f32) -> ModelProto {
        let f = |name: &str, dims: &[usize], s: f32| {
            let n: usize = dims.iter().product();
            from_f32(
                name,
                &ArrayD::from_shape_vec(IxDyn(dims), (0..n).map(|v| ((v % 97) as f32 - 48.0) * s).collect())
                    .expect("shape"),
            )
        };
        let g = graph(
            "embed",
            vec![
                node("Gather", "lookup", &["E", "ids"], &["e"], vec![]),
                node("Add", "pos", &["e", "P"], &["h"], vec![]),
                node("Shape", "shape", &["e"], &["s"], vec![]),
                node("Slice", "lead", &["s", "zero", "two"], &["s2"], vec![]),
                node("Concat", "target", &["s2", "minus1"], &["s3"], vec![crate::onnx::builder::attr_int("axis", 0)]),
                node("Reshape", "flat", &["h", "rows"], &["hf"], vec![]),
                node("MatMul", "mm", &["hf", "W"], &["z"], vec![]),
                node("Reshape", "back", &["z", "s3"], &["y"], vec![]),
            ],
            vec![tensor_info("ids", dtype::INT64, &[1, 8])],
            vec![tensor_info("y", dtype::FLOAT, &[1, 8, 16])],
            vec![
                f("E", &[rows, 64], 0.01),
                f("P", &[1, 8, 64], 0.002),
                f("W", &[64, 16], w_scale),
                vec_i64("zero", &[0]),
                vec_i64("two", &[2]),
                vec_i64("minus1", &[-1]),
                vec_i64("rows", &[8, 64]),
            ],
        );
        model(g, 13)
    }

    fn run(m: &ModelProto, facts: &[InputFact], inputs: &[ArrayData], outputs: &[&str]) -> Result<Vec<ArrayData>> {
        let bytes = crate::onnx::io::encode_for_runtime(m)?;
        let names: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
        Plan::load(&bytes, None, facts, &names)?.run(inputs)
    }

    #[test]
    fn a_cut_twin_fed_the_frontier_computes_what_the_whole_twin_does() -> Result<()> {
        // 4096 × 64 floats: 1 MiB of prefix weights.
        let float = embed(4096, 0.03);
        let quantized: HashSet<&str> = ["h"].into_iter().collect();
        let p = Prefix::of(&float, &quantized)?.context("no prefix")?;
        assert_eq!(p.frontier, ["e", "h"]);
        let facts = vec![InputFact { name: "ids".into(), elem_type: dtype::INT64, shape: vec![1, 8] }];
        let ids = ArrayData::I64(ArrayD::from_shape_vec(IxDyn(&[1, 8]), vec![5, 4000, 17, 0, 4095, 5, 99, 1234])?);
        let frontier = run(&float, &facts, std::slice::from_ref(&ids), &["e", "h"])?;

        // A "twin" that changed the weight outside the prefix: the cut keeps Shape/Slice/Concat
        // (integers) and reads e and h from the frontier, not the 1 MiB table.
        let twin = embed(4096, -0.05);
        let Cut { model: cut, facts: cut_facts, feeds } = p.cut(&twin, &facts, &frontier)?.context("no cut")?;
        let g = cut.graph.as_ref().context("graph")?;
        assert!(g.initializer.iter().all(|t| t.name() != "E" && t.name() != "P"));
        assert!(g.node.iter().any(|n| n.name() == "shape") && g.node.iter().all(|n| n.name() != "lookup"));
        assert_eq!(feeds, [Feed::Frontier(0), Feed::Frontier(1)]);
        let fed: Vec<ArrayData> = feeds
            .iter()
            .map(|f| match f {
                Feed::Frontier(k) => frontier[*k].clone(),
                Feed::Sample(_) => ids.clone(),
            })
            .collect();
        let got = run(&cut, &cut_facts, &fed, &["y"])?;
        let want = run(&twin, &facts, std::slice::from_ref(&ids), &["y"])?;
        let (ArrayData::F32(got), ArrayData::F32(want)) = (&got[0], &want[0]) else { bail!("not float") };
        assert_eq!(got, want);

        // A twin whose prefix differs (another table, or a changed node) is not cut.
        let mut other = embed(4096, -0.05);
        let g = other.graph.as_mut().context("graph")?;
        g.initializer[0] = from_f32("E", &ArrayD::zeros(IxDyn(&[4096, 64])));
        assert!(p.cut(&other, &facts, &frontier)?.is_none());
        let mut other = embed(4096, -0.05);
        other.graph.as_mut().context("graph")?.node[0].name = Some("renamed".into());
        assert!(p.cut(&other, &facts, &frontier)?.is_none());
        // The ids input is no longer read: not an input of the cut twin.
        assert!(cut_facts.iter().all(|f| f.name != "ids"));
        Ok(())
    }

    #[test]
    fn small_or_absent_prefixes_are_not_cut() -> Result<()> {
        // 16 × 64 floats of table: under 1 MiB.
        let quantized: HashSet<&str> = ["h"].into_iter().collect();
        assert!(Prefix::of(&embed(16, 0.03), &quantized)?.is_none());
        // The graph input itself quantized: no node is in the prefix.
        let quantized: HashSet<&str> = ["ids", "e"].into_iter().collect();
        let p = Prefix::of(&embed(4096, 0.03), &quantized)?;
        assert!(p.is_none(), "{p:?}");
        Ok(())
    }
}
