//! Counters for `GET /metrics`, rendered in the Prometheus text format.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Process-wide counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    runs_started: AtomicU64,
    runs_finished: Mutex<BTreeMap<&'static str, u64>>,
    output_bytes: AtomicU64,
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((route, status)).or_default() += 1;
    }

    pub fn run_started(&self) {
        self.runs_started.fetch_add(1, Ordering::Relaxed);
    }

    pub fn run_finished(&self, result: &'static str, output_bytes: u64) {
        let mut map = self.runs_finished.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(result).or_default() += 1;
        self.output_bytes.fetch_add(output_bytes, Ordering::Relaxed);
    }

    pub fn render(&self, running: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP runbookd_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE runbookd_http_requests_total counter\n");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "runbookd_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP runbookd_runs_started_total Runs started.\n");
        out.push_str("# TYPE runbookd_runs_started_total counter\n");
        let _ = writeln!(
            out,
            "runbookd_runs_started_total {}",
            self.runs_started.load(Ordering::Relaxed)
        );
        out.push_str("# HELP runbookd_runs_finished_total Runs finished, by result.\n");
        out.push_str("# TYPE runbookd_runs_finished_total counter\n");
        for (result, n) in self
            .runs_finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "runbookd_runs_finished_total{{result=\"{result}\"}} {n}"
            );
        }
        out.push_str("# HELP runbookd_runs_running Runs in progress.\n");
        out.push_str("# TYPE runbookd_runs_running gauge\n");
        let _ = writeln!(out, "runbookd_runs_running {running}");
        out.push_str("# HELP runbookd_output_bytes_total Bytes of script output.\n");
        out.push_str("# TYPE runbookd_output_bytes_total counter\n");
        let _ = writeln!(
            out,
            "runbookd_output_bytes_total {}",
            self.output_bytes.load(Ordering::Relaxed)
        );
        out
    }
}
