//! The OpenAPI description, generated from the handlers' annotations, and
//! the handler that serves it. It depends on `routes`; never the reverse.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "cohort", description = "Places every new user into a group of people like them."),
    paths(routes::signup, routes::signin, routes::me, routes::delete_me, routes::change_password, routes::my_group, routes::healthz, routes::readyz),
    components(schemas(
        routes::SignupRequest, routes::SignupResponse, routes::GroupRef,
        routes::SigninRequest, routes::SigninResponse, routes::MeResponse,
        routes::GroupResponse, routes::GroupDetail, routes::MemberView,
        routes::PasswordChange, routes::AccountDeletion,
        super::problem::Problem, crate::domain::FieldError,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(c) = openapi.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .build(),
                ),
            );
        }
    }
}

/// The spec as JSON, built once: it never changes while the process runs.
pub fn spec_json() -> &'static str {
    static SPEC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the spec serialises")
    })
}

/// `GET /openapi.json`.
pub async fn serve() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("application/json")
        .body(spec_json())
}

/// `GET /docs`: a page that renders the spec for people. Self-contained (no
/// CDN): it fetches `/openapi.json` from this server.
pub async fn docs() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("assets/docs.html"))
}
