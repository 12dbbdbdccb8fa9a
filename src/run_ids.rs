//! Run ids (`<INSTANCE_ID>-<uuid>`), drawn ahead with their run cgroup (`runbookd-<run id>`,
//! see `cgroup.rs`) already made: a `mkdir` in the cgroup file system is about 50 µs of a short
//! run's path, paid by a background thread while the runs are quiet (`ahead.rs`). Without run
//! cgroups, or when none is ready, an id is drawn when asked and its cgroup made at spawn, as
//! before. A made cgroup is removed again when its run never got to its script ([`DrawnId`]
//! dropped unused), at shutdown when no run took it, and, after a kill, at the next start. The
//! ids made ahead are listed in a ledger in the server's own runs directory, so that the next
//! start removes only this server's (`rmdir` of an empty cgroup whose run has no record, never
//! a kill), never those of another server sharing the cgroup.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::ahead::{Pool, Quiet};
use crate::cgroup::Parent;

/// Most run cgroups made ahead, whatever the number of runs at once allowed: each is a kernel
/// object an operator sees in the service's cgroup.
pub const MOST_AHEAD: usize = 64;
/// Fewest made ahead (when runs get cgroups at all).
pub const FEWEST_AHEAD: usize = 4;

/// Where run ids come from.
#[derive(Debug)]
pub struct RunIds {
    instance_id: String,
    /// The directory run cgroups are made in; None: ids are only drawn when asked.
    cgroups: Option<Parent>,
    pool: Arc<Pool<String>>,
    /// The file listing the ids whose cgroup was made ahead and not yet known to be gone.
    ledger: PathBuf,
}

/// Name of the ledger in the runs directory (hidden: never taken for a run's file).
fn ledger_name(instance_id: &str) -> String {
    format!(".cgroups-ahead-{instance_id}")
}

/// A run id for one execute, with its cgroup when that was made ahead. Dropped before
/// [`DrawnId::cgroup_taken`], it removes that cgroup.
#[derive(Debug)]
pub struct DrawnId {
    id: String,
    made_cgroup: Option<PathBuf>,
    taken: Cell<bool>,
}

impl DrawnId {
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// Whether the run's cgroup exists already (the spawn adopts it instead of making it).
    pub fn cgroup_made(&self) -> bool {
        self.made_cgroup.is_some()
    }

    /// The run's script was started: its supervisor owns the cgroup (and removes it).
    pub fn cgroup_taken(&self) {
        self.taken.set(true);
    }
}

impl Drop for DrawnId {
    fn drop(&mut self) {
        if let (Some(path), false) = (&self.made_cgroup, self.taken.get()) {
            // Never entered: empty. A spawn that failed after adopting it removed it already.
            let _ = fs::remove_dir(path);
        }
    }
}

impl RunIds {
    /// Ids of instance `instance_id`; with `cgroups`, `target` of them (at least
    /// [`FEWEST_AHEAD`], at most [`MOST_AHEAD`]) are kept drawn with their cgroup made once
    /// [`RunIds::start_filling`] is called.
    /// The ledger is kept in `runs_dir`.
    pub fn new(
        instance_id: &str,
        cgroups: Option<Parent>,
        target: usize,
        runs_dir: &Path,
    ) -> Arc<RunIds> {
        Arc::new(RunIds {
            instance_id: instance_id.to_string(),
            cgroups,
            pool: Arc::new(Pool::new(target.clamp(FEWEST_AHEAD, MOST_AHEAD))),
            ledger: runs_dir.join(ledger_name(instance_id)),
        })
    }

    /// Writes the ledger: the ids ready now and `more`. An id taken since stays listed until the
    /// next write (its run is recorded by then, or its cgroup removed). False when it cannot be
    /// written.
    fn write_ledger(&self, more: Option<&str>) -> bool {
        let mut text = String::new();
        for id in self.pool.snapshot().iter().map(String::as_str).chain(more) {
            text.push_str(id);
            text.push('\n');
        }
        match crate::record::write_over(&self.ledger, text.as_bytes(), true) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("cannot write the ledger of run cgroups made ahead: {e}");
                false
            }
        }
    }

    fn new_id(&self) -> String {
        format!("{}-{}", self.instance_id, uuid::Uuid::new_v4())
    }

    /// The next run id, from those drawn ahead when one is ready.
    pub fn draw(&self) -> DrawnId {
        let made_cgroup = self.cgroups.as_ref().and_then(|_| self.pool.take());
        match made_cgroup {
            Some(id) => DrawnId {
                made_cgroup: self.cgroups.as_ref().map(|c| c.run_path(&id)),
                id,
                taken: Cell::new(false),
            },
            None => DrawnId {
                id: self.new_id(),
                made_cgroup: None,
                taken: Cell::new(false),
            },
        }
    }

    /// Starts the thread that keeps ids drawn with their cgroups made (see
    /// [`Pool::start_filling`]); nothing without run cgroups.
    pub fn start_filling(self: &Arc<RunIds>, nice: Option<i32>, quiet: Quiet) {
        if self.cgroups.is_none() {
            return;
        }
        let (ids, undo) = (self.clone(), self.clone());
        self.pool.start_filling(
            "run-ids",
            nice,
            quiet,
            move || ids.make_one(),
            move |id| undo.remove_cgroup(&id),
        );
    }

    /// Draws an id and makes its cgroup; None when the cgroup cannot be made.
    fn make_one(&self) -> Option<String> {
        let parent = self.cgroups.as_ref()?;
        let id = self.new_id();
        // Listed before it is made: a server killed in between leaves nothing unlisted. None
        // is made that could not be listed (a full or read-only state directory).
        if !self.write_ledger(Some(&id)) {
            return None;
        }
        match fs::create_dir(parent.run_path(&id)) {
            Ok(()) => Some(id),
            Err(e) => {
                log::debug!("cannot make a run cgroup ahead: {e}");
                None
            }
        }
    }

    /// Removes the cgroups made ahead that no run took, and makes no more (at shutdown).
    pub fn discard_ready(&self) {
        if self.cgroups.is_none() {
            return;
        }
        for id in self.pool.close() {
            self.remove_cgroup(&id);
        }
        let _ = fs::remove_file(&self.ledger);
    }

    /// Removes the cgroup made ahead for `id`.
    fn remove_cgroup(&self, id: &str) {
        if let Some(parent) = &self.cgroups {
            let _ = fs::remove_dir(parent.run_path(id));
        }
    }

    /// Removes the cgroups a killed server of this runs directory made ahead (listed in its
    /// ledger) whose run has no record in `runs_dir`. `rmdir` only: a cgroup with processes in
    /// it is left alone.
    pub fn remove_leftovers(&self, runs_dir: &Path) {
        let (Some(parent), Ok(listed)) = (&self.cgroups, fs::read_to_string(&self.ledger)) else {
            return;
        };
        let prefix = format!("{}-", self.instance_id);
        for id in listed.lines() {
            if !id.starts_with(&prefix) || !crate::record::is_valid_run_id(id) {
                continue;
            }
            if crate::record::record_path(runs_dir, id).exists() {
                continue;
            }
            let path = parent.run_path(id);
            match fs::remove_dir(&path) {
                Ok(()) => log::debug!("removed the unused run cgroup {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("left the run cgroup {}: {e}", path.display()),
            }
        }
        let _ = fs::remove_file(&self.ledger);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::RUN_PREFIX;
    use crate::test_dirs::{wait_for, TempDir};

    /// The run cgroups made in `dir`.
    fn made(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn ids_come_with_their_cgroup_made_and_an_unused_one_is_removed() {
        // A plain directory stands for the cgroup parent: only mkdir and rmdir happen in it.
        let parent = TempDir::new("run-ids");
        let runs = TempDir::new("run-ids-runs");
        let ids = RunIds::new("r7", Some(Parent::at(parent.path())), 1, runs.path());
        ids.start_filling(None, Box::new(|| true));
        wait_for("the ids drawn ahead", || {
            made(parent.path()) == FEWEST_AHEAD
        });
        let used = ids.draw();
        assert!(used.cgroup_made());
        assert!(crate::record::is_valid_run_id(used.as_str()));
        assert!(used.as_str().starts_with("r7-"));
        let used_path = parent.path().join(format!("{RUN_PREFIX}{}", used.as_str()));
        assert!(used_path.is_dir(), "its cgroup is there before the spawn");
        used.cgroup_taken();
        drop(used);
        assert!(
            used_path.is_dir(),
            "a taken cgroup is the supervisor's to remove"
        );
        let unused = ids.draw();
        let unused_path = parent
            .path()
            .join(format!("{RUN_PREFIX}{}", unused.as_str()));
        assert!(unused_path.is_dir());
        drop(unused);
        assert!(
            !unused_path.exists(),
            "a run that never got to its script leaves none"
        );
        wait_for("the top-up", || made(parent.path()) == FEWEST_AHEAD + 1);
        ids.discard_ready();
        let left: Vec<PathBuf> = fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(
            left,
            vec![used_path],
            "only the taken one is left at shutdown"
        );
    }

    #[test]
    fn no_cgroup_is_made_ahead_that_the_ledger_cannot_list() {
        let parent = TempDir::new("run-ids-unlisted");
        let runs = TempDir::new("run-ids-unlisted-runs");
        // The ledger's path is taken by a directory: it cannot be written.
        fs::create_dir(runs.path().join(ledger_name("r1"))).unwrap();
        let ids = RunIds::new("r1", Some(Parent::at(parent.path())), 4, runs.path());
        ids.start_filling(None, Box::new(|| true));
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(made(parent.path()), 0);
        let drawn = ids.draw();
        assert!(
            !drawn.cgroup_made(),
            "drawn when asked, its cgroup made at spawn"
        );
    }

    #[test]
    fn without_run_cgroups_ids_are_drawn_when_asked() {
        let runs = TempDir::new("run-ids-none");
        let ids = RunIds::new("r1", None, 64, runs.path());
        ids.start_filling(None, Box::new(|| true));
        let a = ids.draw();
        let b = ids.draw();
        assert!(!a.cgroup_made());
        assert_ne!(a.as_str(), b.as_str());
        assert!(crate::record::is_valid_run_id(a.as_str()));
    }

    #[test]
    fn a_killed_servers_cgroups_go_at_the_next_start_and_no_one_elses() {
        let parent = TempDir::new("run-ids-leftovers");
        let runs = TempDir::new("run-ids-records");
        let cgroup = |id: &str| parent.path().join(format!("{RUN_PREFIX}{id}"));
        // A server of this runs directory makes its cgroups ahead, and is killed.
        let killed = RunIds::new("r1", Some(Parent::at(parent.path())), 4, runs.path());
        let quiet = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let asked = quiet.clone();
        killed.start_filling(
            None,
            Box::new(move || asked.load(std::sync::atomic::Ordering::SeqCst)),
        );
        wait_for("the cgroups made ahead", || {
            made(parent.path()) == FEWEST_AHEAD
        });
        // Runs go from now on: the two taken below are not made again, so the ledger still
        // lists them as it did when it was last written.
        quiet.store(false, std::sync::atomic::Ordering::SeqCst);
        let ahead: Vec<String> = killed.pool.snapshot();
        let recorded = killed.draw();
        recorded.cgroup_taken();
        fs::write(
            crate::record::record_path(runs.path(), recorded.as_str()),
            "{}",
        )
        .unwrap();
        let busy = killed.draw();
        busy.cgroup_taken();
        // A cgroup with processes in it cannot be removed: a non-empty directory stands for it.
        fs::create_dir(cgroup(busy.as_str()).join("child")).unwrap();
        drop(killed);
        // Another server with the same instance id and cgroup parent: its cgroup is not listed.
        let other = "r1-00000000-0000-4000-8000-000000000009";
        fs::create_dir(cgroup(other)).unwrap();
        let restarted = RunIds::new("r1", Some(Parent::at(parent.path())), 4, runs.path());
        let listed = fs::read_to_string(runs.path().join(ledger_name("r1"))).unwrap();
        assert!(listed.contains(busy.as_str()) && listed.contains(recorded.as_str()));
        restarted.remove_leftovers(runs.path());
        let unused: Vec<&String> = ahead
            .iter()
            .filter(|id| **id != recorded.as_str() && **id != busy.as_str())
            .collect();
        assert!(!unused.is_empty());
        for id in unused {
            assert!(!cgroup(id).exists(), "made ahead, never used: removed");
        }
        assert!(
            cgroup(recorded.as_str()).is_dir(),
            "a recorded run's is recovery's"
        );
        assert!(
            cgroup(busy.as_str()).is_dir(),
            "never killed, only removed when empty"
        );
        assert!(cgroup(other).is_dir(), "another server's is left alone");
        assert!(
            !runs.path().join(ledger_name("r1")).exists(),
            "the ledger goes with them"
        );
    }
}
