//! The `# History` section of a runbook: formats execution entries and appends them to the
//! runbook file under an exclusive lock, dropping the oldest entries beyond a maximum (refusals
//! first), and reduces the entries to their heading lines for readers who may not see output.
//! runbook file under the exclusive sidecar lock, dropping the oldest entries beyond a maximum
//! count and size. The runbook is handled as a file a script may have replaced.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::markdown;
use crate::runbook_file::{self, FileError};

/// What a history entry keeps of one output stream: the start, and the end when the stream was
/// too long to keep whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamExcerpt {
    pub head: String,
    /// Empty, with `omitted_bytes` 0, when the whole stream fits in `head`.
    pub tail: String,
    pub omitted_bytes: u64,
}

impl StreamExcerpt {
    fn is_empty(&self) -> bool {
        self.head.is_empty() && self.tail.is_empty() && self.omitted_bytes == 0
    }
}

/// One finished execution, as recorded in the history.
#[derive(Debug, Clone, Copy)]
pub struct HistoryEntry<'a> {
    pub finished_at: DateTime<Utc>,
    pub exit_code: i32,
    pub run_id: Option<&'a str>,
    pub stdout: &'a StreamExcerpt,
    pub stderr: &'a StreamExcerpt,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    #[error("cannot update the runbook history: {0}")]
    Io(#[from] io::Error),
    /// The runbook file cannot be used: gone, a symlink, a FIFO, too large, ...
    #[error("cannot update the runbook history: {0}")]
    File(#[source] FileError),
    /// A code block opened on this line is never closed: an entry appended after it would
    /// become part of the block (maybe the script), so nothing is appended.
    #[error("cannot update the runbook history: the code block opened on line {line} is never closed, and an entry after it would change the runbook's code")]
    UnclosedBlock { line: usize },
    /// The runbook alone, without History entries, is larger than the limit.
    #[error("cannot update the runbook history: the runbook would be larger than RUNBOOK_MAX_BYTES ({max} bytes) even without History entries")]
    TooLarge { max: u64 },
    /// The file was replaced while the entry was being written; the replacement is left alone.
    #[error("cannot update the runbook history: the runbook file was replaced while the entry was being written")]
    Replaced,
}

impl From<FileError> for HistoryError {
    fn from(error: FileError) -> HistoryError {
        match error {
            FileError::Io(error) => HistoryError::Io(error),
            other => HistoryError::File(other),
        }
    }
}

/// The exit code of the entry written for a refused execute (RBAC); such an entry has no run id.
pub const REFUSED_EXIT_CODE: i32 = 403;

const FENCE: &str = "```";
const ESCAPED_FENCE: &str = "\\`\\`\\`";
const HISTORY_HEADING: &[u8] = b"\n# History\n";
const ENTRY_PREFIX: &[u8] = b"### ";

/// Formats an entry:
/// `\n### <time> | Exit Code: N | Run: <id>\n\n**Stdout:**\n```\n…\n```\n\n**Stderr:**\n```\n…\n```\n`.
/// The run part is left out without a run id, and an empty stream's block is left out.
pub fn format_entry(e: &HistoryEntry) -> String {
    let run_id = e.run_id.map(without_control_characters);
    let mut text = format!(
        "\n### {} | Exit Code: {}",
        e.finished_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        e.exit_code
    );
    if let Some(run_id) = &run_id {
        text.push_str(" | Run: ");
        text.push_str(run_id);
    }
    text.push('\n');
    push_stream(&mut text, "Stdout", e.stdout, run_id.as_deref());
    push_stream(&mut text, "Stderr", e.stderr, run_id.as_deref());
    text
}

fn without_control_characters(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).collect()
}

/// Output must not be able to close the block it is shown in.
fn escape_fences(text: &str) -> String {
    text.replace(FENCE, ESCAPED_FENCE)
}

fn push_stream(out: &mut String, label: &str, excerpt: &StreamExcerpt, run_id: Option<&str>) {
    if excerpt.is_empty() {
        return;
    }
    let mut body = escape_fences(&excerpt.head);
    if excerpt.omitted_bytes > 0 {
        // Writing into a String cannot fail.
        let _ = write!(
            body,
            "\n… {} bytes omitted; full log: run {} …\n",
            excerpt.omitted_bytes,
            run_id.unwrap_or("-")
        );
    }
    body.push_str(&escape_fences(&excerpt.tail));
    out.push_str("\n**");
    out.push_str(label);
    out.push_str(":**\n");
    out.push_str(FENCE);
    out.push('\n');
    out.push_str(&body);
    if !body.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(FENCE);
    out.push('\n');
}

/// Appends `entry` (see [`format_entry`]) to the `# History` section of the runbook at
/// `runbook_path`, creating the section at the end if it is missing, and drops the oldest
/// entries so that at most `max_entries` remain and the file stays within `max_bytes`. The
/// whole update happens under the exclusive sidecar lock (see [`runbook_file::lock`]), so
/// concurrent appends each leave one intact entry and readers never see half of one.
///
/// The runbook is opened without following a symlink and without blocking, and must be a
/// regular file of at most `max_bytes` whose code blocks are all closed: History never changes
/// the executable part of a file. An entry that goes at the end of the file and drops nothing is
/// appended in place; any other change is written to a temporary file in the same directory,
/// with the runbook's mode, and renamed over it. Returns the runbook's text as it now is.
pub fn append(
    runbook_path: &Path,
    entry: &str,
    max_entries: usize,
    max_bytes: u64,
) -> Result<Vec<u8>, HistoryError> {
    let _lock = runbook_file::lock(runbook_path, true, runbook_file::LOCK_WAIT)?;
    let (mut file, opened) = runbook_file::open(runbook_path, true, max_bytes)?;
    let content = runbook_file::read_bounded(&file, &opened, max_bytes)?;

    let layout = Layout::of(&content);
    if let Some(line) = layout.open_fence_line {
        return Err(HistoryError::UnclosedBlock { line });
    }
    let mut addition = Vec::new();
    let insert_at = match &layout.history {
        Some(history) if history.end < content.len() => history.end,
        _ => {
            if !content.is_empty() && !content.ends_with(b"\n") {
                addition.push(b'\n');
            }
            if layout.history.is_none() {
                addition.extend_from_slice(HISTORY_HEADING);
            }
            content.len()
        }
    };
    addition.extend_from_slice(entry.as_bytes());
    if insert_at < content.len() && !addition.ends_with(b"\n") {
        addition.push(b'\n');
    }

    let mut updated = Vec::with_capacity(content.len() + addition.len());
    updated.extend_from_slice(&content[..insert_at]);
    updated.extend_from_slice(&addition);
    updated.extend_from_slice(&content[insert_at..]);

    // An entry is one heading line and fenced output (see `format_entry`): it adds one entry
    // to those already there, so a History with room is not parsed again to count them.
    let entries_before = layout
        .history
        .as_ref()
        .map_or(0, |history| history.entry_starts.len());
    let trimmed =
        entries_before.saturating_add(1) > max_entries && trim_entries(&mut updated, max_entries);
    let trimmed = trim_to_size(&mut updated, max_bytes)? || trimmed;

    if !runbook_file::still_at(&opened, runbook_path)? {
        return Err(HistoryError::Replaced);
    }
    if trimmed || insert_at < content.len() {
        replace(runbook_path, &file, &updated)?;
    } else {
        // The descriptor is in append mode: the entry lands at the end whatever the offset.
        file.write_all(&addition)?;
    }
    Ok(updated)
}

/// Each History entry of `content` as a byte range (its `### ` line up to the next entry or the
/// end of the section), oldest first; empty without a History section.
fn entry_spans(content: &[u8]) -> Vec<(usize, usize)> {
    let Some(history) = Layout::of(content).history else {
        return Vec::new();
    };
    let starts = &history.entry_starts;
    starts
        .iter()
        .enumerate()
        .map(|(i, &start)| (start, starts.get(i + 1).copied().unwrap_or(history.end)))
        .collect()
}

/// The first line of `span`, with its line ending.
fn first_line(span: &[u8]) -> &[u8] {
    let end = span
        .iter()
        .position(|&b| b == b'\n')
        .map_or(span.len(), |at| at + 1);
    &span[..end]
}

/// Whether an entry heading (`### <time> | Exit Code: 403`, no run part) records a refused
/// execute rather than a run.
fn is_refusal_heading(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(ENTRY_PREFIX) else {
        return false;
    };
    let text = String::from_utf8_lossy(rest);
    let parts: Vec<&str> = text.trim_end().split(" | ").collect();
    let refused = format!("Exit Code: {REFUSED_EXIT_CODE}");
    parts.len() == 2 && parts[1].trim() == refused
}

/// The size a full History is trimmed down to: a tenth below its maximum, so that the next
/// appends (about a tenth of the maximum) go in place instead of each rewriting the whole file.
fn low_water(max: usize) -> usize {
    max - max / 10
}

/// Drops entries from the History section of `content` once more than `max_entries` are there,
/// down to [`low_water`] of it: refusals first (oldest first), then the oldest of the others, so
/// that refused requests can never push a run's entry out. Returns whether anything was dropped.
fn trim_entries(content: &mut Vec<u8>, max_entries: usize) -> bool {
    let headed = entry_spans(content);
    if headed.len() <= max_entries {
        return false;
    }
    let max_entries = low_water(max_entries);
    // An entry owns the blank line before its heading (entries are written starting with one),
    // so dropping the newest one leaves no stray blank line behind.
    let owned_start = |start: usize| {
        if start >= 2 && content[start - 1] == b'\n' && content[start - 2] == b'\n' {
            start - 1
        } else {
            start
        }
    };
    let starts: Vec<usize> = headed
        .iter()
        .map(|&(start, _)| owned_start(start))
        .collect();
    let spans: Vec<(usize, usize)> = headed
        .iter()
        .enumerate()
        .map(|(i, &(_, end))| (starts[i], starts.get(i + 1).copied().unwrap_or(end)))
        .collect();
    let mut excess = spans.len() - max_entries;
    let mut dropped = vec![false; spans.len()];
    for (i, &(start, end)) in spans.iter().enumerate() {
        if excess == 0 {
            break;
        }
        if is_refusal_heading(first_line(content[start..end].trim_ascii_start())) {
            dropped[i] = true;
            excess -= 1;
        }
    }
    for flag in dropped.iter_mut().filter(|flag| !**flag) {
        if excess == 0 {
            break;
        }
        *flag = true;
        excess -= 1;
    }
    let mut kept = Vec::with_capacity(content.len());
    let mut from = 0;
    for (&(start, end), _) in spans.iter().zip(&dropped).filter(|(_, d)| **d) {
        kept.extend_from_slice(&content[from..start]);
        from = end;
    }
    kept.extend_from_slice(&content[from..]);
    *content = kept;
    true
}

/// `content` with each History entry reduced to its heading line (time, exit code, run id): no
/// output and no refusal reason. Everything outside the entries is kept as it is.
pub fn headings_only(content: &str) -> String {
    let bytes = content.as_bytes();
    let spans = entry_spans(bytes);
    let mut out = Vec::with_capacity(bytes.len().min(64 * 1024));
    let mut from = 0;
    for (start, end) in spans {
        out.extend_from_slice(&bytes[from..start]);
        let heading = first_line(&bytes[start..end]);
        out.extend_from_slice(heading);
        if !heading.ends_with(b"\n") {
            out.push(b'\n');
        }
        if heading.len() < end - start {
            out.push(b'\n');
        }
        from = end;
    }
    out.extend_from_slice(&bytes[from..]);
    String::from_utf8_lossy(&out).into_owned()
}

/// Once `updated` is larger than `max_bytes`, drops the oldest History entries, never the
/// newest, until it fits in [`low_water`] of `max_bytes` (or, where the newest entry alone is
/// too large for that, in `max_bytes`); whether it dropped any.
fn trim_to_size(updated: &mut Vec<u8>, max_bytes: u64) -> Result<bool, HistoryError> {
    let len = updated.len() as u64;
    if len <= max_bytes {
        return Ok(false);
    }
    let Some(history) = Layout::of(updated).history else {
        return Err(HistoryError::TooLarge { max: max_bytes });
    };
    let Some(&first) = history.entry_starts.first() else {
        return Err(HistoryError::TooLarge { max: max_bytes });
    };
    let low = u64::try_from(low_water(usize::try_from(max_bytes).unwrap_or(usize::MAX)))
        .unwrap_or(max_bytes);
    // The newest entry (the last) is never dropped to make room: without it, nothing is written.
    for target in [low, max_bytes] {
        for &kept_from in history.entry_starts.iter().skip(1) {
            if len - (kept_from - first) as u64 <= target {
                updated.drain(first..kept_from);
                return Ok(true);
            }
        }
    }
    Err(HistoryError::TooLarge { max: max_bytes })
}

/// Writes `content` to a new file beside `path` with the mode (and, where permitted, the owner)
/// of `original`, and renames it over `path`: readers see the old file or the new one.
fn replace(path: &Path, original: &fs::File, content: &[u8]) -> Result<(), HistoryError> {
    let metadata = original.metadata()?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp_path = path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4()));
    let written = (|| -> io::Result<()> {
        let mut temp = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp_path)?;
        temp.write_all(content)?;
        temp.set_permissions(fs::Permissions::from_mode(metadata.mode() & 0o7777))?;
        // Only a privileged server may give the file back to its owner; otherwise it is ours.
        let _ = std::os::unix::fs::fchown(&temp, Some(metadata.uid()), Some(metadata.gid()));
        temp.sync_all()?;
        fs::rename(&temp_path, path)
    })();
    if let Err(error) = written {
        let _ = fs::remove_file(&temp_path);
        return Err(HistoryError::Io(error));
    }
    Ok(())
}

/// Where the History section and its entries are in a runbook file.
struct HistorySection {
    /// Byte offset where the section ends: the start of the next H1 line, or the end of the file.
    end: usize,
    /// Byte offsets of the entries' `### ` lines, oldest first.
    entry_starts: Vec<usize>,
}

struct Layout {
    /// The first `# History` section (the first line, being the runbook's name, never counts).
    history: Option<HistorySection>,
    /// The 1-based line of a code block still open at the end of the file, if any.
    open_fence_line: Option<usize>,
}

impl Layout {
    fn of(content: &[u8]) -> Layout {
        let outline = markdown::Outline::of(content);
        let history = outline
            .sections
            .iter()
            .find(|section| section.title.trim_ascii().eq_ignore_ascii_case(b"history"))
            .map(|section| HistorySection {
                end: section.end,
                entry_starts: section
                    .prose
                    .iter()
                    .filter(|line| line.text.starts_with(ENTRY_PREFIX))
                    .map(|line| line.start)
                    .collect(),
            });
        Layout {
            history,
            open_fence_line: outline.unclosed_fence_line,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::{mkfifo, TempDir};
    use chrono::TimeZone;
    use std::fs;
    use std::path::PathBuf;

    const MAX: u64 = 16 * 1024 * 1024;

    /// A runbook file in a directory that is removed when dropped.
    struct TempFile(TempDir);

    impl TempFile {
        fn with(content: &str) -> TempFile {
            let dir = TempDir::new("history");
            dir.write("runbook.md", content.as_bytes());
            TempFile(dir)
        }

        fn path(&self) -> PathBuf {
            self.0.path().join("runbook.md")
        }

        fn content(&self) -> String {
            fs::read_to_string(self.path()).unwrap()
        }
    }

    fn whole(text: &str) -> StreamExcerpt {
        StreamExcerpt {
            head: text.to_string(),
            ..StreamExcerpt::default()
        }
    }

    fn time() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 7, 15, 1).unwrap() + chrono::Duration::milliseconds(123)
    }

    fn entry_text(run_id: Option<&str>, stdout: &str, stderr: &str) -> String {
        format_entry(&HistoryEntry {
            finished_at: time(),
            exit_code: 0,
            run_id,
            stdout: &whole(stdout),
            stderr: &whole(stderr),
        })
    }

    #[test]
    fn formats_an_entry_with_run_id() {
        let stdout = whole("hello\nworld\n");
        let stderr = whole("warning");
        let text = format_entry(&HistoryEntry {
            finished_at: time(),
            exit_code: 3,
            run_id: Some("r1-abc"),
            stdout: &stdout,
            stderr: &stderr,
        });
        assert_eq!(
            text,
            "\n### 2026-11-22T07:15:01.123Z | Exit Code: 3 | Run: r1-abc\n\n**Stdout:**\n```\nhello\nworld\n```\n\n**Stderr:**\n```\nwarning\n```\n"
        );
    }

    #[test]
    fn formats_an_entry_without_run_id() {
        let text = entry_text(None, "out", "");
        assert_eq!(
            text,
            "\n### 2026-11-22T07:15:01.123Z | Exit Code: 0\n\n**Stdout:**\n```\nout\n```\n"
        );
    }

    #[test]
    fn empty_streams_are_left_out() {
        assert_eq!(
            entry_text(Some("r"), "", ""),
            "\n### 2026-11-22T07:15:01.123Z | Exit Code: 0 | Run: r\n"
        );
        assert_eq!(
            entry_text(Some("r"), "", "denied by RBAC\n"),
            "\n### 2026-11-22T07:15:01.123Z | Exit Code: 0 | Run: r\n\n**Stderr:**\n```\ndenied by RBAC\n```\n"
        );
    }

    #[test]
    fn triple_backticks_are_escaped() {
        let text = entry_text(Some("r"), "```\n# Script\n````sh\n``ok``\n", "");
        assert!(text.contains("\\`\\`\\`\n# Script\n\\`\\`\\``sh\n``ok``\n```\n"));
        let fence_lines = text.lines().filter(|line| line.starts_with("```")).count();
        assert_eq!(fence_lines, 2);
    }

    #[test]
    fn omitted_marker_sits_between_head_and_tail() {
        let stdout = StreamExcerpt {
            head: "first\n".to_string(),
            tail: "last".to_string(),
            omitted_bytes: 42,
        };
        let stderr = StreamExcerpt {
            head: "a```".to_string(),
            tail: "```b\n".to_string(),
            omitted_bytes: 7,
        };
        let with_run = format_entry(&HistoryEntry {
            finished_at: time(),
            exit_code: 1,
            run_id: Some("r1-x"),
            stdout: &stdout,
            stderr: &stderr,
        });
        assert!(with_run.contains(
            "**Stdout:**\n```\nfirst\n\n… 42 bytes omitted; full log: run r1-x …\nlast\n```\n"
        ));
        assert!(with_run.contains(
            "**Stderr:**\n```\na\\`\\`\\`\n… 7 bytes omitted; full log: run r1-x …\n\\`\\`\\`b\n```\n"
        ));
        let without_run = format_entry(&HistoryEntry {
            run_id: None,
            finished_at: time(),
            exit_code: 1,
            stdout: &stdout,
            stderr: &stderr,
        });
        assert!(without_run.contains("… 42 bytes omitted; full log: run - …\n"));
    }

    #[test]
    fn run_id_control_characters_are_dropped() {
        let text = entry_text(Some("r1\n# Script"), "", "");
        assert!(text.ends_with("| Run: r1# Script\n"));
    }

    #[test]
    fn append_creates_the_section() {
        let file = TempFile::with("# R\n\n# Script\n```sh\necho\n```");
        let entry = entry_text(Some("r1"), "out\n", "");
        append(&file.path(), &entry, 10, MAX).unwrap();
        assert_eq!(
            file.content(),
            format!("# R\n\n# Script\n```sh\necho\n```\n\n# History\n{entry}")
        );
    }

    #[test]
    fn append_to_an_existing_section_only_appends() {
        let original = "# R\n# History\nIntro.\n";
        let file = TempFile::with(original);
        let first = entry_text(Some("r1"), "one\n", "");
        let second = entry_text(Some("r2"), "two\n", "err\n");
        append(&file.path(), &first, 10, MAX).unwrap();
        append(&file.path(), &second, 10, MAX).unwrap();
        assert_eq!(file.content(), format!("{original}{first}{second}"));
    }

    #[test]
    fn a_block_left_open_is_never_appended_to() {
        let original = "# R\n# Script\n````sh\necho hi\n# History\n";
        let file = TempFile::with(original);
        let entry = entry_text(Some("r1"), "hi\n", "");
        let error = append(&file.path(), &entry, 10, MAX).unwrap_err();
        assert!(matches!(error, HistoryError::UnclosedBlock { line: 3 }));
        assert!(error.to_string().contains("line 3"), "{error}");
        assert_eq!(file.content(), original);
    }

    #[test]
    fn hostile_files_are_refused_without_blocking() {
        let dir = TempDir::new("history-hostile");
        let fifo = dir.path().join("fifo.md");
        mkfifo(&fifo);
        let error = append(&fifo, "\n### x\n", 5, MAX).unwrap_err();
        assert!(error.to_string().contains("FIFO"), "{error}");
        let link = dir.path().join("zero.md");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let error = append(&link, "\n### x\n", 5, MAX).unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        let big = dir.write("big.md", &[b'x'; 100]);
        let error = append(&big, "\n### x\n", 5, 99).unwrap_err();
        assert!(error.to_string().contains("RUNBOOK_MAX_BYTES"), "{error}");
        assert_eq!(fs::read(&big).unwrap().len(), 100);
        // Nothing but the sidecar locks was created beside them.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".big.md.lock",
                ".fifo.md.lock",
                ".zero.md.lock",
                "big.md",
                "fifo.md",
                "zero.md"
            ]
        );
    }

    #[test]
    fn trimming_by_size_keeps_the_file_under_the_limit() {
        let preamble = "# R\n# History\n";
        let file = TempFile::with(preamble);
        let entries: Vec<String> = (0..10)
            .map(|i| entry_text(Some(&format!("run-{i}")), &"x".repeat(50), ""))
            .collect();
        let one = entries[0].len();
        let max = (preamble.len() + 3 * one) as u64;
        for entry in &entries {
            append(&file.path(), entry, 100, max).unwrap();
            assert!(file.content().len() as u64 <= max);
        }
        // Each trim goes down to 90 % of the limit, which holds two of these entries: the
        // fourth entry made it trim to two, the fifth fitted, and so on.
        assert_eq!(
            file.content(),
            format!("{preamble}{}", entries[8..].concat())
        );
        // An entry that cannot fit even alone is refused and changes nothing.
        let huge = entry_text(Some("huge"), &"y".repeat(max as usize), "");
        assert!(matches!(
            append(&file.path(), &huge, 100, max),
            Err(HistoryError::TooLarge { .. })
        ));
        assert_eq!(
            file.content(),
            format!("{preamble}{}", entries[8..].concat())
        );
    }

    #[test]
    fn a_full_history_is_trimmed_by_a_tenth_so_the_next_appends_go_in_place() {
        use std::os::unix::fs::MetadataExt;
        let preamble = "# R\n# History\n";
        let file = TempFile::with(preamble);
        let entries: Vec<String> = (0..23)
            .map(|i| entry_text(Some(&format!("run-{i}")), &format!("{i}\n"), ""))
            .collect();
        let inode = || fs::metadata(file.path()).unwrap().ino();
        for entry in &entries[..20] {
            append(&file.path(), entry, 20, MAX).unwrap();
        }
        let before = inode();
        // The 21st is one too many: the file is rewritten with the newest 18.
        append(&file.path(), &entries[20], 20, MAX).unwrap();
        assert_ne!(inode(), before);
        assert_eq!(
            file.content(),
            format!("{preamble}{}", entries[3..21].concat())
        );
        // The next two fit: appended in place, the file is the same one.
        let rewritten = inode();
        append(&file.path(), &entries[21], 20, MAX).unwrap();
        append(&file.path(), &entries[22], 20, MAX).unwrap();
        assert_eq!(inode(), rewritten);
        assert_eq!(
            file.content(),
            format!("{preamble}{}", entries[3..].concat())
        );
    }

    #[test]
    fn a_rewrite_keeps_the_mode_and_leaves_no_temporary_file() {
        use std::os::unix::fs::PermissionsExt;
        let file = TempFile::with("# R\n# History\n\n### old | Exit Code: 0\n# Notes\n");
        fs::set_permissions(file.path(), fs::Permissions::from_mode(0o640)).unwrap();
        append(&file.path(), &entry_text(Some("r1"), "x\n", ""), 1, MAX).unwrap();
        let mode = fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        let leftovers = fs::read_dir(file.0.path())
            .unwrap()
            .filter(|entry| {
                let name = entry.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn trimming_keeps_the_newest_entries_and_the_rest_of_the_document() {
        let preamble = "# R\n\n# Script\n```sh\n# History\necho '### not an entry'\n```\n\n# History\nKept intro.\n";
        let file = TempFile::with(preamble);
        let entries: Vec<String> = (0..6)
            .map(|i| {
                entry_text(
                    Some(&format!("run-{i}")),
                    &format!("### fake heading {i}\n# Script\n"),
                    "",
                )
            })
            .collect();
        for entry in &entries {
            append(&file.path(), entry, 3, MAX).unwrap();
        }
        assert_eq!(
            file.content(),
            format!("{preamble}{}", entries[3..].concat())
        );
    }

    #[test]
    fn entries_go_to_the_end_of_a_history_section_that_is_not_last() {
        let file = TempFile::with("# R\n# History\n\n### old | Exit Code: 0\n# Notes\nkeep me\n");
        let first = entry_text(Some("r1"), "one\n", "");
        let second = entry_text(Some("r2"), "two\n", "");
        append(&file.path(), &first, 2, MAX).unwrap();
        assert_eq!(
            file.content(),
            format!("# R\n# History\n\n### old | Exit Code: 0\n{first}# Notes\nkeep me\n")
        );
        append(&file.path(), &second, 2, MAX).unwrap();
        assert_eq!(
            file.content(),
            format!(
                "# R\n# History\n\n{}{second}# Notes\nkeep me\n",
                &first[1..]
            )
        );
    }

    fn refusal_text(reason: &str) -> String {
        format_entry(&HistoryEntry {
            finished_at: time(),
            exit_code: REFUSED_EXIT_CODE,
            run_id: None,
            stdout: &StreamExcerpt::default(),
            stderr: &whole(reason),
        })
    }

    #[test]
    fn refusals_are_trimmed_before_runs() {
        let preamble = "# R\n# History\n";
        let file = TempFile::with(preamble);
        let runs: Vec<String> = (0..3)
            .map(|i| entry_text(Some(&format!("run-{i}")), &format!("out {i}\n"), ""))
            .collect();
        append(&file.path(), &runs[0], 3, MAX).unwrap();
        append(&file.path(), &refusal_text("no 1\n"), 3, MAX).unwrap();
        append(&file.path(), &runs[1], 3, MAX).unwrap();
        // Full: the next entry drops the refusal, not the oldest run.
        append(&file.path(), &runs[2], 3, MAX).unwrap();
        assert_eq!(file.content(), format!("{preamble}{}", runs.concat()));
        // Any number of refusals: each is dropped itself, no run goes.
        for i in 0..10 {
            append(&file.path(), &refusal_text(&format!("no {i}\n")), 3, MAX).unwrap();
        }
        assert_eq!(file.content(), format!("{preamble}{}", runs.concat()));
        // A run with only runs present drops the oldest run, as before.
        let newest = entry_text(Some("run-3"), "out 3\n", "");
        append(&file.path(), &newest, 3, MAX).unwrap();
        assert_eq!(
            file.content(),
            format!("{preamble}{}{}{newest}", runs[1], runs[2])
        );
    }

    #[test]
    fn oldest_refusals_go_first_and_runs_keep_their_order() {
        let mut content = format!(
            "# R\n# History\n{}{}{}{}{}",
            refusal_text("old refusal\n"),
            entry_text(Some("a"), "A\n", ""),
            refusal_text("new refusal\n"),
            entry_text(Some("b"), "B\n", ""),
            entry_text(Some("c"), "C\n", ""),
        )
        .into_bytes();
        assert!(trim_entries(&mut content, 4));
        let text = String::from_utf8(content.clone()).unwrap();
        assert!(!text.contains("old refusal"));
        assert!(text.contains("new refusal"));
        assert!(trim_entries(&mut content, 2));
        let text = String::from_utf8(content.clone()).unwrap();
        assert_eq!(
            text,
            format!(
                "# R\n# History\n{}{}",
                entry_text(Some("b"), "B\n", ""),
                entry_text(Some("c"), "C\n", "")
            )
        );
        assert!(!trim_entries(&mut content, 2));
    }

    #[test]
    fn errors_keep_their_cause_and_text() {
        use std::error::Error as _;
        let error = HistoryError::from(FileError::Io(io::Error::other("disk full")));
        assert_eq!(
            error.to_string(),
            "cannot update the runbook history: disk full"
        );
        assert_eq!(
            error.source().map(|e| e.to_string()).as_deref(),
            Some("disk full")
        );
        let error = HistoryError::from(FileError::Busy);
        assert!(error.source().is_some());
        assert!(HistoryError::Replaced.source().is_none());
    }

    #[test]
    fn a_run_that_exits_403_is_not_a_refusal() {
        assert!(is_refusal_heading(
            b"### 2026-11-22T07:15:01.123Z | Exit Code: 403\n"
        ));
        assert!(!is_refusal_heading(
            b"### 2026-11-22T07:15:01.123Z | Exit Code: 403 | Run: r1-x\n"
        ));
        assert!(!is_refusal_heading(
            b"### 2026-11-22T07:15:01.123Z | Exit Code: 1\n"
        ));
        assert!(!is_refusal_heading(b"## 2026 | Exit Code: 403\n"));
    }

    #[test]
    fn headings_only_keeps_heading_lines_and_the_rest_of_the_document() {
        let with_output = format_entry(&HistoryEntry {
            finished_at: time(),
            exit_code: 2,
            run_id: Some("r1-x"),
            stdout: &whole("secret out\n### not a heading\n"),
            stderr: &StreamExcerpt {
                head: "err head\n".into(),
                tail: "err tail\n".into(),
                omitted_bytes: 9,
            },
        });
        let content = format!(
            "# R\n# Script\n```sh\necho\n```\n# History\nIntro.\n{with_output}{}{}# Notes\nkeep\n",
            refusal_text("RBAC: missing required claim roles (one of: admin)\n"),
            entry_text(Some("r1-y"), "", ""),
        );
        let reduced = headings_only(&content);
        assert_eq!(
            reduced,
            "# R\n# Script\n```sh\necho\n```\n# History\nIntro.\n\n\
             ### 2026-11-22T07:15:01.123Z | Exit Code: 2 | Run: r1-x\n\n\
             ### 2026-11-22T07:15:01.123Z | Exit Code: 403\n\n\
             ### 2026-11-22T07:15:01.123Z | Exit Code: 0 | Run: r1-y\n\
             # Notes\nkeep\n"
        );
        let plain = "# R\n# Script\n```sh\necho\n```\n";
        assert_eq!(headings_only(plain), plain);
    }

    #[test]
    fn zero_max_entries_empties_the_section() {
        let file = TempFile::with("# R\n# History\n");
        append(&file.path(), &entry_text(Some("r1"), "x\n", ""), 0, MAX).unwrap();
        assert_eq!(file.content(), "# R\n# History\n");
    }

    #[test]
    fn crlf_documents_are_understood() {
        let original = "# R\r\n# History\r\nIntro.\r\n";
        let file = TempFile::with(original);
        let entries: Vec<String> = (0..3)
            .map(|i| entry_text(Some(&format!("r{i}")), "x\n", ""))
            .collect();
        for entry in &entries {
            append(&file.path(), entry, 2, MAX).unwrap();
        }
        assert_eq!(
            file.content(),
            format!("{original}{}", entries[1..].concat())
        );
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let dir = TempDir::new("history-missing");
        let path = dir.path().join("missing.md");
        assert!(matches!(
            append(&path, "\n### x\n", 5, MAX),
            Err(HistoryError::File(FileError::Missing))
        ));
        assert!(!path.exists());
    }

    fn big_entries(count: usize) -> Vec<String> {
        (0..count)
            .map(|i| {
                let stdout: String = (0..2000)
                    .map(|line| format!("run {i} line {line}\n"))
                    .collect();
                entry_text(Some(&format!("run-{i}")), &stdout, &format!("done {i}\n"))
            })
            .collect()
    }

    fn append_concurrently(path: &Path, entries: &[String], max_entries: usize) {
        std::thread::scope(|scope| {
            for entry in entries {
                scope.spawn(move || append(path, entry, max_entries, MAX).unwrap());
            }
        });
    }

    #[test]
    fn concurrent_appends_leave_every_entry_intact() {
        let preamble = "# R\n# History\n";
        let file = TempFile::with(preamble);
        let entries = big_entries(20);
        append_concurrently(&file.path(), &entries, 1000);

        let content = file.content();
        let expected_len = preamble.len() + entries.iter().map(String::len).sum::<usize>();
        assert_eq!(content.len(), expected_len);
        assert!(content.starts_with(preamble));
        for entry in &entries {
            assert_eq!(content.matches(entry.as_str()).count(), 1);
        }
        assert_eq!(content.matches("\n### ").count(), 20);
    }

    #[test]
    fn concurrent_appends_with_trimming_keep_exactly_the_maximum() {
        let preamble = "# R\n# History\n";
        let file = TempFile::with(preamble);
        let entries = big_entries(20);
        append_concurrently(&file.path(), &entries, 5);

        let content = file.content();
        assert!(content.starts_with(preamble));
        let kept: Vec<&String> = entries
            .iter()
            .filter(|entry| content.contains(entry.as_str()))
            .collect();
        assert_eq!(kept.len(), 5);
        let kept_len: usize = kept.iter().map(|entry| entry.len()).sum();
        assert_eq!(content.len(), preamble.len() + kept_len);
    }
}
