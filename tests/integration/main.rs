//! Integration tests: start the real runbookd binary per test and drive it over sockets.

mod util;

mod auth;
mod config;
mod execute_sse;
mod execute_sync;
mod history;
mod observability;
mod process;
mod recursion;
mod routes;
mod runbooks;
mod subrunbooks;
