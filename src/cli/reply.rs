//! Reads the small JSON replies of the runbookd API and turns error replies into a message
//! for the terminal.
#![forbid(unsafe_code)]

use std::io::{self, BufRead};

use serde_json::Value;

use crate::client::http::Response;

/// Most bytes read from a JSON reply (a run record or an error).
const MAX_REPLY_BYTES: u64 = 1024 * 1024;

/// Reads a reply's body and parses it as JSON; `Value::Null` when it is not JSON.
pub fn read_json<R: BufRead>(response: &mut Response<R>) -> io::Result<Value> {
    let body = response.read_body_limited(MAX_REPLY_BYTES)?;
    Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// The message to show for an error reply: its JSON `error`, else the start of its text,
/// else the status.
pub fn error_message<R: BufRead>(response: &mut Response<R>) -> String {
    let status = response.status;
    let body = response
        .read_body_limited(MAX_REPLY_BYTES)
        .unwrap_or_default();
    message_from_body(status, &body)
}

fn message_from_body(status: u16, body: &[u8]) -> String {
    if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) {
        if let Some(Value::String(error)) = object.get("error") {
            return format!("{error} (HTTP {status})");
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return format!("HTTP {status}");
    }
    let shown: String = text.chars().take(300).collect();
    format!("HTTP {status}: {shown}")
}

/// The exit status for a run's `return_code`: its low 8 bits, 1 for a negative code.
pub fn exit_status_of(record: &Value) -> Option<u8> {
    let code = record.get("return_code")?.as_i64()?;
    Some(if code < 0 { 1 } else { (code & 255) as u8 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages() {
        assert_eq!(
            message_from_body(404, br#"{"success":false,"error":"run not found"}"#),
            "run not found (HTTP 404)"
        );
        assert_eq!(
            message_from_body(502, b"  Bad gateway\n"),
            "HTTP 502: Bad gateway"
        );
        assert_eq!(message_from_body(500, b""), "HTTP 500");
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status_of(&json!({"return_code": 0})), Some(0));
        assert_eq!(exit_status_of(&json!({"return_code": 3})), Some(3));
        assert_eq!(exit_status_of(&json!({"return_code": 256})), Some(0));
        assert_eq!(exit_status_of(&json!({"return_code": 300})), Some(44));
        assert_eq!(exit_status_of(&json!({"return_code": -9})), Some(1));
        assert_eq!(exit_status_of(&json!({"return_code": null})), None);
        assert_eq!(exit_status_of(&json!({})), None);
    }
}
