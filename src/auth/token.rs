//! HS256 access tokens, as RFC 8725 (JWT best practices) and RFC 9068 (JWT
//! access tokens) ask: the algorithm is pinned; `typ` is `at+jwt`, so no
//! other JWT signed with the same key can pass for an access token; issuer,
//! audience, expiry, not-before and issue time are all set and all checked
//! (jsonwebtoken checks neither issuer nor audience unless told to); the
//! lifetime is capped.
//!
//! Rotation: tokens are signed with the current secret and carry its `kid`
//! (a hash of the secret, never the secret); previous secrets still verify
//! the tokens they signed until they are removed from the configuration, so
//! a new secret logs nobody out.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::UserId;

pub const MIN_SECRET_BYTES: usize = 32;
/// The longest lifetime a token may have (and `COHORT_TOKEN_TTL` may ask
/// for): a stolen bearer token must not be good for ever.
pub const MAX_TOKEN_TTL_SECS: u64 = 24 * 3600;
const ISSUER: &str = "cohort";
const AUDIENCE: &str = "cohort-api";
/// RFC 9068 section 2.1.
const TYP: &str = "at+jwt";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    /// The user's token version when issued: a password change bumps it,
    /// revoking every token issued before.
    #[serde(default)]
    pub ver: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid or expired token")]
    Invalid,
}

/// One secret: its key id and both halves of its key.
#[derive(Clone)]
struct Key {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Key {
    fn new(secret: &[u8]) -> Self {
        // The key id names the secret without revealing it: a domain-separated
        // hash, truncated (the secret is at least 32 random bytes).
        let digest = Sha256::new()
            .chain_update(b"cohort jwt kid\0")
            .chain_update(secret)
            .finalize();
        let kid = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            kid,
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }
}

#[derive(Clone)]
pub struct Tokens {
    /// The signing key first, then the previous ones (verify only).
    keys: Vec<Key>,
    validation: Validation,
    ttl_secs: u64,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl_secs", &self.ttl_secs)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn check_secret(name: &str, secret: &[u8]) -> Result<(), String> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{name} must be at least {MIN_SECRET_BYTES} bytes (got {})",
            secret.len()
        ));
    }
    Ok(())
}

impl Tokens {
    /// `secret` signs; each of `previous` only verifies.
    pub fn new(secret: &[u8], previous: &[Vec<u8>], ttl_secs: u64) -> Result<Self, String> {
        check_secret("COHORT_JWT_SECRET", secret)?;
        for p in previous {
            check_secret("each of COHORT_JWT_PREVIOUS_SECRETS", p)?;
        }
        if ttl_secs == 0 || ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(format!(
                "COHORT_TOKEN_TTL must be between 1 and {MAX_TOKEN_TTL_SECS} seconds (got {ttl_secs})"
            ));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        let keys = std::iter::once(secret)
            .chain(previous.iter().map(Vec::as_slice))
            .map(Key::new)
            .collect();
        Ok(Self {
            keys,
            validation,
            ttl_secs,
        })
    }

    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    pub fn issue(&self, user: UserId, version: i64) -> String {
        let iat = now();
        let claims = Claims {
            sub: user.0.to_string(),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            iat,
            nbf: iat,
            exp: iat + self.ttl_secs,
            ver: version,
        };
        let key = &self.keys[0];
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(TYP.into());
        header.kid = Some(key.kid.clone());
        encode(&header, &claims, &key.encoding).expect("HS256 encoding cannot fail")
    }

    /// The token's user and the token version it was issued under.
    pub fn verify(&self, token: &str) -> Result<(UserId, i64), TokenError> {
        let header = decode_header(token).map_err(|_| TokenError::Invalid)?;
        // RFC 9068 2.1: "at+jwt", or its full media type.
        let typ_ok = header.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case(TYP) || t.eq_ignore_ascii_case("application/at+jwt")
        });
        if !typ_ok || header.alg != Algorithm::HS256 {
            return Err(TokenError::Invalid);
        }
        let kid = header.kid.ok_or(TokenError::Invalid)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or(TokenError::Invalid)?;
        let data = decode::<Claims>(token, &key.decoding, &self.validation)
            .map_err(|_| TokenError::Invalid)?;
        let c = data.claims;
        let leeway = self.validation.leeway;
        if c.iat > now() + leeway || c.exp.saturating_sub(c.iat) > MAX_TOKEN_TTL_SECS {
            return Err(TokenError::Invalid);
        }
        c.sub
            .parse()
            .map(|id| (UserId(id), c.ver))
            .map_err(|_| TokenError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OTHER: &[u8] = b"another secret of at least 32 bytes!!";

    fn claims(iss: &str, aud: &str, exp: u64) -> Claims {
        let iat = now();
        Claims {
            sub: "7".into(),
            iss: iss.into(),
            aud: aud.into(),
            iat,
            nbf: iat,
            exp,
            ver: 0,
        }
    }

    /// A token signed with `secret`, with the header a genuine one has
    /// unless `edit` changes it.
    fn forge(claims: &Claims, secret: &[u8], edit: impl FnOnce(&mut Header)) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.typ = Some(TYP.into());
        h.kid = Some(Key::new(secret).kid);
        edit(&mut h);
        encode(&h, claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn round_trip_with_typ_and_kid() {
        let t = Tokens::new(SECRET, &[], 60).unwrap();
        let token = t.issue(UserId(7), 3);
        let h = decode_header(&token).unwrap();
        assert_eq!(h.typ.as_deref(), Some("at+jwt"));
        assert_eq!(h.kid.as_deref(), Some(Key::new(SECRET).kid.as_str()));
        assert_eq!(t.verify(&token).unwrap(), (UserId(7), 3));
        // A genuine forgery-shaped token verifies too: the test helper is right.
        let ok = forge(&claims(ISSUER, AUDIENCE, now() + 60), SECRET, |_| {});
        assert!(t.verify(&ok).is_ok());
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(Tokens::new(b"short", &[], 60).is_err());
        assert!(Tokens::new(SECRET, &[b"short".to_vec()], 60).is_err());
        assert!(Tokens::new(SECRET, &[], 0).is_err());
        assert!(Tokens::new(SECRET, &[], MAX_TOKEN_TTL_SECS + 1).is_err());
    }

    #[test]
    fn a_previous_secret_verifies_until_removed() {
        let old = Tokens::new(OTHER, &[], 60).unwrap();
        let token = old.issue(UserId(9), 0);
        let rotated = Tokens::new(SECRET, &[OTHER.to_vec()], 60).unwrap();
        assert_eq!(rotated.verify(&token).unwrap(), (UserId(9), 0));
        // New tokens are signed with the new secret.
        let fresh = rotated.issue(UserId(9), 0);
        assert!(old.verify(&fresh).is_err());
        assert!(Tokens::new(SECRET, &[], 60).unwrap().verify(&fresh).is_ok());
        let removed = Tokens::new(SECRET, &[], 60).unwrap();
        assert!(removed.verify(&token).is_err());
    }

    #[test]
    fn rejects_forgeries() {
        let t = Tokens::new(SECRET, &[], 60).unwrap();
        let later = now() + 60;
        let good = claims(ISSUER, AUDIENCE, later);
        let cases: Vec<(&str, String)> = vec![
            ("HS512", forge(&good, SECRET, |h| h.alg = Algorithm::HS512)),
            ("no typ", forge(&good, SECRET, |h| h.typ = None)),
            (
                "typ JWT",
                forge(&good, SECRET, |h| h.typ = Some("JWT".into())),
            ),
            ("no kid", forge(&good, SECRET, |h| h.kid = None)),
            (
                "unknown kid",
                forge(&good, SECRET, |h| h.kid = Some("0000".into())),
            ),
            (
                "issuer",
                forge(&claims("evil", AUDIENCE, later), SECRET, |_| {}),
            ),
            (
                "audience",
                forge(&claims(ISSUER, "other", later), SECRET, |_| {}),
            ),
            (
                "expired",
                forge(&claims(ISSUER, AUDIENCE, now() - 120), SECRET, |_| {}),
            ),
            (
                "not yet valid",
                forge(
                    &Claims {
                        nbf: now() + 600,
                        ..claims(ISSUER, AUDIENCE, later + 600)
                    },
                    SECRET,
                    |_| {},
                ),
            ),
            (
                "lifetime over the cap",
                forge(
                    &claims(ISSUER, AUDIENCE, now() + MAX_TOKEN_TTL_SECS + 60),
                    SECRET,
                    |_| {},
                ),
            ),
            (
                "other secret, our kid",
                forge(&good, OTHER, |h| h.kid = Some(Key::new(SECRET).kid)),
            ),
        ];
        for (what, token) in cases {
            assert!(t.verify(&token).is_err(), "{what} was accepted");
        }
        // No nbf at all.
        #[derive(Serialize)]
        struct NoNbf {
            sub: String,
            iss: String,
            aud: String,
            iat: u64,
            exp: u64,
        }
        let mut h = Header::new(Algorithm::HS256);
        h.typ = Some(TYP.into());
        h.kid = Some(Key::new(SECRET).kid);
        let no_nbf = encode(
            &h,
            &NoNbf {
                sub: "7".into(),
                iss: ISSUER.into(),
                aud: AUDIENCE.into(),
                iat: now(),
                exp: later,
            },
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(
            t.verify(&no_nbf).is_err(),
            "a token without nbf was accepted"
        );
        // alg "none": header {"alg":"none"}, no signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"at+jwt"}"#),
            b64.encode(serde_json::to_vec(&good).unwrap())
        );
        assert!(t.verify(&none).is_err());
    }
}
