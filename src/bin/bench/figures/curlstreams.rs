//! The streaming figures of issue 11, with `curl` as the client:
//! - `streams200`: 200 SSE executes of a 2-second, 20-line script, one `curl -N` process each,
//!   all started at once; wall until the last curl exits, against the same 200 scripts started
//!   directly in parallel, each piped through `cat` (goal ≤ 1.3×, every output exact);
//! - `seq_curl`: `seq 1 1000000` over SSE read by `curl -N` against
//!   `sh -c 'seq 1 1000000' | cat` (goal ≤ 4×, medians of paired runs);
//! - `sse100m`: 100 MB over SSE read by curl, as a rate against the same command piped through
//!   `cat` (goal ≥ 50 %), and the server's peak RSS meanwhile (goal < 40 MiB).
//!
//! Timed curls write to /dev/null (the client is curl alone); the output of one more run of
//! each is parsed and compared byte for byte.
#![forbid(unsafe_code)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{note_server_stderr, Bench, Outcome};
use crate::cpu::{server_cpu, wait_until_idle, waited_children_cpu, ServerCpu};
use crate::curl::Curl;
use crate::error::BenchError;
use crate::report::Row;
use crate::rss::{reset_peak, status_kib, Sampler};
use crate::runbooks::{lines20_output, seq_output, Book, ExpectedBytes, LINES20, OUT_100M, SEQ};
use crate::server::TempDir;
use crate::sse::{self, Flow};
use crate::stats::{median, mib_from_kib, verdict};

const STREAMS: usize = 200;
/// Threads starting the clients of `run_all`.
const SPAWNERS: usize = 8;
const STREAM_ROUNDS: usize = 3;
const STREAM_GOAL: f64 = 1.3;
const SEQ_ROUNDS: usize = 7;
const SEQ_GOAL: f64 = 4.0;
const BULK_ROUNDS: usize = 7;
const BULK_BYTES: f64 = 100_000_000.0;
const RATE_GOAL: f64 = 0.5;
const RSS_GOAL_KIB: u64 = 40 * 1024;

/// The thread that keeps a client's whole output, and when its first byte came.
type Collector = std::thread::JoinHandle<(Vec<u8>, Option<Instant>)>;

/// Starts `command` with stdout piped to a thread that keeps it all.
fn spawn_collecting(mut command: Command, what: &str) -> Result<(Child, Collector), BenchError> {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .map_err(BenchError::io(format!("start {what}")))?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Server("no stdout pipe".into()))?;
    let reader = std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut bytes = Vec::new();
            let mut first = [0u8; 1];
            let first_at = match out.read(&mut first) {
                Ok(1) => {
                    bytes.push(first[0]);
                    Some(Instant::now())
                }
                _ => None,
            };
            let _ = out.read_to_end(&mut bytes);
            (bytes, first_at)
        })
        .map_err(BenchError::io("start a reader thread"))?;
    Ok((child, reader))
}

/// Runs `command` to its end with stdout to /dev/null; its wall time in seconds.
fn timed_quiet(mut command: Command, what: &str) -> Result<f64, BenchError> {
    let started = Instant::now();
    let status = command
        .stdout(Stdio::null())
        .status()
        .map_err(BenchError::io(format!("run {what}")))?;
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(BenchError::Protocol(format!(
            "{what}: exit status {status}"
        )));
    }
    Ok(secs)
}

/// `sh -c 'SCRIPT' | cat` with `cat`'s output to `stdout`.
fn direct(script: &str, piped: bool) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("( {script}\n) | cat"))
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    if !piped {
        c.stdout(Stdio::null());
    }
    c
}

/// Checks a captured event stream: stdout exactly `expected`, and `done` with return code 0.
fn check_stream(bytes: &[u8], expected: &[u8]) -> Result<(), BenchError> {
    let mut check = ExpectedBytes::new(expected);
    let mut return_code = None;
    sse::parse_all(bytes, |event| {
        match event.name {
            "stdout" => check.feed(event.data),
            "done" => {
                let v: serde_json::Value = serde_json::from_slice(event.data)
                    .map_err(|e| BenchError::Protocol(format!("done data: {e}")))?;
                return_code = v.get("return_code").and_then(|c| c.as_i64());
                return Ok(Flow::Stop);
            }
            _ => {}
        }
        Ok(Flow::Continue)
    })?;
    if return_code != Some(0) {
        return Err(BenchError::Mismatch(format!(
            "done with return code {return_code:?}"
        )));
    }
    if !check.is_exact() {
        return Err(BenchError::Mismatch(check.describe()));
    }
    Ok(())
}

/// When the clients of one `run_all` started and ended, in seconds from its start.
struct Timeline {
    /// When the last client had been started.
    spawned: f64,
    /// When each client's first output byte arrived, ascending.
    first_bytes: Vec<f64>,
    /// When each client exited, ascending.
    ends: Vec<f64>,
}

impl Timeline {
    fn describe(&self) -> String {
        let at = |v: &[f64], q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        format!(
            "all started by {:.2} s; first byte p50 {:.2} s, last {:.2} s; exits p50 {:.2} s, last {:.2} s",
            self.spawned,
            at(&self.first_bytes, 0.5),
            at(&self.first_bytes, 1.0),
            at(&self.ends, 0.5),
            at(&self.ends, 1.0)
        )
    }
}

/// Starts `n` commands at once, collects their outputs; (wall until the last exits, outputs,
/// timeline).
fn run_all(
    make: impl Fn() -> Command + Sync,
    n: usize,
) -> Result<(f64, Vec<Vec<u8>>, Timeline), BenchError> {
    let started = Instant::now();
    // Several threads start the clients: one thread alone waits for each child's exec in turn,
    // which under the load of the clients already running makes the start of the last one a
    // figure of the harness (the same for both sides) rather than of what is measured.
    let spawned_by_thread: Vec<Result<Vec<_>, BenchError>> = std::thread::scope(|scope| {
        let make = &make;
        let spawners: Vec<_> = (0..SPAWNERS)
            .map(|k| {
                scope.spawn(move || {
                    (k..n)
                        .step_by(SPAWNERS)
                        .map(|_| spawn_collecting(make(), "a client"))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        spawners
            .into_iter()
            .map(|s| {
                s.join()
                    .unwrap_or_else(|_| Err(BenchError::Server("a spawner panicked".into())))
            })
            .collect()
    });
    let mut running = Vec::with_capacity(n);
    for batch in spawned_by_thread {
        running.extend(batch?);
    }
    let spawned = started.elapsed().as_secs_f64();
    let mut outputs = Vec::with_capacity(n);
    let mut first_bytes = Vec::with_capacity(n);
    let mut ends = Vec::with_capacity(n);
    let mut failures = 0;
    for (mut child, reader) in running {
        let ok = child.wait().is_ok_and(|s| s.success());
        ends.push(started.elapsed().as_secs_f64());
        failures += usize::from(!ok);
        let (bytes, first_at) = reader.join().unwrap_or_default();
        if let Some(at) = first_at {
            first_bytes.push(at.duration_since(started).as_secs_f64());
        }
        outputs.push(bytes);
    }
    let wall = started.elapsed().as_secs_f64();
    if failures > 0 {
        return Err(BenchError::Protocol(format!(
            "{failures} of {n} exited with an error"
        )));
    }
    first_bytes.sort_by(f64::total_cmp);
    ends.sort_by(f64::total_cmp);
    Ok((
        wall,
        outputs,
        Timeline {
            spawned,
            first_bytes,
            ends,
        },
    ))
}

pub fn streams(bench: &Bench) -> Result<Outcome, BenchError> {
    streams_of(bench, Clients::KeepAlive)
}

/// `streams200` with clients that ask the server to close each connection after its
/// response, as nginx does: a reference beside the goal's figure, which uses curl's default
/// keep-alive.
pub fn streams_closing(bench: &Bench) -> Result<Outcome, BenchError> {
    streams_of(bench, Clients::Closing)
}

/// How `streams` clients treat their connection.
#[derive(Clone, Copy, PartialEq)]
enum Clients {
    /// curl's default (HTTP/1.1 keep-alive).
    KeepAlive,
    /// `Connection: close`.
    Closing,
}

fn streams_of(bench: &Bench, clients: Clients) -> Result<Outcome, BenchError> {
    let name = match clients {
        Clients::KeepAlive => "streams200",
        Clients::Closing => "streams200_close",
    };
    let (server, api) = bench.start(&[("MAX_CONCURRENT_RUNS", "1000")])?;
    let scratch = TempDir::new("runbookd-bench-curl")?;
    let client = Curl::new(&api, scratch.path())?;
    let expected = lines20_output();
    let mut server_walls = Vec::new();
    let mut direct_walls = Vec::new();
    let mut cpu = CpuRounds::default();
    for _ in 0..STREAM_ROUNDS {
        // Each side starts on an idle server: what the previous round left it to do (spare
        // files made after a burst, start-up work) lands in neither side's wall time.
        let waited = wait_until_idle(server.pid)?;
        let children_before = waited_children_cpu()?;
        let (wall, outputs, timeline) = run_all(|| direct(LINES20.script, true), STREAMS)?;
        cpu.direct.push(waited_children_cpu()? - children_before);
        println!(
            "  direct: {} (after {waited:.1} s waiting for an idle server)",
            timeline.describe()
        );
        let exact = outputs.iter().filter(|o| **o == expected).count();
        if exact != STREAMS {
            return Err(BenchError::Mismatch(format!(
                "direct runs exact: {exact}/{STREAMS}"
            )));
        }
        direct_walls.push(wall);
        std::thread::sleep(Duration::from_millis(300));
        wait_until_idle(server.pid)?;
        let (server_before, children_before) = (server_cpu(server.pid)?, waited_children_cpu()?);
        let client_command = || match clients {
            Clients::KeepAlive => client.execute_sse(LINES20.file),
            Clients::Closing => client.execute_sse_closing(LINES20.file),
        };
        let (wall, outputs, timeline) = run_all(client_command, STREAMS)?;
        cpu.curl.push(waited_children_cpu()? - children_before);
        cpu.server.push(server_cpu(server.pid)? - server_before);
        println!("  server: {}", timeline.describe());
        let mut bad = 0;
        for output in &outputs {
            if let Err(e) = check_stream(output, &expected) {
                if bad == 0 {
                    println!("  a stream was not exact: {e}");
                }
                bad += 1;
            }
        }
        if bad > 0 {
            return Err(BenchError::Mismatch(format!(
                "{bad} of {STREAMS} streams not exact"
            )));
        }
        server_walls.push(wall);
        std::thread::sleep(Duration::from_millis(300));
    }
    let (s, d) = (median(&server_walls), median(&direct_walls));
    let ratio = s / d.max(1e-9);
    let met = ratio <= STREAM_GOAL;
    let (asking, judged) = match clients {
        Clients::KeepAlive => ("", format!("goal <= {STREAM_GOAL}x: {}", verdict(met))),
        Clients::Closing => (", asking to close", "a reference beside streams200".into()),
    };
    println!(
        "{name}: {STREAMS} SSE executes (curl -N each{asking}) {s:.2} s, the same scripts piped through cat {d:.2} s: {ratio:.2}x (medians of {STREAM_ROUNDS}, all outputs exact); {judged}"
    );
    let accounts = cpu.describe(d);
    println!("  {}", accounts.text);
    note_server_stderr(&server);
    // The goal is the keep-alive figure's; the closing one is a reference beside it.
    let (goal, met) = match clients {
        Clients::KeepAlive => (format!("<= {STREAM_GOAL}x"), Some(met)),
        Clients::Closing => ("(reference)".to_string(), None),
    };
    Ok(Outcome {
        summary: format!("{name} {ratio:.2}x"),
        goal_met: met,
        rows: vec![Row {
            name: format!("{name}_wall"),
            value: s,
            baseline: Some(d),
            unit: "s",
            ratio: Some(ratio),
            goal,
            met,
            detail: json!({
                "server_walls": server_walls,
                "direct_walls": direct_walls,
                "cpu_seconds": accounts.json,
            }),
        }],
    })
}

/// CPU seconds of each round of `streams`: the direct scripts (with `cat`), and in the server's
/// rounds the curl clients, the server's own threads and the scripts it ran.
#[derive(Default)]
struct CpuRounds {
    direct: Vec<f64>,
    curl: Vec<f64>,
    server: Vec<ServerCpu>,
}

/// What `CpuRounds::describe` tells.
struct CpuAccount {
    text: String,
    json: serde_json::Value,
}

impl CpuRounds {
    /// Medians of the rounds, and what each part adds to the wall time when the processors
    /// are busy all along (its CPU time over their number), as a share of `direct_wall`.
    fn describe(&self, direct_wall: f64) -> CpuAccount {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let direct = median(&self.direct);
        let curl = median(&self.curl);
        let own = median(&self.server.iter().map(|c| c.own).collect::<Vec<_>>());
        let scripts = median(&self.server.iter().map(|c| c.scripts).collect::<Vec<_>>());
        let share = |cpu: f64| cpu / cores / direct_wall.max(1e-9);
        let text = format!(
            "CPU seconds per round (medians): direct scripts and cat {direct:.2}; server round: scripts {scripts:.2}, server {own:.2}, curl {curl:.2}. On {cores} busy cores each adds its CPU / {cores} to the wall: the server +{:.2}x of the direct wall, curl alone +{:.2}x",
            share(own),
            share(curl),
        );
        let json = json!({
            "cores": cores,
            "direct_scripts": direct,
            "server_scripts": scripts,
            "server_own": own,
            "curl": curl,
            "server_share_of_direct_wall": share(own),
            "curl_share_of_direct_wall": share(curl),
        });
        CpuAccount { text, json }
    }
}

/// Paired timing of an SSE execute read by curl against the script piped through cat; then
/// one more run parsed and compared. (server median, direct median) in seconds.
fn paired(
    client: &Curl,
    book: &Book,
    rounds: usize,
    check: impl Fn(&[u8]) -> Result<(), BenchError>,
) -> Result<(f64, f64, Vec<f64>, Vec<f64>), BenchError> {
    let mut server_times = Vec::new();
    let mut direct_times = Vec::new();
    for _ in 0..rounds {
        direct_times.push(timed_quiet(direct(book.script, false), "the direct run")?);
        server_times.push(timed_quiet(client.execute_sse(book.file), "curl")?);
    }
    let (child, reader) = spawn_collecting(client.execute_sse(book.file), "curl")?;
    let mut child = child;
    let _ = child.wait();
    check(&reader.join().unwrap_or_default().0)?;
    Ok((
        median(&server_times),
        median(&direct_times),
        server_times,
        direct_times,
    ))
}

pub fn seq(bench: &Bench) -> Result<Outcome, BenchError> {
    let (server, api) = bench.start(&[])?;
    let scratch = TempDir::new("runbookd-bench-curl")?;
    let client = Curl::new(&api, scratch.path())?;
    let expected = seq_output();
    let (s, d, server_times, direct_times) = paired(&client, &SEQ, SEQ_ROUNDS, |bytes| {
        check_stream(bytes, &expected)
    })?;
    let ratio = s / d.max(1e-9);
    let met = ratio <= SEQ_GOAL;
    println!(
        "seq_curl: `seq 1 1000000` over SSE read by curl {s:.3} s, `sh -c 'seq 1 1000000' | cat` {d:.3} s: {ratio:.2}x (medians of {SEQ_ROUNDS} paired runs; output exact); goal <= {SEQ_GOAL}x: {}",
        verdict(met)
    );
    note_server_stderr(&server);
    Ok(Outcome {
        summary: format!("seq_curl {ratio:.2}x"),
        goal_met: Some(met),
        rows: vec![Row {
            name: "seq_1e6_sse_curl".into(),
            value: s,
            baseline: Some(d),
            unit: "s",
            ratio: Some(ratio),
            goal: format!("<= {SEQ_GOAL}x"),
            met: Some(met),
            detail: json!({"server_times": server_times, "direct_times": direct_times}),
        }],
    })
}

pub fn bulk(bench: &Bench) -> Result<Outcome, BenchError> {
    let (server, api) = bench.start(&[])?;
    let scratch = TempDir::new("runbookd-bench-curl")?;
    let client = Curl::new(&api, scratch.path())?;
    let baseline_kib = status_kib(server.pid, "VmRSS")?;
    reset_peak(server.pid)?;
    let sampler = Sampler::start(server.pid);
    let (server_before, children_before) = (server_cpu(server.pid)?, waited_children_cpu()?);
    let line = crate::runbooks::BULK_LINE;
    let (s, d, server_times, direct_times) = paired(&client, &OUT_100M, BULK_ROUNDS, |bytes| {
        let mut check = crate::runbooks::RepeatedLine::new(line, 100_000_000);
        let mut done = false;
        sse::parse_all(bytes, |event| {
            match event.name {
                "stdout" => check.feed(event.data),
                "done" => {
                    done = true;
                    return Ok(Flow::Stop);
                }
                _ => {}
            }
            Ok(Flow::Continue)
        })?;
        if !done || !check.is_exact() {
            return Err(BenchError::Mismatch(format!(
                "100 MB stream (done: {done}): {}",
                check.describe()
            )));
        }
        Ok(())
    })?;
    // Each round ran the command once directly (with cat) and once through the server (with
    // curl); one more server run was checked. The bench's children are the direct runs and the
    // curls; the server's, the scripts.
    let server_runs = (BULK_ROUNDS + 1) as f64;
    let server_spent = server_cpu(server.pid)? - server_before;
    let children_spent = waited_children_cpu()? - children_before;
    println!(
        "  CPU per run: server threads {:.0} ms, the script through the server {:.0} ms; this bench's children (the direct runs and the curls) {:.0} ms per round",
        server_spent.own / server_runs * 1e3,
        server_spent.scripts / server_runs * 1e3,
        children_spent / BULK_ROUNDS as f64 * 1e3,
    );
    let (sampled_kib, _) = sampler.finish();
    let peak_kib = sampled_kib.max(status_kib(server.pid, "VmHWM")?);
    let (server_rate, direct_rate) = (BULK_BYTES / s / 1e6, BULK_BYTES / d / 1e6);
    let share = server_rate / direct_rate.max(1e-9);
    let rate_met = share >= RATE_GOAL;
    let rss_met = peak_kib < RSS_GOAL_KIB;
    println!(
        "sse100m: 100 MB over SSE read by curl {server_rate:.0} MB/s ({s:.3} s), the command piped through cat {direct_rate:.0} MB/s ({d:.3} s): {:.0} % (medians of {BULK_ROUNDS}; goal >= {:.0} %: {}); server peak RSS {} (at start {}; goal < {}: {})",
        share * 100.0,
        RATE_GOAL * 100.0,
        verdict(rate_met),
        mib_from_kib(peak_kib),
        mib_from_kib(baseline_kib),
        mib_from_kib(RSS_GOAL_KIB),
        verdict(rss_met)
    );
    note_server_stderr(&server);
    Ok(Outcome {
        summary: format!(
            "sse100m {:.0} % of direct, peak {}",
            share * 100.0,
            mib_from_kib(peak_kib)
        ),
        goal_met: Some(rate_met && rss_met),
        rows: vec![
            Row {
                name: "sse100m_rate".into(),
                value: server_rate,
                baseline: Some(direct_rate),
                unit: "MB/s",
                ratio: Some(share),
                goal: format!(">= {RATE_GOAL}x"),
                met: Some(rate_met),
                detail: json!({
                    "server_times": server_times,
                    "direct_times": direct_times,
                    "server_cpu_ms_per_run": server_spent.own / server_runs * 1e3,
                }),
            },
            Row {
                name: "sse100m_peak_rss".into(),
                value: peak_kib as f64 / 1024.0,
                baseline: Some(baseline_kib as f64 / 1024.0),
                unit: "MiB",
                ratio: None,
                goal: "< 40 MiB".into(),
                met: Some(rss_met),
                detail: json!({}),
            },
        ],
    })
}
