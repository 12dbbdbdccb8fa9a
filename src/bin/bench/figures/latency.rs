//! `latency`: child write → attached viewer read. A Python script prints its own wall-clock
//! time in microseconds every 20 ms for 4 s; viewers attached to `/api/runs/{id}/events`
//! subtract each line's stamp from the wall-clock time of the socket read that delivered it.
//! Measured with 1 viewer, then with 100 (the first viewer's figures and all pooled).
#![forbid(unsafe_code)]

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::{note_server_stderr, Bench, Outcome};
use crate::api::{expect_success, read_run, Api};
use crate::error::BenchError;
use crate::runbooks::STAMPS;
use crate::stats::{ms_from_us, percentile};

const CROWD: usize = 100;
const VIEWER_STACK_BYTES: usize = 256 * 1024;

/// Reads one run; returns the latency of every line in microseconds.
fn watch(api: &Api, run_id: &str, ready: &Barrier) -> Result<Vec<i64>, BenchError> {
    let attached = api.attach(run_id);
    ready.wait();
    let mut connection = attached?;
    let mut latencies = Vec::new();
    let mut bad_line: Option<String> = None;
    let end = read_run(
        &mut connection,
        Instant::now() + Duration::from_secs(60),
        |event| {
            let arrived = event
                .wall
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or_default();
            for line in event.data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                match std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.parse::<i64>().ok())
                {
                    Some(stamp) => latencies.push(arrived - stamp),
                    None => {
                        bad_line.get_or_insert_with(|| String::from_utf8_lossy(line).into());
                    }
                }
            }
        },
    )?;
    expect_success(&end, "timestamp run")?;
    if let Some(line) = bad_line {
        return Err(BenchError::Mismatch(format!("not a timestamp: {line:?}")));
    }
    Ok(latencies)
}

/// p50 / p99 / max of some latencies, as text.
fn describe(latencies: &[i64]) -> (String, i64) {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let p99 = percentile(&sorted, 99.0);
    let text = format!(
        "p50 {}, p99 {}, max {} over {} lines",
        ms_from_us(percentile(&sorted, 50.0)),
        ms_from_us(p99),
        ms_from_us(sorted.last().copied().unwrap_or_default()),
        sorted.len()
    );
    (text, p99)
}

/// Starts a run that waits `delay` seconds, attaches `viewers` viewers, and collects them.
fn measure(api: &Api, viewers: usize, delay: &str) -> Result<Vec<Vec<i64>>, BenchError> {
    let run_id = api.execute_async(STAMPS.file, &[("DELAY", delay)])?;
    let attached_at = Instant::now();
    let ready = Arc::new(Barrier::new(viewers + 1));
    let mut handles = Vec::with_capacity(viewers);
    for i in 0..viewers {
        let (api, run_id, ready) = (api.clone(), run_id.clone(), ready.clone());
        let handle = std::thread::Builder::new()
            .name(format!("latency-viewer-{i}"))
            .stack_size(VIEWER_STACK_BYTES)
            .spawn(move || watch(&api, &run_id, &ready))
            .map_err(BenchError::io("start a viewer thread"))?;
        handles.push(handle);
    }
    ready.wait();
    let attach_took = attached_at.elapsed();
    let mut all = Vec::with_capacity(viewers);
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(latencies)) => all.push(latencies),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(BenchError::Server("viewer thread panicked".into()));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if attach_took.as_secs_f64() > delay.parse::<f64>().unwrap_or(0.0) {
        println!(
            "  note: attaching {viewers} viewers took {attach_took:?}, longer than the script's delay"
        );
    }
    Ok(all)
}

pub fn run(bench: &Bench) -> Result<Outcome, BenchError> {
    let (server, api) = bench.start(&[])?;
    let single = measure(&api, 1, "1")?;
    let single_lines = single.concat();
    let (single_text, single_p99) = describe(&single_lines);
    println!("latency_1_viewer: {single_text}");
    let crowd = measure(&api, CROWD, "2")?;
    let first = crowd.first().cloned().unwrap_or_default();
    let pooled = crowd.concat();
    let lines_each = first.len();
    let uneven = crowd.iter().filter(|l| l.len() != lines_each).count();
    let (first_text, _) = describe(&first);
    let (pooled_text, pooled_p99) = describe(&pooled);
    println!("latency_{CROWD}_viewers: 1st viewer {first_text}; pooled {pooled_text}");
    if uneven > 0 {
        println!("  {uneven} viewers got a different number of lines than the first");
    }
    note_server_stderr(&server);
    Ok(Outcome {
        summary: format!(
            "latency p99 {} (1 viewer), {} (100 pooled)",
            ms_from_us(single_p99),
            ms_from_us(pooled_p99)
        ),
        goal_met: None,
        rows: Vec::new(),
    })
}
