//! Changing the log filter at run time (admin API `PUT /logging`). The
//! binary installs a setter when it builds its subscriber; library users
//! without one get a clear refusal.
use std::sync::OnceLock;

type Setter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static SETTER: OnceLock<Setter> = OnceLock::new();

pub fn install(setter: Setter) {
    let _ = SETTER.set(setter);
}

pub fn set_filter(filter: &str) -> Result<(), String> {
    let setter = SETTER.get().ok_or("this process cannot change its log filter")?;
    setter(filter)
}
