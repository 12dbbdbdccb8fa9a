//! `concurrent`: N SSE executes of a 2-second streaming script (20 ticks, 0.1 s apart)
//! started at once (limit raised to 5000), for N = 100, 250, 500, 1000. Counted: runs whose
//! output was exact and whose `done` arrived within 2.5 s of their own start; the ladder stops
//! when fewer than 95 % make it. Each rung first runs the same N scripts directly under `sh`,
//! without the server, to show what the machine itself manages.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::{note_server_stderr, Bench, Outcome};
use crate::api::{expect_success, read_run, Api};
use crate::error::BenchError;
use crate::runbooks::{ticks_output, ExpectedBytes, TICKS};
use crate::stats::secs;

const LADDER: [usize; 4] = [100, 250, 500, 1000];
const WITHIN: Duration = Duration::from_millis(2500);
const REQUIRED_SHARE: f64 = 0.95;
const CLIENT_STACK_BYTES: usize = 256 * 1024;

/// One run from its client's side, times from its own start.
struct Timing {
    /// The response head arrived.
    head: Duration,
    /// The first output arrived.
    first_output: Duration,
    /// From the last output to `done`.
    last_output_to_done: Duration,
    /// `done` arrived.
    wall: Duration,
}

fn one_run(api: &Api, expected: &[u8], go: &Barrier) -> Result<Timing, BenchError> {
    go.wait();
    let started = Instant::now();
    let mut connection = api.execute_sse(TICKS.file, &[])?;
    let head = started.elapsed();
    let mut check = ExpectedBytes::new(expected);
    let mut first_output = None;
    let mut last_output = started;
    let end = read_run(
        &mut connection,
        started + Duration::from_secs(120),
        |event| {
            first_output.get_or_insert(event.at);
            last_output = event.at;
            check.feed(event.data)
        },
    )?;
    expect_success(&end, "tick run")?;
    if !check.is_exact() {
        return Err(BenchError::Mismatch(check.describe()));
    }
    Ok(Timing {
        head,
        first_output: first_output.unwrap_or(started).duration_since(started),
        last_output_to_done: end.done_at.duration_since(last_output),
        wall: end.done_at.duration_since(started),
    })
}

/// The same script run directly by `sh` (stdout read through a pipe), no server: what the
/// machine itself manages at this concurrency.
fn one_direct_run(expected: &[u8], go: &Barrier) -> Result<Duration, BenchError> {
    go.wait();
    let started = Instant::now();
    let output = Command::new("sh")
        .arg("-c")
        .arg(TICKS.script)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(BenchError::io("run the tick script directly"))?;
    let wall = started.elapsed();
    if !output.status.success() || output.stdout != expected {
        return Err(BenchError::Mismatch("direct tick script output".into()));
    }
    Ok(wall)
}

/// Runs the script `n` times at once without the server; (in time, slowest, median).
fn direct_rung(
    n: usize,
    expected: &Arc<Vec<u8>>,
) -> Result<(usize, Duration, Duration), BenchError> {
    let go = Arc::new(Barrier::new(n + 1));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let (expected, go) = (expected.clone(), go.clone());
        let handle = std::thread::Builder::new()
            .name(format!("direct-{i}"))
            .stack_size(CLIENT_STACK_BYTES)
            .spawn(move || one_direct_run(&expected, &go))
            .map_err(BenchError::io(format!("start direct thread {i}")))?;
        handles.push(handle);
    }
    go.wait();
    let mut walls = Vec::with_capacity(n);
    for handle in handles {
        if let Ok(Ok(wall)) = handle.join() {
            walls.push(wall);
        }
    }
    walls.sort();
    let in_time = walls.iter().filter(|w| **w <= WITHIN).count();
    let slowest = walls.last().copied().unwrap_or_default();
    let median = walls.get(walls.len() / 2).copied().unwrap_or_default();
    Ok((in_time, slowest, median))
}

/// "median m, max x" of some durations.
fn spread(mut values: Vec<Duration>) -> String {
    values.sort();
    let median = values.get(values.len() / 2).copied().unwrap_or_default();
    let max = values.last().copied().unwrap_or_default();
    format!("median {}, max {}", secs(median), secs(max))
}

/// Runs one rung; returns how many made it in time.
fn rung(api: &Api, n: usize, expected: &Arc<Vec<u8>>) -> Result<usize, BenchError> {
    let (direct_in_time, direct_slowest, direct_median) = direct_rung(n, expected)?;
    std::thread::sleep(Duration::from_millis(500));
    let go = Arc::new(Barrier::new(n + 1));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let (api, expected, go) = (api.clone(), expected.clone(), go.clone());
        let handle = std::thread::Builder::new()
            .name(format!("run-client-{i}"))
            .stack_size(CLIENT_STACK_BYTES)
            .spawn(move || one_run(&api, &expected, &go));
        match handle {
            Ok(h) => handles.push(h),
            Err(e) => {
                // The barrier waits for n + 1; without every client it would never open.
                return Err(BenchError::Io(format!("start client thread {i}"), e));
            }
        }
    }
    let origin = Instant::now();
    go.wait();
    let mut timings = Vec::with_capacity(n);
    let mut problems: BTreeMap<String, usize> = BTreeMap::new();
    for handle in handles {
        match handle.join() {
            Ok(Ok(timing)) => timings.push(timing),
            Ok(Err(e)) => *problems.entry(e.to_string()).or_default() += 1,
            Err(_) => *problems.entry("client thread panicked".into()).or_default() += 1,
        }
    }
    let all_done = origin.elapsed();
    let walls: Vec<Duration> = timings.iter().map(|t| t.wall).collect();
    let in_time = walls.iter().filter(|w| **w <= WITHIN).count();
    let slowest = walls.iter().max().copied().unwrap_or_default();
    let mut sorted = walls.clone();
    sorted.sort();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    println!(
        "concurrent_{n}: {in_time}/{n} complete within {} (slowest {}, median {}, {} exact in any time; all finished {} after the start)",
        secs(WITHIN),
        secs(slowest),
        secs(median),
        walls.len(),
        secs(all_done),
    );
    println!(
        "  baseline without the server (sh -c, stdout piped): {direct_in_time}/{n} within {} (slowest {}, median {})",
        secs(WITHIN),
        secs(direct_slowest),
        secs(direct_median),
    );
    println!(
        "  response head: {}; first output: {}; last output to done: {}",
        spread(timings.iter().map(|t| t.head).collect()),
        spread(timings.iter().map(|t| t.first_output).collect()),
        spread(timings.iter().map(|t| t.last_output_to_done).collect()),
    );
    for (problem, count) in problems.iter().take(5) {
        println!("  {count} runs: {problem}");
    }
    Ok(in_time)
}

pub fn run(bench: &Bench) -> Result<Outcome, BenchError> {
    let (server, api) = bench.start(&[("MAX_CONCURRENT_RUNS", "5000")])?;
    let expected = Arc::new(ticks_output());
    let mut best: Option<(usize, usize)> = None;
    let mut stopped_at: Option<(usize, usize)> = None;
    for n in LADDER {
        let in_time = rung(&api, n, &expected)?;
        if (in_time as f64) < REQUIRED_SHARE * n as f64 {
            stopped_at = Some((n, in_time));
            break;
        }
        best = Some((n, in_time));
        // Let the finished runs' history writes and cleanup settle before the next rung.
        std::thread::sleep(Duration::from_secs(1));
    }
    let summary = match (best, stopped_at) {
        (Some((n, k)), None) => format!("concurrent {k}/{n} in time at the top rung"),
        (Some((n, k)), Some((m, j))) => {
            format!("concurrent {k}/{n} in time; {j}/{m} at the next rung (ladder stopped)")
        }
        (None, Some((m, j))) => format!("concurrent only {j}/{m} in time at the first rung"),
        (None, None) => "concurrent: no rung ran".into(),
    };
    println!("  {summary}");
    note_server_stderr(&server);
    Ok(Outcome {
        summary,
        goal_met: None,
        rows: Vec::new(),
    })
}
