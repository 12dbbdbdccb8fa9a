//! Retention of finished runs (`RUN_RETENTION_COUNT`, `RUN_RETENTION_DAYS`, `STATE_MAX_BYTES`),
//! applied as each run ends and hourly. An in-memory index of the finished runs (end time and
//! stored bytes) is built once at start; a run that ends is added with two `stat`s of its own
//! files, so the state directory is never scanned per run.
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};

use crate::app::App;
use crate::record;
use crate::run::Run;

/// The finished runs retention may remove, oldest end first.
#[derive(Default)]
pub struct Retention {
    inner: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    by_end: BTreeSet<(DateTime<Utc>, String)>,
    /// Run id -> (end time, stored bytes of its log and record).
    runs: HashMap<String, (DateTime<Utc>, u64)>,
    /// Sum of the stored bytes of the indexed runs.
    total: u64,
}

impl Index {
    fn insert(&mut self, id: &str, ended: DateTime<Utc>, bytes: u64) {
        self.remove(id);
        self.by_end.insert((ended, id.to_string()));
        self.runs.insert(id.to_string(), (ended, bytes));
        self.total = self.total.saturating_add(bytes);
    }

    fn remove(&mut self, id: &str) {
        if let Some((ended, bytes)) = self.runs.remove(id) {
            self.by_end.remove(&(ended, id.to_string()));
            self.total = self.total.saturating_sub(bytes);
        }
    }

    /// Takes the runs beyond the limits out of the index, oldest first, and returns them.
    /// `running_bytes`: what the runs still going hold, counted against `max_bytes`.
    /// `spare`: a run kept in any case (the one that has just ended: its viewers are still
    /// reading its log).
    fn excess(&mut self, now: DateTime<Utc>, limits: &Limits, spare: Option<&str>) -> Vec<String> {
        let cutoff = i64::try_from(limits.max_days)
            .ok()
            .and_then(chrono::Duration::try_days)
            .and_then(|age| now.checked_sub_signed(age));
        let mut count = self.runs.len();
        let mut total = self.total;
        let mut out = Vec::new();
        for (ended, id) in &self.by_end {
            if spare == Some(id.as_str()) {
                continue;
            }
            let too_many = count > limits.max_count;
            let too_old = cutoff.is_some_and(|c| *ended < c);
            let too_big = total.saturating_add(limits.running_bytes) > limits.max_bytes;
            if !(too_many || too_old || too_big) {
                break;
            }
            count -= 1;
            total = total.saturating_sub(self.runs.get(id).map_or(0, |r| r.1));
            out.push(id.clone());
        }
        for id in &out {
            self.remove(id);
        }
        out
    }
}

/// The limits one pass applies.
struct Limits {
    max_count: usize,
    max_days: u64,
    max_bytes: u64,
    /// What the runs still going hold, counted against `max_bytes`.
    running_bytes: u64,
}

impl Retention {
    fn lock(&self) -> MutexGuard<'_, Index> {
        // Every update is a few map operations: a poisoned lock still holds usable data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds the index from the finished runs in the registry (at start, after recovery),
    /// then applies the limits.
    pub fn start(&self, app: &App) {
        {
            let mut index = self.lock();
            for run in app.runs.all() {
                let rec = run.record();
                if rec.status.is_finished() {
                    let ended = rec.finished_at.unwrap_or(rec.started_at);
                    index.insert(&run.id, ended, stored_bytes(&app.runs_dir, &run.id));
                }
            }
        }
        self.apply(app);
    }

    /// Adds a run that has just ended (its record and log written) and applies the limits.
    pub fn run_ended(&self, app: &App, run: &Run) {
        let rec = run.record();
        let ended = rec.finished_at.unwrap_or(rec.started_at);
        let bytes = stored_bytes(&app.runs_dir, &run.id);
        self.lock().insert(&run.id, ended, bytes);
        self.apply_sparing(app, Some(&run.id));
    }

    /// Removes the finished runs beyond the limits, oldest end first; returns how many.
    pub fn apply(&self, app: &App) -> usize {
        self.apply_sparing(app, None)
    }

    fn apply_sparing(&self, app: &App, spare: Option<&str>) -> usize {
        let cfg = &app.config;
        let running_bytes: u64 = app
            .runs
            .running()
            .iter()
            .filter_map(|run| run.live_log())
            .map(|log| log.stored_bytes())
            .sum();
        let limits = Limits {
            max_count: cfg.run_retention_count,
            max_days: cfg.run_retention_days,
            max_bytes: cfg.state_max_bytes,
            running_bytes,
        };
        let victims = self.lock().excess(Utc::now(), &limits, spare);
        for id in &victims {
            app.runs.forget(id);
            record::remove(&app.runs_dir, id);
        }
        if !victims.is_empty() {
            log::info!("retention: removed {} finished run(s)", victims.len());
        }
        victims.len()
    }
}

/// Bytes a run's log and record take.
fn stored_bytes(dir: &Path, id: &str) -> u64 {
    [record::log_path(dir, id), record::record_path(dir, id)]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn limits(max_count: usize, max_days: u64, max_bytes: u64, running_bytes: u64) -> Limits {
        Limits {
            max_count,
            max_days,
            max_bytes,
            running_bytes,
        }
    }

    #[test]
    fn count_limit_removes_the_oldest_ends() {
        let mut index = Index::default();
        for i in 0..10 {
            // Inserted out of end order.
            index.insert(&format!("r{i}"), at((i * 7) % 10), 1);
        }
        let gone = index.excess(at(100), &limits(3, 365, u64::MAX, 0), None);
        assert_eq!(gone.len(), 7);
        let mut kept: Vec<_> = index.by_end.iter().map(|(t, _)| *t).collect();
        kept.sort();
        assert_eq!(kept, vec![at(7), at(8), at(9)]);
        assert_eq!(index.total, 3);
    }

    #[test]
    fn age_and_bytes_limits() {
        let mut index = Index::default();
        let day = 86_400;
        index.insert("old", at(0), 10);
        index.insert("mid", at(5 * day), 10);
        index.insert("new", at(6 * day), 10);
        // Two days of retention at day 6: "old" goes.
        assert_eq!(
            index.excess(at(6 * day), &limits(100, 2, u64::MAX, 0), None),
            ["old"]
        );
        // 25 bytes allowed with 10 held by a running run: "mid" goes too.
        assert_eq!(
            index.excess(at(6 * day), &limits(100, 2, 25, 10), None),
            ["mid"]
        );
        assert_eq!(index.total, 10);
        // Re-inserting a run replaces it rather than counting it twice.
        index.insert("new", at(6 * day), 12);
        assert_eq!((index.runs.len(), index.total), (1, 12));
    }

    #[test]
    fn the_run_that_just_ended_is_spared() {
        let mut index = Index::default();
        index.insert("a", at(0), 100);
        index.insert("b", at(1), 100);
        index.insert("c", at(2), 100);
        // Over the byte limit with only "c" left: it is spared, "a" and "b" go.
        assert_eq!(
            index.excess(at(3), &limits(10, 365, 50, 0), Some("c")),
            ["a", "b"]
        );
        // Spared even when it is the oldest; the next one goes for the count.
        index.insert("d", at(3), 1);
        index.insert("c", at(0), 1);
        assert_eq!(
            index.excess(at(4), &limits(1, 365, u64::MAX, 0), Some("c")),
            ["d"]
        );
    }

    #[test]
    fn huge_day_counts_do_not_overflow() {
        let mut index = Index::default();
        index.insert("a", at(0), 1);
        assert!(index
            .excess(at(0), &limits(10, u64::MAX, u64::MAX, 0), None)
            .is_empty());
        assert!(index
            .excess(at(0), &limits(10, 100_000_000, u64::MAX, 0), None)
            .is_empty());
    }
}
