//! The command-line verbs other than `run`: each a client of a running
//! agent (`status`, `audit`), the CA (`ca`), or a one-shot tool (`policy
//! check`, `crds`, `uninstall`). `main.rs` dispatches to them.
pub mod audit;
pub mod ca;
pub mod policy;
pub mod status;
pub mod uninstall;

/// `mesh-agent crds DIR`: writes the SMI CRDs the agent reads.
pub fn write_crds(dir: &std::path::Path) -> std::io::Result<()> {
    let _ = std::fs::create_dir_all(dir);
    for (file, yaml) in crate::smi::crds() {
        std::fs::write(dir.join(file), yaml)
            .map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", dir.join(file).display())))?;
    }
    Ok(())
}
