//! One line of an import file: parsed, validated and canonicalised exactly
//! as a signup is, or rejected with a reason a person can act on.
//!
//! A line is a JSON object with `username`, `attributes`, and either
//! `password` (checked as a new password, then hashed here) or
//! `password_hash` (an argon2id PHC string kept as it is, so a user base
//! moves without anyone's password; refused if its parameters are weaker
//! than the service's).

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::auth::{ARGON2_M_KIB, ARGON2_P, ARGON2_T};
use crate::domain::grouping::{SubsetKey, subset_keys};
use crate::domain::{
    AttributeRules, AttributeSet, FieldError, Password, Signup, Threshold, Username,
};

/// Longest line accepted: the signup endpoint's body limit.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    username: Option<String>,
    attributes: Option<Vec<String>>,
    password: Option<String>,
    password_hash: Option<String>,
}

/// How the user will sign in.
#[derive(Debug, Clone)]
pub enum Credential {
    /// To be hashed by the import.
    Password(Password),
    /// A PHC string, checked, stored as is.
    Hash(String),
}

/// A valid line.
#[derive(Debug, Clone)]
pub struct Entry {
    pub line: u64,
    pub username: Username,
    pub attributes: AttributeSet,
    pub credential: Credential,
    pub fingerprint: Vec<u8>,
    /// Its t-subset keys, when `Rules::subset_keys` (empty otherwise).
    pub keys: Vec<SubsetKey>,
}

/// A line that will not be imported, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub line: u64,
    /// When the line had a readable one.
    pub username: Option<String>,
    pub reason: String,
}

/// Keyed, because it covers the password: a plain hash kept beside the
/// user would be a fast way to test guesses.
#[derive(Clone)]
pub struct Fingerprinter {
    key: Vec<u8>,
}

impl Fingerprinter {
    pub fn new(secret: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b"cohort import fingerprint\0");
        h.update(secret);
        Self {
            key: h.finalize().to_vec(),
        }
    }

    /// What makes two lines the same user: the canonical username, the
    /// password (or hash) and the canonical attributes. Not the line number,
    /// so that a file edited between runs (bad lines fixed or removed) still
    /// finds its imported users.
    fn of(&self, u: &Username, c: &Credential, a: &AttributeSet) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("any key length");
        mac.update(u.as_str().as_bytes());
        match c {
            Credential::Password(p) => {
                mac.update(b"\0password\0");
                mac.update(p.expose().as_bytes());
            }
            Credential::Hash(h) => {
                mac.update(b"\0hash\0");
                mac.update(h.as_bytes());
            }
        }
        for x in a.iter() {
            mac.update(b"\0");
            mac.update(x.as_str().as_bytes());
        }
        mac.finalize().into_bytes().to_vec()
    }
}

/// What validating a line needs.
#[derive(Clone)]
pub struct Rules {
    pub attributes: AttributeRules,
    pub threshold: Threshold,
    pub fingerprinter: Fingerprinter,
    /// Whether entries carry their t-subset keys: the distributed import
    /// looks them up in Postgres; the embedded one decides in process,
    /// where a SHA-256 a subset would be wasted.
    pub subset_keys: bool,
}

/// Parses and validates one line (its bytes, without the newline).
pub fn parse(line: u64, bytes: &[u8], rules: &Rules) -> Result<Entry, Reject> {
    let reject = |username: Option<String>, reason: String| Reject {
        line,
        username,
        reason,
    };
    if bytes.len() > MAX_LINE_BYTES {
        return Err(reject(
            None,
            format!("line longer than {MAX_LINE_BYTES} bytes"),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| reject(None, "not valid UTF-8".into()))?;
    let raw: RawLine = serde_json::from_str(text)
        .map_err(|e| reject(None, format!("not a JSON object of the import format: {e}")))?;
    let shown = raw.username.clone();
    let credential_and = |signup_password: Option<String>| {
        Signup::parse(
            raw.username.clone(),
            signup_password,
            raw.attributes.clone(),
            rules.attributes,
        )
    };
    let (username, attributes, credential) = match (raw.password, raw.password_hash) {
        (Some(_), Some(_)) => {
            return Err(reject(
                shown,
                "give either password or password_hash, not both".into(),
            ));
        }
        (None, None) => {
            return Err(reject(
                shown,
                "password or password_hash is required".into(),
            ));
        }
        (Some(p), None) => {
            let s = credential_and(Some(p)).map_err(|errs| reject(shown.clone(), fields(&errs)))?;
            (s.username, s.attributes, Credential::Password(s.password))
        }
        (None, Some(h)) => {
            // The signup's validation of the other fields (not the password
            // check: there is no password), then the hash itself.
            let mut errs = Vec::new();
            let username = match raw.username.as_deref().map(Username::parse) {
                None => {
                    errs.push(FieldError::new("username", "is required"));
                    None
                }
                Some(Err(m)) => {
                    errs.push(FieldError::new("username", m));
                    None
                }
                Some(Ok(u)) => Some(u),
            };
            let attributes = match raw
                .attributes
                .as_deref()
                .map(|a| AttributeSet::parse(a, rules.attributes))
            {
                None => {
                    errs.push(FieldError::new("attributes", "is required"));
                    None
                }
                Some(Err(e)) => {
                    errs.extend(e);
                    None
                }
                Some(Ok(a)) => Some(a),
            };
            let phc = check_phc(&h);
            match (username, attributes, phc) {
                (Some(u), Some(a), Ok(())) => (u, a, Credential::Hash(h)),
                (_, _, phc) => {
                    let mut reasons = Vec::new();
                    if !errs.is_empty() {
                        reasons.push(fields(&errs));
                    }
                    if let Err(e) = phc {
                        reasons.push(format!("password_hash: {e}"));
                    }
                    return Err(reject(shown, reasons.join("; ")));
                }
            }
        }
    };
    let fingerprint = rules.fingerprinter.of(&username, &credential, &attributes);
    let keys = if rules.subset_keys {
        subset_keys(&attributes, rules.threshold)
    } else {
        Vec::new()
    };
    Ok(Entry {
        line,
        username,
        attributes,
        credential,
        fingerprint,
        keys,
    })
}

fn fields(errs: &[FieldError]) -> String {
    errs.iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// An argon2id PHC string at least as strong as the service's own hashes:
/// at least its memory (m), and at least its memory-time product (m x t),
/// so OWASP's equivalent m=47104,t=1 passes and m=19456,t=1 does not.
pub fn check_phc(phc: &str) -> Result<(), String> {
    use argon2::{Algorithm, Params, PasswordHash};
    let parsed = PasswordHash::new(phc).map_err(|e| {
        format!("not a PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash): {e}")
    })?;
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return Err(format!(
            "algorithm {} is not accepted: only argon2id hashes can be imported \
             (import these users with their password, or have them reset it)",
            parsed.algorithm
        ));
    }
    if parsed.version != Some(0x13) {
        return Err("argon2 version must be 19 (0x13)".into());
    }
    let params =
        Params::try_from(&parsed).map_err(|e| format!("invalid argon2 parameters: {e}"))?;
    let (m, t, p) = (params.m_cost(), params.t_cost(), params.p_cost());
    if m < ARGON2_M_KIB
        || u64::from(m) * u64::from(t) < u64::from(ARGON2_M_KIB) * u64::from(ARGON2_T)
    {
        return Err(format!(
            "argon2id parameters m={m},t={t},p={p} are weaker than the service's \
             (m={ARGON2_M_KIB},t={ARGON2_T},p={ARGON2_P}: at least that memory and memory x time)"
        ));
    }
    let salt_len = parsed.salt.map_or(0, |s| s.len());
    if salt_len < 8 {
        return Err(format!("salt of {salt_len} bytes; at least 8 are required"));
    }
    let out_len = parsed.hash.map_or(0, |h| h.len());
    if out_len < 16 {
        return Err(format!(
            "hash output of {out_len} bytes; at least 16 are required"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            attributes: AttributeRules { min: 3, max: 16 },
            threshold: Threshold::new(3, 16).unwrap(),
            fingerprinter: Fingerprinter::new(b"k"),
            subset_keys: true,
        }
    }

    fn hash_with(m: u32, t: u32) -> String {
        use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
        use argon2::{Algorithm, Argon2, Params, Version};
        let params = Params::new(m, t, 1, None).unwrap();
        let mut out = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
            .hash_password_into(b"pw", b"saltsaltsaltsalt", &mut out)
            .unwrap();
        PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).unwrap(),
            salt: Some(Salt::new(b"saltsaltsaltsalt").unwrap()),
            hash: Some(Output::new(&out).unwrap()),
        }
        .to_string()
    }

    #[test]
    fn phc_parameters_at_least_the_services() {
        assert!(check_phc(&hash_with(19_456, 2)).is_ok());
        assert!(check_phc(&hash_with(47_104, 1)).is_ok());
        let weak = check_phc(&hash_with(19_456, 1)).unwrap_err();
        assert!(weak.contains("weaker"), "{weak}");
        assert!(
            check_phc(&hash_with(8_192, 5))
                .unwrap_err()
                .contains("weaker")
        );
        let bcrypt = "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW";
        assert!(check_phc(bcrypt).is_err());
        let argon2i = hash_with(19_456, 2).replacen("argon2id", "argon2i", 1);
        assert!(check_phc(&argon2i).unwrap_err().contains("only argon2id"));
    }

    #[test]
    fn lines_are_validated_as_signups_are() {
        let r = rules();
        let ok = br#"{"username":"Alice","password":"correct horse battery staple","attributes":["A","b","C "]}"#;
        let e = parse(1, ok, &r).unwrap();
        assert_eq!(e.username.as_str(), "alice");
        assert_eq!(e.attributes.to_strings(), ["a", "b", "c"]);
        assert_eq!(e.keys.len(), 1);
        for (bad, why) in [
            (&b"not json"[..], "JSON"),
            (br#"{"username":"al","password":"correct horse battery staple","attributes":["a","b","c"]}"#, "username"),
            (br#"{"username":"alice","password":"passwordpassword","attributes":["a","b","c"]}"#, "too common"),
            (br#"{"username":"alice","password":"correct horse battery staple","attributes":["a","b"]}"#, "attributes"),
            (br#"{"username":"alice","attributes":["a","b","c"]}"#, "required"),
            (br#"{"username":"alice","password":"x","password_hash":"y","attributes":["a","b","c"]}"#, "not both"),
            (br#"{"username":"alice","pasword":"correct horse battery staple","attributes":["a","b","c"]}"#, "unknown field"),
            (br#"{"username":"alice","password_hash":"$2b$12$abc","attributes":["a","b","c"]}"#, "password_hash"),
            (&b"\xff\xfe"[..], "UTF-8"),
        ] {
            let err = parse(7, bad, &r).err().unwrap_or_else(|| panic!("accepted {bad:?}"));
            assert_eq!(err.line, 7);
            assert!(err.reason.contains(why), "{why}: {}", err.reason);
        }
        let long = vec![b' '; MAX_LINE_BYTES + 1];
        assert!(parse(1, &long, &r).unwrap_err().reason.contains("longer"));
    }

    #[test]
    fn fingerprints_cover_the_credential_and_canonical_attributes() {
        let r = rules();
        let a = parse(1, br#"{"username":"bob","password":"correct horse battery staple","attributes":["x","y","z"]}"#, &r).unwrap();
        let b = parse(9, br#"{"username":"BOB","password":"correct horse battery staple","attributes":["Z","y","x"]}"#, &r).unwrap();
        let c = parse(2, br#"{"username":"bob","password":"correct horse battery stapler","attributes":["x","y","z"]}"#, &r).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, c.fingerprint);
    }
}
