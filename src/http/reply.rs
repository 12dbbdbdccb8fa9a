//! What a handler answers (`Reply`) and sending it: whole responses through tiny_http, a run's
//! output through the viewers in `run_output`. A status reaches the wire only as an
//! `HttpStatus`, named only here (which success each `Reply` is) and in `error.rs` (every
//! failure, and a failed run's result).
#![forbid(unsafe_code)]

use std::sync::Arc;

use serde_json::Value;

use super::error::ApiError;
use super::{page, run_output};
use crate::app::App;
use crate::loglines::{LineCount, LineQuery};
use crate::run::Run;
use crate::runlog::{RunLog, Stream};

/// An HTTP status. The number is private to this module, so no other module can send one it
/// made up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpStatus(u16);

impl HttpStatus {
    pub const OK: HttpStatus = HttpStatus(200);
    pub const ACCEPTED: HttpStatus = HttpStatus(202);
    pub const NO_CONTENT: HttpStatus = HttpStatus(204);
    pub const BAD_REQUEST: HttpStatus = HttpStatus(400);
    pub const UNAUTHORIZED: HttpStatus = HttpStatus(401);
    pub const FORBIDDEN: HttpStatus = HttpStatus(403);
    pub const NOT_FOUND: HttpStatus = HttpStatus(404);
    pub const METHOD_NOT_ALLOWED: HttpStatus = HttpStatus(405);
    pub const REQUEST_TIMEOUT: HttpStatus = HttpStatus(408);
    pub const CONFLICT: HttpStatus = HttpStatus(409);
    pub const PAYLOAD_TOO_LARGE: HttpStatus = HttpStatus(413);
    pub const UNPROCESSABLE_CONTENT: HttpStatus = HttpStatus(422);
    pub const TOO_MANY_REQUESTS: HttpStatus = HttpStatus(429);
    pub const INTERNAL_SERVER_ERROR: HttpStatus = HttpStatus(500);
    pub const SERVICE_UNAVAILABLE: HttpStatus = HttpStatus(503);

    pub fn code(self) -> u16 {
        self.0
    }

    /// The reason phrase of the status line.
    pub fn reason(self) -> &'static str {
        tiny_http::StatusCode(self.0).default_reason_phrase()
    }
}

/// What to send back. Each variant is one kind of success; its status is chosen in `send`.
pub enum Reply {
    /// 200 with a JSON body.
    Json(Value),
    /// 202: the work goes on after the answer (a run started or cancelling); JSON body and
    /// extra headers.
    Accepted(Value, Vec<(&'static str, String)>),
    /// 200 with a text body of the given content type.
    Text(&'static str, String),
    /// 204: nothing more to send.
    NoContent,
    /// Stream the run's events as SSE from `from_seq`; `announce`: send `event: run` first.
    RunEvents {
        run: Arc<Run>,
        log: Arc<RunLog>,
        from_seq: u64,
        announce: bool,
        /// `?format=json`: chunk data as `{"seq","text"}` with CRs kept, `done` as the record.
        json_chunks: bool,
    },
    /// One of the web page's embedded files, sent with its Content-Security-Policy.
    Page(&'static str, &'static str),
    /// Wait for the run and send its result object (its status: `error::run_result_status`).
    RunResult { run: Arc<Run>, log: Arc<RunLog> },
    /// The run's output as numbered lines (`GET /api/runs/{id}/logs`), counted already.
    RunLines {
        run: Arc<Run>,
        log: Arc<RunLog>,
        query: LineQuery,
        count: LineCount,
    },
    /// The run's raw output as a download.
    RunDownload {
        run: Arc<Run>,
        log: Arc<RunLog>,
        stream: Option<Stream>,
    },
}

impl Reply {
    /// Sends the reply; returns the status sent (for the access log and metrics).
    pub fn send(self, app: &App, request: tiny_http::Request) -> HttpStatus {
        const JSON: &str = "application/json";
        match self {
            Reply::Json(body) => respond(request, HttpStatus::OK, JSON, body.to_string(), &[]),
            Reply::Accepted(body, headers) => respond(
                request,
                HttpStatus::ACCEPTED,
                JSON,
                body.to_string(),
                &headers,
            ),
            Reply::Text(content_type, body) => {
                respond(request, HttpStatus::OK, content_type, body, &[])
            }
            Reply::NoContent => {
                let status = HttpStatus::NO_CONTENT;
                let _ = request.respond(tiny_http::Response::empty(status.code()));
                status
            }
            Reply::Page(content_type, body) => respond(
                request,
                HttpStatus::OK,
                content_type,
                body.into(),
                &page::headers(),
            ),
            Reply::RunEvents {
                run,
                log,
                from_seq,
                announce,
                json_chunks,
            } => {
                let events = run_output::Events {
                    from_seq,
                    announce,
                    json_chunks,
                };
                run_output::stream_events(app, request, HttpStatus::OK, &run, &log, events)
            }
            Reply::RunResult { run, log } => run_output::send_result(app, request, &run, &log),
            Reply::RunLines {
                run,
                log,
                query,
                count,
            } => run_output::send_lines(request, HttpStatus::OK, &run, &log, &query, &count),
            Reply::RunDownload { run, log, stream } => {
                run_output::send_download(request, HttpStatus::OK, &run, &log, stream)
            }
        }
    }
}

/// Sends an `ApiError` as its status, headers and JSON body.
pub fn send_error(request: tiny_http::Request, error: &ApiError) -> HttpStatus {
    respond(
        request,
        error.status(),
        "application/json",
        error.body().to_string(),
        &error.headers(),
    )
}

fn respond(
    request: tiny_http::Request,
    status: HttpStatus,
    content_type: &str,
    body: String,
    extra: &[(&'static str, String)],
) -> HttpStatus {
    let mut response = tiny_http::Response::from_string(body).with_status_code(status.code());
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
