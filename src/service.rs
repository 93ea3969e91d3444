//! The use cases behind the HTTP API: signup, signin, and reading one's own
//! user and group. Handlers stay thin; the order of the steps of a signup
//! (see `store::postgres` for why it is safe) lives here, once for both modes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::auth::{PasswordHasher, Tokens};
use crate::domain::grouping::Placement;
use crate::domain::{AttributeRules, AttributeSet, GroupId, Signup, Threshold, UserId, Username};
use crate::error::AppError;
use crate::index::{GroupIndex, IndexError};
use crate::ratelimit::RateLimiter;
use crate::store::{GroupInfo, Member, NewUser, Store, StoreError, UserRecord};
use crate::telemetry::Metrics;

const SIGNIN_WINDOW: Duration = Duration::from_secs(15 * 60);
const SIGNUP_WINDOW: Duration = Duration::from_secs(60);

pub struct Service {
    pub store: Arc<dyn Store>,
    pub index: Arc<dyn GroupIndex>,
    pub hasher: PasswordHasher,
    pub tokens: Tokens,
    pub limiter: Arc<dyn RateLimiter>,
    pub metrics: Metrics,
    pub rules: AttributeRules,
    pub threshold: Threshold,
    pub signin_max_failures: u32,
    pub signup_rate_limit: u32,
    /// Called when the index is found lost or stale: starts a rebuild.
    pub on_index_lost: Arc<dyn Fn() + Send + Sync>,
}

pub struct SignupOutcome {
    pub user: UserRecord,
    pub placement: Placement,
}

pub struct GroupView {
    pub group: GroupInfo,
    pub shared: AttributeSet,
    pub members: Vec<Member>,
    pub next_after: Option<UserId>,
}

/// Limiter keys carry no username in clear.
fn limiter_key(kind: &str, id: &str) -> String {
    let d = Sha256::digest(id.as_bytes());
    let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("{kind}:{hex}")
}

impl Service {
    fn index_lost(&self) {
        self.metrics.index_unavailable.inc();
        (self.on_index_lost)();
    }

    pub async fn signup(
        &self,
        signup: Signup,
        client: Option<&str>,
    ) -> Result<SignupOutcome, AppError> {
        if self.signup_rate_limit > 0 {
            let key = limiter_key("signup", client.unwrap_or("unknown"));
            if let Some(retry_after) = self.limiter.blocked(&key, self.signup_rate_limit).await {
                return Err(AppError::RateLimited { retry_after });
            }
            self.limiter.record(&key, SIGNUP_WINDOW).await;
        }
        // Cheap checks before the expensive hash, and before the index may
        // found a group for a signup that cannot succeed.
        if self.store.username_taken(&signup.username).await? {
            return Err(AppError::UsernameTaken);
        }
        let password_hash = self.hasher.hash(&signup.password).await;

        let started = Instant::now();
        let assignment = self
            .index
            .assign(&signup.attributes, self.store.as_ref())
            .await;
        self.metrics
            .assign_seconds
            .observe(started.elapsed().as_secs_f64());
        let assignment = assignment.map_err(|e| {
            if matches!(e, IndexError::NotReady(_)) {
                self.index_lost();
            }
            AppError::from(e)
        })?;

        let new_user = NewUser {
            username: signup.username,
            password_hash,
            attributes: signup.attributes,
            placement: assignment.placement.clone(),
            epoch: assignment.epoch.map(|e| (self.threshold, e)),
        };
        let user = self.store.create_user(&new_user).await.map_err(|e| {
            if matches!(e, StoreError::StaleIndex) {
                self.index_lost();
            }
            AppError::from(e)
        })?;
        let outcome = if assignment.placement.created {
            "founded"
        } else {
            "joined"
        };
        self.metrics.signups.with_label_values(&[outcome]).inc();
        tracing::info!(
            user_id = user.id.0,
            group_id = user.group_id.0,
            outcome,
            "signup"
        );
        Ok(SignupOutcome {
            user,
            placement: assignment.placement,
        })
    }

    /// An access token, or the same error whether the user is unknown or
    /// the password wrong (and in about the same time: both hash once).
    pub async fn signin(&self, username: &str, password: &str) -> Result<String, AppError> {
        let key = limiter_key("signin", &username.to_ascii_lowercase());
        if let Some(retry_after) = self.limiter.blocked(&key, self.signin_max_failures).await {
            return Err(AppError::RateLimited { retry_after });
        }
        let stored = match Username::parse(username) {
            Ok(u) => self.store.credentials(&u).await?,
            Err(_) => None,
        };
        let user_id = stored.as_ref().map(|c| c.id);
        let ok = self
            .hasher
            .verify(password, stored.map(|c| c.password_hash))
            .await;
        match (ok, user_id) {
            (true, Some(id)) => {
                self.limiter.reset(&key).await;
                tracing::info!(user_id = id.0, "signin succeeded");
                Ok(self.tokens.issue(id))
            }
            _ => {
                self.limiter.record(&key, SIGNIN_WINDOW).await;
                tracing::info!(account = %key, "signin failed");
                Err(AppError::InvalidCredentials)
            }
        }
    }

    pub async fn me(&self, id: UserId) -> Result<UserRecord, AppError> {
        self.store
            .user(id)
            .await?
            .ok_or_else(|| AppError::Unauthorized("the token's user no longer exists".into()))
    }

    pub async fn my_group(
        &self,
        id: UserId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<GroupView, AppError> {
        let me = self.me(id).await?;
        let group = self.group_of(me.group_id).await?;
        let mut members = self.store.members(me.group_id, after, limit + 1).await?;
        let next_after = if members.len() > limit {
            members.truncate(limit);
            members.last().map(|m| m.id)
        } else {
            None
        };
        Ok(GroupView {
            shared: me.attributes.intersection(&group.attributes),
            group,
            members,
            next_after,
        })
    }

    async fn group_of(&self, id: GroupId) -> Result<GroupInfo, AppError> {
        self.store
            .group(id)
            .await?
            .ok_or_else(|| AppError::Internal(format!("group {id} of an existing user is missing")))
    }
}
