//! Traces exported over OTLP to a collector in the test, metrics of the
//! backends, log lines without source paths, and the command line's
//! completions, exit codes and `verify --json`.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::helpers::*;

/// A span as the collector received it, with its resource's service name.
struct Received {
    service: String,
    span: Span,
}

/// An OTLP/HTTP (protobuf) trace receiver on a free loopback port.
struct Collector {
    port: u16,
    spans: mpsc::UnboundedReceiver<Received>,
    handle: actix_web::dev::ServerHandle,
}

async fn receive(body: web::Bytes, tx: web::Data<mpsc::UnboundedSender<Received>>) -> HttpResponse {
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    for rs in req.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                let _ = tx.send(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse: all accepted.
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .body(Vec::new())
}

impl Collector {
    fn start() -> Self {
        let (tx, spans) = mpsc::unbounded_channel();
        let tx = web::Data::new(tx);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(tx.clone())
                .app_data(web::PayloadConfig::new(16 << 20))
                .route("/v1/traces", web::post().to(receive))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            port,
            spans,
            handle,
        }
    }

    /// Receives spans until `done` says it has what it waits for, at most
    /// `secs` seconds; returns every span received.
    async fn collect(&mut self, secs: u64, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut all = Vec::new();
        while !done(&all) {
            match tokio::time::timeout_at(deadline, self.spans.recv()).await {
                Ok(Some(r)) => all.push(r),
                _ => break,
            }
        }
        all
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            AnyValue::BoolValue(b) => Some(b.to_string()),
            _ => None,
        })
}

/// The real binary, stopped (SIGTERM, then waited for) when dropped.
struct Proc {
    child: Child,
    base: String,
}

impl Proc {
    fn start(envs: &[(&str, String)], stdout: Stdio) -> Self {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("COHORT_LISTEN", format!("127.0.0.1:{port}"))
            .env("COHORT_WORKERS", "1")
            .env("COHORT_HASH_CONCURRENCY", "2")
            .stdout(stdout)
            .stderr(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        wait_for_port(port);
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Stops it gracefully; returns what it wrote to stdout (if piped).
    fn stop(mut self) -> String {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let mut out = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            s.read_to_string(&mut out).unwrap();
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "graceful stop exits 0, got {status:?}");
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn distributed_env(db: &TestDb, prefix: &TestPrefix) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url.clone()),
        ("REDIS_URL", prefix.url.clone()),
        ("COHORT_REDIS_PREFIX", prefix.prefix.clone()),
        (
            "COHORT_JWT_SECRET",
            "test secret that is at least 32 bytes long".into(),
        ),
    ]
}

fn signup_body(username: &str, attributes: &[&str]) -> Value {
    json!({"username": username, "password": PASSWORD, "attributes": attributes})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_the_otlp_collector_under_the_callers_trace() {
    let mut collector = Collector::start();
    let db = TestDb::create().await;
    let prefix = TestPrefix::new(&redis_url());
    let mut envs = distributed_env(&db, &prefix);
    envs.push((
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        format!("http://127.0.0.1:{}", collector.port),
    ));
    envs.push(("OTEL_BSP_SCHEDULE_DELAY", "50".into()));
    let proc = Proc::start(&envs, Stdio::null());
    let http = reqwest::Client::new();

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let res = http
        .post(format!("{}/v1/signup", proc.base))
        .header("traceparent", format!("00-{trace}-{caller}-01"))
        .json(&signup_body("ann", &["a", "b", "c"]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 201);

    let wanted = |all: &[Received]| {
        let mine = || all.iter().filter(|r| hex(&r.span.trace_id) == trace);
        mine().any(|r| r.span.name == "POST /v1/signup")
            && mine().any(|r| r.span.name == "index.decide")
            && mine().any(|r| r.span.name == "pg.commit_signup")
    };
    let all = collector.collect(30, wanted).await;
    let mine: Vec<&Span> = all
        .iter()
        .filter(|r| hex(&r.span.trace_id) == trace)
        .map(|r| &r.span)
        .collect();
    let names: Vec<&str> = mine.iter().map(|s| s.name.as_str()).collect();
    let every: Vec<String> = all
        .iter()
        .map(|r| {
            format!(
                "{} trace={} parent={} {:?}",
                r.span.name,
                hex(&r.span.trace_id),
                hex(&r.span.parent_span_id),
                r.span
                    .attributes
                    .iter()
                    .map(|kv| kv.key.as_str())
                    .collect::<Vec<_>>()
            )
        })
        .collect();
    assert!(
        wanted(&all),
        "spans of the trace: {names:?}; all spans: {every:#?}"
    );
    assert!(all.iter().all(|r| r.service == "cohort"));

    // The request's span is the caller's child, a server span.
    let request = mine.iter().find(|s| s.name == "POST /v1/signup").unwrap();
    assert_eq!(hex(&request.parent_span_id), caller);
    assert_eq!(request.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr(request, "status").as_deref(), Some("201"));
    assert_eq!(attr(request, "route").as_deref(), Some("/v1/signup"));
    // The decision and the commit are its children; the decision's database
    // call is the decision's.
    let decide = mine.iter().find(|s| s.name == "index.decide").unwrap();
    assert_eq!(decide.parent_span_id, request.span_id);
    assert_eq!(attr(decide, "operation").as_deref(), Some("decide"));
    assert!(attr(decide, "source").is_some());
    let commit = mine.iter().find(|s| s.name == "pg.commit_signup").unwrap();
    assert_eq!(commit.parent_span_id, request.span_id);
    assert_eq!(commit.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(attr(commit, "operation").as_deref(), Some("commit_signup"));
    assert_eq!(
        attr(commit, "db.system.name").as_deref(),
        Some("postgresql")
    );
    let decision_calls: Vec<&str> = mine
        .iter()
        .filter(|s| s.parent_span_id == decide.span_id)
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        decision_calls
            .iter()
            .any(|n| *n == "pg.best_group" || *n == "redis.decide"),
        "the decision's calls: {decision_calls:?}"
    );

    // Without a traceparent, a request begins a trace of its own.
    let res = http
        .get(format!("{}/healthz", proc.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let all = collector
        .collect(30, |all| all.iter().any(|r| r.span.name == "GET /healthz"))
        .await;
    let health = all
        .iter()
        .find(|r| r.span.name == "GET /healthz")
        .expect("the health check's span");
    assert_ne!(hex(&health.span.trace_id), trace);
    assert!(health.span.parent_span_id.is_empty());
    proc.stop();
    collector.handle.stop(false).await;
}

#[test]
fn an_unsupported_otlp_protocol_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .env_clear()
        .env("COHORT_DATA_DIR", dir.path())
        .env("COHORT_LISTEN", "127.0.0.1:0")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http/protobuf"), "{err}");
}

/// A log has no source file paths: neither `file`/`line` fields nor the
/// build machine's directories, also not for a panic.
fn assert_no_source_paths(log: &str) {
    for needle in [".rs", env!("CARGO_MANIFEST_DIR"), "/.cargo/", "\"file\""] {
        assert!(!log.contains(needle), "{needle:?} in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_carry_no_source_paths() {
    let http = reqwest::Client::new();
    for format in ["json", "pretty"] {
        let dir = tempfile::tempdir().unwrap();
        let envs = [
            ("COHORT_DATA_DIR", dir.path().display().to_string()),
            ("COHORT_LOG_FORMAT", format.to_string()),
            ("RUST_LOG", "debug".to_string()),
            ("COHORT_FAILPOINTS", "signup:decided=panic".to_string()),
        ];
        let proc = Proc::start(&envs, Stdio::piped());
        let res = http
            .post(format!("{}/v1/signup", proc.base))
            .json(&signup_body("ann", &["a", "b", "c"]))
            .send()
            .await;
        // The handler panicked: the connection is dropped, or a 500.
        assert!(res.is_err() || res.unwrap().status().as_u16() == 500);
        assert_eq!(
            http.get(format!("{}/nothing-here", proc.base))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            404
        );
        let log = proc.stop();
        assert!(log.contains("panicked"), "no panic line ({format}):\n{log}");
        assert!(log.contains("failpoint signup:decided reached"), "{log}");
        assert!(log.contains("/nothing-here") || log.contains("unmatched"));
        assert_no_source_paths(&log);
        if format == "json" {
            for line in log.lines() {
                let v: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(v.get("file").is_none() && v.get("line_number").is_none());
            }
        }
    }
}

#[test]
fn log_format_is_checked_by_the_parser() {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .env_clear()
        .env("COHORT_LOG_FORMAT", "xml")
        .arg("migrate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("xml") && err.contains("pretty"), "{err}");
}

#[test]
fn every_command_documents_its_exit_codes_and_completions_are_printed() {
    let commands: [&[&str]; 9] = [
        &[],
        &["serve"],
        &["migrate"],
        &["reindex"],
        &["verify"],
        &["set-threshold"],
        &["import"],
        &["stats"],
        &["completions"],
    ];
    for cmd in commands {
        let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
            .env_clear()
            .args(cmd)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Exit codes:") && help.contains("  0  "),
            "{cmd:?} --help:\n{help}"
        );
    }
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef cohort"),
        ("fish", "complete -c cohort"),
        ("elvish", "edit:completion:arg-completer[cohort]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
            .env_clear()
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}:\n{script}");
        assert!(script.contains("set-threshold"), "{shell}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn verify_json(envs: &[(&str, String)]) -> (Option<i32>, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .env_clear()
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .args(["verify", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"));
    (out.status.code(), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_in_json() {
    let db = TestDb::create().await;
    let prefix = TestPrefix::new(&redis_url());
    let envs = distributed_env(&db, &prefix);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
            .env_clear()
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["migrate"]);
    // No index yet under this prefix: they differ.
    let (code, report) = verify_json(&envs);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["result"], "differ");
    assert_eq!(report["problems"][0], "the index is missing");
    run(&["reindex"]);
    let (code, report) = verify_json(&envs);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["result"], "agree");
    assert_eq!(report["mode"], "distributed");
    assert!(report["groups_checked"].is_u64());
    assert_eq!(report["problems"], json!([]));
    // Redis out of reach: could not run, still one JSON object.
    let mut down = envs.clone();
    down.retain(|(k, _)| *k != "REDIS_URL");
    down.push(("REDIS_URL", format!("redis://127.0.0.1:{}", free_port())));
    let (code, report) = verify_json(&down);
    assert_eq!(code, Some(2), "{report}");
    assert_eq!(report["result"], "error");
    assert!(report["error"].as_str().is_some_and(|e| !e.is_empty()));
    // Embedded: nothing to verify.
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = verify_json(&[("COHORT_DATA_DIR", dir.path().display().to_string())]);
    assert_eq!(code, Some(0));
    assert_eq!(report["mode"], "embedded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_latencies_are_measured_by_operation() {
    let app = spawn_app(Mode::Distributed).await;
    app.signup_ok("ann", &["a", "b", "c"]).await;
    app.signup_ok("ben", &["a", "b", "c", "d"]).await;
    let token = app.token("ben").await;
    assert_eq!(
        app.get_auth("/v1/me/group", &token).await.status().as_u16(),
        200
    );
    let text = app.get("/metrics").await.text().await.unwrap();
    for series in [
        "cohort_db_query_seconds_bucket{operation=\"commit_signup\",le=\"0.0001\"}",
        "cohort_db_query_seconds_count{operation=\"credentials\"}",
        "cohort_db_query_seconds_count{operation=\"group_page\"}",
        "cohort_redis_call_seconds_bucket{operation=\"ratelimit_hit\",le=\"10\"}",
    ] {
        assert!(text.contains(series), "{series} missing from /metrics");
    }
    // Only fixed operation names: none made of a request's data.
    for line in text.lines().filter(|l| {
        l.starts_with("cohort_db_query_seconds") || l.starts_with("cohort_redis_call_seconds")
    }) {
        assert!(!line.contains("ann") && !line.contains("ben"), "{line}");
    }
    let started = Instant::now();
    // The index keeper reads the index's meta hash every second: a Redis
    // call of the index itself shows up soon.
    assert!(
        eventually(10, || async {
            app.get("/metrics")
                .await
                .text()
                .await
                .unwrap()
                .contains("cohort_redis_call_seconds_count{operation=\"meta\"}")
        })
        .await,
        "no index call timed after {:?}",
        started.elapsed()
    );
}
