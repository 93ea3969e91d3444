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

use super::{Credentials, GroupInfo, Member, NewUser, PoolStats, Store, StoreError, UserRecord};
use crate::domain::{AttributeSet, GroupId, UserId, Username};
use crate::index::{GroupIdSource, IndexError};

mod embedded {
    refinery::embed_migrations!("migrations/sqlite");
}

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
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

fn time_from(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(corrupt)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates it.
    pub fn open(path: &Path) -> Result<Self, String> {
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

#[async_trait]
impl GroupIdSource for SqliteStore {
    async fn next_group_id(&self) -> Result<GroupId, IndexError> {
        Ok(self
            .with(|c| {
                let tx = c.transaction().map_err(unavailable)?;
                tx.execute("INSERT INTO group_ids DEFAULT VALUES", [])
                    .map_err(unavailable)?;
                let id = tx.last_insert_rowid();
                tx.execute("DELETE FROM group_ids WHERE id < ?1", [id])
                    .map_err(unavailable)?;
                tx.commit().map_err(unavailable)?;
                Ok(GroupId(id))
            })
            .await?)
    }
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

    async fn create_user(&self, user: &NewUser) -> Result<UserRecord, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let now = Utc::now();
            let stamp = now.to_rfc3339();
            let tx = c.transaction().map_err(unavailable)?;
            let g = &user.placement;
            tx.execute(
                "INSERT INTO groups (id, attributes, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO NOTHING",
                params![g.group_id.0, attrs_to_json(&g.group_attributes), stamp],
            )
            .map_err(unavailable)?;
            let res = tx.execute(
                "INSERT INTO users (username, password_hash, attributes, group_id, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    user.username.as_str(),
                    user.password_hash,
                    attrs_to_json(&user.attributes),
                    g.group_id.0,
                    stamp
                ],
            );
            match res {
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE => {
                    return Err(StoreError::UsernameTaken)
                }
                Err(e) => return Err(unavailable(e)),
                Ok(_) => {}
            }
            let id = tx.last_insert_rowid();
            tx.commit().map_err(unavailable)?;
            Ok(UserRecord {
                id: UserId(id),
                username: user.username.clone(),
                attributes: user.attributes.clone(),
                group_id: g.group_id,
                created_at: time_from(&stamp)?,
            })
        })
        .await
    }

    async fn credentials(&self, username: &Username) -> Result<Option<Credentials>, StoreError> {
        let u = username.as_str().to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT id, password_hash FROM users WHERE username = ?1",
                [u],
                |r| {
                    Ok(Credentials {
                        id: UserId(r.get(0)?),
                        password_hash: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.with(move |c| {
            let row = c
                .query_row(
                    "SELECT username, attributes, group_id, created_at FROM users WHERE id = ?1",
                    [id.0],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, String>(3)?,
                        ))
                    },
                )
                .optional()
                .map_err(unavailable)?;
            row.map(|(u, a, g, t)| {
                Ok(UserRecord {
                    id,
                    username: Username::parse(&u).map_err(corrupt)?,
                    attributes: attrs_from_json(&a)?,
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
                    "SELECT attributes, created_at, (SELECT count(*) FROM users WHERE group_id = ?1) \
                     FROM groups WHERE id = ?1",
                    [id.0],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)),
                )
                .optional()
                .map_err(unavailable)?;
            row.map(|(a, t, n)| {
                Ok(GroupInfo {
                    id,
                    attributes: attrs_from_json(&a)?,
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
                    username: Username::parse(&u).map_err(corrupt)?,
                    attributes: attrs_from_json(&a)?,
                })
            })
            .collect()
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
}
