//! The system of record: users and groups, behind one trait with a Postgres
//! implementation (distributed mode) and an embedded one.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::grouping::Placement;
use crate::domain::{AttributeSet, GroupId, Threshold, UserId, Username};
use crate::index::{Epoch, GroupIdSource};

/// A signup ready to commit: validated, hashed, and placed by the index.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: Username,
    pub password_hash: String,
    pub attributes: AttributeSet,
    pub placement: Placement,
    /// The shared index's epoch the placement was decided against; the
    /// commit is refused if it is no longer current.
    pub epoch: Option<(Threshold, Epoch)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: UserId,
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

#[derive(Clone)]
pub struct Credentials {
    pub id: UserId,
    pub password_hash: String,
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
    /// The index epoch the signup was decided against is no longer current.
    #[error("the group index was rebuilt or lost during this signup")]
    StaleIndex,
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database holds an invalid row: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait Store: GroupIdSource + Send + Sync {
    async fn ping(&self) -> Result<(), StoreError>;
    async fn username_taken(&self, username: &Username) -> Result<bool, StoreError>;
    /// Commits the user, and its group if this is the group's first member,
    /// in one transaction.
    async fn create_user(&self, user: &NewUser) -> Result<UserRecord, StoreError>;
    async fn credentials(&self, username: &Username) -> Result<Option<Credentials>, StoreError>;
    async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError>;
    async fn group(&self, id: GroupId) -> Result<Option<GroupInfo>, StoreError>;
    /// Members in join order, after `after`, at most `limit`.
    async fn members(
        &self,
        group: GroupId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, StoreError>;
    /// (groups, users).
    async fn counts(&self) -> Result<(u64, u64), StoreError>;
    /// Groups in id order, after `after`, at most `limit`.
    async fn groups_after(
        &self,
        after: Option<GroupId>,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, StoreError>;
    fn pool_stats(&self) -> PoolStats;
}
