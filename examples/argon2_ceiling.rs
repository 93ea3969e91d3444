//! The argon2 ceiling of this machine: hashes per second with every core
//! hashing at the service's parameters (m = 19 MiB, t = 2, p = 1) and
//! nothing else running. A replica cannot sign users up faster than this;
//! `loadtest/read-bench` runs it beside its signup run.
//!
//!     cargo run --release --example argon2_ceiling -- [SECONDS] [THREADS]

use std::time::{Duration, Instant};

use argon2::{Algorithm, Argon2, Block, Params, Version};
use cohort::auth::{ARGON2_M_KIB, ARGON2_P, ARGON2_T};

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().map_or(5.0, |s| s.parse().expect("SECONDS"));
    let threads: usize = args.next().map_or_else(
        || std::thread::available_parallelism().map_or(2, |n| n.get()),
        |s| s.parse().expect("THREADS"),
    );
    let params = Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None).expect("valid parameters");
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let params = params.clone();
            std::thread::spawn(move || {
                let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
                let mut area = vec![Block::default(); params.block_count()];
                let mut out = [0u8; 32];
                let mut n = 0u64;
                while Instant::now() < until {
                    argon
                        .hash_password_into_with_memory(
                            b"correct horse battery staple",
                            b"saltsaltsaltsalt",
                            &mut out,
                            &mut area[..],
                        )
                        .expect("argon2 hashing works");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{{\"threads\": {threads}, \"hashes\": {total}, \"seconds\": {elapsed:.3}, \"per_second\": {:.1}, \"ms_per_hash_per_thread\": {:.2}}}",
        total as f64 / elapsed,
        elapsed * 1e3 * threads as f64 / total as f64
    );
}
