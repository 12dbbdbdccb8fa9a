//! A run's record: the JSON file beside its log in `STATE_DIR/runs/`, written when the run
//! starts and when it ends (atomically, by rename), and what `GET /api/runs` lists.
#![forbid(unsafe_code)]

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
    /// Why the run's History entry could not be written (the run itself concluded normally).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_error: Option<String>,
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
        if let Some(error) = &self.history_error {
            api["history_error"] = serde_json::json!(error);
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

/// Writes a new run's first record like [`save`], through `spare` (an empty file of the runs
/// directory that is the caller's, see `spare_files`) instead of a new temporary file, when
/// one is given.
pub fn save_new(runs_dir: &Path, record: &RunRecord, spare: Option<PathBuf>) -> io::Result<()> {
    let through = spare.unwrap_or_else(|| temp_path(runs_dir, &record.run_id));
    save_through(runs_dir, record, &through)
}

/// Writes the record atomically (temp file + rename).
pub fn save(runs_dir: &Path, record: &RunRecord) -> io::Result<()> {
    save_through(runs_dir, record, &temp_path(runs_dir, &record.run_id))
}

fn temp_path(runs_dir: &Path, run_id: &str) -> PathBuf {
    runs_dir.join(format!(".{run_id}.json.tmp"))
}

/// Writes the record into `tmp` and renames it over the record file.
fn save_through(runs_dir: &Path, record: &RunRecord, tmp: &Path) -> io::Result<()> {
    let path = record_path(runs_dir, &record.run_id);
    let text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    let Err(e) = write_whole(tmp, &text).and_then(|()| fs::rename(tmp, &path)) else {
        return Ok(());
    };
    let _ = fs::remove_file(tmp);
    // A full disk may still take the new version in the old one's place (a run that ends
    // because its log could not be written still gets its final record).
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) && path.is_file() {
        return overwrite(&path, &text).map_err(|_| e);
    }
    Err(e)
}

/// Makes the file at `path` hold `text`, creating it if needed.
fn write_whole(path: &Path, text: &[u8]) -> io::Result<()> {
    write_over(path, text, true)
}

/// Makes the file at `path` (created when `create` and missing) hold `text`, in the same inode.
/// Not opened with `O_TRUNC`: truncating a file to nothing makes ext4 start writing it back
/// when it is closed (its `auto_da_alloc`, tens of microseconds on a run's path); a file that
/// was longer is cut to length after the write instead, and one that was not (a new or spare
/// file) is not cut at all.
pub(crate) fn write_over(path: &Path, text: &[u8], create: bool) -> io::Result<()> {
    use std::io::Write;
    let mut file = fs::File::options()
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)?;
    let old_len = file.metadata()?.len();
    file.write_all(text)?;
    let new_len = text.len() as u64;
    if old_len > new_len {
        file.set_len(new_len)?;
    }
    Ok(())
}

/// The largest record [`update`] rewrites in place: one page, which a single `write` to a
/// file changes whole or not at all even when the process is killed during the call.
const IN_PLACE_MAX: usize = 4096;

/// Writes a newer version of a record that [`save`] wrote before, in place: one write at
/// offset 0 of the existing file, padded with spaces to at least its current length (JSON
/// allows trailing whitespace), so the file holds the old or the new record whole at any
/// moment, and no file is created (creating and deleting inodes is the costliest part of a
/// run's bookkeeping on some file systems). Records longer than a page, or files that are
/// missing, go through `save`.
pub fn update(runs_dir: &Path, record: &RunRecord) -> io::Result<()> {
    use std::io::Write;
    let path = record_path(runs_dir, &record.run_id);
    let mut text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    let in_place = fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|mut file| {
            let old_len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
            if text.len().max(old_len) > IN_PLACE_MAX {
                return Err(io::Error::other("too long to rewrite in place"));
            }
            if text.len() < old_len {
                text.resize(old_len, b' ');
            }
            let written = file.write(&text)?;
            if written == text.len() {
                Ok(())
            } else {
                Err(io::Error::other("short write"))
            }
        });
    match in_place {
        Ok(()) => Ok(()),
        Err(_) => save(runs_dir, record),
    }
}

/// Writes `text` over the file at `path` without allocating a new file.
fn overwrite(path: &Path, text: &[u8]) -> io::Result<()> {
    write_over(path, text, false)
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

    fn sample(run_id: &str) -> RunRecord {
        RunRecord {
            run_id: run_id.into(),
            runbook: "A.md".into(),
            status: RunStatus::Running,
            user: "u".into(),
            started_at: chrono::Utc::now(),
            finished_at: None,
            duration_ms: None,
            return_code: None,
            stdout_bytes: 0,
            stderr_bytes: 0,
            truncated: false,
            log_capped: false,
            pgid: Some(42),
            pgid_start_ticks: Some(7),
            boot_id: Some("a-boot-id-that-makes-the-first-version-long".into()),
            cgroup: None,
            error: None,
            history_error: None,
            script_started: Some(true),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn update_rewrites_in_place_and_reads_back_whatever_the_length() {
        let tmp = crate::test_dirs::TempDir::new("record-update");
        let dir = tmp.path().to_path_buf();
        let id = "r1-6748da90-c3f7-497f-b29a-eabb74191959";
        let mut record = sample(id);
        save(&dir, &record).unwrap();
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let before = inode(&record_path(&dir, id));
        // Shorter than the first version: padded, still one readable record.
        record.boot_id = None;
        record.pgid = None;
        update(&dir, &record).unwrap();
        assert_eq!(inode(&record_path(&dir, id)), before, "a new file was made");
        let loaded = load_all(&dir).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].pgid, None);
        assert_eq!(loaded[0].boot_id, None);
        // Longer than a page: through a new file, still readable.
        record.warnings = vec!["w".repeat(5000)];
        record.status = RunStatus::Succeeded;
        update(&dir, &record).unwrap();
        let loaded = load_all(&dir).unwrap();
        assert_eq!(loaded[0].status, RunStatus::Succeeded);
        assert_eq!(loaded[0].warnings[0].len(), 5000);
        // A missing file is written anew.
        fs::remove_file(record_path(&dir, id)).unwrap();
        update(&dir, &record).unwrap();
        assert_eq!(load_all(&dir).unwrap().len(), 1);
    }

    #[test]
    fn a_file_written_over_holds_the_new_text_in_the_same_inode() {
        use std::os::unix::fs::MetadataExt;
        let dir = crate::test_dirs::TempDir::new("record-write-over");
        let path = dir.path().join("f");
        write_over(&path, b"0123456789", true).unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        write_over(&path, b"abc", false).unwrap();
        assert_eq!(
            fs::read(&path).unwrap(),
            b"abc",
            "a longer file is cut to length"
        );
        write_over(&path, b"abcdefgh", false).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"abcdefgh");
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
        let missing = dir.path().join("missing");
        assert!(write_over(&missing, b"x", false).is_err());
        assert!(!missing.exists(), "not created unless asked");
    }

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
