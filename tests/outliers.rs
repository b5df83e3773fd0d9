//! `onnxq outliers`, `onnxq regularize` and `onnxq quantize --regularize`: the injected
//! outliers of the `outliers` fixture are found and attributed to the two weights that make
//! them, regularization edits those weights and beats plain quantization by at least 6 dB,
//! `auto` never loses on any fixture, and bad options fail cleanly.

use crate::util::{assert_clean_error, fixture, onnxq, stderr, stdout, tempdir};
use onnxq::onnx::pb::ModelProto;
use onnxq::onnx::tensor::to_f32;
use serde_json::Value;
use std::ffi::OsString;
use std::path::Path;

fn data(name: &str, split: &str) -> OsString {
    fixture(&format!("{name}/{split}")).into()
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    onnxq(args.iter().map(|a| a.as_ref().to_os_string()).collect::<Vec<_>>())
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "exit {:?}: {}", o.status.code(), stderr(o));
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
}

fn json_file(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("read report")).expect("report is JSON")
}

/// Quantizes `model` with `--regularize off` and `auto` and returns, for each, the eval
/// SQNR of its first output on `eval` and its quantize report.
fn off_and_auto(model: &Path, calib: &Path, eval: &Path, dir: &Path) -> Vec<(f64, Value)> {
    ["off", "auto"]
        .iter()
        .map(|mode| {
            let out = dir.join(format!("{mode}.onnx"));
            let rep = dir.join(format!("{mode}.json"));
            let q = [&"quantize" as &dyn AsRef<std::ffi::OsStr>, &model, &"--data", &calib, &"-o", &out];
            ok(&run(&[&q[..], &[&"--report", &rep, &"--regularize", mode, &"-q"]].concat()));
            let o = run(&[&"eval", &model, &out, &"--data", &eval, &"--json", &"-q"]);
            ok(&o);
            let v: Value = serde_json::from_str(&stdout(&o)).expect("eval JSON");
            (v["outputs"][0]["sqnr_db"].as_f64().unwrap_or(f64::INFINITY), json_file(&rep))
        })
        .collect()
}

/// Worst-output SQNR of `cand` against the fixture on its eval split, via `onnxq eval`.
fn eval_sqnr(name: &str, cand: &Path) -> f64 {
    let reference = fixture(&format!("{name}.onnx"));
    let o = run(&[&"eval", &reference, &cand, &"--data", &data(name, "eval"), &"--json", &"-q"]);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).expect("eval JSON");
    v["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .map(|o| if o["identical"] == true { f64::INFINITY } else { o["sqnr_db"].as_f64().expect("sqnr") })
        .fold(f64::INFINITY, f64::min)
}

fn quantize(name: &str, out: &Path, report: &Path, regularize: &str, extra: &[&str]) {
    let model = fixture(&format!("{name}.onnx"));
    let mut args: Vec<OsString> = vec![
        "quantize".into(),
        model.into(),
        "--data".into(),
        data(name, "calib"),
        "-o".into(),
        out.into(),
        "--report".into(),
        report.into(),
        "--regularize".into(),
        regularize.into(),
        "-q".into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    ok(&onnxq(args));
}

fn weight(m: &ModelProto, name: &str) -> ndarray::ArrayD<f32> {
    let t = m.graph.as_ref().expect("graph").initializer.iter().find(|t| t.name() == name).expect("initializer");
    to_f32(t).expect("float weight")
}

#[test]
fn outliers_are_found_and_attributed() {
    let o = run(&[&"outliers", &fixture("outliers.onnx"), &"--data", &data("outliers", "calib"), &"--json", &"-q"]);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    assert_eq!(v["samples"], 16);
    let layers = v["layers"].as_array().expect("layers");
    let names: Vec<&str> = layers.iter().map(|l| l["node"].as_str().expect("node")).collect();
    assert_eq!(names, ["fc1", "fc2", "fc3"]);
    for l in layers {
        let node = l["node"].as_str().expect("node");
        let count = l["outliers"].as_u64().expect("count");
        if node != "fc2" {
            assert_eq!(count, 0, "{node} has no injected outliers: {l}");
            continue;
        }
        // One CLS token per sample, columns 3 and 17: 2 outliers per sample.
        assert_eq!(count, 32, "{l}");
        let mut cols: Vec<u64> =
            l["columns"].as_array().expect("cols").iter().map(|c| c["j"].as_u64().expect("j")).collect();
        cols.sort();
        assert_eq!(cols, [3, 17]);
        assert!(l["max_over_tau"].as_f64().expect("ratio") > 5.0, "{l}");
        assert!((l["tau"].as_f64().expect("tau") - 4.0 * l["quantile"].as_f64().expect("q")).abs() < 1e-9);
        // Each column's excess comes entirely from hidden unit 5.
        let top = l["top"].as_array().expect("top");
        let mut main: Vec<(u64, u64, f64)> = top
            .iter()
            .filter(|c| c["share"].as_f64().expect("share") > 0.5)
            .map(|c| (c["k"].as_u64().expect("k"), c["j"].as_u64().expect("j"), c["weight"].as_f64().expect("w")))
            .collect();
        main.sort_by_key(|c| c.1);
        assert_eq!(main.len(), 2, "{top:?}");
        assert_eq!((main[0].0, main[0].1), (5, 3));
        assert_eq!((main[1].0, main[1].1), (5, 17));
        assert_eq!(main[0].2, 12.0);
        assert_eq!(main[1].2, -10.0);
    }
    // The table names the layer, its columns and the contributing weights.
    let o = run(&[&"outliers", &fixture("outliers.onnx"), &"--data", &data("outliers", "calib"), &"-q"]);
    ok(&o);
    let text = stdout(&o);
    assert!(text.contains("fc2") && text.contains("w[5,3]=12.0000 (100%)") && text.contains("w[5,17]"), "{text}");
    // A model without outliers says so.
    let o = run(&[&"outliers", &fixture("cnn.onnx"), &"--data", &data("cnn", "calib"), &"-q"]);
    ok(&o);
    assert!(stdout(&o).contains("no layer has outliers"), "{}", stdout(&o));
}

#[test]
fn regularize_edits_the_contributing_weights() {
    let dir = tempdir();
    let out = dir.path().join("reg.onnx");
    let report = dir.path().join("reg.json");
    let o = run(&[
        &"regularize",
        &fixture("outliers.onnx"),
        &"--data",
        &data("outliers", "calib"),
        &"-o",
        &out,
        &"--report",
        &report,
        &"-q",
    ]);
    ok(&o);
    let r = json_file(&report);
    let reg = &r["regularization"];
    assert_eq!(reg["regularized"], true);
    let float_db = reg["float_sqnr_db"].as_f64().expect("float deviation");
    assert!(float_db > 10.0, "the float model must stay close: {float_db} dB");
    let layers = reg["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1);
    let edit = &layers[0]["edit"];
    assert_eq!(layers[0]["node"], "fc2");
    assert_eq!(edit["weight"], "fc2.weight");
    assert_eq!(edit["bias"], "fc2.bias");
    let cols = edit["columns"].as_array().expect("columns");
    assert_eq!(cols.len(), 2);
    for c in cols {
        let sel = c["selected"].as_array().expect("selected");
        assert_eq!(sel.len(), 1, "{c}");
        assert_eq!(sel[0]["k"], 5);
        let (old, new) = (sel[0]["old"].as_f64().expect("old"), sel[0]["new"].as_f64().expect("new"));
        assert!(new.abs() < 0.7 * old.abs(), "{old} -> {new}");
        assert!(c["peak_after"].as_f64().expect("after") < 0.6 * c["peak_before"].as_f64().expect("before"), "{c}");
        // Every changed element is listed, the largest change first.
        let edits = c["edits"].as_array().expect("edits");
        assert_eq!(edits.len() as u64, c["changed"].as_u64().expect("changed"));
        assert_eq!(edits[0]["k"], 5);
        assert!(c["bias_delta"].is_number());
    }
    // Only fc2's weight and bias changed.
    let before = onnxq::onnx::load(&fixture("outliers.onnx")).expect("load").proto;
    let after = onnxq::onnx::load(&out).expect("load regularized").proto;
    onnxq::onnx::GraphView::new(after.graph.as_ref().expect("graph")).validate().expect("valid");
    for name in ["fc1.weight", "fc1.bias", "fc3.weight"] {
        assert_eq!(weight(&before, name), weight(&after, name), "{name}");
    }
    let (w0, w1) = (weight(&before, "fc2.weight"), weight(&after, "fc2.weight"));
    assert!(w1[[5, 3]].abs() < w0[[5, 3]].abs() && w1[[5, 17]].abs() < w0[[5, 17]].abs());
    // Columns without outliers are untouched.
    for j in (0..32).filter(|j| *j != 3 && *j != 17) {
        for k in 0..64 {
            assert_eq!(w0[[k, j]], w1[[k, j]]);
        }
    }
    assert_ne!(weight(&before, "fc2.bias"), weight(&after, "fc2.bias"));
    // Refuses to overwrite its input.
    let o = run(&[&"regularize", &out, &"--data", &data("outliers", "calib"), &"-o", &out, &"-q"]);
    assert_clean_error(&o, &["refusing to overwrite"]);
}

#[test]
fn regularized_quantization_beats_plain_by_6_db() {
    let dir = tempdir();
    let (plain, plain_r) = (dir.path().join("plain.onnx"), dir.path().join("plain.json"));
    let (auto, auto_r) = (dir.path().join("auto.onnx"), dir.path().join("auto.json"));
    quantize("outliers", &plain, &plain_r, "off", &[]);
    quantize("outliers", &auto, &auto_r, "auto", &[]);
    let (p, a) = (eval_sqnr("outliers", &plain), eval_sqnr("outliers", &auto));
    assert!(a >= p + 6.0, "plain {p:.2} dB, regularized {a:.2} dB");
    assert!(json_file(&plain_r).get("regularization").is_none());
    let reg = &json_file(&auto_r)["regularization"];
    assert_eq!(reg["mode"], "auto");
    assert_eq!(reg["regularized"], true);
    let (b, f) = (reg["baseline_sqnr_db"].as_f64().expect("baseline"), reg["final_sqnr_db"].as_f64().expect("final"));
    assert!(f > b + 3.0, "{b} -> {f}");
    let layer = &reg["layers"][0];
    assert_eq!(layer["node"], "fc2");
    assert_eq!(layer["accepted"], true);
    assert!(layer["edit"]["columns"][0].get("edits").is_none(), "the quantize report stays short");

    // `--regularize` alone means auto; a forced strength and shrink mode also regularize.
    let (bare, bare_r) = (dir.path().join("bare.onnx"), dir.path().join("bare.json"));
    let model = fixture("outliers.onnx");
    let o = run(&[
        &"quantize",
        &model,
        &"--data",
        &data("outliers", "calib"),
        &"-o",
        &bare,
        &"--report",
        &bare_r,
        &"--regularize",
    ]);
    ok(&o);
    assert!(stderr(&o).contains("fc2") && stderr(&o).contains("kept"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&bare).expect("bare"), std::fs::read(&auto).expect("auto"), "deterministic");
    // ... and so does no flag at all when there is calibration data.
    let default = dir.path().join("default.onnx");
    ok(&run(&[&"quantize", &model, &"--data", &data("outliers", "calib"), &"-o", &default, &"-q"]));
    assert_eq!(std::fs::read(&default).expect("default"), std::fs::read(&auto).expect("auto"), "auto is the default");
    for (mode, extra) in [("4", &[][..]), ("1", &["--reg-mode", "shrink"][..])] {
        let (out, rep) = (dir.path().join("f.onnx"), dir.path().join("f.json"));
        quantize("outliers", &out, &rep, mode, extra);
        let s = eval_sqnr("outliers", &out);
        assert!(s > p + 3.0, "--regularize {mode} {extra:?}: {s:.2} dB vs plain {p:.2} dB");
        assert!(json_file(&rep)["regularization"]["mode"].as_str().expect("mode").starts_with("forced"));
    }
}

#[test]
fn auto_never_loses_on_any_fixture() {
    let dir = tempdir();
    for name in ["cnn", "transformer", "constants", "shared", "outliers"] {
        let (plain, auto) = (dir.path().join(format!("{name}_off.onnx")), dir.path().join(format!("{name}_auto.onnx")));
        let rep = dir.path().join(format!("{name}.json"));
        quantize(name, &plain, &rep, "off", &[]);
        quantize(name, &auto, &rep, "auto", &[]);
        let (p, a) = (eval_sqnr(name, &plain), eval_sqnr(name, &auto));
        assert!(a >= p, "{name}: auto {a:.2} dB < plain {p:.2} dB");
        let reg = &json_file(&rep)["regularization"];
        if reg["regularized"] == false {
            // Nothing to do: the very same model as plain quantization.
            assert_eq!(std::fs::read(&plain).expect("plain"), std::fs::read(&auto).expect("auto"), "{name}");
        }
    }
}

#[test]
fn bad_options_fail_cleanly() {
    let dir = tempdir();
    let out = dir.path().join("x.onnx");
    let model = fixture("outliers.onnx");
    let calib = data("outliers", "calib");
    let o = run(&[&"outliers", &model, &"--data", &calib, &"--outlier-factor", &"0.5"]);
    assert_clean_error(&o, &["threshold factor"]);
    let o = run(&[&"outliers", &model, &"--data", &calib, &"--outlier-quantile", &"1.5"]);
    assert_clean_error(&o, &["quantile"]);
    let o = run(&[&"regularize", &model, &"-o", &out]);
    assert_clean_error(&o, &["--data"]);
    let o = run(&[&"quantize", &model, &"--data", &calib, &"-o", &out, &"--regularize", &"bogus"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("bogus"));
    // Ranges from a stats file would be stale after regularization.
    let stats = dir.path().join("stats.json");
    ok(&run(&[&"calibrate", &model, &"--data", &calib, &"-o", &stats, &"-q"]));
    let o = run(&[&"quantize", &model, &"--stats", &stats, &"-o", &out, &"--regularize", &"auto", &"-q"]);
    assert_clean_error(&o, &["--regularize", "--stats"]);
    assert!(!out.exists());
}

/// An MLP of Gemm layers (`transB = 1`, bias `C`) with the `outliers` fixture's planted
/// massive activation: row 0 drives hidden unit 5, which meets a large weight of `fc2`.
fn gemm_mlp(dir: &Path) -> std::path::PathBuf {
    use onnxq::array::dtype;
    use onnxq::onnx::builder::{attr_int, graph, model, node, tensor_info};
    use onnxq::onnx::tensor::from_f32;
    let (t, d, h) = (64usize, 16usize, 32usize);
    let mut rng = onnxq::rng::Rng::new(21);
    let mut randn = |n: usize, s: f64| -> Vec<f32> { (0..n).map(|_| (rng.normal() * s) as f32).collect() };
    let arr = |shape: &[usize], v: Vec<f32>| ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).expect("shape");
    // Stored transposed ([N, K]) for transB = 1.
    let mut w1 = randn(h * d, 0.25);
    w1[5 * d] = 2.0;
    for k in 1..d {
        w1[5 * d + k] *= 0.1;
    }
    let mut b1 = randn(h, 0.02);
    b1[5] = -2.5;
    let mut w2 = randn(d * h, 0.18);
    w2[3 * h + 5] = 12.0;
    let mut w3 = randn(4 * d, 0.25);
    for j in 0..4 {
        w3[j * d + 3] *= 0.01; // the next layer barely reads the outlier column
    }
    let (b2, b3) = (randn(d, 0.02), randn(4, 0.02));
    let inits = vec![
        from_f32("w1", &arr(&[h, d], w1)),
        from_f32("b1", &arr(&[h], b1)),
        from_f32("w2", &arr(&[d, h], w2)),
        from_f32("b2", &arr(&[d], b2)),
        from_f32("w3", &arr(&[4, d], w3)),
        from_f32("b3", &arr(&[4], b3)),
    ];
    let tb = || vec![attr_int("transB", 1)];
    let nodes = vec![
        node("Gemm", "fc1", &["x", "w1", "b1"], &["h"], tb()),
        node("Relu", "r1", &["h"], &["hr"], vec![]),
        node("Gemm", "fc2", &["hr", "w2", "b2"], &["y"], tb()),
        node("Relu", "r2", &["y"], &["yr"], vec![]),
        node("Gemm", "fc3", &["yr", "w3", "b3"], &["out"], tb()),
    ];
    let g = graph(
        "gemm_mlp",
        nodes,
        vec![tensor_info("x", dtype::FLOAT, &[t as i64, d as i64])],
        vec![tensor_info("out", dtype::FLOAT, &[t as i64, 4])],
        inits,
    );
    let path = dir.join("gemm.onnx");
    onnxq::onnx::save(&model(g, 13), &path, &Default::default()).expect("save");
    write_splits(dir, &[t, d], |i| {
        let mut x = randn(t * d, 1.0);
        x[0] = 4.0 + i as f32 * 0.1;
        for r in 1..t {
            x[r * d] = x[r * d].min(1.0);
        }
        x
    });
    path
}

#[test]
fn gemm_layers_are_regularized_and_auto_still_never_loses() {
    let dir = tempdir();
    let model = gemm_mlp(dir.path());
    let calib = dir.path().join("calib");
    let eval = dir.path().join("eval");
    let o = run(&[&"outliers", &model, &"--data", &calib, &"--json", &"-q"]);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    let fc2 = v["layers"].as_array().expect("layers").iter().find(|l| l["node"] == "fc2").expect("fc2").clone();
    assert_eq!(fc2["kind"], "gemm");
    assert!(fc2["outliers"].as_u64().expect("count") >= 8, "{fc2}");
    assert_eq!((fc2["top"][0]["k"].as_u64(), fc2["top"][0]["j"].as_u64()), (Some(5), Some(3)), "{fc2}");
    assert_eq!(fc2["top"][0]["weight"], 12.0);
    assert_eq!(fc2["bias"]["tensor"], "b2");

    let results = off_and_auto(&model, &calib, &eval, dir.path());
    let ((p, _), (a, rep)) = (&results[0], &results[1]);
    assert!(a >= p, "auto {a:.2} dB < plain {p:.2} dB");
    let reg = &rep["regularization"];
    let fc2 = reg["layers"].as_array().expect("layers").iter().find(|l| l["node"] == "fc2").expect("fc2 decision");
    if reg["regularized"] == true {
        assert_eq!(fc2["accepted"], true);
        assert!(*a > p + 3.0, "auto {a:.2} dB vs plain {p:.2} dB");
    }
    // The float regularization rewrites the transposed weight and Gemm's C.
    let out = dir.path().join("reg.onnx");
    ok(&run(&[&"regularize", &model, &"--data", &calib, &"-o", &out, &"-q"]));
    let (m0, m1) = (onnxq::onnx::load(&model).expect("m0").proto, onnxq::onnx::load(&out).expect("m1").proto);
    let (w0, w1) = (weight(&m0, "w2"), weight(&m1, "w2"));
    assert!(w1[[3, 5]].abs() < 0.7 * w0[[3, 5]].abs(), "{} -> {}", w0[[3, 5]], w1[[3, 5]]);
    for j in (0..16).filter(|j| *j != 3) {
        assert_eq!(w0.index_axis(ndarray::Axis(0), j), w1.index_axis(ndarray::Axis(0), j));
    }
    assert_ne!(weight(&m0, "b2")[3], weight(&m1, "b2")[3]);
}

/// A CNN with a planted massive activation: pixel (0, 0) of input channel 0 drives channel 5
/// of `conv1` (centre tap only), which meets a large weight of the grouped `conv2` (2 groups;
/// channel 5 is input 1 of group 1, output 6), then a depthwise `conv3`.
fn conv_net(dir: &Path) -> std::path::PathBuf {
    use onnxq::array::dtype;
    use onnxq::onnx::builder::{attr_int, attr_ints, graph, model, node, tensor_info};
    use onnxq::onnx::tensor::from_f32;
    let (c, m, hw) = (4usize, 8usize, 12usize);
    let mut rng = onnxq::rng::Rng::new(33);
    let mut randn = |n: usize, s: f64| -> Vec<f32> { (0..n).map(|_| (rng.normal() * s) as f32).collect() };
    let arr = |shape: &[usize], v: Vec<f32>| ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).expect("shape");
    // conv1: [8, 4, 3, 3]
    let mut w1 = randn(m * c * 9, 0.2);
    for v in &mut w1[5 * c * 9..6 * c * 9] {
        *v *= 0.05;
    }
    w1[5 * c * 9 + 4] = 2.0; // channel 5 ← input channel 0, centre tap
    let mut b1 = randn(m, 0.02);
    b1[5] = -2.5;
    // conv2: [8, 4, 3, 3], group 2
    let mut w2 = randn(m * 4 * 9, 0.18);
    w2[6 * 36 + 9 + 4] = 12.0; // output 6 ← group input 1 (channel 5), centre tap: k = 13
    let (b2, w3, b3) = (randn(m, 0.02), randn(m * 9, 0.3), randn(m, 0.02));
    let inits = vec![
        from_f32("w1", &arr(&[m, c, 3, 3], w1)),
        from_f32("b1", &arr(&[m], b1)),
        from_f32("w2", &arr(&[m, 4, 3, 3], w2)),
        from_f32("b2", &arr(&[m], b2)),
        from_f32("w3", &arr(&[m, 1, 3, 3], w3)),
        from_f32("b3", &arr(&[m], b3)),
    ];
    let pads = || attr_ints("pads", &[1, 1, 1, 1]);
    let nodes = vec![
        node("Conv", "conv1", &["x", "w1", "b1"], &["h"], vec![pads()]),
        node("Relu", "r1", &["h"], &["hr"], vec![]),
        node("Conv", "conv2", &["hr", "w2", "b2"], &["y"], vec![pads(), attr_int("group", 2)]),
        node("Relu", "r2", &["y"], &["yr"], vec![]),
        node("Conv", "conv3", &["yr", "w3", "b3"], &["out"], vec![pads(), attr_int("group", m as i64)]),
    ];
    let g = graph(
        "conv_net",
        nodes,
        vec![tensor_info("x", dtype::FLOAT, &[1, c as i64, hw as i64, hw as i64])],
        vec![tensor_info("out", dtype::FLOAT, &[1, m as i64, hw as i64, hw as i64])],
        inits,
    );
    let path = dir.join("conv.onnx");
    onnxq::onnx::save(&model(g, 13), &path, &Default::default()).expect("save");
    write_splits(dir, &[1, c, hw, hw], |i| {
        let mut x = randn(c * hw * hw, 1.0);
        for v in &mut x[..hw * hw] {
            *v = v.min(1.0);
        }
        x[0] = 5.0 + i as f32 * 0.1;
        x
    });
    path
}

#[test]
fn conv_layers_are_regularized_and_auto_still_never_loses() {
    let dir = tempdir();
    let model = conv_net(dir.path());
    let calib = dir.path().join("calib");
    let eval = dir.path().join("eval");
    let o = run(&[&"outliers", &model, &"--data", &calib, &"--json", &"-q"]);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    let layers = v["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 3, "{v}");
    let conv2 = layers.iter().find(|l| l["node"] == "conv2").expect("conv2").clone();
    assert_eq!(conv2["kind"], "conv");
    assert_eq!((conv2["k"].as_u64(), conv2["n"].as_u64(), conv2["groups"].as_u64()), (Some(36), Some(8), Some(2)));
    assert!(conv2["outliers"].as_u64().expect("count") >= 8, "{conv2}");
    // Patch element 13 of group 1 (channel 5, centre tap) times output channel 6.
    assert_eq!((conv2["top"][0]["k"].as_u64(), conv2["top"][0]["j"].as_u64()), (Some(13), Some(6)), "{conv2}");
    assert_eq!(conv2["top"][0]["weight"], 12.0);
    assert_eq!(conv2["bias"]["tensor"], "b2");
    let depthwise = layers.iter().find(|l| l["node"] == "conv3").expect("conv3");
    assert_eq!((depthwise["k"].as_u64(), depthwise["groups"].as_u64()), (Some(9), Some(8)));

    let results = off_and_auto(&model, &calib, &eval, dir.path());
    let ((p, _), (a, _)) = (&results[0], &results[1]);
    assert!(a >= p, "auto {a:.2} dB < plain {p:.2} dB");
    // The float regularization rewrites the 4-D weight in place and the bias.
    let out = dir.path().join("reg.onnx");
    ok(&run(&[&"regularize", &model, &"--data", &calib, &"-o", &out, &"-q"]));
    let (m0, m1) = (onnxq::onnx::load(&model).expect("m0").proto, onnxq::onnx::load(&out).expect("m1").proto);
    let (w0, w1) = (weight(&m0, "w2"), weight(&m1, "w2"));
    assert_eq!(w0.shape(), w1.shape());
    assert!(w1[[6, 1, 1, 1]].abs() < 0.7 * w0[[6, 1, 1, 1]].abs(), "{} -> {}", w0[[6, 1, 1, 1]], w1[[6, 1, 1, 1]]);
    for j in (0..8).filter(|j| *j != 6) {
        assert_eq!(w0.index_axis(ndarray::Axis(0), j), w1.index_axis(ndarray::Axis(0), j), "channel {j}");
    }
    assert_ne!(weight(&m0, "b2")[6], weight(&m1, "b2")[6]);
}

/// `quantize` regularizes only layers whose output values it quantizes: in the `outliers`
/// fixture `fc2`'s output reaches `fc3`'s quantized input through its bias Add and a Relu, so
/// it is a candidate under the transformer preset; with `fc3` excluded its output stays float
/// there (not regularized, and the output is plain quantization's, byte for byte), while under
/// the cnn preset `fc2`'s own output is quantized and the edit is made.
#[test]
fn only_layers_with_quantized_outputs_are_regularized() {
    let dir = tempdir();
    let report = |name: &str, regularize: &str, extra: &[&str]| {
        let (out, rep) = (dir.path().join(format!("{name}.onnx")), dir.path().join(format!("{name}.json")));
        quantize("outliers", &out, &rep, regularize, extra);
        (out, json_file(&rep))
    };
    let excluded = ["--exclude", "fc3"];
    let (float_out, r) = report("float", "auto", &[&["--preset", "transformer"][..], &excluded].concat());
    let reg = &r["regularization"];
    assert_eq!(reg["regularized"], false, "{reg}");
    assert_eq!(reg["layers_with_outliers"], 0, "{reg}");
    let skipped: Vec<&str> = reg["float_output_layers"]
        .as_array()
        .expect("list")
        .iter()
        .map(|l| l["node"].as_str().expect("node"))
        .collect();
    assert!(skipped.contains(&"fc2") && skipped.contains(&"fc3"), "{reg}");
    let why = reg["float_output_layers"][0]["reason"].as_str().expect("reason");
    assert!(why.contains("stays float under the transformer preset"), "{why}");
    assert_eq!(reg["passes"], 1, "only the statistics pass: {reg}");
    let (plain, _) = report("plain", "off", &[&["--preset", "transformer"][..], &excluded].concat());
    assert_eq!(std::fs::read(&plain).expect("plain"), std::fs::read(&float_out).expect("auto"));
    // A forced strength follows the same rule.
    let (_, r) = report("forced", "4", &[&["--preset", "transformer"][..], &excluded].concat());
    assert_eq!(r["regularization"]["regularized"], false, "{}", r["regularization"]);

    for preset in [&["--preset", "cnn"][..], &["--preset", "transformer"][..]] {
        let extra = if preset[1] == "cnn" { [preset, &excluded[..]].concat() } else { preset.to_vec() };
        let (_, r) = report(preset[1], "auto", &extra);
        let reg = &r["regularization"];
        assert_eq!(reg["regularized"], true, "{extra:?}: {reg}");
        let fc2 = reg["layers"].as_array().expect("layers").iter().find(|l| l["node"] == "fc2").expect("fc2");
        assert_eq!(fc2["accepted"], true, "{fc2}");
    }
}

/// Writes 8 `calib` and then 8 `eval` samples of the graph input `x` with shape `shape`
/// under `dir`, sample `i` of each split made by `sample(i)` (called in that order).
fn write_splits(dir: &Path, shape: &[usize], mut sample: impl FnMut(usize) -> Vec<f32>) {
    for split in ["calib", "eval"] {
        let sd = dir.join(split);
        std::fs::create_dir_all(&sd).expect("mkdir");
        for i in 0..8 {
            let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), sample(i)).expect("shape");
            let a = onnxq::array::ArrayData::F32(x);
            onnxq::npy::write_npz(&sd.join(format!("{i}.npz")), &[("x", &a)]).expect("npz");
        }
    }
}
