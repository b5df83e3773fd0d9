//! The `onnxq` binary: parses arguments, runs the command, prints the error chain on failure.
//! It also sets up the allocator for a calibration-shaped workload ([`tune_malloc`]) and
//! keeps errors from capturing backtraces nobody prints ([`no_error_backtraces`]).

use clap::Parser;
use std::process::ExitCode;

/// glibc's allocator set up for a calibration-shaped workload (each parameter only when the
/// environment does not set it, `MALLOC_*_` or `GLIBC_TUNABLES`):
///
/// - **One arena for the whole process.** By default glibc gives threads that allocate at the
///   same time arenas of their own, and memory freed in an arena is reused only from it: each
///   worker's freed per-sample activations then stay resident beside the others'. Measured
///   peak RSS of `quantize` (2 threads): MiniLM-L6 294–364 → 251 MB, PP-OCR det 653–680 →
///   581–595 MB, in the same time (runtime ops allocate per node, not per element).
/// - **Blocks under 32 MB come from the heap, and up to 32 MB of free heap is kept.** glibc's
///   default serves blocks from 128 KB up with their own `mmap` (raising that bound only as
///   such blocks are freed) and gives free heap back above 128 KB, so the per-sample
///   activations, Gram rows and statistics of every sample were mapped, faulted in page by
///   page and unmapped again (with TLB shootdowns on the other core). Measured in 6
///   alternated runs: MiniLM-L6 3.02 → 2.74 s, system time 0.58 → 0.39 s; PP-OCR det
///   8.19 → 7.53 s, 0.67 → 0.35 s. With 8 MB of free heap kept, PP-OCR det's two workers
///   still gave back and faulted in again up to a 20 MB activation at a time: 32 MB took its
///   system time from 1.04 to 0.47 s (median of 4 alternated runs; peak RSS 550 and 518 MB),
///   and MiniLM-L6's run was unchanged (8, 32, 64 MB: 0.44–0.46 s of system time). Weights
///   and other blocks of 32 MB and more are still mapped and returned when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    use std::ffi::c_int;
    // glibc's mallopt parameter numbers (malloc.h).
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_THRESHOLD: c_int = -3;
    const M_ARENA_MAX: c_int = -8;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let unset = |var: &str, tunable: &str| std::env::var_os(var).is_none() && !tunables.contains(tunable);
    for (param, value, var, tunable) in [
        (M_ARENA_MAX, 1, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
        (M_MMAP_THRESHOLD, 32 << 20, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
        (M_TRIM_THRESHOLD, 32 << 20, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    ] {
        if unset(var, tunable) {
            // SAFETY: glibc's mallopt only sets an allocator parameter; this runs before any
            // other thread exists.
            unsafe {
                mallopt(param, value);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// Errors do not capture a backtrace unless `RUST_LIB_BACKTRACE` asks for it. The binary
/// prints an error as its context chain, never its backtrace, but with `RUST_BACKTRACE=1` in
/// the environment (common on developer machines) `anyhow` captures one for every error
/// created, and tract's optimizer creates and discards errors while it simplifies a graph
/// (`Tensor::close_enough` in its declutter passes): about 35 ms of CPU time per MiniLM-L6
/// `quantize`, most of it in plan loads no other work overlaps. Panics keep their backtraces
/// (`RUST_BACKTRACE` still governs those).
fn no_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Runs first in `main`, before any other thread exists (set_var is not thread safe).
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

fn main() -> ExitCode {
    no_error_backtraces();
    tune_malloc();
    let cli = onnxq::cli::Cli::parse();
    match onnxq::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
