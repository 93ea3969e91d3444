//! The system of record: users and groups, behind one trait with a Postgres
//! implementation (distributed mode) and an embedded one.

pub mod import;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{AttributeSet, GroupId, Threshold, UserId, Username};
use crate::index::Candidate;

/// Where a signup goes, as decided before its transaction.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Join this committed group.
    Join(Candidate),
    /// Found a group with the user's attributes. In Postgres the transaction
    /// inserts its t-subsets and fails with [`StoreError::Overlap`] if any
    /// is taken (embedded mode's single decider needs no such check).
    Found,
}

/// An `Idempotency-Key` to commit with the user.
#[derive(Debug, Clone)]
pub struct IdempotencyRecord {
    pub key: String,
    /// A keyed hash of the request (see `crate::signup`).
    pub fingerprint: Vec<u8>,
}

/// A signup ready to commit: validated, hashed and planned.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: Username,
    pub password_hash: String,
    pub attributes: AttributeSet,
    pub plan: Plan,
    /// The join was decided in the shared index, no earlier than this: the
    /// transaction refuses it if the index is marked dirty
    /// ([`StoreError::IndexDirty`]), or if a group the index may not have
    /// shown (unconfirmed, or confirmed since) beats it
    /// ([`StoreError::Overlap`]: decide again from the store).
    pub decided_in_index: Option<std::time::Instant>,
    pub idempotency: Option<IdempotencyRecord>,
}

/// A committed signup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub user: UserRecord,
    pub group_attributes: AttributeSet,
    pub founded: bool,
}

/// A signup stored under an idempotency key.
#[derive(Debug, Clone)]
pub struct Replay {
    pub fingerprint: Vec<u8>,
    pub committed: Committed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: UserId,
    /// Tokens issued under an older version are revoked.
    pub token_version: i64,
    pub username: Username,
    pub attributes: AttributeSet,
    pub group_id: GroupId,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub id: GroupId,
    pub attributes: AttributeSet,
    pub member_count: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: UserId,
    pub username: Username,
    pub attributes: AttributeSet,
}

/// What `GET /v1/me/group` shows, read at once: the caller (its token
/// version, to refuse a revoked token, and its attributes), its group with
/// the member count, and one page of members.
#[derive(Debug, Clone)]
pub struct GroupPage {
    pub token_version: i64,
    pub attributes: AttributeSet,
    pub group: GroupInfo,
    pub members: Vec<Member>,
}

#[derive(Clone)]
pub struct Credentials {
    pub id: UserId,
    pub password_hash: String,
    pub token_version: i64,
}

/// Connection pool figures for the saturation metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStats {
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("username is taken")]
    UsernameTaken,
    /// A committed group shares a t-subset with the one being founded.
    #[error("a committed group overlaps the group being founded")]
    Overlap,
    /// The shared index is marked dirty: a join decided there may be wrong.
    #[error("the group index is marked dirty")]
    IndexDirty,
    /// The idempotency key was committed by another request meanwhile.
    #[error("the idempotency key is in use")]
    IdempotencyKeyTaken,
    #[error(
        "this deployment groups with threshold {deployed} but this replica is configured with {configured}"
    )]
    ThresholdMismatch { deployed: usize, configured: usize },
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database holds an invalid row: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait Store: Send + Sync {
    async fn ping(&self) -> Result<(), StoreError>;
    /// Records this deployment's threshold on first start (Postgres: building
    /// the subset table for groups that predate it); returns the recorded one.
    async fn ensure_deployment(&self, t: Threshold) -> Result<usize, StoreError>;
    async fn username_taken(&self, username: &Username) -> Result<bool, StoreError>;
    /// The group `attrs` joins among the committed ones, exactly (Postgres:
    /// from the subset table): the decision when the shared index cannot be
    /// used.
    async fn best_group(&self, attrs: &AttributeSet) -> Result<Option<Candidate>, StoreError>;
    /// Commits the user, and its group and the group's t-subsets if it
    /// founds one, and its idempotency key, in one transaction.
    async fn commit_signup(&self, user: &NewUser) -> Result<Committed, StoreError>;
    /// The signup stored under `key` in the last 24 hours.
    async fn replay(&self, key: &str) -> Result<Option<Replay>, StoreError>;
    async fn credentials(&self, username: &Username) -> Result<Option<Credentials>, StoreError>;
    async fn credentials_of(&self, id: UserId) -> Result<Option<Credentials>, StoreError>;
    /// Replaces the password hash and revokes every token issued before (a
    /// new token version). False if the user no longer exists.
    async fn set_password(&self, id: UserId, password_hash: &str) -> Result<bool, StoreError>;
    /// Deletes the user: gone from member lists and counts, its tokens
    /// revoked with it; its group stays. False if it did not exist.
    async fn delete_user(&self, id: UserId) -> Result<bool, StoreError>;
    async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError>;
    async fn group(&self, id: GroupId) -> Result<Option<GroupInfo>, StoreError>;
    /// Members in join order, after `after`, at most `limit`.
    async fn members(
        &self,
        group: GroupId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, StoreError>;
    /// The group page of `user` (None if the user does not exist): members
    /// after `after`, at most `limit`. One round trip where the store has a
    /// network between it and us.
    async fn group_page(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Option<GroupPage>, StoreError>;
    /// (groups, users).
    async fn counts(&self) -> Result<(u64, u64), StoreError>;
    /// Groups in id order, after `after`, at most `limit`.
    async fn groups_after(
        &self,
        after: Option<GroupId>,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, StoreError>;
    fn pool_stats(&self) -> PoolStats;
    /// Group sizes with their number of groups, from the member counters
    /// (one aggregate query, no scan of users): the group-size metrics.
    async fn group_sizes(&self) -> Result<crate::stats::SizeDistribution, StoreError>;
}

/// Picks the best of the candidate groups a subset lookup returned.
pub(crate) fn best_of(
    candidates: Vec<(GroupId, AttributeSet)>,
    attrs: &AttributeSet,
    t: Threshold,
) -> Option<Candidate> {
    let best = crate::domain::grouping::choose_best(
        candidates.iter().map(|(id, a)| (*id, a.overlap(attrs))),
        t,
    )?;
    candidates
        .into_iter()
        .find(|(id, _)| *id == best.0)
        .map(|(id, attributes)| Candidate { id, attributes })
}
