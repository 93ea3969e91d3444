use serde_json::{Value, json};

use crate::both_modes;
use crate::helpers::*;

both_modes!(
    members_in_join_order_with_pagination,
    |app: TestApp| async move {
        let names = ["mem0", "mem1", "mem2", "mem3", "mem4"];
        for n in names {
            app.signup_ok(n, &["red", "green", "blue", n]).await;
        }
        // An outsider in another group never shows.
        app.signup_ok("outsider", &["x", "y", "z"]).await;
        let token = app.token("mem3").await;
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10 {
            let path = match &cursor {
                None => "/v1/me/group?limit=2".to_string(),
                Some(c) => format!("/v1/me/group?limit=2&cursor={c}"),
            };
            let res = app.get_auth(&path, &token).await;
            assert_eq!(res.status().as_u16(), 200);
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["group"]["member_count"], 5);
            assert_eq!(
                body["group"]["attributes"],
                json!(["blue", "green", "mem0", "red"])
            );
            assert_eq!(body["shared_attributes"], json!(["blue", "green", "red"]));
            for m in body["members"].as_array().unwrap() {
                seen.push(m["username"].as_str().unwrap().to_owned());
            }
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, names);
    }
);

both_modes!(default_page_and_bad_parameters, |app: TestApp| async move {
    app.signup_ok("ann", &["a", "b", "c"]).await;
    let token = app.token("ann").await;
    let body: Value = app
        .get_auth("/v1/me/group", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["members"].as_array().unwrap().len(), 1);
    assert_eq!(body["next_cursor"], Value::Null);
    for bad in [
        "limit=0",
        "limit=501",
        "limit=x",
        "cursor=garbage",
        "cursor=",
    ] {
        let res = app.get_auth(&format!("/v1/me/group?{bad}"), &token).await;
        assert_problem(res, 400).await;
    }
    assert_problem(app.get("/v1/me/group").await, 401).await;
});
