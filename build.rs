//! Compiles proto/coffre/v1 with protox (pure Rust, no system protoc) and
//! generates the tonic services with tonic-prost-build; and sets the cfgs
//! that say which outside components the tests can use here (`build/needs.rs`).

use std::path::PathBuf;

#[path = "build/needs.rs"]
mod needs;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/coffre");
    for line in needs::build_script_lines(&|var| std::env::var(var).ok()) {
        println!("{line}");
    }
    let fds = protox::compile(["proto/coffre/v1/coffre.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Serialized descriptors, for server reflection.
    std::fs::write(
        out.join("coffre_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Maps (encryption contexts, labels) decode into the sorted maps
        // the core keeps them in: no hashing of each key on the way in, no
        // second map built from the first.
        .btree_map(".coffre.v1")
        // Messages carrying clear data keys or plaintexts, and those that
        // hold them, get a hand-written, redacted Debug (src/grpc/redact.rs,
        // whose test finds every such message in the descriptors).
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
