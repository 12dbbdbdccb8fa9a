//! The benchmark's one error type: why a figure could not be measured, or why what it measured
//! was wrong (bytes missing, a bad status). Timing goals that are missed are not errors.
#![forbid(unsafe_code)]

use std::fmt;
use std::io;

/// Why a figure failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum BenchError {
    /// An operating-system call failed; the text says what was being done.
    Io(String, io::Error),
    /// The server process could not be started or stopped.
    Server(String),
    /// The server answered something that does not follow HTTP or SSE, or a status we did not ask for.
    Protocol(String),
    /// The output received differs from what the script wrote.
    Mismatch(String),
    /// A bound on the benchmark's own running time was reached.
    Timeout(String),
}

impl BenchError {
    /// Wraps an `io::Error` with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
        let what = what.into();
        move |e| BenchError::Io(what, e)
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Io(what, e) => write!(f, "{what}: {e}"),
            BenchError::Server(m) => write!(f, "server: {m}"),
            BenchError::Protocol(m) => write!(f, "protocol: {m}"),
            BenchError::Mismatch(m) => write!(f, "output mismatch: {m}"),
            BenchError::Timeout(m) => write!(f, "timeout: {m}"),
        }
    }
}

impl std::error::Error for BenchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BenchError::Io(_, e) => Some(e),
            _ => None,
        }
    }
}
