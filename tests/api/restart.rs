//! The embedded mode keeps its data: the real binary, stopped by SIGTERM
//! and by SIGKILL, started again on the same data directory.

use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

use crate::helpers::*;

struct Proc {
    child: Child,
    base: String,
}

fn start(dir: &std::path::Path) -> Proc {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("COHORT_DATA_DIR", dir)
        .env("COHORT_LISTEN", format!("127.0.0.1:{port}"))
        .env("COHORT_WORKERS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    Proc {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

fn signal(p: &mut Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = p.child.wait().unwrap();
    if sig == "-TERM" {
        assert!(status.success(), "graceful stop exits 0, got {status:?}");
    }
}

async fn signup(http: &reqwest::Client, base: &str, name: &str, attrs: &[&str]) -> Value {
    let res = http
        .post(format!("{base}/v1/signup"))
        .json(&json!({"username": name, "password": PASSWORD, "attributes": attrs}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 201);
    res.json().await.unwrap()
}

async fn token(http: &reqwest::Client, base: &str, name: &str) -> String {
    let res = http
        .post(format!("{base}/v1/signin"))
        .json(&json!({"username": name, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200, "{name} cannot sign in");
    let b: Value = res.json().await.unwrap();
    b["access_token"].as_str().unwrap().to_owned()
}

async fn group_of(http: &reqwest::Client, base: &str, token: &str) -> i64 {
    let b: Value = http
        .get(format!("{base}/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    b["group_id"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_data_survives_sigterm_and_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();

    let mut p = start(dir.path());
    let a = signup(&http, &p.base, "ann", &["a", "b", "c", "d"]).await;
    let b = signup(&http, &p.base, "ben", &["x", "y", "z"]).await;
    let old_token = token(&http, &p.base, "ann").await;
    // A second process on the same data directory is refused.
    let second = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .env_clear()
        .env("COHORT_DATA_DIR", dir.path())
        .env("COHORT_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another cohort process"));
    signal(&mut p, "-TERM");

    let mut p = start(dir.path());
    // Tokens survive restarts: the secret is kept in the data directory.
    assert_eq!(
        group_of(&http, &p.base, &old_token).await,
        a["group"]["id"].as_i64().unwrap()
    );
    let t = token(&http, &p.base, "ben").await;
    assert_eq!(
        group_of(&http, &p.base, &t).await,
        b["group"]["id"].as_i64().unwrap()
    );
    // New signups group against the old groups.
    let c = signup(&http, &p.base, "cat", &["a", "b", "c", "q"]).await;
    assert_eq!(c["group"]["id"], a["group"]["id"]);
    signal(&mut p, "-KILL");

    let p = start(dir.path());
    let t = token(&http, &p.base, "cat").await;
    assert_eq!(
        group_of(&http, &p.base, &t).await,
        a["group"]["id"].as_i64().unwrap()
    );
    let d = signup(&http, &p.base, "dan", &["x", "y", "z", "w"]).await;
    assert_eq!(d["group"]["id"], b["group"]["id"]);
    let e = signup(&http, &p.base, "eve", &["new", "group", "here"]).await;
    assert_eq!(e["group"]["created"], true);
    assert!(e["group"]["id"].as_i64().unwrap() > b["group"]["id"].as_i64().unwrap());
    let mut p = p;
    signal(&mut p, "-TERM");
    let secret = dir.path().join("jwt-secret");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_tokens_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out.log");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .env_clear()
        .env("COHORT_DATA_DIR", dir.path().join("data"))
        .env("COHORT_LISTEN", format!("127.0.0.1:{port}"))
        .env("COHORT_WORKERS", "1")
        .env("RUST_LOG", "debug")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    let mut p = Proc {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let base = p.base.clone();
    let http = reqwest::Client::new();
    let canary = "canary-password-7f3a9c";
    let res = http
        .post(format!("{base}/v1/signup"))
        .json(&json!({"username": "canary", "password": canary, "attributes": ["a", "b", "c"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 201);
    let res = http
        .post(format!("{base}/v1/signin"))
        .json(&json!({"username": "canary", "password": canary}))
        .send()
        .await
        .unwrap();
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let token = res.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let me = http
        .get(format!("{base}/v1/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status().as_u16(), 200);
    // A caller's own request id is honoured; a client error is logged once,
    // at INFO, in the access-log line.
    let res = http
        .get(format!("{base}/v1/me"))
        .header("x-request-id", "client-chosen-id-123")
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401);
    assert_eq!(res.headers()["x-request-id"], "client-chosen-id-123");
    // An oversized one is not.
    let res = http
        .get(format!("{base}/healthz"))
        .header("x-request-id", "a".repeat(300))
        .send()
        .await
        .unwrap();
    assert_ne!(res.headers()["x-request-id"], "a".repeat(300).as_str());
    signal(&mut p, "-TERM");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(canary), "the password was logged");
    assert!(!text.contains(&token), "the token was logged");
    let secret = std::fs::read_to_string(dir.path().join("data/jwt-secret")).unwrap();
    assert!(!text.contains(secret.trim()), "the JWT secret was logged");
    // Logs are JSON lines carrying the request id the client saw.
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok())
    );
    assert!(text.contains(&request_id));
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &Value| l["span"]["request_id"] == "client-chosen-id-123")
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let access = &lines[0];
    assert_eq!(access["level"], "INFO", "{access}");
    assert_eq!(access["fields"]["status"], 401, "{access}");
    assert_eq!(access["fields"]["route"], "/v1/me", "{access}");
    assert!(
        access["fields"]["duration_ms"].as_f64().is_some(),
        "{access}"
    );
    assert!(
        !text.contains("\"level\":\"WARN\""),
        "a client error was logged at WARN"
    );
}
