//! The server's life around its runs: loading run records at start (runs that were going
//! become `interrupted`; their leftover cgroups are killed and removed, and their process groups
//! killed only when `leftover::judge` proves them theirs; concluded runs' directories and
//! cgroups a stop left are removed), pruning old runs hourly (runs are
//! also pruned as they end, see `retention.rs`), and stopping running runs on shutdown.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::App;
use crate::cgroup;
use crate::leftover::{self, Verdict};
use crate::record::{self, RunStatus};
use crate::run::Run;
use crate::runlog::RunLog;
use crate::sys;

/// How often retention runs after the start.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// Loads every stored run into the registry. Runs recorded as going are marked `interrupted`,
/// their leftover process groups are killed, and their history entries are written.
pub fn recover(app: &App) {
    let runs_dir = &app.runs_dir;
    let records = match record::load_all(runs_dir) {
        Ok(r) => r,
        Err(e) => {
            log::error!("cannot read stored runs: {e}");
            return;
        }
    };
    let mut interrupted = 0;
    for mut rec in records {
        let log_path = record::log_path(runs_dir, &rec.run_id);
        if !rec.status.is_finished() {
            interrupted += 1;
            settle_interrupted(app, &mut rec, &log_path);
        } else {
            remove_after_conclusion(app, &rec.run_id);
        }
        app.runs.insert(Arc::new(Run::new(rec, log_path, None)));
    }
    if interrupted > 0 {
        log::warn!("{interrupted} run(s) were interrupted by the previous stop");
    }
}

/// A concluded run's directories and cgroup go after its result is out: a server killed in
/// between leaves them (everything in them already dead), and they are removed here.
fn remove_after_conclusion(app: &App, run_id: &str) {
    crate::execute::remove_leftover_dirs(app, run_id);
    if let Some(path) = app.run_cgroups.as_ref().map(|c| c.run_path(run_id)) {
        if path.exists() {
            if let Err(e) = cgroup::remove_leftover(&path, run_id) {
                log::error!(
                    "run {run_id}: cannot remove its leftover cgroup {}: {e}",
                    path.display()
                );
            }
        }
    }
}

/// Why a run the previous server left going is over.
pub const INTERRUPTED_REASON: &str = "the server stopped while the run was going";

/// Kills what a run the previous server left going has left: its cgroup (exact: named by the
/// run id), and its process group when it is provably the run's. Returns why something was
/// left alone, if it was.
fn stop_leftovers(app: &App, rec: &record::RunRecord) -> Option<String> {
    let cgroup_path = rec
        .cgroup
        .as_ref()
        .map(std::path::PathBuf::from)
        .or_else(|| app.run_cgroups.as_ref().map(|c| c.run_path(&rec.run_id)));
    if let Some(path) = cgroup_path {
        match cgroup::remove_leftover(&path, &rec.run_id) {
            Ok(true) => log::warn!(
                "run {}: killed and removed its leftover cgroup {}",
                rec.run_id,
                path.display()
            ),
            Ok(false) => {}
            Err(e) => log::error!(
                "run {}: cannot remove its leftover cgroup {}: {e}",
                rec.run_id,
                path.display()
            ),
        }
    }
    let (Some(pgid), Some(ticks)) = (rec.pgid, rec.pgid_start_ticks) else {
        return None;
    };
    match leftover::judge(pgid, ticks, rec.boot_id.as_deref()) {
        Verdict::Gone => None,
        Verdict::Ours => {
            log::warn!(
                "run {}: killing the leftover processes of group {pgid}",
                rec.run_id
            );
            let _ = sys::kill_group(pgid);
            None
        }
        Verdict::NotOurs(why) => {
            log::warn!(
                "run {}: process group {pgid} not signalled: {why}",
                rec.run_id
            );
            Some(format!("its process group {pgid} was not signalled: {why}"))
        }
    }
}

/// Ends a run the previous server left going: kills what is left of it (see
/// `stop_leftovers`), then writes its record and history entry from what its log holds.
fn settle_interrupted(app: &App, rec: &mut record::RunRecord, log_path: &Path) {
    let reason = match stop_leftovers(app, rec) {
        Some(left_alone) => format!("{INTERRUPTED_REASON}; {left_alone}"),
        None => INTERRUPTED_REASON.to_string(),
    };
    crate::execute::remove_leftover_dirs(app, &rec.run_id);
    let finished = chrono::Utc::now();
    let outcome = crate::runlog::Outcome {
        return_code: -1,
        error: Some(reason.clone()),
        timed_out: false,
        finished_at: finished,
    };
    let excerpt_bytes = usize::try_from(app.config.history_output_bytes).unwrap_or(usize::MAX);
    // What the log holds is what the viewers and the history get.
    let log = RunLog::open_finished_with_excerpts(log_path, outcome.clone(), excerpt_bytes);
    match &log {
        Ok(log) => {
            let totals = log.totals();
            rec.stdout_bytes = totals.stdout_bytes;
            rec.stderr_bytes = totals.stderr_bytes;
        }
        Err(e) => log::warn!("run {}: cannot read its log: {e}", rec.run_id),
    }
    rec.status = RunStatus::Interrupted;
    rec.finished_at = Some(finished);
    rec.duration_ms = Some(
        u64::try_from(
            finished
                .signed_duration_since(rec.started_at)
                .num_milliseconds(),
        )
        .unwrap_or(0),
    );
    rec.return_code = Some(outcome.return_code);
    rec.error = Some(reason.clone());
    rec.pgid = None;
    rec.pgid_start_ticks = None;
    rec.boot_id = None;
    rec.cgroup = None;
    if let Err(e) = record::save(&app.runs_dir, rec) {
        log::error!("run {}: cannot update its record: {e}", rec.run_id);
    }
    let (Ok(log), Ok(runbook_path)) = (log, app.catalog.resolve(&rec.runbook)) else {
        log::warn!(
            "run {}: no history entry (its log or runbook is gone)",
            rec.run_id
        );
        return;
    };
    // A failure is logged there; the record was already saved.
    let _ = crate::execute::write_history(
        app,
        &runbook_path,
        &rec.run_id,
        &log,
        &outcome,
        Some(&format!("runbookd: {reason}")),
    );
}

/// Drops finished runs beyond the retention limits, oldest end first (from the index built at
/// start: no scan of the state directory).
pub fn prune(app: &App) {
    app.retention.apply(app);
}

/// Prunes every hour, for the life of the process.
pub fn start_retention_thread(app: Arc<App>) {
    let spawned = std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || loop {
            std::thread::sleep(RETENTION_INTERVAL);
            if app.is_shutting_down() {
                return;
            }
            prune(&app);
        });
    if let Err(e) = spawned {
        log::error!("cannot start the retention thread: {e}");
    }
}

/// Stops every running run (TERM + CONT, grace, KILL) and waits until their records, history
/// and final `done` events are written, within the shutdown grace.
pub fn stop_runs(app: &App) {
    let deadline = crate::clock::instant_after(app.config.shutdown_grace);
    let running = app.runs.running();
    if !running.is_empty() {
        log::info!("shutdown: stopping {} running run(s)", running.len());
    }
    for run in &running {
        run.mark_interrupted();
        run.request_cancel();
    }
    // Leave a second of the grace for the runs to write their records after the KILL.
    let kill_at = deadline
        .checked_sub(Duration::from_secs(1).min(app.config.shutdown_grace / 2))
        .unwrap_or(deadline);
    let mut killed = false;
    while app.runs.running_count() > 0 && Instant::now() < deadline {
        if !killed && Instant::now() >= kill_at {
            // Through the supervisors, which still hold the group leaders unreaped.
            for run in app.runs.running() {
                run.request_kill();
            }
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let viewers write their final `done` event.
    std::thread::sleep(
        Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
    );
}
