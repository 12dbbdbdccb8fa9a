//! The system calls std does not offer (process-group signals, waiting without reaping,
//! descriptor limits, socket options, poll, dumpability, signal masks, user lookup, renaming
//! without replacing, and the switch to the script user), as thin, checked wrappers. Most go through `nix` and `socket2`;
//! the few they do not cover (resetting a signal disposition, `poll` on raw descriptors, the
//! ambient capability set, `capset`) are the only `unsafe` in runbookd, each with its SAFETY
//! comment. Every function returns `io::Result` built from `errno`; callers never see raw
//! return codes.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid, User};
use socket2::SockRef;

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
    // pgid > 1, so it never targets init or every process.
    if pgid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let signal = Signal::try_from(signal)?;
    match nix::sys::signal::killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sends SIGKILL to one process. A process that is already gone is not an error.
pub fn kill_process(pid: u32) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // pid > 1, so it never targets a group, every process or init.
    if pid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    match nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
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
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        match waitid(
            Id::Pid(Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::Exited(code)),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return Ok(ExitStatus::Signaled(signal as i32))
            }
            Err(Errno::EINTR) => continue,
            // Only exits are waited for (WEXITED), so nothing else is reported.
            Ok(other) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected wait status {other:?}"),
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Current soft and hard `RLIMIT_NOFILE`.
pub fn nofile_limits() -> io::Result<(u64, u64)> {
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?)
}

/// The hard `RLIMIT_NOFILE`, read once: runbookd never changes it.
fn nofile_hard_limit() -> io::Result<u64> {
    static HARD: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(hard) = HARD.get() {
        return Ok(*hard);
    }
    let hard = nofile_limits()?.1;
    Ok(*HARD.get_or_init(|| hard))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the original soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = nofile_limits()?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(soft)
}

/// Signals the server handles or ignores that a script gets back at their defaults (both in the
/// helper, `exec_script_interpreter`, and in `child_main`, which resets SIGPIPE as well).
const SCRIPT_DEFAULT_SIGNALS: [libc::c_int; 5] = [
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGXFSZ,
];

/// Runs in the short-lived helper process that stands between the server and a script (see
/// `supervisor::CHILD_HELPER_ARG`): gives the termination signals their default disposition (a
/// server started from a non-interactive shell inherits SIGINT/SIGQUIT ignored), restores the
/// original soft `RLIMIT_NOFILE`, takes the scripts' niceness, becomes the script user when
/// `run_as` is given (see
/// `become_user`), then replaces itself with the script's interpreter. Doing this
/// in a helper keeps the server's own spawn on `posix_spawn` instead of forking a process with
/// thousands of threads. Returns only on failure.
pub fn exec_script_interpreter(
    nofile_soft: Option<u64>,
    nice: Option<i32>,
    run_as: Option<(u32, u32)>,
    program: &std::ffi::OsStr,
    args: &[std::ffi::OsString],
) -> io::Error {
    // The server blocks SIGTERM/SIGINT for its signal thread; the script must not inherit that.
    if let Err(e) = SigSet::empty().thread_set_mask() {
        return e.into();
    }
    // SIGXFSZ is ignored by the server (see `ignore_file_size_signal`); scripts get the default.
    for signal in SCRIPT_DEFAULT_SIGNALS {
        // SAFETY: resetting a disposition to SIG_DFL has no memory-safety preconditions.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
        }
    }
    if let Some(soft) = nofile_soft {
        if let Ok((_, hard)) = nofile_limits() {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard) {
                return e.into();
            }
        }
    }
    if let Some(nice) = nice {
        if let Err(e) = set_own_nice(nice) {
            return e;
        }
    }
    if let Some((uid, gid)) = run_as {
        if let Err(e) = become_user(uid, gid) {
            return e;
        }
    }
    Command::new(program).args(args).exec()
}

/// This process's niceness (-20 to 19).
pub fn own_nice() -> io::Result<i32> {
    // SAFETY: errno is this thread's; getpriority only reads the process's priority. -1 is a
    // valid niceness, so errno tells an error apart.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(nice)
    }
}

/// Sets the calling thread's niceness (on Linux niceness is per thread; raising it needs no
/// privilege). In a process of one thread, the process's.
pub fn set_own_nice(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority on this process has no memory-safety preconditions.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes this process non-dumpable: no core file, and processes of the same user can neither
/// ptrace it nor read its `/proc/<pid>/environ`, `mem` or `fd` (the kernel then treats it like a
/// process of another user). Children get the flag back at `execve`, so this covers only us.
pub fn make_non_dumpable() -> io::Result<()> {
    Ok(nix::sys::prctl::set_dumpable(false)?)
}

/// Renames `from` to `to` unless `to` exists (`renameat2` with `RENAME_NOREPLACE`): then
/// `AlreadyExists`, and nothing changed.
pub fn rename_no_replace(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    Ok(renameat2(
        AT_FDCWD,
        from,
        AT_FDCWD,
        to,
        RenameFlags::RENAME_NOREPLACE,
    )?)
}

/// The effective user id.
pub fn effective_uid() -> u32 {
    Uid::effective().as_raw()
}

/// A user's id and primary group id from the user database (`getpwnam_r`); None: no such user.
pub fn lookup_user(name: &str) -> io::Result<Option<(u32, u32)>> {
    if name.contains('\0') {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    Ok(User::from_name(name)?.map(|user| (user.uid.as_raw(), user.gid.as_raw())))
}

/// Turns this (single-threaded, about to exec) process into `uid`:`gid` for good: no
/// supplementary groups, real, effective and saved ids all set, and every capability dropped
/// (ambient, inheritable, permitted, effective), so that nothing the program it execs runs can
/// get back to the server's user.
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    let (user, group) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setgroups(&[])?;
    nix::unistd::setresgid(group, group, group)?;
    nix::unistd::setresuid(user, user, user)?;
    // nix has no call for the ambient capability set.
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes plain integers.
    let cleared = check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    });
    // Kernels before 4.3 have no ambient set: nothing to clear there.
    if let Err(e) = cleared {
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    // Nor for capset(2).
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: `header` and `data` are the layout capset(2) expects for version 3 (one header,
    // two data structs) and live for the duration of the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    let now = (
        Uid::current(),
        Uid::effective(),
        Gid::current(),
        Gid::effective(),
    );
    if now != (user, user, group, group) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the user change did not take effect",
        ));
    }
    Ok(())
}

/// Re-issues `listen` with a longer accept queue than std's default, so a burst of clients is
/// queued instead of dropped and retried seconds later.
pub fn set_listen_backlog(socket: &impl AsFd, backlog: i32) -> io::Result<()> {
    SockRef::from(socket).listen(backlog)
}

/// Sets `SO_SNDTIMEO` and `TCP_USER_TIMEOUT` on a socket. Set on a listening socket, Linux
/// copies both to every accepted connection, so a write blocked that long fails.
pub fn set_send_stall_timeout(socket: &impl AsFd, stall: Duration) -> io::Result<()> {
    let socket = SockRef::from(socket);
    socket.set_write_timeout(Some(stall))?;
    socket.set_tcp_user_timeout(Some(stall))
}

/// Sets `SO_RCVTIMEO` on a socket. Set on a listening socket, Linux copies it to every accepted
/// connection, so a read that waits that long for a byte fails (`WouldBlock`).
pub fn set_receive_timeout(socket: &impl AsFd, timeout: Duration) -> io::Result<()> {
    SockRef::from(socket).set_read_timeout(Some(timeout))
}

/// Shuts a socket down both ways. On a listening socket, Linux makes a blocked `accept` (and
/// every later one) fail, which is how the accept loop learns of shutdown.
pub fn shut_down_socket(socket: &impl AsFd) -> io::Result<()> {
    SockRef::from(socket).shutdown(std::net::Shutdown::Both)
}

/// Makes writes to `fd` fail with `WouldBlock` instead of waiting.
pub fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Makes an empty file at `path` in two steps: an unnamed file in its directory (`O_TMPFILE`),
/// then a name for it (`linkat` through `/proc/self/fd`). The costly part of making a file on
/// some file systems, finding a free inode, then happens without the directory's lock, which
/// `open(O_CREAT)` holds throughout (and every rename into that directory waits for). An
/// existing `path` is an error (`AlreadyExists`); where either step is not available (no
/// `O_TMPFILE` on the file system, no `/proc`), the error says so and the caller makes the file
/// the usual way.
pub fn create_unlocked(path: &std::path::Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .mode(mode)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)?;
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        proc_path.as_str(),
        nix::fcntl::AT_FDCWD,
        path,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )?;
    Ok(())
}

/// A pipe whose both ends are non-blocking (and close on exec), made in one system call.
pub fn nonblocking_pipe() -> io::Result<(std::io::PipeReader, std::io::PipeWriter)> {
    use nix::fcntl::OFlag;
    let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    Ok((read.into(), write.into()))
}

/// Asks the kernel to let the pipe behind `fd` hold `bytes`; returns the capacity it got.
pub fn set_pipe_capacity(fd: &impl AsFd, bytes: usize) -> io::Result<usize> {
    use nix::fcntl::{fcntl, FcntlArg};
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let got = fcntl(fd, FcntlArg::F_SETPIPE_SZ(bytes))?;
    Ok(usize::try_from(got).unwrap_or_default())
}

/// One `read` of at most `max` bytes from `fd`, appended to `buf` without zeroing its spare
/// capacity first (bulk output is copied once, from the pipe into the vector that becomes the
/// log's chunk). Returns how many bytes came; 0 is the end of the file.
pub fn read_appending(fd: &impl AsFd, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let len = max.min(spare.len());
    // SAFETY: the kernel writes at most `len` bytes into `spare`, memory the vector owns and
    // nothing else refers to; it returns how many it wrote, and only those become `buf`'s.
    let got = unsafe { libc::read(fd.as_fd().as_raw_fd(), spare.as_mut_ptr().cast(), len) };
    let Ok(got) = usize::try_from(got) else {
        return Err(io::Error::last_os_error());
    };
    // SAFETY: `got <= len` bytes after the old length were just written by the kernel.
    unsafe { buf.set_len(buf.len() + got.min(len)) };
    Ok(got)
}

/// Most descriptors [`poll_readable`] watches at once.
pub const POLL_MAX: usize = 8;

/// Waits until one of `fds` (at most [`POLL_MAX`]; negative ones are ignored) is readable, hung
/// up or in error, or `timeout` (None = forever) passes. Returns the ready ones as bits (bit `i`
/// for `fds[i]`), 0 when the timeout passed.
pub fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<u32> {
    if fds.len() > POLL_MAX {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut pollfds = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; POLL_MAX];
    for (slot, &fd) in pollfds.iter_mut().zip(fds) {
        slot.fd = fd;
    }
    let timeout_ms = match timeout {
        None => -1,
        Some(t) => libc::c_int::try_from(t.as_millis().max(u128::from(!t.is_zero())))
            .unwrap_or(libc::c_int::MAX),
    };
    let nfds = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: `pollfds` holds at least `nfds` valid pollfd structs.
        let ret = unsafe { libc::poll(pollfds.as_mut_ptr(), nfds, timeout_ms) };
        match check(ret) {
            Ok(_) => {
                let ready = pollfds[..fds.len()]
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.revents != 0)
                    .fold(0u32, |bits, (i, _)| bits | (1 << i));
                return Ok(ready);
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

fn termination_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
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
/// that `wait_termination_signal` receives them. (Children inherit the mask: std's spawn does
/// not empty it, the script helper does, see `exec_script_interpreter`.)
pub fn block_termination_signals() -> io::Result<()> {
    Ok(termination_set().thread_block()?)
}

/// Waits for SIGTERM or SIGINT (blocked beforehand) and returns its number.
pub fn wait_termination_signal() -> io::Result<i32> {
    Ok(termination_set().wait()? as i32)
}

fn interrupt_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set
}

/// Blocks SIGINT in the calling thread and every thread it starts afterwards, so that the
/// terminal client's Ctrl-C watcher receives it through `wait_interrupt_signal`.
pub fn block_interrupt_signal() -> io::Result<()> {
    Ok(interrupt_set().thread_block()?)
}

/// Waits for SIGINT (blocked beforehand with `block_interrupt_signal`).
pub fn wait_interrupt_signal() -> io::Result<()> {
    interrupt_set().wait()?;
    Ok(())
}

/// What [`spawn_in_cgroup`] starts, all of it prepared before the fork: the child between
/// fork and exec only makes system calls (no allocation, no lock).
pub struct CgroupSpawn<'a> {
    /// Path of the program (with a '/': no PATH search).
    pub program: &'a std::ffi::CStr,
    /// Arguments, argv[0] first, ending with a null pointer.
    pub argv: &'a [*const libc::c_char],
    /// `NAME=value` entries, ending with a null pointer.
    pub envp: &'a [*const libc::c_char],
    pub cwd: &'a std::ffi::CStr,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// An open descriptor of the cgroup v2 directory the child starts in (None: runbookd's).
    pub cgroup: Option<RawFd>,
    /// Soft `RLIMIT_NOFILE` the child gets back, if the server raised its own.
    pub nofile_soft: Option<u64>,
    /// Niceness the child takes (None: the server's).
    pub nice: Option<i32>,
}

/// The kernel's `struct clone_args` (version 2, with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Starts a program in its own process group, directly inside a cgroup v2 when one is given
/// (`clone3` with `CLONE_INTO_CGROUP`): the child never runs outside the run's cgroup and is
/// never moved, so
/// nothing takes the kernel's cgroup-migration lock (writing a pid to `cgroup.procs` waits for
/// an RCU grace period, milliseconds per run, serialised across the machine). Like
/// `posix_spawn` it is a vfork (`CLONE_VM | CLONE_VFORK`, the child on a stack of its own), so
/// its cost does not grow with the server's threads and memory. In the child: SIGINT,
/// SIGQUIT, SIGTERM, SIGHUP, SIGXFSZ and SIGPIPE to their defaults, its own process group, the
/// soft descriptor limit given back, the working directory, stdin/stdout/stderr, an empty
/// signal mask, then `execve`. Returns the child's pid once it has exec'd, or the error of the
/// step that failed (that child has exited and is reaped here). ENOSYS, EINVAL, EOPNOTSUPP or
/// E2BIG: this kernel or architecture cannot, the caller falls back to the helper.
pub fn spawn_in_cgroup(spec: &CgroupSpawn<'_>) -> io::Result<(u32, OwnedFd)> {
    let hard = nofile_hard_limit()?;
    // SAFETY: sigset_t is plain data; sigemptyset/sigfillset initialise it.
    let (empty, full) = unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        let mut full: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigfillset(&mut full);
        (empty, full)
    };
    let failure = std::sync::atomic::AtomicI32::new(0);
    let context = ChildContext {
        spec,
        hard,
        empty,
        failure: &failure,
    };
    let stack = ChildStack::take()?;
    let into_cgroup = if spec.cgroup.is_some() {
        CLONE_INTO_CGROUP
    } else {
        0
    };
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: libc::CLONE_VM as u64
            | libc::CLONE_VFORK as u64
            | libc::CLONE_PIDFD as u64
            | into_cgroup,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.base as u64,
        stack_size: CHILD_STACK_BYTES as u64,
        cgroup: spec.cgroup.map_or(0, |fd| fd as u64),
        ..CloneArgs::default()
    };
    // No handler may run in the child before its exec: every signal is blocked around the
    // clone (the child inherits that mask and empties it just before `execve`).
    let mut old: libc::sigset_t = empty;
    // SAFETY: `full` and `old` are valid sigsets.
    let masked = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &full, &mut old) };
    if masked != 0 {
        return Err(io::Error::from_raw_os_error(masked));
    }
    // SAFETY: see `clone3_vfork`; `args` describes a stack that lives until after the child
    // exec'd or exited (this thread is suspended until then), and `context` lives on this
    // thread's stack, which the suspended thread does not touch meanwhile.
    let ret = unsafe { clone3_vfork(&mut args, &context) };
    // SAFETY: `old` is the mask read above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    // The child has exec'd or exited: its stack is free again.
    stack.give_back();
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    let pid = ret as libc::pid_t;
    // SAFETY: with CLONE_PIDFD a successful clone3 stored a new descriptor, ours alone.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let code = failure.load(std::sync::atomic::Ordering::SeqCst);
    if code != 0 {
        // The child failed before its exec and exited: reap it, report why.
        let _ = reap(pid as u32);
        return Err(io::Error::from_raw_os_error(code));
    }
    Ok((pid as u32, pidfd))
}

/// A descriptor of process `pid` (`pidfd_open`, Linux 5.3), readable once it has exited. The
/// caller must not have reaped it (the pid could name another process by then).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("bad descriptor"))?;
    // SAFETY: a successful pidfd_open returned a new descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the child of [`spawn_in_cgroup`] reads (in the parent's memory, shared until exec).
struct ChildContext<'a, 'b> {
    spec: &'a CgroupSpawn<'b>,
    hard: u64,
    empty: libc::sigset_t,
    /// The errno of the step that failed, written by the child before it exits.
    failure: &'a std::sync::atomic::AtomicI32,
}

/// Stack size of the child between clone and exec (it runs a few system-call wrappers).
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// The child's stack, unmapped when dropped.
struct ChildStack {
    base: *mut libc::c_void,
}

impl ChildStack {
    fn new() -> io::Result<ChildStack> {
        // SAFETY: an anonymous private mapping; no memory of ours is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHILD_STACK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ChildStack { base })
    }

    /// A stack a previous spawn gave back, or a new one.
    fn take() -> io::Result<ChildStack> {
        let kept = SPARE_STACKS.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match kept {
            Some(base) => Ok(ChildStack {
                base: base as *mut libc::c_void,
            }),
            None => ChildStack::new(),
        }
    }

    /// Keeps the stack for the next spawn (unmapping one interrupts every other processor
    /// running one of the server's threads), or unmaps it when enough are kept.
    fn give_back(self) {
        let mut kept = SPARE_STACKS.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < SPARE_STACKS_MAX {
            kept.push(self.base as usize);
            std::mem::forget(self);
        }
    }
}

/// Child stacks kept for the next spawns (their addresses): as many as spawns that ran at once.
static SPARE_STACKS: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());
/// Most child stacks kept.
const SPARE_STACKS_MAX: usize = 8;

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: `base` is the mapping made in `new`, of that size, no longer used.
        unsafe { libc::munmap(self.base, CHILD_STACK_BYTES) };
    }
}

/// `clone3(args)` whose child calls `child_main(context)` on the stack in `args` and never
/// returns; the parent gets the child's pid or -errno.
///
/// # Safety
/// `args` must have `CLONE_VM | CLONE_VFORK` and a valid stack, and `context` must stay valid
/// until the call returns (the calling thread is suspended until the child execs or exits).
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_vfork(args: &mut CloneArgs, context: &ChildContext<'_, '_>) -> i64 {
    let ret: i64;
    // The child starts after `syscall` with rax = 0 and rsp at the top of its own stack
    // (16-byte aligned), so it calls `child_main` right there and never comes back; the
    // parent jumps over that. r12 and r13 survive the system call in both.
    std::arch::asm!(
        "syscall",
        "test rax, rax",
        "jnz 2f",
        "mov rdi, r13",
        "call r12",
        "ud2",
        "2:",
        inlateout("rax") libc::SYS_clone3 => ret,
        in("rdi") args as *mut CloneArgs,
        in("rsi") std::mem::size_of::<CloneArgs>(),
        in("r12") child_main as *const () as usize,
        in("r13") context as *const ChildContext<'_, '_>,
        lateout("rcx") _,
        lateout("r11") _,
    );
    ret
}

/// Elsewhere the helper is used.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3_vfork(_: &mut CloneArgs, _: &ChildContext<'_, '_>) -> i64 {
    -i64::from(libc::ENOSYS)
}

/// The child of [`spawn_in_cgroup`]: sets itself up and execs, or records the errno of the
/// failed step and exits with 127.
///
/// # Safety
/// Only as the child of `clone3_vfork`: it shares the parent's memory (which it only reads,
/// but for the failure slot) while the parent waits; it allocates nothing and takes no lock.
unsafe extern "C" fn child_main(context: *const ChildContext<'_, '_>) -> ! {
    let context = &*context;
    let spec = context.spec;
    let fail = || -> ! {
        let code = *libc::__errno_location();
        context.failure.store(
            if code == 0 { libc::EINVAL } else { code },
            std::sync::atomic::Ordering::SeqCst,
        );
        libc::_exit(127)
    };
    for signal in SCRIPT_DEFAULT_SIGNALS {
        libc::signal(signal, libc::SIG_DFL);
    }
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    if libc::setpgid(0, 0) != 0 {
        fail();
    }
    if let Some(nice) = spec.nice {
        // Raising one's own niceness is always allowed; should it fail, the script runs at
        // the server's priority rather than not at all.
        libc::setpriority(libc::PRIO_PROCESS, 0, nice);
    }
    if let Some(soft) = spec.nofile_soft {
        let lim = libc::rlimit {
            rlim_cur: soft.min(context.hard),
            rlim_max: context.hard,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            fail();
        }
    }
    if libc::chdir(spec.cwd.as_ptr()) != 0 {
        fail();
    }
    for (from, to) in [(spec.stdin, 0), (spec.stdout, 1), (spec.stderr, 2)] {
        if libc::dup2(from, to) < 0 {
            fail();
        }
    }
    if libc::sigprocmask(libc::SIG_SETMASK, &context.empty, std::ptr::null_mut()) != 0 {
        fail();
    }
    libc::execve(
        spec.program.as_ptr(),
        spec.argv.as_ptr(),
        spec.envp.as_ptr(),
    );
    fail()
}

/// Waits for the child `pid` to end and reaps it; its raw wait status.
pub fn reap(pid: u32) -> io::Result<libc::c_int> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is writable for the call.
        match check(unsafe { libc::waitpid(pid, &mut status, 0) }) {
            Ok(_) => return Ok(status),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_file_made_unlocked_is_empty_and_never_replaces_one() {
        let dir = crate::test_dirs::TempDir::new("sys-create-unlocked");
        let path = dir.path().join("made");
        create_unlocked(&path, 0o640).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.len(), 0);
        std::fs::write(&path, b"kept").unwrap();
        let again = create_unlocked(&path, 0o640).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"kept");
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 1, "nothing else is left in the directory");
    }

    #[test]
    fn read_appending_adds_what_came_after_what_was_there() {
        let (reader, mut writer) = io::pipe().unwrap();
        writer.write_all(b"hello").unwrap();
        let mut buf = b"> ".to_vec();
        assert_eq!(read_appending(&reader, &mut buf, 3).unwrap(), 3);
        assert_eq!(buf, b"> hel");
        assert_eq!(read_appending(&reader, &mut buf, 100).unwrap(), 2);
        assert_eq!(buf, b"> hello");
        drop(writer);
        assert_eq!(read_appending(&reader, &mut buf, 100).unwrap(), 0);
        assert_eq!(buf, b"> hello");
    }

    #[test]
    fn a_pipe_can_be_asked_to_hold_more() {
        let (reader, mut writer) = io::pipe().unwrap();
        let got = set_pipe_capacity(&reader, 256 * 1024).unwrap();
        assert!(got >= 256 * 1024, "capacity {got}");
        // A write of more than the default 64 KiB no longer waits for a reader.
        set_nonblocking(&writer).unwrap();
        writer.write_all(&[b'x'; 200 * 1024]).unwrap();
        drop(reader);
    }

    #[test]
    fn poll_tells_each_ready_descriptor_by_its_bit() {
        let (quiet, _quiet_writer) = io::pipe().unwrap();
        let (ready, mut ready_writer) = io::pipe().unwrap();
        let fds = [quiet.as_raw_fd(), -1, ready.as_raw_fd()];
        assert_eq!(poll_readable(&fds, Some(Duration::ZERO)).unwrap(), 0);
        ready_writer.write_all(b"x").unwrap();
        assert_eq!(poll_readable(&fds, None).unwrap(), 0b100);
        drop(_quiet_writer);
        assert_eq!(
            poll_readable(&fds, None).unwrap(),
            0b101,
            "a hang-up counts"
        );
        assert!(poll_readable(&[0; POLL_MAX + 1], None).is_err());
    }

    #[test]
    fn a_pidfd_becomes_readable_when_the_process_exits() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 0.1"])
            .spawn()
            .unwrap();
        let pidfd = pidfd_open(child.id()).unwrap();
        let fds = [pidfd.as_raw_fd()];
        assert_eq!(poll_readable(&fds, Some(Duration::ZERO)).unwrap(), 0);
        assert_eq!(poll_readable(&fds, None).unwrap(), 1);
        assert!(child.wait().unwrap().success());
    }
}
