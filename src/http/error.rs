//! The one place where failures become HTTP statuses: every handler returns `ApiError`, and
//! `ApiError::status` / `ApiError::body` decide what the client sees.
#![forbid(unsafe_code)]

use std::fmt;

use serde_json::json;

/// A request that cannot be answered normally.
#[derive(Debug)]
#[non_exhaustive]
pub enum ApiError {
    NotFound(String),
    MethodNotAllowed(&'static [&'static str]),
    Unauthorized(String),
    PayloadTooLarge,
    BadRequest(String),
    Forbidden(String),
    Conflict(String),
    /// 409 naming the runs that hold the runbook's concurrency slots.
    RunbookBusy {
        message: String,
        run_ids: Vec<String>,
    },
    TooManyRequests(String),
    /// The runbook file cannot be used as it is (larger than `RUNBOOK_MAX_BYTES`).
    Unprocessable(String),
    Unavailable(String),
    Internal(String),
    /// A request body read got no byte for REQUEST_TIMEOUT_SECONDS.
    RequestTimeout,
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::Unauthorized(_) => 401,
            ApiError::PayloadTooLarge => 413,
            ApiError::BadRequest(_) => 400,
            ApiError::Forbidden(_) => 403,
            ApiError::Conflict(_) | ApiError::RunbookBusy { .. } => 409,
            ApiError::TooManyRequests(_) => 429,
            ApiError::Unprocessable(_) => 422,
            ApiError::Unavailable(_) => 503,
            ApiError::Internal(_) => 500,
            ApiError::RequestTimeout => 408,
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
        if let ApiError::RunbookBusy { run_ids, .. } = self {
            body["run_ids"] = json!(run_ids);
        }
        body
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::NotFound(what) => write!(f, "{what}"),
            ApiError::MethodNotAllowed(allowed) => {
                write!(f, "method not allowed; allowed: {}", allowed.join(", "))
            }
            ApiError::Unauthorized(why) => write!(f, "unauthorized: {why}"),
            ApiError::PayloadTooLarge => write!(f, "request body larger than 1 MiB"),
            ApiError::BadRequest(why) => write!(f, "bad request: {why}"),
            ApiError::Forbidden(why) => write!(f, "forbidden: {why}"),
            ApiError::Conflict(why) => write!(f, "{why}"),
            ApiError::RunbookBusy { message, .. } => write!(f, "{message}"),
            ApiError::TooManyRequests(why) => write!(f, "{why}"),
            ApiError::Unprocessable(why) => write!(f, "{why}"),
            ApiError::Unavailable(why) => write!(f, "service unavailable: {why}"),
            ApiError::Internal(why) => write!(f, "internal error: {why}"),
            ApiError::RequestTimeout => {
                write!(f, "the request body stalled for REQUEST_TIMEOUT_SECONDS")
            }
        }
    }
}

impl std::error::Error for ApiError {}
