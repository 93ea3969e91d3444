//! Configuration: flags or environment variables (flags win), checked in
//! full before anything binds or connects.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::auth::{MAX_TOKEN_TTL_SECS, MIN_SECRET_BYTES};
use crate::domain::{AttributeRules, Threshold};

#[derive(Debug, Parser)]
#[command(
    name = "cohort",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("COHORT_GIT_COMMIT"), ")"),
    about = "Places every new user into a group of people like them.",
    after_help = SERVE_EXIT
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for the default command (serve).
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (applies pending migrations first).
    #[command(after_help = SERVE_EXIT)]
    Serve {
        /// Do not apply migrations at start-up.
        #[arg(long)]
        no_migrate: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Apply pending migrations and exit.
    #[command(after_help = MIGRATE_EXIT)]
    Migrate {
        #[command(flatten)]
        settings: Settings,
    },
    /// Bring the shared group index level with the system of record, then
    /// exit. Idempotent; quick when the index is already current. Serving
    /// replicas go on meanwhile.
    #[command(after_help = REINDEX_EXIT)]
    Reindex {
        /// Drop the index first and build it anew (also resizes its buckets
        /// to the population). Signups decide from the database meanwhile.
        #[arg(long)]
        from_scratch: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Change the deployment's match threshold: rebuilds the subset table and
    /// marks the index for a rebuild. Existing groups keep their members;
    /// replicas still configured with the old threshold refuse signups.
    #[command(after_help = SET_THRESHOLD_EXIT)]
    SetThreshold {
        /// The new threshold.
        threshold: usize,
        #[command(flatten)]
        settings: Settings,
    },
    /// Compare the group index with the system of record; exit 0 when they agree.
    #[command(after_help = VERIFY_EXIT)]
    Verify {
        /// Print the report as one JSON object (on standard output, whatever
        /// the exit code).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Sign up every user of a JSON Lines file (`-`: standard input), with
    /// the groups one-at-a-time signups in file order would give, beside
    /// live signups. Resumable: run it again to import what is left. Exit 0
    /// all imported, 1 some lines rejected, 2 could not run.
    #[command(after_help = IMPORT_EXIT)]
    Import {
        /// The file: one JSON object a line, {"username", "attributes", and
        /// "password" or "password_hash" (argon2id PHC)}.
        file: PathBuf,
        /// Where to list rejected lines (line number and reason).
        #[arg(long, default_value = None, help = "Reject file [default: FILE.rejects.jsonl]")]
        rejects: Option<PathBuf>,
        /// Lines decided and committed together.
        #[arg(long, default_value_t = 2_000)]
        batch: usize,
        /// Print the summary as JSON (no progress bar).
        #[arg(long)]
        json: bool,
        /// Distributed mode: decide each line against every group held in
        /// memory (fast; ~1 KB a group), or against the database (a
        /// million index probes a batch of 50,000; little memory). `auto`:
        /// memory up to 4 million groups.
        #[arg(long, value_enum, default_value_t = crate::import::Decide::Auto)]
        decide: crate::import::Decide,
        #[command(flatten)]
        settings: Settings,
    },
    /// Users, groups, the distribution of group sizes (percentiles and a
    /// power-of-two histogram, from the member counters: cheap) and the
    /// commonest attributes (a scan of every user: seconds at millions).
    /// Read-only, from one snapshot; in embedded mode it reads the SQLite
    /// file beside a running server. Exit 0, or 2 when it could not run.
    #[command(after_help = STATS_EXIT)]
    Stats {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        /// How many of the commonest attributes to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[command(flatten)]
        settings: Settings,
    },
    /// Print a shell completion script, to source or to install where the
    /// shell looks for them (e.g. `cohort completions bash >
    /// /etc/bash_completion.d/cohort`).
    #[command(after_help = COMPLETIONS_EXIT)]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

// Every command's exit codes, shown at the end of its --help. Usage errors
// (an unknown flag, a bad value) exit 2, as clap does.
const SERVE_EXIT: &str = "Exit codes:\n  0  stopped cleanly (SIGTERM or SIGINT, requests in flight finished)\n  \
1  failed to start (a port taken, a database unreachable...) or while running\n  \
2  invalid flags or configuration";
const MIGRATE_EXIT: &str = "Exit codes:\n  0  migrations applied (or none pending)\n  \
1  failed (database unreachable, a migration failed)\n  2  invalid flags or configuration";
const REINDEX_EXIT: &str = "Exit codes:\n  0  the index is level with the database\n  \
1  failed (Postgres or Redis unreachable, wrong threshold)\n  \
2  invalid flags or configuration\n  3  another process is syncing the index right now";
const SET_THRESHOLD_EXIT: &str = "Exit codes:\n  0  threshold changed\n  \
1  failed (database unreachable, embedded mode, invalid threshold)\n  \
2  invalid flags or configuration";
const VERIFY_EXIT: &str = "Exit codes:\n  0  index and database agree (or embedded mode: nothing to verify)\n  \
1  they differ (each difference is reported)\n  \
2  could not run (invalid configuration, Postgres or Redis unreachable)";
const IMPORT_EXIT: &str = "Exit codes:\n  0  every line imported\n  \
1  some lines rejected (listed in the reject file)\n  \
2  could not run (invalid configuration, unreadable file, database unreachable)";
const STATS_EXIT: &str = "Exit codes:\n  0  statistics printed\n  \
2  could not run (invalid configuration, database unreachable)";
const COMPLETIONS_EXIT: &str = "Exit codes:\n  0  script printed\n  2  unknown shell";

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, env = "COHORT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Postgres URL: the system of record (distributed mode).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Redis URL: the group index shared by all replicas (distributed mode).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key this deployment owns.
    #[arg(long, env = "COHORT_REDIS_PREFIX", default_value = "cohort:")]
    pub redis_prefix: String,
    /// Where the embedded mode keeps its data.
    #[arg(long, env = "COHORT_DATA_DIR", default_value = "./cohort-data")]
    pub data_dir: PathBuf,
    /// HMAC secret for access tokens, at least 32 bytes (required in distributed mode).
    #[arg(long, env = "COHORT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Access-token lifetime in seconds.
    #[arg(long, env = "COHORT_TOKEN_TTL", default_value_t = 3600)]
    pub token_ttl: u64,
    /// Minimum number of shared attributes to join a group.
    #[arg(long, env = "COHORT_MATCH_THRESHOLD", default_value_t = 3)]
    pub match_threshold: usize,
    /// Most attributes a user may give.
    #[arg(long, env = "COHORT_MAX_ATTRIBUTES", default_value_t = 16)]
    pub max_attributes: usize,
    /// A separate address for /metrics (default: served on the API listener).
    #[arg(long, env = "COHORT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds to finish requests in flight after SIGTERM.
    #[arg(long, env = "COHORT_SHUTDOWN_TIMEOUT", default_value_t = 20)]
    pub shutdown_timeout: u64,
    /// Postgres connections per replica.
    #[arg(long, env = "COHORT_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// Minimum number of Redis index buckets (more are used when the
    /// population at rebuild time needs them). A bucket key costs ~100
    /// bytes and is made on first use; a bucket's entries are scanned on
    /// every add, so a population imported into a new index (sized when
    /// empty) stays fast up to ~10^6 groups (~80 entries a bucket).
    #[arg(long, env = "COHORT_INDEX_BUCKETS", default_value_t = 262_144)]
    pub index_buckets: u32,
    /// Password hashes computed at once (default: the number of CPUs).
    #[arg(long, env = "COHORT_HASH_CONCURRENCY")]
    pub hash_concurrency: Option<usize>,
    /// Sign-in attempts per account and client address before 429, per
    /// 15-minute window (a success resets it); ten times as many per account
    /// from all addresses together.
    #[arg(long, env = "COHORT_SIGNIN_MAX_FAILURES", default_value_t = 10)]
    pub signin_max_failures: u32,
    /// Signups per client address per minute (0: no limit). Behind a load
    /// balancer every client shares its address: set it on the balancer there.
    #[arg(long, env = "COHORT_SIGNUP_RATE_LIMIT", default_value_t = 0)]
    pub signup_rate_limit: u32,
    /// HTTP worker threads (default: one per CPU).
    #[arg(long, env = "COHORT_WORKERS")]
    pub workers: Option<usize>,
    /// Log format: auto (readable on a terminal, JSON otherwise), json or pretty.
    #[arg(long, env = "COHORT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// A file holding COHORT_JWT_SECRET (the Kubernetes convention for
    /// mounted secrets); trailing newlines are ignored.
    #[arg(long, env = "COHORT_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// A file holding DATABASE_URL.
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// A file holding REDIS_URL.
    #[arg(long, env = "REDIS_URL_FILE")]
    pub redis_url_file: Option<PathBuf>,
    /// Earlier JWT secrets, comma-separated: tokens they signed still verify
    /// (new ones are signed with COHORT_JWT_SECRET), so rotating the secret
    /// logs nobody out. Remove one once COHORT_TOKEN_TTL has passed.
    #[arg(long, env = "COHORT_JWT_PREVIOUS_SECRETS", hide_env_values = true)]
    pub jwt_previous_secrets: Option<String>,
    /// A file holding COHORT_JWT_PREVIOUS_SECRETS (one per line, or
    /// comma-separated).
    #[arg(long, env = "COHORT_JWT_PREVIOUS_SECRETS_FILE")]
    pub jwt_previous_secrets_file: Option<PathBuf>,
    /// PEM file of the certificate authorities to trust, instead of the
    /// system's, for TLS to Postgres (`sslmode=verify-ca|verify-full`) and
    /// Redis (`rediss://`). A DATABASE_URL's own `sslrootcert` wins for
    /// Postgres.
    #[arg(long, env = "COHORT_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Proxies (IP addresses or CIDR blocks, comma-separated) whose
    /// `X-Forwarded-For` is believed. From any other peer the header is
    /// ignored: the client address is the TCP peer.
    #[arg(long, env = "COHORT_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_proxy)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Seconds a client has to send a whole request, headers and body; a
    /// slower one gets 408 and its connection is closed.
    #[arg(long, env = "COHORT_REQUEST_TIMEOUT", default_value_t = 10)]
    pub request_timeout: u64,
    /// Seconds an idle keep-alive connection is kept open.
    #[arg(long, env = "COHORT_KEEP_ALIVE", default_value_t = 5)]
    pub keep_alive: u64,
    /// Most connections this replica holds open at once (split among the
    /// worker threads); more wait in the listen backlog.
    #[arg(long, env = "COHORT_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable on a terminal, JSON otherwise.
    Auto,
    /// One JSON object a line.
    Json,
    /// Readable text.
    Pretty,
}

/// Which backing services to use, decided by what is configured.
#[derive(Clone)]
pub enum Mode {
    Distributed {
        database_url: String,
        redis_url: String,
        jwt_secret: Vec<u8>,
    },
    Embedded {
        data_dir: PathBuf,
    },
}

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print URLs (they carry passwords) or the secret.
        match self {
            Mode::Distributed { .. } => f.write_str("Distributed"),
            Mode::Embedded { data_dir } => write!(f, "Embedded({})", data_dir.display()),
        }
    }
}

/// Settings checked as a whole.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    /// Earlier JWT secrets that still verify (never sign).
    pub jwt_previous_secrets: Vec<Vec<u8>>,
    pub mode: Mode,
    pub threshold: Threshold,
    pub rules: AttributeRules,
}

impl Settings {
    pub fn validate(mut self) -> Result<Config, String> {
        let threshold = Threshold::new(self.match_threshold, self.max_attributes)?;
        let rules = AttributeRules {
            min: self.match_threshold,
            max: self.max_attributes,
        };
        if self.token_ttl == 0 || self.token_ttl > MAX_TOKEN_TTL_SECS {
            return Err(format!(
                "COHORT_TOKEN_TTL must be between 1 and {MAX_TOKEN_TTL_SECS} seconds"
            ));
        }
        if self.request_timeout == 0 {
            return Err("COHORT_REQUEST_TIMEOUT must be at least 1 second".into());
        }
        if self.max_connections == 0 {
            return Err("COHORT_MAX_CONNECTIONS must be at least 1".into());
        }
        if self.db_pool_size == 0 {
            return Err("COHORT_DB_POOL_SIZE must be at least 1".into());
        }
        self.jwt_secret = from_file(
            "COHORT_JWT_SECRET",
            self.jwt_secret.take(),
            self.jwt_secret_file.as_deref(),
        )?;
        self.database_url = from_file(
            "DATABASE_URL",
            self.database_url.take(),
            self.database_url_file.as_deref(),
        )?;
        self.redis_url = from_file(
            "REDIS_URL",
            self.redis_url.take(),
            self.redis_url_file.as_deref(),
        )?;
        let jwt_previous_secrets = from_file(
            "COHORT_JWT_PREVIOUS_SECRETS",
            self.jwt_previous_secrets.take(),
            self.jwt_previous_secrets_file.as_deref(),
        )?
        .map(|all| {
            all.split([',', '\n'])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
        if jwt_previous_secrets
            .iter()
            .any(|s| s.len() < MIN_SECRET_BYTES)
        {
            return Err(format!(
                "each of COHORT_JWT_PREVIOUS_SECRETS must be at least {MIN_SECRET_BYTES} bytes"
            ));
        }
        let mode = match (&self.database_url, &self.redis_url) {
            (Some(db), Some(redis)) => {
                let secret = self.jwt_secret.clone().ok_or_else(|| {
                    "COHORT_JWT_SECRET is required when DATABASE_URL is set (at least 32 random bytes)".to_string()
                })?;
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(format!(
                        "COHORT_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes (got {})",
                        secret.len()
                    ));
                }
                Mode::Distributed {
                    database_url: db.clone(),
                    redis_url: redis.clone(),
                    jwt_secret: secret.into_bytes(),
                }
            }
            (None, None) => Mode::Embedded {
                data_dir: self.data_dir.clone(),
            },
            (Some(_), None) => {
                return Err("DATABASE_URL is set but REDIS_URL is not: distributed mode needs both \
                     (Postgres holds the data, Redis the shared group index); unset both for embedded mode"
                    .into())
            }
            (None, Some(_)) => {
                return Err("REDIS_URL is set but DATABASE_URL is not: distributed mode needs both \
                     (Postgres holds the data, Redis the shared group index); unset both for embedded mode"
                    .into())
            }
        };
        Ok(Config {
            settings: self,
            jwt_previous_secrets,
            mode,
            threshold,
            rules,
        })
    }
}

/// A setting given directly or as `NAME_FILE` (never both): the file's
/// content, without trailing newlines.
fn from_file(
    name: &str,
    direct: Option<String>,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, String> {
    match (direct, file) {
        (Some(_), Some(_)) => Err(format!("set {name} or {name}_FILE, not both")),
        (Some(v), None) => Ok(Some(v)),
        (None, None) => Ok(None),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {name}_FILE {}: {e}", path.display()))?;
            let value = text.trim_end_matches(['\n', '\r']).to_owned();
            if value.is_empty() {
                return Err(format!("{name}_FILE {} is empty", path.display()));
            }
            Ok(Some(value))
        }
    }
}

/// A trusted proxy: a CIDR block, or one address (a /32 or /128).
fn parse_proxy(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR block"))
}
