//! A run's record: the JSON file beside its log in `STATE_DIR/runs/`, written when the run
//! starts and when it ends (atomically, by rename), and what `GET /api/runs` lists.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Cancelling,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    /// The server stopped or died while the run was going.
    Interrupted,
}

impl RunStatus {
    pub fn is_finished(self) -> bool {
        !matches!(self, RunStatus::Running | RunStatus::Cancelling)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Cancelling => "cancelling",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        serde_json::from_value(serde_json::Value::String(text.to_string())).ok()
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is stored about a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub runbook: String,
    pub status: RunStatus,
    pub user: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub duration_ms: Option<u64>,
    pub return_code: Option<i32>,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Some stream passed MAX_OUTPUT_SIZE_BYTES, or the log passed RUN_LOG_MAX_BYTES.
    pub truncated: bool,
    /// The log passed RUN_LOG_MAX_BYTES: later output was counted, not stored.
    #[serde(default)]
    pub log_capped: bool,
    /// Process group of the script while it runs, and the start time of its leader in clock
    /// ticks since boot, to recognise it after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgid_start_ticks: Option<u64>,
    /// The boot the start time belongs to (`/proc/sys/kernel/random/boot_id`): after a
    /// reboot the recorded ids name nothing of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The run's own cgroup (`<RUN_CGROUP>/runbookd-<run id>`) while it runs, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Whether the script was started (false: the run failed before, e.g. validation); None
    /// in records written before this was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_started: Option<bool>,
}

impl RunRecord {
    /// The fields the API shows.
    pub fn to_api(&self) -> serde_json::Value {
        let mut api = serde_json::json!({
            "run_id": self.run_id,
            "runbook": self.runbook,
            "status": self.status,
            "user": self.user,
            "started_at": self.started_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "finished_at": self.finished_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            "duration_ms": self.duration_ms,
            "return_code": self.return_code,
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
            "truncated": self.truncated,
        });
        // Why the run failed on the server's side (timeout, cancel, shutdown, internal error).
        if let Some(error) = &self.error {
            api["error"] = serde_json::json!(error);
        }
        api["errors"] = serde_json::json!(self.errors);
        api["warnings"] = serde_json::json!(self.warnings);
        api["script_started"] =
            serde_json::json!(self.script_started.unwrap_or(self.errors.is_empty()));
        api
    }
}

/// File paths of a run in the runs directory.
pub fn record_path(runs_dir: &Path, run_id: &str) -> PathBuf {
    runs_dir.join(format!("{run_id}.json"))
}

pub fn log_path(runs_dir: &Path, run_id: &str) -> PathBuf {
    runs_dir.join(format!("{run_id}.log"))
}

/// Writes the record atomically (temp file + rename).
pub fn save(runs_dir: &Path, record: &RunRecord) -> io::Result<()> {
    let path = record_path(runs_dir, &record.run_id);
    let tmp = runs_dir.join(format!(".{}.json.tmp", record.run_id));
    let text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    let Err(e) = fs::write(&tmp, &text).and_then(|()| fs::rename(&tmp, &path)) else {
        return Ok(());
    };
    let _ = fs::remove_file(&tmp);
    // A full disk may still take the new version in the old one's place (a run that ends
    // because its log could not be written still gets its final record).
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) && path.is_file() {
        return overwrite(&path, &text).map_err(|_| e);
    }
    Err(e)
}

/// Writes `text` over the file at `path` without allocating a new file.
fn overwrite(path: &Path, text: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut file = fs::File::options().write(true).open(path)?;
    file.write_all(text)?;
    file.set_len(text.len() as u64)?;
    file.sync_data()
}

/// Every readable record in the runs directory; unreadable ones are logged and skipped.
pub fn load_all(runs_dir: &Path) -> io::Result<Vec<RunRecord>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(runs_dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        match fs::read(&path).map(|b| serde_json::from_slice::<RunRecord>(&b)) {
            Ok(Ok(record)) => out.push(record),
            Ok(Err(e)) => log::warn!("skipping unreadable run record {}: {e}", path.display()),
            Err(e) => log::warn!("skipping unreadable run record {}: {e}", path.display()),
        }
    }
    Ok(out)
}

/// Removes a run's files.
pub fn remove(runs_dir: &Path, run_id: &str) {
    for path in [log_path(runs_dir, run_id), record_path(runs_dir, run_id)] {
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// Whether `id` has the shape of a run id (`<instance>-<uuid>`), so it is safe in a path.
pub fn is_valid_run_id(id: &str) -> bool {
    let Some((instance, uuid)) = id.split_once('-') else {
        return false;
    };
    !instance.is_empty()
        && instance
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        && uuid::Uuid::parse_str(uuid).is_ok()
        && uuid.len() == 36
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_shape() {
        assert!(is_valid_run_id("r1-6748da90-c3f7-497f-b29a-eabb74191959"));
        assert!(!is_valid_run_id("r1-../../etc/passwd"));
        assert!(!is_valid_run_id("6748da90-c3f7-497f-b29a-eabb74191959"));
        assert!(!is_valid_run_id("r1-6748da90c3f7497fb29aeabb74191959"));
        assert!(!is_valid_run_id(""));
    }

    #[test]
    fn status_names() {
        assert_eq!(RunStatus::parse("timed_out"), Some(RunStatus::TimedOut));
        assert_eq!(RunStatus::parse("nope"), None);
        assert_eq!(
            serde_json::to_string(&RunStatus::Interrupted).unwrap(),
            "\"interrupted\""
        );
    }
}
