//! Compiles `kiam.proto` with a pure-Rust protobuf compiler (no `protoc` needed).

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-changed=kiam.proto");
    let descriptors = protox::compile(["kiam.proto"], ["."])?;
    tonic_prost_build::configure()
        // Written by hand in lib.rs, without the secrets.
        .skip_debug(["kiam.v1.Credentials"])
        .compile_fds(descriptors)?;
    Ok(())
}
