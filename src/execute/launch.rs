//! Launching an admitted run, step by step: its log, the checks (validation, recursion), its
//! first record, the working directory, the run token and environment, the spawn, and the run
//! thread that supervises the child and concludes the run.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::fs;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::app::App;
use crate::auth::{self, RunScope, TokenRequest};
use crate::fault;
use crate::params;
use crate::record::{self, RunRecord, RunStatus};
use crate::run::Run;
use crate::run_ids::DrawnId;
use crate::runbook::{self, Runbook};
use crate::runenv::{self, RequestVars, SystemValues};
use crate::runlog::{Outcome, RunLog};
use crate::supervisor::{self, Launch, Limits, SpawnError, Supervised};
use crate::sys;
use crate::validation;

use super::conclude::{conclude, conclude_after_panic, save_record, Progress, RunBeforeScript};
use super::workdir::{prepare, RunDirs};
use super::{ExecError, ExecuteRequest};

/// How a refusal for want of room in STATE_DIR starts.
const NO_ROOM: &str = "the state directory cannot take a new run";

/// Launches admitted run `run_id`. Sets `handed_over` once the run thread owns the run.
pub(super) fn launch(
    app: &Arc<App>,
    req: ExecuteRequest,
    path: &Path,
    book: &Runbook,
    drawn: &DrawnId,
    handed_over: &Cell<bool>,
) -> Result<Arc<Run>, ExecError> {
    let run_id = drawn.as_str();
    fault::test_point("launch-early");
    let started = Instant::now();
    let (log, log_path) = create_log(app, run_id)?;
    crate::stages::mark(run_id, "log file");
    let Checked {
        vars,
        errors,
        warnings,
    } = check_request(app, &req, book);
    crate::stages::mark(run_id, "validation");
    let (run, log) = prepare_record(app, &req, run_id, errors.clone(), warnings, log, log_path)?;
    let before = RunBeforeScript {
        app,
        run: &run,
        log: &log,
        path,
        started,
    };
    if !errors.is_empty() {
        let error = Some(format!("validation failed: {}", errors.join("; ")));
        before.end(
            &format!("{}\n", errors.join("\n")),
            Outcome::failed(1, error),
        );
        return Ok(run);
    }

    let script = book.script.clone().unwrap_or_default();
    let Some(work) = prepare_work_dir(app, book, &script, run_id, &before)? else {
        return Ok(run);
    };
    crate::stages::mark(run_id, "work dir");
    let (run_token, scope) = mint_run_token(app, &req, run_id);
    let env = build_environment(app, &req, &vars, &scope, &run_token, &work);
    crate::stages::mark(run_id, "token and env");
    let launch = script_launch(app, drawn, &script, &work, env);
    let child = match supervisor::spawn(&launch, log.clone(), Some(&run_token), &app.run_threads) {
        Ok(child) => {
            drawn.cgroup_taken();
            child
        }
        Err(SpawnError::Exhausted(e)) => {
            work.remove();
            before.refused(&e);
            return Err(ExecError::Unavailable(format!(
                "cannot start the script now ({e}); try again later"
            )));
        }
        Err(e) => {
            work.remove();
            let msg = format!("runbookd: {}: {e}\n", launch.program.display());
            before.end(&msg, Outcome::failed(e.return_code(), None));
            return Ok(run);
        }
    };
    crate::stages::mark(run_id, "spawn");
    fault::test_point("launch");
    if let Err(e) = spawn_supervised(app, &run, &log, path, child, work, started) {
        // Without a supervisor the child must not linger: dropping its handle (moved into the
        // closure that was not started) killed its group and reaped it.
        before.refused(&e);
        return Err(ExecError::Unavailable(format!("cannot start the run: {e}")));
    }
    handed_over.set(true);
    crate::stages::mark(run_id, "run thread");
    Ok(run)
}

/// Creates the run's log file.
fn create_log(app: &App, run_id: &str) -> Result<(RunLog, PathBuf), ExecError> {
    let log_path = record::log_path(&app.runs_dir, run_id);
    let file = crate::spare_files::create_appendable(Some(&app.spare_files), &log_path)
        .map_err(|e| ExecError::Unavailable(format!("{NO_ROOM}: cannot create its log: {e}")))?;
    let log = RunLog::in_new_file(
        &log_path,
        file,
        usize::try_from(app.config.history_output_bytes).unwrap_or(usize::MAX),
        app.config.run_log_max_bytes,
    );
    Ok((log, log_path))
}

/// What the checks before a run found.
struct Checked {
    /// The request variables the runbook declares: only these reach the script.
    vars: RequestVars,
    /// Any of these fails the run before its script starts.
    errors: Vec<String>,
    warnings: Vec<String>,
}

/// Validates the runbook with the request's variables and refuses recursion.
fn check_request(app: &App, req: &ExecuteRequest, book: &Runbook) -> Checked {
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
    Checked {
        vars,
        errors,
        warnings,
    }
}

/// Writes the run's first record and makes the run known (registry, metrics). Nothing starts
/// that could not be recorded (a full or read-only state directory): then the log goes too.
fn prepare_record(
    app: &App,
    req: &ExecuteRequest,
    run_id: &str,
    errors: Vec<String>,
    warnings: Vec<String>,
    log: RunLog,
    log_path: PathBuf,
) -> Result<(Arc<Run>, Arc<RunLog>), ExecError> {
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
        errors,
        warnings,
        history_error: None,
        script_started: Some(false),
    };
    if let Err(e) = record::save_new(&app.runs_dir, &record, app.spare_files.take()) {
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
    Ok((run, log))
}

/// Creates the run's directories and fills them (inputs, script file). `None`: they could not
/// be prepared and the run has ended as failed; an error: the server could not start it.
fn prepare_work_dir(
    app: &App,
    book: &Runbook,
    script: &str,
    run_id: &str,
    before: &RunBeforeScript,
) -> Result<Option<RunDirs>, ExecError> {
    let work = RunDirs::create(
        &app.config.execution_dir,
        run_id,
        app.run_as,
        &app.spare_dirs,
    )
    .map_err(|e| {
        before.refused(&e);
        ExecError::Unavailable(format!("cannot create the working directory: {e}"))
    })?;
    if let Err(e) = prepare(app, book, &work, script).and_then(|()| work.hand_over()) {
        work.remove();
        let msg = format!("runbookd: cannot prepare the run: {e}\n");
        before.end(&msg, Outcome::failed(1, Some(msg.clone())));
        return Ok(None);
    }
    Ok(Some(work))
}

/// The run's own token (for sub-runbook calls and its own tree) and its scope: the call stack
/// including this runbook.
fn mint_run_token(app: &App, req: &ExecuteRequest, run_id: &str) -> (String, RunScope) {
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
    (run_token, scope)
}

/// The script's environment: the base, the declared request variables, the system values.
fn build_environment(
    app: &App,
    req: &ExecuteRequest,
    vars: &RequestVars,
    scope: &RunScope,
    run_token: &str,
    work: &RunDirs,
) -> Vec<(String, String)> {
    let stack_json = serde_json::to_string(&scope.stack).unwrap_or_else(|_| "[]".into());
    let correlation_id = req
        .correlation_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let exec_dir = work.cwd.to_string_lossy().into_owned();
    runenv::build(
        &app.script_base_env,
        &vars.vars,
        &SystemValues {
            run_token,
            correlation_id: &correlation_id,
            runbook_url: &app.runbook_url(),
            recursion_stack_json: &stack_json,
            exec_dir: &exec_dir,
            run_id: &scope.run_id,
        },
    )
}

/// What to spawn: the interpreter named by the script's `#!` on the script file, in `work/`.
fn script_launch(
    app: &App,
    drawn: &DrawnId,
    script: &str,
    work: &RunDirs,
    env: Vec<(String, String)>,
) -> Launch {
    let interpreter = runbook::interpreter_of(script);
    let mut args = Vec::new();
    if let Some(arg) = &interpreter.arg {
        args.push(arg.into());
    }
    args.push(work.script.clone().into_os_string());
    Launch {
        program: PathBuf::from(&interpreter.program),
        args,
        cwd: work.cwd.clone(),
        env,
        nofile_soft: app.nofile_soft,
        nice: app.script_nice,
        cgroup: app.run_cgroups.as_ref().map(|c| c.run_path(drawn.as_str())),
        cgroup_made: drawn.cgroup_made(),
        run_as: app.run_as.map(|r| (r.uid, r.gid)),
    }
}

/// Records the started script's process group (and cgroup), so that a restarted server can
/// tell whether it still runs. Done by the run thread while the script starts: a server killed
/// before that finds the run's cgroup by its name (see `lifecycle::recover`).
fn record_process(app: &App, run: &Run, child: &Supervised) {
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
}

/// Starts the run thread: it supervises the child (timeout, cancel), concludes the run and
/// then removes the working directory and the cgroup, also after a panic. An error: the thread
/// could not start (the child, dropped with the closure, was killed and reaped).
fn spawn_supervised(
    app: &Arc<App>,
    run: &Arc<Run>,
    log: &Arc<RunLog>,
    path: &Path,
    child: Supervised,
    work: RunDirs,
    started: Instant,
) -> io::Result<()> {
    run.set_cancel(child.stop_sender());
    let limits = Limits {
        timeout: app.config.script_timeout,
        kill_grace: app.config.cancel_grace,
        orphan_grace: app.config.orphan_grace,
    };
    let thread_app = app.clone();
    let thread_run = run.clone();
    let thread_log = log.clone();
    let thread_path = path.to_path_buf();
    app.run_threads.run(move || {
        let mut progress = Progress::default();
        let ran = catch_unwind(AssertUnwindSafe(|| {
            record_process(&thread_app, &thread_run, &child);
            crate::stages::mark(&thread_run.id, "record with pgid");
            let (outcome, cancelled, cgroup) = child.supervise(limits);
            crate::stages::mark(&thread_run.id, "script and readers");
            conclude(
                &thread_app,
                &thread_run,
                &thread_log,
                &thread_path,
                outcome,
                cancelled,
                started,
                &mut progress,
            );
            // Everything in them is dead: the directories and the cgroup go once the
            // result is out. The thread waiting for `done` may have been woken on this
            // processor: it goes first.
            std::thread::yield_now();
            if let Some(text) = progress.take_runbook_text() {
                thread_app
                    .parsed_runbooks
                    .warm(&thread_path, crate::catalog::runbook_text(text));
            }
            work.remove();
            if let Some(mut cgroup) = cgroup {
                if let Err(e) = cgroup.kill_and_remove() {
                    log::error!("cannot remove cgroup {}: {e}", cgroup.path().display());
                }
            }
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
    })
}
