//! Connections and bounded work per request: request bodies read to their framing whatever
//! `Connection: upgrade` says, REQUEST_TIMEOUT_SECONDS closing half-sent and idle connections
//! (and freeing their threads) without cutting streams, HEAD on streamed routes, the
//! LOGS_MAX_LINES cap, a burst of keep-alive streams all served at once, and, through a real
//! nginx, the shipped file's bounds and a stage0-style proxy that sends `Connection: upgrade`
//! on every request.

use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::deploy::{
    children, free_port, parse_nginx, raise_own_nofile_limit, shipped, shipped_nginx_conf,
    unit_service_settings, value_of, Nginx,
};
use crate::runs_support::{wait_for_gate, RunsApi, RUN_TIMEOUT};
use crate::util::*;

/// The request timeout the direct tests run with.
const TIMEOUT_SECS: u64 = 2;

fn proc_status_field(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn threads(pid: u32) -> u64 {
    proc_status_field(pid, "Threads")
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_field(pid, "VmRSS")
}

/// The thread count once it has stayed the same for a second.
fn settled_threads(pid: u32) -> u64 {
    let mut last = threads(pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = threads(pid);
        thread::sleep(Duration::from_millis(500));
        let again = threads(pid);
        if now == last && again == now {
            return now;
        }
        assert!(Instant::now() < deadline, "thread count never settles");
        last = again;
    }
}

/// Reads until the peer closes the connection (EOF or reset) or `deadline`; returns what
/// arrived and whether the connection was closed.
fn read_until_closed(stream: &mut TcpStream, deadline: Instant) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, false);
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return (out, false)
            }
            Err(_) => return (out, true),
        }
    }
}

fn timeout_server(opts: ServerOpts) -> Server {
    Server::start(opts.env("REQUEST_TIMEOUT_SECONDS", &TIMEOUT_SECS.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Directly: the request timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn half_sent_head_and_idle_keep_alive_are_closed_after_the_request_timeout() {
    let server = timeout_server(ServerOpts::new());
    let limit = Duration::from_secs(TIMEOUT_SECS + 2);

    let mut half = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let sent = Instant::now();
    let (got, closed) = read_until_closed(&mut half, sent + Duration::from_secs(30));
    let took = sent.elapsed();
    assert!(closed, "a half-sent head is never closed");
    // Answered with a clear error before the close.
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408 "), "{got:?}");
    assert!(got.contains("Connection: close\r\n"), "{got:?}");
    let body: serde_json::Value = serde_json::from_str(got.split_once("\r\n\r\n").unwrap().1)
        .unwrap_or_else(|e| panic!("no JSON error ({e}): {got:?}"));
    assert_eq!(body["success"], false, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("request timeout"),
        "{body}"
    );
    assert!(
        took <= limit,
        "a half-sent head was closed after {took:?}, not within {limit:?}"
    );
    assert!(
        took >= Duration::from_millis(TIMEOUT_SECS * 1000 - 300),
        "closed after {took:?}: before the timeout, so not by it"
    );

    // An idle keep-alive connection after a complete exchange.
    let mut idle = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let resp = StreamingResponse::read_head(idle.try_clone().unwrap(), false);
    assert_eq!(resp.status, 200);
    let answered = Instant::now();
    let (_, closed) = read_until_closed(&mut idle, answered + Duration::from_secs(30));
    let took = answered.elapsed();
    assert!(closed, "an idle keep-alive connection is never closed");
    assert!(took <= limit, "idle keep-alive closed after {took:?}");
}

#[test]
fn two_thousand_idle_connections_are_closed_and_their_threads_freed() {
    const CONNECTIONS: usize = 2000;
    let nofile = raise_own_nofile_limit();
    assert!(
        nofile >= CONNECTIONS as u64 + 200,
        "the descriptor limit {nofile} is too low for {CONNECTIONS} connections"
    );
    let server = timeout_server(ServerOpts::new());
    let pid = server.pid();
    let idle = settled_threads(pid);

    let mut conns = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut c = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        if i % 2 == 0 {
            // Half of them send part of a head first.
            let _ = c.write_all(b"GET /api/runs HTTP/1.1\r\nHost: ");
        }
        conns.push(c);
    }
    let opened = Instant::now();
    let mut peak = threads(pid);
    // Every connection must be closed by the server; a loaded machine gets a loose bound.
    let deadline = opened + Duration::from_secs(TIMEOUT_SECS + 60);
    let mut open_left = 0;
    for c in &mut conns {
        peak = peak.max(threads(pid));
        let (_, closed) = read_until_closed(c, deadline);
        if !closed {
            open_left += 1;
        }
    }
    assert_eq!(
        open_left,
        0,
        "{open_left} of {CONNECTIONS} idle connections still open {:?} after they were opened",
        opened.elapsed()
    );
    assert!(
        peak >= idle + 100,
        "the connections never held threads (idle {idle}, peak {peak}): the test proves nothing"
    );
    drop(conns);
    // Every connection's thread ends, but the request pool keeps up to 16 of them waiting for
    // the next connection.
    const KEPT_WAITING: u64 = 16;
    let mut now = threads(pid);
    let back = wait_until(Duration::from_secs(60), || {
        now = threads(pid);
        now <= idle + KEPT_WAITING
    });
    assert!(
        back,
        "thread count {now} did not return to its idle level {idle} (+{KEPT_WAITING} kept waiting; peak {peak})"
    );
    // The server still answers.
    assert_eq!(server.get("/healthz", None).status, 200);
    println!(
        "idle connections: {CONNECTIONS} closed by the server, threads idle {idle}, peak {peak}, after {now}"
    );
}

#[test]
fn streams_silent_for_longer_than_the_request_timeout_still_get_their_data() {
    let script = format!("echo first\n{}echo late\n", wait_for_gate("GATE"));
    let server = timeout_server(
        ServerOpts::new()
            .env("HEARTBEAT_SECONDS", "3600")
            .runbook("Slow.md", Runbook::new("Slow", &script).env("GATE", "gate")),
    );
    let token = dev_token();
    let gate = server.root.join("gate-slow");
    let auth = format!("Bearer {token}");
    let body =
        serde_json::to_vec(&json!({"env_vars": {"GATE": gate.display().to_string()}})).unwrap();
    // Keep-alive connections: a server that read them for a next request head while they
    // stream would be cut by the timeout.
    let resp = open(
        server.port,
        "HTTP/1.1",
        "POST",
        "/api/runbooks/Slow.md/execute",
        &[
            ("Authorization", &auth),
            ("Accept", "text/event-stream"),
            ("Content-Type", "application/json"),
            ("Connection", "keep-alive"),
        ],
        Some(&body),
    );
    assert_eq!(resp.status, 200);
    let mut sse = SseStream::new(resp);
    let run = sse.next_event(RUN_TIMEOUT).expect("the run event");
    assert_eq!(run.event, "run");
    let id = run.json()["run_id"].as_str().unwrap().to_string();
    let first = sse.next_event(RUN_TIMEOUT).expect("first output");
    assert_eq!(first.data, "first\n");
    let viewer = open(
        server.port,
        "HTTP/1.1",
        "GET",
        &format!("/api/runs/{id}/events"),
        &[("Authorization", &auth), ("Connection", "keep-alive")],
        None,
    );
    assert_eq!(viewer.status, 200);
    let mut viewer = SseStream::new(viewer);
    let replayed = viewer.next_event(RUN_TIMEOUT).expect("replayed output");
    assert_eq!(replayed.data, "first\n");

    // Silence (no output, no keepalive) for twice the request timeout.
    thread::sleep(Duration::from_secs(2 * TIMEOUT_SECS + 1));
    fs::write(&gate, b"open").unwrap();
    for (name, stream) in [("execute", &mut sse), ("viewer", &mut viewer)] {
        let events = stream.until_done(RUN_TIMEOUT);
        assert_eq!(joined(&events, "stdout"), "late\n", "{name}");
        let done = done_json(&events);
        assert_eq!(done["return_code"], json!(0), "{name}: {done}");
        assert_eq!(done["stdout"], json!("first\nlate\n"), "{name}: {done}");
    }
}

// ---------------------------------------------------------------------------------------------
// Directly: bodies after `Connection: upgrade`
// ---------------------------------------------------------------------------------------------

const UPGRADE: [(&str, &str); 2] = [("Connection", "upgrade"), ("Upgrade", "websocket")];

/// Sends an SSE execute of `Long.md` over a keep-alive connection; how long after `since` its
/// first `stdout` event came, or None if none came by `deadline`.
fn first_event_after(
    port: u16,
    token: &str,
    since: Instant,
    deadline: Instant,
) -> Option<Duration> {
    let auth = format!("Bearer {token}");
    let mut stream = send_request(
        port,
        "HTTP/1.1",
        "POST",
        "/api/runbooks/Long.md/execute",
        &[
            ("Authorization", &auth),
            ("Accept", "text/event-stream"),
            ("Content-Type", "application/json"),
            ("Connection", "keep-alive"),
        ],
        Some(b"{}"),
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if seen.windows(13).any(|w| w == b"event: stdout") {
            return Some(since.elapsed());
        }
    }
    None
}

#[test]
fn a_burst_of_keep_alive_streams_is_served_at_once() {
    // A connection queued behind the streams would wait until one of them ended (20 s here).
    const CLIENTS: usize = 150;
    let server = Server::start(
        ServerOpts::new()
            .runbook("Long.md", Runbook::new("Long", "echo start\nsleep 20\n"))
            .env("MAX_CONCURRENT_RUNS", "1000"),
    );
    let token = dev_token();
    // First a smaller burst of short keep-alive exchanges, so that the streams find some
    // connection threads idle and need more.
    thread::scope(|scope| {
        for _ in 0..CLIENTS / 4 {
            scope.spawn(|| {
                let mut stream = send_request(
                    server.port,
                    "HTTP/1.1",
                    "GET",
                    "/healthz",
                    &[("Connection", "keep-alive")],
                    None,
                );
                let mut buf = [0u8; 1024];
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let _ = stream.read(&mut buf);
            });
        }
    });
    let since = Instant::now();
    let deadline = since + Duration::from_secs(12);
    let waits: Vec<Option<Duration>> = thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| scope.spawn(|| first_event_after(server.port, &token, since, deadline)))
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let late = waits.iter().filter(|w| w.is_none()).count();
    let slowest = waits.iter().flatten().max().copied().unwrap_or_default();
    assert_eq!(
        late, 0,
        "{late} of {CLIENTS} keep-alive streams had no output 12 s after the burst (the others by {slowest:?})"
    );
    println!("{CLIENTS} keep-alive streams: the last first event after {slowest:?}");
}

fn timed_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (Response, Duration) {
    let started = Instant::now();
    let resp = request(port, method, path, headers, body);
    (resp, started.elapsed())
}

/// Well under the 30 s request timeout the server runs with, which would otherwise end a body
/// read that waits for the connection to close.
const PROMPT: Duration = Duration::from_secs(10);

/// Executes Hello.md as an SSE stream with `headers` plus `Accept: text/event-stream`, checks
/// the stream ended with `done` within PROMPT, and returns that event's JSON.
fn sse_execute_promptly(port: u16, headers: &[(&str, &str)], body: &[u8]) -> serde_json::Value {
    let mut sse_headers = headers.to_vec();
    sse_headers.push(("Accept", "text/event-stream"));
    let started = Instant::now();
    let resp = open(
        port,
        "HTTP/1.1",
        "POST",
        "/api/runbooks/Hello.md/execute",
        &sse_headers,
        Some(body),
    );
    assert_eq!(resp.status, 200);
    let events = SseStream::new(resp).until_done(RUN_TIMEOUT);
    assert!(
        started.elapsed() < PROMPT,
        "SSE execute took {:?}",
        started.elapsed()
    );
    done_json(&events)
}

#[test]
fn upgrade_requests_with_a_body_are_answered_at_once() {
    let server = Server::start(
        ServerOpts::new()
            .env("ENABLE_LOGIN", "true")
            .env("REQUEST_TIMEOUT_SECONDS", "30")
            .runbook(
                "Hello.md",
                Runbook::new("Hello", "echo \"hello $WHO\"\n").env("WHO", "who to greet"),
            ),
    );
    let login_body = br#"{"subject":"alice","roles":["developer"]}"#;
    let mut headers = UPGRADE.to_vec();
    headers.push(("Content-Type", "application/json"));
    let (resp, took) = timed_request(
        server.port,
        "POST",
        "/dev-login",
        &headers,
        Some(login_body),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(took < PROMPT, "dev-login took {took:?}");
    assert_eq!(resp.json()["subject"], json!("alice"));
    let token = resp.json()["access_token"].as_str().unwrap().to_string();
    let auth = format!("Bearer {token}");
    headers.push(("Authorization", &auth));

    let body = br#"{"env_vars":{"WHO":"upgrade"}}"#;
    let (resp, took) = timed_request(
        server.port,
        "POST",
        "/api/runbooks/Hello.md/execute",
        &headers,
        Some(body),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(took < PROMPT, "execute took {took:?}");
    assert_eq!(resp.json()["stdout"], json!("hello upgrade\n"));

    // A chunked body after an upgrade header is read to its last chunk.
    let mut chunked = headers.clone();
    chunked.push(("Transfer-Encoding", "chunked"));
    let encoded = format!(
        "{:x}\r\n{}\r\n0\r\n\r\n",
        body.len(),
        std::str::from_utf8(body).unwrap()
    );
    let (resp, took) = timed_request(
        server.port,
        "POST",
        "/api/runbooks/Hello.md/execute",
        &chunked,
        Some(encoded.as_bytes()),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(took < PROMPT, "chunked execute took {took:?}");
    assert_eq!(resp.json()["stdout"], json!("hello upgrade\n"));

    // SSE execute with the same headers.
    let done = sse_execute_promptly(server.port, &headers, body);
    assert_eq!(done["stdout"], json!("hello upgrade\n"));
}

// ---------------------------------------------------------------------------------------------
// Directly: bounded work per request
// ---------------------------------------------------------------------------------------------

#[test]
fn logs_tail_is_capped_by_logs_max_lines() {
    let server = Server::start(
        ServerOpts::new()
            .env("LOGS_MAX_LINES", "100")
            .runbook("Many.md", Runbook::new("Many", "seq 1 250\n")),
    );
    let token = dev_token();
    let id = server.start_run("Many.md", &token, json!({}));
    server.wait_finished(&id, &token, RUN_TIMEOUT);

    let resp = server.call(
        "GET",
        &format!("/api/runs/{id}/logs?tail=101"),
        Some(&token),
        &[],
        None,
    );
    assert_eq!(resp.status, 400, "{}", resp.text());
    let error = resp.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("100") && error.contains("LOGS_MAX_LINES"),
        "the error names the limit: {error}"
    );

    for query in ["?tail=100", ""] {
        let body = server.run_logs(&id, &token, query);
        assert_eq!(body["truncated"], json!(true), "{query}");
        let logs = body["logs"].as_array().unwrap();
        assert_eq!(logs.len(), 100, "{query}");
        let numbers: Vec<u64> = logs.iter().map(|l| l["line"].as_u64().unwrap()).collect();
        assert_eq!(numbers, (151..=250).collect::<Vec<u64>>(), "{query}");
        assert_eq!(logs[0]["text"], json!("151"));
        assert_eq!(logs[99]["text"], json!("250"));
        assert_eq!(logs[99]["stream"], json!("stdout"));
    }
    let resp = server.call(
        "GET",
        &format!("/api/runs/{id}/logs?tail=5&stream=stderr"),
        Some(&token),
        &[],
        None,
    );
    assert_eq!(resp.json()["logs"], json!([]));
    assert_eq!(resp.json()["truncated"], json!(false));
}

/// A raw `HEAD` (connection closed after it): what arrived after the head, and when the
/// connection was closed.
fn head_request(port: u16, path: &str, token: &str) -> (String, Vec<u8>, Duration) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let started = Instant::now();
    write!(
        stream,
        "HEAD {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let (raw, closed) = read_until_closed(&mut stream, started + Duration::from_secs(30));
    assert!(
        closed,
        "HEAD {path}: the connection stays open after the head"
    );
    let end = find(&raw, b"\r\n\r\n").unwrap_or_else(|| {
        panic!(
            "HEAD {path}: no complete head in {:?}",
            String::from_utf8_lossy(&raw)
        )
    });
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    (head, raw[end + 4..].to_vec(), started.elapsed())
}

#[test]
fn head_on_streamed_routes_sends_the_head_only() {
    let script = format!("echo some output\n{}echo end\n", wait_for_gate("GATE"));
    let server = Server::start(ServerOpts::new().runbook(
        "Gated.md",
        Runbook::new("Gated", &script).env("GATE", "gate"),
    ));
    let token = dev_token();
    let gate = server.root.join("gate-head");
    let id = server.start_run(
        "Gated.md",
        &token,
        json!({"GATE": gate.display().to_string()}),
    );
    server.wait_output(&id, &token, "stdout", "its first line", &|t| {
        t == "some output\n"
    });
    // The run is still going: a HEAD on its events must not follow it.
    for (path, content_type) in [
        (format!("/api/runs/{id}/events"), "text/event-stream"),
        (format!("/api/runs/{id}/logs/download"), "text/plain"),
        (format!("/api/runs/{id}/logs"), "application/json"),
    ] {
        let (head, body, took) = head_request(server.port, &path, &token);
        assert!(head.starts_with("HTTP/1.1 200"), "HEAD {path}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-type: {content_type}")),
            "HEAD {path}: {head}"
        );
        assert!(
            body.is_empty(),
            "HEAD {path} sent body bytes: {:?}",
            String::from_utf8_lossy(&body)
        );
        assert!(took < Duration::from_secs(10), "HEAD {path} took {took:?}");
    }
    assert_eq!(server.run_record(&id, &token)["status"], json!("running"));
    fs::write(&gate, b"open").unwrap();
    server.wait_finished(&id, &token, RUN_TIMEOUT);
    // GET still sends the body.
    let resp = server.call(
        "GET",
        &format!("/api/runs/{id}/logs/download"),
        Some(&token),
        &[],
        None,
    );
    assert_eq!(resp.text(), "some output\nend\n");
}

// ---------------------------------------------------------------------------------------------
// The shipped files' bounds (text)
// ---------------------------------------------------------------------------------------------

/// `limit_conn` values of the shipped server block by zone name.
fn shipped_limit_conn() -> Vec<(String, u64)> {
    let conf = parse_nginx(&shipped_nginx_conf());
    let server = children(&conf, "server")[0].block.clone().unwrap();
    children(&server, "limit_conn")
        .iter()
        .map(|d| (d.args[0].clone(), d.args[1].parse().unwrap()))
        .collect()
}

fn per_client_limit() -> u64 {
    let conf = parse_nginx(&shipped_nginx_conf());
    let zone = children(&conf, "limit_conn_zone")
        .iter()
        .find(|d| d.args[0] == "$binary_remote_addr")
        .map(|d| {
            d.args[1]
                .strip_prefix("zone=")
                .and_then(|z| z.split(':').next())
                .unwrap()
                .to_string()
        })
        .expect("a limit_conn_zone keyed by $binary_remote_addr");
    shipped_limit_conn()
        .into_iter()
        .find(|(z, _)| *z == zone)
        .map(|(_, n)| n)
        .expect("a limit_conn per client address in the server block")
}

#[test]
fn shipped_files_bound_heads_bodies_connections_and_threads() {
    let conf = parse_nginx(&shipped_nginx_conf());
    let server = children(&conf, "server")[0].block.clone().unwrap();
    let seconds = |name: &str| {
        crate::deploy::nginx_seconds(
            &value_of(&server, name).unwrap_or_else(|| panic!("{name} is not set")),
        )
    };
    assert!((1..=30).contains(&seconds("client_header_timeout")));
    assert!((1..=30).contains(&seconds("client_body_timeout")));
    let buffers = value_of(&server, "large_client_header_buffers").expect("header buffers set");
    assert!(!buffers.is_empty());
    let per_client = per_client_limit();
    assert!(
        (128..=1024).contains(&per_client),
        "per client {per_client}: room for an HTTP/2 page's streams, and a bound"
    );
    let total = shipped_limit_conn()
        .into_iter()
        .map(|(_, n)| n)
        .max()
        .unwrap();
    let tasks: u64 = unit_service_settings()
        .iter()
        .find(|(k, _)| k == "TasksMax")
        .map(|(_, v)| v.parse().unwrap())
        .expect("TasksMax in the unit");
    assert!(
        (1024..=8192).contains(&tasks) && total * 2 < tasks,
        "TasksMax {tasks} vs {total} requests in progress (up to 2 threads each)"
    );
    let readme = shipped("README.md");
    assert!(readme.contains("### Connections and limits"));
}

// ---------------------------------------------------------------------------------------------
// Through nginx (CI)
// ---------------------------------------------------------------------------------------------

/// A server for the nginx tests, dev login on.
fn proxied_server() -> Server {
    Server::start(
        ServerOpts::new()
            .env("ENABLE_LOGIN", "true")
            .env("MAX_CONCURRENT_RUNS", "1000")
            .runbook(
                "Hello.md",
                Runbook::new("Hello", "echo \"hello $WHO\"\n").env("WHO", "who to greet"),
            ),
    )
}

/// The proxy part of the stage0 SPA's nginx template, written from its directives: `/api/`
/// and `/dev-login` proxied with HTTP/1.1 and `Connection: upgrade` on every request.
fn stage0_template(upstream: u16, listen: u16) -> String {
    let location = |path: &str| {
        format!(
            "    location {path} {{\n\
             \x20       proxy_pass http://127.0.0.1:{upstream};\n\
             \x20       proxy_http_version 1.1;\n\
             \x20       proxy_set_header Upgrade $http_upgrade;\n\
             \x20       proxy_set_header Connection 'upgrade';\n\
             \x20       proxy_set_header Host $host;\n\
             \x20       proxy_cache_bypass $http_upgrade;\n\
             \x20   }}\n"
        )
    };
    format!(
        "server {{\n    listen 127.0.0.1:{listen};\n{}{}}}\n",
        location("/api/"),
        location("/dev-login")
    )
}

#[test]
#[ignore = "needs nginx; CI runs it"]
fn stage0_template_proxy_logs_in_executes_and_lists_runs() {
    let bin = need_program("nginx");
    let server = proxied_server();
    let port = free_port();
    let _nginx = Nginx::start(&bin, &stage0_template(server.port, port), port);

    let (resp, took) = timed_request(
        port,
        "POST",
        "/dev-login",
        &[("Content-Type", "application/json")],
        Some(br#"{"roles":["developer"]}"#),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        took < PROMPT,
        "dev-login through the template took {took:?}"
    );
    let token = resp.json()["access_token"].as_str().unwrap().to_string();
    let auth = format!("Bearer {token}");
    let json_headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let body = br#"{"env_vars":{"WHO":"proxy"}}"#;

    let (resp, took) = timed_request(
        port,
        "POST",
        "/api/runbooks/Hello.md/execute",
        &json_headers,
        Some(body),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(took < PROMPT, "sync execute took {took:?}");
    assert_eq!(resp.json()["stdout"], json!("hello proxy\n"));
    let sync_id = resp.json()["run_id"].as_str().unwrap().to_string();

    let done = sse_execute_promptly(port, &json_headers, body);
    assert_eq!(done["stdout"], json!("hello proxy\n"));
    let sse_id = done["run_id"].as_str().unwrap().to_string();

    let (resp, took) = timed_request(port, "GET", "/api/runs", &json_headers[..1], None);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(took < PROMPT, "run list took {took:?}");
    let ids: Vec<String> = resp.json()["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&sync_id) && ids.contains(&sse_id), "{ids:?}");
}

#[test]
#[ignore = "needs nginx; CI runs it"]
fn shipped_nginx_refuses_huge_request_heads_before_runbookd() {
    let bin = need_program("nginx");
    let server = proxied_server();
    let nginx = Nginx::shipped_in_front_of(&bin, &server);
    assert_eq!(get_via(nginx.port, "/healthz").status, 200);
    let pid = server.pid();
    let before = rss_kib(pid);

    const TOTAL: usize = 100 * 1024 * 1024;
    let mut stream = TcpStream::connect(("127.0.0.1", nginx.port)).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // 64 header lines of 1 KB at a time; nginx answers once the head outgrows its buffers
    // and then drains what follows (lingering close), so its answer is looked for after each
    // batch and ends the sending.
    let batch = format!("X-Fill: {}\r\n", "a".repeat(1000)).repeat(64);
    let mut sent = 0usize;
    let mut answer = Vec::new();
    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    let mut buf = [0u8; 4096];
    while sent < TOTAL {
        if stream.write_all(batch.as_bytes()).is_err() {
            break;
        }
        sent += batch.len();
        stream
            .set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
        if let Ok(n) = stream.read(&mut buf) {
            answer.extend_from_slice(&buf[..n]);
            break;
        }
    }
    let (rest, _) = read_until_closed(&mut stream, Instant::now() + Duration::from_secs(30));
    answer.extend_from_slice(&rest);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        sent < TOTAL,
        "nginx took all {sent} bytes of headers without refusing them"
    );
    assert!(
        answer.is_empty()
            || answer.starts_with("HTTP/1.1 400")
            || answer.starts_with("HTTP/1.1 494"),
        "nginx answered {answer:?}"
    );
    let after = rss_kib(pid);
    assert!(
        after <= before + 1024,
        "runbookd's RSS moved from {before} KiB to {after} KiB"
    );
    assert_eq!(get_via(nginx.port, "/healthz").status, 200);
    println!(
        "huge head: nginx stopped it after {} KiB ({:?}); runbookd RSS {before} KiB -> {after} KiB",
        sent / 1024,
        answer.lines().next().unwrap_or("closed")
    );
}

fn get_via(port: u16, path: &str) -> Response {
    request(port, "GET", path, &[], None)
}

#[test]
#[ignore = "needs nginx and curl; CI runs it"]
fn shipped_nginx_limits_requests_per_client_address() {
    const CONNECTIONS: usize = 2000;
    let bin = need_program("nginx");
    let curl = need_program("curl");
    let nofile = raise_own_nofile_limit();
    assert!(
        nofile >= CONNECTIONS as u64 + 200,
        "descriptor limit {nofile}"
    );
    let script = wait_for_gate("GATE");
    let server = Server::start(
        ServerOpts::new().runbook("Hold.md", Runbook::new("Hold", &script).env("GATE", "gate")),
    );
    let token = dev_token();
    let gate = server.root.join("gate-hold");
    let id = server.start_run(
        "Hold.md",
        &token,
        json!({"GATE": gate.display().to_string()}),
    );
    let nginx = Nginx::shipped_in_front_of(&bin, &server);
    let limit = per_client_limit();
    let auth = format!("Bearer {token}");
    let path = format!("/api/runs/{id}/events");

    // Viewers of a run that goes on: each holds a request in progress at nginx.
    let mut held = Vec::new();
    let (mut served, mut refused) = (0u64, 0u64);
    for _ in 0..CONNECTIONS {
        let resp = open(
            nginx.port,
            "HTTP/1.1",
            "GET",
            &path,
            &[("Authorization", &auth)],
            None,
        );
        match resp.status {
            200 => served += 1,
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
        held.push(resp);
    }
    assert_eq!(served, limit, "served {served}, refused {refused}");
    assert_eq!(refused, CONNECTIONS as u64 - limit);

    // Another client address is served meanwhile.
    let out = Command::new(&curl)
        .args([
            "-sS",
            "--max-time",
            "20",
            "--interface",
            "127.0.0.2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{}/healthz", nginx.port))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "from 127.0.0.2: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the same address again once its viewers are gone.
    drop(held);
    fs::write(&gate, b"open").unwrap();
    server.wait_finished(&id, &token, RUN_TIMEOUT);
    let ok = wait_until(Duration::from_secs(30), || {
        get_via(nginx.port, "/healthz").status == 200
    });
    assert!(ok, "127.0.0.1 is still refused after its requests ended");
}
