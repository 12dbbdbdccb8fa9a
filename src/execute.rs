//! Starting a run: everything between an accepted execute request and a supervised child.
//! Resolves and parses the runbook, applies RBAC, validates, prepares a working directory with
//! the inputs and the script, builds the environment, spawns, and hands the child to a run
//! thread that finishes the log, writes history and the audit line, and cleans up.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::app::App;
use crate::auth::{self, Principal, TokenRequest};
use crate::catalog::CatalogError;
use crate::history::{self, HistoryEntry, StreamExcerpt};
use crate::run::Run;
use crate::runbook::{self, Runbook};
use crate::runenv::{self, RequestVars, SystemValues};
use crate::runlog::{Outcome, RunLog, Stream};
use crate::supervisor::{self, Launch, Limits, SpawnError};
use crate::text::normalize;
use crate::validation;

/// Grace between TERM and KILL when a run is timed out.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Why a run could not be started at all (no run exists afterwards).
#[derive(Debug)]
#[non_exhaustive]
pub enum ExecError {
    Catalog(CatalogError),
    Forbidden(String),
    Unavailable(String),
    Internal(String),
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecError::Catalog(e) => write!(f, "{e}"),
            ExecError::Forbidden(why) => write!(f, "{why}"),
            ExecError::Unavailable(why) => write!(f, "{why}"),
            ExecError::Internal(why) => write!(f, "{why}"),
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
pub fn authorize(app: &App, path: &Path, book: &Runbook, principal: &Principal) -> Result<(), ExecError> {
    let required: Vec<(String, Vec<String>)> = book
        .required_claims
        .iter()
        .map(|c| (c.claim.clone(), c.values.clone()))
        .collect();
    if let Err(reason) = auth::check_required_claims(principal, &required) {
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
        if let Err(e) = history::append(path, &entry, app.config.history_max_entries) {
            log::error!("cannot write history: {e}");
        }
        return Err(ExecError::Forbidden(reason));
    }
    Ok(())
}

/// Starts a run. Validation and recursion failures still make a (failed) run, as stage0 does;
/// only a missing runbook, RBAC and server trouble refuse to start.
pub fn start(app: &Arc<App>, req: ExecuteRequest) -> Result<Arc<Run>, ExecError> {
    let (path, content) = app.catalog.read(&req.file)?;
    let book = runbook::parse(&content);
    authorize(app, &path, &book, &req.principal)?;

    let run_id = format!("{}-{}", app.config.instance_id, uuid::Uuid::new_v4());
    let log_path = app.runs_dir.join(format!("{run_id}.log"));
    let log = RunLog::create(&log_path, app.config.history_output_bytes as usize)
        .map_err(|e| ExecError::Internal(format!("cannot create the run log: {e}")))?;
    let findings = validation::validate(
        &book,
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
    let run = Arc::new(Run {
        id: run_id.clone(),
        runbook: req.file.clone(),
        user: req.principal.subject.clone(),
        started_at: chrono::Utc::now(),
        log: Arc::new(log),
        errors: errors.clone(),
        warnings,
        cancel: Mutex::new(None),
    });
    app.metrics.run_started();
    let started = Instant::now();
    if !errors.is_empty() {
        let text = format!("{}\n", errors.join("\n"));
        run.log.append(Stream::Stderr, text.as_bytes());
        let error = Some(format!("validation failed: {}", errors.join("; ")));
        conclude(app, &run, &path, Some(&Outcome::failed(1, error)), started);
        return Ok(run);
    }

    let work = RunDirs::create(&app.config.execution_dir, &run_id)
        .map_err(|e| ExecError::Internal(format!("cannot create the working directory: {e}")))?;
    let script = book.script.clone().unwrap_or_default();
    let prepared = prepare(app, &book, &work, &script);
    if let Err(e) = prepared {
        work.remove();
        let msg = format!("cannot prepare the run: {e}\n");
        run.log.append(Stream::Stderr, msg.as_bytes());
        conclude(app, &run, &path, Some(&Outcome::failed(1, Some(msg))), started);
        return Ok(run);
    }

    let now = chrono::Utc::now().timestamp();
    let deadline = now + (app.config.script_timeout + KILL_GRACE).as_secs() as i64 + 60;
    let run_token = auth::mint(
        &app.secret,
        &TokenRequest {
            issuer: &app.config.jwt_issuer,
            audience: &app.config.jwt_audience,
            subject: &req.principal.subject,
            roles: &req.principal.roles,
            issued_at: now,
            expires_at: deadline,
            run_id: Some(&run_id),
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
            run_id: &run_id,
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
    let child = match supervisor::spawn(&launch, run.log.clone(), Some(&run_token)) {
        Ok(child) => child,
        Err(SpawnError::Exhausted(e)) => {
            work.remove();
            run.log.append(Stream::Stderr, b"runbookd: server out of resources\n");
            conclude(app, &run, &path, Some(&Outcome::failed(1, Some(e.to_string()))), started);
            return Err(ExecError::Unavailable(format!(
                "cannot start the script now: {e}; try again later"
            )));
        }
        Err(e) => {
            work.remove();
            let msg = format!("runbookd: {}: {e}\n", interpreter.program);
            run.log.append(Stream::Stderr, msg.as_bytes());
            let outcome = Outcome::failed(e.return_code(), None);
            conclude(app, &run, &path, Some(&outcome), started);
            return Ok(run);
        }
    };
    let (cancel_tx, cancel_rx) = crossbeam_channel::bounded(1);
    if let Ok(mut slot) = run.cancel.lock() {
        *slot = Some(cancel_tx);
    }
    app.runs.insert(run.clone());
    let limits = Limits {
        timeout: app.config.script_timeout,
        kill_grace: KILL_GRACE,
        orphan_grace: app.config.orphan_grace,
    };
    let thread_app = app.clone();
    let thread_run = run.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("run-{}", &run_id[..run_id.len().min(16)]))
        .spawn(move || {
            let (outcome, _cancelled) = child.supervise(limits, cancel_rx);
            work.remove();
            conclude(&thread_app, &thread_run, &path, Some(&outcome), started);
            thread_app.runs.remove(&thread_run.id);
        });
    if let Err(e) = spawned {
        app.runs.remove(&run.id);
        log::error!("cannot start run thread: {e}");
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

/// Ends a run: finishes its log, appends its history entry, writes the audit line.
fn conclude(app: &App, run: &Run, path: &Path, outcome: Option<&Outcome>, started: Instant) {
    let outcome = match outcome {
        Some(o) => run.log.finish(o.clone()),
        None => run.log.wait_end(),
    };
    let excerpt = |stream| {
        let ex = run.log.excerpt(stream);
        StreamExcerpt {
            head: normalize(&ex.head).into_owned(),
            tail: normalize(&ex.tail).into_owned(),
            omitted_bytes: ex.omitted,
        }
    };
    let (stdout, stderr) = (excerpt(Stream::Stdout), excerpt(Stream::Stderr));
    let entry = history::format_entry(&HistoryEntry {
        finished_at: outcome.finished_at,
        exit_code: outcome.return_code,
        run_id: Some(&run.id),
        stdout: &stdout,
        stderr: &stderr,
    });
    if let Err(e) = history::append(path, &entry, app.config.history_max_entries) {
        log::error!("run {}: cannot write history: {e}", run.id);
    }
    let totals = run.log.totals();
    let result = if outcome.timed_out {
        "timed_out"
    } else if outcome.return_code == 0 && outcome.error.is_none() {
        "succeeded"
    } else {
        "failed"
    };
    app.metrics
        .run_finished(result, totals.stdout_bytes + totals.stderr_bytes);
    let audit = serde_json::json!({
        "event": "run",
        "user": run.user,
        "runbook": run.runbook,
        "run_id": run.id,
        "result": result,
        "return_code": outcome.return_code,
        "duration_ms": started.elapsed().as_millis() as u64,
        "stdout_bytes": totals.stdout_bytes,
        "stderr_bytes": totals.stderr_bytes,
    });
    log::info!(target: "runbookd::audit", "{audit}");
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
        let name = source
            .file_name()
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
