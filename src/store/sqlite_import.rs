//! The import session on the embedded store (a child of `sqlite`, for its
//! connection and helpers). The data directory's lock already keeps every
//! other process out, so a batch's transaction needs no lock of its own; it
//! is `BEGIN IMMEDIATE` all the same, and the page cache is enlarged for
//! the session. Batches are written by `write_batch` while the import
//! decides the next one (see `crate::import`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, params};

use super::{SqliteStore, attrs_to_json, is_unique, unavailable};
use crate::domain::{GroupId, Threshold};
use crate::store::StoreError;
use crate::store::import::{Existing, ImportPlacement, ImportUser};

/// Page cache for an import session, in KiB (SQLite's negative form).
const IMPORT_CACHE_KIB: i64 = 1 << 20;

pub struct SqliteImportSession {
    store: SqliteStore,
    /// A second connection, read-only, for `existing`: in WAL mode a reader
    /// does not wait for the writer, so the next batch's names are looked
    /// up while the last batch is being written (`write_batch`).
    reader: Arc<Mutex<Connection>>,
}

/// Page cache of the reader connection, in KiB.
const READER_CACHE_KIB: i64 = 1 << 18;

impl SqliteStore {
    pub async fn import_session(&self) -> Result<SqliteImportSession, StoreError> {
        self.with(|c| {
            // NORMAL: a batch's commit does not wait for the disk (the WAL
            // is synced at checkpoints and at `finish`). A process crash
            // loses nothing (the WAL is in the OS's cache); a power loss or
            // OS crash may lose the last batches, never corrupts, and
            // loses them whole (a batch is one transaction), which a
            // re-run of the import brings back (they have no import
            // records). Only the import runs on this connection (the data
            // directory's lock), and it is back to FULL before the
            // session ends.
            //
            // Foreign keys off: checking them costs a `groups` lookup for
            // every user, and a batch cannot break them: every group id it writes is
            // one it inserted just before in the same transaction, or one
            // the in-process index holds, which holds committed groups
            // only; groups are never deleted. A pragma of this connection
            // only (not stored), and back on in `finish`.
            c.execute_batch(&format!(
                "PRAGMA cache_size = -{IMPORT_CACHE_KIB}; PRAGMA synchronous = NORMAL; \
                 PRAGMA foreign_keys = OFF"
            ))
            .map_err(unavailable)
        })
        .await?;
        let path = self
            .with(|c| {
                c.path()
                    .map(str::to_owned)
                    .ok_or_else(|| unavailable("the database has no file"))
            })
            .await?;
        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| {
            c.execute_batch(&format!("PRAGMA cache_size = -{READER_CACHE_KIB}"))?;
            Ok(c)
        })
        .map_err(unavailable)?;
        Ok(SqliteImportSession {
            store: self.clone(),
            reader: Arc::new(Mutex::new(reader)),
        })
    }
}

/// Opens a batch's transaction, checking the deployment's threshold.
fn begin_batch(c: &Connection, t: Threshold) -> Result<(), StoreError> {
    c.execute_batch("BEGIN IMMEDIATE").map_err(unavailable)?;
    let deployed: i64 = c
        .query_row("SELECT threshold FROM deployment", [], |r| r.get(0))
        .map_err(unavailable)?;
    if deployed as usize != t.get() {
        let _ = c.execute_batch("ROLLBACK");
        return Err(StoreError::ThresholdMismatch {
            deployed: deployed as usize,
            configured: t.get(),
        });
    }
    Ok(())
}

/// The id the next founded group gets (ids are the groups' rowids, and
/// only this process writes).
fn next_group_id(c: &Connection) -> Result<i64, StoreError> {
    c.query_row("SELECT coalesce(max(id), 0) + 1 FROM groups", [], |r| {
        r.get(0)
    })
    .map_err(unavailable)
}

/// A batch's rows in the open transaction: its groups numbered from
/// `next`, its users in file order, their import records, and the member
/// counts (migration V8): a founded group is inserted with its batch's
/// members counted, an older group gains them in one update.
fn write_rows(c: &Connection, users: &[ImportUser], next: i64) -> Result<Vec<GroupId>, StoreError> {
    let stamp = chrono::Utc::now().to_rfc3339();
    // Members a founded group (by founding order) and an older group get.
    let mut founders = 0usize;
    let mut new_members: Vec<i64> = Vec::new();
    let mut old_members: std::collections::BTreeMap<i64, i64> = Default::default();
    for u in users {
        match u.placement {
            ImportPlacement::Found => {
                founders += 1;
                new_members.push(1);
            }
            ImportPlacement::JoinFounded(n) => new_members[n] += 1,
            ImportPlacement::Join(g) => *old_members.entry(g.0).or_default() += 1,
        }
    }
    let mut founded = Vec::with_capacity(founders);
    {
        let mut group = c
            .prepare_cached(
                "INSERT INTO groups (id, attributes, created_at, member_count) \
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(unavailable)?;
        for u in users
            .iter()
            .filter(|u| u.placement == ImportPlacement::Found)
        {
            let id = next + founded.len() as i64;
            group
                .execute(params![
                    id,
                    attrs_to_json(&u.attributes),
                    stamp,
                    new_members[founded.len()]
                ])
                .map_err(unavailable)?;
            founded.push(GroupId(id));
        }
        // In id order: neighbouring groups share pages.
        let mut grow = c
            .prepare_cached("UPDATE groups SET member_count = member_count + ?2 WHERE id = ?1")
            .map_err(unavailable)?;
        for (g, n) in old_members {
            grow.execute([g, n]).map_err(unavailable)?;
        }
    }
    let mut user = c
        .prepare_cached(
            "INSERT INTO users (username, password_hash, attributes, group_id, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(unavailable)?;
    let mut record = c
        .prepare_cached(
            "INSERT OR REPLACE INTO import_records (username, fingerprint) VALUES (?1, ?2)",
        )
        .map_err(unavailable)?;
    let mut n_found = 0;
    for u in users {
        let g = match u.placement {
            ImportPlacement::Join(g) => g,
            ImportPlacement::JoinFounded(n) => founded[n],
            ImportPlacement::Found => {
                n_found += 1;
                founded[n_found - 1]
            }
        };
        user.execute(params![
            u.username.as_str(),
            u.password_hash,
            attrs_to_json(&u.attributes),
            g.0,
            stamp
        ])
        .map_err(|e| {
            if is_unique(&e) {
                StoreError::UsernameTaken
            } else {
                unavailable(e)
            }
        })?;
        record
            .execute(params![u.username.as_str(), u.fingerprint])
            .map_err(unavailable)?;
    }
    Ok(founded)
}

impl SqliteImportSession {
    /// The id the next founded group will get.
    pub async fn next_group_id(&self) -> Result<i64, StoreError> {
        self.store.with(|c| next_group_id(c)).await
    }

    /// Writes and commits one batch decided ahead (the import's pipeline:
    /// the next batch is decided meanwhile). Its founders' groups get ids
    /// from `first` on, as the decider numbered them in the in-process
    /// index; if the store's next id is another, nothing is written.
    /// Takes the batch by value: no copy of it crosses to the writer.
    pub fn write_batch(
        &self,
        users: Vec<ImportUser>,
        first: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let store = self.store.clone();
        let t = store.t;
        async move {
            store
                .with(move |c| {
                    begin_batch(c, t)?;
                    let written = (|| {
                        let next = next_group_id(c)?;
                        if next != first {
                            return Err(unavailable(format!(
                                "the next group id is {next}, the import numbered from {first}"
                            )));
                        }
                        crate::failpoint::hit("import:decided");
                        write_rows(c, &users, next)?;
                        crate::failpoint::hit("import:written");
                        c.execute_batch("COMMIT").map_err(unavailable)
                    })();
                    if written.is_err() && !c.is_autocommit() {
                        let _ = c.execute_batch("ROLLBACK");
                    }
                    written?;
                    crate::failpoint::hit("import:committed");
                    Ok(())
                })
                .await
        }
    }
}

impl SqliteImportSession {
    /// The usernames of `names` that exist or were imported.
    pub async fn existing(
        &self,
        names: &[String],
    ) -> Result<HashMap<String, Existing>, StoreError> {
        let mut names = names.to_vec();
        // In index order: one page serves neighbouring names.
        names.sort_unstable();
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let c = reader
                .lock()
                .map_err(|_| unavailable("reader mutex poisoned"))?;
            let mut stmt = c
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM users WHERE username = ?1), \
                       (SELECT fingerprint FROM import_records WHERE username = ?1)",
                )
                .map_err(unavailable)?;
            let mut out = HashMap::new();
            for n in names {
                let e = stmt
                    .query_row([&n], |r| {
                        Ok(Existing {
                            user: r.get(0)?,
                            record: r.get(1)?,
                        })
                    })
                    .map_err(unavailable)?;
                if e.user || e.record.is_some() {
                    out.insert(n, e);
                }
            }
            Ok(out)
        })
        .await
        .map_err(unavailable)?
    }

    /// Back to FULL and foreign keys on, and a checkpoint that syncs the
    /// WAL and the database: when the import reports success, every batch
    /// is on disk.
    pub async fn finish(&mut self) -> Result<(), StoreError> {
        self.store
            .with(|c| {
                c.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON")
                    .map_err(unavailable)?;
                c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    .map_err(unavailable)
            })
            .await
    }
}
