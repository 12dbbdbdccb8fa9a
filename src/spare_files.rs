//! Empty files made ahead of need in the runs directory (`.spare-<instance>-<n>`), so that a
//! run's log and first record are renamed into place instead of created while a request waits.
//! On file systems where making an inode is the costly part of a run's bookkeeping (ext4
//! without a journal scans past every inode freed in the last minutes: up to a millisecond of
//! processor time per file here), that cost is paid ahead (see `ahead.rs`: while the runs are
//! quiet), and a loop of back-to-back runs does not pay it between its runs while spares last
//! (`SPARE_RUN_FILES`, 1024 by default: a loop of 384 runs before more are made while it goes). When none is left, the caller creates the file itself. Spares a stopped server left
//! behind are removed at start.
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::ahead::{Pool, Quiet};

/// Fewest spare files kept ready.
pub const FEWEST: usize = 16;

/// Most spare files kept ready (`SPARE_RUN_FILES` at most, or two for each of
/// `MAX_CONCURRENT_RUNS` at most).
pub const MOST: usize = 20_000;

/// The ready spare files of one directory.
#[derive(Debug)]
pub struct SpareFiles {
    dir: PathBuf,
    prefix: String,
    pool: Arc<Pool<PathBuf>>,
    next: AtomicU64,
}

impl SpareFiles {
    /// Takes the spares instance `instance_id` left in `dir` back (empty regular files with one
    /// link: freeing and making them again would only slow the file system down); anything else
    /// of their names is removed. `target` are to be kept ready (at least [`FEWEST`], at most
    /// [`MOST`]) once [`SpareFiles::start_filling`] is called.
    pub fn new(dir: &Path, instance_id: &str, target: usize) -> Arc<SpareFiles> {
        let prefix = format!(".spare-{instance_id}-");
        let target = target.clamp(FEWEST, MOST);
        let mut kept = Vec::new();
        let mut next = 0;
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(n) = name.strip_prefix(&prefix) else {
                    continue;
                };
                let number = n.parse::<u64>().ok();
                // New spares are numbered past every name seen.
                next = number.map_or(next, |n| next.max(n.saturating_add(1)));
                let reusable = number.is_some()
                    && kept.len() < target
                    && fs::symlink_metadata(entry.path())
                        .is_ok_and(|m| m.is_file() && m.len() == 0 && m.nlink() == 1);
                if reusable {
                    kept.push(entry.path());
                } else {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Arc::new(SpareFiles {
            dir: dir.to_path_buf(),
            prefix,
            pool: Arc::new(Pool::with_ready(target, kept)),
            next: AtomicU64::new(next),
        })
    }

    /// Starts the thread that keeps the spares topped up (see [`Pool::start_filling`]).
    pub fn start_filling(self: &Arc<SpareFiles>, nice: Option<i32>, quiet: Quiet) {
        let spares = self.clone();
        self.pool.start_filling(
            "spare-files",
            nice,
            quiet,
            move || spares.make_one(),
            |path| {
                let _ = fs::remove_file(path);
            },
        );
    }

    /// An empty file of this directory that is now the caller's to rename (within the
    /// directory) or write; None when none is ready.
    pub fn take(&self) -> Option<PathBuf> {
        self.pool.take()
    }

    /// Makes one spare file; None when it could not be made (a full or read-only directory).
    fn make_one(&self) -> Option<PathBuf> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}{n}", self.prefix));
        // Made without holding the directory's lock where the system can, so that a run
        // renaming its files into the directory never waits for a spare being made.
        let made = crate::sys::create_unlocked(&path, 0o666).or_else(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                return Err(e);
            }
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map(drop)
        });
        match made {
            Ok(()) => Some(path),
            Err(e) => {
                log::debug!("cannot make a spare run file: {e}");
                None
            }
        }
    }
}

/// Creates `path` as a new file opened for reading and appending, from a spare when one is
/// ready (renamed there, never over an existing file), otherwise anew.
pub fn create_appendable(spares: Option<&SpareFiles>, path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).append(true);
    if let Some(spare) = spares.and_then(SpareFiles::take) {
        match crate::sys::rename_no_replace(&spare, path) {
            Ok(()) => return options.open(path),
            Err(e) => {
                let _ = fs::remove_file(&spare);
                if e.kind() == io::ErrorKind::AlreadyExists {
                    return Err(e);
                }
            }
        }
    }
    options.create_new(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::wait_for;
    use crate::test_dirs::TempDir;
    use std::io::Write;

    #[test]
    fn spares_are_made_ahead_taken_once_and_topped_up() {
        let dir = TempDir::new("spare-files");
        fs::write(dir.path().join(".spare-r1-99"), "left by a stopped server").unwrap();
        fs::write(dir.path().join(".spare-r1-7"), "").unwrap();
        fs::write(dir.path().join(".spare-r1-8"), "").unwrap();
        fs::hard_link(dir.path().join(".spare-r1-8"), dir.path().join("linked")).unwrap();
        fs::write(dir.path().join(".spare-r2-1"), "another instance's").unwrap();
        // Asked for fewer than the fewest: the fewest are kept.
        let spares = SpareFiles::new(dir.path(), "r1", 1);
        spares.start_filling(None, Box::new(|| true));
        const TARGET: usize = FEWEST;
        wait_for("the first spares", || spares.pool.ready() == TARGET);
        assert!(
            !dir.path().join(".spare-r1-99").exists(),
            "one with content goes"
        );
        assert!(
            !dir.path().join(".spare-r1-8").exists(),
            "one linked elsewhere goes"
        );
        assert!(dir.path().join(".spare-r2-1").exists());
        let mut taken = Vec::new();
        for _ in 0..TARGET + 3 {
            if let Some(path) = spares.take() {
                assert_eq!(fs::metadata(&path).unwrap().len(), 0);
                taken.push(path);
            }
        }
        let distinct: std::collections::BTreeSet<_> = taken.iter().collect();
        assert_eq!(distinct.len(), taken.len(), "no spare is handed out twice");
        assert!(
            taken.contains(&dir.path().join(".spare-r1-7")),
            "an empty one a stopped server left is taken back"
        );
        wait_for("the top-up", || spares.pool.ready() == TARGET);
    }

    #[test]
    fn a_spare_becomes_the_file_and_never_replaces_one() {
        let dir = TempDir::new("spare-files-create");
        let spares = SpareFiles::new(dir.path(), "r1", 40);
        spares.start_filling(None, Box::new(|| true));
        wait_for("the spares asked for", || spares.pool.ready() == 40);
        let log = dir.path().join("run.log");
        let mut file = create_appendable(Some(&spares), &log).unwrap();
        file.write_all(b"abc").unwrap();
        assert_eq!(fs::read(&log).unwrap(), b"abc");
        let before = spares.pool.ready();
        let error = create_appendable(Some(&spares), &log).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&log).unwrap(), b"abc", "the existing file is kept");
        assert!(spares.pool.ready() <= before);
        // Without spares it is an ordinary exclusive create.
        let other = dir.path().join("other.log");
        create_appendable(None, &other).unwrap();
        assert!(create_appendable(None, &other).is_err());
    }
}
