//! One argon2id hash at the service's parameters, timed alone (serial, one
//! thread): the bound of `cohort import` on plaintext passwords is
//! cores / this. `cargo run --release --example argon2_time [N]`.

use std::sync::Arc;
use std::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let hasher = cohort::auth::PasswordHasher::new(1, Arc::new(|_| {}));
    let p = cohort::domain::Password::parse("correct horse battery staple".into()).unwrap();
    hasher.hash(&p).await; // warm-up
    let started = Instant::now();
    for _ in 0..n {
        hasher.hash(&p).await;
    }
    let each = started.elapsed().as_secs_f64() / f64::from(n);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!(
        "one argon2id hash: {:.1} ms ({n} serial); {cores} cores: bound {:.0} hashes/s",
        each * 1e3,
        cores as f64 / each
    );
}
