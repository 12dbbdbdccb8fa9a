//! The web page and what only it needs from the API: its embedded files (sent with a strict
//! Content-Security-Policy), the per-runbook summary in the runbook list, and signed download
//! links (so that no token is ever put in a URL by the page).
#![forbid(unsafe_code)]

use serde_json::{json, Value};

use super::error::ApiError;
use super::reply::Reply;
use super::request::Incoming;
use super::runs;
use crate::app::App;
use crate::auth::Principal;
use crate::download_link::{self, LINK_TTL_SECONDS};
use crate::record;
use crate::runbook;
use crate::runbook_summary;

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const APP_CSS: &str = include_str!("../web/app.css");

/// Scripts and styles only from runbookd's own files: no inline script or style, no other host.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'";

pub fn index() -> Reply {
    Reply::Page("text/html; charset=utf-8", INDEX_HTML)
}

pub fn script() -> Reply {
    Reply::Page("text/javascript; charset=utf-8", APP_JS)
}

pub fn style() -> Reply {
    Reply::Page("text/css; charset=utf-8", APP_CSS)
}

/// Headers sent with every page file.
pub fn headers() -> Vec<(&'static str, String)> {
    vec![
        (
            "Content-Security-Policy",
            CONTENT_SECURITY_POLICY.to_string(),
        ),
        ("X-Content-Type-Options", "nosniff".to_string()),
        ("Referrer-Policy", "no-referrer".to_string()),
        ("Cache-Control", "no-cache".to_string()),
    ]
}

/// Adds `description` and `problems` (format problems only) to a runbook list item. Reads the
/// file and nothing else: no validation side effect, no History entry.
pub fn add_summary(app: &App, file: &str, item: &mut Value) {
    let (description, problems) = match app.catalog.read(file) {
        Ok((_, content)) => (
            runbook_summary::description(&content),
            runbook_summary::format_problems(&runbook::parse(&content)),
        ),
        Err(e) => (String::new(), vec![format!("cannot read the file: {e}")]),
    };
    item["description"] = json!(description);
    item["problems"] = json!(problems);
}

/// `POST /api/runs/{id}/download-link[?stream=stdout|stderr]`: a URL valid for
/// `LINK_TTL_SECONDS` that downloads this run's log without a token.
pub fn mint_link(
    app: &App,
    principal: &Principal,
    id: &str,
    incoming: &Incoming,
) -> Result<Reply, ApiError> {
    let run = runs::visible_run(app, principal, id)?;
    let stream = runs::stream_param(incoming)?.map_or("", |s| s.name());
    let now = chrono::Utc::now().timestamp();
    let expires = now.saturating_add(LINK_TTL_SECONDS);
    let sig = download_link::sign(&app.secret, &run.id, expires, stream);
    let mut url = format!("/api/runs/{}/logs/download?exp={expires}&sig={sig}", run.id);
    if !stream.is_empty() {
        url.push_str(&format!("&stream={stream}"));
    }
    let expires_at = chrono::DateTime::from_timestamp(expires, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Ok(Reply::Json(
        json!({"success": true, "run_id": run.id, "url": url, "expires_at": expires_at}),
    ))
}

/// `GET /api/runs/{id}/logs/download?exp=..&sig=..[&stream=..]`: the download a signed link
/// grants, checked instead of a token.
pub fn signed_download(app: &App, id: &str, incoming: &Incoming) -> Result<Reply, ApiError> {
    let refused = |why: String| ApiError::Unauthorized(why);
    let expires = incoming
        .query_value("exp")
        .and_then(|e| e.parse::<i64>().ok())
        .ok_or_else(|| refused("this download link has no valid expiry".into()))?;
    let stream = runs::stream_param(incoming)?;
    let sig = incoming.query_value("sig").unwrap_or_default();
    let now = chrono::Utc::now().timestamp();
    download_link::verify(
        &app.secret,
        id,
        expires,
        stream.map_or("", |s| s.name()),
        sig,
        now,
    )
    .map_err(|e| refused(e.to_string()))?;
    if !record::is_valid_run_id(id) {
        return Err(ApiError::NotFound("run not found".into()));
    }
    let run = app
        .runs
        .get(id)
        .ok_or_else(|| ApiError::NotFound("run not found".into()))?;
    let log = run.log()?;
    Ok(Reply::RunDownload { run, log, stream })
}
