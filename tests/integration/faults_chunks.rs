//! Output split across writes that come more than the 10 ms hold-back apart: a UTF-8
//! character, a CRLF and the run token, each written in two pieces 50 ms apart, must come out
//! whole (no U+FFFD, no extra blank line, the token masked) live, on replay, in `done`, in the
//! sync result and in `/logs`.

use std::fs;

use serde_json::{json, Value};

use crate::runs_support::*;
use crate::util::*;

/// Writes each piece with a pause between; `$TOKEN_FILE` gets the run token, so the test knows
/// what must never appear.
const SPLIT_SCRIPT: &str = r#"printf %s "$RUNBOOK_API_TOKEN" > "$TOKEN_FILE"
t=$RUNBOOK_API_TOKEN
printf 'A\342\202'; sleep 0.05; printf '\254B\n'
printf 'line1\r'; sleep 0.05; printf '\nline2\n'
printf 'tok=%s' "${t%%.*}"; sleep 0.05; printf '%s end\n' ".${t#*.}"
head=${t%?????}
printf 'cut=%s' "$head"; sleep 0.05; printf '%s end\n' "${t#"$head"}"
printf 'four=\360\237'; sleep 0.05; printf '\230\200\n'
printf 'e1\r' >&2; sleep 0.05; printf '\ne2\n' >&2
"#;

fn server() -> Server {
    Server::start(ServerOpts::new().runbook(
        "Split.md",
        Runbook::new("Split", SPLIT_SCRIPT).env("TOKEN_FILE", "where the token goes"),
    ))
}

/// The run token the script saw, and its first segment (the constant JWT header).
fn token_of(path: &std::path::Path) -> (String, String) {
    let token = fs::read_to_string(path).unwrap();
    let header = token.split('.').next().unwrap().to_string();
    assert!(
        token.split('.').count() == 3 && !header.is_empty(),
        "not a JWT: {token:?}"
    );
    (token, header)
}

/// Checks one rendering of the run's stdout and stderr.
fn check(where_: &str, stdout: &str, stderr: &str, token: &str, header: &str) {
    for (name, text) in [("stdout", stdout), ("stderr", stderr)] {
        assert!(!text.contains('\u{fffd}'), "{where_} {name}: {text:?}");
        assert!(!text.contains("\n\n"), "{where_} {name}: {text:?}");
        let secret_part = &token[header.len()..];
        assert!(
            !text.contains(secret_part),
            "{where_} {name}: the token is in clear: {text:?}"
        );
    }
    // The header alone may have been let go by the timer before the rest came: then the rest
    // is masked after it.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{where_} stdout: {stdout:?}");
    assert_eq!(lines[0], "A€B", "{where_}");
    assert_eq!(lines[1], "line1", "{where_}");
    assert_eq!(lines[2], "line2", "{where_}");
    let masked_whole = "tok=*** end".to_string();
    let masked_after_header = format!("tok={header}*** end");
    assert!(
        lines[3] == masked_whole || lines[3] == masked_after_header,
        "{where_}: {:?}",
        lines[3]
    );
    assert_eq!(lines[4], "cut=*** end", "{where_}");
    assert_eq!(lines[5], "four=😀", "{where_}");
    assert!(stdout.ends_with('\n'), "{where_} stdout: {stdout:?}");
    assert_eq!(stderr, "e1\ne2\n", "{where_} stderr");
}

fn result_streams(result: &Value) -> (String, String) {
    (
        result["stdout"].as_str().unwrap_or_default().to_string(),
        result["stderr"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn split_writes_come_out_whole_live_on_replay_in_done_and_in_logs() {
    let server = server();
    let tok = dev_token();
    let token_file = server.root.join("token-sse");
    let mut live = server.execute_sse("Split.md", &tok, json!({"TOKEN_FILE": token_file}));
    let id = live
        .resp
        .header("X-Run-Id")
        .expect("no X-Run-Id")
        .to_string();
    let events = live.until_end(RUN_TIMEOUT);
    let (token, header) = token_of(&token_file);
    check(
        "live",
        &joined(&events, "stdout"),
        &joined(&events, "stderr"),
        &token,
        &header,
    );
    let done = done_json(&events);
    assert_eq!(done["return_code"], json!(0), "{done}");
    let (out, err) = result_streams(&done);
    check("done", &out, &err, &token, &header);

    let mut replay = server.attach(&id, &tok, "", None);
    let events = replay.until_end(RUN_TIMEOUT);
    check(
        "replay",
        &joined(&events, "stdout"),
        &joined(&events, "stderr"),
        &token,
        &header,
    );
    let (out, err) = result_streams(&done_json(&events));
    check("replay done", &out, &err, &token, &header);

    let logs = server.call(
        "GET",
        &format!("/api/runs/{id}/logs"),
        Some(&tok),
        &[],
        None,
    );
    assert_eq!(logs.status, 200, "{}", logs.text());
    let logs = logs.json();
    let lines = logs["logs"].as_array().expect("logs");
    let text_of = |stream: &str| -> String {
        lines
            .iter()
            .filter(|l| l["stream"] == json!(stream))
            .map(|l| format!("{}\n", l["text"].as_str().unwrap_or_default()))
            .collect()
    };
    check(
        "logs",
        &text_of("stdout"),
        &text_of("stderr"),
        &token,
        &header,
    );
    // The raw download has no token in clear either.
    let raw = server.stored_output(&id, &tok, "");
    assert!(!raw.contains(&token[header.len()..]), "download: {raw:?}");
}

#[test]
fn split_writes_come_out_whole_in_the_sync_result() {
    let server = server();
    let token_file = server.root.join("token-sync");
    let resp = server.execute("Split.md", &dev_token(), json!({"TOKEN_FILE": token_file}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let (token, header) = token_of(&token_file);
    let (out, err) = result_streams(&resp.json());
    check("sync", &out, &err, &token, &header);
}
