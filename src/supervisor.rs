//! Runs one child process in its own process group and moves its output into the run's log.
//! Knows nothing of HTTP: it is given a program, an environment and a `RunLog`, and returns an
//! `Outcome`. One thread per run does it all in one poll: it appends both pipes to the log,
//! learns of the main process's exit from its pidfd, without reaping it, so the group id cannot
//! be reused while the group is still being signalled (a waiter thread does that where there is
//! no pidfd), and takes cancel requests, which come with a byte on a wake pipe. Descendants get `ORPHAN_GRACE_MS` to release the pipes, then the group is
//! killed and the pipes abandoned. With a run cgroup, the script enters it before it execs, and
//! the run's end kills and removes it, so descendants that left the group die too. A run whose log cannot be written any more (a full disk) is
//! stopped as a timed-out one is: its output would be lost.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::{self, PipeReader, PipeWriter, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::panic::catch_unwind;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::cgroup::{self, RunCgroup};
use crate::chunker::{Chunker, HOLD_BACK_RELEASE};
use crate::fault;
use crate::runlog::{Outcome, RunLog, Stream};
use crate::spawn::Proc;
use crate::sys::{self, ExitStatus};
use crate::workers::Workers;

/// Most bytes taken from a pipe in one read while its output comes in small writes.
const READ_BUFFER: usize = 64 * 1024;
/// Most bytes taken in one read while output comes in bulk (a read filled `READ_BUFFER`):
/// fewer, larger chunks, each read straight into the vector the log keeps.
const BULK_READ: usize = 256 * 1024;
/// A pipe in bulk mode goes back to small reads after a read smaller than this.
const BULK_LEAVE: usize = 16 * 1024;
/// What a pipe in bulk mode is asked to hold, so the script goes on writing while the run
/// thread stores what it read (the kernel default is 64 KiB).
const BULK_PIPE_CAPACITY: usize = 1024 * 1024;
/// Most pipes grown to `BULK_PIPE_CAPACITY` at once: the kernel counts pipe buffers per user,
/// and past its soft limit new pipes of that user (the scripts' own) get only two pages.
const MAX_GROWN_PIPES: usize = 16;
/// Pipes grown to `BULK_PIPE_CAPACITY` now.
static GROWN_PIPES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// This program, even if its file was replaced since it started.
const SELF_EXE: &str = "/proc/self/exe";
/// First argument that makes this binary act as the script-starting helper.
pub const CHILD_HELPER_ARG: &str = "--runbookd-internal-exec";

/// No run cgroup, as the helper's argument.
const NO_CGROUP: &str = "-";

/// The helper's main: `--runbookd-internal-exec SOFT|- NICE|- CGROUP|- UID:GID|- PROGRAM ARGS...`.
/// Used for `RUN_AS_USER` and where the kernel cannot start the script directly (see
/// `spawn.rs`). Moves itself into the run's cgroup, takes the scripts' niceness, becomes UID:GID
/// when given, then execs the interpreter;
/// on failure prints why on stderr and exits as a shell would (127 not found, 126 not
/// executable).
pub fn child_helper_main(args: &[OsString]) -> i32 {
    let (Some(soft), Some(nice), Some(cgroup), Some(user), Some(program)) = (
        args.first(),
        args.get(1),
        args.get(2),
        args.get(3),
        args.get(4),
    ) else {
        eprintln!("runbookd: internal helper called without a program");
        return 2;
    };
    if cgroup != NO_CGROUP {
        if let Err(e) = cgroup::enter(std::path::Path::new(cgroup)) {
            eprintln!(
                "runbookd: cannot enter the run's cgroup {}: {e}",
                cgroup.to_string_lossy()
            );
            return 1;
        }
    }
    let soft = soft.to_str().and_then(|s| s.parse::<u64>().ok());
    let nice = nice.to_str().and_then(|s| s.parse::<i32>().ok());
    let run_as = match user.to_str() {
        Some("-") => None,
        other => match other.and_then(parse_ids) {
            Some(ids) => Some(ids),
            None => {
                eprintln!("runbookd: internal helper called with a bad user");
                return 2;
            }
        },
    };
    let error = sys::exec_script_interpreter(soft, nice, run_as, program, &args[5..]);
    eprintln!(
        "runbookd: cannot run {}: {error}",
        program.to_string_lossy()
    );
    match SpawnError::from(error) {
        SpawnError::NotFound(_) => 127,
        SpawnError::NotExecutable(_) => 126,
        _ => 1,
    }
}
fn parse_ids(text: &str) -> Option<(u32, u32)> {
    let (uid, gid) = text.split_once(':')?;
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

/// Most bytes drained from a pipe once the run is over and its group killed.
const FINAL_DRAIN_LIMIT: usize = 1024 * 1024;

/// What to start.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// Soft `RLIMIT_NOFILE` the child gets back (the server raises its own).
    pub nofile_soft: Option<u64>,
    /// Niceness the script starts with (None: the server's).
    pub nice: Option<i32>,
    /// The run's own cgroup, created here (unless `cgroup_made`) and entered by the script
    /// before it execs.
    pub cgroup: Option<PathBuf>,
    /// The cgroup exists already (made ahead, see `run_ids.rs`).
    pub cgroup_made: bool,
    /// User and group id the script runs as (`RUN_AS_USER`); None: runbookd's own.
    pub run_as: Option<(u32, u32)>,
}

/// Time limits of one run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    /// Between TERM and KILL when a run is timed out or cancelled.
    pub kill_grace: Duration,
    /// After the main process exits, how long descendants may keep the pipes.
    pub orphan_grace: Duration,
}

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The interpreter does not exist (shell convention: 127).
    #[error("interpreter not found: {0}")]
    NotFound(#[source] io::Error),
    /// The interpreter is not executable (shell convention: 126).
    #[error("interpreter not executable: {0}")]
    NotExecutable(#[source] io::Error),
    /// The server is out of descriptors or processes; trying later may work.
    #[error("server out of resources: {0}")]
    Exhausted(#[source] io::Error),
    /// The run's cgroup could not be created.
    #[error("cannot create the run's cgroup: {0}")]
    Cgroup(#[source] io::Error),
    #[error("cannot start the script: {0}")]
    Other(#[source] io::Error),
}

impl From<io::Error> for SpawnError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => SpawnError::NotFound(e),
            Some(libc::EACCES) | Some(libc::ENOEXEC) => SpawnError::NotExecutable(e),
            Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::EAGAIN) | Some(libc::ENOMEM) => {
                SpawnError::Exhausted(e)
            }
            _ => SpawnError::Other(e),
        }
    }
}

impl SpawnError {
    /// The return code a shell would report for this failure.
    pub fn return_code(&self) -> i32 {
        match self {
            SpawnError::NotFound(_) => 127,
            SpawnError::NotExecutable(_) => 126,
            _ => 1,
        }
    }
}

/// A started child whose output is flowing into the log. Dropped before `supervise` reaped the
/// main process (a panic on the way), it kills the group and reaps.
pub struct Supervised {
    child: Proc,
    pid: u32,
    pipes: Vec<ScriptPipe>,
    /// Readable once the main process has exited (None: a waiter thread tells through `exit`).
    pidfd: Option<OwnedFd>,
    /// The waiter thread's word on the main process's exit (disconnected: it failed).
    exit: Receiver<io::Result<ExitStatus>>,
    requests: Receiver<StopRequest>,
    /// Cloned into each `StopSender`.
    request_sender: Sender<StopRequest>,
    /// Readable when a request or the waiter's word is there to take.
    wake: PipeReader,
    /// The other end of `wake` (non-blocking), for the senders.
    waker: Arc<PipeWriter>,
    log: Arc<RunLog>,
    cgroup: Option<RunCgroup>,
    /// The message of a panic in the waiter thread.
    panicked: Arc<Mutex<Option<String>>>,
    reaped: bool,
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // The main process is not reaped: the group id is still ours to signal.
        self.kill_all();
        self.end_pipes();
        let _ = self.child.wait();
        self.reaped = true;
        // Dropping the run's cgroup kills what is left in it and removes it.
        drop(self.cgroup.take());
    }
}

/// Keeps the first panic message of the waiter thread.
fn note_panic(slot: &Mutex<Option<String>>, message: String) {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    slot.get_or_insert(message);
}

/// How a run's owner reaches its supervisor: the request on a channel, and a byte on a pipe
/// that wakes the supervisor's poll.
#[derive(Clone)]
pub struct StopSender {
    requests: Sender<StopRequest>,
    waker: Arc<PipeWriter>,
}

impl StopSender {
    /// Sends `request`; false once the supervisor is gone (the run is over).
    pub fn send(&self, request: StopRequest) -> bool {
        if self.requests.send(request).is_err() {
            return false;
        }
        wake_up(&self.waker);
        true
    }
}

/// One byte on the supervisor's wake pipe; a full pipe (never drained yet) wakes it as well.
fn wake_up(waker: &PipeWriter) {
    use std::io::Write;
    let _ = (&*waker).write(&[1]);
}

/// What a run's owner may ask of its supervisor while the main process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// TERM + CONT to the group, KILL after the grace.
    Cancel,
    /// KILL to the group now (shutdown running out of time).
    Kill,
}

/// How the run was brought to an end by the supervisor, if it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    TimedOut,
    Cancelled,
    /// The log could not be written: output would be lost, so the script is stopped.
    WriteFailed,
}

impl Supervised {
    /// Process id of the main process, which is also the process-group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The run's own cgroup, if it has one.
    pub fn cgroup_path(&self) -> Option<&std::path::Path> {
        self.cgroup.as_ref().map(RunCgroup::path)
    }

    /// What the run's owner sends a cancel or kill through.
    pub fn stop_sender(&self) -> StopSender {
        StopSender {
            requests: self.request_sender.clone(),
            waker: self.waker.clone(),
        }
    }

    /// KILL to the group and to everything in the run's cgroup.
    fn kill_all(&self) {
        let _ = sys::kill_group(self.pid);
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill();
        }
    }

    /// Stores what the chunkers still hold; the pipes are not read any more.
    fn end_pipes(&mut self) {
        for pipe in &mut self.pipes {
            pipe.end(&self.log);
        }
    }

    /// Takes what is already in the pipes, without waiting for more.
    fn drain_pipes(&mut self, buf: &mut [u8]) {
        for pipe in &mut self.pipes {
            let mut drained = 0;
            while !pipe.ended && drained < FINAL_DRAIN_LIMIT {
                let fd = [pipe.reader.as_raw_fd()];
                match sys::poll_readable(&fd, Some(Duration::ZERO)) {
                    Ok(ready) if ready != 0 => match pipe.reader.read(buf) {
                        Ok(n) if n > 0 => {
                            drained += n;
                            self.log
                                .append_owned(pipe.stream, pipe.chunker.push(&buf[..n]));
                        }
                        _ => break,
                    },
                    _ => break,
                }
            }
        }
    }

    /// Takes the requests (and, without a pidfd, the waiter's word) that woke the poll.
    fn take_wake_bytes(&mut self) {
        let mut bytes = [0u8; 64];
        let _ = self.wake.read(&mut bytes);
    }

    /// Runs the run on this thread: copies both pipes into the log, learns of the main
    /// process's exit (pidfd), acts on timeout, cancel and a log that cannot be written, gives
    /// descendants `orphan_grace` to release the pipes, then kills what is left of the group
    /// and of the run's cgroup. Returns the outcome, whether it was cancelled, and the run's
    /// cgroup, emptied, which is removed when dropped (after the run is concluded: its removal
    /// need not delay the result). The log is finished by the caller.
    pub fn supervise(mut self, limits: Limits) -> (Outcome, bool, Option<RunCgroup>) {
        let pid = self.pid;
        if let Some(cgroup) = &mut self.cgroup {
            cgroup.open_kill_switch();
        }
        let deadline = crate::clock::instant_after(limits.timeout);
        let mut stop: Option<Stop> = None;
        let mut kill_at: Option<Instant> = None;
        // Once the main process has exited (or waiting for it failed).
        let mut status: Option<io::Result<ExitStatus>> = None;
        let mut grace_end: Option<Instant> = None;
        let mut told_write_failed = false;
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            if status.is_none() && !told_write_failed && self.log.has_write_error() {
                told_write_failed = true;
                if stop.is_none() {
                    log::warn!("group {pid}: its run log cannot be written; stopping it");
                    stop = Some(Stop::WriteFailed);
                    let _ = sys::terminate_group(pid);
                    kill_at = Some(crate::clock::instant_after(limits.kill_grace));
                }
            }
            let pipes_open = self.pipes.iter().any(|p| !p.ended);
            if let Some(end) = grace_end {
                if !pipes_open || Instant::now() >= end {
                    break;
                }
            }
            let phase_end = match status {
                None => kill_at.unwrap_or(deadline),
                Some(_) => grace_end.unwrap_or(deadline),
            };
            let wake_at = self
                .pipes
                .iter()
                .filter_map(ScriptPipe::release_at)
                .fold(phase_end, Instant::min);
            let mut fds = [-1; POLL_FIRST_PIPE + 2];
            fds[POLL_WAKE] = self.wake.as_raw_fd();
            if let (None, Some(pidfd)) = (&status, &self.pidfd) {
                fds[POLL_EXIT] = pidfd.as_raw_fd();
            }
            for (slot, pipe) in fds[POLL_FIRST_PIPE..].iter_mut().zip(&self.pipes) {
                if !pipe.ended {
                    *slot = pipe.reader.as_raw_fd();
                }
            }
            let timeout = wake_at.saturating_duration_since(Instant::now());
            let ready = match sys::poll_readable(&fds, Some(timeout)) {
                Ok(ready) => ready,
                Err(e) => {
                    log::error!("group {pid}: poll failed ({e}); killing it");
                    self.kill_all();
                    break;
                }
            };
            for (i, pipe) in self.pipes.iter_mut().enumerate() {
                if ready & (1 << (POLL_FIRST_PIPE + i)) != 0 && !pipe.read_once(&mut buf, &self.log)
                {
                    pipe.end(&self.log);
                }
            }
            let now = Instant::now();
            for pipe in &mut self.pipes {
                if pipe.release_at().is_some_and(|at| at <= now) {
                    self.log
                        .append_owned(pipe.stream, pipe.chunker.release_timed());
                }
            }
            if ready & (1 << POLL_WAKE) != 0 {
                self.take_wake_bytes();
                if status.is_none() && self.pidfd.is_none() {
                    match self.exit.try_recv() {
                        Ok(exited) => status = Some(exited),
                        Err(crossbeam_channel::TryRecvError::Disconnected) => {
                            status = Some(Err(io::Error::other("the waiter ended without word")))
                        }
                        Err(crossbeam_channel::TryRecvError::Empty) => {}
                    }
                }
                while let Ok(request) = self.requests.try_recv() {
                    if status.is_some() {
                        continue;
                    }
                    match request {
                        StopRequest::Cancel => {
                            if stop.is_none() {
                                stop = Some(Stop::Cancelled);
                                let _ = sys::terminate_group(pid);
                                kill_at = Some(crate::clock::instant_after(limits.kill_grace));
                            }
                        }
                        StopRequest::Kill => {
                            stop.get_or_insert(Stop::Cancelled);
                            self.kill_all();
                            kill_at = Some(crate::clock::instant_after(Duration::from_secs(3600)));
                        }
                    }
                }
            }
            if status.is_none() && ready & (1 << POLL_EXIT) != 0 {
                fault::test_point("waiter");
                status = Some(sys::wait_exit_keep_zombie(pid));
            }
            if status.is_some() {
                if grace_end.is_none() {
                    fault::test_point("supervise");
                    // The main process is gone but not reaped: the group id is still ours to
                    // signal. Descendants get the grace to release the pipes.
                    let _ = sys::terminate_group(pid);
                    grace_end = Some(crate::clock::instant_after(limits.orphan_grace));
                }
            } else if Instant::now() >= phase_end {
                if kill_at.is_some() {
                    self.kill_all();
                    kill_at = Some(crate::clock::instant_after(Duration::from_secs(3600)));
                } else {
                    stop = Some(Stop::TimedOut);
                    let _ = sys::terminate_group(pid);
                    kill_at = Some(crate::clock::instant_after(limits.kill_grace));
                }
            }
        }
        let status = match status {
            Some(Ok(status)) => Some(status),
            Some(Err(e)) => {
                log::error!("waiting for process {pid} failed: {e}");
                None
            }
            None => None,
        };
        self.kill_all();
        // Pipes still held by an escaped descendant: what is in them is taken, no more.
        self.drain_pipes(&mut buf);
        self.end_pipes();
        let reaped = self.child.wait();
        // Whatever is left of the run (escapees of the group included) was killed by
        // `kill_all`; the cgroup goes when the caller drops it.
        let cgroup = self.cgroup.take();
        self.reaped = true;
        let return_code = match (status, reaped) {
            (Some(s), _) => s.return_code(),
            (None, Ok(s)) => exit_code_of(s),
            (None, Err(_)) => -1,
        };
        let error = match stop {
            Some(Stop::TimedOut) => {
                let msg = format!(
                    "script timed out after {} s; its process group was terminated",
                    limits.timeout.as_secs()
                );
                self.log
                    .append(Stream::Stderr, format!("\nrunbookd: {msg}\n").as_bytes());
                Some(msg)
            }
            Some(Stop::Cancelled) => Some("the run was cancelled".to_string()),
            Some(Stop::WriteFailed) => self.log.write_error(),
            None => None,
        };
        let panicked = self
            .panicked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(message) = panicked {
            // The waiter died: the run fails with that, whatever else happened.
            let outcome = Outcome {
                return_code,
                error: Some(fault::internal_error(&message)),
                timed_out: false,
                finished_at: chrono::Utc::now(),
            };
            return (outcome, false, cgroup);
        }
        let outcome = Outcome {
            return_code,
            error,
            timed_out: stop == Some(Stop::TimedOut),
            finished_at: chrono::Utc::now(),
        };
        (outcome, stop == Some(Stop::Cancelled), cgroup)
    }
}

/// Places in the supervisor's poll set.
const POLL_WAKE: usize = 0;
const POLL_EXIT: usize = 1;
const POLL_FIRST_PIPE: usize = 2;

fn exit_code_of(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Starts the child in its own process group with its output on pipes that `supervise` copies
/// into `log`. `mask`: bytes replaced by `***` in everything stored. `threads`: where a waiter
/// thread comes from when the kernel gives no pidfd.
pub fn spawn(
    launch: &Launch,
    log: Arc<RunLog>,
    mask: Option<&str>,
    threads: &Workers,
) -> Result<Supervised, SpawnError> {
    let (wake, waker) = sys::nonblocking_pipe()?;
    let waker = Arc::new(waker);
    // The helper (this binary again), when used, resets signal dispositions and the
    // descriptor limit, then execs the interpreter: see `sys::exec_script_interpreter`.
    let soft = launch
        .nofile_soft
        .map_or_else(|| "-".to_string(), |s| s.to_string());
    let cgroup = match &launch.cgroup {
        Some(path) => {
            Some(RunCgroup::create(path, launch.cgroup_made).map_err(SpawnError::Cgroup)?)
        }
        None => None,
    };
    // Where the kernel can, the script starts without the helper, straight inside its cgroup
    // (no migration): see `spawn::start_direct`. The helper stays for RUN_AS_USER.
    let forked = match launch.run_as {
        None => crate::spawn::start_direct(launch, cgroup.as_ref().map(RunCgroup::path))?,
        Some(_) => None,
    };
    let (mut child, pidfd, stdout, stderr) = match forked {
        Some(started) => (
            started.proc,
            Some(started.pidfd),
            Some(Box::new(started.stdout) as Box<dyn ReadFd>),
            Some(Box::new(started.stderr) as Box<dyn ReadFd>),
        ),
        None => {
            let mut child = helper_command(launch, soft, cgroup.as_ref()).spawn()?;
            let stdout = child.stdout.take().map(|p| Box::new(p) as Box<dyn ReadFd>);
            let stderr = child.stderr.take().map(|p| Box::new(p) as Box<dyn ReadFd>);
            // Not reaped yet, so the pid is still this child's.
            let pidfd = sys::pidfd_open(child.id()).ok();
            (Proc::Helper(child), pidfd, stdout, stderr)
        }
    };
    let pid = child.id();
    let (exit_tx, exit_rx) = crossbeam_channel::bounded::<io::Result<ExitStatus>>(1);
    let (request_tx, request_rx) = crossbeam_channel::unbounded::<StopRequest>();
    let panicked = Arc::new(Mutex::new(None));
    if pidfd.is_none() {
        let started = start_waiter(threads, pid, exit_tx, waker.clone(), panicked.clone());
        if let Err(e) = started {
            let _ = sys::kill_group(pid);
            let _ = child.wait();
            return Err(SpawnError::Exhausted(e));
        }
    }
    let pipes = [(stdout, Stream::Stdout), (stderr, Stream::Stderr)]
        .into_iter()
        .filter_map(|(pipe, stream)| pipe.map(|p| ScriptPipe::new(p, stream, mask)))
        .collect();
    Ok(Supervised {
        child,
        pid,
        pipes,
        pidfd,
        exit: exit_rx,
        requests: request_rx,
        request_sender: request_tx,
        wake,
        waker,
        log,
        cgroup,
        panicked,
        reaped: false,
    })
}

/// Where there is no pidfd: a thread of `threads` learns of `pid`'s exit (without reaping it),
/// sends it on `exit` and wakes the supervisor.
fn start_waiter(
    threads: &Workers,
    pid: u32,
    exit: Sender<io::Result<ExitStatus>>,
    waker: Arc<PipeWriter>,
    panicked: Arc<Mutex<Option<String>>>,
) -> io::Result<()> {
    threads.run(move || {
        let waited = catch_unwind(|| {
            fault::test_point("waiter");
            sys::wait_exit_keep_zombie(pid)
        });
        let result = waited.unwrap_or_else(|payload| {
            note_panic(&panicked, fault::message(payload.as_ref()));
            Err(io::Error::other("the waiter thread panicked"))
        });
        let _ = exit.send(result);
        wake_up(&waker);
    })
}

/// The helper's command (see `child_helper_main`): resets the signal dispositions and the
/// descriptor limit, enters the cgroup, becomes the script user, then execs the interpreter.
fn helper_command(launch: &Launch, soft: String, cgroup: Option<&RunCgroup>) -> Command {
    let mut command = Command::new(SELF_EXE);
    command
        .arg(CHILD_HELPER_ARG)
        .arg(soft)
        .arg(
            launch
                .nice
                .map_or_else(|| "-".to_string(), |n| n.to_string()),
        )
        .arg(
            cgroup
                .as_ref()
                .map_or_else(|| OsString::from(NO_CGROUP), |c| c.path().into()),
        )
        .arg(
            launch
                .run_as
                .map_or_else(|| "-".to_string(), |(u, g)| format!("{u}:{g}")),
        )
        .arg(&launch.program)
        .args(&launch.args)
        .current_dir(&launch.cwd)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    command
}

/// A pipe end we can both read and poll.
pub trait ReadFd: Read + AsRawFd + AsFd + Send {}
impl<T: Read + AsRawFd + AsFd + Send> ReadFd for T {}

/// One of the child's pipes as the supervisor reads it.
struct ScriptPipe {
    reader: Box<dyn ReadFd>,
    stream: Stream,
    chunker: Chunker,
    /// When bytes last came: held-back bytes are let go after `HOLD_BACK_RELEASE` of silence.
    last_read: Instant,
    ended: bool,
    /// The last reads were large: read up to `BULK_READ` into a fresh vector.
    bulk: bool,
    /// This pipe counts in `GROWN_PIPES`.
    grown: bool,
}

impl Drop for ScriptPipe {
    fn drop(&mut self) {
        if self.grown {
            GROWN_PIPES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl ScriptPipe {
    fn new(reader: Box<dyn ReadFd>, stream: Stream, mask: Option<&str>) -> ScriptPipe {
        ScriptPipe {
            reader,
            stream,
            chunker: Chunker::new(mask.map(str::as_bytes)),
            last_read: Instant::now(),
            ended: false,
            bulk: false,
            grown: false,
        }
    }

    /// When its held-back bytes are due, if it holds any that a timer lets go.
    fn release_at(&self) -> Option<Instant> {
        (!self.ended && self.chunker.has_timed_release())
            .then(|| self.last_read + HOLD_BACK_RELEASE)
    }

    /// One read into the log. False: the pipe has ended (EOF or a read error).
    fn read_once(&mut self, buf: &mut [u8], log: &RunLog) -> bool {
        let read = if self.bulk {
            let mut data = Vec::new();
            sys::read_appending(&self.reader.as_fd(), &mut data, BULK_READ).map(|n| (n, Some(data)))
        } else {
            self.reader.read(buf).map(|n| (n, None))
        };
        match read {
            Ok((0, _)) => false,
            Ok((n, data)) => {
                fault::test_point("reader");
                self.last_read = Instant::now();
                let chunk = match data {
                    Some(mut data) => {
                        // The log's window counts bytes, not capacity: a chunk keeps at most
                        // twice what it holds (shrinking in place, no copy, as a rule).
                        if n < BULK_READ / 2 {
                            data.shrink_to_fit();
                        }
                        if n < BULK_LEAVE {
                            self.bulk = false;
                        }
                        self.chunker.push_owned(data)
                    }
                    None => {
                        if n == buf.len() {
                            self.enter_bulk();
                        }
                        self.chunker.push(&buf[..n])
                    }
                };
                log.append_owned(self.stream, chunk);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                log::warn!("reading {} failed: {e}", self.stream.name());
                false
            }
        }
    }

    /// Output comes faster than small reads take it: read larger pieces, and let the pipe
    /// hold more (once, while few pipes are grown) so the script is not held up meanwhile.
    fn enter_bulk(&mut self) {
        self.bulk = true;
        if self.grown {
            return;
        }
        let grown = GROWN_PIPES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if grown < MAX_GROWN_PIPES
            && sys::set_pipe_capacity(&self.reader.as_fd(), BULK_PIPE_CAPACITY).is_ok()
        {
            self.grown = true;
        } else {
            GROWN_PIPES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Stores what the chunker still holds; the pipe is not read any more.
    fn end(&mut self, log: &RunLog) {
        if !self.ended {
            self.ended = true;
            log.append_owned(self.stream, self.chunker.finish());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::TempDir;

    const LIMITS: Limits = Limits {
        timeout: Duration::from_secs(30),
        kill_grace: Duration::from_secs(2),
        orphan_grace: Duration::from_millis(200),
    };

    /// A new run log in `dir`.
    fn new_log(dir: &TempDir) -> RunLog {
        let log_path = dir.path().join("run.log");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&log_path)
            .unwrap();
        RunLog::in_new_file(&log_path, file, 4096, u64::MAX)
    }

    fn start(dir: &TempDir, script: &str, threads: &Workers) -> (Supervised, Arc<RunLog>) {
        let log = Arc::new(new_log(dir));
        let launch = Launch {
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), script.into()],
            cwd: dir.path().to_path_buf(),
            env: Vec::new(),
            nofile_soft: None,
            nice: None,
            cgroup: None,
            cgroup_made: false,
            run_as: None,
        };
        (spawn(&launch, log.clone(), None, threads).unwrap(), log)
    }

    #[test]
    fn one_thread_takes_both_pipes_and_the_exit() {
        let dir = TempDir::new("supervisor");
        let threads = Workers::new("test", 4);
        let (child, log) = start(&dir, "echo out; echo error >&2; exit 3", &threads);
        let (outcome, cancelled, _) = child.supervise(LIMITS);
        assert_eq!(outcome.return_code, 3);
        assert!(!cancelled);
        let totals = log.totals();
        assert_eq!((totals.stdout_bytes, totals.stderr_bytes), (4, 6));
    }

    #[test]
    fn without_a_pidfd_the_waiter_tells_the_exit() {
        let dir = TempDir::new("supervisor");
        let threads = Workers::new("test", 4);
        let (mut child, log) = start(&dir, "sleep 0.1; echo late; exit 5", &threads);
        // As on a kernel without pidfds: the waiter thread learns of the exit instead.
        child.pidfd = None;
        let (exit_tx, exit_rx) = crossbeam_channel::bounded(1);
        child.exit = exit_rx;
        start_waiter(
            &threads,
            child.pid,
            exit_tx,
            child.waker.clone(),
            child.panicked.clone(),
        )
        .unwrap();
        let (outcome, _, _) = child.supervise(LIMITS);
        assert_eq!(outcome.return_code, 5);
        assert_eq!(log.totals().stdout_bytes, 5);
    }

    #[test]
    fn a_cancel_wakes_the_run_thread_and_ends_the_group() {
        let dir = TempDir::new("supervisor");
        let threads = Workers::new("test", 4);
        let (child, _log) = start(&dir, "echo started; sleep 30", &threads);
        let stop = child.stop_sender();
        let asked = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            stop.send(StopRequest::Cancel)
        });
        let began = Instant::now();
        let (outcome, cancelled, _) = child.supervise(LIMITS);
        assert!(asked.join().unwrap(), "the supervisor took the request");
        assert!(cancelled);
        assert_eq!(outcome.error.as_deref(), Some("the run was cancelled"));
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );
    }

    #[test]
    fn a_stop_sender_of_an_ended_run_says_so() {
        let dir = TempDir::new("supervisor");
        let threads = Workers::new("test", 4);
        let (child, _log) = start(&dir, "true", &threads);
        let stop = child.stop_sender();
        let _ = child.supervise(LIMITS);
        assert!(!stop.send(StopRequest::Cancel));
    }

    #[test]
    fn bulk_output_is_read_in_larger_chunks_and_small_writes_end_it() {
        let dir = TempDir::new("supervisor");
        let log = new_log(&dir);
        let (reader, mut writer) = io::pipe().unwrap();
        // Room for all of it, so the writes below do not wait for the reads.
        sys::set_pipe_capacity(&writer, BULK_PIPE_CAPACITY).unwrap();
        let bulk: Vec<u8> = (0..400 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
        std::io::Write::write_all(&mut writer, &bulk).unwrap();
        let mut pipe = ScriptPipe::new(Box::new(reader), Stream::Stdout, None);
        let mut buf = vec![0u8; READ_BUFFER];
        // A full small read: the pipe goes to bulk mode.
        assert!(pipe.read_once(&mut buf, &log));
        assert!(pipe.bulk);
        // Bulk reads take up to BULK_READ at once; one above BULK_LEAVE keeps the mode.
        assert!(pipe.read_once(&mut buf, &log));
        assert!(pipe.read_once(&mut buf, &log));
        assert!(pipe.bulk);
        // A small write read in bulk mode ends it.
        std::io::Write::write_all(&mut writer, b"tail\n").unwrap();
        assert!(pipe.read_once(&mut buf, &log));
        assert!(!pipe.bulk);
        drop(writer);
        assert!(!pipe.read_once(&mut buf, &log));
        pipe.end(&log);
        let mut sizes = Vec::new();
        let mut stored = Vec::new();
        log.for_each_stored(Some(Stream::Stdout), |chunk| {
            sizes.push(chunk.data.len());
            stored.extend_from_slice(&chunk.data);
            Ok(true)
        })
        .unwrap();
        assert_eq!(
            sizes,
            [
                READ_BUFFER,
                BULK_READ,
                bulk.len() - READ_BUFFER - BULK_READ,
                5
            ]
        );
        assert_eq!(&stored[..bulk.len()], &bulk[..]);
        assert_eq!(&stored[bulk.len()..], b"tail\n");
    }
}
