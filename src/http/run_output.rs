//! A run's output as a response, the last step of pipe → reader → run log → viewer: the SSE
//! stream (execute responses and `/events`), the synchronous JSON result, the raw download and
//! the numbered lines of `/logs`. Each viewer reads the run's log through its own cursor (or a
//! pass over the log file) at its own pace, and streams what it reads: nothing is held whole.
//! A write error or a stalled socket ends the viewer, never the run.
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::Arc;

use serde_json::json;

use super::chunked_response::{Batch, Batcher, ChunkedResponse};
use super::connection::Request;
use super::error::run_result_status;
use super::reply::HttpStatus;
use crate::app::App;
use crate::loglines::{self, LineCount, LineQuery};
use crate::result_json::write_result;
use crate::run::Run;
use crate::runlog::{CursorRead, RunLog, Stream};
use crate::sse;

/// Most bytes of chunks sent in one batch.
const BATCH_BYTES: usize = 256 * 1024;

/// Which events a stream sends.
pub struct Events {
    /// The first chunk sent.
    pub from_seq: u64,
    /// Send `event: run` first (an execute's stream).
    pub announce: bool,
    /// `?format=json`: chunk data as `{"seq","text"}` with CRs kept, `done` as the record.
    pub json_chunks: bool,
}

/// Streams the run as SSE from chunk `events.from_seq` until `done`; returns `status`, sent.
pub fn stream_events(
    app: &App,
    request: Request<'_>,
    status: HttpStatus,
    run: &Arc<Run>,
    log: &RunLog,
    events: Events,
) -> HttpStatus {
    let headers = [
        (
            "Content-Type",
            "text/event-stream; charset=utf-8".to_string(),
        ),
        ("Cache-Control", "no-cache".to_string()),
        ("X-Accel-Buffering", "no".to_string()),
        ("X-Run-Id", run.id.clone()),
    ];
    let mut out = match ChunkedResponse::start(request, status, &headers) {
        Ok(out) => out,
        Err(e) => {
            log::debug!("viewer of {} gone before the head: {e}", run.id);
            return status;
        }
    };
    if out.head_only() {
        let _ = out.finish();
        return status;
    }
    match follow(app, &mut out, run, log, &events) {
        Ok(()) => {
            let _ = out.finish();
        }
        Err(e) => log::debug!("viewer of {} ended: {e}", run.id),
    }
    status
}

fn follow(
    app: &App,
    out: &mut ChunkedResponse<'_>,
    run: &Arc<Run>,
    log: &RunLog,
    events: &Events,
) -> std::io::Result<()> {
    let Events {
        from_seq,
        announce,
        json_chunks,
    } = *events;
    let limit = app.config.max_output_bytes;
    let mut batch = Batch::with_capacity(BATCH_BYTES + 1024);
    if announce {
        let start = json!({"run_id": run.id, "runbook": run.runbook}).to_string();
        sse::push_event(batch.appender(), "run", None, &start);
        out.send_batch(&mut batch)?;
    }
    let mut cursor = log
        .cursor_at(from_seq)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut cap_told = false;
    loop {
        batch.clear();
        let next = log.read(&mut cursor, BATCH_BYTES, app.config.heartbeat);
        match &next {
            CursorRead::Chunks(chunks) => {
                for chunk in chunks {
                    let end = chunk.stream_offset + chunk.data.len() as u64;
                    if chunk.stream_offset <= limit && end > limit {
                        let note = json!({"stream": chunk.stream.name(), "limit": limit});
                        sse::push_event(batch.appender(), "truncated", None, &note.to_string());
                    }
                    if json_chunks {
                        sse::push_chunk_json(batch.appender(), chunk);
                    } else {
                        sse::push_chunk(batch.appender(), chunk);
                    }
                }
            }
            CursorRead::Idle => sse::push_keepalive(batch.appender()),
            CursorRead::End(_) => {}
        }
        // Told once per stream, to viewers that started before the cap (a resumed viewer
        // past it has seen it already).
        if !cap_told
            && log
                .capped_at()
                .is_some_and(|at| cursor.next_seq() >= at && from_seq <= at)
        {
            cap_told = true;
            let note = json!({
                "stream": "log",
                "limit": app.config.run_log_max_bytes,
                "reason": "RUN_LOG_MAX_BYTES reached: further output is counted but not stored",
            });
            sse::push_event(batch.appender(), "truncated", None, &note.to_string());
        }
        out.send_batch(&mut batch)?;
        crate::fault::test_point("stream");
        if let CursorRead::End(outcome) = next {
            if json_chunks {
                // The record, not the output again: this client has every chunk already.
                let mut done = run.current_record().to_api();
                done["success"] = json!(outcome.succeeded());
                let mut end = sse::done_prefix(cursor.next_seq());
                end.extend_from_slice(done.to_string().as_bytes());
                end.extend_from_slice(b"\n\n");
                return out.send(&end);
            }
            let mut body = Batcher::new(out);
            body.write_all(&sse::done_prefix(cursor.next_seq()))?;
            write_result(&mut body, run, log, &outcome, limit)?;
            body.write_all(b"\n\n")?;
            let flushed = body.flush();
            crate::stages::mark(&run.id, "done sent");
            crate::stages::finish(&run.id);
            return flushed;
        }
    }
}

/// Waits for the run's end and sends its result object, with the status `run_result_status`
/// gives the outcome.
pub fn send_result(app: &App, request: Request<'_>, run: &Arc<Run>, log: &RunLog) -> HttpStatus {
    let outcome = log.wait_end();
    crate::stages::mark(&run.id, "done to the request");
    let status = run_result_status(&outcome);
    let headers = [
        ("Content-Type", "application/json".to_string()),
        ("X-Run-Id", run.id.clone()),
    ];
    let mut out = ChunkedResponse::start_held(request, status, &headers);
    let sent = (|| {
        let mut body = Batcher::new(&mut out);
        write_result(&mut body, run, log, &outcome, app.config.max_output_bytes)?;
        body.flush()?;
        out.finish()
    })();
    if let Err(e) = sent {
        log::debug!("result of {} not delivered: {e}", run.id);
    }
    crate::stages::mark(&run.id, "response");
    crate::stages::finish(&run.id);
    status
}

/// Sends the stored bytes (one stream or both interleaved) as a text attachment.
pub fn send_download(
    request: Request<'_>,
    status: HttpStatus,
    run: &Run,
    log: &RunLog,
    stream: Option<Stream>,
) -> HttpStatus {
    let name = match stream {
        Some(s) => format!("{}.{}.log", run.id, s.name()),
        None => format!("{}.log", run.id),
    };
    let headers = [
        ("Content-Type", "text/plain; charset=utf-8".to_string()),
        (
            "Content-Disposition",
            format!("attachment; filename=\"{name}\""),
        ),
        ("X-Run-Id", run.id.clone()),
    ];
    let sent = ChunkedResponse::start(request, status, &headers).and_then(|mut out| {
        if out.head_only() {
            return out.finish();
        }
        let mut body = Batcher::new(&mut out);
        log.for_each_stored(stream, |chunk| body.write_all(&chunk.data).map(|()| true))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        body.flush()?;
        out.finish()
    });
    if let Err(e) = sent {
        log::debug!("download of {} not delivered: {e}", run.id);
    }
    status
}

/// Sends `{"success", "run_id", "truncated", "logs": [...]}` for `GET /api/runs/{id}/logs`,
/// each line written as it is read from the log file.
pub fn send_lines(
    request: Request<'_>,
    status: HttpStatus,
    run: &Run,
    log: &RunLog,
    query: &LineQuery,
    count: &LineCount,
) -> HttpStatus {
    let headers = [
        ("Content-Type", "application/json".to_string()),
        ("X-Run-Id", run.id.clone()),
    ];
    let sent = ChunkedResponse::start(request, status, &headers).and_then(|mut out| {
        if out.head_only() {
            return out.finish();
        }
        let mut body = Batcher::new(&mut out);
        let head = json!({
            "success": true,
            "run_id": run.id,
            "truncated": count.truncated(query.tail),
        })
        .to_string();
        // Drop the closing brace to go on with the streamed array.
        body.write_all(&head.as_bytes()[..head.len() - 1])?;
        body.write_all(b",\"logs\":[")?;
        let mut first = true;
        loglines::for_each_line(log, query, count, |l| {
            let time = chrono::DateTime::from_timestamp_millis(l.time_ms)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let item = json!({
                "line": l.line,
                "time": time,
                "stream": l.stream.name(),
                "level": l.level,
                "text": l.text,
            });
            if !first {
                body.write_all(b",")?;
            }
            first = false;
            serde_json::to_writer(&mut body, &item).map_err(std::io::Error::other)
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        body.write_all(b"]}")?;
        body.flush()?;
        out.finish()
    });
    if let Err(e) = sent {
        log::debug!("lines of {} not delivered: {e}", run.id);
    }
    status
}
