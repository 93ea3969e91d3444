//! Three instances on one database and one Redis prefix, many concurrent
//! clients, a small vocabulary so that collisions are everywhere: the result
//! must still be one that a single process would give.

use std::collections::HashMap;
use std::sync::Arc;

use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

use crate::helpers::*;

const SIGNUPS: usize = 2_000;
const CLIENTS: usize = 32;
const VOCABULARY: [&str; 10] = [
    "software", "engineer", "brussels", "belgium", "senior", "gamer", "paris", "junior", "music",
    "chess",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_signups_over_three_replicas_keep_every_invariant() {
    let backing = Backing::new(Mode::Distributed).await;
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(Arc::new(
            spawn_with(backing.clone(), |s| s.workers = Some(2)).await,
        ));
    }
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let apps = apps.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
            let mut acks = Vec::new();
            for i in (c..SIGNUPS).step_by(CLIENTS) {
                let app = &apps[i % apps.len()];
                let k = rng.random_range(3..=6);
                let mut attrs: Vec<&str> = Vec::new();
                while attrs.len() < k {
                    let a = VOCABULARY[rng.random_range(0..VOCABULARY.len())];
                    if !attrs.contains(&a) {
                        attrs.push(a);
                    }
                }
                let username = format!("user{i}");
                let res = app
                    .post_json(
                        "/v1/signup",
                        &json!({"username": username, "password": PASSWORD, "attributes": attrs}),
                    )
                    .await;
                let status = res.status().as_u16();
                let body: Value = res.json().await.unwrap();
                assert_eq!(status, 201, "{body}");
                acks.push((
                    body["user_id"].as_i64().unwrap(),
                    body["group"]["id"].as_i64().unwrap(),
                    body["group"]["created"].as_bool().unwrap(),
                ));
            }
            acks
        }));
    }
    let mut acks = Vec::new();
    for t in tasks {
        acks.extend(t.await.unwrap());
    }
    assert_eq!(acks.len(), SIGNUPS);

    let (users, groups) = db_snapshot(backing.db().unwrap()).await;
    assert_eq!(users.len(), SIGNUPS, "every signup landed exactly once");
    let placed: HashMap<i64, i64> = users.iter().map(|(u, g, _)| (*u, *g)).collect();
    for (user, group, _) in &acks {
        assert_eq!(
            placed.get(user),
            Some(group),
            "user {user} is not in the group it was told"
        );
    }
    // Each group founded exactly once, by a response that said so.
    let founded = acks.iter().filter(|a| a.2).count();
    assert_eq!(founded, groups.len());
    assert_invariants(&users, &groups, 3);
    // Founders: every group's attributes are one of its members' own.
    for (gid, gattrs) in &groups {
        assert!(
            users.iter().any(|(_, g, a)| g == gid && a == gattrs),
            "group {gid} has no founder among its members"
        );
    }
}
