//! `cohort stats` and the group-size metrics on the embedded store (a child
//! of `sqlite`, for its connection and helpers).

use std::path::Path;

use rusqlite::{Connection, OpenFlags, params};

use super::{SqliteStore, unavailable};
use crate::stats::{AttributeCount, SizeDistribution, Stats};
use crate::store::StoreError;

const SIZES: &str = "SELECT member_count, count(*) FROM groups GROUP BY member_count";

fn sizes(c: &Connection) -> Result<SizeDistribution, StoreError> {
    let mut stmt = c.prepare_cached(SIZES).map_err(unavailable)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .map_err(unavailable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unavailable)?;
    Ok(SizeDistribution::from_rows(
        rows.into_iter()
            .map(|(s, n)| (s.max(0) as u64, n.max(0) as u64)),
    ))
}

impl SqliteStore {
    pub(super) async fn group_size_distribution(&self) -> Result<SizeDistribution, StoreError> {
        self.with(|c| sizes(c)).await
    }
}

/// Everything `cohort stats` shows, from the database file at `path`,
/// opened read-only and without the data directory's lock: SQLite's WAL
/// lets one reader beside the server (or an import), which it neither
/// blocks nor sees half-way (one read transaction, one snapshot).
pub fn stats_of_file(path: &Path, top: usize) -> Result<Stats, StoreError> {
    if !path.exists() {
        return Err(StoreError::Unavailable(format!(
            "no database at {}: nothing was served or imported with this data directory",
            path.display()
        )));
    }
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(unavailable)?;
    c.execute_batch("BEGIN").map_err(unavailable)?;
    let users: i64 = c
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
        .map_err(unavailable)?;
    let sizes = sizes(&c)?;
    let mut stmt = c
        .prepare(
            "SELECT j.value, count(*) FROM users, json_each(users.attributes) AS j \
             GROUP BY j.value ORDER BY count(*) DESC, j.value LIMIT ?1",
        )
        .map_err(unavailable)?;
    let top = stmt
        .query_map(params![top as i64], |r| {
            Ok(AttributeCount {
                attribute: r.get(0)?,
                users: r.get::<_, i64>(1)? as u64,
            })
        })
        .map_err(unavailable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unavailable)?;
    drop(stmt);
    c.execute_batch("COMMIT").map_err(unavailable)?;
    Ok(Stats::new("embedded", users as u64, &sizes, top))
}
