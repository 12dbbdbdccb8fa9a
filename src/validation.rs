//! The checks a runbook must pass before it runs (and what `PATCH .../validate` reports):
//! required sections, required environment variables (none that changes how an interpreter
//! starts), input files, a script block.
#![forbid(unsafe_code)]

use crate::catalog::Catalog;
use crate::params;
use crate::runbook::Runbook;

/// Sections every runbook must have.
pub const REQUIRED_SECTIONS: &[&str] = &[
    "Environment Requirements",
    "File System Requirements",
    "Script",
    "History",
];

/// What validation found.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Validates `runbook` (stored as `filename`) for a run with `request_vars` on top of the
/// server's environment (`server_var`).
pub fn validate(
    runbook: &Runbook,
    filename: &str,
    request_vars: &[(String, String)],
    server_var: &dyn Fn(&str) -> Option<String>,
    catalog: &Catalog,
) -> Findings {
    let mut f = Findings::default();
    for section in REQUIRED_SECTIONS {
        if !runbook.has_section(section) {
            f.errors
                .push(format!("missing required section: # {section}"));
        }
    }
    f.errors.extend(runbook.problems.iter().cloned());
    for req in &runbook.env_requirements {
        let from_request = request_vars
            .iter()
            .any(|(n, v)| n == &req.name && !v.is_empty());
        let from_server = server_var(&req.name).is_some_and(|v| !v.is_empty());
        if !from_request && !from_server {
            f.errors.push(format!(
                "missing required environment variable: {}",
                req.name
            ));
        }
    }
    f.errors.extend(params::declaration_errors(runbook));
    for input in &runbook.inputs {
        if catalog.resolve_input(input).is_none() {
            f.errors.push(format!(
                "input not found in the runbooks directory: {input}"
            ));
        }
    }
    if runbook
        .script
        .as_deref()
        .is_none_or(|s| s.trim().is_empty())
    {
        f.errors.push("no script block under # Script".to_string());
    }
    let stem = filename.strip_suffix(".md").unwrap_or(filename);
    match &runbook.name {
        Some(name) if name == stem => {}
        Some(name) => f.warnings.push(format!(
            "runbook name {name:?} does not match the file name {stem:?}"
        )),
        None => f
            .errors
            .push("the first line must be the runbook's name as an H1 (# Name)".to_string()),
    }
    f
}
