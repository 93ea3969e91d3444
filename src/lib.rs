//! cohort: places every new user into the existing group that shares the
//! most attributes with them, or founds a new group.
//!
//! - `domain`: the rules, as pure code;
//! - `index`: the group index (in-process, Redis);
//! - `store`: the system of record (Postgres, embedded SQLite);
//! - `auth`: password hashing and tokens;
//! - `signup`: the signup protocol, its steps and failure analysis;
//! - `service`: the use cases behind the API;
//! - `import`: `cohort import`, many signups in batches; `stats`: `cohort stats`;
//! - `http`: the API; `config`, `telemetry`, `startup`: wiring.

pub mod auth;
pub mod config;
pub mod domain;
pub mod error;
pub mod failpoint;
pub mod http;
pub mod import;
pub mod index;
pub mod otel;
pub mod ratelimit;
pub mod service;
pub mod signup;
pub mod startup;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod tls;
