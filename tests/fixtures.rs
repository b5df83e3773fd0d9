//! The checked-in fixtures are exactly what the generator writes, and decode → encode
//! reproduces every fixture byte for byte.

use crate::util::{root, tempdir};
use prost::Message;

#[test]
fn checked_in_fixtures_are_fresh() {
    let dir = tempdir();
    let written = onnxq::fixtures::generate(dir.path()).expect("generate");
    assert!(written.len() > 20);
    for p in written {
        let rel = p.strip_prefix(dir.path()).expect("under temp dir");
        let fresh = std::fs::read(&p).expect("read generated");
        let checked_in = std::fs::read(root().join("fixtures").join(rel)).unwrap_or_else(|_| {
            panic!("fixtures/{} is missing: run `cargo run --release --example gen_fixtures`", rel.display())
        });
        assert!(
            fresh == checked_in,
            "fixtures/{} is stale: run `cargo run --release --example gen_fixtures`",
            rel.display()
        );
    }
}

#[test]
fn fixtures_round_trip_byte_identical() {
    for entry in std::fs::read_dir(root().join("fixtures")).expect("fixtures dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("onnx") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let model = onnxq::onnx::io::decode(bytes.clone().into()).expect("decode");
        assert_eq!(model.encode_to_vec(), bytes, "{} does not round-trip", path.display());
        let loaded = onnxq::onnx::load(&path).expect("load");
        onnxq::onnx::GraphView::new(loaded.proto.graph.as_ref().expect("graph")).validate().expect("valid");
    }
}
