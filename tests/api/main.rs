//! Integration tests: the real application on port 0, over HTTP, against
//! real Postgres and Redis (or the embedded store). One binary, so it builds
//! once.

mod helpers;

mod account;
mod cluster;
mod concurrency;
mod docs;
mod failures;
mod faults;
mod group;
mod import;
mod index;
mod methods;
mod observability;
mod openapi;
mod ops;
mod properties;
mod restart;
mod security;
mod signin;
mod signup;
mod store;
