//! Starting a run: everything between an accepted execute request and a supervised child.
//! This root holds the request, the error that refuses a start, and admission (`start`); the
//! steps live in one file each: `claims` (RBAC and the refusal's History entry), `launch`
//! (log, validation, record, token, environment, spawn, run thread), `workdir` (the run's
//! directories, inputs and script file), `spare_dirs` (finished run directories kept for the
//! next runs) and `conclude` (record, History, metrics, audit line).
#![forbid(unsafe_code)]

mod claims;
mod conclude;
mod launch;
mod spare_dirs;
mod workdir;

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::app::App;
use crate::auth::Principal;
use crate::catalog::CatalogError;
use crate::fault;
use crate::run::{AdmitError, AdmitLimits, Run};
use crate::runenv::RequestVars;

pub use claims::{authorize, check_claims};
pub use conclude::write_history;
pub use spare_dirs::SpareDirs;
pub use workdir::remove_leftover_dirs;

use conclude::{conclude_after_panic, Progress};
use launch::launch;

/// Why a run could not be started at all (no run exists afterwards).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Admission(#[source] AdmitError),
    /// The request panicked before its run existed (the panic's message).
    #[error("while starting the run: {0}")]
    Internal(String),
}

/// An accepted execute request.
pub struct ExecuteRequest {
    pub file: String,
    pub principal: Principal,
    pub vars: RequestVars,
    pub correlation_id: Option<String>,
    /// The callers' runbooks, outermost first: from the run token for a sub-runbook call.
    pub recursion_stack: Vec<String>,
}

/// Starts a run. Validation and recursion failures still make a (failed) run, as stage0 does;
/// a missing runbook, RBAC, the concurrency limits and server trouble refuse to start.
pub fn start(app: &Arc<App>, req: ExecuteRequest) -> Result<Arc<Run>, ExecError> {
    if app.is_shutting_down() {
        return Err(ExecError::Unavailable("the server is shutting down".into()));
    }
    let entered = Instant::now();
    let (path, content) = app.catalog.read(&req.file)?;
    let book = app.parsed_runbooks.parse(&path, content);
    authorize(app, &path, &book, &req.principal)?;
    let drawn = app.run_ids.draw();
    let run_id = drawn.as_str();
    crate::stages::begin(run_id, entered);
    crate::stages::mark(run_id, "runbook");
    // A sub-runbook call made with a running run's token does not count against
    // MAX_CONCURRENT_RUNS (so chains cannot starve) up to MAX_SUBRUNS_PER_RUN per tree.
    let parent = req.principal.run_scope.as_ref().map(|s| s.run_id.as_str());
    app.runs
        .admit(
            run_id,
            &req.file,
            parent,
            &AdmitLimits {
                max_total: app.config.max_concurrent_runs,
                max_subruns: app.config.max_subruns_per_run,
                per_runbook: book.concurrency_max,
            },
        )
        .map_err(ExecError::Admission)?;
    crate::stages::mark(run_id, "admission");
    // Set once the run thread owns the run: from then on it concludes the run, whatever
    // happens to this request.
    let handed_over = Cell::new(false);
    let launched = catch_unwind(AssertUnwindSafe(|| {
        launch(app, req, &path, &book, &drawn, &handed_over)
    }));
    let started = match launched {
        Ok(started) => started,
        Err(payload) => launch_panicked(app, run_id, &path, &handed_over, payload.as_ref()),
    };
    if started.is_err() {
        app.runs.release(run_id);
    }
    started
}

/// A panic while starting a run: the run, if it exists and no thread owns it yet, is concluded
/// as failed (its child, if any, was killed when its supervisor handle was dropped).
fn launch_panicked(
    app: &Arc<App>,
    run_id: &str,
    path: &Path,
    handed_over: &Cell<bool>,
    payload: &(dyn std::any::Any + Send),
) -> Result<Arc<Run>, ExecError> {
    let message = fault::message(payload);
    let run = app.runs.get(run_id);
    let log = run.as_ref().and_then(|r| r.log().ok());
    match (run, log) {
        (Some(run), Some(log)) => {
            if !handed_over.get() && log.outcome().is_none() {
                conclude_after_panic(
                    app,
                    &run,
                    &log,
                    path,
                    &message,
                    Instant::now(),
                    &mut Progress::default(),
                );
            }
            Ok(run)
        }
        _ => Err(ExecError::Internal(message)),
    }
}
