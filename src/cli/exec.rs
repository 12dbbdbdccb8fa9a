//! Starts a run without waiting for it: `POST /api/runbooks/{file}/execute?async=true` with
//! `Prefer: respond-async`, expecting 202 and the new run's id.
#![forbid(unsafe_code)]

use serde_json::{Map, Value};

use super::args::ServerArgs;
use super::reply::{error_message, read_json};
use crate::client::http::{self, HttpError, Request, Timeouts};
use crate::client::url::encode_segment;

/// Why no run was started (or its id is unknown).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// No reply: connection, send or read failure.
    #[error("{0}")]
    Http(#[source] HttpError),
    /// The server answered with something else than 202.
    #[error("{message}")]
    Rejected { status: u16, message: String },
    /// A 202 without a usable `run_id`.
    #[error("unexpected reply to execute: {0}")]
    BadReply(String),
}

impl ExecError {
    /// 2 for a request the server refused as the client's fault (4xx), else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::Rejected { status, .. } if (400..500).contains(status) => 2,
            _ => 1,
        }
    }
}

/// The JSON request body: `{"env_vars": {NAME: VALUE, ...}}`, a later NAME winning.
pub fn request_body(env_vars: &[(String, String)]) -> Vec<u8> {
    let vars: Map<String, Value> = env_vars
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect();
    let mut body = Map::new();
    body.insert("env_vars".to_owned(), Value::Object(vars));
    Value::Object(body).to_string().into_bytes()
}

/// Starts a run of `runbook` and returns its run id.
pub fn start_run(
    server: &ServerArgs,
    runbook: &str,
    env_vars: &[(String, String)],
    timeouts: Timeouts,
) -> Result<String, ExecError> {
    let body = request_body(env_vars);
    let request = Request {
        method: "POST",
        target: server.base.target(&format!(
            "/api/runbooks/{}/execute?async=true",
            encode_segment(runbook)
        )),
        headers: vec![
            ("Authorization", format!("Bearer {}", server.token)),
            ("Prefer", "respond-async".to_owned()),
            ("Accept", "application/json".to_owned()),
            ("Content-Type", "application/json".to_owned()),
        ],
        body: Some(&body),
    };
    let mut response = http::send(&server.base, &request, timeouts).map_err(ExecError::Http)?;
    if response.status != 202 {
        return Err(ExecError::Rejected {
            status: response.status,
            message: error_message(&mut response),
        });
    }
    let reply = read_json(&mut response)
        .map_err(|e| ExecError::BadReply(format!("cannot read the body: {e}")))?;
    match reply.get("run_id").and_then(Value::as_str) {
        Some(run_id) if !run_id.is_empty() => Ok(run_id.to_owned()),
        _ => Err(ExecError::BadReply("no run_id in the 202 reply".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_holds_the_env_vars_as_strings() {
        let body = request_body(&[
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "x \"y\"".to_owned()),
            ("A".to_owned(), "2".to_owned()),
        ]);
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"env_vars": {"A": "2", "B": "x \"y\""}})
        );
        let empty: Value = serde_json::from_slice(&request_body(&[])).unwrap();
        assert_eq!(empty, serde_json::json!({"env_vars": {}}));
    }
}
