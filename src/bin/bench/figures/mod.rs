//! The figures the benchmark measures, by name, and what they share: starting a fresh server
//! with a token for it, and the outcome each reports for the final summary.
#![forbid(unsafe_code)]

mod concurrent;
mod curlstreams;
mod done;
mod gap;
mod latency;
mod memory;
mod overhead;
mod seq;
mod viewers;

use std::path::PathBuf;

use crate::api::Api;
use crate::error::BenchError;
use crate::report::Row;
use crate::server::{Server, ServerSpec};
use crate::token;

/// Every figure, in the order they run.
pub const NAMES: [&str; 13] = [
    "gap",
    "seq",
    "rss100m",
    "rss1g",
    "viewers1000",
    "latency",
    "concurrent",
    "overhead",
    "streams200",
    "streams200_close",
    "seq_curl",
    "sse100m",
    "done_latency",
];

/// What the figures need to start servers.
pub struct Bench {
    pub binary: PathBuf,
    pub runbooks_dir: PathBuf,
    pub secret: String,
}

/// One figure's result for the summary line.
pub struct Outcome {
    pub summary: String,
    /// Whether the stated goal was met; `None` when the figure has no goal.
    pub goal_met: Option<bool>,
    /// Rows for the results table (figure, baseline, ratio, goal).
    pub rows: Vec<Row>,
}

impl Bench {
    /// Starts a fresh server (own state directory) with extra environment variables.
    pub fn start(&self, extra_env: &[(&str, &str)]) -> Result<(Server, Api), BenchError> {
        let server = Server::start(&ServerSpec {
            binary: &self.binary,
            runbooks_dir: &self.runbooks_dir,
            secret: &self.secret,
            extra_env,
        })?;
        let token = token::mint(
            self.secret.as_bytes(),
            "dev-idp",
            "dev-api",
            "bench-user",
            4 * 3600,
        );
        let api = Api {
            addr: server.addr,
            token,
        };
        Ok((server, api))
    }
}

/// Prints what the server wrote to stderr (at RUST_LOG=warn: warnings and errors), if anything.
pub fn note_server_stderr(server: &Server) {
    let lines = server.stderr_line_count();
    if lines > 0 {
        println!(
            "  server stderr: {lines} lines; last: {}",
            server.stderr_tail()
        );
    }
}

/// Runs the figure called `name`.
pub fn run(name: &str, bench: &Bench) -> Result<Outcome, BenchError> {
    match name {
        "gap" => gap::run(bench),
        "seq" => seq::run(bench),
        "rss100m" => memory::run_100m(bench),
        "rss1g" => memory::run_1g(bench),
        "viewers1000" => viewers::run(bench),
        "latency" => latency::run(bench),
        "concurrent" => concurrent::run(bench),
        "overhead" => overhead::run(bench),
        "streams200" => curlstreams::streams(bench),
        "streams200_close" => curlstreams::streams_closing(bench),
        "seq_curl" => curlstreams::seq(bench),
        "sse100m" => curlstreams::bulk(bench),
        "done_latency" => done::run(bench),
        other => Err(BenchError::Server(format!("no figure called {other:?}"))),
    }
}
