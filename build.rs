//! Generates the ONNX protobuf types from the vendored `proto/onnx.proto` with
//! prost-build, using the pure-Rust `protox` compiler so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let fds = protox::compile(["proto/onnx.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    // Tensor payloads are reference-counted slices of the input buffer, not copies.
    config.bytes([".onnx.TensorProto.raw_data"]);
    config.compile_fds(fds)?;
    Ok(())
}
