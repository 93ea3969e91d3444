//! Bringing the Redis index level with the system of record, and checking it.
//!
//! The index only ever holds committed groups (they are added after their
//! commit), so it is always a *subset* of the system of record. That makes
//! both jobs simple:
//! - a sync adds, never removes: re-adding every group is idempotent and
//!   safe while signups go on, and no reader ever sees a group that might
//!   not commit;
//! - "as many groups in Redis as in Postgres" means "the same groups", so a
//!   sync that finds the counts equal skips the full pass.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{FIELD_BYTES, RedisIndex, bucket_of, join};
use crate::domain::grouping::{binomial, for_each_subset_digest};
use crate::domain::{AttributeSet, GroupId, Threshold};
use crate::index::{IndexError, IndexSource};

/// Groups read from the system of record per batch.
const BATCH: usize = 2_000;
/// Target entries per bucket: listpack lookups stay short, and far below
/// `hash-max-listpack-entries` (512), where a bucket would stop being compact.
const ENTRIES_PER_BUCKET: u64 = 128;

/// What a sync did.
#[derive(Debug, Clone)]
pub struct SyncReport {
    /// Groups re-added by a full pass (0 when the counts already agreed).
    pub full_pass: u64,
    /// Groups added by the pass over unconfirmed groups.
    pub unindexed: u64,
    pub buckets: u32,
    pub elapsed: Duration,
}

/// Every difference between the index and the system of record.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub groups_checked: u64,
    pub problems: Vec<String>,
}

/// Enough buckets for the expected entries, as a power of two, at least
/// `min`. Assumes groups of about 6 attributes; `reindex --from-scratch`
/// resizes when the population outgrows it.
pub fn bucket_count(groups: u64, t: Threshold, min: u32) -> u32 {
    let per_group = binomial(6, t.get()).max(1);
    let want = (groups.saturating_mul(per_group) / ENTRIES_PER_BUCKET).max(u64::from(min.max(1)));
    let pow = want.next_power_of_two().min(1 << 24);
    u32::try_from(pow).unwrap_or(1 << 24)
}

impl RedisIndex {
    /// Makes the index hold every committed group and marks it ready.
    /// Idempotent; the caller holds the sync lock. Signups go on meanwhile
    /// (deciding from the system of record while the state is `building`).
    pub async fn sync(
        &self,
        source: &dyn IndexSource,
        min_buckets: u32,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<SyncReport, IndexError> {
        let started = Instant::now();
        if self.has_epoch_layout().await? {
            // Keys of the first design (one generation per epoch): dropped,
            // and the index is built anew in the current layout.
            let dropped = self.drop_all().await?;
            tracing::warn!(dropped, "dropped an index of the previous layout");
        }
        let meta = match self.meta().await? {
            Some(m) => m,
            None => {
                let total = source.group_count().await?;
                let m = self
                    .create_meta(bucket_count(total, self.t, min_buckets))
                    .await?;
                tracing::warn!(
                    buckets = m.buckets,
                    groups = total,
                    "group index missing in Redis: rebuilding it"
                );
                m
            }
        };
        // Read Redis's count *before* Postgres's: Redis at that instant is a
        // subset of Postgres then, which is a subset of Postgres later, so
        // equal counts mean Redis held every group committed before it.
        let in_redis = self.group_count().await?;
        let in_db = source.group_count().await?;
        let mut full_pass = 0;
        if in_redis != in_db || !meta.ready {
            if meta.ready {
                tracing::warn!(
                    in_redis,
                    in_db,
                    "group index lacks groups (Redis lost writes?): re-adding every group"
                );
            }
            let mut after = None;
            loop {
                let batch = source.groups_after(after, BATCH).await?;
                let Some(last) = batch.last() else { break };
                after = Some(last.0);
                self.add_groups(&batch).await?;
                full_pass += batch.len() as u64;
                progress(full_pass, in_db.max(full_pass));
            }
        }
        let unindexed = self.add_unindexed(source, true).await?;
        if !meta.ready {
            self.set_state(true).await?;
        }
        Ok(SyncReport {
            full_pass,
            unindexed,
            buckets: meta.buckets,
            elapsed: started.elapsed(),
        })
    }

    /// Adds the groups no sync has confirmed yet (a founder that died
    /// between its commit and its add leaves one) and confirms them.
    /// `locked`: the caller holds the sync lock. Without it, the groups are
    /// confirmed only while no one else holds it (an import deciding in
    /// memory learns what others committed from the unconfirmed groups),
    /// and the upkeep stops at the first refusal. Bounded: each round
    /// confirms what it added.
    pub async fn add_unindexed(
        &self,
        source: &dyn IndexSource,
        locked: bool,
    ) -> Result<u64, IndexError> {
        let mut n = 0;
        for _ in 0..1_000 {
            let batch = source.unindexed_groups(BATCH).await?;
            if batch.is_empty() {
                break;
            }
            self.add_groups(&batch).await?;
            let ids: Vec<GroupId> = batch.iter().map(|(id, _)| *id).collect();
            if locked {
                source.mark_indexed(&ids).await?;
            } else if !source.mark_indexed_unless_locked(&ids).await? {
                break;
            }
            n += ids.len() as u64;
        }
        Ok(n)
    }

    /// Compares the index with the system of record, group by group and
    /// subset by subset.
    pub async fn verify(&self, source: &dyn IndexSource) -> Result<VerifyReport, IndexError> {
        let mut report = VerifyReport::default();
        let Some(meta) = self.meta().await? else {
            report.problems.push("the index is missing".into());
            return Ok(report);
        };
        if !meta.ready {
            report.problems.push("the index is being rebuilt".into());
        }
        let mut conn = self.conn.get().await?.conn;
        let gkey = self.groups_key();
        let mut known = HashSet::new();
        let mut after = None;
        loop {
            let batch = source.groups_after(after, BATCH).await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.0);
            let mut pipe = redis::pipe();
            let mut expect = Vec::new();
            for (id, attrs) in &batch {
                known.insert(id.0);
                pipe.cmd("HGET").arg(&gkey).arg(id.0);
                expect.push((*id, false));
                for_each_subset_digest(attrs, self.t, |d| {
                    pipe.cmd("HGET")
                        .arg(self.bucket_key(bucket_of(d) % meta.buckets))
                        .arg(&d[..FIELD_BYTES]);
                    expect.push((*id, true));
                });
            }
            let got: Vec<Option<String>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| IndexError::Unavailable(e.to_string()))?;
            let attrs_of: HashMap<GroupId, &AttributeSet> =
                batch.iter().map(|(i, a)| (*i, a)).collect();
            let mut bad_subsets: HashMap<GroupId, usize> = HashMap::new();
            for ((id, is_subset), v) in expect.into_iter().zip(got) {
                if is_subset {
                    let own = id.0.to_string();
                    if !v.is_some_and(|s| s.split(',').any(|x| x == own)) {
                        *bad_subsets.entry(id).or_default() += 1;
                    }
                    continue;
                }
                let want = join(attrs_of[&id].iter().map(|a| a.as_str()));
                match v {
                    None => report
                        .problems
                        .push(format!("group {id} is missing from the index")),
                    Some(s) if s != want => report.problems.push(format!(
                        "group {id} has attributes {:?} in the index but {:?} in the database",
                        s.replace('\x1f', ","),
                        want.replace('\x1f', ",")
                    )),
                    _ => {}
                }
            }
            let mut bad: Vec<_> = bad_subsets.into_iter().collect();
            bad.sort();
            for (id, n) in bad {
                report
                    .problems
                    .push(format!("group {id}: {n} of its t-subsets are not indexed"));
            }
            report.groups_checked += batch.len() as u64;
        }
        // Groups in the index that the database lacks: never added by this
        // design (only committed groups are), so any is a real fault.
        let mut cursor: u64 = 0;
        loop {
            let (next, fields): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(&gkey)
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| IndexError::Unavailable(e.to_string()))?;
            for pair in fields.chunks(2) {
                if let Ok(id) = pair[0].parse::<i64>()
                    && !known.contains(&id)
                {
                    report.problems.push(format!(
                        "group {id} is in the index but not in the database"
                    ));
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(report)
    }
}
