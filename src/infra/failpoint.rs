//! Fail points on the delivery order, compiled in only with the `failpoints`
//! feature, for the crash tests. `PROMO_FANOUT_FAILPOINTS=name=action;...`
//! arms them, with the actions of the `fail` crate; `return` aborts the
//! process on the spot, as `kill -9` would.

/// Marks a point where a crash test may stop the process.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::infra::failpoint::hit($name);
    };
}

/// Aborts the process if the fail point `name` is armed with `return`; other
/// actions of the `fail` crate (`sleep`, `pause`, `panic`) act as usual.
pub fn hit(name: &str) {
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("fail point {name}: aborting");
        std::process::abort();
    }
}

/// Arms the fail points named in the environment; a no-op without the feature.
pub fn setup() -> Result<(), String> {
    if !cfg!(feature = "failpoints") {
        return Ok(());
    }
    let Ok(spec) = std::env::var("PROMO_FANOUT_FAILPOINTS") else {
        return Ok(());
    };
    for entry in spec.split(';').filter(|s| !s.is_empty()) {
        let (name, action) = entry.split_once('=').ok_or_else(|| {
            format!("PROMO_FANOUT_FAILPOINTS: expected name=action, got {entry:?}")
        })?;
        fail::cfg(name, action).map_err(|e| format!("PROMO_FANOUT_FAILPOINTS: {name}: {e}"))?;
    }
    Ok(())
}
