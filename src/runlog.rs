//! The per-run log: the only path from a child's pipes to any viewer. An append-only sequence of
//! chunks (sequence number, stream, time, bytes) written to a file as they arrive, with a bounded
//! in-memory window of the newest chunks for live viewers. Writers (one reader thread per pipe)
//! append under a short lock and never touch a socket; each viewer owns a `Cursor` and reads at
//! its own pace, from memory while it keeps up and from the file when it falls behind.
//!
//! File format, repeated per chunk (little endian): seq u64, time_ms i64, stream u8,
//! stream_offset u64, len u32, then `len` bytes.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::chunker::{utf8_ceil, utf8_floor};

const HEADER_LEN: usize = 8 + 8 + 1 + 8 + 4;
/// Most bytes of recent chunks kept in memory per run.
const WINDOW_BYTES: usize = 256 * 1024;
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
    fn tag(self) -> u8 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }
    fn from_tag(tag: u8) -> Option<Stream> {
        match tag {
            1 => Some(Stream::Stdout),
            2 => Some(Stream::Stderr),
            _ => None,
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

impl Chunk {
    fn record_len(&self) -> u64 {
        (HEADER_LEN + self.data.len()) as u64
    }
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

/// Why appending to the log failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum LogError {
    Io(io::Error),
    Corrupt(u64),
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Io(e) => write!(f, "run log: {e}"),
            LogError::Corrupt(offset) => write!(f, "run log unreadable at byte {offset}"),
        }
    }
}

impl std::error::Error for LogError {}

impl From<io::Error> for LogError {
    fn from(e: io::Error) -> Self {
        LogError::Io(e)
    }
}

/// Head and tail of one stream kept for the history entry, bounded by `keep` bytes.
#[derive(Debug, Default)]
struct Excerpt {
    head: Vec<u8>,
    tail: VecDeque<u8>,
}

struct State {
    file: File,
    file_len: u64,
    next_seq: u64,
    window: VecDeque<Arc<Chunk>>,
    window_bytes: usize,
    stream_bytes: [u64; 2],
    excerpts: [Excerpt; 2],
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
    changed: Condvar,
}

/// Where a viewer is in the log.
#[derive(Debug)]
pub struct Cursor {
    next_seq: u64,
    offset: u64,
    /// False for a cursor placed ahead of the log: its offset is found when first needed.
    offset_known: bool,
    file: Option<File>,
}

impl Cursor {
    /// The id of the next chunk this cursor will return.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// What a viewer gets from `RunLog::next`.
pub enum Next {
    Chunks(Vec<Arc<Chunk>>),
    /// Nothing new within the wait; the run goes on.
    Idle,
    /// The viewer has every chunk and the run is over.
    End(Arc<Outcome>),
}

/// Per-stream summary of a run's output.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub last_seq: u64,
}

/// The head and tail of a stream for history, with the count of bytes between them.
#[derive(Debug, Clone, Default)]
pub struct StreamExcerptBytes {
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
    pub omitted: u64,
}

impl RunLog {
    /// Creates the log file (which must not exist yet).
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
        Ok(RunLog {
            path: path.to_path_buf(),
            excerpt_bytes,
            state: Mutex::new(State {
                file,
                file_len: 0,
                next_seq: FIRST_SEQ,
                window: VecDeque::new(),
                window_bytes: 0,
                stream_bytes: [0; 2],
                excerpts: [Excerpt::default(), Excerpt::default()],
                index: vec![(FIRST_SEQ, 0)],
                write_error: None,
                max_file_bytes,
                capped_at: None,
                end: None,
            }),
            changed: Condvar::new(),
        })
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
        let mut next_seq = FIRST_SEQ;
        let mut stream_bytes = [0u64; 2];
        let mut index = vec![(FIRST_SEQ, 0)];
        let mut end_offset = 0;
        let mut excerpts = [Excerpt::default(), Excerpt::default()];
        {
            let mut records = RecordReader::new(&mut file, 0, len)?;
            // A record that cannot be read ends the log (the server died while writing it).
            while let Ok(Some(header)) = records.read_header() {
                // Only the headers, unless the excerpts need the bytes.
                let data = if excerpt_bytes == 0 {
                    records.skip_data().map(|()| Vec::new())
                } else {
                    records.read_data(&header)
                };
                let Ok(data) = data else { break };
                let i = header.stream.index();
                keep_excerpt(excerpt_bytes, &mut excerpts[i], &data);
                if header.start >= index.last().map_or(0, |e| e.1) + INDEX_EVERY {
                    index.push((header.seq, header.start));
                }
                stream_bytes[i] += header.len as u64;
                next_seq = header.seq.saturating_add(1);
                end_offset = records.offset;
            }
        }
        Ok(RunLog {
            path: path.to_path_buf(),
            excerpt_bytes,
            state: Mutex::new(State {
                file,
                file_len: end_offset,
                next_seq,
                window: VecDeque::new(),
                window_bytes: 0,
                stream_bytes,
                excerpts,
                index,
                write_error: None,
                max_file_bytes: end_offset,
                capped_at: capped.then_some(next_seq),
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

    /// A cursor whose next chunk is `seq`. A `seq` beyond the chunks written so far waits for
    /// it: the chunks before it are never sent.
    pub fn cursor_at(&self, seq: u64) -> Result<Cursor, LogError> {
        let seq = seq.max(FIRST_SEQ);
        let next_seq = self.lock().next_seq;
        if seq >= next_seq {
            return Ok(Cursor {
                next_seq: seq,
                offset: 0,
                offset_known: false,
                file: None,
            });
        }
        let offset = self.offset_of(seq)?;
        Ok(Cursor {
            next_seq: seq,
            offset,
            offset_known: true,
            file: None,
        })
    }

    /// File offset of the record of chunk `seq` (which must be written), found from the sparse
    /// index and a scan of the headers after it.
    fn offset_of(&self, seq: u64) -> Result<u64, LogError> {
        let ((mut at_seq, mut offset), file_len) = {
            let st = self.lock();
            let entry = st
                .index
                .iter()
                .rev()
                .find(|(s, _)| *s <= seq)
                .copied()
                .unwrap_or((FIRST_SEQ, 0));
            (entry, st.file_len)
        };
        let mut file = File::open(&self.path)?;
        let mut records = RecordReader::new(&mut file, offset, file_len)?;
        while at_seq < seq {
            match records.read_header()? {
                Some(header) => {
                    records.skip_data()?;
                    at_seq = header.seq.saturating_add(1);
                    offset = records.offset;
                }
                None => break,
            }
        }
        Ok(offset)
    }

    /// Sequence number of the chunk holding the start of the `lines`-th line from the end
    /// (counting an unterminated last line).
    pub fn tail_start(&self, lines: u64) -> Result<u64, LogError> {
        let file_len = self.lock().file_len;
        let mut file = File::open(&self.path)?;
        // Pass 1: how many lines are there?
        let mut newlines = 0u64;
        let mut last_byte = b'\n';
        {
            let mut records = RecordReader::new(&mut file, 0, file_len)?;
            while let Some(chunk) = records.next_chunk(None)? {
                newlines += count_line_breaks(&chunk.data);
                if let Some(b) = chunk.data.last() {
                    last_byte = *b;
                }
            }
        }
        let total = newlines + u64::from(!matches!(last_byte, b'\n' | b'\r'));
        if lines >= total {
            return Ok(FIRST_SEQ);
        }
        // The wanted line starts after this many line breaks.
        let skip = total - lines;
        let mut seen = 0u64;
        let mut records = RecordReader::new(&mut file, 0, file_len)?;
        while let Some(chunk) = records.next_chunk(None)? {
            let here = count_line_breaks(&chunk.data);
            if seen + here >= skip {
                // The skip-th break is in this chunk; the line starts after it, which is in
                // this chunk unless the break is the chunk's last byte.
                let ends_with_break = matches!(chunk.data.last(), Some(b'\n' | b'\r'));
                return Ok(if seen + here == skip && ends_with_break {
                    chunk.seq + 1
                } else {
                    chunk.seq
                });
            }
            seen += here;
        }
        Ok(FIRST_SEQ)
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
        if data.is_empty() {
            return;
        }
        let mut st = self.lock();
        let i = stream.index();
        let stream_offset = st.stream_bytes[i];
        st.stream_bytes[i] += data.len() as u64;
        keep_excerpt(self.excerpt_bytes, &mut st.excerpts[i], data);
        if st.write_error.is_some() || st.end.is_some() || st.capped_at.is_some() {
            return;
        }
        // RUN_LOG_MAX_BYTES: store what fits (whole characters), count and drop the rest.
        let room = st
            .max_file_bytes
            .saturating_sub(st.file_len + HEADER_LEN as u64);
        let capping = data.len() as u64 > room;
        let data = if capping {
            &data[..utf8_floor(data, usize::try_from(room).unwrap_or(usize::MAX))]
        } else {
            data
        };
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
            data: data.to_vec(),
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
        st.window_bytes += chunk.data.len();
        st.window.push_back(Arc::new(chunk));
        if capping {
            st.capped_at = Some(st.next_seq);
        }
        while st.window_bytes > WINDOW_BYTES && st.window.len() > 1 {
            if let Some(old) = st.window.pop_front() {
                st.window_bytes -= old.data.len();
            }
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Marks the run as over; viewers that have read everything get `Next::End`. A log write
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

    /// Blocks until the run is over.
    pub fn wait_end(&self) -> Arc<Outcome> {
        let mut st = self.lock();
        loop {
            if let Some(end) = &st.end {
                return end.clone();
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
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
        let ex = &st.excerpts[stream.index()];
        let total = st.stream_bytes[stream.index()];
        if total <= self.excerpt_bytes as u64 {
            return StreamExcerptBytes {
                head: ex.head.clone(),
                tail: Vec::new(),
                omitted: 0,
            };
        }
        let half = self.excerpt_bytes / 2;
        let head_end = utf8_floor(&ex.head, half);
        let tail: Vec<u8> = ex.tail.iter().copied().collect();
        let tail_start = utf8_ceil(&tail, 0);
        let shown = (head_end + tail.len() - tail_start) as u64;
        StreamExcerptBytes {
            head: ex.head[..head_end].to_vec(),
            tail: tail[tail_start..].to_vec(),
            omitted: total.saturating_sub(shown),
        }
    }

    /// A cursor at the first chunk.
    #[cfg(test)]
    pub fn cursor_at_start(&self) -> Cursor {
        Cursor {
            next_seq: FIRST_SEQ,
            offset: 0,
            offset_known: true,
            file: None,
        }
    }

    /// Waits up to `wait` for chunks at the cursor; returns at most about `max_bytes` of them
    /// (always at least one when any is there).
    pub fn next(&self, cursor: &mut Cursor, max_bytes: usize, wait: Duration) -> Next {
        let deadline = crate::clock::instant_after(wait);
        let mut st = self.lock();
        loop {
            if cursor.next_seq < st.next_seq {
                let in_window = st
                    .window
                    .front()
                    .is_some_and(|front| front.seq <= cursor.next_seq);
                if in_window {
                    let first = st.window.front().map_or(0, |f| f.seq);
                    let skip = usize::try_from(cursor.next_seq - first).unwrap_or(usize::MAX);
                    let mut out = Vec::new();
                    let mut bytes = 0;
                    for chunk in st.window.iter().skip(skip) {
                        if !out.is_empty() && bytes + chunk.data.len() > max_bytes {
                            break;
                        }
                        bytes += chunk.data.len();
                        out.push(chunk.clone());
                    }
                    if let Some(last) = out.last() {
                        cursor.next_seq = last.seq + 1;
                        cursor.offset = last.file_offset + last.record_len();
                        cursor.offset_known = true;
                    }
                    return Next::Chunks(out);
                }
                let file_len = st.file_len;
                drop(st);
                if !cursor.offset_known {
                    match self.offset_of(cursor.next_seq) {
                        Ok(offset) => {
                            cursor.offset = offset;
                            cursor.offset_known = true;
                        }
                        Err(e) => log::error!("run log {}: {e}", self.path.display()),
                    }
                }
                return match self.read_file(cursor, file_len, max_bytes) {
                    Ok(chunks) if !chunks.is_empty() => Next::Chunks(chunks),
                    Ok(_) | Err(_) => {
                        // The file cannot give what memory no longer has: end this viewer.
                        log::error!("run log {}: unreadable for a viewer", self.path.display());
                        Next::End(self.outcome().unwrap_or_else(|| Arc::new(unreadable())))
                    }
                };
            }
            if let Some(end) = &st.end {
                return Next::End(end.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Next::Idle;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn read_file(
        &self,
        cursor: &mut Cursor,
        file_len: u64,
        max_bytes: usize,
    ) -> Result<Vec<Arc<Chunk>>, LogError> {
        let file = match &mut cursor.file {
            Some(f) => f,
            None => cursor.file.insert(File::open(&self.path)?),
        };
        let mut records = RecordReader::new(file, cursor.offset, file_len)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(chunk) = records.next_chunk(None)? {
            bytes += chunk.data.len();
            cursor.next_seq = chunk.seq + 1;
            cursor.offset = chunk.file_offset + chunk.record_len();
            out.push(Arc::new(chunk));
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Reads the stored bytes of one stream, from the start, calling `sink` per chunk until it
    /// returns false. Used to build result documents and downloads without holding them whole.
    pub fn for_each_stored(
        &self,
        stream: Option<Stream>,
        mut sink: impl FnMut(&Chunk) -> io::Result<bool>,
    ) -> Result<(), LogError> {
        let file_len = self.lock().file_len;
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

fn unreadable() -> Outcome {
    Outcome {
        return_code: -1,
        error: Some("the run log could not be read".into()),
        timed_out: false,
        finished_at: chrono::Utc::now(),
    }
}

fn encode_header(chunk: &Chunk) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(&chunk.seq.to_le_bytes());
    header[8..16].copy_from_slice(&chunk.time_ms.to_le_bytes());
    header[16] = chunk.stream.tag();
    header[17..25].copy_from_slice(&chunk.stream_offset.to_le_bytes());
    let len = u32::try_from(chunk.data.len()).unwrap_or(u32::MAX);
    header[25..29].copy_from_slice(&len.to_le_bytes());
    header
}

/// Writes a record's header and bytes with one `writev` (more only after a short write),
/// without copying the bytes into a buffer of their own.
fn write_record(file: &mut File, header: &[u8], data: &[u8]) -> io::Result<()> {
    let total = header.len() + data.len();
    let mut written = 0;
    while written < total {
        let result = if written < header.len() {
            file.write_vectored(&[IoSlice::new(&header[written..]), IoSlice::new(data)])
        } else {
            file.write(&data[written - header.len()..])
        };
        match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// (seq, time_ms, stream, stream_offset, data length) of a record header read at `offset`.
fn decode_header(
    header: &[u8; HEADER_LEN],
    offset: u64,
) -> Result<(u64, i64, Stream, u64, usize), LogError> {
    let field = |from: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[from..from + 8]);
        b
    };
    let stream = Stream::from_tag(header[16]).ok_or(LogError::Corrupt(offset))?;
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&header[25..29]);
    Ok((
        u64::from_le_bytes(field(0)),
        i64::from_le_bytes(field(8)),
        stream,
        u64::from_le_bytes(field(17)),
        u32::from_le_bytes(len_bytes) as usize,
    ))
}

/// Line breaks in a chunk as text shows them: LF, and CR not followed by LF.
pub fn count_line_breaks(data: &[u8]) -> u64 {
    let mut n = 0;
    for (i, &b) in data.iter().enumerate() {
        if b == b'\n' || (b == b'\r' && data.get(i + 1) != Some(&b'\n')) {
            n += 1;
        }
    }
    n
}

/// Keeps the first `keep` bytes of a stream and its last `keep / 2`.
fn keep_excerpt(keep: usize, ex: &mut Excerpt, data: &[u8]) {
    let head_room = keep.saturating_sub(ex.head.len());
    ex.head
        .extend_from_slice(&data[..head_room.min(data.len())]);
    let tail_keep = keep / 2;
    let take = data.len().min(tail_keep);
    ex.tail.extend(&data[data.len() - take..]);
    let excess = ex.tail.len().saturating_sub(tail_keep);
    ex.tail.drain(..excess);
}

/// A record's header as read from a log file.
struct RecordHeader {
    seq: u64,
    time_ms: i64,
    stream: Stream,
    stream_offset: u64,
    /// Length of the data after the header.
    len: usize,
    /// File offset of the record.
    start: u64,
}

/// Sequential reader of records in `[start, end)` of a log file.
struct RecordReader<'f> {
    file: &'f mut File,
    offset: u64,
    end: u64,
}

impl<'f> RecordReader<'f> {
    fn new(file: &'f mut File, start: u64, end: u64) -> Result<Self, LogError> {
        file.seek(SeekFrom::Start(start))?;
        Ok(RecordReader {
            file,
            offset: start,
            end,
        })
    }

    /// The next record's header; the file is then at its data, which the caller reads with
    /// [`RecordReader::read_data`] or skips with [`RecordReader::skip_data`].
    fn read_header(&mut self) -> Result<Option<RecordHeader>, LogError> {
        if self.offset + HEADER_LEN as u64 > self.end {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        self.file.read_exact(&mut header)?;
        let (seq, time_ms, stream, stream_offset, len) = decode_header(&header, self.offset)?;
        let start = self.offset;
        let record_end = start + (HEADER_LEN + len) as u64;
        if record_end > self.end {
            return Err(LogError::Corrupt(start));
        }
        self.offset = record_end;
        Ok(Some(RecordHeader {
            seq,
            time_ms,
            stream,
            stream_offset,
            len,
            start,
        }))
    }

    fn read_data(&mut self, header: &RecordHeader) -> Result<Vec<u8>, LogError> {
        let mut data = vec![0u8; header.len];
        self.file.read_exact(&mut data)?;
        Ok(data)
    }

    fn skip_data(&mut self) -> Result<(), LogError> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        Ok(())
    }

    /// The next chunk (of `only` if given, skipping others without reading their bytes).
    fn next_chunk(&mut self, only: Option<Stream>) -> Result<Option<Chunk>, LogError> {
        while let Some(header) = self.read_header()? {
            if only.is_some_and(|s| s != header.stream) {
                self.skip_data()?;
                continue;
            }
            let data = self.read_data(&header)?;
            return Ok(Some(Chunk {
                seq: header.seq,
                time_ms: header.time_ms,
                stream: header.stream,
                stream_offset: header.stream_offset,
                data,
                file_offset: header.start,
            }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::fresh_dir;

    fn temp_log(name: &str, excerpt: usize) -> RunLog {
        let dir = fresh_dir(&format!("runlog-{name}"));
        RunLog::create(&dir.join("run.log"), excerpt, u64::MAX).unwrap()
    }

    fn collect(log: &RunLog, cursor: &mut Cursor, max: usize) -> Vec<(u64, Stream, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            match log.next(cursor, max, Duration::from_millis(0)) {
                Next::Chunks(chunks) => {
                    out.extend(chunks.iter().map(|c| (c.seq, c.stream, c.data.clone())))
                }
                Next::Idle | Next::End(_) => return out,
            }
        }
    }

    fn outcome(code: i32) -> Outcome {
        Outcome {
            return_code: code,
            error: None,
            timed_out: false,
            finished_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn viewer_reads_in_order_from_memory_and_file() {
        let log = temp_log("order", 1024);
        let mut expected = Vec::new();
        // More than the window, so early chunks are only in the file.
        for i in 0..400u64 {
            let stream = if i % 3 == 0 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            let data = vec![b'a' + (i % 26) as u8; 1000 + i as usize];
            log.append(stream, &data);
            expected.push((i + FIRST_SEQ, stream, data));
        }
        log.finish(outcome(0));
        let mut cursor = log.cursor_at_start();
        let got = collect(&log, &mut cursor, 64 * 1024);
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "chunks differ");
        assert!(matches!(
            log.next(&mut cursor, 1024, Duration::ZERO),
            Next::End(_)
        ));
        assert_eq!(log.totals().last_seq, 400);
    }

    #[test]
    fn idle_then_live() {
        let log = Arc::new(temp_log("live", 1024));
        let mut cursor = log.cursor_at_start();
        assert!(matches!(
            log.next(&mut cursor, 1024, Duration::from_millis(10)),
            Next::Idle
        ));
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                log.append(Stream::Stdout, b"late");
            })
        };
        match log.next(&mut cursor, 1024, Duration::from_secs(5)) {
            Next::Chunks(c) => assert_eq!(c[0].data, b"late"),
            _ => panic!("expected the chunk"),
        }
        writer.join().unwrap();
    }

    #[test]
    fn stored_stream_filter() {
        let log = temp_log("filter", 1024);
        log.append(Stream::Stdout, b"out1 ");
        log.append(Stream::Stderr, b"err1 ");
        log.append(Stream::Stdout, b"out2");
        let mut out = Vec::new();
        log.for_each_stored(Some(Stream::Stdout), |c| {
            out.extend_from_slice(&c.data);
            Ok(true)
        })
        .unwrap();
        assert_eq!(out, b"out1 out2");
    }

    #[test]
    fn resume_at_any_seq_and_reopen() {
        let log = temp_log("resume", 1024);
        let mut all = Vec::new();
        for i in 0..3000u64 {
            let data = format!("line {i}\n").repeat(50).into_bytes();
            log.append(Stream::Stdout, &data);
            all.push(data);
        }
        log.finish(outcome(0));
        for start in [1u64, 2, 17, 1500, 2999, 3000] {
            let mut cursor = log.cursor_at(start).unwrap();
            let got = collect(&log, &mut cursor, 64 * 1024);
            assert_eq!(got.len() as u64, 3001 - start, "from {start}");
            assert_eq!(got[0].0, start);
            assert_eq!(got[0].2, all[start as usize - 1]);
        }
        let reopened = RunLog::open_finished(log.path(), outcome(0), false).unwrap();
        assert_eq!(reopened.totals().last_seq, 3000);
        let mut cursor = reopened.cursor_at(2500).unwrap();
        let got = collect(&reopened, &mut cursor, 64 * 1024);
        assert_eq!(got.len(), 501);
        assert_eq!(got[0].2, all[2499]);
    }

    #[test]
    fn reopen_ignores_partial_record() {
        let log = temp_log("partial", 1024);
        log.append(Stream::Stdout, b"whole\n");
        log.append(Stream::Stderr, b"also whole\n");
        let path = log.path().to_path_buf();
        drop(log);
        let mut f = File::options().append(true).open(&path).unwrap();
        f.write_all(&[1, 2, 3, 4, 5]).unwrap();
        let reopened = RunLog::open_finished(&path, outcome(-1), false).unwrap();
        let t = reopened.totals();
        assert_eq!((t.last_seq, t.stdout_bytes, t.stderr_bytes), (2, 6, 11));
    }

    #[test]
    fn tail_finds_the_chunk_of_the_nth_last_line() {
        let log = temp_log("tail", 1024);
        log.append(Stream::Stdout, b"l1\nl2\n"); // seq 1
        log.append(Stream::Stdout, b"l3\n"); // seq 2
        log.append(Stream::Stderr, b"l4\nl5"); // seq 3, l5 unterminated
        assert_eq!(log.tail_start(1).unwrap(), 3);
        assert_eq!(log.tail_start(2).unwrap(), 3);
        assert_eq!(log.tail_start(3).unwrap(), 2);
        assert_eq!(log.tail_start(4).unwrap(), 1);
        assert_eq!(log.tail_start(100).unwrap(), 1);
    }

    #[test]
    fn cap_stops_storing_but_counts() {
        let dir = fresh_dir("runlog-cap");
        let log = RunLog::create(&dir.join("run.log"), 16, 100).unwrap();
        log.append(Stream::Stdout, &[b'a'; 40]);
        log.append(Stream::Stdout, &[b'b'; 40]);
        log.append(Stream::Stdout, &[b'c'; 40]);
        // 29-byte headers: the second chunk is cut to the 2 bytes that still fit.
        assert_eq!(log.capped_at(), Some(3));
        assert_eq!(log.totals().stdout_bytes, 120);
        assert_eq!(log.totals().last_seq, 2);
        let mut stored = Vec::new();
        log.for_each_stored(None, |c| {
            stored.extend_from_slice(&c.data);
            Ok(true)
        })
        .unwrap();
        assert_eq!(stored.len(), 42);
    }

    #[test]
    fn excerpt_keeps_head_and_tail() {
        let log = temp_log("excerpt", 10);
        log.append(Stream::Stdout, b"0123456789");
        let ex = log.excerpt(Stream::Stdout);
        assert_eq!(ex.head, b"0123456789");
        assert_eq!(ex.omitted, 0);
        log.append(Stream::Stdout, b"abcdefghij");
        let ex = log.excerpt(Stream::Stdout);
        assert_eq!(ex.head, b"01234");
        assert_eq!(ex.tail, b"fghij");
        assert_eq!(ex.omitted, 10);
    }

    #[test]
    fn reopen_rebuilds_the_excerpts_of_each_stream() {
        let log = temp_log("reopen-excerpt", 10);
        log.append(Stream::Stdout, b"0123456789");
        log.append(Stream::Stderr, b"err\n");
        log.append(Stream::Stdout, b"abcdefghij");
        let path = log.path().to_path_buf();
        drop(log);
        let reopened = RunLog::open_finished_with_excerpts(&path, outcome(-1), 10).unwrap();
        let out = reopened.excerpt(Stream::Stdout);
        assert_eq!(
            (out.head, out.tail, out.omitted),
            (b"01234".to_vec(), b"fghij".to_vec(), 10)
        );
        let err = reopened.excerpt(Stream::Stderr);
        assert_eq!((err.head, err.omitted), (b"err\n".to_vec(), 0));
        // Without excerpts only the headers are read.
        let plain = RunLog::open_finished(&path, outcome(-1), false).unwrap();
        assert_eq!(plain.totals().stdout_bytes, 20);
        assert!(plain.excerpt(Stream::Stderr).head.is_empty());
    }
}
