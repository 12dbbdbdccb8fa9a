//! The `/api/runs` endpoints: list, show, cancel, follow (SSE with resume), lines, download.
//! A run is visible to the user who started it and to anyone whose token satisfies its
//! runbook's Required Claims; a run id alone is not a key. A run token sees only its own run
//! and the runs started under it. Cancelling is for the user who started it and for
//! administrators (`ADMIN_ROLES`) who meet the claims.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::error::ApiError;
use super::reply::Reply;
use super::request::Incoming;
use crate::app::App;
use crate::auth::{self, Principal};
use crate::loglines::{self, LineQuery};
use crate::record::{self, RunStatus};
use crate::run::Run;
use crate::runbook;
use crate::runlog::{Stream, FIRST_SEQ};

const DEFAULT_LIST_LIMIT: usize = 50;
const DEFAULT_TAIL_LINES: usize = 500;

/// Whether `principal` may see runs of `runbook` started by `owner`. `cache` keeps
/// the verdict per runbook for one request.
fn may_see(app: &App, principal: &Principal, run: &Run, cache: &mut HashMap<String, bool>) -> bool {
    if let Some(scope) = &principal.run_scope {
        return app.runs.descends_from(&run.id, &scope.run_id);
    }
    if run.user == principal.subject {
        return true;
    }
    *cache.entry(run.runbook.clone()).or_insert_with(|| {
        let Ok((_, content)) = app.catalog.read(&run.runbook) else {
            return false;
        };
        let book = runbook::parse(&content);
        if book.required_claims_malformed {
            return false;
        }
        let required: Vec<(String, Vec<String>)> = book
            .required_claims
            .iter()
            .map(|c| (c.claim.clone(), c.values.clone()))
            .collect();
        auth::check_required_claims(principal, &required).is_ok()
    })
}

/// The run, if it exists and the caller may see it.
pub(super) fn visible_run(
    app: &App,
    principal: &Principal,
    id: &str,
) -> Result<Arc<Run>, ApiError> {
    let not_found = || ApiError::NotFound("run not found".into());
    if !record::is_valid_run_id(id) {
        return Err(not_found());
    }
    let run = app.runs.get(id).ok_or_else(not_found)?;
    if !may_see(app, principal, &run, &mut HashMap::new()) {
        return Err(ApiError::Forbidden(if principal.run_scope.is_some() {
            "a run token may read only its own run and its sub-runs".into()
        } else {
            "this run belongs to another user and the runbook's Required Claims (RBAC) are not met"
                .into()
        }));
    }
    Ok(run)
}

pub fn list(app: &App, principal: &Principal, incoming: &Incoming) -> Result<Reply, ApiError> {
    let status = match incoming.query_value("status") {
        None | Some("") => None,
        Some(s) => Some(
            RunStatus::parse(s)
                .ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}")))?,
        ),
    };
    let limit = match incoming.query_value("limit") {
        None | Some("") => DEFAULT_LIST_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::BadRequest("limit must be a whole number".into()))?,
    };
    let runbook = incoming.query_value("runbook").filter(|r| !r.is_empty());
    let mut cache = HashMap::new();
    let runs: Vec<Value> = app
        .runs
        .all()
        .into_iter()
        .filter(|r| runbook.is_none_or(|b| r.runbook == b))
        .map(|r| (r.current_record(), r))
        .filter(|(rec, _)| status.is_none_or(|s| rec.status == s))
        .filter(|(_, r)| may_see(app, principal, r, &mut cache))
        .take(limit)
        .map(|(rec, _)| rec.to_api())
        .collect();
    Ok(Reply::Json(json!({"success": true, "runs": runs})))
}

pub fn get(app: &App, principal: &Principal, id: &str) -> Result<Reply, ApiError> {
    let run = visible_run(app, principal, id)?;
    let mut body = run.current_record().to_api();
    body["success"] = json!(true);
    Ok(Reply::Json(body))
}

/// Whether `principal` may cancel `run`: the user who started it, or a user holding a role in
/// `ADMIN_ROLES` who meets the runbook's Required Claims.
fn may_cancel(app: &App, principal: &Principal, run: &Run) -> bool {
    run.user == principal.subject
        || (principal
            .roles
            .iter()
            .any(|role| app.config.admin_roles.contains(role))
            && may_see(app, principal, run, &mut HashMap::new()))
}

pub fn cancel(app: &App, principal: &Principal, id: &str) -> Result<Reply, ApiError> {
    let run = visible_run(app, principal, id)?;
    if !may_cancel(app, principal, &run) {
        return Err(ApiError::Forbidden(
            "only the user who started this run, or an administrator (ADMIN_ROLES) who meets the runbook's Required Claims, may cancel it"
                .into(),
        ));
    }
    let record = run.record();
    if record.status.is_finished() || !run.request_cancel() {
        return Err(ApiError::Conflict(format!(
            "run {} is not running (status {})",
            run.id,
            run.record().status
        )));
    }
    let record = run.update(|r| {
        if r.status == RunStatus::Running {
            r.status = RunStatus::Cancelling;
        }
    });
    if let Err(e) = record::save(&app.runs_dir, &record) {
        log::error!("run {}: cannot write its record: {e}", run.id);
    }
    Ok(Reply::Accepted(
        json!({"success": true, "run_id": run.id, "status": "cancelling"}),
        Vec::new(),
    ))
}

fn number(incoming: &Incoming, name: &str) -> Result<Option<u64>, ApiError> {
    match incoming.query_value(name) {
        None | Some("") => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("{name} must be a whole number"))),
    }
}

pub(super) fn stream_param(incoming: &Incoming) -> Result<Option<Stream>, ApiError> {
    match incoming.query_value("stream") {
        None | Some("") => Ok(None),
        Some("stdout") => Ok(Some(Stream::Stdout)),
        Some("stderr") => Ok(Some(Stream::Stderr)),
        Some(other) => Err(ApiError::BadRequest(format!(
            "stream must be stdout or stderr, not {other:?}"
        ))),
    }
}

pub fn events(
    app: &App,
    principal: &Principal,
    id: &str,
    incoming: &Incoming,
) -> Result<Reply, ApiError> {
    let run = visible_run(app, principal, id)?;
    let log = run.log()?;
    let last_event_id = match incoming.header("last-event-id").map(str::trim) {
        Some(v) if !v.is_empty() => Some(v.parse::<u64>().map_err(|_| {
            ApiError::BadRequest("Last-Event-ID must be an event id from this run".into())
        })?),
        _ => number(incoming, "after")?,
    };
    let from_seq = match (last_event_id, number(incoming, "tail")?) {
        (Some(after), _) => {
            if let Some(_end) = log.outcome() {
                let done_id = log.totals().last_seq.saturating_add(1);
                if after >= done_id {
                    return Ok(Reply::NoContent);
                }
            }
            // An id past anything a run can reach waits for the end like any id ahead.
            after.saturating_add(1)
        }
        (None, Some(lines)) => loglines::tail_start(&log, lines)?,
        (None, None) => FIRST_SEQ,
    };
    Ok(Reply::RunEvents {
        run,
        log,
        from_seq,
        announce: false,
        json_chunks: incoming.query_value("format") == Some("json"),
    })
}

pub fn logs(
    app: &App,
    principal: &Principal,
    id: &str,
    incoming: &Incoming,
) -> Result<Reply, ApiError> {
    let run = visible_run(app, principal, id)?;
    let log = run.log()?;
    let since = match incoming.query_value("since") {
        None | Some("") => None,
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|_| ApiError::BadRequest("since must be an RFC 3339 time".into()))?
                .with_timezone(&chrono::Utc),
        ),
    };
    let max = app.config.logs_max_lines;
    let tail = match number(incoming, "tail")? {
        None => DEFAULT_TAIL_LINES.min(max),
        Some(t) if t > max as u64 => {
            return Err(ApiError::BadRequest(format!(
                "tail must be at most {max} (LOGS_MAX_LINES)"
            )))
        }
        Some(t) => t as usize,
    };
    let query = LineQuery {
        tail,
        since,
        stream: stream_param(incoming)?,
    };
    let count = loglines::count_lines(&log, &query)?;
    Ok(Reply::RunLines {
        run,
        log,
        query,
        count,
    })
}

pub fn download(
    app: &App,
    principal: &Principal,
    id: &str,
    incoming: &Incoming,
) -> Result<Reply, ApiError> {
    let run = visible_run(app, principal, id)?;
    let stream = stream_param(incoming)?;
    let log = run.log()?;
    Ok(Reply::RunDownload { run, log, stream })
}
