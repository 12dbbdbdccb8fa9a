//! The terminal client: `runbookd monitor RUN_ID` against a live run (also through a proxy
//! that drops the connection once mid-stream: the output must still come exactly once) and
//! `runbookd exec RUNBOOK -e NAME=VALUE`, each exiting with the run's return code.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::runs_support::*;
use crate::util::*;

/// A CLI process whose stdout and stderr are collected as they come.
pub struct Cli {
    pub child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let sink = Arc::new(Mutex::new(Vec::new()));
    let to = sink.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => to.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    });
    sink
}

impl Cli {
    /// `runbookd ARGS...` with a clean environment plus `env`.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Cli {
        let mut cmd = base_command();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn runbookd CLI");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Cli {
            child,
            stdout,
            stderr,
        }
    }

    /// `runbookd ARGS... --url http://127.0.0.1:PORT --token TOKEN`.
    pub fn against(port: u16, token: &str, args: &[&str]) -> Cli {
        let url = url(port);
        let mut all = args.to_vec();
        all.extend(["--url", &url, "--token", token]);
        Cli::start(&all, &[])
    }

    /// Whether the process has ended (a failing CLI ends the waits early).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits for the exit code (panics after `timeout`, killing the process).
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the collectors take the last bytes.
                thread::sleep(Duration::from_millis(100));
                return status
                    .code()
                    .unwrap_or_else(|| panic!("the CLI died of a signal: {status:?}"));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the CLI did not exit within {timeout:?}\nstdout: {:?}\nstderr: {:?}",
                    self.stdout(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Prints on both streams, waits for the gate, prints more and exits with `code`.
fn two_part_script(code: u8) -> String {
    format!(
        "echo 'first out'\necho 'first err' >&2\n{}echo 'second out'\necho 'second err' >&2\nexit {code}\n",
        wait_for_gate("GATE")
    )
}

#[test]
fn monitor_follows_a_live_run_and_exits_with_its_code() {
    let (server, token, gate, id) = start_gated_run(ServerOpts::new(), "Two", &two_part_script(3));
    let mut cli = Cli::against(server.port, &token, &["monitor", &id]);
    // Live: the first part shows while the run waits.
    wait_until(RUN_TIMEOUT, || {
        cli.exited()
            || (cli.stdout().contains("first out\n") && cli.stderr().contains("first err\n"))
    });
    assert!(
        cli.stdout().contains("first out\n") && cli.stderr().contains("first err\n"),
        "monitor printed nothing live\nstdout: {:?}\nstderr: {:?}",
        cli.stdout(),
        cli.stderr()
    );
    assert_eq!(server.run_record(&id, &token)["status"], json!("running"));
    assert!(cli.child.try_wait().unwrap().is_none());
    gate.open();
    let code = cli.exit_code(RUN_TIMEOUT);
    assert_eq!(cli.stdout(), "first out\nsecond out\n");
    let stderr = cli.stderr();
    assert_eq!(stderr.matches("first err\n").count(), 1, "{stderr:?}");
    assert_eq!(stderr.matches("second err\n").count(), 1, "{stderr:?}");
    assert!(
        stderr.find("first err").unwrap() < stderr.find("second err").unwrap(),
        "{stderr:?}"
    );
    assert_eq!(code, 3, "exit code = the run's return code");

    // A finished run: replayed whole, same exit code; the token may come from RUNBOOKD_TOKEN.
    let mut again = Cli::start(
        &["monitor", &id, "--url", &url(server.port)],
        &[("RUNBOOKD_TOKEN", &token)],
    );
    assert_eq!(again.exit_code(RUN_TIMEOUT), 3);
    assert_eq!(again.stdout(), "first out\nsecond out\n");

    // An unknown run: a failure with a message, not a hang.
    let mut unknown = Cli::against(
        server.port,
        &token,
        &["monitor", "r1-6748da90-c3f7-497f-b29a-eabb74191959"],
    );
    assert_ne!(unknown.exit_code(RUN_TIMEOUT), 0);
    assert!(!unknown.stderr().is_empty());
}

/// A TCP proxy in front of the server that cuts the first `/events` connection once, right
/// after forwarding `marker` from the server (in the middle of that event).
struct CuttingProxy {
    port: u16,
    cut_done: Arc<AtomicBool>,
    events_connections: Arc<AtomicUsize>,
    /// Request heads of the `/events` requests, in order.
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl CuttingProxy {
    fn start(upstream: u16, marker: &'static [u8]) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = CuttingProxy {
            port,
            cut_done: Arc::new(AtomicBool::new(false)),
            events_connections: Arc::new(AtomicUsize::new(0)),
            heads: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (cut_done, count, heads, stop) = (
            proxy.cut_done.clone(),
            proxy.events_connections.clone(),
            proxy.heads.clone(),
            proxy.stop.clone(),
        );
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let (cut_done, count, heads) = (cut_done.clone(), count.clone(), heads.clone());
                thread::spawn(move || {
                    let _ = relay(client, upstream, marker, &cut_done, &count, &heads);
                });
            }
        });
        proxy
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn relay(
    mut client: TcpStream,
    upstream: u16,
    marker: &[u8],
    cut_done: &AtomicBool,
    count: &AtomicUsize,
    heads: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    // The request head decides whether this connection is to be cut.
    let mut head = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while find(&head, b"\r\n\r\n").is_none() {
        let n = client.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head_text = String::from_utf8_lossy(&head).into_owned();
    let request_line = head_text.lines().next().unwrap_or_default().to_string();
    let is_events = request_line.contains("/events");
    let mut cut_this = false;
    if is_events {
        count.fetch_add(1, Ordering::SeqCst);
        heads.lock().unwrap().push(head_text);
        cut_this = !cut_done.load(Ordering::SeqCst);
    }
    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.write_all(&head)?;
    let mut to_server = server.try_clone()?;
    let mut from_client = client.try_clone()?;
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from_client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_server.shutdown(Shutdown::Write);
    });
    let mut seen: Vec<u8> = Vec::new();
    let mut forwarded = 0usize;
    loop {
        let n = server.read(&mut buf)?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if cut_this {
            let from = forwarded.saturating_sub(marker.len());
            if let Some(pos) = find(&seen[from..], marker) {
                let end = from + pos + marker.len();
                client.write_all(&seen[forwarded..end])?;
                client.flush()?;
                thread::sleep(Duration::from_millis(100));
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                cut_done.store(true, Ordering::SeqCst);
                return Ok(());
            }
        }
        client.write_all(&seen[forwarded..])?;
        forwarded = seen.len();
        if !cut_this {
            // Nothing to look for: keep memory flat.
            seen.clear();
            forwarded = 0;
        }
    }
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}

#[test]
fn monitor_resumes_after_a_dropped_connection_without_repeating_output() {
    let script = format!(
        "i=1\nwhile [ $i -le 20 ]; do echo \"line $i\"; sleep 0.01; i=$((i + 1)); done\n\
         echo 'e1' >&2\nsleep 0.1\n\
         echo 'cut-marker and the rest of this line'\n\
         {}\
         i=21\nwhile [ $i -le 40 ]; do echo \"line $i\"; sleep 0.01; i=$((i + 1)); done\n\
         echo 'e2' >&2\nexit 7\n",
        wait_for_gate("GATE")
    );
    let (server, token, gate, id) = start_gated_run(ServerOpts::new(), "Cut", &script);
    let proxy = CuttingProxy::start(server.port, b"cut-marker");
    let mut cli = Cli::against(proxy.port, &token, &["monitor", &id]);
    wait_until(RUN_TIMEOUT, || {
        cli.exited() || proxy.cut_done.load(Ordering::SeqCst)
    });
    assert!(
        proxy.cut_done.load(Ordering::SeqCst),
        "the proxy never saw the marker; stdout: {:?}, stderr: {:?}",
        cli.stdout(),
        cli.stderr()
    );
    // The monitor reconnects and catches up while the run still waits.
    let caught_up = |cli: &mut Cli| {
        cli.stdout()
            .contains("cut-marker and the rest of this line\n")
    };
    wait_until(RUN_TIMEOUT, || cli.exited() || caught_up(&mut cli));
    assert!(
        caught_up(&mut cli),
        "no reconnect: stdout {:?}, stderr {:?}",
        cli.stdout(),
        cli.stderr()
    );
    assert!(cli.child.try_wait().unwrap().is_none());
    gate.open();
    let code = cli.exit_code(RUN_TIMEOUT);

    let mut expected = String::new();
    for i in 1..=20 {
        expected.push_str(&format!("line {i}\n"));
    }
    expected.push_str("cut-marker and the rest of this line\n");
    for i in 21..=40 {
        expected.push_str(&format!("line {i}\n"));
    }
    assert_eq!(cli.stdout(), expected, "stderr: {:?}", cli.stderr());
    let stderr = cli.stderr();
    assert_eq!(stderr.matches("e1\n").count(), 1, "{stderr:?}");
    assert_eq!(stderr.matches("e2\n").count(), 1, "{stderr:?}");
    assert_eq!(code, 7);
    assert!(
        proxy.events_connections.load(Ordering::SeqCst) >= 2,
        "the monitor did not reconnect to /events"
    );
}

#[test]
fn exec_starts_a_run_and_follows_it() {
    let script = "echo \"greeting: $GREETING ($OTHER)\"\necho 'a warning' >&2\nexit 4\n";
    let server = Server::start(
        ServerOpts::new().runbook(
            "Greet.md",
            Runbook::new("Greet", script)
                .env("GREETING", "what to say")
                .env("OTHER", "a value with ="),
        ),
    );
    let token = token("cli-user", &["developer"]);
    let mut cli = Cli::start(
        &[
            "exec",
            "Greet.md",
            "-e",
            "GREETING=hello world",
            "-e",
            "OTHER=x=y",
            "--url",
            &url(server.port),
        ],
        &[("RUNBOOKD_TOKEN", &token)],
    );
    let code = cli.exit_code(RUN_TIMEOUT);
    assert_eq!(
        cli.stdout(),
        "greeting: hello world (x=y)\n",
        "stderr: {:?}",
        cli.stderr()
    );
    assert_eq!(
        cli.stderr().matches("a warning\n").count(),
        1,
        "{:?}",
        cli.stderr()
    );
    assert_eq!(code, 4);
    let runs = server.list_runs("", &token);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["runbook"], json!("Greet.md"));
    assert_eq!(runs[0]["user"], json!("cli-user"));
    assert_eq!(runs[0]["return_code"], json!(4));

    // A missing required variable fails the run like any execute (return code 1).
    let mut missing = Cli::against(server.port, &token, &["exec", "Greet.md"]);
    assert_eq!(missing.exit_code(RUN_TIMEOUT), 1);
    assert!(
        missing.stderr().contains("GREETING"),
        "{:?}",
        missing.stderr()
    );

    // No token at all: refused before anything runs.
    let mut no_token = Cli::start(&["exec", "Greet.md", "--url", &url(server.port)], &[]);
    assert_ne!(no_token.exit_code(RUN_TIMEOUT), 0);
    assert_eq!(server.list_runs("", &token).len(), 2);
}

#[test]
fn monitor_exit_code_of_a_run_killed_by_a_signal_is_128_plus_it() {
    let server = Server::start(ServerOpts::new().runbook(
        "Killed.md",
        Runbook::new("Killed", "echo before\nkill -KILL $$\n"),
    ));
    let token = dev_token();
    let resp = server.execute("Killed.md", &token, json!({}));
    let body = resp.json();
    assert_eq!(body["return_code"], json!(137), "{body}");
    let id = body["run_id"].as_str().unwrap().to_string();
    let mut cli = Cli::against(server.port, &token, &["monitor", &id]);
    assert_eq!(cli.exit_code(RUN_TIMEOUT), 137);
    assert_eq!(cli.stdout(), "before\n");
}
