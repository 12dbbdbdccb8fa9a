//! `rss100m` and `rss1g`: the server's resident memory while one viewer reads a run that
//! prints 100 MB (SSE execute; goal: peak ≤ 40 MiB) or 1 GB (started with `?async=true`,
//! read through `/api/runs/{id}/events`, all of it stored; goal: growth ≤ 10 MiB). The
//! baseline is taken after a warm-up run; the peak is the larger of `VmRSS` sampled every
//! 20 ms and `VmHWM` reset just before the run.
#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use super::{note_server_stderr, Bench, Outcome};
use crate::api::{expect_success, read_run, Api};
use crate::error::BenchError;
use crate::rss::{reset_peak, status_kib, Sampler};
use crate::runbooks::{Book, RepeatedLine, BULK_LINE, OUT_100M, OUT_1G, WARM_UP};
use crate::stats::{mib_from_kib, secs, verdict};

/// What a memory figure checks.
enum Goal {
    /// The peak itself, in KiB.
    PeakKib(u64),
    /// The growth over the baseline, in KiB.
    GrowthKib(u64),
}

struct Case<'a> {
    name: &'static str,
    book: &'a Book,
    total_bytes: u64,
    start_async: bool,
    extra_env: &'a [(&'a str, &'a str)],
    goal: Goal,
    deadline: Duration,
}

pub fn run_100m(bench: &Bench) -> Result<Outcome, BenchError> {
    measure(
        bench,
        &Case {
            name: "rss100m",
            book: &OUT_100M,
            total_bytes: 100_000_000,
            start_async: false,
            extra_env: &[],
            goal: Goal::PeakKib(40 * 1024),
            deadline: Duration::from_secs(120),
        },
    )
}

pub fn run_1g(bench: &Bench) -> Result<Outcome, BenchError> {
    measure(
        bench,
        &Case {
            name: "rss1g",
            book: &OUT_1G,
            total_bytes: 1_000_000_000,
            start_async: true,
            extra_env: &[("RUN_LOG_MAX_BYTES", "2000000000")],
            goal: Goal::GrowthKib(10 * 1024),
            deadline: Duration::from_secs(300),
        },
    )
}

/// Total size of the files under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => tree_bytes(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// One small run the way the measured run will be made, so lazily built state exists.
fn warm_up(api: &Api, start_async: bool) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut connection = if start_async {
        let run_id = api.execute_async(WARM_UP.file, &[])?;
        api.attach(&run_id)?
    } else {
        api.execute_sse(WARM_UP.file, &[])?
    };
    let end = read_run(&mut connection, deadline, |_| {})?;
    expect_success(&end, "warm-up run")
}

fn measure(bench: &Bench, case: &Case<'_>) -> Result<Outcome, BenchError> {
    let (mut server, api) = bench.start(case.extra_env)?;
    let pid = server.pid;
    warm_up(&api, case.start_async)?;
    std::thread::sleep(Duration::from_millis(300));
    let baseline = status_kib(pid, "VmRSS")?;
    let peak_was_reset = reset_peak(pid).is_ok();
    let sampler = Sampler::start(pid);
    let started = Instant::now();
    let mut connection = if case.start_async {
        let run_id = api.execute_async(case.book.file, &[])?;
        api.attach(&run_id)?
    } else {
        api.execute_sse(case.book.file, &[])?
    };
    let mut check = RepeatedLine::new(BULK_LINE, case.total_bytes);
    let end = read_run(&mut connection, started + case.deadline, |event| {
        check.feed(event.data)
    })?;
    let elapsed = end.done_at.duration_since(started);
    drop(connection);
    let (sampled_peak, samples) = sampler.finish();
    let hwm = status_kib(pid, "VmHWM")?;
    let after = status_kib(pid, "VmRSS")?;
    let stored = server
        .state_dir()
        .map(|dir| tree_bytes(&dir.join("runs")))
        .unwrap_or_default();
    expect_success(&end, case.name)?;
    let peak = if peak_was_reset {
        sampled_peak.max(hwm)
    } else {
        sampled_peak
    };
    let growth = peak.saturating_sub(baseline);
    let (met, goal_text) = match case.goal {
        Goal::PeakKib(limit) => (
            peak <= limit,
            format!("goal peak <= {}", mib_from_kib(limit)),
        ),
        Goal::GrowthKib(limit) => (
            growth <= limit,
            format!("goal growth <= {}", mib_from_kib(limit)),
        ),
    };
    let mode = if case.start_async {
        "async start + 1 viewer on /events"
    } else {
        "SSE execute"
    };
    let rate = case.total_bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6;
    println!(
        "{}: peak {} (VmHWM{} {}, sampled VmRSS max {} over {samples} samples), baseline {}, growth {}; {goal_text}: {}",
        case.name,
        mib_from_kib(peak),
        if peak_was_reset { "" } else { " not reset, ignored" },
        mib_from_kib(hwm),
        mib_from_kib(sampled_peak),
        mib_from_kib(baseline),
        mib_from_kib(growth),
        verdict(met && check.is_exact()),
    );
    println!(
        "  {mode}: stdout {}/{} bytes {} in {} ({rate:.0} MB/s); RSS after {}; run log on disk {stored} bytes",
        check.received(),
        case.total_bytes,
        if check.is_exact() { "exact" } else { "NOT exact" },
        secs(elapsed),
        mib_from_kib(after),
    );
    note_server_stderr(&server);
    let stop_took = server.stop();
    if stop_took > Duration::from_secs(5) {
        println!("  server took {} to stop", secs(stop_took));
    }
    if !check.is_exact() {
        return Err(BenchError::Mismatch(format!(
            "{}: {}",
            case.name,
            check.describe()
        )));
    }
    Ok(Outcome {
        summary: format!(
            "{} peak {} growth {}",
            case.name,
            mib_from_kib(peak),
            mib_from_kib(growth)
        ),
        goal_met: Some(met),
        rows: Vec::new(),
    })
}
