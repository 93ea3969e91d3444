//! `cohort import` with the real binary: the groups are those one-at-a-time
//! signups in file order give (compared with HTTP signups and with the
//! reference rule), beside live signups on three replicas, killed and run
//! again, and every kind of bad line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use cohort::domain::grouping::LinearScan;
use cohort::domain::{AttributeRules, AttributeSet, Threshold};
use serde_json::{Value, json};

use crate::cluster::*;
use crate::helpers::*;

/// A PHC string for PASSWORD at the service's parameters (one for all the
/// lines of a file: hashing is not what these tests are about).
async fn phc() -> String {
    let h = cohort::auth::PasswordHasher::new(1, std::sync::Arc::new(|_| {}));
    h.hash(&cohort::domain::Password::parse(PASSWORD.into()).unwrap())
        .await
}

/// User `n` of a test population: dense collisions (a small vocabulary),
/// written with varying case and spaces (canonicalisation).
fn user(n: usize, vocab: usize) -> (String, Vec<String>) {
    let attrs = attrs_for(n, vocab)
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            if i % 2 == 0 {
                format!(" {} ", a.to_uppercase())
            } else {
                a
            }
        })
        .collect();
    (format!("user{n}"), attrs)
}

fn write_file(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn hash_lines(users: &[(String, Vec<String>)], phc: &str) -> Vec<String> {
    users
        .iter()
        .map(|(u, a)| json!({"username": u, "password_hash": phc, "attributes": a}).to_string())
        .collect()
}

/// The environment of `cohort import` against `backing`.
fn env_of(backing: &Backing) -> Vec<(String, String)> {
    let mut env = vec![
        ("RUST_LOG".into(), "warn".into()),
        ("COHORT_LOG_FORMAT".into(), "json".into()),
    ];
    match backing {
        Backing::Distributed { db, prefix } => {
            env.push(("DATABASE_URL".into(), db.url.clone()));
            env.push(("REDIS_URL".into(), prefix.url.clone()));
            env.push(("COHORT_REDIS_PREFIX".into(), prefix.prefix.clone()));
            env.push(("COHORT_JWT_SECRET".into(), SECRET.into()));
        }
        Backing::Embedded { dir } => {
            env.push(("COHORT_DATA_DIR".into(), dir.path().display().to_string()));
        }
    }
    env
}

fn import_cmd(backing: &Backing, file: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort"));
    cmd.arg("import")
        .arg(file)
        .arg("--json")
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env_of(backing) {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs an import to its end: (exit code, summary).
fn import(backing: &Backing, file: &Path, extra: &[&str]) -> (i32, Value) {
    import_with(backing, file, extra, &[])
}

/// The same, with more environment (`env` wins over the backing's).
fn import_with(
    backing: &Backing,
    file: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (i32, Value) {
    let out: Output = import_cmd(backing, file, extra, env).output().unwrap();
    let code = out.status.code().unwrap_or(-1);
    let summary = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| json!({"stderr": String::from_utf8_lossy(&out.stderr).to_string()}));
    (code, summary)
}

/// username -> (group id, group attributes), from the system of record.
async fn placements(backing: &Backing) -> HashMap<String, (i64, Vec<String>)> {
    match backing {
        Backing::Distributed { db, .. } => db
            .client()
            .await
            .query(
                "SELECT u.username, g.id, g.attributes FROM users u JOIN groups g ON g.id = u.group_id",
                &[],
            )
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect(),
        Backing::Embedded { dir } => {
            let c = rusqlite::Connection::open(dir.path().join("cohort.sqlite3")).unwrap();
            let mut s = c
                .prepare("SELECT u.username, g.id, g.attributes FROM users u JOIN groups g ON g.id = u.group_id")
                .unwrap();
            s.query_map([], |r| {
                let a: String = r.get(2)?;
                Ok((
                    r.get::<_, String>(0)?,
                    (r.get::<_, i64>(1)?, serde_json::from_str(&a).unwrap()),
                ))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
        }
    }
}

/// What one-at-a-time signups of `users` in order give, by the reference rule.
fn reference(users: &[(String, Vec<String>)]) -> HashMap<String, (i64, Vec<String>)> {
    let mut r = LinearScan::new(Threshold::new(3, 16).unwrap());
    users
        .iter()
        .map(|(u, a)| {
            let set = AttributeSet::parse(a, AttributeRules { min: 3, max: 16 }).unwrap();
            let p = r.assign(&set);
            (u.clone(), (p.group_id.0, p.group_attributes.to_strings()))
        })
        .collect()
}

async fn assert_db_invariants(backing: &Backing) {
    if let Some(db) = backing.db() {
        let (users, groups) = db_snapshot(db).await;
        assert_invariants(&users, &groups, 3);
    }
    assert_member_counts(backing).await;
}

/// Every group's member count, kept as data, is the number of its users.
async fn assert_member_counts(backing: &Backing) {
    let wrong: Vec<(i64, i64, i64)> = match backing {
        Backing::Distributed { db, .. } => db
            .client()
            .await
            .query(
                "SELECT g.id, \
                   coalesce((SELECT sum(n) FROM group_member_counts c WHERE c.group_id = g.id), 0)::bigint, \
                   (SELECT count(*) FROM users u WHERE u.group_id = g.id) \
                 FROM groups g",
                &[],
            )
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .filter(|(_, kept, counted)| kept != counted)
            .collect(),
        Backing::Embedded { dir } => {
            let c = rusqlite::Connection::open(dir.path().join("cohort.sqlite3")).unwrap();
            c.prepare(
                "SELECT g.id, g.member_count, (SELECT count(*) FROM users u WHERE u.group_id = g.id) \
                 FROM groups g WHERE g.member_count <> (SELECT count(*) FROM users u WHERE u.group_id = g.id)",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
        }
    };
    assert!(wrong.is_empty(), "(group, kept count, members): {wrong:?}");
}

/// `decide`: what a distributed import decides against (`--decide`).
async fn differential(mode: Mode, decide: &str) {
    const N: usize = 1_500;
    let users: Vec<(String, Vec<String>)> = (0..N).map(|n| user(n, 14)).collect();
    // One at a time over HTTP.
    let app = spawn_app(mode).await;
    for (u, a) in &users {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        app.signup_ok(u, &a).await;
    }
    let by_http = placements(&app.backing).await;
    // The same users imported, in batches that split the file unevenly.
    let backing = Backing::new(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "users.jsonl", &hash_lines(&users, &phc().await));
    let (code, summary) = import(&backing, &file, &["--batch", "317", "--decide", decide]);
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary["imported"], N);
    let imported = placements(&backing).await;
    assert_eq!(imported.len(), N);
    assert_eq!(
        imported, by_http,
        "the import placed users otherwise than HTTP signups"
    );
    assert_eq!(imported, reference(&users));
    assert_db_invariants(&backing).await;
    assert_subset_table_complete(&backing, 3).await;
    // An imported user signs in with the password of the hash.
    drop(app);
    let served = spawn_with(backing, |_| {}).await;
    assert_eq!(
        served.signin("user7", PASSWORD).await.status().as_u16(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_places_users_as_http_signups_do_distributed() {
    differential(Mode::Distributed, "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_deciding_against_the_database_places_users_as_http_signups_do() {
    differential(Mode::Distributed, "database").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_places_users_as_http_signups_do_embedded() {
    differential(Mode::Embedded, "auto").await;
}

/// An import on the same deployment as three replicas under live signups:
/// the checker's invariants hold for every user, imported or not, and the
/// index ends level with Postgres. Deciding in memory, the groups the live
/// signups found between batches must reach the import's own index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_beside_live_signups_on_three_replicas() {
    beside_live_signups("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_deciding_against_the_database_beside_live_signups_on_three_replicas() {
    beside_live_signups("database").await;
}

async fn beside_live_signups(decide: &'static str) {
    let db = TestDb::create().await;
    let prefix = TestPrefix::new(&redis_url());
    let replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&db.url, &redis_url(), &prefix.prefix, &[]))
        .collect();
    let bases = std::sync::Arc::new(std::sync::Mutex::new(
        replicas.iter().map(|r| r.base()).collect::<Vec<_>>(),
    ));
    let history = History::default();
    let backing = Backing::Distributed {
        db: db.clone(),
        prefix: prefix.clone(),
    };
    // The same vocabulary as the live load: imported and live users collide.
    let users: Vec<(String, Vec<String>)> = (0..4_000).map(|n| user(n + 100_000, 9)).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "users.jsonl", &hash_lines(&users, &phc().await));
    let live = tokio::spawn(load(bases, 6, 40, 9, "live", history.clone(), true));
    until_created(&history, 20).await;
    let (code, summary) = tokio::task::spawn_blocking({
        let backing = backing.clone();
        move || import(&backing, &file, &["--batch", "200", "--decide", decide])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary["imported"], 4_000);
    live.await.unwrap();
    check(&db.url, &history, 3).await;
    let all = placements(&backing).await;
    assert_eq!(all.len(), 4_000 + 240);
    // The index ends level with Postgres.
    verified_within(60, &db.url, &redis_url(), &prefix.prefix).await;
}

/// Deciding in memory, a group a live signup founds while the import is
/// between two batches is one the next batch's lines join: the import
/// reads the groups committed since its last batch at the batch's start.
/// (Had it missed the group, the line would found an overlapping one,
/// which the subset key refuses at every round: the import would fail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_founded_between_batches_is_joined_by_the_next_one() {
    let app = spawn_app(Mode::Distributed).await;
    let phc = phc().await;
    let line = |u: &str, a: &[&str]| {
        let users = [(u.to_owned(), a.iter().map(|s| s.to_string()).collect())];
        hash_lines(&users, &phc).remove(0) + "\n"
    };
    let dir = tempfile::tempdir().unwrap();
    let rejects = dir.path().join("rejects.jsonl");
    let mut cmd = import_cmd(
        &app.backing,
        Path::new("-"),
        &[
            "--batch",
            "1",
            "--decide",
            "memory",
            "--rejects",
            rejects.to_str().unwrap(),
        ],
        &[],
    );
    let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    use std::io::Write;
    // The first batch: a group of its own.
    stdin
        .write_all(line("first", &["oak", "elm", "ash"]).as_bytes())
        .unwrap();
    stdin.flush().unwrap();
    let backing = app.backing.clone();
    assert!(
        eventually(60, move || {
            let b = backing.clone();
            async move { placements(&b).await.contains_key("first") }
        })
        .await,
        "the first batch was not committed"
    );
    // Between batches, a live signup founds a group...
    app.signup_ok("live", &["rust", "go", "zig", "nim"]).await;
    // ...which the next batch's line shares three attributes with.
    stdin
        .write_all(line("second", &["rust", "go", "zig", "ada"]).as_bytes())
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let placed = placements(&app.backing).await;
    assert_eq!(placed["second"].0, placed["live"].0, "{placed:?}");
    assert_ne!(placed["first"].0, placed["live"].0);
    assert_db_invariants(&app.backing).await;
}

/// Redis unreachable for a whole import: every line is imported all the
/// same (Postgres decides and arbitrates), the index, clean before, is left
/// marked dirty, and once a replica reaches Redis again it syncs the index
/// level with Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_without_redis_leaves_the_index_to_a_sync() {
    const N: usize = 600;
    let users: Vec<(String, Vec<String>)> = (0..N).map(|n| user(n, 12)).collect();
    let backing = Backing::new(Mode::Distributed).await;
    let Backing::Distributed { db, prefix } = &backing else {
        unreachable!("distributed")
    };
    let marked_dirty = || async {
        db.client()
            .await
            .query_one("SELECT index_dirty > index_clean FROM deployment", &[])
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(true)
    };
    // A replica builds the index and marks it clean, and stops.
    let first = Replica::start(&db.url, &redis_url(), &prefix.prefix, &[]);
    assert!(
        eventually(60, || async { !marked_dirty().await }).await,
        "the first replica did not sync the index"
    );
    drop(first);
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "users.jsonl", &hash_lines(&users, &phc().await));
    let (code, summary) = import_with(
        &backing,
        &file,
        &["--batch", "100"],
        &[("REDIS_URL", "redis://127.0.0.1:1")],
    );
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary["imported"], N);
    assert_eq!(placements(&backing).await, reference(&users));
    assert_db_invariants(&backing).await;
    assert!(
        marked_dirty().await,
        "the import left the index marked clean without adding to Redis"
    );
    assert!(
        !verify_ok(&db.url, &redis_url(), &prefix.prefix),
        "Redis already has the imported groups"
    );
    // A replica that reaches Redis brings the index level with Postgres.
    let _replica = Replica::start(&db.url, &redis_url(), &prefix.prefix, &[]);
    verified_within(60, &db.url, &redis_url(), &prefix.prefix).await;
    assert!(eventually(60, || async { !marked_dirty().await }).await);
}

/// A founder that died after its commit, before adding its group to
/// Redis, leaves the group unconfirmed; a batch that joins it adds it
/// (step 5 re-adds the joined groups not marked indexed, and only those),
/// so when the import lifts its mark Redis holds every group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_adds_the_late_founders_group_it_joins() {
    let backing = Backing::new(Mode::Distributed).await;
    let Backing::Distributed { db, prefix } = &backing else {
        unreachable!("distributed")
    };
    let state = || async {
        let r = db
            .client()
            .await
            .query_one(
                "SELECT index_dirty > index_clean, \
                   (SELECT count(*) FROM groups WHERE NOT indexed) FROM deployment",
                &[],
            )
            .await;
        r.map(|r| (r.get::<_, bool>(0), r.get::<_, i64>(1)))
            .unwrap_or((true, -1))
    };
    // The only replica builds the index, then dies founding a group,
    // after its commit and before its Redis add.
    let mut armed = Replica::start(
        &db.url,
        &redis_url(),
        &prefix.prefix,
        &[("COHORT_FAILPOINTS", "signup:committed")],
    );
    assert!(
        eventually(60, || async { !state().await.0 }).await,
        "the replica did not sync the index"
    );
    let http = reqwest::Client::new();
    let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let history = History::default();
    signup_once(
        &http,
        &armed.base(),
        "late",
        &v(&["rust", "go", "zig"]),
        None,
        &history,
    )
    .await;
    assert!(armed.exited_within(std::time::Duration::from_secs(5)));
    assert_eq!(
        state().await.1,
        1,
        "the late founder's group is unconfirmed"
    );
    assert!(!verify_ok(&db.url, &redis_url(), &prefix.prefix));
    // The import: a line that founds, one that joins the late group.
    let users = vec![
        ("first".to_owned(), v(&["oak", "elm", "ash"])),
        ("second".to_owned(), v(&["rust", "go", "zig", "ada"])),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "users.jsonl", &hash_lines(&users, &phc().await));
    let (code, summary) = import(&backing, &file, &["--batch", "1", "--decide", "memory"]);
    assert_eq!(code, 0, "{summary}");
    let placed = placements(&backing).await;
    assert_eq!(placed["second"].0, placed["late"].0, "{placed:?}");
    // No replica runs: only the import could have added the late group.
    assert_eq!(
        state().await,
        (false, 0),
        "marks lifted, every group confirmed"
    );
    assert!(verify_ok(&db.url, &redis_url(), &prefix.prefix));
    assert_db_invariants(&backing).await;
}

async fn kill_and_resume(mode: Mode) {
    const N: usize = 1_000;
    let users: Vec<(String, Vec<String>)> = (0..N).map(|n| user(n, 12)).collect();
    let backing = Backing::new(mode).await;
    let dir = tempfile::tempdir().unwrap();
    // New passwords: hashing makes the run long enough to be killed in.
    let lines: Vec<String> = users
        .iter()
        .map(|(u, a)| json!({"username": u, "password": PASSWORD, "attributes": a}).to_string())
        .collect();
    let file = write_file(dir.path(), "users.jsonl", &lines);
    // Killed right after the first batch's commit (before its index add).
    let out = import_cmd(
        &backing,
        &file,
        &["--batch", "100"],
        &[("COHORT_FAILPOINTS", "import:committed")],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert_eq!(placements(&backing).await.len(), 100);
    if let Some(db) = backing.db() {
        let row = db
            .client()
            .await
            .query_one("SELECT index_dirty > index_clean FROM deployment", &[])
            .await
            .unwrap();
        assert!(
            row.get::<_, bool>(0),
            "a committed, unpublished batch leaves the index dirty"
        );
    }
    // SIGKILL at an arbitrary point of the next run.
    let mut child: Child = import_cmd(&backing, &file, &["--batch", "20"], &[])
        .spawn()
        .unwrap();
    let b = backing.clone();
    let progressed = eventually(120, move || {
        let b = b.clone();
        async move { rt_count(&b).await > 300 }
    })
    .await;
    child.kill().unwrap();
    let _ = child.wait();
    assert!(progressed, "the import made no progress");
    let before = placements(&backing).await.len();
    assert!(before < N, "the import finished before it was killed");
    // Run again: what is left is imported, nothing twice.
    let (code, summary) = import(&backing, &file, &["--batch", "100"]);
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary["imported"], N - before, "{summary}");
    assert_eq!(summary["already_imported"], before, "{summary}");
    assert_eq!(placements(&backing).await, reference(&users));
    assert_db_invariants(&backing).await;
    assert_subset_table_complete(&backing, 3).await;
    let (code, summary) = import(&backing, &file, &[]);
    assert_eq!((code, &summary["imported"]), (0, &json!(0)), "{summary}");
    assert_eq!(summary["already_imported"], N);
}

async fn rt_count(b: &Backing) -> usize {
    placements(b).await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_killed_and_run_again_distributed() {
    kill_and_resume(Mode::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_killed_and_run_again_embedded() {
    kill_and_resume(Mode::Embedded).await;
}

async fn bad_lines(mode: Mode) {
    let backing = Backing::new(mode).await;
    // A user who signed up over HTTP first: its name is taken.
    {
        let app = spawn_with(backing.clone(), |_| {}).await;
        app.signup_ok("taken", &["a", "b", "c"]).await;
        app.stop().await;
    }
    let hash = phc().await;
    let weak = hash.replacen("t=2", "t=1", 1);
    let good = |u: &str| {
        json!({"username": u, "password": PASSWORD, "attributes": ["x", "y", "z"]}).to_string()
    };
    let lines = vec![
        good("first"),                                                                 // 1
        "not json".into(),                                                             // 2
        "[1, 2]".into(),                                                               // 3
        json!({"username": "no", "password": PASSWORD, "attributes": ["x", "y", "z"]}).to_string(), // 4
        json!({"username": "shortpw", "password": "short", "attributes": ["x", "y", "z"]}).to_string(), // 5
        json!({"username": "commonpw", "password": "passwordpassword", "attributes": ["x", "y", "z"]}).to_string(), // 6
        json!({"username": "fewattrs", "password": PASSWORD, "attributes": ["x", "X "]}).to_string(), // 7
        json!({"username": "ctrl", "password": PASSWORD, "attributes": ["x", "y", "z\u{7}"]}).to_string(), // 8
        json!({"username": "both", "password": PASSWORD, "password_hash": hash, "attributes": ["x", "y", "z"]}).to_string(), // 9
        json!({"username": "neither", "attributes": ["x", "y", "z"]}).to_string(),     // 10
        json!({"username": "weakhash", "password_hash": weak, "attributes": ["x", "y", "z"]}).to_string(), // 11
        json!({"username": "bcrypt", "password_hash": "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW", "attributes": ["x", "y", "z"]}).to_string(), // 12
        json!({"username": "extra", "password": PASSWORD, "attributes": ["x", "y", "z"], "admin": true}).to_string(), // 13
        good("taken"),                                                                 // 14
        json!({"username": "FIRST", "password": PASSWORD, "attributes": ["x", "y", "q"]}).to_string(), // 15: same name, other content
        format!("{{\"username\":\"long\",\"password\":\"{}\"}}", "p".repeat(20_000)), // 16
        json!({"username": "hashed", "password_hash": hash, "attributes": ["x", "y", "w"]}).to_string(), // 17
        String::new(),                                                                 // 18: blank, ignored
        good("last"),                                                                  // 19
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = lines.join("\n").into_bytes();
    bytes.extend_from_slice(b"\n\xff\xfe\n"); // 20: not UTF-8
    let file = dir.path().join("users.jsonl");
    std::fs::write(&file, bytes).unwrap();
    for run in 0..2 {
        let (code, summary) = import(&backing, &file, &["--batch", "4"]);
        assert_eq!(code, 1, "{summary}");
        assert_eq!(summary["rejected"], 16, "{summary}");
        assert_eq!(
            summary["imported"],
            if run == 0 { 3 } else { 0 },
            "{summary}"
        );
        assert_eq!(
            summary["already_imported"],
            if run == 0 { 0 } else { 3 },
            "{summary}"
        );
        let rejects =
            std::fs::read_to_string(dir.path().join("users.jsonl.rejects.jsonl")).unwrap();
        let rejects: Vec<Value> = rejects
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let got: Vec<u64> = rejects
            .iter()
            .map(|r| r["line"].as_u64().unwrap())
            .collect();
        assert_eq!(
            got,
            [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20]
        );
        let reason = |line: u64| {
            rejects.iter().find(|r| r["line"] == line).unwrap()["reason"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        for (line, says) in [
            (2, "JSON"),
            (4, "username"),
            (5, "at least 15"),
            (6, "too common"),
            (7, "attributes"),
            (9, "not both"),
            (10, "required"),
            (11, "weaker"),
            (12, "argon2id"),
            (13, "unknown field"),
            (14, "taken"),
            (15, "taken"),
            (16, "longer"),
            (20, "UTF-8"),
        ] {
            assert!(reason(line).contains(says), "line {line}: {}", reason(line));
        }
        assert!(
            !rejects.iter().any(|r| r.to_string().contains(PASSWORD)),
            "a password in the reject file"
        );
    }
    let placed = placements(&backing).await;
    assert_eq!(placed.len(), 4);
    for u in ["first", "hashed", "last"] {
        assert!(placed.contains_key(u), "{u} was not imported");
    }
    // Could not run: exit 2 with the reason.
    let (code, summary) = import(&backing, &dir.path().join("missing.jsonl"), &[]);
    assert_eq!(code, 2, "{summary}");
    let served = spawn_with(backing.clone(), |_| {}).await;
    assert_eq!(
        served.signin("hashed", PASSWORD).await.status().as_u16(),
        200
    );
    assert_eq!(
        served.signin("first", PASSWORD).await.status().as_u16(),
        200
    );
    if mode == Mode::Embedded {
        // The server holds the data directory.
        let (code, summary) = import(&backing, &file, &[]);
        assert_eq!(code, 2, "{summary}");
        assert!(
            summary.to_string().contains("another cohort process"),
            "{summary}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_line_is_rejected_with_its_reason_distributed() {
    bad_lines(Mode::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_line_is_rejected_with_its_reason_embedded() {
    bad_lines(Mode::Embedded).await;
}

/// `cohort stats` (the binary, beside the running server: read-only in
/// embedded mode) and the group-size gauges, after signups over HTTP.
async fn check_stats_and_metrics(app: TestApp) {
    // Groups of 3, 2, 1 and 1 members.
    for (u, a) in [
        ("alice", &["a", "b", "c", "d"][..]),
        ("bob", &["a", "b", "c", "x"]),
        ("carol", &["a", "b", "c", "y"]),
        ("dave", &["p", "q", "r"]),
        ("erin", &["s", "t", "u"]),
        ("frank", &["p", "q", "r", "z"]),
        ("gina", &["k", "l", "m"]),
    ] {
        app.signup_ok(u, a).await;
    }
    assert!(cohort::startup::refresh_group_sizes(&app.service).await);
    let text = app.get("/metrics").await.text().await.unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
    };
    for (le, n) in [
        ("1", 2.0),
        ("2", 3.0),
        ("4", 4.0),
        ("1048576", 4.0),
        ("+Inf", 4.0),
    ] {
        assert_eq!(
            value(&format!("cohort_group_size_groups{{le=\"{le}\"}}")),
            n,
            "le={le}"
        );
    }
    assert_eq!(value("cohort_singleton_groups"), 2.0);
    assert_eq!(value("cohort_group_size_max"), 3.0);
    assert!(value("cohort_group_sizes_refreshed_timestamp_seconds") > 0.0);

    let run = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort"));
        cmd.arg("stats")
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in env_of(&app.backing) {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(&["--json", "--top", "4"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["users"], 7);
    assert_eq!(s["groups"], 4);
    assert_eq!(s["singleton_groups"], 2);
    assert_eq!(s["empty_groups"], 0);
    assert_eq!(
        s["group_size"],
        json!({"mean": 1.75, "p50": 1, "p90": 3, "p99": 3, "max": 3})
    );
    let hist: Vec<(Value, u64)> = s["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["le"].clone(), b["groups"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        hist,
        vec![
            (json!(1), 2),
            (json!(2), 1),
            (json!(4), 1),
            (Value::Null, 0)
        ]
    );
    assert_eq!(
        s["top_attributes"],
        json!([
            {"attribute": "a", "users": 3},
            {"attribute": "b", "users": 3},
            {"attribute": "c", "users": 3},
            {"attribute": "p", "users": 2},
        ])
    );
    // The table, for people.
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("singleton groups  2"), "{table}");
    assert!(table.contains("p50 1  p90 3  p99 3  max 3"), "{table}");
}

crate::both_modes!(stats_and_group_size_metrics, |app: TestApp| async move {
    check_stats_and_metrics(app).await
});

#[test]
fn stats_that_cannot_run_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .arg("stats")
        .env_clear()
        .env("COHORT_DATA_DIR", dir.path().join("none"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .arg("stats")
        .env_clear()
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{}/x", free_port()),
        )
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .env("COHORT_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
