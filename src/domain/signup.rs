//! A signup request parsed as a whole: every invalid field is reported at
//! once, and a `Signup` exists only when all of them are valid.

use super::{AttributeRules, AttributeSet, FieldError, Password, Username};

#[derive(Debug, Clone)]
pub struct Signup {
    pub username: Username,
    pub password: Password,
    pub attributes: AttributeSet,
}

impl Signup {
    pub fn parse(
        username: Option<String>,
        password: Option<String>,
        attributes: Option<Vec<String>>,
        rules: AttributeRules,
    ) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let username = match username {
            None => {
                errors.push(FieldError::new("username", "is required"));
                None
            }
            Some(u) => Username::parse(&u)
                .map_err(|m| errors.push(FieldError::new("username", m)))
                .ok(),
        };
        let password = match password {
            None => {
                errors.push(FieldError::new("password", "is required"));
                None
            }
            Some(p) => Password::parse_new(p, &[username.as_ref().map_or("", |u| u.as_str())])
                .map_err(|m| errors.push(FieldError::new("password", m)))
                .ok(),
        };
        let attributes = match attributes {
            None => {
                errors.push(FieldError::new("attributes", "is required"));
                None
            }
            Some(a) => AttributeSet::parse(&a, rules)
                .map_err(|e| errors.extend(e))
                .ok(),
        };
        match (username, password, attributes) {
            (Some(username), Some(password), Some(attributes)) if errors.is_empty() => Ok(Self {
                username,
                password,
                attributes,
            }),
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_invalid_field() {
        let rules = AttributeRules { min: 3, max: 16 };
        let errs = Signup::parse(
            Some("a".into()),
            Some("short".into()),
            Some(vec!["x".into()]),
            rules,
        )
        .unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["username", "password", "attributes"]);
        let errs = Signup::parse(None, None, None, rules).unwrap_err();
        assert_eq!(errs.len(), 3);
    }
}
