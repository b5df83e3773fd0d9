//! Command-line surface: clap arguments, validated into the library's option structs, and
//! the dispatch to each command. Nothing here computes; it only wires.

use crate::dump;
use anyhow::{Context, Result};
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
    /// Run calibration samples and write per-tensor statistics and ranges as JSON
    Calibrate(CalibrateArgs),
}

/// Where calibration or evaluation samples come from.
#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// A directory of .npz files (one sample each, arrays keyed by input name), a single .npz,
    /// or an ONNX test-data directory (test_data_set_*/input_*.pb); repeatable
    #[arg(long = "data", value_name = "PATH")]
    pub data: Vec<PathBuf>,
    /// Generate N random samples instead of (or besides) --data
    #[arg(long, value_name = "N")]
    pub random: Option<usize>,
    /// Seed for --random
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Size of a symbolic dimension, NAME=VALUE (repeatable), e.g. --dim batch=1
    #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim)]
    pub dims: Vec<(String, usize)>,
    /// Use at most N samples
    #[arg(long, value_name = "N")]
    pub samples: Option<usize>,
}

fn parse_dim(s: &str) -> std::result::Result<(String, usize), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("'{s}' is not NAME=VALUE"))?;
    let v: usize = v.trim().parse().map_err(|_| format!("'{v}' in '{s}' is not a non-negative integer"))?;
    if k.trim().is_empty() {
        return Err(format!("'{s}' has an empty name"));
    }
    Ok((k.trim().to_string(), v))
}

impl DataArgs {
    pub fn options(&self) -> anyhow::Result<crate::data::DataOptions> {
        let mut sources: Vec<crate::data::Source> = self.data.iter().cloned().map(crate::data::Source::Path).collect();
        if let Some(n) = self.random {
            sources.push(crate::data::Source::Random { count: n, seed: self.seed });
        }
        if sources.is_empty() {
            anyhow::bail!("no samples: pass --data PATH or --random N");
        }
        Ok(crate::data::DataOptions { sources, dims: self.dims.clone(), max_samples: self.samples })
    }
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// The ONNX model
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Where to write the statistics JSON
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Range method: minmax, percentile:P (e.g. percentile:99.999), entropy, mse
    #[arg(long, default_value = "minmax")]
    pub method: crate::stats::RangeMethod,
    /// Calibrate only these tensors (comma-separated or repeated)
    #[arg(long, value_delimiter = ',')]
    pub tensors: Vec<String>,
    /// Histogram bins per tensor
    #[arg(long, default_value_t = 2048)]
    pub bins: usize,
    /// No progress bar or summary on stderr
    #[arg(long, short)]
    pub quiet: bool,
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
        Command::Calibrate(a) => run_calibrate(a),
    }
}

fn run_calibrate(a: CalibrateArgs) -> Result<()> {
    use crate::calibrate::{self as cal, Target};
    if a.bins < 16 || !a.bins.is_multiple_of(2) {
        anyhow::bail!("--bins must be an even number of at least 16, got {}", a.bins);
    }
    let model = crate::onnx::load(&a.model)?;
    let graph = model.proto.graph.as_ref().context("the model has no graph")?;
    let view = crate::onnx::GraphView::new(graph);
    view.validate().with_context(|| format!("invalid model {}", a.model.display()))?;
    let targets = if a.tensors.is_empty() {
        cal::default_targets(&view)?
    } else {
        let all = cal::default_targets(&view)?;
        a.tensors
            .iter()
            .map(|t| {
                if view.origin(t).is_none() {
                    anyhow::bail!("--tensors: no tensor named '{t}' in the model");
                }
                Ok(all.iter().find(|x| &x.name == t).cloned().unwrap_or(Target { name: t.clone(), channel_axis: None }))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let specs = cal::input_specs(graph);
    let set = crate::data::open(&specs, &a.data.options()?)?;
    let bytes = cal::model_bytes(&model)?;
    let calib = cal::calibrate(&bytes, &specs, &set, &targets, &cal::CalibOptions { bins: a.bins, quiet: a.quiet })
        .with_context(|| format!("calibration of {} failed", a.model.display()))?;
    let file = cal::StatsFile::from_calibration(&a.model.display().to_string(), &calib, &a.method);
    let json = serde_json::to_string_pretty(&file)? + "\n";
    crate::onnx::io::write_atomic(&a.output, |w| w.write_all(json.as_bytes()).map_err(Into::into))
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    if !a.quiet {
        eprint!("{}", cal::summary(&calib));
        eprintln!("wrote {}", a.output.display());
    }
    Ok(())
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
