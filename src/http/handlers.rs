//! One function per endpoint. Handlers decide what to answer and return a `Reply` or an
//! `ApiError`; they never write to the socket (see `view` and `mod` for that).
#![forbid(unsafe_code)]

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::request::{json_body, read_body, Incoming};
use super::router::Route;
use super::runs;
use crate::app::App;
use crate::auth::{self, AuthError, Principal, TokenRequest};
use crate::catalog::CatalogError;
use crate::config::Origin;
use crate::execute::{self, ExecError, ExecuteRequest};
use crate::history;
use crate::params;
use crate::run::{AdmitError, Run};
use crate::runbook;
use crate::runenv;
use crate::runlog::{LogError, RunLog, Stream};
use crate::validation;

const OPENAPI: &str = include_str!("../docs/openapi.yaml");

/// What to send back.
pub enum Reply {
    Json(u16, Value),
    JsonWithHeaders(u16, Value, Vec<(&'static str, String)>),
    Text(u16, &'static str, String),
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
    /// Wait for the run and send its result object.
    RunResult {
        run: Arc<Run>,
        log: Arc<RunLog>,
    },
    /// The run's output as numbered lines (`GET /api/runs/{id}/logs`), counted already.
    RunLines {
        run: Arc<Run>,
        log: Arc<RunLog>,
        query: crate::loglines::LineQuery,
        count: crate::loglines::LineCount,
    },
    /// The run's raw output as a download.
    RunDownload {
        run: Arc<Run>,
        log: Arc<RunLog>,
        stream: Option<Stream>,
    },
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::InvalidName => ApiError::BadRequest("invalid runbook file name".into()),
            CatalogError::NotFound => ApiError::NotFound("runbook not found".into()),
            CatalogError::TooLarge { .. } => ApiError::Unprocessable(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<ExecError> for ApiError {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::Catalog(c) => c.into(),
            ExecError::Forbidden(why) => ApiError::Forbidden(why),
            ExecError::Unavailable(why) => ApiError::Unavailable(why),
            ExecError::Admission(e @ AdmitError::TooManyRuns { .. }) => {
                ApiError::TooManyRequests(e.to_string())
            }
            ExecError::Admission(e @ AdmitError::ParentEnded) => {
                ApiError::Unauthorized(e.to_string())
            }
            ExecError::Admission(ref e @ AdmitError::RunbookBusy { ref running, .. }) => {
                ApiError::RunbookBusy {
                    message: e.to_string(),
                    run_ids: running.clone(),
                }
            }
            e @ ExecError::Internal(_) => ApiError::Internal(e.to_string()),
        }
    }
}

/// Runs the route's checks in the contract's order (auth, body, JSON, RBAC) and answers.
pub fn handle(
    app: &Arc<App>,
    route: Route,
    incoming: &Incoming,
    request: &mut tiny_http::Request,
) -> Result<Reply, ApiError> {
    if let Route::RunDownload(id) = &route {
        if incoming.query_value("sig").is_some() {
            return super::page::signed_download(app, id, incoming);
        }
    }
    let principal = if route.needs_token() {
        Some(authenticate(app, incoming, route.accepts_query_token())?)
    } else {
        None
    };
    check_run_scope(app, &route, principal.as_ref(), incoming)?;
    let principal = principal.as_ref();
    match (route, principal) {
        (Route::WebPage, _) => Ok(super::page::index()),
        (Route::WebScript, _) => Ok(super::page::script()),
        (Route::WebStyle, _) => Ok(super::page::style()),
        (Route::Health, _) => Ok(Reply::Json(200, json!({"status": "ok"}))),
        (Route::Metrics, _) => Ok(Reply::Text(
            200,
            "text/plain; version=0.0.4",
            app.metrics.render(app.runs.running_count()),
        )),
        (Route::OpenApi, _) => Ok(Reply::Text(200, "application/yaml", OPENAPI.into())),
        (Route::DevLogin, _) => dev_login(app, request),
        (Route::ListRunbooks, Some(_)) => list_runbooks(app),
        (Route::GetRunbook(file), Some(p)) => get_runbook(app, &file, p),
        (Route::RequiredEnv(file), Some(p)) => required_env(app, &file, p),
        (Route::Validate(file), Some(p)) => validate(app, &file, p, request),
        (Route::Execute(file), Some(p)) => execute(app, &file, p, incoming, request),
        (Route::Config, Some(p)) => config(app, p, incoming),
        (Route::ListRuns, Some(p)) => runs::list(app, p, incoming),
        (Route::GetRun(id), Some(p)) => runs::get(app, p, &id),
        (Route::CancelRun(id), Some(p)) => runs::cancel(app, p, &id),
        (Route::RunEvents(id), Some(p)) => runs::events(app, p, &id, incoming),
        (Route::RunLogs(id), Some(p)) => runs::logs(app, p, &id, incoming),
        (Route::RunDownload(id), Some(p)) => runs::download(app, p, &id, incoming),
        (Route::RunDownloadLink(id), Some(p)) => super::page::mint_link(app, p, &id, incoming),
        (_, None) => Err(ApiError::Unauthorized("missing bearer token".into())),
    }
}

fn authenticate(app: &App, incoming: &Incoming, query_token: bool) -> Result<Principal, ApiError> {
    let from_query = match (incoming.header("authorization"), query_token) {
        (None, true) => incoming
            .query_value("access_token")
            .map(|t| format!("Bearer {t}")),
        _ => None,
    };
    auth::authenticate(
        from_query.as_deref().or(incoming.header("authorization")),
        &app.secret,
        &app.token_validation(),
    )
    .map_err(|e| match e {
        AuthError::MissingToken => ApiError::Unauthorized("missing bearer token".into()),
        // Dev login without JWT_SECRET signs with a secret generated at start.
        other => ApiError::Unauthorized(
            other.explained(app.config.enable_login && app.config.jwt_secret.is_none()),
        ),
    })
}

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

/// A run token works only on the routes it is made for (`Route::allows_run_token`), on open
/// routes too (it cannot be turned into a dev-login token), and only while its run is going.
/// Which runs it reads is decided in `runs`; an execute takes its recursion stack from it.
fn check_run_scope(
    app: &App,
    route: &Route,
    principal: Option<&Principal>,
    incoming: &Incoming,
) -> Result<(), ApiError> {
    let presented;
    let principal = match principal {
        Some(p) => p,
        None => {
            // An open route: only a valid run token in the header matters here.
            let Some(header) = incoming.header("authorization") else {
                return Ok(());
            };
            match auth::authenticate(Some(header), &app.secret, &app.token_validation()) {
                Ok(p) => {
                    presented = p;
                    &presented
                }
                Err(_) => return Ok(()),
            }
        }
    };
    let Some(scope) = &principal.run_scope else {
        return Ok(());
    };
    if !app.runs.is_running(&scope.run_id) {
        return Err(ApiError::Unauthorized(
            "the run this token belongs to has ended".into(),
        ));
    }
    if !route.allows_run_token() {
        return Err(ApiError::Forbidden(
            "a run token may only execute runbooks and read its own run and its sub-runs".into(),
        ));
    }
    Ok(())
}

fn dev_login(app: &App, request: &mut tiny_http::Request) -> Result<Reply, ApiError> {
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
    Ok(Reply::Json(
        200,
        json!({
            "access_token": token,
            "token_type": "bearer",
            "expires_at": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "subject": subject,
            "roles": roles,
        }),
    ))
}

fn list_runbooks(app: &App) -> Result<Reply, ApiError> {
    let entries = app.catalog.list()?;
    let runbooks: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut item = json!({"filename": e.filename, "name": e.name, "path": e.path});
            super::page::add_summary(app, &e.filename, &mut item);
            item
        })
        .collect();
    Ok(Reply::Json(
        200,
        json!({"success": true, "runbooks": runbooks}),
    ))
}

/// The runbook's text; for a caller who does not meet its Required Claims, History entries are
/// reduced to their heading lines (time, exit code, run id), as run output is theirs to see only
/// through the runs endpoints.
fn get_runbook(app: &App, file: &str, principal: &Principal) -> Result<Reply, ApiError> {
    let (_, content) = app
        .catalog
        .read(file)
        .map_err(|e| runbook_error(app, file, principal, e))?;
    let book = runbook::parse(&content);
    let content = match execute::check_claims(&book, principal) {
        Ok(()) => content,
        Err(_) => history::headings_only(&content),
    };
    Ok(Reply::Json(
        200,
        json!({
            "success": true,
            "filename": file,
            "name": book.name,
            "content": content,
        }),
    ))
}

fn required_env(app: &App, file: &str, principal: &Principal) -> Result<Reply, ApiError> {
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
    Ok(Reply::Json(
        200,
        json!({
            "success": true,
            "filename": file,
            "required": book.env_requirements.iter().map(item).collect::<Vec<_>>(),
            "available": available.into_iter().map(item).collect::<Vec<_>>(),
            "missing": missing.into_iter().map(item).collect::<Vec<_>>(),
        }),
    ))
}

/// Reads `{"env_vars"?}` after the runbook is known to exist.
fn env_vars_body(request: &mut tiny_http::Request) -> Result<runenv::RequestVars, ApiError> {
    let body = json_body(&read_body(request)?)?;
    runenv::check_request_vars(body.get("env_vars")).map_err(ApiError::BadRequest)
}

fn validate(
    app: &App,
    file: &str,
    principal: &Principal,
    request: &mut tiny_http::Request,
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
    let ok = findings.errors.is_empty();
    let mut body = json!({
        "success": ok,
        "runbook": file,
        "errors": findings.errors,
        "warnings": findings.warnings,
    });
    if !ok {
        body["error"] = json!(format!("validation failed: {}", findings.errors.join("; ")));
    }
    Ok(Reply::Json(if ok { 200 } else { 400 }, body))
}

fn execute(
    app: &Arc<App>,
    file: &str,
    principal: &Principal,
    incoming: &Incoming,
    request: &mut tiny_http::Request,
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
        Reply::JsonWithHeaders(
            202,
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

fn config(app: &App, principal: &Principal, incoming: &Incoming) -> Result<Reply, ApiError> {
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
    Ok(Reply::Json(
        200,
        json!({
            "config_items": items,
            "token": {
                "user_id": principal.subject,
                "roles": principal.roles,
                "remote_ip": incoming.client_ip(&app.config.trusted_proxies),
                "claims": principal.claims,
            },
        }),
    ))
}
