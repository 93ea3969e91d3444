use serde_json::{Value, json};

use crate::both_modes;
use crate::helpers::*;

both_modes!(signin_issues_a_bearer_token, |app: TestApp| async move {
    app.signup_ok("alice", &["a", "b", "c"]).await;
    let res = app.signin("Alice", PASSWORD).await;
    assert_eq!(res.status().as_u16(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let token = body["access_token"].as_str().unwrap();
    let me: Value = app.get_auth("/v1/me", token).await.json().await.unwrap();
    assert_eq!(me["username"], "alice");
    assert_eq!(me["attributes"], json!(["a", "b", "c"]));
    assert!(me["group_id"].as_i64().is_some());
    assert!(me["created_at"].as_str().unwrap().contains('T'));
});

both_modes!(
    unknown_user_and_wrong_password_look_the_same,
    |app: TestApp| async move {
        app.signup_ok("alice", &["a", "b", "c"]).await;
        let wrong = app.signin("alice", "not the password at all").await;
        let wrong_h = wrong.headers().get("www-authenticate").cloned();
        let wrong = assert_problem(wrong, 401).await;
        let unknown = assert_problem(app.signin("nobody", PASSWORD).await, 401).await;
        assert_eq!(wrong, unknown);
        assert_eq!(wrong_h.unwrap(), "Bearer");
    }
);

both_modes!(
    password_is_taken_exactly_as_given,
    |app: TestApp| async move {
        let spaced = "  padded password here  ";
        let res = app
            .post_json(
                "/v1/signup",
                &json!({"username": "pad", "password": spaced, "attributes": ["a", "b", "c"]}),
            )
            .await;
        assert_eq!(res.status().as_u16(), 201);
        assert_eq!(app.signin("pad", spaced).await.status().as_u16(), 200);
        assert_eq!(
            app.signin("pad", spaced.trim()).await.status().as_u16(),
            401
        );
    }
);

both_modes!(
    repeated_failures_are_throttled_per_account,
    |app: TestApp| async move {
        app.signup_ok("alice", &["a", "b", "c"]).await;
        app.signup_ok("bob", &["a", "b", "c"]).await;
        // The test settings allow 5 failures per account.
        for _ in 0..5 {
            assert_eq!(
                app.signin("alice", "wrong password, again")
                    .await
                    .status()
                    .as_u16(),
                401
            );
        }
        let res = app.signin("alice", PASSWORD).await;
        let retry: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry >= 1);
        assert_problem(res, 429).await;
        // Another account is not affected.
        assert_eq!(app.signin("bob", PASSWORD).await.status().as_u16(), 200);
    }
);

both_modes!(bad_tokens_get_401, |app: TestApp| async move {
    assert_problem(app.get("/v1/me").await, 401).await;
    assert_problem(app.get_auth("/v1/me", "not.a.token").await, 401).await;
    let res = app
        .http
        .get(app.url("/v1/me/group"))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_problem(res, 401).await;
    // A token signed with another secret.
    use jsonwebtoken::{EncodingKey, Header, encode};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims =
        json!({"sub": "1", "iss": "cohort", "aud": "cohort-api", "iat": now, "exp": now + 60});
    let forged = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(b"some other secret of 32 bytes or more"),
    )
    .unwrap();
    assert_problem(app.get_auth("/v1/me", &forged).await, 401).await;
});

both_modes!(
    a_concurrent_burst_is_cut_at_the_limit_and_the_owner_still_gets_in,
    |app: TestApp| async move {
        app.signup_ok("target", &["a", "b", "c"]).await;
        // 40 wrong guesses at once from one address (the limit is 5).
        let mut tasks = Vec::new();
        for i in 0..40 {
            let http = app.http.clone();
            let url = app.url("/v1/signin");
            tasks.push(tokio::spawn(async move {
                http.post(url)
                    .json(&serde_json::json!({"username": "target", "password": format!("wrong guess number {i}")}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
        let mut evaluated = 0;
        for t in tasks {
            match t.await.unwrap() {
                401 => evaluated += 1,
                429 => {}
                other => panic!("unexpected {other}"),
            }
        }
        assert!(
            evaluated <= 5,
            "{evaluated} guesses were evaluated; the limit is 5"
        );
        // The owner, from another address, is not locked out.
        let owner = reqwest::Client::builder()
            .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap();
        let res = owner
            .post(app.url("/v1/signin"))
            .json(&serde_json::json!({"username": "target", "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 200);
    }
);
