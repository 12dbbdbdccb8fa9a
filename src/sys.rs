//! The only home of `unsafe`: thin, checked wrappers over the Linux calls std does not offer
//! (process-group signals, waiting without reaping, descriptor limits, socket options, poll).
//! Every function returns `io::Result` built from `errno`; callers never see raw return codes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

/// How a process ended, as read by `waitid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// Shell convention: the exit code, or 128 + the signal number.
    pub fn return_code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(signal) => 128 + signal,
        }
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Sends `signal` to every process of the group. A group that is already gone is not an error.
pub fn signal_group(pgid: u32, signal: libc::c_int) -> io::Result<()> {
    let pgid =
        libc::pid_t::try_from(pgid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if pgid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: killpg has no memory-safety preconditions; pgid > 1 so it never targets init or us.
    match check(unsafe { libc::killpg(pgid, signal) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Asks a group to stop: TERM, then CONT so that a stopped member still receives it.
pub fn terminate_group(pgid: u32) -> io::Result<()> {
    signal_group(pgid, libc::SIGTERM)?;
    signal_group(pgid, libc::SIGCONT)
}

/// Kills a group outright.
pub fn kill_group(pgid: u32) -> io::Result<()> {
    signal_group(pgid, libc::SIGKILL)
}

/// Blocks until process `pid` has exited, WITHOUT reaping it (`WNOWAIT`): the pid, and so the
/// process-group id, stays reserved until the caller reaps it with `Child::wait`.
pub fn wait_exit_keep_zombie(pid: u32) -> io::Result<ExitStatus> {
    let pid = libc::id_t::from(pid);
    loop {
        // SAFETY: siginfo_t is plain data; zeroed is a valid value and waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call.
        let ret =
            unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        match check(ret) {
            Ok(_) => {
                // SAFETY: after a successful waitid with WEXITED the child fields are set.
                let (code, status) = unsafe { (info.si_code, info.si_status()) };
                return Ok(if code == libc::CLD_EXITED {
                    ExitStatus::Exited(status)
                } else {
                    ExitStatus::Signaled(status)
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Current soft and hard `RLIMIT_NOFILE`.
pub fn nofile_limits() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the original soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = nofile_limits()?;
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: `lim` is a valid rlimit.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(soft)
}

/// Runs in the short-lived helper process that stands between the server and a script (see
/// `supervisor::CHILD_HELPER_ARG`): gives the termination signals their default disposition (a
/// server started from a non-interactive shell inherits SIGINT/SIGQUIT ignored), restores the
/// original soft `RLIMIT_NOFILE`, then replaces itself with the script's interpreter. Doing this
/// in a helper keeps the server's own spawn on `posix_spawn` instead of forking a process with
/// thousands of threads. Returns only on failure.
pub fn exec_script_interpreter(
    nofile_soft: Option<u64>,
    program: &std::ffi::OsStr,
    args: &[std::ffi::OsString],
) -> io::Error {
    // The server blocks SIGTERM/SIGINT for its signal thread; the script must not inherit that.
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before pthread_sigmask reads it.
    let ret = unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut())
    };
    if ret != 0 {
        return io::Error::from_raw_os_error(ret);
    }
    // SIGXFSZ is ignored by the server (see `ignore_file_size_signal`); scripts get the default.
    for signal in [
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGXFSZ,
    ] {
        // SAFETY: resetting a disposition to SIG_DFL has no memory-safety preconditions.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
        }
    }
    if let Some(soft) = nofile_soft {
        if let Ok((_, hard)) = nofile_limits() {
            let lim = libc::rlimit {
                rlim_cur: soft.min(hard),
                rlim_max: hard,
            };
            // SAFETY: `lim` is a valid rlimit.
            if let Err(e) = check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }) {
                return e;
            }
        }
    }
    Command::new(program).args(args).exec()
}

/// Re-issues `listen` with a longer accept queue than std's default, so a burst of clients is
/// queued instead of dropped and retried seconds later.
pub fn set_listen_backlog(socket: &impl AsRawFd, backlog: i32) -> io::Result<()> {
    // SAFETY: listen on a bound socket we own has no memory-safety preconditions.
    check(unsafe { libc::listen(socket.as_raw_fd(), backlog) }).map(|_| ())
}

fn set_socket_option<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `value` points to a live T of `len` bytes for the duration of the call.
    check(unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), len) })?;
    Ok(())
}

/// Sets `SO_SNDTIMEO` and `TCP_USER_TIMEOUT` on a socket. Set on a listening socket, Linux
/// copies both to every accepted connection, so a write blocked that long fails.
pub fn set_send_stall_timeout(socket: &impl AsRawFd, stall: Duration) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(stall.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(stall.subsec_micros()),
    };
    set_socket_option(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)?;
    let user_timeout_ms = libc::c_uint::try_from(stall.as_millis()).unwrap_or(libc::c_uint::MAX);
    set_socket_option(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        &user_timeout_ms,
    )
}

/// What `poll_readable` saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `fds[i]` is readable (or hung up / in error: a read will tell).
    Ready(usize),
    TimedOut,
}

/// Waits until one of `fds` is readable, or `timeout` (None = forever) passes. When several are
/// ready, the lowest index wins.
pub fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Readiness> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout_ms = match timeout {
        None => -1,
        Some(t) => libc::c_int::try_from(t.as_millis().max(u128::from(!t.is_zero())))
            .unwrap_or(libc::c_int::MAX),
    };
    loop {
        let nfds = libc::nfds_t::try_from(pollfds.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `pollfds` is a valid array of `nfds` pollfd structs.
        let ret = unsafe { libc::poll(pollfds.as_mut_ptr(), nfds, timeout_ms) };
        match check(ret) {
            Ok(0) => return Ok(Readiness::TimedOut),
            Ok(_) => {
                let ready = pollfds.iter().position(|p| p.revents != 0).unwrap_or(0);
                return Ok(Readiness::Ready(ready));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/PID/stat`), used to
/// make sure a pid still names the process we started before signalling it.
pub fn process_start_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc stat"))?;
    // Fields after the command start at field 3 (state); start time is field 22.
    after_comm
        .split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc stat"))
}

/// Processes of group `pgid` that started at or after `since_ticks` (so they belong to the run
/// recorded with that start time, not to an unrelated group that reused the id).
pub fn group_members_since(pgid: u32, since_ticks: u64) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut members = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(fields) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = fields.split_whitespace().collect();
        let group = fields.get(2).and_then(|f| f.parse::<u32>().ok());
        let start = fields.get(19).and_then(|f| f.parse::<u64>().ok());
        if group == Some(pgid) && start.is_some_and(|s| s >= since_ticks) {
            members.push(pid);
        }
    }
    members
}

fn termination_set() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        check(libc::sigemptyset(&mut set))?;
        check(libc::sigaddset(&mut set, libc::SIGTERM))?;
        check(libc::sigaddset(&mut set, libc::SIGINT))?;
    }
    Ok(set)
}

/// Ignores SIGXFSZ for the whole process, so a write past `RLIMIT_FSIZE` fails with EFBIG
/// (an error the run log reports) instead of killing the server. The script helper restores
/// the default for scripts.
pub fn ignore_file_size_signal() -> io::Result<()> {
    // SAFETY: setting a disposition to SIG_IGN has no memory-safety preconditions.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts afterwards, so
/// that `wait_termination_signal` receives them. (Children get an empty mask from std.)
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set()?;
    // SAFETY: `set` is a valid, initialised sigset_t.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT (blocked beforehand) and returns its number.
pub fn wait_termination_signal() -> io::Result<i32> {
    let set = termination_set()?;
    let mut signal: libc::c_int = 0;
    // SAFETY: `set` and `signal` are valid for the call.
    let ret = unsafe { libc::sigwait(&set, &mut signal) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(signal)
}
