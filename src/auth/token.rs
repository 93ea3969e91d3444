//! HS256 access tokens. The algorithm is pinned, and issuer, audience,
//! expiry and issue time are all set and all checked: jsonwebtoken checks
//! neither issuer nor audience unless told to.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use serde::{Deserialize, Serialize};

use crate::domain::UserId;

pub const MIN_SECRET_BYTES: usize = 32;
const ISSUER: &str = "cohort";
const AUDIENCE: &str = "cohort-api";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
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

#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: u64,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Tokens {
    pub fn new(secret: &[u8], ttl_secs: u64) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "COHORT_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes (got {})",
                secret.len()
            ));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
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
            exp: iat + self.ttl_secs,
            ver: version,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding cannot fail")
    }

    /// The token's user and the token version it was issued under.
    pub fn verify(&self, token: &str) -> Result<(UserId, i64), TokenError> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| TokenError::Invalid)?;
        if data.claims.iat > now() + self.validation.leeway {
            return Err(TokenError::Invalid);
        }
        let ver = data.claims.ver;
        data.claims
            .sub
            .parse()
            .map(|id| (UserId(id), ver))
            .map_err(|_| TokenError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn forge(alg: Algorithm, claims: &Claims, secret: &[u8]) -> String {
        encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn claims(iss: &str, aud: &str, exp: u64) -> Claims {
        Claims {
            sub: "7".into(),
            iss: iss.into(),
            aud: aud.into(),
            iat: now(),
            exp,
            ver: 0,
        }
    }

    #[test]
    fn round_trip() {
        let t = Tokens::new(SECRET, 60).unwrap();
        assert_eq!(t.verify(&t.issue(UserId(7), 3)).unwrap(), (UserId(7), 3));
    }

    #[test]
    fn rejects_short_secret() {
        assert!(Tokens::new(b"short", 60).is_err());
    }

    #[test]
    fn rejects_forgeries() {
        let t = Tokens::new(SECRET, 60).unwrap();
        let later = now() + 60;
        assert!(
            t.verify(&forge(
                Algorithm::HS512,
                &claims(ISSUER, AUDIENCE, later),
                SECRET
            ))
            .is_err()
        );
        assert!(
            t.verify(&forge(
                Algorithm::HS256,
                &claims("evil", AUDIENCE, later),
                SECRET
            ))
            .is_err()
        );
        assert!(
            t.verify(&forge(
                Algorithm::HS256,
                &claims(ISSUER, "other", later),
                SECRET
            ))
            .is_err()
        );
        assert!(
            t.verify(&forge(
                Algorithm::HS256,
                &claims(ISSUER, AUDIENCE, now() - 120),
                SECRET
            ))
            .is_err()
        );
        let other = b"another secret of at least 32 bytes!!";
        assert!(
            t.verify(&forge(
                Algorithm::HS256,
                &claims(ISSUER, AUDIENCE, later),
                other
            ))
            .is_err()
        );
        // alg "none": header {"alg":"none"}, no signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(serde_json::to_vec(&claims(ISSUER, AUDIENCE, later)).unwrap())
        );
        assert!(t.verify(&none).is_err());
    }
}
