//! The import session on Postgres (a child of `postgres`, for its private
//! pool and helpers). One connection of its own, taken out of the pool: it
//! holds the sync advisory lock for the session's life, so that no index
//! sync runs while batches lift their own dirty marks, and dropping it (a
//! crash included) closes the connection, which rolls back an open batch
//! and releases the lock.

use std::collections::HashMap;

use async_trait::async_trait;

use super::{
    LOCK_CLASS, PgStore, SUBSET_KEY, SYNC_LOCK, attrs_from_row, is_unique_violation, unavailable,
};
use crate::domain::grouping::SubsetKey;
use crate::domain::{AttributeSet, GroupId};
use crate::store::StoreError;
use crate::store::import::{
    Existing, ImportPlacement, ImportSession, ImportUser, Owner, Written, sorted_subsets,
};

/// Attributes travel joined by U+001F, which a canonical attribute never
/// holds (control characters are refused), and are split back in SQL: an
/// array of arrays cannot be unnested row by row.
const SEP: char = '\x1f';

pub struct PgImportSession {
    client: deadpool_postgres::ClientWrapper,
    t: i16,
}

impl PgStore {
    /// A connection of its own, holding the sync lock (waiting for a sync in
    /// progress to finish).
    pub async fn import_session(&self) -> Result<PgImportSession, StoreError> {
        let client = deadpool_postgres::Object::take(self.client().await?);
        client
            .batch_execute("SET lock_timeout = 0")
            .await
            .map_err(unavailable)?;
        client
            .execute(
                "SELECT pg_advisory_lock($1, $2)",
                &[&LOCK_CLASS, &SYNC_LOCK],
            )
            .await
            .map_err(unavailable)?;
        // A batch is one statement per table for up to --batch lines: the
        // pool's 10 s statement timeout (meant for requests) would cancel
        // a large one on a busy server. The operator stops an import that
        // is stuck; a cancelled batch is rolled back and re-run.
        client
            .batch_execute("SET lock_timeout = 10000; SET statement_timeout = 0")
            .await
            .map_err(unavailable)?;
        Ok(PgImportSession {
            client,
            t: self.t.get() as i16,
        })
    }
}

fn joined(a: &crate::domain::AttributeSet) -> String {
    let mut s = String::new();
    for (i, x) in a.iter().enumerate() {
        if i > 0 {
            s.push(SEP);
        }
        s.push_str(x.as_str());
    }
    s
}

#[async_trait]
impl ImportSession for PgImportSession {
    async fn existing(
        &mut self,
        names: &[String],
    ) -> Result<HashMap<String, Existing>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT n, EXISTS (SELECT 1 FROM users WHERE username = n), \
                   (SELECT fingerprint FROM import_records WHERE username = n) \
                 FROM unnest($1::text[]) AS n",
                &[&names],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let e = Existing {
                    user: r.get(1),
                    record: r.get(2),
                };
                (e.user || e.record.is_some()).then(|| (r.get(0), e))
            })
            .collect())
    }

    async fn begin(&mut self) -> Result<(), StoreError> {
        self.client
            .batch_execute("BEGIN")
            .await
            .map_err(unavailable)?;
        // The deployment row first, as a signup takes it (FOR KEY SHARE),
        // then the subset table: the same order as a founding, so no
        // deadlock with one; a threshold change (FOR UPDATE) waits for us.
        let row = self
            .client
            .query_one("SELECT threshold FROM deployment FOR KEY SHARE", &[])
            .await
            .map_err(unavailable)?;
        let deployed = row.get::<_, i32>(0) as usize;
        if deployed != self.t as usize {
            let _ = self.client.batch_execute("ROLLBACK").await;
            return Err(StoreError::ThresholdMismatch {
                deployed,
                configured: self.t as usize,
            });
        }
        // Foundings insert into subset_owners (ROW EXCLUSIVE): this waits for
        // those in flight to commit, and keeps new ones out until we end.
        // Joins do not touch the table and go on.
        self.client
            .batch_execute("LOCK TABLE subset_owners IN SHARE ROW EXCLUSIVE MODE")
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn owners(&mut self, keys: &[&SubsetKey]) -> Result<Vec<Owner>, StoreError> {
        let keys: Vec<uuid::Uuid> = keys.iter().map(|k| uuid::Uuid::from_bytes(**k)).collect();
        let rows = self
            .client
            .query(
                // One index probe a key, in key order (the caller sorts
                // them): `subset = ANY($1)` with a million keys was planned
                // as a scan of the whole table with a hashed filter, a cost
                // that grows with the table at every batch. `OFFSET 0`
                // keeps the lateral subquery a subquery, probed per key.
                "SELECT s.subset, g.id, g.attributes \
                 FROM unnest($1::uuid[]) AS k(subset) \
                 CROSS JOIN LATERAL ( \
                   SELECT subset, group_id FROM subset_owners WHERE subset = k.subset \
                   UNION ALL \
                   SELECT subset, group_id FROM subset_overlaps WHERE subset = k.subset \
                   OFFSET 0 \
                 ) AS s JOIN groups g ON g.id = s.group_id",
                &[&keys],
            )
            .await
            .map_err(unavailable)?;
        rows.into_iter()
            .map(|r| {
                let subset: uuid::Uuid = r.get(0);
                Ok((
                    subset.into_bytes(),
                    GroupId(r.get(1)),
                    attrs_from_row(r.get(2))?,
                ))
            })
            .collect()
    }

    async fn unindexed(
        &mut self,
        known: &(dyn Fn(GroupId) -> bool + Sync),
    ) -> Result<Vec<(GroupId, AttributeSet)>, StoreError> {
        // The ids first (the partial index `groups_unindexed` holds exactly
        // these rows), then the attributes of the unknown ones only: while
        // Redis refuses adds (no index built yet), every group this session
        // founded stays unindexed, and reading all their attributes at each
        // batch would grow with the import.
        let ids: Vec<i64> = self
            .client
            .query("SELECT id FROM groups WHERE NOT indexed", &[])
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|r| r.get(0))
            .filter(|&id| !known(GroupId(id)))
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .client
            .query(
                "SELECT id, attributes FROM groups WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(unavailable)?;
        rows.into_iter()
            .map(|r| Ok((GroupId(r.get(0)), attrs_from_row(r.get(1))?)))
            .collect()
    }

    async fn write(&mut self, users: &[ImportUser]) -> Result<Written, StoreError> {
        let c = &self.client;
        let clock = std::time::Instant::now();
        let mut groups_done = std::time::Duration::ZERO;
        let founders: Vec<&ImportUser> = users
            .iter()
            .filter(|u| u.placement == ImportPlacement::Found)
            .collect();
        let mut founded: Vec<GroupId> = Vec::with_capacity(founders.len());
        if !founders.is_empty() {
            let mut ids: Vec<i64> = c
                .query(
                    "SELECT nextval('group_ids') FROM generate_series(1, $1::int)",
                    &[&(founders.len() as i32)],
                )
                .await
                .map_err(unavailable)?
                .into_iter()
                .map(|r| r.get(0))
                .collect();
            ids.sort_unstable();
            let attrs: Vec<String> = founders.iter().map(|u| joined(&u.attributes)).collect();
            c.execute(
                "INSERT INTO groups (id, attributes) \
                 SELECT i, string_to_array(a, E'\\x1f') FROM unnest($1::bigint[], $2::text[]) AS u(i, a)",
                &[&ids, &attrs],
            )
            .await
            .map_err(unavailable)?;
            groups_done = clock.elapsed();
            // In key order: each primary-key leaf page is dirtied (and
            // WAL-logged) once for its rows of the batch, not once a row.
            let (subsets, owners): (Vec<uuid::Uuid>, Vec<i64>) =
                sorted_subsets(founders.iter().copied().zip(ids.iter().copied()))
                    .into_iter()
                    .map(|(k, g)| (uuid::Uuid::from_bytes(*k), g))
                    .unzip();
            c.execute(
                "INSERT INTO subset_owners (subset, group_id) \
                 SELECT s, g FROM unnest($1::uuid[], $2::bigint[]) AS u(s, g)",
                &[&subsets, &owners],
            )
            .await
            .map_err(|e| {
                if is_unique_violation(&e, SUBSET_KEY) {
                    StoreError::Overlap
                } else {
                    unavailable(e)
                }
            })?;
            founded = ids.into_iter().map(GroupId).collect();
        }
        let subsets_done = clock.elapsed();
        let mut names = Vec::with_capacity(users.len());
        let mut hashes = Vec::with_capacity(users.len());
        let mut attrs = Vec::with_capacity(users.len());
        let mut groups = Vec::with_capacity(users.len());
        let mut prints: Vec<&[u8]> = Vec::with_capacity(users.len());
        let mut n_found = 0;
        for u in users {
            names.push(u.username.as_str());
            hashes.push(u.password_hash.as_str());
            attrs.push(joined(&u.attributes));
            prints.push(&u.fingerprint);
            groups.push(match u.placement {
                ImportPlacement::Join(g) => g.0,
                ImportPlacement::JoinFounded(n) => founded[n].0,
                ImportPlacement::Found => {
                    n_found += 1;
                    founded[n_found - 1].0
                }
            });
        }
        // In file order: ids ascend with it, so a founder is its group's
        // first member.
        c.execute(
            "INSERT INTO users (username, password_hash, attributes, group_id) \
             SELECT u, h, string_to_array(a, E'\\x1f'), g \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) WITH ORDINALITY AS x(u, h, a, g, o) \
             ORDER BY o",
            &[&names, &hashes, &attrs, &groups],
        )
        .await
        .map_err(|e| {
            if is_unique_violation(&e, "users_username_key") {
                StoreError::UsernameTaken
            } else {
                unavailable(e)
            }
        })?;
        let users_done = clock.elapsed();
        c.execute(
            "INSERT INTO import_records (username, fingerprint) \
             SELECT * FROM unnest($1::text[], $2::bytea[]) \
             ON CONFLICT (username) DO UPDATE SET fingerprint = excluded.fingerprint, imported_at = now()",
            &[&names, &prints],
        )
        .await
        .map_err(unavailable)?;
        tracing::debug!(
            groups_ms = groups_done.as_millis() as u64,
            subsets_ms = (subsets_done - groups_done).as_millis() as u64,
            users_ms = (users_done - subsets_done).as_millis() as u64,
            records_ms = (clock.elapsed() - users_done).as_millis() as u64,
            "batch written"
        );
        Ok(Written { founded })
    }

    async fn mark_dirty(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .client
            .query_one(
                "UPDATE deployment SET index_dirty = index_dirty + 1 RETURNING index_dirty",
                &[],
            )
            .await
            .map_err(unavailable)?
            .get(0))
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(unavailable)
    }

    async fn rollback(&mut self) -> Result<(), StoreError> {
        self.client
            .batch_execute("ROLLBACK")
            .await
            .map_err(unavailable)
    }
}

impl PgImportSession {
    /// Of the committed groups `ids` (a batch's joined groups), those not
    /// marked indexed: the only ones step 5 must add to Redis. While the
    /// session holds the sync lock no one else marks a group indexed, so
    /// the answer holds until the batch's step 5. (A batch of 50,000 lines
    /// joins ~17,000 groups at 10^6 users, nearly all indexed: re-adding
    /// them was over a third of Redis's work.)
    pub async fn unconfirmed(&mut self, ids: &[GroupId]) -> Result<Vec<GroupId>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = ids.iter().map(|g| g.0).collect();
        Ok(self
            .client
            .query(
                "SELECT id FROM groups WHERE id = ANY($1) AND NOT indexed ORDER BY id",
                &[&ids],
            )
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|r| GroupId(r.get(0)))
            .collect())
    }
}

impl PgStore {
    /// After every group of the import batch with mark `mark` is in the
    /// index on the server `server`: lifts the mark if the one before it
    /// was lifted and nothing else marked the index dirty since. True if
    /// lifted. On a pool connection: the import's publishing of one batch
    /// runs beside the writing of the next, whose transaction holds the
    /// deployment row `FOR KEY SHARE` only (no conflict with this update).
    pub async fn lift_dirty_mark(&self, mark: i64, server: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE deployment SET index_clean = $1 \
                 WHERE index_dirty = $1 AND index_clean = $1 - 1 AND index_server = $2",
                &[&mark, &server],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }
}
