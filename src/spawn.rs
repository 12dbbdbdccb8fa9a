//! How a run's script process starts without the re-executed helper: a vfork-style `clone3`
//! whose child does the helper's resets itself and execs the interpreter
//! (`sys::spawn_in_cgroup`), straight into the run's cgroup when it has one (`CLONE_INTO_CGROUP`)
//! instead of the helper moving itself in through `cgroup.procs`, which takes the kernel's
//! cgroup-migration lock and waits for an RCU grace period (the largest part of a short run's
//! cost). The helper stays for `RUN_AS_USER` and where the kernel cannot. The started process
//! is either kind: [`Proc`].
#![forbid(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, PipeReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ExitStatus};

use crate::supervisor::Launch;
use crate::sys;

/// A started script process.
pub enum Proc {
    /// Started through the helper by std's `Command`.
    Helper(Child),
    /// Forked into its cgroup; `status` once reaped.
    Forked {
        pid: u32,
        status: Option<ExitStatus>,
    },
}

impl Proc {
    pub fn id(&self) -> u32 {
        match self {
            Proc::Helper(child) => child.id(),
            Proc::Forked { pid, .. } => *pid,
        }
    }

    /// Waits for the process to end and reaps it (again: the same status).
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Proc::Helper(child) => child.wait(),
            Proc::Forked { pid, status } => {
                if let Some(status) = status {
                    return Ok(*status);
                }
                let reaped = ExitStatus::from_raw(sys::reap(*pid)?);
                *status = Some(reaped);
                Ok(reaped)
            }
        }
    }
}

/// Errors that mean the kernel cannot fork into a cgroup (before 5.7, or a cgroup it refuses):
/// the helper is used instead.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::E2BIG)
    )
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `/dev/null` for reading, opened once: every script's stdin.
fn dev_null() -> io::Result<&'static File> {
    static DEV_NULL: std::sync::OnceLock<File> = std::sync::OnceLock::new();
    if let Some(file) = DEV_NULL.get() {
        return Ok(file);
    }
    let file = File::open("/dev/null")?;
    Ok(DEV_NULL.get_or_init(|| file))
}

/// A script started by [`start_direct`].
pub struct Started {
    pub proc: Proc,
    /// Readable once the process has exited.
    pub pidfd: OwnedFd,
    pub stdout: PipeReader,
    pub stderr: PipeReader,
}

/// Starts the script of `launch` (in the cgroup at `cgroup`, if given), with stdout and
/// stderr on pipes. `Ok(None)`: this kernel cannot (or the program needs a PATH search), use
/// the helper.
pub fn start_direct(launch: &Launch, cgroup: Option<&Path>) -> io::Result<Option<Started>> {
    let program = launch.program.as_os_str();
    if !program.as_bytes().contains(&b'/') {
        return Ok(None);
    }
    let program_c = c_string(program.as_bytes())?;
    let mut args: Vec<CString> = vec![program_c.clone()];
    for arg in &launch.args {
        args.push(c_string(arg.as_bytes())?);
    }
    let env: Vec<CString> = launch
        .env
        .iter()
        .map(|(k, v)| c_string(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<_>>()?;
    let argv: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let cwd = c_string(OsStr::new(&launch.cwd).as_bytes())?;
    let (stdout_read, stdout_write) = io::pipe()?;
    let (stderr_read, stderr_write) = io::pipe()?;
    let stdin = dev_null()?;
    let dir = cgroup.map(File::open).transpose()?;
    let started = sys::spawn_in_cgroup(&sys::CgroupSpawn {
        program: &program_c,
        argv: &argv,
        envp: &envp,
        cwd: &cwd,
        stdin: stdin.as_raw_fd(),
        stdout: stdout_write.as_raw_fd(),
        stderr: stderr_write.as_raw_fd(),
        cgroup: dir.as_ref().map(File::as_raw_fd),
        nofile_soft: launch.nofile_soft,
        nice: launch.nice,
    });
    // The child has its own copies of the write ends: ours go, so the readers see EOF.
    drop((stdout_write, stderr_write, dir));
    match started {
        Ok((pid, pidfd)) => Ok(Some(Started {
            proc: Proc::Forked { pid, status: None },
            pidfd,
            stdout: stdout_read,
            stderr: stderr_read,
        })),
        Err(e) if unsupported(&e) => {
            log::debug!("cannot start the script directly ({e}); starting it through the helper");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
