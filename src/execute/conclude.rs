//! Concluding a run: its status, the History entry, the final record, metrics, the audit line,
//! `done` to its viewers and its slot freed; also after a panic, and for a run that ends
//! before its script started.
#![forbid(unsafe_code)]

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;

use crate::app::App;
use crate::fault;
use crate::history::{self, HistoryEntry, StreamExcerpt};
use crate::output_text::normalize;
use crate::record::{self, RunRecord, RunStatus};
use crate::run::Run;
use crate::runlog::{Outcome, RunLog, Stream, Totals};

impl Outcome {
    /// A run failing now with `return_code` and `error` (not a timeout).
    pub(super) fn failed(return_code: i32, error: Option<String>) -> Outcome {
        Outcome {
            return_code,
            error,
            timed_out: false,
            finished_at: chrono::Utc::now(),
        }
    }
}

/// Writes a newer version of a run's record (its first one was written by `record::save`).
pub(super) fn save_record(app: &App, record: &RunRecord) {
    if let Err(e) = record::update(&app.runs_dir, record) {
        log::error!("run {}: cannot write its record: {e}", record.run_id);
    }
}

/// A run that ends before its script started: what concluding it needs.
pub(super) struct RunBeforeScript<'a> {
    pub(super) app: &'a App,
    pub(super) run: &'a Run,
    pub(super) log: &'a RunLog,
    pub(super) path: &'a Path,
    pub(super) started: Instant,
}

impl RunBeforeScript<'_> {
    /// Writes `message` to the run's stderr and concludes it with `outcome`.
    pub(super) fn end(&self, message: &str, outcome: Outcome) {
        self.log.append(Stream::Stderr, message.as_bytes());
        conclude(
            self.app,
            self.run,
            self.log,
            self.path,
            outcome,
            false,
            self.started,
            &mut Progress::default(),
        );
    }

    /// The server could not start the script after all (the client gets 503).
    pub(super) fn refused(&self, e: &io::Error) {
        let msg = format!("runbookd: the server could not start the script: {e}\n");
        self.end(&msg, Outcome::failed(1, Some(msg.clone())));
    }
}

/// How far concluding a run got, so that concluding it again after a panic repeats nothing.
#[derive(Debug, Default)]
pub(super) struct Progress {
    history_written: bool,
    metrics_counted: bool,
    /// The runbook's text once the run's History entry is in it.
    runbook_text: Option<Vec<u8>>,
}

impl Progress {
    /// The runbook's text as the run's History entry left it, if it was written.
    pub(super) fn take_runbook_text(&mut self) -> Option<Vec<u8>> {
        self.runbook_text.take()
    }
}

/// Ends a run: finishes its log (viewers then send `done`), writes its record, history entry,
/// metrics and audit line, and frees its running slot. `progress` says how far it got.
#[allow(clippy::too_many_arguments)]
pub(super) fn conclude(
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
    let history_error = match write_history(app, path, &run.id, log, &outcome, None) {
        Ok(text) => {
            progress.runbook_text = Some(text);
            None
        }
        Err(e) => Some(e.to_string()),
    };
    progress.history_written = true;
    crate::stages::mark(&run.id, "history");
    let record = run.update(|r| {
        set_finished(r, status, &outcome, started, &totals, log);
        r.truncated = totals.stdout_bytes > limit || totals.stderr_bytes > limit || r.log_capped;
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

/// Sets what every finished run's record says: status, end, duration, return code, output
/// sizes, error; its process group and cgroup are forgotten.
fn set_finished(
    r: &mut RunRecord,
    status: RunStatus,
    outcome: &Outcome,
    started: Instant,
    totals: &Totals,
    log: &RunLog,
) {
    r.status = status;
    r.finished_at = Some(outcome.finished_at);
    r.duration_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    r.return_code = Some(outcome.return_code);
    r.stdout_bytes = totals.stdout_bytes;
    r.stderr_bytes = totals.stderr_bytes;
    r.log_capped = log.capped_at().is_some();
    r.error = outcome.error.clone();
    r.pgid = None;
    r.pgid_start_ticks = None;
    r.boot_id = None;
    r.cgroup = None;
}

/// Concludes a run after a panic in one of its threads or in the request starting it: status
/// `failed` with the panic as its error, record, history entry (unless already written), `done`
/// to viewers and its slot freed. Each step goes on even if an earlier one panics again.
pub(super) fn conclude_after_panic(
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
            set_finished(r, RunStatus::Failed, &outcome, started, &totals, log);
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
) -> Result<Vec<u8>, history::HistoryError> {
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
