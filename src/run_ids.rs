//! Run ids (`<INSTANCE_ID>-<uuid>`), drawn ahead with their run cgroup (`runbookd-<run id>`,
//! see `cgroup.rs`) already made: a `mkdir` in the cgroup file system is about 50 µs of a short
//! run's path, paid by a background thread while no run is going (`ahead.rs`). Without run
//! cgroups, or when none is ready, an id is drawn when asked and its cgroup made at spawn, as
//! before. A made cgroup is removed again when its run never got to its script ([`DrawnId`]
//! dropped unused), at shutdown when no run took it, and, after a kill, at the next start (an
//! empty cgroup whose run has no record: `rmdir` only, never a kill).
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::ahead::{Pool, Quiet};
use crate::cgroup::{Parent, RUN_PREFIX};

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
    pub fn new(instance_id: &str, cgroups: Option<Parent>, target: usize) -> Arc<RunIds> {
        Arc::new(RunIds {
            instance_id: instance_id.to_string(),
            cgroups,
            pool: Arc::new(Pool::new(target.clamp(FEWEST_AHEAD, MOST_AHEAD))),
        })
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
        for id in self.pool.close() {
            self.remove_cgroup(&id);
        }
    }

    /// Removes the cgroup made ahead for `id`.
    fn remove_cgroup(&self, id: &str) {
        if let Some(parent) = &self.cgroups {
            let _ = fs::remove_dir(parent.run_path(id));
        }
    }

    /// Removes the empty cgroups of this instance's ids whose run has no record in
    /// `runs_dir`: made ahead by a server that was killed. `rmdir` only: a cgroup with
    /// processes in it is left alone.
    pub fn remove_leftovers(&self, runs_dir: &Path) {
        let Some(parent) = &self.cgroups else {
            return;
        };
        let Ok(entries) = fs::read_dir(parent.dir()) else {
            return;
        };
        let prefix = format!("{RUN_PREFIX}{}-", self.instance_id);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_prefix(RUN_PREFIX) else {
                continue;
            };
            if !name.starts_with(&prefix) || !crate::record::is_valid_run_id(id) {
                continue;
            }
            if !crate::record::record_path(runs_dir, id).exists() {
                match fs::remove_dir(entry.path()) {
                    Ok(()) => log::debug!("removed the unused run cgroup {name}"),
                    Err(e) => log::warn!("left the run cgroup {name} of no known run: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::wait_for;
    use crate::test_dirs::TempDir;

    fn made(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn ids_come_with_their_cgroup_made_and_an_unused_one_is_removed() {
        // A plain directory stands for the cgroup parent: only mkdir and rmdir happen in it.
        let parent = TempDir::new("run-ids");
        let ids = RunIds::new("r7", Some(Parent::at(parent.path())), 1);
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
    fn without_run_cgroups_ids_are_drawn_when_asked() {
        let ids = RunIds::new("r1", None, 64);
        ids.start_filling(None, Box::new(|| true));
        let a = ids.draw();
        let b = ids.draw();
        assert!(!a.cgroup_made());
        assert_ne!(a.as_str(), b.as_str());
        assert!(crate::record::is_valid_run_id(a.as_str()));
    }

    #[test]
    fn leftovers_of_a_killed_server_go_unless_a_run_or_another_instance_has_them() {
        let parent = TempDir::new("run-ids-leftovers");
        let runs = TempDir::new("run-ids-records");
        let id = |n: u32| format!("r1-00000000-0000-4000-8000-{n:012}");
        let cgroup = |name: &str| parent.path().join(format!("{RUN_PREFIX}{name}"));
        let ahead = id(1);
        let recorded = id(2);
        let busy = id(3);
        let other = "r2-00000000-0000-4000-8000-000000000004".to_string();
        for name in [
            &ahead,
            &recorded,
            &busy,
            &other,
            &"r1-not-a-run-id".to_string(),
        ] {
            fs::create_dir(cgroup(name)).unwrap();
        }
        fs::write(crate::record::record_path(runs.path(), &recorded), "{}").unwrap();
        // A cgroup with processes in it cannot be removed: a non-empty directory stands for it.
        fs::create_dir(cgroup(&busy).join("child")).unwrap();
        let ids = RunIds::new("r1", Some(Parent::at(parent.path())), 4);
        ids.remove_leftovers(runs.path());
        assert!(!cgroup(&ahead).exists(), "made ahead, never used: removed");
        assert!(
            cgroup(&recorded).is_dir(),
            "a recorded run's is recovery's to judge"
        );
        assert!(
            cgroup(&busy).is_dir(),
            "never killed, only removed when empty"
        );
        assert!(cgroup(&other).is_dir(), "another instance's is left alone");
        assert!(cgroup("r1-not-a-run-id").is_dir());
    }
}
