//! The shared group index in Redis.
//!
//! Layout, every key under the deployment's prefix and one hash tag per
//! threshold (so the script is valid on a Redis Cluster: one slot):
//!
//! | key                         | type | holds                                       |
//! |-----------------------------|------|---------------------------------------------|
//! | `P{idx-tT}:meta`            | hash | `epoch`, `state` (`building`/`ready`), `buckets` |
//! | `P{idx-tT}:eE:g`            | hash | group id -> attributes joined by `\x1f`     |
//! | `P{idx-tT}:eE:b:N`          | hash | 12-byte digest of a t-subset -> group id(s) |
//! | `P{idx-tT}:eE:building`     | str  | sentinel present while epoch E is built     |
//!
//! A t-subset's digest is the SHA-256 of its attributes joined by `\x1f`;
//! its bytes 12..16 pick one of `buckets` small hashes, which Redis keeps as
//! compact listpacks: a few tens of bytes per entry where a key of its own
//! would cost about a hundred.
//!
//! Loss is detected, never papered over: the meta hash names the epoch, the
//! system of record keeps the same epoch, and the script refuses to decide
//! when meta is missing (Redis restarted or flushed) or not `ready`. A
//! rebuild takes a new epoch from the system of record (which waits for
//! signups in flight and then refuses any decided against the old epoch),
//! builds the new keys while nobody reads them, and flips `meta` to ready
//! only if its sentinel survived, so a flush mid-build cannot leave a partial
//! index marked ready.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{RedisResult, Script, Value};
use sha2::{Digest, Sha256};

use super::{Decision, Epoch, GroupIndex, IndexError, IndexSource};
use crate::domain::grouping::for_each_subset;
use crate::domain::{AttributeSet, GroupId, Threshold};

const ASSIGN_LUA: &str = include_str!("assign.lua");

/// Flips a finished build to ready, only if its sentinel is still there and
/// no other build took over the meta hash meanwhile.
const FINISH_LUA: &str = r#"#!lua
-- KEYS[1] meta, KEYS[2] sentinel of the build; ARGV[1] epoch, ARGV[2] buckets
if redis.call('EXISTS', KEYS[2]) == 0 then return 'LOST' end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 'SUPERSEDED' end
redis.call('HSET', KEYS[1], 'state', 'ready', 'buckets', ARGV[2])
redis.call('DEL', KEYS[2])
return 'OK'
"#;

/// Bytes of a subset's digest kept as the hash field.
const FIELD_BYTES: usize = 12;
/// Groups read from the system of record per rebuild batch.
const REBUILD_BATCH: usize = 20_000;
/// Target entries per bucket: listpack lookups stay short, and far below
/// `hash-max-listpack-entries` (512), where a bucket would stop being compact.
const ENTRIES_PER_BUCKET: u64 = 128;

pub struct RedisIndex {
    conn: ConnectionManager,
    base: String,
    t: Threshold,
    min_buckets: u32,
    script: Script,
    finish: Script,
    /// The epoch and bucket count key names are computed for, cached.
    current: RwLock<Option<Meta>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    epoch: Epoch,
    buckets: u32,
}

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub epoch: Epoch,
    pub groups: u64,
    pub buckets: u32,
    pub elapsed: Duration,
}

/// Every difference between the index and the system of record.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub groups_checked: u64,
    pub problems: Vec<String>,
}

/// Connects with timeouts, so a dead Redis fails a request instead of
/// hanging it.
pub async fn connect(url: &str) -> RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_with_config(client, config).await
}

fn unavailable(e: redis::RedisError) -> IndexError {
    IndexError::Unavailable(e.to_string())
}

impl RedisIndex {
    pub fn new(conn: ConnectionManager, prefix: &str, t: Threshold, min_buckets: u32) -> Self {
        Self {
            conn,
            base: format!("{prefix}{{idx-t{}}}", t.get()),
            t,
            min_buckets: min_buckets.max(1),
            script: Script::new(ASSIGN_LUA),
            finish: Script::new(FINISH_LUA),
            current: RwLock::new(None),
        }
    }

    pub fn threshold(&self) -> Threshold {
        self.t
    }

    fn meta_key(&self) -> String {
        format!("{}:meta", self.base)
    }

    fn groups_key(&self, e: Epoch) -> String {
        format!("{}:e{}:g", self.base, e.0)
    }

    fn bucket_key(&self, e: Epoch, b: u32) -> String {
        format!("{}:e{}:b:{}", self.base, e.0, b)
    }

    fn sentinel_key(&self, e: Epoch) -> String {
        format!("{}:e{}:building", self.base, e.0)
    }

    /// Reads meta from Redis; None unless it is ready.
    async fn load_meta(&self) -> Result<Option<Meta>, IndexError> {
        let mut conn = self.conn.clone();
        let (epoch, state, buckets): (Option<i64>, Option<String>, Option<u32>) =
            redis::cmd("HMGET")
                .arg(self.meta_key())
                .arg(&["epoch", "state", "buckets"])
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        let meta = match (epoch, state.as_deref(), buckets) {
            (Some(e), Some("ready"), Some(b)) if b > 0 => Some(Meta {
                epoch: Epoch(e),
                buckets: b,
            }),
            _ => None,
        };
        *self.current.write().expect("meta lock poisoned") = meta;
        Ok(meta)
    }

    async fn meta(&self) -> Result<Meta, IndexError> {
        if let Some(m) = *self.current.read().expect("meta lock poisoned") {
            return Ok(m);
        }
        self.load_meta()
            .await?
            .ok_or_else(|| IndexError::NotReady("the index is missing or being rebuilt".into()))
    }

    /// The epoch Redis currently serves, if ready (for `verify` and tests).
    pub async fn ready_epoch(&self) -> Result<Option<Epoch>, IndexError> {
        Ok(self.load_meta().await?.map(|m| m.epoch))
    }

    async fn run_script(
        &self,
        meta: Meta,
        attrs: &AttributeSet,
        found_with: Option<GroupId>,
    ) -> Result<Vec<Value>, IndexError> {
        let mut inv = self.script.prepare_invoke();
        inv.key(self.meta_key()).key(self.groups_key(meta.epoch));
        inv.arg(meta.epoch.0)
            .arg(self.t.get())
            .arg(found_with.map(|g| g.0.to_string()).unwrap_or_default())
            .arg(join(attrs.iter().map(|a| a.as_str())));
        subset_digests(attrs, self.t, |field, bucket| {
            inv.key(self.bucket_key(meta.epoch, bucket % meta.buckets));
            inv.arg(field);
        });
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(|e| {
            if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) {
                IndexError::Corrupt(e.to_string())
            } else {
                unavailable(e)
            }
        })
    }

    /// Rebuilds the index from the system of record into a new epoch and
    /// switches to it. Returns None when another process holds the rebuild
    /// lock (it is rebuilding; nothing to do here).
    pub async fn rebuild(
        &self,
        source: &dyn IndexSource,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Option<RebuildReport>, IndexError> {
        let started = std::time::Instant::now();
        let Some(_lock) = source.lock_rebuild(self.t).await? else {
            return Ok(None);
        };
        let mut conn = self.conn.clone();
        // Stop new decisions first, so that advancing the epoch below (which
        // waits for the signups holding the old one) is not starved by more.
        redis::cmd("HSET")
            .arg(self.meta_key())
            .arg(&["state", "building"])
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        // From here on the system of record refuses every signup decided
        // against an older epoch, and every group committed is visible.
        let epoch = source.advance_epoch(self.t).await?;
        let total = source.group_count().await?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "rebuild: epoch advanced"
        );
        let buckets = bucket_count(total, self.t, self.min_buckets);
        // Keys of this epoch number may survive from a system of record
        // restored to an older state (its epoch sequence went back): a new
        // build starts from nothing, or it would merge with them.
        self.unlink_matching(&format!("{}:e{}:*", glob_escape(&self.base), epoch.0), None)
            .await?;
        redis::pipe()
            .cmd("HSET")
            .arg(self.meta_key())
            .arg(&["epoch", &epoch.0.to_string(), "state", "building"])
            .ignore()
            .cmd("SET")
            .arg(self.sentinel_key(epoch))
            .arg(1)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        *self.current.write().expect("meta lock poisoned") = None;
        tracing::info!(
            epoch = epoch.0,
            groups = total,
            buckets,
            "index rebuild started"
        );

        let gkey = self.groups_key(epoch);
        let mut after = None;
        let mut done = 0u64;
        let mut overlaps = false;
        // One batch is in flight in Redis while the next is read and built:
        // the rebuild runs at the speed of the slower side, not their sum.
        let mut in_flight: Option<tokio::task::JoinHandle<Result<bool, IndexError>>> = None;
        loop {
            let batch = source.groups_after(after, REBUILD_BATCH).await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.0);
            let (pipe, expected) = self.batch_pipeline(epoch, buckets, &gkey, &batch);
            if let Some(prev) = in_flight.take() {
                overlaps |= prev
                    .await
                    .map_err(|e| IndexError::Unavailable(e.to_string()))??;
            }
            let mut c = conn.clone();
            in_flight = Some(tokio::spawn(async move {
                let added: Vec<usize> = pipe.query_async(&mut c).await.map_err(unavailable)?;
                // Fewer new fields than sent: a slot was already taken, by a
                // group of an earlier batch sharing a t-subset.
                Ok(added != expected)
            }));
            done += batch.len() as u64;
            progress(done, total.max(done));
        }
        if let Some(prev) = in_flight.take() {
            overlaps |= prev
                .await
                .map_err(|e| IndexError::Unavailable(e.to_string()))??;
        }
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "rebuild: groups written"
        );
        if overlaps {
            // Stored groups overlap (possible after a threshold change): the
            // fast path overwrote some slots. Put every group's id back in
            // each of its slots, as the script keeps them.
            tracing::warn!(
                epoch = epoch.0,
                "stored groups share t-subsets; repairing their slots"
            );
            self.repair_slots(source, epoch, buckets).await?;
        }

        let outcome: String = self
            .finish
            .key(self.meta_key())
            .key(self.sentinel_key(epoch))
            .arg(epoch.0)
            .arg(buckets)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if outcome != "OK" {
            return Err(IndexError::NotReady(format!(
                "rebuild of epoch {} did not complete: {outcome}",
                epoch.0
            )));
        }
        *self.current.write().expect("meta lock poisoned") = Some(Meta { epoch, buckets });
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "rebuild: switched"
        );
        let dropped = self.drop_other_epochs(epoch).await?;
        tracing::info!(
            epoch = epoch.0,
            groups = done,
            dropped_keys = dropped,
            "index rebuild finished"
        );
        Ok(Some(RebuildReport {
            epoch,
            groups: done,
            buckets,
            elapsed: started.elapsed(),
        }))
    }

    /// One pipeline writing a batch of groups: their attributes, then one
    /// multi-field HSET per bucket (one command per bucket, not per subset:
    /// Redis spends most of a small command on dispatch). Returns the
    /// pipeline and the number of new fields each bucket command should add.
    fn batch_pipeline(
        &self,
        epoch: Epoch,
        buckets: u32,
        gkey: &str,
        batch: &[(GroupId, AttributeSet)],
    ) -> (redis::Pipeline, Vec<usize>) {
        let mut pipe = redis::pipe();
        for chunk in batch.chunks(1_000) {
            pipe.cmd("HSET").arg(gkey);
            for (id, attrs) in chunk {
                pipe.arg(id.0).arg(join(attrs.iter().map(|a| a.as_str())));
            }
            pipe.ignore();
        }
        // (bucket, digest, id) for every subset of the batch, sorted, so each
        // bucket's fields come out together and equal digests side by side.
        let mut entries: Vec<(u32, [u8; FIELD_BYTES], i64)> = Vec::with_capacity(batch.len() * 24);
        for (id, attrs) in batch {
            subset_digests(attrs, self.t, |field, bucket| {
                let f: [u8; FIELD_BYTES] = field.try_into().expect("field length");
                entries.push((bucket % buckets, f, id.0));
            });
        }
        entries.sort_unstable();
        let mut expected = Vec::new();
        let mut ids = String::new();
        let mut i = 0;
        while i < entries.len() {
            let bucket = entries[i].0;
            pipe.cmd("HSET").arg(self.bucket_key(epoch, bucket));
            let mut fields = 0;
            while i < entries.len() && entries[i].0 == bucket {
                // Equal digests within the batch share one field.
                ids.clear();
                let field = entries[i].1;
                while i < entries.len() && entries[i].0 == bucket && entries[i].1 == field {
                    if !ids.is_empty() {
                        ids.push(',');
                    }
                    ids.push_str(itoa::Buffer::new().format(entries[i].2));
                    i += 1;
                }
                pipe.arg(&field[..]).arg(ids.as_str());
                fields += 1;
            }
            expected.push(fields);
        }
        (pipe, expected)
    }

    /// Slow and exact: makes every slot of every group hold its id.
    async fn repair_slots(
        &self,
        source: &dyn IndexSource,
        epoch: Epoch,
        buckets: u32,
    ) -> Result<(), IndexError> {
        let mut conn = self.conn.clone();
        let mut after = None;
        loop {
            let batch = source.groups_after(after, REBUILD_BATCH).await?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            after = Some(last.0);
            for (id, attrs) in &batch {
                let mut slots = Vec::new();
                subset_digests(attrs, self.t, |field, bucket| {
                    slots.push((self.bucket_key(epoch, bucket % buckets), field.to_vec()));
                });
                for (key, field) in slots {
                    let cur: Option<String> = redis::cmd("HGET")
                        .arg(&key)
                        .arg(&field)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    let own = id.0.to_string();
                    let val = match cur {
                        Some(c) if c.split(',').any(|x| x == own) => continue,
                        Some(c) => format!("{c},{own}"),
                        None => own,
                    };
                    redis::cmd("HSET")
                        .arg(&key)
                        .arg(&field)
                        .arg(val)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(unavailable)?;
                }
            }
        }
    }

    /// Unlinks every key of an epoch other than `keep` (old generations and
    /// abandoned builds).
    async fn drop_other_epochs(&self, keep: Epoch) -> Result<u64, IndexError> {
        let keep_prefix = format!("{}:e{}:", self.base, keep.0);
        self.unlink_matching(
            &format!("{}:e*", glob_escape(&self.base)),
            Some(&keep_prefix),
        )
        .await
    }

    /// Unlinks the keys matching `pattern`, except those starting with
    /// `keep`. SCAN ends when its cursor comes back to 0: the loop is bounded.
    async fn unlink_matching(&self, pattern: &str, keep: Option<&str>) -> Result<u64, IndexError> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut dropped = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let doomed: Vec<&String> = keys
                .iter()
                .filter(|k| keep.is_none_or(|p| !k.starts_with(p)))
                .collect();
            if !doomed.is_empty() {
                dropped += doomed.len() as u64;
                redis::cmd("UNLINK")
                    .arg(&doomed)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(unavailable)?;
            }
            if next == 0 {
                return Ok(dropped);
            }
            cursor = next;
        }
    }

    /// Compares the index with the system of record, group by group and
    /// subset by subset.
    pub async fn verify(&self, source: &dyn IndexSource) -> Result<VerifyReport, IndexError> {
        let mut report = VerifyReport::default();
        let Some(meta) = self.load_meta().await? else {
            report
                .problems
                .push("the index is missing or not ready".into());
            return Ok(report);
        };
        let expected = source.current_epoch(self.t).await?;
        if expected != Some(meta.epoch) {
            report.problems.push(format!(
                "index epoch {} differs from the system of record's {:?}",
                meta.epoch.0,
                expected.map(|e| e.0)
            ));
        }
        let mut conn = self.conn.clone();
        let gkey = self.groups_key(meta.epoch);
        let mut known = HashSet::new();
        let mut after = None;
        loop {
            let batch = source.groups_after(after, REBUILD_BATCH).await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.0);
            let mut pipe = redis::pipe();
            let mut expect = Vec::new();
            for (id, attrs) in &batch {
                known.insert(id.0);
                pipe.cmd("HGET").arg(&gkey).arg(id.0);
                expect.push((*id, None));
                subset_digests(attrs, self.t, |field, bucket| {
                    pipe.cmd("HGET")
                        .arg(self.bucket_key(meta.epoch, bucket % meta.buckets))
                        .arg(field);
                    expect.push((*id, Some(())));
                });
            }
            let got: Vec<Option<String>> =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
            let attrs_of: HashMap<GroupId, &AttributeSet> =
                batch.iter().map(|(i, a)| (*i, a)).collect();
            let mut bad_subsets: HashMap<GroupId, usize> = HashMap::new();
            for ((id, is_subset), v) in expect.into_iter().zip(got) {
                match is_subset {
                    None => {
                        let want = join(attrs_of[&id].iter().map(|a| a.as_str()));
                        match v {
                            None => report.problems.push(format!("group {id} is missing from the index")),
                            Some(s) if s != want => report.problems.push(format!(
                                "group {id} has attributes {:?} in the index but {:?} in the database",
                                s.replace('\x1f', ","),
                                want.replace('\x1f', ",")
                            )),
                            _ => {}
                        }
                    }
                    Some(()) => {
                        let ok = v.is_some_and(|s| s.split(',').any(|x| x == id.0.to_string()));
                        if !ok {
                            *bad_subsets.entry(id).or_default() += 1;
                        }
                    }
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
        // Groups in the index that the database lacks: a founding whose
        // transaction never committed. Harmless (the next joiner creates the
        // row) but reported, and a rebuild drops it.
        let mut cursor: u64 = 0;
        loop {
            let (next, fields): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(&gkey)
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
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

    /// Removes every key of this index (tests and `reindex --from-scratch`).
    pub async fn drop_all(&self) -> Result<(), IndexError> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL")
            .arg(self.meta_key())
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        self.drop_other_epochs(Epoch(-1)).await?;
        *self.current.write().expect("meta lock poisoned") = None;
        Ok(())
    }
}

#[async_trait]
impl GroupIndex for RedisIndex {
    async fn decide(
        &self,
        attrs: &AttributeSet,
        found_with: Option<GroupId>,
    ) -> Result<(Decision, Option<Epoch>), IndexError> {
        let mut meta = self.meta().await?;
        // One retry: a STALE answer means another process rebuilt the index
        // and our cached key names are of the old epoch.
        for _ in 0..2 {
            let reply = self.run_script(meta, attrs, found_with).await?;
            let word = reply.first().map(value_str).unwrap_or_default();
            match word.as_str() {
                "JOIN" => {
                    let id = parse_id(reply.get(1))?;
                    let stored = reply.get(2).map(value_str).unwrap_or_default();
                    let list: Vec<&str> = stored.split('\x1f').collect();
                    let attributes = AttributeSet::from_stored(&list)
                        .map_err(|e| IndexError::Corrupt(format!("group {id}: {e}")))?;
                    return Ok((Decision::Join { id, attributes }, Some(meta.epoch)));
                }
                "NONE" => return Ok((Decision::NoMatch, Some(meta.epoch))),
                "FOUNDED" => {
                    return Ok((
                        Decision::Founded {
                            id: parse_id(reply.get(1))?,
                        },
                        Some(meta.epoch),
                    ));
                }
                "STALE" => {
                    meta = self
                        .load_meta()
                        .await?
                        .ok_or_else(|| IndexError::NotReady("the index is being rebuilt".into()))?;
                }
                "NOT_READY" => {
                    *self.current.write().expect("meta lock poisoned") = None;
                    return Err(IndexError::NotReady(
                        "the index is missing or being rebuilt".into(),
                    ));
                }
                other => {
                    return Err(IndexError::Corrupt(format!(
                        "unexpected script reply {other:?}"
                    )));
                }
            }
        }
        Err(IndexError::NotReady(
            "the index changed twice during one signup".into(),
        ))
    }

    async fn check_ready(&self) -> Result<(), IndexError> {
        match self.load_meta().await? {
            Some(_) => Ok(()),
            None => Err(IndexError::NotReady(
                "the index is missing or being rebuilt".into(),
            )),
        }
    }
}

fn value_str(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

fn parse_id(v: Option<&Value>) -> Result<GroupId, IndexError> {
    v.map(value_str)
        .and_then(|s| s.parse().ok())
        .map(GroupId)
        .ok_or_else(|| IndexError::Corrupt("script returned no group id".into()))
}

fn join<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    let mut s = String::new();
    for p in parts {
        if !s.is_empty() {
            s.push('\x1f');
        }
        s.push_str(p);
    }
    s
}

/// Calls `f(field, bucket_hash)` for each t-subset of `attrs`.
fn subset_digests(attrs: &AttributeSet, t: Threshold, mut f: impl FnMut(&[u8], u32)) {
    let items = attrs.as_slice();
    let mut buf = String::new();
    for_each_subset(items.len(), t.get(), |s| {
        buf.clear();
        for (n, &i) in s.iter().enumerate() {
            if n > 0 {
                buf.push('\x1f');
            }
            buf.push_str(items[i].as_str());
        }
        let d = Sha256::digest(buf.as_bytes());
        let bucket = u32::from_le_bytes([d[12], d[13], d[14], d[15]]);
        f(&d[..FIELD_BYTES], bucket);
    });
}

/// Enough buckets for the expected entries, as a power of two, at least the
/// configured minimum. Assumes groups of about 6 attributes for the estimate;
/// a planned reindex resizes when the population outgrows it.
fn bucket_count(groups: u64, t: Threshold, min: u32) -> u32 {
    let per_group = crate::domain::grouping::binomial(6, t.get()).max(1);
    let want = (groups.saturating_mul(per_group) / ENTRIES_PER_BUCKET).max(u64::from(min));
    let pow = want.next_power_of_two().min(1 << 24);
    u32::try_from(pow).unwrap_or(1 << 24)
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
