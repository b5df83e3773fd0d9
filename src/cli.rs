//! Command-line surface: clap arguments, validated into the library's option structs, and
//! the dispatch to each command. Nothing here computes; it only wires.

use crate::dump;
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "onnxq", version, about = "Outlier-aware int8 quantization of ONNX models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show a model: header, inputs/outputs, ops, nodes, weights
    Dump(DumpArgs),
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// The ONNX model
    pub model: PathBuf,
    /// Machine-readable JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Add min/max/mean/std/abs-max of every weight
    #[arg(long)]
    pub weights: bool,
    /// Show a node with its producers and consumers (repeatable)
    #[arg(long = "node", value_name = "NAME")]
    pub nodes: Vec<String>,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dump(a) => run_dump(a),
    }
}

fn run_dump(a: DumpArgs) -> Result<()> {
    let model = crate::onnx::load(&a.model)?;
    let d = dump::build(&model, &dump::DumpOptions { weights: a.weights, nodes: a.nodes })?;
    let text = if a.json { serde_json::to_string_pretty(&d)? + "\n" } else { dump::render_text(&d) };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
