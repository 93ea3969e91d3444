//! The signup protocol: the one place that orders a signup's steps, and
//! says what every failure between them leaves behind.
//!
//! # Who decides what
//! The system of record is the arbiter. It stores every group's t-subsets
//! under a primary key: two groups share `t` or more attributes exactly when
//! they share a t-subset, so that key refuses an overlapping group at commit,
//! for any number of replicas, whatever the index holds. The index (Redis in
//! distributed mode, in process in embedded mode) only makes the common case
//! fast: it holds committed groups, and nothing else.
//!
//! # Steps
//! 1. Validate (`domain`), apply the rate limit, replay an `Idempotency-Key`
//!    seen in the last 24 hours, refuse a taken username, hash the password.
//!    *Nothing is written yet.*
//! 2. Decide: the best committed group, from the index when this replica
//!    trusts it (`index::health`), else exactly from the store's subset
//!    table. *Reads only.*
//! 3. Commit, in one transaction: check the deployment's threshold (and, for
//!    a join decided in the index, that the index is not marked dirty); to
//!    found, insert the group and its t-subsets; insert the user; insert the
//!    idempotency key. A subset already taken means a committed group
//!    overlaps this one: back to 2, deciding from the store (which joins it
//!    or a better one). A dirty mark: back to 2, from the store.
//! 4. If this signup founded its group: add it to the index, or, if that
//!    fails, mark the index dirty. *Only then* answer 201.
//!
//! # What each failure leaves
//! - in 1 or 2: nothing anywhere;
//! - in 3: the transaction rolls back: no user, no group, no subsets, no key
//!   (a 409 for a racing username leaves nothing either);
//! - between 3 and 4 (a crash): a committed group the index lacks. Its
//!   founder got no answer, so no finished signup depends on it; any
//!   overlapping founder meets its subsets at commit and joins it; the
//!   keeper adds it within about a second (`groups.indexed`);
//! - in 4: the index marked dirty, so joins decide from the store until a
//!   sync has added the group; the answer is still 201 (the signup is
//!   committed, and nothing is half-written).
//!
//! # Why the order is the one-at-a-time order
//! Take a founding's point in the order to be its step 4 and a join's to be
//! its decision. Each decision is exactly right for the groups present at
//! its point; a signup that finished before another began has the earlier
//! point, because the index holds every group whose founder answered (or is
//! marked dirty, and then the store decides).
//!
//! Embedded mode runs the same steps with one lock held over 2 to 4: a
//! failed commit leaves the in-process index untouched.

use std::sync::Arc;

use tracing::Instrument as _;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::domain::Signup;
use crate::error::AppError;
use crate::index::GroupIndex;
use crate::index::health::SharedIndex;
use crate::store::{Committed, IdempotencyRecord, NewUser, Plan, Store, StoreError};

/// Decide-and-commit rounds before giving up. Each retry follows a commit
/// that lost to a concurrent founder or found the index dirty, and the next
/// decision comes from the store, which sees that founder's group: two
/// rounds suffice in practice; the bound only stops a loop on a bug.
const MAX_ROUNDS: usize = 6;

/// How one signup was answered.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Committed by this request.
    Created(Committed),
    /// The response to an earlier request with the same Idempotency-Key.
    Replayed(Committed),
}

impl Outcome {
    pub fn committed(&self) -> &Committed {
        match self {
            Outcome::Created(c) | Outcome::Replayed(c) => c,
        }
    }
}

pub struct SignupProtocol {
    store: Arc<dyn Store>,
    index: Arc<dyn GroupIndex>,
    /// Distributed mode: told when a transaction found the index dirty.
    shared: Option<Arc<SharedIndex>>,
    /// Embedded mode: decide, commit and add under one lock.
    serial: Option<tokio::sync::Mutex<()>>,
    fingerprint_key: Vec<u8>,
    /// Counts decisions by source (`index`, `database`).
    decisions: Option<prometheus::IntCounterVec>,
}

impl SignupProtocol {
    pub fn count_decisions(mut self, counter: prometheus::IntCounterVec) -> Self {
        self.decisions = Some(counter);
        self
    }

    pub fn distributed(store: Arc<dyn Store>, shared: Arc<SharedIndex>, secret: &[u8]) -> Self {
        Self {
            store,
            index: shared.clone(),
            shared: Some(shared),
            serial: None,
            fingerprint_key: fingerprint_key(secret),
            decisions: None,
        }
    }

    pub fn embedded(store: Arc<dyn Store>, index: Arc<dyn GroupIndex>, secret: &[u8]) -> Self {
        Self {
            store,
            index,
            shared: None,
            serial: Some(tokio::sync::Mutex::new(())),
            fingerprint_key: fingerprint_key(secret),
            decisions: None,
        }
    }

    /// A keyed hash of what makes two requests "the same": the canonical
    /// username, the password and the canonical attributes. Keyed, because
    /// it covers the password: a plain hash stored beside the user would be
    /// a fast way to test guesses.
    pub fn fingerprint(&self, s: &Signup) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.fingerprint_key)
            .expect("any key length");
        mac.update(s.username.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(s.password.expose().as_bytes());
        for a in s.attributes.iter() {
            mac.update(b"\0");
            mac.update(a.as_str().as_bytes());
        }
        mac.finalize().into_bytes().to_vec()
    }

    /// Step 1's replay: the stored outcome for `key` if the same request
    /// made it, an error if another did, None if the key is new.
    pub async fn replay(&self, key: &str, fingerprint: &[u8]) -> Result<Option<Outcome>, AppError> {
        let Some(r) = self.store.replay(key).await? else {
            return Ok(None);
        };
        if r.fingerprint != fingerprint {
            return Err(AppError::IdempotencyKeyReused);
        }
        if r.committed.founded {
            // The first answer may have been lost before step 4 finished:
            // the group must be in the index (or it marked dirty) before
            // this answer leaves too.
            self.publish(&r.committed).await;
        }
        Ok(Some(Outcome::Replayed(r.committed)))
    }

    /// Steps 2 to 4 for a validated, hashed signup.
    pub async fn place(
        &self,
        signup: &Signup,
        password_hash: String,
        idempotency: Option<IdempotencyRecord>,
    ) -> Result<Outcome, AppError> {
        let _serial = match &self.serial {
            Some(m) => Some(m.lock().await),
            None => None,
        };
        let attrs = &signup.attributes;
        let mut from_index = true;
        for _ in 0..MAX_ROUNDS {
            // Step 2, in a span of its own (exported with traces): where the
            // decision was made, and whether it joins a group.
            let span = tracing::debug_span!(
                "index.decide",
                operation = "decide",
                source = tracing::field::Empty,
                joins = tracing::field::Empty,
            );
            // Before the index is read: a group confirmed after this may be
            // one the decision did not see (the commit checks those).
            let deciding = std::time::Instant::now();
            let (best, in_index) = async {
                match from_index {
                    true => match self.index.best(attrs).await {
                        Ok(b) => Ok((b, true)),
                        Err(e) => {
                            tracing::debug!(error = %e, "deciding from the store");
                            Ok((self.store.best_group(attrs).await?, false))
                        }
                    },
                    false => Ok::<_, StoreError>((self.store.best_group(attrs).await?, false)),
                }
            }
            .instrument(span.clone())
            .await?;
            span.record("source", if in_index { "index" } else { "database" });
            span.record("joins", best.is_some());
            drop(span);
            if !in_index && let Some(c) = &best {
                // Repair: the store knows a group the index did not give us.
                // Harmless if it was there; best effort, the keeper adds it
                // anyway.
                let _ = self.index.add(&[(c.id, c.attributes.clone())]).await;
            }
            if let Some(c) = &self.decisions {
                let source = if in_index { "index" } else { "database" };
                c.with_label_values(&[source]).inc();
            }
            crate::failpoint::hit("signup:decided");
            let user = NewUser {
                username: signup.username.clone(),
                password_hash: password_hash.clone(),
                attributes: attrs.clone(),
                decided_in_index: (in_index && best.is_some()).then_some(deciding),
                plan: best.map_or(Plan::Found, Plan::Join),
                idempotency: idempotency.clone(),
            };
            // Step 3.
            match self.store.commit_signup(&user).await {
                Ok(c) => {
                    crate::failpoint::hit("signup:committed");
                    // Step 4.
                    if c.founded {
                        self.publish(&c).await;
                    }
                    crate::failpoint::hit("signup:published");
                    return Ok(Outcome::Created(c));
                }
                Err(StoreError::Overlap) => {
                    tracing::debug!("a committed group overlaps: deciding again from the store");
                    from_index = false;
                }
                Err(StoreError::IndexDirty) => {
                    if let Some(s) = &self.shared {
                        s.saw_dirty();
                    }
                    from_index = false;
                }
                Err(e @ (StoreError::UsernameTaken | StoreError::IdempotencyKeyTaken)) => {
                    // A concurrent request with the same key may have won:
                    // then its answer is ours.
                    if let Some(k) = &idempotency
                        && let Some(o) = self.replay(&k.key, &k.fingerprint).await?
                    {
                        return Ok(o);
                    }
                    return Err(match e {
                        StoreError::UsernameTaken => AppError::UsernameTaken,
                        _ => AppError::IdempotencyKeyReused,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(AppError::Internal(format!(
            "no placement committed after {MAX_ROUNDS} rounds"
        )))
    }

    /// Step 4: the founded group into the index (or the index marked dirty).
    async fn publish(&self, c: &Committed) {
        let group = [(c.user.group_id, c.group_attributes.clone())];
        if let Err(e) = self.index.add(&group).await {
            // Only the shared index can fail here, and it has already tried
            // to mark itself dirty: what failed is that mark (the database is
            // down too). The signup is committed; say so loudly.
            tracing::error!(
                group_id = c.user.group_id.0,
                error = %e,
                "founded group neither indexed nor marked dirty"
            );
        }
    }
}

fn fingerprint_key(secret: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(b"cohort idempotency fingerprint\0");
    h.update(secret);
    h.finalize().to_vec()
}
