//! The pinned state under the bpffs directory: its layout version, the
//! agent's heartbeat, link re-pinning, and removal (`mesh-agent uninstall`).
use std::path::Path;

use aya::{
    maps::{Array, MapData},
    programs::links::{FdLink, PinnedLink},
};
use mesh_common::{Config, MAP_LAYOUT_VERSION, maps};

use super::{RedirectError, monotonic_ns};

/// The layout version of the pins in `dir`: None when nothing is pinned,
/// 0 when an agent created the maps but never configured them, u32::MAX
/// when `mesh_config` is unreadable (another layout, whatever it says).
pub fn pinned_layout(dir: &Path) -> Option<u32> {
    pinned_config(dir).map(|c| c.map_or(u32::MAX, |c| c.layout_version))
}

fn pinned_config(dir: &Path) -> Option<Option<Config>> {
    let path = dir.join(maps::CONFIG);
    if !path.exists() {
        return None;
    }
    Some(
        MapData::from_pin(&path)
            .ok()
            .and_then(|data| Array::<MapData, Config>::try_from(aya::maps::Map::Array(data)).ok())
            .and_then(|arr| arr.get(&0, 0).ok()),
    )
}

/// The policy the pinned programs enforce (mode, generation), when the
/// pins are of this layout: a starting agent keeps it in force until its
/// own first policy replaces it, so no restart ever opens the mesh.
pub(super) fn pinned_policy(dir: &Path) -> Option<(u8, u32)> {
    match pinned_config(dir) {
        Some(Some(c)) if c.layout_version == MAP_LAYOUT_VERSION => Some((c.policy_mode, c.policy_generation)),
        _ => None,
    }
}

/// Whether an agent's heartbeat in the pinned `mesh_config` is current.
pub fn agent_alive(dir: &Path) -> bool {
    matches!(pinned_config(dir), Some(Some(c)) if c.layout_version == MAP_LAYOUT_VERSION && c.alive_until_ns > monotonic_ns())
}

/// Removes every pin in `dir` (maps and links) and the directory. With no
/// process holding them, that detaches the programs and frees the maps:
/// pods' traffic then flows unmeshed. Returns the names removed.
pub fn remove_pins(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        std::fs::remove_file(entry.path())?;
        removed.push(entry.file_name().to_string_lossy().to_string());
    }
    std::fs::remove_dir(dir)?;
    removed.sort();
    Ok(removed)
}

/// Pins of an older map layout are replaced, and the agent says so; pins
/// of a newer one (a downgrade) are refused (see `MAP_LAYOUT_VERSION`).
pub(super) fn check_pinned_layout(dir: &Path) -> Result<(), RedirectError> {
    let found = match pinned_layout(dir) {
        None | Some(0) => return Ok(()),
        Some(v) if v == MAP_LAYOUT_VERSION => return Ok(()),
        Some(v) => v,
    };
    if found < MAP_LAYOUT_VERSION {
        tracing::warn!(
            dir = %dir.display(),
            pinned_layout = found,
            layout = MAP_LAYOUT_VERSION,
            "pinned maps and programs have an older layout: replacing them (connections spliced by the old programs fall back to TCP; new connects use the new ones)"
        );
        let removed = remove_pins(dir).map_err(|e| RedirectError::Pin(dir.into(), e.to_string()))?;
        tracing::info!(removed = ?removed, "old pins removed");
        std::fs::create_dir_all(dir).map_err(|e| RedirectError::Pin(dir.into(), e.to_string()))?;
        return Ok(());
    }
    Err(RedirectError::IncompatiblePins {
        dir: dir.into(),
        found,
        ours: MAP_LAYOUT_VERSION,
    })
}

/// Pins a fresh link at `pin`, replacing whatever link was pinned there.
pub(super) fn repin(link: FdLink, pin: &Path) -> Result<PinnedLink, RedirectError> {
    let pinned_id = PinnedLink::from_pin(pin).ok().and_then(|p| link_id(&FdLink::from(p)));
    if pinned_id.is_some() && pinned_id == link_id(&link) {
        // The adopted link itself: already pinned at that path.
        return PinnedLink::from_pin(pin).map_err(|e| RedirectError::Pin(pin.into(), e.to_string()));
    }
    let _ = std::fs::remove_file(pin);
    link.pin(pin).map_err(|e| RedirectError::Pin(pin.into(), e.to_string()))
}

fn link_id(link: &FdLink) -> Option<u32> {
    link.info().ok().map(|i| i.id())
}

/// Unpins and closes an old link, which detaches it.
pub(super) fn release(old: Option<PinnedLink>) {
    if let Some(old) = old {
        match old.unpin() {
            Ok(fd) => drop(fd),
            Err(e) => tracing::warn!(error = %e, "could not unpin an old link"),
        }
    }
}
