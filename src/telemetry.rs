//! Logs (tracing, one JSON object per line) and metrics (Prometheus).
//!
//! Metrics live in a registry per application rather than the global one,
//! so several instances in one process (the integration tests) do not mix.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, fmt};

use crate::config::LogFormat;

/// Installs the global subscriber once; later calls are ignored (tests).
/// The server logs to stdout; one-shot commands log to stderr, so that their
/// report on stdout stays clean. Log lines name the module (`target`), never
/// a source file. When `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are also
/// exported (see `crate::otel`): keep the guard until exit, it flushes them.
pub fn init_logging(format: LogFormat, to_stderr: bool) -> Result<crate::otel::Guard, String> {
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
        LogFormat::Pretty => true,
        LogFormat::Auto => {
            if to_stderr {
                std::io::stderr().is_terminal()
            } else {
                std::io::stdout().is_terminal()
            }
        }
        LogFormat::Json => false,
    };
    let mut layers: Vec<Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>> =
        Vec::with_capacity(2);
    layers.push(if pretty {
        fmt::layer()
            .with_writer(writer)
            .with_file(false)
            .with_line_number(false)
            .with_filter(filter)
            .boxed()
    } else {
        fmt::layer()
            .fmt_fields(fmt::format::JsonFields::new())
            .event_format(JsonLine)
            .with_writer(writer)
            .with_filter(filter)
            .boxed()
    });
    let mut guard = crate::otel::Guard::none();
    if crate::otel::configured() {
        let (provider, g) = crate::otel::provider()?;
        guard = g;
        // Its own filter: cohort's spans down to DEBUG (the Postgres and
        // Redis calls, the index decision), whatever RUST_LOG keeps in the
        // log. Unset, those spans are disabled where they are created.
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(crate::otel::tracer(&provider))
                .with_location(false)
                .with_context_activation(false)
                .with_filter(Targets::new().with_target("cohort", tracing::Level::DEBUG))
                .boxed(),
        );
    }
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok()
    {
        install_panic_hook();
    }
    Ok(guard)
}

/// One JSON object a line: `timestamp`, `level`, `fields`, `target` and the
/// current `span`'s fields (with its `name`), as tracing-subscriber's JSON
/// format writes them, but without the `log.file` and `log.line` fields it
/// keeps from `log` records (refinery's, deadpool's...): paths on the build
/// machine.
struct JsonLine;

impl<S, N> fmt::FormatEvent<S, N> for JsonLine
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &fmt::FmtContext<'_, S, N>,
        mut writer: fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_log::NormalizeEvent as _;
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut fields = JsonVisitor(serde_json::Map::new());
        event.record(&mut fields);
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        write!(
            writer,
            "{{\"timestamp\":{},\"level\":{},\"fields\":{},\"target\":{}",
            json(&timestamp),
            json(meta.level().as_str()),
            serde_json::Value::Object(fields.0),
            json(meta.target()),
        )?;
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            let ext = span.extensions();
            let mut map = ext
                .get::<fmt::FormattedFields<N>>()
                .and_then(|f| serde_json::from_str::<serde_json::Value>(f).ok())
                .and_then(|v| match v {
                    serde_json::Value::Object(m) => Some(m),
                    _ => None,
                })
                .unwrap_or_default();
            map.insert("name".into(), span.name().into());
            write!(writer, ",\"span\":{}", serde_json::Value::Object(map))?;
        }
        writeln!(writer, "}}")
    }
}

/// A string or number as JSON (they never fail to serialize).
fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// An event's fields as JSON, without the `log.*` ones.
struct JsonVisitor(serde_json::Map<String, serde_json::Value>);

impl JsonVisitor {
    fn put(&mut self, field: &tracing::field::Field, value: serde_json::Value) {
        if !field.name().starts_with("log.") {
            self.0.insert(field.name().to_owned(), value);
        }
    }
}

impl tracing::field::Visit for JsonVisitor {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

/// Panics go to the log as one ERROR line with their message and thread,
/// without the source location (a path on the build machine for a
/// dependency's panic) or a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let thread = std::thread::current();
        tracing::error!(
            panic = message,
            thread = thread.name().unwrap_or("unnamed"),
            "panicked"
        );
    }));
}

/// Times calls to a backend (Postgres, Redis) by operation, each in a
/// DEBUG span (exported with traces; disabled, so free, otherwise). The
/// operation is one of a fixed set of names, never built from a request.
#[derive(Clone, Default)]
pub struct CallTimer(Option<HistogramVec>);

impl CallTimer {
    pub fn new(histogram: HistogramVec) -> Self {
        Self(Some(histogram))
    }

    /// Observes the time until the guard is dropped under `operation`.
    pub fn start(&self, operation: &'static str) -> Timing<'_> {
        Timing {
            histogram: self.0.as_ref(),
            operation,
            started: std::time::Instant::now(),
        }
    }

    /// Runs `call` in `span`, observing its duration under `operation`.
    pub async fn time<T>(
        &self,
        operation: &'static str,
        span: tracing::Span,
        call: impl std::future::Future<Output = T>,
    ) -> T {
        use tracing::Instrument as _;
        let started = std::time::Instant::now();
        let out = call.instrument(span).await;
        if let Some(h) = &self.0 {
            h.with_label_values(&[operation])
                .observe(started.elapsed().as_secs_f64());
        }
        out
    }
}

/// A call being timed (see [`CallTimer::start`]).
pub struct Timing<'a> {
    histogram: Option<&'a HistogramVec>,
    operation: &'static str,
    started: std::time::Instant,
}

impl Drop for Timing<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.histogram {
            h.with_label_values(&[self.operation])
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

/// Buckets for one Postgres query or Redis call: from 100 us (a Redis
/// round trip on loopback) to 10 s (the statement timeout), about x2.5 a
/// step.
fn backend_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
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
    pub db_query_seconds: HistogramVec,
    pub redis_call_seconds: HistogramVec,
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
        let db_query_seconds = HistogramVec::new(
            HistogramOpts::new(
                "cohort_db_query_seconds",
                "Time of one Postgres operation (connection checkout included), by operation.",
            )
            .buckets(backend_buckets()),
            &["operation"],
        )
        .unwrap();
        let redis_call_seconds = HistogramVec::new(
            HistogramOpts::new(
                "cohort_redis_call_seconds",
                "Time of one Redis call (a command, script or pipeline), by operation.",
            )
            .buckets(backend_buckets()),
            &["operation"],
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
            Box::new(db_query_seconds.clone()),
            Box::new(redis_call_seconds.clone()),
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
            db_query_seconds,
            redis_call_seconds,
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
