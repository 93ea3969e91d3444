//! Passwords: 15 to 128 characters, taken exactly as given. The value is
//! never printed: `Debug` is redacted so it cannot leak into a log line.
//!
//! A *new* password (signup, password change) must also not be a common or
//! guessable one, as NIST SP 800-63B rev. 4 (3.1.1.2) requires, with no
//! composition rules. The check is zxcvbn (Dropbox's estimator, in the
//! well-kept `zxcvbn` crate): it carries lists of the most common leaked
//! passwords (xato, 30,000), English words, names and surnames, and it also
//! sees what a plain list cannot: repeats (`aaaaaaaaaaaaaaa`,
//! `passwordpassword`), sequences (`123456789012345`), keyboard walks, dates,
//! l33t spellings of listed words, and the user's own username. A password
//! it estimates at under 10^8 guesses (score 0-2: "too guessable" to
//! "somewhat guessable") is refused; 15 characters of anything else pass.

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

    /// A password chosen now: [`Password::parse`], and not guessable.
    /// `context` holds what an attacker knows of the user (the username).
    pub fn parse_new(raw: String, context: &[&str]) -> Result<Self, String> {
        let p = Self::parse(raw)?;
        let estimate = zxcvbn::zxcvbn(&p.0, context);
        if estimate.score() < zxcvbn::Score::Three {
            let why = estimate
                .feedback()
                .and_then(|f| f.warning())
                .map(|w| format!(" ({w})"))
                .unwrap_or_default();
            return Err(format!(
                "is too common or too easy to guess{why}: choose a longer phrase of unrelated words"
            ));
        }
        Ok(p)
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

    #[test]
    fn common_and_guessable_new_passwords_are_refused() {
        for weak in [
            "aaaaaaaaaaaaaaa",
            "123456789012345",
            "passwordpassword",
            "qwertyuiopasdfgh",
            "iloveyouiloveyou",
            "Password12345678",
            "abcdefghijklmnop",
        ] {
            let err = Password::parse_new(weak.into(), &[]).unwrap_err();
            assert!(err.contains("too common"), "{weak}: {err}");
            // Still a valid password to sign in with (it may predate the rule).
            assert!(Password::parse(weak.into()).is_ok());
        }
        // The username is part of what an attacker knows.
        assert!(Password::parse_new("alice.wonderland1".into(), &["alice.wonderland1"]).is_err());
        for strong in [
            "correct horse battery staple",
            // The README's example.
            "correct horse battery",
            "  padded password here  ",
            "tangerine orbit velvet 42",
            "k8#Vq!2zLp0@Rm7",
        ] {
            assert!(Password::parse_new(strong.into(), &[]).is_ok(), "{strong}");
        }
    }
}
