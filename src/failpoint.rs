//! Named points in the signup protocol where a test can make the process
//! die, as a crash or SIGKILL would: `COHORT_FAILPOINTS=signup:committed`
//! aborts the process the first time a signup reaches that point. Read once
//! at start; unset (always, outside tests) it costs one load per point.
//!
//! Points: `signup:decided` (after the decision, before the transaction),
//! `signup:in-transaction` (after the inserts, before COMMIT),
//! `signup:committed` (after COMMIT, before the index add),
//! `signup:published` (after the add, before the answer).
//!
//! `NAME=panic` (`COHORT_FAILPOINTS=signup:decided=panic`) panics there
//! instead: the request fails, the process goes on (to test how panics are
//! logged).

use std::sync::OnceLock;

static ARMED: OnceLock<Vec<String>> = OnceLock::new();

fn armed() -> &'static [String] {
    ARMED.get_or_init(|| {
        std::env::var("COHORT_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Aborts the process if `name` is armed (panics if armed `=panic`).
pub fn hit(name: &str) {
    for p in armed() {
        if p == name {
            eprintln!("cohort: failpoint {name} reached: aborting");
            std::process::abort();
        }
        if p.strip_suffix("=panic") == Some(name) {
            panic!("failpoint {name} reached");
        }
    }
}
