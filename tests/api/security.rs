//! Issue 9's threats, each tried against a running app: TLS to both
//! backends, slow-body clients, spoofed client addresses, common passwords,
//! secret rotation, and an embedded data directory others can touch.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::both_modes;
use crate::cluster::PrivatePostgres;
use crate::helpers::*;

/// A test CA and a server certificate for localhost / 127.0.0.1 signed by
/// it, as PEM: (ca cert, server cert, server key).
fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "cohort test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_and_redis_verified_against_the_ca() {
    let (ca, cert, key) = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    std::fs::write(dir.path().join("redis.crt"), &cert).unwrap();
    std::fs::write(dir.path().join("redis.key"), &key).unwrap();
    // Both servers refuse plain connections.
    let pg = PrivatePostgres::start_tls(&cert, &key);
    let redis =
        PrivateRedis::start_tls(&dir.path().join("redis.crt"), &dir.path().join("redis.key"));
    let db_url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url("postgres"),
        ca_file.display()
    );
    let redis_url = format!("rediss://127.0.0.1:{}", redis.port);
    let prefix = TestPrefix::new(&redis_url);

    let app = spawn_with(
        Backing::Embedded {
            dir: std::sync::Arc::new(tempfile::tempdir().unwrap()),
        },
        |s| {
            s.database_url = Some(db_url.clone());
            s.redis_url = Some(redis_url.clone());
            s.redis_prefix = prefix.prefix.clone();
            s.tls_ca_file = Some(ca_file.clone());
            s.jwt_secret = settings().jwt_secret;
        },
    )
    .await;
    let first = app.signup_ok("tls1", &["a", "b", "c", "d"]).await;
    let second = app.signup_ok("tls2", &["a", "b", "c", "e"]).await;
    assert_eq!(second["group"]["id"], first["group"]["id"]);
    // The index in Redis (over TLS) is used once the keeper has checked it.
    assert!(
        eventually(15, || async {
            app.get("/readyz").await.json::<Value>().await.unwrap()["index"] == "ready"
        })
        .await,
        "the index over TLS never became ready"
    );
    let token = app.token("tls2").await;
    assert_eq!(app.get_auth("/v1/me/group", &token).await.status(), 200);

    // Without the CA, verify-full refuses the server: a clear start-up error.
    let mut s = settings();
    s.database_url = Some(format!("{}?sslmode=verify-full", pg.url("postgres")));
    s.redis_url = Some(redis_url.clone());
    s.redis_prefix = prefix.prefix.clone();
    s.tls_ca_file = Some(dir.path().join("nonexistent.pem"));
    let err = match cohort::startup::Application::build(s.validate().unwrap(), true).await {
        Ok(_) => panic!("started without being able to verify Postgres's certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("CA file") || err.contains("certificate"),
        "{err}"
    );

    // sslmode=require encrypts without checking (as libpq does).
    let require = format!("{}?sslmode=require", pg.url("postgres"));
    let store = cohort::store::postgres::PgStore::connect(
        &require,
        1,
        cohort::domain::Threshold::new(3, 16).unwrap(),
    )
    .unwrap();
    use cohort::store::Store;
    assert!(store.counts().await.is_ok());
}

/// Opens a connection, sends a signup's headers, then `sent` body bytes of
/// the promised 64, and nothing more.
async fn slow_body(app: &TestApp, sent: usize) -> TcpStream {
    let addr = app.address.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/signup HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&b"{".repeat(sent)).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_cut_off_at_the_deadline_while_health_stays_fast() {
    let backing = Backing::new(Mode::Embedded).await;
    let app = spawn_with(backing, |s| {
        s.request_timeout = 2;
        s.workers = Some(2);
    })
    .await;
    // Many slow clients at once, each stalled mid-body.
    let started = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..50 {
        conns.push(slow_body(&app, 1).await);
    }
    // The service answers others meanwhile.
    let t = Instant::now();
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "healthz took {:?}",
        t.elapsed()
    );
    // Each slow client gets 408 and a closed connection, within the deadline
    // (2 s) and some slack; never left open.
    for mut c in conns {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf))
            .await
            .expect("the server never closed a slow connection")
            .unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("application/problem+json"), "{text}");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "cut off after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_nothing_after_connecting_is_cut_off() {
    let app = spawn_with(Backing::new(Mode::Embedded).await, |s| {
        s.request_timeout = 1
    })
    .await;
    let addr = app.address.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("a client that never finished its headers was kept open")
        .unwrap();
}

/// Wrong guesses from `xff` (as sent by a proxy at 127.0.0.1).
async fn guess(app: &TestApp, user: &str, password: &str, xff: &str) -> u16 {
    app.http
        .post(app.url("/v1/signin"))
        .header("x-forwarded-for", xff)
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

both_modes!(
    behind_a_trusted_proxy_the_owner_gets_in_while_an_attacker_is_throttled,
    |app: TestApp| async move {
        // This app does not trust 127.0.0.1 as a proxy: start one that does.
        let backing = app.backing.clone();
        app.stop().await;
        let app = spawn_with(backing, |s| {
            s.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        })
        .await;
        app.signup_ok("alice", &["a", "b", "c"]).await;
        let mut statuses = Vec::new();
        for _ in 0..8 {
            statuses.push(guess(&app, "alice", "not the password at all", "203.0.113.66").await);
        }
        assert_eq!(&statuses[..5], &[401; 5]);
        assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
        // The owner, from another address behind the same proxy.
        assert_eq!(guess(&app, "alice", PASSWORD, "198.51.100.7").await, 200);
    }
);

both_modes!(
    without_trusted_proxies_a_forged_forwarded_for_changes_nothing,
    |app: TestApp| async move {
        app.signup_ok("alice", &["a", "b", "c"]).await;
        // Each guess claims another address: all count as this peer's.
        let mut statuses = Vec::new();
        for i in 0..8 {
            statuses.push(
                guess(
                    &app,
                    "alice",
                    "not the password at all",
                    &format!("10.0.0.{i}"),
                )
                .await,
            );
        }
        assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    }
);

both_modes!(
    common_passwords_are_refused_at_signup_and_change,
    |app: TestApp| async move {
        for weak in ["aaaaaaaaaaaaaaa", "123456789012345", "passwordpassword"] {
            let res = app
                .post_json(
                    "/v1/signup",
                    &json!({"username": "weak", "password": weak, "attributes": ["a", "b", "c"]}),
                )
                .await;
            let body = assert_problem(res, 422).await;
            assert_eq!(body["errors"][0]["field"], "password", "{body}");
            assert!(
                body["errors"][0]["message"]
                    .as_str()
                    .unwrap()
                    .contains("common")
            );
        }
        // Nothing was created.
        assert_problem(app.signin("weak", "aaaaaaaaaaaaaaa").await, 401).await;
        app.signup_ok("alice", &["a", "b", "c"]).await;
        let token = app.token("alice").await;
        let res = app
            .http
            .put(app.url("/v1/me/password"))
            .bearer_auth(&token)
            .json(&json!({"current_password": PASSWORD, "new_password": "passwordpassword"}))
            .send()
            .await
            .unwrap();
        let body = assert_problem(res, 422).await;
        assert_eq!(body["errors"][0]["field"], "new_password");
        assert_eq!(app.signin("alice", PASSWORD).await.status(), 200);
    }
);

both_modes!(
    a_rotated_secret_verifies_old_tokens_until_removed,
    |app: TestApp| async move {
        app.signup_ok("alice", &["a", "b", "c"]).await;
        let old_token = app.token("alice").await;
        let backing = app.backing.clone();
        // The secret that signed it: configured, or generated by the
        // embedded mode into its data directory.
        let old_secret = match &backing {
            Backing::Embedded { dir } => std::fs::read_to_string(dir.path().join("jwt-secret"))
                .unwrap()
                .trim()
                .to_owned(),
            Backing::Distributed { .. } => settings().jwt_secret.unwrap(),
        };
        let new_secret = "the next secret, also at least 32 bytes".to_string();
        app.stop().await;
        // Rotated: a new signing secret, the old one still verifying.
        let rotated = spawn_with(backing.clone(), |s| {
            s.jwt_secret = Some(new_secret.clone());
            s.jwt_previous_secrets = Some(old_secret.clone());
        })
        .await;
        assert_eq!(rotated.get_auth("/v1/me", &old_token).await.status(), 200);
        let new_token = rotated.token("alice").await;
        assert_eq!(rotated.get_auth("/v1/me", &new_token).await.status(), 200);
        rotated.stop().await;
        // The old secret removed: its tokens are refused, new ones are not.
        let after = spawn_with(backing, |s| s.jwt_secret = Some(new_secret.clone())).await;
        assert_problem(after.get_auth("/v1/me", &old_token).await, 401).await;
        assert_eq!(after.get_auth("/v1/me", &new_token).await.status(), 200);
    }
);

#[tokio::test]
async fn an_embedded_data_dir_others_can_touch_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let start = |dir: std::path::PathBuf| async move {
        let mut s = settings();
        s.jwt_secret = None;
        s.data_dir = dir;
        match cohort::startup::Application::build(s.validate().unwrap(), true).await {
            Ok(app) => Ok(app),
            Err(e) => Err(format!("{e:#}")),
        }
    };
    // World-writable directory with a planted secret: refused, says why.
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(
        open.join("jwt-secret"),
        "planted secret that is 32 bytes long!!",
    )
    .unwrap();
    let err = start(open.clone())
        .await
        .err()
        .expect("a 0777 data dir was accepted");
    assert!(
        err.contains("writable by group or others") && err.contains("chmod 700"),
        "{err}"
    );
    // The directory fixed, the planted secret (0644) still refused.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(
        open.join("jwt-secret"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = start(open.clone())
        .await
        .err()
        .expect("a 0644 secret was accepted");
    assert!(
        err.contains("jwt-secret") && err.contains("readable by group or others"),
        "{err}"
    );
    // Another user's directory: refused.
    let others = ["/var/lib/postgresql", "/var/empty", "/"]
        .into_iter()
        .find(|d| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(d).is_ok_and(|m| m.uid() != rustix::process::geteuid().as_raw())
        });
    if let Some(d) = others {
        let err = start(d.into())
            .await
            .err()
            .expect("another user's dir was accepted");
        assert!(err.contains("owned by user"), "{err}");
    }
    // A directory others may only read (mkdir under umask 022): made
    // private, and every file created in it is private too.
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let app = start(fresh.clone()).await.expect("a fresh data dir starts");
    drop(app);
    for entry in std::fs::read_dir(&fresh).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{:?} is {mode:o}", entry.file_name());
    }
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
        0o700
    );
}
