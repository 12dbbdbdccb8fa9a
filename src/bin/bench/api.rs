//! The runbookd calls the figures make (SSE execute, async execute, attach to
//! `/api/runs/{id}/events`) and the reading of a run's event stream up to its `done` event,
//! checking that output ids only grow.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{Connection, Head};
use crate::error::BenchError;
use crate::sse::{self, Event, Flow};

/// How long a read may see nothing before the connection is given up (longer than the
/// server's 15 s keepalive interval).
pub const IDLE: Duration = Duration::from_secs(40);

/// How much of a failed run's stderr an error message quotes.
const STDERR_HEAD_BYTES: usize = 400;

/// Where the server is and how to authenticate.
#[derive(Clone)]
pub struct Api {
    pub addr: SocketAddr,
    pub token: String,
}

/// The end of a run as seen by one viewer.
#[derive(Debug, Clone)]
pub struct RunEnd {
    pub return_code: i64,
    /// When the `done` event arrived.
    pub done_at: Instant,
    /// The same moment on the wall clock.
    pub done_wall: std::time::SystemTime,
    pub stderr_bytes: u64,
    /// The start of stderr, for error messages.
    pub stderr_head: String,
}

/// The part of the `done` event's result object the benchmark reads.
#[derive(serde::Deserialize)]
struct DoneResult {
    return_code: i64,
}

fn env_body(env: &[(&str, &str)]) -> Vec<u8> {
    let vars: serde_json::Map<String, Value> = env
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    serde_json::json!({ "env_vars": vars })
        .to_string()
        .into_bytes()
}

fn expect_status(head: &Head, status: u16, what: &str) -> Result<(), BenchError> {
    if head.status == status {
        Ok(())
    } else {
        Err(BenchError::Protocol(format!(
            "{what}: status {} (expected {status})",
            head.status
        )))
    }
}

impl Api {
    /// Starts an SSE execute; returns the connection with its head read (200 checked).
    pub fn execute_sse(
        &self,
        runbook: &str,
        env: &[(&str, &str)],
    ) -> Result<Connection, BenchError> {
        let mut connection = Connection::open(self.addr, IDLE)?;
        let auth = format!("Bearer {}", self.token);
        connection.send(
            "POST",
            &format!("/api/runbooks/{runbook}/execute"),
            &[
                ("Authorization", &auth),
                ("Accept", "text/event-stream"),
                ("Content-Type", "application/json"),
            ],
            &env_body(env),
        )?;
        let head = connection.read_head()?;
        if head.status != 200 {
            let body = connection.read_body_to_end(64 * 1024).unwrap_or_default();
            return Err(BenchError::Protocol(format!(
                "execute {runbook}: status {}: {}",
                head.status,
                String::from_utf8_lossy(&body)
            )));
        }
        if !head
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream"))
        {
            return Err(BenchError::Protocol(format!(
                "execute {runbook}: not an event stream"
            )));
        }
        Ok(connection)
    }

    /// Starts a run with `?async=true`; returns its id.
    pub fn execute_async(&self, runbook: &str, env: &[(&str, &str)]) -> Result<String, BenchError> {
        let mut connection = Connection::open(self.addr, IDLE)?;
        let auth = format!("Bearer {}", self.token);
        connection.send(
            "POST",
            &format!("/api/runbooks/{runbook}/execute?async=true"),
            &[
                ("Authorization", &auth),
                ("Accept", "application/json"),
                ("Content-Type", "application/json"),
            ],
            &env_body(env),
        )?;
        let head = connection.read_head()?;
        let body = connection.read_body_to_end(1024 * 1024)?;
        expect_status(&head, 202, &format!("async execute {runbook}"))?;
        let json: Value = serde_json::from_slice(&body)
            .map_err(|e| BenchError::Protocol(format!("async execute answer: {e}")))?;
        json.get("run_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| BenchError::Protocol("async execute answer without run_id".into()))
    }

    /// Attaches to a run's events; returns the connection with its head read (200 checked).
    pub fn attach(&self, run_id: &str) -> Result<Connection, BenchError> {
        let mut connection = Connection::open(self.addr, IDLE)?;
        let auth = format!("Bearer {}", self.token);
        connection.send(
            "GET",
            &format!("/api/runs/{run_id}/events"),
            &[("Authorization", &auth), ("Accept", "text/event-stream")],
            b"",
        )?;
        let head = connection.read_head()?;
        expect_status(&head, 200, "attach")?;
        Ok(connection)
    }
}

/// Reads a run's events until `done`, handing every `stdout` event to `on_stdout`; fails if
/// the stream ends without `done`, if output ids do not grow, or after `deadline`.
pub fn read_run(
    connection: &mut Connection,
    deadline: Instant,
    mut on_stdout: impl FnMut(&Event<'_>),
) -> Result<RunEnd, BenchError> {
    let mut last_id: Option<u64> = None;
    let mut stderr_bytes = 0u64;
    let mut stderr_head = String::new();
    let mut end: Option<RunEnd> = None;
    sse::follow(connection, deadline, |event| {
        match event.name {
            "stdout" | "stderr" => {
                let id = event
                    .id
                    .and_then(|id| id.parse::<u64>().ok())
                    .ok_or_else(|| {
                        BenchError::Protocol("output event without a numeric id".into())
                    })?;
                if last_id.is_some_and(|last| id <= last) {
                    return Err(BenchError::Mismatch(format!(
                        "event id {id} after {last_id:?}: out of order"
                    )));
                }
                last_id = Some(id);
                if event.name == "stdout" {
                    on_stdout(event);
                } else {
                    stderr_bytes += event.data.len() as u64;
                    if stderr_head.len() < STDERR_HEAD_BYTES {
                        stderr_head.push_str(&String::from_utf8_lossy(event.data));
                        stderr_head.push('\n');
                    }
                }
            }
            "done" => {
                // Only the return code is kept; the (possibly megabytes of) output strings are
                // checked as JSON but not built.
                let result: DoneResult = serde_json::from_slice(event.data)
                    .map_err(|e| BenchError::Protocol(format!("done data: {e}")))?;
                let return_code = result.return_code;
                end = Some(RunEnd {
                    return_code,
                    done_at: event.at,
                    done_wall: event.wall,
                    stderr_bytes,
                    stderr_head: std::mem::take(&mut stderr_head),
                });
                return Ok(Flow::Stop);
            }
            _ => {}
        }
        Ok(Flow::Continue)
    })?;
    end.ok_or_else(|| BenchError::Protocol("event stream ended without done".into()))
}

/// Fails unless the run succeeded.
pub fn expect_success(end: &RunEnd, what: &str) -> Result<(), BenchError> {
    if end.return_code == 0 {
        Ok(())
    } else {
        Err(BenchError::Mismatch(format!(
            "{what}: return code {}, stderr ({} bytes): {:?}",
            end.return_code,
            end.stderr_bytes,
            end.stderr_head
                .chars()
                .take(STDERR_HEAD_BYTES)
                .collect::<String>()
        )))
    }
}
