//! Who may run a runbook: its Required Claims against the caller (RBAC), and for an execute
//! the refusal's entry in the runbook's History.
#![forbid(unsafe_code)]

use std::path::Path;

use crate::app::App;
use crate::auth::{self, Principal};
use crate::history::{self, HistoryEntry, StreamExcerpt};
use crate::runbook::Runbook;

use super::ExecError;

/// Checks the caller against the runbook's Required Claims for an execute; a refusal is
/// written to history (only here: validating writes nothing, see [`check_claims`]).
pub fn authorize(
    app: &App,
    path: &Path,
    book: &Runbook,
    principal: &Principal,
) -> Result<(), ExecError> {
    if let Err(ExecError::Forbidden(reason)) = check_claims(book, principal) {
        let empty = StreamExcerpt::default();
        let stderr = StreamExcerpt {
            head: reason.clone(),
            ..StreamExcerpt::default()
        };
        let entry = history::format_entry(&HistoryEntry {
            finished_at: chrono::Utc::now(),
            exit_code: history::REFUSED_EXIT_CODE,
            run_id: None,
            stdout: &empty,
            stderr: &stderr,
        });
        if let Err(e) = history::append(
            path,
            &entry,
            app.config.history_max_entries,
            app.config.runbook_max_bytes,
        ) {
            log::error!("cannot write history: {e}");
        }
        return Err(ExecError::Forbidden(reason));
    }
    Ok(())
}

/// Checks the caller against the runbook's Required Claims (RBAC); writes nothing.
pub fn check_claims(book: &Runbook, principal: &Principal) -> Result<(), ExecError> {
    let required: Vec<(String, Vec<String>)> = book
        .required_claims
        .iter()
        .map(|c| (c.claim.clone(), c.values.clone()))
        .collect();
    let verdict = if book.required_claims_malformed {
        Err(
            "RBAC: the runbook's Required Claims block cannot be read; nobody may run it"
                .to_string(),
        )
    } else {
        auth::check_required_claims(principal, &required)
    };
    verdict.map_err(ExecError::Forbidden)
}
