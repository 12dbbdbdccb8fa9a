//! Starting a run: everything between an accepted execute request and a supervised child.
//! Resolves and parses the runbook, applies RBAC, validates, prepares a working directory with
//! the inputs and the script, builds the environment, spawns, and hands the child to a run
//! thread that finishes the log, writes history and the audit line, and cleans up.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::fs;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::app::App;
use crate::auth::{self, Principal, RunScope, TokenRequest};
use crate::catalog::CatalogError;
use crate::fault;
use crate::history::{self, HistoryEntry, StreamExcerpt};
use crate::output_text::normalize;
use crate::params;
use crate::privsep::{self, RunAs};
use crate::record::{self, RunRecord, RunStatus};
use crate::run::{AdmitError, AdmitLimits, Run};
use crate::runbook::{self, Runbook};
use crate::runenv::{self, RequestVars, SystemValues};
use crate::runlog::{Outcome, RunLog, Stream};
use crate::supervisor::{self, Launch, Limits, SpawnError};
use crate::sys;
use crate::validation;

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

/// Checks the caller against the runbook's Required Claims for an execute; a refusal is
/// written to history (only here: validating writes nothing, see [`check_claims`]).
pub fn authorize(
    app: &App,
    path: &Path,
    book: &Runbook,
    principal: &Principal,
) -> Result<(), ExecError> {
    if let Err(ExecError::Forbidden(reason)) = check_claims(book, principal) {
        let empty = StreamExcerpt::default();
        let stderr = StreamExcerpt {
            head: reason.clone(),
            ..StreamExcerpt::default()
        };
        let entry = history::format_entry(&HistoryEntry {
            finished_at: chrono::Utc::now(),
            exit_code: history::REFUSED_EXIT_CODE,
            run_id: None,
            stdout: &empty,
            stderr: &stderr,
        });
        if let Err(e) = history::append(
            path,
            &entry,
            app.config.history_max_entries,
            app.config.runbook_max_bytes,
        ) {
            log::error!("cannot write history: {e}");
        }
        return Err(ExecError::Forbidden(reason));
    }
    Ok(())
}

/// Checks the caller against the runbook's Required Claims (RBAC); writes nothing.
pub fn check_claims(book: &Runbook, principal: &Principal) -> Result<(), ExecError> {
    let required: Vec<(String, Vec<String>)> = book
        .required_claims
        .iter()
        .map(|c| (c.claim.clone(), c.values.clone()))
        .collect();
    let verdict = if book.required_claims_malformed {
        Err(
            "RBAC: the runbook's Required Claims block cannot be read; nobody may run it"
                .to_string(),
        )
    } else {
        auth::check_required_claims(principal, &required)
    };
    verdict.map_err(ExecError::Forbidden)
}

/// Starts a run. Validation and recursion failures still make a (failed) run, as stage0 does;
/// a missing runbook, RBAC, the concurrency limits and server trouble refuse to start.
pub fn start(app: &Arc<App>, req: ExecuteRequest) -> Result<Arc<Run>, ExecError> {
    if app.is_shutting_down() {
        return Err(ExecError::Unavailable("the server is shutting down".into()));
    }
    let entered = Instant::now();
    let (path, content) = app.catalog.read(&req.file)?;
    let book = runbook::parse(&content);
    authorize(app, &path, &book, &req.principal)?;
    let run_id = format!("{}-{}", app.config.instance_id, uuid::Uuid::new_v4());
    crate::stages::begin(&run_id, entered);
    crate::stages::mark(&run_id, "runbook");
    // A sub-runbook call made with a running run's token does not count against
    // MAX_CONCURRENT_RUNS (so chains cannot starve) up to MAX_SUBRUNS_PER_RUN per tree.
    let parent = req.principal.run_scope.as_ref().map(|s| s.run_id.as_str());
    app.runs
        .admit(
            &run_id,
            &req.file,
            parent,
            &AdmitLimits {
                max_total: app.config.max_concurrent_runs,
                max_subruns: app.config.max_subruns_per_run,
                per_runbook: book.concurrency_max,
            },
        )
        .map_err(ExecError::Admission)?;
    crate::stages::mark(&run_id, "admission");
    // Set once the run thread owns the run: from then on it concludes the run, whatever
    // happens to this request.
    let handed_over = Cell::new(false);
    let launched = catch_unwind(AssertUnwindSafe(|| {
        launch(app, req, &path, &book, &run_id, &handed_over)
    }));
    let started = match launched {
        Ok(started) => started,
        Err(payload) => launch_panicked(app, &run_id, &path, &handed_over, payload.as_ref()),
    };
    if started.is_err() {
        app.runs.release(&run_id);
    }
    started
}

/// How a refusal for want of room in STATE_DIR starts.
const NO_ROOM: &str = "the state directory cannot take a new run";

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

fn launch(
    app: &Arc<App>,
    req: ExecuteRequest,
    path: &Path,
    book: &Runbook,
    run_id: &str,
    handed_over: &Cell<bool>,
) -> Result<Arc<Run>, ExecError> {
    fault::test_point("launch-early");
    let started = Instant::now();
    let log_path = record::log_path(&app.runs_dir, run_id);
    let log = RunLog::create(
        &log_path,
        usize::try_from(app.config.history_output_bytes).unwrap_or(usize::MAX),
        app.config.run_log_max_bytes,
    )
    .map_err(|e| ExecError::Unavailable(format!("{NO_ROOM}: cannot create its log: {e}")))?;
    crate::stages::mark(run_id, "log file");
    // Only what the runbook declares reaches the script; the rest is named in a warning.
    let vars = params::keep_declared(&req.vars, book);
    let findings = validation::validate(
        book,
        &req.file,
        &vars.vars,
        &|name| app.server_var(name),
        &app.catalog,
    );
    let mut errors = findings.errors;
    let mut warnings = findings.warnings;
    warnings.extend(vars.warnings.iter().cloned());
    if req.recursion_stack.iter().any(|r| r == &req.file) {
        errors.push(format!(
            "recursion refused: {} is already in the call stack {:?}",
            req.file, req.recursion_stack
        ));
    } else if req.recursion_stack.len() >= app.config.max_recursion_depth {
        errors.push(format!(
            "recursion refused: call depth {} reaches MAX_RECURSION_DEPTH {}",
            req.recursion_stack.len(),
            app.config.max_recursion_depth
        ));
    }
    crate::stages::mark(run_id, "validation");
    let record = RunRecord {
        run_id: run_id.to_string(),
        runbook: req.file.clone(),
        status: RunStatus::Running,
        user: req.principal.subject.clone(),
        started_at: chrono::Utc::now(),
        finished_at: None,
        duration_ms: None,
        return_code: None,
        stdout_bytes: 0,
        stderr_bytes: 0,
        truncated: false,
        log_capped: false,
        pgid: None,
        pgid_start_ticks: None,
        boot_id: None,
        cgroup: None,
        error: None,
        errors: errors.clone(),
        warnings,
        history_error: None,
        script_started: Some(false),
    };
    // Nothing starts that could not be recorded (a full or read-only state directory).
    if let Err(e) = record::save(&app.runs_dir, &record) {
        drop(log);
        let _ = fs::remove_file(&log_path);
        return Err(ExecError::Unavailable(format!(
            "{NO_ROOM}: cannot write its record: {e}"
        )));
    }
    crate::stages::mark(run_id, "record");
    let log = Arc::new(log);
    let run = Arc::new(Run::new(record, log_path, Some(log.clone())));
    app.runs.insert(run.clone());
    app.metrics.run_started();
    let unstarted = Unstarted {
        app,
        run: &run,
        log: &log,
        path,
        started,
    };
    if !errors.is_empty() {
        let error = Some(format!("validation failed: {}", errors.join("; ")));
        unstarted.end(
            &format!("{}\n", errors.join("\n")),
            Outcome::failed(1, error),
        );
        return Ok(run);
    }

    let work = RunDirs::create(&app.config.execution_dir, run_id, app.run_as).map_err(|e| {
        unstarted.refused(&e);
        ExecError::Unavailable(format!("cannot create the working directory: {e}"))
    })?;
    let script = book.script.clone().unwrap_or_default();
    if let Err(e) = prepare(app, book, &work, &script).and_then(|()| work.hand_over()) {
        work.remove();
        let msg = format!("runbookd: cannot prepare the run: {e}\n");
        unstarted.end(&msg, Outcome::failed(1, Some(msg.clone())));
        return Ok(run);
    }

    crate::stages::mark(run_id, "work dir");
    let now = chrono::Utc::now().timestamp();
    // The token outlives the longest the script may run (timeout, grace, a minute to spare).
    let lifetime = app
        .config
        .script_timeout
        .saturating_add(app.config.cancel_grace)
        .as_secs()
        .saturating_add(60);
    let deadline = now.saturating_add(i64::try_from(lifetime).unwrap_or(i64::MAX));
    let mut stack = req.recursion_stack.clone();
    stack.push(req.file.clone());
    let scope = RunScope {
        run_id: run_id.to_string(),
        stack,
    };
    let run_token = auth::mint(
        &app.secret,
        &TokenRequest {
            issuer: &app.config.jwt_issuer,
            audience: &app.config.jwt_audience,
            subject: &req.principal.subject,
            roles: &req.principal.roles,
            issued_at: now,
            expires_at: deadline,
            run: Some(&scope),
        },
    );
    let stack_json = serde_json::to_string(&scope.stack).unwrap_or_else(|_| "[]".into());
    let correlation_id = req
        .correlation_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let exec_dir = work.cwd.to_string_lossy().into_owned();
    let env = runenv::build(
        &app.script_base_env,
        &vars.vars,
        &SystemValues {
            run_token: &run_token,
            correlation_id: &correlation_id,
            runbook_url: &app.runbook_url(),
            recursion_stack_json: &stack_json,
            exec_dir: &exec_dir,
            run_id,
        },
    );
    crate::stages::mark(run_id, "token and env");
    let interpreter = runbook::interpreter_of(&script);
    let mut args = Vec::new();
    if let Some(arg) = &interpreter.arg {
        args.push(arg.into());
    }
    args.push(work.script.clone().into_os_string());
    let launch = Launch {
        program: PathBuf::from(&interpreter.program),
        args,
        cwd: work.cwd.clone(),
        env,
        nofile_soft: app.nofile_soft,
        cgroup: app.run_cgroups.as_ref().map(|c| c.run_path(run_id)),
        run_as: app.run_as.map(|r| (r.uid, r.gid)),
    };
    let child = match supervisor::spawn(&launch, log.clone(), Some(&run_token)) {
        Ok(child) => child,
        Err(SpawnError::Exhausted(e)) => {
            work.remove();
            unstarted.refused(&e);
            return Err(ExecError::Unavailable(format!(
                "cannot start the script now ({e}); try again later"
            )));
        }
        Err(e) => {
            work.remove();
            let msg = format!("runbookd: {}: {e}\n", interpreter.program);
            unstarted.end(&msg, Outcome::failed(e.return_code(), None));
            return Ok(run);
        }
    };
    crate::stages::mark(run_id, "spawn");
    let pgid = child.pid();
    let record = run.update(|r| {
        r.script_started = Some(true);
        r.pgid = Some(pgid);
        r.pgid_start_ticks = sys::process_start_ticks(pgid).ok();
        r.boot_id = crate::leftover::boot_id().ok();
        r.cgroup = child
            .cgroup_path()
            .map(|p| p.to_string_lossy().into_owned());
    });
    save_record(app, &record);
    crate::stages::mark(run_id, "record with pgid");
    fault::test_point("launch");
    let (cancel_tx, cancel_rx) = crossbeam_channel::unbounded();
    run.set_cancel(cancel_tx);
    let limits = Limits {
        timeout: app.config.script_timeout,
        kill_grace: app.config.cancel_grace,
        orphan_grace: app.config.orphan_grace,
    };
    let thread_app = app.clone();
    let thread_run = run.clone();
    let thread_log = log.clone();
    let thread_path = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name(format!("run-{}", &run_id[..run_id.len().min(16)]))
        .spawn(move || {
            let mut progress = Progress::default();
            let ran = catch_unwind(AssertUnwindSafe(|| {
                let (outcome, cancelled) = child.supervise(limits, cancel_rx);
                crate::stages::mark(&thread_run.id, "script and readers");
                work.remove();
                crate::stages::mark(&thread_run.id, "work dir removed");
                conclude_tracked(
                    &thread_app,
                    &thread_run,
                    &thread_log,
                    &thread_path,
                    outcome,
                    cancelled,
                    started,
                    &mut progress,
                );
            }));
            if let Err(payload) = ran {
                // The child was killed and reaped when its handle was dropped.
                work.remove();
                conclude_after_panic(
                    &thread_app,
                    &thread_run,
                    &thread_log,
                    &thread_path,
                    &fault::message(payload.as_ref()),
                    started,
                    &mut progress,
                );
            }
        });
    if let Err(e) = spawned {
        // Without a supervisor the child must not linger: dropping its handle (moved into the
        // closure that was not started) killed its group and reaped it.
        unstarted.refused(&e);
        return Err(ExecError::Unavailable(format!("cannot start the run: {e}")));
    }
    handed_over.set(true);
    crate::stages::mark(run_id, "run thread");
    Ok(run)
}

impl Outcome {
    fn failed(return_code: i32, error: Option<String>) -> Outcome {
        Outcome {
            return_code,
            error,
            timed_out: false,
            finished_at: chrono::Utc::now(),
        }
    }
}

/// Writes a newer version of a run's record (its first one was written by `record::save`).
fn save_record(app: &App, record: &RunRecord) {
    if let Err(e) = record::update(&app.runs_dir, record) {
        log::error!("run {}: cannot write its record: {e}", record.run_id);
    }
}

/// A run that ends before its script started: what concluding it needs.
struct Unstarted<'a> {
    app: &'a App,
    run: &'a Run,
    log: &'a RunLog,
    path: &'a Path,
    started: Instant,
}

impl Unstarted<'_> {
    /// Writes `message` to the run's stderr and concludes it with `outcome`.
    fn end(&self, message: &str, outcome: Outcome) {
        self.log.append(Stream::Stderr, message.as_bytes());
        conclude(
            self.app,
            self.run,
            self.log,
            self.path,
            outcome,
            false,
            self.started,
        );
    }

    /// The server could not start the script after all (the client gets 503).
    fn refused(&self, e: &io::Error) {
        let msg = format!("runbookd: the server could not start the script: {e}\n");
        self.end(&msg, Outcome::failed(1, Some(msg.clone())));
    }
}

/// Ends a run: finishes its log (viewers then send `done`), writes its record, history entry,
/// metrics and audit line, and frees its running slot.
fn conclude(
    app: &App,
    run: &Run,
    log: &RunLog,
    path: &Path,
    outcome: Outcome,
    cancelled: bool,
    started: Instant,
) {
    conclude_tracked(
        app,
        run,
        log,
        path,
        outcome,
        cancelled,
        started,
        &mut Progress::default(),
    );
}

/// How far concluding a run got, so that concluding it again after a panic repeats nothing.
#[derive(Debug, Default)]
struct Progress {
    history_written: bool,
    metrics_counted: bool,
}

#[allow(clippy::too_many_arguments)]
fn conclude_tracked(
    app: &App,
    run: &Run,
    log: &RunLog,
    path: &Path,
    outcome: Outcome,
    cancelled: bool,
    started: Instant,
    progress: &mut Progress,
) {
    // Everything about the run is settled (record, history, slot) before `finish` lets the
    // viewers send `done`, so a client that got the result sees a finished run everywhere.
    let mut outcome = outcome;
    if outcome.error.is_none() {
        outcome.error = log.write_error();
    }
    let totals = log.totals();
    // A run the shutdown stopped is interrupted (in its record and in `done`); one that ended
    // on its own before the stop reached it keeps its own status.
    let interrupted = run.interrupted() && cancelled;
    if interrupted {
        outcome.error = Some(crate::lifecycle::INTERRUPTED_REASON.to_string());
    }
    let status = if interrupted {
        RunStatus::Interrupted
    } else if cancelled {
        RunStatus::Cancelled
    } else if outcome.timed_out {
        RunStatus::TimedOut
    } else if outcome.return_code == 0 && outcome.error.is_none() {
        RunStatus::Succeeded
    } else {
        RunStatus::Failed
    };
    let limit = app.config.max_output_bytes;
    fault::test_point("conclude-before-history");
    let history_error = write_history(app, path, &run.id, log, &outcome, None)
        .err()
        .map(|e| e.to_string());
    progress.history_written = true;
    crate::stages::mark(&run.id, "history");
    let record = run.update(|r| {
        r.status = status;
        r.finished_at = Some(outcome.finished_at);
        r.duration_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        r.return_code = Some(outcome.return_code);
        r.stdout_bytes = totals.stdout_bytes;
        r.stderr_bytes = totals.stderr_bytes;
        r.log_capped = log.capped_at().is_some();
        r.truncated = totals.stdout_bytes > limit || totals.stderr_bytes > limit || r.log_capped;
        r.error = outcome.error.clone();
        r.pgid = None;
        r.pgid_start_ticks = None;
        r.boot_id = None;
        r.cgroup = None;
        r.history_error = history_error;
    });
    save_record(app, &record);
    crate::stages::mark(&run.id, "final record");
    app.metrics
        .run_finished(status.as_str(), totals.stdout_bytes + totals.stderr_bytes);
    progress.metrics_counted = true;
    let audit = serde_json::json!({
        "event": "run",
        "user": run.user,
        "runbook": run.runbook,
        "run_id": run.id,
        "status": status,
        "return_code": outcome.return_code,
        "duration_ms": record.duration_ms,
        "stdout_bytes": totals.stdout_bytes,
        "stderr_bytes": totals.stderr_bytes,
    });
    log::info!(target: "runbookd::audit", "{audit}");
    app.runs.release(&run.id);
    crate::stages::mark(&run.id, "metrics audit release");
    log.finish(outcome);
    run.release_live_log();
    app.retention.run_ended(app, run);
    crate::stages::mark(&run.id, "retention");
}

/// Concludes a run after a panic in one of its threads or in the request starting it: status
/// `failed` with the panic as its error, record, history entry (unless already written), `done`
/// to viewers and its slot freed. Each step goes on even if an earlier one panics again.
fn conclude_after_panic(
    app: &App,
    run: &Run,
    log: &RunLog,
    path: &Path,
    message: &str,
    started: Instant,
    progress: &mut Progress,
) {
    log::error!(
        "run {}: internal error while running; concluding it as failed",
        run.id
    );
    let error = fault::internal_error(message);
    let outcome = Outcome::failed(-1, Some(error.clone()));
    let recorded = catch_unwind(AssertUnwindSafe(|| {
        let totals = log.totals();
        let record = run.update(|r| {
            r.status = RunStatus::Failed;
            r.finished_at = Some(outcome.finished_at);
            r.duration_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
            r.return_code = Some(outcome.return_code);
            r.stdout_bytes = totals.stdout_bytes;
            r.stderr_bytes = totals.stderr_bytes;
            r.log_capped = log.capped_at().is_some();
            r.error = Some(error.clone());
            r.pgid = None;
            r.pgid_start_ticks = None;
            r.boot_id = None;
            r.cgroup = None;
        });
        save_record(app, &record);
        if !progress.history_written {
            progress.history_written = true;
            if let Err(e) = write_history(app, path, &run.id, log, &outcome, Some(&error)) {
                let record = run.update(|r| r.history_error = Some(e.to_string()));
                save_record(app, &record);
            }
        }
        if !progress.metrics_counted {
            progress.metrics_counted = true;
            app.metrics.run_finished(
                RunStatus::Failed.as_str(),
                totals.stdout_bytes + totals.stderr_bytes,
            );
        }
    }));
    if recorded.is_err() {
        log::error!("run {}: its record or history could not be written", run.id);
    }
    app.runs.release(&run.id);
    log.finish(outcome);
    run.release_live_log();
}

/// Appends the history entry of a run that is over to the runbook at `path`: its exit code and
/// the head and tail of each stream as kept by `log`, with `note` as a last stderr line.
/// A failure is logged and returned (the run's record shows it); the run concludes anyway.
pub fn write_history(
    app: &App,
    path: &Path,
    run_id: &str,
    log: &RunLog,
    outcome: &Outcome,
    note: Option<&str>,
) -> Result<(), history::HistoryError> {
    let excerpt = |stream| {
        let ex = log.excerpt(stream);
        StreamExcerpt {
            head: normalize(&ex.head).into_owned(),
            tail: normalize(&ex.tail).into_owned(),
            omitted_bytes: ex.omitted,
        }
    };
    let stdout = excerpt(Stream::Stdout);
    let mut stderr = excerpt(Stream::Stderr);
    if let Some(note) = note {
        let last = if stderr.omitted_bytes > 0 {
            &mut stderr.tail
        } else {
            &mut stderr.head
        };
        if !last.is_empty() && !last.ends_with('\n') {
            last.push('\n');
        }
        last.push_str(note);
        last.push('\n');
    }
    let entry = history::format_entry(&HistoryEntry {
        finished_at: outcome.finished_at,
        exit_code: outcome.return_code,
        run_id: Some(run_id),
        stdout: &stdout,
        stderr: &stderr,
    });
    history::append(
        path,
        &entry,
        app.config.history_max_entries,
        app.config.runbook_max_bytes,
    )
    .inspect_err(|e| log::error!("run {run_id}: cannot write history: {e}"))
}

/// A run's directories: `<EXECUTION_DIR>/runbookd-<run id>/` holding the script file and the
/// working directory `work/` the script runs in. With `RUN_AS_USER` the root stays runbookd's
/// and the script file and `work/` become the script user's (`privsep::hand_over`).
struct RunDirs {
    root: PathBuf,
    cwd: PathBuf,
    script: PathBuf,
    run_as: Option<RunAs>,
    removed: Cell<bool>,
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
        }
    }

    fn create(execution_dir: &Path, run_id: &str, run_as: Option<RunAs>) -> io::Result<RunDirs> {
        let dirs = RunDirs::at(execution_dir, run_id, run_as);
        if let Err(e) = fs::create_dir_all(&dirs.cwd) {
            // Nothing of ours to remove, or only what `remove_dir_all` may not touch.
            dirs.removed.set(true);
            return Err(e);
        }
        Ok(dirs)
    }

    /// Once prepared: gives the script file and `work/` to the script user, if there is one.
    fn hand_over(&self) -> io::Result<()> {
        match self.run_as {
            Some(run_as) => privsep::hand_over(&self.root, &self.cwd, &self.script, run_as),
            None => Ok(()),
        }
    }

    fn remove(&self) {
        if self.removed.replace(true) {
            return;
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
fn prepare(app: &App, book: &Runbook, dirs: &RunDirs, script: &str) -> io::Result<()> {
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
    fs::write(&dirs.script, script)
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
