//! Failures injected between the steps of a signup, and backing services
//! going away: nothing half-written, no acknowledged signup lost, and the
//! service recovers on its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cohort::domain::{AttributeRules, AttributeSet, Username};
use cohort::index::GroupIndex;
use cohort::store::{NewUser, StoreError};
use serde_json::{Value, json};

use crate::helpers::*;

async fn user_count(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signup_that_dies_after_the_index_decided_leaves_a_joinable_group() {
    let app = spawn_app(Mode::Distributed).await;
    // The app's own store and index, driven step by step.
    let service = app.service.clone();
    let rules = AttributeRules { min: 3, max: 16 };
    let attrs = AttributeSet::parse(&["a", "b", "c", "d"], rules).unwrap();
    // Step 2 succeeds (the index founds G), then the process "dies".
    let decided = service
        .index
        .assign(&attrs, service.store.as_ref())
        .await
        .unwrap();
    assert!(decided.placement.created);
    let db = app.backing.db().unwrap();
    assert_eq!(user_count(db).await, 0);
    // The next overlapping signup joins G and creates its row.
    let body = app.signup_ok("late", &["a", "b", "c", "x"]).await;
    assert_eq!(body["group"]["id"], decided.placement.group_id.0);
    let (users, groups) = db_snapshot(db).await;
    assert_eq!(users.len(), 1);
    assert_eq!(
        groups,
        vec![(decided.placement.group_id.0, attrs.to_strings())]
    );
    assert_invariants(&users, &groups, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_against_a_rebuilt_index_is_refused() {
    let app = spawn_app(Mode::Distributed).await;
    let service = app.service.clone();
    let rules = AttributeRules { min: 3, max: 16 };
    let attrs = AttributeSet::parse(&["a", "b", "c"], rules).unwrap();
    let decided = service
        .index
        .assign(&attrs, service.store.as_ref())
        .await
        .unwrap();
    // The index is rebuilt between the decision and the commit.
    let db = app.backing.db().unwrap();
    let Backing::Distributed { prefix, .. } = &app.backing else {
        unreachable!()
    };
    let store = cohort::store::postgres::PgStore::connect(&db.url, 2).unwrap();
    let conn = cohort::index::redis::connect(&prefix.url).await.unwrap();
    let other =
        cohort::index::redis::RedisIndex::new(conn, &prefix.prefix, service.threshold, 1024);
    other.rebuild(&store, &|_, _| {}).await.unwrap().unwrap();
    let res = service
        .store
        .create_user(&NewUser {
            username: Username::parse("stale").unwrap(),
            password_hash: "x".into(),
            attributes: attrs.clone(),
            placement: decided.placement,
            epoch: decided.epoch.map(|e| (service.threshold, e)),
        })
        .await;
    assert!(
        matches!(res, Err(StoreError::StaleIndex)),
        "{:?}",
        res.err()
    );
    assert_eq!(user_count(db).await, 0);
    // Over HTTP the same attributes now found a group in the new index.
    let body = app.signup_ok("fresh", &["a", "b", "c"]).await;
    assert_eq!(body["group"]["created"], true);
}

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
async fn redis_restart_loses_the_index_and_it_is_rebuilt_without_an_operator() {
    let mut redis = PrivateRedis::start();
    let backing = Backing::new_with_redis(Mode::Distributed, &redis.url()).await;
    let app = spawn_with(backing.clone(), |_| {}).await;
    let first = app.signup_ok("first", &["a", "b", "c", "d"]).await;
    // Redis keeps nothing on disk: a restart empties the index.
    redis.kill();
    assert_problem(app.signup("down", &["a", "b", "c"]).await, 503).await;
    redis.restart();
    // Replicas notice, one rebuilds, and signups succeed again: the same
    // attributes join the group Postgres knows, never a duplicate.
    let mut joined: Option<Value> = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while joined.is_none() && std::time::Instant::now() < deadline {
        let res = app.signup("again", &["a", "b", "c", "z"]).await;
        if res.status().as_u16() == 201 {
            joined = Some(res.json().await.unwrap());
        } else {
            assert_eq!(res.status().as_u16(), 503);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    assert!(
        joined.is_some(),
        "signups did not recover after the Redis restart"
    );
    let joined = joined.unwrap();
    assert_eq!(joined["group"]["id"], first["group"]["id"]);
    assert_eq!(joined["group"]["created"], false);
    let (users, groups) = db_snapshot(backing.db().unwrap()).await;
    assert_eq!(users.len(), 2);
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
            let mut i = 0;
            // Each client retries its signup on 503 (safe: nothing was
            // written), a bounded number of times.
            while acks.len() < PER_CLIENT && i < PER_CLIENT * 50 {
                let n = c * PER_CLIENT + acks.len();
                let app = &apps[n % apps.len()];
                let attrs: Vec<&str> = (0..4).map(|j| vocab[(n * 7 + j * 3 + j * j) % vocab.len()]).collect();
                let res = app
                    .post_json(
                        "/v1/signup",
                        &json!({"username": format!("usr{n}"), "password": PASSWORD, "attributes": attrs}),
                    )
                    .await;
                match res.status().as_u16() {
                    201 => {
                        let b: Value = res.json().await.unwrap();
                        acks.push((b["user_id"].as_i64().unwrap(), b["group"]["id"].as_i64().unwrap()));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    503 => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                    other => panic!("unexpected status {other}"),
                }
                i += 1;
            }
            acks
        }));
    }
    // Flush once a third of the signups are in.
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
    assert_eq!(
        acks.len(),
        CLIENTS * PER_CLIENT,
        "signups did not recover after FLUSHALL"
    );
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
    // And the rebuilt index agrees with Postgres.
    let db = backing.db().unwrap();
    let store = cohort::store::postgres::PgStore::connect(&db.url, 2).unwrap();
    let Backing::Distributed { prefix, .. } = &backing else {
        unreachable!()
    };
    let conn = cohort::index::redis::connect(&redis.url()).await.unwrap();
    let index = cohort::index::redis::RedisIndex::new(
        conn,
        &prefix.prefix,
        cohort::domain::Threshold::new(3, 16).unwrap(),
        1024,
    );
    let report = index.verify(&store).await.unwrap();
    let real: Vec<_> = report
        .problems
        .iter()
        .filter(|p| !p.contains("in the index but not in the database"))
        .collect();
    assert!(real.is_empty(), "{real:?}");
    assert!(index.check_ready().await.is_ok());
}
