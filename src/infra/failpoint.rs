//! Fail points on the delivery order, compiled in only with the `failpoints`
//! feature, for the crash tests. `PROMO_FANOUT_FAILPOINTS=name=action;...`
//! arms them, with the actions of the `fail` crate; `return` aborts the
//! process on the spot, as `kill -9` would.

use std::collections::HashSet;
use std::sync::OnceLock;

/// Marks a point where a crash test may stop the process.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::infra::failpoint::hit($name);
    };
}

/// The fail points the environment arms; every other one is passed at once.
static ARMED: OnceLock<HashSet<String>> = OnceLock::new();

/// Aborts the process if the fail point `name` is armed with `return`; other
/// actions of the `fail` crate (`sleep`, `pause`, `panic`) act as usual.
/// They block the thread, so on a worker of the runtime its other tasks (the
/// health server, the mirror, the deliveries) are handed to another worker
/// first, as they would go on running in a process merely slowed down.
pub fn hit(name: &str) {
    if !ARMED.get().is_some_and(|armed| armed.contains(name)) {
        return;
    }
    let eval = || fail::eval(name, |_| ()).is_some();
    let on_worker = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let abort = if on_worker {
        tokio::task::block_in_place(eval)
    } else {
        eval()
    };
    if abort {
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
    let mut armed = HashSet::new();
    for entry in spec.split(';').filter(|s| !s.is_empty()) {
        let (name, action) = entry.split_once('=').ok_or_else(|| {
            format!("PROMO_FANOUT_FAILPOINTS: expected name=action, got {entry:?}")
        })?;
        fail::cfg(name, action).map_err(|e| format!("PROMO_FANOUT_FAILPOINTS: {name}: {e}"))?;
        armed.insert(name.to_string());
    }
    ARMED
        .set(armed)
        .map_err(|_| "PROMO_FANOUT_FAILPOINTS: read twice".to_string())
}
