//! Calibration cost against plain inference: `cargo run --release --example bench_calibrate --
//! MODEL DATA [DATA ...]`. Runs the samples once through a tract plan that returns only the
//! graph outputs, then through a plan that hands over every default target calibration pins
//! (those not sharing another's statistics), without statistics (`watch`: what keeping them
//! unfused costs tract), then calibrates every default target
//! (statistics + histograms), all on the same samples with the same threading. Then it
//! calibrates what `onnxq quantize` calibrates: the targets its default placement reads a
//! range of, on the model as the pipeline has it when it calibrates
//! ([`onnxq::pipeline::calibration_model`] of the prepared model: opset upgrade, input grid),
//! also run plainly for comparison (`staged_plain_*`), and through a plan that hands over its
//! targets without statistics (`quantize_watch_*`). Then `ROUNDS` (5 by default) alternated
//! rounds of a plain run and the quantize calibration (`rounds_*`). One JSON line with the
//! times and ratios. `ratio` and `cpu_ratio` (every default target) are against the first
//! plain run; `quantize_ratio` and `quantize_cpu_ratio` are the medians over the rounds of
//! the calibration against the plain run right before it: this VM's speed drifts.
//! Wall time and the process's CPU time (user + system, from /proc/self/stat; 0 where that
//! is unavailable) are given for each; on a busy machine the CPU ratio is the fair one.

use anyhow::{Context, Result};
use onnxq::calibrate::{self as cal, for_each_sample, input_facts, input_specs};
use onnxq::outliers::cpu_seconds;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model_path, data) = args.split_first().context("usage: bench_calibrate MODEL DATA [DATA ...]")?;
    let model = onnxq::onnx::load(std::path::Path::new(model_path))?;
    let g = model.proto.graph.as_ref().context("no graph")?;
    let specs = input_specs(g);
    let opts = onnxq::data::DataOptions {
        sources: data.iter().map(|d| onnxq::data::Source::Path(d.into())).collect(),
        ..Default::default()
    };
    let set = onnxq::data::open(&specs, &opts)?;
    let bytes = cal::model_bytes(&model)?;
    let outputs: Vec<String> = g.output.iter().map(|o| o.name().to_string()).collect();

    let (t0, c0) = (Instant::now(), cpu_seconds());
    let plan = onnxq::runtime::Plan::load(&bytes, None, &input_facts(&specs, &set)?, &outputs)?;
    let load_plain = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for_each_sample(&plan, &set, &indicatif::ProgressBar::hidden(), |_, _| Ok(()), |_, _| Ok(()))?;
    let plain = t1.elapsed().as_secs_f64();
    let plain_cpu = cpu_seconds() - c0;

    let targets = cal::default_targets(&onnxq::onnx::GraphView::new(g))?;
    // The same samples through a plan that reports every tensor calibration pins (the targets
    // that do not share another target's statistics) but computes no statistics: what keeping
    // them from being fused costs tract itself.
    let names: Vec<String> = cal::pinned_targets(&targets).iter().map(|t| t.name.clone()).collect();
    let (watch, watch_cpu) = timed_run(&bytes, &specs, &set, &names, true)?;
    let (t2, c2) = (Instant::now(), cpu_seconds());
    let c = cal::calibrate(&bytes, &specs, &set, &targets, &cal::CalibOptions::default())?;
    let calib = t2.elapsed().as_secs_f64();
    let calib_cpu = cpu_seconds() - c2;
    drop(plan);
    // What `quantize` calibrates: the tensors its default placement reads a range of, on the
    // model the pipeline calibrates.
    // (per-channel statistics of the tensors equalization may rescale included, as the CLI's
    // default has it)
    let mut qopts = onnxq::quantize::QuantOptions { equalize: true, ..Default::default() };
    let (prepared, _) = onnxq::quantize::prepare::prepare(&model.proto)?;
    let staged = onnxq::pipeline::calibration_model(prepared, &mut qopts, Some(&opts), true, true, &mut |_| {})?;
    let qtargets = cal::quantization_targets(&staged.model, &qopts)?;
    let sbytes = onnxq::onnx::io::encode_for_runtime(&staged.model)?;
    let (sspecs, sset) = {
        let sg = staged.model.graph.as_ref().context("no graph")?;
        let sspecs = input_specs(sg);
        let sset = onnxq::data::open(&sspecs, &opts)?;
        (sspecs, sset)
    };
    let (splain, splain_cpu) = timed_run(&sbytes, &sspecs, &sset, &outputs, false)?;
    let qnames: Vec<String> = cal::pinned_targets(&qtargets).iter().map(|t| t.name.clone()).collect();
    let (swatch, swatch_cpu) = timed_run(&sbytes, &sspecs, &sset, &qnames, true)?;
    // Alternated rounds of (plain run, quantize calibration): this VM's speed drifts within
    // minutes (PP-OCR det's quantize calibration took 6.0 s and 7.5 s two rounds apart in one
    // process, with plain runs of 4.5 s before each), so each round's ratio divides by the
    // plain run right before it, and the `quantize_*` ratios are the medians over the rounds
    // (`ROUNDS`, 5 by default).
    let rounds: usize = match std::env::var("ROUNDS") {
        Ok(v) => v.parse().with_context(|| format!("ROUNDS={v} is not a count"))?,
        Err(_) => 5,
    };
    let (mut per_round, mut qtensors) = (Vec::new(), 0);
    for _ in 0..rounds.max(1) {
        let (plain2, plain2_cpu) = timed_run(&bytes, &specs, &set, &outputs, false)?;
        let (t4, c4) = (Instant::now(), cpu_seconds());
        let q = cal::calibrate(&sbytes, &sspecs, &sset, &qtargets, &cal::CalibOptions::default())?;
        let (qcalib, qcalib_cpu) = (t4.elapsed().as_secs_f64(), cpu_seconds() - c4);
        qtensors = q.tensors.len();
        per_round.push([plain2, plain2_cpu, qcalib, qcalib_cpu]);
    }
    let median = |f: &dyn Fn(&[f64; 4]) -> f64| {
        let mut v: Vec<f64> = per_round.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let m = v.len() / 2;
        if v.len() % 2 == 1 {
            v[m]
        } else {
            (v[m - 1] + v[m]) / 2.0
        }
    };
    let ratio_of = |r: &[f64; 4]| r[2] / r[0];
    let cpu_ratio_of = |r: &[f64; 4]| r[3] / r[1].max(1e-9);
    let list =
        |f: &dyn Fn(&[f64; 4]) -> f64| per_round.iter().map(|r| format!("{:.3}", f(r))).collect::<Vec<_>>().join(", ");
    let qpinned = qnames.len();
    println!(
        "{{\"model\": \"{model_path}\", \"samples\": {}, \"tensors\": {}, \"pinned\": {}, \"plain_load_s\": {load_plain:.3}, \"plain_run_s\": {plain:.3}, \"watch_s\": {watch:.3}, \"watch_cpu_s\": {watch_cpu:.2}, \"calibrate_s\": {calib:.3}, \"ratio\": {:.3}, \"plain_cpu_s\": {plain_cpu:.2}, \"calibrate_cpu_s\": {calib_cpu:.2}, \"cpu_ratio\": {:.3}, \"staged_plain_s\": {splain:.3}, \"staged_plain_cpu_s\": {splain_cpu:.2}, \"quantize_tensors\": {qtensors}, \"quantize_pinned\": {qpinned}, \"quantize_watch_s\": {swatch:.3}, \"quantize_watch_cpu_s\": {swatch_cpu:.2}, \"rounds_plain_s\": [{}], \"rounds_plain_cpu_s\": [{}], \"rounds_quantize_calibrate_s\": [{}], \"rounds_quantize_calibrate_cpu_s\": [{}], \"rounds_quantize_ratio\": [{}], \"quantize_ratio\": {:.3}, \"quantize_cpu_ratio\": {:.3}, \"threads\": {}}}",
        set.len(),
        c.tensors.len(),
        names.len(),
        calib / (load_plain + plain),
        calib_cpu / plain_cpu.max(1e-9),
        list(&|r| r[0]),
        list(&|r| r[1]),
        list(&|r| r[2]),
        list(&|r| r[3]),
        list(&ratio_of),
        median(&ratio_of),
        median(&cpu_ratio_of),
        rayon::current_num_threads()
    );
    Ok(())
}

/// (wall s, CPU s) of loading a plan that returns the tensors `names` and running the
/// samples through it: as copies (`Plan::run`, what plain inference returns), or `in_place`
/// as views handed over and dropped, no statistics (`watch`: what keeping them from being
/// fused costs tract itself).
fn timed_run(
    bytes: &[u8],
    specs: &[onnxq::data::InputSpec],
    set: &onnxq::data::SampleSet,
    names: &[String],
    in_place: bool,
) -> Result<(f64, f64)> {
    let (t, c) = (Instant::now(), cpu_seconds());
    let plan = onnxq::runtime::Plan::load(bytes, None, &input_facts(specs, set)?, names)?;
    let hidden = indicatif::ProgressBar::hidden();
    if in_place {
        cal::for_each_sample_with(set, &hidden, |_, x| plan.run_visit_f32(x, |_, _| ()), |_, _| Ok(()))?;
    } else {
        for_each_sample(&plan, set, &hidden, |_, _| Ok(()), |_, _| Ok(()))?;
    }
    Ok((t.elapsed().as_secs_f64(), cpu_seconds() - c))
}
