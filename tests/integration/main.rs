//! Integration tests: start the real runbookd binary per test and drive it over sockets.

mod util;

mod auth;
mod browser;
mod cli_client;
mod config;
mod deploy;
mod execute_sse;
mod execute_sync;
mod faults_chunks;
mod faults_files;
mod faults_limits;
mod faults_procs;
mod faults_settings;
mod fd_exhaustion;
mod fixtures;
mod history;
mod multi_instance;
mod observability;
mod process;
mod recursion;
mod routes;
mod run_overhead;
mod runbooks;
mod runs;
mod runs_cli;
mod runs_lifecycle;
mod runs_resume;
mod runs_support;
mod subrunbooks;
mod trust_connections;
mod trust_params;
mod trust_secrets;
mod trust_tokens;
mod trust_wire;
mod web_page;
