//! Changing the log filter at run time (admin API `PUT /logging`). The
//! binary installs a setter when it builds its subscriber; library users
//! without one get a clear refusal.
use std::sync::OnceLock;

/// Why a new log filter was not applied.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

type Setter = Box<dyn Fn(&str) -> Result<(), FilterError> + Send + Sync>;

static SETTER: OnceLock<Setter> = OnceLock::new();

pub fn install(setter: Setter) {
    let _ = SETTER.set(setter);
}

pub fn set_filter(filter: &str) -> Result<(), FilterError> {
    let setter = SETTER
        .get()
        .ok_or_else(|| FilterError("this process cannot change its log filter".into()))?;
    setter(filter)
}
