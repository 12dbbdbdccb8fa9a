//! cgroup v2 containment of runs: finding the directory runbookd may manage (`RUN_CGROUP`, or by
//! default its own cgroup when writable), one child cgroup `runbookd-<run id>` per run that the
//! script enters before it execs, and killing and removing that cgroup when the run ends, so
//! descendants that left the process group (`setsid`, double fork) die with their run. File
//! operations only: `cgroup.kill` where the kernel has it, else SIGKILL to every listed pid.
//!
//! cgroup v2 allows no processes in a cgroup whose `cgroup.subtree_control` enables
//! controllers; runbookd's own cgroup holds runbookd, so run cgroups under it are used for
//! membership and `cgroup.kill` only, never with controllers.
#![forbid(unsafe_code)]

use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys;

/// Name prefix of a run's cgroup; the rest is the run id.
pub const RUN_PREFIX: &str = "runbookd-";
/// `RUN_CGROUP` value that turns containment off.
pub const OFF: &str = "off";
/// How long killing a run's cgroup may take before its removal is given up.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Why no cgroup can be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// No cgroup2 file system is mounted (cgroup v1 only, or none).
    #[error("no cgroup v2 file system is mounted")]
    NoV2Mount,
    /// `/proc/self/cgroup` has no `0::` line, or its path is outside every cgroup2 mount.
    #[error("runbookd's own cgroup v2 directory cannot be found")]
    OwnCgroupUnknown,
    #[error("cannot read {0}: {1}")]
    Unreadable(&'static str, #[source] io::Error),
    /// The directory is not a cgroup of a cgroup2 mount.
    #[error("{} is not a cgroup v2 directory", .0.display())]
    NotACgroup(PathBuf),
    /// runbookd may not create cgroups there or move processes into them.
    #[error("runbookd may not create cgroups in {dir} or move processes into them: {1}", dir = .0.display())]
    NotWritable(PathBuf, #[source] io::Error),
}

/// What `RUN_CGROUP` resolved to.
#[derive(Debug)]
pub enum Selection {
    /// Runs get child cgroups of this directory.
    Use(Parent),
    /// No containment beyond the process group, and why.
    Off(String),
}

/// Picks the cgroup runs are placed under. `setting` is `RUN_CGROUP`: empty for the default
/// (runbookd's own cgroup when usable, else off), `off`, or a directory, which must be usable.
pub fn select(setting: &str) -> Result<Selection, CgroupError> {
    let setting = setting.trim();
    if setting.eq_ignore_ascii_case(OFF) {
        return Ok(Selection::Off("RUN_CGROUP=off".into()));
    }
    let mounts = read_proc("/proc/self/mountinfo")?;
    let mounts = cgroup2_mounts(&mounts);
    let own = read_proc("/proc/self/cgroup")
        .ok()
        .and_then(|text| own_cgroup_dir(&text, &mounts));
    if setting.is_empty() {
        let checked = match (&own, mounts.is_empty()) {
            (_, true) => Err(CgroupError::NoV2Mount),
            (None, false) => Err(CgroupError::OwnCgroupUnknown),
            (Some(dir), false) => check_usable(dir, dir),
        };
        return Ok(checked.unwrap_or_else(|e| Selection::Off(e.to_string())));
    }
    if mounts.is_empty() {
        return Err(CgroupError::NoV2Mount);
    }
    let dir = PathBuf::from(setting);
    let canonical = fs::canonicalize(&dir).map_err(|_| CgroupError::NotACgroup(dir.clone()))?;
    if !mounts.iter().any(|m| canonical.starts_with(&m.point)) {
        return Err(CgroupError::NotACgroup(dir));
    }
    let own = own.ok_or(CgroupError::OwnCgroupUnknown)?;
    // Moving a process between cgroups needs write access to `cgroup.procs` of their common
    // ancestor: the helper moves itself from runbookd's cgroup into the run's.
    let ancestor = common_ancestor(&own, &canonical);
    check_usable(&canonical, &ancestor)
}

fn read_proc(path: &'static str) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|e| CgroupError::Unreadable(path, e))
}

/// Checks that runs can be placed under `dir` (moving from a cgroup whose common ancestor with
/// `dir` is `ancestor`): both are cgroups, the ancestor's `cgroup.procs` opens for writing and a
/// child cgroup can be created and removed.
fn check_usable(dir: &Path, ancestor: &Path) -> Result<Selection, CgroupError> {
    if !dir.join("cgroup.procs").is_file() || !ancestor.join("cgroup.procs").is_file() {
        return Err(CgroupError::NotACgroup(dir.to_path_buf()));
    }
    fs::OpenOptions::new()
        .write(true)
        .open(ancestor.join("cgroup.procs"))
        .map_err(|e| CgroupError::NotWritable(ancestor.to_path_buf(), e))?;
    let probe = dir.join(format!("{RUN_PREFIX}probe-{}", std::process::id()));
    fs::create_dir(&probe).map_err(|e| CgroupError::NotWritable(dir.to_path_buf(), e))?;
    let opened = fs::OpenOptions::new()
        .write(true)
        .open(probe.join("cgroup.procs"));
    let _ = fs::remove_dir(&probe);
    opened.map_err(|e| CgroupError::NotWritable(dir.to_path_buf(), e))?;
    Ok(Selection::Use(Parent {
        dir: dir.to_path_buf(),
    }))
}

/// The longest common leading part of two absolute paths.
fn common_ancestor(a: &Path, b: &Path) -> PathBuf {
    a.components()
        .zip(b.components())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

/// A cgroup2 mount: where it is mounted and which directory of the hierarchy is its root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    root: String,
    point: PathBuf,
}

/// The cgroup2 mounts listed in a `/proc/self/mountinfo` text.
fn cgroup2_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let fields: Vec<&str> = left.split_whitespace().collect();
            Some(Mount {
                root: unescape(fields.get(3)?),
                point: PathBuf::from(unescape(fields.get(4)?)),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of the cgroup named by the `0::` line of a `/proc/self/cgroup` text, under
/// the first mount whose root contains it.
fn own_cgroup_dir(proc_cgroup: &str, mounts: &[Mount]) -> Option<PathBuf> {
    let path = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim();
    if !path.starts_with('/') || path.ends_with("(deleted)") {
        return None;
    }
    mounts.iter().find_map(|m| {
        let rest = if m.root == "/" {
            Some(path)
        } else {
            path.strip_prefix(m.root.as_str())
                .filter(|r| r.is_empty() || r.starts_with('/'))
        }?;
        let rel = Path::new(rest.trim_start_matches('/'));
        rel.components()
            .all(|c| matches!(c, Component::Normal(_)))
            .then(|| m.point.join(rel))
    })
}

/// The cgroup runs are placed under.
#[derive(Debug, Clone)]
pub struct Parent {
    dir: PathBuf,
}

impl Parent {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A parent at `dir`, unchecked (tests of what is made in it).
    #[cfg(test)]
    pub fn at(dir: &Path) -> Parent {
        Parent {
            dir: dir.to_path_buf(),
        }
    }

    /// Where the cgroup of run `run_id` is.
    pub fn run_path(&self, run_id: &str) -> PathBuf {
        self.dir.join(format!("{RUN_PREFIX}{run_id}"))
    }
}

/// A run's own cgroup; killed and removed when dropped, if that was not done before.
#[derive(Debug)]
pub struct RunCgroup {
    path: PathBuf,
    /// Its `cgroup.kill`, once opened by [`RunCgroup::open_kill_switch`].
    kill_switch: Option<fs::File>,
    removed: bool,
}

impl RunCgroup {
    /// Creates the cgroup at `path` (a new directory: an existing one is an error), or, with
    /// `made`, takes the one made ahead there (made again if it has gone meanwhile).
    pub fn create(path: &Path, made: bool) -> io::Result<RunCgroup> {
        // A look-up, not a `mkdir` that finds it: that would wait for the parent's lock, which
        // every cgroup being made or removed beside it holds meanwhile.
        if !(made && path.is_dir()) {
            fs::create_dir(path)?;
        }
        Ok(RunCgroup {
            path: path.to_path_buf(),
            kill_switch: None,
            removed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `cgroup.kill` ahead (the run thread does, while the script starts), so that
    /// killing what is left when the script ends is one write. Where the kernel has none, kills
    /// go through `cgroup.procs` as before.
    pub fn open_kill_switch(&mut self) {
        if self.kill_switch.is_none() {
            self.kill_switch = fs::OpenOptions::new()
                .write(true)
                .open(self.path.join("cgroup.kill"))
                .ok();
        }
    }

    /// One kill of everything in the cgroup: through the switch opened ahead, else by path.
    fn kill_once(&self) -> io::Result<()> {
        match &self.kill_switch {
            Some(switch) => {
                let mut switch: &fs::File = switch;
                switch.write_all(b"1")
            }
            None => kill_members(&self.path),
        }
    }

    /// Kills every process in the cgroup, without waiting for them to die.
    pub fn kill(&self) {
        if let Err(e) = self.kill_once() {
            log::warn!("cannot kill cgroup {}: {e}", self.path.display());
        }
    }

    /// Kills every process in the cgroup until none is left, then removes it.
    pub fn kill_and_remove(&mut self) -> io::Result<()> {
        self.removed = true;
        let killed = self.kill_once();
        self.kill_switch = None;
        if killed.is_ok() && remove_tree(&self.path).is_ok() {
            return Ok(());
        }
        kill_and_remove(&self.path)
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = self.kill_and_remove() {
                log::warn!("cannot remove cgroup {}: {e}", self.path.display());
            }
        }
    }
}

/// Moves the calling process into the cgroup at `path` (the helper, before it execs the script).
pub fn enter(path: &Path) -> io::Result<()> {
    let mut procs = fs::OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.procs"))?;
    procs.write_all(format!("{}\n", std::process::id()).as_bytes())
}

/// Kills and removes the cgroup a run of a previous server left at `path`. False when there
/// was none. Only a directory named `runbookd-<run_id>` that is a cgroup is touched.
pub fn remove_leftover(path: &Path, run_id: &str) -> io::Result<bool> {
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.strip_prefix(RUN_PREFIX) == Some(run_id));
    if !named || !path.join("cgroup.procs").is_file() {
        return Ok(false);
    }
    kill_and_remove(path).map(|()| true)
}

/// Kills, waits for the cgroup to empty, and removes it with any child cgroups.
fn kill_and_remove(path: &Path) -> io::Result<()> {
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        match kill_members(path).and_then(|()| remove_tree(path)) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            // Busy: members are still dying.
            Err(_) => std::thread::sleep(RETRY_PAUSE),
        }
    }
}

/// One kill of every process in the cgroup and below: `cgroup.kill`, or where the kernel has
/// none (before 5.14) SIGKILL to every pid listed in `cgroup.procs` of each cgroup.
fn kill_members(path: &Path) -> io::Result<()> {
    match fs::OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.kill"))
    {
        Ok(mut file) => return file.write_all(b"1"),
        Err(e) if e.kind() == io::ErrorKind::NotFound && path.is_dir() => {}
        Err(e) => return Err(e),
    }
    for pid in fs::read_to_string(path.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
    {
        let _ = sys::kill_process(pid);
    }
    for child in child_cgroups(path)? {
        kill_members(&child)?;
    }
    Ok(())
}

fn child_cgroups(path: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(fs::read_dir(path)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect())
}

/// Removes a cgroup and the cgroups a script made inside it, deepest first.
fn remove_tree(path: &Path) -> io::Result<()> {
    for child in child_cgroups(path)? {
        remove_tree(&child)?;
    }
    fs::remove_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_v2_mount_on_a_hybrid_host() {
        let mounts = cgroup2_mounts(HYBRID);
        assert_eq!(
            mounts,
            vec![Mount {
                root: "/".into(),
                point: "/sys/fs/cgroup/unified".into()
            }]
        );
        let cgroup = "4:memory:/x\n0::/system.slice/runbookd.service\n";
        assert_eq!(
            own_cgroup_dir(cgroup, &mounts),
            Some(PathBuf::from(
                "/sys/fs/cgroup/unified/system.slice/runbookd.service"
            ))
        );
        assert_eq!(
            own_cgroup_dir("0::/\n", &mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unified_host_and_mount_roots() {
        let info = "29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let mounts = cgroup2_mounts(info);
        assert_eq!(
            own_cgroup_dir("0::/a/b\n", &mounts),
            Some(PathBuf::from("/sys/fs/cgroup/a/b"))
        );
        // A mount of a sub-tree (container): the path is taken relative to its root.
        let info = "29 23 0:26 /a /mnt/cg\\040x rw - cgroup2 cgroup2 rw\n";
        let mounts = cgroup2_mounts(info);
        assert_eq!(mounts[0].point, PathBuf::from("/mnt/cg x"));
        assert_eq!(
            own_cgroup_dir("0::/a/b\n", &mounts),
            Some(PathBuf::from("/mnt/cg x/b"))
        );
        assert_eq!(own_cgroup_dir("0::/ab\n", &mounts), None);
        assert_eq!(own_cgroup_dir("0::/a/../x\n", &mounts), None);
        assert_eq!(own_cgroup_dir("1:cpu:/a\n", &mounts), None);
        assert!(cgroup2_mounts("35 31 0:32 / /m rw - cgroup cgroup rw,memory\n").is_empty());
    }

    #[test]
    fn common_ancestors() {
        assert_eq!(
            common_ancestor(Path::new("/c/a/b"), Path::new("/c/a/x/y")),
            PathBuf::from("/c/a")
        );
        assert_eq!(
            common_ancestor(Path::new("/c"), Path::new("/c/d")),
            PathBuf::from("/c")
        );
    }

    #[test]
    fn off_is_off() {
        assert!(matches!(select("off"), Ok(Selection::Off(_))));
        assert!(matches!(select(" OFF "), Ok(Selection::Off(_))));
    }

    #[test]
    fn without_cgroup_kill_every_listed_pid_is_killed() {
        // A stand-in cgroup directory with no cgroup.kill, listing one process.
        let dir = crate::test_dirs::TempDir::new("cgroup-fallback");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        dir.write("cgroup.procs", format!("{}\n", sleeper.id()).as_bytes());
        kill_members(dir.path()).unwrap();
        let status = sleeper.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn leftovers_are_only_the_runs_own() {
        let dir = crate::test_dirs::TempDir::new("cgroup-leftover");
        let path = dir.path().join("runbookd-r1-x");
        fs::create_dir(&path).unwrap();
        // Not a cgroup (no cgroup.procs), or not named after the run: untouched.
        assert!(!remove_leftover(&path, "r1-x").unwrap());
        assert!(!remove_leftover(&path, "r1-y").unwrap());
        assert!(path.is_dir());
    }
}
