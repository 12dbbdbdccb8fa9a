//! Every request's way to its endpoint: the checks in the contract's order (token, then a run
//! token's scope), then the route → endpoint table. The endpoint modules (`handlers`, `runs`,
//! `page`) know nothing of each other's routes; only this module names them all.
#![forbid(unsafe_code)]

use std::sync::Arc;

use serde_json::json;

use super::connection::Request;
use super::error::ApiError;
use super::reply::Reply;
use super::request::Incoming;
use super::router::Route;
use super::{handlers, page, runs};
use crate::app::App;
use crate::auth::{self, AuthError, Principal};

const OPENAPI: &str = include_str!("../docs/openapi.yaml");

/// Runs the route's checks in the contract's order (auth, body, JSON, RBAC) and answers.
pub fn handle(
    app: &Arc<App>,
    route: Route,
    incoming: &Incoming,
    request: &mut Request<'_>,
) -> Result<Reply, ApiError> {
    if let Route::RunDownload(id) = &route {
        if incoming.query_value("sig").is_some() {
            return page::signed_download(app, id, incoming);
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
        (Route::WebPage, _) => Ok(page::index()),
        (Route::WebScript, _) => Ok(page::script()),
        (Route::WebStyle, _) => Ok(page::style()),
        (Route::Health, _) => Ok(Reply::Json(json!({"status": "ok"}))),
        (Route::Metrics, _) => Ok(Reply::Text(
            "text/plain; version=0.0.4",
            app.metrics.render(app.runs.running_count()),
        )),
        (Route::OpenApi, _) => Ok(Reply::Text("application/yaml", OPENAPI.into())),
        (Route::DevLogin, _) => handlers::dev_login(app, request),
        (Route::ListRunbooks, Some(_)) => handlers::list_runbooks(app),
        (Route::GetRunbook(file), Some(p)) => handlers::get_runbook(app, &file, p),
        (Route::RequiredEnv(file), Some(p)) => handlers::required_env(app, &file, p),
        (Route::Validate(file), Some(p)) => handlers::validate(app, &file, p, request),
        (Route::Execute(file), Some(p)) => handlers::execute(app, &file, p, incoming, request),
        (Route::Config, Some(p)) => handlers::config(app, p, incoming),
        (Route::ListRuns, Some(p)) => runs::list(app, p, incoming),
        (Route::GetRun(id), Some(p)) => runs::get(app, p, &id),
        (Route::CancelRun(id), Some(p)) => runs::cancel(app, p, &id),
        (Route::RunEvents(id), Some(p)) => runs::events(app, p, &id, incoming),
        (Route::RunLogs(id), Some(p)) => runs::logs(app, p, &id, incoming),
        (Route::RunDownload(id), Some(p)) => runs::download(app, p, &id, incoming),
        (Route::RunDownloadLink(id), Some(p)) => page::mint_link(app, p, &id, incoming),
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
