//! The lines the terminal client writes about a run rather than from it: the start line, the
//! final status line (status, exit code, duration, the server's reason) and what to do after
//! Ctrl-C.
#![forbid(unsafe_code)]

use serde_json::Value;

use crate::client::url::{BaseUrl, DEFAULT_URL};

/// `runbookd: run ID started (RUNBOOK)`, the first line `exec` writes to stderr.
pub fn started_line(run_id: &str, runbook: &str) -> String {
    format!(
        "runbookd: run {} started ({})\n",
        shown(run_id),
        shown(runbook)
    )
}

/// The status as words: `timed_out` reads `timed out`.
fn status_words(status: &str) -> String {
    shown(&status.replace('_', " "))
}

/// `runbookd: run ID STATUS (exit N) in D[: ERROR]` from a run record or a `done` result;
/// the parts the object lacks are left out.
pub fn final_line(run_id: &str, result: &Value) -> String {
    let mut line = format!("runbookd: run {}", shown(run_id));
    if let Some(status) = result.get("status").and_then(Value::as_str) {
        line.push(' ');
        line.push_str(&status_words(status));
    } else {
        line.push_str(" ended");
    }
    if let Some(code) = result.get("return_code").and_then(Value::as_i64) {
        line.push_str(&format!(" (exit {code})"));
    }
    if let Some(ms) = result.get("duration_ms").and_then(Value::as_u64) {
        line.push_str(&format!(" in {}", duration_text(ms)));
    }
    // The server's reason (timeout, cancel, a run that did not start); a script's own
    // non-zero exit needs no words beyond its code.
    if let Some(error) = result.get("error").and_then(Value::as_str) {
        if !error.starts_with("script exited with return code") {
            line.push_str(&format!(": {}", shown(error)));
        }
    }
    line.push('\n');
    line
}

/// `0.4 s`, `12.0 s`, `3 min 5 s`, `2 h 3 min`.
pub fn duration_text(ms: u64) -> String {
    let seconds = ms / 1000;
    if seconds < 60 {
        format!("{}.{} s", seconds, (ms % 1000) / 100)
    } else if seconds < 3600 {
        format!("{} min {} s", seconds / 60, seconds % 60)
    } else {
        format!("{} h {} min", seconds / 3600, (seconds % 3600) / 60)
    }
}

/// `--url URL` to repeat in a suggested command, when the server is not the default one.
fn url_option(base: &BaseUrl) -> String {
    match BaseUrl::parse(DEFAULT_URL) {
        Ok(default) if &default == base => String::new(),
        _ => format!(" --url {base}"),
    }
}

/// What Ctrl-C tells when it leaves the run going.
pub fn left_going(run_id: &str, base: &BaseUrl) -> String {
    let id = shown(run_id);
    let url = url_option(base);
    format!(
        "runbookd: interrupted; run {id} goes on.\n\
         runbookd: follow it: runbookd monitor {id}{url}\n\
         runbookd: cancel it: runbookd cancel {id}{url}\n"
    )
}

/// What Ctrl-C tells with `--cancel-on-interrupt`.
pub fn cancelling(run_id: &str) -> String {
    format!(
        "runbookd: interrupted; cancelling run {} (Ctrl-C again to stop waiting for its end)\n",
        shown(run_id)
    )
}

/// What Ctrl-C tells before the server gave the run's id.
pub fn interrupted_while_starting(base: &BaseUrl) -> String {
    format!(
        "runbookd: interrupted while starting the run; it may have started: runbookd runs{} lists it\n",
        url_option(base)
    )
}

/// Text from the server made safe for a terminal: control characters become `?`.
pub fn shown(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn final_lines() {
        let record = json!({"status": "succeeded", "return_code": 0, "duration_ms": 2345});
        assert_eq!(
            final_line("r1-a", &record),
            "runbookd: run r1-a succeeded (exit 0) in 2.3 s\n"
        );
        let record = json!({"status": "failed", "return_code": 3, "duration_ms": 40,
            "error": "script exited with return code 3"});
        assert_eq!(
            final_line("r1-b", &record),
            "runbookd: run r1-b failed (exit 3) in 0.0 s\n"
        );
        let record = json!({"status": "timed_out", "return_code": 143, "duration_ms": 61000,
            "error": "script timed out after 60 s"});
        assert_eq!(
            final_line("r1-c", &record),
            "runbookd: run r1-c timed out (exit 143) in 1 min 1 s: script timed out after 60 s\n"
        );
        assert_eq!(
            final_line("r1-d", &json!({"return_code": 1})),
            "runbookd: run r1-d ended (exit 1)\n"
        );
        assert_eq!(
            final_line("r1-\u{1b}[2J", &json!({"status": "failed\n"})),
            "runbookd: run r1-?[2J failed?\n"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration_text(0), "0.0 s");
        assert_eq!(duration_text(59_999), "59.9 s");
        assert_eq!(duration_text(60_000), "1 min 0 s");
        assert_eq!(duration_text(3_600_000 + 120_000), "1 h 2 min");
    }

    #[test]
    fn interrupt_hints_repeat_a_non_default_url() {
        let default = BaseUrl::parse(DEFAULT_URL).unwrap();
        assert_eq!(
            left_going("r1-x", &default),
            "runbookd: interrupted; run r1-x goes on.\n\
             runbookd: follow it: runbookd monitor r1-x\n\
             runbookd: cancel it: runbookd cancel r1-x\n"
        );
        let other = BaseUrl::parse("http://127.0.0.1:9000/p/").unwrap();
        assert!(left_going("r1-x", &other)
            .contains("runbookd monitor r1-x --url http://127.0.0.1:9000/p\n"));
        assert!(interrupted_while_starting(&other).contains("runbookd runs --url"));
    }
}
