//! Authentication: password hashing (argon2id) and access tokens (JWT).

mod password;
mod token;

pub use password::{ARGON2_M_KIB, ARGON2_P, ARGON2_T, PasswordHasher};
pub use token::{Claims, MAX_TOKEN_TTL_SECS, MIN_SECRET_BYTES, TokenError, Tokens};
