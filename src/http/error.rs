//! The one place where failures become HTTP statuses: every handler returns `ApiError`, the
//! domain errors become `ApiError` here (`From`), and `ApiError::status` / `ApiError::body`
//! decide what the client sees. A synchronous execute whose run failed is answered 500 with
//! its result object: `run_result_status` decides that too. Success statuses are `reply.rs`'s.
#![forbid(unsafe_code)]

use serde_json::json;

use super::connection::BodyError;
use super::head::HeadError;
use super::reply::HttpStatus;
use crate::catalog::CatalogError;
use crate::execute::ExecError;
use crate::run::AdmitError;
use crate::runlog::{LogError, Outcome};

/// A request that cannot be answered normally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed; allowed: {}", .0.join(", "))]
    MethodNotAllowed(&'static [&'static str]),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("request body larger than 1 MiB")]
    PayloadTooLarge,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    /// 409 naming the runs that hold the runbook's concurrency slots.
    #[error("{message}")]
    RunbookBusy {
        message: String,
        run_ids: Vec<String>,
    },
    #[error("{0}")]
    TooManyRequests(String),
    /// The runbook file cannot be used as it is (larger than `RUNBOOK_MAX_BYTES`).
    #[error("{0}")]
    Unprocessable(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A request body read got no byte for REQUEST_TIMEOUT_SECONDS.
    #[error("the request body stalled for REQUEST_TIMEOUT_SECONDS")]
    RequestTimeout,
    /// The request head could not be read; its status depends on why.
    #[error(transparent)]
    RequestHead(#[from] HeadError),
    /// `validate` found errors: the body carries the findings as a success would.
    #[error("validation failed: {}", errors.join("; "))]
    ValidationFailed {
        runbook: String,
        errors: Vec<String>,
        warnings: Vec<String>,
    },
}

impl ApiError {
    pub fn status(&self) -> HttpStatus {
        match self {
            ApiError::NotFound(_) => HttpStatus::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => HttpStatus::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(_) => HttpStatus::UNAUTHORIZED,
            ApiError::PayloadTooLarge => HttpStatus::PAYLOAD_TOO_LARGE,
            ApiError::BadRequest(_) | ApiError::ValidationFailed { .. } => HttpStatus::BAD_REQUEST,
            ApiError::Forbidden(_) => HttpStatus::FORBIDDEN,
            ApiError::Conflict(_) | ApiError::RunbookBusy { .. } => HttpStatus::CONFLICT,
            ApiError::TooManyRequests(_) => HttpStatus::TOO_MANY_REQUESTS,
            ApiError::Unprocessable(_) => HttpStatus::UNPROCESSABLE_CONTENT,
            ApiError::Unavailable(_) => HttpStatus::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => HttpStatus::INTERNAL_SERVER_ERROR,
            ApiError::RequestTimeout => HttpStatus::REQUEST_TIMEOUT,
            ApiError::RequestHead(e) => match e {
                HeadError::TooLarge => HttpStatus::REQUEST_HEADER_FIELDS_TOO_LARGE,
                HeadError::Malformed(_) => HttpStatus::BAD_REQUEST,
                HeadError::Version => HttpStatus::HTTP_VERSION_NOT_SUPPORTED,
                HeadError::TransferEncoding => HttpStatus::NOT_IMPLEMENTED,
                HeadError::TimedOut => HttpStatus::REQUEST_TIMEOUT,
            },
        }
    }

    /// Extra headers the status calls for.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            ApiError::MethodNotAllowed(allowed) => vec![("Allow", allowed.join(", "))],
            ApiError::Unauthorized(_) => vec![(
                "WWW-Authenticate",
                "Bearer error=\"invalid_token\"".to_string(),
            )],
            ApiError::Unavailable(_) | ApiError::TooManyRequests(_) => {
                vec![("Retry-After", "5".to_string())]
            }
            _ => Vec::new(),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        let mut body = json!({ "success": false, "error": self.to_string() });
        match self {
            ApiError::RunbookBusy { run_ids, .. } => body["run_ids"] = json!(run_ids),
            ApiError::ValidationFailed {
                runbook,
                errors,
                warnings,
            } => {
                body["runbook"] = json!(runbook);
                body["errors"] = json!(errors);
                body["warnings"] = json!(warnings);
            }
            _ => {}
        }
        body
    }
}

/// The status of a synchronous execute's answer, known once its run is over: 200 when the run
/// succeeded, else 500 (the body is the result object either way).
pub fn run_result_status(outcome: &Outcome) -> HttpStatus {
    if outcome.succeeded() {
        HttpStatus::OK
    } else {
        HttpStatus::INTERNAL_SERVER_ERROR
    }
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

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::TooLarge(_) => ApiError::PayloadTooLarge,
            BodyError::TimedOut => ApiError::RequestTimeout,
            BodyError::Truncated | BodyError::Unreadable(_) => ApiError::BadRequest(e.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_failure_keeps_its_findings_in_the_body() {
        let e = ApiError::ValidationFailed {
            runbook: "a.md".into(),
            errors: vec!["one".into(), "two".into()],
            warnings: vec!["w".into()],
        };
        assert_eq!(e.status(), HttpStatus::BAD_REQUEST);
        assert_eq!(
            e.body(),
            json!({
                "success": false,
                "runbook": "a.md",
                "errors": ["one", "two"],
                "warnings": ["w"],
                "error": "validation failed: one; two",
            })
        );
    }
}
