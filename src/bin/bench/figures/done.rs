//! `done_latency`: how long after a script's last act its `done` reaches an attached client.
//! The script prints its wall-clock time (`date +%s%N`) as its last act; the client notes the
//! wall-clock time of the read that completed `done` (same machine, same clock). Goal: median
//! ≤ 5 ms.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant, UNIX_EPOCH};

use serde_json::json;

use super::{note_server_stderr, Bench, Outcome};
use crate::api::{expect_success, read_run};
use crate::error::BenchError;
use crate::report::Row;
use crate::runbooks::EXIT_STAMP;
use crate::stats::{median, verdict};

const RUNS: usize = 30;
const GOAL_MS: f64 = 5.0;

pub fn run(bench: &Bench) -> Result<Outcome, BenchError> {
    let (server, api) = bench.start(&[])?;
    let mut latencies = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let mut connection = api.execute_sse(EXIT_STAMP.file, &[])?;
        let mut output = Vec::new();
        let end = read_run(
            &mut connection,
            started + Duration::from_secs(30),
            |event| output.extend_from_slice(event.data),
        )?;
        expect_success(&end, "stamp run")?;
        let text = String::from_utf8_lossy(&output);
        let stamp_ns: u128 = text
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| BenchError::Mismatch(format!("no time stamp in {text:?}")))?;
        let done_ns = end
            .done_wall
            .duration_since(UNIX_EPOCH)
            .map_err(|_| BenchError::Server("clock before 1970".into()))?
            .as_nanos();
        latencies.push((done_ns as f64 - stamp_ns as f64) / 1e6);
    }
    let m = median(&latencies);
    let met = m <= GOAL_MS;
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "done_latency: script's last act → done at the client: median {m:.2} ms, min {:.2} ms, max {:.2} ms over {RUNS} runs; goal median <= {GOAL_MS} ms: {}",
        sorted.first().copied().unwrap_or_default(),
        sorted.last().copied().unwrap_or_default(),
        verdict(met)
    );
    note_server_stderr(&server);
    Ok(Outcome {
        summary: format!("done latency {m:.2} ms"),
        goal_met: Some(met),
        rows: vec![Row {
            name: "done_latency".into(),
            value: m,
            baseline: None,
            unit: "ms",
            ratio: None,
            goal: format!("<= {GOAL_MS} ms (median)"),
            met: Some(met),
            detail: json!({"runs_ms": latencies}),
        }],
    })
}
