//! Handlers: parse, call the service, shape the response. Nothing else.

use actix_web::{HttpRequest, HttpResponse, http::header, web};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;
use utoipa::ToSchema;

use super::auth::Authenticated;
use super::client::ClientIp;
use super::problem::Problem;
use crate::domain::{Signup, UserId};
use crate::error::AppError;
use crate::index::health::IndexState;
use crate::service::Service;
use crate::signup::Outcome;

// Request body of `POST /v1/signup`. Documentation only: the handler reads
// [`SignupBody`], so that missing fields are reported field by field.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SignupRequest {
    /// 3 to 32 characters of `a-z 0-9 _ . -`, letters of either case: usernames
    /// are compared case-insensitively and shown in lower case.
    #[schema(
        min_length = 3,
        max_length = 32,
        pattern = "^[A-Za-z0-9_.-]{3,32}$",
        example = "alice"
    )]
    pub username: String,
    /// 15 to 128 characters, taken exactly as given (no trimming, no
    /// normalisation). A common or breached password is refused (422).
    #[schema(min_length = 15, max_length = 128, format = Password)]
    pub password: String,
    /// Its schema, with this deployment's bounds, is completed in `openapi.rs`.
    pub attributes: Vec<String>,
}

/// What the handler accepts: missing fields become field errors (422), not
/// a parse error.
#[derive(Deserialize)]
pub struct SignupBody {
    username: Option<String>,
    password: Option<String>,
    attributes: Option<Vec<String>>,
}

// Request headers of `POST /v1/signup`. Documentation only: see
// [`idempotency_key`].
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct SignupHeaders {
    /// Optional. The same key with the same body within 24 hours gets the
    /// original response again (with `Idempotent-Replayed: true`), even if the
    /// first one was lost; the same key with another body gets 422. 1 to 255
    /// visible ASCII characters or spaces, bare or as a structured-field
    /// string (in double quotes); anything else gets 400.
    #[param(rename = "Idempotency-Key", value_type = String, required = false,
        min_length = 1, max_length = 257, pattern = "^(?!\"\"$)(?:\"[ -~]{1,255}\"|[ -~]{1,255})$")]
    idempotency_key: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct GroupRef {
    #[schema(minimum = 1)]
    pub id: i64,
    /// The founder's attributes, fixed for ever.
    #[schema(schema_with = super::openapi::canonical_attributes)]
    pub attributes: Vec<String>,
    /// True when this signup founded the group.
    pub created: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SignupResponse {
    #[schema(minimum = 1)]
    pub user_id: i64,
    /// In lower case.
    #[schema(pattern = "^[a-z0-9_.-]{3,32}$")]
    pub username: String,
    /// The user's attributes, canonical, merged and sorted.
    #[schema(schema_with = super::openapi::canonical_attributes)]
    pub attributes: Vec<String>,
    pub group: GroupRef,
    /// The attributes the user shares with the group (all of the group's
    /// when this signup founded it).
    #[schema(schema_with = super::openapi::canonical_attributes)]
    pub shared_attributes: Vec<String>,
}

#[utoipa::path(
    post, path = "/v1/signup", tag = "users",
    request_body = SignupRequest,
    params(SignupHeaders),
    responses(
        (status = 201, description = "Signed up and placed in a group", body = SignupResponse,
            headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored response to an earlier request with the same Idempotency-Key and body; absent otherwise"))),
        (status = 400, description = "Malformed JSON body, or a malformed Idempotency-Key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Username taken (compared case-insensitively)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 16 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid or missing field(s), each named in `errors` (a common or breached password included), or an Idempotency-Key reused with another body", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many signups from this client address (when the deployment limits them); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "This replica is configured with another match threshold than the deployment's: signups are refused until an operator fixes it", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A backing service is down; nothing was written, retrying is safe (see Retry-After)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn signup(
    service: web::Data<Service>,
    req: HttpRequest,
    client: ClientIp,
    body: web::Json<SignupBody>,
) -> Result<HttpResponse, AppError> {
    let key = idempotency_key(&req)?;
    let body = body.into_inner();
    let signup = Signup::parse(body.username, body.password, body.attributes, service.rules)
        .map_err(AppError::Validation)?;
    let client = client.key();
    // A task of its own: a client that hangs up must not cancel a signup
    // between its commit and its index add (the protocol would survive it,
    // as it survives a crash, but there is no reason to make it). In the
    // request's span: its log lines and trace spans are the request's.
    let svc = service.clone();
    let outcome = tokio::spawn(
        async move { svc.signup(signup, client.as_deref(), key).await }
            .instrument(tracing::Span::current()),
    )
    .await
    .map_err(|e| AppError::Internal(format!("signup task failed: {e}")))??;
    let replayed = matches!(outcome, Outcome::Replayed(_));
    let c = outcome.committed();
    let mut res = HttpResponse::Created();
    if replayed {
        res.insert_header(("Idempotent-Replayed", "true"));
    }
    Ok(res.json(SignupResponse {
        user_id: c.user.id.0,
        username: c.user.username.to_string(),
        attributes: c.user.attributes.to_strings(),
        group: GroupRef {
            id: c.user.group_id.0,
            attributes: c.group_attributes.to_strings(),
            created: c.founded,
        },
        shared_attributes: c
            .user
            .attributes
            .intersection(&c.group_attributes)
            .to_strings(),
    }))
}

/// The `Idempotency-Key` header (draft-ietf-httpapi-idempotency-key-header):
/// a structured-field string, so quoted, though a bare token is accepted
/// too. 1 to 255 visible ASCII characters.
fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, AppError> {
    let Some(v) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let bad =
        || AppError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into());
    let raw = v.to_str().map_err(|_| bad())?.trim();
    let key = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(bad());
    }
    Ok(Some(key.to_owned()))
}

/// Any string is accepted, but only the constraints below can match an
/// account: others get 401 like any wrong credentials.
#[derive(Deserialize, ToSchema)]
pub struct SigninRequest {
    /// Case-insensitive.
    #[schema(
        min_length = 3,
        max_length = 32,
        pattern = "^[A-Za-z0-9_.-]{3,32}$",
        example = "alice"
    )]
    pub username: String,
    #[schema(min_length = 15, max_length = 128, format = Password)]
    pub password: String,
}

#[derive(Serialize, ToSchema)]
pub struct SigninResponse {
    /// A JWT, to send as `Authorization: Bearer <access_token>`.
    #[schema(min_length = 1)]
    pub access_token: String,
    #[schema(schema_with = super::openapi::bearer)]
    pub token_type: String,
    /// Seconds until the token expires.
    #[schema(minimum = 1)]
    pub expires_in: u64,
}

#[utoipa::path(
    post, path = "/v1/signin", tag = "users",
    request_body = SigninRequest,
    responses(
        (status = 200, description = "An access token", body = SigninResponse),
        (status = 401, description = "Unknown user or wrong password (same body, similar time)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed attempts for this account; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is down; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn signin(
    service: web::Data<Service>,
    client: ClientIp,
    body: web::Json<SigninRequest>,
) -> Result<HttpResponse, AppError> {
    let client = client.key();
    let token = service
        .signin(&body.username, &body.password, client.as_deref())
        .await?;
    Ok(HttpResponse::Ok().json(SigninResponse {
        access_token: token,
        token_type: "Bearer".into(),
        expires_in: service.tokens.ttl_secs(),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct MeResponse {
    #[schema(minimum = 1)]
    pub user_id: i64,
    /// In lower case.
    #[schema(pattern = "^[a-z0-9_.-]{3,32}$")]
    pub username: String,
    #[schema(schema_with = super::openapi::canonical_attributes)]
    pub attributes: Vec<String>,
    #[schema(minimum = 1)]
    pub group_id: i64,
    pub created_at: DateTime<Utc>,
}

#[utoipa::path(
    get, path = "/v1/me", tag = "users",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The signed-in user", body = MeResponse),
        (status = 401, description = "Missing, malformed, expired or revoked token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is down; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn me(
    service: web::Data<Service>,
    user: Authenticated,
) -> Result<HttpResponse, AppError> {
    let u = service.me(user.0, user.1).await?;
    Ok(HttpResponse::Ok().json(MeResponse {
        user_id: u.id.0,
        username: u.username.to_string(),
        attributes: u.attributes.to_strings(),
        group_id: u.group_id.0,
        created_at: u.created_at,
    }))
}

#[derive(Deserialize, ToSchema)]
pub struct PasswordChange {
    /// A wrong one gets 401.
    #[schema(min_length = 15, max_length = 128, format = Password)]
    pub current_password: String,
    /// 15 to 128 characters, taken exactly as given. An invalid one (a common
    /// or breached password included) gets 422.
    #[schema(min_length = 15, max_length = 128, format = Password)]
    pub new_password: String,
}

#[utoipa::path(
    put, path = "/v1/me/password", tag = "users",
    security(("bearer" = [])),
    request_body = PasswordChange,
    responses(
        (status = 204, description = "Changed; every token issued before is revoked"),
        (status = 401, description = "Wrong current password, or a missing, malformed, expired or revoked token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid new password, or a missing or mistyped field", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is down; nothing was changed (see Retry-After)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn change_password(
    service: web::Data<Service>,
    user: Authenticated,
    body: web::Json<PasswordChange>,
) -> Result<HttpResponse, AppError> {
    let body = body.into_inner();
    service
        .change_password(user.0, user.1, &body.current_password, body.new_password)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize, ToSchema)]
pub struct AccountDeletion {
    /// The account's password; a wrong one gets 401.
    #[schema(min_length = 15, max_length = 128, format = Password)]
    pub password: String,
}

#[utoipa::path(
    delete, path = "/v1/me", tag = "users",
    security(("bearer" = [])),
    request_body = AccountDeletion,
    responses(
        (status = 204, description = "Deleted: gone from member lists and counts, every token revoked; the group stays"),
        (status = 401, description = "Wrong password, or a missing, malformed, expired or revoked token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is down; nothing was changed (see Retry-After)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_me(
    service: web::Data<Service>,
    user: Authenticated,
    body: web::Json<AccountDeletion>,
) -> Result<HttpResponse, AppError> {
    service
        .delete_account(user.0, user.1, &body.password)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Read as strings, so that a bad value is a 400 that says which, not a
/// generic query error.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GroupQuery {
    /// Members per page.
    #[param(value_type = u32, required = false, minimum = 1, maximum = 500, default = 50)]
    limit: Option<String>,
    /// Opaque: the `next_cursor` of the previous page, unchanged. Anything
    /// else gets 400.
    #[param(value_type = String, required = false, min_length = 1)]
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct GroupDetail {
    #[schema(minimum = 1)]
    pub id: i64,
    /// The founder's attributes, fixed for ever.
    #[schema(schema_with = super::openapi::canonical_attributes)]
    pub attributes: Vec<String>,
    /// Current members (deleted accounts are not counted). The caller is one,
    /// unless its account is deleted while this request runs.
    #[schema(minimum = 0)]
    pub member_count: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct MemberView {
    #[schema(minimum = 1)]
    pub user_id: i64,
    /// In lower case.
    #[schema(pattern = "^[a-z0-9_.-]{3,32}$")]
    pub username: String,
    #[schema(schema_with = super::openapi::canonical_attributes)]
    pub attributes: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct GroupResponse {
    pub group: GroupDetail,
    /// The attributes the caller shares with the group.
    #[schema(schema_with = super::openapi::canonical_attributes)]
    pub shared_attributes: Vec<String>,
    /// All members, the caller included, in the order they joined (the
    /// founder first), at most `limit` of them.
    pub members: Vec<MemberView>,
    /// Opaque; pass it as `cursor` for the next page. Null on the last page.
    #[schema(required = true, min_length = 1)]
    pub next_cursor: Option<String>,
}

const CURSOR_TAG: &str = "m1:";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn encode_cursor(after: UserId) -> String {
    B64.encode(format!("{CURSOR_TAG}{}", after.0))
}

fn decode_cursor(s: &str) -> Option<UserId> {
    let raw = B64.decode(s.as_bytes()).ok()?;
    let text = std::str::from_utf8(&raw).ok()?;
    let id: i64 = text.strip_prefix(CURSOR_TAG)?.parse().ok()?;
    (id > 0).then_some(UserId(id))
}

#[utoipa::path(
    get, path = "/v1/me/group", tag = "groups",
    security(("bearer" = [])),
    params(GroupQuery),
    responses(
        (status = 200, description = "The caller's group and its members", body = GroupResponse),
        (status = 400, description = "Bad `limit` or `cursor`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, malformed, expired or revoked token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is down; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn my_group(
    service: web::Data<Service>,
    user: Authenticated,
    query: web::Query<GroupQuery>,
) -> Result<HttpResponse, AppError> {
    let limit = match &query.limit {
        None => 50,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=500).contains(&n) => n,
            _ => {
                return Err(AppError::BadRequest(
                    "limit must be an integer from 1 to 500".into(),
                ));
            }
        },
    };
    let after = match &query.cursor {
        None => None,
        Some(c) => Some(
            decode_cursor(c).ok_or_else(|| AppError::BadRequest("cursor is not valid".into()))?,
        ),
    };
    let view = service.my_group(user.0, user.1, after, limit).await?;
    Ok(HttpResponse::Ok().json(GroupResponse {
        group: GroupDetail {
            id: view.group.id.0,
            attributes: view.group.attributes.into_strings(),
            member_count: view.group.member_count,
            created_at: view.group.created_at,
        },
        shared_attributes: view.shared.into_strings(),
        members: view
            .members
            .into_iter()
            .map(|m| MemberView {
                user_id: m.id.0,
                username: m.username.into_string(),
                attributes: m.attributes.into_strings(),
            })
            .collect(),
        next_cursor: view.next_after.map(encode_cursor),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    status: HealthStatus,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum HealthStatus {
    Ok,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    status: ReadyStatus,
    /// The group index: `ready`, `rebuilding` (signups are decided from the
    /// database meanwhile) or `unreachable` (likewise).
    index: IndexStatus,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum ReadyStatus {
    Ready,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum IndexStatus {
    Ready,
    Rebuilding,
    Unreachable,
}

impl From<IndexState> for IndexStatus {
    fn from(s: IndexState) -> Self {
        match s {
            IndexState::Ready => IndexStatus::Ready,
            IndexState::Rebuilding => IndexStatus::Rebuilding,
            IndexState::Unreachable => IndexStatus::Unreachable,
        }
    }
}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is running", body = Health)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: HealthStatus::Ok,
    })
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "The database is reachable: every endpoint is served. The body gives the group index's state: while it is not ready, signups are decided from the database", body = Readiness),
        (status = 503, description = "Not ready (the database is unreachable), with the reason", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn readyz(service: web::Data<Service>) -> Result<HttpResponse, AppError> {
    if let Err(e) = service.store.ping().await {
        service.metrics.ready.set(0);
        return Err(AppError::Unavailable(format!("database: {e}")));
    }
    service.metrics.ready.set(1);
    let state = service.index_state();
    service
        .metrics
        .index_ready
        .set(i64::from(state == IndexState::Ready));
    Ok(HttpResponse::Ok().json(Readiness {
        status: ReadyStatus::Ready,
        index: state.into(),
    }))
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    description = "On this listener unless `COHORT_METRICS_LISTEN` gives it one of its own (then this path is 404 here).",
    responses((status = 200, description = "Prometheus metrics", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8")))]
pub async fn metrics(service: web::Data<Service>) -> HttpResponse {
    let pool = service.store.pool_stats();
    service.metrics.db_pool_size.set(pool.size as i64);
    service.metrics.db_pool_available.set(pool.available as i64);
    service.metrics.db_pool_waiting.set(pool.waiting as i64);
    HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        ))
        .body(service.metrics.render())
}

pub async fn not_found() -> Result<HttpResponse, AppError> {
    Err(AppError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_rejects_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(UserId(42))), Some(UserId(42)));
        assert_eq!(decode_cursor("not a cursor"), None);
        assert_eq!(decode_cursor(&B64.encode("m1:-3")), None);
    }
}
