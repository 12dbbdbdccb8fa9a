//! The benchmark's one error type: why a figure could not be measured, or why what it measured
//! was wrong (bytes missing, a bad status). Timing goals that are missed are not errors.
#![forbid(unsafe_code)]

use std::io;

/// Why a figure failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// An operating-system call failed; the text says what was being done.
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    /// The server process could not be started or stopped.
    #[error("server: {0}")]
    Server(String),
    /// The server answered something that does not follow HTTP or SSE, or a status we did not ask for.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The output received differs from what the script wrote.
    #[error("output mismatch: {0}")]
    Mismatch(String),
    /// A bound on the benchmark's own running time was reached.
    #[error("timeout: {0}")]
    Timeout(String),
}

impl BenchError {
    /// Wraps an `io::Error` with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
        let what = what.into();
        move |e| BenchError::Io(what, e)
    }
}
