//! The shared group index in Redis: a cache of committed groups that every
//! replica reads in one atomic round trip.
//!
//! Layout, every key under the deployment's prefix and one hash tag per
//! threshold (so both scripts are valid on a Redis Cluster: one slot):
//!
//! | key               | type | holds                                        |
//! |-------------------|------|----------------------------------------------|
//! | `P{idx-tT}:meta`  | hash | `state` (`building`/`ready`), `buckets`      |
//! | `P{idx-tT}:g`     | hash | group id -> attributes joined by `\x1f`      |
//! | `P{idx-tT}:b:N`   | hash | 12-byte digest of a t-subset -> group id(s)  |
//!
//! A t-subset's digest is its SHA-256 (`domain::grouping`); bytes 12..16
//! pick one of `buckets` small hashes, which Redis keeps as compact listpacks:
//! a few tens of bytes per entry where a key of its own would cost about a
//! hundred.
//!
//! Only two scripts touch the index on the request path: `best.lua` (reads
//! only) and `add.lua` (idempotent, after the group's commit). Whether a
//! replica may trust what it reads is `super::health`'s business; rebuilding
//! and checking against the system of record is [`sync`]'s.

pub mod conn;
pub mod sync;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use async_trait::async_trait;
use redis::{Script, Value};

use super::{Candidate, GroupIndex, IndexError};
use crate::domain::grouping::for_each_subset_digest;
use crate::domain::{AttributeSet, GroupId, Threshold};
use conn::RedisConn;

const BEST_LUA: &str = include_str!("best.lua");
const ADD_LUA: &str = include_str!("add.lua");

/// Bytes of a subset's digest kept as the hash field.
const FIELD_BYTES: usize = 12;

pub struct RedisIndex {
    conn: Arc<RedisConn>,
    base: String,
    t: Threshold,
    best: Script,
    add: Script,
    /// The bucket count key names are computed for, as last read from meta
    /// (0: not known yet).
    buckets: AtomicU32,
    /// Replicas of the Redis server, as last seen: when there are some, an
    /// add is acknowledged only once one of them has it (`WAIT`), so that a
    /// failover to an asynchronous replica does not lose an answered group.
    replicas: AtomicUsize,
}

/// Groups per call of the add script: big enough that the call's own cost
/// is small beside the work, small enough that one call holds Redis for
/// a few milliseconds at most (Redis serves no one meanwhile).
const ADD_CHUNK: usize = 100;

/// How long an add waits for a replica's acknowledgement.
const WAIT_MS: u64 = 200;

/// The meta hash, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub ready: bool,
    pub buckets: u32,
}

/// A decision and the connection generation it was made on.
pub struct Decided {
    pub best: Option<Candidate>,
    pub generation: u64,
}

impl RedisIndex {
    pub fn new(conn: Arc<RedisConn>, prefix: &str, t: Threshold) -> Self {
        Self {
            conn,
            base: format!("{prefix}{{idx-t{}}}", t.get()),
            t,
            best: Script::new(BEST_LUA),
            add: Script::new(ADD_LUA),
            buckets: AtomicU32::new(0),
            replicas: AtomicUsize::new(0),
        }
    }

    pub fn threshold(&self) -> Threshold {
        self.t
    }

    pub fn conn(&self) -> &Arc<RedisConn> {
        &self.conn
    }

    fn meta_key(&self) -> String {
        format!("{}:meta", self.base)
    }

    fn groups_key(&self) -> String {
        format!("{}:g", self.base)
    }

    fn bucket_key(&self, b: u32) -> String {
        format!("{}:b:{}", self.base, b)
    }

    /// Runs `f` on the current connection; a connection failure drops it.
    /// Timed as `operation` (`cohort_redis_call_seconds`), in a span.
    async fn with_conn<T, F, Fut>(
        &self,
        operation: &'static str,
        f: F,
    ) -> Result<(T, u64), IndexError>
    where
        F: FnOnce(redis::aio::MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let span = tracing::debug_span!(
            "redis",
            operation,
            otel.name = %format_args!("redis.{operation}"),
            otel.kind = "client",
            db.system.name = "redis",
        );
        let call = async {
            let live = self.conn.get().await?;
            match f(live.conn).await {
                Ok(v) => Ok((v, live.generation)),
                Err(e) => Err(self.conn.failed(live.generation, &e).await),
            }
        };
        self.conn.timer().time(operation, span, call).await
    }

    /// The meta hash; None when it is missing (a new or flushed Redis).
    pub async fn meta(&self) -> Result<Option<Meta>, IndexError> {
        let key = self.meta_key();
        let ((state, buckets), _) = self
            .with_conn("meta", |mut c| async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg(&["state", "buckets"])
                    .query_async::<(Option<String>, Option<u32>)>(&mut c)
                    .await
            })
            .await?;
        Ok(match (state, buckets) {
            (Some(s), Some(b)) if b > 0 => {
                self.buckets.store(b, Ordering::Relaxed);
                Some(Meta {
                    ready: s == "ready",
                    buckets: b,
                })
            }
            _ => None,
        })
    }

    async fn bucket_count(&self) -> Result<u32, IndexError> {
        match self.buckets.load(Ordering::Relaxed) {
            0 => self
                .meta()
                .await?
                .map(|m| m.buckets)
                .ok_or_else(|| IndexError::NotReady("the index is missing".into())),
            b => Ok(b),
        }
    }

    /// Whether the meta hash is of the first design's layout (it named an
    /// epoch, and the groups lived under per-epoch keys).
    pub async fn has_epoch_layout(&self) -> Result<bool, IndexError> {
        let key = self.meta_key();
        Ok(self
            .with_conn("has_epoch_layout", |mut c| async move {
                redis::cmd("HEXISTS")
                    .arg(key)
                    .arg("epoch")
                    .query_async::<bool>(&mut c)
                    .await
            })
            .await?
            .0)
    }

    /// Creates the meta hash in state `building` unless it exists; returns
    /// the meta in force.
    pub async fn create_meta(&self, buckets: u32) -> Result<Meta, IndexError> {
        let key = self.meta_key();
        self.with_conn("create_meta", |mut c| async move {
            redis::cmd("HSETNX")
                .arg(&key)
                .arg("buckets")
                .arg(buckets)
                .query_async::<()>(&mut c)
                .await?;
            redis::cmd("HSETNX")
                .arg(&key)
                .arg("state")
                .arg("building")
                .query_async::<()>(&mut c)
                .await
        })
        .await?;
        self.meta()
            .await?
            .ok_or_else(|| IndexError::NotReady("the index meta vanished".into()))
    }

    pub async fn set_state(&self, ready: bool) -> Result<(), IndexError> {
        let key = self.meta_key();
        let state = if ready { "ready" } else { "building" };
        self.with_conn("set_state", |mut c| async move {
            redis::cmd("HSET")
                .arg(key)
                .arg("state")
                .arg(state)
                .query_async::<()>(&mut c)
                .await
        })
        .await?;
        Ok(())
    }

    /// Number of groups in the index (HLEN: O(1)).
    pub async fn group_count(&self) -> Result<u64, IndexError> {
        let key = self.groups_key();
        Ok(self
            .with_conn("group_count", |mut c| async move {
                redis::cmd("HLEN").arg(key).query_async::<u64>(&mut c).await
            })
            .await?
            .0)
    }

    /// The Redis server's identity on the current connection: its `run_id`
    /// (new at every start, so a restart or a restore from a snapshot shows)
    /// and its replication id (new at a failover), and the generation of the
    /// connection it was read on.
    pub async fn server_identity(&self) -> Result<(String, u64), IndexError> {
        let (info, g) = self
            .with_conn("server_identity", |mut c| async move {
                redis::cmd("INFO")
                    .arg("server")
                    .arg("replication")
                    .query_async::<String>(&mut c)
                    .await
            })
            .await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        self.replicas.store(
            field("connected_slaves").parse().unwrap_or(0),
            Ordering::Relaxed,
        );
        Ok((format!("{}/{}", field("run_id"), field("master_replid")), g))
    }

    /// The best group for `attrs` among those Redis holds, and the
    /// connection generation the answer came from.
    pub async fn decide(&self, attrs: &AttributeSet) -> Result<Decided, IndexError> {
        // One retry: a BUCKETS answer means our cached bucket count is stale.
        for _ in 0..2 {
            let buckets = self.bucket_count().await?;
            let mut inv = self.best.prepare_invoke();
            inv.key(self.meta_key()).key(self.groups_key());
            inv.arg(self.t.get())
                .arg(buckets)
                .arg(join(attrs.iter().map(|a| a.as_str())));
            for_each_subset_digest(attrs, self.t, |d| {
                inv.key(self.bucket_key(bucket_of(d) % buckets));
                inv.arg(&d[..FIELD_BYTES]);
            });
            let (reply, generation) = self
                .with_conn("decide", |mut c| async move {
                    inv.invoke_async::<Vec<Value>>(&mut c).await
                })
                .await?;
            match reply.first().map(value_str).unwrap_or_default().as_str() {
                "JOIN" => {
                    let id = parse_id(reply.get(1))?;
                    let stored = reply.get(2).map(value_str).unwrap_or_default();
                    let attributes = AttributeSet::from_stored(&split(&stored))
                        .map_err(|e| IndexError::Corrupt(format!("group {id}: {e}")))?;
                    return Ok(Decided {
                        best: Some(Candidate { id, attributes }),
                        generation,
                    });
                }
                "NONE" => {
                    return Ok(Decided {
                        best: None,
                        generation,
                    });
                }
                "BUCKETS" => {
                    self.buckets.store(0, Ordering::Relaxed);
                }
                "NOT_READY" => {
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
            "the index was resized during one signup".into(),
        ))
    }

    /// Adds committed groups: one script call per chunk of groups (a
    /// call costs more than the work of one group), all in one pipeline.
    pub async fn add_groups(&self, groups: &[(GroupId, AttributeSet)]) -> Result<(), IndexError> {
        if groups.is_empty() {
            return Ok(());
        }
        for _ in 0..2 {
            let buckets = self.bucket_count().await?;
            let hash = self.add.get_hash().to_owned();
            let mut pipe = redis::pipe();
            for chunk in groups.chunks(ADD_CHUNK) {
                let mut keys = vec![self.meta_key(), self.groups_key()];
                let mut args: Vec<Vec<u8>> = vec![buckets.to_string().into_bytes()];
                for (id, attrs) in chunk {
                    args.push(id.0.to_string().into_bytes());
                    args.push(join(attrs.iter().map(|a| a.as_str())).into_bytes());
                    let n_at = args.len();
                    args.push(Vec::new());
                    let mut n = 0usize;
                    for_each_subset_digest(attrs, self.t, |d| {
                        keys.push(self.bucket_key(bucket_of(d) % buckets));
                        args.push(d[..FIELD_BYTES].to_vec());
                        n += 1;
                    });
                    args[n_at] = n.to_string().into_bytes();
                }
                pipe.cmd("EVALSHA")
                    .arg(&hash)
                    .arg(keys.len())
                    .arg(keys)
                    .arg(args);
            }
            let script = ADD_LUA;
            let replicas = self.replicas.load(Ordering::Relaxed);
            let ((replies, acked), _) = self
                .with_conn("add_groups", |mut c| async move {
                    // After a restart the script cache is empty: load first
                    // (idempotent, and cheap next to the pipeline).
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(script)
                        .query_async::<String>(&mut c)
                        .await?;
                    let replies = pipe.query_async::<Vec<Vec<Value>>>(&mut c).await?;
                    let acked = if replicas > 0 {
                        redis::cmd("WAIT")
                            .arg(1)
                            .arg(WAIT_MS)
                            .query_async::<usize>(&mut c)
                            .await?
                    } else {
                        1
                    };
                    Ok((replies, acked))
                })
                .await?;
            if acked == 0 {
                return Err(IndexError::Unavailable(
                    "no Redis replica acknowledged the add".into(),
                ));
            }
            let mut resized = false;
            for r in &replies {
                match r.first().map(value_str).unwrap_or_default().as_str() {
                    "ADDED" => {}
                    "BUCKETS" => resized = true,
                    "NOT_READY" => {
                        return Err(IndexError::NotReady("the index is missing".into()));
                    }
                    other => {
                        return Err(IndexError::Corrupt(format!(
                            "unexpected add reply {other:?}"
                        )));
                    }
                }
            }
            if !resized {
                return Ok(());
            }
            self.buckets.store(0, Ordering::Relaxed);
        }
        Err(IndexError::NotReady(
            "the index was resized during an add".into(),
        ))
    }

    /// Removes every key of this index (`reindex --from-scratch`, tests).
    pub async fn drop_all(&self) -> Result<u64, IndexError> {
        self.buckets.store(0, Ordering::Relaxed);
        let pattern = format!("{}*", glob_escape(&self.base));
        let (n, _) = self
            .with_conn("drop_all", |mut c| async move {
                let mut cursor: u64 = 0;
                let mut dropped = 0u64;
                // SCAN ends when its cursor comes back to 0: bounded.
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await?;
                    if !keys.is_empty() {
                        dropped += keys.len() as u64;
                        redis::cmd("UNLINK")
                            .arg(&keys)
                            .query_async::<()>(&mut c)
                            .await?;
                    }
                    if next == 0 {
                        return Ok(dropped);
                    }
                    cursor = next;
                }
            })
            .await?;
        Ok(n)
    }
}

#[async_trait]
impl GroupIndex for RedisIndex {
    async fn best(&self, attrs: &AttributeSet) -> Result<Option<Candidate>, IndexError> {
        Ok(self.decide(attrs).await?.best)
    }

    async fn add(&self, groups: &[(GroupId, AttributeSet)]) -> Result<(), IndexError> {
        self.add_groups(groups).await
    }
}

fn bucket_of(d: &[u8; 32]) -> u32 {
    u32::from_le_bytes([d[12], d[13], d[14], d[15]])
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

pub(crate) fn join<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    let mut s = String::new();
    for p in parts {
        if !s.is_empty() {
            s.push('\x1f');
        }
        s.push_str(p);
    }
    s
}

pub(crate) fn split(s: &str) -> Vec<&str> {
    s.split('\x1f').collect()
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
