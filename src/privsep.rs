//! Privilege separation between runbookd and its scripts (`RUN_AS_USER`): resolving the
//! script user, checking at start that runbookd may switch to it, keeping the state directory
//! private, handing a run's working directory to the script user and emptying it as that user.
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::sys;

/// First argument that makes this binary act as the work-directory cleaner.
pub const CLEAN_HELPER_ARG: &str = "--runbookd-internal-clean";
/// This program, even if its file was replaced since it started.
const SELF_EXE: &str = "/proc/self/exe";

/// The user and primary group every script runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// Why `RUN_AS_USER` cannot be honoured (runbookd then refuses to start, exit status 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunAsError {
    #[error("invalid RUN_AS_USER: no user {0:?} (give a user name or UID:GID)")]
    UnknownUser(String),
    #[error("invalid RUN_AS_USER: cannot look the user up: {0}")]
    Lookup(#[source] io::Error),
    #[error("invalid RUN_AS_USER: scripts must not run as root (uid or gid 0)")]
    Root,
    #[error("RUN_AS_USER is set but runbookd lacks {} (run it as root or grant them, see systemd/runbookd.service)", .0.join(", "))]
    MissingCapabilities(Vec<&'static str>),
    #[error("RUN_AS_USER is set but runbookd cannot read its capabilities: {0}")]
    Status(#[source] io::Error),
}

/// Resolves `RUN_AS_USER` (a user name, or `UID:GID`) and checks that runbookd holds what it
/// needs to start scripts as that user and stop them.
pub fn prepare(spec: &str) -> Result<RunAs, RunAsError> {
    let run_as = resolve(spec)?;
    let status = fs::read_to_string("/proc/self/status").map_err(RunAsError::Status)?;
    let missing = missing_capabilities(sys::effective_uid(), &status);
    if !missing.is_empty() {
        return Err(RunAsError::MissingCapabilities(missing));
    }
    Ok(run_as)
}

fn resolve(spec: &str) -> Result<RunAs, RunAsError> {
    let spec = spec.trim();
    let numeric = spec
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)));
    let (uid, gid) = match numeric {
        Some(ids) => ids,
        None => sys::lookup_user(spec)
            .map_err(RunAsError::Lookup)?
            .ok_or_else(|| RunAsError::UnknownUser(spec.to_string()))?,
    };
    if uid == 0 || gid == 0 {
        return Err(RunAsError::Root);
    }
    Ok(RunAs { uid, gid })
}

const CAP_CHOWN: u32 = 0;
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

/// The capabilities runbookd lacks for `RUN_AS_USER`, given its effective uid and the text of
/// `/proc/self/status`. runbookd itself needs CAP_CHOWN (handing a run's directory over) and
/// CAP_KILL (signalling the script user's process group); the helper it re-executes to start a
/// script needs CAP_SETUID and CAP_SETGID after `execve`, which a non-root process keeps only
/// in its ambient set (root gets its bounding set back at `execve`).
fn missing_capabilities(euid: u32, status: &str) -> Vec<&'static str> {
    let set = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let effective = set("CapEff:");
    let across_exec = if euid == 0 {
        effective & set("CapBnd:")
    } else {
        set("CapAmb:")
    };
    let needs = [
        ("CAP_SETUID", CAP_SETUID, across_exec),
        ("CAP_SETGID", CAP_SETGID, across_exec),
        ("CAP_KILL", CAP_KILL, effective),
        ("CAP_CHOWN", CAP_CHOWN, effective),
    ];
    needs
        .iter()
        .filter(|(_, bit, have)| have & (1u64 << bit) == 0)
        .map(|(name, _, _)| *name)
        .collect()
}

/// Keeps the state directory (run logs and records) runbookd's alone: mode 0700, and with
/// `RUN_AS_USER` it must be owned by runbookd's user.
pub fn lock_state_dir(dir: &Path, run_as: Option<RunAs>) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if run_as.is_some() && fs::metadata(dir)?.uid() != sys::effective_uid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "STATE_DIR must be owned by runbookd's user when RUN_AS_USER is set",
        ));
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Gives a run's prepared directories to the script user: `root` (runbookd's, so that
/// runbookd can remove it) becomes 0711, traversable but not listable; `script` and the whole
/// `work` tree become the script user's, `work` itself 0711 so that runbookd can still enter it
/// to start the script there.
pub fn hand_over(root: &Path, work: &Path, script: &Path, run_as: RunAs) -> io::Result<()> {
    // Modes first: once the files are the script user's, runbookd may no longer change them.
    fs::set_permissions(root, fs::Permissions::from_mode(0o711))?;
    fs::set_permissions(work, fs::Permissions::from_mode(0o711))?;
    std::os::unix::fs::lchown(script, Some(run_as.uid), Some(run_as.gid))?;
    chown_tree(work, run_as)
}

/// Children first: once a directory is the script user's, runbookd may not be able to list it.
fn chown_tree(path: &Path, run_as: RunAs) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), run_as)?;
        }
    }
    std::os::unix::fs::lchown(path, Some(run_as.uid), Some(run_as.gid))
}

/// Empties `work` as the script user, through this binary re-executed as a helper that becomes
/// that user first: runbookd cannot remove what the script created in directories of its own,
/// and does not hold CAP_DAC_OVERRIDE or CAP_FOWNER to force it. The helper has exactly the
/// script user's rights, so a script that swapped a directory for a link gains nothing.
pub fn empty_as(work: &Path, run_as: RunAs) -> io::Result<()> {
    let out = Command::new(SELF_EXE)
        .arg(CLEAN_HELPER_ARG)
        .arg(run_as.uid.to_string())
        .arg(run_as.gid.to_string())
        .arg(work)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The cleaner's main: `--runbookd-internal-clean UID GID DIR`. Becomes UID:GID, then removes
/// everything inside DIR (DIR itself stays: its parent is runbookd's).
pub fn clean_helper_main(args: &[std::ffi::OsString]) -> i32 {
    let ids = (
        args.first().and_then(|a| a.to_str()?.parse::<u32>().ok()),
        args.get(1).and_then(|a| a.to_str()?.parse::<u32>().ok()),
        args.get(2),
    );
    let (Some(uid), Some(gid), Some(dir)) = ids else {
        eprintln!("runbookd: internal cleaner called without UID GID DIR");
        return 2;
    };
    if let Err(e) = sys::become_user(uid, gid) {
        eprintln!("runbookd: cannot become {uid}:{gid}: {e}");
        return 1;
    }
    let dir = Path::new(dir);
    let result = fs::read_dir(dir).and_then(|entries| {
        for entry in entries {
            remove_tree(&entry?.path())?;
        }
        Ok(())
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("runbookd: cannot empty {}: {e}", dir.display());
            1
        }
    }
}

/// Removes a file or a tree, first giving back to its owner the directories a script made
/// unwritable or unreadable (`chmod 0`), which `remove_dir_all` would stop at.
fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
    for entry in fs::read_dir(path)? {
        remove_tree(&entry?.path())?;
    }
    fs::remove_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(eff: &str, bnd: &str, amb: &str) -> String {
        format!("Name:\trunbookd\nCapInh:\t0000000000000000\nCapPrm:\t{eff}\nCapEff:\t{eff}\nCapBnd:\t{bnd}\nCapAmb:\t{amb}\n")
    }

    #[test]
    fn root_with_full_capabilities_lacks_nothing() {
        let s = status("000001ffffffffff", "000001ffffffffff", "0000000000000000");
        assert!(missing_capabilities(0, &s).is_empty());
    }

    #[test]
    fn unprivileged_user_lacks_all_four() {
        let s = status("0000000000000000", "000001ffffffffff", "0000000000000000");
        assert_eq!(
            missing_capabilities(65534, &s),
            vec!["CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN"]
        );
    }

    #[test]
    fn non_root_needs_setuid_and_setgid_ambient() {
        // CAP_CHOWN, CAP_KILL, CAP_SETGID, CAP_SETUID = bits 0, 5, 6, 7 = 0xe1.
        let effective_only = status("00000000000000e1", "00000000000000e1", "0000000000000000");
        assert_eq!(
            missing_capabilities(1000, &effective_only),
            vec!["CAP_SETUID", "CAP_SETGID"]
        );
        let ambient = status("00000000000000e1", "00000000000000e1", "00000000000000e1");
        assert!(missing_capabilities(1000, &ambient).is_empty());
    }

    #[test]
    fn root_without_bounding_setuid_cannot_pass_it_on() {
        let s = status("000001ffffffffff", "000001ffffffff3f", "0000000000000000");
        assert_eq!(
            missing_capabilities(0, &s),
            vec!["CAP_SETUID", "CAP_SETGID"]
        );
    }

    #[test]
    fn numeric_and_named_users_resolve() {
        assert_eq!(
            resolve("1234:5678").unwrap(),
            RunAs {
                uid: 1234,
                gid: 5678
            }
        );
        assert!(matches!(resolve("0:100"), Err(RunAsError::Root)));
        assert!(matches!(resolve("root"), Err(RunAsError::Root)));
        assert!(matches!(
            resolve("no-such-user-runbookd"),
            Err(RunAsError::UnknownUser(_))
        ));
    }
}
