//! The `Bearer` extractor: a handler taking [`Authenticated`] runs only for
//! a valid access token.

use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};

use crate::domain::UserId;
use crate::error::AppError;
use crate::service::Service;

/// A valid token's user, and the token version it was issued under (the
/// service refuses it if the user's version has moved on).
pub struct Authenticated(pub UserId, pub i64);

impl FromRequest for Authenticated {
    type Error = AppError;
    type Future = Ready<Result<Self, AppError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<Authenticated, AppError> {
    let service = req
        .app_data::<web::Data<Service>>()
        .ok_or_else(|| AppError::Internal("service missing from app data".into()))?;
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| AppError::Unauthorized("missing bearer token".into()))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AppError::Unauthorized("malformed Authorization header".into()))?;
    service
        .tokens
        .verify(token)
        .map(|(id, ver)| Authenticated(id, ver))
        .map_err(|_| AppError::Unauthorized("invalid or expired token".into()))
}
