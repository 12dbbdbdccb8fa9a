//! Writes a run's result object (the sync JSON answer and the `done` event's data) straight
//! from the log file into a writer: the capped `stdout`/`stderr` strings are escaped on the
//! way and never held whole in memory.
#![forbid(unsafe_code)]

use std::io::{self, Write};

use serde_json::json;

use crate::chunker::utf8_floor;
use crate::output_text::{normalize, write_json_escaped};
use crate::run::Run;
use crate::runlog::{LogError, Outcome, RunLog, Stream};

/// Writes `{success, runbook, run_id, status, return_code, stdout, stderr, errors, warnings,
/// truncated, error?}` for a finished run, each stream capped at `limit` bytes.
pub fn write_result(
    out: &mut impl Write,
    run: &Run,
    log: &RunLog,
    outcome: &Outcome,
    limit: u64,
) -> io::Result<()> {
    let totals = log.totals();
    let success = outcome.return_code == 0 && outcome.error.is_none();
    let record = run.record();
    let prefix = json!({
        "success": success,
        "runbook": run.runbook,
        "run_id": run.id,
        "status": record.status,
        "return_code": outcome.return_code,
    });
    let prefix = prefix.to_string();
    // Drop the closing brace to go on with the streamed fields.
    out.write_all(&prefix.as_bytes()[..prefix.len() - 1])?;
    for (name, stream) in [("stdout", Stream::Stdout), ("stderr", Stream::Stderr)] {
        write!(out, ",\"{name}\":\"")?;
        write_stream(out, log, stream, limit)?;
        out.write_all(b"\"")?;
    }
    let mut tail = json!({
        "errors": record.errors,
        "warnings": record.warnings,
        "truncated": {
            "stdout": totals.stdout_bytes > limit,
            "stderr": totals.stderr_bytes > limit,
        },
    });
    if !success {
        let error = outcome
            .error
            .clone()
            .unwrap_or_else(|| format!("script exited with return code {}", outcome.return_code));
        tail["error"] = json!(error);
    }
    let tail = tail.to_string();
    out.write_all(b",")?;
    out.write_all(&tail.as_bytes()[1..])
}

fn write_stream(out: &mut impl Write, log: &RunLog, stream: Stream, limit: u64) -> io::Result<()> {
    let mut remaining = limit;
    let result = log.for_each_stored(Some(stream), |chunk| {
        if remaining == 0 {
            return Ok(false);
        }
        let room = usize::try_from(remaining).unwrap_or(usize::MAX);
        let take = utf8_floor(&chunk.data, room);
        write_json_escaped(out, &normalize(&chunk.data[..take]))?;
        remaining -= take as u64;
        Ok(take == chunk.data.len())
    });
    match result {
        Ok(()) => Ok(()),
        Err(LogError::Io(e)) => Err(e),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}
