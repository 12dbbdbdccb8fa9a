//! The HTTP front: binds the listening socket (with the viewer stall and request timeouts set
//! on it), accepts connections, and serves each connection on its own thread (`workers`: a
//! thread whose connection ended waits for the next one), request after request: route,
//! handle, answer, and one access line. Which status an answer gets is decided in `error.rs`
//! (failures) and `reply.rs` (successes) only.
#![forbid(unsafe_code)]

pub mod chunked_response;
pub mod connection;
pub mod dispatch;
pub mod error;
pub mod handlers;
pub mod head;
pub mod page;
pub mod reply;
pub mod request;
pub mod router;
pub mod run_output;
pub mod runs;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::App;
use connection::{Connection, Request};
use error::ApiError;
use head::RequestHead;
use request::Incoming;

/// Accept queue length (the kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG: i32 = 4096;

/// Most request threads kept waiting for the next request.
const MAX_IDLE_REQUEST_THREADS: usize = 16;

/// Binds the listening socket. Linux copies `SO_SNDTIMEO` / `TCP_USER_TIMEOUT` and
/// `SO_RCVTIMEO` from it to every accepted connection: a viewer whose socket accepts nothing for
/// the stall time fails, and a read of a request head or body that gets no byte for
/// `request_timeout` fails, which closes the connection and frees its thread (an idle
/// keep-alive connection included). Streams are not affected: nothing reads a connection while
/// its answer is being written.
pub fn bind(
    addr: SocketAddr,
    stall: std::time::Duration,
    request_timeout: std::time::Duration,
) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    crate::sys::set_listen_backlog(&listener, LISTEN_BACKLOG)?;
    crate::sys::set_send_stall_timeout(&listener, stall)?;
    crate::sys::set_receive_timeout(&listener, request_timeout)?;
    Ok(listener)
}

/// How long to wait before accepting again after an accept failed (out of descriptors, ...).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Accepts connections until the listener is shut down ([`stop_listening`]) at shutdown.
/// An accept that fails (no descriptor left, ...) is logged and tried again: the listener
/// stays, and the connections waiting in its queue are accepted once descriptors are free.
pub fn serve(app: &Arc<App>, listener: &TcpListener) {
    let workers = crate::workers::Workers::new("http", MAX_IDLE_REQUEST_THREADS);
    let open = Arc::new(AtomicUsize::new(0));
    let mut last_failure_logged: Option<Instant> = None;
    let mut last_refusal_logged: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(_) if app.is_shutting_down() => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if last_failure_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    log::error!("cannot accept a connection: {e}");
                    last_failure_logged = Some(Instant::now());
                }
                std::thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        if app.is_shutting_down() {
            return;
        }
        let Some(slot) = ConnectionSlot::take(&open, app.config.max_connections) else {
            if last_refusal_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                log::warn!(
                    "{} connections open (MAX_CONNECTIONS): refusing new ones",
                    app.config.max_connections
                );
                last_refusal_logged = Some(Instant::now());
            }
            refuse_connection(app, stream, peer);
            continue;
        };
        let app = app.clone();
        if let Err(e) = workers.run(move || {
            let _slot = slot;
            serve_connection(&app, stream, peer)
        }) {
            log::error!("cannot start a request thread: {e}");
        }
    }
}

/// One of the `MAX_CONNECTIONS` connections being served; freed when dropped.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<ConnectionSlot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| ConnectionSlot(open.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a connection over `MAX_CONNECTIONS` with a 503 on the accept thread, without
/// reading its request and without waiting: the write goes into the new socket's empty send
/// buffer, and the socket is closed at once.
fn refuse_connection(app: &App, stream: TcpStream, peer: SocketAddr) {
    if crate::sys::set_nonblocking(&stream).is_err() {
        return;
    }
    let mut conn = Connection::new(stream, Some(peer), app.config.request_timeout);
    let error = ApiError::Unavailable("too many connections; try again".into());
    let status = reply::send_error(conn.refusal(), &error).code();
    app.metrics.request("unmatched", status);
}

/// Wakes [`serve`]'s accept and makes it return (once `App::is_shutting_down` is set).
pub fn stop_listening(listener: &TcpListener) {
    if let Err(e) = crate::sys::shut_down_socket(listener) {
        log::error!("cannot stop listening: {e}");
    }
}

/// Serves one connection's requests, one after the other, until it ends.
fn serve_connection(app: &Arc<App>, stream: TcpStream, peer: SocketAddr) {
    // Every answer goes out in whole writes: nothing is gained by delaying a small one.
    let _ = stream.set_nodelay(true);
    let mut conn = Connection::new(stream, Some(peer), app.config.request_timeout);
    loop {
        match conn.next_request() {
            Ok(Some((head, request))) => handle(app, head, request),
            Ok(None) => break,
            Err(e) => {
                let started = Instant::now();
                let status = reply::send_error(conn.refusal(), &ApiError::from(e)).code();
                app.metrics.request("unmatched", status);
                log::info!(
                    target: "runbookd::access",
                    "{} - - {}ms {}",
                    peer.ip(),
                    started.elapsed().as_millis(),
                    status
                );
                break;
            }
        }
        if app.is_shutting_down() || !conn.reusable() {
            break;
        }
    }
    conn.close();
}

fn handle(app: &Arc<App>, head: RequestHead, mut request: Request<'_>) {
    let started = Instant::now();
    crate::stages::request_received();
    let incoming = Incoming::from_head(head, request.remote());
    let (label, result) = match router::route(&incoming.method, &incoming.path) {
        Ok(route) => {
            let label = route.label();
            (label, dispatch::handle(app, route, &incoming, &mut request))
        }
        Err(e) => ("unmatched", Err(e)),
    };
    let status = match result {
        Ok(reply) => reply.send(app, request),
        Err(e) => reply::send_error(request.into_response(), &e),
    }
    .code();
    app.metrics.request(label, status);
    // Path only: query strings may carry tokens and are never logged.
    log::info!(
        target: "runbookd::access",
        "{} {} {} {}ms {}",
        incoming.client_ip(&app.config.trusted_proxies),
        incoming.method,
        sanitize_path(&incoming.path),
        started.elapsed().as_millis(),
        status
    );
}

fn sanitize_path(path: &str) -> String {
    path.chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
