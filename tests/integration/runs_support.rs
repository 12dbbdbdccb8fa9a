//! Helpers for the run tests: the `/api/runs` calls on any test server, a server that can be
//! killed (SIGKILL or SIGTERM) and started again on the same directories, gate files a script
//! waits on, reading SSE from a connection that may be cut, and process groups seen in /proc.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

/// Generous bound for a short run to end.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Run API calls
// ---------------------------------------------------------------------------------------------

/// The `/api/runs` calls, for the shared fixture and for [`Daemon`].
pub trait RunsApi {
    fn api_port(&self) -> u16;

    /// One request with an optional bearer token and extra headers.
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        extra: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        headers.extend_from_slice(extra);
        request(self.api_port(), method, path, &headers, body)
    }

    /// An execute with `{"env_vars": env_vars}`, a query string (may be empty) and headers.
    fn execute_raw(
        &self,
        file: &str,
        query: &str,
        token: &str,
        env_vars: Value,
        extra: &[(&str, &str)],
    ) -> Response {
        let body = serde_json::to_vec(&json!({ "env_vars": env_vars })).unwrap();
        let mut headers = vec![("Content-Type", "application/json")];
        headers.extend_from_slice(extra);
        self.call(
            "POST",
            &format!("/api/runbooks/{file}/execute{query}"),
            Some(token),
            &headers,
            Some(&body),
        )
    }

    /// Like `execute_raw`, but retries for a few seconds while the answer is 429 or 409: a run
    /// that has just delivered its result may hold its slot a moment longer.
    fn execute_when_admitted(
        &self,
        file: &str,
        query: &str,
        token: &str,
        env_vars: Value,
        extra: &[(&str, &str)],
    ) -> Response {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let resp = self.execute_raw(file, query, token, env_vars.clone(), extra);
            if !matches!(resp.status, 409 | 429) || Instant::now() > deadline {
                return resp;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `file` without waiting (`?async=true`) and returns the run id.
    fn start_run(&self, file: &str, token: &str, env_vars: Value) -> String {
        let resp = self.execute_raw(file, "?async=true", token, env_vars, &[]);
        assert_eq!(resp.status, 202, "async execute of {file}: {}", resp.text());
        let body = resp.json();
        body["run_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no run_id in {body}"))
            .to_string()
    }

    /// An SSE execute (no env vars), which must answer 200.
    fn execute_stream(&self, file: &str, token: &str) -> SseStream {
        let auth = format!("Bearer {token}");
        let resp = open(
            self.api_port(),
            "HTTP/1.1",
            "POST",
            &format!("/api/runbooks/{file}/execute"),
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
                ("Accept", "text/event-stream"),
            ],
            Some(b"{}"),
        );
        assert_eq!(
            resp.status, 200,
            "SSE execute of {file}: {:?}",
            resp.headers
        );
        SseStream::new(resp)
    }

    /// `DELETE /api/runs/{id}`: a cancel request, answered as it is.
    fn cancel(&self, id: &str, token: &str) -> Response {
        self.call("DELETE", &format!("/api/runs/{id}"), Some(token), &[], None)
    }

    /// `GET /api/runs/{id}`, which must answer 200.
    fn run_record(&self, id: &str, token: &str) -> Value {
        let resp = self.call("GET", &format!("/api/runs/{id}"), Some(token), &[], None);
        assert_eq!(resp.status, 200, "GET run {id}: {}", resp.text());
        resp.json()
    }

    /// `GET /api/runs/{id}/logs{query}`, which must answer 200 with `success` and the run id.
    fn run_logs(&self, id: &str, token: &str, query: &str) -> Value {
        let resp = self.call(
            "GET",
            &format!("/api/runs/{id}/logs{query}"),
            Some(token),
            &[],
            None,
        );
        assert_eq!(resp.status, 200, "{query}: {}", resp.text());
        let body = resp.json();
        assert_eq!(body["success"], json!(true));
        assert_eq!(body["run_id"], json!(id));
        body
    }

    /// Polls the record until `accept` holds; panics after `timeout`.
    fn wait_run(
        &self,
        id: &str,
        token: &str,
        timeout: Duration,
        what: &str,
        accept: &dyn Fn(&Value) -> bool,
    ) -> Value {
        poll_until(
            timeout,
            || self.run_record(id, token),
            accept,
            |record| format!("run {id} not {what} within {timeout:?}: {record}"),
        )
    }

    /// The stored bytes of a run (`stream`: "" for both, or `stdout` / `stderr`), lossily
    /// decoded.
    fn stored_output(&self, id: &str, token: &str, stream: &str) -> String {
        let query = if stream.is_empty() {
            String::new()
        } else {
            format!("?stream={stream}")
        };
        let resp = self.call(
            "GET",
            &format!("/api/runs/{id}/logs/download{query}"),
            Some(token),
            &[],
            None,
        );
        assert_eq!(resp.status, 200, "download of {id}: {}", resp.text());
        resp.text()
    }

    /// Polls the run's stored output of `stream` until `accept` holds; returns it.
    fn wait_output(
        &self,
        id: &str,
        token: &str,
        stream: &str,
        what: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> String {
        poll_until(
            RUN_TIMEOUT,
            || self.stored_output(id, token, stream),
            |text| accept(text),
            |text| format!("run {id}: {stream} never showed {what}: {text:?}"),
        )
    }

    /// Polls until the run has a final status.
    fn wait_finished(&self, id: &str, token: &str, timeout: Duration) -> Value {
        self.wait_run(id, token, timeout, "finished", &|r| {
            !matches!(r["status"].as_str(), Some("running") | Some("cancelling"))
        })
    }

    /// `GET /api/runs{query}` → the `runs` list.
    fn list_runs(&self, query: &str, token: &str) -> Vec<Value> {
        let resp = self.call("GET", &format!("/api/runs{query}"), Some(token), &[], None);
        assert_eq!(resp.status, 200, "GET /api/runs{query}: {}", resp.text());
        let body = resp.json();
        assert_eq!(body["success"], json!(true), "{body}");
        body["runs"]
            .as_array()
            .unwrap_or_else(|| panic!("no runs list in {body}"))
            .clone()
    }

    /// Opens `/api/runs/{id}/events{query}` and reads the response head.
    fn open_events(
        &self,
        id: &str,
        token: Option<&str>,
        query: &str,
        last_event_id: Option<&str>,
    ) -> StreamingResponse {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = vec![("Accept", "text/event-stream")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        if let Some(l) = last_event_id {
            headers.push(("Last-Event-ID", l));
        }
        open(
            self.api_port(),
            "HTTP/1.1",
            "GET",
            &format!("/api/runs/{id}/events{query}"),
            &headers,
            None,
        )
    }

    /// Attaches a viewer, which must be answered 200.
    fn attach(&self, id: &str, token: &str, query: &str, last_event_id: Option<&str>) -> SseStream {
        let resp = self.open_events(id, Some(token), query, last_event_id);
        assert_eq!(
            resp.status, 200,
            "events of {id}{query} (Last-Event-ID {last_event_id:?}) answered {} {:?}",
            resp.status, resp.headers
        );
        SseStream::new(resp)
    }
}

impl RunsApi for Server {
    fn api_port(&self) -> u16 {
        self.port
    }
}

impl RunsApi for Daemon {
    fn api_port(&self) -> u16 {
        self.port
    }
}

// ---------------------------------------------------------------------------------------------
// Output events
// ---------------------------------------------------------------------------------------------

/// One output event: `(id, "stdout" | "stderr", data)`.
pub type Output = (u64, String, String);

/// The stdout and stderr events of a stream, in order.
pub fn outputs(events: &[SseEvent]) -> Vec<Output> {
    events
        .iter()
        .filter(|e| e.event == "stdout" || e.event == "stderr")
        .map(|e| (e.numeric_id(), e.event.clone(), e.data.clone()))
        .collect()
}

/// Concatenated data of one stream's output events.
pub fn stream_text(outputs: &[Output], stream: &str) -> String {
    outputs
        .iter()
        .filter(|(_, s, _)| s == stream)
        .map(|(_, _, d)| d.as_str())
        .collect()
}

/// Reads a connection that may end abruptly (a viewer cut off by the server): the events
/// dispatched before the end, and whether the body ended properly.
pub fn drain_events(resp: &mut StreamingResponse, timeout: Duration) -> (Vec<SseEvent>, bool) {
    let deadline = Instant::now() + timeout;
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    loop {
        match resp.next_body(deadline) {
            BodyRead::Data(bytes, at) => events.extend(parser.feed(&bytes, at)),
            BodyRead::End => return (events, true),
            BodyRead::Failed(_) => return (events, false),
            BodyRead::TimedOut => panic!(
                "the connection neither ended nor closed within {timeout:?} ({} events read)",
                events.len()
            ),
        }
    }
}

/// Reads events until one satisfies `stop` (inclusive); panics after `timeout`.
pub fn events_until(
    sse: &mut SseStream,
    timeout: Duration,
    what: &str,
    stop: &dyn Fn(&SseEvent) -> bool,
) -> Vec<SseEvent> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sse.next_event(left) {
            Some(ev) => {
                let last = stop(&ev);
                got.push(ev);
                if last {
                    return got;
                }
            }
            None => panic!(
                "no event {what} within {timeout:?} (ended: {}); got {:?}",
                sse.ended(),
                got.iter()
                    .map(|e| (e.event.clone(), e.id.clone(), e.data.clone()))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gates
// ---------------------------------------------------------------------------------------------

/// A file a script waits for; the test opens it when the script may go on.
pub struct Gate {
    path: PathBuf,
}

impl Gate {
    pub fn new(dir: &Path, name: &str) -> Gate {
        Gate {
            path: dir.join(format!("gate-{name}")),
        }
    }

    pub fn path(&self) -> String {
        self.path.display().to_string()
    }

    pub fn open(&self) {
        fs::write(&self.path, b"open").unwrap();
    }
}

/// A server with the runbook `<name>.md` running `script`, which waits for the gate file named
/// by `GATE`, and a run of it that the dev user started: (server, dev token, gate, run id).
pub fn start_gated_run(
    opts: ServerOpts,
    name: &str,
    script: &str,
) -> (Server, String, Gate, String) {
    let file = format!("{name}.md");
    let server = Server::start(opts.runbook(&file, Runbook::new(name, script).env("GATE", "gate")));
    let token = dev_token();
    let gate = Gate::new(&server.root, &name.to_lowercase());
    let id = server.start_run(&file, &token, json!({"GATE": gate.path()}));
    (server, token, gate, id)
}

/// A shell line that waits until the file named by `$var` exists.
pub fn wait_for_gate(var: &str) -> String {
    format!("while [ ! -e \"${var}\" ]; do sleep 0.02; done\n")
}

/// A runbook with a `# Concurrency` block of `max: N` inserted before its script.
pub fn with_concurrency(runbook: &Runbook, max: u32) -> String {
    let md = runbook.render();
    assert!(md.contains("\n# Script\n"));
    md.replacen(
        "\n# Script\n",
        &format!("\n# Concurrency\n```yaml\nmax: {max}\n```\n\n# Script\n"),
        1,
    )
}

// ---------------------------------------------------------------------------------------------
// Process groups
// ---------------------------------------------------------------------------------------------

/// Live (not zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the parenthesised command name: state, ppid, pgrp, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() < 3 || fields[0] == "Z" || fields[0] == "X" {
            continue;
        }
        if fields[2].parse::<u32>().ok() == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// The number after `prefix` on a line of `text` (e.g. `pgid=1234`).
pub fn number_after(text: &str, prefix: &str) -> u32 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in {text:?}"))
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{prefix} is not followed by a number in {text:?}"))
}

/// Kills what is left of a process group this test started, when dropped (a failing test
/// must not leave `sleep 100`s behind).
pub struct GroupGuard(pub u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

/// Sends a signal (by name, e.g. `TERM`) to one process this test started.
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

// ---------------------------------------------------------------------------------------------
// A server that can be stopped and started again on the same directories
// ---------------------------------------------------------------------------------------------

/// A runbookd whose process the test controls: kill -9, SIGTERM, and a restart on the same
/// RUNBOOKS_DIR, STATE_DIR and EXECUTION_DIR. Killed and cleaned up on drop.
pub struct Daemon {
    pub root: PathBuf,
    pub port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Daemon {
    /// Writes the runbooks (`(file, markdown)`) and starts the server with `env` on top of the
    /// defaults the shared fixture uses.
    pub fn start(runbooks: &[(&str, String)], env: &[(&str, &str)]) -> Daemon {
        let root = unique_root();
        for d in ["runbooks", "state", "exec"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for (file, markdown) in runbooks {
            fs::write(root.join("runbooks").join(file), markdown).unwrap();
        }
        let mut all: Vec<(String, String)> = vec![
            ("API_PORT".into(), "0".into()),
            ("BIND_ADDRESS".into(), "127.0.0.1".into()),
            ("STATE_DIR".into(), root.join("state").display().to_string()),
            (
                "EXECUTION_DIR".into(),
                root.join("exec").display().to_string(),
            ),
            (
                "RUNBOOKS_DIR".into(),
                root.join("runbooks").display().to_string(),
            ),
            ("JWT_SECRET".into(), TEST_SECRET.into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        for (k, v) in env {
            all.retain(|(name, _)| name != k);
            all.push((k.to_string(), v.to_string()));
        }
        let mut daemon = Daemon {
            root,
            port: 0,
            env: all,
            child: None,
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "the previous server is still attached"
        );
        let mut cmd = base_command();
        cmd.current_dir(&self.root);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let (child, port) = spawn_listening(cmd, &self.root.join("server.stderr"))
            .unwrap_or_else(|why| panic!("{why}"));
        self.port = port;
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is not running").id()
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("state").join("runs")
    }

    pub fn runbooks_dir(&self) -> PathBuf {
        self.root.join("runbooks")
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self.root.join("server.stderr")).unwrap_or_default()
    }

    /// SIGKILL, then reaps the process.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the server is not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM (the process stays attached until [`Daemon::wait_exit`]).
    pub fn sigterm(&self) {
        send_signal(self.pid(), "TERM");
    }

    /// Waits for the process to exit; None if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("the server is not running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same directories, with `env` changed or added.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        for (k, v) in env {
            self.env.retain(|(name, _)| name != k);
            self.env.push((k.to_string(), v.to_string()));
        }
        self.spawn();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Stopped as a supervisor stops it, so that it removes what it made ahead (the run
        // cgroups are the host's, not the test directory's).
        if let Some(mut child) = self.child.take() {
            stop_server(&mut child);
        }
        if thread::panicking() {
            let stderr = self.stderr();
            let start = stderr.char_indices().rev().nth(4000).map_or(0, |(i, _)| i);
            eprintln!(
                "--- runbookd stderr (tail) ---\n{}\n--- end ---",
                &stderr[start..]
            );
        }
        if std::env::var_os("RUNBOOKD_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}
