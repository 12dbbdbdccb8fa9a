//! Command-line arguments of the terminal subcommands (`monitor`, `exec`, `cancel`, `runs`)
//! and `--version`: options, the server URL and token with their environment fallbacks, and
//! the usage texts.
#![forbid(unsafe_code)]

use crate::client::url::{BaseUrl, UrlError, DEFAULT_URL};

pub const MONITOR_USAGE: &str = "\
Usage: runbookd monitor RUN_ID [--url URL] [--token TOKEN]

Prints a run's output live (its stderr to stderr), ends with a line giving the run's status,
exit code and duration, and exits with the run's return code (modulo 256). A dropped
connection is resumed without repeating output. Ctrl-C stops following; the run goes on.

RUN_ID is printed by `runbookd exec` when it starts a run; `runbookd runs` lists recent runs.

Options:
  --url URL      server address, plain http (default: $RUNBOOKD_URL, else http://127.0.0.1:8083);
                 for TLS, go through a local address
  --token TOKEN  bearer token (default: $RUNBOOKD_TOKEN)
  -h, --help     show this help
";

pub const EXEC_USAGE: &str = "\
Usage: runbookd exec RUNBOOK [-e NAME=VALUE]... [--cancel-on-interrupt] [--url URL] [--token TOKEN]

Starts a run of RUNBOOK (a file name such as Hello.md), prints its id on stderr, prints its
output live (its stderr to stderr), ends with a line giving the run's status, exit code and
duration, and exits with the run's return code (modulo 256).

Ctrl-C stops following and leaves the run going (it says how to follow or cancel it), unless
--cancel-on-interrupt is given: then the run is cancelled and followed to its end.

Options:
  -e, --env NAME=VALUE   an environment variable for the run (repeatable)
  --cancel-on-interrupt  cancel the run on Ctrl-C instead of leaving it going
  --url URL              server address, plain http (default: $RUNBOOKD_URL, else
                         http://127.0.0.1:8083); for TLS, go through a local address
  --token TOKEN          bearer token (default: $RUNBOOKD_TOKEN)
  -h, --help             show this help
";

pub const CANCEL_USAGE: &str = "\
Usage: runbookd cancel RUN_ID [--url URL] [--token TOKEN]

Cancels a run (allowed to the user who started it and to administrators), waits up to a
minute for it to end and prints its final status line. Exits 0 once the cancel is accepted,
2 when the server refuses it (for example a run that already ended), 1 on other errors.

RUN_ID is printed by `runbookd exec` when it starts a run; `runbookd runs` lists recent runs.

Options:
  --url URL      server address, plain http (default: $RUNBOOKD_URL, else http://127.0.0.1:8083)
  --token TOKEN  bearer token (default: $RUNBOOKD_TOKEN)
  -h, --help     show this help
";

pub const RUNS_USAGE: &str = "\
Usage: runbookd runs [--runbook RUNBOOK] [--status STATUS] [--limit N] [--url URL] [--token TOKEN]

Lists the recent runs you may see, newest first: id, status, runbook, user, start time (UTC)
and duration.

Options:
  --runbook RUNBOOK  only runs of this runbook (a file name such as Hello.md)
  --status STATUS    only runs with this status: running, cancelling, succeeded, failed,
                     cancelled, timed_out or interrupted
  --limit N          at most N runs (the server's default: 50)
  --url URL          server address, plain http (default: $RUNBOOKD_URL, else
                     http://127.0.0.1:8083)
  --token TOKEN      bearer token (default: $RUNBOOKD_TOKEN)
  -h, --help         show this help
";

/// The subcommands handled here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcommand {
    Monitor,
    Exec,
    Cancel,
    Runs,
}

impl Subcommand {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "monitor" => Some(Subcommand::Monitor),
            "exec" => Some(Subcommand::Exec),
            "cancel" => Some(Subcommand::Cancel),
            "runs" => Some(Subcommand::Runs),
            _ => None,
        }
    }

    pub fn usage(self) -> &'static str {
        match self {
            Subcommand::Monitor => MONITOR_USAGE,
            Subcommand::Exec => EXEC_USAGE,
            Subcommand::Cancel => CANCEL_USAGE,
            Subcommand::Runs => RUNS_USAGE,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Subcommand::Monitor => "monitor",
            Subcommand::Exec => "exec",
            Subcommand::Cancel => "cancel",
            Subcommand::Runs => "runs",
        }
    }

    /// What the one positional argument names, if the subcommand takes one.
    fn target(self) -> Option<&'static str> {
        match self {
            Subcommand::Monitor | Subcommand::Cancel => Some("RUN_ID"),
            Subcommand::Exec => Some("RUNBOOK"),
            Subcommand::Runs => None,
        }
    }
}

/// Whether `arg` asks for the version.
pub fn is_version_flag(arg: &str) -> bool {
    arg == "--version" || arg == "-V"
}

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerArgs {
    pub base: BaseUrl,
    pub token: String,
}

/// The filters of `runbookd runs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunsFilter {
    pub runbook: Option<String>,
    pub status: Option<String>,
    pub limit: Option<u32>,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help(Subcommand),
    Version,
    Monitor {
        server: ServerArgs,
        run_id: String,
    },
    Exec {
        server: ServerArgs,
        runbook: String,
        env_vars: Vec<(String, String)>,
        cancel_on_interrupt: bool,
    },
    Cancel {
        server: ServerArgs,
        run_id: String,
    },
    Runs {
        server: ServerArgs,
        filter: RunsFilter,
    },
}

/// Why a command line was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ArgsError {
    #[error("missing subcommand: monitor, exec, cancel or runs")]
    MissingSubcommand,
    #[error("unknown subcommand {0:?}: expected monitor, exec, cancel or runs")]
    UnknownSubcommand(String),
    #[error("unknown option {1:?}; see runbookd {sub} --help", sub = .0.name())]
    UnknownOption(Subcommand, String),
    #[error("{1} needs a value; see runbookd {sub} --help", sub = .0.name())]
    MissingValue(Subcommand, &'static str),
    #[error("missing {1}; see runbookd {sub} --help", sub = .0.name())]
    MissingArgument(Subcommand, &'static str),
    #[error("unexpected argument {1:?}; see runbookd {sub} --help", sub = .0.name())]
    ExtraArgument(Subcommand, String),
    #[error("-e expects NAME=VALUE with a non-empty NAME, got {0:?}")]
    BadEnvVar(String),
    #[error("--limit expects a whole number, got {0:?}")]
    BadLimit(String),
    #[error("bad server URL: {0}")]
    Url(#[source] UrlError),
    #[error("no token: pass --token TOKEN or set RUNBOOKD_TOKEN")]
    NoToken,
    #[error("the token must not contain spaces or control characters")]
    BadToken,
}

/// Parses the arguments after the program name (starting with the subcommand, or
/// `--version`); `env` looks up environment variables.
pub fn parse(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Command, ArgsError> {
    let (name, rest) = args.split_first().ok_or(ArgsError::MissingSubcommand)?;
    if is_version_flag(name) {
        return Ok(Command::Version);
    }
    let sub =
        Subcommand::from_name(name).ok_or_else(|| ArgsError::UnknownSubcommand(name.clone()))?;
    let options_end = rest.iter().position(|a| a == "--").unwrap_or(rest.len());
    if rest[..options_end]
        .iter()
        .any(|a| a == "--help" || a == "-h")
    {
        return Ok(Command::Help(sub));
    }

    let mut url = None;
    let mut token = None;
    let mut env_vars = Vec::new();
    let mut cancel_on_interrupt = false;
    let mut filter = RunsFilter::default();
    let mut positionals = Vec::new();
    let mut iter = rest.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            positionals.extend(iter.by_ref().cloned());
            break;
        }
        let (option, inline_value) = match arg.split_once('=') {
            Some((option, value)) if arg.starts_with("--") => (option, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |option_name: &'static str| match &inline_value {
            Some(v) => Ok(v.clone()),
            None => iter
                .next()
                .cloned()
                .ok_or(ArgsError::MissingValue(sub, option_name)),
        };
        match option {
            "--url" => url = Some(value("--url")?),
            "--token" => token = Some(value("--token")?),
            "-e" | "--env" if sub == Subcommand::Exec => {
                env_vars.push(parse_env_var(&value("-e")?)?);
            }
            "--cancel-on-interrupt" if sub == Subcommand::Exec && inline_value.is_none() => {
                cancel_on_interrupt = true;
            }
            "--runbook" if sub == Subcommand::Runs => {
                filter.runbook = Some(value("--runbook")?).filter(|v| !v.is_empty());
            }
            "--status" if sub == Subcommand::Runs => {
                filter.status = Some(value("--status")?).filter(|v| !v.is_empty());
            }
            "--limit" if sub == Subcommand::Runs => {
                let text = value("--limit")?;
                filter.limit = Some(
                    text.trim()
                        .parse()
                        .map_err(|_| ArgsError::BadLimit(text.clone()))?,
                );
            }
            _ if arg.starts_with('-') && arg.len() > 1 => {
                return Err(ArgsError::UnknownOption(sub, arg.clone()))
            }
            _ => positionals.push(arg.clone()),
        }
    }

    let mut positionals = positionals.into_iter();
    let target = match sub.target() {
        Some(what) => positionals
            .next()
            .filter(|p| !p.is_empty())
            .ok_or(ArgsError::MissingArgument(sub, what))?,
        None => String::new(),
    };
    if let Some(extra) = positionals.next() {
        return Err(ArgsError::ExtraArgument(sub, extra));
    }

    let url = url
        .or_else(|| env("RUNBOOKD_URL").filter(|u| !u.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    let base = BaseUrl::parse(&url).map_err(ArgsError::Url)?;
    let token = token
        .or_else(|| env("RUNBOOKD_TOKEN"))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .ok_or(ArgsError::NoToken)?;
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ArgsError::BadToken);
    }
    let server = ServerArgs { base, token };
    Ok(match sub {
        Subcommand::Monitor => Command::Monitor {
            server,
            run_id: target,
        },
        Subcommand::Exec => Command::Exec {
            server,
            runbook: target,
            env_vars,
            cancel_on_interrupt,
        },
        Subcommand::Cancel => Command::Cancel {
            server,
            run_id: target,
        },
        Subcommand::Runs => Command::Runs { server, filter },
    })
}

fn parse_env_var(arg: &str) -> Result<(String, String), ArgsError> {
    match arg.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(ArgsError::BadEnvVar(arg.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse_with(
        args: &[&str],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Command, ArgsError> {
        parse(&strings(args), env)
    }

    fn server(url: &str, token: &str) -> ServerArgs {
        ServerArgs {
            base: BaseUrl::parse(url).unwrap(),
            token: token.to_owned(),
        }
    }

    #[test]
    fn monitor_with_options() {
        let command = parse_with(
            &["monitor", "r1-abc", "--url", "http://h:1", "--token=t0k"],
            &no_env,
        )
        .unwrap();
        assert_eq!(
            command,
            Command::Monitor {
                server: server("http://h:1", "t0k"),
                run_id: "r1-abc".to_owned()
            }
        );
    }

    #[test]
    fn environment_fallbacks_and_default_url() {
        let env = |name: &str| match name {
            "RUNBOOKD_TOKEN" => Some("envtoken".to_owned()),
            _ => None,
        };
        assert_eq!(
            parse_with(&["monitor", "r"], &env).unwrap(),
            Command::Monitor {
                server: server(DEFAULT_URL, "envtoken"),
                run_id: "r".to_owned()
            }
        );
        let env = |name: &str| match name {
            "RUNBOOKD_TOKEN" => Some("envtoken".to_owned()),
            "RUNBOOKD_URL" => Some("http://10.0.0.1:9".to_owned()),
            _ => None,
        };
        assert_eq!(
            parse_with(&["monitor", "r", "--token", "flag"], &env).unwrap(),
            Command::Monitor {
                server: server("http://10.0.0.1:9", "flag"),
                run_id: "r".to_owned()
            }
        );
    }

    #[test]
    fn exec_with_env_vars() {
        let command = parse_with(
            &[
                "exec",
                "-e",
                "A=1",
                "Hello World.md",
                "--env",
                "B=x=y",
                "--env=C=",
                "--token",
                "t",
            ],
            &no_env,
        )
        .unwrap();
        assert_eq!(
            command,
            Command::Exec {
                server: server(DEFAULT_URL, "t"),
                runbook: "Hello World.md".to_owned(),
                env_vars: vec![
                    ("A".to_owned(), "1".to_owned()),
                    ("B".to_owned(), "x=y".to_owned()),
                    ("C".to_owned(), String::new()),
                ],
                cancel_on_interrupt: false,
            }
        );
    }

    #[test]
    fn cancel_runs_and_version() {
        assert_eq!(
            parse_with(&["--version"], &no_env).unwrap(),
            Command::Version
        );
        assert_eq!(
            parse_with(&["cancel", "r1-x", "--token", "t"], &no_env).unwrap(),
            Command::Cancel {
                server: server(DEFAULT_URL, "t"),
                run_id: "r1-x".to_owned()
            }
        );
        assert_eq!(
            parse_with(
                &[
                    "runs",
                    "--runbook",
                    "A.md",
                    "--status=failed",
                    "--limit",
                    "7",
                    "--token",
                    "t"
                ],
                &no_env
            )
            .unwrap(),
            Command::Runs {
                server: server(DEFAULT_URL, "t"),
                filter: RunsFilter {
                    runbook: Some("A.md".to_owned()),
                    status: Some("failed".to_owned()),
                    limit: Some(7),
                },
            }
        );
        assert!(matches!(
            parse_with(
                &["exec", "A.md", "--cancel-on-interrupt", "--token", "t"],
                &no_env
            ),
            Ok(Command::Exec {
                cancel_on_interrupt: true,
                ..
            })
        ));
        assert!(matches!(
            parse_with(&["runs", "--limit", "many", "--token", "t"], &no_env),
            Err(ArgsError::BadLimit(_))
        ));
        assert!(matches!(
            parse_with(&["runs", "extra", "--token", "t"], &no_env),
            Err(ArgsError::ExtraArgument(..))
        ));
        assert!(matches!(
            parse_with(
                &["monitor", "r", "--cancel-on-interrupt", "--token", "t"],
                &no_env
            ),
            Err(ArgsError::UnknownOption(..))
        ));
        assert!(matches!(
            parse_with(&["cancel", "--token", "t"], &no_env),
            Err(ArgsError::MissingArgument(Subcommand::Cancel, "RUN_ID"))
        ));
    }

    #[test]
    fn help_wins() {
        assert_eq!(
            parse_with(&["exec", "--bogus", "-h"], &no_env).unwrap(),
            Command::Help(Subcommand::Exec)
        );
        assert_eq!(
            parse_with(&["monitor", "--help"], &no_env).unwrap(),
            Command::Help(Subcommand::Monitor)
        );
    }

    #[test]
    fn double_dash_ends_options() {
        let command = parse_with(&["monitor", "--token", "t", "--", "-odd-id"], &no_env).unwrap();
        assert!(matches!(command, Command::Monitor { run_id, .. } if run_id == "-odd-id"));
    }

    #[test]
    fn refusals() {
        let t = ["--token", "t"];
        let with = |args: &[&str]| {
            let mut all = args.to_vec();
            all.extend_from_slice(&t);
            parse_with(&all, &no_env)
        };
        assert_eq!(parse_with(&[], &no_env), Err(ArgsError::MissingSubcommand));
        assert!(matches!(
            with(&["watch", "r"]),
            Err(ArgsError::UnknownSubcommand(_))
        ));
        assert!(matches!(
            with(&["monitor", "r", "-e", "A=1"]),
            Err(ArgsError::UnknownOption(..))
        ));
        assert!(matches!(
            with(&["monitor"]),
            Err(ArgsError::MissingArgument(Subcommand::Monitor, "RUN_ID"))
        ));
        assert!(matches!(
            with(&["monitor", "a", "b"]),
            Err(ArgsError::ExtraArgument(..))
        ));
        assert!(matches!(
            with(&["exec", "x.md", "-e", "=v"]),
            Err(ArgsError::BadEnvVar(_))
        ));
        assert!(matches!(
            with(&["exec", "x.md", "-e", "novalue"]),
            Err(ArgsError::BadEnvVar(_))
        ));
        assert_eq!(
            parse_with(&["monitor", "r", "--token"], &no_env),
            Err(ArgsError::MissingValue(Subcommand::Monitor, "--token"))
        );
        assert_eq!(
            parse_with(&["monitor", "r"], &no_env),
            Err(ArgsError::NoToken)
        );
        assert_eq!(
            parse_with(&["monitor", "r", "--token", "a\r\nX: y"], &no_env),
            Err(ArgsError::BadToken)
        );
        let https = with(&["monitor", "r", "--url", "https://h"]).unwrap_err();
        assert_eq!(https, ArgsError::Url(UrlError::Https));
        assert!(https.to_string().contains("use a local http address"));
    }
}
