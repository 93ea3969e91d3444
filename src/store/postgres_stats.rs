//! `cohort stats` and the group-size metrics on Postgres (a child of
//! `postgres`, for its pool and helpers).

use super::{PgStore, unavailable};
use crate::stats::{AttributeCount, SizeDistribution, Stats};
use crate::store::StoreError;

/// Group sizes from the sharded member counters, one statement (one
/// snapshot): sizes with their number of groups, and the groups with no
/// counter row at all (none but those empty when the counters were built).
pub(super) const SIZES: &str = "\
    WITH s AS (SELECT sum(n)::bigint AS s FROM group_member_counts GROUP BY group_id) \
    SELECT s, count(*) FROM s GROUP BY s \
    UNION ALL \
    SELECT 0, (SELECT count(*) FROM groups) - (SELECT count(*) FROM s)";

fn sizes_from(rows: Vec<tokio_postgres::Row>) -> SizeDistribution {
    SizeDistribution::from_rows(rows.into_iter().map(|r| {
        (
            r.get::<_, i64>(0).max(0) as u64,
            r.get::<_, i64>(1).max(0) as u64,
        )
    }))
}

impl PgStore {
    pub(super) async fn group_size_distribution(&self) -> Result<SizeDistribution, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client.prepare_cached(SIZES).await.map_err(unavailable)?,
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(sizes_from(rows))
    }

    /// Everything `cohort stats` shows, read in one snapshot (a read-only
    /// repeatable-read transaction, without the pool's statement timeout:
    /// the commonest attributes take a scan of every user).
    pub async fn stats(&self, top: usize) -> Result<Stats, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(unavailable)?;
        tx.batch_execute("SET LOCAL statement_timeout = 0")
            .await
            .map_err(unavailable)?;
        let users: i64 = tx
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .map_err(unavailable)?
            .get(0);
        let sizes = sizes_from(tx.query(SIZES, &[]).await.map_err(unavailable)?);
        let top = tx
            .query(
                "SELECT a, count(*) FROM users, unnest(attributes) AS a \
                 GROUP BY a ORDER BY count(*) DESC, a LIMIT $1",
                &[&(top as i64)],
            )
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|r| AttributeCount {
                attribute: r.get(0),
                users: r.get::<_, i64>(1) as u64,
            })
            .collect();
        tx.commit().await.map_err(unavailable)?;
        Ok(Stats::new("distributed", users as u64, &sizes, top))
    }
}
