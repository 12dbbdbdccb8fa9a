//! Starting a run: everything between an accepted execute request and a supervised child.
//! Resolves and parses the runbook, applies RBAC, validates, prepares a working directory with
//! the inputs and the script, builds the environment, spawns, and hands the child to a run
//! thread that finishes the log, writes history and the audit line, and cleans up.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::app::App;
use crate::auth::{self, Principal, TokenRequest};
use crate::catalog::CatalogError;
use crate::history::{self, HistoryEntry, StreamExcerpt};
use crate::record::{self, RunRecord, RunStatus};
use crate::run::{AdmitError, Run};
use crate::runbook::{self, Runbook};
use crate::runenv::{self, RequestVars, SystemValues};
use crate::runlog::{Outcome, RunLog, Stream};
use crate::supervisor::{self, Launch, Limits, SpawnError};
use crate::sys;
use crate::text::normalize;
use crate::validation;

/// Why a run could not be started at all (no run exists afterwards).
#[derive(Debug)]
#[non_exhaustive]
pub enum ExecError {
    Catalog(CatalogError),
    Forbidden(String),
    Unavailable(String),
    Admission(AdmitError),
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecError::Catalog(e) => write!(f, "{e}"),
            ExecError::Forbidden(why) => write!(f, "{why}"),
            ExecError::Unavailable(why) => write!(f, "{why}"),
            ExecError::Admission(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ExecError {}

impl From<CatalogError> for ExecError {
    fn from(e: CatalogError) -> Self {
        ExecError::Catalog(e)
    }
}

/// An accepted execute request.
pub struct ExecuteRequest {
    pub file: String,
    pub principal: Principal,
    pub vars: RequestVars,
    pub correlation_id: Option<String>,
    pub recursion_stack: Vec<String>,
}

/// Checks the caller against the runbook's Required Claims; a refusal is written to history.
pub fn authorize(
    app: &App,
    path: &Path,
    book: &Runbook,
    principal: &Principal,
) -> Result<(), ExecError> {
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
    if let Err(reason) = verdict {
        let empty = StreamExcerpt::default();
        let stderr = StreamExcerpt {
            head: reason.clone(),
            ..StreamExcerpt::default()
        };
        let entry = history::format_entry(&HistoryEntry {
            finished_at: chrono::Utc::now(),
            exit_code: 403,
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

/// Starts a run. Validation and recursion failures still make a (failed) run, as stage0 does;
/// a missing runbook, RBAC, the concurrency limits and server trouble refuse to start.
pub fn start(app: &Arc<App>, req: ExecuteRequest) -> Result<Arc<Run>, ExecError> {
    if app.is_shutting_down() {
        return Err(ExecError::Unavailable("the server is shutting down".into()));
    }
    let (path, content) = app.catalog.read(&req.file)?;
    let book = runbook::parse(&content);
    authorize(app, &path, &book, &req.principal)?;
    let run_id = format!("{}-{}", app.config.instance_id, uuid::Uuid::new_v4());
    // A sub-runbook call of a running run does not count against MAX_CONCURRENT_RUNS, so
    // chains cannot starve.
    let is_subcall = !req.recursion_stack.is_empty()
        && req
            .principal
            .run_id
            .as_deref()
            .is_some_and(|parent| app.runs.is_running(parent));
    app.runs
        .admit(
            &run_id,
            &req.file,
            !is_subcall,
            app.config.max_concurrent_runs,
            book.concurrency_max,
        )
        .map_err(ExecError::Admission)?;
    let started = launch(app, req, &path, &book, &run_id);
    if started.is_err() {
        app.runs.release(&run_id);
    }
    started
}

fn launch(
    app: &Arc<App>,
    req: ExecuteRequest,
    path: &Path,
    book: &Runbook,
    run_id: &str,
) -> Result<Arc<Run>, ExecError> {
    let started = Instant::now();
    let log_path = record::log_path(&app.runs_dir, run_id);
    let log = RunLog::create(
        &log_path,
        app.config.history_output_bytes as usize,
        app.config.run_log_max_bytes,
    )
    .map_err(|e| ExecError::Unavailable(format!("cannot create the run log: {e}")))?;
    let findings = validation::validate(
        book,
        &req.file,
        &req.vars.vars,
        &|name| app.server_var(name),
        &app.catalog,
    );
    let mut errors = findings.errors;
    let mut warnings = findings.warnings;
    warnings.extend(req.vars.warnings.iter().cloned());
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
        error: None,
        errors: errors.clone(),
        warnings,
        history_error: None,
    };
    save_record(app, &record);
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

    let work = RunDirs::create(&app.config.execution_dir, run_id).map_err(|e| {
        unstarted.refused(&e);
        ExecError::Unavailable(format!("cannot create the working directory: {e}"))
    })?;
    let script = book.script.clone().unwrap_or_default();
    if let Err(e) = prepare(app, book, &work, &script) {
        work.remove();
        let msg = format!("runbookd: cannot prepare the run: {e}\n");
        unstarted.end(&msg, Outcome::failed(1, Some(msg.clone())));
        return Ok(run);
    }

    let now = chrono::Utc::now().timestamp();
    let deadline =
        now + (app.config.script_timeout + app.config.cancel_grace).as_secs() as i64 + 60;
    let run_token = auth::mint(
        &app.secret,
        &TokenRequest {
            issuer: &app.config.jwt_issuer,
            audience: &app.config.jwt_audience,
            subject: &req.principal.subject,
            roles: &req.principal.roles,
            issued_at: now,
            expires_at: deadline,
            run_id: Some(run_id),
        },
    );
    let mut stack = req.recursion_stack.clone();
    stack.push(req.file.clone());
    let stack_json = serde_json::to_string(&stack).unwrap_or_else(|_| "[]".into());
    let correlation_id = req
        .correlation_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let exec_dir = work.cwd.to_string_lossy().into_owned();
    let env = runenv::build(
        &app.script_base_env,
        &req.vars.vars,
        &SystemValues {
            run_token: &run_token,
            correlation_id: &correlation_id,
            runbook_url: &app.runbook_url(),
            recursion_stack_json: &stack_json,
            exec_dir: &exec_dir,
            run_id,
        },
    );
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
    let pgid = child.pid();
    let record = run.update(|r| {
        r.pgid = Some(pgid);
        r.pgid_start_ticks = sys::process_start_ticks(pgid).ok();
    });
    save_record(app, &record);
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
            let (outcome, cancelled) = child.supervise(limits, cancel_rx);
            work.remove();
            conclude(
                &thread_app,
                &thread_run,
                &thread_log,
                &thread_path,
                outcome,
                cancelled,
                started,
            );
        });
    if let Err(e) = spawned {
        // Without a supervisor the child must not linger.
        let _ = sys::kill_group(pgid);
        unstarted.refused(&e);
        return Err(ExecError::Unavailable(format!("cannot start the run: {e}")));
    }
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

fn save_record(app: &App, record: &RunRecord) {
    if let Err(e) = record::save(&app.runs_dir, record) {
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
    // Everything about the run is settled (record, history, slot) before `finish` lets the
    // viewers send `done`, so a client that got the result sees a finished run everywhere.
    let mut outcome = outcome;
    if outcome.error.is_none() {
        outcome.error = log.write_error();
    }
    let totals = log.totals();
    let status = if run.interrupted() {
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
    let history_error = write_history(app, path, &run.id, log, &outcome, None)
        .err()
        .map(|e| e.to_string());
    let record = run.update(|r| {
        r.status = status;
        r.finished_at = Some(outcome.finished_at);
        r.duration_ms = Some(started.elapsed().as_millis() as u64);
        r.return_code = Some(outcome.return_code);
        r.stdout_bytes = totals.stdout_bytes;
        r.stderr_bytes = totals.stderr_bytes;
        r.log_capped = log.capped_at().is_some();
        r.truncated = totals.stdout_bytes > limit || totals.stderr_bytes > limit || r.log_capped;
        r.error = outcome.error.clone();
        r.pgid = None;
        r.pgid_start_ticks = None;
        r.history_error = history_error;
    });
    save_record(app, &record);
    app.metrics
        .run_finished(status.as_str(), totals.stdout_bytes + totals.stderr_bytes);
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
/// working directory `work/` the script runs in.
struct RunDirs {
    root: PathBuf,
    cwd: PathBuf,
    script: PathBuf,
}

impl RunDirs {
    fn create(execution_dir: &Path, run_id: &str) -> io::Result<RunDirs> {
        let root = execution_dir.join(format!("runbookd-{run_id}"));
        let cwd = root.join("work");
        fs::create_dir_all(&cwd)?;
        Ok(RunDirs {
            script: root.join("script"),
            root,
            cwd,
        })
    }

    fn remove(&self) {
        if let Err(e) = fs::remove_dir_all(&self.root) {
            log::warn!("cannot remove {}: {e}", self.root.display());
        }
    }
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
