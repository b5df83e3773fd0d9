//! Hostile inputs: every command on the broken-model corpus of `tests/corpus/` (made by
//! `cargo run --release --example gen_corpus`) must fail with a one-line error naming the file
//! and what is wrong, exit 1, and leave no output and no temporary file behind; plus a seeded
//! mutation fuzzer over the fixtures that drives the library path
//! (decode → load → validate → dump → quantize) in-process and fails on any panic.
//!
//! The fuzzer runs `ONNXQ_FUZZ_ITERS` executions (default 20,000) from `ONNXQ_FUZZ_SEED`
//! (default 1); a long run: `ONNXQ_FUZZ_ITERS=1000000 cargo test --release --test tests
//! hostile::mutation_fuzz -- --nocapture`. A crash is minimized and written under the test
//! target's tmp dir; check it in under `tests/corpus/regressions/` once fixed.

use crate::util::{assert_clean_error, onnxq, read_json, root, stderr, stdout, tempdir};
use prost::Message;
use std::path::{Path, PathBuf};

#[path = "../examples/gen_corpus.rs"]
#[allow(dead_code)]
mod gen_corpus;

fn corpus_dir() -> PathBuf {
    root().join("tests").join("corpus")
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmd {
    Dump,
    Quantize,
    Calibrate,
}

const ALL: &[Cmd] = &[Cmd::Dump, Cmd::Quantize, Cmd::Calibrate];

/// (file, what the error must say besides the file name, commands that must fail).
const CASES: &[(&str, &[&str], &[Cmd])] = &[
    ("empty.onnx", &["file is empty"], ALL),
    ("png_renamed.onnx", &["not a valid ONNX model", "invalid tag value"], ALL),
    ("truncated_at_1.onnx", &["not a valid ONNX model", "ir_version: invalid varint"], ALL),
    ("truncated_in_graph.onnx", &["not a valid ONNX model", "ModelProto.graph: buffer underflow"], ALL),
    ("truncated_in_weight.onnx", &["not a valid ONNX model", "buffer underflow"], ALL),
    ("truncated_last_byte.onnx", &["not a valid ONNX model", "ModelProto.opset_import: buffer underflow"], ALL),
    ("bitflip_graph_length.onnx", &["not a valid ONNX model", "ModelProto.graph: buffer underflow"], ALL),
    ("bitflip_wire_type.onnx", &["not a valid ONNX model", "invalid wire type value: 6"], ALL),
    ("bitflip_dims.onnx", &["tensor 'weight': raw_data holds 48 bytes, but float shape [5, 3] needs 60 bytes"], ALL),
    ("bitflip_input_name.onnx", &["invalid model", "node 'mm' (MatMul): input 'veight' is not produced"], ALL),
    ("wire_type_graph_varint.onnx", &["ModelProto.graph: invalid wire type: Varint (expected LengthDelimited)"], ALL),
    (
        "wire_type_node_name_varint.onnx",
        &["NodeProto.name", "invalid wire type: Varint (expected LengthDelimited)"],
        ALL,
    ),
    ("bad_utf8_name.onnx", &["GraphProto.name", "not UTF-8"], ALL),
    ("deep_nesting.onnx", &["not a valid ONNX model", "recursion limit reached"], ALL),
    ("no_graph.onnx", &["the model has no graph"], ALL),
    ("no_opset_import.onnx", &["the model has no opset_import"], ALL),
    ("empty_graph.onnx", &["the graph is empty"], ALL),
    ("cycle.onnx", &["invalid model", "the graph has a cycle through node 'mm' (MatMul)"], ALL),
    ("dangling_input.onnx", &["node 'add' (Add): input 'nowhere' is not produced"], ALL),
    ("duplicate_output.onnx", &["graph output 'y' is listed twice"], ALL),
    ("duplicate_node_name.onnx", &["two nodes are named 'mm'"], ALL),
    ("duplicate_initializer.onnx", &["initializer 'weight' is defined twice"], ALL),
    ("duplicate_node_output.onnx", &["node 'relu' (Relu): output 'h' is already produced elsewhere"], ALL),
    ("output_not_produced.onnx", &["graph output 'ghost' is not produced"], ALL),
    ("huge_dims.onnx", &["tensor 'weight': raw_data holds 48 bytes, but float shape [1048576, 1048576] needs"], ALL),
    ("dims_overflow.onnx", &["tensor 'weight': shape [4611686018427387904, 4611686018427387904] overflows"], ALL),
    (
        "dims_bytes_overflow.onnx",
        &["tensor 'weight': the byte size of float shape [2147483648, 2147483648] overflows"],
        ALL,
    ),
    ("negative_dim.onnx", &["tensor 'weight': negative dim in shape [-4, 3]"], ALL),
    ("dtype_mismatch.onnx", &["tensor 'weight': raw_data holds 48 bytes, but double shape [4, 3] needs 96 bytes"], ALL),
    ("typed_count_mismatch.onnx", &["tensor 'weight': holds 5 values, but float shape [4, 3] has 12 elements"], ALL),
    ("constant_huge_dims.onnx", &["tensor 'shape': raw_data holds 16 bytes, but int64 shape [1099511627776]"], ALL),
    ("ext_parent.onnx", &["tensor 'weight': external data", "'../outside.bin' escapes the model folder"], ALL),
    ("ext_absolute.onnx", &["tensor 'weight': external data", "'/etc/passwd' is an absolute path"], ALL),
    ("ext_past_end.onnx", &["range 0..48 is past the end of 'ext_short.bin' (16 bytes)"], ALL),
    ("ext_missing.onnx", &["missing or unreadable data file", "ext_missing.bin"], ALL),
    ("ext_offset_overflow.onnx", &["tensor 'weight': external data: offset + length overflows"], ALL),
    ("ext_bad_offset.onnx", &["tensor 'weight': external data: bad offset '-5'"], ALL),
    ("ext_no_location.onnx", &["tensor 'weight': external data: no 'location' key"], ALL),
    // Structurally valid models that only break when something would run them.
    (
        "huge_input_dims.onnx",
        &["input 'x' has shape [1099511627776, 4]", "too large for random data"],
        &[Cmd::Calibrate],
    ),
    ("zero_size_huge_weight.onnx", &["calibration of", "failed to allocate"], &[Cmd::Calibrate]),
    ("gemm_rank1_weight.onnx", &["calibration of", "node 'mm' (op_type Gemm)"], &[Cmd::Calibrate]),
];

/// Files of the folder, except `keep`.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read output dir")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs `cmd` on `model` with its output in a fresh folder; returns the output and the folder.
fn run(cmd: Cmd, model: &Path) -> (std::process::Output, tempfile::TempDir) {
    let out = tempdir();
    let o = match cmd {
        Cmd::Dump => onnxq(["dump".as_ref(), model.as_os_str()]),
        Cmd::Quantize => onnxq([
            "quantize".as_ref(),
            model.as_os_str(),
            "--weights-only".as_ref(),
            "-o".as_ref(),
            out.path().join("q.onnx").as_os_str(),
        ]),
        Cmd::Calibrate => onnxq([
            "calibrate".as_ref(),
            model.as_os_str(),
            "--random".as_ref(),
            "2".as_ref(),
            "-o".as_ref(),
            out.path().join("s.json").as_os_str(),
        ]),
    };
    (o, out)
}

#[test]
fn corpus_matches_its_generator() {
    let dir = corpus_dir();
    let cases = gen_corpus::cases();
    for (name, bytes) in &cases {
        let on_disk = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("tests/corpus/{name}: {e}"));
        assert!(
            &on_disk == bytes,
            "tests/corpus/{name} differs from what gen_corpus makes: run `cargo run --release --example gen_corpus`"
        );
    }
    let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
    for f in leftovers(&dir) {
        assert!(f == "regressions" || names.contains(&f.as_str()), "tests/corpus/{f} is not made by gen_corpus");
    }
    // Every model of the corpus is covered by CASES, and nothing else is.
    let models: Vec<&str> = names.iter().copied().filter(|n| n.ends_with(".onnx")).collect();
    let listed: Vec<&str> = CASES.iter().map(|c| c.0).collect();
    assert_eq!(models.len(), listed.len(), "corpus models vs CASES");
    for m in models {
        assert!(listed.contains(&m), "{m} has no entry in CASES");
    }
}

#[test]
fn every_command_fails_cleanly_on_every_broken_model() {
    for &(file, needles, failing) in CASES {
        let model = corpus_dir().join(file);
        for &cmd in ALL {
            if !failing.contains(&cmd) {
                continue;
            }
            let (o, out) = run(cmd, &model);
            eprintln!("{file} / {cmd:?}: {}", stderr(&o).trim());
            let mut all: Vec<&str> = vec![file];
            all.extend_from_slice(needles);
            assert_clean_error(&o, &all);
            assert_eq!(o.status.code(), Some(1), "{file} / {cmd:?}");
            assert!(leftovers(out.path()).is_empty(), "{file} / {cmd:?} left {:?}", leftovers(out.path()));
        }
    }
}

#[test]
fn structurally_valid_hostile_models_work_where_nothing_runs_them() {
    for file in ["huge_input_dims.onnx", "zero_size_huge_weight.onnx", "gemm_rank1_weight.onnx"] {
        let model = corpus_dir().join(file);
        let (o, _) = run(Cmd::Dump, &model);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        assert!(stdout(&o).contains("graph      mlp"), "{file}");
        let (o, out) = run(Cmd::Quantize, &model);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        let q = onnxq::onnx::load(&out.path().join("q.onnx")).expect("the output loads");
        let g = q.proto.graph.as_ref().expect("graph");
        onnxq::onnx::GraphView::new(g).validate().expect("the output is valid");
        for n in g.node.iter().filter(|n| n.op_type() == "DequantizeLinear") {
            let axis = n.attribute.iter().find(|a| a.name() == "axis").map(|a| a.i());
            let w = g.initializer.iter().find(|t| t.name() == n.input[0]).expect("DQ reads an initializer");
            if let Some(axis) = axis {
                assert!((axis as usize) < w.dims.len(), "{file}: DQ axis {axis} out of range for {:?}", w.dims);
            }
        }
    }
    // The zero-element weight is not quantized (2^40 per-channel scales would be).
    let (o, _) = run(Cmd::Quantize, &corpus_dir().join("zero_size_huge_weight.onnx"));
    assert!(o.status.success());
}

#[test]
fn external_data_cannot_escape_through_a_symbolic_link() {
    let outside = tempdir();
    std::fs::write(outside.path().join("secret.bin"), [7u8; 48]).expect("write");
    let dir = tempdir();
    std::fs::copy(corpus_dir().join("ext_missing.onnx"), dir.path().join("m.onnx")).expect("copy");
    std::os::unix::fs::symlink(outside.path().join("secret.bin"), dir.path().join("ext_missing.bin")).expect("link");
    for cmd in ALL {
        let (o, out) = run(*cmd, &dir.path().join("m.onnx"));
        assert_clean_error(&o, &["m.onnx", "tensor 'weight'", "'ext_missing.bin' leads outside the model folder"]);
        assert!(leftovers(out.path()).is_empty());
    }
    // A link that stays inside the folder is fine.
    std::fs::remove_file(dir.path().join("ext_missing.bin")).expect("rm");
    std::fs::write(dir.path().join("real.bin"), [0u8; 48]).expect("write");
    std::os::unix::fs::symlink("real.bin", dir.path().join("ext_missing.bin")).expect("link");
    let (o, _) = run(Cmd::Dump, &dir.path().join("m.onnx"));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn failed_writes_leave_no_output_and_no_temporary_files() {
    let model = crate::util::fixture("cnn.onnx");
    let dir = tempdir();
    // The output path is an existing folder: the final rename fails.
    let target = dir.path().join("out.onnx");
    std::fs::create_dir(&target).expect("mkdir");
    for extra in [&[][..], &["--external-data"][..]] {
        let mut args: Vec<&std::ffi::OsStr> = vec!["quantize".as_ref(), model.as_os_str(), "--weights-only".as_ref()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        args.extend(["-o".as_ref(), target.as_os_str()]);
        let o = onnxq(args);
        assert_clean_error(&o, &["out.onnx"]);
        assert_eq!(leftovers(dir.path()), vec!["out.onnx".to_string()], "{extra:?}");
        assert!(leftovers(&target).is_empty());
    }
    // A folder that does not exist.
    let o = onnxq([
        "quantize".as_ref(),
        model.as_os_str(),
        "--weights-only".as_ref(),
        "-o".as_ref(),
        dir.path().join("nope").join("q.onnx").as_os_str(),
    ]);
    assert_clean_error(&o, &["nope"]);
}

/// Every checked-in crash reproducer goes through the library path without panicking.
#[test]
fn fuzz_regressions_do_not_panic() {
    let dir = corpus_dir().join("regressions");
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("entry").path()).collect();
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).expect("read regression");
        match std::panic::catch_unwind(|| fuzz::exercise(&bytes, &corpus_dir())) {
            Ok(fuzz::Outcome::Invalid(e)) => panic!("{}: quantize wrote an invalid model: {e}", f.display()),
            Ok(_) => {}
            Err(_) => panic!("{}: panicked", f.display()),
        }
    }
}

/// Every corpus file goes through the library path without panicking, and is rejected.
#[test]
fn corpus_is_rejected_in_process_too() {
    for &(file, _, failing) in CASES {
        let bytes = std::fs::read(corpus_dir().join(file)).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| fuzz::exercise(&bytes, &corpus_dir()))
            .unwrap_or_else(|_| panic!("{file}: panicked"));
        match outcome {
            fuzz::Outcome::Rejected(e) => assert!(failing.contains(&Cmd::Dump), "{file} should pass: {e}"),
            fuzz::Outcome::Accepted => assert!(!failing.contains(&Cmd::Dump), "{file} should be rejected"),
            fuzz::Outcome::Invalid(e) => panic!("{file}: invalid output: {e}"),
        }
    }
}

#[test]
fn mutation_fuzz() {
    let iters: usize = std::env::var("ONNXQ_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let seed: u64 = std::env::var("ONNXQ_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let crash_dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let stats = fuzz::run(iters, seed, &fuzz_seeds(), &corpus_dir(), crash_dir);
    eprintln!(
        "mutation fuzz: {} executions (seed {seed}) in {:.1} s: {} accepted, {} rejected, {} decoded",
        stats.execs, stats.seconds, stats.accepted, stats.rejected, stats.decoded
    );
    assert!(stats.accepted > 0, "the mutator should keep some inputs valid");
}

/// The fuzzer's starting inputs: every fixture, and the corpus' base model at opsets 13 and 11.
fn fuzz_seeds() -> Vec<Vec<u8>> {
    let fixtures = root().join("fixtures");
    let mut files: Vec<_> = std::fs::read_dir(&fixtures)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    let mut out: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).expect("fixture")).collect();
    assert!(!out.is_empty(), "no fixtures/*.onnx");
    out.push(onnxq::onnx::builder::model(gen_corpus::base_graph(), 13).encode_to_vec());
    out.push(onnxq::onnx::builder::model(gen_corpus::base_graph(), 11).encode_to_vec());
    out
}

pub mod fuzz;

/// Minimizes a crash input: `ONNXQ_MINIMIZE=FILE cargo test --release --test tests
/// hostile::minimize_input` writes FILE.min (run it on a build that still fails). Without the
/// variable it returns at once.
#[test]
fn minimize_input() {
    let Ok(path) = std::env::var("ONNXQ_MINIMIZE") else { return };
    let bytes = std::fs::read(&path).expect("read input");
    let small = fuzz::minimize(&bytes, &corpus_dir());
    std::fs::write(format!("{path}.min"), &small).expect("write");
    eprintln!("{} -> {} bytes: {path}.min", bytes.len(), small.len());
}

/// Weights reach tract by reference (so models over 2 GiB work): the runtime encoding of a
/// model with external data keeps every payload of 1 KiB or more out of the protobuf (a
/// rewritten tensor included) and small ones inline, and calibrating the model gives the same
/// statistics as calibrating the same model saved inline.
#[test]
fn external_data_models_calibrate_like_inline_ones() {
    use onnxq::onnx::pb::tensor_proto::DataLocation;
    let dir = tempdir();
    let inline = crate::util::fixture("cnn.onnx");
    let model = onnxq::onnx::load(&inline).expect("load");
    let ext = dir.path().join("ext.onnx");
    let opts = onnxq::onnx::SaveOptions { external: true, threshold: Some(1) };
    onnxq::onnx::save(&model.proto, &ext, &opts).expect("save");

    let loaded = onnxq::onnx::load(&ext).expect("reload");
    let mut edited = loaded.proto.clone();
    let g = edited.graph.as_mut().expect("graph");
    let big: Vec<f32> = (0..300).map(|i| i as f32).collect();
    g.initializer[0] = onnxq::onnx::tensor::vec_f32(g.initializer[0].name(), &big);
    let bytes = onnxq::onnx::io::encode_for_runtime(&edited).expect("runtime encoding");
    let back = onnxq::onnx::io::decode(bytes::Bytes::copy_from_slice(&bytes)).expect("decode");
    let recorded = back.metadata_props.iter().find(|p| p.key() == onnxq::onnx::io::RUNTIME_WEIGHTS_KEY);
    assert!(recorded.is_some(), "the weights table is recorded");
    let sizes: Vec<usize> =
        edited.graph.as_ref().expect("graph").initializer.iter().map(|t| t.raw_data().len()).collect();
    let locs: Vec<bool> =
        back.graph.expect("graph").initializer.iter().map(|t| t.data_location() == DataLocation::External).collect();
    assert_eq!(locs, sizes.iter().map(|&s| s >= 1024).collect::<Vec<_>>(), "sizes {sizes:?}");
    assert!(locs.iter().any(|&e| e) && locs.iter().any(|&e| !e), "the fixture needs both kinds: {sizes:?}");
    let referenced = bytes.weights().held_bytes();
    assert_eq!(referenced, sizes.iter().filter(|&&s| s >= 1024).sum::<usize>());

    let calibrate = |m: &Path, out: &Path| {
        let o = onnxq([
            "calibrate".as_ref(),
            m.as_os_str(),
            "--data".as_ref(),
            crate::util::fixture("cnn/calib").as_os_str(),
            "-q".as_ref(),
            "-o".as_ref(),
            out.as_os_str(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let mut v: serde_json::Value = read_json(out);
        v["model"] = serde_json::Value::Null;
        v
    };
    let a = calibrate(&inline, &dir.path().join("a.json"));
    let b = calibrate(&ext, &dir.path().join("b.json"));
    assert!(a == b, "same statistics from inline and external weights");
}
