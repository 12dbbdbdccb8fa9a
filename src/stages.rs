//! Stage timing of runs, to see where a run's fixed cost goes: with
//! `RUST_LOG=runbookd::stages=debug` every run started by a request logs one line when its
//! result has been sent (or, with no waiting client, when it is concluded), giving the time each
//! stage took (request head to execute, runbook, admission, log file, record, work dir, spawn,
//! script, history, response...). Off (one atomic load per mark) otherwise.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The log target that switches stage timing on at debug level.
pub const TARGET: &str = "runbookd::stages";

/// Runs whose marks are kept at most (runs nobody waits for are dropped past this).
const MAX_TRACKED: usize = 10_000;

/// A run's marks: each stage's name and when it ended.
type Marks = Vec<(&'static str, Instant)>;

static ENABLED: AtomicBool = AtomicBool::new(false);
static MARKS: Mutex<Option<HashMap<String, Marks>>> = Mutex::new(None);

thread_local! {
    static REQUEST_AT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Reads the log filter once at start.
pub fn init() {
    ENABLED.store(
        log::log_enabled!(target: TARGET, log::Level::Debug),
        Ordering::Relaxed,
    );
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A request head was read on this thread.
pub fn request_received() {
    if enabled() {
        REQUEST_AT.with(|at| at.set(Some(Instant::now())));
    }
}

/// A run id was given to this thread's request, whose execute started at `entered`: its marks
/// start at the request's arrival.
pub fn begin(run_id: &str, entered: Instant) {
    if !enabled() {
        return;
    }
    let now = entered;
    let origin = REQUEST_AT.with(|at| at.get()).unwrap_or(now);
    let mut marks = MARKS.lock().unwrap_or_else(|p| p.into_inner());
    let map = marks.get_or_insert_with(HashMap::new);
    if map.len() >= MAX_TRACKED {
        map.clear();
    }
    map.insert(
        run_id.to_string(),
        vec![("request", origin), ("to execute", now)],
    );
}

/// The stage `name` of run `run_id` ended now.
pub fn mark(run_id: &str, name: &'static str) {
    if !enabled() {
        return;
    }
    let now = Instant::now();
    let mut marks = MARKS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(list) = marks.as_mut().and_then(|m| m.get_mut(run_id)) {
        list.push((name, now));
    }
}

/// Logs the run's stages (each with the time since the previous mark) and forgets them.
pub fn finish(run_id: &str) {
    if !enabled() {
        return;
    }
    let list = {
        let mut marks = MARKS.lock().unwrap_or_else(|p| p.into_inner());
        marks.as_mut().and_then(|m| m.remove(run_id))
    };
    if let Some(list) = list {
        log::debug!(target: TARGET, "run {run_id}: {}", format_stages(&list));
    }
}

/// `stage 0.012 ms, ...` in time order, each the time since the previous mark, then the total.
fn format_stages(list: &[(&'static str, Instant)]) -> String {
    let mut sorted = list.to_vec();
    sorted.sort_by_key(|(_, at)| *at);
    let Some(&(_, origin)) = sorted.first() else {
        return String::new();
    };
    let mut parts = Vec::with_capacity(sorted.len());
    let mut previous = origin;
    for (name, at) in sorted.iter().skip(1) {
        let us = at.duration_since(previous).as_micros();
        parts.push(format!("{name} {us}us"));
        previous = *at;
    }
    let total = previous.duration_since(origin).as_micros();
    format!("{}; total {total}us", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stages_are_listed_in_time_order_with_their_durations() {
        let t0 = Instant::now();
        let list = [
            ("request", t0),
            ("b", t0 + Duration::from_micros(300)),
            ("a", t0 + Duration::from_micros(100)),
        ];
        assert_eq!(format_stages(&list), "a 100us, b 200us; total 300us");
    }
}
