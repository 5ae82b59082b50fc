use which::which;

/// Rebuild when bpf-linker changes: cargo cannot express a dependency on a
/// binary (see aya-template for the long story).
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker not found on PATH: run ./run.sh setup (or see README.md, Setup)");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
