//! Empty files made ahead of need in the runs directory (`.spare-<instance>-<n>`), so that a
//! run's log and first record are renamed into place instead of created while a request waits.
//! On file systems where making an inode is the costly part of a run's bookkeeping (ext4
//! without a journal scans past every inode freed in the last minutes), that cost is paid by a
//! background thread between runs. When none is left (a burst of runs), the caller creates the
//! file itself, as before. Spares a stopped server left behind are removed at start.
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Fewest spare files kept ready.
pub const FEWEST: usize = 16;

/// Most spare files kept ready, whatever the number of runs at once allowed.
pub const MOST: usize = 2048;

/// How long after a spare was taken the thread starts making more: the run that took it has
/// usually ended by then, so the two do not compete for the processor.
const REFILL_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// The ready spare files of one directory and the thread that makes more.
#[derive(Debug)]
pub struct SpareFiles {
    dir: PathBuf,
    prefix: String,
    free: Mutex<Vec<PathBuf>>,
    /// How many are kept ready.
    target: usize,
    /// Signalled when a spare was taken.
    taken: Condvar,
    next: AtomicU64,
}

impl SpareFiles {
    /// Removes the spares instance `instance_id` left in `dir`, and starts the thread that keeps
    /// `target` ready (at least [`FEWEST`], at most [`MOST`]), at niceness `nice` when given:
    /// it is work ahead of need, which requests and runs come before. Without that thread (it
    /// could not start) no spare is ever ready.
    pub fn start(
        dir: &Path,
        instance_id: &str,
        target: usize,
        nice: Option<i32>,
    ) -> Arc<SpareFiles> {
        let spares = Arc::new(SpareFiles::new(dir, instance_id, target));
        let filler = spares.clone();
        let started = std::thread::Builder::new()
            .name("spare-files".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                if let Some(nice) = nice {
                    if let Err(e) = crate::sys::set_own_nice(nice) {
                        log::debug!("the spare files thread keeps its niceness: {e}");
                    }
                }
                filler.keep_filled()
            });
        if let Err(e) = started {
            log::warn!("cannot start the thread that makes spare run files: {e}");
        }
        spares
    }

    fn new(dir: &Path, instance_id: &str, target: usize) -> SpareFiles {
        let prefix = format!(".spare-{instance_id}-");
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        SpareFiles {
            dir: dir.to_path_buf(),
            prefix,
            free: Mutex::new(Vec::new()),
            target: target.clamp(FEWEST, MOST),
            taken: Condvar::new(),
            next: AtomicU64::new(0),
        }
    }

    fn free(&self) -> MutexGuard<'_, Vec<PathBuf>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An empty file of this directory that is now the caller's to rename (within the
    /// directory) or write; None when none is ready.
    pub fn take(&self) -> Option<PathBuf> {
        let spare = self.free().pop();
        self.taken.notify_one();
        spare
    }

    /// Makes one spare file; false when it could not be made (a full or read-only directory).
    fn make_one(&self) -> bool {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}{n}", self.prefix));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => {
                drop(file);
                self.free().push(path);
                true
            }
            Err(e) => {
                log::debug!("cannot make a spare run file: {e}");
                false
            }
        }
    }

    /// Tops the spares up to their target whenever one is taken, for as long as the process
    /// runs.
    fn keep_filled(&self) {
        loop {
            let mut made_all = true;
            while self.free().len() < self.target {
                if !self.make_one() {
                    made_all = false;
                    break;
                }
            }
            let free = self.free();
            if made_all {
                drop(
                    self.taken
                        .wait_while(free, |free| free.len() >= self.target)
                        .unwrap_or_else(|p| p.into_inner()),
                );
                std::thread::sleep(REFILL_DELAY);
            } else {
                // Nothing can be made now: try again when one is taken, or in a second.
                drop(
                    self.taken
                        .wait_timeout(free, std::time::Duration::from_secs(1))
                        .unwrap_or_else(|p| p.into_inner()),
                );
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
    use crate::test_dirs::TempDir;
    use std::io::Write;
    use std::time::{Duration, Instant};

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn spares_are_made_ahead_taken_once_and_topped_up() {
        let dir = TempDir::new("spare-files");
        fs::write(dir.path().join(".spare-r1-99"), "left by a stopped server").unwrap();
        fs::write(dir.path().join(".spare-r2-1"), "another instance's").unwrap();
        // Asked for fewer than the fewest: the fewest are kept.
        let spares = SpareFiles::start(dir.path(), "r1", 1, None);
        const TARGET: usize = FEWEST;
        wait_for("the first spares", || spares.free().len() == TARGET);
        assert!(!dir.path().join(".spare-r1-99").exists());
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
        wait_for("the top-up", || spares.free().len() == TARGET);
    }

    #[test]
    fn a_spare_becomes_the_file_and_never_replaces_one() {
        let dir = TempDir::new("spare-files-create");
        let spares = SpareFiles::start(dir.path(), "r1", 40, None);
        wait_for("the spares asked for", || spares.free().len() == 40);
        let log = dir.path().join("run.log");
        let mut file = create_appendable(Some(&spares), &log).unwrap();
        file.write_all(b"abc").unwrap();
        assert_eq!(fs::read(&log).unwrap(), b"abc");
        let before = spares.free().len();
        let error = create_appendable(Some(&spares), &log).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&log).unwrap(), b"abc", "the existing file is kept");
        assert!(spares.free().len() <= before);
        // Without spares it is an ordinary exclusive create.
        let other = dir.path().join("other.log");
        create_appendable(None, &other).unwrap();
        assert!(create_appendable(None, &other).is_err());
    }
}
