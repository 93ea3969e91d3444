//! argon2id at OWASP's minimum (m = 19 MiB, t = 2, p = 1), on tokio's
//! blocking pool behind a semaphore: a hash takes ~12 ms of a core and 19 MiB,
//! so it must never run on an async worker, and a burst of signins must queue
//! instead of exhausting memory.

use std::sync::Arc;
use std::time::Instant;

use argon2::{Algorithm, Argon2, Params, PasswordHasher as _, PasswordVerifier as _, Version};
use tokio::sync::Semaphore;

use crate::domain::Password;

pub const ARGON2_M_KIB: u32 = 19_456;
pub const ARGON2_T: u32 = 2;
pub const ARGON2_P: u32 = 1;

#[derive(Clone)]
pub struct PasswordHasher {
    permits: Arc<Semaphore>,
    /// Verified against when the user does not exist, so an unknown user
    /// costs the same time as a wrong password.
    dummy: Arc<str>,
    observe: Arc<dyn Fn(f64) + Send + Sync>,
}

fn argon2() -> Argon2<'static> {
    let params =
        Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

impl PasswordHasher {
    /// `concurrency` hashes at most at once (the CPU count is right);
    /// `observe` receives each hash's duration in seconds.
    pub fn new(concurrency: usize, observe: Arc<dyn Fn(f64) + Send + Sync>) -> Self {
        let dummy = argon2()
            .hash_password(b"cohort dummy password, never matches")
            .expect("argon2 hashing works")
            .to_string();
        Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
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
        self.run(move || {
            argon2()
                .hash_password(pw.as_bytes())
                .expect("argon2 hashing works")
                .to_string()
        })
        .await
    }

    /// True when `password` matches `stored`; with `stored` None (unknown
    /// user) verifies against the dummy hash and returns false.
    pub async fn verify(&self, password: &str, stored: Option<String>) -> bool {
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| self.dummy.to_string());
        let pw = password.to_owned();
        let ok = self
            .run(move || {
                argon2()
                    .verify_password(pw.as_bytes(), hash.as_str())
                    .is_ok()
            })
            .await;
        ok && known
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
