//! A run: one execution of a runbook, with its id, who started it, its log and the notes
//! (errors, warnings) that go into its result. `Registry` holds the runs still going.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;

use crate::runlog::RunLog;

/// One execution.
pub struct Run {
    pub id: String,
    pub runbook: String,
    pub user: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub log: Arc<RunLog>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// Dropping or sending on it cancels the run.
    pub cancel: Mutex<Option<Sender<()>>>,
}

/// The runs that have not finished yet.
#[derive(Default)]
pub struct Registry {
    running: Mutex<HashMap<String, Arc<Run>>>,
}

impl Registry {
    pub fn insert(&self, run: Arc<Run>) {
        self.lock().insert(run.id.clone(), run);
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn running_count(&self) -> usize {
        self.lock().len()
    }

    /// Every running run (for shutdown).
    pub fn all(&self) -> Vec<Arc<Run>> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Run>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}
