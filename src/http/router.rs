//! Maps a method and path to a route: 404 for an unknown path, 405 (with `Allow`) for a known
//! path with another method. The `{file}` segment is percent-decoded here.
#![forbid(unsafe_code)]

use super::error::ApiError;
use super::request::percent_decode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    WebPage,
    Health,
    DevLogin,
    Metrics,
    OpenApi,
    ListRunbooks,
    GetRunbook(String),
    RequiredEnv(String),
    Validate(String),
    Execute(String),
    Config,
    ListRuns,
    GetRun(String),
    CancelRun(String),
    RunEvents(String),
    RunLogs(String),
    RunDownload(String),
    /// The web page's script and style sheet.
    WebScript,
    WebStyle,
    /// `POST /api/runs/{id}/download-link`: a signed, short-lived download URL.
    RunDownloadLink(String),
}

impl Route {
    /// A fixed label for logs and metrics (never user data).
    pub fn label(&self) -> &'static str {
        match self {
            Route::WebPage => "/",
            Route::Health => "/healthz",
            Route::DevLogin => "/dev-login",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/docs/openapi.yaml",
            Route::ListRunbooks => "/api/runbooks",
            Route::GetRunbook(_) => "/api/runbooks/{file}",
            Route::RequiredEnv(_) => "/api/runbooks/{file}/required-env",
            Route::Validate(_) => "/api/runbooks/{file}/validate",
            Route::Execute(_) => "/api/runbooks/{file}/execute",
            Route::Config => "/api/config",
            Route::ListRuns => "/api/runs",
            Route::GetRun(_) => "/api/runs/{id}",
            Route::CancelRun(_) => "/api/runs/{id} (DELETE)",
            Route::RunEvents(_) => "/api/runs/{id}/events",
            Route::RunLogs(_) => "/api/runs/{id}/logs",
            Route::RunDownload(_) => "/api/runs/{id}/logs/download",
            Route::WebScript => "/app.js",
            Route::WebStyle => "/app.css",
            Route::RunDownloadLink(_) => "/api/runs/{id}/download-link",
        }
    }

    /// Routes a browser opens without headers may carry the token as `?access_token=`.
    pub fn accepts_query_token(&self) -> bool {
        matches!(self, Route::RunEvents(_) | Route::RunDownload(_))
    }

    /// What a run token (one minted for a run's script) may do: execute sub-runbooks and read
    /// runs (which ones is decided by run visibility). Anything else with it is 403.
    pub fn allows_run_token(&self) -> bool {
        matches!(
            self,
            Route::Execute(_)
                | Route::ListRuns
                | Route::GetRun(_)
                | Route::RunEvents(_)
                | Route::RunLogs(_)
                | Route::RunDownload(_)
                | Route::RunDownloadLink(_)
        )
    }

    /// Routes under /api need a token.
    pub fn needs_token(&self) -> bool {
        !matches!(
            self,
            Route::WebPage
                | Route::WebScript
                | Route::WebStyle
                | Route::Health
                | Route::DevLogin
                | Route::Metrics
                | Route::OpenApi
        )
    }
}

/// Finds the route; the error is the 404 or 405 to answer.
pub fn route(method: &str, path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let file = |raw: &str| percent_decode(raw).unwrap_or_else(|| raw.to_string());
    let (allowed, route): (&'static [&'static str], Route) = match segments.as_slice() {
        [""] => (&["GET"], Route::WebPage),
        ["app.js"] => (&["GET"], Route::WebScript),
        ["app.css"] => (&["GET"], Route::WebStyle),
        ["healthz"] => (&["GET"], Route::Health),
        ["dev-login"] => (&["POST"], Route::DevLogin),
        ["metrics"] => (&["GET"], Route::Metrics),
        ["docs", "openapi.yaml"] => (&["GET"], Route::OpenApi),
        ["api", "config"] => (&["GET"], Route::Config),
        ["api", "runbooks"] => (&["GET"], Route::ListRunbooks),
        ["api", "runbooks", f] if !f.is_empty() => (&["GET"], Route::GetRunbook(file(f))),
        ["api", "runbooks", f, "required-env"] => (&["GET"], Route::RequiredEnv(file(f))),
        ["api", "runbooks", f, "validate"] => (&["PATCH"], Route::Validate(file(f))),
        ["api", "runbooks", f, "execute"] => (&["POST"], Route::Execute(file(f))),
        ["api", "runs"] => (&["GET"], Route::ListRuns),
        ["api", "runs", id] if !id.is_empty() => {
            let id = file(id);
            if method == "DELETE" {
                return Ok(Route::CancelRun(id));
            }
            (&["GET", "DELETE"], Route::GetRun(id))
        }
        ["api", "runs", id, "events"] => (&["GET"], Route::RunEvents(file(id))),
        ["api", "runs", id, "logs"] => (&["GET"], Route::RunLogs(file(id))),
        ["api", "runs", id, "logs", "download"] => (&["GET"], Route::RunDownload(file(id))),
        ["api", "runs", id, "download-link"] => (&["POST"], Route::RunDownloadLink(file(id))),
        _ => return Err(ApiError::NotFound("not found: no such route".into())),
    };
    let method_ok = allowed.contains(&method) || (method == "HEAD" && allowed.contains(&"GET"));
    if method_ok {
        Ok(route)
    } else {
        Err(ApiError::MethodNotAllowed(allowed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert_eq!(route("GET", "/healthz").unwrap(), Route::Health);
        assert_eq!(
            route("POST", "/api/runbooks/A%20B.md/execute").unwrap(),
            Route::Execute("A B.md".into())
        );
        assert_eq!(
            route("GET", "/api/runbooks/..%2Fx.md").unwrap(),
            Route::GetRunbook("../x.md".into())
        );
        assert!(matches!(route("GET", "/nope"), Err(ApiError::NotFound(_))));
        assert!(matches!(
            route("GET", "/api/runbooks/a.md/execute"),
            Err(ApiError::MethodNotAllowed(["POST"]))
        ));
        assert!(matches!(
            route("GET", "/api/runbooks/a/b/c"),
            Err(ApiError::NotFound(_))
        ));
        assert_eq!(
            route("DELETE", "/api/runs/x").unwrap(),
            Route::CancelRun("x".into())
        );
        assert_eq!(
            route("GET", "/api/runs/x").unwrap(),
            Route::GetRun("x".into())
        );
        assert!(matches!(
            route("POST", "/api/runs/x"),
            Err(ApiError::MethodNotAllowed(["GET", "DELETE"]))
        ));
    }

    #[test]
    fn run_tokens_may_only_execute_and_read_runs() {
        let allowed = [
            ("POST", "/api/runbooks/a.md/execute"),
            ("GET", "/api/runs"),
            ("GET", "/api/runs/x"),
            ("HEAD", "/api/runs/x/events"),
            ("GET", "/api/runs/x/logs"),
            ("GET", "/api/runs/x/logs/download"),
        ];
        for (method, path) in allowed {
            assert!(route(method, path).unwrap().allows_run_token(), "{path}");
        }
        let refused = [
            ("GET", "/"),
            ("POST", "/dev-login"),
            ("GET", "/api/config"),
            ("GET", "/api/runbooks"),
            ("GET", "/api/runbooks/a.md"),
            ("GET", "/api/runbooks/a.md/required-env"),
            ("PATCH", "/api/runbooks/a.md/validate"),
            ("DELETE", "/api/runs/x"),
        ];
        for (method, path) in refused {
            assert!(!route(method, path).unwrap().allows_run_token(), "{path}");
        }
    }
}
