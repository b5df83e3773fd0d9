//! Writes a synthetic model over protobuf's 2 GiB limit, to measure onnxq on big models:
//! `cargo run --release --example gen_big_model -- DIR [--gb 2.5] [--width 4096]`.
//!
//! The model is a deep MLP, x[1,W] → L × (MatMul W×W + Relu) → y, with L chosen so the MatMul
//! weights total at least `--gb` GB (38 layers of 4096×4096 f32 for 2.5 GB). Weights are He-uniform
//! from a fixed seed, so every run writes the same bytes. They are streamed one layer at a time
//! into `DIR/big.onnx.data` (64-byte aligned, like `onnxq::onnx::save`), and `DIR/big.onnx`
//! refers to them as ONNX external data; the generator never holds more than one layer.
//! (`onnxq::onnx::save` with external data would need every weight in memory as `Bytes` first,
//! so it is used only for the small model file.) The result is checked by loading it back with
//! `onnxq::onnx::load`.

use anyhow::{bail, Context, Result};
use onnxq::onnx::builder::{graph, model, node, tensor_info};
use onnxq::onnx::pb::{tensor_proto::DataLocation, StringStringEntryProto, TensorProto};
use std::io::Write;
use std::path::PathBuf;

const FLOAT: i32 = 1;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut dir: Option<PathBuf> = None;
    let (mut gb, mut width) = (2.5f64, 4096usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--gb" => gb = args.next().context("--gb needs a value")?.parse().context("--gb")?,
            "--width" => width = args.next().context("--width needs a value")?.parse().context("--width")?,
            _ if dir.is_none() => dir = Some(PathBuf::from(a)),
            _ => bail!("usage: gen_big_model DIR [--gb 2.5] [--width 4096]"),
        }
    }
    let dir = dir.context("usage: gen_big_model DIR [--gb 2.5] [--width 4096]")?;
    std::fs::create_dir_all(&dir)?;
    let layer_bytes = (width * width * 4) as f64;
    let layers = ((gb * 1e9) / layer_bytes).ceil().max(1.0) as usize;
    let model_path = dir.join("big.onnx");
    let data_name = "big.onnx.data";
    let data_path = dir.join(data_name);

    let t0 = std::time::Instant::now();
    let mut data = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&data_path)?);
    let mut rng = onnxq::rng::Rng::new(0x5eed);
    let bound = (6.0 / width as f64).sqrt() as f32; // He-uniform keeps Relu activations stable
    let mut layer = vec![0u8; width * width * 4];
    let mut offset = 0u64;
    let (mut nodes, mut inits) = (Vec::new(), Vec::new());
    let mut prev = "x".to_string();
    for l in 0..layers {
        for chunk in layer.chunks_exact_mut(8) {
            let r = rng.next_u64();
            for (k, half) in [r as u32, (r >> 32) as u32].into_iter().enumerate() {
                let u = (half >> 8) as f32 / (1u32 << 24) as f32; // [0, 1)
                chunk[k * 4..k * 4 + 4].copy_from_slice(&((u * 2.0 - 1.0) * bound).to_le_bytes());
            }
        }
        data.write_all(&layer)?;
        let name = format!("layer{l}.weight");
        let kv = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        inits.push(TensorProto {
            name: Some(name.clone()),
            dims: vec![width as i64, width as i64],
            data_type: Some(FLOAT),
            data_location: Some(DataLocation::External as i32),
            external_data: vec![
                kv("location", data_name.into()),
                kv("offset", offset.to_string()),
                kv("length", layer.len().to_string()),
            ],
            ..Default::default()
        });
        offset += layer.len() as u64; // W*W*4 keeps the 64-byte alignment
        let mm = format!("layer{l}.mm");
        let out = if l + 1 == layers { "y".to_string() } else { format!("layer{l}.relu") };
        nodes.push(node("MatMul", &format!("layer{l}/MatMul"), &[&prev, &name], &[&mm], vec![]));
        nodes.push(node("Relu", &format!("layer{l}/Relu"), &[&mm], &[&out], vec![]));
        prev = out;
    }
    data.flush()?;
    drop(data);
    let w = width as i64;
    let g =
        graph("big_mlp", nodes, vec![tensor_info("x", FLOAT, &[1, w])], vec![tensor_info("y", FLOAT, &[1, w])], inits);
    let saved = onnxq::onnx::save(&model(g, 13), &model_path, &Default::default())?;
    let secs = t0.elapsed().as_secs_f64();

    // Check: it loads, and every weight resolves to its slice of the data file.
    let back = onnxq::onnx::load(&model_path)?;
    if back.external_tensors != layers {
        bail!("reloaded {} external tensors, expected {layers}", back.external_tensors);
    }
    println!(
        "wrote {} ({} bytes) and {} ({offset} bytes = {:.2} GB): {layers} layers of MatMul {width}x{width} + Relu in {secs:.1} s",
        model_path.display(),
        saved.bytes,
        data_path.display(),
        offset as f64 / 1e9
    );
    Ok(())
}
