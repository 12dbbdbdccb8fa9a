//! `overhead`: the fixed cost of a run as a caller feels it. One `curl` process per request,
//! in rounds of four blocks of `BLOCK` back-to-back requests, one block of each kind, their
//! order rotating from round to round: `GET /healthz` (the baseline: curl, connect, one
//! request), a synchronous execute of `echo hi`, and, when Debian's `webhook` (adnanh/webhook)
//! is on the PATH, the same script behind it. A block's requests follow each other as a
//! script calling runbooks in a loop would, so what a server does in the background after a
//! request (runbookd makes the next run's spare files and cgroup) lands on its own next
//! request rather than on another kind's. The figure is the median over rounds of (execute −
//! healthz), each side the median of its block; goal ≤ 1.5 ms and no more than webhook's. curl
//! also reports each request's server side (request sent to first byte), which leaves out curl's
//! own start, connect and exit, the noisiest part of a request here. The same execute against a second
//! server with `RUN_CGROUP=off` is measured in the same rounds (moving a script into its run's
//! cgroup is most of a run's cost where cgroups are used). A third server with
//! `RUST_LOG=runbookd::stages=debug` then gives the median time of each stage of a run.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{note_server_stderr, Bench, Outcome};
use crate::cpu::wait_until_idle;
use crate::curl::{self, Curl};
use crate::error::BenchError;
use crate::report::Row;
use crate::runbooks::ECHO;
use crate::server::TempDir;
use crate::stats::{median, verdict};

const ROUNDS: usize = 60;
/// Back-to-back requests of one kind in a round.
const BLOCK: usize = 5;
const WARM_UP_ROUNDS: usize = 3;
const STAGE_RUNS: usize = 60;
const GOAL_MS: f64 = 1.5;

/// Runs `command` to its end; its wall time in ms and its stdout. Fails on a non-zero exit.
fn timed(mut command: Command, what: &str) -> Result<(f64, Vec<u8>), BenchError> {
    let started = Instant::now();
    let output = command
        .stdout(Stdio::piped())
        .output()
        .map_err(BenchError::io(format!("run curl for {what}")))?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if !output.status.success() {
        return Err(BenchError::Protocol(format!(
            "{what}: curl exited with {}",
            output.status
        )));
    }
    Ok((ms, output.stdout))
}

/// Marks the line curl's `--write-out` adds after the body.
const SERVER_TIME_MARK: &str = "\n@@first-byte ";

/// [`timed`] with curl also telling how long the server took: from the request sent to the
/// first byte of the answer (`time_starttransfer - time_pretransfer`), without curl's own start,
/// connect and exit. Wall ms, server ms, body.
fn timed_with_server_time(
    mut command: Command,
    what: &str,
) -> Result<(f64, f64, Vec<u8>), BenchError> {
    command.arg("--write-out").arg(format!(
        "{SERVER_TIME_MARK}%{{time_pretransfer}} %{{time_starttransfer}}"
    ));
    let (ms, mut out) = timed(command, what)?;
    let server_ms = split_server_time(&mut out)
        .ok_or_else(|| BenchError::Protocol(format!("{what}: curl wrote no readable timing")))?;
    Ok((ms, server_ms, out))
}

/// Takes the timing line [`timed_with_server_time`] has curl add off the end of `out`; the
/// server's ms. None (and `out` unchanged) without a readable one.
fn split_server_time(out: &mut Vec<u8>) -> Option<f64> {
    let mark = SERVER_TIME_MARK.as_bytes();
    let at = out.windows(mark.len()).rposition(|w| w == mark)?;
    let line = std::str::from_utf8(&out[at + mark.len()..]).ok()?;
    let seconds: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [sent, first] = seconds[..] else {
        return None;
    };
    out.truncate(at);
    Some((first - sent) * 1000.0)
}

/// `webhook` serving the same `echo hi` script, killed when dropped.
struct Webhook {
    child: Child,
    url: String,
    _dir: TempDir,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(BenchError::io("find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(BenchError::io("find a free port"))?
        .port();
    Ok(port)
}

fn start_webhook(program: &Path) -> Result<Webhook, BenchError> {
    let dir = TempDir::new("runbookd-bench-webhook")?;
    let script = dir.path().join("echo.sh");
    std::fs::write(&script, format!("#!/bin/sh\n{}\n", ECHO.script))
        .map_err(BenchError::io("write the webhook script"))?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(BenchError::io("make the webhook script executable"))?;
    let hooks = dir.path().join("hooks.json");
    let config = json!([{
        "id": "echo",
        "execute-command": script,
        "command-working-directory": dir.path(),
        "include-command-output-in-response": true,
    }]);
    std::fs::write(&hooks, config.to_string()).map_err(BenchError::io("write hooks.json"))?;
    let port = free_port()?;
    let child = Command::new(program)
        .arg("-hooks")
        .arg(&hooks)
        .args(["-ip", "127.0.0.1", "-port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(BenchError::io("start webhook"))?;
    let hook = Webhook {
        child,
        url: format!("http://127.0.0.1:{port}/hooks/echo"),
        _dir: dir,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(BenchError::Server("webhook did not start listening".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(hook)
}

fn webhook_call(url: &str) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail", "-X", "POST"])
        .arg(url)
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Stage name → its time in µs, from one `runbookd::stages` log line.
fn parse_stage_line(line: &str) -> Option<Vec<(String, f64)>> {
    let (_, rest) = line.split_once("runbookd::stages] run ")?;
    let (_, stages) = rest.split_once(": ")?;
    let (list, _) = stages.split_once("; total ")?;
    list.split(", ")
        .map(|part| {
            let (name, us) = part.rsplit_once(' ')?;
            Some((name.to_string(), us.strip_suffix("us")?.parse().ok()?))
        })
        .collect()
}

/// Median µs of each stage over the stage lines, in the order of the first line.
fn stage_medians(lines: &[String]) -> Vec<(String, f64)> {
    let parsed: Vec<Vec<(String, f64)>> =
        lines.iter().filter_map(|l| parse_stage_line(l)).collect();
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in &parsed {
        for (name, us) in run {
            if !order.contains(name) {
                order.push(name.clone());
            }
            values.entry(name.clone()).or_default().push(*us);
        }
    }
    order
        .into_iter()
        .map(|name| {
            let m = values.get(&name).map_or(0.0, |v| median(v));
            (name, m)
        })
        .collect()
}

pub fn run(bench: &Bench) -> Result<Outcome, BenchError> {
    let (server, api) = bench.start(&[])?;
    let scratch = TempDir::new("runbookd-bench-curl")?;
    let client = Curl::new(&api, scratch.path())?;
    let (plain_server, plain_api) = bench.start(&[("RUN_CGROUP", "off")])?;
    let plain_scratch = TempDir::new("runbookd-bench-curl")?;
    let plain_client = Curl::new(&plain_api, plain_scratch.path())?;
    let webhook_program: Option<PathBuf> = curl::find("webhook");
    let webhook = match &webhook_program {
        Some(p) => Some(start_webhook(p)?),
        None => {
            println!(
                "  webhook not installed (apt-get install webhook): compared with the goal only"
            );
            None
        }
    };
    // Both servers start idle: what they make ahead at start (spare files, run cgroups) is
    // done before the first timed round.
    wait_until_idle(server.pid)?;
    wait_until_idle(plain_server.pid)?;
    let (_, body) = timed(client.execute(ECHO.file), "execute echo")?;
    if !String::from_utf8_lossy(&body).contains("hi\\n") {
        return Err(BenchError::Mismatch(format!(
            "execute echo answered {}",
            String::from_utf8_lossy(&body)
        )));
    }
    if let Some(hook) = &webhook {
        let (_, body) = timed(webhook_call(&hook.url), "webhook echo")?;
        if body != b"hi\n" {
            return Err(BenchError::Mismatch(format!(
                "webhook answered {:?}",
                String::from_utf8_lossy(&body)
            )));
        }
    }
    let mut health = Vec::new();
    let mut exec = Vec::new();
    let mut hook_times = Vec::new();
    let mut plain = Vec::new();
    // The servers' share of each request (curl's time from request sent to first byte), per
    // kind: [healthz, execute, execute without cgroup, webhook].
    let mut first_byte: [Vec<f64>; 4] = Default::default();
    for round in 0..WARM_UP_ROUNDS + ROUNDS {
        // Rotate the order so that no kind always follows the same other one. Each kind's
        // block medians: (wall, server side).
        let mut times = [None, None, None, None];
        for k in 0..4 {
            let which = (round + k) % 4;
            let mut block = Vec::with_capacity(BLOCK);
            let mut block_first_byte = Vec::with_capacity(BLOCK);
            for _ in 0..BLOCK {
                let command = match which {
                    0 => Some((client.healthz(), "healthz")),
                    1 => Some((client.execute(ECHO.file), "execute echo")),
                    2 => Some((plain_client.execute(ECHO.file), "execute echo")),
                    _ => webhook
                        .as_ref()
                        .map(|hook| (webhook_call(&hook.url), "webhook")),
                };
                if let Some((command, what)) = command {
                    let (ms, server_ms, _) = timed_with_server_time(command, what)?;
                    block.push(ms);
                    block_first_byte.push(server_ms);
                }
            }
            times[which] = (!block.is_empty()).then(|| (median(&block), median(&block_first_byte)));
        }
        if round < WARM_UP_ROUNDS {
            continue;
        }
        for (kind, time) in first_byte.iter_mut().zip(&times) {
            kind.extend(time.map(|(_, server)| server));
        }
        if let [Some(h), Some(e), Some(p), w] = times {
            health.push(h.0);
            exec.push(e.0);
            plain.push(p.0);
            if let Some(w) = w {
                hook_times.push(w.0);
            }
        }
    }
    let paired = |other: &[f64]| {
        let diffs: Vec<f64> = other.iter().zip(&health).map(|(o, h)| o - h).collect();
        median(&diffs)
    };
    let overhead = paired(&exec);
    let plain_overhead = paired(&plain);
    let plain_met = plain_overhead <= GOAL_MS;
    let webhook_overhead = (!hook_times.is_empty()).then(|| paired(&hook_times));
    let met = overhead <= GOAL_MS && webhook_overhead.is_none_or(|w| overhead <= w);
    println!(
        "sync_echo_overhead: median over {ROUNDS} rounds (blocks of {BLOCK}) {overhead:.3} ms above curl→/healthz (medians: healthz {:.3} ms, execute {:.3} ms{}); goal <= {GOAL_MS} ms{}: {}",
        median(&health),
        median(&exec),
        if hook_times.is_empty() {
            String::new()
        } else {
            format!(", webhook {:.3} ms", median(&hook_times))
        },
        webhook_overhead.map_or_else(String::new, |w| format!(" and <= webhook's {w:.3} ms")),
        verdict(met)
    );
    // The same comparison without the baseline in between: each round's execute against the
    // webhook call of the same round.
    let against_webhook = (!hook_times.is_empty()).then(|| {
        let diffs: Vec<f64> = exec.iter().zip(&hook_times).map(|(e, w)| e - w).collect();
        median(&diffs)
    });
    if let Some(d) = against_webhook {
        println!("  execute minus webhook, median over the same rounds: {d:+.3} ms");
    }
    println!(
        "  the same with RUN_CGROUP=off: {plain_overhead:.3} ms above /healthz (median {:.3} ms); goal <= {GOAL_MS} ms: {}",
        median(&plain),
        verdict(plain_met)
    );
    let [health_fb, exec_fb, plain_fb, hook_fb] = &first_byte;
    // Each round's execute against the webhook call of the same round, server side only.
    let exec_minus_hook_fb = (!hook_fb.is_empty()).then(|| {
        let diffs: Vec<f64> = exec_fb.iter().zip(hook_fb).map(|(e, w)| e - w).collect();
        median(&diffs)
    });
    println!(
        "  server side (curl's request sent to first byte, without curl's start, connect and exit), medians: healthz {:.3} ms, execute {:.3} ms, with RUN_CGROUP=off {:.3} ms{}",
        median(health_fb),
        median(exec_fb),
        median(plain_fb),
        match exec_minus_hook_fb {
            Some(d) => format!(", webhook {:.3} ms; execute minus webhook {d:+.3} ms", median(hook_fb)),
            None => String::new(),
        }
    );
    note_server_stderr(&server);
    note_server_stderr(&plain_server);
    drop(server);
    drop(plain_server);
    drop(webhook);

    // The stage breakdown, on a server that logs it (which costs a little itself).
    let (timed_server, timed_api) = bench.start(&[("RUST_LOG", "warn,runbookd::stages=debug")])?;
    let timed_client = Curl::new(&timed_api, scratch.path())?;
    wait_until_idle(timed_server.pid)?;
    for _ in 0..STAGE_RUNS {
        timed(
            timed_client.execute(ECHO.file),
            "execute echo (stage timing)",
        )?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while timed_server.stage_lines().len() < STAGE_RUNS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stages = stage_medians(&timed_server.stage_lines());
    let total: f64 = stages.iter().map(|(_, us)| us).sum();
    println!(
        "  stages of a synchronous run (median µs of {STAGE_RUNS} runs; the medians sum to {total:.0} µs): {}",
        stages
            .iter()
            .map(|(name, us)| format!("{name} {us:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let stage_detail: serde_json::Map<String, serde_json::Value> = stages
        .iter()
        .map(|(name, us)| (name.clone(), json!(us)))
        .collect();
    let mut rows = vec![Row {
        name: "sync_echo_overhead".into(),
        value: overhead,
        baseline: Some(median(&health)),
        unit: "ms",
        ratio: None,
        goal: match webhook_overhead {
            Some(w) => format!("<= {GOAL_MS} ms and <= webhook ({w:.3} ms)"),
            None => format!("<= {GOAL_MS} ms (webhook not installed)"),
        },
        met: Some(met),
        detail: json!({
            "rounds": ROUNDS,
            "block": BLOCK,
            "healthz_median_ms": median(&health),
            "execute_median_ms": median(&exec),
            "webhook_median_ms": (!hook_times.is_empty()).then(|| median(&hook_times)),
            "first_byte_median_ms": {
                "healthz": median(health_fb),
                "execute": median(exec_fb),
                "execute_no_cgroup": median(plain_fb),
                "webhook": (!hook_fb.is_empty()).then(|| median(hook_fb)),
                "execute_minus_webhook": exec_minus_hook_fb,
            },
            "stages_median_us": stage_detail,
        }),
    }];
    rows.push(Row {
        name: "sync_echo_overhead_no_cgroup".into(),
        value: plain_overhead,
        baseline: Some(median(&health)),
        unit: "ms",
        ratio: None,
        goal: match webhook_overhead {
            Some(w) => format!("<= {GOAL_MS} ms and <= webhook ({w:.3} ms)"),
            None => format!("<= {GOAL_MS} ms"),
        },
        met: Some(plain_met && webhook_overhead.is_none_or(|w| plain_overhead <= w)),
        detail: json!({"execute_median_ms": median(&plain)}),
    });
    if let Some(w) = webhook_overhead {
        rows.push(Row {
            name: "webhook_echo_overhead".into(),
            value: w,
            baseline: Some(median(&health)),
            unit: "ms",
            ratio: None,
            goal: "(reference)".into(),
            met: None,
            detail: json!({
                "webhook_median_ms": median(&hook_times),
                "execute_minus_webhook_median_ms": against_webhook,
            }),
        });
    }
    Ok(Outcome {
        summary: format!("overhead {overhead:.2} ms"),
        goal_met: Some(met),
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_stage_line() {
        let line = "[2026-01-01T00:00:00Z DEBUG runbookd::stages] run r1-x: to execute 120us, spawn 900us; total 1020us";
        assert_eq!(
            parse_stage_line(line),
            Some(vec![("to execute".into(), 120.0), ("spawn".into(), 900.0)])
        );
        assert_eq!(parse_stage_line("[x INFO runbookd::access] GET"), None);
    }

    #[test]
    fn the_timing_line_is_taken_off_the_body() {
        let mut out = b"{\"stdout\":\"hi\\n\"}\n@@first-byte 0.000210 0.001460".to_vec();
        let ms = split_server_time(&mut out).unwrap();
        assert!((ms - 1.25).abs() < 1e-9, "{ms}");
        assert_eq!(out, b"{\"stdout\":\"hi\\n\"}");
    }

    #[test]
    fn a_body_without_a_readable_timing_line_is_left_alone() {
        for text in [
            &b"hi\n"[..],
            b"hi\n@@first-byte 0.1",
            b"hi\n@@first-byte 0.1 x",
            b"hi\n@@first-byte 0.1 0.2 0.3",
        ] {
            let mut out = text.to_vec();
            assert_eq!(split_server_time(&mut out), None, "{text:?}");
            assert_eq!(out, text);
        }
    }
}
