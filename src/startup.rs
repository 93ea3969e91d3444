//! Wiring: builds the backends for the configured mode, the service and the
//! HTTP servers. `main` and the integration tests start the same code.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::{Context, anyhow};
use tracing_actix_web::TracingLogger;

use crate::auth::{PasswordHasher, Tokens};
use crate::config::{Config, Mode};
use crate::http;
use crate::index::health::SharedIndex;
use crate::index::memory::MemoryIndex;
use crate::index::redis::RedisIndex;
use crate::index::redis::conn::RedisConn;
use crate::ratelimit::{MemoryLimiter, RateLimiter, RedisLimiter};
use crate::service::Service;
use crate::signup::SignupProtocol;
use crate::store::Store;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::telemetry::Metrics;

/// The backing services of one mode.
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub protocol: SignupProtocol,
    pub shared_index: Option<Arc<SharedIndex>>,
    pub limiter: Arc<dyn RateLimiter>,
    pub jwt_secret: Vec<u8>,
    /// Embedded mode: the data directory's lock, held for the process's life.
    pub data_lock: Option<fs::File>,
    /// Embedded mode: the store and the in-process index themselves (for
    /// `cohort import`, which writes in batches beside the protocol).
    pub embedded: Option<(Arc<SqliteStore>, Arc<MemoryIndex>)>,
}

/// How long one index call may take before the signup decides from the
/// system of record instead.
const INDEX_RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

/// Connects the rate limiter's Redis connection (it reconnects by itself:
/// unlike the index, it has nothing to lose).
pub async fn redis_manager(
    client: redis::Client,
) -> redis::RedisResult<redis::aio::ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, config)
}

use redis::aio::ConnectionManager;

/// Distributed mode: Postgres (migrated unless told not to) and Redis. Does
/// not wait for the index: signups decide from Postgres until the keeper has
/// checked (or rebuilt) it, so the port opens at once.
pub async fn distributed(
    config: &Config,
    migrate: bool,
    metrics: &Metrics,
) -> anyhow::Result<Backends> {
    let Mode::Distributed {
        database_url,
        redis_url,
        jwt_secret,
    } = &config.mode
    else {
        return Err(anyhow!("not in distributed mode"));
    };
    let pg = Arc::new(
        PgStore::connect_with(
            database_url,
            config.settings.tls_ca_file.as_deref(),
            config.settings.db_pool_size,
            config.threshold,
        )
        .map_err(|e| anyhow!(e))?
        .with_query_metrics(metrics.db_query_seconds.clone()),
    );
    if migrate {
        let n = pg.migrate().await.map_err(|e| anyhow!(e))?;
        tracing::info!(applied = n, "migrations applied");
    }
    let deployed = pg.ensure_deployment(config.threshold).await?;
    let redis_client = crate::tls::redis(redis_url, config.settings.tls_ca_file.as_deref())
        .map_err(|e| anyhow!(e))?;
    let conn = Arc::new(
        RedisConn::with_client(redis_client.clone(), INDEX_RESPONSE_TIMEOUT)
            .with_call_metrics(metrics.redis_call_seconds.clone()),
    );
    let redis = Arc::new(RedisIndex::new(
        conn,
        &config.settings.redis_prefix,
        config.threshold,
    ));
    let rebuilds = metrics.index_rebuilds.clone();
    let shared = Arc::new(SharedIndex::new(
        redis,
        pg.clone(),
        config.settings.index_buckets,
        Box::new(move |r| {
            if r.full_pass > 0 {
                rebuilds.inc();
            }
        }),
    ));
    if deployed == config.threshold.get() {
        shared.watch(Duration::from_secs(1));
    } else {
        tracing::error!(
            deployed,
            configured = config.threshold.get(),
            "COHORT_MATCH_THRESHOLD differs from the deployment's threshold: signups will be \
             refused. Configure the deployment's threshold, or change it with `cohort set-threshold`"
        );
    }
    let limiter = redis_manager(redis_client)
        .await
        .context("invalid REDIS_URL")?;
    let store: Arc<dyn Store> = pg;
    Ok(Backends {
        protocol: SignupProtocol::distributed(store.clone(), shared.clone(), jwt_secret)
            .count_decisions(metrics.decisions.clone()),
        store,
        shared_index: Some(shared),
        limiter: Arc::new(
            RedisLimiter::new(limiter, &config.settings.redis_prefix)
                .with_call_metrics(metrics.redis_call_seconds.clone()),
        ),
        jwt_secret: jwt_secret.clone(),
        data_lock: None,
        embedded: None,
    })
}

/// Embedded mode: a SQLite file and an in-process index rebuilt from it.
pub async fn embedded(config: &Config, metrics: &Metrics) -> anyhow::Result<Backends> {
    let Mode::Embedded { data_dir } = &config.mode else {
        return Err(anyhow!("not in embedded mode"));
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    // It holds password hashes and the token secret: a directory someone
    // else can write to could have a secret planted in it, so that is
    // refused; one others may only read (a `mkdir` under umask 022) has
    // leaked nothing yet, and is made private.
    check_private(data_dir, "the data directory", 0o700, 0o022)?;
    tighten(data_dir, 0o700)?;
    let lock = lock_data_dir(data_dir)?;
    let jwt_secret = match &config.settings.jwt_secret {
        Some(s) => s.clone().into_bytes(),
        None => load_or_create_secret(&data_dir.join("jwt-secret"))?,
    };
    let db = data_dir.join("cohort.sqlite3");
    private_file(&db)?;
    let store = Arc::new(SqliteStore::open(&db, config.threshold).map_err(|e| anyhow!(e))?);
    for f in ["cohort.sqlite3", "cohort.sqlite3-wal", "cohort.sqlite3-shm"] {
        tighten(&data_dir.join(f), 0o600)?;
    }
    let deployed = store.ensure_deployment(config.threshold).await?;
    if deployed != config.threshold.get() {
        tracing::error!(
            deployed,
            configured = config.threshold.get(),
            "COHORT_MATCH_THRESHOLD differs from the threshold this data directory was built \
             with: signups will be refused"
        );
    }
    let index = Arc::new(MemoryIndex::new(config.threshold));
    let mut after = None;
    loop {
        let batch = store.groups_after(after, 10_000).await?;
        let Some(last) = batch.last() else { break };
        after = Some(last.0);
        for (id, attrs) in batch {
            index.insert(id, attrs);
        }
    }
    tracing::info!(
        data_dir = %data_dir.display(),
        groups = index.len(),
        "embedded mode: data in a local SQLite file, group index in process"
    );
    let parts = (store.clone(), index.clone());
    let store: Arc<dyn Store> = store;
    Ok(Backends {
        embedded: Some(parts),
        protocol: SignupProtocol::embedded(store.clone(), index, &jwt_secret)
            .count_decisions(metrics.decisions.clone()),
        store,
        shared_index: None,
        limiter: Arc::new(MemoryLimiter::default()),
        jwt_secret,
        data_lock: Some(lock),
    })
}

/// One process per data directory: a second one would corrupt nothing in
/// SQLite, but its in-process index would diverge from the first's.
/// The embedded store alone, under the data directory's lock, for a
/// command that changes it with the server stopped (`cohort
/// set-threshold`). The directory must hold a database already.
pub fn embedded_store(config: &Config) -> anyhow::Result<(SqliteStore, fs::File)> {
    let Mode::Embedded { data_dir } = &config.mode else {
        return Err(anyhow!("not in embedded mode"));
    };
    let db = data_dir.join("cohort.sqlite3");
    if !db.exists() {
        return Err(anyhow!("no database in {}", data_dir.display()));
    }
    check_private(data_dir, "the data directory", 0o700, 0o022)?;
    let lock = lock_data_dir(data_dir)?;
    let store = SqliteStore::open(&db, config.threshold).map_err(|e| anyhow!(e))?;
    Ok((store, lock))
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<fs::File> {
    let path = dir.join("cohort.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(anyhow!(
            "another cohort process is using the data directory {} (lock file {} is held); \
             stop it, or set COHORT_DATA_DIR to another directory",
            dir.display(),
            path.display()
        )),
        Err(fs::TryLockError::Error(e)) => Err(anyhow!("cannot lock {}: {e}", path.display())),
    }
}

/// The embedded mode's JWT secret: generated once, kept with mode 0600, so
/// tokens survive restarts.
fn load_or_create_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.exists() {
        // Readable by others: it may have leaked, and tokens could be forged.
        check_private(path, "the JWT secret file", 0o600, 0o077)?;
    }
    if let Ok(s) = fs::read_to_string(path) {
        let s = s.trim().to_owned();
        if s.len() >= crate::auth::MIN_SECRET_BYTES {
            return Ok(s.into_bytes());
        }
        return Err(anyhow!(
            "{} is too short to be a JWT secret; delete it to generate a new one",
            path.display()
        ));
    }
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    Ok(secret.into_bytes())
}

/// Refuses `path` unless this user owns it and no one else has any of the
/// `forbidden` permission bits: says why, and how to fix it.
fn check_private(path: &Path, what: &str, fix_mode: u32, forbidden: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).with_context(|| format!("cannot inspect {}", path.display()))?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(anyhow!(
            "{what} {} is owned by user {}, not by this process's user {me}: refusing to trust \
             it. Give it to this user (chown) or set COHORT_DATA_DIR to a directory of its own",
            path.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & forbidden != 0 {
        let how = if forbidden & 0o044 != 0 {
            "readable"
        } else {
            "writable"
        };
        return Err(anyhow!(
            "{what} {} is {how} by group or others (mode {mode:o}): refusing to trust it. \
             Run `chmod {fix_mode:o} {}` (check first that nobody has tampered with it)",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Creates `path` with mode 0600 if it does not exist yet, so SQLite (which
/// gives its -wal and -shm files the database's mode) never creates it 0644.
fn private_file(path: &Path) -> anyhow::Result<()> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    tighten(path, 0o600)
}

/// `mode` (0600, 0700) for a file or directory of ours that others may
/// read (one an earlier version made 0644, say); nothing if it does not
/// exist.
fn tighten(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            tracing::info!(path = %path.display(), mode = format!("{mode:o}"), "made private");
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot make {} private (chmod {mode:o})", path.display()))
        }
        _ => Ok(()),
    }
}

pub struct Application {
    server: Server,
    metrics_server: Option<Server>,
    port: u16,
    metrics_port: Option<u16>,
    service: web::Data<Service>,
    _data_lock: Option<fs::File>,
}

impl Application {
    pub async fn build(config: Config, migrate: bool) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        let backends = match config.mode {
            Mode::Distributed { .. } => distributed(&config, migrate, &metrics).await?,
            Mode::Embedded { .. } => embedded(&config, &metrics).await?,
        };
        Self::with_backends(config, metrics, backends).await
    }

    pub async fn with_backends(
        config: Config,
        metrics: Metrics,
        backends: Backends,
    ) -> anyhow::Result<Self> {
        let s = &config.settings;
        let tokens = Tokens::new(
            &backends.jwt_secret,
            &config.jwt_previous_secrets,
            s.token_ttl,
        )
        .map_err(|e| anyhow!(e))?;
        let hash_metric = metrics.password_hash_seconds.clone();
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hasher = PasswordHasher::new(
            s.hash_concurrency.unwrap_or(cpus),
            Arc::new(move |secs| hash_metric.observe(secs)),
        );
        let service = web::Data::new(Service {
            store: backends.store,
            protocol: backends.protocol,
            shared_index: backends.shared_index,
            hasher,
            tokens,
            limiter: backends.limiter,
            metrics,
            rules: config.rules,
            threshold: config.threshold,
            signin_max_failures: s.signin_max_failures.max(1),
            signup_rate_limit: s.signup_rate_limit,
        });
        spawn_count_refresher(service.clone());

        let listener = TcpListener::bind(s.listen)
            .with_context(|| format!("cannot listen on {}", s.listen))?;
        let port = listener.local_addr()?.port();
        let with_metrics = s.metrics_listen.is_none();
        let svc = service.clone();
        let proxies = web::Data::new(http::client::TrustedProxies(s.trusted_proxies.clone()));
        let deadline = Duration::from_secs(s.request_timeout);
        let body_deadline = web::Data::new(http::RequestDeadline(deadline));
        let workers = s
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(svc.clone())
                .app_data(proxies.clone())
                .app_data(body_deadline.clone())
                .wrap(from_fn(http::body_deadline))
                .wrap(from_fn(http::record_metrics))
                .wrap(http::security_headers())
                .wrap(from_fn(http::request_id_header))
                .wrap(TracingLogger::<http::RootSpan>::new())
                .configure(|c| http::api(c, with_metrics))
        })
        // Slow clients: headers within the deadline (then the body within
        // it too, see `body_deadline`), idle keep-alive connections closed,
        // and a cap on connections (actix-web counts per worker).
        .client_request_timeout(deadline)
        .keep_alive(match s.keep_alive {
            0 => actix_web::http::KeepAlive::Disabled,
            k => actix_web::http::KeepAlive::Timeout(Duration::from_secs(k)),
        })
        .workers(workers)
        .max_connections(s.max_connections.div_ceil(workers).max(1))
        .listen(listener)?
        .shutdown_timeout(s.shutdown_timeout);
        let server = server.run();

        let (metrics_server, metrics_port) = match s.metrics_listen {
            None => (None, None),
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .with_context(|| format!("cannot listen on {addr} for metrics"))?;
                let mport = l.local_addr()?.port();
                let svc = service.clone();
                let srv = HttpServer::new(move || {
                    App::new().app_data(svc.clone()).configure(http::metrics)
                })
                .listen(l)?
                .workers(1)
                .shutdown_timeout(s.shutdown_timeout)
                .run();
                (Some(srv), Some(mport))
            }
        };
        tracing::info!(port, metrics_port, "listening");
        Ok(Self {
            server,
            metrics_server,
            port,
            metrics_port,
            service,
            _data_lock: backends.data_lock,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_port
    }

    pub fn service(&self) -> web::Data<Service> {
        self.service.clone()
    }

    /// A handle that stops the servers gracefully (as SIGTERM does).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Self {
            server,
            metrics_server,
            _data_lock,
            ..
        } = self;
        match metrics_server {
            None => server.await,
            Some(m) => {
                let mh = m.handle();
                let metrics_task = tokio::spawn(m);
                let r = server.await;
                mh.stop(true).await;
                let _ = metrics_task.await;
                r
            }
        }
    }
}

/// Refreshes the groups and users gauges every few seconds, for as long as
/// the service exists.
fn spawn_count_refresher(service: web::Data<Service>) {
    let weak = Arc::downgrade(&service.clone().into_inner());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut sizes_due = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let Some(svc) = weak.upgrade() else { return };
            if tokio::time::Instant::now() >= sizes_due {
                sizes_due = tokio::time::Instant::now() + GROUP_SIZES_EVERY;
                refresh_group_sizes(&svc).await;
            }
            match svc.store.counts().await {
                Ok((g, u)) => {
                    svc.metrics.groups.set(g as i64);
                    svc.metrics.users.set(u as i64);
                    svc.metrics.ready.set(1);
                }
                Err(_) => svc.metrics.ready.set(0),
            }
            let state = svc.index_state();
            svc.metrics
                .index_ready
                .set(i64::from(state == crate::index::health::IndexState::Ready));
        }
    });
}

/// How often a replica refreshes the group-size gauges: one aggregate query
/// over the member counters (about a second at a million groups), so at most
/// once a minute per replica.
pub const GROUP_SIZES_EVERY: Duration = Duration::from_secs(60);

/// Refreshes the group-size gauges now (the refresher calls it every
/// [`GROUP_SIZES_EVERY`]; tests call it directly). False if the store could
/// not answer (the gauges keep their last values).
pub async fn refresh_group_sizes(svc: &Service) -> bool {
    match svc.store.group_sizes().await {
        Ok(d) => {
            svc.metrics.group_sizes.set(&d);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not refresh the group-size metrics");
            false
        }
    }
}
