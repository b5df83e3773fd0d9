//! The ONNX model representation: prost types generated from the vendored `proto/onnx.proto`
//! (proto2, so re-encoding is byte-identical), loading and saving with external data,
//! typed attribute access, tensor conversion, a read-only graph view and builder helpers.

pub mod pb {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub mod attr;
pub mod builder;
pub mod graph;
pub mod io;
pub mod tensor;

pub use attr::{describe, NodeAttrs};
pub use graph::{GraphView, NameAlloc};
pub use io::{load, load_valid, refuse_overwrite, save, Model, SaveOptions};
