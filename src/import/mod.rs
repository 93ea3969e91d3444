//! `cohort import FILE`: signs up every user of a JSON Lines file, with the
//! groups that signing them up one at a time, in file order, would give,
//! while live signups go on (an import is many signups; the invariant is
//! the one of `crate::signup`).
//!
//! # Pipeline
//! A reader streams the file in chunks of `--batch` lines (memory is
//! bounded by a few chunks); they are validated on every core (`line`:
//! the signup's own validation and canonicalisation, the common-password
//! check for new passwords, argon2id parameters for hashes); names already
//! present are sorted out; new passwords are hashed on every core; then the
//! chunk is placed and committed as one batch, in file order.
//!
//! # A batch's steps (distributed mode)
//! The session holds, for its whole life, the sync advisory lock on a
//! connection of its own: no replica syncs the index meanwhile (they decide
//! from Postgres whenever they find it dirty), and no other import runs.
//! 1. Sort out: lines whose username exists. With an import record of the
//!    same fingerprint, the line was imported before: *already imported*,
//!    skipped. Otherwise the name is taken: a reject. *Reads only.*
//! 2. Open the transaction: the deployment row `FOR KEY SHARE` (the
//!    threshold), then `LOCK TABLE subset_owners IN SHARE ROW EXCLUSIVE`:
//!    foundings in flight commit first, new ones wait until we end; joins
//!    go on.
//! 3. Decide (`place`), in file order: each line against the committed
//!    groups (none can appear until we commit) and the groups of the lines
//!    before it in the batch. *Reads only.* The committed groups are, with
//!    `--decide memory` (the default below 4 million groups), every group
//!    held in this process: all of them, loaded once the session holds the
//!    sync lock, plus, at each batch, the unindexed groups it does not know
//!    yet. That read misses none: groups are never deleted, and while the
//!    session holds the sync lock no one else marks a group indexed, so a
//!    group committed after the load is unindexed until this session adds
//!    it. With `--decide database`, the committed owners of the batch's
//!    t-subsets, read now (every group a line could join): no memory, but a
//!    million index probes a batch of 50,000.
//! 4. Write and commit: the groups (ids from the sequence, ascending in
//!    file order, `indexed` false), their subsets (the primary key still
//!    arbitrates), the users in file order, the import records, and
//!    `index_dirty + 1`: from our commit on, no replica commits a join
//!    decided in Redis (it decides again from Postgres, which has our
//!    groups). A taken username (a live signup got it after step 1) or a
//!    taken subset: roll back, back to 1.
//! 5. Publish: add the batch's groups to Redis in id order, and the
//!    committed groups it joined that are not marked indexed (a founder
//!    may not have added its own yet; a group marked indexed is in Redis
//!    unless Redis changed, and then no mark is lifted; the batch before's
//!    own are added by its step 5, which ends before our mark); mark them
//!    indexed; if the Redis server is the one the last sync
//!    recorded and nothing else marked the index dirty since, lift our mark
//!    (`index_clean = mark`, conditionally). This step runs on connections
//!    of its own while the next batch goes through 1 to 4, and ends before
//!    that batch sets its own mark: marks are set and lifted in order, as
//!    if the batches ran one after the other. (At 10^6 groups adding a
//!    batch of 50,000 lines to Redis takes about as long as writing the
//!    next one to Postgres.)
//!
//! # Why the order is the one-at-a-time order
//! Take the batch's point to be its commit: every decision in it is exact
//! for the groups committed then (no founding can commit between step 2
//! and 4) plus the batch's earlier lines. From that point every decision
//! that sees the batch's groups is made in Postgres, or in Redis once they
//! are all there (the mark is lifted only then). A group the batch joined
//! whose founder has not added it yet has its point at our commit at the
//! latest: any decision after it comes from Postgres until we added it.
//!
//! # What each failure leaves (SIGKILL included)
//! - in 1 to 3, or 4 before the commit: the transaction rolls back (the
//!   connection closes with the process); nothing of the batch anywhere;
//!   the lock goes with the session.
//! - after 4, before 5 finishes: a committed batch and the index marked
//!   dirty: replicas decide from Postgres, and once the lock is gone one of
//!   them syncs (it adds the unindexed groups, or re-adds all if Redis lacks
//!   any) and lifts the mark.
//! - in 5 (Redis down): the same; the import goes on, its later marks are
//!   not lifted, and the index is synced once the import ends.
//! - running it again: committed batches are found by their import records
//!   (step 1: already imported), so nothing is imported twice, and the
//!   rest goes through the same steps.
//!
//! # Embedded mode
//! The data directory's lock keeps every other process out (stop the
//! server first), so each line is decided against the in-process index of
//! all groups, exactly as the server's signup is (that index is the
//! embedded mode's arbiter: there is no subset table to write), and a
//! batch commits in one SQLite transaction; nothing is marked. The
//! batches are pipelined (`import_chunk_embedded`): the index learns a
//! batch's groups as it is decided, with the ids the writer will give them
//! (this process numbers every group), and the batch is written while the
//! next is sorted out (on a second, read-only connection, plus the names
//! of the batch in flight) and decided. A failed write stops the import:
//! the groups the index learned ahead die with the process, and the next
//! start indexes what was committed. The session commits
//! with `synchronous=NORMAL` (no fsync a batch): a killed process loses
//! nothing, a power loss at most the last batches, whole, which a re-run
//! imports (they have no import records); `finish` sets FULL again and runs
//! a syncing checkpoint before the import reports success.

pub mod line;
pub mod place;
pub mod report;

use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::auth::PasswordHasher;
use crate::config::{Config, Mode};
use crate::domain::grouping::SubsetKey;
use crate::domain::{AttributeSet, GroupId, Threshold};
use crate::index::IndexError;
use crate::index::memory::MemoryIndex;
use crate::index::redis::RedisIndex;
use crate::store::StoreError;
use crate::store::import::{Existing, ImportPlacement, ImportSession, ImportUser};
use line::{Credential, Entry, Reject, Rules};
use report::{Progress, Rejects, Summary};

/// Decide-and-commit rounds for one batch before giving up: each retry
/// follows a username a live signup took meanwhile (now sorted out).
const MAX_ROUNDS: usize = 8;

#[derive(Debug, Clone)]
pub struct Options {
    /// The file, or `-` for standard input.
    pub file: PathBuf,
    /// Where to list rejected lines (default: FILE.rejects.jsonl, or
    /// import.rejects.jsonl for standard input).
    pub rejects: Option<PathBuf>,
    /// Lines per batch.
    pub batch: usize,
    /// The summary as JSON on standard output; no progress bar.
    pub json: bool,
    /// Distributed mode: what each line is decided against.
    pub decide: Decide,
}

/// What a distributed import decides each line against. Both are exact;
/// they differ in speed and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Decide {
    /// `memory` up to 4 million groups at the start, `database` above.
    #[default]
    Auto,
    /// Every group held in this process (loaded at the start, ~1 KB a
    /// group), and the groups others commit read at each batch.
    Memory,
    /// The committed owners of each batch's t-subsets, probed in Postgres
    /// (a million index probes a batch of 50,000): little memory.
    Database,
}

/// Above this many groups at the start, `auto` decides against the
/// database: the groups in memory would take gigabytes.
const MEMORY_MAX_GROUPS: u64 = 4_000_000;

/// Groups added to Redis a pipeline when publishing a batch.
const PUBLISH_CHUNK: usize = 2_000;

/// Groups read a statement when loading them into memory.
const LOAD_PAGE: usize = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write the reject file {path}: {source}")]
    Rejects {
        path: String,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("group index: {0}")]
    Index(#[from] IndexError),
    #[error("{0}")]
    Setup(String),
}

/// Where batches are decided and committed.
enum Backend {
    Distributed {
        session: Box<crate::store::postgres::import::PgImportSession>,
        /// For step 5, on connections of their own.
        store: crate::store::postgres::PgStore,
        redis: Arc<RedisIndex>,
        /// Every committed group, when deciding in memory.
        known: Option<Arc<MemoryIndex>>,
        /// Step 5 of the last committed batch, running while the next one
        /// is sorted out, decided and written (`place_and_commit`).
        publishing: Option<tokio::task::JoinHandle<Result<(), ImportError>>>,
        /// The groups that step 5 adds, ascending: in Redis before the next
        /// batch sets its mark, though not yet marked indexed.
        publishing_founded: Vec<GroupId>,
    },
    Embedded {
        session: crate::store::sqlite::import::SqliteImportSession,
        index: Arc<MemoryIndex>,
        /// The id the next founded group gets.
        next_id: i64,
        /// The batch being written while the next is decided.
        in_flight: Option<InFlight>,
        _lock: std::fs::File,
    },
}

/// Embedded mode's pipeline: a decided batch is written and committed by
/// the store's connection while the next one is sorted out (on a reader
/// connection) and decided (against the in-process index, which has the
/// written batch's groups already). At most one batch is in flight.
struct InFlight {
    write: tokio::task::JoinHandle<Result<(), StoreError>>,
    /// Its usernames and fingerprints: the next batch's sorting out sees
    /// them as imported, committed or not yet.
    names: HashMap<String, Vec<u8>>,
}

impl InFlight {
    async fn finish(self) -> Result<(), ImportError> {
        self.write
            .await
            .map_err(|e| ImportError::Setup(format!("the batch writer failed: {e}")))??;
        Ok(())
    }
}

impl Backend {
    /// After the last batch: everything committed made durable.
    async fn finish(&mut self) -> Result<(), StoreError> {
        match self {
            Backend::Distributed { session, .. } => session.finish().await,
            Backend::Embedded { session, .. } => session.finish().await,
        }
    }
}

/// Waits for a batch's step 5.
async fn published(
    task: tokio::task::JoinHandle<Result<(), ImportError>>,
) -> Result<(), ImportError> {
    task.await
        .map_err(|e| ImportError::Setup(format!("publishing a batch failed: {e}")))?
}

/// Runs an import to its end; the summary says what became of every line.
pub async fn run(config: Config, opts: Options) -> Result<Summary, ImportError> {
    let started = Instant::now();
    let t = config.threshold;
    let (reader, total, shown): (Box<dyn Read + Send>, Option<u64>, String) =
        if opts.file.as_os_str() == "-" {
            (Box::new(std::io::stdin()), None, "standard input".into())
        } else {
            let f = std::fs::File::open(&opts.file).map_err(|e| ImportError::Read {
                path: opts.file.display().to_string(),
                source: e,
            })?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(f), len, opts.file.display().to_string())
        };
    let rejects_path = opts.rejects.clone().unwrap_or_else(|| {
        if opts.file.as_os_str() == "-" {
            PathBuf::from("import.rejects.jsonl")
        } else {
            let mut p = opts.file.clone().into_os_string();
            p.push(".rejects.jsonl");
            PathBuf::from(p)
        }
    });
    let mut rejects = Rejects::create(&rejects_path).map_err(|e| ImportError::Rejects {
        path: rejects_path.display().to_string(),
        source: e,
    })?;
    let (mut backend, secret) = connect(&config, opts.decide).await?;
    let rules = Rules {
        attributes: config.rules,
        threshold: t,
        fingerprinter: line::Fingerprinter::new(&secret),
        subset_keys: matches!(config.mode, Mode::Distributed { .. }),
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hasher = PasswordHasher::new(cores, Arc::new(|_| {}));

    // The reader and the validation run ahead of the batches by a chunk.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Chunk, ImportError>>(2);
    let batch = opts.batch.max(1);
    let reading = tokio::task::spawn_blocking(move || read_chunks(reader, batch, shown, tx));
    let (vtx, mut vrx) = tokio::sync::mpsc::channel::<Result<Validated, ImportError>>(1);
    let validating = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            let v = match chunk {
                Ok(c) => Ok(validate(c, &rules, cores).await),
                Err(e) => Err(e),
            };
            if vtx.send(v).await.is_err() {
                return;
            }
        }
    });

    let mut summary = Summary {
        rejects_file: Some(rejects_path.clone()),
        ..Summary::default()
    };
    let mut progress = Progress::new(total, opts.json);
    let result = async {
        while let Some(v) = vrx.recv().await {
            let v = v?;
            if summary.lines == 0 {
                reserve_index(&backend, total, &v);
            }
            summary.lines += v.lines;
            let mut rejected = v.rejects;
            import_chunk(
                &mut backend,
                t,
                &hasher,
                v.entries,
                &mut summary,
                &mut rejected,
            )
            .await?;
            rejected.sort_by_key(|r| r.line);
            summary.rejected += rejected.len() as u64;
            for r in &rejected {
                rejects.write(r).map_err(|e| ImportError::Rejects {
                    path: rejects_path.display().to_string(),
                    source: e,
                })?;
            }
            rejects.flush().map_err(|e| ImportError::Rejects {
                path: rejects_path.display().to_string(),
                source: e,
            })?;
            progress.update(v.bytes, &summary);
        }
        Ok::<(), ImportError>(())
    }
    .await;
    progress.finish();
    drop(vrx);
    validating.abort();
    let _ = reading.await;
    // The last batch, written or failed, before anything is reported.
    let written = match &mut backend {
        Backend::Embedded { in_flight, .. } => match in_flight.take() {
            Some(f) => f.finish().await,
            None => Ok(()),
        },
        Backend::Distributed { publishing, .. } => match publishing.take() {
            Some(p) => published(p).await,
            None => Ok(()),
        },
    };
    result?;
    written?;
    backend.finish().await?;
    if summary.rejected == 0 {
        let _ = std::fs::remove_file(&rejects_path);
        summary.rejects_file = None;
    }
    summary.finish(started.elapsed());
    Ok(summary)
}

async fn connect(config: &Config, decide: Decide) -> Result<(Backend, Vec<u8>), ImportError> {
    let setup = |e: String| ImportError::Setup(e);
    match &config.mode {
        Mode::Distributed {
            database_url,
            redis_url,
            jwt_secret,
        } => {
            let ca = config.settings.tls_ca_file.as_deref();
            let store = crate::store::postgres::PgStore::connect_with(
                database_url,
                ca,
                2,
                config.threshold,
            )
            .map_err(setup)?;
            store.migrate().await.map_err(setup)?;
            let deployed = crate::store::Store::ensure_deployment(&store, config.threshold).await?;
            if deployed != config.threshold.get() {
                return Err(setup(format!(
                    "the deployment's threshold is {deployed}, not {}: run with COHORT_MATCH_THRESHOLD={deployed}",
                    config.threshold.get()
                )));
            }
            let client = crate::tls::redis(redis_url, ca).map_err(setup)?;
            let conn = crate::index::redis::conn::RedisConn::with_client(
                client,
                std::time::Duration::from_secs(10),
            );
            let redis = RedisIndex::new(
                Arc::new(conn),
                &config.settings.redis_prefix,
                config.threshold,
            );
            let session = store.import_session().await?;
            let redis = Arc::new(redis);
            let groups = match decide {
                Decide::Database => 0,
                _ => crate::store::Store::counts(&store).await?.0,
            };
            let known = match decide {
                Decide::Database => None,
                Decide::Memory => Some(load_groups(&store, config.threshold, groups).await?),
                Decide::Auto => {
                    if groups <= MEMORY_MAX_GROUPS {
                        Some(load_groups(&store, config.threshold, groups).await?)
                    } else {
                        tracing::info!(
                            groups,
                            "deciding against the database: more groups than {MEMORY_MAX_GROUPS} to hold in memory (--decide memory to hold them anyway)"
                        );
                        None
                    }
                }
            };
            Ok((
                Backend::Distributed {
                    session: Box::new(session),
                    store,
                    redis,
                    known,
                    publishing: None,
                    publishing_founded: Vec::new(),
                },
                jwt_secret.clone(),
            ))
        }
        Mode::Embedded { .. } => {
            let b = crate::startup::embedded(config, &crate::telemetry::Metrics::new())
                .await
                .map_err(|e| setup(format!("{e:#}")))?;
            let (store, index) = b.embedded.expect("embedded backends");
            let deployed =
                crate::store::Store::ensure_deployment(store.as_ref(), config.threshold).await?;
            if deployed != config.threshold.get() {
                return Err(setup(format!(
                    "this data directory was built with threshold {deployed}, not {}",
                    config.threshold.get()
                )));
            }
            let session = store.import_session().await?;
            let next_id = session.next_group_id().await?;
            Ok((
                Backend::Embedded {
                    session,
                    index,
                    next_id,
                    in_flight: None,
                    _lock: b.data_lock.expect("embedded mode holds the lock"),
                },
                b.jwt_secret,
            ))
        }
    }
}

/// Every committed group, into a new in-process index. The import session
/// holds the sync lock already: a group committed after the page that
/// would have held it was read is unindexed until the session marks it, so
/// the first batch's `unindexed` read finds it (see `place_and_commit`).
async fn load_groups(
    store: &crate::store::postgres::PgStore,
    t: Threshold,
    expected: u64,
) -> Result<Arc<MemoryIndex>, ImportError> {
    let started = Instant::now();
    let index = MemoryIndex::with_capacity(t, expected as usize);
    let mut after = None;
    loop {
        let page = crate::store::Store::groups_after(store, after, LOAD_PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        let n = page.len();
        for (id, attrs) in page {
            index.insert(id, attrs);
        }
        if n < LOAD_PAGE {
            break;
        }
    }
    tracing::info!(
        groups = index.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "deciding in memory: the committed groups are loaded"
    );
    Ok(Arc::new(index))
}

/// Groups the index makes room for ahead at most: past this it grows by
/// doubling as usual (memory stays what the groups need).
const RESERVE_MAX_GROUPS: usize = 1_000_000;

/// Room in the in-process index (embedded mode, or deciding in memory)
/// for as many groups as the file seems to have lines (from the first
/// chunk's bytes a line), so that it is not rebuilt at each doubling on
/// the way.
fn reserve_index(backend: &Backend, total: Option<u64>, first: &Validated) {
    let index = match backend {
        Backend::Embedded { index, .. } => index,
        Backend::Distributed {
            known: Some(index), ..
        } => index,
        Backend::Distributed { known: None, .. } => return,
    };
    if let Some(total) = total
        && first.bytes > 0
    {
        let lines = total as f64 * first.lines as f64 / first.bytes as f64;
        index.reserve((lines as usize).min(RESERVE_MAX_GROUPS));
    }
}

/// Lines as read: number, bytes (cut after the limit), and the file
/// position after the chunk.
struct Chunk {
    lines: Vec<(u64, Vec<u8>)>,
    bytes: u64,
}

struct Validated {
    lines: u64,
    entries: Vec<Entry>,
    rejects: Vec<Reject>,
    bytes: u64,
}

/// Streams `reader` in chunks of `batch` non-blank lines. A line longer
/// than the limit is kept cut just past it (the validation rejects it).
fn read_chunks(
    reader: Box<dyn Read + Send>,
    batch: usize,
    shown: String,
    tx: tokio::sync::mpsc::Sender<Result<Chunk, ImportError>>,
) {
    let mut r = std::io::BufReader::with_capacity(1 << 20, reader);
    let mut n: u64 = 0;
    let mut bytes: u64 = 0;
    let mut lines = Vec::with_capacity(batch);
    loop {
        let mut buf = Vec::new();
        let read = match read_line_bounded(&mut r, &mut buf, line::MAX_LINE_BYTES + 1) {
            Ok(read) => read,
            Err(e) => {
                let _ = tx.blocking_send(Err(ImportError::Read {
                    path: shown,
                    source: e,
                }));
                return;
            }
        };
        if read == 0 {
            break;
        }
        n += 1;
        bytes += read as u64;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        lines.push((n, buf));
        if lines.len() >= batch {
            let chunk = Chunk {
                lines: std::mem::replace(&mut lines, Vec::with_capacity(batch)),
                bytes,
            };
            if tx.blocking_send(Ok(chunk)).is_err() {
                return;
            }
        }
    }
    if !lines.is_empty() {
        let _ = tx.blocking_send(Ok(Chunk { lines, bytes }));
    }
}

/// Reads one line into `buf`, keeping at most `keep` bytes of it (the rest
/// is consumed). Returns the bytes consumed, 0 at the end.
fn read_line_bounded(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    keep: usize,
) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Ok(consumed);
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        let room = keep.saturating_sub(buf.len());
        buf.extend_from_slice(&avail[..take.min(room)]);
        r.consume(take);
        consumed += take;
        if done {
            return Ok(consumed);
        }
    }
}

/// Validates a chunk on `cores` threads.
async fn validate(chunk: Chunk, rules: &Rules, cores: usize) -> Validated {
    let total = chunk.lines.len() as u64;
    let per = chunk.lines.len().div_ceil(cores.max(1)).max(1);
    let mut parts = Vec::new();
    let mut lines = chunk.lines;
    while !lines.is_empty() {
        let rest = lines.split_off(per.min(lines.len()));
        let part = std::mem::replace(&mut lines, rest);
        let rules = rules.clone();
        parts.push(tokio::task::spawn_blocking(move || {
            part.into_iter()
                .map(|(n, b)| line::parse(n, &b, &rules))
                .collect::<Vec<_>>()
        }));
    }
    let mut entries = Vec::new();
    let mut rejects = Vec::new();
    for p in parts {
        for r in p.await.expect("validation does not panic") {
            match r {
                Ok(e) => entries.push(e),
                Err(r) => rejects.push(r),
            }
        }
    }
    Validated {
        lines: total,
        entries,
        rejects,
        bytes: chunk.bytes,
    }
}

fn names_of(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.username.as_str().to_owned())
        .collect()
}

/// Sorts out the entries whose username is taken or already imported:
/// `existing` is what the store said of their names.
fn sort_out(
    mut existing: HashMap<String, Existing>,
    in_flight: Option<&HashMap<String, Vec<u8>>>,
    entries: Vec<Entry>,
    summary: &mut Summary,
    rejected: &mut Vec<Reject>,
) -> Vec<Entry> {
    // A batch still being written has them as good as imported.
    for (name, print) in in_flight.into_iter().flatten() {
        existing.insert(
            name.clone(),
            Existing {
                user: true,
                record: Some(print.clone()),
            },
        );
    }
    // The first line with a name takes it within the chunk.
    let mut first: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
    let mut keep = Vec::with_capacity(entries.len());
    for e in entries {
        let name = e.username.as_str();
        if let Some(x) = existing.get(name) {
            if x.record.as_deref() == Some(&e.fingerprint[..]) {
                summary.already_imported += 1;
            } else {
                rejected.push(Reject {
                    line: e.line,
                    username: Some(name.to_owned()),
                    reason: "username is taken".into(),
                });
            }
            continue;
        }
        if let Some((line, fp)) = first.get(name) {
            if *fp == e.fingerprint {
                summary.already_imported += 1;
            } else {
                rejected.push(Reject {
                    line: e.line,
                    username: Some(name.to_owned()),
                    reason: format!("username is taken (by line {line})"),
                });
            }
            continue;
        }
        first.insert(name.to_owned(), (e.line, e.fingerprint.clone()));
        keep.push(e);
    }
    keep
}

async fn import_chunk(
    backend: &mut Backend,
    t: Threshold,
    hasher: &PasswordHasher,
    entries: Vec<Entry>,
    summary: &mut Summary,
    rejected: &mut Vec<Reject>,
) -> Result<(), ImportError> {
    if let Backend::Embedded { .. } = backend {
        return import_chunk_embedded(backend, hasher, entries, summary, rejected).await;
    }
    let Backend::Distributed { session, .. } = backend else {
        unreachable!("embedded batches go through import_chunk_embedded")
    };
    let existing = session.existing(&names_of(&entries)).await?;
    let mut entries = sort_out(existing, None, entries, summary, rejected);
    let mut users = hashed(hasher, entries.clone()).await;
    for round in 0.. {
        if users.is_empty() {
            return Ok(());
        }
        if round == MAX_ROUNDS {
            return Err(ImportError::Setup(format!(
                "no batch committed after {MAX_ROUNDS} rounds (lines {}..)",
                entries[0].line
            )));
        }
        match place_and_commit(backend, t, &mut users).await {
            Ok(()) => {
                for u in &users {
                    summary.imported += 1;
                    if u.placement == ImportPlacement::Found {
                        summary.founded += 1;
                    } else {
                        summary.joined += 1;
                    }
                }
                return Ok(());
            }
            Err(ImportError::Store(StoreError::UsernameTaken)) => {
                // A live signup took a name since step 1: sort again.
                let Backend::Distributed { session, .. } = &mut *backend else {
                    unreachable!("distributed")
                };
                let existing = session.existing(&names_of(&entries)).await?;
                let kept = sort_out(existing, None, entries.clone(), summary, rejected);
                let names: std::collections::HashSet<String> = kept
                    .iter()
                    .map(|e| e.username.as_str().to_owned())
                    .collect();
                users.retain(|u| names.contains(u.username.as_str()));
                entries = kept;
            }
            Err(ImportError::Store(StoreError::Overlap)) => {
                tracing::debug!("a committed group overlaps the batch: deciding again");
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}

/// Hashes the new passwords of `entries` on every core (the hasher bounds
/// concurrency), and makes them users to place.
async fn hashed(hasher: &PasswordHasher, entries: Vec<Entry>) -> Vec<ImportUser> {
    let hashes = futures_util::future::join_all(entries.iter().map(|e| async {
        match &e.credential {
            Credential::Password(p) => Some(hasher.hash(p).await),
            Credential::Hash(_) => None,
        }
    }))
    .await;
    entries
        .into_iter()
        .zip(hashes)
        .map(|(e, h)| ImportUser {
            username: e.username,
            password_hash: match (h, e.credential) {
                (Some(h), _) => h,
                (None, Credential::Hash(h)) => h,
                (None, Credential::Password(_)) => unreachable!("hashed above"),
            },
            attributes: e.attributes,
            fingerprint: e.fingerprint,
            keys: e.keys,
            placement: ImportPlacement::Found,
        })
        .collect()
}

/// One batch in embedded mode: sorted out, decided against the in-process
/// index (which holds every committed group and the groups of the batch in
/// flight), its groups added to the index, then handed to the writer once
/// the batch before it is committed. This process is the only writer (the
/// data directory's lock), so a decision cannot be made stale by anyone
/// else; if a write fails, the import stops there with the error, and
/// what was committed before stays (a re-run goes on from it).
async fn import_chunk_embedded(
    backend: &mut Backend,
    hasher: &PasswordHasher,
    entries: Vec<Entry>,
    summary: &mut Summary,
    rejected: &mut Vec<Reject>,
) -> Result<(), ImportError> {
    let Backend::Embedded {
        session,
        index,
        next_id,
        in_flight,
        ..
    } = backend
    else {
        unreachable!("embedded backend")
    };
    let flying = in_flight.as_ref().map(|f| &f.names);
    let existing = session.existing(&names_of(&entries)).await?;
    let entries = sort_out(existing, flying, entries, summary, rejected);
    let mut users = hashed(hasher, entries).await;
    if users.is_empty() {
        return Ok(());
    }
    // One signup after another against the index of every group: the
    // committed ones, the batch in flight's, and this batch's so far, each
    // under the id the writer will give it (ids are given in founding
    // order, and only this process founds).
    let first = *next_id;
    for u in users.iter_mut() {
        u.placement = match index.join_or_found(&u.attributes, GroupId(*next_id)) {
            Some(g) if g.0 >= first => ImportPlacement::JoinFounded((g.0 - first) as usize),
            Some(g) => ImportPlacement::Join(g),
            None => {
                *next_id += 1;
                ImportPlacement::Found
            }
        };
        if u.placement == ImportPlacement::Found {
            summary.founded += 1;
        } else {
            summary.joined += 1;
        }
        summary.imported += 1;
    }
    if let Some(before) = in_flight.take() {
        before.finish().await?;
    }
    let names = users
        .iter()
        .map(|u| (u.username.as_str().to_owned(), u.fingerprint.clone()))
        .collect();
    *in_flight = Some(InFlight {
        write: tokio::spawn(session.write_batch(users, first)),
        names,
    });
    Ok(())
}

/// Steps 2 to 4 for one batch (distributed mode), and step 5 started: it
/// runs while the next batch is sorted out, decided and written, and ends
/// before that batch sets its own mark (marks are lifted in order).
async fn place_and_commit(
    backend: &mut Backend,
    t: Threshold,
    users: &mut [ImportUser],
) -> Result<(), ImportError> {
    let Backend::Distributed {
        session,
        store,
        redis,
        known,
        publishing,
        publishing_founded,
    } = backend
    else {
        unreachable!("embedded batches go through import_chunk_embedded")
    };
    let clock = Instant::now();
    session.begin().await?;
    let outcome = async {
        // Decide against every group held in memory, or against the owners
        // of the batch's keys read from Postgres.
        let owners = match known.as_mut() {
            Some(index) => {
                // The groups others committed since the last batch: only
                // this session marks groups while it lives, so they are
                // the unindexed ones it does not know yet.
                let index_ref = index.as_ref();
                for (id, attrs) in session.unindexed(&|g| index_ref.contains(g)).await? {
                    index.add_now(id, attrs);
                }
                decide_into(t, index.as_ref(), users);
                None
            }
            None => {
                // Each key once (users alike share many), in index order.
                let mut keys: Vec<&SubsetKey> = users.iter().flat_map(|u| u.keys.iter()).collect();
                keys.sort_unstable();
                keys.dedup();
                let owners = place::OwnersOf::new(t, session.owners(&keys).await?);
                decide_into(t, &owners, users);
                Some(owners)
            }
        };
        // The committed groups the batch joins that may be missing from
        // Redis, for step 5 (`unconfirmed`), with their attributes from
        // wherever the batch decided.
        let joined = session
            .unconfirmed(&joined_ids(users))
            .await?
            .into_iter()
            .filter(|g| publishing_founded.binary_search(g).is_err())
            .filter_map(|g| {
                let attrs = match (&owners, known.as_ref()) {
                    (Some(owners), _) => owners.group(g).cloned(),
                    (None, index) => index.and_then(|i| i.attributes_of(g)),
                };
                attrs.map(|a| (g, a))
            })
            .collect::<Vec<_>>();
        let decided = clock.elapsed();
        crate::failpoint::hit("import:decided");
        let written = session.write(users).await?;
        crate::failpoint::hit("import:written");
        let wrote = clock.elapsed();
        // The batch before lifts its mark first (or fails the import).
        if let Some(p) = publishing.take() {
            published(p).await?;
        }
        let waited = clock.elapsed();
        let mark = session.mark_dirty().await?;
        session.commit().await?;
        crate::failpoint::hit("import:committed");
        Ok::<_, ImportError>((written, joined, mark, decided, wrote, waited))
    }
    .await;
    let (written, joined, mark, decided, wrote, waited) = match outcome {
        Ok(v) => v,
        Err(e) => {
            let _ = session.rollback().await;
            return Err(e);
        }
    };
    let founded: Vec<(GroupId, AttributeSet)> = users
        .iter()
        .filter(|u| u.placement == ImportPlacement::Found)
        .zip(&written.founded)
        .map(|(u, id)| (*id, u.attributes.clone()))
        .collect();
    if let Some(index) = known {
        for (id, attrs) in &founded {
            index.add_now(*id, attrs.clone());
        }
    }
    tracing::debug!(
        lines = users.len(),
        decide_ms = decided.as_millis() as u64,
        write_ms = (wrote - decided).as_millis() as u64,
        wait_publish_ms = (waited - wrote).as_millis() as u64,
        commit_ms = (clock.elapsed() - waited).as_millis() as u64,
        "batch committed"
    );
    // Step 5: the unconfirmed groups it joined first (a founder's own add
    // may be late), then its own in id order.
    let mut groups = joined;
    groups.extend(founded.iter().cloned());
    *publishing_founded = written.founded;
    *publishing = Some(tokio::spawn(publish(
        redis.clone(),
        store.clone(),
        groups,
        mark,
    )));
    Ok(())
}

/// Step 5 of a committed batch: its groups into Redis, marked indexed, and
/// its mark lifted if nothing else marked the index dirty meanwhile. Redis
/// failing is not an error (the index stays marked dirty, replicas decide
/// from Postgres, and it is synced once the import ends); Postgres failing
/// is, as it would be for the batch.
async fn publish(
    redis: Arc<RedisIndex>,
    store: crate::store::postgres::PgStore,
    groups: Vec<(GroupId, AttributeSet)>,
    mark: i64,
) -> Result<(), ImportError> {
    let clock = Instant::now();
    let added = async {
        let (before, gen1) = redis.server_identity().await?;
        // A pipeline of at most PUBLISH_CHUNK groups at a time, as the sync
        // adds them: a batch's tens of thousands in one would outlast the
        // connection's timeout (seen: 11 s at 10^6 groups).
        for chunk in groups.chunks(PUBLISH_CHUNK) {
            redis.add_groups(chunk).await?;
        }
        let (after, gen2) = redis.server_identity().await?;
        Ok::<_, IndexError>((before == after && gen1 == gen2).then_some(before))
    }
    .await;
    crate::failpoint::hit("import:published");
    match added {
        Ok(server) => {
            // Every group added: the batch's own and the unconfirmed ones
            // it joined.
            let added: Vec<GroupId> = groups.iter().map(|(id, _)| *id).collect();
            crate::index::IndexSource::mark_indexed(&store, &added).await?;
            if let Some(server) = server
                && !store.lift_dirty_mark(mark, &server).await?
            {
                tracing::debug!(
                    mark,
                    "the index stays marked dirty (synced on another server or marked meanwhile)"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not add the batch's groups to the index: it stays marked dirty, and replicas decide from the database until it is synced");
        }
    }
    tracing::debug!(
        groups = groups.len(),
        publish_ms = clock.elapsed().as_millis() as u64,
        "batch published"
    );
    Ok(())
}

/// Places `users` in order against `committed` (`place::decide`).
fn decide_into(t: Threshold, committed: &dyn place::Committed, users: &mut [ImportUser]) {
    let placed = place::decide(
        t,
        committed,
        users.iter().map(|u| (&u.attributes, &u.keys[..])),
    );
    for (u, p) in users.iter_mut().zip(placed) {
        u.placement = p;
    }
}

/// The committed groups `users` join, each once, in id order.
fn joined_ids(users: &[ImportUser]) -> Vec<GroupId> {
    let mut ids: Vec<GroupId> = users
        .iter()
        .filter_map(|u| match u.placement {
            ImportPlacement::Join(g) => Some(g),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}
