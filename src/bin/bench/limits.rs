//! The benchmark's own descriptor limit: it holds up to ~1000 sockets at once, more than the
//! usual soft `RLIMIT_NOFILE` of 1024. Without `unsafe` (which lives only in the server's
//! `sys.rs`), it raises the soft limit to the hard one by re-executing itself through
//! `/bin/sh -c 'ulimit -n …; exec …'` once, marked by an environment variable.
#![forbid(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Set in the re-executed process so that it does not try again.
const RAISED_MARKER: &str = "RUNBOOKD_BENCH_NOFILE_RAISED";

/// (soft, hard) "Max open files" of this process, as written in `/proc/self/limits`
/// (a number or "unlimited").
pub fn nofile() -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line.trim_start_matches("Max open files").split_whitespace();
    Some((fields.next()?.to_string(), fields.next()?.to_string()))
}

/// If the soft limit is below the hard one, replaces this process with itself run under a
/// shell that first raises it. Returns only when that is not needed or not possible.
pub fn raise_nofile_by_reexec() {
    if std::env::var_os(RAISED_MARKER).is_some() {
        return;
    }
    let Some((soft, hard)) = nofile() else { return };
    if soft == hard {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let error = Command::new("/bin/sh")
        .arg("-c")
        .arg("ulimit -n \"$(ulimit -H -n)\" 2>/dev/null; exec \"$0\" \"$@\"")
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(RAISED_MARKER, "1")
        .exec();
    eprintln!("runbookd-bench: cannot raise the descriptor limit ({error}); going on with {soft}");
}
