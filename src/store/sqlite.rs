//! The embedded store: one SQLite file under the data directory, for the
//! single-process mode. Every write is one transaction; `synchronous=FULL`
//! so an acknowledged signup survives a crash or power loss.
//!
//! rusqlite is blocking, so each call runs on tokio's blocking pool with the
//! one connection behind a mutex (SQLite has a single writer anyway).

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Committed, Credentials, GroupInfo, GroupPage, Member, NewUser, Plan, PoolStats, Replay, Store,
    StoreError, UserRecord, best_of,
};
use crate::domain::grouping::subset_keys;
use crate::domain::{AttributeSet, GroupId, Threshold, UserId, Username};
use crate::index::Candidate;

mod embedded {
    refinery::embed_migrations!("migrations/sqlite");
}

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    t: Threshold,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn attrs_to_json(a: &AttributeSet) -> String {
    serde_json::to_string(&a.to_strings()).expect("strings serialise")
}

fn attrs_from_json(s: &str) -> Result<AttributeSet, StoreError> {
    let v: Vec<String> = serde_json::from_str(s).map_err(corrupt)?;
    AttributeSet::from_stored(&v).map_err(corrupt)
}

/// Attributes read back for display, trusted as stored (see
/// `AttributeSet::trusted`).
fn attrs_trusted(s: &str) -> Result<AttributeSet, StoreError> {
    serde_json::from_str::<Vec<String>>(s)
        .map(AttributeSet::trusted)
        .map_err(corrupt)
}

fn time_from(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(corrupt)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates it.
    pub fn open(path: &Path, t: Threshold) -> Result<Self, String> {
        let mut conn =
            Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
             PRAGMA busy_timeout = 5000;",
        )
        .map_err(|e| format!("cannot configure {}: {e}", path.display()))?;
        embedded::migrations::runner()
            .run(&mut conn)
            .map_err(|e| format!("migration of {} failed: {e}", path.display()))?;
        if let Some(n) = complete_subsets(&mut conn).map_err(|e| {
            format!(
                "cannot complete the subset table of {}: {e}",
                path.display()
            )
        })? {
            tracing::info!(
                groups = n,
                "completed the subset table an interrupted import left pending"
            );
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            t,
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .map_err(|_| unavailable("database mutex poisoned"))?;
            f(&mut c)
        })
        .await
        .map_err(unavailable)?
    }
}

fn is_unique(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// See `postgres::backfill_subsets`: the same, in the caller's transaction.
fn backfill_subsets(tx: &rusqlite::Transaction<'_>, t: Threshold) -> Result<u64, StoreError> {
    write_subsets(tx, t, i64::MIN)
}

/// Groups whose subset rows `write_subsets` reads, sorts and writes at a
/// time: a few hundred MB of keys at most.
const SUBSET_CHUNK_GROUPS: i64 = 250_000;

/// Page cache while `write_subsets` runs, in KiB.
const WRITE_CACHE_KIB: i64 = 1 << 20;

/// Writes the subset rows of the groups from id `from` on, in the caller's
/// transaction. Keys go in sorted, so the table is written page after page
/// where random keys would dirty nearly every page of it. A key already
/// taken goes to `group_subset_overlaps` (the group stays findable and
/// nothing new can overlap it): with keys sorted by (key, id) and chunks
/// in id order, the smallest id keeps the main row, as an insert in id
/// order would give.
fn write_subsets(
    tx: &rusqlite::Transaction<'_>,
    t: Threshold,
    from: i64,
) -> Result<u64, StoreError> {
    let deployed = t.get() as i64;
    let mut read = tx
        .prepare("SELECT id, attributes FROM groups WHERE id >= ?1 AND id < ?2 ORDER BY id")
        .map_err(unavailable)?;
    let mut writer = SubsetWriter::new(tx, deployed)?;
    let (first, last): (Option<i64>, Option<i64>) = tx
        .query_row(
            "SELECT min(id), max(id) FROM groups WHERE id >= ?1",
            [from],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(unavailable)?;
    let (Some(mut start), Some(last)) = (first, last) else {
        return Ok(0);
    };
    // The table is written page after page; with SQLite's default cache
    // (2 MB) every page would go out to the WAL and be read back from it.
    let cache: i64 = tx
        .query_row("PRAGMA cache_size", [], |r| r.get(0))
        .map_err(unavailable)?;
    tx.execute_batch(&format!("PRAGMA cache_size = -{WRITE_CACHE_KIB}"))
        .map_err(unavailable)?;
    let mut groups = 0u64;
    while start <= last {
        let end = start.saturating_add(SUBSET_CHUNK_GROUPS);
        let mut rows: Vec<(u128, i64)> = Vec::new();
        let mut q = read.query(params![start, end]).map_err(unavailable)?;
        while let Some(r) = q.next().map_err(unavailable)? {
            let id: i64 = r.get(0).map_err(unavailable)?;
            let a: String = r.get(1).map_err(unavailable)?;
            let attrs = attrs_from_json(&a)?;
            rows.extend(
                subset_keys(&attrs, t)
                    .into_iter()
                    .map(|k| (u128::from_be_bytes(k), id)),
            );
            groups += 1;
        }
        rows.sort_unstable();
        for run in rows.chunks(ROWS_PER_INSERT) {
            writer.write(run)?;
        }
        start = end;
    }
    tx.execute_batch(&format!("PRAGMA cache_size = {cache}"))
        .map_err(unavailable)?;
    Ok(groups)
}

impl SqliteStore {
    /// Changes the data directory's threshold (the server stopped: the
    /// caller holds the directory's lock): rebuilds the subset table for
    /// the new one, in one transaction. Existing groups stay as they are;
    /// after a lowering, those that now overlap keep their keys as overlap
    /// rows, as in Postgres. Returns the old threshold and the groups.
    pub async fn set_threshold(&self, t: Threshold) -> Result<(usize, u64), StoreError> {
        self.with(move |c| {
            without_fk_checks(c, |c| {
                let tx = c.transaction().map_err(unavailable)?;
                let old: Option<i64> = tx
                    .query_row("SELECT threshold FROM deployment", [], |r| r.get(0))
                    .optional()
                    .map_err(unavailable)?;
                tx.execute_batch("DELETE FROM group_subsets; DELETE FROM group_subset_overlaps;")
                    .map_err(unavailable)?;
                let n = write_subsets(&tx, t, i64::MIN)?;
                // Every group's rows are written: nothing left pending.
                tx.execute(
                    "INSERT INTO deployment (singleton, threshold) VALUES (1, ?1) \
                     ON CONFLICT (singleton) DO UPDATE SET threshold = excluded.threshold, \
                     subsets_from = NULL",
                    [t.get() as i64],
                )
                .map_err(unavailable)?;
                tx.commit().map_err(unavailable)?;
                Ok((old.unwrap_or(0) as usize, n))
            })
        })
        .await
    }
}

/// Rows a statement of `SubsetWriter` inserts at once.
const ROWS_PER_INSERT: usize = 64;

/// Inserts sorted (key, group id) rows, `ROWS_PER_INSERT` a statement: one
/// statement keeps its cursor on the page the last row went to, where a
/// statement a row descends the tree from the root for each (a third less
/// time for the rows of a 10^6-user import). A key already taken goes to
/// `group_subset_overlaps`: when a statement inserted fewer rows than it
/// had, its rows are looked at one by one.
struct SubsetWriter<'c> {
    t: i64,
    many: rusqlite::CachedStatement<'c>,
    one: rusqlite::CachedStatement<'c>,
    owner: rusqlite::CachedStatement<'c>,
    extra: rusqlite::CachedStatement<'c>,
}

impl<'c> SubsetWriter<'c> {
    fn new(c: &'c Connection, t: i64) -> Result<Self, StoreError> {
        let values = vec!["(?, ?, ?)"; ROWS_PER_INSERT].join(", ");
        Ok(Self {
            t,
            many: c
                .prepare_cached(&format!(
                    "INSERT OR IGNORE INTO group_subsets (threshold, subset, group_id) VALUES {values}"
                ))
                .map_err(unavailable)?,
            one: c
                .prepare_cached(
                    "INSERT OR IGNORE INTO group_subsets (threshold, subset, group_id) VALUES (?1, ?2, ?3)",
                )
                .map_err(unavailable)?,
            owner: c
                .prepare_cached(
                    "SELECT group_id FROM group_subsets WHERE threshold = ?1 AND subset = ?2",
                )
                .map_err(unavailable)?,
            extra: c
                .prepare_cached(
                    "INSERT OR IGNORE INTO group_subset_overlaps (threshold, subset, group_id) VALUES (?1, ?2, ?3)",
                )
                .map_err(unavailable)?,
        })
    }

    fn write(&mut self, rows: &[(u128, i64)]) -> Result<(), StoreError> {
        let inserted = if rows.len() == ROWS_PER_INSERT {
            for (i, (k, id)) in rows.iter().enumerate() {
                let k = k.to_be_bytes();
                self.many
                    .raw_bind_parameter(3 * i + 1, self.t)
                    .and_then(|_| self.many.raw_bind_parameter(3 * i + 2, &k[..]))
                    .and_then(|_| self.many.raw_bind_parameter(3 * i + 3, id))
                    .map_err(unavailable)?;
            }
            self.many.raw_execute().map_err(unavailable)?
        } else {
            let mut n = 0;
            for (k, id) in rows {
                n += self
                    .one
                    .execute(params![self.t, &k.to_be_bytes()[..], id])
                    .map_err(unavailable)?;
            }
            n
        };
        if inserted == rows.len() {
            return Ok(());
        }
        // Some key was taken (before, or by an earlier row here): the rows
        // whose key another group holds are overlaps.
        for (k, id) in rows {
            let k = k.to_be_bytes();
            let owner: i64 = self
                .owner
                .query_row(params![self.t, &k[..]], |r| r.get(0))
                .map_err(unavailable)?;
            if owner != *id {
                self.extra
                    .execute(params![self.t, &k[..], id])
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }
}

/// Writes the subset rows of the groups an import left pending
/// (`deployment.subsets_from`, see `sqlite_import`) and clears the mark, in
/// one transaction; `None` when nothing was pending.
pub(crate) fn complete_subsets(c: &mut Connection) -> Result<Option<u64>, StoreError> {
    let pending: Option<(i64, i64)> = c
        .query_row(
            "SELECT subsets_from, threshold FROM deployment WHERE subsets_from IS NOT NULL",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(unavailable)?;
    let Some((from, deployed)) = pending else {
        return Ok(None);
    };
    let t = Threshold::new(deployed as usize, deployed as usize).map_err(corrupt)?;
    without_fk_checks(c, |c| {
        let tx = c.transaction().map_err(unavailable)?;
        let groups = write_subsets(&tx, t, from)?;
        tx.execute("UPDATE deployment SET subsets_from = NULL", [])
            .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(Some(groups))
    })
}

/// Runs `f` with this connection's foreign-key checks off, then as they
/// were. For `write_subsets`: every row it writes names a group it has just
/// read in the same transaction, and groups are never deleted, so the
/// check (a `groups` lookup a row, a third of the time of writing the rows)
/// cannot fail. The pragma is a no-op inside a transaction: `f` opens its
/// own.
fn without_fk_checks<T>(
    c: &mut Connection,
    f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let was: bool = c
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .map_err(unavailable)?;
    c.execute_batch("PRAGMA foreign_keys = OFF")
        .map_err(unavailable)?;
    let out = f(c);
    if was {
        c.execute_batch("PRAGMA foreign_keys = ON")
            .map_err(unavailable)?;
    }
    out
}

fn read_replay(c: &Connection, key: &str) -> Result<Option<Replay>, StoreError> {
    let cutoff = (Utc::now() - chrono::Duration::hours(24)).to_rfc3339();
    let row = c
        .query_row(
            "SELECT k.fingerprint, k.founded, u.id, u.username, u.attributes, u.group_id, \
                    u.created_at, g.attributes, u.token_version \
             FROM idempotency_keys k JOIN users u ON u.id = k.user_id \
             JOIN groups g ON g.id = u.group_id \
             WHERE k.key = ?1 AND k.created_at >= ?2",
            params![key, cutoff],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, i64>(8)?,
                ))
            },
        )
        .optional()
        .map_err(unavailable)?;
    row.map(|(fp, founded, id, u, a, g, t, ga, ver)| {
        Ok(Replay {
            fingerprint: fp,
            committed: Committed {
                founded,
                user: UserRecord {
                    id: UserId(id),
                    token_version: ver,
                    username: Username::parse(&u).map_err(corrupt)?,
                    attributes: attrs_from_json(&a)?,
                    group_id: GroupId(g),
                    created_at: time_from(&t)?,
                },
                group_attributes: attrs_from_json(&ga)?,
            },
        })
    })
    .transpose()
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable))
            .await
    }

    async fn username_taken(&self, username: &Username) -> Result<bool, StoreError> {
        let u = username.as_str().to_owned();
        self.with(move |c| {
            c.query_row("SELECT 1 FROM users WHERE username = ?1", [u], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
                .map_err(unavailable)
        })
        .await
    }

    async fn ensure_deployment(&self, t: Threshold) -> Result<usize, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(unavailable)?;
            let created = tx
                .execute(
                    "INSERT OR IGNORE INTO deployment (singleton, threshold) VALUES (1, ?1)",
                    [t.get() as i64],
                )
                .map_err(unavailable)?;
            if created == 1 {
                backfill_subsets(&tx, t)?;
            }
            let deployed: i64 = tx
                .query_row("SELECT threshold FROM deployment", [], |r| r.get(0))
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(deployed as usize)
        })
        .await
    }

    async fn best_group(&self, attrs: &AttributeSet) -> Result<Option<Candidate>, StoreError> {
        let keys = subset_keys(attrs, self.t);
        let t = self.t;
        let attrs = attrs.clone();
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT g.id, g.attributes FROM groups g WHERE g.id IN ( \
                       SELECT group_id FROM group_subsets WHERE threshold = ?1 AND subset = ?2 \
                       UNION SELECT group_id FROM group_subset_overlaps WHERE threshold = ?1 AND subset = ?2)",
                )
                .map_err(unavailable)?;
            let mut candidates: Vec<(GroupId, AttributeSet)> = Vec::new();
            for k in keys {
                let rows = stmt
                    .query_map(params![t.get() as i64, &k[..]], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                    })
                    .map_err(unavailable)?;
                for row in rows {
                    let (id, a) = row.map_err(unavailable)?;
                    if !candidates.iter().any(|(g, _)| g.0 == id) {
                        candidates.push((GroupId(id), attrs_from_json(&a)?));
                    }
                }
            }
            Ok(best_of(candidates, &attrs, t))
        })
        .await
    }

    async fn commit_signup(&self, user: &NewUser) -> Result<Committed, StoreError> {
        let user = user.clone();
        let t = self.t;
        self.with(move |c| {
            let now = Utc::now();
            let stamp = now.to_rfc3339();
            let tx = c.transaction().map_err(unavailable)?;
            let deployed: i64 = tx
                .query_row("SELECT threshold FROM deployment", [], |r| r.get(0))
                .map_err(unavailable)?;
            if deployed as usize != t.get() {
                return Err(StoreError::ThresholdMismatch {
                    deployed: deployed as usize,
                    configured: t.get(),
                });
            }
            let (group_id, group_attributes, founded) = match &user.plan {
                Plan::Join(c) => (c.id, c.attributes.clone(), false),
                Plan::Found => {
                    tx.execute(
                        "INSERT INTO groups (attributes, created_at) VALUES (?1, ?2)",
                        params![attrs_to_json(&user.attributes), stamp],
                    )
                    .map_err(unavailable)?;
                    let id = tx.last_insert_rowid();
                    let mut ins = tx
                        .prepare_cached(
                            "INSERT INTO group_subsets (threshold, subset, group_id) VALUES (?1, ?2, ?3)",
                        )
                        .map_err(unavailable)?;
                    for k in subset_keys(&user.attributes, t) {
                        ins.execute(params![t.get() as i64, &k[..], id]).map_err(|e| {
                            if is_unique(&e) {
                                StoreError::Overlap
                            } else {
                                unavailable(e)
                            }
                        })?;
                    }
                    (GroupId(id), user.attributes.clone(), true)
                }
            };
            tx.execute(
                "INSERT INTO users (username, password_hash, attributes, group_id, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    user.username.as_str(),
                    user.password_hash,
                    attrs_to_json(&user.attributes),
                    group_id.0,
                    stamp
                ],
            )
            .map_err(|e| {
                if is_unique(&e) {
                    StoreError::UsernameTaken
                } else {
                    unavailable(e)
                }
            })?;
            let user_id = tx.last_insert_rowid();
            if let Some(k) = &user.idempotency {
                let cutoff = (now - chrono::Duration::hours(24)).to_rfc3339();
                tx.execute(
                    "DELETE FROM idempotency_keys WHERE key = ?1 AND created_at < ?2",
                    params![k.key, cutoff],
                )
                .map_err(unavailable)?;
                tx.execute(
                    "INSERT INTO idempotency_keys (key, fingerprint, user_id, founded, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![k.key, k.fingerprint, user_id, founded, stamp],
                )
                .map_err(|e| {
                    if is_unique(&e) {
                        StoreError::IdempotencyKeyTaken
                    } else {
                        unavailable(e)
                    }
                })?;
            }
            tx.commit().map_err(unavailable)?;
            Ok(Committed {
                user: UserRecord {
                    id: UserId(user_id),
                    token_version: 0,
                    username: user.username.clone(),
                    attributes: user.attributes.clone(),
                    group_id,
                    created_at: time_from(&stamp)?,
                },
                group_attributes,
                founded,
            })
        })
        .await
    }

    async fn replay(&self, key: &str) -> Result<Option<Replay>, StoreError> {
        let key = key.to_owned();
        self.with(move |c| read_replay(c, &key)).await
    }

    async fn credentials(&self, username: &Username) -> Result<Option<Credentials>, StoreError> {
        let u = username.as_str().to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT id, password_hash, token_version FROM users WHERE username = ?1",
                [u],
                |r| {
                    Ok(Credentials {
                        id: UserId(r.get(0)?),
                        password_hash: r.get(1)?,
                        token_version: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn credentials_of(&self, id: UserId) -> Result<Option<Credentials>, StoreError> {
        self.with(move |c| {
            c.query_row(
                "SELECT id, password_hash, token_version FROM users WHERE id = ?1",
                [id.0],
                |r| {
                    Ok(Credentials {
                        id: UserId(r.get(0)?),
                        password_hash: r.get(1)?,
                        token_version: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn set_password(&self, id: UserId, password_hash: &str) -> Result<bool, StoreError> {
        let hash = password_hash.to_owned();
        self.with(move |c| {
            c.execute(
                "UPDATE users SET password_hash = ?2, token_version = token_version + 1 WHERE id = ?1",
                params![id.0, hash],
            )
            .map(|n| n == 1)
            .map_err(unavailable)
        })
        .await
    }

    async fn delete_user(&self, id: UserId) -> Result<bool, StoreError> {
        self.with(move |c| {
            c.execute("DELETE FROM users WHERE id = ?1", [id.0])
                .map(|n| n == 1)
                .map_err(unavailable)
        })
        .await
    }

    async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.with(move |c| {
            let row = c
                .query_row(
                    "SELECT username, attributes, group_id, created_at, token_version FROM users WHERE id = ?1",
                    [id.0],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, i64>(4)?,
                        ))
                    },
                )
                .optional()
                .map_err(unavailable)?;
            row.map(|(u, a, g, t, ver)| {
                Ok(UserRecord {
                    id,
                    token_version: ver,
                    username: Username::trusted(u),
                    attributes: attrs_trusted(&a)?,
                    group_id: GroupId(g),
                    created_at: time_from(&t)?,
                })
            })
            .transpose()
        })
        .await
    }

    async fn group(&self, id: GroupId) -> Result<Option<GroupInfo>, StoreError> {
        self.with(move |c| {
            let row = c
                .query_row(
                    "SELECT attributes, created_at, member_count FROM groups WHERE id = ?1",
                    [id.0],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                        ))
                    },
                )
                .optional()
                .map_err(unavailable)?;
            row.map(|(a, t, n)| {
                Ok(GroupInfo {
                    id,
                    attributes: attrs_trusted(&a)?,
                    member_count: n,
                    created_at: time_from(&t)?,
                })
            })
            .transpose()
        })
        .await
    }

    async fn members(
        &self,
        group: GroupId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, StoreError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, username, attributes FROM users WHERE group_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![group.0, after.map_or(0, |u| u.0), limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                })
                .map_err(unavailable)?;
            rows.map(|row| {
                let (id, u, a) = row.map_err(unavailable)?;
                Ok(Member {
                    id: UserId(id),
                    username: Username::trusted(u),
                    attributes: attrs_trusted(&a)?,
                })
            })
            .collect()
        })
        .await
    }

    async fn group_page(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Option<GroupPage>, StoreError> {
        // In process: two statements under the one connection's lock are
        // one consistent read, with no round trip to save.
        self.with(move |c| {
            let head = c
                .prepare_cached(
                    "SELECT u.token_version, u.attributes, g.id, g.attributes, g.created_at, \
                            g.member_count \
                     FROM users u JOIN groups g ON g.id = u.group_id WHERE u.id = ?1",
                )
                .map_err(unavailable)?
                .query_row([user.0], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                    ))
                })
                .optional()
                .map_err(unavailable)?;
            let Some((ver, attrs, gid, gattrs, created, count)) = head else {
                return Ok(None);
            };
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, username, attributes FROM users WHERE group_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                )
                .map_err(unavailable)?;
            let members = stmt
                .query_map(params![gid, after.map_or(0, |u| u.0), limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                })
                .map_err(unavailable)?
                .map(|row| {
                    let (id, u, a) = row.map_err(unavailable)?;
                    Ok(Member {
                        id: UserId(id),
                        username: Username::trusted(u),
                        attributes: attrs_trusted(&a)?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Some(GroupPage {
                token_version: ver,
                attributes: attrs_trusted(&attrs)?,
                group: GroupInfo {
                    id: GroupId(gid),
                    attributes: attrs_trusted(&gattrs)?,
                    member_count: count,
                    created_at: time_from(&created)?,
                },
                members,
            }))
        })
        .await
    }

    async fn counts(&self) -> Result<(u64, u64), StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT (SELECT count(*) FROM groups), (SELECT count(*) FROM users)",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(unavailable)
        })
        .await
    }

    async fn groups_after(
        &self,
        after: Option<GroupId>,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, StoreError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, attributes FROM groups WHERE id > ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(
                    params![after.map_or(i64::MIN, |g| g.0), limit as i64],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
                )
                .map_err(unavailable)?;
            rows.map(|row| {
                let (id, a) = row.map_err(unavailable)?;
                Ok((GroupId(id), attrs_from_json(&a)?))
            })
            .collect()
        })
        .await
    }

    fn pool_stats(&self) -> PoolStats {
        PoolStats {
            size: 1,
            available: 1,
            waiting: 0,
        }
    }

    async fn group_sizes(&self) -> Result<crate::stats::SizeDistribution, StoreError> {
        self.group_size_distribution().await
    }
}

#[path = "sqlite_import.rs"]
pub mod import;

#[path = "sqlite_stats.rs"]
pub mod stats;
