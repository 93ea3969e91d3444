//! One behaviour suite for both stores: the Postgres store and the embedded
//! SQLite store must keep the same promises through the `Store` trait
//! (but one: only Postgres refuses an overlapping founding).

use std::sync::Arc;

use cohort::domain::{AttributeRules, AttributeSet, Threshold, Username};
use cohort::index::Candidate;
use cohort::store::postgres::PgStore;
use cohort::store::sqlite::SqliteStore;
use cohort::store::{Committed, IdempotencyRecord, NewUser, Plan, Store, StoreError};

use crate::helpers::*;

/// Where a store's data lives, so that a second store (another threshold)
/// can be opened over the same data.
enum Place {
    Pg(Arc<TestDb>),
    Sqlite(tempfile::TempDir),
}

impl Place {
    async fn new(pg: bool) -> Self {
        if pg {
            Place::Pg(TestDb::create().await)
        } else {
            Place::Sqlite(tempfile::tempdir().unwrap())
        }
    }

    async fn open(&self, t: usize) -> Arc<dyn Store> {
        let t = Threshold::new(t, 16).unwrap();
        let store: Arc<dyn Store> = match self {
            Place::Pg(db) => {
                let s = PgStore::connect(&db.url, 2, t).unwrap();
                s.migrate().await.unwrap();
                Arc::new(s)
            }
            Place::Sqlite(dir) => {
                Arc::new(SqliteStore::open(&dir.path().join("db.sqlite3"), t).unwrap())
            }
        };
        store.ensure_deployment(t).await.unwrap();
        store
    }
}

fn set(xs: &[&str]) -> AttributeSet {
    AttributeSet::parse(xs, AttributeRules { min: 1, max: 16 }).unwrap()
}

fn new_user(name: &str, attrs: &AttributeSet, plan: Plan) -> NewUser {
    NewUser {
        username: Username::parse(name).unwrap(),
        password_hash: "hash".into(),
        attributes: attrs.clone(),
        plan,
        decided_in_index: None,
        idempotency: None,
    }
}

/// The protocol's steps 2 and 3, from the store alone.
async fn place(s: &dyn Store, name: &str, attrs: &[&str]) -> Result<Committed, StoreError> {
    let attrs = set(attrs);
    let plan = s.best_group(&attrs).await?.map_or(Plan::Found, Plan::Join);
    s.commit_signup(&new_user(name, &attrs, plan)).await
}

async fn behaves(pg: bool) {
    let place_ = Place::new(pg).await;
    let s = place_.open(3).await;

    // Founding and joining, members in join order, counts kept.
    let ann = place(s.as_ref(), "ann", &["a", "b", "c", "d"])
        .await
        .unwrap();
    assert!(ann.founded);
    assert_eq!(ann.group_attributes, set(&["a", "b", "c", "d"]));
    let bob = place(s.as_ref(), "bob", &["a", "b", "c", "x"])
        .await
        .unwrap();
    assert!(!bob.founded);
    assert_eq!(bob.user.group_id, ann.user.group_id);
    let members = s.members(ann.user.group_id, None, 10).await.unwrap();
    let names: Vec<&str> = members.iter().map(|m| m.username.as_str()).collect();
    assert_eq!(names, ["ann", "bob"]);
    let g = s.group(ann.user.group_id).await.unwrap().unwrap();
    assert_eq!(g.member_count, 2);
    assert_eq!(s.counts().await.unwrap(), (1, 2));

    // The group page: the caller, its group, the count and one page, at
    // once; a page past the end still says who the caller is.
    let page = s.group_page(bob.user.id, None, 1).await.unwrap().unwrap();
    assert_eq!(page.token_version, 0);
    assert_eq!(page.attributes, set(&["a", "b", "c", "x"]));
    assert_eq!(page.group, g);
    let names: Vec<&str> = page.members.iter().map(|m| m.username.as_str()).collect();
    assert_eq!(names, ["ann"]);
    let rest = s
        .group_page(bob.user.id, Some(ann.user.id), 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.members, members[1..]);
    let past = s
        .group_page(bob.user.id, Some(bob.user.id), 10)
        .await
        .unwrap()
        .unwrap();
    assert!(past.members.is_empty());
    assert_eq!(past.group.member_count, 2);
    assert!(
        s.group_page(cohort::domain::UserId(999_999), None, 10)
            .await
            .unwrap()
            .is_none()
    );

    // The best group: the largest overlap, then the smallest id.
    let cat = place(s.as_ref(), "cat", &["p", "q", "r", "s"])
        .await
        .unwrap();
    assert!(cat.founded);
    let best = s
        .best_group(&set(&["a", "b", "c", "p", "q", "r", "s"]))
        .await
        .unwrap();
    assert_eq!(best.map(|c| c.id), Some(cat.user.group_id));
    assert!(
        s.best_group(&set(&["a", "b", "p", "q"]))
            .await
            .unwrap()
            .is_none()
    );

    // Postgres arbitrates: an overlapping founding is refused, and leaves
    // nothing. (Embedded mode's arbiter is its in-process index, which
    // never plans one: `properties.rs` and the import's differential tests.)
    if pg {
        let res = s
            .commit_signup(&new_user("dan", &set(&["p", "q", "r", "z"]), Plan::Found))
            .await;
        assert!(matches!(res, Err(StoreError::Overlap)), "{res:?}");
        assert_eq!(s.counts().await.unwrap(), (2, 3));
    }

    // A taken username is refused, and its group is not left behind.
    let res = s
        .commit_signup(&new_user("ann", &set(&["u", "v", "w"]), Plan::Found))
        .await;
    assert!(matches!(res, Err(StoreError::UsernameTaken)), "{res:?}");
    assert_eq!(s.counts().await.unwrap(), (2, 3));
    assert!(
        s.best_group(&set(&["u", "v", "w"]))
            .await
            .unwrap()
            .is_none()
    );

    // An idempotency key is stored with the user and replayed; a second use
    // is refused.
    let key = IdempotencyRecord {
        key: "key-1".into(),
        fingerprint: vec![1, 2, 3],
    };
    let mut eve = new_user("eve", &set(&["e", "f", "g"]), Plan::Found);
    eve.idempotency = Some(key.clone());
    let first = s.commit_signup(&eve).await.unwrap();
    let replay = s.replay("key-1").await.unwrap().unwrap();
    assert_eq!(replay.fingerprint, key.fingerprint);
    assert_eq!(replay.committed, first);
    let mut fay = new_user(
        "fay",
        &set(&["e", "f", "g", "h"]),
        Plan::Join(Candidate {
            id: first.user.group_id,
            attributes: first.group_attributes.clone(),
        }),
    );
    fay.idempotency = Some(key);
    let res = s.commit_signup(&fay).await;
    assert!(
        matches!(res, Err(StoreError::IdempotencyKeyTaken)),
        "{res:?}"
    );
    assert!(s.replay("other").await.unwrap().is_none());
    assert_eq!(s.counts().await.unwrap(), (3, 4));

    // The member count is kept as data: it follows joins and deletions.
    let zed = place(s.as_ref(), "zed", &["a", "b", "c", "y"])
        .await
        .unwrap();
    assert_eq!(zed.user.group_id, ann.user.group_id);
    let count = |id| {
        let s = s.clone();
        async move { s.group(id).await.unwrap().unwrap().member_count }
    };
    assert_eq!(count(ann.user.group_id).await, 3);
    assert!(s.delete_user(bob.user.id).await.unwrap());
    assert_eq!(count(ann.user.group_id).await, 2);
    let page = s.group_page(zed.user.id, None, 10).await.unwrap().unwrap();
    assert_eq!(page.group.member_count, 2);
    assert_eq!(page.members.len(), 2);
    assert!(s.group_page(bob.user.id, None, 10).await.unwrap().is_none());

    // A store configured with another threshold keeps the recorded one and
    // refuses to commit.
    let other = place_.open(4).await;
    let res = place(other.as_ref(), "gus", &["m", "n", "o", "k"]).await;
    assert!(
        matches!(
            res,
            Err(StoreError::ThresholdMismatch {
                deployed: 3,
                configured: 4
            })
        ),
        "{res:?}"
    );
    assert_eq!(s.counts().await.unwrap(), (3, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_the_store_promises() {
    behaves(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_keeps_the_store_promises() {
    behaves(false).await;
}

/// The index clean (a sync recorded it, so joins decided in it may
/// commit), then B (a, b, c) confirmed an hour before any decision, and A
/// (a, b, d, e) committed but not confirmed: 2 shared with B, 4 with a
/// joiner of a, b, c, d, e.
async fn confirmed_b_and_unconfirmed_a(
    c: &tokio_postgres::Client,
    s: &dyn Store,
) -> (Committed, Committed) {
    c.execute("UPDATE deployment SET index_clean = index_dirty", &[])
        .await
        .unwrap();
    let b = place(s, "bea", &["a", "b", "c"]).await.unwrap();
    c.execute(
        "UPDATE groups SET indexed = true, indexed_at = now() - interval '1 hour' WHERE id = $1",
        &[&b.user.group_id.0],
    )
    .await
    .unwrap();
    let a = place(s, "ada", &["a", "b", "d", "e"]).await.unwrap();
    (b, a)
}

/// A join decided in the shared index commits only if no group the index
/// may not have shown beats it: an unconfirmed group (its founder's add is
/// late, or the founder was killed after its commit) or one confirmed since
/// the decision. Refused, the signup decides again from the store.
#[tokio::test]
async fn a_join_decided_in_the_index_yields_to_a_group_the_index_did_not_show() {
    let place_ = Place::new(true).await;
    let s = place_.open(3).await;
    let Place::Pg(db) = &place_ else {
        unreachable!("postgres")
    };
    let c = db.client().await;
    let (b, a) = confirmed_b_and_unconfirmed_a(&c, s.as_ref()).await;
    assert!(a.founded);
    let to_b = Plan::Join(Candidate {
        id: b.user.group_id,
        attributes: b.group_attributes.clone(),
    });
    let decided_in_index = |name: &str, attrs: &[&str], decided| NewUser {
        decided_in_index: Some(decided),
        ..new_user(name, &set(attrs), to_b.clone())
    };
    let joiner = ["a", "b", "c", "d", "e"];
    let refused = s
        .commit_signup(&decided_in_index("joe", &joiner, std::time::Instant::now()))
        .await;
    assert!(matches!(refused, Err(StoreError::Overlap)), "{refused:?}");
    // A join A does not beat (2 shared with A, 3 with B) goes through.
    let kim = s
        .commit_signup(&decided_in_index(
            "kim",
            &["a", "b", "c", "x"],
            std::time::Instant::now(),
        ))
        .await
        .unwrap();
    assert_eq!(kim.user.group_id, b.user.group_id);
    // A confirmed after the decision: the join is refused all the same.
    let decided = std::time::Instant::now();
    c.execute(
        "UPDATE groups SET indexed = true, indexed_at = now() WHERE id = $1",
        &[&a.user.group_id.0],
    )
    .await
    .unwrap();
    let refused = s
        .commit_signup(&decided_in_index("joe", &joiner, decided))
        .await;
    assert!(matches!(refused, Err(StoreError::Overlap)), "{refused:?}");
    // Nothing of the refused joins stayed; decided from the store, joe
    // joins A.
    assert_eq!(s.counts().await.unwrap(), (2, 3));
    let joe = place(s.as_ref(), "joe", &joiner).await.unwrap();
    assert_eq!(joe.user.group_id, a.user.group_id);
}

/// A replica older than V8 confirms a group with `indexed = true` alone:
/// `indexed_at` is set for it (V10), so a join decided in Redis before that
/// confirmation still yields to the group at its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_confirmed_by_an_older_replica_still_beats_a_join_decided_before() {
    let place_ = Place::new(true).await;
    let s = place_.open(3).await;
    let Place::Pg(db) = &place_ else {
        unreachable!("postgres")
    };
    let c = db.client().await;
    let (b, a) = confirmed_b_and_unconfirmed_a(&c, s.as_ref()).await;
    let decided = std::time::Instant::now();
    // The older replica's confirmation statement, over both groups.
    c.execute(
        "UPDATE groups SET indexed = true WHERE id = ANY($1)",
        &[&vec![a.user.group_id.0, b.user.group_id.0]],
    )
    .await
    .unwrap();
    let joe = NewUser {
        decided_in_index: Some(decided),
        ..new_user(
            "joe",
            &set(&["a", "b", "c", "d", "e"]),
            Plan::Join(Candidate {
                id: b.user.group_id,
                attributes: b.group_attributes.clone(),
            }),
        )
    };
    let refused = s.commit_signup(&joe).await;
    assert!(matches!(refused, Err(StoreError::Overlap)), "{refused:?}");
    // A group confirmed before keeps its time: B's is not moved.
    let b_recent: bool = c
        .query_one(
            "SELECT indexed_at > now() - interval '1 minute' FROM groups WHERE id = $1",
            &[&b.user.group_id.0],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!b_recent);
}
