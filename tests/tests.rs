//! The single integration-test binary: each module runs the built `onnxq` binary on the
//! checked-in fixtures.

mod calibrate;
mod dump;
mod dynamic;
mod eval;
mod fixtures;
mod hostile;
mod outliers;
mod quantize;
mod util;
