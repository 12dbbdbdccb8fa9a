//! `runbookd-bench`: measures the figures the runbookd issues ask for (partial-line gap, `seq`
//! throughput against a shell baseline, memory under 100 MB and 1 GB of output, 1000 attached
//! viewers, write-to-read latency, concurrent streaming runs, and issue 11's per-run overhead
//! against `/healthz` and `webhook`, 200 curl streams, `seq` and 100 MB read by curl, `done`
//! latency) against the release binary next to it, each on a fresh server in a private
//! temporary directory, over loopback only.
//!
//! Usage: `cargo run --release --bin runbookd-bench -- [--json PATH] [NAME...]` (no NAME:
//! all). Prints a table of figure, baseline, ratio and goal at the end, and writes it as JSON
//! with `--json`. Exit status 0 when every figure ran and met its goal, 1 otherwise, 2 for a
//! bad argument.
#![forbid(unsafe_code)]

mod api;
mod client;
mod cpu;
mod curl;
mod error;
mod figures;
mod limits;
mod report;
mod rss;
mod runbooks;
mod server;
mod sse;
mod stats;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use error::BenchError;
use figures::{Bench, Outcome, NAMES};

fn usage() -> String {
    format!(
        "usage: runbookd-bench [--json PATH] [NAME...]\n\
         Runs the named figures (default: all) against the runbookd binary next to this one,\n\
         prints a table of the results and, with --json, writes it to PATH.\n\
         Names: {}\n\
         Exit status: 0 all figures ran and met their goals, 1 otherwise, 2 bad arguments.\n",
        NAMES.join(", ")
    )
}

/// The figures asked for, in the canonical order; an unknown name is an error.
fn selected(args: &[String]) -> Result<Vec<&'static str>, String> {
    if let Some(unknown) = args.iter().find(|a| !NAMES.contains(&a.as_str())) {
        return Err(format!("unknown figure {unknown:?}"));
    }
    Ok(NAMES
        .iter()
        .copied()
        .filter(|n| args.is_empty() || args.iter().any(|a| a == n))
        .collect())
}

/// A random secret of 64 hex characters.
fn random_secret() -> Result<String, BenchError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| BenchError::Server(format!("no random bytes: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `MemTotal` of the machine, as text.
fn machine_memory() -> Option<String> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = text.lines().find_map(|l| {
        l.strip_prefix("MemTotal:")?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    })?;
    Some(format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
}

/// The 1-, 5- and 15-minute load averages (others' work on the machine skews every figure).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// One line about the machine: CPUs, their model, kernel, memory, descriptor limit.
fn machine_context(nofile: &str) -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let memory = machine_memory().unwrap_or_else(|| "?".into());
    format!(
        "machine: nproc {cpus} ({model}), kernel {kernel}, memory {memory}, RLIMIT_NOFILE {nofile}, load average {}",
        load_average()
    )
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    }
    let json_path = match args.iter().position(|a| a == "--json") {
        Some(at) if at + 1 < args.len() => {
            let path = PathBuf::from(args.remove(at + 1));
            args.remove(at);
            Some(path)
        }
        Some(_) => {
            eprintln!("runbookd-bench: --json needs a path\n{}", usage());
            return ExitCode::from(2);
        }
        None => None,
    };
    let names = match selected(&args) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("runbookd-bench: {e}\n{}", usage());
            return ExitCode::from(2);
        }
    };
    limits::raise_nofile_by_reexec();
    match run(&names, json_path.as_deref()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("runbookd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the figures; true when all ran and met their goals.
fn run(names: &[&str], json_path: Option<&std::path::Path>) -> Result<bool, BenchError> {
    let nofile = match limits::nofile() {
        Some((soft, hard)) => format!("{soft} (hard {hard})"),
        None => "unknown".into(),
    };
    let exe = std::env::current_exe().map_err(BenchError::io("locate this executable"))?;
    let binary: PathBuf = exe
        .parent()
        .map(|dir| dir.join("runbookd"))
        .ok_or_else(|| BenchError::Server("this executable has no directory".into()))?;
    if !binary.is_file() {
        return Err(BenchError::Server(format!(
            "{} not found: build it first (cargo build --release)",
            binary.display()
        )));
    }
    let machine = machine_context(&nofile);
    println!("{machine}");
    println!("server binary: {}", binary.display());
    let runbooks = server::TempDir::new("runbookd-bench-runbooks")?;
    runbooks::write_all(runbooks.path())?;
    let bench = Bench {
        binary,
        runbooks_dir: runbooks.path().to_path_buf(),
        secret: random_secret()?,
    };
    let started = Instant::now();
    let mut results: Vec<(&str, Result<Outcome, String>)> = Vec::new();
    for name in names {
        let figure_started = Instant::now();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| figures::run(name, &bench)));
        let outcome = match outcome {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("panicked".to_string()),
        };
        if let Err(e) = &outcome {
            println!("{name}: ERROR {e}");
        }
        println!("  ({name} took {})", stats::secs(figure_started.elapsed()));
        results.push((name, outcome));
    }
    let mut all_good = true;
    let parts: Vec<String> = results
        .iter()
        .map(|(name, outcome)| match outcome {
            Ok(o) => match o.goal_met {
                Some(true) => format!("{} [met]", o.summary),
                Some(false) => {
                    all_good = false;
                    format!("{} [MISSED]", o.summary)
                }
                None => o.summary.clone(),
            },
            Err(_) => {
                all_good = false;
                format!("{name} [ERROR]")
            }
        })
        .collect();
    let rows: Vec<report::Row> = results
        .iter()
        .filter_map(|(_, outcome)| outcome.as_ref().ok())
        .flat_map(|o| o.rows.iter().cloned())
        .collect();
    if !rows.is_empty() {
        print!("{}", report::table(&rows));
    }
    if let Some(path) = json_path {
        let machine = format!("{machine}; load average at the end {}", load_average());
        report::write_json(path, &machine, &rows)?;
        println!("wrote {}", path.display());
    }
    println!(
        "summary: {} | total {}, load average now {}",
        parts.join("; "),
        stats::secs(started.elapsed()),
        load_average()
    );
    Ok(all_good)
}
