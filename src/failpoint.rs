//! Crash-test hooks: named points in the code where a test can make the process die as
//! `kill -9` would, to prove that a run killed there loses nothing (`tests/kill_resume.rs`).
//!
//! `VAECUDA_FAILPOINT=name` aborts the process the first time the point `name` is reached;
//! `name@N` the N-th time. Without the variable a point costs one relaxed load. The points:
//!
//! | name | where |
//! |---|---|
//! | `half-written` | [`crate::checkpoint::write_atomic`], half of a file's bytes written to its `.tmp` |
//! | `metrics-written` | `vae train`, after an epoch's metrics.csv, before its checkpoint |
//! | `state-written` | after the training state (the commit point), before last.safetensors |
//! | `last-written` | after last.safetensors, before best.safetensors |
//! | `epoch-saved` | after all of an epoch's files |

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The variable that arms a failpoint.
pub const ENV: &str = "VAECUDA_FAILPOINT";

/// The armed point and at which hit it fires, read once from [`ENV`].
fn armed() -> &'static Option<(String, u64)> {
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let v = std::env::var(ENV).ok()?;
        match v.split_once('@') {
            Some((name, n)) => Some((name.to_string(), n.parse().ok()?)),
            None => Some((v, 1)),
        }
    })
}

/// Dies here, without unwinding, flushing or cleaning up, if [`ENV`] names this point and
/// this is the hit it asks for.
pub fn hit(name: &str) {
    let Some((armed_name, at)) = armed() else { return };
    if armed_name != name {
        return;
    }
    static HITS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
    let mut hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
    let n = hits.get_or_insert_with(HashMap::new).entry(name.to_string()).or_insert(0);
    *n += 1;
    if *n == *at {
        eprintln!("failpoint {name}@{at}: aborting");
        std::process::abort();
    }
}
