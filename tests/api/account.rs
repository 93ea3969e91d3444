//! The account lifecycle: changing the password and deleting the account
//! both revoke every token issued before; a deleted user leaves its group's
//! member list and count, and the group stays.

use serde_json::{Value, json};

use crate::both_modes;
use crate::helpers::*;

const NEW: &str = "a brand new passphrase";

both_modes!(
    password_change_revokes_earlier_tokens,
    |app: TestApp| async move {
        app.signup_ok("alice", &["a", "b", "c"]).await;
        let old = app.token("alice").await;
        let put = |token: &str, body: Value| {
            app.http
                .put(app.url("/v1/me/password"))
                .bearer_auth(token)
                .json(&body)
                .send()
        };
        // Wrong current password: 401, nothing changes.
        let res = put(
            &old,
            json!({"current_password": "not the password at all", "new_password": NEW}),
        )
        .await
        .unwrap();
        assert_problem(res, 401).await;
        // An invalid new one: 422.
        let res = put(
            &old,
            json!({"current_password": PASSWORD, "new_password": "short"}),
        )
        .await
        .unwrap();
        let body = assert_problem(res, 422).await;
        assert_eq!(body["errors"][0]["field"], "new_password");
        assert_eq!(app.get_auth("/v1/me", &old).await.status().as_u16(), 200);

        let res = put(
            &old,
            json!({"current_password": PASSWORD, "new_password": NEW}),
        )
        .await
        .unwrap();
        assert_eq!(res.status().as_u16(), 204);
        // The old token is revoked everywhere; the old password is gone.
        assert_problem(app.get_auth("/v1/me", &old).await, 401).await;
        assert_problem(app.get_auth("/v1/me/group", &old).await, 401).await;
        assert_problem(app.signin("alice", PASSWORD).await, 401).await;
        let res = app.signin("alice", NEW).await;
        assert_eq!(res.status().as_u16(), 200);
        let fresh: Value = res.json().await.unwrap();
        let fresh = fresh["access_token"].as_str().unwrap();
        assert_eq!(app.get_auth("/v1/me", fresh).await.status().as_u16(), 200);
    }
);

both_modes!(
    account_deletion_leaves_the_group,
    |app: TestApp| async move {
        let founder = app.signup_ok("founder", &["a", "b", "c", "d"]).await;
        app.signup_ok("stays", &["a", "b", "c", "x"]).await;
        let token = app.token("founder").await;
        let del = |password: &str| {
            app.http
                .delete(app.url("/v1/me"))
                .bearer_auth(&token)
                .json(&json!({"password": password}))
                .send()
        };
        assert_problem(del("not the password at all").await.unwrap(), 401).await;
        assert_eq!(del(PASSWORD).await.unwrap().status().as_u16(), 204);
        // Its tokens are revoked, it cannot sign in, and it is gone from the
        // group, which stays with its attributes.
        assert_problem(app.get_auth("/v1/me", &token).await, 401).await;
        assert_problem(app.signin("founder", PASSWORD).await, 401).await;
        let other = app.token("stays").await;
        let group: Value = app
            .get_auth("/v1/me/group", &other)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(group["group"]["id"], founder["group"]["id"]);
        assert_eq!(group["group"]["member_count"], 1);
        assert_eq!(group["group"]["attributes"], json!(["a", "b", "c", "d"]));
        let names: Vec<&str> = group["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["username"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["stays"]);
        // The group's attributes still decide: a newcomer sharing 3 joins it.
        let joined = app.signup_ok("newcomer", &["b", "c", "d", "q"]).await;
        assert_eq!(joined["group"]["id"], founder["group"]["id"]);
    }
);
