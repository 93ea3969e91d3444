//! Backing services going away, in process: nothing half-written, no
//! acknowledged signup lost, no 503 because of Redis, and the service
//! recovers on its own. (Faults against real replicas: `faults.rs`.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_going_away_gives_503_then_recovers() {
    let db = TestDb::create().await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let prefix = TestPrefix::new(&redis_url());
    let backing = Backing::Distributed {
        db: db.clone(),
        prefix,
    };
    let proxied = db.url.replace(":5432/", &format!(":{}/", proxy.port));
    let app = spawn_with(backing, |s| s.database_url = Some(proxied)).await;
    app.signup_ok("before", &["a", "b", "c"]).await;
    proxy.cut();
    let res = app.signup("during", &["a", "b", "c"]).await;
    assert!(res.headers().get("retry-after").is_some());
    assert_problem(res, 503).await;
    assert_eq!(app.get("/healthz").await.status().as_u16(), 200);
    assert_problem(app.get("/readyz").await, 503).await;
    proxy.restore();
    let recovered = eventually(10, || async {
        app.signup("during", &["a", "b", "c"])
            .await
            .status()
            .as_u16()
            == 201
    })
    .await;
    assert!(
        recovered,
        "signups did not recover after Postgres came back"
    );
    let (users, groups) = db_snapshot(&db).await;
    assert_eq!(users.len(), 2);
    assert_eq!(groups.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_restarted_empty_costs_no_signup() {
    let mut redis = PrivateRedis::start();
    let backing = Backing::new_with_redis(Mode::Distributed, &redis.url()).await;
    let app = spawn_with(backing.clone(), |_| {}).await;
    let first = app.signup_ok("first", &["a", "b", "c", "d"]).await;
    redis.kill();
    // Decided from Postgres: the same group, no 503.
    let down = app.signup_ok("down", &["a", "b", "c", "z"]).await;
    assert_eq!(down["group"]["id"], first["group"]["id"]);
    let body: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert!(
        eventually(5, || async {
            let b: Value = app.get("/readyz").await.json().await.unwrap();
            b["index"] == "unreachable"
        })
        .await
    );
    let other = app.signup_ok("other", &["x", "y", "z"]).await;
    assert_eq!(other["group"]["created"], true);
    // Redis keeps nothing on disk: it comes back empty, and is rebuilt.
    redis.restart();
    assert!(
        eventually(10, || async {
            let b: Value = app.get("/readyz").await.json().await.unwrap();
            b["index"] == "ready"
        })
        .await,
        "the index was not rebuilt"
    );
    let again = app.signup_ok("again", &["a", "b", "c", "q"]).await;
    assert_eq!(again["group"]["id"], first["group"]["id"]);
    let again = app.signup_ok("again2", &["x", "y", "z", "q"]).await;
    assert_eq!(again["group"]["id"], other["group"]["id"]);
    let (users, groups) = db_snapshot(backing.db().unwrap()).await;
    assert_eq!(users.len(), 5);
    assert_invariants(&users, &groups, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushall_during_concurrent_signups_breaks_no_invariant() {
    let redis = PrivateRedis::start();
    let backing = Backing::new_with_redis(Mode::Distributed, &redis.url()).await;
    let apps = vec![
        Arc::new(spawn_with(backing.clone(), |_| {}).await),
        Arc::new(spawn_with(backing.clone(), |_| {}).await),
    ];
    const CLIENTS: usize = 16;
    const PER_CLIENT: usize = 40;
    let done = Arc::new(AtomicUsize::new(0));
    let vocab = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let apps = apps.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for k in 0..PER_CLIENT {
                let n = c * PER_CLIENT + k;
                let app = &apps[n % apps.len()];
                let attrs: Vec<&str> = (0..4).map(|j| vocab[(n * 7 + j * 3 + j * j) % vocab.len()]).collect();
                let res = app
                    .post_json(
                        "/v1/signup",
                        &json!({"username": format!("usr{n}"), "password": PASSWORD, "attributes": attrs}),
                    )
                    .await;
                // No 503: without its index, a replica decides from Postgres.
                assert_eq!(res.status().as_u16(), 201);
                let b: Value = res.json().await.unwrap();
                acks.push((b["user_id"].as_i64().unwrap(), b["group"]["id"].as_i64().unwrap()));
                done.fetch_add(1, Ordering::Relaxed);
            }
            acks
        }));
    }
    let flushed = eventually(60, || {
        let done = done.clone();
        async move { done.load(Ordering::Relaxed) >= CLIENTS * PER_CLIENT / 3 }
    })
    .await;
    assert!(flushed);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let mut acks = Vec::new();
    for t in tasks {
        acks.extend(t.await.unwrap());
    }
    assert_eq!(acks.len(), CLIENTS * PER_CLIENT);
    let (users, groups) = db_snapshot(backing.db().unwrap()).await;
    assert_eq!(users.len(), acks.len());
    let placed: HashMap<i64, i64> = users.iter().map(|(u, g, _)| (*u, *g)).collect();
    for (u, g) in &acks {
        assert_eq!(
            placed.get(u),
            Some(g),
            "acknowledged user {u} is not in group {g}"
        );
    }
    assert_invariants(&users, &groups, 3);
    // And the rebuilt index agrees with Postgres, within seconds.
    let db = backing.db().unwrap();
    let Backing::Distributed { prefix, .. } = &backing else {
        unreachable!()
    };
    let (d, r, p) = (db.url.clone(), redis.url(), prefix.prefix.clone());
    assert!(
        eventually(20, move || {
            let (d, r, p) = (d.clone(), r.clone(), p.clone());
            async move { crate::cluster::verify_ok(&d, &r, &p) }
        })
        .await
    );
}
