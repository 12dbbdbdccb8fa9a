//! The HTTP front: binds the listening socket (with the viewer stall timeout set on it), hands
//! it to tiny_http, and serves each request on its own thread (`workers`: a thread that has
//! answered waits for the next request): route, handle, answer, and one access line. Which
//! status an answer gets is decided in `error.rs` (failures) and `reply.rs` (successes) only.
#![forbid(unsafe_code)]

pub mod chunked_response;
pub mod dispatch;
pub mod error;
pub mod handlers;
pub mod page;
pub mod reply;
pub mod request;
pub mod router;
pub mod run_output;
pub mod runs;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Instant;

use crate::app::App;
use request::Incoming;

/// How long without a request before checking that connections are still accepted.
const LIVENESS_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// False only when a connection to our own listening address is refused (nobody listens).
fn accept_loop_alive(local: SocketAddr) -> bool {
    let mut target = local;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    match std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(1)) {
        Err(e) => e.kind() != io::ErrorKind::ConnectionRefused,
        Ok(_) => true,
    }
}

/// Accept queue length (the kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG: i32 = 4096;

/// Most request threads kept waiting for the next request.
const MAX_IDLE_REQUEST_THREADS: usize = 16;

/// Binds the listening socket. Linux copies `SO_SNDTIMEO` / `TCP_USER_TIMEOUT` and
/// `SO_RCVTIMEO` from it to every accepted connection: a viewer whose socket accepts nothing for
/// the stall time fails, and a read of a request head or body that gets no byte for
/// `request_timeout` fails, which closes the connection and frees its thread (an idle
/// keep-alive connection included). Streams are not affected: while one is written, only
/// tiny_http's wait for a next request head reads, and its end just closes the read side.
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

/// Serves requests until the server is unblocked or its accept loop fails (the error).
///
/// tiny_http's accept thread ends for good on an accept error, and it can also die without a
/// word (it unwraps `try_clone` of an accepted socket, which fails with EMFILE), dropping the
/// listener. So while idle, the listening address is probed: a refused connection means the
/// accept loop is gone and the caller must listen again.
pub fn serve(app: &Arc<App>, server: &tiny_http::Server, local: SocketAddr) -> io::Result<()> {
    let workers = crate::workers::Workers::new("http", MAX_IDLE_REQUEST_THREADS);
    let mut idle_since = Instant::now();
    loop {
        let Some(request) = server.recv_timeout(LIVENESS_PROBE_EVERY)? else {
            if app.is_shutting_down() {
                return Err(io::Error::other("shutting down"));
            }
            if idle_since.elapsed() >= LIVENESS_PROBE_EVERY && !accept_loop_alive(local) {
                return Err(io::Error::other("the accept loop is gone"));
            }
            idle_since = Instant::now();
            continue;
        };
        idle_since = Instant::now();
        let app = app.clone();
        if let Err(e) = workers.run(move || handle(&app, request)) {
            log::error!("cannot start a request thread: {e}");
        }
    }
}

fn handle(app: &Arc<App>, mut request: tiny_http::Request) {
    let started = Instant::now();
    crate::stages::request_received();
    let incoming = Incoming::from_request(&request);
    let (label, result) = match router::route(&incoming.method, &incoming.path) {
        Ok(route) => {
            let label = route.label();
            (label, dispatch::handle(app, route, &incoming, &mut request))
        }
        Err(e) => ("unmatched", Err(e)),
    };
    let status = match result {
        Ok(reply) => reply.send(app, request),
        Err(e) => reply::send_error(request, &e),
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
