//! `viewers1000`: one run started with `?async=true` that sleeps, then prints 10 000 lines,
//! watched by 1000 SSE viewers on `/api/runs/{id}/events` (each its own thread and
//! connection, `Connection: close`). Every viewer must receive exactly the script's bytes, in
//! id order, and `done`; reported: how many did, and when the last `done` arrived.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{note_server_stderr, Bench, Outcome};
use crate::api::{expect_success, read_run, Api};
use crate::error::BenchError;
use crate::runbooks::{lines_10k_output, ExpectedBytes, LINES_10K};
use crate::stats::{secs, verdict};

const VIEWERS: usize = 1000;
/// Seconds the script sleeps before printing, so that the viewers attach first.
const DELAY_SECONDS: &str = "3";
const VIEWER_STACK_BYTES: usize = 256 * 1024;

/// What one viewer saw, times relative to the async start.
struct Seen {
    attached: Duration,
    first_output: Option<Duration>,
    done: Duration,
    exact: bool,
    problem: String,
}

fn watch(api: &Api, run_id: &str, expected: &[u8], origin: Instant) -> Result<Seen, BenchError> {
    let mut connection = api.attach(run_id)?;
    let attached = origin.elapsed();
    let mut check = ExpectedBytes::new(expected);
    let mut first_output = None;
    let end = read_run(
        &mut connection,
        origin + Duration::from_secs(180),
        |event| {
            first_output.get_or_insert(event.at.duration_since(origin));
            check.feed(event.data);
        },
    )?;
    expect_success(&end, "viewed run")?;
    Ok(Seen {
        attached,
        first_output,
        done: end.done_at.duration_since(origin),
        exact: check.is_exact(),
        problem: check.describe(),
    })
}

pub fn run(bench: &Bench) -> Result<Outcome, BenchError> {
    let (server, api) = bench.start(&[])?;
    let expected = Arc::new(lines_10k_output());
    let origin = Instant::now();
    let run_id = api.execute_async(LINES_10K.file, &[("DELAY", DELAY_SECONDS)])?;
    let mut handles = Vec::with_capacity(VIEWERS);
    let mut problems: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..VIEWERS {
        let (api, run_id, expected) = (api.clone(), run_id.clone(), expected.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("viewer-{i}"))
            .stack_size(VIEWER_STACK_BYTES)
            .spawn(move || watch(&api, &run_id, &expected, origin));
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(e) => *problems.entry(format!("thread: {e}")).or_default() += 1,
        }
    }
    let mut seen = Vec::with_capacity(VIEWERS);
    for handle in handles {
        match handle.join() {
            Ok(Ok(s)) => seen.push(s),
            Ok(Err(e)) => *problems.entry(e.to_string()).or_default() += 1,
            Err(_) => *problems.entry("viewer thread panicked".into()).or_default() += 1,
        }
    }
    for s in seen.iter().filter(|s| !s.exact) {
        *problems.entry(s.problem.clone()).or_default() += 1;
    }
    let exact = seen.iter().filter(|s| s.exact).count();
    let last_done = seen.iter().map(|s| s.done).max().unwrap_or_default();
    let last_attached = seen.iter().map(|s| s.attached).max().unwrap_or_default();
    let first_output = seen.iter().filter_map(|s| s.first_output).min();
    let attached_before_output = first_output.map_or(0, |first| {
        seen.iter().filter(|s| s.attached <= first).count()
    });
    let met = exact == VIEWERS;
    println!(
        "viewers1000: {exact}/{VIEWERS} viewers received exactly the {} bytes in order; last done {} after the async start; goal all exact: {}",
        expected.len(),
        secs(last_done),
        verdict(met)
    );
    println!(
        "  all attached by {}; output began at {} (script sleeps {DELAY_SECONDS} s); {attached_before_output} viewers attached before the first output",
        secs(last_attached),
        first_output.map_or("never".to_string(), secs),
    );
    for (problem, count) in problems.iter().take(5) {
        println!("  {count} viewers: {problem}");
    }
    note_server_stderr(&server);
    Ok(Outcome {
        summary: format!("viewers {exact}/{VIEWERS} exact"),
        goal_met: Some(met),
        rows: Vec::new(),
    })
}
