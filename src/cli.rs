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
    /// Quantize a float model to int8 QDQ (static), weights only, or dynamic
    Quantize(QuantizeArgs),
    /// Compare a candidate model (QDQ models run as their float fake-quant twin) with a
    /// reference model on the same samples: SQNR, cosine, errors, top-1 agreement
    Eval(EvalArgs),
    /// Find the activation outliers of each MatMul/Gemm layer and the weights that make them
    Outliers(OutliersArgs),
    /// Regularize the weights that make activation outliers; writes a float model and a report
    Regularize(RegularizeArgs),
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
pub struct QuantizeArgs {
    /// The float ONNX model
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Where to write the quantized model
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Range method: minmax, percentile:P, entropy, mse (the clipping range with the least
    /// expected quantization error)
    #[arg(long, default_value = "mse")]
    pub method: crate::stats::RangeMethod,
    /// Placement preset: cnn (ONNX Runtime's placement), transformer (MatMul/Gemm inputs and
    /// weights only), transformer-fused (cnn's, minus the coarsely rounded residual stream);
    /// auto picks transformer-fused for graphs with LayerNorm or attention, else cnn
    #[arg(long, default_value = "auto")]
    pub preset: crate::quantize::Preset,
    /// One scale per weight tensor instead of per output channel
    #[arg(long)]
    pub per_tensor: bool,
    /// Activation type: u8 (asymmetric) or s8 (symmetric)
    #[arg(long, default_value = "u8", value_parser = parse_act)]
    pub activations: crate::quantize::params::ActType,
    /// Quantize only these op types (comma-separated)
    #[arg(long, value_delimiter = ',')]
    pub op_types: Vec<String>,
    /// Never quantize these op types (comma-separated)
    #[arg(long, value_delimiter = ',')]
    pub exclude_op_types: Vec<String>,
    /// Never quantize this node (name or glob pattern; repeatable)
    #[arg(long, value_name = "NODE")]
    pub exclude: Vec<String>,
    /// Reuse ranges from `onnxq calibrate` instead of calibrating
    #[arg(long, value_name = "FILE")]
    pub stats: Option<PathBuf>,
    /// Write the JSON report here
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Int8 weights only, activations stay float (no data needed)
    #[arg(long)]
    pub weights_only: bool,
    /// Dynamic quantization, ONNX Runtime style: int8 weights, activations quantized at run
    /// time (DynamicQuantizeLinear + MatMulInteger/ConvInteger); no data needed
    #[arg(long, conflicts_with_all = ["weights_only", "stats", "keep_float", "activations", "method", "data", "random"])]
    pub dynamic: bool,
    /// Measure each quantized tensor's cost and leave the N most harmful in float
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_float: usize,
    /// Samples used per measurement of --keep-float
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub keep_float_samples: usize,
    /// Write tensors to an external data file beside the model
    #[arg(long)]
    pub external_data: bool,
    /// Per-channel bias correction (static quantization; off by default: two passes of the
    /// fake-quant twin over 8 samples, about 4x plain inference each)
    #[arg(long)]
    pub bias_correction: bool,
    /// The default (kept for scripts written when bias correction was on by default)
    #[arg(long, hide = true, conflicts_with = "bias_correction")]
    pub no_bias_correction: bool,
    /// How constant MatMul/Conv weights are rounded to int8: nearest (the default) or gptq
    /// (each rounding error is compensated on the layer's other inputs, weighed by the
    /// layer's inputs on the first 8 samples of --data/--random; one extra pass). With
    /// --weights-only it needs --data or --random
    #[arg(long, value_name = "HOW", default_value = "nearest", value_parser = ["nearest", "gptq"])]
    pub weight_rounding: String,
    /// Quantize graph inputs as they are: no shift of lattice-valued inputs (e.g. normalized
    /// 8-bit images) onto the uint8 grid of their first Conv
    #[arg(long)]
    pub no_input_grid: bool,
    /// Leave the activations between two convolutions as they are: no per-channel rescaling
    /// (folded into the two convolutions' weights) that evens out their channels' ranges
    #[arg(long)]
    pub no_equalize: bool,
    /// Outlier-aware weight regularization before quantization: auto (the default with
    /// --data/--random: keep each layer's edit only if the quantized model gets better on the
    /// calibration samples), off, or a strength (lambda multiplier, applied without the guard)
    #[arg(long, value_name = "auto|off|STRENGTH", num_args = 0..=1, default_missing_value = "auto")]
    pub regularize: Option<crate::outliers::Regularize>,
    #[command(flatten)]
    pub outlier: OutlierArgs,
    /// No progress or summary on stderr
    #[arg(long, short)]
    pub quiet: bool,
}

/// The constants of outlier detection and regularization (see `onnxq outliers --help`).
#[derive(Args, Debug, Clone)]
pub struct OutlierArgs {
    /// Outlier threshold: tau = FACTOR x the quantile of |y| (pre-bias layer output)
    #[arg(long, value_name = "FACTOR", default_value_t = 4.0)]
    pub outlier_factor: f64,
    /// The quantile of |y| the threshold is based on
    #[arg(long, value_name = "Q", default_value_t = 0.999)]
    pub outlier_quantile: f64,
    /// Select a weight when its share of its column's outlier excess is at least this
    #[arg(long, value_name = "SHARE", default_value_t = 0.1)]
    pub min_share: f64,
    /// At most this many selected weights per output column
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_selected: usize,
    /// Penalty on the selected weights, in units of tr(XᵀX)/K
    #[arg(long, value_name = "L", default_value_t = 1.0)]
    pub reg_lambda: f64,
    /// Damping toward the original weights, in units of tr(XᵀX)/K
    #[arg(long, value_name = "D", default_value_t = 1.0)]
    pub reg_delta: f64,
    /// solve (damped least squares with clipped targets) or shrink (scale the selected weights)
    #[arg(long, value_name = "MODE", default_value = "solve", value_parser = ["solve", "shrink"])]
    pub reg_mode: String,
    /// Scale factor of the selected weights in shrink mode
    #[arg(long, value_name = "G", default_value_t = 0.5)]
    pub shrink_gamma: f64,
}

impl OutlierArgs {
    pub fn options(&self, quiet: bool) -> Result<crate::outliers::Options> {
        let o = crate::outliers::Options {
            quantile: self.outlier_quantile,
            tau_factor: self.outlier_factor,
            min_share: self.min_share,
            max_per_column: self.max_selected,
            lambda: self.reg_lambda,
            delta: self.reg_delta,
            mode: if self.reg_mode == "shrink" {
                crate::outliers::Mode::Shrink { gamma: self.shrink_gamma }
            } else {
                crate::outliers::Mode::Solve
            },
            quiet,
        };
        o.validate()?;
        Ok(o)
    }
}

#[derive(Args, Debug)]
pub struct OutliersArgs {
    /// The float ONNX model
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub outlier: OutlierArgs,
    /// Machine-readable JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// No progress bar on stderr
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct RegularizeArgs {
    /// The float ONNX model
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Where to write the regularized float model
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Write the JSON report (every edited weight, float deviation) here
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub outlier: OutlierArgs,
    /// Write tensors to an external data file beside the model
    #[arg(long)]
    pub external_data: bool,
    /// No progress or summary on stderr
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_act(s: &str) -> std::result::Result<crate::quantize::params::ActType, String> {
    match s {
        "u8" | "uint8" => Ok(crate::quantize::params::ActType::U8),
        "s8" | "int8" => Ok(crate::quantize::params::ActType::S8),
        _ => Err(format!("'{s}' is not an activation type (u8 or s8)")),
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
    #[arg(long, default_value = "mse")]
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
pub struct EvalArgs {
    /// The reference model (usually the float original)
    pub reference: PathBuf,
    /// The candidate model (usually the quantized one)
    pub candidate: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Machine-readable JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Also compare every intermediate float tensor both models produce, and rank SQNR drops
    #[arg(long)]
    pub per_layer: bool,
    /// Write an SVG chart of per-layer SQNR (implies the per-layer comparison)
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// No progress bar on stderr
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
        Command::Quantize(a) => run_quantize(a),
        Command::Eval(a) => run_eval(a),
        Command::Outliers(a) => run_outliers(a),
        Command::Regularize(a) => run_regularize(a),
    }
}

fn run_eval(a: EvalArgs) -> Result<()> {
    use crate::eval;
    let reference = crate::onnx::load(&a.reference)?;
    let candidate = crate::onnx::load(&a.candidate)?;
    let opts = eval::EvalOptions { per_layer: a.per_layer || a.plot.is_some(), quiet: a.quiet };
    let report = eval::evaluate(&reference, &candidate, &a.data.options()?, &opts)?;
    if let Some(path) = &a.plot {
        eval::write_plot(path, &report)?;
    }
    let text =
        if a.json { serde_json::to_string_pretty(&report)? + "\n" } else { eval::render_text(&report, a.per_layer) };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn run_quantize(a: QuantizeArgs) -> Result<()> {
    use crate::pipeline::{self, PipelineOptions};
    use crate::quantize::QuantOptions;
    let has_data = !a.data.data.is_empty() || a.data.random.is_some();
    let opts = PipelineOptions {
        quant: QuantOptions {
            preset: a.preset,
            per_channel: !a.per_tensor,
            activations: a.activations,
            op_types: (!a.op_types.is_empty()).then(|| a.op_types.clone()),
            exclude_op_types: a.exclude_op_types.clone(),
            exclude: a.exclude.clone(),
            weights_only: a.weights_only,
            keep_float: Default::default(),
            method: a.method.to_string(),
            hessians: None,
            equalize: !a.no_equalize && !a.weights_only && !a.dynamic && a.stats.is_none(),
        },
        gptq: a.weight_rounding == "gptq",
        method: a.method.clone(),
        data: if has_data { Some(a.data.options()?) } else { None },
        stats: a.stats.clone(),
        keep_float: a.keep_float,
        bias_correction: a.bias_correction,
        input_grid: !a.no_input_grid,
        keep_float_samples: a.keep_float_samples.max(1),
        save: crate::onnx::SaveOptions { external: a.external_data, threshold: None },
        quiet: a.quiet,
        dynamic: a.dynamic,
        // Implicitly auto when there is calibration data to measure with and no --stats.
        regularize: match a.regularize {
            Some(r) => r,
            None if has_data && a.stats.is_none() && !a.weights_only && !a.dynamic => crate::outliers::Regularize::Auto,
            None => crate::outliers::Regularize::Off,
        },
        outlier: a.outlier.options(a.quiet)?,
    };
    let report = pipeline::run(&a.model, &a.output, &opts)?;
    if let Some(p) = &a.report {
        let json = serde_json::to_string_pretty(&report)? + "\n";
        crate::onnx::io::write_atomic(p, |w| w.write_all(json.as_bytes()).map_err(Into::into))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if !a.quiet {
        if let Some(n) = &report.opset_upgrade {
            eprintln!("{n}");
        }
        if let Some(r) = &report.regularization {
            eprint!("{}", crate::outliers::render_report(r));
        }
        eprint!("{}", crate::quantize::summary(&report.quantization));
        for k in &report.kept_float {
            eprintln!("kept float: {} (alone it costs the output {:.1} dB)", k.tensor, k.sqnr_db);
        }
        eprintln!("wrote {} in {:.2} s", a.output.display(), report.seconds);
    }
    Ok(())
}

fn run_calibrate(a: CalibrateArgs) -> Result<()> {
    use crate::calibrate::{self as cal, Target};
    if a.bins < 16 || !a.bins.is_multiple_of(2) {
        anyhow::bail!("--bins must be an even number of at least 16, got {}", a.bins);
    }
    let model = crate::onnx::load_valid(&a.model)?;
    let graph = model.proto.graph.as_ref().context("the model has no graph")?;
    let view = crate::onnx::GraphView::new(graph);
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
                Ok(all.iter().find(|x| &x.name == t).cloned().unwrap_or(Target {
                    name: t.clone(),
                    channel_axis: None,
                    same_values_as: None,
                    concat_of: Vec::new(),
                    channel_stats: false,
                }))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let specs = cal::input_specs(graph);
    let set = crate::data::open(&specs, &a.data.options()?)
        .with_context(|| format!("no calibration samples for {}", a.model.display()))?;
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

fn run_outliers(a: OutliersArgs) -> Result<()> {
    let opts = a.outlier.options(a.quiet)?;
    let model = crate::onnx::load_valid(&a.model)?;
    let label = a.model.display().to_string();
    let analysis = crate::outliers::analyze(&model.proto, &label, &a.data.options()?, &opts)
        .with_context(|| format!("outlier analysis of {label} failed"))?;
    let text = if a.json {
        serde_json::to_string_pretty(&analysis)? + "\n"
    } else {
        crate::outliers::render_analysis(&analysis)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn run_regularize(a: RegularizeArgs) -> Result<()> {
    let opts = a.outlier.options(a.quiet)?;
    let model = crate::onnx::load_valid(&a.model)?;
    crate::onnx::refuse_overwrite(&a.model, &a.output)?;
    let label = a.model.display().to_string();
    let run = crate::outliers::RunSettings {
        guard: None,
        measure_float: true,
        full_edits: true,
        placement: None,
        label: label.clone(),
        samples: None,
    };
    let outcome = crate::outliers::regularize(&model.proto, &a.data.options()?, &opts, &run)
        .with_context(|| format!("regularization of {label} failed"))?;
    let save = crate::onnx::SaveOptions { external: a.external_data, threshold: None };
    crate::onnx::save(&outcome.model, &a.output, &save)?;
    let report = serde_json::json!({
        "model": label,
        "output": a.output.display().to_string(),
        "regularization": outcome.report,
    });
    if let Some(p) = &a.report {
        let json = serde_json::to_string_pretty(&report)? + "\n";
        crate::onnx::io::write_atomic(p, |w| w.write_all(json.as_bytes()).map_err(Into::into))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if !a.quiet {
        eprint!("{}", crate::outliers::render_report(&outcome.report));
        eprintln!("wrote {}", a.output.display());
    }
    Ok(())
}

fn run_dump(a: DumpArgs) -> Result<()> {
    let model = crate::onnx::load_valid(&a.model)?;
    let d = dump::build(&model, &dump::DumpOptions { weights: a.weights, nodes: a.nodes })?;
    let text = if a.json { serde_json::to_string_pretty(&d)? + "\n" } else { dump::render_text(&d) };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
