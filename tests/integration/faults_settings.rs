//! Faults from settings, requests and panics: every numeric setting out of its range is a
//! one-line error and exit status 2; event ids at the edge of u64 get a sane answer; a panic at
//! any point of a run (forced by the debug build's `RUNBOOKD_TEST_PANIC`) still concludes the
//! run and frees its slot; a token without a string `sub` is 401; a run stopped by shutdown is
//! `interrupted` in `done` and in its record; a file-size limit does not kill the server, and
//! scripts still get the default SIGXFSZ.

use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::runs_support::*;
use crate::util::*;

const HUGE: &str = "18446744073709551615";

/// Runs the binary with `env` on top of a minimal valid configuration and waits (20 s at most)
/// for it to exit.
fn exit_of(args: &[&str], env: &[(&str, &str)]) -> Output {
    let root = unique_root();
    std::fs::create_dir_all(root.join("runbooks")).unwrap();
    let mut cmd = base_command();
    cmd.current_dir(&root)
        .args(args)
        .env("API_PORT", "0")
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("JWT_SECRET", TEST_SECRET)
        .env("RUNBOOKS_DIR", root.join("runbooks"))
        .env("STATE_DIR", root.join("state"))
        .env("EXECUTION_DIR", root.join("exec"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let _ = std::fs::remove_dir_all(&root);
            panic!(
                "runbookd with {env:?} did not exit; stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&root);
    out
}

/// `(name, min, max)` of every setting `--help` shows with a range.
fn ranges_from_help() -> Vec<(String, u64, u64)> {
    let out = exit_of(&["--help"], &[]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut ranges = Vec::new();
    for line in help.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            continue;
        }
        let Some(open) = line.rfind(" to ").and_then(|to| line[..to].rfind('(')) else {
            continue;
        };
        let Some(close) = line[open..].find(')') else {
            continue;
        };
        let inner = &line[open + 1..open + close];
        let Some((min, max)) = inner.split_once(" to ") else {
            continue;
        };
        if let (Ok(min), Ok(max)) = (min.parse(), max.parse()) {
            ranges.push((name.to_string(), min, max));
        }
    }
    ranges
}

fn assert_refused(name: &str, value: &str, expected: &str) {
    let out = exit_of(&[], &[(name, value)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name}={value}: exit status; stderr {stderr:?}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{name}={value}: one line on stderr: {stderr:?}"
    );
    assert_eq!(stderr.trim_end(), expected, "{name}={value}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn every_out_of_range_setting_is_one_line_and_exit_2() {
    let ranges = ranges_from_help();
    for name in [
        "API_PORT",
        "JWT_TTL_MINUTES",
        "SCRIPT_TIMEOUT_SECONDS",
        "MAX_OUTPUT_SIZE_BYTES",
        "HISTORY_OUTPUT_BYTES",
        "HISTORY_MAX_ENTRIES",
        "MAX_RECURSION_DEPTH",
        "HEARTBEAT_SECONDS",
        "ORPHAN_GRACE_MS",
        "VIEWER_STALL_SECONDS",
        "MAX_CONCURRENT_RUNS",
        "CANCEL_GRACE_SECONDS",
        "SHUTDOWN_GRACE_SECONDS",
        "RUN_RETENTION_DAYS",
        "RUN_RETENTION_COUNT",
        "STATE_MAX_BYTES",
        "RUN_LOG_MAX_BYTES",
    ] {
        assert!(
            ranges.iter().any(|(n, _, _)| n == name),
            "--help shows no range for {name}: {ranges:?}"
        );
    }
    for (name, min, max) in &ranges {
        let expected = format!("runbookd: invalid {name}: must be between {min} and {max}");
        assert_refused(name, &(max + 1).to_string(), &expected);
        if *min > 0 {
            assert_refused(name, &(min - 1).to_string(), &expected);
        }
    }
}

#[test]
fn the_reported_overflows_are_refused_at_start() {
    assert_refused(
        "RUN_RETENTION_DAYS",
        "100000000",
        "runbookd: invalid RUN_RETENTION_DAYS: must be between 0 and 36500",
    );
    for name in [
        "SCRIPT_TIMEOUT_SECONDS",
        "JWT_TTL_MINUTES",
        "CANCEL_GRACE_SECONDS",
    ] {
        let out = exit_of(&[], &[(name, HUGE)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.starts_with(&format!("runbookd: invalid {name}: must be between")),
            "{stderr}"
        );
    }
    // The largest accepted values start a server that runs scripts and mints tokens.
    let server = Server::start(
        ServerOpts::new()
            .runbook("Quick.md", Runbook::new("Quick", "echo fine\n"))
            .env("SCRIPT_TIMEOUT_SECONDS", "31536000")
            .env("CANCEL_GRACE_SECONDS", "3600")
            .env("JWT_TTL_MINUTES", "525600")
            .env("RUN_RETENTION_DAYS", "36500")
            .env("ENABLE_LOGIN", "true"),
    );
    let resp = server.execute("Quick.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["stdout"], json!("fine\n"));
    let login = server.json_request("POST", "/dev-login", "x", &json!({}));
    assert_eq!(login.status, 200, "{}", login.text());
}

#[test]
fn event_ids_at_the_edge_of_u64_get_a_sane_answer() {
    let script = format!("echo one\n{}echo two\n", wait_for_gate("GATE"));
    let (server, token, gate, live) = start_gated_run(ServerOpts::new(), "Edge", &script);
    server.wait_output(&live, &token, "stdout", "one", &|t| t == "one\n");
    // A live run: a viewer resuming past everything waits for the end and gets `done`.
    let mut ahead = server.attach(&live, &token, "", Some(HUGE));
    let mut ahead_query = server.attach(&live, &token, &format!("?after={HUGE}"), None);
    gate.open();
    for stream in [&mut ahead, &mut ahead_query] {
        let events = stream.until_done(RUN_TIMEOUT);
        let done = done_json(&events);
        assert_eq!(done["success"], json!(true), "{done}");
    }
    server.wait_finished(&live, &token, RUN_TIMEOUT);
    // A finished run: an id at or past `done` is 204.
    for (query, header) in [("", Some(HUGE)), (&format!("?after={HUGE}")[..], None)] {
        let resp = server.open_events(&live, Some(&token), query, header);
        assert_eq!(resp.status, 204, "{query} {header:?}: {:?}", resp.headers);
    }
    // `tail` past the number of lines replays everything.
    let events = server
        .attach(&live, &token, &format!("?tail={HUGE}"), None)
        .until_done(RUN_TIMEOUT);
    assert_eq!(
        stream_text(&outputs(&events), "stdout"),
        "one\ntwo\n",
        "{events:?}"
    );
    let logs = server.call(
        "GET",
        &format!("/api/runs/{live}/logs?tail={HUGE}"),
        Some(&token),
        &[],
        None,
    );
    // `/logs` caps `tail` at LOGS_MAX_LINES: a clear 400 naming the limit.
    assert_eq!(logs.status, 400, "{}", logs.text());
    assert!(logs.text().contains("LOGS_MAX_LINES"), "{}", logs.text());
    // Past u64: a clear 400 in JSON.
    for (query, header) in [
        ("", Some("18446744073709551616")),
        ("?after=18446744073709551616", None),
        ("?tail=18446744073709551616", None),
    ] {
        let resp = server.call(
            "GET",
            &format!("/api/runs/{live}/events{query}"),
            Some(&token),
            &header
                .map(|h| vec![("Last-Event-ID", h)])
                .unwrap_or_default(),
            None,
        );
        assert_eq!(resp.status, 400, "{query} {header:?}: {}", resp.text());
        assert_eq!(resp.json()["success"], json!(false));
    }
    assert_eq!(server.get("/healthz", None).status, 200);
}

// ---------------------------------------------------------------------------------------------
// Panics in a run
// ---------------------------------------------------------------------------------------------

const PANIC_SCRIPT: &str = "echo hello\nsleep 0.2\necho bye\n";

/// A server with one run slot, panicking once at `point`.
fn panicking_server(point: &str) -> Server {
    Server::start(
        ServerOpts::new()
            .runbook("Boom.md", Runbook::new("Boom", PANIC_SCRIPT))
            .env("MAX_CONCURRENT_RUNS", "1")
            .env("RUNBOOKD_TEST_PANIC", point),
    )
}

/// After the panicked run: the record says failed with `error`, its history entry is there
/// (once), the slot is free (a second execute succeeds) and the server answers.
fn assert_concluded_and_serving(server: &Server, run_id: &str, error: &str) {
    let token = dev_token();
    let record = server.wait_finished(run_id, &token, RUN_TIMEOUT);
    assert_eq!(record["status"], json!("failed"), "{record}");
    assert_eq!(record["error"], json!(error), "{record}");
    let entries = server.wait_for_history("Boom.md", 1, RUN_TIMEOUT);
    let mine: Vec<_> = entries
        .iter()
        .filter(|e| entry_header(e).2.as_deref() == Some(run_id))
        .collect();
    assert_eq!(mine.len(), 1, "one history entry for {run_id}: {entries:?}");
    let again = server.execute("Boom.md", &token, json!({}));
    assert_eq!(again.status, 200, "the slot is free: {}", again.text());
    assert_eq!(again.json()["stdout"], json!("hello\nbye\n"));
    assert_eq!(server.get("/healthz", None).status, 200);
    assert!(
        !server.stderr().contains("test panic"),
        "the panic message is not logged"
    );
}

fn sync_panic_concludes(point: &str) {
    let server = panicking_server(point);
    let resp = server.execute("Boom.md", &dev_token(), json!({}));
    let body = resp.json();
    assert_eq!(resp.status, 500, "{point}: {body}");
    let error = format!("runbookd: internal error while running: test panic at {point}");
    assert_eq!(body["success"], json!(false), "{body}");
    assert_eq!(body["error"], json!(error), "{point}: {body}");
    let run_id = body["run_id"].as_str().unwrap().to_string();
    assert_concluded_and_serving(&server, &run_id, &error);
}

#[test]
fn panic_while_launching_concludes_the_run() {
    sync_panic_concludes("launch");
}

#[test]
fn panic_in_the_supervisor_concludes_the_run() {
    sync_panic_concludes("supervise");
}

#[test]
fn panic_in_a_reader_concludes_the_run() {
    sync_panic_concludes("reader");
}

#[test]
fn panic_in_the_waiter_concludes_the_run() {
    sync_panic_concludes("waiter");
}

#[test]
fn panic_while_concluding_concludes_the_run() {
    sync_panic_concludes("conclude-before-history");
}

#[test]
fn panic_before_the_run_exists_is_a_500_and_frees_the_slot() {
    let server = panicking_server("launch-early");
    let resp = server.execute("Boom.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 500, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["success"], json!(false));
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("test panic at launch-early")),
        "{body}"
    );
    let again = server.execute("Boom.md", &dev_token(), json!({}));
    assert_eq!(again.status, 200, "the slot is free: {}", again.text());
}

#[test]
fn panic_in_a_run_ends_the_event_stream_with_done() {
    for point in ["launch", "supervise"] {
        let server = panicking_server(point);
        let events = server
            .execute_stream("Boom.md", &dev_token())
            .until_done(RUN_TIMEOUT);
        let done = done_json(&events);
        let error = format!("runbookd: internal error while running: test panic at {point}");
        assert_eq!(done["error"], json!(error), "{point}: {done}");
        assert_eq!(done["status"], json!("failed"), "{point}: {done}");
        let run_id = done["run_id"].as_str().unwrap().to_string();
        assert_concluded_and_serving(&server, &run_id, &error);
    }
}

#[test]
fn panic_while_streaming_leaves_the_run_to_finish() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Slow.md",
                Runbook::new("Slow", "echo a\nsleep 0.3\necho b\n"),
            )
            .env("MAX_CONCURRENT_RUNS", "1")
            .env("RUNBOOKD_TEST_PANIC", "stream"),
    );
    let token = dev_token();
    let mut sse = server.execute_stream("Slow.md", &token);
    let run_id = sse.resp.header("X-Run-Id").unwrap().to_string();
    // The viewer's thread panics after its first batch: the connection is cut mid-body.
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut body = Vec::new();
    loop {
        match sse.resp.next_body(deadline) {
            BodyRead::Data(d, _) => body.extend_from_slice(&d),
            BodyRead::Failed(_) => break,
            other => panic!(
                "the stream should be cut, got {other:?} after {:?}",
                String::from_utf8_lossy(&body)
            ),
        }
    }
    assert!(
        !String::from_utf8_lossy(&body).contains("event: done"),
        "the viewer died before done: {body:?}"
    );
    let record = server.wait_finished(&run_id, &token, RUN_TIMEOUT);
    assert_eq!(record["status"], json!("succeeded"), "{record}");
    assert_eq!(
        server.stored_output(&run_id, &token, "stdout"),
        "a\nb\n",
        "the run went on without its viewer"
    );
    let again = server.execute("Slow.md", &token, json!({}));
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(server.get("/healthz", None).status, 200);
}

// ---------------------------------------------------------------------------------------------
// Small consistencies
// ---------------------------------------------------------------------------------------------

#[test]
fn a_token_without_a_string_sub_is_401() {
    let server = Server::start(ServerOpts::new());
    let mut variants = Vec::new();
    let mut without = claims("x", json!(["developer"]));
    without.as_object_mut().unwrap().remove("sub");
    variants.push(without);
    for sub in [json!(42), json!(null), json!(""), json!(["dev"])] {
        let mut c = claims("x", json!(["developer"]));
        c["sub"] = sub;
        variants.push(c);
    }
    for c in variants {
        let token = sign_hs256(&c, TEST_SECRET.as_bytes());
        let resp = server.get("/api/runbooks", Some(&token));
        assert_eq!(resp.status, 401, "{c}: {}", resp.text());
        assert!(resp.text().contains("sub"), "{}", resp.text());
    }
    assert_eq!(server.get("/api/runbooks", Some(&dev_token())).status, 200);
}

#[test]
fn a_run_stopped_by_shutdown_is_interrupted_in_done_and_record() {
    let runbook = Runbook::new("Long", "echo started\nsleep 30\necho never\n").render();
    let mut daemon = Daemon::start(&[("Long.md", runbook)], &[("SHUTDOWN_GRACE_SECONDS", "5")]);
    let token = dev_token();
    let mut sse = daemon.execute_stream("Long.md", &token);
    let run_id = sse.resp.header("X-Run-Id").unwrap().to_string();
    let first = sse.next_event(RUN_TIMEOUT).expect("the run event");
    assert_eq!(first.event, "run");
    let started = sse.next_event(RUN_TIMEOUT).expect("the first output");
    assert_eq!(started.event, "stdout", "{started:?}");
    daemon.sigterm();
    let events = sse.until_done(RUN_TIMEOUT);
    let done = done_json(&events);
    assert_eq!(done["status"], json!("interrupted"), "{done}");
    assert_eq!(
        done["error"],
        json!("the server stopped while the run was going"),
        "{done}"
    );
    assert!(daemon.wait_exit(RUN_TIMEOUT).is_some(), "the server exits");
    daemon.restart(&[]);
    let record = daemon.run_record(&run_id, &token);
    assert_eq!(record["status"], json!("interrupted"), "{record}");
    assert_eq!(record["error"], done["error"], "{record}");
}

#[test]
fn a_file_size_limit_is_an_error_not_a_death() {
    need_program("prlimit");
    let root = unique_root();
    for d in ["runbooks", "state", "exec"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // About 4 MB of output against a 1 MB file-size limit on the server.
    let script =
        "i=0\nwhile [ $i -lt 4000 ]; do printf '%0999d\\n' $i; i=$((i+1)); done\necho end\n";
    std::fs::write(
        root.join("runbooks").join("Big.md"),
        Runbook::new("Big", script).render(),
    )
    .unwrap();
    let mut cmd = Command::new("prlimit");
    cmd.arg("--fsize=1000000")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_runbookd"))
        .current_dir(&root);
    wrapped_server_env(&mut cmd, &root);
    let (mut child, port) =
        spawn_listening(cmd, &root.join("server.stderr")).unwrap_or_else(|why| panic!("{why}"));
    let auth = format!("Bearer {}", dev_token());
    let resp = request(
        port,
        "POST",
        "/api/runbooks/Big.md/execute",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        Some(b"{}"),
    );
    let alive = child.try_wait().unwrap().is_none();
    let health = request(port, "GET", "/healthz", &[], None).status;
    let stderr = std::fs::read_to_string(root.join("server.stderr")).unwrap_or_default();
    stop_server(&mut child);
    let _ = std::fs::remove_dir_all(&root);
    assert!(
        alive,
        "the server survived the file-size limit; stderr {stderr}"
    );
    assert_eq!(health, 200);
    // The run concluded with an answer: failed with the log's write error.
    let body: Value = resp.json();
    assert_eq!(resp.status, 500, "{body}");
    assert_eq!(body["status"], json!("failed"), "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("File too large")),
        "{body}"
    );
}

#[test]
fn scripts_get_the_default_file_size_signal() {
    let server = Server::start(ServerOpts::new().runbook(
        "Sig.md",
        Runbook::new("Sig", "grep '^SigIgn:' /proc/$$/status\n"),
    ));
    let resp = server.execute("Sig.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let stdout = resp.json()["stdout"].as_str().unwrap().to_string();
    let mask = u64::from_str_radix(stdout.trim_start_matches("SigIgn:").trim(), 16)
        .unwrap_or_else(|e| panic!("{stdout:?}: {e}"));
    // SIGXFSZ is signal 25: bit 24 of the mask.
    assert_eq!(
        mask & (1 << 24),
        0,
        "SIGXFSZ ignored in the script: {stdout}"
    );
}
