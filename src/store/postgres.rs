//! The Postgres store: the system of record in distributed mode.
//!
//! # Write order of a signup
//!
//! 1. Validate; refuse a taken username early; hash the password.
//! 2. The index decides (Redis script): join G, or found G with an id taken
//!    from the `group_ids` sequence here.
//! 3. One transaction here: lock this threshold's `index_epochs` row FOR
//!    SHARE and check the epoch the index decided against; insert G if it is
//!    not there yet (`ON CONFLICT DO NOTHING`: the founder or the first
//!    joiner to commit creates it); insert the user. Commit.
//! 4. Only then answer 201.
//!
//! What each failure leaves behind:
//! - before 2 commits nothing anywhere;
//! - the script validates before its first write, so it leaves all or none;
//! - between 2 and 3 (or 3 fails, or the process dies): Postgres has nothing
//!   of this signup; the index may hold a group nobody has joined yet. The
//!   next overlapping signup joins it and creates its row, so no user ever
//!   points at a group Postgres lacks (the foreign key would refuse it), and
//!   `verify` reports such a group, `reindex` drops it;
//! - after 3 commits and before 4: the user exists; a retry gets 409.
//!
//! An acknowledged signup is committed in Postgres and was decided against
//! the epoch Postgres names: a rebuild advances that epoch while holding the
//! row lock every signup shares, so it waits for commits in flight, reads
//! them all, and fences off any decided against the old index.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::{Credentials, GroupInfo, Member, NewUser, PoolStats, Store, StoreError, UserRecord};
use crate::domain::{AttributeSet, GroupId, Threshold, UserId, Username};
use crate::index::{Epoch, GroupIdSource, IndexError, IndexSource, RebuildLock};

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

/// Advisory lock keys (first half: "coho" in ASCII, so they are recognisable
/// in pg_locks).
const LOCK_CLASS: i32 = 0x636f_686f;
const MIGRATE_LOCK: i32 = 1;
const REBUILD_LOCK_BASE: i32 = 100;

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl From<StoreError> for IndexError {
    fn from(e: StoreError) -> Self {
        IndexError::IdSource(e.to_string())
    }
}

impl PgStore {
    /// Builds the pool. Connects lazily; call [`PgStore::ping`] to check.
    pub fn connect(url: &str, max_connections: usize) -> Result<Self, String> {
        let mut cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| format!("invalid DATABASE_URL: {e}"))?;
        cfg.connect_timeout(Duration::from_secs(3));
        cfg.keepalives_idle(Duration::from_secs(30));
        // A stuck query must not hold a pooled connection for ever.
        cfg.options("-c statement_timeout=10000 -c lock_timeout=10000");
        if cfg.get_application_name().is_none() {
            cfg.application_name("cohort");
        }
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            // Verified: a connection killed under us (Postgres restart) is
            // noticed at checkout, not by the request that gets it.
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(3)))
            .recycle_timeout(Some(Duration::from_secs(2)))
            .build()
            .map_err(|e| format!("cannot build the Postgres pool: {e}"))?;
        Ok(Self { pool })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(unavailable)
    }

    /// Applies pending migrations under an advisory lock, so replicas that
    /// start together run them once.
    pub async fn migrate(&self) -> Result<usize, String> {
        let mut client = self.client().await.map_err(|e| e.to_string())?;
        client
            .execute(
                "SELECT pg_advisory_lock($1, $2)",
                &[&LOCK_CLASS, &MIGRATE_LOCK],
            )
            .await
            .map_err(|e| format!("cannot take the migration lock: {e}"))?;
        let result = embedded::migrations::runner()
            .run_async(&mut **client)
            .await;
        let unlock = client
            .execute(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&LOCK_CLASS, &MIGRATE_LOCK],
            )
            .await;
        let report = result.map_err(|e| format!("migration failed: {e}"))?;
        unlock.map_err(|e| format!("cannot release the migration lock: {e}"))?;
        Ok(report.applied_migrations().len())
    }
}

fn attrs_from_row(v: Vec<String>) -> Result<AttributeSet, StoreError> {
    AttributeSet::from_stored(&v).map_err(corrupt)
}

fn username_from_row(s: String) -> Result<Username, StoreError> {
    Username::parse(&s).map_err(corrupt)
}

#[async_trait]
impl GroupIdSource for PgStore {
    async fn next_group_id(&self) -> Result<GroupId, IndexError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT nextval('group_ids')", &[])
            .await
            .map_err(unavailable)?;
        Ok(GroupId(row.get(0)))
    }
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(unavailable)?;
        Ok(())
    }

    async fn username_taken(&self, username: &Username) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT 1 FROM users WHERE username = $1",
                &[&username.as_str()],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.is_some())
    }

    async fn create_user(&self, user: &NewUser) -> Result<UserRecord, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        if let Some((t, epoch)) = user.epoch {
            let row = tx
                .query_opt(
                    "SELECT epoch FROM index_epochs WHERE threshold = $1 FOR SHARE",
                    &[&(t.get() as i32)],
                )
                .await
                .map_err(unavailable)?;
            if row.map(|r| r.get::<_, i64>(0)) != Some(epoch.0) {
                return Err(StoreError::StaleIndex);
            }
        }
        let group = &user.placement;
        tx.execute(
            "INSERT INTO groups (id, attributes) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            &[&group.group_id.0, &group.group_attributes.to_strings()],
        )
        .await
        .map_err(unavailable)?;
        let row = tx
            .query_one(
                "INSERT INTO users (username, password_hash, attributes, group_id) \
                 VALUES ($1, $2, $3, $4) RETURNING id, created_at",
                &[
                    &user.username.as_str(),
                    &user.password_hash,
                    &user.attributes.to_strings(),
                    &group.group_id.0,
                ],
            )
            .await
            .map_err(|e| {
                if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                    StoreError::UsernameTaken
                } else {
                    unavailable(e)
                }
            })?;
        tx.commit().await.map_err(unavailable)?;
        Ok(UserRecord {
            id: UserId(row.get(0)),
            username: user.username.clone(),
            attributes: user.attributes.clone(),
            group_id: group.group_id,
            created_at: row.get(1),
        })
    }

    async fn credentials(&self, username: &Username) -> Result<Option<Credentials>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, password_hash FROM users WHERE username = $1",
                &[&username.as_str()],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| Credentials {
            id: UserId(r.get(0)),
            password_hash: r.get(1),
        }))
    }

    async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT username, attributes, group_id, created_at FROM users WHERE id = $1",
                &[&id.0],
            )
            .await
            .map_err(unavailable)?;
        row.map(|r| {
            Ok(UserRecord {
                id,
                username: username_from_row(r.get(0))?,
                attributes: attrs_from_row(r.get(1))?,
                group_id: GroupId(r.get(2)),
                created_at: r.get(3),
            })
        })
        .transpose()
    }

    async fn group(&self, id: GroupId) -> Result<Option<GroupInfo>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT attributes, created_at, (SELECT count(*) FROM users WHERE group_id = $1) \
                 FROM groups WHERE id = $1",
                &[&id.0],
            )
            .await
            .map_err(unavailable)?;
        row.map(|r| {
            Ok(GroupInfo {
                id,
                attributes: attrs_from_row(r.get(0))?,
                created_at: r.get(1),
                member_count: r.get(2),
            })
        })
        .transpose()
    }

    async fn members(
        &self,
        group: GroupId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, username, attributes FROM users \
                 WHERE group_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                &[&group.0, &after.map_or(0, |u| u.0), &(limit as i64)],
            )
            .await
            .map_err(unavailable)?;
        rows.into_iter()
            .map(|r| {
                Ok(Member {
                    id: UserId(r.get(0)),
                    username: username_from_row(r.get(1))?,
                    attributes: attrs_from_row(r.get(2))?,
                })
            })
            .collect()
    }

    async fn counts(&self) -> Result<(u64, u64), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM groups), (SELECT count(*) FROM users)",
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
    }

    async fn groups_after(
        &self,
        after: Option<GroupId>,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, attributes FROM groups WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after.map_or(i64::MIN, |g| g.0), &(limit as i64)],
            )
            .await
            .map_err(unavailable)?;
        rows.into_iter()
            .map(|r| Ok((GroupId(r.get(0)), attrs_from_row(r.get(1))?)))
            .collect()
    }

    fn pool_stats(&self) -> PoolStats {
        let s = self.pool.status();
        PoolStats {
            size: s.size,
            available: s.available,
            waiting: s.waiting,
        }
    }
}

#[async_trait]
impl IndexSource for PgStore {
    async fn lock_rebuild(&self, t: Threshold) -> Result<Option<RebuildLock>, IndexError> {
        let client = self.client().await?;
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&LOCK_CLASS, &(REBUILD_LOCK_BASE + t.get() as i32)],
            )
            .await
            .map_err(unavailable)?
            .get(0);
        if !got {
            return Ok(None);
        }
        // The lock belongs to this session: take the connection out of the
        // pool so that dropping the guard closes it and releases the lock,
        // even if the rebuild fails half-way.
        let conn = deadpool_postgres::Object::take(client);
        Ok(Some(RebuildLock(Box::new(conn))))
    }

    async fn advance_epoch(&self, t: Threshold) -> Result<Epoch, IndexError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO index_epochs (threshold, epoch) VALUES ($1, nextval('index_epochs_seq')) \
                 ON CONFLICT (threshold) DO UPDATE SET epoch = excluded.epoch, updated_at = now() \
                 RETURNING epoch",
                &[&(t.get() as i32)],
            )
            .await
            .map_err(unavailable)?;
        Ok(Epoch(row.get(0)))
    }

    async fn current_epoch(&self, t: Threshold) -> Result<Option<Epoch>, IndexError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT epoch FROM index_epochs WHERE threshold = $1",
                &[&(t.get() as i32)],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| Epoch(r.get(0))))
    }

    async fn group_count(&self) -> Result<u64, IndexError> {
        Ok(self.counts().await?.0)
    }

    async fn groups_after(
        &self,
        after: Option<GroupId>,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, IndexError> {
        Ok(Store::groups_after(self, after, limit).await?)
    }
}
