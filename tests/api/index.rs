//! The Redis script against the plain linear-scan reference, and the
//! index's lifecycle: rebuild, verify, threshold change.

use std::sync::Arc;

use cohort::domain::grouping::LinearScan;
use cohort::domain::{AttributeRules, AttributeSet, GroupId, Threshold};
use cohort::index::GroupIndex;
use cohort::index::redis::{self as redis_index, RedisIndex};
use cohort::store::postgres::PgStore;
use rand::{RngExt, SeedableRng};

use crate::helpers::*;

async fn fresh_index(t: usize, max: usize) -> (Arc<TestDb>, Arc<TestPrefix>, PgStore, RedisIndex) {
    let db = TestDb::create().await;
    let prefix = TestPrefix::new(&redis_url());
    let store = PgStore::connect(&db.url, 4).unwrap();
    store.migrate().await.unwrap();
    let conn = redis_index::connect(&redis_url()).await.unwrap();
    let index = RedisIndex::new(conn, &prefix.prefix, Threshold::new(t, max).unwrap(), 64);
    index
        .rebuild(&store, &|_, _| {})
        .await
        .unwrap()
        .expect("no one else rebuilds");
    (db, prefix, store, index)
}

fn random_user(rng: &mut impl rand::Rng, vocab: usize, k_max: usize, t: usize) -> AttributeSet {
    let k = rng.random_range(t..=k_max);
    let raw: Vec<String> = (0..k)
        .map(|_| format!("v{}", rng.random_range(0..vocab)))
        .collect();
    let rules = AttributeRules { min: 1, max: 64 };
    AttributeSet::parse(&raw, rules).unwrap()
}

/// Runs `n` random signups through the script and the reference; they must
/// agree on every one.
async fn differential(t: usize, vocab: usize, k_max: usize, n: usize, seed: u64) {
    let (_db, _prefix, store, index) = fresh_index(t, 16).await;
    let threshold = Threshold::new(t, 16).unwrap();
    let mut reference = LinearScan::new(threshold);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..n {
        let user = random_user(&mut rng, vocab, k_max, t);
        if user.len() < t {
            continue;
        }
        let want = reference.assign(&user);
        let got = index.assign(&user, &store).await.unwrap();
        assert_eq!(
            (got.placement.group_id, got.placement.created),
            (want.group_id, want.created),
            "signup {i} ({user:?}) with t={t}"
        );
        assert_eq!(got.placement.group_attributes, want.group_attributes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_script_matches_linear_scan_on_thousands_of_signups() {
    differential(3, 25, 8, 3_000, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_script_matches_linear_scan_for_thresholds_1_to_5() {
    for t in 1..=5 {
        differential(t, 8 + 4 * t, 10, 300, t as u64).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_reproduces_the_index_and_verify_agrees() {
    let (_db, _prefix, store, index) = fresh_index(3, 16).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Commit real groups through the store, as signups would.
    for i in 0..200 {
        let user = random_user(&mut rng, 20, 7, 3);
        let a = index.assign(&user, &store).await.unwrap();
        use cohort::store::{NewUser, Store};
        store
            .create_user(&NewUser {
                username: cohort::domain::Username::parse(&format!("usr{i}")).unwrap(),
                password_hash: "x".into(),
                attributes: user,
                placement: a.placement,
                epoch: a.epoch.map(|e| (index.threshold(), e)),
            })
            .await
            .unwrap();
    }
    let report = index.verify(&store).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let before = index.ready_epoch().await.unwrap().unwrap();
    let rebuilt = index.rebuild(&store, &|_, _| {}).await.unwrap().unwrap();
    assert!(rebuilt.epoch.0 > before.0);
    let report = index.verify(&store).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.groups_checked > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_a_group_the_database_lacks() {
    let (_db, _prefix, store, index) = fresh_index(3, 16).await;
    let rules = AttributeRules { min: 3, max: 16 };
    let user = AttributeSet::parse(&["a", "b", "c"], rules).unwrap();
    // The index founds a group, and the signup dies before its commit.
    let a = index.assign(&user, &store).await.unwrap();
    assert!(a.placement.created);
    let report = index.verify(&store).await.unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains("not in the database"));
    // A rebuild from the system of record drops it.
    index.rebuild(&store, &|_, _| {}).await.unwrap().unwrap();
    assert!(index.verify(&store).await.unwrap().problems.is_empty());
    let again = index.assign(&user, &store).await.unwrap();
    assert!(again.placement.created);
    assert_ne!(
        again.placement.group_id, a.placement.group_id,
        "ids are never reused"
    );
    assert!(again.placement.group_id > GroupId(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_threshold_gets_its_own_index_built_from_the_data() {
    let backing = Backing::new(Mode::Distributed).await;
    let t3 = spawn_with(backing.clone(), |_| {}).await;
    let g = t3.signup_ok("ann", &["a", "b", "c", "d"]).await["group"]["id"].clone();
    // Started with t=4 on the same data: it builds a t=4 index from Postgres
    // instead of reading the t=3 one.
    let t4 = spawn_with(backing.clone(), |s| s.match_threshold = 4).await;
    let joined = t4.signup_ok("ben", &["a", "b", "c", "d", "e"]).await;
    assert_eq!(joined["group"]["id"], g);
    // Three shared is enough at t=3, not at t=4.
    let founded = t4.signup_ok("cat", &["a", "b", "c", "x"]).await;
    assert_eq!(founded["group"]["created"], true);
    // The t=3 replica still serves its own index, which does not know the
    // group t=4 founded until rebuilt; it never reads t=4's keys.
    let Backing::Distributed { prefix, .. } = &backing else {
        unreachable!()
    };
    let conn = redis_index::connect(&prefix.url).await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*meta", prefix.prefix))
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "one index per threshold: {keys:?}");
}

fn cohort_cli(backing: &Backing, args: &[&str]) -> std::process::Output {
    let Backing::Distributed { db, prefix } = backing else {
        unreachable!()
    };
    std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", &prefix.url)
        .env("COHORT_REDIS_PREFIX", &prefix.prefix)
        .env(
            "COHORT_JWT_SECRET",
            "test secret that is at least 32 bytes long",
        )
        .env("COHORT_INDEX_BUCKETS", "1024")
        .env_remove("COHORT_MATCH_THRESHOLD")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_and_verify_commands() {
    let backing = Backing::new(Mode::Distributed).await;
    let app = spawn_with(backing.clone(), |_| {}).await;
    for (i, a) in [["a", "b", "c"], ["d", "e", "f"], ["a", "b", "x"]]
        .iter()
        .enumerate()
    {
        app.signup_ok(&format!("usr{i}"), a).await;
    }
    let out = cohort_cli(&backing, &["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = cohort_cli(&backing, &["reindex"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("reindexed 3 groups"), "{text}");
    // Signups go on against the new epoch.
    let joined = app.signup_ok("after", &["d", "e", "f", "g"]).await;
    assert_eq!(joined["group"]["created"], false);
    // A group the index lost is reported, and exit is non-zero.
    let Backing::Distributed { prefix, .. } = &backing else {
        unreachable!()
    };
    let conn = redis_index::connect(&prefix.url).await.unwrap();
    let gkeys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*:g", prefix.prefix))
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let _: () = redis::cmd("HDEL")
        .arg(&gkeys[0])
        .arg(joined["group"]["id"].as_i64().unwrap())
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let out = cohort_cli(&backing, &["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("is missing from the index"), "{text}");
    assert!(cohort_cli(&backing, &["reindex"]).status.success());
    assert!(cohort_cli(&backing, &["verify"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_keeps_every_group_of_overlapping_stored_groups() {
    // Groups that share t attributes cannot be founded at this threshold,
    // but can be stored (founded under a higher one). Every slot must keep
    // all of them, across rebuild batches too.
    let (db, _prefix, store, index) = fresh_index(3, 16).await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO groups (id, attributes) VALUES \
         (1, '{a,b,c,d}'), (2, '{a,b,c,e}'), (3, '{a,b,c,d,e}')",
    )
    .await
    .unwrap();
    // More groups than one batch, so that overlapping slots span batches.
    c.batch_execute(
        "INSERT INTO groups (id, attributes) \
         SELECT g, ARRAY['x' || g, 'y' || g, 'z' || g] FROM generate_series(4, 25000) g; \
         INSERT INTO groups (id, attributes) VALUES (25001, '{a,b,c,f}')",
    )
    .await
    .unwrap();
    index.rebuild(&store, &|_, _| {}).await.unwrap().unwrap();
    let report = index.verify(&store).await.unwrap();
    assert!(
        report.problems.is_empty(),
        "{:?}",
        &report.problems[..report.problems.len().min(5)]
    );
    let rules = AttributeRules { min: 3, max: 16 };
    let user = AttributeSet::parse(&["a", "b", "c", "e", "q"], rules).unwrap();
    let placed = index.assign(&user, &store).await.unwrap().placement;
    // Group 2 and 3 share 4 with the user; the smaller id wins.
    assert_eq!(placed.group_id, GroupId(2));
    let user = AttributeSet::parse(&["a", "b", "c", "f"], rules).unwrap();
    assert_eq!(
        index
            .assign(&user, &store)
            .await
            .unwrap()
            .placement
            .group_id,
        GroupId(25001)
    );
}
