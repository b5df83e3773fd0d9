//! `onnxq quantize`: every fixture quantizes to a valid QDQ model whose outputs stay within an
//! SQNR bound a broken quantizer could not meet; formats (per-channel int8 weights, int32
//! bias, uint8/int8 activations), placement, selection flags, determinism, and errors.

use crate::util::{assert_clean_error, fixture, init, onnxq, read_json, stderr, tempdir};
use onnxq::array::dtype;
use onnxq::onnx::attr::NodeAttrs;
use onnxq::onnx::pb::ModelProto;
use std::path::{Path, PathBuf};

fn quantize(model: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<std::ffi::OsString> = vec!["quantize".into(), fixture(model).into(), "-o".into(), out.into()];
    args.extend(extra.iter().map(|s| s.into()));
    onnxq(args)
}

fn calib(name: &str) -> String {
    fixture(&format!("{name}/calib")).display().to_string()
}

fn load(p: &Path) -> ModelProto {
    let m = onnxq::onnx::load(p).expect("load quantized").proto;
    onnxq::onnx::GraphView::new(m.graph.as_ref().expect("graph")).validate().expect("valid graph");
    m
}

/// Worst-output SQNR of `cand` against the fixture on its held-out eval samples.
fn sqnr(name: &str, cand: &Path) -> f64 {
    let reference = onnxq::onnx::load(&fixture(&format!("{name}.onnx"))).expect("load ref").proto;
    let c = onnxq::onnx::load(cand).expect("load cand").proto;
    let data = onnxq::data::DataOptions {
        sources: vec![onnxq::data::Source::Path(fixture(&format!("{name}/eval")))],
        ..Default::default()
    };
    onnxq::pipeline::output_sqnr(&reference, &c, &data).expect("eval")
}

/// The first node whose data input is `tensor` (e.g. the DequantizeLinear of a weight).
fn first_reader<'a>(m: &'a ModelProto, tensor: &str) -> &'a onnxq::onnx::pb::NodeProto {
    m.graph
        .as_ref()
        .expect("graph")
        .node
        .iter()
        .find(|n| n.input.first().map(|s| s.as_str()) == Some(tensor))
        .unwrap_or_else(|| panic!("no node reads {tensor}"))
}

fn ops(m: &ModelProto, op: &str) -> usize {
    m.graph.as_ref().expect("graph").node.iter().filter(|n| n.op_type() == op).count()
}

#[test]
fn every_fixture_quantizes_within_an_sqnr_bound() {
    // Bounds sit a few dB below what the quantizer reaches (transformer: 27.7 dB under the
    // transformer-fused preset auto picks); a wrong scale, zero point, axis or bias scale
    // drops far below them.
    let cases = [
        ("cnn", 35.0),
        ("transformer", 25.0),
        ("constants", 30.0),
        ("shared", 17.0),
        ("outliers", 6.0),
        ("convchain", 35.0),
    ];
    let dir = tempdir();
    for (name, bound) in cases {
        let out = dir.path().join(format!("{name}.onnx"));
        let o = quantize(&format!("{name}.onnx"), &out, &["--data", &calib(name), "--quiet"]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let q = load(&out);
        assert!(ops(&q, "QuantizeLinear") > 0 && ops(&q, "DequantizeLinear") > 0, "{name} has Q/DQ");
        let s = sqnr(name, &out);
        assert!(s > bound && s.is_finite(), "{name}: SQNR {s:.2} dB not above {bound}");
        // Graph inputs and outputs keep their names and float types.
        let f = onnxq::onnx::load(&fixture(&format!("{name}.onnx"))).expect("load").proto;
        let names = |m: &ModelProto| {
            let g = m.graph.as_ref().expect("graph");
            (
                g.input
                    .iter()
                    .map(|v| (v.name().to_string(), onnxq::onnx::builder::elem_type_of(v)))
                    .collect::<Vec<_>>(),
                g.output
                    .iter()
                    .map(|v| (v.name().to_string(), onnxq::onnx::builder::elem_type_of(v)))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(names(&f), names(&q), "{name}: graph inputs/outputs changed");
    }
    let same = sqnr("cnn", &fixture("cnn.onnx"));
    assert!(same.is_infinite(), "the float model matches itself exactly");
}

#[test]
fn conv_weights_are_per_channel_int8_and_biases_int32() {
    let dir = tempdir();
    let out = dir.path().join("q.onnx");
    let report = dir.path().join("r.json");
    let o = quantize("cnn.onnx", &out, &["--data", &calib("cnn"), "--report", report.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let q = load(&out);
    let w = init(&q, "conv1.weight_quantized");
    assert_eq!(w.data_type(), dtype::INT8);
    assert_eq!(init(&q, "conv1.weight_scale").dims, vec![8]);
    let dq = first_reader(&q, "conv1.weight_quantized");
    assert_eq!(dq.attr_int("axis").expect("int"), Some(0));
    // Bias: int32, scale = input scale x weight scale, zero point 0.
    let b = init(&q, "conv1.bias_quantized");
    assert_eq!(b.data_type(), dtype::INT32);
    let bs = onnxq::onnx::tensor::to_f32(init(&q, "conv1.bias_scale")).expect("f32");
    let ws = onnxq::onnx::tensor::to_f32(init(&q, "conv1.weight_scale")).expect("f32");
    let xs = onnxq::onnx::tensor::to_f32(init(&q, "image_scale")).expect("f32");
    for c in 0..8 {
        assert!((bs[c] - xs[[]] * ws[c]).abs() <= 1e-6 * bs[c].abs(), "bias scale channel {c}");
    }
    // Gemm with transB=1: per-channel on axis 0 of B.
    let dq = first_reader(&q, "fc.weight_quantized");
    assert_eq!(dq.attr_int("axis").expect("int"), Some(0));
    // Relu folded into the Q after each Conv: ONNX Runtime fuses Conv+Q into QLinearConv.
    assert_eq!(ops(&q, "Relu"), 0);
    let r: serde_json::Value = read_json(&report);
    assert_eq!(r["quantization"]["totals"]["relu_removed"], 2);
    assert_eq!(r["quantization"]["totals"]["biases_quantized"], 3);
    assert!(r["quantization"]["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .any(|t| t["name"] == "conv2" || t["name"] == "relu2"));

    let out2 = dir.path().join("pt.onnx");
    let o = quantize("cnn.onnx", &out2, &["--data", &calib("cnn"), "--per-tensor", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let q2 = load(&out2);
    assert!(init(&q2, "conv1.weight_scale").dims.is_empty(), "per-tensor scale is a scalar");
    assert!(sqnr("cnn", &out2) > 25.0);
}

/// Bias correction is opt-in; on the cnn fixture it is kept and helps on held-out samples.
#[test]
fn bias_correction_is_opt_in_and_kept_when_it_helps() {
    let dir = tempdir();
    let (plain, corrected) = (dir.path().join("p.onnx"), dir.path().join("c.onnx"));
    let (rp, rc) = (dir.path().join("p.json"), dir.path().join("c.json"));
    let o = quantize("cnn.onnx", &plain, &["--data", &calib("cnn"), "-q", "--report", rp.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(read_json(&rp).get("bias_correction").is_none(), "off by default");
    let args = ["--data", &calib("cnn"), "-q", "--bias-correction", "--report", rc.to_str().expect("utf8")];
    let o = quantize("cnn.onnx", &corrected, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let bc = &read_json(&rc)["bias_correction"];
    assert_eq!(bc["corrected"], 3);
    assert_eq!(bc["applied"], true);
    let (before, after) = (bc["sqnr_before_db"].as_f64().expect("f64"), bc["sqnr_after_db"].as_f64().expect("f64"));
    assert!(after > before + 1.0, "{before} -> {after}");
    assert!(sqnr("cnn", &corrected) > sqnr("cnn", &plain) + 1.0);
}

#[test]
fn weights_only_needs_no_data_and_quantizes_constant_node_weights() {
    let dir = tempdir();
    let out = dir.path().join("w.onnx");
    let o = quantize("constants.onnx", &out, &["--weights-only", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let q = load(&out);
    assert_eq!(ops(&q, "QuantizeLinear"), 0, "activations stay float");
    assert_eq!(ops(&q, "DequantizeLinear"), 2);
    assert_eq!(ops(&q, "Constant"), 1, "only the bias Constant remains: weights became int8 initializers");
    assert_eq!(init(&q, "w1_quantized").data_type(), dtype::INT8);
    assert!(sqnr("constants", &out) > 35.0);
    let before = std::fs::metadata(fixture("constants.onnx")).expect("meta").len();
    let after = std::fs::metadata(&out).expect("meta").len();
    assert!(after < before, "{after} < {before}");
}

#[test]
fn a_shared_weight_gets_one_quantized_copy() {
    let dir = tempdir();
    let out = dir.path().join("s.onnx");
    let o = quantize("shared.onnx", &out, &["--data", &calib("shared"), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let q = load(&out);
    let g = q.graph.as_ref().expect("graph");
    let int8: Vec<&str> =
        g.initializer.iter().filter(|t| t.data_type() == dtype::INT8 && t.dims.len() == 2).map(|t| t.name()).collect();
    assert_eq!(int8, vec!["shared.weight_quantized"]);
    let readers =
        g.node.iter().filter(|n| n.input.first().map(|s| s.as_str()) == Some("shared.weight_quantized")).count();
    assert_eq!(readers, 2, "one DequantizeLinear per consumer (ONNX Runtime fuses single-consumer DQs)");
    assert!(!g.initializer.iter().any(|t| t.name() == "shared.weight"), "the float copy is gone");
}

#[test]
fn attention_mask_sentinels_never_set_a_range() {
    let dir = tempdir();
    let out = dir.path().join("t.onnx");
    let report = dir.path().join("r.json");
    let o = quantize(
        "transformer.onnx",
        &out,
        &["--data", &calib("transformer"), "--preset", "cnn", "--report", report.to_str().expect("utf8")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("sentinel"), "{}", stderr(&o));
    let r: serde_json::Value = read_json(&report);
    let skipped = r["quantization"]["skipped"].as_array().expect("skipped");
    let sentinel =
        |n: &str| skipped.iter().any(|s| s["name"] == n && s["reason"].as_str().unwrap_or("").contains("sentinel"));
    assert!(sentinel("mask_scale"), "the −3.4e38 mask itself is reported and left float");
    // Scores + mask is quantized on the scores' grid (a masked score saturates at its lowest
    // level) and the mask over twice the scores' span below 0, so ONNX Runtime fuses
    // QLinearAdd and QLinearSoftmax; no range comes from the sentinel.
    let tensors = r["quantization"]["tensors"].as_array().expect("tensors");
    let get =
        |name: &str| tensors.iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("{name} is not quantized"));
    let (scores, mask) = (get("qk_scale"), get("mask_unsqueeze"));
    let (lo, hi) = (scores["range"][0].as_f64().expect("lo"), scores["range"][1].as_f64().expect("hi"));
    let s_mask = mask["scale"][0].as_f64().expect("scale");
    // Its lowest level pushes even the highest score below the lowest one, with margin.
    assert!(hi - 255.0 * s_mask < lo - (hi - lo) / 2.0, "mask scale {s_mask} for scores [{lo}, {hi}]");
    assert!(s_mask < 1.0, "a scale of the sentinel's own (~1e36) overflows ONNX Runtime's QLinearAdd");
    assert_eq!(mask["zero_point"], 255);
    assert!(quantized_names(&r).contains(&"softmax"));
    let m = load(&out);
    let g = m.graph.as_ref().expect("graph");
    let q_of = |t: &str| {
        g.node
            .iter()
            .find(|n| n.op_type() == "QuantizeLinear" && n.input[0] == t)
            .unwrap_or_else(|| panic!("no QuantizeLinear of {t}"))
    };
    assert_eq!(
        q_of("qk_mask").input[1..],
        q_of("qk_scale").input[1..],
        "the sum shares the scores' scale and zero point"
    );
    let softmax = g.node.iter().find(|n| n.name() == "softmax").expect("softmax");
    assert!(softmax.input[0].ends_with("dequantized"), "the Softmax reads a DequantizeLinear");
    assert!(sqnr("transformer", &out) > 20.0);
}

#[test]
fn transformer_preset_keeps_the_residual_stream_and_norms_float() {
    let dir = tempdir();
    let out = dir.path().join("t.onnx");
    let report = dir.path().join("r.json");
    let o = quantize(
        "transformer.onnx",
        &out,
        &["--data", &calib("transformer"), "--report", report.to_str().expect("utf8"), "--preset", "transformer"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = read_json(&report);
    assert_eq!(r["quantization"]["preset"], "transformer");
    let quantized = quantized_names(&r);
    for float in ["residual1", "ln2_pow", "ln2_var", "gelu_erf", "qk_mask", "x"] {
        assert!(!quantized.contains(&float), "{float} must stay float");
    }
    for q in ["ln1_shift", "softmax", "gelu_half_mul", "q_proj.weight"] {
        assert!(quantized.contains(&q), "{q} should be quantized");
    }
    // The residual Add reads the float LayerNorm input, not a dequantized copy.
    let m = load(&out);
    let add = m.graph.as_ref().expect("graph").node.iter().find(|n| n.name() == "residual1").expect("residual1");
    assert_eq!(add.input[0], "x");
}

/// auto picks transformer-fused for a graph with LayerNorm: ONNX Runtime's placement inside
/// attention and FFN, and each residual-stream tensor quantized only when its int8 step keeps
/// enough SQNR (the fixture's random activations all do; the unit test in `quantize` covers
/// a group that stays float).
#[test]
fn auto_picks_transformer_fused_for_the_transformer_fixture() {
    let dir = tempdir();
    let (out, report) = (dir.path().join("t.onnx"), dir.path().join("r.json"));
    let o = quantize(
        "transformer.onnx",
        &out,
        &["--data", &calib("transformer"), "--report", report.to_str().expect("utf8"), "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = read_json(&report);
    assert_eq!(r["quantization"]["preset"], "transformer-fused", "auto detects the decomposed LayerNorm");
    let quantized = quantized_names(&r);
    for q in ["residual1", "x", "o_proj_add", "softmax", "gelu_half_mul", "ffn2_add"] {
        assert!(quantized.contains(&q), "{q} should be quantized");
    }
    for float in ["ln2_pow", "ln2_var", "y"] {
        assert!(!quantized.contains(&float), "{float} must stay float");
    }
}

#[test]
fn cnn_preset_quantizes_the_gelu_tail_on_exact_grids() {
    let dir = tempdir();
    let out = dir.path().join("g.onnx");
    let report = dir.path().join("r.json");
    let o = quantize(
        "transformer.onnx",
        &out,
        &["--data", &calib("transformer"), "--preset", "cnn", "--report", report.to_str().expect("utf8"), "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = read_json(&report);
    let tensors = r["quantization"]["tensors"].as_array().expect("tensors");
    let get = |name: &str| {
        let t = tensors.iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("{name} is not quantized"));
        (t["scale"][0].as_f64().expect("scale"), t["zero_point"].as_i64().expect("zp"), t["kind"].clone())
    };
    // Erf output on the fixed grid 1/127 (zero point 127); `+1` moves only the zero point.
    let (s_erf, z_erf, _) = get("gelu_erf");
    assert_eq!((s_erf as f32, z_erf), (1.0 / 127.0, 127));
    let (s_add, z_add, _) = get("gelu_add");
    assert_eq!((s_add as f32, z_add), (1.0 / 127.0, 0));
    // `·0.5` halves the scale of the product and keeps its zero point.
    let (s_mul, z_mul, _) = get("gelu_mul");
    let (s_half, z_half, _) = get("gelu_half_mul");
    assert_eq!(((s_mul as f32) * 0.5, z_mul), (s_half as f32, z_half));
    for c in ["gelu_one", "gelu_half", "q_proj.bias", "ffn1.bias"] {
        assert_eq!(get(c).2, "constant");
    }
    // A bias vector added separately is quantized per tensor over its own min/max (zero
    // included), ONNX Runtime's way, so the Add fuses into QLinearAdd.
    let bias = tensors.iter().find(|t| t["name"] == "q_proj.bias").expect("q_proj.bias");
    let (lo, hi) = (bias["range"][0].as_f64().expect("lo"), bias["range"][1].as_f64().expect("hi"));
    assert!(lo < 0.0 && hi > 0.0 && lo < hi, "range [{lo}, {hi}]");
    let (s_b, z_b, _) = get("q_proj.bias");
    assert!(((hi - lo) / 255.0 - s_b).abs() < 1e-6 * s_b.max(1e-6), "scale {s_b} for [{lo}, {hi}]");
    assert_eq!(z_b, (-lo / s_b).round() as i64);
    // Every Add/Mul of the Gelu and the bias Adds read DequantizeLinear outputs only.
    let m = load(&out);
    let g = m.graph.as_ref().expect("graph");
    for name in ["gelu_div", "gelu_add", "gelu_mul", "gelu_half_mul", "q_proj_add", "ffn1_add"] {
        let n = g.node.iter().find(|n| n.name() == name).expect("node");
        for i in &n.input {
            let p = g.node.iter().find(|p| p.output.contains(i)).expect("producer");
            assert_eq!(p.op_type(), "DequantizeLinear", "{name} reads {i}");
        }
    }
    // The Div by √2 became a Mul by 1/√2, quantized on the grid of its input scaled by 1/√2
    // (the same integers: no extra rounding), so ONNX Runtime fuses it too; Erf stays float.
    let div = g.node.iter().find(|n| n.name() == "gelu_div").expect("gelu_div");
    assert_eq!(div.op_type(), "Mul");
    let (s_div, z_div, _) = get("gelu_div");
    let (s_f1, z_f1, _) = get("ffn1_add");
    assert_eq!(z_f1, z_div);
    assert!(((s_f1 / std::f64::consts::SQRT_2) / s_div - 1.0).abs() < 1e-6, "{s_f1}/√2 vs {s_div}");
    let erf = g.node.iter().find(|n| n.name() == "gelu_erf").expect("erf");
    assert_eq!(erf.op_type(), "Erf");
    assert!(erf.input[0].ends_with("dequantized"), "the Erf reads the Mul's DequantizeLinear");
    assert!(sqnr("transformer", &out) > 15.0);
}

#[test]
fn selection_flags_exclude_nodes_and_op_types() {
    let dir = tempdir();
    let out = dir.path().join("e.onnx");
    let report = dir.path().join("r.json");
    let o = quantize(
        "cnn.onnx",
        &out,
        &[
            "--data",
            &calib("cnn"),
            "--exclude",
            "conv*",
            "--exclude-op-types",
            "Gemm",
            "--report",
            report.to_str().expect("utf8"),
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = read_json(&report);
    let skipped: Vec<(&str, &str)> = r["quantization"]["skipped"]
        .as_array()
        .expect("skipped")
        .iter()
        .filter_map(|s| Some((s["name"].as_str()?, s["reason"].as_str()?)))
        .collect();
    assert!(skipped.contains(&("conv1", "--exclude")) && skipped.contains(&("conv2", "--exclude")));
    assert!(skipped.contains(&("fc", "--exclude-op-types")));
    let q = load(&out);
    assert!(!q
        .graph
        .as_ref()
        .expect("graph")
        .initializer
        .iter()
        .any(|t| t.data_type() == dtype::INT8 && t.dims.len() > 1));
}

#[test]
fn int8_symmetric_activations() {
    let dir = tempdir();
    let out = dir.path().join("s8.onnx");
    let o = quantize("cnn.onnx", &out, &["--data", &calib("cnn"), "--activations", "s8", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let q = load(&out);
    let zp = init(&q, "image_zero_point");
    assert_eq!(zp.data_type(), dtype::INT8);
    assert_eq!(onnxq::onnx::tensor::to_f32(zp).expect("f32")[[]], 0.0);
    assert_eq!(ops(&q, "Relu"), 2, "a symmetric Q cannot stand in for Relu");
    assert!(sqnr("cnn", &out) > 30.0);
}

#[test]
fn stats_file_reuse_and_determinism() {
    let dir = tempdir();
    let stats = dir.path().join("s.json");
    let o = onnxq([
        "calibrate",
        fixture("transformer.onnx").to_str().expect("utf8"),
        "--data",
        &calib("transformer"),
        "-o",
        stats.to_str().expect("utf8"),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut outs: Vec<PathBuf> = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.path().join(format!("q{threads}.onnx"));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_onnxq"))
            .args([
                "quantize",
                fixture("transformer.onnx").to_str().expect("utf8"),
                "--data",
                &calib("transformer"),
                "-q",
                "-o",
            ])
            .arg(&out)
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .expect("run");
        assert!(o.status.success(), "{}", stderr(&o));
        outs.push(out);
    }
    let from_stats = dir.path().join("qs.onnx");
    let o = quantize(
        "transformer.onnx",
        &from_stats,
        &["--stats", stats.to_str().expect("utf8"), "--data", &calib("transformer"), "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let a = std::fs::read(&outs[0]).expect("read");
    assert!(a == std::fs::read(&outs[1]).expect("read"), "same bytes for 1 and 2 threads");
    assert!(a == std::fs::read(&from_stats).expect("read"), "--stats gives the same model as calibrating");
}

#[test]
fn opset_11_models_are_upgraded_for_per_channel_weights() {
    let dir = tempdir();
    let mut m = onnxq::onnx::load(&fixture("cnn.onnx")).expect("load").proto;
    m.opset_import[0].version = Some(11);
    let p11 = dir.path().join("cnn11.onnx");
    onnxq::onnx::save(&m, &p11, &Default::default()).expect("save");
    let out = dir.path().join("q.onnx");
    let report = dir.path().join("r.json");
    let o = onnxq([
        "quantize",
        p11.to_str().expect("utf8"),
        "--data",
        &calib("cnn"),
        "-o",
        out.to_str().expect("utf8"),
        "--report",
        report.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("upgraded opset 11 -> 13 (version only"), "{}", stderr(&o));
    let q = load(&out);
    assert_eq!(onnxq::quantize::default_opset(&q), 13);
    assert_eq!(init(&q, "conv1.weight_scale").dims, vec![8]);
    // A node whose signature changed (Dropout's `ratio` attribute) is rewritten, and then the
    // upgraded float model is checked against the original on a sample.
    let mut d = m.clone();
    let graph = d.graph.as_mut().expect("graph");
    let ratio = onnxq::onnx::builder::attr_float("ratio", 0.1);
    graph.node.push(onnxq::onnx::builder::node("Dropout", "drop", &["logits"], &["dropped"], vec![ratio]));
    graph.output[0] = onnxq::onnx::builder::tensor_info("dropped", dtype::FLOAT, &[1, 10]);
    let pd = dir.path().join("dropout.onnx");
    onnxq::onnx::save(&d, &pd, &Default::default()).expect("save");
    let o = onnxq(["quantize", pd.to_str().expect("utf8"), "--data", &calib("cnn"), "-o", out.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("upgraded opset 11 -> 13 (1 node rewritten), float outputs match"), "{}", stderr(&o));
    assert_eq!(init(&load(&out), "conv1.weight_scale").dims, vec![8]);
    // Blocked upgrade: a Softmax over axis 1 of unknown rank -> per-tensor with a warning.
    let mut g = m.clone();
    let graph = g.graph.as_mut().expect("graph");
    graph.node.push(onnxq::onnx::builder::node("Softmax", "probs", &["logits"], &["probs"], vec![]));
    graph.output[0] = onnxq::onnx::builder::tensor_info("probs", dtype::FLOAT, &[1, 10]);
    let pb = dir.path().join("blocked.onnx");
    onnxq::onnx::save(&g, &pb, &Default::default()).expect("save");
    let out2 = dir.path().join("q2.onnx");
    let o =
        onnxq(["quantize", pb.to_str().expect("utf8"), "--data", &calib("cnn"), "-o", out2.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("node 'probs' (Softmax)"), "{}", stderr(&o));
    assert!(stderr(&o).contains("per-tensor"), "{}", stderr(&o));
    assert!(init(&load(&out2), "conv1.weight_scale").dims.is_empty());
}

#[test]
fn errors_are_clean_and_leave_no_output() {
    let dir = tempdir();
    let out = dir.path().join("q.onnx");
    let o = quantize("cnn.onnx", &out, &[]);
    assert_clean_error(&o, &["--data"]);
    assert!(!out.exists());
    let copy = dir.path().join("cnn.onnx");
    std::fs::copy(fixture("cnn.onnx"), &copy).expect("copy");
    let o = onnxq(["quantize", copy.to_str().expect("utf8"), "--weights-only", "-o", copy.to_str().expect("utf8")]);
    assert_clean_error(&o, &["refusing to overwrite"]);
    assert_eq!(std::fs::read(&copy).expect("read"), std::fs::read(fixture("cnn.onnx")).expect("read"));
    let o = quantize("cnn.onnx", &out, &["--data", &calib("cnn"), "--method", "percentile:200x"]);
    assert!(o.status.code() == Some(2), "clap usage error");
}

/// Normalized 8-bit images, `(p/255 − 0.5)/0.5`, quantize exactly: the input is shifted onto
/// the uint8 grid (Add + Pad in float, Conv bias compensated) instead of rounding every pixel
/// by half a step; `--no-input-grid` keeps the plain quantizer.
#[test]
fn lattice_image_inputs_are_shifted_onto_the_uint8_grid() {
    let dir = tempdir();
    let data = dir.path().join("calib");
    std::fs::create_dir_all(&data).expect("mkdir");
    let mut seed = 7u64;
    for i in 0..4 {
        let x: Vec<f32> = (0..3 * 16 * 16)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 33) % 256) as f32 / 255.0 * 2.0 - 1.0
            })
            .collect();
        let a =
            onnxq::array::ArrayData::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 3, 16, 16]), x).unwrap());
        onnxq::npy::write_npz(&data.join(format!("{i}.npz")), &[("image", &a)]).expect("npz");
    }
    let data = data.display().to_string();
    let (out, report) = (dir.path().join("q.onnx"), dir.path().join("r.json"));
    let o = quantize("cnn.onnx", &out, &["--data", &data, "--report", report.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = read_json(&report);
    let g = &r["input_grid"][0];
    assert_eq!((g["input"].as_str(), g["zero_point"].as_i64()), (Some("image"), Some(128)), "{r}");
    assert_eq!(g["convs"], serde_json::json!(["conv1"]));
    let m = load(&out);
    assert_eq!((ops(&m, "Add"), ops(&m, "Pad")), (1, 1));
    let q = first_reader(&m, "image_grid_padded");
    assert_eq!(q.op_type(), "QuantizeLinear");
    let scale = onnxq::onnx::tensor::to_f32(init(&m, &q.input[1])).expect("scale");
    assert!((scale.iter().next().copied().unwrap_or(0.0) - 2.0 / 255.0).abs() < 1e-7);
    let reference = onnxq::onnx::load(&fixture("cnn.onnx")).expect("load ref").proto;
    let on_data = |cand: &Path| {
        let d = onnxq::data::DataOptions {
            sources: vec![onnxq::data::Source::Path(data.clone().into())],
            ..Default::default()
        };
        onnxq::pipeline::output_sqnr(&reference, &load(cand), &d).expect("eval")
    };
    let shifted = on_data(&out);

    let plain = dir.path().join("plain.onnx");
    let o =
        quantize("cnn.onnx", &plain, &["--data", &data, "--no-input-grid", "--report", report.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = read_json(&report);
    assert!(r.get("input_grid").is_none(), "{r}");
    assert_eq!(ops(&load(&plain), "Pad"), 0);
    let unshifted = on_data(&plain);
    eprintln!("lattice input: {shifted:.2} dB shifted, {unshifted:.2} dB plain");
    assert!(shifted > 30.0 && shifted > unshifted, "{shifted} vs {unshifted}");
}

/// `quantize` calibrates only the tensors the placement can read a range of; the model must
/// be byte-identical to one quantized from the statistics of every tensor (`onnxq calibrate`).
#[test]
fn calibrating_only_placement_candidates_changes_nothing() {
    let dir = tempdir();
    for name in ["cnn", "transformer", "shared", "constants", "outliers"] {
        let stats = dir.path().join(format!("{name}.json"));
        let mut args: Vec<std::ffi::OsString> = vec!["calibrate".into(), fixture(&format!("{name}.onnx")).into()];
        args.extend(["--data".into(), calib(name).into(), "-o".into(), stats.clone().into(), "-q".into()]);
        let o = onnxq(args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let (a, b) = (dir.path().join(format!("{name}_a.onnx")), dir.path().join(format!("{name}_b.onnx")));
        let o = quantize(&format!("{name}.onnx"), &a, &["--data", &calib(name), "--regularize", "off", "-q"]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let stats = stats.to_str().expect("utf8");
        let o = quantize(
            &format!("{name}.onnx"),
            &b,
            &["--data", &calib(name), "--stats", stats, "--regularize", "off", "-q"],
        );
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(std::fs::read(&a).expect("a") == std::fs::read(&b).expect("b"), "{name}: models differ");
    }
}

/// The names of the tensors a quantize report lists as quantized.
fn quantized_names(r: &serde_json::Value) -> Vec<&str> {
    r["quantization"]["tensors"].as_array().expect("tensors").iter().filter_map(|t| t["name"].as_str()).collect()
}

/// `--weight-rounding gptq` compensates each weight's rounding error on the layer's other
/// inputs: on held-out samples the int8-weight models of both CNN and transformer fixtures
/// come out more accurate than with nearest rounding, with the same scales; without
/// calibration samples it is a clean error.
#[test]
fn gptq_weight_rounding_beats_nearest_rounding() {
    let dir = tempdir();
    for name in ["cnn", "transformer"] {
        let model = format!("{name}.onnx");
        let mut db = Vec::new();
        for how in ["nearest", "gptq"] {
            let out = dir.path().join(format!("{name}_{how}.onnx"));
            let c = calib(name);
            let report = dir.path().join(format!("{name}_{how}.json"));
            let r = report.to_str().expect("utf8");
            let args = ["--weights-only", "--weight-rounding", how, "--data", &c, "--report", r, "-q"];
            let o = quantize(&model, &out, &args);
            assert!(o.status.success(), "{name} {how}: {}", stderr(&o));
            db.push(sqnr(name, &out));
            let r: serde_json::Value = read_json(&report);
            let tensors = r["quantization"]["tensors"].as_array().expect("tensors");
            let gptq = tensors.iter().filter(|t| t["kind"] == "weight" && t["method"] == "gptq").count();
            assert_eq!(gptq > 0, how == "gptq", "{name} {how}: {gptq} weights marked gptq");
        }
        eprintln!("{name}: nearest {} dB, gptq {} dB", db[0], db[1]);
        assert!(db[1] > db[0] + 0.25, "{name}: gptq {} dB vs nearest {} dB", db[1], db[0]);
    }
    let out = dir.path().join("x.onnx");
    let o = quantize("cnn.onnx", &out, &["--weights-only", "--weight-rounding", "gptq"]);
    assert_clean_error(&o, &["needs calibration samples"]);
    assert!(!out.exists());
}

/// The activations between two convolutions (relu1 → 1×1 conv2, relu2 → depthwise conv3),
/// whose channels span ranges 100× apart, are rescaled per channel into the convolutions'
/// weights: the held-out SQNR rises well above plain quantization's (measured 32.8 →
/// 39.4 dB), the report lists both tensors, and `--no-equalize` or a percentile range (which
/// cannot be recomputed from per-channel statistics) or minmax ranges leave the model as
/// calibrated.
#[test]
fn equalizing_conv_chains_beats_plain_quantization() {
    let dir = tempdir();
    let c = calib("convchain");
    let mut db = Vec::new();
    let cases = [
        ("eq", None),
        ("plain", Some("--no-equalize")),
        ("pct", Some("--method=percentile:99.99")),
        ("minmax", Some("--method=minmax")),
    ];
    for (tag, extra) in cases {
        let out = dir.path().join(format!("{tag}.onnx"));
        let report = dir.path().join(format!("{tag}.json"));
        let mut args = vec!["--data", &c, "--report", report.to_str().expect("utf8"), "-q"];
        args.extend(extra);
        let o = quantize("convchain.onnx", &out, &args);
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        db.push(sqnr("convchain", &out));
        let r: serde_json::Value = read_json(&report);
        let done: Vec<&str> = r["equalized"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["tensor"].as_str()).collect())
            .unwrap_or_default();
        let skipped = r["equalize_skipped"].as_array().map_or(0, |a| a.len());
        match tag {
            "eq" => assert_eq!((done, skipped), (vec!["relu1", "relu2"], 0), "{}", r["equalized"]),
            "plain" => assert_eq!((done.len(), skipped), (0, 0)),
            _ => assert_eq!((done.len(), skipped), (0, 2), "{tag}"),
        }
    }
    eprintln!("convchain: equalized {} dB, plain {} dB, percentile {} dB, minmax {} dB", db[0], db[1], db[2], db[3]);
    assert!(db[0] > db[1] + 3.0, "equalized {} dB vs plain {} dB", db[0], db[1]);
}
