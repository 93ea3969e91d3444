//! The use cases behind the HTTP API: signup, signin, and reading one's own
//! user and group. Handlers stay thin; the steps of a signup and why their
//! order is safe live in `crate::signup`, once for both modes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::auth::{PasswordHasher, Tokens};
use crate::domain::{AttributeRules, AttributeSet, Signup, Threshold, UserId, Username};
use crate::error::AppError;
use crate::index::health::{IndexState, SharedIndex};
use crate::ratelimit::RateLimiter;
use crate::signup::{Outcome, SignupProtocol};
use crate::store::{GroupInfo, IdempotencyRecord, Member, Store, UserRecord};
use crate::telemetry::Metrics;

const SIGNIN_WINDOW: Duration = Duration::from_secs(15 * 60);
const SIGNUP_WINDOW: Duration = Duration::from_secs(60);

pub struct Service {
    pub store: Arc<dyn Store>,
    pub protocol: SignupProtocol,
    /// Distributed mode: the shared index and its health.
    pub shared_index: Option<Arc<SharedIndex>>,
    pub hasher: PasswordHasher,
    pub tokens: Tokens,
    pub limiter: Arc<dyn RateLimiter>,
    pub metrics: Metrics,
    pub rules: AttributeRules,
    pub threshold: Threshold,
    pub signin_max_failures: u32,
    pub signup_rate_limit: u32,
}

pub struct GroupView {
    pub group: GroupInfo,
    pub shared: AttributeSet,
    pub members: Vec<Member>,
    pub next_after: Option<UserId>,
}

/// Limiter keys carry no username in clear.
///
/// And there are at most 2^20 of each kind: an attacker spraying usernames
/// and addresses cannot grow the throttle's keys (each under 100 bytes,
/// expiring with its window) past ~100 MB per kind in Redis, where they
/// live beside the group index. Two ids that share a slot share a counter,
/// which only ever makes throttling stricter, and rarely: a slot is shared
/// by accounts that are both under attack in the same 15 minutes.
fn limiter_key(kind: &str, id: &str) -> String {
    const SLOT_BITS: u32 = 20;
    let d = Sha256::digest(id.as_bytes());
    let slot = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) >> (32 - SLOT_BITS);
    format!("{kind}:{slot:05x}")
}

impl Service {
    /// The state of the group index, for `/readyz` and the metrics.
    pub fn index_state(&self) -> IndexState {
        self.shared_index
            .as_ref()
            .map_or(IndexState::Ready, |s| s.state())
    }

    pub async fn signup(
        &self,
        signup: Signup,
        client: Option<&str>,
        idempotency_key: Option<String>,
    ) -> Result<Outcome, AppError> {
        if self.signup_rate_limit > 0 {
            let key = limiter_key("signup", client.unwrap_or("unknown"));
            if let Some(retry_after) = self
                .limiter
                .hit(&key, self.signup_rate_limit, SIGNUP_WINDOW)
                .await
            {
                return Err(AppError::RateLimited { retry_after });
            }
        }
        let idempotency = idempotency_key.map(|key| IdempotencyRecord {
            fingerprint: self.protocol.fingerprint(&signup),
            key,
        });
        if let Some(k) = &idempotency
            && let Some(replayed) = self.protocol.replay(&k.key, &k.fingerprint).await?
        {
            return Ok(replayed);
        }
        // Cheap checks before the expensive hash.
        if self.store.username_taken(&signup.username).await? {
            return Err(AppError::UsernameTaken);
        }
        let password_hash = self.hasher.hash(&signup.password).await;

        let started = Instant::now();
        let outcome = self
            .protocol
            .place(&signup, password_hash, idempotency)
            .await;
        self.metrics
            .assign_seconds
            .observe(started.elapsed().as_secs_f64());
        let outcome = outcome?;
        if let Outcome::Created(c) = &outcome {
            let label = if c.founded { "founded" } else { "joined" };
            self.metrics.signups.with_label_values(&[label]).inc();
            tracing::info!(
                user_id = c.user.id.0,
                group_id = c.user.group_id.0,
                outcome = label,
                "signup"
            );
        }
        Ok(outcome)
    }

    /// An access token, or the same error whether the user is unknown or
    /// the password wrong (and in about the same time: both hash once).
    ///
    /// Attempts are counted *before* the hash, atomically, so a concurrent
    /// burst cannot pass the check before any is counted; per account and
    /// client address (reset by a success), so an attacker elsewhere cannot
    /// lock the owner out; and per account with a ceiling ten times looser,
    /// so spreading guesses over many addresses does not help much either.
    pub async fn signin(
        &self,
        username: &str,
        password: &str,
        client: Option<&str>,
    ) -> Result<String, AppError> {
        let account = username.to_ascii_lowercase();
        let pair_key = limiter_key(
            "signin",
            &format!("{account}\0{}", client.unwrap_or("unknown")),
        );
        let account_key = limiter_key("signin-account", &account);
        let max = self.signin_max_failures;
        if let Some(retry_after) = self.limiter.hit(&pair_key, max, SIGNIN_WINDOW).await {
            return Err(AppError::RateLimited { retry_after });
        }
        if let Some(retry_after) = self
            .limiter
            .hit(&account_key, max.saturating_mul(10), SIGNIN_WINDOW)
            .await
        {
            return Err(AppError::RateLimited { retry_after });
        }
        let stored = match Username::parse(username) {
            Ok(u) => self.store.credentials(&u).await?,
            Err(_) => None,
        };
        let user_id = stored.as_ref().map(|c| c.id);
        let version = stored.as_ref().map_or(0, |c| c.token_version);
        let ok = self
            .hasher
            .verify(password, stored.map(|c| c.password_hash))
            .await;
        match (ok, user_id) {
            (true, Some(id)) => {
                self.limiter.reset(&pair_key).await;
                tracing::info!(user_id = id.0, "signin succeeded");
                Ok(self.tokens.issue(id, version))
            }
            _ => {
                tracing::info!(account = %account_key, "signin failed");
                Err(AppError::InvalidCredentials)
            }
        }
    }

    /// The token's user, unless it was deleted or the token revoked.
    pub async fn me(&self, id: UserId, token_version: i64) -> Result<UserRecord, AppError> {
        let user =
            self.store.user(id).await?.ok_or_else(|| {
                AppError::Unauthorized("the token's user no longer exists".into())
            })?;
        if user.token_version != token_version {
            return Err(AppError::Unauthorized("the token was revoked".into()));
        }
        Ok(user)
    }

    /// The stored credentials of a valid, unrevoked token's user, after
    /// checking `password` against them. Wrong password: 401.
    async fn reauthenticate(
        &self,
        id: UserId,
        token_version: i64,
        password: &str,
    ) -> Result<(), AppError> {
        let creds =
            self.store.credentials_of(id).await?.ok_or_else(|| {
                AppError::Unauthorized("the token's user no longer exists".into())
            })?;
        if creds.token_version != token_version {
            return Err(AppError::Unauthorized("the token was revoked".into()));
        }
        if !self
            .hasher
            .verify(password, Some(creds.password_hash))
            .await
        {
            return Err(AppError::InvalidCredentials);
        }
        Ok(())
    }

    /// `PUT /v1/me/password`: every token issued before is revoked.
    pub async fn change_password(
        &self,
        id: UserId,
        token_version: i64,
        current: &str,
        new: String,
    ) -> Result<(), AppError> {
        let new = crate::domain::Password::parse_new(new, &[]).map_err(|m| {
            AppError::Validation(vec![crate::domain::FieldError::new("new_password", m)])
        })?;
        self.reauthenticate(id, token_version, current).await?;
        let hash = self.hasher.hash(&new).await;
        if !self.store.set_password(id, &hash).await? {
            return Err(AppError::Unauthorized(
                "the token's user no longer exists".into(),
            ));
        }
        tracing::info!(user_id = id.0, "password changed; earlier tokens revoked");
        Ok(())
    }

    /// `DELETE /v1/me`: the user goes, its group stays.
    pub async fn delete_account(
        &self,
        id: UserId,
        token_version: i64,
        password: &str,
    ) -> Result<(), AppError> {
        self.reauthenticate(id, token_version, password).await?;
        if !self.store.delete_user(id).await? {
            return Err(AppError::Unauthorized(
                "the token's user no longer exists".into(),
            ));
        }
        tracing::info!(user_id = id.0, "account deleted");
        Ok(())
    }

    pub async fn my_group(
        &self,
        id: UserId,
        token_version: i64,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<GroupView, AppError> {
        let page = self
            .store
            .group_page(id, after, limit + 1)
            .await?
            .ok_or_else(|| AppError::Unauthorized("the token's user no longer exists".into()))?;
        if page.token_version != token_version {
            return Err(AppError::Unauthorized("the token was revoked".into()));
        }
        let (group, mut members) = (page.group, page.members);
        let next_after = if members.len() > limit {
            members.truncate(limit);
            members.last().map(|m| m.id)
        } else {
            None
        };
        Ok(GroupView {
            shared: page.attributes.intersection(&group.attributes),
            group,
            members,
            next_after,
        })
    }
}
