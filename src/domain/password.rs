//! Passwords: 15 to 128 characters, taken exactly as given. The value is
//! never printed: `Debug` is redacted so it cannot leak into a log line.

use std::fmt;

pub const MIN_PASSWORD_CHARS: usize = 15;
pub const MAX_PASSWORD_CHARS: usize = 128;

#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn parse(raw: String) -> Result<Self, String> {
        // Bytes first: a 100 KB string must not even be counted char by char.
        if raw.len() > MAX_PASSWORD_CHARS * 4 {
            return Err(format!("must be at most {MAX_PASSWORD_CHARS} characters"));
        }
        let n = raw.chars().count();
        if n < MIN_PASSWORD_CHARS {
            return Err(format!("must be at least {MIN_PASSWORD_CHARS} characters"));
        }
        if n > MAX_PASSWORD_CHARS {
            return Err(format!("must be at most {MAX_PASSWORD_CHARS} characters"));
        }
        Ok(Self(raw))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_bounds_and_no_trimming() {
        assert!(Password::parse("x".repeat(14)).is_err());
        assert!(Password::parse("x".repeat(129)).is_err());
        let p = Password::parse("  fifteen chars ".into()).unwrap();
        assert_eq!(p.expose(), "  fifteen chars ");
        assert_eq!(format!("{p:?}"), "Password(<redacted>)");
    }
}
