//! Builds the eBPF programs (mesh-ebpf) for the BPF target and leaves the
//! object in OUT_DIR, where `redirect` embeds it with `include_bytes_aligned!`.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Must match rust-toolchain.toml; the BPF build runs under `rustup run`.
const BPF_TOOLCHAIN: &str = "1.98.0";

fn main() -> anyhow::Result<()> {
    // Explicit: a script that prints any rerun-if-changed reruns only for those.
    println!("cargo:rerun-if-changed=proto");
    // The CA's gRPC API (protoc comes from Debian's protobuf-compiler).
    tonic_prost_build::compile_protos("proto/ca.proto").context("compiling proto/ca.proto (is protoc installed?)")?;
    tonic_prost_build::compile_protos("proto/audit.proto")
        .context("compiling proto/audit.proto (is protoc installed?)")?;
    tonic_prost_build::compile_protos("proto/tunnel.proto")
        .context("compiling proto/tunnel.proto (is protoc installed?)")?;
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "mesh-ebpf")
        .ok_or_else(|| anyhow!("mesh-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // A pinned stable toolchain needs RUSTC_BOOTSTRAP for `-Z build-std=core`.
    // Set it for the nested BPF build only, not for the agent's own crates.
    // SAFETY: build scripts are single-threaded.
    #[allow(clippy::disallowed_methods)]
    unsafe {
        std::env::set_var("RUSTC_BOOTSTRAP", "1")
    };
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(BPF_TOOLCHAIN))
}
