//! The server's life around its runs: loading run records at start (runs that were going
//! become `interrupted` and their surviving process groups are killed), pruning old runs at
//! start and hourly, and stopping running runs on shutdown.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::App;
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
        }
        app.runs.insert(Arc::new(Run::new(rec, log_path, None)));
    }
    if interrupted > 0 {
        log::warn!("{interrupted} run(s) were interrupted by the previous stop");
    }
}

/// Why a run the previous server left going is over.
const INTERRUPTED_REASON: &str = "the server stopped while the run was going";

/// Ends a run the previous server left going: kills what is left of its process group, then
/// writes its record and history entry from what its log holds.
fn settle_interrupted(app: &App, rec: &mut record::RunRecord, log_path: &Path) {
    if let (Some(pgid), Some(ticks)) = (rec.pgid, rec.pgid_start_ticks) {
        let survivors = sys::group_members_since(pgid, ticks);
        if !survivors.is_empty() {
            log::warn!(
                "run {}: killing {} leftover process(es) of group {pgid}",
                rec.run_id,
                survivors.len()
            );
            let _ = sys::kill_group(pgid);
        }
    }
    let finished = chrono::Utc::now();
    let outcome = crate::runlog::Outcome {
        return_code: -1,
        error: Some(INTERRUPTED_REASON.into()),
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
    rec.duration_ms = Some((finished - rec.started_at).num_milliseconds().max(0) as u64);
    rec.return_code = Some(outcome.return_code);
    rec.error = Some(INTERRUPTED_REASON.into());
    rec.pgid = None;
    rec.pgid_start_ticks = None;
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
        Some(&format!("runbookd: {INTERRUPTED_REASON}")),
    );
}

/// Drops finished runs beyond the retention limits, oldest first.
pub fn prune(app: &App) {
    let cfg = &app.config;
    let mut finished: Vec<Arc<Run>> = app
        .runs
        .all()
        .into_iter()
        .filter(|r| r.record().status.is_finished())
        .collect();
    finished.reverse(); // oldest first
    let cutoff = chrono::Utc::now() - chrono::Duration::days(cfg.run_retention_days as i64);
    let mut removed = 0usize;
    let mut keep = Vec::with_capacity(finished.len());
    for run in finished {
        if run.record().started_at < cutoff {
            forget(app, &run);
            removed += 1;
        } else {
            keep.push(run);
        }
    }
    let excess = keep.len().saturating_sub(cfg.run_retention_count);
    for run in keep.drain(..excess) {
        forget(app, &run);
        removed += 1;
    }
    let mut total = dir_bytes(&app.runs_dir);
    let mut oldest = keep.into_iter();
    while total > cfg.state_max_bytes {
        let Some(run) = oldest.next() else { break };
        total = total.saturating_sub(run_bytes(&app.runs_dir, &run.id));
        forget(app, &run);
        removed += 1;
    }
    if removed > 0 {
        log::info!("retention: removed {removed} finished run(s)");
    }
}

fn forget(app: &App, run: &Run) {
    app.runs.forget(&run.id);
    record::remove(&app.runs_dir, &run.id);
}

fn run_bytes(dir: &Path, id: &str) -> u64 {
    [record::log_path(dir, id), record::record_path(dir, id)]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
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
    let deadline = Instant::now() + app.config.shutdown_grace;
    let running = app.runs.running();
    if !running.is_empty() {
        log::info!("shutdown: stopping {} running run(s)", running.len());
    }
    for run in &running {
        run.mark_interrupted();
        run.request_cancel();
    }
    // Leave a second of the grace for the runs to write their records after the KILL.
    let kill_at = deadline - Duration::from_secs(1).min(app.config.shutdown_grace / 2);
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
