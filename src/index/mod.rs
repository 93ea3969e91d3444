//! The group index: answers "which group does this signup join, or does it
//! found one?" without scanning every group.
//!
//! Two implementations share the same t-subset design (see
//! `domain::grouping`): [`memory::MemoryIndex`] in-process, for the embedded
//! mode and as a second implementation to test against, and
//! [`redis::RedisIndex`], shared by every replica, where one Lua script makes
//! best-group-or-create atomic.
//!
//! Group ids always come from the system of record ([`GroupIdSource`]), never
//! from the index, so they stay unique even if the index is emptied. Founding
//! is optimistic: look up first; only when nothing matches, take a fresh id
//! and ask again with it. The second call founds unless another signup
//! founded a matching group meanwhile, in which case it joins that one (the
//! unused id is a harmless gap).

pub mod keeper;
pub mod memory;
pub mod redis;

use async_trait::async_trait;

use crate::domain::grouping::Placement;
use crate::domain::{AttributeSet, GroupId, Threshold};

/// Identifies one build of a shared index. The system of record keeps the
/// current epoch too, and refuses a signup decided against another one: that
/// is how a decision against a lost or half-built index is never committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(pub i64);

/// An index's decision, with the epoch it was made against (None for an
/// in-process index, which cannot be lost without losing the process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub placement: Placement,
    pub epoch: Option<Epoch>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The index is missing, being rebuilt, or of another generation.
    #[error("group index not ready: {0}")]
    NotReady(String),
    #[error("group index unreachable: {0}")]
    Unavailable(String),
    #[error("group index is inconsistent: {0}")]
    Corrupt(String),
    #[error("could not allocate a group id: {0}")]
    IdSource(String),
}

/// Where fresh group ids come from: the system of record.
#[async_trait]
pub trait GroupIdSource: Send + Sync {
    async fn next_group_id(&self) -> Result<GroupId, IndexError>;
}

/// One outcome of a single index call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Join {
        id: GroupId,
        attributes: AttributeSet,
    },
    /// Nothing matches and no id was offered.
    NoMatch,
    Founded {
        id: GroupId,
    },
}

#[async_trait]
pub trait GroupIndex: Send + Sync {
    /// One atomic step: join the best group, or found `found_with` if given
    /// and nothing matches. Returns the epoch the decision was made against.
    async fn decide(
        &self,
        attrs: &AttributeSet,
        found_with: Option<GroupId>,
    ) -> Result<(Decision, Option<Epoch>), IndexError>;

    /// Ok when assignments can be made now.
    async fn check_ready(&self) -> Result<(), IndexError>;

    /// Best group or a new one, atomically with respect to every other
    /// caller of the same index.
    async fn assign(
        &self,
        attrs: &AttributeSet,
        ids: &dyn GroupIdSource,
    ) -> Result<Assignment, IndexError> {
        let (first, epoch) = self.decide(attrs, None).await?;
        let (decision, epoch) = match first {
            Decision::NoMatch => {
                let id = ids.next_group_id().await?;
                self.decide(attrs, Some(id)).await?
            }
            other => (other, epoch),
        };
        let placement = match decision {
            Decision::Join { id, attributes } => Placement {
                group_id: id,
                group_attributes: attributes,
                created: false,
            },
            Decision::Founded { id } => Placement {
                group_id: id,
                group_attributes: attrs.clone(),
                created: true,
            },
            Decision::NoMatch => {
                return Err(IndexError::Corrupt(
                    "index declined to found with a fresh id".into(),
                ));
            }
        };
        Ok(Assignment { placement, epoch })
    }
}

/// Held while one process rebuilds a shared index; dropping it releases the
/// lock (for Postgres: closes the session holding the advisory lock).
pub struct RebuildLock(pub Box<dyn Send + Sync>);

/// What a shared index is rebuilt and checked from: the system of record.
#[async_trait]
pub trait IndexSource: Send + Sync {
    /// None when another process holds the rebuild lock.
    async fn lock_rebuild(&self, t: Threshold) -> Result<Option<RebuildLock>, IndexError>;
    /// Starts a new epoch for threshold `t`. Waits for signups in flight,
    /// then refuses any decided against an older epoch.
    async fn advance_epoch(&self, t: Threshold) -> Result<Epoch, IndexError>;
    async fn current_epoch(&self, t: Threshold) -> Result<Option<Epoch>, IndexError>;
    async fn group_count(&self) -> Result<u64, IndexError>;
    /// Groups in id order, after `after`, at most `limit`.
    async fn groups_after(
        &self,
        after: Option<GroupId>,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, IndexError>;
}
