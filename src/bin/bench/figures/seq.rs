//! `seq`: an SSE execute of `seq 1 1000000` timed to its `done` event, its stdout compared
//! byte for byte, against the shell pipeline `sh -c 'seq 1 1000000' | cat > /dev/null` timed
//! from spawn to exit in the same process, alternating (goal: ratio of medians ≤ 5).
#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{note_server_stderr, Bench, Outcome};
use crate::api::{expect_success, read_run, Api};
use crate::error::BenchError;
use crate::runbooks::{seq_output, ExpectedBytes, SEQ, WARM_UP};
use crate::stats::{median, verdict};

const REPEATS: usize = 5;
const GOAL_RATIO: f64 = 5.0;

/// Runs the shell pipeline once; its wall time.
fn baseline_once() -> Result<Duration, BenchError> {
    let started = Instant::now();
    let mut producer = Command::new("sh")
        .args(["-c", "seq 1 1000000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(BenchError::io("spawn sh -c 'seq 1 1000000'"))?;
    let pipe = producer
        .stdout
        .take()
        .ok_or_else(|| BenchError::Server("no pipe from seq".into()))?;
    let mut consumer = Command::new("cat")
        .stdin(Stdio::from(pipe))
        .stdout(Stdio::null())
        .spawn()
        .map_err(BenchError::io("spawn cat"))?;
    let produced = producer.wait().map_err(BenchError::io("wait for sh"))?;
    let consumed = consumer.wait().map_err(BenchError::io("wait for cat"))?;
    let elapsed = started.elapsed();
    if !produced.success() || !consumed.success() {
        return Err(BenchError::Server("the baseline pipeline failed".into()));
    }
    Ok(elapsed)
}

/// CPU time this thread has used, from `/proc/thread-self/schedstat` (nanoseconds), to show
/// how much of a measured run the benchmark's own parsing took.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = text.split_whitespace().next()?.parse::<u64>().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Wall time of an SSE execute of a one-line script: the fixed cost of any run.
fn trivial_run(api: &Api) -> Result<f64, BenchError> {
    let started = Instant::now();
    let mut connection = api.execute_sse(WARM_UP.file, &[])?;
    let end = read_run(&mut connection, started + Duration::from_secs(30), |_| {})?;
    expect_success(&end, "trivial run")?;
    Ok(end.done_at.duration_since(started).as_secs_f64())
}

pub fn run(bench: &Bench) -> Result<Outcome, BenchError> {
    let (server, api) = bench.start(&[])?;
    let expected = seq_output();
    let mut server_times = Vec::new();
    let mut baseline_times = Vec::new();
    let mut exact_runs = 0;
    let mut last_received = 0;
    let mut client_cpu = Vec::new();
    let mut trivial_times = Vec::new();
    let mut done_after_output = Vec::new();
    for _ in 0..REPEATS {
        baseline_times.push(baseline_once()?.as_secs_f64());
        trivial_times.push(trivial_run(&api)?);
        let cpu_before = thread_cpu();
        let started = Instant::now();
        let mut connection = api.execute_sse(SEQ.file, &[])?;
        let mut check = ExpectedBytes::new(&expected);
        let mut last_output = started;
        let end = read_run(
            &mut connection,
            started + Duration::from_secs(120),
            |event| {
                last_output = event.at;
                check.feed(event.data)
            },
        )?;
        done_after_output.push(end.done_at.duration_since(last_output).as_secs_f64());
        server_times.push(end.done_at.duration_since(started).as_secs_f64());
        if let (Some(before), Some(after)) = (cpu_before, thread_cpu()) {
            client_cpu.push(after.saturating_sub(before).as_secs_f64());
        }
        expect_success(&end, "seq run")?;
        last_received = check.received();
        if check.is_exact() {
            exact_runs += 1;
        } else {
            println!("  seq run not exact: {}", check.describe());
        }
    }
    let server_median = median(&server_times);
    let baseline_median = median(&baseline_times);
    let ratio = server_median / baseline_median.max(1e-9);
    let met = ratio <= GOAL_RATIO && exact_runs == REPEATS;
    println!(
        "seq_1e6_sse: median {server_median:.3} s over {REPEATS} runs (baseline sh|cat median {baseline_median:.3} s, ratio {ratio:.2}x), bytes exact {last_received}/{} in {exact_runs}/{REPEATS} runs; goal ratio <= {GOAL_RATIO}x: {}",
        expected.len(),
        verdict(met)
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "  each run: server {} s; baseline {} s",
        fmt(&server_times),
        fmt(&baseline_times)
    );
    println!(
        "  last output to done (the result object, stdout again): median {:.3} s; fixed cost of a run (SSE execute of `echo`): median {:.3} s; this benchmark's own CPU reading a seq stream: median {:.3} s",
        median(&done_after_output),
        median(&trivial_times),
        median(&client_cpu)
    );
    note_server_stderr(&server);
    if exact_runs != REPEATS {
        return Err(BenchError::Mismatch(format!(
            "seq output exact in only {exact_runs} of {REPEATS} runs"
        )));
    }
    Ok(Outcome {
        summary: format!("seq {server_median:.3} s ({ratio:.1}x)"),
        goal_met: Some(met),
        rows: Vec::new(),
    })
}
