//! The `onnxq` binary: parses arguments, runs the command, prints the error chain on failure.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
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
