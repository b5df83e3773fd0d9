//! Regenerates the broken-model corpus of `tests/corpus/`:
//! `cargo run --release --example gen_corpus [DIR]` (default `tests/corpus`).
//!
//! Every file is derived deterministically from one small valid model (x[1,4] → MatMul
//! `weight`[4,3] → Add `bias` → Relu → y), broken in one precise way: protobuf-level damage
//! (truncations, bit flips, wrong wire types, bad UTF-8, nesting past the decoder's recursion
//! limit), graph-level damage (cycles, dangling inputs, duplicates), tensor-level damage (shapes
//! that overflow or claim 2^40 elements over a few bytes, negative dims, element types that do
//! not match the payload) and external-data damage (locations escaping the folder, ranges past
//! the end, missing files). `tests/hostile.rs` runs every command on every file and checks the
//! error; it also regenerates the corpus in memory and checks the checked-in files match, so
//! this program and the corpus cannot drift apart.
//!
//! The generator asserts each protobuf-level mutation really breaks decoding (a flip that
//! happened to produce a valid model would make a useless test case).

use onnxq::onnx::builder::{attr_int, graph, model, node, tensor_info};
use onnxq::onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, AttributeProto, GraphProto, ModelProto,
    StringStringEntryProto, TensorProto,
};
use onnxq::onnx::tensor::{vec_f32, vec_i64};
use prost::Message;

const FLOAT: i32 = 1;
const DOUBLE: i32 = 11;

fn weight() -> TensorProto {
    let v: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.25).collect();
    let mut t = vec_f32("weight", &v);
    t.dims = vec![4, 3];
    t
}

fn bias() -> TensorProto {
    vec_f32("bias", &[0.5, -0.25, 0.125])
}

/// The valid model every case breaks.
pub fn base_graph() -> GraphProto {
    graph(
        "mlp",
        vec![
            node("MatMul", "mm", &["x", "weight"], &["h"], vec![]),
            node("Add", "add", &["h", "bias"], &["z"], vec![]),
            node("Relu", "relu", &["z"], &["y"], vec![]),
        ],
        vec![tensor_info("x", FLOAT, &[1, 4])],
        vec![tensor_info("y", FLOAT, &[1, 3])],
        vec![weight(), bias()],
    )
}

fn base_model() -> ModelProto {
    model(base_graph(), 13)
}

fn with_graph(g: GraphProto) -> Vec<u8> {
    model(g, 13).encode_to_vec()
}

/// The base graph with its weight replaced.
fn with_weight(t: TensorProto) -> Vec<u8> {
    let mut g = base_graph();
    g.initializer[0] = t;
    with_graph(g)
}

/// The base graph with the weight stored as external data with these keys.
fn external(kv: &[(&str, &str)]) -> Vec<u8> {
    let mut t = weight();
    t.raw_data = None;
    t.data_location = Some(DataLocation::External as i32);
    t.external_data = kv
        .iter()
        .map(|(k, v)| StringStringEntryProto { key: Some(k.to_string()), value: Some(v.to_string()) })
        .collect();
    with_weight(t)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field `field` holding `body`.
fn len_field(field: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(u64::from(field << 3 | 2), &mut out);
    varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

/// The base model's encoding split around the graph field: (fields 1..=6, fields 8..).
/// prost writes fields in field-number order, so the graph (field 7) goes in between.
fn head_tail() -> (Vec<u8>, Vec<u8>) {
    let m = base_model();
    let head = ModelProto { graph: None, opset_import: vec![], ..m.clone() }.encode_to_vec();
    let tail = ModelProto { opset_import: m.opset_import, ..Default::default() }.encode_to_vec();
    (head, tail)
}

/// The base model's bytes with `graph` (raw bytes) as the graph field's body, and the offset
/// of the graph field's tag.
fn model_with_raw_graph(graph: &[u8]) -> (Vec<u8>, usize) {
    let (head, tail) = head_tail();
    let at = head.len();
    (head.into_iter().chain(len_field(7, graph)).chain(tail).collect(), at)
}

/// Position of the only occurrence of `needle` in `hay`.
fn find_once(hay: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> =
        hay.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "pattern {needle:?} must occur exactly once");
    hits[0]
}

fn flip(mut bytes: Vec<u8>, at: usize, mask: u8) -> Vec<u8> {
    bytes[at] ^= mask;
    bytes
}

fn must_not_decode(name: &str, bytes: &[u8]) {
    assert!(ModelProto::decode(bytes).is_err(), "{name}: the mutation still decodes; pick another");
}

/// A graph whose single node holds `depth` nested subgraphs (If.then_branch style).
fn nested(depth: usize) -> GraphProto {
    let mut g = graph("leaf", vec![], vec![], vec![tensor_info("y", FLOAT, &[1])], vec![]);
    for level in 0..depth {
        let attr = AttributeProto {
            name: Some("then_branch".into()),
            r#type: Some(AttributeType::Graph as i32),
            g: Some(g),
            ..Default::default()
        };
        let n = node("If", &format!("if{level}"), &["cond"], &["y"], vec![attr]);
        g = graph(&format!("level{level}"), vec![n], vec![], vec![tensor_info("y", FLOAT, &[1])], vec![]);
    }
    g
}

/// Every corpus file: (file name, bytes).
pub fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let base = base_model().encode_to_vec();
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();

    // ---- not a model at all
    out.push(("empty.onnx", vec![]));
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0\x1f\xf3\xffa".to_vec();
    png.extend_from_slice(b"\0\0\0\0IEND\xaeB`\x82");
    out.push(("png_renamed.onnx", png));

    // ---- truncations: inside the first varint, inside the graph, inside the weight payload,
    // and one byte short (inside opset_import, the last field).
    let raw_at = find_once(&base, &weight().raw_data.unwrap_or_default()[..8]);
    for (name, at) in [
        ("truncated_at_1.onnx", 1),
        ("truncated_in_graph.onnx", base.len() / 2),
        ("truncated_in_weight.onnx", raw_at + 20),
        ("truncated_last_byte.onnx", base.len() - 1),
    ] {
        let t = base[..at].to_vec();
        must_not_decode(name, &t);
        out.push((name, t));
    }

    // ---- bit flips
    let (same, graph_at) = model_with_raw_graph(&base_graph().encode_to_vec());
    assert_eq!(same, base, "the split around the graph field is exact");
    assert_eq!(base[graph_at], 0x3a, "graph tag (field 7, length-delimited)");
    // The graph's length varint is two bytes; flipping bit 6 of its second byte claims ~8 KB.
    assert!(base[graph_at + 1] & 0x80 != 0, "two-byte graph length");
    let b = flip(base.clone(), graph_at + 2, 0x40);
    must_not_decode("bitflip_graph_length", &b);
    out.push(("bitflip_graph_length.onnx", b));
    // Wire type 2 -> 6 (no such wire type).
    let b = flip(base.clone(), graph_at, 0x04);
    must_not_decode("bitflip_wire_type", &b);
    out.push(("bitflip_wire_type.onnx", b));
    // The weight's first dim 4 -> 5: still decodes, but the payload no longer fits the shape.
    let dims_at = find_once(&base, &[0x08, 0x04, 0x08, 0x03, 0x10, 0x01]);
    out.push(("bitflip_dims.onnx", flip(base.clone(), dims_at + 1, 0x01)));
    // The MatMul's input 'weight' -> 'veight': a dangling input.
    let name_at = find_once(&base, b"\x0a\x06weight");
    out.push(("bitflip_input_name.onnx", flip(base.clone(), name_at + 2, 0x01)));

    // ---- wrong field types
    let (head, tail) = head_tail();
    let m: Vec<u8> = head.into_iter().chain([0x38, 0x01]).chain(tail).collect(); // field 7 as varint 1
    must_not_decode("wire_type_graph_varint", &m);
    out.push(("wire_type_graph_varint.onnx", m));
    let mut g = base_graph().encode_to_vec();
    // a node whose name (field 3, a string) is a varint
    g.extend(len_field(1, &[0x18, 0x05]));
    let (m, _) = model_with_raw_graph(&g);
    must_not_decode("wire_type_node_name_varint", &m);
    out.push(("wire_type_node_name_varint.onnx", m));
    // a graph name that is not UTF-8
    let mut g = base_graph().encode_to_vec();
    g.extend(len_field(2, &[0xff, 0xfe, 0x41]));
    let (m, _) = model_with_raw_graph(&g);
    must_not_decode("bad_utf8_name", &m);
    out.push(("bad_utf8_name.onnx", m));
    // subgraphs nested deeper than the decoder's recursion limit
    let m = model(nested(120), 13).encode_to_vec();
    must_not_decode("deep_nesting", &m);
    out.push(("deep_nesting.onnx", m));

    // ---- model-level
    out.push(("no_graph.onnx", ModelProto { graph: None, ..base_model() }.encode_to_vec()));
    out.push(("no_opset_import.onnx", ModelProto { opset_import: vec![], ..base_model() }.encode_to_vec()));
    out.push(("empty_graph.onnx", with_graph(graph("mlp", vec![], vec![], vec![], vec![]))));

    // ---- graph-level
    let mut g = base_graph();
    g.node[0].input[0] = "y".into(); // mm reads relu's output
    out.push(("cycle.onnx", with_graph(g)));
    let mut g = base_graph();
    g.node[1].input[0] = "nowhere".into();
    out.push(("dangling_input.onnx", with_graph(g)));
    let mut g = base_graph();
    g.output.push(g.output[0].clone());
    out.push(("duplicate_output.onnx", with_graph(g)));
    let mut g = base_graph();
    g.node[2].name = Some("mm".into());
    out.push(("duplicate_node_name.onnx", with_graph(g)));
    let mut g = base_graph();
    g.initializer.push(weight());
    out.push(("duplicate_initializer.onnx", with_graph(g)));
    let mut g = base_graph();
    g.node[2].output[0] = "h".into(); // relu writes mm's output again
    out.push(("duplicate_node_output.onnx", with_graph(g)));
    let mut g = base_graph();
    g.output.push(tensor_info("ghost", FLOAT, &[1]));
    out.push(("output_not_produced.onnx", with_graph(g)));

    // ---- tensor-level
    let mut t = weight();
    t.dims = vec![1 << 20, 1 << 20]; // 2^40 elements over 48 bytes
    out.push(("huge_dims.onnx", with_weight(t)));
    let mut t = weight();
    t.dims = vec![1 << 62, 1 << 62];
    out.push(("dims_overflow.onnx", with_weight(t)));
    let mut t = weight();
    t.dims = vec![1 << 31, 1 << 31]; // 2^62 elements fit, their 2^64 bytes do not
    out.push(("dims_bytes_overflow.onnx", with_weight(t)));
    let mut t = weight();
    t.dims = vec![-4, 3];
    out.push(("negative_dim.onnx", with_weight(t)));
    let mut t = weight();
    t.data_type = Some(DOUBLE);
    out.push(("dtype_mismatch.onnx", with_weight(t)));
    let mut t = weight();
    t.raw_data = None;
    t.float_data = vec![1.0; 5];
    out.push(("typed_count_mismatch.onnx", with_weight(t)));
    let mut g = base_graph();
    let mut c = vec_i64("shape", &[1, 3]);
    c.dims = vec![1 << 40];
    g.node.insert(0, node("Constant", "const", &[], &["shape"], vec![onnxq::onnx::builder::attr_tensor("value", c)]));
    out.push(("constant_huge_dims.onnx", with_graph(g)));

    // ---- external data
    out.push(("ext_parent.onnx", external(&[("location", "../outside.bin"), ("length", "48")])));
    out.push(("ext_absolute.onnx", external(&[("location", "/etc/passwd"), ("length", "48")])));
    out.push(("ext_past_end.onnx", external(&[("location", "ext_short.bin"), ("offset", "0"), ("length", "48")])));
    out.push(("ext_short.bin", vec![0u8; 16]));
    out.push(("ext_missing.onnx", external(&[("location", "ext_missing.bin"), ("length", "48")])));
    out.push((
        "ext_offset_overflow.onnx",
        external(&[("location", "ext_short.bin"), ("offset", "18446744073709551615"), ("length", "48")]),
    ));
    out.push(("ext_bad_offset.onnx", external(&[("location", "ext_short.bin"), ("offset", "-5")])));
    out.push(("ext_no_location.onnx", external(&[("offset", "0"), ("length", "48")])));

    // ---- structurally valid, hostile at run time
    // A graph input declaring 2^40 x 4 elements: only random calibration data would allocate it.
    let mut g = base_graph();
    g.input[0] = tensor_info("x", FLOAT, &[1 << 40, 4]);
    out.push(("huge_input_dims.onnx", with_graph(g)));
    // A weight with no elements but a 2^40 output dim: nothing to quantize, and the MatMul's
    // output would hold 2^40 elements if anything ran it.
    let mut g = base_graph();
    g.input[0] = tensor_info("x", FLOAT, &[1, 0]);
    let mut w = vec_f32("weight", &[]);
    w.dims = vec![0, 1 << 40];
    g.initializer[0] = w;
    g.initializer[1] = vec_f32("bias", &[0.0]);
    out.push(("zero_size_huge_weight.onnx", with_graph(g)));
    // Gemm with transB over a rank-1 weight: per-channel axis 0 is fine, axis 1 would be out of range.
    let mut g = base_graph();
    g.node[0] = node("Gemm", "mm", &["x", "weight"], &["h"], vec![attr_int("transB", 0)]);
    g.initializer[0] = vec_f32("weight", &[1.0, 2.0, 3.0, 4.0]);
    out.push(("gemm_rank1_weight.onnx", with_graph(g)));

    out
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "tests/corpus".to_string());
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    let cases = cases();
    for (name, bytes) in &cases {
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("wrote {} files under {}", cases.len(), dir.display());
    Ok(())
}
