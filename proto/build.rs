//! Compiles `proto/*.proto` with protox (pure Rust, no `protoc`) and tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/consync.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Packed flow records arrive as one buffer: share it instead of copying it.
        .bytes(".ferrolb.consync.v1.SyncBatch.packed_snapshot")
        .bytes(".ferrolb.consync.v1.SyncBatch.packed_changes")
        .compile_fds(fds)?;
    Ok(())
}
