//! SSE execute: headers and framing, ids and the done event, output fidelity (multi-byte
//! characters, CR/CRLF, invalid UTF-8), liveness of partial lines, keepalives, truncation and
//! HTTP/1.0 close-delimited streaming.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(30);

fn output_events(events: &[SseEvent]) -> Vec<&SseEvent> {
    events
        .iter()
        .filter(|e| e.event == "stdout" || e.event == "stderr")
        .collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

#[test]
fn sse_headers_ids_and_done() {
    let server = Server::start(ServerOpts::new().runbook(
        "Hello.md",
        Runbook::new(
            "Hello",
            "echo one\nsleep 0.1\necho two >&2\nsleep 0.1\necho three\n",
        ),
    ));
    let mut sse = server.execute_sse("Hello.md", &dev_token(), json!({}));
    let ctype = sse
        .resp
        .header("Content-Type")
        .unwrap()
        .to_ascii_lowercase();
    assert_eq!(ctype.replace(' ', ""), "text/event-stream;charset=utf-8");
    assert!(
        sse.resp
            .header("Cache-Control")
            .is_some_and(|c| c.contains("no-cache")),
        "{:?}",
        sse.resp.headers
    );
    assert_eq!(sse.resp.header("X-Accel-Buffering"), Some("no"));
    assert!(
        sse.resp.is_chunked(),
        "HTTP/1.1 SSE is chunked: {:?}",
        sse.resp.headers
    );
    let events = sse.until_end(RUN_TIMEOUT);

    assert_eq!(joined(&events, "stdout"), "one\nthree\n");
    assert_eq!(joined(&events, "stderr"), "two\n");
    let outputs = output_events(&events);
    let ids: Vec<u64> = outputs.iter().map(|e| e.numeric_id()).collect();
    assert!(!ids.is_empty());
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids strictly increase: {ids:?}"
    );
    let done = events.last().unwrap();
    assert_eq!(done.event, "done");
    assert_eq!(
        done.numeric_id(),
        ids.last().unwrap() + 1,
        "done id = last chunk id + 1"
    );
    let done_body = done.json();
    assert_eq!(done_body["success"], json!(true));
    assert_eq!(done_body["return_code"], json!(0));
    assert_eq!(done_body["stdout"], json!("one\nthree\n"));
    assert_eq!(done_body["stderr"], json!("two\n"));
    assert_eq!(
        done_body["truncated"],
        json!({"stdout": false, "stderr": false})
    );
    assert!(done_body["run_id"]
        .as_str()
        .is_some_and(|s| s.starts_with("r1-")));

    // The raw framing: `data: ` with one space, events end with a blank line, and the last
    // `data:` line is the done object.
    let raw = String::from_utf8(sse.raw.clone()).expect("the stream is UTF-8");
    assert!(raw.contains("data: one"), "{raw:?}");
    assert!(raw.ends_with("\n\n"), "{raw:?}");
    let last_data = raw.lines().rfind(|l| l.starts_with("data:")).unwrap();
    let parsed: Value = serde_json::from_str(last_data.trim_start_matches("data:").trim()).unwrap();
    assert_eq!(parsed, done_body);

    // Same shape as the synchronous answer.
    let sync = server.execute("Hello.md", &dev_token(), json!({})).json();
    assert_eq!(keys(&sync), keys(&done_body));
    assert_eq!(sync["stdout"], done_body["stdout"]);
    assert_ne!(sync["run_id"], done_body["run_id"]);
}

/// 17 bytes (an odd length, so 4 KiB pipe page boundaries fall at every offset of it over the
/// file): multi-byte characters of 2, 3 and 4 bytes, a CRLF and a lone CR.
const PATTERN: &[u8] = b"\xe2\x82\xac\xf0\x9f\x98\x80\xc3\xa9\r\nab\rcd\n";

#[test]
fn sse_multibyte_and_crlf_across_read_boundaries() {
    let mut content = Vec::new();
    while content.len() < 300_000 {
        content.extend_from_slice(PATTERN);
    }
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Utf.md",
                Runbook::new("Utf", "cat utf.txt\n").input("./utf.txt"),
            )
            .file("utf.txt", &content),
    );
    let mut sse = server.execute_sse("Utf.md", &dev_token(), json!({}));
    let events = sse.until_done(RUN_TIMEOUT);
    let expected = normalise(&content);
    assert!(expected.starts_with("€😀é\nab\ncd\n€"));
    let got = joined(&events, "stdout");
    let bad = got.find('\u{FFFD}');
    assert!(
        bad.is_none(),
        "a chunk ended inside a character, near {:?}",
        bad.map(|i| &got[i.saturating_sub(20)..(i + 20).min(got.len())])
    );
    assert!(
        got == expected,
        "stdout events differ from the CR-normalised output"
    );
    let outputs = output_events(&events);
    assert!(
        outputs.len() > 1,
        "expected several chunks, got {}",
        outputs.len()
    );
    for e in outputs {
        assert!(!e.data.contains('\r'), "CR is normalised");
    }
    let done = done_json(&events);
    assert_eq!(
        normalise(done["stdout"].as_str().unwrap().as_bytes()),
        expected
    );
}

#[test]
fn sse_partial_line_arrives_before_the_rest() {
    let server = Server::start(ServerOpts::new().runbook(
        "Partial.md",
        Runbook::new("Partial", "printf 'a'\nsleep 1\nprintf 'b\\n'\n"),
    ));
    let mut sse = server.execute_sse("Partial.md", &dev_token(), json!({}));
    let events = sse.until_done(RUN_TIMEOUT);
    let outs: Vec<&SseEvent> = events.iter().filter(|e| e.event == "stdout").collect();
    assert_eq!(joined(&events, "stdout"), "ab\n");
    let a = outs
        .iter()
        .find(|e| e.data.contains('a'))
        .expect("an event with a");
    assert!(
        !a.data.contains('b'),
        "`a` was held back until `b`: {outs:?}"
    );
    let b = outs.iter().find(|e| e.data.contains('b')).unwrap();
    let gap = b.at.duration_since(a.at);
    assert!(
        gap >= Duration::from_millis(500),
        "`a` should arrive about 1 s before `b`, gap was {gap:?}"
    );
}

#[test]
fn sse_keeps_stdout_and_stderr_in_read_order() {
    let server = Server::start(ServerOpts::new().runbook(
        "Order.md",
        Runbook::new(
            "Order",
            "echo out1\nsleep 0.3\necho err1 >&2\nsleep 0.3\necho out2\nsleep 0.3\necho err2 >&2\n",
        ),
    ));
    let mut sse = server.execute_sse("Order.md", &dev_token(), json!({}));
    let events = sse.until_done(RUN_TIMEOUT);
    let seq: Vec<(String, String)> = output_events(&events)
        .iter()
        .map(|e| (e.event.clone(), e.data.clone()))
        .collect();
    assert_eq!(
        seq,
        vec![
            ("stdout".to_string(), "out1\n".to_string()),
            ("stderr".to_string(), "err1\n".to_string()),
            ("stdout".to_string(), "out2\n".to_string()),
            ("stderr".to_string(), "err2\n".to_string()),
        ]
    );
}

#[test]
fn invalid_utf8_becomes_replacement_characters() {
    let server = Server::start(ServerOpts::new().runbook(
        "Bytes.md",
        Runbook::new(
            "Bytes",
            "printf 'ok\\377\\376end\\n'\nprintf 'bad\\300x\\n' >&2\n",
        ),
    ));
    let mut sse = server.execute_sse("Bytes.md", &dev_token(), json!({}));
    let events = sse.until_done(RUN_TIMEOUT);
    let want_out = normalise(b"ok\xff\xfeend\n");
    let want_err = normalise(b"bad\xc0x\n");
    assert!(want_out.contains('\u{FFFD}'));
    assert_eq!(joined(&events, "stdout"), want_out);
    assert_eq!(joined(&events, "stderr"), want_err);
    let done = done_json(&events);
    assert_eq!(done["stdout"], json!(want_out));
    assert_eq!(done["stderr"], json!(want_err));
    let sync = server.execute("Bytes.md", &dev_token(), json!({})).json();
    assert_eq!(sync["stdout"], json!(want_out));
    assert_eq!(sync["stderr"], json!(want_err));
}

#[test]
fn keepalive_comments_during_silence() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Quiet.md",
                Runbook::new("Quiet", "echo start\nsleep 3\necho end\n"),
            )
            .env("HEARTBEAT_SECONDS", "1"),
    );
    let mut sse = server.execute_sse("Quiet.md", &dev_token(), json!({}));
    let events = sse.until_done(RUN_TIMEOUT);
    let start = events
        .iter()
        .find(|e| e.data == "start\n")
        .expect("start event");
    let end = events
        .iter()
        .find(|e| e.data == "end\n")
        .expect("end event");
    let during = sse
        .parser
        .comments
        .iter()
        .filter(|t| **t >= start.at && **t <= end.at)
        .count();
    assert!(
        during >= 1,
        "expected keepalive comments during 3 s of silence with HEARTBEAT_SECONDS=1, got {} in total",
        sse.parser.comments.len()
    );
    assert!(
        sse.parser.comments.len() <= 10,
        "far too many keepalives: {}",
        sse.parser.comments.len()
    );
}

#[test]
fn truncation_event_and_capped_done() {
    let script = "i=10\nwhile [ $i -lt 60 ]; do echo \"line-$i-abcdefghij\"; i=$((i+1)); done\necho small >&2\n";
    let mut full = String::new();
    for i in 10..60 {
        full.push_str(&format!("line-{i}-abcdefghij\n"));
    }
    let euro_script = "i=0\nwhile [ $i -lt 50 ]; do printf '\\342\\202\\254'; i=$((i+1)); done\n";
    let server = Server::start(
        ServerOpts::new()
            .runbook("Big.md", Runbook::new("Big", script))
            .runbook("Euro.md", Runbook::new("Euro", euro_script))
            .env("MAX_OUTPUT_SIZE_BYTES", "100"),
    );
    let mut sse = server.execute_sse("Big.md", &dev_token(), json!({}));
    let events = sse.until_done(RUN_TIMEOUT);
    let truncs: Vec<&SseEvent> = events.iter().filter(|e| e.event == "truncated").collect();
    assert_eq!(truncs.len(), 1, "one truncated event: {events:?}");
    let t = truncs[0].json();
    assert_eq!(t["stream"], json!("stdout"), "{t}");
    assert_eq!(t["limit"], json!(100), "{t}");
    assert_eq!(
        joined(&events, "stdout"),
        full,
        "live events carry everything"
    );
    let done = done_json(&events);
    assert_eq!(done["stdout"], json!(&full[..100]), "first 100 bytes");
    assert_eq!(done["stderr"], json!("small\n"));
    assert_eq!(done["truncated"], json!({"stdout": true, "stderr": false}));
    assert_eq!(done["return_code"], json!(0));

    let sync = server.execute("Big.md", &dev_token(), json!({})).json();
    assert_eq!(sync["stdout"], json!(&full[..100]));
    assert_eq!(sync["truncated"], json!({"stdout": true, "stderr": false}));

    // Cut at a character boundary: 33 three-byte characters fit in 100 bytes.
    let mut sse = server.execute_sse("Euro.md", &dev_token(), json!({}));
    let events = sse.until_done(RUN_TIMEOUT);
    assert_eq!(joined(&events, "stdout"), "€".repeat(50));
    let done = done_json(&events);
    assert_eq!(done["stdout"], json!("€".repeat(33)));
    assert_eq!(done["truncated"]["stdout"], json!(true));
    let sync = server.execute("Euro.md", &dev_token(), json!({})).json();
    assert_eq!(sync["stdout"], json!("€".repeat(33)));
}

#[test]
fn http_1_0_streams_close_delimited() {
    let server = Server::start(ServerOpts::new().runbook(
        "Partial.md",
        Runbook::new("Partial", "printf 'a'\nsleep 1\nprintf 'b\\n'\n"),
    ));
    let auth = format!("Bearer {}", dev_token());
    let resp = open(
        server.port,
        "HTTP/1.0",
        "POST",
        "/api/runbooks/Partial.md/execute",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ],
        Some(b"{}"),
    );
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("Transfer-Encoding").is_none(),
        "no chunked framing towards HTTP/1.0: {:?}",
        resp.headers
    );
    assert!(
        resp.is_close_delimited(),
        "close-delimited: {:?}",
        resp.headers
    );
    assert!(resp
        .header("Content-Type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let mut sse = SseStream::new(resp);
    let events = sse.until_end(RUN_TIMEOUT);
    assert_eq!(joined(&events, "stdout"), "ab\n");
    let outs: Vec<&SseEvent> = events.iter().filter(|e| e.event == "stdout").collect();
    let a = outs.iter().find(|e| e.data.contains('a')).unwrap();
    let b = outs.iter().find(|e| e.data.contains('b')).unwrap();
    assert!(
        b.at.duration_since(a.at) >= Duration::from_millis(500),
        "HTTP/1.0 still streams live"
    );
    assert_eq!(done_json(&events)["return_code"], json!(0));
}

#[test]
fn sse_failures_end_with_done() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Fail.md", Runbook::new("Fail", "echo before\nexit 4\n"))
            .runbook(
                "Needs.md",
                Runbook::new("Needs", "echo should-not-run").env("NEEDED_VAR", "x"),
            ),
    );
    let mut sse = server.execute_sse("Fail.md", &dev_token(), json!({}));
    let events = sse.until_done(RUN_TIMEOUT);
    let done = done_json(&events);
    assert_eq!(done["return_code"], json!(4));
    assert_eq!(done["success"], json!(false));
    assert!(
        done["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{done}"
    );

    let mut sse = server.execute_sse("Needs.md", &dev_token(), json!({}));
    let events = sse.until_done(RUN_TIMEOUT);
    assert!(
        joined(&events, "stderr").contains("NEEDED_VAR"),
        "{events:?}"
    );
    assert!(!joined(&events, "stdout").contains("should-not-run"));
    let done = done_json(&events);
    assert_eq!(done["return_code"], json!(1));
    let entries = server.wait_for_history("Needs.md", 1, Duration::from_secs(5));
    assert_eq!(entry_header(&entries[0]).1, 1);
}

#[test]
fn large_output_is_exact() {
    // Enough output for many 64 KiB reads; every byte must arrive once, in order.
    let server =
        Server::start(ServerOpts::new().runbook("Seq.md", Runbook::new("Seq", "seq 1 100000\n")));
    let mut expected = String::new();
    for i in 1..=100000 {
        expected.push_str(&i.to_string());
        expected.push('\n');
    }
    let started = Instant::now();
    let mut sse = server.execute_sse("Seq.md", &dev_token(), json!({}));
    let events = sse.until_done(Duration::from_secs(60));
    let got = joined(&events, "stdout");
    assert_eq!(got.len(), expected.len(), "byte count");
    assert!(got == expected, "content differs");
    let done = done_json(&events);
    assert_eq!(done["stdout"].as_str().unwrap().len(), expected.len());
    assert!(started.elapsed() < Duration::from_secs(60));
}
