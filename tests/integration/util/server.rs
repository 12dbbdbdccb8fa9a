//! The server fixture: the real runbookd binary in its own temporary directory, started on a
//! free port and waited for (its `listening on` line), killed and cleaned up on drop.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{
    execute_sse_at, history_entries, request, stop_server, Response, Runbook, SseStream,
    TEST_SECRET,
};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// What a test server is started with.
#[derive(Default)]
pub struct ServerOpts {
    files: Vec<(String, Vec<u8>)>,
    outside_files: Vec<(String, Vec<u8>)>,
    symlinks: Vec<(String, String)>,
    env: Vec<(String, String)>,
    unset: Vec<String>,
    no_runbooks_dir: bool,
}

impl ServerOpts {
    pub fn new() -> ServerOpts {
        ServerOpts::default()
    }

    /// A runbook `file` (e.g. `Hello.md`) in RUNBOOKS_DIR.
    pub fn runbook(self, file: &str, runbook: Runbook) -> ServerOpts {
        self.file(file, runbook.render().as_bytes())
    }

    /// Any file at `rel` (may contain `/`) below RUNBOOKS_DIR.
    pub fn file(mut self, rel: &str, content: &[u8]) -> ServerOpts {
        self.files.push((rel.to_string(), content.to_vec()));
        self
    }

    /// A file at `rel` below the test's root directory, i.e. outside RUNBOOKS_DIR.
    pub fn outside_file(mut self, rel: &str, content: &[u8]) -> ServerOpts {
        self.outside_files.push((rel.to_string(), content.to_vec()));
        self
    }

    /// A symlink `link` in RUNBOOKS_DIR pointing at `target_rel_root` below the test's root.
    pub fn symlink(mut self, link: &str, target_rel_root: &str) -> ServerOpts {
        self.symlinks
            .push((link.to_string(), target_rel_root.to_string()));
        self
    }

    /// An environment variable for the server process.
    pub fn env(mut self, name: &str, value: &str) -> ServerOpts {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Removes one of the variables the fixture sets by default.
    pub fn unset(mut self, name: &str) -> ServerOpts {
        self.unset.push(name.to_string());
        self
    }

    /// Starts the server without RUNBOOKS_DIR (the compiled-in samples are served).
    pub fn without_runbooks_dir(mut self) -> ServerOpts {
        self.no_runbooks_dir = true;
        self
    }
}

/// A fresh, unique temporary directory for one test.
pub fn unique_root() -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let root = std::env::temp_dir().join(format!(
        "runbookd-test-{}-{}-{}",
        std::process::id(),
        n,
        chrono::Utc::now().timestamp_micros()
    ));
    fs::create_dir_all(&root).unwrap();
    root
}

/// The command for the binary with a clean environment (PATH and HOME kept).
pub fn base_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runbookd"));
    cmd.env_clear();
    for keep in ["PATH", "HOME", "USER", "LANG"] {
        if let Ok(v) = std::env::var(keep) {
            cmd.env(keep, v);
        }
    }
    cmd
}

/// Clears `cmd`'s environment and gives it what a server rooted at `root` needs (PATH, HOME and
/// LANG kept; a free port on loopback, the test secret, warn logging, and `runbooks`, `state`
/// and `exec` below `root`), for tests that start the binary through a wrapper command.
pub fn wrapped_server_env(cmd: &mut Command, root: &Path) {
    cmd.env_clear();
    for keep in ["PATH", "HOME", "LANG"] {
        if let Ok(v) = std::env::var(keep) {
            cmd.env(keep, v);
        }
    }
    for (k, v) in [
        ("API_PORT", "0".to_string()),
        ("BIND_ADDRESS", "127.0.0.1".to_string()),
        ("JWT_SECRET", TEST_SECRET.to_string()),
        ("RUNBOOKS_DIR", root.join("runbooks").display().to_string()),
        ("STATE_DIR", root.join("state").display().to_string()),
        ("EXECUTION_DIR", root.join("exec").display().to_string()),
        ("RUST_LOG", "warn".to_string()),
    ] {
        cmd.env(k, v);
    }
}

/// A running runbookd, killed and cleaned up on drop.
pub struct Server {
    pub port: u16,
    pub root: PathBuf,
    child: Child,
}

impl Server {
    pub fn start(opts: ServerOpts) -> Server {
        let root = unique_root();
        let runbooks = root.join("runbooks");
        let state = root.join("state");
        let exec = root.join("exec");
        for d in [&runbooks, &state, &exec] {
            fs::create_dir_all(d).unwrap();
        }
        for (rel, content) in &opts.files {
            let p = runbooks.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, content).unwrap();
        }
        for (rel, content) in &opts.outside_files {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, content).unwrap();
        }
        for (link, target) in &opts.symlinks {
            std::os::unix::fs::symlink(root.join(target), runbooks.join(link)).unwrap();
        }

        let mut cmd = base_command();
        cmd.current_dir(&root);
        let mut env: Vec<(String, String)> = vec![
            ("API_PORT".into(), "0".into()),
            ("BIND_ADDRESS".into(), "127.0.0.1".into()),
            ("STATE_DIR".into(), state.display().to_string()),
            ("EXECUTION_DIR".into(), exec.display().to_string()),
            ("JWT_SECRET".into(), TEST_SECRET.into()),
            ("RUST_LOG".into(), "warn".into()),
            // Short, so that dropping the fixture (SIGTERM) stops leftover runs quickly.
            ("SHUTDOWN_GRACE_SECONDS".into(), "2".into()),
        ];
        if !opts.no_runbooks_dir {
            env.push(("RUNBOOKS_DIR".into(), runbooks.display().to_string()));
        }
        for (k, v) in &opts.env {
            env.retain(|(name, _)| name != k);
            env.push((k.clone(), v.clone()));
        }
        env.retain(|(name, _)| !opts.unset.contains(name));
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let (child, port) = match spawn_listening(cmd, &root.join("server.stderr")) {
            Ok(started) => started,
            Err(why) => {
                let _ = fs::remove_dir_all(&root);
                panic!("{why}");
            }
        };
        Server { port, root, child }
    }

    pub fn runbooks_dir(&self) -> PathBuf {
        self.root.join("runbooks")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn exec_dir(&self) -> PathBuf {
        self.root.join("exec")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.root.join("server.stderr")).unwrap_or_default()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        request(self.port, method, path, headers, body)
    }

    /// GET with an optional bearer token.
    pub fn get(&self, path: &str, token: Option<&str>) -> Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        self.request("GET", path, &headers, None)
    }

    /// A JSON request with a bearer token.
    pub fn json_request(&self, method: &str, path: &str, token: &str, body: &Value) -> Response {
        let auth = format!("Bearer {token}");
        let body = serde_json::to_vec(body).unwrap();
        self.request(
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            Some(&body),
        )
    }

    /// `PATCH /api/runbooks/{file}/validate` with `{"env_vars": env_vars}`.
    pub fn validate(&self, file: &str, token: &str, env_vars: Value) -> Response {
        self.json_request(
            "PATCH",
            &format!("/api/runbooks/{file}/validate"),
            token,
            &json!({ "env_vars": env_vars }),
        )
    }

    /// Synchronous execute of `file` with `{"env_vars": env_vars}`.
    pub fn execute(&self, file: &str, token: &str, env_vars: Value) -> Response {
        self.json_request(
            "POST",
            &format!("/api/runbooks/{file}/execute"),
            token,
            &json!({ "env_vars": env_vars }),
        )
    }

    /// Synchronous execute with extra headers.
    pub fn execute_with_headers(
        &self,
        file: &str,
        token: &str,
        env_vars: Value,
        extra: &[(&str, &str)],
    ) -> Response {
        let auth = format!("Bearer {token}");
        let body = serde_json::to_vec(&json!({ "env_vars": env_vars })).unwrap();
        let mut headers = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        headers.extend_from_slice(extra);
        self.request(
            "POST",
            &format!("/api/runbooks/{file}/execute"),
            &headers,
            Some(&body),
        )
    }

    /// SSE execute of `file` (Accept: text/event-stream), returning the live stream.
    pub fn execute_sse(&self, file: &str, token: &str, env_vars: Value) -> SseStream {
        execute_sse_at(self.port, file, token, env_vars)
    }

    /// The current text of a runbook file.
    pub fn read_runbook(&self, file: &str) -> String {
        fs::read_to_string(self.runbooks_dir().join(file)).unwrap()
    }

    /// History entries of a runbook file (text after each `### ` heading in `# History`).
    pub fn history_entries(&self, file: &str) -> Vec<String> {
        history_entries(&self.read_runbook(file))
    }

    /// Polls until the runbook has at least `count` history entries; panics after `timeout`.
    pub fn wait_for_history(&self, file: &str, count: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let entries = self.history_entries(file);
            if entries.len() >= count {
                return entries;
            }
            if Instant::now() > deadline {
                panic!(
                    "{file} has {} history entries after {timeout:?}, wanted {count}:\n{}",
                    entries.len(),
                    self.read_runbook(file)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop_server(&mut self.child);
        if thread::panicking() {
            let stderr = self.stderr();
            let tail: String = {
                let chars: Vec<char> = stderr.chars().collect();
                let start = chars.len().saturating_sub(4000);
                chars[start..].iter().collect()
            };
            eprintln!("--- runbookd stderr (tail) ---\n{tail}\n--- end ---");
        }
        if std::env::var_os("RUNBOOKD_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// Spawns the server command with its stderr appended to `stderr_path` and waits (20 s at
/// most) for its `listening on` line. Err: why it did not come, with what the server printed.
pub fn spawn_listening(
    mut cmd: Command,
    stderr_path: &std::path::Path,
) -> Result<(Child, u16), String> {
    let stderr_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_path)
        .unwrap();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr_file));
    let mut child = cmd.spawn().expect("spawn runbookd");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    // The receiver goes away after start-up; keep draining regardless.
                    let _ = tx.send(line.clone());
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                if let Some(port) = parse_listening_line(&line) {
                    return Ok((child, port));
                }
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait().ok();
                let stderr = fs::read_to_string(stderr_path).unwrap_or_default();
                return Err(format!(
                    "runbookd did not print its listening line ({e:?}); exit: {status:?}\n\
                     stdout so far:\n{seen}\nstderr:\n{stderr}"
                ));
            }
        }
    }
}

/// The port of a `listening on http://ADDR:PORT` line.
pub fn parse_listening_line(line: &str) -> Option<u16> {
    let rest = line.trim().split("listening on http://").nth(1)?;
    let port = rest.rsplit(':').next()?;
    let digits: String = port.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}
