//! Faults injected under load against real replicas, each ending with the
//! same checker (`cluster::check`) and `cohort verify`: the contract's
//! promises must hold whatever fails.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::cluster::*;
use crate::helpers::*;

const VOCAB: usize = 9;

fn bases(rs: &[&Replica]) -> Arc<Mutex<Vec<String>>> {
    Arc::new(Mutex::new(rs.iter().map(|r| r.base()).collect()))
}

async fn verified_soon(db: &str, redis: &str, prefix: &str) {
    verified_within(20, db, redis, prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_signups_for_one_username_leave_one_user_and_one_group() {
    let backing = Backing::new(Mode::Distributed).await;
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(Arc::new(
            spawn_with(backing.clone(), |s| s.workers = Some(2)).await,
        ));
    }
    let history = History::default();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let app = apps[i % 3].clone();
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            // Disjoint attributes: each would found a group of its own.
            let attrs: Vec<String> = (0..3).map(|j| format!("x{i}y{j}")).collect();
            signup_once(&app.http, &app.address, "samename", &attrs, None, &history).await
        }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            Answer::Created { .. } => created += 1,
            Answer::Status(409) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(created, 1);
    let db = backing.db().unwrap();
    let (users, groups) = db_snapshot(db).await;
    assert_eq!(
        (users.len(), groups.len()),
        (1, 1),
        "a refused signup left a group"
    );
    check(&db.url, &history, 3).await;
    let Backing::Distributed { prefix, .. } = &backing else {
        unreachable!()
    };
    verified_soon(&db.url, &prefix.url, &prefix.prefix).await;
}

/// A replica dies at `point`; the others go on, and nothing is half-written.
async fn dies_at(point: &str) {
    let db = TestDb::create().await;
    let prefix = TestPrefix::new(&redis_url());
    let mut armed = Replica::start(
        &db.url,
        &redis_url(),
        &prefix.prefix,
        &[("COHORT_FAILPOINTS", point)],
    );
    let other = Replica::start(&db.url, &redis_url(), &prefix.prefix, &[]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let history = History::default();
    let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    signup_once(
        &http,
        &other.base(),
        "first",
        &v(&["a", "b", "c", "d"]),
        None,
        &history,
    )
    .await;
    // The armed replica dies in the middle of a founding and of a join.
    let a = signup_once(
        &http,
        &armed.base(),
        "dies1",
        &v(&["p", "q", "r", "s"]),
        None,
        &history,
    )
    .await;
    assert!(matches!(a, Answer::Lost), "{point}: {a:?}");
    assert!(
        armed.exited_within(Duration::from_secs(5)),
        "{point}: the replica did not die"
    );
    armed.disarm();
    armed.restart();
    // The overlapping founder, the joiner and a retry of the dead signup.
    for (n, attrs) in [
        ("next1", v(&["p", "q", "r", "x"])),
        ("next2", v(&["a", "b", "c", "y"])),
        ("dies1", v(&["p", "q", "r", "s"])),
        ("next3", v(&["p", "q", "r", "z"])),
    ] {
        let ans = signup_once(&http, &other.base(), n, &attrs, None, &history).await;
        assert!(
            matches!(ans, Answer::Created { .. } | Answer::Status(409)),
            "{point}: {ans:?}"
        );
    }
    // The founding the dead replica committed (if it did) is now joined.
    let (users, groups) = db_snapshot(&db).await;
    let pqr: Vec<_> = groups
        .iter()
        .filter(|g| g.1.contains(&"p".to_string()))
        .collect();
    assert_eq!(pqr.len(), 1, "{point}: {groups:?}");
    assert!(users.len() >= 4);
    check(&db.url, &history, 3).await;
    verified_soon(&db.url, &redis_url(), &prefix.prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_after_deciding_leaves_nothing() {
    dies_at("signup:decided").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_inside_the_transaction_leaves_nothing() {
    dies_at("signup:in-transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_between_commit_and_index_add_leaves_a_group_that_is_repaired() {
    dies_at("signup:committed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_before_answering_leaves_a_complete_signup() {
    dies_at("signup:published").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_a_replica_under_load() {
    let db = TestDb::create().await;
    let prefix = TestPrefix::new(&redis_url());
    let mut victim = Replica::start(&db.url, &redis_url(), &prefix.prefix, &[]);
    let r2 = Replica::start(&db.url, &redis_url(), &prefix.prefix, &[]);
    let r3 = Replica::start(&db.url, &redis_url(), &prefix.prefix, &[]);
    let targets = bases(&[&victim, &r2, &r3]);
    let history = History::default();
    let load_task = tokio::spawn(load(
        targets.clone(),
        8,
        40,
        VOCAB,
        "k",
        history.clone(),
        false,
    ));
    until_created(&history, 100).await;
    victim.kill();
    targets.lock().unwrap().remove(0);
    load_task.await.unwrap();
    check(&db.url, &history, 3).await;
    verified_soon(&db.url, &redis_url(), &prefix.prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_shutdown_nosave_and_restart_under_load_gives_no_503() {
    let db = TestDb::create().await;
    let mut redis = SnapshotRedis::start();
    let rs: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&db.url, &redis.url(), "c:", &[]))
        .collect();
    let targets = bases(&rs.iter().collect::<Vec<_>>());
    let history = History::default();
    let load_task = tokio::spawn(load(targets, 8, 40, VOCAB, "s", history.clone(), true));
    until_created(&history, 80).await;
    redis.shutdown_nosave().await;
    until_created(&history, 160).await;
    redis.restart();
    load_task.await.unwrap();
    check(&db.url, &history, 3).await;
    verified_soon(&db.url, &redis.url(), "c:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restored_from_an_older_snapshot_under_load_keeps_the_order() {
    let db = TestDb::create().await;
    let mut redis = SnapshotRedis::start();
    let rs: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&db.url, &redis.url(), "c:", &[]))
        .collect();
    let targets = bases(&rs.iter().collect::<Vec<_>>());
    let history = History::default();
    let load_task = tokio::spawn(load(targets, 8, 50, VOCAB, "o", history.clone(), true));
    until_created(&history, 60).await;
    redis.cmd(&["SAVE"]).await.unwrap();
    // Groups founded after the snapshot are lost by the restore below.
    until_created(&history, 200).await;
    redis.shutdown_nosave().await;
    redis.restart();
    load_task.await.unwrap();
    check(&db.url, &history, 3).await;
    verified_soon(&db.url, &redis.url(), "c:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_under_load_recovers_without_a_process_restart() {
    let pg = PrivatePostgres::start();
    let url = pg.url("postgres");
    let prefix = TestPrefix::new(&redis_url());
    let rs: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&url, &redis_url(), &prefix.prefix, &[]))
        .collect();
    let targets = bases(&rs.iter().collect::<Vec<_>>());
    let history = History::default();
    let load_task = tokio::spawn(load(targets, 8, 40, VOCAB, "p", history.clone(), false));
    until_created(&history, 80).await;
    pg.restart();
    let back = std::time::Instant::now();
    load_task.await.unwrap();
    // 503s stop within a few seconds of Postgres's return.
    let last_503 = history
        .all()
        .iter()
        .filter(|a| matches!(a.answer, Answer::Status(503)))
        .map(|a| a.ended)
        .max();
    if let Some(t) = last_503 {
        assert!(
            t.saturating_duration_since(back) < Duration::from_secs(5),
            "503s went on {:?} after Postgres came back",
            t.saturating_duration_since(back)
        );
    }
    check(&url, &history, 3).await;
    verified_soon(&url, &redis_url(), &prefix.prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_response_gets_the_original_answer() {
    use tokio::io::AsyncWriteExt;
    let backing = Backing::new(Mode::Distributed).await;
    let app = spawn_with(backing.clone(), |_| {}).await;
    let body = json!({"username": "lost", "password": PASSWORD, "attributes": ["a", "b", "c"]})
        .to_string();
    // The request is sent, and the connection closed before any answer.
    let mut s = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap();
    let req = format!(
        "POST /v1/signup HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         idempotency-key: \"k-1\"\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    drop(s);
    let db = backing.db().unwrap();
    assert!(
        eventually(10, || async { db_snapshot(db).await.0.len() == 1 }).await,
        "the signup whose answer was lost did not commit"
    );
    let retry = |key: &'static str, attrs: serde_json::Value| {
        app.http
            .post(app.url("/v1/signup"))
            .header("Idempotency-Key", key)
            .json(&json!({"username": "lost", "password": PASSWORD, "attributes": attrs}))
            .send()
    };
    let res = retry("\"k-1\"", json!(["a", "b", "c"])).await.unwrap();
    assert_eq!(res.status().as_u16(), 201);
    assert_eq!(res.headers().get("idempotent-replayed").unwrap(), "true");
    let first: serde_json::Value = res.json().await.unwrap();
    assert_eq!(first["group"]["created"], true);
    // Again: the same answer.
    let again: serde_json::Value = retry("\"k-1\"", json!(["C", "b", "a"]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again, first);
    // The same key with another body: 422, nothing written.
    assert_problem(retry("\"k-1\"", json!(["a", "b", "d"])).await.unwrap(), 422).await;
    // No key: the username is simply taken.
    assert_problem(app.signup("lost", &["a", "b", "c"]).await, 409).await;
    assert_eq!(db_snapshot(db).await.0.len(), 1);
    // A malformed key is a 400.
    assert_problem(retry("", json!(["a", "b", "c"])).await.unwrap(), 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_in_embedded_mode() {
    let app = spawn_app(Mode::Embedded).await;
    let send = |attrs: serde_json::Value| {
        app.http
            .post(app.url("/v1/signup"))
            .header("Idempotency-Key", "e-1")
            .json(&json!({"username": "emb", "password": PASSWORD, "attributes": attrs}))
            .send()
    };
    let a: serde_json::Value = send(json!(["a", "b", "c"]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let res = send(json!(["a", "b", "c"])).await.unwrap();
    assert_eq!(res.status().as_u16(), 201);
    let b: serde_json::Value = res.json().await.unwrap();
    assert_eq!(a, b);
    assert_problem(send(json!(["a", "b", "x"])).await.unwrap(), 422).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restored_from_an_older_snapshot_between_bursts_is_not_trusted() {
    // No signup is in flight when Redis comes back older, so no founder's
    // add fails and nothing is marked dirty: only the server's new identity
    // tells the replicas that the index they reconnect to lost groups.
    let db = TestDb::create().await;
    let mut redis = SnapshotRedis::start();
    let rs: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&db.url, &redis.url(), "c:", &[]))
        .collect();
    let targets = bases(&rs.iter().collect::<Vec<_>>());
    let history = History::default();
    load(targets.clone(), 4, 15, VOCAB, "a", history.clone(), true).await;
    redis.cmd(&["SAVE"]).await.unwrap();
    load(targets.clone(), 4, 15, VOCAB, "bb", history.clone(), true).await;
    redis.shutdown_nosave().await;
    redis.restart();
    load(targets.clone(), 4, 25, VOCAB, "ccc", history.clone(), true).await;
    check(&db.url, &history, 3).await;
    verified_soon(&db.url, &redis.url(), "c:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_racing_signups_leave_the_in_process_index_untouched() {
    let app = Arc::new(spawn_app(Mode::Embedded).await);
    let history = History::default();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let app = app.clone();
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let attrs: Vec<String> = (0..3).map(|j| format!("x{i}y{j}")).collect();
            signup_once(&app.http, &app.address, "samename", &attrs, None, &history).await
        }));
    }
    let mut winner = None;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Answer::Created { .. } => winner = Some(i),
            Answer::Status(409) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Every loser's attributes found a group of their own: none was left in
    // the index by a refused signup.
    let winner = winner.expect("one signup wins");
    for i in (0..12).filter(|&i| i != winner) {
        let attrs: Vec<String> = (0..3).map(|j| format!("x{i}y{j}")).collect();
        let refs: Vec<&str> = attrs.iter().map(|s| s.as_str()).collect();
        let body = app.signup_ok(&format!("later{i}"), &refs).await;
        assert_eq!(
            body["group"]["created"], true,
            "a refused signup left group {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_redis_replica_a_founding_is_answered_once_the_replica_has_it() {
    let master = SnapshotRedis::start();
    let port = free_port();
    // Killed when the test ends, passed or failed.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _replica = Killed(
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--replicaof", "127.0.0.1", &master.port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let replica_url = format!("redis://127.0.0.1:{port}");
    // The replica has finished its first sync before the app starts, so
    // that the keeper's first look at the server sees it. (While a replica
    // syncs, WAIT gets no acknowledgement: a founding then marks the index
    // dirty instead, which is safe but not what this test is about.)
    let replica_client = redis::Client::open(replica_url.as_str()).unwrap();
    assert!(
        eventually(30, || async {
            let Ok(mut c) = replica_client.get_multiplexed_async_connection().await else {
                return false;
            };
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            info.contains("master_link_status:up")
        })
        .await
    );
    let backing = Backing::new_with_redis(Mode::Distributed, &master.url()).await;
    let app = spawn_with(backing.clone(), |_| {}).await;
    // Once the keeper has seen the replica and trusts the index, a founding
    // waits for the replica's copy before its 201.
    assert!(
        eventually(15, || async {
            let b: serde_json::Value = app.get("/readyz").await.json().await.unwrap();
            b["index"] == "ready"
        })
        .await
    );
    // The dirty counter only grows: a founding whose add no replica
    // acknowledged in time (WAIT's 200 ms, which a loaded machine can
    // exceed) raises it, and replicas then decide from Postgres.
    let db = backing.db().unwrap().client().await;
    let dirty = || async {
        db.query_one("SELECT index_dirty FROM deployment", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let dirty_before = dirty().await;
    let body = app.signup_ok("founder", &["a", "b", "c"]).await;
    let dirty_after = dirty().await;
    let id = body["group"]["id"].as_i64().unwrap();
    let Backing::Distributed { prefix, .. } = &backing else {
        unreachable!()
    };
    let mut conn = redis::Client::open(replica_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let on_replica: Option<String> = redis::cmd("HGET")
        .arg(format!("{}{{idx-t3}}:g", prefix.prefix))
        .arg(id)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Answered only once the replica has it, or with the index marked
    // dirty instead: never answered from the master's copy alone.
    assert!(
        on_replica.is_some() || dirty_after > dirty_before,
        "the replica lacks an answered group and the index was not marked dirty"
    );
}
