//! The shared state every request handler sees: configuration, signing secret, the runbook
//! catalog, running runs, metrics, and what was captured from the process at startup.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::catalog::Catalog;
use crate::config::Config;
use crate::jwt::Validation;
use crate::metrics::Metrics;
use crate::privsep::RunAs;
use crate::retention::Retention;
use crate::run::Registry;

/// Leeway for `exp`/`nbf` checks.
pub const TOKEN_LEEWAY_SECONDS: i64 = 30;

pub struct App {
    pub config: Config,
    pub secret: Vec<u8>,
    pub catalog: Catalog,
    pub runs: Registry,
    pub metrics: Metrics,
    /// The server's environment at startup.
    pub server_env: HashMap<String, String>,
    /// The server's environment minus the variables scripts must never see.
    pub script_base_env: Vec<(String, String)>,
    /// The soft descriptor limit the server started with, given back to scripts.
    pub nofile_soft: Option<u64>,
    /// The niceness scripts start with (`SCRIPT_NICE` above the server's); None: the server's.
    pub script_nice: Option<i32>,
    /// The port actually listened on.
    pub port: u16,
    /// Where run logs live.
    pub runs_dir: PathBuf,
    /// Set once SIGTERM/SIGINT arrived: no new runs.
    pub shutting_down: AtomicBool,
    /// Where runs get their own cgroup; None: process groups only.
    pub run_cgroups: Option<crate::cgroup::Parent>,
    /// The finished runs retention may remove.
    pub retention: Retention,
    /// The user scripts run as (`RUN_AS_USER`); None: runbookd's own.
    pub run_as: Option<RunAs>,
    /// Finished run directories kept for the next runs.
    pub spare_dirs: std::sync::Arc<crate::execute::SpareDirs>,
    /// Empty files made ahead for the next runs' logs and records.
    pub spare_files: std::sync::Arc<crate::spare_files::SpareFiles>,
    /// Run ids, drawn ahead with their cgroups made.
    pub run_ids: std::sync::Arc<crate::run_ids::RunIds>,
    /// The threads of runs (supervision, pumping the pipes), reused from run to run.
    pub run_threads: crate::workers::Workers,
    /// Runbooks as last parsed, by their exact text.
    pub parsed_runbooks: crate::runbook_cache::RunbookCache,
}

impl App {
    pub fn token_validation(&self) -> Validation<'_> {
        Validation {
            issuer: &self.config.jwt_issuer,
            audience: &self.config.jwt_audience,
            leeway_seconds: TOKEN_LEEWAY_SECONDS,
            now: chrono::Utc::now().timestamp(),
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// A server variable as a script would see it: a withheld one (`JWT_SECRET`,
    /// `SECRET_ENV_VARS`, ...) is not available.
    pub fn server_var(&self, name: &str) -> Option<String> {
        if self.config.withheld_env_names().iter().any(|n| n == name) {
            return None;
        }
        self.server_env.get(name).cloned()
    }

    /// `RUNBOOK_URL` for scripts.
    pub fn runbook_url(&self) -> String {
        format!(
            "{}://{}:{}/api/runbooks",
            self.config.api_protocol, self.config.api_host, self.port
        )
    }
}
