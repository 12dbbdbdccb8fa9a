//! The runbook endpoints (list, read, required env, validate, execute), the configuration and
//! dev login: one function each, called by `dispatch`. They decide what to answer and return a
//! `Reply` or an `ApiError`, never a status, and never write to the socket (see `reply`).
#![forbid(unsafe_code)]

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::connection::Request;
use super::error::ApiError;
use super::reply::Reply;
use super::request::{json_body, read_body, Incoming};
use crate::app::App;
use crate::auth::{self, Principal, TokenRequest};
use crate::catalog::CatalogError;
use crate::config::Origin;
use crate::execute::{self, ExecError, ExecuteRequest};
use crate::history;
use crate::params;
use crate::runbook;
use crate::runenv;
use crate::validation;

/// A runbook asked for by name that cannot be read: the error names it and, for a user token
/// (a run token may not list runbooks), the nearest runbook names.
fn runbook_error(app: &App, file: &str, principal: &Principal, error: CatalogError) -> ApiError {
    let suggest = principal.run_scope.is_none();
    match error {
        CatalogError::NotFound => ApiError::NotFound(app.catalog.explain(file, &error, suggest)),
        CatalogError::InvalidName => {
            ApiError::BadRequest(app.catalog.explain(file, &error, suggest))
        }
        other => other.into(),
    }
}

pub fn dev_login(app: &App, request: &mut Request<'_>) -> Result<Reply, ApiError> {
    if !app.config.enable_login {
        return Err(ApiError::NotFound(
            "not found: dev login is disabled".into(),
        ));
    }
    let body = json_body(&read_body(request)?)?;
    let subject = match body.get("subject") {
        None | Some(Value::Null) => "dev-user-1".to_string(),
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "subject must be a non-empty string".into(),
            ))
        }
    };
    let roles: Vec<String> = match body.get("roles") {
        None | Some(Value::Null) => vec!["developer".to_string()],
        Some(v @ (Value::Array(_) | Value::String(_))) => {
            let mut claims = Map::new();
            claims.insert("roles".into(), v.clone());
            auth::claim_values(&claims, "roles")
        }
        Some(_) => {
            return Err(ApiError::BadRequest(
                "roles must be a list of strings".into(),
            ))
        }
    };
    let now = chrono::Utc::now();
    let ttl = i64::try_from(app.config.jwt_ttl.as_secs()).unwrap_or(i64::MAX);
    let expires_at = now.timestamp().saturating_add(ttl);
    let expires = chrono::DateTime::from_timestamp(expires_at, 0).unwrap_or(now);
    let token = auth::mint(
        &app.secret,
        &TokenRequest {
            issuer: &app.config.jwt_issuer,
            audience: &app.config.jwt_audience,
            subject: &subject,
            roles: &roles,
            issued_at: now.timestamp(),
            expires_at,
            run: None,
        },
    );
    Ok(Reply::Json(json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_at": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "subject": subject,
        "roles": roles,
    })))
}

pub fn list_runbooks(app: &App) -> Result<Reply, ApiError> {
    let entries = app.catalog.list()?;
    let runbooks: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut item = json!({"filename": e.filename, "name": e.name, "path": e.path});
            super::page::add_summary(app, &e.filename, &mut item);
            item
        })
        .collect();
    Ok(Reply::Json(json!({"success": true, "runbooks": runbooks})))
}

/// The runbook's text; for a caller who does not meet its Required Claims, History entries are
/// reduced to their heading lines (time, exit code, run id), as run output is theirs to see only
/// through the runs endpoints.
pub fn get_runbook(app: &App, file: &str, principal: &Principal) -> Result<Reply, ApiError> {
    let (_, content) = app
        .catalog
        .read(file)
        .map_err(|e| runbook_error(app, file, principal, e))?;
    let book = runbook::parse(&content);
    let content = match execute::check_claims(&book, principal) {
        Ok(()) => content,
        Err(_) => history::headings_only(&content),
    };
    Ok(Reply::Json(json!({
        "success": true,
        "filename": file,
        "name": book.name,
        "content": content,
    })))
}

pub fn required_env(app: &App, file: &str, principal: &Principal) -> Result<Reply, ApiError> {
    let (_, content) = app
        .catalog
        .read(file)
        .map_err(|e| runbook_error(app, file, principal, e))?;
    let book = runbook::parse(&content);
    let item = |r: &runbook::EnvRequirement| json!({"name": r.name, "description": r.description});
    let (available, missing): (Vec<_>, Vec<_>) = book
        .env_requirements
        .iter()
        .partition(|r| app.server_var(&r.name).is_some_and(|v| !v.is_empty()));
    Ok(Reply::Json(json!({
        "success": true,
        "filename": file,
        "required": book.env_requirements.iter().map(item).collect::<Vec<_>>(),
        "available": available.into_iter().map(item).collect::<Vec<_>>(),
        "missing": missing.into_iter().map(item).collect::<Vec<_>>(),
    })))
}

/// Reads `{"env_vars"?}` after the runbook is known to exist.
fn env_vars_body(request: &mut Request<'_>) -> Result<runenv::RequestVars, ApiError> {
    let body = json_body(&read_body(request)?)?;
    runenv::check_request_vars(body.get("env_vars")).map_err(ApiError::BadRequest)
}

pub fn validate(
    app: &App,
    file: &str,
    principal: &Principal,
    request: &mut Request<'_>,
) -> Result<Reply, ApiError> {
    let vars = env_vars_body(request)?;
    let (_, content) = app
        .catalog
        .read(file)
        .map_err(|e| runbook_error(app, file, principal, e))?;
    let book = runbook::parse(&content);
    execute::check_claims(&book, principal)?;
    let vars = params::keep_declared(&vars, &book);
    let mut findings = validation::validate(
        &book,
        file,
        &vars.vars,
        &|n| app.server_var(n),
        &app.catalog,
    );
    findings.warnings.extend(vars.warnings);
    if !findings.errors.is_empty() {
        return Err(ApiError::ValidationFailed {
            runbook: file.to_string(),
            errors: findings.errors,
            warnings: findings.warnings,
        });
    }
    Ok(Reply::Json(json!({
        "success": true,
        "runbook": file,
        "errors": findings.errors,
        "warnings": findings.warnings,
    })))
}

pub fn execute(
    app: &Arc<App>,
    file: &str,
    principal: &Principal,
    incoming: &Incoming,
    request: &mut Request<'_>,
) -> Result<Reply, ApiError> {
    let vars = env_vars_body(request)?;
    // A run token's stack is the truth; the header is believed only from user tokens, which get
    // no exemption from MAX_CONCURRENT_RUNS for it.
    let recursion_stack = match &principal.run_scope {
        Some(scope) => scope.stack.clone(),
        None => incoming
            .header("x-recursion-stack")
            .and_then(|h| serde_json::from_str::<Vec<String>>(h).ok())
            .unwrap_or_default(),
    };
    let correlation_id = incoming
        .header("x-correlation-id")
        .map(|c| {
            c.chars()
                .filter(|ch| !ch.is_control())
                .take(200)
                .collect::<String>()
        })
        .filter(|c| !c.is_empty());
    let run = execute::start(
        app,
        ExecuteRequest {
            file: file.to_string(),
            principal: principal.clone(),
            vars,
            correlation_id,
            recursion_stack,
        },
    )
    .map_err(|e| match e {
        ExecError::Catalog(c) => runbook_error(app, file, principal, c),
        other => other.into(),
    })?;
    let log = run.log()?;
    let wants_async = incoming.query_flag("async")
        || incoming
            .header("prefer")
            .is_some_and(|p| p.to_ascii_lowercase().contains("respond-async"));
    let wants_stream = incoming.query_flag("stream")
        || incoming
            .header("accept")
            .is_some_and(|a| a.contains("text/event-stream"));
    Ok(if wants_async {
        Reply::Accepted(
            json!({
                "success": true,
                "run_id": run.id,
                "runbook": run.runbook,
                "status": "running",
            }),
            vec![
                ("Location", format!("/api/runs/{}", run.id)),
                ("X-Run-Id", run.id.clone()),
            ],
        )
    } else if wants_stream {
        Reply::RunEvents {
            run,
            log,
            from_seq: crate::runlog::FIRST_SEQ,
            announce: true,
            json_chunks: incoming.query_value("format") == Some("json"),
        }
    } else {
        Reply::RunResult { run, log }
    })
}

pub fn config(app: &App, principal: &Principal, incoming: &Incoming) -> Result<Reply, ApiError> {
    let items: Vec<Value> = app
        .config
        .items
        .iter()
        .map(|(name, value, origin)| {
            let from = match origin {
                Origin::Default => "default",
                Origin::Environment => "environment",
            };
            json!({"name": name, "value": value, "from": from})
        })
        .collect();
    Ok(Reply::Json(json!({
        "config_items": items,
        "token": {
            "user_id": principal.subject,
            "roles": principal.roles,
            "remote_ip": incoming.client_ip(&app.config.trusted_proxies),
            "claims": principal.claims,
        },
    })))
}
