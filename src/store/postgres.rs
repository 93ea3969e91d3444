//! The Postgres store: the system of record in distributed mode, and the
//! arbiter of the grouping rule (its `subset_owners` primary key; see
//! `crate::signup` for the protocol).

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;

use super::{
    Committed, Credentials, GroupInfo, GroupPage, Member, NewUser, Plan, PoolStats, Replay, Store,
    StoreError, UserRecord, best_of,
};
use crate::domain::grouping::subset_keys;
use crate::domain::{AttributeSet, GroupId, Threshold, UserId, Username};
use crate::index::{Candidate, IndexError, IndexMarks, IndexSource, SyncLock};
use crate::telemetry::CallTimer;

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

/// Advisory lock keys (first half: "coho" in ASCII, so they are recognisable
/// in pg_locks).
const LOCK_CLASS: i32 = 0x636f_686f;
const MIGRATE_LOCK: i32 = 1;
const SYNC_LOCK: i32 = 2;

/// Groups whose subsets are written per statement by a backfill.
const BACKFILL_BATCH: usize = 5_000;

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    t: Threshold,
    /// Times every operation (`cohort_db_query_seconds`), each in a span.
    timer: CallTimer,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl From<StoreError> for IndexError {
    fn from(e: StoreError) -> Self {
        IndexError::Unavailable(e.to_string())
    }
}

/// The arbiter's key (migration V9): a founding that meets it overlaps a
/// group committed first.
const SUBSET_KEY: &str = "subset_owners_pkey";

/// Subset keys as the `uuid`s the subset tables hold them as (16 bytes,
/// ordered as the bytes are).
fn subset_uuids(keys: &[crate::domain::grouping::SubsetKey]) -> Vec<uuid::Uuid> {
    keys.iter().map(|k| uuid::Uuid::from_bytes(*k)).collect()
}

fn is_unique_violation(e: &tokio_postgres::Error, constraint: &str) -> bool {
    e.as_db_error().is_some_and(|d| {
        d.code() == &SqlState::UNIQUE_VIOLATION && d.constraint() == Some(constraint)
    })
}

impl PgStore {
    /// Builds the pool. Connects lazily; call [`PgStore::ping`] to check.
    pub fn connect(url: &str, max_connections: usize, t: Threshold) -> Result<Self, String> {
        Self::connect_with(url, None, max_connections, t)
    }

    /// As [`PgStore::connect`], trusting the CAs of `ca_file` for
    /// `sslmode=verify-*` (see `crate::tls`).
    pub fn connect_with(
        url: &str,
        ca_file: Option<&std::path::Path>,
        max_connections: usize,
        t: Threshold,
    ) -> Result<Self, String> {
        let (mut cfg, tls) = crate::tls::postgres(url, ca_file)?;
        cfg.connect_timeout(Duration::from_secs(3));
        cfg.keepalives_idle(Duration::from_secs(30));
        // A stuck query must not hold a pooled connection for ever.
        cfg.options("-c statement_timeout=10000 -c lock_timeout=10000");
        if cfg.get_application_name().is_none() {
            cfg.application_name("cohort");
        }
        let mgr = Manager::from_config(
            cfg,
            tls,
            // Fast: no query at checkout (Verified cost a round trip per
            // request). A connection killed under us (Postgres restart) has
            // its socket closed, which its connection task sees at once, so
            // `is_closed` catches it at checkout; one that fails mid-request
            // is dropped by deadpool, and the request answers 503.
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
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
        Ok(Self {
            pool,
            t,
            timer: CallTimer::default(),
        })
    }

    /// Observes each operation's duration in `histogram`, by operation.
    pub fn with_query_metrics(mut self, histogram: prometheus::HistogramVec) -> Self {
        self.timer = CallTimer::new(histogram);
        self
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
        // A migration may copy a big table (V9): the pool's 10 s statement
        // timeout is for requests. The lock timeout stays, so a migration
        // stuck behind a long transaction fails instead of queueing every
        // request behind its lock.
        client
            .batch_execute("SET statement_timeout = 0")
            .await
            .map_err(|e| format!("cannot lift the statement timeout: {e}"))?;
        let result = embedded::migrations::runner()
            .run_async(&mut **client)
            .await;
        let reset = client.batch_execute("RESET statement_timeout").await;
        let unlock = client
            .execute(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&LOCK_CLASS, &MIGRATE_LOCK],
            )
            .await;
        let report = result.map_err(|e| {
            // refinery's message stops at "db error": say what Postgres said.
            let mut msg = format!("migration failed: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            msg
        })?;
        reset.map_err(|e| format!("cannot restore the statement timeout: {e}"))?;
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
impl Store for PgStore {
    #[tracing::instrument(level = "debug", name = "pg.ping", skip_all, fields(operation = "ping", otel.kind = "client", db.system.name = "postgresql"))]
    async fn ping(&self) -> Result<(), StoreError> {
        let _timing = self.timer.start("ping");
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(unavailable)?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "pg.username_taken", skip_all, fields(operation = "username_taken", otel.kind = "client", db.system.name = "postgresql"))]
    async fn username_taken(&self, username: &Username) -> Result<bool, StoreError> {
        let _timing = self.timer.start("username_taken");
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached("SELECT 1 FROM users WHERE username = $1")
                    .await
                    .map_err(unavailable)?,
                &[&username.as_str()],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.is_some())
    }

    #[tracing::instrument(level = "debug", name = "pg.ensure_deployment", skip_all, fields(operation = "ensure_deployment", otel.kind = "client", db.system.name = "postgresql"))]
    async fn ensure_deployment(&self, t: Threshold) -> Result<usize, StoreError> {
        let _timing = self.timer.start("ensure_deployment");
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        let created = tx
            .query_opt(
                &tx.prepare_cached("INSERT INTO deployment (threshold) VALUES ($1) ON CONFLICT DO NOTHING RETURNING threshold").await.map_err(unavailable)?,
                &[&(t.get() as i32)],
            )
            .await
            .map_err(unavailable)?;
        if created.is_some() {
            // First start of this deployment (or of this design over groups
            // founded by the previous one): build the subset table.
            let n = backfill_subsets(&tx, t).await?;
            if n > 0 {
                tracing::info!(groups = n, threshold = t.get(), "subset table built");
            }
        }
        let deployed: i32 = tx
            .query_one(
                &tx.prepare_cached("SELECT threshold FROM deployment")
                    .await
                    .map_err(unavailable)?,
                &[],
            )
            .await
            .map_err(unavailable)?
            .get(0);
        tx.commit().await.map_err(unavailable)?;
        Ok(deployed as usize)
    }

    #[tracing::instrument(level = "debug", name = "pg.best_group", skip_all, fields(operation = "best_group", otel.kind = "client", db.system.name = "postgresql"))]
    async fn best_group(&self, attrs: &AttributeSet) -> Result<Option<Candidate>, StoreError> {
        let _timing = self.timer.start("best_group");
        let client = self.client().await?;
        let keys = subset_uuids(&subset_keys(attrs, self.t));
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "SELECT id, attributes FROM groups WHERE id IN ( \
                   SELECT group_id FROM subset_owners WHERE subset = ANY($1) \
                   UNION SELECT group_id FROM subset_overlaps WHERE subset = ANY($1))",
                    )
                    .await
                    .map_err(unavailable)?,
                &[&keys],
            )
            .await
            .map_err(unavailable)?;
        let candidates = rows
            .into_iter()
            .map(|r| Ok((GroupId(r.get(0)), attrs_from_row(r.get(1))?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(best_of(candidates, attrs, self.t))
    }

    #[tracing::instrument(level = "debug", name = "pg.commit_signup", skip_all, fields(operation = "commit_signup", otel.kind = "client", db.system.name = "postgresql"))]
    async fn commit_signup(&self, user: &NewUser) -> Result<Committed, StoreError> {
        let _timing = self.timer.start("commit_signup");
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        // KEY SHARE: blocks a threshold change (FOR UPDATE) until we commit,
        // but not the dirty marks (a non-key UPDATE).
        let row = tx
            .query_one(
                &tx.prepare_cached(
                    "SELECT threshold, index_dirty > index_clean FROM deployment FOR KEY SHARE",
                )
                .await
                .map_err(unavailable)?,
                &[],
            )
            .await
            .map_err(unavailable)?;
        let deployed = row.get::<_, i32>(0) as usize;
        if deployed != self.t.get() {
            return Err(StoreError::ThresholdMismatch {
                deployed,
                configured: self.t.get(),
            });
        }
        if user.decided_in_index.is_some() && row.get::<_, bool>(1) {
            return Err(StoreError::IndexDirty);
        }
        let (group_id, group_attributes, founded) = match &user.plan {
            Plan::Join(c) => {
                if let Some(decided) = user.decided_in_index {
                    // A committed group is in Redis only once its founder
                    // (or the keeper, within a second, if the founder was
                    // killed) added it: one the index did not show may beat
                    // this join. Those are the unconfirmed groups and the
                    // ones confirmed since the decision (a second of margin
                    // for the clocks); usually a handful, through partial
                    // indexes.
                    let shared = c.attributes.overlap(&user.attributes) as i64;
                    let window = decided.elapsed().as_secs_f64() + 1.0;
                    let beaten = tx
                        .query_opt(
                            &tx.prepare_cached(
                                "SELECT g.id FROM ( \
                                   SELECT id, attributes FROM groups WHERE NOT indexed \
                                   UNION ALL \
                                   SELECT id, attributes FROM groups \
                                   WHERE indexed_at > now() - make_interval(secs => $3) \
                                 ) g CROSS JOIN LATERAL ( \
                                   SELECT count(*) AS m FROM unnest(g.attributes) a WHERE a = ANY($2) \
                                 ) o \
                                 WHERE g.id <> $1 AND (o.m > $4 OR (o.m = $4 AND g.id < $1)) \
                                 LIMIT 1",
                            )
                            .await
                            .map_err(unavailable)?,
                            &[&c.id.0, &user.attributes.to_strings(), &window, &shared],
                        )
                        .await
                        .map_err(unavailable)?;
                    if let Some(r) = beaten {
                        tracing::debug!(
                            group_id = r.get::<_, i64>(0),
                            "a group the index did not show beats the join: deciding again"
                        );
                        return Err(StoreError::Overlap);
                    }
                }
                (c.id, c.attributes.clone(), false)
            }
            Plan::Found => {
                let id: i64 = tx
                    .query_one(
                        &tx.prepare_cached("INSERT INTO groups (id, attributes) VALUES (nextval('group_ids'), $1) RETURNING id").await.map_err(unavailable)?,
                        &[&user.attributes.to_strings()],
                    )
                    .await
                    .map_err(unavailable)?
                    .get(0);
                // Waits for a concurrent founder holding one of these keys,
                // then fails if it committed: it overlaps us.
                tx.execute(
                    &tx.prepare_cached(
                        "INSERT INTO subset_owners (subset, group_id) \
                     SELECT unnest($1::uuid[]), $2",
                    )
                    .await
                    .map_err(unavailable)?,
                    &[&subset_uuids(&subset_keys(&user.attributes, self.t)), &id],
                )
                .await
                .map_err(|e| {
                    if is_unique_violation(&e, SUBSET_KEY) {
                        StoreError::Overlap
                    } else {
                        unavailable(e)
                    }
                })?;
                (GroupId(id), user.attributes.clone(), true)
            }
        };
        let row = tx
            .query_one(
                &tx.prepare_cached(
                    "INSERT INTO users (username, password_hash, attributes, group_id) \
                 VALUES ($1, $2, $3, $4) RETURNING id, created_at",
                )
                .await
                .map_err(unavailable)?,
                &[
                    &user.username.as_str(),
                    &user.password_hash,
                    &user.attributes.to_strings(),
                    &group_id.0,
                ],
            )
            .await
            .map_err(|e| {
                if is_unique_violation(&e, "users_username_key") {
                    StoreError::UsernameTaken
                } else {
                    unavailable(e)
                }
            })?;
        let user_id: i64 = row.get(0);
        if let Some(k) = &user.idempotency {
            // An expired key (over 24 hours) is taken over; a live one is not.
            let n = tx
                .execute(
                    &tx.prepare_cached(
                        "INSERT INTO idempotency_keys (key, fingerprint, user_id, founded) \
                     VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, \
                       user_id = excluded.user_id, founded = excluded.founded, created_at = now() \
                     WHERE idempotency_keys.created_at < now() - interval '24 hours'",
                    )
                    .await
                    .map_err(unavailable)?,
                    &[&k.key, &k.fingerprint, &user_id, &founded],
                )
                .await
                .map_err(unavailable)?;
            if n == 0 {
                return Err(StoreError::IdempotencyKeyTaken);
            }
        }
        crate::failpoint::hit("signup:in-transaction");
        tx.commit().await.map_err(unavailable)?;
        Ok(Committed {
            user: UserRecord {
                id: UserId(user_id),
                token_version: 0,
                username: user.username.clone(),
                attributes: user.attributes.clone(),
                group_id,
                created_at: row.get(1),
            },
            group_attributes,
            founded,
        })
    }

    #[tracing::instrument(level = "debug", name = "pg.replay", skip_all, fields(operation = "replay", otel.kind = "client", db.system.name = "postgresql"))]
    async fn replay(&self, key: &str) -> Result<Option<Replay>, StoreError> {
        let _timing = self.timer.start("replay");
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client.prepare_cached("SELECT k.fingerprint, k.founded, u.id, u.username, u.attributes, u.group_id, \
                        u.created_at, g.attributes, u.token_version \
                 FROM idempotency_keys k JOIN users u ON u.id = k.user_id \
                 JOIN groups g ON g.id = u.group_id \
                 WHERE k.key = $1 AND k.created_at >= now() - interval '24 hours'").await.map_err(unavailable)?,
                &[&key],
            )
            .await
            .map_err(unavailable)?;
        row.map(|r| {
            Ok(Replay {
                fingerprint: r.get(0),
                committed: Committed {
                    founded: r.get(1),
                    user: UserRecord {
                        id: UserId(r.get(2)),
                        token_version: r.get(8),
                        username: username_from_row(r.get(3))?,
                        attributes: attrs_from_row(r.get(4))?,
                        group_id: GroupId(r.get(5)),
                        created_at: r.get(6),
                    },
                    group_attributes: attrs_from_row(r.get(7))?,
                },
            })
        })
        .transpose()
    }

    #[tracing::instrument(level = "debug", name = "pg.credentials", skip_all, fields(operation = "credentials", otel.kind = "client", db.system.name = "postgresql"))]
    async fn credentials(&self, username: &Username) -> Result<Option<Credentials>, StoreError> {
        let _timing = self.timer.start("credentials");
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached(
                        "SELECT id, password_hash, token_version FROM users WHERE username = $1",
                    )
                    .await
                    .map_err(unavailable)?,
                &[&username.as_str()],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| Credentials {
            id: UserId(r.get(0)),
            password_hash: r.get(1),
            token_version: r.get(2),
        }))
    }

    #[tracing::instrument(level = "debug", name = "pg.credentials_of", skip_all, fields(operation = "credentials_of", otel.kind = "client", db.system.name = "postgresql"))]
    async fn credentials_of(&self, id: UserId) -> Result<Option<Credentials>, StoreError> {
        let _timing = self.timer.start("credentials_of");
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached(
                        "SELECT id, password_hash, token_version FROM users WHERE id = $1",
                    )
                    .await
                    .map_err(unavailable)?,
                &[&id.0],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| Credentials {
            id: UserId(r.get(0)),
            password_hash: r.get(1),
            token_version: r.get(2),
        }))
    }

    #[tracing::instrument(level = "debug", name = "pg.set_password", skip_all, fields(operation = "set_password", otel.kind = "client", db.system.name = "postgresql"))]
    async fn set_password(&self, id: UserId, password_hash: &str) -> Result<bool, StoreError> {
        let _timing = self.timer.start("set_password");
        let client = self.client().await?;
        let n = client
            .execute(
                &client.prepare_cached("UPDATE users SET password_hash = $2, token_version = token_version + 1 WHERE id = $1").await.map_err(unavailable)?,
                &[&id.0, &password_hash],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    #[tracing::instrument(level = "debug", name = "pg.delete_user", skip_all, fields(operation = "delete_user", otel.kind = "client", db.system.name = "postgresql"))]
    async fn delete_user(&self, id: UserId) -> Result<bool, StoreError> {
        let _timing = self.timer.start("delete_user");
        let client = self.client().await?;
        let n = client
            .execute(
                &client
                    .prepare_cached("DELETE FROM users WHERE id = $1")
                    .await
                    .map_err(unavailable)?,
                &[&id.0],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    #[tracing::instrument(level = "debug", name = "pg.user", skip_all, fields(operation = "user", otel.kind = "client", db.system.name = "postgresql"))]
    async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        let _timing = self.timer.start("user");
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client.prepare_cached("SELECT username, attributes, group_id, created_at, token_version FROM users WHERE id = $1").await.map_err(unavailable)?,
                &[&id.0],
            )
            .await
            .map_err(unavailable)?;
        row.map(|r| {
            Ok(UserRecord {
                id,
                token_version: r.get(4),
                username: Username::trusted(r.get(0)),
                attributes: AttributeSet::trusted(r.get(1)),
                group_id: GroupId(r.get(2)),
                created_at: r.get(3),
            })
        })
        .transpose()
    }

    #[tracing::instrument(level = "debug", name = "pg.group", skip_all, fields(operation = "group", otel.kind = "client", db.system.name = "postgresql"))]
    async fn group(&self, id: GroupId) -> Result<Option<GroupInfo>, StoreError> {
        let _timing = self.timer.start("group");
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached(
                        "SELECT attributes, created_at, \
                 (SELECT coalesce(sum(n), 0)::bigint FROM group_member_counts WHERE group_id = $1) \
                 FROM groups WHERE id = $1",
                    )
                    .await
                    .map_err(unavailable)?,
                &[&id.0],
            )
            .await
            .map_err(unavailable)?;
        row.map(|r| {
            Ok(GroupInfo {
                id,
                attributes: AttributeSet::trusted(r.get(0)),
                created_at: r.get(1),
                member_count: r.get(2),
            })
        })
        .transpose()
    }

    #[tracing::instrument(level = "debug", name = "pg.members", skip_all, fields(operation = "members", otel.kind = "client", db.system.name = "postgresql"))]
    async fn members(
        &self,
        group: GroupId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, StoreError> {
        let _timing = self.timer.start("members");
        let client = self.client().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "SELECT id, username, attributes FROM users \
                 WHERE group_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                    )
                    .await
                    .map_err(unavailable)?,
                &[&group.0, &after.map_or(0, |u| u.0), &(limit as i64)],
            )
            .await
            .map_err(unavailable)?;
        rows.into_iter()
            .map(|r| {
                Ok(Member {
                    id: UserId(r.get(0)),
                    username: Username::trusted(r.get(1)),
                    attributes: AttributeSet::trusted(r.get(2)),
                })
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", name = "pg.group_page", skip_all, fields(operation = "group_page", otel.kind = "client", db.system.name = "postgresql"))]
    async fn group_page(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Option<GroupPage>, StoreError> {
        let _timing = self.timer.start("group_page");
        let client = self.client().await?;
        // One statement, one row: the caller, its group, the count (at most
        // 16 shard rows) and the page (a keyset scan of the members index),
        // the page as arrays. One row rather than one per member: the group's
        // columns are not repeated, and there is one row to decode. A
        // member's attributes travel joined by U+001F, which no attribute
        // can contain (control characters are refused on the way in).
        let row = client
            .query_opt(
                &client
                    .prepare_cached(
                        "SELECT u.token_version, u.attributes, g.id, g.attributes, g.created_at, \
                                c.n, p.ids, p.names, p.attrs \
                         FROM users u \
                         JOIN groups g ON g.id = u.group_id \
                         CROSS JOIN LATERAL (SELECT coalesce(sum(n), 0)::bigint AS n \
                               FROM group_member_counts WHERE group_id = u.group_id) c \
                         CROSS JOIN LATERAL (SELECT array_agg(id ORDER BY id) AS ids, \
                               array_agg(username ORDER BY id) AS names, \
                               array_agg(array_to_string(attributes, chr(31)) ORDER BY id) AS attrs \
                               FROM (SELECT id, username, attributes FROM users \
                                     WHERE group_id = u.group_id AND id > $2 \
                                     ORDER BY id LIMIT $3) m) p \
                         WHERE u.id = $1",
                    )
                    .await
                    .map_err(unavailable)?,
                &[&user.0, &after.map_or(0, |u| u.0), &(limit as i64)],
            )
            .await
            .map_err(unavailable)?;
        let Some(r) = row else {
            return Ok(None);
        };
        let ids: Option<Vec<i64>> = r.get(6);
        let names: Option<Vec<String>> = r.get(7);
        let attrs: Option<Vec<String>> = r.get(8);
        let members = ids
            .unwrap_or_default()
            .into_iter()
            .zip(names.unwrap_or_default())
            .zip(attrs.unwrap_or_default())
            .map(|((id, name), joined)| Member {
                id: UserId(id),
                username: Username::trusted(name),
                attributes: AttributeSet::trusted(
                    joined.split('\u{1f}').map(str::to_owned).collect(),
                ),
            })
            .collect();
        Ok(Some(GroupPage {
            token_version: r.get(0),
            attributes: AttributeSet::trusted(r.get(1)),
            group: GroupInfo {
                id: GroupId(r.get(2)),
                attributes: AttributeSet::trusted(r.get(3)),
                created_at: r.get(4),
                member_count: r.get(5),
            },
            members,
        }))
    }

    #[tracing::instrument(level = "debug", name = "pg.counts", skip_all, fields(operation = "counts", otel.kind = "client", db.system.name = "postgresql"))]
    async fn counts(&self) -> Result<(u64, u64), StoreError> {
        let _timing = self.timer.start("counts");
        let client = self.client().await?;
        let row = client
            .query_one(
                &client
                    .prepare_cached(
                        "SELECT (SELECT count(*) FROM groups), (SELECT count(*) FROM users)",
                    )
                    .await
                    .map_err(unavailable)?,
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
    }

    #[tracing::instrument(level = "debug", name = "pg.groups_after", skip_all, fields(operation = "groups_after", otel.kind = "client", db.system.name = "postgresql"))]
    async fn groups_after(
        &self,
        after: Option<GroupId>,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, StoreError> {
        let _timing = self.timer.start("groups_after");
        let client = self.client().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "SELECT id, attributes FROM groups WHERE id > $1 ORDER BY id LIMIT $2",
                    )
                    .await
                    .map_err(unavailable)?,
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

    async fn group_sizes(&self) -> Result<crate::stats::SizeDistribution, StoreError> {
        self.group_size_distribution().await
    }
}

/// Writes the t-subsets of every group (in id order) for threshold `t`,
/// inside the caller's transaction. The first owner of a subset takes the
/// primary key; later owners (groups that overlap under `t`, possible only
/// after a threshold was lowered) go to `subset_overlaps`.
async fn backfill_subsets(
    tx: &deadpool_postgres::Transaction<'_>,
    t: Threshold,
) -> Result<u64, StoreError> {
    let mut after = i64::MIN;
    let mut n = 0u64;
    loop {
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "SELECT id, attributes FROM groups WHERE id > $1 ORDER BY id LIMIT $2",
                )
                .await
                .map_err(unavailable)?,
                &[&after, &(BACKFILL_BATCH as i64)],
            )
            .await
            .map_err(unavailable)?;
        let Some(last) = rows.last() else {
            return Ok(n);
        };
        after = last.get(0);
        let mut subsets: Vec<uuid::Uuid> = Vec::new();
        let mut owners: Vec<i64> = Vec::new();
        for r in &rows {
            let id: i64 = r.get(0);
            let attrs = attrs_from_row(r.get(1))?;
            for k in subset_keys(&attrs, t) {
                subsets.push(uuid::Uuid::from_bytes(k));
                owners.push(id);
            }
        }
        let inserted = tx
            .query(
                &tx.prepare_cached(
                    "INSERT INTO subset_owners (subset, group_id) \
                 SELECT s, g FROM unnest($1::uuid[], $2::bigint[]) AS u(s, g) ORDER BY g \
                 ON CONFLICT DO NOTHING RETURNING subset, group_id",
                )
                .await
                .map_err(unavailable)?,
                &[&subsets, &owners],
            )
            .await
            .map_err(unavailable)?;
        let taken: std::collections::HashSet<(uuid::Uuid, i64)> =
            inserted.iter().map(|r| (r.get(0), r.get(1))).collect();
        let (mut os, mut og) = (Vec::new(), Vec::new());
        for (s, g) in subsets.into_iter().zip(owners) {
            if !taken.contains(&(s, g)) {
                os.push(s);
                og.push(g);
            }
        }
        if !os.is_empty() {
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO subset_overlaps (subset, group_id) \
                 SELECT s, g FROM unnest($1::uuid[], $2::bigint[]) AS u(s, g) \
                 ON CONFLICT DO NOTHING",
                )
                .await
                .map_err(unavailable)?,
                &[&os, &og],
            )
            .await
            .map_err(unavailable)?;
        }
        n += rows.len() as u64;
    }
}

impl PgStore {
    /// Changes the deployment's threshold: rebuilds the subset table for the
    /// new one and marks the Redis index dirty, in one transaction that
    /// waits for signups in flight. Existing groups stay as they are.
    #[tracing::instrument(level = "debug", name = "pg.set_threshold", skip_all, fields(operation = "set_threshold", otel.kind = "client", db.system.name = "postgresql"))]
    pub async fn set_threshold(&self, t: Threshold) -> Result<(usize, u64), StoreError> {
        let _timing = self.timer.start("set_threshold");
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        let old: i32 = tx
            .query_opt(
                &tx.prepare_cached("SELECT threshold FROM deployment FOR UPDATE")
                    .await
                    .map_err(unavailable)?,
                &[],
            )
            .await
            .map_err(unavailable)?
            .map(|r| r.get(0))
            .unwrap_or(0);
        tx.batch_execute("DELETE FROM subset_owners; DELETE FROM subset_overlaps;")
            .await
            .map_err(unavailable)?;
        let n = backfill_subsets(&tx, t).await?;
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO deployment (threshold) VALUES ($1) ON CONFLICT (singleton) DO UPDATE \
             SET threshold = $1, index_dirty = deployment.index_dirty + 1, updated_at = now()",
            )
            .await
            .map_err(unavailable)?,
            &[&(t.get() as i32)],
        )
        .await
        .map_err(unavailable)?;
        tx.execute(
            &tx.prepare_cached(
                "UPDATE groups SET indexed = false, indexed_at = NULL WHERE indexed",
            )
            .await
            .map_err(unavailable)?,
            &[],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok((old as usize, n))
    }
}

#[async_trait]
impl IndexSource for PgStore {
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

    #[tracing::instrument(level = "debug", name = "pg.unindexed_groups", skip_all, fields(operation = "unindexed_groups", otel.kind = "client", db.system.name = "postgresql"))]
    async fn unindexed_groups(
        &self,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, IndexError> {
        let _timing = self.timer.start("unindexed_groups");
        let client = self.client().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "SELECT id, attributes FROM groups WHERE NOT indexed ORDER BY id LIMIT $1",
                    )
                    .await
                    .map_err(unavailable)?,
                &[&(limit as i64)],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .map(|r| Ok((GroupId(r.get(0)), attrs_from_row(r.get(1))?)))
            .collect::<Result<Vec<_>, StoreError>>()?)
    }

    #[tracing::instrument(level = "debug", name = "pg.mark_indexed", skip_all, fields(operation = "mark_indexed", otel.kind = "client", db.system.name = "postgresql"))]
    async fn mark_indexed(&self, ids: &[GroupId]) -> Result<(), IndexError> {
        let _timing = self.timer.start("mark_indexed");
        let client = self.client().await?;
        let ids: Vec<i64> = ids.iter().map(|g| g.0).collect();
        client
            .execute(
                &client
                    .prepare_cached(
                        "UPDATE groups SET indexed = true, indexed_at = now() \
                         WHERE id = ANY($1) AND NOT indexed",
                    )
                    .await
                    .map_err(unavailable)?,
                &[&ids],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "pg.mark_indexed_unless_locked", skip_all, fields(operation = "mark_indexed_unless_locked", otel.kind = "client", db.system.name = "postgresql"))]
    async fn mark_indexed_unless_locked(&self, ids: &[GroupId]) -> Result<bool, IndexError> {
        let _timing = self.timer.start("mark_indexed_unless_locked");
        let client = self.client().await?;
        let ids: Vec<i64> = ids.iter().map(|g| g.0).collect();
        // The transaction-level try-lock conflicts with a session holding
        // the sync lock, and is released when this statement's transaction
        // ends. If it is got, a holder-to-be waits for that end, and every
        // group marked here was committed before this statement's snapshot:
        // the holder's later reads see it. If not, nothing is marked.
        let row = client
            .query_one(
                &client
                    .prepare_cached(
                        "WITH l AS MATERIALIZED (SELECT pg_try_advisory_xact_lock($2, $3) AS got), \
                         u AS (UPDATE groups SET indexed = true, indexed_at = now() FROM l \
                           WHERE l.got AND groups.id = ANY($1) AND NOT groups.indexed RETURNING 1) \
                         SELECT got FROM l",
                    )
                    .await
                    .map_err(unavailable)?,
                &[&ids, &LOCK_CLASS, &SYNC_LOCK],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.get(0))
    }

    #[tracing::instrument(level = "debug", name = "pg.marks", skip_all, fields(operation = "marks", otel.kind = "client", db.system.name = "postgresql"))]
    async fn marks(&self) -> Result<IndexMarks, IndexError> {
        let _timing = self.timer.start("marks");
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached(
                        "SELECT index_dirty, index_clean, index_server, threshold FROM deployment",
                    )
                    .await
                    .map_err(unavailable)?,
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(row
            .map(|r| IndexMarks {
                dirty: r.get(0),
                clean: r.get(1),
                synced_server: r.get(2),
                threshold: r.get::<_, i32>(3) as usize,
            })
            .unwrap_or(IndexMarks {
                dirty: 1,
                clean: 0,
                synced_server: None,
                threshold: 0,
            }))
    }

    #[tracing::instrument(level = "debug", name = "pg.mark_dirty", skip_all, fields(operation = "mark_dirty", otel.kind = "client", db.system.name = "postgresql"))]
    async fn mark_dirty(&self) -> Result<(), IndexError> {
        let _timing = self.timer.start("mark_dirty");
        let client = self.client().await?;
        client
            .execute(
                &client
                    .prepare_cached("UPDATE deployment SET index_dirty = index_dirty + 1")
                    .await
                    .map_err(unavailable)?,
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "pg.mark_synced", skip_all, fields(operation = "mark_synced", otel.kind = "client", db.system.name = "postgresql"))]
    async fn mark_synced(&self, dirty: i64, server: &str) -> Result<(), IndexError> {
        let _timing = self.timer.start("mark_synced");
        let client = self.client().await?;
        client
            .execute(
                &client.prepare_cached("UPDATE deployment SET index_clean = GREATEST(index_clean, $1), index_server = $2").await.map_err(unavailable)?,
                &[&dirty, &server],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "pg.lock_sync", skip_all, fields(operation = "lock_sync", otel.kind = "client", db.system.name = "postgresql"))]
    async fn lock_sync(&self) -> Result<Option<SyncLock>, IndexError> {
        let _timing = self.timer.start("lock_sync");
        let client = self.client().await?;
        let got: bool = client
            .query_one(
                &client
                    .prepare_cached("SELECT pg_try_advisory_lock($1, $2)")
                    .await
                    .map_err(unavailable)?,
                &[&LOCK_CLASS, &SYNC_LOCK],
            )
            .await
            .map_err(unavailable)?
            .get(0);
        if !got {
            return Ok(None);
        }
        // The lock belongs to this session: take the connection out of the
        // pool so that dropping the guard closes it and releases the lock,
        // even if the sync fails half-way.
        let conn = deadpool_postgres::Object::take(client);
        Ok(Some(SyncLock(Box::new(conn))))
    }
}

#[path = "postgres_import.rs"]
pub mod import;

#[path = "postgres_stats.rs"]
pub mod stats;
