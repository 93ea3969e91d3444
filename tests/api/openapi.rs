//! The OpenAPI document: the committed copy is the one the code serves.

use serde_json::Value;

use crate::helpers::*;

/// `docs/openapi.json` is what `/openapi.json` serves. Regenerate it with
/// `COHORT_UPDATE_OPENAPI=1 cargo test --test api openapi`.
#[test]
fn committed_spec_is_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    let generated = format!("{}\n", cohort::http::openapi::spec_json());
    if std::env::var("COHORT_UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(path, &generated).expect("docs/openapi.json is writable");
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "docs/openapi.json differs from the spec the code generates (first at line {}).\n\
             Regenerate it with `COHORT_UPDATE_OPENAPI=1 cargo test --test api openapi` \
             and commit the result.",
            line + 1
        );
    }
}

/// A server serves the document with its own attribute bounds: the
/// committed one with the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_spec_has_the_deployments_bounds() {
    let app = spawn_app(Mode::Embedded).await;
    let res = app.get("/openapi.json").await;
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(
        res.text().await.unwrap(),
        cohort::http::openapi::spec_json()
    );

    let backing = Backing::new(Mode::Embedded).await;
    let app = spawn_with(backing, |s| {
        s.match_threshold = 4;
        s.max_attributes = 10;
    })
    .await;
    let spec: Value = app.get("/openapi.json").await.json().await.unwrap();
    let attributes = &spec["components"]["schemas"]["SignupRequest"]["properties"]["attributes"];
    assert_eq!(attributes["minItems"], 4);
    assert_eq!(attributes["maxItems"], 10);
}
