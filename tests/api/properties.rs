//! Proofs by test: random signup sequences give identical assignments from
//! the linear-scan reference, the in-process index and the Redis script.
//! Thresholds 1 to 5, vocabularies from tiny (collisions everywhere) to
//! large, 1 to COHORT_MAX_ATTRIBUTES attributes. Shrunk failures are kept in
//! `tests/api/properties.proptest-regressions` and replayed first.

use std::sync::Arc;

use cohort::domain::grouping::LinearScan;
use cohort::domain::{AttributeRules, AttributeSet, GroupId, Threshold, Username};
use cohort::index::memory::MemoryIndex;
use cohort::index::redis::RedisIndex;
use cohort::index::redis::conn::RedisConn;
use cohort::store::postgres::PgStore;
use cohort::store::{NewUser, Plan, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};

use crate::helpers::*;

#[derive(Debug, Clone)]
struct Case {
    t: usize,
    max: usize,
    users: Vec<Vec<String>>,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=5, prop_oneof![Just(4usize), Just(8), Just(16)])
        .prop_filter("max >= t", |(t, max)| max >= t)
        .prop_flat_map(|(t, max)| {
            let vocab = prop_oneof![Just(t + 1), Just(6usize), Just(15), Just(60), Just(1000)];
            (Just(t), Just(max), vocab)
        })
        .prop_flat_map(|(t, max, vocab)| {
            let user = proptest::collection::vec(0..vocab, 1..=max)
                .prop_map(|v| v.into_iter().map(|x| format!("w{x}")).collect::<Vec<_>>());
            (Just(t), Just(max), proptest::collection::vec(user, 1..60))
        })
        .prop_map(|(t, max, users)| Case { t, max, users })
}

#[test]
fn reference_memory_redis_script_and_subset_table_assign_identically() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::create());
    let conn = Arc::new(RedisConn::new(&redis_url(), std::time::Duration::from_secs(5)).unwrap());
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/api/properties.proptest-regressions",
        ))),
        ..Config::default()
    });
    runner
        .run(&case(), |c| {
            rt.block_on(async {
                let t = Threshold::new(c.t, c.max).unwrap();
                let rules = AttributeRules {
                    min: c.t,
                    max: c.max,
                };
                // A fresh database state per case, in the same database.
                let store = PgStore::connect(&db.url, 2, t).unwrap();
                store.migrate().await.unwrap();
                db.client()
                    .await
                    .batch_execute(
                        "TRUNCATE idempotency_keys, users, group_member_counts, subset_owners, subset_overlaps, \
                         groups, deployment RESTART IDENTITY; ALTER SEQUENCE group_ids RESTART",
                    )
                    .await
                    .unwrap();
                store.ensure_deployment(t).await.unwrap();
                let prefix = TestPrefix::new(&redis_url());
                let redis = RedisIndex::new(conn.clone(), &prefix.prefix, t);
                redis.sync(&store, 16, &|_, _| {}).await.unwrap();
                let memory = MemoryIndex::new(t);
                let mut reference = LinearScan::new(t);
                let mut founded = 0i64;
                for (i, raw) in c.users.iter().enumerate() {
                    // Sets that merge below the threshold are refused by the
                    // API; the property is about valid signups.
                    let Ok(user) = AttributeSet::parse(raw, rules) else {
                        continue;
                    };
                    let want = reference.assign(&user);
                    let r = redis.decide(&user).await.unwrap().best;
                    let m = memory.best_now(&user);
                    let p = store.best_group(&user).await.unwrap();
                    let want_join = (!want.created).then_some(want.group_id);
                    prop_assert_eq!(
                        r.as_ref().map(|b| b.id),
                        want_join,
                        "redis script differs for {:?}",
                        user
                    );
                    prop_assert_eq!(
                        m.as_ref().map(|b| b.id),
                        want_join,
                        "in-process index differs for {:?}",
                        user
                    );
                    prop_assert_eq!(
                        p.as_ref().map(|b| b.id),
                        want_join,
                        "subset table differs for {:?}",
                        user
                    );
                    let committed = store
                        .commit_signup(&NewUser {
                            username: Username::parse(&format!("usr{i}")).unwrap(),
                            password_hash: "x".into(),
                            attributes: user.clone(),
                            plan: p.map_or(Plan::Found, Plan::Join),
                            decided_in_index: None,
                            idempotency: None,
                        })
                        .await
                        .unwrap();
                    prop_assert_eq!(committed.founded, want.created);
                    if committed.founded {
                        founded += 1;
                        // The reference numbers groups 1, 2, ... as does a
                        // fresh sequence.
                        prop_assert_eq!(committed.user.group_id, GroupId(founded));
                        redis
                            .add_groups(&[(committed.user.group_id, user.clone())])
                            .await
                            .unwrap();
                        memory.add_now(committed.user.group_id, user.clone());
                    }
                }
                Ok(())
            })
        })
        .unwrap();
    drop(db);
}
