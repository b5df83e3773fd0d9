//! Regenerates the checked-in test fixtures: `cargo run --release --example gen_fixtures [DIR]`
//! (default `fixtures/`). Models and samples are built with fixed seeds by
//! `onnxq::fixtures`, so the output is byte-identical on every run.

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "fixtures".to_string());
    let written = onnxq::fixtures::generate(std::path::Path::new(&dir))?;
    println!("wrote {} files under {dir}", written.len());
    Ok(())
}
