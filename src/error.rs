//! Every error a request can end in. Mapped to problem+json in one place
//! (`http::problem`).

use crate::domain::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("{0}")]
    Unauthorized(String),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("username is taken")]
    UsernameTaken,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The request was not received whole within the deadline.
    #[error("the request was not received in time ({0} s); the connection is closed")]
    RequestTimeout(u64),
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("one or more fields are invalid")]
    Validation(Vec<FieldError>),
    #[error("too many attempts; retry in {retry_after} seconds")]
    RateLimited { retry_after: u64 },
    /// A backing service is down. Nothing was written, so retrying is safe.
    #[error("{0}")]
    Unavailable(String),
    /// The same Idempotency-Key was used with another request body.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// A configuration error that only an operator can fix; the message says
    /// how.
    #[error("{0}")]
    Misconfigured(String),
    #[error("internal error")]
    Internal(String),
}

impl From<crate::store::StoreError> for AppError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError::*;
        match e {
            UsernameTaken => AppError::UsernameTaken,
            Unavailable(m) => {
                tracing::warn!(error = %m, "database unavailable");
                AppError::Unavailable("the database is unavailable; retry shortly".into())
            }
            ThresholdMismatch {
                deployed,
                configured,
            } => {
                tracing::error!(deployed, configured, "threshold mismatch: signups refused");
                AppError::Misconfigured(format!(
                    "this replica is configured with COHORT_MATCH_THRESHOLD={configured} but the \
                     deployment groups with {deployed}; signups are refused. Configure {deployed}, \
                     or change the deployment's threshold with `cohort set-threshold {configured}`"
                ))
            }
            // The protocol retries these itself; reaching here is a bug.
            Overlap | IndexDirty | IdempotencyKeyTaken => AppError::Internal(e.to_string()),
            Corrupt(m) => AppError::Internal(m),
        }
    }
}
