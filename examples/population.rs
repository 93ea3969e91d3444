//! Writes an import file of N synthetic users (JSON Lines, for `cohort
//! import`): the benchmarks' Zipf population (`benches/support/
//! population.rs`: five categories and two hobbies, 6-7 attributes a user),
//! seeded, so the same N gives the same file.
//!
//!     cargo run --release --example population -- 1000000 > users.jsonl
//!     cohort import users.jsonl
//!
//! By default every line carries the same `password_hash` (an argon2id hash
//! of the password printed on standard error), so the import measures
//! placement, not hashing; `--passwords` writes a distinct new password a
//! user instead (`tangerine orbit velvet <n>`), hashed by the import.
//! `--seed S` changes the population.

#[path = "../benches/support/population.rs"]
mod population;

use std::io::Write;

fn main() {
    let mut n: u64 = 0;
    let mut passwords = false;
    let mut seed = 42;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--passwords" => passwords = true,
            "--seed" => seed = args.next().and_then(|s| s.parse().ok()).expect("--seed N"),
            s => {
                n = s
                    .parse()
                    .expect("usage: population N [--passwords] [--seed S]")
            }
        }
    }
    let password = "tangerine orbit velvet population";
    let hash = {
        use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
        use argon2::{Algorithm, Argon2, Params, Version};
        let params = Params::new(
            cohort::auth::ARGON2_M_KIB,
            cohort::auth::ARGON2_T,
            cohort::auth::ARGON2_P,
            None,
        )
        .unwrap();
        let salt: [u8; 16] = rand::random();
        let mut out = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
            .hash_password_into(password.as_bytes(), &salt, &mut out)
            .unwrap();
        PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).unwrap(),
            salt: Some(Salt::new(&salt).unwrap()),
            hash: Some(Output::new(&out).unwrap()),
        }
        .to_string()
    };
    if !passwords {
        eprintln!("every user's password: {password}");
    }
    let mut pop = population::Population::new(seed);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    for i in 0..n {
        let attrs = pop.user();
        let line = if passwords {
            serde_json::json!({"username": format!("user{i}"), "password": format!("tangerine orbit velvet {i}"), "attributes": attrs})
        } else {
            serde_json::json!({"username": format!("user{i}"), "password_hash": hash, "attributes": attrs})
        };
        serde_json::to_writer(&mut out, &line).unwrap();
        out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
}
