//! Shared fixtures for the integration tests: a real runbookd process in its own temporary
//! directory, runbook text builders, JWT minting independent of the server code, a raw HTTP/1.1
//! client (whole and incremental responses) and an incremental, spec-following SSE parser.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

/// The HS256 secret every test server is started with (longer than the 32 byte minimum).
pub const TEST_SECRET: &str = "integration-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz";
/// Issuer and audience the server expects by default.
pub const ISSUER: &str = "dev-idp";
pub const AUDIENCE: &str = "dev-api";

/// Generous bound for one whole HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------------------------
// Runbook text
// ---------------------------------------------------------------------------------------------

/// Builds the markdown of a runbook in the documented format.
#[derive(Clone, Debug)]
pub struct Runbook {
    name: String,
    env: Vec<(String, String)>,
    inputs: Vec<String>,
    claims: Vec<String>,
    script: String,
    history: bool,
}

impl Runbook {
    /// A runbook named `name` (its H1) whose `# Script` block holds `script` verbatim.
    pub fn new(name: &str, script: &str) -> Runbook {
        Runbook {
            name: name.to_string(),
            env: Vec::new(),
            inputs: Vec::new(),
            claims: Vec::new(),
            script: script.to_string(),
            history: true,
        }
    }

    /// Adds a required environment variable.
    pub fn env(mut self, var: &str, description: &str) -> Runbook {
        self.env.push((var.to_string(), description.to_string()));
        self
    }

    /// Adds an `Input:` path.
    pub fn input(mut self, path: &str) -> Runbook {
        self.inputs.push(path.to_string());
        self
    }

    /// Adds a `# Required Claims` line such as `roles: admin`.
    pub fn claim(mut self, line: &str) -> Runbook {
        self.claims.push(line.to_string());
        self
    }

    /// Leaves out the `# History` section.
    pub fn without_history(mut self) -> Runbook {
        self.history = false;
        self
    }

    pub fn render(&self) -> String {
        let mut md = format!(
            "# {}\nA runbook written by the integration tests.\n\n",
            self.name
        );
        md.push_str("# Environment Requirements\n```yaml\n");
        for (var, description) in &self.env {
            md.push_str(&format!("{var}: {description}\n"));
        }
        md.push_str("```\n\n# File System Requirements\n```yaml\n");
        if self.inputs.is_empty() {
            md.push_str("Input:\n");
        } else {
            md.push_str("Input:\n");
            for input in &self.inputs {
                md.push_str(&format!("- {input}\n"));
            }
        }
        md.push_str("```\n\n");
        if !self.claims.is_empty() {
            md.push_str("# Required Claims\n```yaml\n");
            for line in &self.claims {
                md.push_str(line);
                md.push('\n');
            }
            md.push_str("```\n\n");
        }
        md.push_str("# Script\n```sh\n");
        md.push_str(&self.script);
        if !self.script.ends_with('\n') {
            md.push('\n');
        }
        md.push_str("```\n");
        if self.history {
            md.push_str("\n# History\n");
        }
        md
    }
}

// ---------------------------------------------------------------------------------------------
// Server fixture
// ---------------------------------------------------------------------------------------------

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
        // SIGTERM first: the server stops its runs' process groups itself, so no script
        // outlives the test; SIGKILL if it takes longer than its shutdown grace.
        let terminated = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + Duration::from_secs(5);
        while terminated && Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Splits the `# History` section of a runbook into its entries (each starting after `### `).
pub fn history_entries(markdown: &str) -> Vec<String> {
    let Some(pos) = markdown.find("\n# History") else {
        return Vec::new();
    };
    let section = &markdown[pos + "\n# History".len()..];
    section
        .split("\n### ")
        .skip(1)
        .map(|s| s.to_string())
        .collect()
}

/// `(time, exit code, run id)` from an entry's first line `<time> | Exit Code: N | Run: <id>`.
pub fn entry_header(entry: &str) -> (String, i64, Option<String>) {
    let first = entry.lines().next().unwrap_or_default();
    let parts: Vec<&str> = first.split(" | ").collect();
    let time = parts.first().copied().unwrap_or_default().to_string();
    let code = parts
        .iter()
        .find_map(|p| p.strip_prefix("Exit Code: "))
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("no exit code in history heading {first:?}"));
    let run = parts
        .iter()
        .find_map(|p| p.strip_prefix("Run: "))
        .map(|r| r.trim().to_string());
    (time, code, run)
}

/// An SSE execute on whatever listens on `port` (the server, or a proxy in front of it),
/// which must answer 200.
pub fn execute_sse_at(port: u16, file: &str, token: &str, env_vars: Value) -> SseStream {
    let auth = format!("Bearer {token}");
    let body = serde_json::to_vec(&json!({ "env_vars": env_vars })).unwrap();
    let resp = open(
        port,
        "HTTP/1.1",
        "POST",
        &format!("/api/runbooks/{file}/execute"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ],
        Some(&body),
    );
    assert_eq!(
        resp.status, 200,
        "SSE execute of {file} on port {port} answered {} {:?}",
        resp.status, resp.headers
    );
    SseStream::new(resp)
}

/// Polls `fetch` every 25 ms until `accept` holds for what it returns, and returns that; after
/// `timeout` panics with `describe` of the last value.
pub fn poll_until<T>(
    timeout: Duration,
    mut fetch: impl FnMut() -> T,
    accept: impl Fn(&T) -> bool,
    describe: impl Fn(&T) -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let value = fetch();
        if accept(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{}", describe(&value));
        thread::sleep(Duration::from_millis(25));
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Whether `RUNBOOKD_FULL_TESTS=1` (tests needing curl then fail instead of skipping).
pub fn full_tests() -> bool {
    std::env::var("RUNBOOKD_FULL_TESTS").as_deref() == Ok("1")
}

/// Whether a program is found on PATH.
pub fn have_program(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// Whether a test whose scripts call curl runs: it is skipped (with a line saying so) unless
/// `RUNBOOKD_FULL_TESTS=1`, and then curl must be installed.
pub fn curl_available_or_skip(test: &str) -> bool {
    if !full_tests() {
        eprintln!("{test}: skipped (set RUNBOOKD_FULL_TESTS=1 to run tests that need curl)");
        return false;
    }
    assert!(
        have_program("curl"),
        "RUNBOOKD_FULL_TESTS=1 but curl is not installed"
    );
    true
}

/// The JSON result a sub-runbook call printed on the caller's stdout.
pub fn stdout_json(result: &Value) -> Value {
    let stdout = result["stdout"]
        .as_str()
        .unwrap_or_else(|| panic!("no stdout in {result}"));
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not a JSON result ({e}): {result}"))
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Standard claims: iss, aud, sub, iat, exp (one hour), roles.
pub fn claims(sub: &str, roles: Value) -> Value {
    let now = now_secs();
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now,
        "exp": now + 3600,
        "roles": roles,
    })
}

/// An HS256-signed JWT of `claims` (the header says HS256).
pub fn sign_hs256(claims: &Value, secret: &[u8]) -> String {
    sign_with_header(&json!({"alg": "HS256", "typ": "JWT"}), claims, secret)
}

/// A JWT with any header, signed with HMAC-SHA256 over `header.payload`.
pub fn sign_with_header(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(header).unwrap()),
        b64url(&serde_json::to_vec(claims).unwrap())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(signing_input.as_bytes());
    let sig = mac.finalize().into_bytes();
    format!("{signing_input}.{}", b64url(&sig))
}

/// A JWT whose header says HS512, correctly signed with HMAC-SHA512.
pub fn sign_hs512(claims: &Value, secret: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(&json!({"alg": "HS512", "typ": "JWT"})).unwrap()),
        b64url(&serde_json::to_vec(claims).unwrap())
    );
    let mut mac = Hmac::<sha2::Sha512>::new_from_slice(secret).unwrap();
    mac.update(signing_input.as_bytes());
    let sig = mac.finalize().into_bytes();
    format!("{signing_input}.{}", b64url(&sig))
}

/// An unsigned `alg: none` token.
pub fn alg_none(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64url(&serde_json::to_vec(&json!({"alg": "none", "typ": "JWT"})).unwrap()),
        b64url(&serde_json::to_vec(claims).unwrap())
    )
}

/// A valid token for the test secret.
pub fn token(sub: &str, roles: &[&str]) -> String {
    sign_hs256(&claims(sub, json!(roles)), TEST_SECRET.as_bytes())
}

/// A valid developer token.
pub fn dev_token() -> String {
    token("dev-tester", &["developer"])
}

/// A valid admin token.
pub fn admin_token() -> String {
    token("admin-tester", &["admin"])
}

/// Decodes a JWT segment (header or payload) as JSON.
pub fn decode_segment(segment: &str) -> Value {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .unwrap_or_else(|e| panic!("bad base64url JWT segment {segment:?}: {e}"));
    serde_json::from_slice(&bytes).unwrap()
}

/// Verifies an HS256 token's signature with `secret`.
pub fn verify_hs256(token: &str, secret: &[u8]) -> bool {
    let mut parts = token.rsplitn(2, '.');
    let (Some(sig), Some(input)) = (parts.next(), parts.next()) else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    b64url(&mac.finalize().into_bytes()) == sig
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// A whole HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One HTTP/1.1 request with `Connection: close`, read whole.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut resp = open(port, "HTTP/1.1", method, path, headers, body);
    let body = resp.read_all(HTTP_TIMEOUT);
    Response {
        status: resp.status,
        version: resp.version.clone(),
        headers: resp.headers.clone(),
        body,
    }
}

/// Connects and sends a request; a large body is written from another thread so that a server
/// answering early (401, 413) is read while the body is still being sent.
pub fn send_request(
    port: u16,
    version: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut head = format!("{method} {path} {version}\r\nHost: 127.0.0.1:{port}\r\n");
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    if version == "HTTP/1.1" && !has("Connection") {
        head.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("Transfer-Encoding") && v.contains("chunked"));
    if !chunked && !has("Content-Length") {
        if let Some(b) = body {
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        } else if method == "POST" || method == "PATCH" || method == "PUT" {
            head.push_str("Content-Length: 0\r\n");
        }
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        if b.len() <= 64 * 1024 {
            // Errors are left to the response read (a server may close early).
            let _ = stream.write_all(b);
        } else {
            let mut writer = stream.try_clone().unwrap();
            let data = b.to_vec();
            thread::spawn(move || {
                let _ = writer.write_all(&data);
            });
        }
    }
    stream
}

enum Framing {
    Length(usize),
    Chunked(ChunkState),
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
    Trailers,
}

/// What one step of reading an incremental body gives.
#[derive(Debug)]
pub enum BodyRead {
    /// Decoded body bytes and the time their last raw bytes arrived.
    Data(Vec<u8>, Instant),
    /// The body is complete.
    End,
    /// Nothing arrived before the deadline.
    TimedOut,
    /// The connection failed.
    Failed(io::Error),
}

/// A response whose head has been read and whose body is read incrementally.
pub struct StreamingResponse {
    pub status: u16,
    pub version: String,
    pub headers: Vec<(String, String)>,
    /// When the response head was complete.
    pub head_at: Instant,
    stream: TcpStream,
    raw: Vec<u8>,
    raw_at: Instant,
    framing: Framing,
    finished: bool,
    /// Total undecoded bytes received for the body (framing included).
    pub wire_bytes: usize,
}

/// Sends a request and reads the response head (panics after HTTP_TIMEOUT).
pub fn open(
    port: u16,
    version: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> StreamingResponse {
    let stream = send_request(port, version, method, path, headers, body);
    StreamingResponse::read_head(stream, method == "HEAD")
}

impl StreamingResponse {
    pub fn read_head(mut stream: TcpStream, head_request: bool) -> StreamingResponse {
        let deadline = Instant::now() + HTTP_TIMEOUT;
        let mut raw: Vec<u8> = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(pos) = find(&raw, b"\r\n\r\n") {
                break pos;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no response head within {HTTP_TIMEOUT:?}");
            stream.set_read_timeout(Some(left)).unwrap();
            match stream.read(&mut buf) {
                Ok(0) => panic!(
                    "connection closed before a complete response head: {:?}",
                    String::from_utf8_lossy(&raw)
                ),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!(
                    "reading the response head failed: {e}; got {:?}",
                    String::from_utf8_lossy(&raw)
                ),
            }
        };
        let head_at = Instant::now();
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let rest = raw[head_end + 4..].to_vec();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_string();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        let chunked = header_of(&headers, "Transfer-Encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false);
        let framing = if head_request || status == 204 || status == 304 || status < 200 {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked(ChunkState::Size)
        } else if let Some(len) = header_of(&headers, "Content-Length") {
            Framing::Length(
                len.parse()
                    .unwrap_or_else(|_| panic!("bad Content-Length {len:?}")),
            )
        } else {
            Framing::Close
        };
        let wire_bytes = rest.len();
        let mut resp = StreamingResponse {
            status,
            version,
            headers,
            head_at,
            stream,
            raw: rest,
            raw_at: head_at,
            framing,
            finished: false,
            wire_bytes,
        };
        if let Framing::Length(0) = resp.framing {
            resp.finished = true;
        }
        resp
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    pub fn is_chunked(&self) -> bool {
        matches!(self.framing, Framing::Chunked(_))
    }

    pub fn is_close_delimited(&self) -> bool {
        matches!(self.framing, Framing::Close)
    }

    /// The underlying socket (e.g. to shut it down).
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }

    /// Closes both directions of the connection.
    pub fn disconnect(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Reads until some decoded body bytes are available, the body ends, or `deadline`.
    pub fn next_body(&mut self, deadline: Instant) -> BodyRead {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let decoded = self.decode();
            if !decoded.is_empty() {
                return BodyRead::Data(decoded, self.raw_at);
            }
            if self.finished {
                return BodyRead::End;
            }
            let now = Instant::now();
            if now >= deadline {
                return BodyRead::TimedOut;
            }
            let _ = self.stream.set_read_timeout(Some(deadline - now));
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    if let Framing::Close = self.framing {
                        self.finished = true;
                        return BodyRead::End;
                    }
                    return BodyRead::Failed(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a framed body",
                    ));
                }
                Ok(n) => {
                    self.raw_at = Instant::now();
                    self.wire_bytes += n;
                    self.raw.extend_from_slice(&buf[..n]);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return BodyRead::TimedOut;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return BodyRead::Failed(e),
            }
        }
    }

    /// Reads the whole remaining body; panics on timeout or failure.
    pub fn read_all(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            match self.next_body(deadline) {
                BodyRead::Data(d, _) => out.extend_from_slice(&d),
                BodyRead::End => return out,
                BodyRead::TimedOut => panic!(
                    "body not complete within {timeout:?} (status {}, {} bytes so far: {:?})",
                    self.status,
                    out.len(),
                    String::from_utf8_lossy(&out[out.len().saturating_sub(500)..])
                ),
                BodyRead::Failed(e) => panic!(
                    "reading the body failed: {e} (status {}, {} bytes so far)",
                    self.status,
                    out.len()
                ),
            }
        }
    }

    fn decode(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            match self.framing {
                Framing::Close => {
                    out.append(&mut self.raw);
                    return out;
                }
                Framing::Length(rem) => {
                    let n = rem.min(self.raw.len());
                    out.extend(self.raw.drain(..n));
                    self.framing = Framing::Length(rem - n);
                    if rem - n == 0 {
                        self.finished = true;
                    }
                    return out;
                }
                Framing::Chunked(state) => match state {
                    ChunkState::Size => {
                        let Some(pos) = find(&self.raw, b"\r\n") else {
                            return out;
                        };
                        let line = String::from_utf8_lossy(&self.raw[..pos]).into_owned();
                        self.raw.drain(..pos + 2);
                        let hex = line.split(';').next().unwrap_or("").trim();
                        let size = usize::from_str_radix(hex, 16)
                            .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                        self.framing = Framing::Chunked(if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        });
                    }
                    ChunkState::Data(rem) => {
                        let n = rem.min(self.raw.len());
                        out.extend(self.raw.drain(..n));
                        if rem - n == 0 {
                            self.framing = Framing::Chunked(ChunkState::DataEnd);
                        } else {
                            self.framing = Framing::Chunked(ChunkState::Data(rem - n));
                            return out;
                        }
                    }
                    ChunkState::DataEnd => {
                        if self.raw.len() < 2 {
                            return out;
                        }
                        assert_eq!(&self.raw[..2], b"\r\n", "chunk data not followed by CRLF");
                        self.raw.drain(..2);
                        self.framing = Framing::Chunked(ChunkState::Size);
                    }
                    ChunkState::Trailers => {
                        let Some(pos) = find(&self.raw, b"\r\n") else {
                            return out;
                        };
                        self.raw.drain(..pos + 2);
                        if pos == 0 {
                            self.finished = true;
                            self.framing = Framing::Length(0);
                            return out;
                        }
                    }
                },
            }
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Server-sent events
// ---------------------------------------------------------------------------------------------

/// One dispatched SSE event.
#[derive(Clone, Debug)]
pub struct SseEvent {
    /// The event type (`message` when no `event:` field was given).
    pub event: String,
    pub data: String,
    /// The event's own `id:` field, if it had one.
    pub id: Option<String>,
    /// When the bytes completing this event arrived.
    pub at: Instant,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| {
            panic!(
                "{} event data is not JSON ({e}): {:?}",
                self.event, self.data
            )
        })
    }

    pub fn numeric_id(&self) -> u64 {
        self.id
            .as_deref()
            .unwrap_or_else(|| panic!("{} event has no id: {self:?}", self.event))
            .parse()
            .unwrap_or_else(|_| panic!("{} event id is not a number: {self:?}", self.event))
    }
}

/// An incremental parser following the WHATWG event-stream interpretation rules.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    event_type: String,
    data: String,
    event_id: Option<String>,
    /// The last event id buffer as the spec keeps it across events.
    pub last_event_id: String,
    /// Arrival times of comment lines (keepalives).
    pub comments: Vec<Instant>,
    /// Comment line texts, in order.
    pub comment_texts: Vec<String>,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds bytes that arrived at `at`; returns the events they completed.
    pub fn feed(&mut self, bytes: &[u8], at: Instant) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(at, &mut out);
                }
                b'\n' => self.end_line(at, &mut out),
                _ => self.line.push(b),
            }
        }
        out
    }

    fn end_line(&mut self, at: Instant, out: &mut Vec<SseEvent>) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if line.is_empty() {
            if self.data.is_empty() {
                self.event_type.clear();
                self.event_id = None;
                return;
            }
            let mut data = std::mem::take(&mut self.data);
            if data.ends_with('\n') {
                data.pop();
            }
            let event = if self.event_type.is_empty() {
                "message".to_string()
            } else {
                std::mem::take(&mut self.event_type)
            };
            out.push(SseEvent {
                event,
                data,
                id: self.event_id.take(),
                at,
            });
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.comments.push(at);
            self.comment_texts.push(comment.to_string());
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
            None => (line.clone(), String::new()),
        };
        match field.as_str() {
            "event" => self.event_type = value,
            "data" => {
                self.data.push_str(&value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => {
                self.last_event_id = value.clone();
                self.event_id = Some(value);
            }
            _ => {}
        }
    }
}

/// A live SSE response: the HTTP stream plus a parser.
pub struct SseStream {
    pub resp: StreamingResponse,
    pub parser: SseParser,
    pending: VecDeque<SseEvent>,
    /// Every decoded body byte received so far.
    pub raw: Vec<u8>,
    /// Every event received so far.
    pub events: Vec<SseEvent>,
    ended: bool,
}

impl SseStream {
    pub fn new(resp: StreamingResponse) -> SseStream {
        SseStream {
            resp,
            parser: SseParser::new(),
            pending: VecDeque::new(),
            raw: Vec::new(),
            events: Vec::new(),
            ended: false,
        }
    }

    /// The next event, or None when the body ended or `timeout` passed (see `ended()`).
    pub fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.ended {
                return None;
            }
            match self.resp.next_body(deadline) {
                BodyRead::Data(bytes, at) => {
                    self.raw.extend_from_slice(&bytes);
                    let evs = self.parser.feed(&bytes, at);
                    self.events.extend(evs.iter().cloned());
                    self.pending.extend(evs);
                }
                BodyRead::End => self.ended = true,
                BodyRead::TimedOut => return None,
                BodyRead::Failed(e) => panic!("SSE stream failed: {e}"),
            }
        }
    }

    /// Whether the response body has ended.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Reads events until `done` (inclusive); panics if it does not come within `timeout`.
    pub fn until_done(&mut self, timeout: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Some(ev) => {
                    let done = ev.event == "done";
                    got.push(ev);
                    if done {
                        return got;
                    }
                }
                None => panic!(
                    "no done event within {timeout:?} (ended: {}); events so far: {:?}\nraw tail: {:?}",
                    self.ended,
                    got.iter().map(|e| (&e.event, e.data.len())).collect::<Vec<_>>(),
                    String::from_utf8_lossy(&self.raw[self.raw.len().saturating_sub(600)..])
                ),
            }
        }
    }

    /// Reads until `done` and then until the body ends.
    pub fn until_end(&mut self, timeout: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let got = self.until_done(timeout);
        let left = deadline.saturating_duration_since(Instant::now());
        while !self.ended {
            if self.next_event(left).is_none() && !self.ended {
                panic!("the SSE body did not end after done within {timeout:?}");
            }
        }
        got
    }
}

/// Concatenated data of the events of one type.
pub fn joined(events: &[SseEvent], kind: &str) -> String {
    events
        .iter()
        .filter(|e| e.event == kind)
        .map(|e| e.data.as_str())
        .collect()
}

/// The JSON of the `done` event (which must be the last event).
pub fn done_json(events: &[SseEvent]) -> Value {
    let last = events.last().expect("no events");
    assert_eq!(last.event, "done", "last event is not done: {last:?}");
    last.json()
}

/// Lossy UTF-8 decoding with CR and CRLF turned into LF, as the SSE events carry output.
pub fn normalise(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .replace("\r\n", "\n")
        .replace('\r', "\n")
}
