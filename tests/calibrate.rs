//! `onnxq calibrate`: statistics JSON, determinism across thread counts, and clean errors
//! for bad calibration data.

use crate::util::{assert_clean_error, fixture, onnxq, read_json, stderr, tempdir};
use onnxq::array::ArrayData;
use std::path::Path;

fn calibrate(model: &str, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<std::ffi::OsString> = vec!["calibrate".into(), fixture(model).into(), "--data".into()];
    args.push(data.into());
    args.push("-o".into());
    args.push(out.into());
    args.extend(extra.iter().map(|s| s.into()));
    onnxq(args)
}

#[test]
fn writes_stats_and_ranges_for_every_quantizable_tensor() {
    let dir = tempdir();
    let out = dir.path().join("stats.json");
    let o = calibrate("cnn.onnx", &fixture("cnn/calib"), &out, &["--method", "percentile:99.99"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("calibrated 9 tensors on 16 samples"), "{}", stderr(&o));
    let v: serde_json::Value = read_json(&out);
    assert_eq!(v["method"], "percentile:99.99");
    let t = &v["tensors"];
    for name in ["image", "conv1", "relu1", "pool1", "conv2", "flatten", "logits"] {
        assert!(t[name]["count"].as_u64().expect("count") > 0, "{name} missing");
    }
    // Conv outputs carry per-channel abs-max along axis 1.
    assert_eq!(t["conv1"]["channel_abs_max"].as_array().expect("channels").len(), 8);
    let r = &t["relu1"]["range"];
    assert_eq!(r[0].as_f64(), Some(0.0), "a Relu output's range starts at 0");
    assert!(r[1].as_f64() <= t["relu1"]["max"].as_f64());
}

#[test]
fn output_is_identical_for_any_thread_count() {
    let dir = tempdir();
    let mut outputs = Vec::new();
    for threads in ["1", "2", "3"] {
        let out = dir.path().join(format!("stats{threads}.json"));
        let mut args: Vec<std::ffi::OsString> =
            vec!["calibrate".into(), fixture("transformer.onnx").into(), "--data".into()];
        args.push(fixture("transformer/calib").into());
        args.extend(["-o".into(), out.clone().into(), "--method".into(), "entropy".into()]);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_onnxq"))
            .args(args)
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .expect("run");
        assert!(o.status.success(), "{}", stderr(&o));
        outputs.push(std::fs::read(out).expect("stats"));
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0], outputs[2]);
}

#[test]
fn random_samples_with_symbolic_dims() {
    let dir = tempdir();
    let out = dir.path().join("s.json");
    let o = onnxq([
        "calibrate",
        fixture("constants.onnx").to_str().expect("utf8"),
        "--random",
        "5",
        "--seed",
        "3",
        "--dim",
        "batch=7",
        "-o",
        out.to_str().expect("utf8"),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "--quiet prints nothing: {}", stderr(&o));
    let v: serde_json::Value = read_json(&out);
    assert_eq!(v["samples"], 5);
    assert_eq!(v["tensors"]["x"]["count"], 5 * 7 * 8);
}

fn write_sample(dir: &Path, file: &str, arrays: &[(&str, ArrayData)]) {
    let refs: Vec<(&str, &ArrayData)> = arrays.iter().map(|(k, v)| (*k, v)).collect();
    onnxq::npy::write_npz(&dir.join(file), &refs).expect("write npz");
}

#[test]
fn bad_calibration_data_is_rejected_before_running() {
    use ndarray::{ArrayD, IxDyn};
    let good = || ArrayData::F32(ArrayD::zeros(IxDyn(&[2, 8])));
    type Case<'a> = (&'a str, Vec<(&'a str, ArrayData)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        ("missing.npz", vec![("other", good())], vec!["missing.npz", "'other'"]),
        ("dtype.npz", vec![("x", ArrayData::I64(ArrayD::zeros(IxDyn(&[2, 8]))))], vec!["dtype.npz", "'x'", "int64"]),
        ("rank.npz", vec![("x", ArrayData::F32(ArrayD::zeros(IxDyn(&[16]))))], vec!["rank.npz", "'x'"]),
        ("dims.npz", vec![("x", ArrayData::F32(ArrayD::zeros(IxDyn(&[2, 9]))))], vec!["dims.npz", "'x'"]),
        (
            "nan.npz",
            vec![("x", ArrayData::F32(ArrayD::from_elem(IxDyn(&[2, 8]), f32::NAN)))],
            vec!["nan.npz", "'x'", "NaN"],
        ),
    ];
    for (file, arrays, needles) in cases {
        let dir = tempdir();
        write_sample(dir.path(), file, &arrays);
        let out = dir.path().join("s.json");
        let o = calibrate("shared.onnx", dir.path(), &out, &[]);
        assert_clean_error(&o, &needles);
        assert!(!out.exists(), "no output on failure");
    }
    // Mismatched shapes across samples of a symbolic-batch model.
    let dir = tempdir();
    write_sample(dir.path(), "a.npz", &[("x", ArrayData::F32(ArrayD::zeros(IxDyn(&[2, 8]))))]);
    write_sample(dir.path(), "b.npz", &[("x", ArrayData::F32(ArrayD::zeros(IxDyn(&[3, 8]))))]);
    let o = calibrate("constants.onnx", dir.path(), &dir.path().join("s.json"), &[]);
    assert_clean_error(&o, &["b.npz", "'x'"]);
    // Empty directory, corrupt archive.
    let dir = tempdir();
    let o = calibrate("shared.onnx", dir.path(), &dir.path().join("s.json"), &[]);
    assert_clean_error(&o, &[dir.path().to_str().expect("utf8")]);
    std::fs::write(dir.path().join("broken.npz"), b"PK\x03\x04 this is not a zip").expect("write");
    let o = calibrate("shared.onnx", dir.path(), &dir.path().join("s.json"), &[]);
    assert_clean_error(&o, &["broken.npz"]);
}

/// Tensors that only rearrange another calibrated tensor (Reshape, Transpose, ...) take its
/// statistics instead of becoming extra tract outputs; the result must be exactly what
/// calibrating them directly gives.
#[test]
fn rearranged_tensors_share_statistics_exactly() {
    use onnxq::calibrate as cal;
    let model = onnxq::onnx::load(&fixture("transformer.onnx")).expect("load");
    let g = model.proto.graph.as_ref().expect("graph");
    let targets = cal::default_targets(&onnxq::onnx::GraphView::new(g)).expect("targets");
    let aliased = targets.iter().filter(|t| t.same_values_as.is_some()).count();
    assert!(aliased >= 4, "the transformer fixture has Reshape/Transpose outputs to share ({aliased})");
    let direct: Vec<cal::Target> = targets.iter().map(|t| cal::Target { same_values_as: None, ..t.clone() }).collect();
    let specs = cal::input_specs(g);
    let opts = onnxq::data::DataOptions {
        sources: vec![onnxq::data::Source::Path(fixture("transformer/calib"))],
        ..Default::default()
    };
    let set = onnxq::data::open(&specs, &opts).expect("samples");
    let bytes = cal::model_bytes(&model).expect("bytes");
    let run =
        |t: &[cal::Target]| cal::calibrate(&bytes, &specs, &set, t, &cal::CalibOptions::default()).expect("calibrate");
    let (shared, computed) = (run(&targets), run(&direct));
    assert_eq!(shared.tensors.len(), computed.tensors.len());
    for ((na, a), (nb, b)) in shared.tensors.iter().zip(&computed.tensors) {
        assert_eq!(na, nb);
        assert_eq!(a.histogram(), b.histogram(), "{na}");
        assert_eq!((a.count(), a.min(), a.max(), a.sum_sq()), (b.count(), b.min(), b.max(), b.sum_sq()), "{na}");
        assert_eq!(a.channel_absmax(), b.channel_absmax(), "{na}");
    }
}

/// `quantize` calibrates only the tensors it reads a range of: not the decomposed Gelu's
/// intermediates, whose parameters are fixed (the Erf output) or derived (`x/√2`, `1+erf`,
/// and the product, which takes the grid of its `·0.5` output), yet the quantized model is
/// byte for byte the one that calibrating every default target gives.
#[test]
fn quantization_targets_skip_fixed_and_derived_tensors_and_change_nothing() {
    use onnxq::calibrate as cal;
    use onnxq::quantize::{ParamSource, Preset, QuantOptions};
    let loaded = onnxq::onnx::load(&fixture("transformer.onnx")).expect("load");
    let (model, _) = onnxq::quantize::prepare::prepare(&loaded.proto).expect("prepare");
    let g = model.graph.as_ref().expect("graph");
    let specs = cal::input_specs(g);
    let opts = onnxq::data::DataOptions {
        sources: vec![onnxq::data::Source::Path(fixture("transformer/calib"))],
        ..Default::default()
    };
    let set = onnxq::data::open(&specs, &opts).expect("samples");
    let bytes = onnxq::onnx::io::encode_for_runtime(&model).expect("bytes");
    let method = onnxq::stats::RangeMethod::Mse;
    let ranges = |t: &[cal::Target]| {
        let c = cal::calibrate(&bytes, &specs, &set, t, &cal::CalibOptions::default()).expect("calibrate");
        cal::quantizer_ranges(&c, &method, false)
    };
    let all = ranges(&cal::default_targets(&onnxq::onnx::GraphView::new(g)).expect("targets"));
    for preset in [Preset::Auto, Preset::Cnn] {
        let qopts = QuantOptions { preset, method: method.to_string(), ..Default::default() };
        let needs = onnxq::quantize::range_needs(&model, &qopts).expect("needs");
        let source = |t: &str| needs.sources.get(t).cloned();
        assert_eq!(source("gelu_erf"), Some(ParamSource::Fixed));
        assert_eq!(source("gelu_mul"), Some(ParamSource::DerivedFrom("gelu_half_mul".into())));
        assert_eq!(source("gelu_half_mul"), Some(ParamSource::Range));
        let targets = cal::quantization_targets(&model, &qopts).expect("targets");
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        for skipped in ["gelu_div", "gelu_erf", "gelu_add", "gelu_mul"] {
            assert!(!names.contains(&skipped), "{preset}: {skipped} is calibrated");
        }
        for read in ["ffn1_add", "gelu_half_mul"] {
            assert!(names.contains(&read), "{preset}: {read} is not calibrated");
        }
        let quantized = |r| {
            let (q, _) = onnxq::quantize::quantize(&model, r, &qopts).expect("quantize");
            onnxq::onnx::io::encode(&q).expect("encode")
        };
        assert!(quantized(&ranges(&targets)) == quantized(&all), "{preset}: the quantized model changed");
    }
}
