use serde_json::Value;

use crate::both_modes;
use crate::helpers::*;

both_modes!(health_readiness_and_openapi, |app: TestApp| async move {
    assert_eq!(app.get("/healthz").await.status().as_u16(), 200);
    let docs = app.get("/docs").await;
    assert_eq!(docs.status().as_u16(), 200);
    assert!(
        docs.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = docs.text().await.unwrap();
    assert!(page.contains("/openapi.json") && !page.contains("https://"));
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status().as_u16(), 200);
    let spec: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/v1/signup",
        "/v1/signin",
        "/v1/me",
        "/v1/me/group",
        "/healthz",
        "/readyz",
    ] {
        assert!(spec["paths"].get(p).is_some(), "{p} missing from the spec");
    }
});

both_modes!(
    errors_are_problems_and_headers_are_set,
    |app: TestApp| async move {
        let res = app.get("/no/such/path").await;
        for h in [
            "x-request-id",
            "cache-control",
            "x-content-type-options",
            "content-security-policy",
        ] {
            assert!(res.headers().get(h).is_some(), "missing {h}");
        }
        assert_eq!(res.headers()["cache-control"], "no-store");
        assert_problem(res, 404).await;
        let res = app.http.get(app.url("/v1/signup")).send().await.unwrap();
        assert_eq!(res.headers()["allow"], "POST");
        assert_problem(res, 405).await;
        let res = app.http.post(app.url("/v1/me")).send().await.unwrap();
        assert_eq!(res.headers()["allow"], "GET, HEAD, DELETE");
        assert_problem(res, 405).await;
    }
);

both_modes!(metrics_use_route_patterns, |app: TestApp| async move {
    app.signup_ok("ann", &["a", "b", "c"]).await;
    app.signup_ok("ben", &["a", "b", "c", "d"]).await;
    for i in 0..50 {
        app.get(&format!("/scan/{i}")).await;
    }
    let text = app.get("/metrics").await.text().await.unwrap();
    for name in [
        "cohort_signups_total{outcome=\"founded\"} 1",
        "cohort_signups_total{outcome=\"joined\"} 1",
        "cohort_group_assign_seconds_bucket",
        "cohort_http_requests_total",
        "cohort_http_request_duration_seconds_bucket",
        "cohort_groups",
        "cohort_users",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert!(text.contains("route=\"/v1/signup\""));
    assert!(!text.contains("/scan/"), "raw paths leaked into labels");
    assert!(text.contains("route=\"unmatched\""));
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_their_own_listener() {
    let backing = Backing::new(Mode::Embedded).await;
    let app = spawn_with(backing, |s| {
        s.metrics_listen = Some("127.0.0.1:0".parse().unwrap())
    })
    .await;
    assert_problem(app.get("/metrics").await, 404).await;
    let port = app.metrics_port.unwrap();
    let text = app
        .http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("cohort_build_info"));
    // The commit it was built from, and the process's own metrics.
    assert!(
        text.contains(&format!("commit=\"{}\"", env!("COHORT_GIT_COMMIT"))),
        "{text}"
    );
    for m in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(text.contains(m), "no {m} in /metrics");
    }
}

#[test]
fn help_never_prints_secrets_from_the_environment() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["serve", "--help"])
        .env("COHORT_JWT_SECRET", "canary-secret-canary-secret-canary")
        .env("DATABASE_URL", "postgres://u:canary-password@h/db")
        .env("REDIS_URL", "redis://:canary-redis@h")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("COHORT_JWT_SECRET"));
    assert!(!text.contains("canary"), "{text}");
}

#[test]
fn refuses_half_distributed_configuration() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["serve"])
        .env_remove("REDIS_URL")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1/none")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("REDIS_URL is not"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["serve"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1/none")
        .env("REDIS_URL", "redis://127.0.0.1")
        .env("COHORT_JWT_SECRET", "short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32 bytes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_can_come_from_files() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{text}\n")).unwrap();
        p
    };
    let secret = write("jwt", "a file secret that is at least 32 bytes long");
    let database = write("db", &db.url);
    let redis = write("redis", &redis_url());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["migrate"])
        .env_clear()
        .env("COHORT_JWT_SECRET_FILE", &secret)
        .env("DATABASE_URL_FILE", &database)
        .env("REDIS_URL_FILE", &redis)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .await
        .unwrap()
        .get(0);
    assert!(applied >= 3);
    // Both forms at once is a mistake, said as such.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["migrate"])
        .env_clear()
        .env("DATABASE_URL_FILE", &database)
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", redis_url())
        .env("COHORT_JWT_SECRET_FILE", &secret)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not both"));
}
