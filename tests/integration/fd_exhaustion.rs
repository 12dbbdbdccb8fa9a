//! Running out of file descriptors: accepting fails with EMFILE while they last; runbookd must
//! say so, accept again once descriptors are free, and answer what it cannot start with a
//! clear 503 instead of failing silently.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

/// A request that never panics: Some((status, body)) or None when the server did not answer.
fn try_request(port: u16, method: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).ok()?;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

#[test]
#[ignore = "needs prlimit and uses up the server's descriptors; CI runs it"]
fn keeps_serving_after_running_out_of_descriptors() {
    need_program("prlimit");
    let server =
        Server::start(ServerOpts::new().runbook("Echo.md", Runbook::new("Echo", "echo hello\n")));
    let token = dev_token();
    assert_eq!(
        try_request(server.port, "GET", "/healthz", None).map(|r| r.0),
        Some(200)
    );
    // Soft limit only (lowering and raising it back needs no privilege); the server already
    // raised its own soft limit at start.
    let set_limit = |n: usize| {
        let out = Command::new("prlimit")
            .arg(format!("--pid={}", server.pid()))
            .arg(format!("--nofile={n}:"))
            .output()
            .unwrap();
        assert!(out.status.success(), "prlimit failed: {out:?}");
    };
    // Only 64 descriptors from now on.
    set_limit(64);

    // More connections than the server has descriptors for, held open.
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port));
    let mut held = Vec::new();
    for _ in 0..200 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    // The server ran out. Connects do not fail (the kernel completes them into the listen
    // backlog before the server accepts them), so the proof of exhaustion is the server's own
    // report.
    assert!(held.len() >= 20, "only {} connections opened", held.len());
    let ran_out = wait_until(Duration::from_secs(10), || {
        // An accept or spawn error says so.
        server.stderr().contains("Too many open files")
    });
    assert!(
        ran_out,
        "the server never ran out of descriptors with {} connections held",
        held.len()
    );
    assert!(
        process_alive(server.pid()),
        "the server died when it ran out of descriptors"
    );

    // Once the descriptors are free again, normal requests succeed.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut healthy = false;
    while Instant::now() < deadline {
        if try_request(server.port, "GET", "/healthz", None).is_some_and(|r| r.0 == 200) {
            healthy = true;
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    // Answering again proves it did not die of running out (nothing restarts it).
    assert!(
        healthy,
        "the server did not answer again after descriptors were freed (alive: {})",
        process_alive(server.pid())
    );
    let (status, body) = try_request(
        server.port,
        "POST",
        "/api/runbooks/Echo.md/execute",
        Some(&token),
    )
    .expect("no answer to an execute after recovery");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello"), "{body}");

    // Room to accept a request but not to start a script: a clear 503, and nothing breaks.
    let open_fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .unwrap()
        .count();
    set_limit(open_fds + 4);
    let refused = try_request(
        server.port,
        "POST",
        "/api/runbooks/Echo.md/execute",
        Some(&token),
    );
    set_limit(1024);
    let (status, body) = refused.expect("no answer with few descriptors");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("\"success\":false") && body.contains("try again"),
        "503 without a clear error: {body}"
    );
    let (status, body) = try_request(
        server.port,
        "POST",
        "/api/runbooks/Echo.md/execute",
        Some(&token),
    )
    .expect("no answer after the limit was raised again");
    assert_eq!(status, 200, "{body}");
}
