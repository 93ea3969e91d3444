//! Proofs by test: random signup sequences give identical assignments from
//! the linear-scan reference, the in-process index and the Redis script.
//! Thresholds 1 to 5, vocabularies from tiny (collisions everywhere) to
//! large, 1 to COHORT_MAX_ATTRIBUTES attributes. Shrunk failures are kept in
//! `tests/api/properties.proptest-regressions` and replayed first.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use async_trait::async_trait;
use cohort::domain::grouping::LinearScan;
use cohort::domain::{AttributeRules, AttributeSet, GroupId, Threshold};
use cohort::index::memory::MemoryIndex;
use cohort::index::redis::{self as redis_index, RedisIndex};
use cohort::index::{GroupIdSource, GroupIndex, IndexError};
use cohort::store::postgres::PgStore;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};

use crate::helpers::*;

/// Ids in founding order, as a fresh database would hand them out.
struct Counter(AtomicI64);

#[async_trait]
impl GroupIdSource for Counter {
    async fn next_group_id(&self) -> Result<GroupId, IndexError> {
        Ok(GroupId(self.0.fetch_add(1, Ordering::SeqCst) + 1))
    }
}

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
fn reference_memory_and_redis_script_assign_identically() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (db, store) = rt.block_on(async {
        let db = TestDb::create().await;
        let store = PgStore::connect(&db.url, 2).unwrap();
        store.migrate().await.unwrap();
        (db, Arc::new(store))
    });
    let conn = rt.block_on(redis_index::connect(&redis_url())).unwrap();
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
                let prefix = TestPrefix::new(&redis_url());
                let redis = RedisIndex::new(conn.clone(), &prefix.prefix, t, 16);
                redis
                    .rebuild(store.as_ref(), &|_, _| {})
                    .await
                    .unwrap()
                    .unwrap();
                let memory = MemoryIndex::new(t);
                let mut reference = LinearScan::new(t);
                let (ids_r, ids_m) = (Counter(AtomicI64::new(0)), Counter(AtomicI64::new(0)));
                for raw in &c.users {
                    // Sets that merge below the threshold are refused by the
                    // API; the property is about valid signups.
                    let Ok(user) = AttributeSet::parse(raw, rules) else {
                        continue;
                    };
                    let want = reference.assign(&user);
                    let r = redis.assign(&user, &ids_r).await.unwrap().placement;
                    let m = memory.assign(&user, &ids_m).await.unwrap().placement;
                    prop_assert_eq!(&r, &want, "redis script differs for {:?}", user);
                    prop_assert_eq!(&m, &want, "in-process index differs for {:?}", user);
                }
                Ok(())
            })
        })
        .unwrap();
    drop(db);
}
