//! Server configuration: every setting is an environment variable, read once at startup into
//! one validated `Config`. `SETTINGS` is the single table of names, defaults and help text, used
//! for parsing, for `--help` and for `GET /api/config`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// One row of the settings table.
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
    pub secret: bool,
}

const fn setting(name: &'static str, default: &'static str, help: &'static str) -> Setting {
    Setting {
        name,
        default,
        help,
        secret: false,
    }
}

pub const SETTINGS: &[Setting] = &[
    setting("API_PORT", "8083", "listen port (0 = pick a free one)"),
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
    },
    setting("JWT_ISSUER", "dev-idp", "required token issuer"),
    setting("JWT_AUDIENCE", "dev-api", "required token audience"),
    setting("JWT_TTL_MINUTES", "480", "lifetime of dev-login tokens"),
    setting(
        "SCRIPT_TIMEOUT_SECONDS",
        "600",
        "then the script's process group is terminated",
    ),
    setting(
        "MAX_OUTPUT_SIZE_BYTES",
        "10485760",
        "per stream, the most kept in the done event and the sync JSON",
    ),
    setting(
        "HISTORY_OUTPUT_BYTES",
        "65536",
        "per stream, the most written into a history entry",
    ),
    setting(
        "HISTORY_MAX_ENTRIES",
        "100",
        "history entries kept per runbook",
    ),
    setting("MAX_RECURSION_DEPTH", "50", "sub-runbook depth limit"),
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
    setting("HEARTBEAT_SECONDS", "15", "SSE keepalive comment interval"),
    setting(
        "ORPHAN_GRACE_MS",
        "500",
        "after the main process exits, how long descendants may hold the pipes",
    ),
    setting(
        "VIEWER_STALL_SECONDS",
        "30",
        "a viewer whose socket accepts nothing for this long is cut off",
    ),
    setting("MAX_CONCURRENT_RUNS", "64", "runs at once; more get 429"),
    setting(
        "CANCEL_GRACE_SECONDS",
        "5",
        "between TERM and KILL when a run is cancelled or timed out",
    ),
    setting(
        "SHUTDOWN_GRACE_SECONDS",
        "10",
        "on SIGTERM/SIGINT, the longest the server takes to stop its runs and exit",
    ),
    setting(
        "RUN_RETENTION_DAYS",
        "30",
        "finished runs older than this are pruned",
    ),
    setting(
        "RUN_RETENTION_COUNT",
        "1000",
        "at most this many finished runs are kept",
    ),
    setting(
        "STATE_MAX_BYTES",
        "10737418240",
        "run logs and records are pruned (oldest finished first) to stay under this",
    ),
    setting(
        "RUN_LOG_MAX_BYTES",
        "1073741824",
        "per run, the most output stored; later output is counted and dropped",
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
    setting(
        "RUNBOOK_MAX_BYTES",
        "16777216",
        "largest runbook file read (1024 to 1073741824); History is trimmed to stay under it",
    ),
];

/// The largest `RUNBOOK_MAX_BYTES`: a runbook is read whole into memory.
const RUNBOOK_MAX_BYTES_LIMIT: u64 = 1 << 30;

/// Why the configuration was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    Invalid { name: &'static str, reason: String },
    MissingSecret,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Invalid { name, reason } => write!(f, "invalid {name}: {reason}"),
            ConfigError::MissingSecret => {
                write!(f, "JWT_SECRET is required unless ENABLE_LOGIN=true")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

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
    pub viewer_stall: Duration,
    pub secret_env_vars: Vec<String>,
    pub max_concurrent_runs: usize,
    pub cancel_grace: Duration,
    pub shutdown_grace: Duration,
    pub run_retention_days: u64,
    pub run_retention_count: usize,
    pub state_max_bytes: u64,
    pub run_log_max_bytes: u64,
    pub trusted_proxies: Vec<IpAddr>,
    pub runbook_max_bytes: u64,
    /// Each setting's effective value and origin, secrets already hidden.
    pub items: Vec<(&'static str, String, Origin)>,
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

    fn number<T>(&mut self, name: &'static str, min: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let text = self.text(name);
        let value: T = text.trim().parse().map_err(|_| ConfigError::Invalid {
            name,
            reason: format!("{text:?} is not a whole number"),
        })?;
        if value < min {
            return Err(ConfigError::Invalid {
                name,
                reason: format!("must be at least {min}"),
            });
        }
        Ok(value)
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
        let jwt_ttl = Duration::from_secs(60 * r.number::<u64>("JWT_TTL_MINUTES", 1)?);
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
        let viewer_stall = Duration::from_secs(r.number::<u64>("VIEWER_STALL_SECONDS", 1)?);
        let secret_env_vars = r
            .text("SECRET_ENV_VARS")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let max_concurrent_runs = r.number::<usize>("MAX_CONCURRENT_RUNS", 1)?;
        let cancel_grace = Duration::from_secs(r.number::<u64>("CANCEL_GRACE_SECONDS", 0)?);
        let shutdown_grace = Duration::from_secs(r.number::<u64>("SHUTDOWN_GRACE_SECONDS", 1)?);
        let run_retention_days = r.number::<u64>("RUN_RETENTION_DAYS", 1)?;
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
        let runbook_max_bytes = r.number::<u64>("RUNBOOK_MAX_BYTES", 1024)?;
        if runbook_max_bytes > RUNBOOK_MAX_BYTES_LIMIT {
            return Err(ConfigError::Invalid {
                name: "RUNBOOK_MAX_BYTES",
                reason: format!("must be at most {RUNBOOK_MAX_BYTES_LIMIT}"),
            });
        }
        Ok(Config {
            runbook_max_bytes,
            max_concurrent_runs,
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
            viewer_stall,
            secret_env_vars,
            items: r.items,
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
         \x20      runbookd --help              this text\n\n\
         configuration (environment variables, default in brackets):\n",
    );
    for s in SETTINGS {
        let default = if s.default.is_empty() {
            String::new()
        } else {
            format!(" [{}]", s.default)
        };
        out.push_str(&format!("  {:<24}{}{}\n", s.name, s.help, default));
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
    fn state_directory_from_systemd() {
        let c = config_with(&[
            ("JWT_SECRET", SECRET),
            ("STATE_DIRECTORY", "/var/lib/runbookd"),
        ])
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/runbookd"));
    }

    #[test]
    fn help_lists_every_setting() {
        let help = help_text();
        for s in SETTINGS {
            assert!(help.contains(s.name), "{} missing from help", s.name);
        }
    }
}
