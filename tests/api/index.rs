//! The Redis script and the database's subset table against the plain
//! linear-scan reference, and the index's lifecycle: sync, verify, repair,
//! threshold change.

use cohort::domain::grouping::LinearScan;
use cohort::domain::{AttributeRules, AttributeSet, Threshold};
use cohort::index::IndexSource;
use cohort::store::Store;
use rand::{RngExt, SeedableRng};

use crate::helpers::*;

fn random_user(rng: &mut impl rand::Rng, vocab: usize, k_max: usize, t: usize) -> AttributeSet {
    let k = rng.random_range(t..=k_max);
    let raw: Vec<String> = (0..k)
        .map(|_| format!("v{}", rng.random_range(0..vocab)))
        .collect();
    let rules = AttributeRules { min: 1, max: 64 };
    AttributeSet::parse(&raw, rules).unwrap()
}

/// Runs `n` random signups through the script, the subset table and the
/// reference; all three must agree on every one.
async fn differential(t: usize, vocab: usize, k_max: usize, n: usize, seed: u64) {
    let p = parts(t, 16).await;
    let threshold = Threshold::new(t, 16).unwrap();
    let mut reference = LinearScan::new(threshold);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..n {
        let user = random_user(&mut rng, vocab, k_max, t);
        if user.len() < t {
            continue;
        }
        let want = reference.assign(&user);
        let got = p.place(&format!("usr{i}"), &user).await;
        // Ids come from a sequence: compare by founding order instead.
        assert_eq!(
            got.founded, want.created,
            "signup {i} ({user:?}) with t={t}"
        );
        assert_eq!(
            got.group_attributes, want.group_attributes,
            "signup {i} with t={t}"
        );
    }
    let report = p.index.verify(p.store.as_ref()).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_and_subset_table_match_linear_scan_on_thousands_of_signups() {
    differential(3, 25, 8, 3_000, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_and_subset_table_match_linear_scan_for_thresholds_1_to_5() {
    for t in 1..=5 {
        differential(t, 8 + 4 * t, 10, 300, t as u64).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subset_table_refuses_an_overlapping_founding_whatever_redis_says() {
    use cohort::store::{NewUser, Plan, StoreError};
    let p = parts(3, 16).await;
    let rules = AttributeRules { min: 3, max: 16 };
    let a = AttributeSet::parse(&["a", "b", "c", "d"], rules).unwrap();
    p.place("first", &a).await;
    // A founder that decided against an index lacking the group (Redis lost
    // it): the commit fails and leaves nothing.
    let b = AttributeSet::parse(&["a", "b", "c", "x"], rules).unwrap();
    let res = p
        .store
        .commit_signup(&NewUser {
            username: cohort::domain::Username::parse("second").unwrap(),
            password_hash: "x".into(),
            attributes: b,
            plan: Plan::Found,
            decided_in_index: None,
            idempotency: None,
        })
        .await;
    assert!(matches!(res, Err(StoreError::Overlap)), "{res:?}");
    let (users, groups) = db_snapshot(&p.db).await;
    assert_eq!((users.len(), groups.len()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_skips_a_current_index_and_repairs_a_partial_one() {
    let p = parts(3, 16).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..200 {
        let user = random_user(&mut rng, 20, 7, 3);
        p.place(&format!("usr{i}"), &user).await;
    }
    let report = p.index.verify(p.store.as_ref()).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.groups_checked > 0);
    let again = p
        .index
        .sync(p.store.as_ref(), 64, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(again.full_pass, 0, "a current index is not rebuilt");
    // Lose one group from Redis, as a restore from an older copy would.
    let (_, groups) = db_snapshot(&p.db).await;
    let victim = groups.last().unwrap().0;
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("HDEL")
        .arg(format!("{}{{idx-t3}}:g", p.prefix.prefix))
        .arg(victim)
        .query_async(&mut conn)
        .await
        .unwrap();
    let report = p.index.verify(p.store.as_ref()).await.unwrap();
    assert_eq!(
        report.problems,
        vec![format!("group {victim} is missing from the index")]
    );
    let repaired = p
        .index
        .sync(p.store.as_ref(), 64, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(repaired.full_pass, groups.len() as u64);
    assert!(
        p.index
            .verify(p.store.as_ref())
            .await
            .unwrap()
            .problems
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_committed_but_never_added_is_added_by_the_unindexed_pass() {
    use cohort::store::{NewUser, Plan};
    let p = parts(3, 16).await;
    let rules = AttributeRules { min: 3, max: 16 };
    let a = AttributeSet::parse(&["a", "b", "c"], rules).unwrap();
    // The founder commits and dies before its add.
    let c = p
        .store
        .commit_signup(&NewUser {
            username: cohort::domain::Username::parse("founder").unwrap(),
            password_hash: "x".into(),
            attributes: a.clone(),
            plan: Plan::Found,
            decided_in_index: None,
            idempotency: None,
        })
        .await
        .unwrap();
    assert!(p.index.decide(&a).await.unwrap().best.is_none());
    // While another process holds the sync lock (an import, a sync), the
    // upkeep may add the group but must leave it unconfirmed: the holder
    // learns what others committed from the unconfirmed groups.
    let lock = p
        .store
        .lock_sync()
        .await
        .unwrap()
        .expect("the lock is free");
    assert_eq!(
        p.index
            .add_unindexed(p.store.as_ref(), false)
            .await
            .unwrap(),
        0
    );
    assert_eq!(p.store.unindexed_groups(10).await.unwrap().len(), 1);
    drop(lock);
    assert!(
        eventually(30, || async {
            p.index
                .add_unindexed(p.store.as_ref(), false)
                .await
                .unwrap()
                == 1
        })
        .await,
        "the upkeep did not confirm the group once the lock was released"
    );
    assert_eq!(
        p.index.decide(&a).await.unwrap().best.map(|b| b.id),
        Some(c.user.group_id)
    );
    assert!(p.store.unindexed_groups(10).await.unwrap().is_empty());
}

fn cohort_cli(backing: &Backing, args: &[&str]) -> std::process::Output {
    let (db, prefix) = match backing {
        Backing::Distributed { db, prefix } => (db, prefix),
        Backing::Embedded { dir } => {
            return std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
                .args(args)
                .env("COHORT_DATA_DIR", dir.path())
                .env_remove("DATABASE_URL")
                .env_remove("REDIS_URL")
                .env_remove("COHORT_MATCH_THRESHOLD")
                .output()
                .unwrap();
        }
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
    // The keeper syncs within about a second; verify agrees then.
    assert!(
        eventually(10, || async {
            cohort_cli(&backing, &["verify"]).status.success()
        })
        .await,
        "{}",
        String::from_utf8_lossy(&cohort_cli(&backing, &["verify"]).stdout)
    );
    let out = cohort_cli(&backing, &["reindex"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("already current"), "{text}");
    let out = cohort_cli(&backing, &["reindex", "--from-scratch"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("reindexed 3 groups"), "{text}");
    let joined = app.signup_ok("after", &["d", "e", "f", "g"]).await;
    assert_eq!(joined["group"]["created"], false);
    // A group the index lost is reported, and exit is 1.
    let Backing::Distributed { prefix, .. } = &backing else {
        unreachable!()
    };
    let mut conn = redis::Client::open(prefix.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("HDEL")
        .arg(format!("{}{{idx-t3}}:g", prefix.prefix))
        .arg(joined["group"]["id"].as_i64().unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = cohort_cli(&backing, &["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("is missing from the index"), "{text}");
    assert!(cohort_cli(&backing, &["reindex"]).status.success());
    assert!(cohort_cli(&backing, &["verify"]).status.success());
    // Could not run at all: exit 2.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["verify"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nothing")
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .env(
            "COHORT_JWT_SECRET",
            "test secret that is at least 32 bytes long",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Groups that share t attributes cannot be founded at this threshold,
/// but exist after it was lowered (`cohort set-threshold`, which rebuilds
/// Postgres's subset table; embedded mode indexes its groups for the new
/// threshold at the next start). The table and the index keep every one of
/// them findable, and none can be overlapped again.
async fn overlapping_groups_after_lowering(mode: Mode) {
    let backing = Backing::new(mode).await;
    let t4 = spawn_with(backing.clone(), |s| s.match_threshold = 4).await;
    let ann = t4.signup_ok("ann", &["a", "b", "c", "d"]).await;
    let bob = t4.signup_ok("bob", &["a", "b", "c", "e"]).await;
    let cat = t4.signup_ok("cat", &["a", "b", "c", "d", "e"]).await;
    let dan = t4.signup_ok("dan", &["a", "b", "c", "f"]).await;
    // At 4 they are three groups; cat shares 4 with two and joins the first.
    for founder in [&ann, &bob, &dan] {
        assert_eq!(founder["group"]["created"], true);
    }
    assert_eq!(cat["group"]["id"], ann["group"]["id"]);
    t4.stop().await;
    let out = cohort_cli(&backing, &["set-threshold", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The rebuilt table holds every group's 3-subsets (the overlapping ones
    // as overlap rows), and nothing else (Postgres).
    assert_subset_table_complete(&backing, 3).await;
    let t3 = spawn_with(backing.clone(), |_| {}).await;
    // She shares 4 with bob's group, 3 with the others.
    let placed = t3.signup_ok("eve", &["a", "b", "c", "e", "q"]).await;
    assert_eq!(placed["group"]["id"], bob["group"]["id"]);
    // ann's and bob's groups both share 4 with her; the smaller id wins.
    let placed = t3.signup_ok("flo", &["a", "b", "c", "d", "e"]).await;
    assert_eq!(placed["group"]["id"], ann["group"]["id"]);
    let placed = t3.signup_ok("fay", &["a", "b", "c", "f"]).await;
    assert_eq!(placed["group"]["id"], dan["group"]["id"]);
    let placed = t3.signup_ok("gil", &["a", "b", "e", "x"]).await;
    assert_eq!(placed["group"]["id"], bob["group"]["id"]);
    // Nothing new may overlap any of them.
    let res = t3.signup_ok("gus", &["b", "c", "f", "z"]).await;
    assert_eq!(res["group"]["created"], false);
    if matches!(mode, Mode::Distributed) {
        // Once the keeper trusts Redis, it decides the same.
        assert!(
            eventually(10, || async {
                cohort_cli(&backing, &["verify"]).status.success()
            })
            .await
        );
        let placed = t3.signup_ok("hal", &["a", "b", "c", "e", "r"]).await;
        assert_eq!(placed["group"]["id"], bob["group"]["id"]);
    } else {
        // The in-process index is rebuilt from the table at every start.
        t3.stop().await;
        let again = spawn_with(backing.clone(), |_| {}).await;
        let placed = again.signup_ok("hal", &["a", "b", "c", "e", "r"]).await;
        assert_eq!(placed["group"]["id"], bob["group"]["id"]);
        let placed = again.signup_ok("ivy", &["a", "b", "e", "y"]).await;
        assert_eq!(placed["group"]["id"], bob["group"]["id"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_stored_groups_stay_findable_and_block_new_overlaps() {
    overlapping_groups_after_lowering(Mode::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_groups_after_lowering_the_threshold_embedded() {
    overlapping_groups_after_lowering(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_threshold_refuses_signups_and_says_how_to_fix_it() {
    let backing = Backing::new(Mode::Distributed).await;
    let t3 = spawn_with(backing.clone(), |_| {}).await;
    t3.signup_ok("ann", &["a", "b", "c", "d"]).await;
    let t4 = spawn_with(backing.clone(), |s| s.match_threshold = 4).await;
    let body = assert_problem(t4.signup("ben", &["a", "b", "c", "d", "e"]).await, 500).await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("set-threshold"), "{detail}");
    assert!(detail.contains("COHORT_MATCH_THRESHOLD=4"), "{detail}");
    // Reads still work there; the t=3 replica goes on.
    assert_eq!(t4.get("/readyz").await.status().as_u16(), 200);
    t3.signup_ok("cat", &["a", "b", "c", "x"]).await;
    let (users, groups) = db_snapshot(backing.db().unwrap()).await;
    assert_eq!(users.len(), 2);
    assert_invariants(&users, &groups, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_of_the_previous_layout_is_replaced() {
    let p = parts(3, 16).await;
    let rules = AttributeRules { min: 3, max: 16 };
    p.place(
        "first",
        &AttributeSet::parse(&["a", "b", "c"], rules).unwrap(),
    )
    .await;
    // What the first design left in Redis: an epoch in meta and per-epoch
    // keys.
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let base = format!("{}{{idx-t3}}", p.prefix.prefix);
    let _: () = redis::cmd("HSET")
        .arg(format!("{base}:meta"))
        .arg(&["epoch", "5", "state", "ready", "buckets", "64"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("{base}:e5:g"))
        .arg(&["1", "x\x1fy\x1fz"])
        .query_async(&mut conn)
        .await
        .unwrap();
    p.index
        .sync(p.store.as_ref(), 64, &|_, _| {})
        .await
        .unwrap();
    let old: bool = redis::cmd("EXISTS")
        .arg(format!("{base}:e5:g"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!old, "the previous layout's keys are dropped");
    let report = p.index.verify(p.store.as_ref()).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// The statement failed as a foreign key violation (the triggers of
/// migrations V6 and V7 raise it).
fn fk(e: tokio_postgres::Error) {
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{e}"
    );
}

/// The subset tables name existing groups only (checked once a statement,
/// not once a row: migrations V6 and V9), and a group they name cannot be
/// deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subset_tables_only_name_existing_groups() {
    let backing = Backing::new(Mode::Distributed).await;
    let app = spawn_with(backing.clone(), |_| {}).await;
    let ann = app.signup_ok("ann", &["a", "b", "c"]).await;
    let c = backing.db().unwrap().client().await;
    let key = "07070707-0707-0707-0707-070707070707";
    for table in ["subset_owners", "subset_overlaps"] {
        let sql = format!("INSERT INTO {table} (subset, group_id) VALUES ($1::text::uuid, $2)");
        fk(c.execute(&sql, &[&key, &424_242i64]).await.unwrap_err());
        let sql = format!("UPDATE {table} SET group_id = 424242");
        fk(c.execute(&sql, &[]).await.unwrap_err());
    }
    // A group with subset rows and no members still cannot go.
    c.execute(
        "INSERT INTO groups (id, attributes) VALUES (424242, '{x,y,z}')",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO subset_owners (subset, group_id) VALUES ($1::text::uuid, 424242)",
        &[&key],
    )
    .await
    .unwrap();
    fk(c.execute("DELETE FROM groups WHERE id = 424242", &[])
        .await
        .unwrap_err());
    // Nothing of it changed the real group.
    let count: i64 = c
        .query_one(
            "SELECT count(*) FROM subset_owners WHERE group_id = $1",
            &[&ann["group"]["id"].as_i64().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}

/// A replica of the version before V9 writes the subset rows of a founding
/// into the old tables (`threshold`, `subset` as bytes): each row lands in
/// the new ones instead, under the same key the new replicas write, so a
/// founding of either version that overlaps one of the other is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_the_previous_version_is_arbitrated_by_the_same_key() {
    let backing = Backing::new(Mode::Distributed).await;
    let app = spawn_with(backing.clone(), |_| {}).await;
    app.signup_ok("ann", &["a", "b", "c"]).await;
    let c = backing.db().unwrap().client().await;
    let t = cohort::domain::Threshold::new(3, 16).unwrap();
    let key = |attrs: &[&str]| {
        let set = cohort::domain::AttributeSet::from_stored(
            &attrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        cohort::domain::grouping::subset_keys(&set, t)[0].to_vec()
    };
    // The old version's founding, for a group overlapping ann's: refused.
    let old_founding = "INSERT INTO group_subsets (threshold, subset, group_id) \
                        SELECT $1, unnest($2::bytea[]), $3";
    c.batch_execute("BEGIN; INSERT INTO groups (id, attributes) VALUES (424242, '{a,b,c,d}')")
        .await
        .unwrap();
    let e = c
        .execute(
            old_founding,
            &[&3i16, &vec![key(&["a", "b", "c"])], &424_242i64],
        )
        .await
        .unwrap_err();
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        e.as_db_error().and_then(|d| d.constraint()),
        Some("subset_owners_pkey"),
        "{e}"
    );
    // One that overlaps nothing is kept, in the new table only, under the
    // same 16 bytes.
    let fresh = key(&["x", "y", "z"]);
    c.batch_execute("BEGIN; INSERT INTO groups (id, attributes) VALUES (424243, '{x,y,z}')")
        .await
        .unwrap();
    c.execute(old_founding, &[&3i16, &vec![fresh.clone()], &424_243i64])
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let owner: i64 = c
        .query_one(
            "SELECT group_id FROM subset_owners WHERE uuid_send(subset) = $1",
            &[&fresh],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, 424_243);
    let old_rows: i64 = c
        .query_one("SELECT count(*) FROM group_subsets", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(old_rows, 0);
    // And the new version's founding of x, y, z now meets it.
    let joe = app.signup_ok("joe", &["x", "y", "z"]).await;
    assert_eq!(joe["group"]["id"].as_i64(), Some(424_243), "{joe}");
}

/// Users and the member counters name existing groups only (checked once a
/// statement, not once a row: migration V7), a user never moves to another
/// group, and a group with members cannot be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_only_name_existing_groups() {
    let backing = Backing::new(Mode::Distributed).await;
    let app = spawn_with(backing.clone(), |_| {}).await;
    let ann = app.signup_ok("ann", &["a", "b", "c"]).await;
    let group = ann["group"]["id"].as_i64().unwrap();
    let c = backing.db().unwrap().client().await;
    let insert = "INSERT INTO users (username, password_hash, attributes, group_id) \
                  SELECT n, 'x', '{a,b,c}', g FROM unnest($1::text[], $2::bigint[]) AS u(n, g)";
    // One missing group among existing ones fails the whole statement.
    fk(
        c.execute(insert, &[&vec!["bob", "cat"], &vec![group, 424_242i64]])
            .await
            .unwrap_err(),
    );
    fk(c.execute("UPDATE users SET group_id = 424242", &[])
        .await
        .unwrap_err());
    fk(
        c.execute("UPDATE group_member_counts SET group_id = 424242", &[])
            .await
            .unwrap_err(),
    );
    // A group with members (and no subset rows) cannot go.
    c.execute(
        "INSERT INTO groups (id, attributes) VALUES (424242, '{x,y,z}')",
        &[],
    )
    .await
    .unwrap();
    c.execute(insert, &[&vec!["dan"], &vec![424_242i64]])
        .await
        .unwrap();
    fk(c.execute("DELETE FROM groups WHERE id = 424242", &[])
        .await
        .unwrap_err());
    // Nothing of the failed statements stayed: ann's group has ann only,
    // and its counter says so.
    let token = app.token("ann").await;
    let body: serde_json::Value = app
        .get_auth("/v1/me/group", &token)
        .await
        .json()
        .await
        .unwrap();
    let members: Vec<&str> = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["username"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["ann"]);
    assert_eq!(body["group"]["member_count"], 1);
    let count: i64 = c
        .query_one(
            "SELECT sum(n)::bigint FROM group_member_counts WHERE group_id = $1",
            &[&group],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}
