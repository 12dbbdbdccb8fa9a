//! runbookd as a library: the server, its terminal client and the HTTP/SSE client they and the
//! benchmark share. The `runbookd` binary is `daemon::main`.
// Every module but `sys` says `#![forbid(unsafe_code)]`; the root can only deny it, as a
// forbid here would reach `sys`, which owns the system calls and allows it.
#![deny(unsafe_code)]

mod ahead;
mod app;
mod auth;
mod catalog;
mod cgroup;
mod chunker;
mod cli;
pub mod client;
mod clock;
mod config;
pub mod daemon;
mod download_link;
mod execute;
mod fault;
#[cfg(test)]
mod fuzz_tests;
mod history;
mod http;
mod jwt;
mod leftover;
mod lifecycle;
mod loglines;
mod markdown;
mod metrics;
mod output_text;
mod params;
mod path_lock;
mod privsep;
mod record;
mod result_json;
mod retention;
mod run;
mod run_ids;
mod runbook;
mod runbook_cache;
mod runbook_file;
mod runbook_summary;
mod runenv;
mod runlog;
mod samples;
mod spare_files;
mod spawn;
mod sse;
mod stages;
mod state_lock;
mod supervisor;
mod sys;
#[cfg(test)]
mod test_dirs;
mod validation;
mod workers;

/// Signs claims as an HS256 JWT (for the benchmark's bearer tokens).
pub use jwt::encode as sign_token;
