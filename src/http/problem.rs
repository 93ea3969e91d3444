//! RFC 9457 problem details: the one place where errors become responses.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::domain::FieldError;
use crate::error::AppError;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI identifying the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

fn kind(slug: &str) -> String {
    format!("urn:cohort:problem:{slug}")
}

impl AppError {
    fn slug(&self) -> (&'static str, &'static str) {
        match self {
            AppError::BadRequest(_) => ("bad-request", "Bad request"),
            AppError::InvalidCredentials => ("invalid-credentials", "Invalid credentials"),
            AppError::Unauthorized(_) => ("unauthorized", "Unauthorized"),
            AppError::NotFound => ("not-found", "Not found"),
            AppError::MethodNotAllowed => ("method-not-allowed", "Method not allowed"),
            AppError::UsernameTaken => ("username-taken", "Username taken"),
            AppError::PayloadTooLarge(_) => ("payload-too-large", "Payload too large"),
            AppError::RequestTimeout(_) => ("request-timeout", "Request timeout"),
            AppError::UnsupportedMediaType => ("unsupported-media-type", "Unsupported media type"),
            AppError::Validation(_) => ("validation", "Invalid request fields"),
            AppError::RateLimited { .. } => ("rate-limited", "Too many requests"),
            AppError::Unavailable(_) => ("unavailable", "Service unavailable"),
            AppError::IdempotencyKeyReused => ("idempotency-key-reused", "Idempotency-Key reused"),
            AppError::Misconfigured(_) => ("misconfigured", "Replica misconfigured"),
            AppError::Internal(_) => ("internal", "Internal server error"),
        }
    }
}

impl ResponseError for AppError {
    fn status_code(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::InvalidCredentials | AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::NotFound => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::UsernameTaken => StatusCode::CONFLICT,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::Validation(_) | AppError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AppError::Misconfigured(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AppError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let (slug, title) = self.slug();
        let detail = match self {
            // Internal details go to the log, never to the client.
            AppError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                "an unexpected error occurred".to_string()
            }
            other => other.to_string(),
        };
        let body = Problem {
            kind: kind(slug),
            title: title.into(),
            status: status.as_u16(),
            detail,
            errors: match self {
                AppError::Validation(e) => Some(e.clone()),
                _ => None,
            },
        };
        let mut res = HttpResponse::build(status);
        res.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        match self {
            AppError::RateLimited { retry_after } => {
                res.insert_header((header::RETRY_AFTER, retry_after.to_string()));
            }
            AppError::Unavailable(_) => {
                res.insert_header((header::RETRY_AFTER, "1"));
            }
            AppError::InvalidCredentials | AppError::Unauthorized(_) => {
                res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            AppError::RequestTimeout(_) => {
                // The rest of the body may still be on its way: the
                // connection cannot be reused (RFC 9110 15.5.9).
                res.force_close();
            }
            _ => {}
        }
        res.body(serde_json::to_string(&body).expect("problem serialises"))
    }
}
