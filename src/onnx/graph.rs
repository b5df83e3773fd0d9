//! A read-only view over a `GraphProto`: who produces and who consumes each tensor name,
//! initializer and `Constant` lookup (both count as weights), declared types and shapes,
//! topological order and structural validation. Also the deterministic name allocator used by
//! every rewrite.
//!
//! Invariant: the view never mutates the graph; rewrites build new node lists and rebuild
//! the view.

use super::attr::{describe, NodeAttrs};
use super::builder::{dims_of, elem_type_of, Dim};
use super::pb::{GraphProto, NodeProto, TensorProto, ValueInfoProto};
use anyhow::{bail, Result};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Where a tensor name comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    GraphInput,
    Initializer,
    /// Output `slot` of node `node` (index into `graph.node`).
    Node {
        node: usize,
        slot: usize,
    },
}

pub struct GraphView<'a> {
    pub graph: &'a GraphProto,
    producer: HashMap<&'a str, Origin>,
    consumers: HashMap<&'a str, Vec<(usize, usize)>>,
    initializers: HashMap<&'a str, &'a TensorProto>,
    constants: HashMap<&'a str, &'a TensorProto>,
    value_info: HashMap<&'a str, &'a ValueInfoProto>,
    outputs: HashSet<&'a str>,
    /// Outer-scope names each node's subgraphs read (implicit inputs), by node index.
    implicit: HashMap<usize, Vec<&'a str>>,
}

impl<'a> GraphView<'a> {
    pub fn new(graph: &'a GraphProto) -> Self {
        let mut producer = HashMap::new();
        let mut initializers = HashMap::new();
        let mut constants = HashMap::new();
        let mut value_info = HashMap::new();
        for t in &graph.initializer {
            initializers.insert(t.name(), t);
            producer.insert(t.name(), Origin::Initializer);
        }
        // Graph inputs win over initializers of the same name (IR < 4 convention: defaults).
        for vi in &graph.input {
            if !initializers.contains_key(vi.name()) {
                producer.insert(vi.name(), Origin::GraphInput);
            }
        }
        for vi in graph.value_info.iter().chain(&graph.input).chain(&graph.output) {
            value_info.entry(vi.name()).or_insert(vi);
        }
        let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        let mut implicit = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for (slot, o) in n.output.iter().enumerate() {
                if !o.is_empty() {
                    producer.entry(o.as_str()).or_insert(Origin::Node { node: i, slot });
                }
            }
            for (slot, inp) in n.input.iter().enumerate() {
                if !inp.is_empty() {
                    consumers.entry(inp.as_str()).or_default().push((i, slot));
                }
            }
            if n.op_type() == "Constant" && n.output.len() == 1 {
                if let Ok(Some(t)) = n.attr_tensor("value") {
                    constants.insert(n.output[0].as_str(), t);
                }
            }
            let mut outer = Vec::new();
            for a in &n.attribute {
                for g in a.g.iter().chain(&a.graphs) {
                    subgraph_free_names(g, &mut outer);
                }
            }
            if !outer.is_empty() {
                for name in &outer {
                    consumers.entry(name).or_default().push((i, usize::MAX));
                }
                implicit.insert(i, outer);
            }
        }
        let outputs = graph.output.iter().map(|o| o.name()).collect();
        GraphView { graph, producer, consumers, initializers, constants, value_info, outputs, implicit }
    }

    pub fn nodes(&self) -> &'a [NodeProto] {
        &self.graph.node
    }

    pub fn origin(&self, name: &str) -> Option<Origin> {
        self.producer.get(name).copied()
    }

    /// The node producing `name`, if a node does.
    pub fn producer(&self, name: &str) -> Option<&'a NodeProto> {
        match self.origin(name)? {
            Origin::Node { node, .. } => self.graph.node.get(node),
            _ => None,
        }
    }

    pub fn producer_index(&self, name: &str) -> Option<usize> {
        match self.origin(name)? {
            Origin::Node { node, .. } => Some(node),
            _ => None,
        }
    }

    /// `(node index, input slot)` of every consumer of `name` (slot `usize::MAX` for a
    /// subgraph's implicit use).
    pub fn consumers(&self, name: &str) -> &[(usize, usize)] {
        self.consumers.get(name).map(|v| v.as_slice()).unwrap_or(&[])
    }

    pub fn is_graph_output(&self, name: &str) -> bool {
        self.outputs.contains(name)
    }

    pub fn is_graph_input(&self, name: &str) -> bool {
        self.origin(name) == Some(Origin::GraphInput)
    }

    pub fn initializer(&self, name: &str) -> Option<&'a TensorProto> {
        self.initializers.get(name).copied()
    }

    /// The tensor of a `Constant` node's output.
    pub fn constant(&self, name: &str) -> Option<&'a TensorProto> {
        self.constants.get(name).copied()
    }

    /// A weight: an initializer (that is not overridable by a graph input) or a Constant's value.
    pub fn weight(&self, name: &str) -> Option<&'a TensorProto> {
        match self.origin(name)? {
            Origin::Initializer => self.initializer(name),
            Origin::Node { .. } => self.constant(name),
            Origin::GraphInput => None,
        }
    }

    pub fn value_info(&self, name: &str) -> Option<&'a ValueInfoProto> {
        self.value_info.get(name).copied()
    }

    /// Element type code of a tensor, from weights or declared value infos (0 when unknown).
    pub fn elem_type(&self, name: &str) -> i32 {
        if let Some(t) = self.weight(name) {
            return t.data_type();
        }
        self.value_info(name).map(elem_type_of).unwrap_or(0)
    }

    /// Declared shape of a tensor, from weights or value infos.
    pub fn shape(&self, name: &str) -> Option<Vec<Dim>> {
        if let Some(t) = self.weight(name) {
            return Some(t.dims.iter().map(|&d| Dim::Fixed(d)).collect());
        }
        self.value_info(name).and_then(dims_of)
    }

    /// Node indices in a topological order (stable: among ready nodes, file order wins).
    pub fn topo_order(&self) -> Result<Vec<usize>> {
        let n = self.graph.node.len();
        let mut indeg = vec![0usize; n];
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, node) in self.graph.node.iter().enumerate() {
            let implicit = self.implicit.get(&i).map(|v| v.as_slice()).unwrap_or(&[]);
            let deps: BTreeSet<usize> = node
                .input
                .iter()
                .map(|s| s.as_str())
                .chain(implicit.iter().copied())
                .filter_map(|s| self.producer_index(s))
                .collect();
            indeg[i] = deps.len();
            for d in deps {
                users[d].push(i);
            }
        }
        let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &u in &users[i] {
                indeg[u] -= 1;
                if indeg[u] == 0 {
                    ready.insert(u);
                }
            }
        }
        if order.len() != n {
            let stuck: Vec<String> =
                (0..n).filter(|&i| indeg[i] > 0).take(5).map(|i| describe(&self.graph.node[i])).collect();
            bail!("the graph has a cycle through {}", stuck.join(", "));
        }
        Ok(order)
    }

    /// Checks every node input resolves, tensor and node names are unique, outputs are
    /// produced, and the graph is acyclic.
    pub fn validate(&self) -> Result<()> {
        let g = self.graph;
        let mut seen_tensors: HashSet<&str> = HashSet::new();
        for t in &g.initializer {
            if t.name().is_empty() {
                bail!("an initializer has no name");
            }
            if !seen_tensors.insert(t.name()) {
                bail!("initializer '{}' is defined twice", t.name());
            }
        }
        for vi in &g.input {
            if !seen_tensors.insert(vi.name()) && !self.initializers.contains_key(vi.name()) {
                bail!("graph input '{}' is defined twice", vi.name());
            }
        }
        let mut seen_nodes: HashSet<&str> = HashSet::new();
        for node in &g.node {
            if !node.name().is_empty() && !seen_nodes.insert(node.name()) {
                bail!("two nodes are named '{}'", node.name());
            }
            for o in node.output.iter().filter(|o| !o.is_empty()) {
                if !seen_tensors.insert(o) {
                    bail!("{}: output '{}' is already produced elsewhere", describe(node), o);
                }
            }
        }
        for node in &g.node {
            for i in node.input.iter().filter(|i| !i.is_empty()) {
                if !self.producer.contains_key(i.as_str()) {
                    bail!("{}: input '{}' is not produced by any node, initializer or graph input", describe(node), i);
                }
            }
        }
        let mut seen_outputs = HashSet::new();
        for o in &g.output {
            if !seen_outputs.insert(o.name()) {
                bail!("graph output '{}' is listed twice", o.name());
            }
            if !self.producer.contains_key(o.name()) {
                bail!("graph output '{}' is not produced by anything", o.name());
            }
        }
        self.topo_order()?;
        Ok(())
    }
}

/// Every tensor name the graph reads: node inputs, names its nodes' subgraphs read from this
/// scope, and graph outputs. Initializers outside this set are dead.
pub fn used_names(g: &GraphProto) -> HashSet<String> {
    let mut used: HashSet<String> = g.output.iter().map(|o| o.name().to_string()).collect();
    for n in &g.node {
        used.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
        for a in &n.attribute {
            for sg in a.g.iter().chain(&a.graphs) {
                let mut outer = Vec::new();
                subgraph_free_names(sg, &mut outer);
                used.extend(outer.into_iter().map(str::to_string));
            }
        }
    }
    used
}

/// Names a subgraph reads but does not define (they come from enclosing scopes).
fn subgraph_free_names<'a>(g: &'a GraphProto, out: &mut Vec<&'a str>) {
    let mut defined: HashSet<&str> = HashSet::new();
    defined.extend(g.initializer.iter().map(|t| t.name()));
    defined.extend(g.input.iter().map(|v| v.name()));
    for n in &g.node {
        defined.extend(n.output.iter().map(|s| s.as_str()));
    }
    for n in &g.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            if !defined.contains(i.as_str()) && !out.contains(&i.as_str()) {
                out.push(i);
            }
        }
        for a in &n.attribute {
            for sg in a.g.iter().chain(&a.graphs) {
                let mut inner = Vec::new();
                subgraph_free_names(sg, &mut inner);
                for name in inner {
                    if !defined.contains(name) && !out.contains(&name) {
                        out.push(name);
                    }
                }
            }
        }
    }
}

/// Hands out tensor and node names not yet used in a graph, deterministically
/// (`base`, then `base_1`, `base_2`, ...).
#[derive(Debug, Default, Clone)]
pub struct NameAlloc {
    used: HashSet<String>,
}

impl NameAlloc {
    pub fn new(graph: &GraphProto) -> Self {
        let mut used = HashSet::new();
        let mut add = |s: &str| {
            used.insert(s.to_string());
        };
        for t in &graph.initializer {
            add(t.name());
        }
        for v in graph.input.iter().chain(&graph.output).chain(&graph.value_info) {
            add(v.name());
        }
        for n in &graph.node {
            add(n.name());
            n.output.iter().for_each(|o| add(o));
            n.input.iter().for_each(|i| add(i));
        }
        NameAlloc { used }
    }

    /// A fresh name starting with `base`, reserved from now on.
    pub fn fresh(&mut self, base: &str) -> String {
        if self.used.insert(base.to_string()) {
            return base.to_string();
        }
        let mut k = 1usize;
        loop {
            let candidate = format!("{base}_{k}");
            if self.used.insert(candidate.clone()) {
                return candidate;
            }
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::array::dtype;
    use crate::onnx::builder::{graph, node, tensor_info};

    fn chain() -> GraphProto {
        graph(
            "g",
            vec![node("Relu", "b", &["t1"], &["y"], vec![]), node("Neg", "a", &["x"], &["t1"], vec![])],
            vec![tensor_info("x", dtype::FLOAT, &[2])],
            vec![tensor_info("y", dtype::FLOAT, &[2])],
            vec![],
        )
    }

    #[test]
    fn topo_order_sorts_out_of_order_nodes() {
        let g = chain();
        let v = GraphView::new(&g);
        assert_eq!(v.topo_order().unwrap(), vec![1, 0]);
        assert!(v.validate().is_ok());
        assert_eq!(v.producer("t1").map(|n| n.name()), Some("a"));
        assert_eq!(v.consumers("t1"), &[(0, 0)]);
        assert!(v.is_graph_input("x"));
        assert!(v.is_graph_output("y"));
    }

    #[test]
    fn validate_finds_cycles_dangling_inputs_and_duplicates() {
        let mut g = chain();
        g.node[1].input[0] = "y".into();
        let err = GraphView::new(&g).validate().unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");

        let mut g = chain();
        g.node[0].input[0] = "nowhere".into();
        let err = GraphView::new(&g).validate().unwrap_err().to_string();
        assert!(err.contains("'nowhere'") && err.contains("node 'b' (Relu)"), "{err}");

        let mut g = chain();
        g.node[0].name = Some("a".into());
        assert!(GraphView::new(&g).validate().unwrap_err().to_string().contains("two nodes"));

        let mut g = chain();
        g.output.push(g.output[0].clone());
        assert!(GraphView::new(&g).validate().unwrap_err().to_string().contains("listed twice"));
    }

    #[test]
    fn names_are_fresh_and_deterministic() {
        let g = chain();
        let mut a = NameAlloc::new(&g);
        assert_eq!(a.fresh("y"), "y_1");
        assert_eq!(a.fresh("y"), "y_2");
        assert_eq!(a.fresh("z"), "z");
        assert_eq!(a.fresh("z"), "z_1");
    }
}
