//! Viewers of a run: the SSE stream of an execute response and the synchronous JSON result.
//! Each reads the run's log through its own cursor at its own pace; a write error or a stalled
//! socket ends the viewer, never the run.

use std::io::Write;
use std::sync::Arc;

use serde_json::json;

use super::wire::{Batcher, StreamWriter};
use crate::app::App;
use crate::result_json::write_result;
use crate::run::Run;
use crate::runlog::Next;
use crate::sse;

/// Most bytes of chunks sent in one batch.
const BATCH_BYTES: usize = 256 * 1024;

/// Streams the run as SSE until `done`; returns the status sent.
pub fn stream_events(app: &App, request: tiny_http::Request, run: &Arc<Run>) -> u16 {
    let headers = [
        ("Content-Type", "text/event-stream; charset=utf-8".to_string()),
        ("Cache-Control", "no-cache".to_string()),
        ("X-Accel-Buffering", "no".to_string()),
        ("X-Run-Id", run.id.clone()),
    ];
    let mut out = match StreamWriter::start(request, 200, &headers) {
        Ok(out) => out,
        Err(e) => {
            log::debug!("viewer of {} gone before the head: {e}", run.id);
            return 200;
        }
    };
    match follow(app, &mut out, run) {
        Ok(()) => {
            let _ = out.finish();
        }
        Err(e) => log::debug!("viewer of {} ended: {e}", run.id),
    }
    200
}

fn follow(app: &App, out: &mut StreamWriter, run: &Arc<Run>) -> std::io::Result<()> {
    let limit = app.config.max_output_bytes;
    let mut batch = Vec::with_capacity(BATCH_BYTES + 1024);
    let start = json!({"run_id": run.id, "runbook": run.runbook}).to_string();
    sse::push_event(&mut batch, "run", None, &start);
    out.send(&batch)?;
    let mut cursor = run.log.cursor_at_start();
    loop {
        batch.clear();
        match run.log.next(&mut cursor, BATCH_BYTES, app.config.heartbeat) {
            Next::Chunks(chunks) => {
                for chunk in &chunks {
                    let end = chunk.stream_offset + chunk.data.len() as u64;
                    if chunk.stream_offset <= limit && end > limit {
                        let note = json!({"stream": chunk.stream.name(), "limit": limit});
                        sse::push_event(&mut batch, "truncated", None, &note.to_string());
                    }
                    sse::push_chunk(&mut batch, chunk);
                }
                out.send(&batch)?;
            }
            Next::Idle => {
                sse::push_keepalive(&mut batch);
                out.send(&batch)?;
            }
            Next::End(outcome) => {
                let mut body = Batcher::new(out);
                body.write_all(&sse::done_prefix(cursor.next_seq()))?;
                write_result(&mut body, run, &outcome, limit)?;
                body.write_all(b"\n\n")?;
                body.flush()?;
                return Ok(());
            }
        }
    }
}

/// Waits for the run's end and sends its result object: 200 when it succeeded, else 500.
pub fn send_result(app: &App, request: tiny_http::Request, run: &Arc<Run>) -> u16 {
    let outcome = run.log.wait_end();
    let status = if outcome.return_code == 0 && outcome.error.is_none() {
        200
    } else {
        500
    };
    let headers = [
        ("Content-Type", "application/json".to_string()),
        ("X-Run-Id", run.id.clone()),
    ];
    let sent = StreamWriter::start(request, status, &headers).and_then(|mut out| {
        let mut body = Batcher::new(&mut out);
        write_result(&mut body, run, &outcome, app.config.max_output_bytes)?;
        body.flush()?;
        out.finish()
    });
    if let Err(e) = sent {
        log::debug!("result of {} not delivered: {e}", run.id);
    }
    status
}
