//! Starts and stops the runbookd binary under test: a private temporary directory (runbooks,
//! state, execution dirs), the environment it needs, the port read from its
//! `listening on http://…` line, its stderr kept for diagnosis, and a stop (TERM, then KILL)
//! that also runs when a figure panics.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::BenchError;

/// How long the server may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopping server may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Stderr lines kept for an error message.
const KEPT_STDERR_LINES: usize = 20;
/// Stage timing lines kept.
const MAX_STAGE_LINES: usize = 10_000;

/// A directory removed, with everything in it, when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(prefix: &str) -> Result<TempDir, BenchError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(BenchError::io(format!("create {}", path.display())))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What a server is started with.
pub struct ServerSpec<'a> {
    pub binary: &'a Path,
    pub runbooks_dir: &'a Path,
    pub secret: &'a str,
    /// Extra environment variables (limits raised for one figure).
    pub extra_env: &'a [(&'a str, &'a str)],
}

/// A running server; stopped when dropped.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub pid: u32,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_lines: Arc<Mutex<u64>>,
    /// Its `runbookd::stages` log lines (when started with that target at debug level).
    stage_lines: Arc<Mutex<Vec<String>>>,
    /// Its state and execution directories, removed after it stops.
    work: Option<TempDir>,
}

impl Server {
    /// Starts the binary with a fresh state directory and waits for its address.
    pub fn start(spec: &ServerSpec<'_>) -> Result<Server, BenchError> {
        let work = TempDir::new("runbookd-bench-state")?;
        let state_dir = work.path().join("state");
        let exec_dir = work.path().join("exec");
        let mut command = Command::new(spec.binary);
        command
            .env("API_PORT", "0")
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("RUNBOOKS_DIR", spec.runbooks_dir)
            .env("STATE_DIR", &state_dir)
            .env("EXECUTION_DIR", &exec_dir)
            .env("JWT_SECRET", spec.secret)
            .env("RUST_LOG", "warn")
            .env_remove("ENABLE_LOGIN")
            .env_remove("JWT_ISSUER")
            .env_remove("JWT_AUDIENCE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in spec.extra_env {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .map_err(BenchError::io(format!("start {}", spec.binary.display())))?;
        let pid = child.id();
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_lines = Arc::new(Mutex::new(0u64));
        let stage_lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            let count = stderr_lines.clone();
            let stages = stage_lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains(" runbookd::stages]") {
                        let mut stages = stages.lock().unwrap_or_else(|e| e.into_inner());
                        if stages.len() < MAX_STAGE_LINES {
                            stages.push(line);
                        }
                        continue;
                    }
                    let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if tail.len() == KEPT_STDERR_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                    *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                }
            });
        }
        let (tx, rx) = mpsc::channel::<String>();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                // Forward the first line, then keep draining so the pipe never fills.
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }
        let mut server = Server {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pid,
            stderr_tail,
            stderr_lines,
            stage_lines,
            work: Some(work),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.trim().strip_prefix("listening on http://") {
                        server.addr = rest.parse().map_err(|_| {
                            BenchError::Server(format!("cannot parse the address in {line:?}"))
                        })?;
                        return Ok(server);
                    }
                }
                Err(_) => {
                    let status = server
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    return Err(BenchError::Server(format!(
                        "no `listening on` line (exit status {status:?}); stderr: {}",
                        server.stderr_tail()
                    )));
                }
            }
        }
    }

    /// The last lines the server wrote to stderr, joined.
    pub fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// How many lines the server wrote to stderr (warnings and errors at RUST_LOG=warn).
    pub fn stderr_line_count(&self) -> u64 {
        *self.stderr_lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stage timing lines logged so far.
    pub fn stage_lines(&self) -> Vec<String> {
        self.stage_lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The server's `STATE_DIR` (until it is stopped).
    pub fn state_dir(&self) -> Option<PathBuf> {
        self.work.as_ref().map(|w| w.path().join("state"))
    }

    /// Stops the server: SIGTERM (its graceful shutdown), then SIGKILL after the grace; then
    /// removes its state. Returns how long the stop took.
    pub fn stop(&mut self) -> Duration {
        let started = Instant::now();
        if let Some(mut child) = self.child.take() {
            let termed = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            let deadline = Instant::now() + if termed { STOP_GRACE } else { Duration::ZERO };
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.work = None;
        started.elapsed()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
