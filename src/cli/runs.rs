//! The run calls besides following one: a run's record, cancelling it, and listing recent
//! runs as a table (`runbookd runs`).
#![forbid(unsafe_code)]

use serde_json::Value;

use super::args::{RunsFilter, ServerArgs};
use super::reply::{error_message, read_json};
use super::summary::{duration_text, shown};
use crate::client::http::{self, HttpError, Request, Timeouts};
use crate::client::url::encode_segment;

/// Why a call got no usable answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No reply: connection, send or read failure.
    #[error("{0}")]
    Http(#[source] HttpError),
    /// The server answered with another status than expected.
    #[error("{message}")]
    Rejected { status: u16, message: String },
    /// The expected status with a body this client cannot use.
    #[error("unexpected reply: {0}")]
    BadReply(String),
}

impl CallError {
    /// 2 for a request the server refused as the client's fault (4xx), else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            CallError::Rejected { status, .. } if (400..500).contains(status) => 2,
            _ => 1,
        }
    }
}

/// Sends a body-less request and returns the JSON answer when the status is `expected`.
fn call(
    server: &ServerArgs,
    method: &str,
    path: &str,
    expected: u16,
    timeouts: Timeouts,
) -> Result<Value, CallError> {
    let request = Request {
        method,
        target: server.base.target(path),
        headers: vec![
            ("Authorization", format!("Bearer {}", server.token)),
            ("Accept", "application/json".to_owned()),
        ],
        body: None,
    };
    let mut response = http::send(&server.base, &request, timeouts).map_err(CallError::Http)?;
    if response.status != expected {
        return Err(CallError::Rejected {
            status: response.status,
            message: error_message(&mut response),
        });
    }
    read_json(&mut response).map_err(|e| CallError::BadReply(format!("cannot read the body: {e}")))
}

/// `GET /api/runs/{id}`: the run's record.
pub fn record(server: &ServerArgs, run_id: &str, timeouts: Timeouts) -> Result<Value, CallError> {
    call(
        server,
        "GET",
        &format!("/api/runs/{}", encode_segment(run_id)),
        200,
        timeouts,
    )
}

/// `DELETE /api/runs/{id}`: asks the server to cancel the run (202).
pub fn cancel(server: &ServerArgs, run_id: &str, timeouts: Timeouts) -> Result<(), CallError> {
    call(
        server,
        "DELETE",
        &format!("/api/runs/{}", encode_segment(run_id)),
        202,
        timeouts,
    )
    .map(|_| ())
}

/// `GET /api/runs` with the filters: the run records, newest first.
pub fn list(
    server: &ServerArgs,
    filter: &RunsFilter,
    timeouts: Timeouts,
) -> Result<Vec<Value>, CallError> {
    let mut query = Vec::new();
    if let Some(runbook) = &filter.runbook {
        query.push(format!("runbook={}", encode_segment(runbook)));
    }
    if let Some(status) = &filter.status {
        query.push(format!("status={}", encode_segment(status)));
    }
    if let Some(limit) = filter.limit {
        query.push(format!("limit={limit}"));
    }
    let path = if query.is_empty() {
        "/api/runs".to_owned()
    } else {
        format!("/api/runs?{}", query.join("&"))
    };
    let reply = call(server, "GET", &path, 200, timeouts)?;
    match reply.get("runs") {
        Some(Value::Array(runs)) => Ok(runs.clone()),
        _ => Err(CallError::BadReply("no runs list in the reply".to_owned())),
    }
}

/// The runs as an aligned table with a header: id, status, runbook, user, start (UTC) and
/// duration (the time so far for a run still going, measured against `now`).
pub fn table(runs: &[Value], now: chrono::DateTime<chrono::Utc>) -> String {
    let text = |run: &Value, field: &str| {
        run.get(field)
            .and_then(Value::as_str)
            .map(shown)
            .unwrap_or_else(|| "-".to_owned())
    };
    let mut rows = vec![[
        "RUN ID".to_owned(),
        "STATUS".to_owned(),
        "RUNBOOK".to_owned(),
        "USER".to_owned(),
        "STARTED (UTC)".to_owned(),
        "DURATION".to_owned(),
    ]];
    for run in runs {
        let started = run
            .get("started_at")
            .and_then(Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc));
        let duration = match run.get("duration_ms").and_then(Value::as_u64) {
            Some(ms) => duration_text(ms),
            None => match started {
                Some(started) => {
                    let so_far = u64::try_from((now - started).num_milliseconds()).unwrap_or(0);
                    format!("{} so far", duration_text(so_far))
                }
                None => "-".to_owned(),
            },
        };
        rows.push([
            text(run, "run_id"),
            text(run, "status"),
            text(run, "runbook"),
            text(run, "user"),
            started
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "-".to_owned()),
            duration,
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(width - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_table_of_runs() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:05:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let runs = vec![
            json!({"run_id": "r1-b", "status": "running", "runbook": "Long.md",
                   "user": "ann", "started_at": "2026-01-02T03:04:30.000Z", "duration_ms": null}),
            json!({"run_id": "r1-a", "status": "succeeded", "runbook": "Hello.md",
                   "user": "bob\u{1b}", "started_at": "2026-01-02T03:04:05.123Z", "duration_ms": 2345}),
        ];
        assert_eq!(
            table(&runs, now),
            "RUN ID  STATUS     RUNBOOK   USER  STARTED (UTC)        DURATION\n\
             r1-b    running    Long.md   ann   2026-01-02 03:04:30  30.0 s so far\n\
             r1-a    succeeded  Hello.md  bob?  2026-01-02 03:04:05  2.3 s\n"
        );
    }
}
