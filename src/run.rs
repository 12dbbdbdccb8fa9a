//! A run: one execution of a runbook, with its record, its log and its cancel switch; and the
//! `Registry` of every known run, which also admits new runs against the concurrency limits
//! (the check and the reservation happen under one lock) and knows which run started which
//! through a run token (the tree of sub-runs under each root run).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::supervisor::{StopRequest, StopSender};

use crate::record::{RunRecord, RunStatus};
use crate::runlog::{LogError, Outcome, RunLog};

/// One execution.
pub struct Run {
    pub id: String,
    pub runbook: String,
    pub user: String,
    log_path: PathBuf,
    record: Mutex<RunRecord>,
    /// The log while this process writes it; None for runs loaded from disk or released.
    live: Mutex<Option<Arc<RunLog>>>,
    /// Requests to the run's supervisor (cancel, kill).
    cancel: Mutex<Option<StopSender>>,
    /// Set when the server stops the run because it is shutting down.
    interrupted: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Run {
    pub fn new(record: RunRecord, log_path: PathBuf, live: Option<Arc<RunLog>>) -> Run {
        Run {
            id: record.run_id.clone(),
            runbook: record.runbook.clone(),
            user: record.user.clone(),
            log_path,
            record: Mutex::new(record),
            live: Mutex::new(live),
            cancel: Mutex::new(None),
            interrupted: AtomicBool::new(false),
        }
    }

    /// Marks the run as stopped by the server's shutdown (its status becomes `interrupted`).
    pub fn mark_interrupted(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
    }

    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    pub fn record(&self) -> RunRecord {
        lock(&self.record).clone()
    }

    /// The record with the output counts of a run still going brought up to date.
    pub fn current_record(&self) -> RunRecord {
        let mut record = self.record();
        if !record.status.is_finished() {
            if let Some(live) = lock(&self.live).as_ref() {
                let totals = live.totals();
                record.stdout_bytes = totals.stdout_bytes;
                record.stderr_bytes = totals.stderr_bytes;
            }
        }
        record
    }

    /// Changes the record and returns the new version.
    pub fn update(&self, change: impl FnOnce(&mut RunRecord)) -> RunRecord {
        let mut record = lock(&self.record);
        change(&mut record);
        record.clone()
    }

    /// The run's log: the live one, or the file opened for reading.
    pub fn log(&self) -> Result<Arc<RunLog>, LogError> {
        if let Some(live) = lock(&self.live).as_ref() {
            return Ok(live.clone());
        }
        let record = self.record();
        let outcome = Outcome {
            return_code: record.return_code.unwrap_or(-1),
            error: record.error.clone(),
            timed_out: record.status == RunStatus::TimedOut,
            finished_at: record.finished_at.unwrap_or(record.started_at),
        };
        RunLog::open_finished(&self.log_path, outcome, record.log_capped).map(Arc::new)
    }

    /// The log this process is writing, while it has one.
    pub fn live_log(&self) -> Option<Arc<RunLog>> {
        lock(&self.live).clone()
    }

    /// Drops the in-memory log once the run is over and recorded (viewers holding it go on).
    pub fn release_live_log(&self) {
        lock(&self.live).take();
    }

    pub fn set_cancel(&self, sender: StopSender) {
        *lock(&self.cancel) = Some(sender);
    }

    /// Asks the supervisor to cancel the run; false if it is not running any more.
    pub fn request_cancel(&self) -> bool {
        self.send(StopRequest::Cancel)
    }

    /// Asks the supervisor to kill the run's process group now.
    pub fn request_kill(&self) -> bool {
        self.send(StopRequest::Kill)
    }

    fn send(&self, request: StopRequest) -> bool {
        lock(&self.cancel)
            .as_ref()
            .is_some_and(|tx| tx.send(request))
    }
}

/// Why a run was not admitted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdmitError {
    #[error("too many runs: {limit} are running (MAX_CONCURRENT_RUNS); try again later")]
    TooManyRuns { limit: usize },
    #[error("this runbook allows {max} concurrent run(s); running: {}", .running.join(", "))]
    RunbookBusy { max: u32, running: Vec<String> },
    /// The run whose token asks for a sub-run is over.
    #[error("the run this token belongs to has ended")]
    ParentEnded,
}

/// The limits a new run is admitted against.
#[derive(Debug, Clone, Copy)]
pub struct AdmitLimits {
    /// MAX_CONCURRENT_RUNS: counted runs at once.
    pub max_total: usize,
    /// MAX_SUBRUNS_PER_RUN: uncounted sub-runs alive at once in one root run's tree.
    pub max_subruns: usize,
    /// The runbook's `# Concurrency` max.
    pub per_runbook: Option<u32>,
}

/// Where a run started in this process sits among sub-runbook calls.
struct Lineage {
    /// The run whose run token started it.
    parent: Option<String>,
    /// The first run of its tree (itself for a run a user started).
    root: String,
}

#[derive(Default)]
struct Inner {
    runs: HashMap<String, Arc<Run>>,
    /// Running run id -> (runbook, counts against MAX_CONCURRENT_RUNS).
    running: HashMap<String, (String, bool)>,
    /// Run id -> its parent and root, for runs admitted since the server started.
    lineage: HashMap<String, Lineage>,
    /// When a running slot was last freed.
    last_release: Option<Instant>,
}

/// Every run this server knows, and which of them are running.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

impl Registry {
    /// Reserves a running slot for `run_id` or says why not. `parent`: the run whose run token
    /// asks for this one, which must still be running. A sub-run is exempt from `max_total`
    /// while fewer than `max_subruns` exempt runs are alive in the parent's tree; beyond that,
    /// and for every other run, it counts like any run.
    pub fn admit(
        &self,
        run_id: &str,
        runbook: &str,
        parent: Option<&str>,
        limits: &AdmitLimits,
    ) -> Result<(), AdmitError> {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        if parent.is_some_and(|p| !inner.running.contains_key(p)) {
            return Err(AdmitError::ParentEnded);
        }
        let root = parent.map(|p| {
            inner
                .lineage
                .get(p)
                .map_or_else(|| p.to_string(), |l| l.root.clone())
        });
        let counted = match &root {
            None => true,
            Some(root) => {
                let exempt_in_tree = inner
                    .running
                    .iter()
                    .filter(|(id, (_, counted))| {
                        !counted
                            && inner
                                .lineage
                                .get(id.as_str())
                                .is_some_and(|l| &l.root == root)
                    })
                    .count();
                exempt_in_tree >= limits.max_subruns
            }
        };
        let max_total = limits.max_total;
        let per_runbook = limits.per_runbook;
        if counted {
            let total = inner.running.values().filter(|(_, c)| *c).count();
            if total >= max_total {
                return Err(AdmitError::TooManyRuns { limit: max_total });
            }
        }
        if let Some(max) = per_runbook {
            let running: Vec<String> = inner
                .running
                .iter()
                .filter(|(_, (book, _))| book == runbook)
                .map(|(id, _)| id.clone())
                .collect();
            if running.len() >= max as usize {
                return Err(AdmitError::RunbookBusy { max, running });
            }
        }
        inner
            .running
            .insert(run_id.to_string(), (runbook.to_string(), counted));
        inner.lineage.insert(
            run_id.to_string(),
            Lineage {
                parent: parent.map(str::to_string),
                root: root.unwrap_or_else(|| run_id.to_string()),
            },
        );
        Ok(())
    }

    /// Frees a running slot (and forgets the lineage of a run that never came to exist).
    pub fn release(&self, run_id: &str) {
        let mut inner = lock(&self.inner);
        inner.running.remove(run_id);
        inner.last_release = Some(Instant::now());
        if !inner.runs.contains_key(run_id) {
            inner.lineage.remove(run_id);
        }
    }

    /// Whether `id` is `ancestor` or was started, directly or down a chain of sub-runbook
    /// calls, with a run token of `ancestor`.
    pub fn descends_from(&self, id: &str, ancestor: &str) -> bool {
        let inner = lock(&self.inner);
        let mut current = Some(id);
        while let Some(run) = current {
            if run == ancestor {
                return true;
            }
            current = inner.lineage.get(run).and_then(|l| l.parent.as_deref());
        }
        false
    }

    pub fn insert(&self, run: Arc<Run>) {
        lock(&self.inner).runs.insert(run.id.clone(), run);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Run>> {
        lock(&self.inner).runs.get(id).cloned()
    }

    pub fn forget(&self, id: &str) {
        let mut inner = lock(&self.inner);
        inner.runs.remove(id);
        inner.lineage.remove(id);
    }

    pub fn is_running(&self, id: &str) -> bool {
        lock(&self.inner).running.contains_key(id)
    }

    /// Whether no run is going and none ended within `span`.
    pub fn quiet_for(&self, span: Duration) -> bool {
        let inner = lock(&self.inner);
        inner.running.is_empty() && inner.last_release.is_none_or(|at| at.elapsed() >= span)
    }

    pub fn running_count(&self) -> usize {
        lock(&self.inner).running.len()
    }

    /// Every run, newest first.
    pub fn all(&self) -> Vec<Arc<Run>> {
        let mut runs: Vec<(chrono::DateTime<chrono::Utc>, Arc<Run>)> = lock(&self.inner)
            .runs
            .values()
            .map(|r| (r.record().started_at, r.clone()))
            .collect();
        runs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.id.cmp(&a.1.id)));
        runs.into_iter().map(|(_, r)| r).collect()
    }

    /// The runs still going.
    pub fn running(&self) -> Vec<Arc<Run>> {
        let inner = lock(&self.inner);
        inner
            .running
            .keys()
            .filter_map(|id| inner.runs.get(id).cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_total: usize, max_subruns: usize) -> AdmitLimits {
        AdmitLimits {
            max_total,
            max_subruns,
            per_runbook: None,
        }
    }

    #[test]
    fn the_runs_are_quiet_only_a_while_after_the_last_one_ended() {
        let runs = Registry::default();
        let hour = Duration::from_secs(3600);
        assert!(runs.quiet_for(hour), "no run yet: quiet");
        runs.admit("a", "A.md", None, &limits(4, 4)).unwrap();
        assert!(!runs.quiet_for(Duration::ZERO), "a run is going");
        runs.release("a");
        assert!(!runs.quiet_for(hour), "one just ended");
        std::thread::sleep(Duration::from_millis(20));
        assert!(runs.quiet_for(Duration::from_millis(10)));
    }

    #[test]
    fn sub_runs_are_exempt_up_to_the_cap_of_their_tree() {
        let runs = Registry::default();
        let l = limits(2, 2);
        runs.admit("root", "A.md", None, &l).unwrap();
        // Two exempt sub-runs: one child, one grandchild (the same tree).
        runs.admit("c1", "B.md", Some("root"), &l).unwrap();
        runs.admit("g1", "C.md", Some("c1"), &l).unwrap();
        // Beyond the cap a sub-run counts: one slot of MAX_CONCURRENT_RUNS is left.
        runs.admit("c2", "B.md", Some("root"), &l).unwrap();
        assert!(matches!(
            runs.admit("c3", "B.md", Some("g1"), &l),
            Err(AdmitError::TooManyRuns { limit: 2 })
        ));
        assert!(matches!(
            runs.admit("other", "A.md", None, &l),
            Err(AdmitError::TooManyRuns { .. })
        ));
        // An exempt run ending frees a place in the tree.
        runs.release("g1");
        runs.admit("c4", "B.md", Some("c2"), &l).unwrap();
        assert!(runs.descends_from("c4", "root"));
    }

    #[test]
    fn trees_have_separate_caps_and_a_finished_parent_starts_nothing() {
        let runs = Registry::default();
        let l = limits(2, 1);
        runs.admit("r1", "A.md", None, &l).unwrap();
        runs.admit("r2", "A.md", None, &l).unwrap();
        runs.admit("r1-sub", "B.md", Some("r1"), &l).unwrap();
        runs.admit("r2-sub", "B.md", Some("r2"), &l).unwrap();
        assert!(runs.admit("r1-sub2", "B.md", Some("r1"), &l).is_err());
        runs.release("r1");
        runs.release("r1-sub");
        // r1 is over: its token starts nothing; r2's tree has its own cap.
        assert!(matches!(
            runs.admit("late", "B.md", Some("r1"), &l),
            Err(AdmitError::ParentEnded)
        ));
        assert!(!runs.descends_from("late", "r1"));
        runs.admit("r2-counted", "B.md", Some("r2"), &l).unwrap();
        assert!(matches!(
            runs.admit("r2-more", "B.md", Some("r2"), &l),
            Err(AdmitError::TooManyRuns { .. })
        ));
    }

    #[test]
    fn descends_from_follows_parents_only() {
        let runs = Registry::default();
        let l = limits(10, 10);
        runs.admit("a", "A.md", None, &l).unwrap();
        runs.admit("b", "B.md", Some("a"), &l).unwrap();
        runs.admit("c", "C.md", Some("b"), &l).unwrap();
        runs.admit("x", "X.md", None, &l).unwrap();
        assert!(runs.descends_from("a", "a"));
        assert!(runs.descends_from("c", "a"));
        assert!(runs.descends_from("c", "b"));
        assert!(!runs.descends_from("a", "b"));
        assert!(!runs.descends_from("x", "a"));
        assert!(!runs.descends_from("unknown", "a"));
    }
}
