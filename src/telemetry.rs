//! Logs (tracing, one JSON object per line) and metrics (Prometheus).
//!
//! Metrics live in a registry per application rather than the global one,
//! so several instances in one process (the integration tests) do not mix.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber once; later calls are ignored (tests).
/// The server logs to stdout; one-shot commands log to stderr, so that their
/// report on stdout stays clean.
pub fn init_logging(format: &str, to_stderr: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = move || -> Box<dyn std::io::Write> {
        if to_stderr {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::stdout())
        }
    };
    use std::io::IsTerminal;
    // `auto`: readable for a person at a terminal, JSON for a log pipeline.
    let pretty = match format {
        "pretty" => true,
        "auto" => {
            if to_stderr {
                std::io::stderr().is_terminal()
            } else {
                std::io::stdout().is_terminal()
            }
        }
        _ => false,
    };
    let result = if pretty {
        fmt().with_env_filter(filter).with_writer(writer).try_init()
    } else {
        fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(writer)
            .try_init()
    };
    let _ = result;
}

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub signups: IntCounterVec,
    pub assign_seconds: Histogram,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub groups: IntGauge,
    pub users: IntGauge,
    pub index_ready: IntGauge,
    pub index_rebuilds: IntCounter,
    pub decisions: IntCounterVec,
    pub ready: IntGauge,
    pub password_hash_seconds: Histogram,
    pub db_pool_size: IntGauge,
    pub db_pool_available: IntGauge,
    pub db_pool_waiting: IntGauge,
    pub group_sizes: GroupSizeMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let signups = IntCounterVec::new(
            Opts::new(
                "cohort_signups_total",
                "Completed signups by outcome (joined or founded).",
            ),
            &["outcome"],
        )
        .unwrap();
        let assign_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cohort_group_assign_seconds",
                "Time of the best-group-or-create step of a signup.",
            )
            // From 1 us (the in-process index assigns in ~2 us) to ~1 s
            // (a Redis or Postgres decision under trouble), x2.5 a step.
            .buckets(prometheus::exponential_buckets(1e-6, 2.5, 16).expect("valid buckets")),
        )
        .unwrap();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "cohort_http_requests_total",
                "HTTP requests by method, route pattern and status.",
            ),
            &["method", "route", "status"],
        )
        .unwrap();
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "cohort_http_request_duration_seconds",
                "HTTP request duration by method and route pattern.",
            )
            // Reads answer in a fraction of a millisecond; signups take an
            // argon2 hash (tens of ms); 10 s is the request deadline.
            .buckets(vec![
                0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0,
            ]),
            &["method", "route"],
        )
        .unwrap();
        let groups =
            IntGauge::new("cohort_groups", "Groups, as this replica last saw them.").unwrap();
        let users = IntGauge::new("cohort_users", "Users, as this replica last saw them.").unwrap();
        let ready = IntGauge::new(
            "cohort_ready",
            "1 when this replica can serve every endpoint (its database is reachable), as /readyz says.",
        )
        .unwrap();
        let index_ready = IntGauge::new(
            "cohort_index_ready",
            "1 when this replica trusts the shared group index and decides signups in it; 0 while \
             signups are decided from the database (index missing, rebuilding or unreachable).",
        )
        .unwrap();
        let index_rebuilds = IntCounter::new(
            "cohort_index_rebuilds_total",
            "Index rebuilds completed by this replica.",
        )
        .unwrap();
        let decisions = IntCounterVec::new(
            Opts::new(
                "cohort_signup_decisions_total",
                "Signup placement decisions, by where they were made: the shared index, or the \
                 database's subset table (exact, slower) when the index is not trusted.",
            ),
            &["source"],
        )
        .unwrap();
        let password_hash_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cohort_password_hash_seconds",
                "Time of one argon2id hash or verification.",
            )
            .buckets(vec![0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]),
        )
        .unwrap();
        let db_pool_size =
            IntGauge::new("cohort_db_pool_size", "Database connections open.").unwrap();
        let db_pool_available =
            IntGauge::new("cohort_db_pool_available", "Database connections idle.").unwrap();
        let db_pool_waiting = IntGauge::new(
            "cohort_db_pool_waiting",
            "Requests waiting for a database connection.",
        )
        .unwrap();
        let build_info = IntGaugeVec::new(
            Opts::new("cohort_build_info", "Build information; always 1."),
            &["version", "commit"],
        )
        .unwrap();
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("COHORT_GIT_COMMIT")])
            .set(1);
        for c in [
            Box::new(signups.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(assign_seconds.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_duration.clone()),
            Box::new(groups.clone()),
            Box::new(users.clone()),
            Box::new(index_ready.clone()),
            Box::new(index_rebuilds.clone()),
            Box::new(decisions.clone()),
            Box::new(ready.clone()),
            Box::new(password_hash_seconds.clone()),
            Box::new(db_pool_size.clone()),
            Box::new(db_pool_available.clone()),
            Box::new(db_pool_waiting.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // process_cpu_seconds_total, process_resident_memory_bytes, open
        // file descriptors...: what operators read from /proc by hand.
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics register once per registry");
        // Both outcomes exist from the start, so rate() works before the
        // first founding.
        signups.with_label_values(&["joined"]);
        signups.with_label_values(&["founded"]);
        let group_sizes = GroupSizeMetrics::register(&registry);
        Self {
            registry,
            signups,
            assign_seconds,
            http_requests,
            http_duration,
            groups,
            users,
            index_ready,
            index_rebuilds,
            decisions,
            ready,
            password_hash_seconds,
            db_pool_size,
            db_pool_available,
            db_pool_waiting,
            group_sizes,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

/// The distribution of group sizes, as gauges refreshed every
/// `GROUP_SIZES_EVERY` by the replica's background refresher from one
/// aggregate query over the member counters (never on a scrape).
/// `cohort_group_size_groups{le}` is cumulative like a histogram's buckets,
/// so `histogram_quantile` reads percentiles from it.
#[derive(Clone)]
pub struct GroupSizeMetrics {
    pub groups_le: IntGaugeVec,
    pub singletons: IntGauge,
    pub max: IntGauge,
    pub refreshed: prometheus::Gauge,
}

impl GroupSizeMetrics {
    fn register(registry: &Registry) -> Self {
        let groups_le = IntGaugeVec::new(
            Opts::new(
                "cohort_group_size_groups",
                "Groups with at most `le` members (cumulative, power-of-two bounds), as of the \
                 last refresh (every minute, from the member counters).",
            ),
            &["le"],
        )
        .unwrap();
        let singletons = IntGauge::new(
            "cohort_singleton_groups",
            "Groups of exactly one member, as of the last refresh.",
        )
        .unwrap();
        let max = IntGauge::new(
            "cohort_group_size_max",
            "Members of the largest group, as of the last refresh.",
        )
        .unwrap();
        let refreshed = prometheus::Gauge::new(
            "cohort_group_sizes_refreshed_timestamp_seconds",
            "When the group-size gauges were last refreshed (Unix time; 0: never).",
        )
        .unwrap();
        for c in [
            Box::new(groups_le.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(singletons.clone()),
            Box::new(max.clone()),
            Box::new(refreshed.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            groups_le,
            singletons,
            max,
            refreshed,
        }
    }

    /// Sets every gauge from `d` (all the bounds, so the series set never
    /// changes).
    pub fn set(&self, d: &crate::stats::SizeDistribution) {
        for b in d.buckets(true) {
            let le = b.le.map_or_else(|| "+Inf".to_owned(), |le| le.to_string());
            self.groups_le
                .with_label_values(&[le.as_str()])
                .set(b.cumulative as i64);
        }
        self.singletons.set(d.with_size(1) as i64);
        self.max.set(d.max() as i64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |t| t.as_secs_f64());
        self.refreshed.set(now);
    }
}
