//! The terminal client: `runbookd exec RUNBOOK` starts a run and follows it, `runbookd monitor
//! RUN_ID` follows a run's output live, both ending with the run's status line and exit code;
//! `runbookd cancel RUN_ID`, `runbookd runs` and `runbookd --version`. Plain HTTP/1.1 over std
//! sockets; for TLS, go through a local address.
#![forbid(unsafe_code)]

mod args;
mod exec;
mod interrupt;
mod monitor;
mod reply;
mod runs;
mod summary;
#[cfg(test)]
mod test_server;

use std::io;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use args::{Command, ServerArgs};
use monitor::Sinks;
use serde_json::Value;

use crate::client::resume::RetryPolicy;

/// How long `runbookd cancel` waits for the cancelled run to end.
const CANCEL_WAIT: Duration = Duration::from_secs(60);
const CANCEL_POLL: Duration = Duration::from_millis(200);

/// Whether `runbookd <name> ...` is handled by [`main`]: a subcommand or `--version`.
pub fn handles(name: &str) -> bool {
    args::Subcommand::from_name(name).is_some() || args::is_version_flag(name)
}

/// Runs a terminal subcommand; `args` are the arguments after the program name, starting
/// with the subcommand. Returns the process exit code.
pub fn main(args: &[String]) -> ExitCode {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .try_init();
    // Not locked for the whole run: the Ctrl-C watcher writes to stderr too.
    let mut out = io::stdout();
    let mut err = io::stderr();
    let mut sinks = Sinks {
        out: &mut out,
        err: &mut err,
    };
    let env = |name: &str| std::env::var(name).ok();
    ExitCode::from(run(args, &env, &mut sinks, &RetryPolicy::default(), true))
}

/// [`main`] with its environment, output and timing passed in; `watch_interrupts`: install
/// the Ctrl-C watcher (see `interrupt`) while a run is followed.
fn run(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
    sinks: &mut Sinks<'_>,
    policy: &RetryPolicy,
    watch_interrupts: bool,
) -> u8 {
    let command = match args::parse(args, env) {
        Ok(command) => command,
        Err(e) => return report(sinks, &e, 2),
    };
    let watch = |server: &ServerArgs, cancel: bool| {
        if !watch_interrupts {
            return None;
        }
        match interrupt::install(server, cancel, policy.timeouts) {
            Ok(interrupts) => Some(interrupts),
            Err(e) => {
                log::warn!("cannot watch for Ctrl-C: {e}");
                None
            }
        }
    };
    match command {
        Command::Help(sub) => write_out(sinks, sub.usage()),
        Command::Version => write_out(sinks, &format!("runbookd {}\n", env!("CARGO_PKG_VERSION"))),
        Command::Runs { server, filter } => match runs::list(&server, &filter, policy.timeouts) {
            Ok(list) if list.is_empty() => {
                let _ = writeln!(sinks.err, "runbookd: no runs found");
                0
            }
            Ok(list) => write_out(sinks, &runs::table(&list, chrono::Utc::now())),
            Err(e) => report(sinks, &e, e.exit_code()),
        },
        Command::Cancel { server, run_id } => cancel(&server, &run_id, sinks, policy),
        Command::Monitor { server, run_id } => {
            if let Some(interrupts) = watch(&server, false) {
                interrupts.run_known(&run_id);
            }
            follow(&server, &run_id, sinks, policy)
        }
        Command::Exec {
            server,
            runbook,
            env_vars,
            cancel_on_interrupt,
        } => {
            let interrupts = watch(&server, cancel_on_interrupt);
            let started = exec::start_run(&server, &runbook, &env_vars, policy.timeouts);
            let run_id = match started {
                Ok(run_id) => run_id,
                Err(e) => return report(sinks, &e, e.exit_code()),
            };
            let _ = sinks
                .err
                .write_all(summary::started_line(&run_id, &runbook).as_bytes());
            let _ = sinks.err.flush();
            if let Some(interrupts) = &interrupts {
                interrupts.run_known(&run_id);
            }
            follow(&server, &run_id, sinks, policy)
        }
    }
}

/// Follows the run to its end, then writes its final status line (from the run record, which
/// has the duration, else from `done`).
fn follow(server: &ServerArgs, run_id: &str, sinks: &mut Sinks<'_>, policy: &RetryPolicy) -> u8 {
    match monitor::monitor(server, run_id, sinks, policy) {
        Ok(finished) => {
            let result = runs::record(server, run_id, policy.timeouts).unwrap_or(finished.result);
            let _ = sinks
                .err
                .write_all(summary::final_line(run_id, &result).as_bytes());
            let _ = sinks.err.flush();
            finished.code
        }
        Err(e) => report(sinks, &e, e.exit_code()),
    }
}

/// `runbookd cancel`: asks for the cancel, then waits a while for the run's end.
fn cancel(server: &ServerArgs, run_id: &str, sinks: &mut Sinks<'_>, policy: &RetryPolicy) -> u8 {
    if let Err(e) = runs::cancel(server, run_id, policy.timeouts) {
        return report(sinks, &e, e.exit_code());
    }
    let _ = writeln!(
        sinks.err,
        "runbookd: cancelling run {}",
        summary::shown(run_id)
    );
    let deadline = Instant::now() + CANCEL_WAIT;
    loop {
        if let Ok(record) = runs::record(server, run_id, policy.timeouts) {
            let status = record.get("status").and_then(Value::as_str);
            if !matches!(status, Some("running" | "cancelling")) {
                let _ = sinks
                    .err
                    .write_all(summary::final_line(run_id, &record).as_bytes());
                return 0;
            }
        }
        if Instant::now() >= deadline {
            let id = summary::shown(run_id);
            let _ = writeln!(
                sinks.err,
                "runbookd: run {id} has not ended yet; runbookd monitor {id} shows its end"
            );
            return 0;
        }
        thread::sleep(CANCEL_POLL);
    }
}

/// Writes `text` to the output sink; exit code 0.
fn write_out(sinks: &mut Sinks<'_>, text: &str) -> u8 {
    let _ = sinks.out.write_all(text.as_bytes());
    let _ = sinks.out.flush();
    0
}

/// Prints `runbookd: <error>` on the error sink and returns `code`.
fn report(sinks: &mut Sinks<'_>, error: &dyn std::fmt::Display, code: u8) -> u8 {
    let _ = writeln!(sinks.err, "runbookd: {error}");
    let _ = sinks.err.flush();
    code
}

#[cfg(test)]
mod tests {
    use super::test_server::{
        chunk, quick_policy, serve, write_json_reply, Reply, SSE_HEAD_CHUNKED,
    };
    use super::*;
    use std::io::Write as _;

    fn run_captured(args: &[&str], env: &dyn Fn(&str) -> Option<String>) -> (u8, String, String) {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(
            &args,
            env,
            &mut Sinks {
                out: &mut out,
                err: &mut err,
            },
            &quick_policy(),
            false,
        );
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn exec_starts_then_monitors() {
        let start: Reply = Box::new(|request, stream| {
            assert_eq!(
                request.line,
                "POST /base/api/runbooks/Hello%20World.md/execute?async=true HTTP/1.1"
            );
            assert_eq!(request.header("prefer"), Some("respond-async"));
            assert_eq!(request.header("authorization"), Some("Bearer envtok"));
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"env_vars": {"NAME": "a b", "EMPTY": ""}})
            );
            let reply = br#"{"success":true,"run_id":"r1-e","runbook":"Hello World.md","status":"running"}"#;
            write_json_reply(
                stream,
                "202 Accepted",
                "Location: /api/runs/r1-e\r\n",
                reply,
            );
        });
        let events: Reply = Box::new(|request, stream| {
            assert_eq!(request.line, "GET /base/api/runs/r1-e/events HTTP/1.1");
            stream.write_all(SSE_HEAD_CHUNKED).unwrap();
            stream
                .write_all(&chunk(b"event: stdout\nid: 1\ndata: hi\ndata: \n\nevent: done\nid: 2\ndata: {\"return_code\":7}\n\n"))
                .unwrap();
            stream.write_all(b"0\r\n\r\n").unwrap();
        });
        let record: Reply = Box::new(|request, stream| {
            assert_eq!(request.line, "GET /base/api/runs/r1-e HTTP/1.1");
            let body = br#"{"success":true,"run_id":"r1-e","status":"failed","return_code":7,"duration_ms":1250}"#;
            write_json_reply(stream, "200 OK", "", body);
        });
        let server = serve(vec![start, events, record]);
        let url = format!("{}/base/", server.url);
        let env = |name: &str| (name == "RUNBOOKD_TOKEN").then(|| "envtok".to_owned());
        let (code, out, err) = run_captured(
            &[
                "exec",
                "Hello World.md",
                "-e",
                "NAME=a b",
                "-e",
                "EMPTY=",
                "--url",
                &url,
            ],
            &env,
        );
        assert_eq!(server.finish().len(), 3);
        assert_eq!(
            (code, out.as_str(), err.as_str()),
            (
                7,
                "hi\n",
                "runbookd: run r1-e started (Hello World.md)\nrunbookd: run r1-e failed (exit 7) in 1.2 s\n"
            )
        );
    }

    #[test]
    fn without_the_record_the_final_line_comes_from_done() {
        let events: Reply = Box::new(|_, stream| {
            stream.write_all(SSE_HEAD_CHUNKED).unwrap();
            stream
                .write_all(&chunk(
                    b"event: done\nid: 1\ndata: {\"status\":\"succeeded\",\"return_code\":0}\n\n",
                ))
                .unwrap();
            stream.write_all(b"0\r\n\r\n").unwrap();
        });
        let record: Reply = Box::new(|_, stream| {
            write_json_reply(stream, "503 X", "", b"{}");
        });
        let server = serve(vec![events, record]);
        let (code, out, err) = run_captured(
            &["monitor", "r1-m", "--url", &server.url, "--token", "t"],
            &no_env,
        );
        server.finish();
        assert_eq!((code, out.as_str()), (0, ""));
        assert_eq!(err, "runbookd: run r1-m succeeded (exit 0)\n");
    }

    #[test]
    fn runs_lists_with_filters() {
        let list: Reply = Box::new(|request, stream| {
            assert_eq!(
                request.line,
                "GET /api/runs?runbook=Hello%20World.md&status=failed&limit=5 HTTP/1.1"
            );
            let body = br#"{"success":true,"runs":[{"run_id":"r1-a","status":"failed","runbook":"Hello World.md","user":"ann","started_at":"2026-01-02T03:04:05.000Z","duration_ms":1000}]}"#;
            write_json_reply(stream, "200 OK", "", body);
        });
        let empty: Reply = Box::new(|_, stream| {
            write_json_reply(stream, "200 OK", "", br#"{"success":true,"runs":[]}"#);
        });
        let refused: Reply = Box::new(|_, stream| {
            let body = br#"{"success":false,"error":"bad request: unknown status \"x\""}"#;
            write_json_reply(stream, "400 X", "", body);
        });
        let server = serve(vec![list, empty, refused]);
        let (code, out, err) = run_captured(
            &[
                "runs",
                "--runbook",
                "Hello World.md",
                "--status",
                "failed",
                "--limit",
                "5",
                "--url",
                &server.url,
                "--token",
                "t",
            ],
            &no_env,
        );
        assert_eq!((code, err.as_str()), (0, ""));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].starts_with("RUN ID"), "{out}");
        assert!(
            lines[1].starts_with("r1-a") && lines[1].contains("Hello World.md"),
            "{out}"
        );
        let (code, out, err) =
            run_captured(&["runs", "--url", &server.url, "--token", "t"], &no_env);
        assert_eq!(
            (code, out.as_str(), err.as_str()),
            (0, "", "runbookd: no runs found\n")
        );
        let (code, _, err) = run_captured(
            &[
                "runs",
                "--status",
                "x",
                "--url",
                &server.url,
                "--token",
                "t",
            ],
            &no_env,
        );
        assert_eq!(code, 2);
        assert_eq!(
            err,
            "runbookd: bad request: unknown status \"x\" (HTTP 400)\n"
        );
        server.finish();
    }

    #[test]
    fn cancel_waits_for_the_end() {
        let delete: Reply = Box::new(|request, stream| {
            assert_eq!(request.line, "DELETE /api/runs/r1-c HTTP/1.1");
            let body = br#"{"success":true,"run_id":"r1-c","status":"cancelling"}"#;
            write_json_reply(stream, "202 Accepted", "", body);
        });
        let cancelling: Reply = Box::new(|_, stream| {
            let body = br#"{"success":true,"run_id":"r1-c","status":"cancelling"}"#;
            write_json_reply(stream, "200 OK", "", body);
        });
        let ended: Reply = Box::new(|_, stream| {
            let body = br#"{"success":true,"run_id":"r1-c","status":"cancelled","return_code":143,"duration_ms":300,"error":"cancelled"}"#;
            write_json_reply(stream, "200 OK", "", body);
        });
        let conflict: Reply = Box::new(|_, stream| {
            let body = br#"{"success":false,"error":"run r1-c is not running (status cancelled)"}"#;
            write_json_reply(stream, "409 Conflict", "", body);
        });
        let server = serve(vec![delete, cancelling, ended, conflict]);
        let args = ["cancel", "r1-c", "--url", &server.url, "--token", "t"];
        let (code, out, err) = run_captured(&args, &no_env);
        assert_eq!((code, out.as_str()), (0, ""));
        assert_eq!(
            err,
            "runbookd: cancelling run r1-c\nrunbookd: run r1-c cancelled (exit 143) in 0.3 s: cancelled\n"
        );
        let (code, _, err) = run_captured(&args, &no_env);
        assert_eq!(code, 2);
        assert_eq!(
            err,
            "runbookd: run r1-c is not running (status cancelled) (HTTP 409)\n"
        );
        server.finish();
    }

    #[test]
    fn version() {
        let (code, out, _) = run_captured(&["--version"], &no_env);
        assert_eq!(
            (code, out),
            (0, format!("runbookd {}\n", env!("CARGO_PKG_VERSION")))
        );
    }

    #[test]
    fn exec_rejections() {
        for (status, expected_code) in [(403, 2), (404, 2), (429, 2), (500, 1)] {
            let reply: Reply = Box::new(move |_, stream| {
                let body = br#"{"success":false,"error":"nope"}"#;
                write_json_reply(stream, &format!("{status} X"), "", body);
            });
            let server = serve(vec![reply]);
            let (code, out, err) = run_captured(
                &["exec", "x.md", "--url", &server.url, "--token", "t"],
                &no_env,
            );
            assert_eq!(server.finish().len(), 1, "only the POST for {status}");
            assert_eq!(code, expected_code, "{status}");
            assert!(out.is_empty());
            assert_eq!(err, format!("runbookd: nope (HTTP {status})\n"));
        }
    }

    #[test]
    fn usage_and_argument_errors() {
        let (code, out, _) = run_captured(&["monitor", "--help"], &no_env);
        assert_eq!(
            (code, out.starts_with("Usage: runbookd monitor")),
            (0, true)
        );
        let (code, out, _) = run_captured(&["exec", "-h"], &no_env);
        assert_eq!((code, out.starts_with("Usage: runbookd exec")), (0, true));
        assert!(out.contains("--cancel-on-interrupt"));
        let (code, out, _) = run_captured(&["cancel", "--help"], &no_env);
        assert_eq!((code, out.starts_with("Usage: runbookd cancel")), (0, true));
        let (code, out, _) = run_captured(&["runs", "--help"], &no_env);
        assert_eq!((code, out.starts_with("Usage: runbookd runs")), (0, true));
        let (code, _, err) = run_captured(&["monitor", "r1-x"], &no_env);
        assert_eq!(code, 2);
        assert!(err.contains("RUNBOOKD_TOKEN"), "{err}");
        let (code, _, err) = run_captured(
            &["monitor", "r1-x", "--url", "https://x", "--token", "t"],
            &no_env,
        );
        assert_eq!(code, 2);
        assert!(err.contains("use a local http address"), "{err}");
    }

    #[test]
    fn subcommand_names() {
        assert!(handles("monitor") && handles("exec") && handles("cancel") && handles("runs"));
        assert!(handles("--version") && handles("-V"));
        assert!(!handles("--help") && !handles("serve"));
    }
}
