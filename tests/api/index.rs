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
