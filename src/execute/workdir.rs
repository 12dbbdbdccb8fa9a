//! A run's working directory: creating `<EXECUTION_DIR>/runbookd-<run id>/`, copying the
//! runbook's inputs into it and writing the script file, handing it to the script user, and
//! removing it (also the one a killed server left behind).
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::app::App;
use crate::privsep::{self, RunAs};
use crate::runbook::Runbook;

use super::spare_dirs::{Modes, SpareDirs};

/// A run's directories: `<EXECUTION_DIR>/runbookd-<run id>/` holding the script file and the
/// working directory `work/` the script runs in. With `RUN_AS_USER` the root stays runbookd's
/// and the script file and `work/` become the script user's (`privsep::hand_over`).
pub(super) struct RunDirs {
    root: PathBuf,
    /// The working directory `work/` the script runs in.
    pub(super) cwd: PathBuf,
    /// The script file.
    pub(super) script: PathBuf,
    run_as: Option<RunAs>,
    removed: Cell<bool>,
    /// Where the directories go when the run is over, if they may be kept as a spare, and
    /// their modes when they were made.
    recycle: Option<(Arc<SpareDirs>, Modes)>,
}

impl Drop for RunDirs {
    /// Dropped without `remove` (a panic on the way): removed anyway.
    fn drop(&mut self) {
        self.remove();
    }
}

impl RunDirs {
    /// The directories of run `run_id`, not created.
    fn at(execution_dir: &Path, run_id: &str, run_as: Option<RunAs>) -> RunDirs {
        let root = execution_dir.join(format!("runbookd-{run_id}"));
        RunDirs {
            script: root.join("script"),
            cwd: root.join("work"),
            root,
            run_as,
            removed: Cell::new(false),
            recycle: None,
        }
    }

    /// Creates them (empty), or takes a spare (whose `work/` is empty and whose script file is
    /// overwritten by `prepare`).
    pub(super) fn create(
        execution_dir: &Path,
        run_id: &str,
        run_as: Option<RunAs>,
        spares: &Arc<SpareDirs>,
    ) -> io::Result<RunDirs> {
        let mut dirs = RunDirs::at(execution_dir, run_id, run_as);
        if let Some(modes) = spares.take(&dirs.root) {
            dirs.recycle = Some((spares.clone(), modes));
            return Ok(dirs);
        }
        let made = fs::create_dir_all(&dirs.cwd).and_then(|()| {
            // A directory that may be kept is recorded whole, its script file included.
            if !spares.enabled() {
                return Ok(());
            }
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dirs.script)
                .map(drop)
        });
        if let Err(e) = made {
            dirs.removed.set(true);
            // The name is the new run's: only what this call made can be there.
            let _ = fs::remove_dir_all(&dirs.root);
            return Err(e);
        }
        // Kept later only if it is still exactly as made now (see `spare_dirs`).
        let modes = spares
            .enabled()
            .then(|| Modes::of(&dirs.root, &dirs.cwd, &dirs.script))
            .flatten();
        dirs.recycle = modes.map(|modes| (spares.clone(), modes));
        Ok(dirs)
    }

    /// Once prepared: gives the script file and `work/` to the script user, if there is one.
    pub(super) fn hand_over(&self) -> io::Result<()> {
        match self.run_as {
            Some(run_as) => privsep::hand_over(&self.root, &self.cwd, &self.script, run_as),
            None => Ok(()),
        }
    }

    /// Removes them (once; later calls do nothing).
    pub(super) fn remove(&self) {
        if self.removed.replace(true) {
            return;
        }
        if let Some((spares, made)) = &self.recycle {
            if spares.give_back(&self.root, &self.cwd, &self.script, *made) {
                return;
            }
        }
        if let Some(run_as) = self.run_as {
            // What the script made in `work/` is the script user's: emptied as that user.
            if let Err(e) = privsep::empty_as(&self.cwd, run_as) {
                log::warn!("cannot empty {}: {e}", self.cwd.display());
            }
            let _ = fs::remove_dir(&self.cwd);
        }
        if let Err(e) = fs::remove_dir_all(&self.root) {
            log::warn!("cannot remove {}: {e}", self.root.display());
        }
    }
}

/// Removes the directories a run left behind when the server died under it (after a restart).
pub fn remove_leftover_dirs(app: &App, run_id: &str) {
    let dirs = RunDirs::at(&app.config.execution_dir, run_id, app.run_as);
    if fs::symlink_metadata(&dirs.root).is_err() {
        dirs.removed.set(true);
    }
    // Dropping `dirs` removes them.
}

/// Copies the inputs into the working directory and writes the script file.
pub(super) fn prepare(app: &App, book: &Runbook, dirs: &RunDirs, script: &str) -> io::Result<()> {
    for input in &book.inputs {
        let Some(source) = app.catalog.resolve_input(input) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("input {input} not found"),
            ));
        };
        // Named as written in the runbook (`./CreatePackage` -> `CreatePackage/`).
        let name = Path::new(input)
            .file_name()
            .or_else(|| source.file_name())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "input has no name"))?;
        copy_tree(&source, &dirs.cwd.join(name))?;
    }
    // A spare's script file is overwritten and cut to length: no new file, no freed block.
    crate::record::write_over(&dirs.script, script.as_bytes(), true)
}

/// Copies a file or a directory tree; symbolic links inside are skipped.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    if meta.is_dir() {
        fs::create_dir_all(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            if entry.file_type()?.is_symlink() {
                continue;
            }
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else if meta.is_file() || meta.file_type().is_symlink() {
        fs::copy(from, to).map(|_| ())
    } else {
        Ok(())
    }
}
