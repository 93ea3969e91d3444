//! The embedded store: one SQLite file under the data directory, for the
//! single-process mode. Every write is one transaction; `synchronous=FULL`
//! so an acknowledged signup survives a crash or power loss.
//!
//! Unlike Postgres it keeps no t-subset table: the arbiter of "no two
//! groups share t attributes" is the process itself, which holds the data
//! directory's lock, decides signups one at a time against the in-process
//! index and rebuilds that index from `groups` at each start (migration
//! V7 says why the table went).
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
    StoreError, UserRecord,
};
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

impl SqliteStore {
    /// Changes the data directory's threshold (the server stopped: the
    /// caller holds the directory's lock). Existing groups stay as they
    /// are; the next start indexes them for the new threshold (after a
    /// lowering, groups that now overlap share keys in the index, whose
    /// slots hold sets, so a newcomer still gets the best of them).
    /// Returns the old threshold and the number of groups.
    pub async fn set_threshold(&self, t: Threshold) -> Result<(usize, u64), StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(unavailable)?;
            let old: Option<i64> = tx
                .query_row("SELECT threshold FROM deployment", [], |r| r.get(0))
                .optional()
                .map_err(unavailable)?;
            tx.execute(
                "INSERT INTO deployment (singleton, threshold) VALUES (1, ?1) \
                 ON CONFLICT (singleton) DO UPDATE SET threshold = excluded.threshold",
                [t.get() as i64],
            )
            .map_err(unavailable)?;
            let groups: i64 = tx
                .query_row("SELECT count(*) FROM groups", [], |r| r.get(0))
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok((old.unwrap_or(0) as usize, groups as u64))
        })
        .await
    }
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
            tx.execute(
                "INSERT OR IGNORE INTO deployment (singleton, threshold) VALUES (1, ?1)",
                [t.get() as i64],
            )
            .map_err(unavailable)?;
            let deployed: i64 = tx
                .query_row("SELECT threshold FROM deployment", [], |r| r.get(0))
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(deployed as usize)
        })
        .await
    }

    /// A scan of every group, in id order. Embedded mode keeps no subset
    /// table: one process holds the data directory's lock, decides every
    /// signup under one mutex against the in-process index, and rebuilds
    /// that index from `groups` at each start, so the index is the arbiter
    /// and never fails; a copy of it on disk cost C(k, t) rows a founding
    /// (most of an import's time and of the file). This exact answer is
    /// there for the trait's sake, not for a path the server takes.
    async fn best_group(&self, attrs: &AttributeSet) -> Result<Option<Candidate>, StoreError> {
        let t = self.t;
        let attrs = attrs.clone();
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT id, attributes FROM groups ORDER BY id")
                .map_err(unavailable)?;
            let mut rows = stmt.query([]).map_err(unavailable)?;
            let mut best: Option<(usize, GroupId, AttributeSet)> = None;
            while let Some(r) = rows.next().map_err(unavailable)? {
                let g = attrs_from_json(&r.get::<_, String>(1).map_err(unavailable)?)?;
                let m = g.overlap(&attrs);
                // In id order: on a tie the earlier (smaller) id stays.
                if m >= t.get() && best.as_ref().is_none_or(|(b, _, _)| m > *b) {
                    best = Some((m, GroupId(r.get(0).map_err(unavailable)?), g));
                }
            }
            Ok(best.map(|(_, id, attributes)| Candidate { id, attributes }))
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
            // Counted here, not by a trigger (migration V8).
            tx.execute(
                "UPDATE groups SET member_count = member_count + 1 WHERE id = ?1",
                [group_id.0],
            )
            .map_err(unavailable)?;
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
