//! What a handler answers (`Reply`) and sending it: whole responses in one write, a run's
//! output through the viewers in `run_output`. A status reaches the wire only as an
//! `HttpStatus`, named only here (which success each `Reply` is) and in `error.rs` (every
//! failure, and a failed run's result).
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::Arc;

use serde_json::Value;

use super::connection::{AnswerSink, BodyKind, Request, Response};
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
    pub const REQUEST_HEADER_FIELDS_TOO_LARGE: HttpStatus = HttpStatus(431);
    pub const INTERNAL_SERVER_ERROR: HttpStatus = HttpStatus(500);
    pub const NOT_IMPLEMENTED: HttpStatus = HttpStatus(501);
    pub const SERVICE_UNAVAILABLE: HttpStatus = HttpStatus(503);
    pub const HTTP_VERSION_NOT_SUPPORTED: HttpStatus = HttpStatus(505);

    pub fn code(self) -> u16 {
        self.0
    }

    /// The reason phrase of the status line.
    pub fn reason(self) -> &'static str {
        match self.0 {
            200 => "OK",
            202 => "Accepted",
            204 => "No Content",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            409 => "Conflict",
            413 => "Content Too Large",
            422 => "Unprocessable Content",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "",
        }
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
    pub fn send(self, app: &App, request: Request<'_>) -> HttpStatus {
        const JSON: &str = "application/json";
        match self {
            Reply::Json(body) => respond(
                request.into_response(),
                HttpStatus::OK,
                JSON,
                body.to_string(),
                &[],
            ),
            Reply::Accepted(body, headers) => respond(
                request.into_response(),
                HttpStatus::ACCEPTED,
                JSON,
                body.to_string(),
                &headers,
            ),
            Reply::Text(content_type, body) => respond(
                request.into_response(),
                HttpStatus::OK,
                content_type,
                body,
                &[],
            ),
            Reply::NoContent => {
                let status = HttpStatus::NO_CONTENT;
                let mut response = request.into_response();
                let head = response.head(status, &[], BodyKind::None);
                deliver(response, &head);
                status
            }
            Reply::Page(content_type, body) => respond(
                request.into_response(),
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
pub fn send_error(response: Response<'_>, error: &ApiError) -> HttpStatus {
    respond(
        response,
        error.status(),
        "application/json",
        error.body().to_string(),
        &error.headers(),
    )
}

/// Sends a whole answer: head and body in one write.
fn respond(
    mut response: Response<'_>,
    status: HttpStatus,
    content_type: &str,
    body: String,
    extra: &[(&'static str, String)],
) -> HttpStatus {
    let mut fields: Vec<(&str, String)> = Vec::with_capacity(extra.len() + 1);
    fields.push(("Content-Type", content_type.to_string()));
    fields.extend(extra.iter().cloned());
    let mut bytes = response.head(status, &fields, BodyKind::Sized(body.len()));
    if !response.head_only() {
        bytes.extend_from_slice(body.as_bytes());
    }
    deliver(response, &bytes);
    status
}

/// Writes a whole answer; the connection goes on only when all of it was written.
fn deliver(mut response: Response<'_>, bytes: &[u8]) {
    match response.write_all(bytes) {
        Ok(()) => response.completed(),
        Err(e) => log::debug!("response not delivered: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_sent_has_its_reason_phrase() {
        for status in [
            HttpStatus::OK,
            HttpStatus::ACCEPTED,
            HttpStatus::NO_CONTENT,
            HttpStatus::BAD_REQUEST,
            HttpStatus::UNAUTHORIZED,
            HttpStatus::FORBIDDEN,
            HttpStatus::NOT_FOUND,
            HttpStatus::METHOD_NOT_ALLOWED,
            HttpStatus::REQUEST_TIMEOUT,
            HttpStatus::CONFLICT,
            HttpStatus::PAYLOAD_TOO_LARGE,
            HttpStatus::UNPROCESSABLE_CONTENT,
            HttpStatus::TOO_MANY_REQUESTS,
            HttpStatus::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HttpStatus::INTERNAL_SERVER_ERROR,
            HttpStatus::NOT_IMPLEMENTED,
            HttpStatus::SERVICE_UNAVAILABLE,
            HttpStatus::HTTP_VERSION_NOT_SUPPORTED,
        ] {
            assert!(!status.reason().is_empty(), "{}", status.code());
        }
        assert_eq!(HttpStatus::REQUEST_TIMEOUT.reason(), "Request Timeout");
    }
}
