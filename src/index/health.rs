//! When a replica may trust the shared index, and keeping it whole.
//!
//! The system of record keeps the invariant on its own (see
//! `crate::signup`); Redis only has to be *complete* for a join decided there
//! to be the one a one-at-a-time order gives. A replica trusts Redis only
//! when all of these hold:
//!
//! 1. its connection's generation is the one it checked (a reconnection may
//!    reach a restarted, restored or failed-over server: see `redis::conn`);
//! 2. on that connection, the server's identity (`run_id` and replication
//!    id, new at every start and failover) is the one the last completed
//!    sync recorded in the system of record: that sync made this server hold
//!    every group committed before it, and since then every founding added
//!    its group before answering, or marked the index dirty;
//! 3. the index is not marked dirty (a founder that could not add its group)
//!    and its meta says ready.
//!
//! Otherwise signups decide from the system of record, exactly and a little
//! slower, and nothing returns 503 because of Redis. The keeper below runs in
//! every replica: each second it re-checks, adds groups no one confirmed, and
//! when the index is missing, dirty or on an unknown server, one replica (an
//! advisory lock) syncs it while the others go on serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::redis::RedisIndex;
use super::{Candidate, GroupIndex, IndexError, IndexSource};
use crate::domain::{AttributeSet, GroupId};

/// What `/readyz` and the `cohort_index_state` metric say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexState {
    Ready = 0,
    Rebuilding = 1,
    Unreachable = 2,
}

impl IndexState {
    pub fn as_str(self) -> &'static str {
        match self {
            IndexState::Ready => "ready",
            IndexState::Rebuilding => "rebuilding",
            IndexState::Unreachable => "unreachable",
        }
    }
}

pub struct SharedIndex {
    redis: Arc<RedisIndex>,
    source: Arc<dyn IndexSource>,
    min_buckets: u32,
    /// The connection generation decisions may be made on (0: none).
    trusted: AtomicU64,
    /// The dirty mark as last read (a join decided in Redis is re-checked
    /// against the real one in its transaction).
    dirty: AtomicBool,
    state: AtomicU8,
    on_sync: Box<dyn Fn(&super::redis::sync::SyncReport) + Send + Sync>,
}

impl SharedIndex {
    pub fn new(
        redis: Arc<RedisIndex>,
        source: Arc<dyn IndexSource>,
        min_buckets: u32,
        on_sync: Box<dyn Fn(&super::redis::sync::SyncReport) + Send + Sync>,
    ) -> Self {
        Self {
            redis,
            source,
            min_buckets,
            trusted: AtomicU64::new(0),
            dirty: AtomicBool::new(true),
            state: AtomicU8::new(IndexState::Rebuilding as u8),
            on_sync,
        }
    }

    pub fn redis(&self) -> &Arc<RedisIndex> {
        &self.redis
    }

    pub fn state(&self) -> IndexState {
        match self.state.load(Ordering::Acquire) {
            0 => IndexState::Ready,
            1 => IndexState::Rebuilding,
            _ => IndexState::Unreachable,
        }
    }

    fn set_state(&self, s: IndexState) {
        self.state.store(s as u8, Ordering::Release);
    }

    fn distrust(&self) {
        self.trusted.store(0, Ordering::Release);
    }

    /// Whether decisions are made in Redis now.
    pub fn trusted(&self) -> bool {
        self.trusted.load(Ordering::Acquire) != 0 && !self.dirty.load(Ordering::Acquire)
    }

    /// Called when a transaction found the index marked dirty.
    pub fn saw_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// One round of the keeper: re-check trust, add unconfirmed groups, and
    /// sync when needed (if this replica gets the lock).
    pub async fn tick(&self) -> Result<(), IndexError> {
        let (server, generation) = match self.redis.server_identity().await {
            Ok(v) => v,
            Err(e) => {
                self.distrust();
                self.set_state(IndexState::Unreachable);
                return Err(e);
            }
        };
        if self.trusted.load(Ordering::Acquire) != generation {
            self.distrust();
        }
        let marks = self.source.marks().await?;
        if marks.threshold != self.redis.threshold().get() {
            // Another threshold is deployed: this replica refuses signups
            // and must not vouch for (or mark) any index.
            self.distrust();
            return Err(IndexError::NotReady(format!(
                "the deployment's threshold is {}",
                marks.threshold
            )));
        }
        self.dirty.store(marks.is_dirty(), Ordering::Release);
        let meta = self.redis.meta().await?;
        let current = marks.synced_server.as_deref() == Some(server.as_str())
            && !marks.is_dirty()
            && meta.is_some_and(|m| m.ready);
        if current {
            // Cheap upkeep: groups whose founder died before adding them
            // (confirmed only while no sync or import holds the lock).
            self.redis
                .add_unindexed(self.source.as_ref(), false)
                .await?;
            self.trusted.store(generation, Ordering::Release);
            self.set_state(IndexState::Ready);
            return Ok(());
        }
        self.distrust();
        self.set_state(IndexState::Rebuilding);
        let Some(_lock) = self.source.lock_sync().await? else {
            // Another replica syncs; its record makes us current next round.
            return Ok(());
        };
        // Marks read under the lock: every dirty mark up to here is covered
        // by the sync below, which starts after it.
        let marks = self.source.marks().await?;
        let report = self
            .redis
            .sync(self.source.as_ref(), self.min_buckets, &|_, _| {})
            .await?;
        // The identity must not have changed during the sync (a restart
        // mid-way would have broken the connection: a new generation).
        let (after, g2) = self.redis.server_identity().await?;
        if after != server || g2 != generation {
            return Err(IndexError::NotReady("Redis changed during the sync".into()));
        }
        self.source.mark_synced(marks.dirty, &server).await?;
        tracing::info!(
            full_pass = report.full_pass,
            unindexed = report.unindexed,
            ms = report.elapsed.as_millis() as u64,
            "group index synced"
        );
        (self.on_sync)(&report);
        let marks = self.source.marks().await?;
        self.dirty.store(marks.is_dirty(), Ordering::Release);
        if !marks.is_dirty() {
            self.trusted.store(generation, Ordering::Release);
            self.set_state(IndexState::Ready);
        }
        Ok(())
    }

    /// Runs the keeper until the process ends (or the index is dropped).
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                if let Err(e) = me.tick().await {
                    tracing::debug!(error = %e, "index keeper");
                }
            }
        });
    }

    /// After a founding committed: add the group, or mark the index dirty so
    /// that no replica decides a join in Redis until a sync has added it.
    /// Either way this happens before the founder's answer leaves.
    pub async fn publish(&self, id: GroupId, attrs: &AttributeSet) -> Result<(), IndexError> {
        let added = self.redis.add_groups(&[(id, attrs.clone())]).await;
        if let Err(e) = added {
            tracing::warn!(group_id = id.0, error = %e, "could not add a group to the index; marking it dirty");
            self.distrust();
            self.dirty.store(true, Ordering::Release);
            self.source.mark_dirty().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl GroupIndex for SharedIndex {
    async fn best(&self, attrs: &AttributeSet) -> Result<Option<Candidate>, IndexError> {
        if !self.trusted() {
            return Err(IndexError::NotReady("not trusted by this replica".into()));
        }
        match self.redis.decide(attrs).await {
            Ok(d) if d.generation == self.trusted.load(Ordering::Acquire) => Ok(d.best),
            Ok(_) => {
                self.distrust();
                Err(IndexError::NotReady("Redis connection replaced".into()))
            }
            Err(e) => {
                self.distrust();
                Err(e)
            }
        }
    }

    async fn add(&self, groups: &[(GroupId, AttributeSet)]) -> Result<(), IndexError> {
        for (id, attrs) in groups {
            self.publish(*id, attrs).await?;
        }
        Ok(())
    }
}
