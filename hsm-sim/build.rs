//! Compiles proto/hsm_sim/v1 with protox (pure Rust, no system protoc) and
//! generates the tonic client and services with tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/hsm_sim");
    let fds = protox::compile(["hsm_sim/v1/hsm_sim.proto"], ["../proto"])?;
    tonic_prost_build::configure()
        // Messages carrying PINs, plaintext key material or random bytes get
        // a hand-written, redacted Debug (src/proto.rs).
        .skip_debug([
            "hsm_sim.v1.LoginRequest",
            "hsm_sim.v1.WrapRequest",
            "hsm_sim.v1.UnwrapResponse",
            "hsm_sim.v1.GenerateRandomResponse",
            "hsm_sim.v1.SealWithObjectRequest",
            "hsm_sim.v1.OpenWithObjectResponse",
        ])
        .compile_fds(fds)?;
    Ok(())
}
