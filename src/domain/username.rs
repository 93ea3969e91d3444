//! Usernames: 3 to 32 characters of `a-z 0-9 _ . -`, case-insensitive.

use std::fmt;

/// A valid username in its canonical (lower-case) form.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    pub fn parse(raw: &str) -> Result<Self, String> {
        // Check the bytes before case-folding: U+212A KELVIN SIGN lower-cases
        // to an ASCII `k`, and must not sneak in as one.
        let len = raw.len();
        if !(3..=32).contains(&len) {
            return Err("must be 3 to 32 characters".into());
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err("may contain only a-z, 0-9, '_', '.' and '-'".into());
        }
        Ok(Self(raw.to_ascii_lowercase()))
    }

    /// A username read back from the system of record, trusted as stored
    /// (it was parsed on the way in).
    pub fn trusted(stored: String) -> Self {
        Self(stored)
    }

    pub fn into_string(self) -> String {
        self.0
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_and_checks_charset() {
        assert_eq!(
            Username::parse("Alice.B-1_").unwrap().as_str(),
            "alice.b-1_"
        );
        assert!(Username::parse("al").is_err());
        assert!(Username::parse(&"a".repeat(33)).is_err());
        assert!(Username::parse("al ice").is_err());
        assert!(Username::parse("\u{212A}ate").is_err());
        assert!(Username::parse("élise").is_err());
    }
}
