//! Methods: HEAD wherever GET, and 405 with `Allow` for the others.

use reqwest::{Method, Response};

use crate::helpers::*;

/// Headers that legitimately differ between two answers to the same request.
const PER_RESPONSE: [&str; 2] = ["date", "x-request-id"];

fn comparable_headers(res: &Response, path: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = res
        .headers()
        .iter()
        .filter(|(name, _)| !PER_RESPONSE.contains(&name.as_str()))
        // The metrics change between two scrapes, and so does their length.
        .filter(|(name, _)| !(path == "/metrics" && name.as_str() == "content-length"))
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_wherever_get_does_without_a_body() {
    let app = spawn_app(Mode::Embedded).await;
    app.signup_ok("ann", &["a", "b", "c"]).await;
    let token = app.token("ann").await;
    let cases: [(&str, Option<&str>, u16); 11] = [
        ("/healthz", None, 200),
        ("/readyz", None, 200),
        ("/metrics", None, 200),
        ("/openapi.json", None, 200),
        ("/docs", None, 200),
        ("/v1/me", Some(&token), 200),
        ("/v1/me/group?limit=1", Some(&token), 200),
        // Errors alike: HEAD is GET without the body, whatever the status.
        ("/v1/me", None, 401),
        ("/v1/me/group?limit=0", Some(&token), 400),
        ("/v1/me/group", Some("not a token"), 401),
        ("/no/such/path", None, 404),
    ];
    for (path, auth, status) in cases {
        let send = |method: Method| {
            let mut req = app.http.request(method, app.url(path));
            if let Some(t) = auth {
                req = req.bearer_auth(t);
            }
            req.send()
        };
        let get = send(Method::GET).await.unwrap();
        let head = send(Method::HEAD).await.unwrap();
        assert_eq!(get.status().as_u16(), status, "GET {path}");
        assert_eq!(head.status().as_u16(), status, "HEAD {path}");
        assert!(head.headers().contains_key("x-request-id"), "HEAD {path}");
        assert_eq!(
            comparable_headers(&head, path),
            comparable_headers(&get, path),
            "HEAD {path} and GET {path} differ in their headers"
        );
        assert!(!get.bytes().await.unwrap().is_empty(), "GET {path}");
        assert!(
            head.bytes().await.unwrap().is_empty(),
            "HEAD {path} has a body"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_get_405_with_allow() {
    let app = spawn_app(Mode::Embedded).await;
    let cases = [
        (Method::GET, "/v1/signup", "POST"),
        // HEAD only where GET is.
        (Method::HEAD, "/v1/signup", "POST"),
        (Method::HEAD, "/v1/signin", "POST"),
        (Method::POST, "/v1/me", "GET, HEAD, DELETE"),
        (Method::PATCH, "/v1/me", "GET, HEAD, DELETE"),
        (Method::GET, "/v1/me/password", "PUT"),
        (Method::DELETE, "/v1/me/group", "GET, HEAD"),
        (Method::POST, "/healthz", "GET, HEAD"),
        (Method::PUT, "/readyz", "GET, HEAD"),
        (Method::POST, "/metrics", "GET, HEAD"),
        (Method::OPTIONS, "/openapi.json", "GET, HEAD"),
        (Method::DELETE, "/docs", "GET, HEAD"),
    ];
    for (method, path, allow) in cases {
        let res = app
            .http
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(res.headers()["allow"], allow, "{method} {path}");
        if method == Method::HEAD {
            assert_eq!(res.status().as_u16(), 405, "{method} {path}");
            assert!(res.bytes().await.unwrap().is_empty());
        } else {
            assert_problem(res, 405).await;
        }
    }
}
