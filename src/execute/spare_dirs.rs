//! Spare run directories: a finished run's directory, emptied, is renamed to
//! `runbookd-spare-<instance>-<n>` instead of being removed, and the next run renames it to its
//! own name instead of creating one. On file systems where making and freeing inodes is the
//! costly part of a run's bookkeeping (ext4 without a journal scans past every inode freed in
//! the last minutes before it hands out a new one), a run then starts and ends without either.
//!
//! Only directories whose script ran as runbookd's own user are kept (with `RUN_AS_USER` the
//! script user's `work/` is emptied by a helper and removed, as before), and only when they are
//! exactly as made: `script` and an emptied `work/`, nothing else, modes unchanged, not links.
//! Spares a stopped server left behind are removed at start.
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Most spare directories kept, whatever the number of runs at once allowed: more finished
/// runs at once are removed as before.
pub const MOST_SPARES: usize = 1024;

/// The modes of a run directory's parts when it was made, to tell that a script changed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Modes {
    root: u32,
    work: u32,
    script: u32,
}

impl Modes {
    /// The modes of the run directory `root` (with `work/` and `script`) as they are now; None
    /// unless both are there, as a directory and a regular file, none of them a link.
    pub(super) fn of(root: &Path, work: &Path, script: &Path) -> Option<Modes> {
        let root_meta = fs::symlink_metadata(root).ok()?;
        let work_meta = fs::symlink_metadata(work).ok()?;
        let script_meta = fs::symlink_metadata(script).ok()?;
        let plain = root_meta.is_dir()
            && work_meta.is_dir()
            && script_meta.is_file()
            && script_meta.nlink() == 1;
        plain.then_some(Modes {
            root: root_meta.mode(),
            work: work_meta.mode(),
            script: script_meta.mode(),
        })
    }
}

/// The spare directories of this server in its `EXECUTION_DIR`.
#[derive(Debug)]
pub struct SpareDirs {
    execution_dir: PathBuf,
    prefix: String,
    /// Most spares kept (0: none): as many as runs may run at once, so a burst of runs finds
    /// a directory for each next time, up to `MOST_SPARES`.
    keep: usize,
    free: Mutex<Vec<(PathBuf, Modes)>>,
    next: AtomicU64,
}

impl SpareDirs {
    /// The spares of instance `instance_id` in `execution_dir`, none yet: those a stopped
    /// server left behind are removed. At most `keep` are kept (at most `MOST_SPARES`); 0 (as
    /// when scripts run as another user): no directory is kept.
    pub fn new(execution_dir: &Path, instance_id: &str, keep: usize) -> SpareDirs {
        let prefix = format!("runbookd-spare-{instance_id}-");
        if let Ok(entries) = fs::read_dir(execution_dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    if let Err(e) = fs::remove_dir_all(entry.path()) {
                        log::warn!("cannot remove {}: {e}", entry.path().display());
                    }
                }
            }
        }
        SpareDirs {
            execution_dir: execution_dir.to_path_buf(),
            prefix,
            keep: keep.min(MOST_SPARES),
            free: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
        }
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<(PathBuf, Modes)>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether finished run directories are kept at all.
    pub(super) fn enabled(&self) -> bool {
        self.keep > 0
    }

    /// Renames a spare directory to `root`; its modes, or None when there is none (or it could
    /// not be renamed: then it is removed, and the caller makes `root` itself).
    pub(super) fn take(&self, root: &Path) -> Option<Modes> {
        let (spare, modes) = self.free().pop()?;
        match fs::rename(&spare, root) {
            Ok(()) => Some(modes),
            Err(e) => {
                log::warn!("cannot reuse {}: {e}", spare.display());
                let _ = fs::remove_dir_all(&spare);
                None
            }
        }
    }

    /// Keeps the finished run directory `root` as a spare: `work/` is emptied, and the whole is
    /// renamed. False (the caller removes it): no room, or it is not exactly as it was made
    /// with `made` modes. True: nothing is left at `root`.
    pub(super) fn give_back(&self, root: &Path, work: &Path, script: &Path, made: Modes) -> bool {
        if self.free().len() >= self.keep {
            return false;
        }
        if Modes::of(root, work, script) != Some(made) || !only_script_and_work(root) {
            return false;
        }
        if let Err(e) = empty(work) {
            log::debug!("not keeping {}: {e}", root.display());
            return false;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let spare = self.execution_dir.join(format!("{}{n}", self.prefix));
        if fs::rename(root, &spare).is_err() {
            return false;
        }
        let mut free = self.free();
        if free.len() < self.keep {
            free.push((spare, made));
            true
        } else {
            drop(free);
            // Filled meanwhile: removed here, nothing is left at `root`.
            if let Err(e) = fs::remove_dir_all(&spare) {
                log::warn!("cannot remove {}: {e}", spare.display());
            }
            true
        }
    }
}

/// Whether `root` holds `script` and `work` and nothing else.
fn only_script_and_work(root: &Path) -> bool {
    let Ok(entries) = fs::read_dir(root) else {
        return false;
    };
    let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
    names.sort();
    names == ["script", "work"]
}

/// Removes everything inside `dir` (links are removed, never followed).
fn empty(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::TempDir;
    use std::os::unix::fs::PermissionsExt;

    /// Makes a run directory `name` as a run does; (root, work, script, modes).
    fn run_dir(base: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf, Modes) {
        let root = base.join(name);
        let work = root.join("work");
        let script = root.join("script");
        fs::create_dir_all(&work).unwrap();
        fs::write(&script, "echo hi\n").unwrap();
        let modes = Modes::of(&root, &work, &script).unwrap();
        (root, work, script, modes)
    }

    #[test]
    fn a_finished_directory_is_emptied_kept_and_reused() {
        let dir = TempDir::new("spare-dirs");
        let spares = SpareDirs::new(dir.path(), "r1", 4);
        let (root, work, script, modes) = run_dir(dir.path(), "runbookd-a");
        fs::create_dir_all(work.join("made/by/the/script")).unwrap();
        fs::write(work.join("made/file"), "x").unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("kept"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, work.join("link")).unwrap();
        assert!(spares.give_back(&root, &work, &script, modes));
        assert!(!root.exists());
        let next = dir.path().join("runbookd-b");
        assert_eq!(spares.take(&next), Some(modes));
        assert!(fs::read_dir(next.join("work")).unwrap().next().is_none());
        assert!(next.join("script").is_file());
        assert_eq!(spares.take(&dir.path().join("runbookd-c")), None);
        // The link was removed, not followed.
        assert!(outside.join("kept").is_file());
    }

    #[test]
    fn a_directory_a_script_changed_is_not_kept() {
        let dir = TempDir::new("spare-dirs-changed");
        let spares = SpareDirs::new(dir.path(), "r1", 4);
        let (root, work, script, modes) = run_dir(dir.path(), "runbookd-mode");
        fs::set_permissions(&work, fs::Permissions::from_mode(0o777)).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!spares.give_back(&root, &work, &script, modes));
        let (root, work, script, modes) = run_dir(dir.path(), "runbookd-extra");
        fs::write(root.join("extra"), "x").unwrap();
        assert!(!spares.give_back(&root, &work, &script, modes));
        let (root, work, script, modes) = run_dir(dir.path(), "runbookd-linked");
        fs::hard_link(&script, dir.path().join("hard")).unwrap();
        assert!(!spares.give_back(&root, &work, &script, modes));
        assert_eq!(spares.take(&dir.path().join("runbookd-z")), None);
    }

    #[test]
    fn no_more_are_kept_than_asked() {
        let dir = TempDir::new("spare-dirs-cap");
        let spares = SpareDirs::new(dir.path(), "r1", 2);
        for name in ["runbookd-1", "runbookd-2", "runbookd-3"] {
            let (root, work, script, modes) = run_dir(dir.path(), name);
            let kept = spares.give_back(&root, &work, &script, modes);
            assert_eq!(kept, name != "runbookd-3", "{name}");
        }
        assert_eq!(spares.free().len(), 2);
        assert_eq!(
            SpareDirs::new(dir.path(), "r2", usize::MAX).keep,
            MOST_SPARES
        );
    }

    #[test]
    fn disabled_keeps_nothing_and_leftovers_of_this_instance_are_removed() {
        let dir = TempDir::new("spare-dirs-off");
        let (root, work, script, modes) = run_dir(dir.path(), "runbookd-a");
        assert!(!SpareDirs::new(dir.path(), "r1", 0).give_back(&root, &work, &script, modes));
        fs::create_dir_all(dir.path().join("runbookd-spare-r1-7/work")).unwrap();
        fs::create_dir_all(dir.path().join("runbookd-spare-r2-7/work")).unwrap();
        let _spares = SpareDirs::new(dir.path(), "r1", 4);
        assert!(!dir.path().join("runbookd-spare-r1-7").exists());
        assert!(dir.path().join("runbookd-spare-r2-7").exists());
    }
}
