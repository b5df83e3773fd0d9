//! `onnxq dump`: text and JSON views, node detail, weight statistics, external data, and
//! clean errors on files that are not models.

use crate::util::{assert_clean_error, fixture, onnxq, stdout, tempdir, write};

#[test]
fn text_dump_shows_header_io_ops_and_totals() {
    let o = onnxq(["dump".as_ref(), fixture("cnn.onnx").as_os_str()]);
    assert!(o.status.success());
    let out = stdout(&o);
    for needle in [
        "ir_version 8  opset ai.onnx:13",
        "graph      cnn",
        "image                        float    [1,3,16,16]",
        "logits                       float    [1,10]",
        "Conv                     2",
        "conv1                        Conv                 image, conv1.weight, conv1.bias -> conv1",
        "conv1.weight                         initializer float    [8, 3, 3, 3]",
        "totals: 8 nodes, 6 weights",
    ] {
        assert!(out.contains(needle), "missing '{needle}' in:\n{out}");
    }
}

#[test]
fn json_dump_counts_constant_weights_and_symbolic_dims() {
    let o = onnxq(["dump".as_ref(), "--json".as_ref(), "--weights".as_ref(), fixture("constants.onnx").as_os_str()]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    assert_eq!(v["inputs"][0]["shape"], "[batch,8]");
    let weights = v["weights"].as_array().expect("weights");
    assert_eq!(weights.len(), 3);
    assert!(weights.iter().all(|w| w["kind"] == "constant"));
    assert_eq!(v["totals"]["parameters"], 8 * 16 + 16 + 16 * 4);
    let s = &weights[0]["stats"];
    assert!(s["abs_max"].as_f64().expect("abs_max") > 0.0);
    assert!(s["min"].as_f64() <= s["mean"].as_f64() && s["mean"].as_f64() <= s["max"].as_f64());
    assert_eq!(v["op_histogram"]["MatMul"], 2);
}

#[test]
fn node_detail_lists_producers_and_consumers() {
    let o = onnxq(["dump", "--node", "relu", fixture("shared.onnx").to_str().expect("utf8")]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("node 'relu' (Relu)"), "{out}");
    assert!(out.contains("<- 'mm1' (MatMul)"), "{out}");
    assert!(out.contains("-> 'mm2' (MatMul)"), "{out}");
    let o = onnxq(["dump", "--node", "nope", fixture("shared.onnx").to_str().expect("utf8")]);
    assert_clean_error(&o, &["no node named 'nope'"]);
}

#[test]
fn broken_files_give_one_line_errors() {
    let dir = tempdir();
    let good = std::fs::read(fixture("cnn.onnx")).expect("fixture");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.onnx", vec![]),
        ("truncated.onnx", good[..good.len() / 2].to_vec()),
        ("image.onnx", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0".to_vec()),
    ];
    for (name, bytes) in cases {
        let p = dir.path().join(name);
        write(&p, &bytes);
        let o = onnxq(["dump".as_ref(), p.as_os_str()]);
        assert_clean_error(&o, &[name]);
    }
    let o = onnxq(["dump".as_ref(), dir.path().join("absent.onnx").as_os_str()]);
    assert_clean_error(&o, &["absent.onnx"]);
}

#[test]
fn external_data_round_trip_and_missing_file() {
    let dir = tempdir();
    let model = onnxq::onnx::load(&fixture("cnn.onnx")).expect("load");
    let out = dir.path().join("ext.onnx");
    let saved = onnxq::onnx::save(&model.proto, &out, &onnxq::onnx::SaveOptions { external: true, threshold: Some(1) })
        .expect("save");
    assert_eq!(saved.external_file.as_deref(), Some(dir.path().join("ext.onnx.data").as_path()));
    let back = onnxq::onnx::load(&out).expect("reload");
    assert_eq!(back.external_tensors, 6);
    assert!(back.proto == model.proto, "external data resolves to the same tensors");
    let o = onnxq(["dump".as_ref(), out.as_os_str()]);
    assert!(stdout(&o).contains("6 tensors in external data"), "{}", stdout(&o));

    std::fs::remove_file(dir.path().join("ext.onnx.data")).expect("rm");
    let o = onnxq(["dump".as_ref(), out.as_os_str()]);
    assert_clean_error(&o, &["ext.onnx", "ext.onnx.data", "conv1.weight"]);
}

#[test]
fn external_data_cannot_escape_the_model_folder() {
    use onnxq::onnx::pb::{tensor_proto::DataLocation, StringStringEntryProto};
    let dir = tempdir();
    let mut model = onnxq::onnx::load(&fixture("shared.onnx")).expect("load").proto;
    for (loc, needle) in [("../secret.bin", "escapes"), ("/etc/passwd", "absolute")] {
        let t = &mut model.graph.as_mut().expect("graph").initializer[0];
        t.raw_data = None;
        t.data_location = Some(DataLocation::External as i32);
        t.external_data = vec![StringStringEntryProto { key: Some("location".into()), value: Some(loc.into()) }];
        let p = dir.path().join("bad.onnx");
        onnxq::onnx::save(&model, &p, &Default::default()).expect("save");
        let o = onnxq(["dump".as_ref(), p.as_os_str()]);
        assert_clean_error(&o, &["bad.onnx", "shared.weight", needle]);
    }
}
