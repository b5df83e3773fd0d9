//! onnxq: turns a float ONNX model into an int8 QDQ model that ONNX Runtime and tract run
//! with int8 kernels.
//!
//! Pipeline: ONNX bytes → [`onnx`] (prost `ModelProto`, graph view) → calibration through
//! tract ([`runtime`]) with streaming statistics ([`stats`]) → outlier detection and weight
//! regularization → QuantizeLinear/DequantizeLinear insertion → ONNX bytes.
pub mod array;
pub mod background;
pub mod calibrate;
pub mod cli;
pub mod data;
pub mod dump;
pub mod eval;
pub mod fakequant;
pub mod fixtures;
pub mod im2col;
pub mod linalg;
pub mod npy;
pub mod onnx;
pub mod outliers;
pub mod pipeline;
pub mod quantize;
pub mod rng;
pub mod runtime;
pub mod stats;
