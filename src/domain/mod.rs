//! The domain: values that cannot be invalid once constructed, and the
//! grouping rule itself. Nothing in here does I/O, so every rule of the
//! contract can be tested as plain functions.

pub mod attribute;
pub mod grouping;
mod password;
mod signup;
mod username;

pub use attribute::{Attribute, AttributeRules, AttributeSet};
pub use grouping::{GroupId, Threshold, UserId};
pub use password::Password;
pub use signup::Signup;
pub use username::Username;

/// One reason an input field was rejected; the HTTP layer turns a list of
/// these into the `errors` array of a 422 problem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}
