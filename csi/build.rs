//! Generates the CSI gRPC services from the vendored `proto/csi.proto` (see `proto/SOURCE.md`), compiled by protox
//! (pure Rust: no system `protoc` is needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let descriptors = protox::compile(["proto/csi.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
