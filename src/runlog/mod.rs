//! The per-run log: the only path from a child's pipes to any viewer, the middle of
//! pipe → reader (`supervisor.rs`) → run log → viewer (`http/run_output.rs`). An append-only
//! sequence of chunks (sequence number, stream, time, bytes) written to a file as they arrive
//! (`format`), with a bounded in-memory window of the newest chunks for live viewers
//! (`window`). Writers (one reader thread per pipe) `append` under a short lock and never touch
//! a socket; each viewer owns a `Cursor` (`cursor`) and reads at its own pace, from memory while
//! it keeps up and from the file when it falls behind. The head and tail of each stream are kept
//! for the History entry (`excerpt`). Lines are counted by `loglines.rs`, from the file.
#![forbid(unsafe_code)]

mod cursor;
mod excerpt;
mod format;
#[cfg(test)]
mod tests;
mod window;

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::chunker::utf8_floor;
pub use cursor::CursorRead;
pub use excerpt::StreamExcerptBytes;
use excerpt::{keep_excerpt, Excerpt};
use format::{encode_header, write_record, RecordReader, HEADER_LEN};
use window::Window;

/// A sparse index entry is kept every this many bytes of file, for resuming at an id.
const INDEX_EVERY: u64 = 1024 * 1024;
/// Sequence number of the first chunk; `done` takes the id after the last chunk.
pub const FIRST_SEQ: u64 = 1;

/// Which pipe a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// One piece of output, as read from a pipe.
#[derive(Debug)]
pub struct Chunk {
    pub seq: u64,
    pub time_ms: i64,
    pub stream: Stream,
    /// Bytes of this stream that came before this chunk.
    pub stream_offset: u64,
    pub data: Vec<u8>,
    /// Where the chunk's record starts in the file.
    file_offset: u64,
}

/// How a run ended. Set once; viewers that reach it send `done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub return_code: i32,
    /// A server-side failure worth telling the user (timeout, spawn failure, full disk).
    pub error: Option<String>,
    pub timed_out: bool,
    pub finished_at: chrono::DateTime<chrono::Utc>,
}

impl Outcome {
    /// Exit code 0 and no server-side failure.
    pub fn succeeded(&self) -> bool {
        self.return_code == 0 && self.error.is_none()
    }
}

/// Why reading or appending to the log failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("run log: {0}")]
    Io(#[from] io::Error),
    #[error("run log unreadable at byte {0}")]
    Corrupt(u64),
}

struct State {
    file: File,
    file_len: u64,
    next_seq: u64,
    window: Window,
    stream_bytes: [u64; 2],
    excerpts: [Excerpt; 2],
    /// Sparse (seq, file offset) pairs, one every `INDEX_EVERY` bytes of file.
    index: Vec<(u64, u64)>,
    write_error: Option<String>,
    /// Largest the file may grow (RUN_LOG_MAX_BYTES); later output is counted and dropped.
    max_file_bytes: u64,
    /// Sequence number at which output stopped being stored because of `max_file_bytes`.
    capped_at: Option<u64>,
    end: Option<Arc<Outcome>>,
}

/// A run's log; shared by its writers and all its viewers.
pub struct RunLog {
    path: PathBuf,
    excerpt_bytes: usize,
    state: Mutex<State>,
    /// Woken by every append and by the end: viewers waiting for output wait on it.
    changed: Condvar,
}

/// Per-stream summary of a run's output.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub last_seq: u64,
}

impl RunLog {
    /// Creates the log file (which must not exist yet).
    #[cfg(test)]
    pub fn create(
        path: &Path,
        excerpt_bytes: usize,
        max_file_bytes: u64,
    ) -> Result<RunLog, LogError> {
        let file = File::options()
            .read(true)
            .append(true)
            .create_new(true)
            .open(path)?;
        Ok(RunLog::in_new_file(
            path,
            file,
            excerpt_bytes,
            max_file_bytes,
        ))
    }

    /// A new, empty log in `file`, a new empty file at `path` opened for reading and appending.
    pub fn in_new_file(
        path: &Path,
        file: File,
        excerpt_bytes: usize,
        max_file_bytes: u64,
    ) -> RunLog {
        RunLog {
            path: path.to_path_buf(),
            excerpt_bytes,
            state: Mutex::new(State {
                file,
                file_len: 0,
                next_seq: FIRST_SEQ,
                window: Window::default(),
                stream_bytes: [0; 2],
                excerpts: [Excerpt::default(), Excerpt::default()],
                index: vec![(FIRST_SEQ, 0)],
                write_error: None,
                max_file_bytes,
                capped_at: None,
                end: None,
            }),
            changed: Condvar::new(),
        }
    }

    /// Opens the log of a run that is over (or was interrupted) for reading. A partial record
    /// at the end (the server died while writing it) is ignored.
    pub fn open_finished(path: &Path, outcome: Outcome, capped: bool) -> Result<RunLog, LogError> {
        RunLog::reopen(path, outcome, capped, 0)
    }

    /// Like [`RunLog::open_finished`], and also reads every stored byte to rebuild the history
    /// excerpts (`excerpt_bytes` per stream), for a run whose history entry was never written.
    pub fn open_finished_with_excerpts(
        path: &Path,
        outcome: Outcome,
        excerpt_bytes: usize,
    ) -> Result<RunLog, LogError> {
        RunLog::reopen(path, outcome, false, excerpt_bytes)
    }

    fn reopen(
        path: &Path,
        outcome: Outcome,
        capped: bool,
        excerpt_bytes: usize,
    ) -> Result<RunLog, LogError> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let found = format::replay(&mut file, len, excerpt_bytes)?;
        Ok(RunLog {
            path: path.to_path_buf(),
            excerpt_bytes,
            state: Mutex::new(State {
                file,
                file_len: found.end_offset,
                next_seq: found.next_seq,
                window: Window::default(),
                stream_bytes: found.stream_bytes,
                excerpts: found.excerpts,
                index: found.index,
                write_error: None,
                max_file_bytes: found.end_offset,
                capped_at: capped.then_some(found.next_seq),
                end: Some(Arc::new(outcome)),
            }),
            changed: Condvar::new(),
        })
    }

    /// Why storing output failed, if it did (a full disk).
    pub fn write_error(&self) -> Option<String> {
        self.lock().write_error.clone()
    }

    /// Bytes of the log file written so far.
    pub fn stored_bytes(&self) -> u64 {
        self.lock().file_len
    }

    /// True once storing output failed (see [`RunLog::write_error`]).
    pub fn has_write_error(&self) -> bool {
        self.lock().write_error.is_some()
    }

    /// Sequence number from which output was no longer stored (RUN_LOG_MAX_BYTES), if so.
    pub fn capped_at(&self) -> Option<u64> {
        self.lock().capped_at
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is a few
        // assignments after the file write), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a chunk read from `stream`. After a write failure (full disk) further output is
    /// counted and dropped; the failure is kept for the run's outcome.
    pub fn append(&self, stream: Stream, data: &[u8]) {
        if !data.is_empty() {
            self.append_owned(stream, data.to_vec());
        }
    }

    /// [`RunLog::append`] for bytes the caller gives up: they become the chunk without a copy.
    pub fn append_owned(&self, stream: Stream, mut data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let mut st = self.lock();
        let i = stream.index();
        let stream_offset = st.stream_bytes[i];
        st.stream_bytes[i] += data.len() as u64;
        keep_excerpt(self.excerpt_bytes, &mut st.excerpts[i], &data);
        if st.write_error.is_some() || st.end.is_some() || st.capped_at.is_some() {
            return;
        }
        // RUN_LOG_MAX_BYTES: store what fits (whole characters), count and drop the rest.
        let room = st
            .max_file_bytes
            .saturating_sub(st.file_len + HEADER_LEN as u64);
        let capping = data.len() as u64 > room;
        if capping {
            let fits = utf8_floor(&data, usize::try_from(room).unwrap_or(usize::MAX));
            data.truncate(fits);
        }
        if data.is_empty() {
            st.capped_at = Some(st.next_seq);
            drop(st);
            self.changed.notify_all();
            return;
        }
        let chunk = Chunk {
            seq: st.next_seq,
            time_ms: chrono::Utc::now().timestamp_millis(),
            stream,
            stream_offset,
            data,
            file_offset: st.file_len,
        };
        if let Err(e) = write_record(&mut st.file, &encode_header(&chunk), &chunk.data) {
            let len = st.file_len;
            let _ = st.file.set_len(len);
            log::error!("run log {}: write failed: {e}", self.path.display());
            st.write_error = Some(format!("writing the run log failed: {e}"));
            return;
        }
        if chunk.file_offset >= st.index.last().map_or(0, |e| e.1) + INDEX_EVERY {
            st.index.push((chunk.seq, chunk.file_offset));
        }
        st.file_len += chunk.record_len();
        st.next_seq += 1;
        st.window.push(chunk);
        if capping {
            st.capped_at = Some(st.next_seq);
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Marks the run as over; viewers that have read everything get `CursorRead::End`. A log write
    /// failure becomes the outcome's error if it has none.
    pub fn finish(&self, mut outcome: Outcome) -> Arc<Outcome> {
        let mut st = self.lock();
        if let Some(end) = &st.end {
            return end.clone();
        }
        if outcome.error.is_none() {
            outcome.error = st.write_error.clone();
        }
        let _ = st.file.flush();
        let end = Arc::new(outcome);
        st.end = Some(end.clone());
        drop(st);
        self.changed.notify_all();
        end
    }

    /// The outcome, once the run is over.
    pub fn outcome(&self) -> Option<Arc<Outcome>> {
        self.lock().end.clone()
    }

    pub fn totals(&self) -> Totals {
        let st = self.lock();
        Totals {
            stdout_bytes: st.stream_bytes[0],
            stderr_bytes: st.stream_bytes[1],
            last_seq: st.next_seq - 1,
        }
    }

    /// The bytes a history entry shows for `stream`: all of it if it fits in the excerpt size,
    /// else a head and a tail of half that size each, cut at character boundaries.
    pub fn excerpt(&self, stream: Stream) -> StreamExcerptBytes {
        let st = self.lock();
        let i = stream.index();
        st.excerpts[i].shown(st.stream_bytes[i], self.excerpt_bytes)
    }

    /// Reads the stored bytes of one stream, from the start, calling `sink` per chunk until it
    /// returns false. Used to build result documents and downloads without holding them whole:
    /// from the file, or from the window while it still holds every chunk.
    pub fn for_each_stored(
        &self,
        stream: Option<Stream>,
        mut sink: impl FnMut(&Chunk) -> io::Result<bool>,
    ) -> Result<(), LogError> {
        let (file_len, in_memory) = {
            let state = self.lock();
            // The window still holds every chunk (a small output): no need to read the file.
            (
                state.file_len,
                state.window.chunks_from(FIRST_SEQ, usize::MAX),
            )
        };
        if let Some(chunks) = in_memory {
            let wanted = chunks
                .iter()
                .filter(|chunk| stream.is_none_or(|s| chunk.stream == s));
            for chunk in wanted {
                if !sink(chunk)? {
                    break;
                }
            }
            return Ok(());
        }
        let mut file = File::open(&self.path)?;
        let mut records = RecordReader::new(&mut file, 0, file_len)?;
        while let Some(chunk) = records.next_chunk(stream)? {
            if !sink(&chunk)? {
                break;
            }
        }
        Ok(())
    }
}
