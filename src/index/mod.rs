//! The group index: answers "which committed group does this signup join?"
//! without scanning every group.
//!
//! An index is a *cache of committed groups*, never the arbiter: the system
//! of record refuses any group that would share a t-subset with another (see
//! `crate::signup` for the protocol and why it is exact). So an index only
//! ever answers for groups whose transaction committed, and receives a group
//! only after that commit ([`GroupIndex::add`], idempotent).
//!
//! Two implementations share the same t-subset design (see
//! `domain::grouping`): [`memory::MemoryIndex`] in-process, for the embedded
//! mode, and [`redis::RedisIndex`], shared by every replica, where one Lua
//! script makes the best-group decision in one atomic round trip.
//! [`health`] decides when a replica may trust the shared one.

pub mod health;
pub mod memory;
pub mod redis;

use async_trait::async_trait;

use crate::domain::{AttributeSet, GroupId};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The index is missing, being rebuilt, or not trusted by this replica.
    #[error("group index not ready: {0}")]
    NotReady(String),
    #[error("group index unreachable: {0}")]
    Unavailable(String),
    #[error("group index is inconsistent: {0}")]
    Corrupt(String),
}

/// A committed group, as an index returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: GroupId,
    pub attributes: AttributeSet,
}

#[async_trait]
pub trait GroupIndex: Send + Sync {
    /// The group `attrs` joins under the rule, among the groups this index
    /// holds: the largest overlap of at least t, the smallest id on a tie.
    /// Reads only.
    async fn best(&self, attrs: &AttributeSet) -> Result<Option<Candidate>, IndexError>;

    /// Adds committed groups. Idempotent: adding a group twice, or one the
    /// index already has, changes nothing.
    async fn add(&self, groups: &[(GroupId, AttributeSet)]) -> Result<(), IndexError>;
}

/// The index's marks in the system of record (see `health`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IndexMarks {
    /// The deployment's threshold: a replica configured otherwise must not
    /// sync (it would vouch for another threshold's index).
    pub threshold: usize,
    /// Bumped whenever a committed group may be missing from Redis.
    pub dirty: i64,
    /// The `dirty` value the last completed sync accounted for.
    pub clean: i64,
    /// Identity of the Redis server the last sync ran against.
    pub synced_server: Option<String>,
}

impl IndexMarks {
    pub fn is_dirty(&self) -> bool {
        self.dirty > self.clean
    }
}

/// Held while one process syncs the shared index; dropping it releases the
/// lock (for Postgres: closes the session holding the advisory lock).
pub struct SyncLock(pub Box<dyn Send + Sync>);

/// What the shared index is rebuilt, repaired and checked from: the system
/// of record.
#[async_trait]
pub trait IndexSource: Send + Sync {
    async fn group_count(&self) -> Result<u64, IndexError>;
    /// Groups in id order, after `after`, at most `limit`.
    async fn groups_after(
        &self,
        after: Option<GroupId>,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, IndexError>;
    /// Committed groups no sync has yet confirmed in the index.
    async fn unindexed_groups(
        &self,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, IndexError>;
    /// The sync lock's holder confirms groups in the index.
    async fn mark_indexed(&self, ids: &[GroupId]) -> Result<(), IndexError>;
    /// Confirms them only if no one holds the sync lock, atomically with
    /// that check; false (nothing marked) if someone does. While an import
    /// holds the lock, every group committed since is unconfirmed until it
    /// confirms it: that is how it learns what live signups founded.
    async fn mark_indexed_unless_locked(&self, ids: &[GroupId]) -> Result<bool, IndexError>;
    async fn marks(&self) -> Result<IndexMarks, IndexError>;
    /// Records that a committed group may be missing from the index.
    async fn mark_dirty(&self) -> Result<(), IndexError>;
    /// Records a completed sync against `server` that accounted for every
    /// dirty mark up to `dirty`.
    async fn mark_synced(&self, dirty: i64, server: &str) -> Result<(), IndexError>;
    /// None when another process holds it.
    async fn lock_sync(&self) -> Result<Option<SyncLock>, IndexError>;
}
