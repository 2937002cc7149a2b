//! `promo-fanout state dump`: the store as JSON lines, readable while `run`
//! holds it.

use std::io::Write;
use std::path::Path;

use promo_fanout_state::{Store, Table};

/// Prints every entry of `table` (or of every table) to `out`, one JSON
/// object per line.
pub fn dump(state_dir: &Path, table: Option<&str>, out: &mut impl Write) -> anyhow::Result<u64> {
    let tables: Vec<Table> = match table {
        None => Table::ALL.to_vec(),
        Some(name) => vec![Table::from_name(name).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown table {name:?}; the tables are {}",
                Table::ALL.map(Table::name).join(", ")
            )
        })?],
    };
    if !state_dir.join("CURRENT").exists() {
        anyhow::bail!(
            "no state store at {}: run the service first, or pass --state-dir",
            state_dir.display()
        );
    }
    // A secondary instance reads beside a running primary without its lock.
    let scratch = tempfile::tempdir()?;
    let store = Store::open_secondary(state_dir, scratch.path())?;
    let mut n = 0;
    for t in tables {
        for entry in store.dump(t) {
            serde_json::to_writer(&mut *out, &entry?)?;
            out.write_all(b"\n")?;
            n += 1;
        }
    }
    out.flush()?;
    Ok(n)
}
