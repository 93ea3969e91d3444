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
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("one or more fields are invalid")]
    Validation(Vec<FieldError>),
    #[error("too many attempts; retry in {retry_after} seconds")]
    RateLimited { retry_after: u64 },
    /// A backing service is down or the index is being rebuilt. Nothing was
    /// written, so retrying is safe.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl From<crate::store::StoreError> for AppError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError::*;
        match e {
            UsernameTaken => AppError::UsernameTaken,
            StaleIndex => {
                AppError::Unavailable("the group index is being rebuilt; retry shortly".into())
            }
            Unavailable(m) => {
                tracing::warn!(error = %m, "database unavailable");
                AppError::Unavailable("the database is unavailable; retry shortly".into())
            }
            Corrupt(m) => AppError::Internal(m),
        }
    }
}

impl From<crate::index::IndexError> for AppError {
    fn from(e: crate::index::IndexError) -> Self {
        use crate::index::IndexError::*;
        match e {
            NotReady(_) => {
                AppError::Unavailable("the group index is being rebuilt; retry shortly".into())
            }
            Unavailable(m) => {
                tracing::warn!(error = %m, "group index unavailable");
                AppError::Unavailable("the group index is unavailable; retry shortly".into())
            }
            IdSource(m) => {
                tracing::warn!(error = %m, "group id allocation failed");
                AppError::Unavailable("the database is unavailable; retry shortly".into())
            }
            Corrupt(m) => AppError::Internal(m),
        }
    }
}
