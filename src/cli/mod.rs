//! The terminal client: `runbookd monitor RUN_ID` follows a run's output live and exits with
//! its return code; `runbookd exec RUNBOOK` starts a run and follows it the same way. Plain
//! HTTP/1.1 over std sockets; for TLS, go through a local address.

mod args;
pub(crate) mod chunked;
mod exec;
mod http_client;
mod lines;
mod monitor;
mod reply;
mod sse_parser;
#[cfg(test)]
mod test_server;
mod url;

use std::io;
use std::process::ExitCode;

use args::Command;
use monitor::{RetryPolicy, Sinks};

/// Whether `runbookd <name> ...` is a subcommand handled by [`main`].
pub fn handles(name: &str) -> bool {
    args::Subcommand::from_name(name).is_some()
}

/// Runs `runbookd monitor ...` or `runbookd exec ...`; `args` are the arguments after the
/// program name, starting with the subcommand. Returns the process exit code.
pub fn main(args: &[String]) -> ExitCode {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .try_init();
    let stdout = io::stdout();
    let stderr = io::stderr();
    let mut out = stdout.lock();
    let mut err = stderr.lock();
    let mut sinks = Sinks {
        out: &mut out,
        err: &mut err,
    };
    let env = |name: &str| std::env::var(name).ok();
    ExitCode::from(run(args, &env, &mut sinks, &RetryPolicy::default()))
}

/// [`main`] with its environment, output and timing passed in.
fn run(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
    sinks: &mut Sinks<'_>,
    policy: &RetryPolicy,
) -> u8 {
    let command = match args::parse(args, env) {
        Ok(command) => command,
        Err(e) => return report(sinks, &e, 2),
    };
    let (server, run_id) = match command {
        Command::Help(sub) => {
            let _ = sinks.out.write_all(sub.usage().as_bytes());
            let _ = sinks.out.flush();
            return 0;
        }
        Command::Monitor { server, run_id } => (server, run_id),
        Command::Exec {
            server,
            runbook,
            env_vars,
        } => match exec::start_run(&server, &runbook, &env_vars, policy.timeouts) {
            Ok(run_id) => (server, run_id),
            Err(e) => return report(sinks, &e, e.exit_code()),
        },
    };
    match monitor::monitor(&server, &run_id, sinks, policy) {
        Ok(code) => code,
        Err(e) => report(sinks, &e, e.exit_code()),
    }
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
        let server = serve(vec![start, events]);
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
        assert_eq!(server.finish().len(), 2);
        assert_eq!((code, out.as_str(), err.as_str()), (7, "hi\n", ""));
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
        assert!(handles("monitor") && handles("exec"));
        assert!(!handles("--help") && !handles("serve"));
    }
}
