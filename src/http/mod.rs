//! The HTTP API: routes, problem+json errors, extractors and middleware.

mod auth;
pub mod client;
mod middleware;
pub mod openapi;
pub mod problem;
mod routes;

use actix_web::error::{JsonPayloadError, QueryPayloadError};
use actix_web::middleware::DefaultHeaders;
use actix_web::{HttpRequest, guard, web};

use crate::error::AppError;

/// The contract's body limit.
pub const BODY_LIMIT: usize = 16 * 1024;

fn json_error(err: JsonPayloadError, req: &HttpRequest) -> actix_web::Error {
    let app = match &err {
        JsonPayloadError::ContentType => AppError::UnsupportedMediaType,
        JsonPayloadError::OverflowKnownLength { .. } | JsonPayloadError::Overflow { .. } => {
            AppError::PayloadTooLarge(BODY_LIMIT)
        }
        JsonPayloadError::Deserialize(e) if e.is_data() => {
            AppError::Validation(vec![crate::domain::FieldError::new("body", e.to_string())])
        }
        JsonPayloadError::Payload(actix_web::error::PayloadError::Io(e))
            if e.kind() == std::io::ErrorKind::TimedOut =>
        {
            AppError::RequestTimeout(
                req.app_data::<web::Data<middleware::RequestDeadline>>()
                    .map_or(0, |d| d.0.as_secs()),
            )
        }
        other => AppError::BadRequest(format!("malformed JSON body: {other}")),
    };
    app.into()
}

fn query_error(err: QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    AppError::BadRequest(format!("invalid query string: {err}")).into()
}

/// Security headers every JSON API response carries.
pub fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add(("Cache-Control", "no-store"))
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("X-Frame-Options", "DENY"))
        .add(("Content-Security-Policy", "frame-ancestors 'none'"))
}

/// Registers the API. `with_metrics` adds `/metrics` here (when it has no
/// listener of its own).
pub fn api(cfg: &mut web::ServiceConfig, with_metrics: bool) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(BODY_LIMIT)
            .content_type_required(true)
            .error_handler(json_error),
    )
    .app_data(web::PayloadConfig::default().limit(BODY_LIMIT))
    .app_data(web::QueryConfig::default().error_handler(query_error))
    .service(resource("/v1/signup", "POST").route(web::post().to(routes::signup)))
    .service(resource("/v1/signin", "POST").route(web::post().to(routes::signin)))
    .service(
        resource("/v1/me", "GET, HEAD, DELETE")
            .route(get().to(routes::me))
            .route(web::delete().to(routes::delete_me)),
    )
    .service(resource("/v1/me/password", "PUT").route(web::put().to(routes::change_password)))
    .service(resource("/v1/me/group", "GET, HEAD").route(get().to(routes::my_group)))
    .service(resource("/healthz", "GET, HEAD").route(get().to(routes::healthz)))
    .service(resource("/readyz", "GET, HEAD").route(get().to(routes::readyz)))
    .service(resource("/openapi.json", "GET, HEAD").route(get().to(openapi::serve)))
    .service(resource("/docs", "GET, HEAD").route(get().to(openapi::docs)));
    if with_metrics {
        metrics(cfg);
    }
    cfg.default_service(web::to(routes::not_found));
}

/// `/metrics` alone, for its own listener.
pub fn metrics(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/metrics", "GET, HEAD").route(get().to(routes::metrics)));
}

/// GET, and HEAD with it (RFC 9110 9.3.2): the same handler answers both,
/// so status and headers agree; actix-http sends no body in answer to HEAD
/// (it keeps the `Content-Length` the GET would have had).
fn get() -> actix_web::Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// A resource whose other methods get 405 with `Allow` (RFC 9110 15.5.6).
fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move || async move {
        use actix_web::ResponseError;
        let mut res = AppError::MethodNotAllowed.error_response();
        res.headers_mut().insert(
            actix_web::http::header::ALLOW,
            actix_web::http::header::HeaderValue::from_static(allow),
        );
        res
    }))
}

pub use middleware::{RequestDeadline, RootSpan, body_deadline, record_metrics, request_id_header};
