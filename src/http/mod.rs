//! The HTTP front: binds the listening socket (with the viewer stall timeout set on it), hands
//! it to tiny_http, and serves each request on its own thread: route, handle, answer, and one
//! access line. Errors are turned into responses only here, from `ApiError`.
#![forbid(unsafe_code)]

pub mod error;
pub mod handlers;
pub mod page;
pub mod request;
pub mod router;
pub mod runs;
pub mod view;
pub mod wire;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Instant;

use crate::app::App;
use error::ApiError;
use handlers::Reply;
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
        let spawned = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || handle(&app, request));
        if let Err(e) = spawned {
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
            (label, handlers::handle(app, route, &incoming, &mut request))
        }
        Err(e) => ("unmatched", Err(e)),
    };
    let status = match result {
        Ok(Reply::Json(status, body)) => {
            respond(request, status, "application/json", body.to_string(), &[])
        }
        Ok(Reply::JsonWithHeaders(status, body, headers)) => respond(
            request,
            status,
            "application/json",
            body.to_string(),
            &headers,
        ),
        Ok(Reply::Text(status, content_type, body)) => {
            respond(request, status, content_type, body, &[])
        }
        Ok(Reply::NoContent) => {
            let _ = request.respond(tiny_http::Response::empty(204));
            204
        }
        Ok(Reply::RunEvents {
            run,
            log,
            from_seq,
            announce,
            json_chunks,
        }) => view::stream_events(app, request, &run, &log, from_seq, announce, json_chunks),
        Ok(Reply::Page(content_type, body)) => {
            respond(request, 200, content_type, body.into(), &page::headers())
        }
        Ok(Reply::RunResult { run, log }) => view::send_result(app, request, &run, &log),
        Ok(Reply::RunLines {
            run,
            log,
            query,
            count,
        }) => view::send_lines(request, &run, &log, &query, &count),
        Ok(Reply::RunDownload { run, log, stream }) => {
            view::send_download(request, &run, &log, stream)
        }
        Err(e) => respond_error(request, &e),
    };
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

/// Turns an `ApiError` into its response: the one place statuses for failures are chosen.
fn respond_error(request: tiny_http::Request, error: &ApiError) -> u16 {
    let status = error.status();
    respond(
        request,
        status,
        "application/json",
        error.body().to_string(),
        &error.headers(),
    )
}

fn respond(
    request: tiny_http::Request,
    status: u16,
    content_type: &str,
    body: String,
    extra: &[(&'static str, String)],
) -> u16 {
    let mut response = tiny_http::Response::from_string(body).with_status_code(status);
    let headers =
        std::iter::once(("Content-Type", content_type.to_string())).chain(extra.iter().cloned());
    for (name, value) in headers {
        if let Ok(header) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(header);
        }
    }
    if let Err(e) = request.respond(response) {
        log::debug!("response not delivered: {e}");
    }
    status
}
