//! Starting the real application on port 0 against real backing services:
//! a fresh Postgres database and a fresh Redis key prefix per test
//! (distributed mode), or a fresh data directory (embedded mode).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort::config::Settings;
use cohort::startup::Application;
use reqwest::Response;
use serde_json::{Value, json};

pub const PASSWORD: &str = "correct horse battery staple";

pub fn pg_admin_url() -> String {
    std::env::var("COHORT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("COHORT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Distributed,
    Embedded,
}

/// Defaults for a test instance; every field set here, so the test runner's
/// environment cannot change them.
pub fn settings() -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: None,
        redis_url: None,
        redis_prefix: "unused:".into(),
        data_dir: PathBuf::from("unused"),
        jwt_secret: Some("test secret that is at least 32 bytes long".into()),
        token_ttl: 3600,
        match_threshold: 3,
        max_attributes: 16,
        metrics_listen: None,
        shutdown_timeout: 5,
        db_pool_size: 8,
        index_buckets: 1024,
        hash_concurrency: Some(2),
        signin_max_failures: 5,
        signup_rate_limit: 0,
        workers: Some(1),
        log_format: cohort::config::LogFormat::Json,
        jwt_secret_file: None,
        database_url_file: None,
        redis_url_file: None,
        jwt_previous_secrets: None,
        jwt_previous_secrets_file: None,
        tls_ca_file: None,
        trusted_proxies: Vec::new(),
        request_timeout: 10,
        keep_alive: 5,
        max_connections: 4096,
    }
}

/// A fresh database on the shared Postgres, dropped when the last handle goes.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Arc<Self> {
        let name = format!("cohort_test_{}", uuid::Uuid::new_v4().simple());
        let (client, conn) = tokio_postgres::connect(&pg_admin_url(), tokio_postgres::NoTls)
            .await
            .expect("the test Postgres is reachable");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let mut cfg: tokio_postgres::Config = pg_admin_url().parse().unwrap();
        cfg.dbname(&name);
        let url = format!(
            "postgres://{}@{}:{}/{}",
            cfg.get_user().unwrap_or("postgres"),
            host_of(&cfg),
            cfg.get_ports().first().copied().unwrap_or(5432),
            name
        );
        Arc::new(Self { name, url })
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }
}

fn host_of(cfg: &tokio_postgres::Config) -> String {
    match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime we may block: use a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&pg_admin_url(), tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A fresh Redis key prefix, its keys deleted when dropped.
pub struct TestPrefix {
    pub prefix: String,
    pub url: String,
}

impl TestPrefix {
    pub fn new(url: &str) -> Arc<Self> {
        Arc::new(Self {
            prefix: format!("test-{}:", uuid::Uuid::new_v4().simple()),
            url: url.into(),
        })
    }
}

impl Drop for TestPrefix {
    fn drop(&mut self) {
        if let Ok(client) = redis::Client::open(self.url.as_str())
            && let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1))
        {
            // SCAN is bounded: it ends when the cursor returns to 0.
            let mut cursor: u64 = 0;
            loop {
                let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{}*", self.prefix))
                    .arg("COUNT")
                    .arg(1000)
                    .query(&mut conn)
                else {
                    break;
                };
                if !keys.is_empty() {
                    let _: redis::RedisResult<()> =
                        redis::cmd("UNLINK").arg(&keys).query(&mut conn);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
}

/// The backing services one or more app instances share.
#[derive(Clone)]
pub enum Backing {
    Distributed {
        db: Arc<TestDb>,
        prefix: Arc<TestPrefix>,
    },
    Embedded {
        dir: Arc<tempfile::TempDir>,
    },
}

impl Backing {
    pub async fn new(mode: Mode) -> Self {
        Self::new_with_redis(mode, &redis_url()).await
    }

    pub async fn new_with_redis(mode: Mode, redis: &str) -> Self {
        match mode {
            Mode::Distributed => Backing::Distributed {
                db: TestDb::create().await,
                prefix: TestPrefix::new(redis),
            },
            Mode::Embedded => Backing::Embedded {
                dir: Arc::new(tempfile::tempdir().unwrap()),
            },
        }
    }

    pub fn apply(&self, s: &mut Settings) {
        match self {
            Backing::Distributed { db, prefix } => {
                s.database_url = Some(db.url.clone());
                s.redis_url = Some(prefix.url.clone());
                s.redis_prefix = prefix.prefix.clone();
            }
            Backing::Embedded { dir } => {
                s.data_dir = dir.path().to_path_buf();
                s.jwt_secret = None;
            }
        }
    }

    pub fn db(&self) -> Option<&Arc<TestDb>> {
        match self {
            Backing::Distributed { db, .. } => Some(db),
            Backing::Embedded { .. } => None,
        }
    }
}

#[allow(dead_code)] // handles some tests use and others do not
pub struct TestApp {
    pub address: String,
    pub metrics_port: Option<u16>,
    pub http: reqwest::Client,
    pub backing: Backing,
    pub service: actix_web::web::Data<cohort::service::Service>,
    handle: actix_web::dev::ServerHandle,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

pub async fn spawn_app(mode: Mode) -> TestApp {
    spawn_with(Backing::new(mode).await, |_| {}).await
}

pub async fn spawn_with(backing: Backing, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let mut s = settings();
    backing.apply(&mut s);
    tweak(&mut s);
    let config = s.validate().expect("valid test settings");
    let app = Application::build(config, true)
        .await
        .expect("the app starts");
    let port = app.port();
    let metrics_port = app.metrics_port();
    let handle = app.handle();
    let service = app.service();
    let task = tokio::spawn(app.run_until_stopped());
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        metrics_port,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            // Below the server's keep-alive (5 s): a client must not reuse
            // a connection the server may be closing at that very moment.
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
        backing,
        service,
        handle,
        task: Some(task),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn signup(&self, username: &str, attributes: &[&str]) -> Response {
        self.post_json(
            "/v1/signup",
            &json!({"username": username, "password": PASSWORD, "attributes": attributes}),
        )
        .await
    }

    /// Signs up and returns the 201 body, failing the test otherwise.
    pub async fn signup_ok(&self, username: &str, attributes: &[&str]) -> Value {
        let res = self.signup(username, attributes).await;
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 201, "signup of {username} failed: {body}");
        body
    }

    pub async fn signin(&self, username: &str, password: &str) -> Response {
        self.post_json(
            "/v1/signin",
            &json!({"username": username, "password": password}),
        )
        .await
    }

    pub async fn token(&self, username: &str) -> String {
        let res = self.signin(username, PASSWORD).await;
        assert_eq!(res.status().as_u16(), 200);
        let body: Value = res.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    pub async fn get_auth(&self, path: &str, token: &str) -> Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }
}

impl TestApp {
    /// Stops the app as SIGTERM would and waits until it has (its data
    /// directory's lock released).
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            // Not awaited: the runtime ends with the test anyway.
            let h = self.handle.clone();
            tokio::spawn(async move { h.stop(false).await });
            t.abort();
        }
    }
}

/// Asserts a problem+json response and returns its body.
pub async fn assert_problem(res: Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status, "unexpected status");
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert_eq!(ct, "application/problem+json");
    let body: Value = res.json().await.unwrap();
    for f in ["type", "title", "status", "detail"] {
        assert!(body.get(f).is_some(), "problem lacks {f}: {body}");
    }
    assert_eq!(body["status"], status);
    body
}

/// A private redis-server on a free port, for tests that stop, flush or
/// restart Redis. Killed when dropped.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    tls: Option<(PathBuf, PathBuf)>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = free_port();
        let mut me = Self {
            port,
            child: None,
            tls: None,
        };
        me.restart();
        me
    }

    /// A server that speaks TLS only (no plain port), with this
    /// certificate and key (PEM files).
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        let port = free_port();
        let mut me = Self {
            port,
            child: None,
            tls: Some((cert.to_owned(), key.to_owned())),
        };
        me.restart();
        me
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        self.kill();
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => cmd.args([
                "--port",
                "0",
                "--tls-port",
                &self.port.to_string(),
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
            ]),
        };
        let child = cmd
            .args([
                "--bind",
                "127.0.0.1",
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

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (bounded) until something accepts connections on `port`.
pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every (user id, group id, user attributes) and (group id, attributes) in
/// the database, for invariant checks.
pub async fn db_snapshot(db: &TestDb) -> (Vec<(i64, i64, Vec<String>)>, Vec<(i64, Vec<String>)>) {
    let c = db.client().await;
    let users = c
        .query(
            "SELECT id, group_id, attributes FROM users ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let groups = c
        .query("SELECT id, attributes FROM groups ORDER BY id", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    (users, groups)
}

/// The contract's invariants over a database snapshot: no two groups share
/// `t` or more attributes; every member shares at least `t` with its group.
pub fn assert_invariants(
    users: &[(i64, i64, Vec<String>)],
    groups: &[(i64, Vec<String>)],
    t: usize,
) {
    use std::collections::{HashMap, HashSet};
    let sets: HashMap<i64, HashSet<&String>> = groups
        .iter()
        .map(|(id, a)| (*id, a.iter().collect()))
        .collect();
    let ids: Vec<i64> = groups.iter().map(|g| g.0).collect();
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            let shared = sets[a].intersection(&sets[b]).count();
            assert!(
                shared < t,
                "groups {a} and {b} share {shared} >= {t} attributes"
            );
        }
    }
    for (uid, gid, attrs) in users {
        let g = sets
            .get(gid)
            .unwrap_or_else(|| panic!("user {uid} is in missing group {gid}"));
        let shared = attrs.iter().filter(|a| g.contains(a)).count();
        assert!(
            shared >= t,
            "user {uid} shares only {shared} attributes with group {gid}"
        );
    }
}

/// Runs the same test body in both modes.
#[macro_export]
macro_rules! both_modes {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn distributed() {
                let f = $body;
                f($crate::helpers::spawn_app($crate::helpers::Mode::Distributed).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                let f = $body;
                f($crate::helpers::spawn_app($crate::helpers::Mode::Embedded).await).await;
            }
        }
    };
}

/// A TCP proxy on loopback that a test can cut (every connection dropped,
/// new ones refused) and restore: a backing service going away and coming
/// back, without touching the shared server.
pub struct Proxy {
    pub port: u16,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if *rx.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self {
            port,
            cut: Arc::new(tx),
        }
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

/// Polls `f` until it returns true, at most `secs` seconds; returns whether
/// it did. For waiting on a system to recover, where there is no event to
/// wait for.
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The distributed mode's parts, without the HTTP server: a migrated fresh
/// database, a fresh Redis prefix and an index synced from the database.
pub struct Parts {
    pub db: Arc<TestDb>,
    pub prefix: Arc<TestPrefix>,
    pub store: Arc<cohort::store::postgres::PgStore>,
    pub index: Arc<cohort::index::redis::RedisIndex>,
}

pub async fn parts(t: usize, max: usize) -> Parts {
    use cohort::store::Store;
    let db = TestDb::create().await;
    let prefix = TestPrefix::new(&redis_url());
    let t = cohort::domain::Threshold::new(t, max).unwrap();
    let store = cohort::store::postgres::PgStore::connect(&db.url, 4, t).unwrap();
    store.migrate().await.unwrap();
    store.ensure_deployment(t).await.unwrap();
    let conn =
        cohort::index::redis::conn::RedisConn::new(&redis_url(), Duration::from_secs(5)).unwrap();
    let index = cohort::index::redis::RedisIndex::new(Arc::new(conn), &prefix.prefix, t);
    index.sync(&store, 64, &|_, _| {}).await.unwrap();
    Parts {
        db,
        prefix,
        store: Arc::new(store),
        index: Arc::new(index),
    }
}

impl Parts {
    /// One signup through the protocol's steps, one at a time: the Redis
    /// script and the database's subset table must decide alike; the commit
    /// follows, then the add.
    pub async fn place(
        &self,
        username: &str,
        user: &cohort::domain::AttributeSet,
    ) -> cohort::store::Committed {
        use cohort::store::{NewUser, Plan, Store};
        let in_redis = self.index.decide(user).await.unwrap().best;
        let in_db = self.store.best_group(user).await.unwrap();
        assert_eq!(
            in_redis, in_db,
            "Redis and Postgres decide differently for {user:?}"
        );
        let c = self
            .store
            .commit_signup(&NewUser {
                username: cohort::domain::Username::parse(username).unwrap(),
                password_hash: "x".into(),
                attributes: user.clone(),
                plan: in_db.map_or(Plan::Found, Plan::Join),
                decided_in_index: None,
                idempotency: None,
            })
            .await
            .unwrap();
        if c.founded {
            self.index
                .add_groups(&[(c.user.group_id, c.group_attributes.clone())])
                .await
                .unwrap();
        }
        c
    }
}

/// Postgres's arbiter is whole: every group's t-subsets, and nothing else,
/// are in the subset table (or its overlaps) under that group. Embedded
/// mode has no such table (its in-process index, rebuilt from the groups at
/// each start, is the arbiter): nothing to check there.
pub async fn assert_subset_table_complete(backing: &Backing, t: usize) {
    type Rows = Vec<(Vec<u8>, i64)>;
    let (groups, rows): (Vec<(i64, Vec<String>)>, Rows) = match backing {
        Backing::Distributed { db, .. } => {
            let c = db.client().await;
            let groups = c
                .query("SELECT id, attributes FROM groups", &[])
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let rows = c
                .query(
                    "SELECT uuid_send(subset), group_id FROM subset_owners \
                     UNION ALL SELECT uuid_send(subset), group_id FROM subset_overlaps",
                    &[],
                )
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            (groups, rows)
        }
        Backing::Embedded { .. } => return,
    };
    let t = cohort::domain::Threshold::new(t, 16).unwrap();
    let mut want: Vec<(Vec<u8>, i64)> = groups
        .iter()
        .flat_map(|(id, a)| {
            let set = cohort::domain::AttributeSet::from_stored(a).unwrap();
            cohort::domain::grouping::subset_keys(&set, t)
                .into_iter()
                .map(move |k| (k.to_vec(), *id))
        })
        .collect();
    let mut got = rows;
    want.sort();
    got.sort();
    assert_eq!(got.len(), want.len(), "subset rows");
    assert!(got == want, "the subset table is not the groups' subsets");
}
