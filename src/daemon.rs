//! The server process: dispatches the helper and client sub-commands, reads the configuration,
//! prepares the state directory and the runbooks, binds the socket and serves. Exit status 2
//! for a bad configuration.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::app::App;
use crate::config::Config;
use crate::{
    auth, catalog, cgroup, cli, config, fault, http, lifecycle, metrics, privsep, retention, run,
    samples, stages, state_lock, supervisor, sys,
};

/// Most run threads (supervisors and pumps, two per run) kept waiting for the next run.
const MAX_IDLE_RUN_THREADS: usize = 64;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum StartError {
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("runbooks directory: {0}")]
    Catalog(#[source] catalog::CatalogError),
    #[error("cannot listen: {0}")]
    Listen(String),
    #[error("RUN_CGROUP: {0}")]
    Cgroup(#[source] cgroup::CgroupError),
    #[error("STATE_DIR: {0}")]
    StateDir(#[source] state_lock::StateLockError),
}

/// The whole program: `args` are the process arguments after the program name.
pub fn main(raw: Vec<std::ffi::OsString>) -> ExitCode {
    if raw
        .first()
        .is_some_and(|a| a == supervisor::CHILD_HELPER_ARG)
    {
        let code = supervisor::child_helper_main(&raw[1..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    if raw.first().is_some_and(|a| a == privsep::CLEAN_HELPER_ARG) {
        let code = privsep::clean_helper_main(&raw[1..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let args: Vec<String> = raw
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.first().is_some_and(|a| cli::handles(a)) {
        return cli::main(&args);
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", config::help_text());
        return ExitCode::SUCCESS;
    }
    if let Some(unknown) = args.first() {
        eprintln!("runbookd: unknown argument {unknown:?}; see runbookd --help");
        return ExitCode::from(2);
    }
    // Before anything else: a script of the same user must not read our environment (the
    // secret), memory or descriptors through /proc, nor ptrace us.
    if let Err(e) = sys::make_non_dumpable() {
        eprintln!("runbookd: cannot make the process non-dumpable: {e}");
        return ExitCode::FAILURE;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    stages::init();
    fault::install_panic_hook();
    let config = match Config::from_lookup(&|name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("runbookd: {e}");
            return ExitCode::from(2);
        }
    };
    let run_as = match config.run_as_user.as_deref().map(privsep::prepare) {
        None => None,
        Some(Ok(run_as)) => Some(run_as),
        Some(Err(e)) => {
            eprintln!("runbookd: {e}");
            return ExitCode::from(2);
        }
    };
    match start(config, run_as) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runbookd: {e}");
            // A STATE_DIR another instance uses is a configuration error, like a bad setting.
            match e {
                StartError::StateDir(state_lock::StateLockError::InUse) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Waits for SIGTERM/SIGINT on its own thread; then stops new work and wakes the accept loop.
fn watch_termination(app: Arc<App>, listener: Arc<TcpListener>) {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let signal = sys::wait_termination_signal();
            log::info!("signal {signal:?} received: shutting down");
            app.shutting_down.store(true, Ordering::SeqCst);
            http::stop_listening(&listener);
            // No run starts any more: the cgroups made ahead go now, not after the runs'
            // grace, which a supervisor may cut short with a kill.
            app.run_ids.discard_ready();
        });
    if let Err(e) = spawned {
        log::error!("cannot watch for termination signals: {e}");
    }
}

fn start(config: Config, run_as: Option<privsep::RunAs>) -> Result<(), StartError> {
    sys::block_termination_signals().map_err(|e| StartError::Io("cannot set up signals", e))?;
    sys::ignore_file_size_signal().map_err(|e| StartError::Io("cannot set up signals", e))?;
    let secret = match &config.jwt_secret {
        Some(s) => s.clone().into_bytes(),
        None => {
            log::warn!("ENABLE_LOGIN=true without JWT_SECRET: using a random secret; tokens end with this process");
            auth::random_secret()
                .map_err(|e| StartError::Io("cannot generate a secret", e))?
                .into_bytes()
        }
    };
    let runs_dir = config.state_dir.join("runs");
    std::fs::create_dir_all(&runs_dir).map_err(|e| StartError::Io("cannot create STATE_DIR", e))?;
    // Held until the server has stopped: nothing below may touch another instance's runs.
    let _state_lock = state_lock::acquire(&config.state_dir).map_err(StartError::StateDir)?;
    if let Err(e) = privsep::lock_state_dir(&config.state_dir, run_as) {
        if run_as.is_some() {
            return Err(StartError::Io("STATE_DIR", e));
        }
        log::warn!("cannot make STATE_DIR private (mode 0700): {e}");
    }
    std::fs::create_dir_all(&config.execution_dir)
        .map_err(|e| StartError::Io("cannot create EXECUTION_DIR", e))?;
    let runbooks_dir: PathBuf = match &config.runbooks_dir {
        Some(dir) => dir.clone(),
        None => {
            let dest = config.state_dir.join("samples");
            samples::install(&dest).map_err(|e| StartError::Io("cannot install the samples", e))?;
            dest
        }
    };
    let catalog = catalog::Catalog::open(&runbooks_dir)
        .map_err(StartError::Catalog)?
        .with_max_bytes(config.runbook_max_bytes);
    let nofile_soft = match sys::raise_nofile_limit() {
        Ok(soft) => Some(soft),
        Err(e) => {
            log::warn!("cannot raise the descriptor limit: {e}");
            None
        }
    };
    let script_nice = scripts_niceness(config.script_nice);
    let run_cgroups = match cgroup::select(&config.run_cgroup) {
        Ok(cgroup::Selection::Use(parent)) => {
            log::info!("runs get their own cgroup under {}", parent.dir().display());
            Some(parent)
        }
        Ok(cgroup::Selection::Off(why)) => {
            log::warn!("runs are not placed in cgroups ({why}): a process that leaves its run's process group (setsid) can outlive the run");
            None
        }
        Err(e) => return Err(StartError::Cgroup(e)),
    };
    let server_env: HashMap<String, String> = std::env::vars().collect();
    let withheld = config.withheld_env_names();
    let script_base_env = server_env
        .iter()
        .filter(|(name, _)| !withheld.contains(name))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let addr = SocketAddr::new(config.bind_address, config.api_port);
    let listener = http::bind(addr, config.viewer_stall, config.request_timeout)
        .map_err(|e| StartError::Listen(format!("{addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Listen(e.to_string()))?;
    // Spares a stopped server left are removed; as many are kept as runs may run at once,
    // and with RUN_AS_USER none.
    let spare_dirs = Arc::new(crate::execute::SpareDirs::new(
        &config.execution_dir,
        &config.instance_id,
        if run_as.is_none() {
            config.max_concurrent_runs
        } else {
            0
        },
    ));
    // Two files a run (its log and first record): enough for a loop of back-to-back runs
    // between two quiet moments, and at least for as many runs as may start at once.
    let spare_files = crate::spare_files::SpareFiles::new(
        &runs_dir,
        &config.instance_id,
        config
            .spare_run_files
            .max(config.max_concurrent_runs.saturating_mul(2)),
    );
    // Run cgroups made ahead: as many as runs may run at once, within run_ids' bounds.
    let run_ids = crate::run_ids::RunIds::new(
        &config.instance_id,
        run_cgroups.clone(),
        config.max_concurrent_runs,
        &runs_dir,
    );
    let app = Arc::new(App {
        config,
        secret,
        catalog,
        runs: run::Registry::default(),
        metrics: metrics::Metrics::default(),
        server_env,
        script_base_env,
        nofile_soft,
        script_nice,
        port: local.port(),
        runs_dir,
        shutting_down: AtomicBool::new(false),
        run_cgroups,
        retention: retention::Retention::default(),
        spare_dirs,
        spare_files,
        run_ids,
        // A run's thread reads its script's pipes at the script's priority, so that neither
        // starves the other; requests (starting runs, streaming) keep the server's.
        run_threads: crate::workers::Workers::new("run", MAX_IDLE_RUN_THREADS)
            .with_nice(script_nice),
        parsed_runbooks: Default::default(),
        run_as,
    });
    lifecycle::recover(&app);
    app.run_ids.remove_leftovers(&app.runs_dir);
    // Spare files and run cgroups are made ahead while the runs are quiet (see `ahead.rs`).
    app.spare_files.start_filling(script_nice, runs_quiet(&app));
    app.run_ids.start_filling(script_nice, runs_quiet(&app));
    app.retention.start(&app);
    lifecycle::start_retention_thread(app.clone());
    let listener = Arc::new(listener);
    watch_termination(app.clone(), listener.clone());
    println!("listening on http://{local}");
    let _ = std::io::stdout().flush();
    log::info!("serving runbooks from {}", app.catalog.root().display());
    http::serve(&app, &listener);
    lifecycle::stop_runs(&app);
    app.run_ids.discard_ready();
    log::info!("stopped");
    Ok(())
}

/// Whether no run is going and none ended within [`crate::ahead::QUIET_AFTER`], asked by the
/// threads that make things ahead of need.
fn runs_quiet(app: &Arc<App>) -> crate::ahead::Quiet {
    let weak = Arc::downgrade(app);
    Box::new(move || {
        weak.upgrade()
            .is_none_or(|app| app.runs.quiet_for(crate::ahead::QUIET_AFTER))
    })
}

/// The niceness scripts start with: `relative` above the server's own, at most 19. None when
/// that is the server's own (`SCRIPT_NICE=0`, or a server already at 19) or cannot be read.
fn scripts_niceness(relative: i32) -> Option<i32> {
    if relative == 0 {
        return None;
    }
    match sys::own_nice() {
        Ok(own) => {
            let nice = own.saturating_add(relative).min(19);
            log::info!("scripts start at niceness {nice} (the server's is {own})");
            (nice != own).then_some(nice)
        }
        Err(e) => {
            log::warn!("cannot read the server's niceness ({e}); scripts run at the server's");
            None
        }
    }
}
