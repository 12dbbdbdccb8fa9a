//! Ctrl-C while `exec` or `monitor` follows a run. SIGINT is blocked in every thread and
//! received by a watcher thread (`sigwait`): it says that the run goes on and how to follow
//! or cancel it, then ends this process with status 130. With `--cancel-on-interrupt` it asks
//! the server to cancel the run instead and lets the follower print the run's end; a second
//! Ctrl-C then stops waiting.
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use super::args::ServerArgs;
use super::runs::{self, CallError};
use super::summary;
use crate::client::http::Timeouts;
use crate::sys;

/// The exit status after Ctrl-C (128 + SIGINT), as shells report it.
pub const INTERRUPTED_EXIT: i32 = 130;

/// What the watcher knows.
#[derive(Default)]
struct State {
    /// The run being followed, once the server named it.
    run_id: Option<String>,
    /// Ctrl-C came before the run id was known.
    pending: bool,
    /// A cancel was sent (`--cancel-on-interrupt`).
    cancel_sent: bool,
}

struct Shared {
    server: ServerArgs,
    cancel_on_interrupt: bool,
    timeouts: Timeouts,
    state: Mutex<State>,
}

/// The installed Ctrl-C watcher.
pub struct Interrupts {
    shared: Arc<Shared>,
}

/// Blocks SIGINT in this thread (call it before any other thread starts, so that every
/// thread inherits the mask) and starts the watcher.
pub fn install(
    server: &ServerArgs,
    cancel_on_interrupt: bool,
    timeouts: Timeouts,
) -> io::Result<Interrupts> {
    sys::block_interrupt_signal()?;
    let shared = Arc::new(Shared {
        server: server.clone(),
        cancel_on_interrupt,
        timeouts,
        state: Mutex::new(State::default()),
    });
    let watcher = shared.clone();
    thread::Builder::new()
        .name("interrupts".into())
        .spawn(move || loop {
            if let Err(e) = sys::wait_interrupt_signal() {
                log::warn!("cannot wait for Ctrl-C: {e}");
                return;
            }
            on_interrupt(&watcher);
        })?;
    Ok(Interrupts { shared })
}

impl Interrupts {
    /// The server named the run; a Ctrl-C that came while waiting for that acts now.
    pub fn run_known(&self, run_id: &str) {
        let pending = {
            let mut state = lock(&self.shared);
            state.run_id = Some(run_id.to_owned());
            std::mem::take(&mut state.pending)
        };
        if pending {
            on_interrupt(&self.shared);
        }
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn say(text: &str) {
    let mut err = io::stderr();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

fn end_process() -> ! {
    let _ = io::stdout().flush();
    std::process::exit(INTERRUPTED_EXIT)
}

fn on_interrupt(shared: &Shared) {
    let (run_id, cancel_now) = {
        let mut state = lock(shared);
        let Some(run_id) = state.run_id.clone() else {
            if state.pending {
                drop(state);
                say(&summary::interrupted_while_starting(&shared.server.base));
                end_process();
            }
            state.pending = true;
            drop(state);
            say("runbookd: interrupted; waiting for the server to name the run (Ctrl-C again to stop waiting)\n");
            return;
        };
        let cancel_now = shared.cancel_on_interrupt && !state.cancel_sent;
        state.cancel_sent |= cancel_now;
        (run_id, cancel_now)
    };
    if !cancel_now {
        if shared.cancel_on_interrupt {
            say(&format!(
                "runbookd: stopped waiting; run {} was asked to cancel: runbookd monitor {} shows its end\n",
                summary::shown(&run_id),
                summary::shown(&run_id)
            ));
        } else {
            say(&summary::left_going(&run_id, &shared.server.base));
        }
        end_process();
    }
    say(&summary::cancelling(&run_id));
    match runs::cancel(&shared.server, &run_id, shared.timeouts) {
        // The follower sees the run end and prints its final line.
        Ok(()) => {}
        // Not running any more: its end is on its way to the follower.
        Err(CallError::Rejected { status: 409, .. }) => {}
        Err(e) => {
            say(&format!(
                "runbookd: cannot cancel run {}: {e}\n",
                summary::shown(&run_id)
            ));
            say(&summary::left_going(&run_id, &shared.server.base));
            end_process();
        }
    }
}
