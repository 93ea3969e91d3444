//! Build script: records the git commit the binary was built from, for
//! `cohort -V` and the `cohort_build_info` metric. Outside a git checkout
//! (a source tarball, the Docker build context), COHORT_GIT_COMMIT may give
//! it; else it is "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=COHORT_GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    // The migrations are embedded at compile time: a new file must rebuild.
    println!("cargo:rerun-if-changed=migrations");
    let commit = std::env::var("COHORT_GIT_COMMIT").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    println!(
        "cargo:rustc-env=COHORT_GIT_COMMIT={}",
        commit
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "unknown".into())
    );
}
