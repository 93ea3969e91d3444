//! The configuration reference in the repository (`docs/configuration.md`)
//! and the binary's `--help` name the same variables.

use std::collections::BTreeSet;
use std::process::Command;

fn env_vars(text: &str, start: &str) -> BTreeSet<String> {
    text.split(start)
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[test]
fn the_configuration_reference_matches_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["serve", "--help"])
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let in_help = env_vars(&help, "[env: ");
    assert!(in_help.len() > 20, "{in_help:?}");
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    // Every variable of --help is documented...
    let in_doc = env_vars(&doc, "`");
    let missing: Vec<_> = in_help.difference(&in_doc).collect();
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
    // ...and every variable the reference's tables name exists.
    let tabled: BTreeSet<String> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| env_vars(l.split(" | ").next().unwrap_or(""), "`"))
        .collect();
    let unknown: Vec<_> = tabled.difference(&in_help).collect();
    assert!(
        unknown.is_empty(),
        "documented but not in --help: {unknown:?}"
    );
}
