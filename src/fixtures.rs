//! The test fixtures: small ONNX models with fixed seeds, built with the crate's own builder
//! helpers, plus calibration and evaluation samples as `.npz` files (one sample per file, one
//! array per graph input, keyed by the input name). `cargo run --example gen_fixtures` writes
//! them to `fixtures/`; a test regenerates them and fails if the checked-in copies are stale.
//!
//! | fixture        | what it exercises |
//! |----------------|-------------------|
//! | `cnn`          | Conv+bias, Relu, MaxPool, Flatten, Gemm; the graph output comes from Gemm |
//! | `transformer`  | MatMul+bias, decomposed LayerNorm, attention with a −3.4e38 mask Add, Softmax, Erf Gelu |
//! | `constants`    | an MLP whose weights live in Constant nodes; output from MatMul |
//! | `shared`       | one weight used by two MatMuls |
//! | `outliers`     | an MLP whose second layer has injected activation outliers (one token, two columns) |
//! | `convchain`    | Conv → Relu → Conv (1×1) → Relu → depthwise Conv, channels 100× apart in range; GlobalAveragePool features |

use crate::array::{dtype, ArrayData};
use crate::npy::write_npz;
use crate::onnx::builder::{attr_int, attr_ints, attr_tensor, graph, model, node, tensor_info, value_info, Dim};
use crate::onnx::pb::{ModelProto, NodeProto, TensorProto};
use crate::onnx::tensor::{from_f32, scalar_f32, vec_i64};
use crate::rng::Rng;
use anyhow::{Context, Result};
use ndarray::{ArrayD, IxDyn};
use std::path::Path;

/// Calibration and evaluation sample counts per fixture.
pub const CALIB_SAMPLES: usize = 16;
pub const EVAL_SAMPLES: usize = 8;

/// A checked-in fixture (`fixtures/NAME.onnx`) and its calibration samples (at most
/// `max_samples`), for unit tests.
#[cfg(test)]
pub(crate) fn checked_in(name: &str, max_samples: Option<usize>) -> Result<(ModelProto, crate::data::DataOptions)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let model = crate::onnx::load_valid(&root.join(format!("{name}.onnx")))?.proto;
    let data = crate::data::DataOptions {
        sources: vec![crate::data::Source::Path(root.join(name).join("calib"))],
        max_samples,
        ..Default::default()
    };
    Ok((model, data))
}

struct Builder {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    rng: Rng,
}

impl Builder {
    fn new(seed: u64) -> Self {
        Builder { nodes: Vec::new(), inits: Vec::new(), rng: Rng::new(seed) }
    }

    /// Adds a node named `name` whose single output is also called `name`.
    fn op(&mut self, op: &str, name: &str, inputs: &[&str], attrs: Vec<crate::onnx::pb::AttributeProto>) -> String {
        self.nodes.push(node(op, name, inputs, &[name], attrs));
        name.to_string()
    }

    fn init(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> String {
        let a = ArrayD::from_shape_vec(IxDyn(shape), data).unwrap_or_else(|_| ArrayD::zeros(IxDyn(shape)));
        self.inits.push(from_f32(name, &a));
        name.to_string()
    }

    fn randn(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.normal() as f32 * scale).collect()
    }

    /// A weight initializer with N(0, 1/fan_in) entries.
    fn weight(&mut self, name: &str, shape: &[usize], fan_in: usize) -> String {
        let n = shape.iter().product();
        let data = self.randn(n, 1.0 / (fan_in as f32).sqrt());
        self.init(name, shape, data)
    }

    fn scalar(&mut self, name: &str, v: f32) -> String {
        self.inits.push(scalar_f32(name, v));
        name.to_string()
    }

    fn ints(&mut self, name: &str, v: &[i64]) -> String {
        self.inits.push(vec_i64(name, v));
        name.to_string()
    }

    /// Decomposed LayerNormalization over the last axis of a [.., d] tensor.
    fn layer_norm(&mut self, p: &str, x: &str, d: usize) -> String {
        let mean = self.op("ReduceMean", &format!("{p}_mean"), &[x], vec![attr_ints("axes", &[-1])]);
        let xc = self.op("Sub", &format!("{p}_sub"), &[x, &mean], vec![]);
        let two = self.scalar(&format!("{p}_two"), 2.0);
        let sq = self.op("Pow", &format!("{p}_pow"), &[&xc, &two], vec![]);
        let var = self.op("ReduceMean", &format!("{p}_var"), &[&sq], vec![attr_ints("axes", &[-1])]);
        let eps = self.scalar(&format!("{p}_eps"), 1e-5);
        let ve = self.op("Add", &format!("{p}_add_eps"), &[&var, &eps], vec![]);
        let sd = self.op("Sqrt", &format!("{p}_sqrt"), &[&ve], vec![]);
        let xn = self.op("Div", &format!("{p}_div"), &[&xc, &sd], vec![]);
        let gamma: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * self.rng.normal() as f32).collect();
        let g = self.init(&format!("{p}_gamma"), &[d], gamma);
        let beta = self.randn(d, 0.05);
        let b = self.init(&format!("{p}_beta"), &[d], beta);
        let xg = self.op("Mul", &format!("{p}_scale"), &[&xn, &g], vec![]);
        self.op("Add", &format!("{p}_shift"), &[&xg, &b], vec![])
    }

    /// MatMul by a fresh [k, n] weight plus a bias Add.
    fn linear(&mut self, p: &str, x: &str, k: usize, n: usize) -> String {
        let w = self.weight(&format!("{p}.weight"), &[k, n], k);
        let bias = self.randn(n, 0.02);
        let b = self.init(&format!("{p}.bias"), &[n], bias);
        let mm = self.op("MatMul", &format!("{p}_matmul"), &[x, &w], vec![]);
        self.op("Add", &format!("{p}_add"), &[&mm, &b], vec![])
    }
}

fn f32_array(shape: &[usize], rng: &mut Rng, scale: f32) -> ArrayData {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * scale).collect();
    ArrayData::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap_or_else(|_| ArrayD::zeros(IxDyn(shape))))
}

/// Samples are functions of (fixture seed, sample index): `split` offsets eval from calib.
type SampleFn = fn(&mut Rng) -> Vec<(&'static str, ArrayData)>;

pub struct Fixture {
    pub name: &'static str,
    pub model: ModelProto,
    sample: SampleFn,
    seed: u64,
}

fn cnn() -> Fixture {
    let mut b = Builder::new(11);
    let w1 = b.weight("conv1.weight", &[8, 3, 3, 3], 27);
    let b1v = b.randn(8, 0.05);
    let b1 = b.init("conv1.bias", &[8], b1v);
    let c1 = b.op(
        "Conv",
        "conv1",
        &["image", &w1, &b1],
        vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", &[1, 1, 1, 1])],
    );
    let r1 = b.op("Relu", "relu1", &[&c1], vec![]);
    let p1 = b.op("MaxPool", "pool1", &[&r1], vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])]);
    let w2 = b.weight("conv2.weight", &[16, 8, 3, 3], 72);
    let b2v = b.randn(16, 0.05);
    let b2 = b.init("conv2.bias", &[16], b2v);
    let c2 = b.op(
        "Conv",
        "conv2",
        &[&p1, &w2, &b2],
        vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", &[1, 1, 1, 1])],
    );
    let r2 = b.op("Relu", "relu2", &[&c2], vec![]);
    let p2 = b.op("MaxPool", "pool2", &[&r2], vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])]);
    let f = b.op("Flatten", "flatten", &[&p2], vec![attr_int("axis", 1)]);
    let wf = b.weight("fc.weight", &[10, 256], 256);
    let bfv = b.randn(10, 0.05);
    let bf = b.init("fc.bias", &[10], bfv);
    b.nodes.push(node("Gemm", "fc", &[&f, &wf, &bf], &["logits"], vec![attr_int("transB", 1)]));
    let g = graph(
        "cnn",
        b.nodes,
        vec![tensor_info("image", dtype::FLOAT, &[1, 3, 16, 16])],
        vec![tensor_info("logits", dtype::FLOAT, &[1, 10])],
        b.inits,
    );
    Fixture {
        name: "cnn",
        model: model(g, 13),
        sample: |r| vec![("image", f32_array(&[1, 3, 16, 16], r, 1.0))],
        seed: 101,
    }
}

fn transformer() -> Fixture {
    let (s, d, h, ff) = (8usize, 16usize, 2usize, 32usize);
    let hd = d / h;
    let mut b = Builder::new(12);
    // Attention mask path: (1 - mask) * -3.4e38, broadcast to [1, 1, 1, s].
    let mf = b.op("Cast", "mask_cast", &["attention_mask"], vec![attr_int("to", dtype::FLOAT as i64)]);
    let one = b.scalar("one", 1.0);
    let inv = b.op("Sub", "mask_invert", &[&one, &mf], vec![]);
    let big = b.scalar("mask_min", -3.4028235e38);
    let madd = b.op("Mul", "mask_scale", &[&inv, &big], vec![]);
    let axes = b.ints("mask_axes", &[1, 2]);
    let mask = b.op("Unsqueeze", "mask_unsqueeze", &[&madd, &axes], vec![]);

    let ln1 = b.layer_norm("ln1", "x", d);
    let q = b.linear("q_proj", &ln1, d, d);
    let k = b.linear("k_proj", &ln1, d, d);
    let v = b.linear("v_proj", &ln1, d, d);
    let heads = b.ints("heads_shape", &[1, s as i64, h as i64, hd as i64]);
    let qr = b.op("Reshape", "q_reshape", &[&q, &heads], vec![]);
    let kr = b.op("Reshape", "k_reshape", &[&k, &heads], vec![]);
    let vr = b.op("Reshape", "v_reshape", &[&v, &heads], vec![]);
    let qt = b.op("Transpose", "q_transpose", &[&qr], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let kt = b.op("Transpose", "k_transpose", &[&kr], vec![attr_ints("perm", &[0, 2, 3, 1])]);
    let vt = b.op("Transpose", "v_transpose", &[&vr], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let scores = b.op("MatMul", "qk_matmul", &[&qt, &kt], vec![]);
    let sqrt_d = b.scalar("sqrt_head_dim", (hd as f32).sqrt());
    let scaled = b.op("Div", "qk_scale", &[&scores, &sqrt_d], vec![]);
    let masked = b.op("Add", "qk_mask", &[&scaled, &mask], vec![]);
    let probs = b.op("Softmax", "softmax", &[&masked], vec![attr_int("axis", -1)]);
    let ctx = b.op("MatMul", "pv_matmul", &[&probs, &vt], vec![]);
    let ctx_t = b.op("Transpose", "ctx_transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let merged = b.ints("merge_shape", &[1, s as i64, d as i64]);
    let ctx_r = b.op("Reshape", "ctx_reshape", &[&ctx_t, &merged], vec![]);
    let o = b.linear("o_proj", &ctx_r, d, d);
    let res1 = b.op("Add", "residual1", &["x", &o], vec![]);
    let ln2 = b.layer_norm("ln2", &res1, d);
    let f1 = b.linear("ffn1", &ln2, d, ff);
    // Gelu: x * 0.5 * (1 + erf(x / sqrt(2)))
    let sqrt2 = b.scalar("sqrt2", std::f32::consts::SQRT_2);
    let xd = b.op("Div", "gelu_div", &[&f1, &sqrt2], vec![]);
    let e = b.op("Erf", "gelu_erf", &[&xd], vec![]);
    let one2 = b.scalar("gelu_one", 1.0);
    let e1 = b.op("Add", "gelu_add", &[&e, &one2], vec![]);
    let xm = b.op("Mul", "gelu_mul", &[&f1, &e1], vec![]);
    let half = b.scalar("gelu_half", 0.5);
    let gelu = b.op("Mul", "gelu_half_mul", &[&xm, &half], vec![]);
    let f2 = b.linear("ffn2", &gelu, ff, d);
    b.nodes.push(node("Add", "residual2", &[&res1, &f2], &["y"], vec![]));
    let g = graph(
        "transformer",
        b.nodes,
        vec![
            value_info("x", dtype::FLOAT, Some(&[Dim::Fixed(1), Dim::Fixed(s as i64), Dim::Fixed(d as i64)])),
            tensor_info("attention_mask", dtype::INT64, &[1, s as i64]),
        ],
        vec![tensor_info("y", dtype::FLOAT, &[1, s as i64, d as i64])],
        b.inits,
    );
    Fixture {
        name: "transformer",
        model: model(g, 13),
        sample: |r| {
            let pad = r.below(3) as usize;
            let mask: Vec<i64> = (0..8).map(|i| if i < 8 - pad { 1 } else { 0 }).collect();
            vec![
                ("x", f32_array(&[1, 8, 16], r, 1.0)),
                ("attention_mask", ArrayData::I64(ArrayD::from_shape_vec(IxDyn(&[1, 8]), mask).unwrap_or_default())),
            ]
        },
        seed: 102,
    }
}

fn constant_node(name: &str, t: TensorProto) -> NodeProto {
    node("Constant", name, &[], &[name], vec![attr_tensor("value", t)])
}

fn constants() -> Fixture {
    let mut b = Builder::new(13);
    let w1 = b.randn(8 * 16, 0.35);
    let b1 = b.randn(16, 0.05);
    let w2 = b.randn(16 * 4, 0.25);
    let arr =
        |s: &[usize], v: Vec<f32>| ArrayD::from_shape_vec(IxDyn(s), v).unwrap_or_else(|_| ArrayD::zeros(IxDyn(s)));
    let nodes = vec![
        constant_node("w1", from_f32("w1", &arr(&[8, 16], w1))),
        constant_node("b1", from_f32("b1", &arr(&[16], b1))),
        constant_node("w2", from_f32("w2", &arr(&[16, 4], w2))),
        node("MatMul", "fc1", &["x", "w1"], &["h"], vec![]),
        node("Add", "fc1_bias", &["h", "b1"], &["hb"], vec![]),
        node("Relu", "relu", &["hb"], &["hr"], vec![]),
        node("MatMul", "fc2", &["hr", "w2"], &["y"], vec![]),
    ];
    let g = graph(
        "constants",
        nodes,
        vec![value_info("x", dtype::FLOAT, Some(&[Dim::Named("batch".into()), Dim::Fixed(8)]))],
        vec![value_info("y", dtype::FLOAT, Some(&[Dim::Named("batch".into()), Dim::Fixed(4)]))],
        vec![],
    );
    Fixture { name: "constants", model: model(g, 13), sample: |r| vec![("x", f32_array(&[4, 8], r, 1.0))], seed: 103 }
}

fn shared() -> Fixture {
    let mut b = Builder::new(14);
    let w = b.weight("shared.weight", &[8, 8], 8);
    let h = b.op("MatMul", "mm1", &["x", &w], vec![]);
    let r = b.op("Relu", "relu", &[&h], vec![]);
    b.nodes.push(node("MatMul", "mm2", &[&r, &w], &["y"], vec![]));
    let g = graph(
        "shared",
        b.nodes,
        vec![tensor_info("x", dtype::FLOAT, &[2, 8])],
        vec![tensor_info("y", dtype::FLOAT, &[2, 8])],
        b.inits,
    );
    Fixture { name: "shared", model: model(g, 13), sample: |r| vec![("x", f32_array(&[2, 8], r, 1.0))], seed: 104 }
}

/// Token 0 plays [CLS]: its feature 0 is large, which drives hidden unit 5 of the first layer,
/// which meets two large second-layer weights (columns 3 and 17): those two elements of the
/// second layer's output reach ~50x the typical magnitude. The third layer barely reads
/// those columns, like the massive activations of real transformers that act as biases.
fn outliers() -> Fixture {
    let (t, d, hdim) = (128usize, 32usize, 64usize);
    let mut b = Builder::new(15);
    let mut w1 = b.randn(d * hdim, 1.0 / (d as f32).sqrt());
    w1[5] = 2.0; // w1[0, 5]: CLS feature 0 -> hidden unit 5
    for k in 1..d {
        w1[k * hdim + 5] *= 0.1;
    }
    let w1n = b.init("fc1.weight", &[d, hdim], w1);
    let mut b1v = b.randn(hdim, 0.02);
    b1v[5] = -2.5; // unit 5 stays silent unless feature 0 is CLS-large
    let b1 = b.init("fc1.bias", &[hdim], b1v);
    let mut w2 = b.randn(hdim * d, 1.0 / (hdim as f32).sqrt());
    w2[5 * d + 3] = 12.0;
    w2[5 * d + 17] = -10.0;
    let w2n = b.init("fc2.weight", &[hdim, d], w2);
    let b2v = b.randn(d, 0.02);
    let b2 = b.init("fc2.bias", &[d], b2v);
    let mut w3 = b.randn(d * 8, 1.0 / (d as f32).sqrt());
    for j in 0..8 {
        w3[3 * 8 + j] *= 0.01;
        w3[17 * 8 + j] *= 0.01;
    }
    let w3n = b.init("fc3.weight", &[d, 8], w3);
    let h = b.op("MatMul", "fc1", &["x", &w1n], vec![]);
    let hb = b.op("Add", "fc1_bias", &[&h, &b1], vec![]);
    let hr = b.op("Relu", "relu1", &[&hb], vec![]);
    let y = b.op("MatMul", "fc2", &[&hr, &w2n], vec![]);
    let yb = b.op("Add", "fc2_bias", &[&y, &b2], vec![]);
    let yr = b.op("Relu", "relu2", &[&yb], vec![]);
    b.nodes.push(node("MatMul", "fc3", &[&yr, &w3n], &["out"], vec![]));
    let g = graph(
        "outliers",
        b.nodes,
        vec![tensor_info("x", dtype::FLOAT, &[1, t as i64, d as i64])],
        vec![tensor_info("out", dtype::FLOAT, &[1, t as i64, 8])],
        b.inits,
    );
    Fixture {
        name: "outliers",
        model: model(g, 13),
        sample: |r| {
            let mut x = f32_array(&[1, 128, 32], r, 1.0);
            if let ArrayData::F32(a) = &mut x {
                a[[0, 0, 0]] = 4.0 + r.uniform() as f32;
                for tok in 1..128 {
                    a[[0, tok, 0]] = a[[0, tok, 0]].min(1.0);
                }
            }
            vec![("x", x)]
        },
        seed: 105,
    }
}

/// Convolutions whose intermediate channels span ranges 100× apart (per output channel gains
/// on conv1 and conv2), the case per-channel equalization ([`crate::quantize::equalize`])
/// is for: relu1 → conv2 (dense 1×1) and relu2 → conv3 (depthwise 3×3).
fn convchain() -> Fixture {
    let mut b = Builder::new(16);
    let gain = |c: usize, n: usize| 0.1f32 * 100f32.powf(c as f32 / (n - 1) as f32);
    // Channel order mixed so the large channels are not all at one end.
    let order = [3usize, 7, 0, 5, 1, 6, 2, 4];
    let mut w1 = b.randn(8 * 27, 1.0 / 27f32.sqrt());
    for (c, chunk) in w1.chunks_mut(27).enumerate() {
        chunk.iter_mut().for_each(|v| *v *= gain(order[c], 8));
    }
    let w1 = b.init("conv1.weight", &[8, 3, 3, 3], w1);
    let b1v: Vec<f32> = (0..8).map(|c| 0.3 * gain(order[c], 8)).collect();
    let b1 = b.init("conv1.bias", &[8], b1v);
    let pads = || vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", &[1, 1, 1, 1])];
    let c1 = b.op("Conv", "conv1", &["image", &w1, &b1], pads());
    let r1 = b.op("Relu", "relu1", &[&c1], vec![]);
    let mut w2 = b.randn(8 * 8, 0.3);
    for (o, row) in w2.chunks_mut(8).enumerate() {
        // Each output reads the inputs with weights inversely proportional to their ranges.
        for (c, v) in row.iter_mut().enumerate() {
            *v *= gain(order[o], 8) / gain(order[c], 8).sqrt();
        }
    }
    let w2 = b.init("conv2.weight", &[8, 8, 1, 1], w2);
    let b2v = b.randn(8, 0.05);
    let b2 = b.init("conv2.bias", &[8], b2v);
    let c2 = b.op("Conv", "conv2", &[&r1, &w2, &b2], vec![attr_ints("kernel_shape", &[1, 1])]);
    let r2 = b.op("Relu", "relu2", &[&c2], vec![]);
    let w3v = b.randn(8 * 9, 1.0 / 3.0);
    let w3 = b.init("conv3.weight", &[8, 1, 3, 3], w3v);
    let b3v = b.randn(8, 0.05);
    let b3 = b.init("conv3.bias", &[8], b3v);
    let mut dw = pads();
    dw.push(attr_int("group", 8));
    let c3 = b.op("Conv", "conv3", &[&r2, &w3, &b3], dw);
    let r3 = b.op("Relu", "relu3", &[&c3], vec![]);
    let gap = b.op("GlobalAveragePool", "gap", &[&r3], vec![]);
    b.nodes.push(node("Flatten", "flatten", &[&gap], &["features"], vec![attr_int("axis", 1)]));
    let g = graph(
        "convchain",
        b.nodes,
        vec![tensor_info("image", dtype::FLOAT, &[1, 3, 16, 16])],
        vec![tensor_info("features", dtype::FLOAT, &[1, 8])],
        b.inits,
    );
    Fixture {
        name: "convchain",
        model: model(g, 13),
        sample: |r| vec![("image", f32_array(&[1, 3, 16, 16], r, 1.0))],
        seed: 106,
    }
}

/// All fixtures, in a fixed order.
pub fn all() -> Vec<Fixture> {
    vec![cnn(), transformer(), constants(), shared(), outliers(), convchain()]
}

/// Writes `<dir>/<name>.onnx`, `<dir>/<name>/calib/NNNN.npz` and `<dir>/<name>/eval/NNNN.npz`.
pub fn generate(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut written = Vec::new();
    for f in all() {
        let path = dir.join(format!("{}.onnx", f.name));
        crate::onnx::save(&f.model, &path, &Default::default())?;
        written.push(path);
        for (split, count, offset) in [("calib", CALIB_SAMPLES, 0u64), ("eval", EVAL_SAMPLES, 1_000)] {
            let sdir = dir.join(f.name).join(split);
            std::fs::create_dir_all(&sdir).with_context(|| format!("cannot create {}", sdir.display()))?;
            for i in 0..count {
                let mut rng = Rng::new(f.seed * 10_000 + offset + i as u64);
                let arrays = (f.sample)(&mut rng);
                let refs: Vec<(&str, &ArrayData)> = arrays.iter().map(|(k, v)| (*k, v)).collect();
                let p = sdir.join(format!("{i:04}.npz"));
                write_npz(&p, &refs)?;
                written.push(p);
            }
        }
    }
    Ok(written)
}
