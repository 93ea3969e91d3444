//! Real replicas (the `cohort` binary), private backing servers, a load
//! generator that records every request, and the one checker every fault
//! scenario ends with.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

pub const SECRET: &str = "test secret that is at least 32 bytes long";

/// One `cohort serve` process in distributed mode.
pub struct Replica {
    pub port: u16,
    child: Option<Child>,
    env: Vec<(String, String)>,
}

impl Replica {
    pub fn start(
        database_url: &str,
        redis_url: &str,
        prefix: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), database_url.into()),
            ("REDIS_URL".into(), redis_url.into()),
            ("COHORT_REDIS_PREFIX".into(), prefix.into()),
            ("COHORT_JWT_SECRET".into(), SECRET.into()),
            ("COHORT_WORKERS".into(), "1".into()),
            ("COHORT_HASH_CONCURRENCY".into(), "1".into()),
            ("COHORT_DB_POOL_SIZE".into(), "6".into()),
            ("COHORT_LOG_FORMAT".into(), "json".into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        for (k, v) in extra {
            env.push(((*k).into(), (*v).into()));
        }
        let mut r = Self {
            port: free_port(),
            child: None,
            env,
        };
        r.restart();
        r
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the process (again), on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("COHORT_LISTEN", format!("127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("the cohort binary starts"));
        wait_for_port(self.port);
    }

    /// Without failpoints from now on.
    pub fn disarm(&mut self) {
        self.env.retain(|(k, _)| k != "COHORT_FAILPOINTS");
    }

    /// SIGKILL: no shutdown, no flush, connections cut.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (bounded) for the process to exit by itself; true if it did.
    pub fn exited_within(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && c.try_wait().unwrap().is_some()
            {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private PostgreSQL 15 server in a temporary directory, for tests that
/// stop or restart Postgres. Run as the `postgres` user when the test runs
/// as root (initdb refuses root).
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    /// Server options beyond the defaults (TLS, say).
    extra: String,
    _tmp: tempfile::TempDir,
}

fn pg_bin(name: &str) -> String {
    format!("/usr/lib/postgresql/15/bin/{name}")
}

fn as_postgres(args: &[&str]) -> Command {
    let root = unsafe_is_root();
    let mut c = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]);
        c
    } else {
        Command::new(args[0])
    };
    c.args(if root { args } else { &args[1..] });
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PrivatePostgres {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A server that accepts TLS connections only, with this certificate
    /// and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("cohort-pg-")
            .tempdir_in("/tmp")
            .unwrap();
        let dir = tmp.path().join("data");
        if unsafe_is_root() {
            let ok = Command::new("chown")
                .args(["postgres:", tmp.path().to_str().unwrap()])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let ok = as_postgres(&[
            &pg_bin("initdb"),
            "-D",
            dir.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ])
        .status()
        .unwrap();
        assert!(ok.success(), "initdb failed");
        let mut extra = String::new();
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&c, cert).unwrap();
            std::fs::write(&k, key).unwrap();
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
            // Plain TCP refused: only a TLS connection gets in.
            std::fs::write(
                dir.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
            )
            .unwrap();
            if unsafe_is_root() {
                for f in [&c, &k, &dir.join("pg_hba.conf")] {
                    let ok = Command::new("chown")
                        .args(["postgres:", f.to_str().unwrap()])
                        .status()
                        .unwrap();
                    assert!(ok.success());
                }
            }
            extra = " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key".into();
        }
        let me = Self {
            port: free_port(),
            dir,
            extra,
            _tmp: tmp,
        };
        me.ctl("start");
        me
    }

    fn ctl(&self, action: &str) {
        let opts = format!(
            "-p {} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200{}",
            self.port, self.extra
        );
        let log = self.dir.with_file_name("log");
        let mut args = vec![
            pg_bin("pg_ctl"),
            "-D".into(),
            self.dir.to_str().unwrap().to_owned(),
            "-o".into(),
            opts,
            "-l".into(),
            log.to_str().unwrap().to_owned(),
            "-w".into(),
            "-t".into(),
            "30".into(),
        ];
        if action != "start" {
            args.extend(["-m".into(), "fast".into()]);
        }
        args.push(action.into());
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let ok = as_postgres(&refs).status().unwrap();
        assert!(ok.success(), "pg_ctl {action} failed");
    }

    pub fn restart(&self) {
        self.ctl("restart");
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&[
            &pg_bin("pg_ctl"),
            "-D",
            self.dir.to_str().unwrap(),
            "-m",
            "immediate",
            "stop",
        ])
        .status();
    }
}

/// What one request got.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 201 (or a replay of one): user id, group id, founded, group attributes.
    Created {
        user_id: i64,
        group_id: i64,
        founded: bool,
        group: Vec<String>,
    },
    Status(u16),
    /// No answer: connection refused or cut, timeout.
    Lost,
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub username: String,
    /// Canonical: lower case and sorted (the tests use such attributes).
    pub attrs: Vec<String>,
    pub started: Instant,
    pub ended: Instant,
    pub answer: Answer,
}

/// Every request a test made, in no particular order.
#[derive(Default, Clone)]
pub struct History(Arc<Mutex<Vec<Attempt>>>);

impl History {
    pub fn push(&self, a: Attempt) {
        self.0.lock().unwrap().push(a);
    }

    pub fn all(&self) -> Vec<Attempt> {
        self.0.lock().unwrap().clone()
    }

    pub fn created(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|a| matches!(a.answer, Answer::Created { .. }))
            .count()
    }
}

/// Sends one signup and records it.
pub async fn signup_once(
    http: &reqwest::Client,
    base: &str,
    username: &str,
    attrs: &[String],
    key: Option<&str>,
    history: &History,
) -> Answer {
    let started = Instant::now();
    let mut req = http
        .post(format!("{base}/v1/signup"))
        .json(&json!({"username": username, "password": PASSWORD, "attributes": attrs}));
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let answer = match req.send().await {
        Err(_) => Answer::Lost,
        Ok(res) => {
            let status = res.status().as_u16();
            match res.json::<Value>().await {
                Err(_) => Answer::Lost,
                Ok(b) if status == 201 => Answer::Created {
                    user_id: b["user_id"].as_i64().unwrap(),
                    group_id: b["group"]["id"].as_i64().unwrap(),
                    founded: b["group"]["created"].as_bool().unwrap(),
                    group: b["group"]["attributes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_owned())
                        .collect(),
                },
                Ok(b) => {
                    if status == 503 {
                        assert!(b.get("detail").is_some());
                    }
                    Answer::Status(status)
                }
            }
        }
    };
    let mut sorted = attrs.to_vec();
    sorted.sort();
    sorted.dedup();
    history.push(Attempt {
        username: username.into(),
        attrs: sorted,
        started,
        ended: Instant::now(),
        answer: answer.clone(),
    });
    answer
}

/// A deterministic user for signup `n`: 3 to 5 attributes of a small
/// vocabulary, so that groups collide everywhere.
pub fn attrs_for(n: usize, vocab: usize) -> Vec<String> {
    let k = 3 + (n * 7 + n / 3) % 3;
    let mut out = Vec::new();
    let mut x = n.wrapping_mul(2_654_435_761) ^ (n >> 3);
    while out.len() < k {
        let a = format!("v{}", x % vocab);
        if !out.contains(&a) {
            out.push(a);
        }
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407)
            >> 7;
    }
    out
}

/// Clients signing up `per_client` users each, spread over `bases`. A
/// request without an answer, or with a 503, is retried with the same
/// Idempotency-Key on the next replica (safe by the contract), a bounded
/// number of times. `forbid_503`: a 503 fails the test.
pub async fn load(
    bases: Arc<Mutex<Vec<String>>>,
    clients: usize,
    per_client: usize,
    vocab: usize,
    tag: &str,
    history: History,
    forbid_503: bool,
) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let bases = bases.clone();
        let history = history.clone();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            for i in 0..per_client {
                let n = c * per_client + i;
                let username = format!("{tag}user{n}");
                let attrs = attrs_for(n + tag.len() * 1000, vocab);
                let key = format!("{tag}-key-{n}");
                for attempt in 0..60 {
                    let base = {
                        let b = bases.lock().unwrap();
                        b[(n + attempt) % b.len()].clone()
                    };
                    match signup_once(&http, &base, &username, &attrs, Some(&key), &history).await {
                        Answer::Created { .. } => break,
                        Answer::Status(503) if forbid_503 => {
                            panic!("a 503 where none is allowed ({username})")
                        }
                        Answer::Status(503) | Answer::Lost => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Answer::Status(s) => panic!("unexpected status {s} for {username}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The checker every scenario ends with. Against the database:
/// 1. every 201 is in Postgres, in the group it named;
/// 2. no two groups share `t` or more attributes; every member shares at
///    least `t` with its group;
/// 3. every group's founder (its first member) has exactly its attributes;
/// 4. no user row exists for a request that got only 4xx answers;
/// 5. the acknowledged history is serialisable in real-time order: no join
///    that began after a founding finished prefers a worse group than the
///    one that founding made.
pub async fn check(db_url: &str, history: &History, t: usize) {
    let (client, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let users: Vec<(i64, String, i64, Vec<String>)> = client
        .query(
            "SELECT id, username, group_id, attributes FROM users ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let groups: Vec<(i64, Vec<String>)> = client
        .query("SELECT id, attributes FROM groups ORDER BY id", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let attempts = history.all();

    // 1.
    let by_id: HashMap<i64, &(i64, String, i64, Vec<String>)> =
        users.iter().map(|u| (u.0, u)).collect();
    for a in &attempts {
        if let Answer::Created {
            user_id,
            group_id,
            group,
            ..
        } = &a.answer
        {
            let u = by_id.get(user_id).unwrap_or_else(|| {
                panic!(
                    "acknowledged user {user_id} ({}) is not in Postgres",
                    a.username
                )
            });
            assert_eq!(&u.1, &a.username, "user {user_id} is someone else");
            assert_eq!(
                u.2, *group_id,
                "user {user_id} is not in the group it was told"
            );
            let stored = groups.iter().find(|g| g.0 == *group_id).map(|g| &g.1);
            assert_eq!(
                stored,
                Some(group),
                "group {group_id} is not what {user_id} was told"
            );
        }
    }
    // 2.
    let snapshot_users: Vec<(i64, i64, Vec<String>)> =
        users.iter().map(|u| (u.0, u.2, u.3.clone())).collect();
    assert_invariants(&snapshot_users, &groups, t);
    // 3.
    for (gid, gattrs) in &groups {
        let first = users.iter().find(|u| u.2 == *gid);
        let Some(first) = first else {
            panic!("group {gid} has no member (half-written founding)");
        };
        assert_eq!(
            &first.3, gattrs,
            "group {gid}'s first member {} is not its founder",
            first.0
        );
    }
    // 4.
    let answered: HashSet<&str> = attempts
        .iter()
        .filter(|a| !matches!(a.answer, Answer::Status(s) if (400..500).contains(&s)))
        .map(|a| a.username.as_str())
        .collect();
    let names: HashSet<&str> = users.iter().map(|u| u.1.as_str()).collect();
    for a in &attempts {
        if !answered.contains(a.username.as_str()) {
            assert!(
                !names.contains(a.username.as_str()),
                "{} got only 4xx answers but has a user row",
                a.username
            );
        }
    }
    // 5.
    let group_attrs: HashMap<i64, HashSet<&String>> = groups
        .iter()
        .map(|(id, a)| (*id, a.iter().collect()))
        .collect();
    let foundings: Vec<(&Attempt, i64)> = attempts
        .iter()
        .filter_map(|a| match &a.answer {
            Answer::Created {
                group_id,
                founded: true,
                ..
            } => Some((a, *group_id)),
            _ => None,
        })
        .collect();
    for j in &attempts {
        let Answer::Created {
            group_id: g,
            founded: false,
            ..
        } = &j.answer
        else {
            continue;
        };
        let mine: HashSet<&String> = j.attrs.iter().collect();
        let m_g = group_attrs[g].intersection(&mine).count();
        for (f, h) in &foundings {
            if f.ended >= j.started || h == g {
                continue;
            }
            let m_h = group_attrs[h].intersection(&mine).count();
            assert!(
                !(m_h > m_g || (m_h == m_g && m_h >= t && h < g)),
                "{} joined group {g} (sharing {m_g}) although group {h} (sharing {m_h}) \
                 was founded before it began: not a one-at-a-time order",
                j.username
            );
        }
    }
}

/// `cohort verify` against a deployment; true when it exits 0.
/// Asserts that `cohort verify` agrees within `secs` seconds.
pub async fn verified_within(secs: u64, db: &str, redis: &str, prefix: &str) {
    let (d, r, p) = (db.to_owned(), redis.to_owned(), prefix.to_owned());
    assert!(
        eventually(secs, move || {
            let (d, r, p) = (d.clone(), r.clone(), p.clone());
            async move { verify_ok(&d, &r, &p) }
        })
        .await,
        "cohort verify did not agree within {secs} s"
    );
}

pub fn verify_ok(database_url: &str, redis_url: &str, prefix: &str) -> bool {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .arg("verify")
        .env_clear()
        .env("DATABASE_URL", database_url)
        .env("REDIS_URL", redis_url)
        .env("COHORT_REDIS_PREFIX", prefix)
        .env("COHORT_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    out.status.success()
}

/// A private redis-server that keeps its snapshot in a directory of its
/// own: `SAVE` takes a copy, and a restart loads the last one taken (an
/// older copy of the index, as after a restore or a failover).
pub struct SnapshotRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl SnapshotRedis {
    pub fn start() -> Self {
        let mut me = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        me.restart();
        me
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir.path().to_str().unwrap(),
                "--dbfilename",
                "dump.rdb",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        wait_for_port(self.port);
    }

    pub async fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut conn = redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?;
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query_async(&mut conn).await
    }

    /// `SHUTDOWN NOSAVE`: Redis stops and keeps nothing new.
    pub async fn shutdown_nosave(&mut self) {
        let _ = self.cmd(&["SHUTDOWN", "NOSAVE"]).await;
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for SnapshotRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (bounded) until `history` holds `n` acknowledged signups.
pub async fn until_created(history: &History, n: usize) {
    let h = history.clone();
    assert!(
        eventually(120, move || {
            let h = h.clone();
            async move { h.created() >= n }
        })
        .await,
        "the load stalled before {n} signups"
    );
}
