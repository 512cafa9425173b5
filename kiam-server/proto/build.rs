//! Compiles `kiam.proto` with a pure-Rust protobuf compiler (no `protoc` needed).

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-changed=kiam.proto");
    let descriptors = protox::compile(["kiam.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
