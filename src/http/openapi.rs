//! The OpenAPI description, generated from the handlers' annotations, and
//! the handlers that serve it. It depends on `routes`; never the reverse
//! (`routes` names only the schema helpers below).
//!
//! The annotations say what is particular to each operation. What holds
//! for every operation of a kind is added here, in one pass over the
//! generated document ([`finish`]), so that no operation can miss it:
//! - with a request body: 400, 408, 413, 415 and 422 (the JSON extractor
//!   and the body deadline answer them alike everywhere);
//! - with a bearer token: 401 and 503 (every token is checked against the
//!   database);
//! - on every response `X-Request-Id`; on 401 `WWW-Authenticate`; on 429
//!   and 503 `Retry-After`;
//! - the attribute bounds of the deployment (`COHORT_MATCH_THRESHOLD`,
//!   `COHORT_MAX_ATTRIBUTES`): `docs/openapi.json` has the defaults, a
//!   server serves its own.

use actix_web::{HttpResponse, web};
use serde_json::{Map, Value, json};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::routes;
use crate::domain::AttributeRules;
use crate::domain::attribute::MAX_ATTRIBUTE_CHARS;
use crate::service::Service;

#[derive(OpenApi)]
#[openapi(
    info(title = "cohort", description = "Places every new user into a group of people like them."),
    paths(
        routes::signup, routes::signin, routes::me, routes::delete_me, routes::change_password,
        routes::my_group, routes::healthz, routes::readyz, routes::metrics, serve, docs,
    ),
    components(schemas(
        routes::SignupRequest, routes::SignupResponse, routes::GroupRef,
        routes::SigninRequest, routes::SigninResponse, routes::MeResponse,
        routes::GroupResponse, routes::GroupDetail, routes::MemberView,
        routes::PasswordChange, routes::AccountDeletion,
        super::problem::Problem, crate::domain::FieldError,
    )),
    tags(
        (name = "users", description = "Signing up, signing in, the account"),
        (name = "groups", description = "The caller's group"),
        (name = "operations", description = "Probes, metrics and this description"),
    ),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// The bounds `docs/openapi.json` shows: the defaults of
/// `COHORT_MATCH_THRESHOLD` and `COHORT_MAX_ATTRIBUTES`.
pub const DEFAULT_RULES: AttributeRules = AttributeRules { min: 3, max: 16 };

const API_DESCRIPTION: &str = "\
Places every new user into a group of people like them.

Requests and responses are JSON (`application/json`). Errors are RFC 9457 \
problem details (`application/problem+json`), with an `errors` array of \
`{field, message}` for invalid fields (422).

Every operation that has a request body answers 400 to malformed JSON, 408 \
when the body is not received in time, 413 to a body over 16 KiB, 415 to \
another content type than JSON and 422 to a missing or mistyped field. \
Every operation that takes a bearer token answers 401 to a missing, \
malformed, expired or revoked one, with `WWW-Authenticate: Bearer`. 429 and \
503 carry `Retry-After` (seconds).

`HEAD` is answered wherever `GET` is, with the same status and headers and \
no body. Another method on a known path gets 405 with an `Allow` header \
listing the methods served there (`MethodNotAllowed`); an unknown path gets \
404 (`NotFound`).

Every response carries `X-Request-Id`, also written in the server's log \
lines for that request, and `Cache-Control: no-store`, \
`X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY` and \
`Content-Security-Policy: frame-ancestors 'none'`.

The bounds on the number of attributes are the deployment's \
(`COHORT_MATCH_THRESHOLD`, `COHORT_MAX_ATTRIBUTES`): a server's own \
`/openapi.json` shows its own.";

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
                        .description(Some(
                            "An `access_token` from `POST /v1/signin`. Revoked by a password \
                             change or an account deletion.",
                        ))
                        .build(),
                ),
            );
        }
    }
}

/// The spec for a deployment with these attribute bounds.
pub fn spec(rules: AttributeRules) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the spec serialises");
    finish(&mut doc, rules);
    doc
}

fn to_json(doc: &Value) -> String {
    serde_json::to_string_pretty(doc).expect("the spec serialises")
}

/// The spec as JSON with the default bounds, built once: `docs/openapi.json`.
pub fn spec_json() -> &'static str {
    static SPEC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| to_json(&spec(DEFAULT_RULES)))
}

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This OpenAPI document, with this deployment's bounds",
        body = Object, content_type = "application/json")))]
pub async fn serve(service: web::Data<Service>) -> HttpResponse {
    let mut res = HttpResponse::Ok();
    res.content_type("application/json");
    if service.rules == DEFAULT_RULES {
        res.body(spec_json())
    } else {
        res.body(to_json(&spec(service.rules)))
    }
}

/// `GET /docs`: a page that renders the spec for people. Self-contained (no
/// CDN): it fetches `/openapi.json` from this server.
#[utoipa::path(get, path = "/docs", tag = "operations",
    responses((status = 200, description = "An HTML page rendering `/openapi.json`",
        body = String, content_type = "text/html; charset=utf-8")))]
pub async fn docs() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("assets/docs.html"))
}

/// Characters no attribute may contain: control characters (Cc) but those
/// that are white space (tab, line breaks: folded to a space first), and
/// the invisible format characters (Cf) of the Basic Multilingual Plane
/// that `domain::attribute` refuses. (Its few Cf characters beyond the BMP
/// cannot be written in a pattern every JSON Schema dialect reads alike;
/// they are refused all the same.)
const REFUSED: &[(char, char)] = &[
    ('\u{0000}', '\u{0008}'),
    ('\u{000E}', '\u{001F}'),
    ('\u{007F}', '\u{0084}'),
    ('\u{0086}', '\u{009F}'),
    ('\u{00AD}', '\u{00AD}'),
    ('\u{0600}', '\u{0605}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{06DD}', '\u{06DD}'),
    ('\u{070F}', '\u{070F}'),
    ('\u{0890}', '\u{0891}'),
    ('\u{08E2}', '\u{08E2}'),
    ('\u{180E}', '\u{180E}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFF9}', '\u{FFFB}'),
];

/// White space (Unicode `White_Space`) that is not in [`REFUSED`]: trimmed
/// and folded, so an attribute needs at least one other character.
const WHITE_SPACE: &[(char, char)] = &[
    ('\u{0009}', '\u{000D}'),
    ('\u{0020}', '\u{0020}'),
    ('\u{0085}', '\u{0085}'),
    ('\u{00A0}', '\u{00A0}'),
    ('\u{1680}', '\u{1680}'),
    ('\u{2000}', '\u{200A}'),
    ('\u{2028}', '\u{2029}'),
    ('\u{202F}', '\u{202F}'),
    ('\u{205F}', '\u{205F}'),
    ('\u{3000}', '\u{3000}'),
];

/// A regex character class body, with `\uXXXX` escapes (ECMA-262 and
/// Python alike).
fn class(sets: &[&[(char, char)]]) -> String {
    let mut out = String::new();
    for (lo, hi) in sets.iter().flat_map(|s| s.iter()) {
        out.push_str(&format!("\\u{:04X}", *lo as u32));
        if hi != lo {
            out.push_str(&format!("-\\u{:04X}", *hi as u32));
        }
    }
    out
}

/// What a client sends as one attribute: at least one character that is
/// neither white space nor refused, and no refused character.
fn attribute_pattern() -> String {
    let refused = class(&[REFUSED]);
    let blank = class(&[REFUSED, WHITE_SPACE]);
    format!("^[^{refused}]*[^{blank}][^{refused}]*$")
}

/// `attributes` of a signup, with the deployment's bounds.
fn signup_attributes(rules: AttributeRules) -> Value {
    json!({
        "type": "array",
        "minItems": rules.min,
        "maxItems": rules.max,
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_ATTRIBUTE_CHARS,
            "pattern": attribute_pattern(),
        },
        "description": format!(
            "The user's attributes. Each is canonicalised first: Unicode NFKC, lower-cased, \
             trimmed, inner runs of white space folded to one space; matching and responses use \
             canonical forms only. A canonical attribute has 1 to {MAX_ATTRIBUTE_CHARS} characters \
             and no control or invisible format characters. Duplicates after canonicalisation are \
             merged (so this is not `uniqueItems`): between {} and {} distinct attributes are \
             required (this deployment's `COHORT_MATCH_THRESHOLD` and `COHORT_MAX_ATTRIBUTES`), \
             else 422. The server tolerates what canonicalisation removes (white space around \
             and inside an attribute, entries that merge), but a client needs none of it.",
            rules.min, rules.max
        ),
        "example": ["Software", "Engineer", "Brussels", "Belgium", "Senior"],
    })
}

/// A canonical attribute set in a response: distinct, sorted.
pub fn canonical_attributes() -> impl Into<RefOr<Schema>> {
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_ATTRIBUTE_CHARS)),
        )
        .unique_items(true)
        .description(Some("Canonical attributes, sorted"))
}

/// `token_type`: always `Bearer`.
pub fn bearer() -> impl Into<RefOr<Schema>> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["Bearer"]))
        .description(Some("Always `Bearer`"))
}

fn problem_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    })
}

/// Responses every operation with a request body can give.
const BODY_RESPONSES: &[(&str, &str)] = &[
    ("400", "Malformed JSON body"),
    (
        "408",
        "The request body was not received in time; nothing was done",
    ),
    ("413", "Body over 16 KiB"),
    ("415", "Content-Type is not application/json"),
    (
        "422",
        "A field is missing or has the wrong type (named in `errors`)",
    ),
];

/// Responses every operation that takes a bearer token can give.
const AUTH_RESPONSES: &[(&str, &str)] = &[
    ("401", "Missing, malformed, expired or revoked token"),
    ("503", "The database is down; see Retry-After"),
];

fn header_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/headers/{name}")})
}

/// Adds what every operation of a kind shares (see the module's comment).
fn finish(doc: &mut Value, rules: AttributeRules) {
    doc["info"]["description"] = json!(API_DESCRIPTION);
    let components = doc["components"].as_object_mut().expect("components");
    components.insert(
        "headers".into(),
        json!({
            "X-Request-Id": {
                "description": "This request's id, also in the server's log lines for it",
                "required": true,
                "schema": {"type": "string", "format": "uuid"},
            },
            "Retry-After": {
                "description": "Seconds to wait before retrying",
                "required": true,
                "schema": {"type": "integer", "minimum": 0},
            },
            "WWW-Authenticate": {
                "description": "The scheme to authenticate with",
                "required": true,
                "schema": {"type": "string", "pattern": "^Bearer"},
            },
            "Allow": {
                "description": "The methods this path serves (`HEAD` wherever `GET`)",
                "required": true,
                "schema": {"type": "string"},
                "example": "GET, HEAD, DELETE",
            },
        }),
    );
    let mut method_not_allowed = problem_response("Another method than the path serves");
    method_not_allowed["headers"] = json!({
        "Allow": header_ref("Allow"),
        "X-Request-Id": header_ref("X-Request-Id"),
    });
    let mut not_found = problem_response("No such path");
    not_found["headers"] = json!({"X-Request-Id": header_ref("X-Request-Id")});
    components.insert(
        "responses".into(),
        json!({"MethodNotAllowed": method_not_allowed, "NotFound": not_found}),
    );
    doc["components"]["schemas"]["SignupRequest"]["properties"]["attributes"] =
        signup_attributes(rules);

    let paths = doc["paths"].as_object_mut().expect("paths");
    for item in paths.values_mut() {
        let item = item.as_object_mut().expect("path item");
        for (method, op) in item.iter_mut() {
            if !matches!(method.as_str(), "get" | "put" | "post" | "delete") {
                continue;
            }
            finish_operation(op.as_object_mut().expect("operation"));
        }
    }
}

fn finish_operation(op: &mut Map<String, Value>) {
    let has_body = op.contains_key("requestBody");
    let secured = op
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| !s.is_empty());
    if let Some(body) = op.get_mut("requestBody") {
        body["required"] = json!(true);
    }
    let responses = op
        .get_mut("responses")
        .and_then(Value::as_object_mut)
        .expect("responses");
    let mut add = |list: &[(&str, &str)]| {
        for (status, description) in list {
            responses
                .entry(*status)
                .or_insert_with(|| problem_response(description));
        }
    };
    if has_body {
        add(BODY_RESPONSES);
    }
    if secured {
        add(AUTH_RESPONSES);
    }
    for (status, response) in responses.iter_mut() {
        let headers = response
            .as_object_mut()
            .expect("response")
            .entry("headers")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("headers");
        headers.insert("X-Request-Id".into(), header_ref("X-Request-Id"));
        match status.as_str() {
            "401" => {
                headers.insert("WWW-Authenticate".into(), header_ref("WWW-Authenticate"));
            }
            "429" | "503" => {
                headers.insert("Retry-After".into(), header_ref("Retry-After"));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Attribute;

    fn in_ranges(c: char, sets: &[&[(char, char)]]) -> bool {
        sets.iter()
            .flat_map(|s| s.iter())
            .any(|(lo, hi)| (*lo..=*hi).contains(&c))
    }

    /// The pattern's refused characters are exactly the ones the domain
    /// refuses, over the whole BMP (beyond it, Cf characters are refused
    /// without the pattern saying so).
    #[test]
    fn refused_characters_agree_with_the_domain() {
        let mut disagree = Vec::new();
        for c in (0u32..=0xFFFF).filter_map(char::from_u32) {
            let refused = Attribute::parse(&format!("x{c}y")).is_err();
            if refused != in_ranges(c, &[REFUSED]) {
                disagree.push(format!("U+{:04X}", c as u32));
            }
        }
        assert!(
            disagree.is_empty(),
            "pattern and domain disagree on {disagree:?}"
        );
    }

    #[test]
    fn white_space_is_what_the_domain_trims() {
        for c in (0u32..=0xFFFF).filter_map(char::from_u32) {
            if in_ranges(c, &[REFUSED]) {
                continue;
            }
            assert_eq!(
                in_ranges(c, &[WHITE_SPACE]),
                c.is_whitespace(),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn default_rules_are_the_configuration_defaults() {
        use clap::CommandFactory;
        let cmd = crate::config::Cli::command();
        let default = |id: &str| -> usize {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
            arg.get_default_values()[0]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert_eq!(default("match_threshold"), DEFAULT_RULES.min);
        assert_eq!(default("max_attributes"), DEFAULT_RULES.max);
    }

    #[test]
    fn deployment_bounds_are_shown() {
        let doc = spec(AttributeRules { min: 4, max: 9 });
        let a = &doc["components"]["schemas"]["SignupRequest"]["properties"]["attributes"];
        assert_eq!(a["minItems"], 4);
        assert_eq!(a["maxItems"], 9);
    }
}
