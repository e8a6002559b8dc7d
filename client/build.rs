//! Compiles coffre's proto (the workspace's `proto/`) with protox (pure
//! Rust, no system protoc): the client side only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/coffre");
    let fds = protox::compile(["coffre/v1/coffre.proto"], ["../proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        // Messages that carry clear data keys get no Debug at all: the
        // module is private and nothing here prints them.
        .skip_debug([
            "coffre.v1.GenerateDataKeyResponse",
            "coffre.v1.EncryptRequest",
            "coffre.v1.DecryptResponse",
            "coffre.v1.GeneratedDataKey",
            "coffre.v1.BatchGenerateDataKeyResponse",
            "coffre.v1.BatchDecryptResult",
            "coffre.v1.BatchDecryptResponse",
        ])
        .compile_fds(fds)?;
    Ok(())
}
