//! A run: one execution of a runbook, with its record, its log and its cancel switch; and the
//! `Registry` of every known run, which also admits new runs against the concurrency limits
//! (the check and the reservation happen under one lock).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::Sender;

use crate::supervisor::StopRequest;

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
    cancel: Mutex<Option<Sender<StopRequest>>>,
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

    pub fn set_cancel(&self, sender: Sender<StopRequest>) {
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
            .is_some_and(|tx| tx.send(request).is_ok())
    }
}

/// Why a run was not admitted.
#[derive(Debug)]
#[non_exhaustive]
pub enum AdmitError {
    TooManyRuns { limit: usize },
    RunbookBusy { max: u32, running: Vec<String> },
}

impl fmt::Display for AdmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdmitError::TooManyRuns { limit } => write!(
                f,
                "too many runs: {limit} are running (MAX_CONCURRENT_RUNS); try again later"
            ),
            AdmitError::RunbookBusy { max, running } => write!(
                f,
                "this runbook allows {max} concurrent run(s); running: {}",
                running.join(", ")
            ),
        }
    }
}

impl std::error::Error for AdmitError {}

#[derive(Default)]
struct Inner {
    runs: HashMap<String, Arc<Run>>,
    /// Running run id -> (runbook, counts against MAX_CONCURRENT_RUNS).
    running: HashMap<String, (String, bool)>,
}

/// Every run this server knows, and which of them are running.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

impl Registry {
    /// Reserves a running slot for `run_id` or says why not. `counted`: false for sub-runbook
    /// calls of a running run, which the global limit does not apply to.
    pub fn admit(
        &self,
        run_id: &str,
        runbook: &str,
        counted: bool,
        max_total: usize,
        per_runbook: Option<u32>,
    ) -> Result<(), AdmitError> {
        let mut inner = lock(&self.inner);
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
        Ok(())
    }

    /// Frees a running slot.
    pub fn release(&self, run_id: &str) {
        lock(&self.inner).running.remove(run_id);
    }

    pub fn insert(&self, run: Arc<Run>) {
        lock(&self.inner).runs.insert(run.id.clone(), run);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Run>> {
        lock(&self.inner).runs.get(id).cloned()
    }

    pub fn forget(&self, id: &str) {
        lock(&self.inner).runs.remove(id);
    }

    pub fn is_running(&self, id: &str) -> bool {
        lock(&self.inner).running.contains_key(id)
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
