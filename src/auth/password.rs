//! argon2id at OWASP's minimum (m = 19 MiB, t = 2, p = 1), on tokio's
//! blocking pool behind a semaphore: a hash takes ~12 ms of a core and 19 MiB,
//! so it must never run on an async worker, and a burst of signins must queue
//! instead of exhausting memory.
//!
//! The 19 MiB work areas are pooled, one per permit. Allocating one per hash
//! let glibc keep a freed area in each of its per-thread arenas: a replica
//! grew to 400 MB resident after 80 signups. Pooled, it stays near
//! `concurrency x 19 MiB`, and no hash pays for fresh page faults.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use argon2::password_hash::phc::{Output, ParamsString, Salt};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use tokio::sync::Semaphore;

use crate::domain::Password;

pub const ARGON2_M_KIB: u32 = 19_456;
pub const ARGON2_T: u32 = 2;
pub const ARGON2_P: u32 = 1;

#[derive(Clone)]
pub struct PasswordHasher {
    permits: Arc<Semaphore>,
    /// Work areas for the current parameters, at most one per permit.
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
    /// Verified against when the user does not exist, so an unknown user
    /// costs the same time as a wrong password.
    dummy: Arc<str>,
    observe: Arc<dyn Fn(f64) + Send + Sync>,
}

fn params() -> Params {
    Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None).expect("valid argon2 parameters")
}

type Pool = Mutex<Vec<Vec<Block>>>;

/// Computes a hash into `out` with `params`, borrowing a pooled work area
/// when the parameters are the current ones (older hashes may differ).
fn compute(
    pool: &Pool,
    params: Params,
    pwd: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    let current = params.m_cost() == ARGON2_M_KIB && params.p_cost() == ARGON2_P;
    let blocks = params.block_count();
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let pooled = if current {
        pool.lock().expect("pool mutex").pop()
    } else {
        None
    };
    let mut area = pooled.unwrap_or_else(|| vec![Block::default(); blocks]);
    let result = argon.hash_password_into_with_memory(pwd, salt, out, &mut area[..]);
    if current {
        pool.lock().expect("pool mutex").push(area);
    }
    result
}

/// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`).
fn hash_phc(pool: &Pool, pwd: &[u8]) -> String {
    let salt: [u8; 16] = rand::random();
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    compute(pool, params(), pwd, &salt, &mut out).expect("argon2 hashing works");
    PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params()).expect("parameters encode"),
        salt: Some(Salt::new(&salt).expect("a 16-byte salt is valid")),
        hash: Some(Output::new(&out).expect("a 32-byte output is valid")),
    }
    .to_string()
}

/// True when `pwd` hashes to `phc`; `Output` compares in constant time.
fn verify_phc(pool: &Pool, pwd: &[u8], phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return false;
    }
    let (Some(salt), Some(expected), Ok(params)) =
        (&parsed.salt, &parsed.hash, Params::try_from(&parsed))
    else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    if compute(pool, params, pwd, salt, &mut out).is_err() {
        return false;
    }
    Output::new(&out).is_ok_and(|o| o == *expected)
}

impl PasswordHasher {
    /// `concurrency` hashes at most at once (the CPU count is right);
    /// `observe` receives each hash's duration in seconds.
    pub fn new(concurrency: usize, observe: Arc<dyn Fn(f64) + Send + Sync>) -> Self {
        let memory = Arc::new(Mutex::new(Vec::new()));
        let dummy = hash_phc(&memory, b"cohort dummy password, never matches");
        Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            memory,
            dummy: dummy.into(),
            observe,
        }
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("semaphore never closed");
        let span = tracing::Span::current();
        let observe = self.observe.clone();
        tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            let start = Instant::now();
            let out = f();
            observe(start.elapsed().as_secs_f64());
            out
        })
        .await
        .expect("password hashing task panicked")
    }

    /// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
    pub async fn hash(&self, password: &Password) -> String {
        let pw = password.expose().to_owned();
        let pool = self.memory.clone();
        self.run(move || hash_phc(&pool, pw.as_bytes())).await
    }

    /// True when `password` matches `stored`; with `stored` None (unknown
    /// user) verifies against the dummy hash and returns false.
    pub async fn verify(&self, password: &str, stored: Option<String>) -> bool {
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| self.dummy.to_string());
        let pw = password.to_owned();
        let pool = self.memory.clone();
        let ok = self
            .run(move || verify_phc(&pool, pw.as_bytes(), &hash))
            .await;
        ok && known
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phc_strings_interoperate_with_the_argon2_crate() {
        use argon2::{PasswordHasher as _, PasswordVerifier as _};
        let pool = Pool::default();
        let ours = hash_phc(&pool, b"interoperable password");
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params());
        assert!(
            argon
                .verify_password(b"interoperable password", ours.as_str())
                .is_ok()
        );
        let theirs = argon
            .hash_password(b"interoperable password")
            .unwrap()
            .to_string();
        assert!(verify_phc(&pool, b"interoperable password", &theirs));
        assert!(!verify_phc(&pool, b"another password", &theirs));
        assert!(!verify_phc(&pool, b"x", "not a phc string"));
        // Parameters other than the current ones still verify (old hashes).
        let old = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8192, 3, 1, None).unwrap(),
        );
        let old_hash = old.hash_password(b"older parameters").unwrap().to_string();
        assert!(verify_phc(&pool, b"older parameters", &old_hash));
    }

    #[tokio::test]
    async fn hashes_with_owasp_parameters_and_verifies_exactly() {
        let h = PasswordHasher::new(2, Arc::new(|_| {}));
        let pw = Password::parse(" correct horse battery ".into()).unwrap();
        let phc = h.hash(&pw).await;
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(h.verify(" correct horse battery ", Some(phc.clone())).await);
        assert!(!h.verify("correct horse battery", Some(phc)).await);
        assert!(!h.verify(" correct horse battery ", None).await);
    }
}
