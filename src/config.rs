//! Server configuration: every setting is an environment variable, read once at startup into
//! one validated `Config`. `SETTINGS` is the single table of names, defaults and help text, used
//! for parsing, for `--help` and for `GET /api/config`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// One row of the settings table.
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
    pub secret: bool,
    /// For a number: the smallest and largest value accepted (both included).
    pub range: Option<(u64, u64)>,
}

const fn setting(name: &'static str, default: &'static str, help: &'static str) -> Setting {
    Setting {
        name,
        default,
        help,
        secret: false,
        range: None,
    }
}

/// A numeric setting accepted from `min` to `max` (both included).
const fn ranged(
    name: &'static str,
    default: &'static str,
    help: &'static str,
    min: u64,
    max: u64,
) -> Setting {
    Setting {
        name,
        default,
        help,
        secret: false,
        range: Some((min, max)),
    }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const TIB: u64 = 1024 * 1024 * MIB;
const PIB: u64 = 1024 * TIB;
/// One year: the longest any time setting may be.
const YEAR_SECONDS: u64 = 365 * 24 * 3600;

pub const SETTINGS: &[Setting] = &[
    ranged(
        "API_PORT",
        "8083",
        "listen port (0 = pick a free one)",
        0,
        65535,
    ),
    setting("BIND_ADDRESS", "127.0.0.1", "listen address"),
    setting(
        "RUNBOOKS_DIR",
        "",
        "directory of *.md runbooks (unset: the bundled samples, copied to $STATE_DIR/samples)",
    ),
    setting(
        "STATE_DIR",
        "",
        "run logs and records ($STATE_DIRECTORY if set, else ./runbookd-state)",
    ),
    setting(
        "EXECUTION_DIR",
        "",
        "where per-run working dirs are created (system temp dir)",
    ),
    setting(
        "INSTANCE_ID",
        "r1",
        "prefix of run ids (<INSTANCE_ID>-<uuid>)",
    ),
    setting("ENABLE_LOGIN", "false", "enables POST /dev-login"),
    Setting {
        name: "JWT_SECRET",
        default: "",
        help: "HS256 signing secret, at least 32 bytes (required unless ENABLE_LOGIN=true)",
        secret: true,
        range: None,
    },
    setting("JWT_ISSUER", "dev-idp", "required token issuer"),
    setting("JWT_AUDIENCE", "dev-api", "required token audience"),
    ranged(
        "JWT_TTL_MINUTES",
        "480",
        "lifetime of dev-login tokens",
        1,
        YEAR_SECONDS / 60,
    ),
    ranged(
        "SCRIPT_TIMEOUT_SECONDS",
        "600",
        "then the script's process group is terminated",
        1,
        YEAR_SECONDS,
    ),
    ranged(
        "MAX_OUTPUT_SIZE_BYTES",
        "10485760",
        "per stream, the most kept in the done event and the sync JSON",
        0,
        TIB,
    ),
    ranged(
        "HISTORY_OUTPUT_BYTES",
        "65536",
        "per stream, the most written into a history entry",
        0,
        16 * MIB,
    ),
    ranged(
        "HISTORY_MAX_ENTRIES",
        "100",
        "history entries kept per runbook (past it, trimmed to 90 % at once)",
        1,
        1_000_000,
    ),
    ranged(
        "MAX_RECURSION_DEPTH",
        "50",
        "sub-runbook depth limit",
        1,
        1000,
    ),
    setting(
        "API_PROTOCOL",
        "http",
        "scheme of RUNBOOK_URL given to scripts",
    ),
    setting(
        "API_HOST",
        "localhost",
        "host of RUNBOOK_URL given to scripts",
    ),
    ranged(
        "HEARTBEAT_SECONDS",
        "15",
        "SSE keepalive comment interval",
        1,
        3600,
    ),
    ranged(
        "SCRIPT_NICE",
        "5",
        "scripts, and the threads reading their pipes, run this much nicer (lower processor priority) than the server's request threads, whose work (starting runs, streaming output, answering requests) then comes first on a busy machine; 0: the same",
        0,
        19,
    ),
    ranged(
        "ORPHAN_GRACE_MS",
        "500",
        "after the main process exits, how long descendants may hold the pipes",
        0,
        3_600_000,
    ),
    ranged(
        "VIEWER_STALL_SECONDS",
        "30",
        "a viewer whose socket accepts nothing for this long is cut off",
        1,
        86_400,
    ),
    ranged(
        "MAX_CONCURRENT_RUNS",
        "64",
        "runs at once; more get 429",
        1,
        10_000,
    ),
    ranged(
        "CANCEL_GRACE_SECONDS",
        "5",
        "between TERM and KILL when a run is cancelled or timed out",
        0,
        3600,
    ),
    ranged(
        "SHUTDOWN_GRACE_SECONDS",
        "10",
        "on SIGTERM/SIGINT, the longest the server takes to stop its runs and exit",
        1,
        3600,
    ),
    ranged(
        "RUN_RETENTION_DAYS",
        "30",
        "finished runs older than this are pruned",
        0,
        36_500,
    ),
    ranged(
        "RUN_RETENTION_COUNT",
        "1000",
        "at most this many finished runs are kept",
        1,
        1_000_000,
    ),
    ranged(
        "STATE_MAX_BYTES",
        "10737418240",
        "run logs and records are pruned (oldest finished first) to stay under this",
        1,
        PIB,
    ),
    ranged(
        "RUN_LOG_MAX_BYTES",
        "1073741824",
        "per run, the most output stored; later output is counted and dropped",
        1024,
        PIB,
    ),
    setting(
        "TRUSTED_PROXIES",
        "127.0.0.1,::1",
        "comma-separated proxy addresses whose X-Real-IP / X-Forwarded-For are believed",
    ),
    setting(
        "SECRET_ENV_VARS",
        "",
        "comma-separated names of server variables never passed to scripts",
    ),
    ranged(
        "SPARE_RUN_FILES",
        "1024",
        "empty files kept ready in the runs directory for new runs' logs and records (two a \
         run; at least two for each run MAX_CONCURRENT_RUNS allows), made while no run is \
         going and none ended in the last 250 ms",
        16,
        20_000,
    ),
    ranged(
        "MAX_SUBRUNS_PER_RUN",
        "64",
        "sub-runs alive at once in one run's tree that MAX_CONCURRENT_RUNS does not count \
         (at least MAX_RECURSION_DEPTH)",
        1,
        100_000,
    ),
    setting(
        "RUN_CGROUP",
        "",
        "cgroup v2 directory each run gets a child cgroup of, killed with the run (unset: runbookd's own cgroup when writable; off: process groups only)",
    ),
    setting(
        "ADMIN_ROLES",
        "admin",
        "comma-separated roles whose holders may cancel other users' runs of runbooks whose Required Claims they meet",
    ),
    ranged(
        "REQUEST_TIMEOUT_SECONDS",
        "30",
        "a request head or body read that stalls this long, or an idle keep-alive connection, is closed",
        1,
        3600,
    ),
    ranged(
        "MAX_CONNECTIONS",
        "2048",
        "client connections served at once (each holds a thread); more get a 503 and are closed",
        16,
        100_000,
    ),
    ranged(
        "LOGS_MAX_LINES",
        "10000",
        "most lines GET /api/runs/{id}/logs returns (tail); asking for more is a 400",
        1,
        1_000_000,
    ),
    setting(
        "RUN_AS_USER",
        "",
        "user name or UID:GID every script runs as (unset: runbookd's own user); needs CAP_SETUID, CAP_SETGID, CAP_KILL, CAP_CHOWN",
    ),
    ranged(
        "RUNBOOK_MAX_BYTES",
        "16777216",
        "largest runbook file read; History is trimmed to stay under it",
        1024,
        RUNBOOK_MAX_BYTES_LIMIT,
    ),
];

/// The largest `RUNBOOK_MAX_BYTES`: a runbook is read whole into memory.
const RUNBOOK_MAX_BYTES_LIMIT: u64 = 1 << 30;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("invalid {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("JWT_SECRET is required unless ENABLE_LOGIN=true")]
    MissingSecret,
}

/// Where a setting's value came from, for `GET /api/config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Default,
    Environment,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub api_port: u16,
    pub bind_address: IpAddr,
    pub runbooks_dir: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub execution_dir: PathBuf,
    pub instance_id: String,
    pub enable_login: bool,
    /// None only when dev login is on and a secret must be generated.
    pub jwt_secret: Option<String>,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub jwt_ttl: Duration,
    pub script_timeout: Duration,
    pub max_output_bytes: u64,
    pub history_output_bytes: u64,
    pub history_max_entries: usize,
    pub max_recursion_depth: usize,
    pub api_protocol: String,
    pub api_host: String,
    pub heartbeat: Duration,
    pub orphan_grace: Duration,
    /// How much nicer than the server scripts start (`SCRIPT_NICE`, 0..=19).
    pub script_nice: i32,
    pub viewer_stall: Duration,
    pub secret_env_vars: Vec<String>,
    pub max_concurrent_runs: usize,
    /// Spare run files kept ready (`SPARE_RUN_FILES`).
    pub spare_run_files: usize,
    pub cancel_grace: Duration,
    pub shutdown_grace: Duration,
    pub run_retention_days: u64,
    pub run_retention_count: usize,
    pub state_max_bytes: u64,
    pub run_log_max_bytes: u64,
    pub trusted_proxies: Vec<IpAddr>,
    /// `RUN_CGROUP` as given: empty (default), `off` or a directory; resolved at start.
    pub run_cgroup: String,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub logs_max_lines: usize,
    /// `RUN_AS_USER` as given; resolved and checked at start (`privsep::prepare`).
    pub run_as_user: Option<String>,
    pub runbook_max_bytes: u64,
    /// Each setting's effective value and origin, secrets already hidden.
    pub items: Vec<(&'static str, String, Origin)>,
    pub max_subruns_per_run: usize,
    /// Roles whose holders may cancel runs of other users (when they meet the claims).
    pub admin_roles: Vec<String>,
}

/// The largest value of an unsigned integer type, as a u64.
trait Bounded {
    const MAX_U64: u64;
}

impl Bounded for u16 {
    const MAX_U64: u64 = u16::MAX as u64;
}

impl Bounded for u64 {
    const MAX_U64: u64 = u64::MAX;
}

impl Bounded for usize {
    const MAX_U64: u64 = if usize::BITS > 64 {
        u64::MAX
    } else {
        usize::MAX as u64
    };
}

struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    items: Vec<(&'static str, String, Origin)>,
    values: BTreeMap<&'static str, String>,
}

impl Reader<'_> {
    fn raw(&mut self, name: &'static str) -> Option<String> {
        let value = (self.lookup)(name).filter(|v| !v.is_empty());
        let setting = SETTINGS.iter().find(|s| s.name == name);
        let shown = |v: &str| match setting {
            Some(s) if s.secret => "secret".to_string(),
            _ => v.to_string(),
        };
        match &value {
            Some(v) => self.items.push((name, shown(v), Origin::Environment)),
            None => {
                let default = setting.map(|s| s.default).unwrap_or("");
                self.items.push((name, shown(default), Origin::Default));
            }
        }
        if let Some(v) = &value {
            self.values.insert(name, v.clone());
        }
        value
    }

    fn text(&mut self, name: &'static str) -> String {
        let default = SETTINGS
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.default)
            .unwrap_or("");
        self.raw(name).unwrap_or_else(|| default.to_string())
    }

    /// A whole number within the setting's range from `SETTINGS` (or from `min` to the
    /// largest `T` for a row without one).
    fn number<T>(&mut self, name: &'static str, min: u64) -> Result<T, ConfigError>
    where
        T: TryFrom<u64> + Bounded,
    {
        let (min, max) = SETTINGS
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.range)
            .unwrap_or((min, T::MAX_U64));
        let max = max.min(T::MAX_U64);
        let text = self.text(name);
        let out_of_range = || ConfigError::Invalid {
            name,
            reason: format!("must be between {min} and {max}"),
        };
        let digits = text.trim();
        let value: u64 = match digits.parse() {
            Ok(v) => v,
            Err(_) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(out_of_range())
            }
            Err(_) => {
                return Err(ConfigError::Invalid {
                    name,
                    reason: format!(
                        "{text:?} is not a whole number (must be between {min} and {max})"
                    ),
                })
            }
        };
        if value < min || value > max {
            return Err(out_of_range());
        }
        T::try_from(value).map_err(|_| out_of_range())
    }

    fn flag(&mut self, name: &'static str) -> Result<bool, ConfigError> {
        let text = self.text(name);
        match text.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::Invalid {
                name,
                reason: format!("{text:?} is not true or false"),
            }),
        }
    }
}

impl Config {
    /// Reads and validates every setting through `lookup` (the process environment in
    /// production, a map in tests).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut r = Reader {
            lookup,
            items: Vec::new(),
            values: BTreeMap::new(),
        };
        let api_port = r.number::<u16>("API_PORT", 0)?;
        let bind_text = r.text("BIND_ADDRESS");
        let bind_address = bind_text.trim().parse().map_err(|_| ConfigError::Invalid {
            name: "BIND_ADDRESS",
            reason: format!("{bind_text:?} is not an IP address"),
        })?;
        let runbooks_dir = r.raw("RUNBOOKS_DIR").map(PathBuf::from);
        let state_dir = r
            .raw("STATE_DIR")
            .or_else(|| lookup("STATE_DIRECTORY").filter(|v| !v.is_empty()))
            .map(|v| {
                // systemd may pass several colon-separated directories; the first is ours.
                PathBuf::from(v.split(':').next().unwrap_or(&v))
            })
            .unwrap_or_else(|| PathBuf::from("runbookd-state"));
        let execution_dir = r
            .raw("EXECUTION_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let instance_id = r.text("INSTANCE_ID");
        if instance_id.is_empty()
            || !instance_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ConfigError::Invalid {
                name: "INSTANCE_ID",
                reason: "use letters, digits and _ only".into(),
            });
        }
        let enable_login = r.flag("ENABLE_LOGIN")?;
        let jwt_secret = r.raw("JWT_SECRET");
        match &jwt_secret {
            Some(s) if s == "dev-secret-change-me" => {
                return Err(ConfigError::Invalid {
                    name: "JWT_SECRET",
                    reason: "the placeholder secret is refused; set a random one".into(),
                })
            }
            Some(s) if s.len() < 32 => {
                return Err(ConfigError::Invalid {
                    name: "JWT_SECRET",
                    reason: "must be at least 32 bytes".into(),
                })
            }
            None if !enable_login => return Err(ConfigError::MissingSecret),
            _ => {}
        }
        let jwt_issuer = r.text("JWT_ISSUER");
        let jwt_audience = r.text("JWT_AUDIENCE");
        let jwt_ttl =
            Duration::from_secs(r.number::<u64>("JWT_TTL_MINUTES", 1)?.saturating_mul(60));
        let script_timeout = Duration::from_secs(r.number::<u64>("SCRIPT_TIMEOUT_SECONDS", 1)?);
        let max_output_bytes = r.number::<u64>("MAX_OUTPUT_SIZE_BYTES", 0)?;
        let history_output_bytes = r.number::<u64>("HISTORY_OUTPUT_BYTES", 0)?;
        let history_max_entries = r.number::<usize>("HISTORY_MAX_ENTRIES", 1)?;
        let max_recursion_depth = r.number::<usize>("MAX_RECURSION_DEPTH", 1)?;
        let api_protocol = r.text("API_PROTOCOL");
        if api_protocol != "http" && api_protocol != "https" {
            return Err(ConfigError::Invalid {
                name: "API_PROTOCOL",
                reason: "must be http or https".into(),
            });
        }
        let api_host = r.text("API_HOST");
        let heartbeat = Duration::from_secs(r.number::<u64>("HEARTBEAT_SECONDS", 1)?);
        let orphan_grace = Duration::from_millis(r.number::<u64>("ORPHAN_GRACE_MS", 0)?);
        let script_nice = i32::from(r.number::<u16>("SCRIPT_NICE", 0)?);
        let viewer_stall = Duration::from_secs(r.number::<u64>("VIEWER_STALL_SECONDS", 1)?);
        let secret_env_vars = r
            .text("SECRET_ENV_VARS")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let max_concurrent_runs = r.number::<usize>("MAX_CONCURRENT_RUNS", 1)?;
        let spare_run_files = r.number::<usize>("SPARE_RUN_FILES", 16)?;
        let cancel_grace = Duration::from_secs(r.number::<u64>("CANCEL_GRACE_SECONDS", 0)?);
        let shutdown_grace = Duration::from_secs(r.number::<u64>("SHUTDOWN_GRACE_SECONDS", 1)?);
        let run_retention_days = r.number::<u64>("RUN_RETENTION_DAYS", 0)?;
        let run_retention_count = r.number::<usize>("RUN_RETENTION_COUNT", 1)?;
        let state_max_bytes = r.number::<u64>("STATE_MAX_BYTES", 1)?;
        let run_log_max_bytes = r.number::<u64>("RUN_LOG_MAX_BYTES", 1024)?;
        let proxies_text = r.text("TRUSTED_PROXIES");
        let mut trusted_proxies = Vec::new();
        for item in proxies_text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            trusted_proxies.push(item.parse().map_err(|_| ConfigError::Invalid {
                name: "TRUSTED_PROXIES",
                reason: format!("{item:?} is not an IP address"),
            })?);
        }
        // A chain as deep as MAX_RECURSION_DEPTH must fit in one tree's exemption.
        let max_subruns_per_run = r.number::<usize>("MAX_SUBRUNS_PER_RUN", 1)?;
        if max_subruns_per_run < max_recursion_depth {
            return Err(ConfigError::Invalid {
                name: "MAX_SUBRUNS_PER_RUN",
                reason: format!("must be at least MAX_RECURSION_DEPTH ({max_recursion_depth})"),
            });
        }
        let run_cgroup = r.text("RUN_CGROUP").trim().to_string();
        let admin_roles = r
            .text("ADMIN_ROLES")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let request_timeout = Duration::from_secs(r.number::<u64>("REQUEST_TIMEOUT_SECONDS", 1)?);
        let max_connections = r.number::<usize>("MAX_CONNECTIONS", 16)?;
        let logs_max_lines = r.number::<usize>("LOGS_MAX_LINES", 1)?;
        let run_as_user = r.raw("RUN_AS_USER").map(|v| v.trim().to_string());
        let runbook_max_bytes = r.number::<u64>("RUNBOOK_MAX_BYTES", 1024)?;
        Ok(Config {
            runbook_max_bytes,
            run_cgroup,
            request_timeout,
            max_connections,
            logs_max_lines,
            run_as_user,
            max_concurrent_runs,
            spare_run_files,
            cancel_grace,
            shutdown_grace,
            run_retention_days,
            run_retention_count,
            state_max_bytes,
            run_log_max_bytes,
            trusted_proxies,
            api_port,
            bind_address,
            runbooks_dir,
            state_dir,
            execution_dir,
            instance_id,
            enable_login,
            jwt_secret,
            jwt_issuer,
            jwt_audience,
            jwt_ttl,
            script_timeout,
            max_output_bytes,
            history_output_bytes,
            history_max_entries,
            max_recursion_depth,
            api_protocol,
            api_host,
            heartbeat,
            orphan_grace,
            script_nice,
            viewer_stall,
            secret_env_vars,
            items: r.items,
            max_subruns_per_run,
            admin_roles,
        })
    }

    /// Names of server environment variables that must never reach a script.
    pub fn withheld_env_names(&self) -> Vec<String> {
        let mut names: Vec<String> = ["JWT_SECRET", "NOTIFY_SOCKET", "RUNBOOKD_TOKEN"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        names.extend(self.secret_env_vars.iter().cloned());
        names
    }
}

/// The text of `runbookd --help`.
pub fn help_text() -> String {
    let mut out = String::from(
        "runbookd: serves a directory of markdown runbooks over HTTP and runs their scripts\n\n\
         usage: runbookd                     start the server\n\
         \x20      runbookd monitor RUN_ID      follow a run's output (runbookd monitor --help)\n\
         \x20      runbookd exec RUNBOOK        start a run and follow it (runbookd exec --help)\n\
         \x20      runbookd cancel RUN_ID       cancel a run (runbookd cancel --help)\n\
         \x20      runbookd runs                list recent runs (runbookd runs --help)\n\
         \x20      runbookd --version           the version\n\
         \x20      runbookd --help              this text\n\n\
         configuration (environment variables, accepted range in parentheses, default in\n\
         brackets; a value outside its range is refused at start):\n",
    );
    for s in SETTINGS {
        let default = if s.default.is_empty() {
            String::new()
        } else {
            format!(" [{}]", s.default)
        };
        let range = match s.range {
            Some((min, max)) => format!(" ({min} to {max})"),
            None => String::new(),
        };
        out.push_str(&format!("  {:<24}{}{range}{default}\n", s.name, s.help));
    }
    out.push_str("\nRUST_LOG (e.g. info, debug) sets the log level.\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config_with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(&move |name: &str| map.get(name).cloned())
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    #[test]
    fn defaults_apply() {
        let c = config_with(&[("JWT_SECRET", SECRET)]).unwrap();
        assert_eq!(c.api_port, 8083);
        assert_eq!(c.instance_id, "r1");
        assert_eq!(c.heartbeat, Duration::from_secs(15));
        assert_eq!(c.state_dir, PathBuf::from("runbookd-state"));
        let secret = c.items.iter().find(|i| i.0 == "JWT_SECRET").unwrap();
        assert_eq!(secret.1, "secret");
        assert_eq!(secret.2, Origin::Environment);
        let port = c.items.iter().find(|i| i.0 == "API_PORT").unwrap();
        assert_eq!(port.2, Origin::Default);
    }

    #[test]
    fn secret_rules() {
        assert!(matches!(config_with(&[]), Err(ConfigError::MissingSecret)));
        assert!(config_with(&[("ENABLE_LOGIN", "true")]).is_ok());
        assert!(config_with(&[("JWT_SECRET", "short")]).is_err());
        assert!(config_with(&[("JWT_SECRET", "dev-secret-change-me")]).is_err());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = config_with(&[("JWT_SECRET", SECRET), ("API_PORT", "99999")]).unwrap_err();
        assert!(err.to_string().contains("API_PORT"));
        let err = config_with(&[("JWT_SECRET", SECRET), ("ENABLE_LOGIN", "maybe")]).unwrap_err();
        assert!(err.to_string().contains("ENABLE_LOGIN"));
        let err = config_with(&[("JWT_SECRET", SECRET), ("HEARTBEAT_SECONDS", "0")]).unwrap_err();
        assert!(err.to_string().contains("HEARTBEAT_SECONDS"));
        for bad in ["1023", "1073741825", "-1"] {
            let err =
                config_with(&[("JWT_SECRET", SECRET), ("RUNBOOK_MAX_BYTES", bad)]).unwrap_err();
            assert!(err.to_string().contains("RUNBOOK_MAX_BYTES"), "{bad}");
        }
        let c = config_with(&[("JWT_SECRET", SECRET)]).unwrap();
        assert_eq!(c.runbook_max_bytes, 16 * 1024 * 1024);
    }

    #[test]
    fn subruns_per_run_is_at_least_the_recursion_depth() {
        let c = config_with(&[("JWT_SECRET", SECRET)]).unwrap();
        assert_eq!(c.max_subruns_per_run, 64);
        let c = config_with(&[
            ("JWT_SECRET", SECRET),
            ("MAX_RECURSION_DEPTH", "5"),
            ("MAX_SUBRUNS_PER_RUN", "5"),
        ])
        .unwrap();
        assert_eq!(c.max_subruns_per_run, 5);
        let err = config_with(&[
            ("JWT_SECRET", SECRET),
            ("MAX_RECURSION_DEPTH", "5"),
            ("MAX_SUBRUNS_PER_RUN", "4"),
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid MAX_SUBRUNS_PER_RUN: must be at least MAX_RECURSION_DEPTH (5)"
        );
        let err =
            config_with(&[("JWT_SECRET", SECRET), ("MAX_SUBRUNS_PER_RUN", "20")]).unwrap_err();
        assert!(err.to_string().contains("MAX_SUBRUNS_PER_RUN"), "{err}");
    }

    #[test]
    fn state_directory_from_systemd() {
        let c = config_with(&[
            ("JWT_SECRET", SECRET),
            ("STATE_DIRECTORY", "/var/lib/runbookd"),
        ])
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/runbookd"));
    }

    #[test]
    fn every_numeric_setting_has_a_range() {
        // Every setting whose default is a number is checked against a range.
        for s in SETTINGS {
            if !s.default.is_empty() && s.default.bytes().all(|b| b.is_ascii_digit()) {
                assert!(s.range.is_some(), "{} has no range", s.name);
            }
        }
    }

    #[test]
    fn each_range_is_enforced_at_both_ends() {
        // Settings bounded by another one are tried with that one out of the way.
        let companion = |name: &str| match name {
            "MAX_RECURSION_DEPTH" => ("MAX_SUBRUNS_PER_RUN", "100000"),
            "MAX_SUBRUNS_PER_RUN" => ("MAX_RECURSION_DEPTH", "1"),
            _ => ("JWT_SECRET", SECRET),
        };
        for s in SETTINGS {
            let Some((min, max)) = s.range else { continue };
            let default: u64 = s.default.parse().unwrap();
            assert!(
                (min..=max).contains(&default),
                "{}: default in range",
                s.name
            );
            for ok in [min, max] {
                let text = ok.to_string();
                let c = config_with(&[("JWT_SECRET", SECRET), companion(s.name), (s.name, &text)]);
                assert!(c.is_ok(), "{}={ok}: {:?}", s.name, c.err());
            }
            let mut bad = vec![max.saturating_add(1).to_string(), format!("{}0", u64::MAX)];
            if min > 0 {
                bad.push((min - 1).to_string());
            }
            for text in bad {
                let err =
                    config_with(&[("JWT_SECRET", SECRET), companion(s.name), (s.name, &text)])
                        .unwrap_err();
                assert_eq!(
                    err.to_string(),
                    format!("invalid {}: must be between {min} and {max}", s.name),
                    "{}={text}",
                    s.name
                );
            }
            let err = config_with(&[("JWT_SECRET", SECRET), (s.name, "-1")]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("invalid {}:", s.name)) && !text.contains('\n'),
                "{text}"
            );
        }
    }

    #[test]
    fn retention_days_out_of_range_is_refused() {
        let err = config_with(&[("JWT_SECRET", SECRET), ("RUN_RETENTION_DAYS", "100000000")])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid RUN_RETENTION_DAYS: must be between 0 and 36500"
        );
        let c = config_with(&[("JWT_SECRET", SECRET), ("RUN_RETENTION_DAYS", "36500")]).unwrap();
        assert_eq!(c.run_retention_days, 36500);
    }

    #[test]
    fn extreme_times_are_refused() {
        for name in [
            "SCRIPT_TIMEOUT_SECONDS",
            "JWT_TTL_MINUTES",
            "CANCEL_GRACE_SECONDS",
            "HEARTBEAT_SECONDS",
            "VIEWER_STALL_SECONDS",
            "SHUTDOWN_GRACE_SECONDS",
            "ORPHAN_GRACE_MS",
        ] {
            let err =
                config_with(&[("JWT_SECRET", SECRET), (name, "18446744073709551615")]).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn script_nice_is_a_niceness_step() {
        let cfg = config_with(&[("JWT_SECRET", SECRET)]).unwrap();
        assert_eq!(cfg.script_nice, 5);
        let cfg = config_with(&[("JWT_SECRET", SECRET), ("SCRIPT_NICE", "0")]).unwrap();
        assert_eq!(cfg.script_nice, 0);
        for bad in ["20", "-1", "x"] {
            let err = config_with(&[("JWT_SECRET", SECRET), ("SCRIPT_NICE", bad)]).unwrap_err();
            assert!(err.to_string().contains("SCRIPT_NICE"), "{bad}: {err}");
        }
    }

    #[test]
    fn help_shows_ranges() {
        let help = help_text();
        assert!(help.contains("(0 to 36500)"), "{help}");
        assert!(help.contains("(1 to 31536000)"), "{help}");
    }

    #[test]
    fn help_lists_every_setting() {
        let help = help_text();
        for s in SETTINGS {
            assert!(help.contains(s.name), "{} missing from help", s.name);
        }
    }

    #[test]
    fn admin_roles_are_a_comma_separated_list() {
        let c = config_with(&[("JWT_SECRET", SECRET)]).unwrap();
        assert_eq!(c.admin_roles, vec!["admin".to_string()]);
        let c = config_with(&[("JWT_SECRET", SECRET), ("ADMIN_ROLES", " ops , sre,,")]).unwrap();
        assert_eq!(c.admin_roles, vec!["ops".to_string(), "sre".to_string()]);
    }
}
