//! The `onnxq` binary: parses arguments, runs the command, prints the error chain on failure.
//! It also sets up the allocator for a calibration-shaped workload ([`one_malloc_arena`]) and
//! keeps errors from capturing backtraces nobody prints ([`no_error_backtraces`]).

use clap::Parser;
use std::process::ExitCode;

/// One glibc malloc arena for the whole process (unless `MALLOC_ARENA_MAX` says otherwise).
/// By default glibc gives threads that allocate at the same time arenas of their own, and
/// memory freed in an arena is reused only from it: each worker's freed per-sample
/// activations then stay resident beside the others'. Measured peak RSS of `quantize`
/// (2 threads): MiniLM-L6 294–364 → 251 MB, PP-OCR det 653–680 → 581–595 MB, in the same
/// time (runtime ops allocate per node, not per element).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn one_malloc_arena() {
    use std::ffi::c_int;
    /// glibc's `M_ARENA_MAX` parameter number (malloc.h).
    const M_ARENA_MAX: c_int = -8;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: glibc's mallopt only sets an allocator parameter; this runs before any
        // other thread exists.
        unsafe {
            mallopt(M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() {}

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
    one_malloc_arena();
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
