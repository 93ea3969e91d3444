use serde_json::{Value, json};

use crate::both_modes;
use crate::helpers::*;

fn group_id(v: &Value) -> i64 {
    v["group"]["id"].as_i64().unwrap()
}

both_modes!(
    seed_example_two_users_one_group,
    |app: TestApp| async move {
        let u1 = app
            .signup_ok(
                "user1",
                &["Software", "Engineer", "Brussels", "Belgium", "Senior"],
            )
            .await;
        assert_eq!(u1["group"]["created"], true);
        assert_eq!(
            u1["attributes"],
            json!(["belgium", "brussels", "engineer", "senior", "software"])
        );
        let u2 = app
            .signup_ok("user2", &["Software", "Engineer", "Gamer", "Senior"])
            .await;
        assert_eq!(group_id(&u2), group_id(&u1));
        assert_eq!(u2["group"]["created"], false);
        assert_eq!(
            u2["shared_attributes"],
            json!(["engineer", "senior", "software"])
        );
        assert_eq!(u2["group"]["attributes"], u1["attributes"]);
        assert_eq!(u2["username"], "user2");
        assert!(u2["user_id"].as_i64().unwrap() > u1["user_id"].as_i64().unwrap());
    }
);

both_modes!(
    identical_attributes_share_a_group,
    |app: TestApp| async move {
        let a = app.signup_ok("ann", &["chess", "paris", "teacher"]).await;
        // Same set after canonicalisation: case, width, spaces, duplicates.
        let b = app
            .signup_ok("ben", &[" CHESS ", "Paris", "teacher", "ｔｅａｃｈｅｒ"])
            .await;
        assert_eq!(group_id(&a), group_id(&b));
        assert_eq!(b["attributes"], json!(["chess", "paris", "teacher"]));
    }
);

both_modes!(
    three_of_five_joins_nothing_shared_founds,
    |app: TestApp| async move {
        let a = app.signup_ok("ann", &["a1", "a2", "a3", "a4", "a5"]).await;
        let b = app.signup_ok("ben", &["a1", "a2", "a3", "b4", "b5"]).await;
        assert_eq!(group_id(&a), group_id(&b));
        // Two shared is below the threshold: a new group.
        let c = app.signup_ok("cat", &["a1", "a2", "c3", "c4", "c5"]).await;
        assert_ne!(group_id(&c), group_id(&a));
        assert_eq!(c["group"]["created"], true);
        let d = app.signup_ok("dan", &["x", "y", "z"]).await;
        assert_eq!(d["group"]["created"], true);
        assert_eq!(d["shared_attributes"], json!(["x", "y", "z"]));
    }
);

both_modes!(
    most_shared_wins_and_ties_go_to_the_oldest,
    |app: TestApp| async move {
        let g1 = group_id(&app.signup_ok("ann", &["a", "b", "c", "d"]).await);
        let g2 = group_id(&app.signup_ok("ben", &["e", "f", "g", "h", "i"]).await);
        assert!(g1 < g2);
        // Shares 3 with g1 and 4 with g2: the one sharing most.
        let most = app
            .signup_ok("cat", &["a", "b", "c", "e", "f", "g", "h"])
            .await;
        assert_eq!(group_id(&most), g2);
        // Shares 3 with each: the oldest.
        let tie = app.signup_ok("dan", &["a", "b", "c", "e", "f", "g"]).await;
        assert_eq!(group_id(&tie), g1);
        assert_eq!(tie["shared_attributes"], json!(["a", "b", "c"]));
    }
);

both_modes!(
    invalid_fields_get_422_with_every_error,
    |app: TestApp| async move {
        let res = app
            .post_json(
                "/v1/signup",
                &json!({"username": "A B", "password": "short", "attributes": ["ok", "", "x"]}),
            )
            .await;
        let body = assert_problem(res, 422).await;
        let fields: Vec<&str> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, ["username", "password", "attributes[1]"]);
        // Too few after merging duplicates; too many.
        let res = app.signup("ann", &["a", "A", "b"]).await;
        assert_problem(res, 422).await;
        let many: Vec<String> = (0..17).map(|i| format!("attr{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_problem(app.signup("ann", &many).await, 422).await;
        // Invisible format characters (zero-width, bidi overrides).
        let body = assert_problem(
            app.signup("ann", &["soft\u{200B}ware", "b", "c"]).await,
            422,
        )
        .await;
        assert_eq!(body["errors"][0]["field"], "attributes[0]");
        assert_problem(app.signup("ann", &["\u{202E}a", "b", "c"]).await, 422).await;
        // Missing fields and wrong types are field errors too.
        assert_problem(app.post_json("/v1/signup", &json!({})).await, 422).await;
        assert_problem(
            app.post_json(
                "/v1/signup",
                &json!({"username": 5, "password": PASSWORD, "attributes": []}),
            )
            .await,
            422,
        )
        .await;
        // Password bounds: exactly as given, 15..=128.
        let res = app
        .post_json(
            "/v1/signup",
            &json!({"username": "ann", "password": "x".repeat(129), "attributes": ["a", "b", "c"]}),
        )
        .await;
        assert_problem(res, 422).await;
        // Nothing was written by any of these.
        let ok = app.signup_ok("ann", &["a", "b", "c"]).await;
        assert_eq!(ok["group"]["created"], true);
    }
);

both_modes!(
    username_taken_is_409_case_insensitively,
    |app: TestApp| async move {
        app.signup_ok("alice", &["a", "b", "c"]).await;
        let body = assert_problem(app.signup("ALICE", &["d", "e", "f"]).await, 409).await;
        assert!(body["detail"].as_str().unwrap().contains("taken"));
        // The failed signup founded no group: this one founds the second.
        let next = app.signup_ok("bob", &["d", "e", "f"]).await;
        assert_eq!(next["group"]["created"], true);
    }
);

both_modes!(
    malformed_oversized_and_wrong_type_bodies,
    |app: TestApp| async move {
        let res = app
            .http
            .post(app.url("/v1/signup"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_problem(res, 400).await;
        let res = app
            .http
            .post(app.url("/v1/signup"))
            .header("content-type", "text/plain")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_problem(res, 415).await;
        let big =
            json!({"username": "ann", "password": PASSWORD, "attributes": ["x".repeat(17 * 1024)]});
        assert_problem(app.post_json("/v1/signup", &big).await, 413).await;
    }
);

both_modes!(
    unicode_usernames_and_long_attributes_are_rejected,
    |app: TestApp| async move {
        // KELVIN SIGN lower-cases to 'k': refused before folding.
        assert_problem(app.signup("\u{212A}ate", &["a", "b", "c"]).await, 422).await;
        // U+FDFA expands to 18 characters under NFKC: 4 of them exceed 64.
        let long = "\u{FDFA}".repeat(4);
        assert_problem(app.signup("kate", &[&long, "b", "c"]).await, 422).await;
    }
);
