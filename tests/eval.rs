//! `onnxq eval`: identical models, a damaged layer found by the per-layer ranking, a QDQ model
//! evaluated through its float twin, and clean errors for mismatched models.

use crate::util::{assert_clean_error, fixture, onnxq, stderr, stdout, tempdir};
use onnxq::onnx::builder::{attr_int, node};
use onnxq::onnx::pb::ModelProto;
use onnxq::onnx::tensor::{from_i32, from_i8, scalar_f32, scalar_u8, to_f32, vec_f32, vec_i32, vec_i8};
use std::ffi::OsString;
use std::path::Path;

fn eval(reference: &Path, candidate: &Path, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<OsString> = vec!["eval".into(), reference.into(), candidate.into(), "--data".into()];
    args.push(fixture("cnn/eval").into());
    args.push("-q".into());
    args.extend(extra.iter().map(OsString::from));
    onnxq(args)
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_str(&stdout(o)).expect("eval prints JSON")
}

fn cnn() -> ModelProto {
    onnxq::onnx::load(&fixture("cnn.onnx")).expect("cnn fixture").proto
}

fn save(m: &ModelProto, path: &Path) {
    onnxq::onnx::save(m, path, &Default::default()).expect("save test model");
}

#[test]
fn same_model_is_identical_with_infinite_sqnr() {
    let m = fixture("cnn.onnx");
    let o = eval(&m, &m, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("inf") && text.contains("identical") && !text.contains("NaN"), "{text}");

    let v = json(&eval(&m, &m, &["--json", "--per-layer"]));
    assert_eq!(v["identical"], true);
    assert_eq!(v["samples"], 8);
    assert_eq!(v["candidate_twin"], false);
    let out = &v["outputs"][0];
    assert_eq!(out["name"], "logits");
    assert_eq!(out["identical"], true);
    assert!(out["sqnr_db"].is_null());
    assert_eq!(out["cosine"], 1.0);
    assert_eq!(out["rel_l2_error"], 0.0);
    assert_eq!(out["top1_agreement"], 1.0);
    let layers = v["per_layer"]["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 8);
    assert!(layers.iter().all(|l| l["identical"] == true && l["drop_db"] == 0.0));
    assert!(v["per_layer"]["worst"].as_array().expect("worst").is_empty());
}

#[test]
fn damaged_layer_is_the_worst_drop() {
    let mut m = cnn();
    let g = m.graph.as_mut().expect("graph");
    let w = g.initializer.iter_mut().find(|t| t.name() == "conv2.weight").expect("conv2.weight");
    let mut a = to_f32(w).expect("weights");
    let mut k = 0u32;
    a.mapv_inplace(|v| {
        k = k.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        v * 1.5 + ((k >> 16) as f32 / 65536.0 - 0.5) * 0.02
    });
    *w = onnxq::onnx::tensor::from_f32("conv2.weight", &a);
    let dir = tempdir();
    let damaged = dir.path().join("damaged.onnx");
    save(&m, &damaged);
    let svg = dir.path().join("sqnr.svg");

    let o = eval(&fixture("cnn.onnx"), &damaged, &["--per-layer", "--json", "--plot", svg.to_str().expect("utf-8")]);
    let v = json(&o);
    assert_eq!(v["identical"], false);
    let sqnr = v["outputs"][0]["sqnr_db"].as_f64().expect("finite SQNR");
    assert!(sqnr > 0.0 && sqnr < 30.0, "{sqnr}");
    let pl = &v["per_layer"];
    assert_eq!(pl["worst"][0]["tensor"], "conv2", "{pl:#}");
    assert_eq!(pl["worst"][0]["node"], "conv2");
    let layers = pl["layers"].as_array().expect("layers");
    let row = |t: &str| layers.iter().find(|l| l["tensor"] == t).expect("row");
    assert_eq!(row("pool1")["identical"], true);
    assert!(row("conv2")["sqnr_db"].as_f64().expect("finite") < 30.0);
    assert!(row("conv2")["drop_db"].as_f64().expect("drop") > 50.0);
    // No node of the damaged model is quantized.
    assert!(pl["exclude_candidates"].as_array().expect("list").is_empty());

    let plot = std::fs::read_to_string(&svg).expect("plot written");
    assert!(plot.starts_with("<svg") && plot.contains("conv2 (drop ") && plot.contains("SQNR (dB)"), "{plot}");

    // The text table marks the drop too.
    let o = eval(&fixture("cnn.onnx"), &damaged, &["--per-layer"]);
    let text = stdout(&o);
    let line = text.lines().find(|l| l.contains(" conv2 ") && l.contains("Conv")).expect("conv2 row");
    assert!(line.trim_end().ends_with("<<"), "{text}");
    assert!(text.contains("largest drops: conv2"), "{text}");
}

#[test]
fn different_outputs_are_a_clean_error() {
    let mut m = cnn();
    let g = m.graph.as_mut().expect("graph");
    for n in g.node.iter_mut() {
        for o in n.output.iter_mut().filter(|o| *o == "logits") {
            *o = "scores".into();
        }
    }
    g.output[0].name = Some("scores".into());
    let dir = tempdir();
    let renamed = dir.path().join("renamed.onnx");
    save(&m, &renamed);
    let o = eval(&fixture("cnn.onnx"), &renamed, &[]);
    assert!(!o.status.success());
    assert_clean_error(&o, &["different outputs", "[logits]", "[scores]"]);

    let o = eval(&fixture("cnn.onnx"), &fixture("transformer.onnx"), &[]);
    assert_clean_error(&o, &["different outputs", "[y]"]);
}

/// The cnn fixture with a per-tensor uint8 Q/DQ pair on `relu1`, conv2's weight in int8 per
/// output channel and its bias in int32, like a QDQ quantizer writes them.
fn qdq_cnn() -> ModelProto {
    let mut m = cnn();
    let g = m.graph.as_mut().expect("graph");
    let act_scale = 4.5f32 / 255.0;
    let take = |g: &mut onnxq::onnx::pb::GraphProto, name: &str| {
        let i = g.initializer.iter().position(|t| t.name() == name).expect("initializer");
        to_f32(&g.initializer.remove(i)).expect("float weights")
    };
    let w = take(g, "conv2.weight");
    let b = take(g, "conv2.bias");
    let channels = w.shape()[0];
    let per = w.len() / channels;
    let flat: Vec<f32> = w.iter().copied().collect();
    let mut wq = Vec::with_capacity(flat.len());
    let mut ws = Vec::with_capacity(channels);
    for c in 0..channels {
        let row = &flat[c * per..(c + 1) * per];
        let s = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        ws.push(s);
        wq.extend(row.iter().map(|v| (v / s).round_ties_even().clamp(-127.0, 127.0) as i8));
    }
    let bs: Vec<f32> = ws.iter().map(|s| s * act_scale).collect();
    let bq: Vec<i32> = b.iter().zip(&bs).map(|(v, s)| (v / s).round_ties_even() as i32).collect();
    let wq = ndarray::ArrayD::from_shape_vec(w.raw_dim(), wq).expect("shape");
    g.initializer.extend([
        from_i8("conv2.weight_quantized", &wq),
        vec_f32("conv2.weight_scale", &ws),
        vec_i8("conv2.weight_zero_point", &vec![0; channels]),
        from_i32("conv2.bias_quantized", &ndarray::arr1(&bq).into_dyn()),
        vec_f32("conv2.bias_scale", &bs),
        vec_i32("conv2.bias_zero_point", &vec![0; channels]),
        scalar_f32("relu1_scale", act_scale),
        scalar_u8("relu1_zero_point", 0),
    ]);
    let pos = g.node.iter().position(|n| n.name() == "relu1").expect("relu1") + 1;
    let new = vec![
        node("QuantizeLinear", "relu1_q", &["relu1", "relu1_scale", "relu1_zero_point"], &["relu1_quantized"], vec![]),
        node(
            "DequantizeLinear",
            "relu1_dq",
            &["relu1_quantized", "relu1_scale", "relu1_zero_point"],
            &["relu1_dequantized"],
            vec![],
        ),
        node(
            "DequantizeLinear",
            "conv2.weight_dq",
            &["conv2.weight_quantized", "conv2.weight_scale", "conv2.weight_zero_point"],
            &["conv2.weight"],
            vec![attr_int("axis", 0)],
        ),
        node(
            "DequantizeLinear",
            "conv2.bias_dq",
            &["conv2.bias_quantized", "conv2.bias_scale", "conv2.bias_zero_point"],
            &["conv2.bias"],
            vec![attr_int("axis", 0)],
        ),
    ];
    g.node.splice(pos..pos, new);
    let pool = g.node.iter_mut().find(|n| n.name() == "pool1").expect("pool1");
    pool.input[0] = "relu1_dequantized".into();
    m
}

#[test]
fn qdq_model_runs_through_the_float_twin() {
    let dir = tempdir();
    let q = dir.path().join("cnn_qdq.onnx");
    save(&qdq_cnn(), &q);
    let v = json(&eval(&fixture("cnn.onnx"), &q, &["--json", "--per-layer"]));
    assert_eq!(v["candidate_twin"], true);
    assert_eq!(v["identical"], false);
    let out = &v["outputs"][0];
    let sqnr = out["sqnr_db"].as_f64().expect("finite SQNR");
    assert!(sqnr > 20.0 && sqnr < 100.0, "{sqnr}");
    assert!(out["cosine"].as_f64().expect("cosine") > 0.99);
    assert!(out["top1_agreement"].as_f64().expect("top-1") >= 0.875);
    let pl = &v["per_layer"];
    let layers = pl["layers"].as_array().expect("layers");
    let row = |t: &str| layers.iter().find(|l| l["tensor"] == t).expect("row");
    // relu1 keeps its name for the value before quantization: identical to REF.
    assert_eq!(row("relu1")["identical"], true);
    assert_eq!(row("pool1")["quantized"], true);
    assert_eq!(row("conv2")["quantized"], true);
    assert!(row("pool1")["sqnr_db"].as_f64().expect("finite") > 20.0);
    let excl: Vec<&str> =
        pl["exclude_candidates"].as_array().expect("list").iter().filter_map(|d| d["node"].as_str()).collect();
    assert!(!excl.is_empty() && excl.iter().all(|n| ["pool1", "conv2"].contains(n)), "{excl:?}");

    let o = eval(&fixture("cnn.onnx"), &q, &[]);
    let text = stdout(&o);
    assert!(text.contains("float fake-quant twin") && !text.contains("NaN"), "{text}");
}

#[test]
fn bad_arguments_are_clean_errors() {
    let m = fixture("cnn.onnx");
    let o = onnxq(["eval".into(), OsString::from(&m), OsString::from(&m)]);
    assert_clean_error(&o, &["no samples"]);
    let dir = tempdir();
    let missing = dir.path().join("nope.onnx");
    let o = eval(&m, &missing, &[]);
    assert_clean_error(&o, &["nope.onnx"]);
}

/// The code path of models over 2 GiB (issue #7), on a small model: with the protobuf limit
/// lowered (`ONNXQ_PROTOBUF_LIMIT`) below the size of the float twin of a quantized model with
/// external data, `eval` still runs and reports exactly what it reports without the limit,
/// because the runtime never gets weights inside a protobuf.
#[test]
fn eval_never_serializes_weights_past_the_protobuf_limit() {
    use prost::Message;
    let dir = tempdir();
    let q = dir.path().join("q.onnx");
    let o = onnxq([
        "quantize".as_ref(),
        fixture("cnn.onnx").as_os_str(),
        "--data".as_ref(),
        fixture("cnn/calib").as_os_str(),
        "--external-data".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        q.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let loaded = onnxq::onnx::load(&q).expect("load");
    assert!(loaded.external_tensors > 0, "the test needs weights in external data");
    let twin = onnxq::fakequant::twin(&loaded.proto).expect("twin");
    let runtime = |m: &ModelProto| onnxq::onnx::io::encode_for_runtime(m).expect("runtime encoding").len();
    let limit = runtime(&twin).max(runtime(&cnn()));
    assert!(
        limit < twin.encoded_len() && limit < cnn().encoded_len(),
        "the limit ({limit} bytes) must be below what encoding the weights inline takes"
    );

    let with_limit = std::process::Command::new(env!("CARGO_BIN_EXE_onnxq"))
        .env("ONNXQ_PROTOBUF_LIMIT", limit.to_string())
        .args(["eval".as_ref(), fixture("cnn.onnx").as_os_str(), q.as_os_str(), "--data".as_ref()])
        .args([fixture("cnn/eval").as_os_str(), "-q".as_ref(), "--json".as_ref(), "--per-layer".as_ref()])
        .output()
        .expect("onnxq runs");
    let plain = eval(&fixture("cnn.onnx"), &q, &["--json", "--per-layer"]);
    assert_eq!(json(&with_limit), json(&plain));
}
