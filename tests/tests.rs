//! The single integration-test binary: each module runs the built `onnxq` binary on the
//! checked-in fixtures.

mod calibrate;
mod dump;
mod eval;
mod fixtures;
mod quantize;
mod util;
