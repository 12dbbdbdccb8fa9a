//! The viewers' side of the run log: a `Cursor` per viewer, and reading at it, from the window
//! while the viewer keeps up and from the file when it fell behind, waiting on the log's
//! condvar (woken by every append and by the end) for what is not written yet.
#![forbid(unsafe_code)]

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::format::RecordReader;
use super::{Chunk, LogError, Outcome, RunLog, FIRST_SEQ};

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

/// What a viewer gets from `RunLog::read`.
pub enum CursorRead {
    Chunks(Vec<Arc<Chunk>>),
    /// Nothing new within the wait; the run goes on.
    Idle,
    /// The viewer has every chunk and the run is over.
    End(Arc<Outcome>),
}

impl RunLog {
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

    /// Waits up to `wait` for chunks at the cursor; returns at most about `max_bytes` of them
    /// (always at least one when any is there).
    pub fn read(&self, cursor: &mut Cursor, max_bytes: usize, wait: Duration) -> CursorRead {
        let deadline = crate::clock::instant_after(wait);
        let mut st = self.lock();
        loop {
            if cursor.next_seq < st.next_seq {
                if let Some(out) = st.window.chunks_from(cursor.next_seq, max_bytes) {
                    if let Some(last) = out.last() {
                        cursor.next_seq = last.seq + 1;
                        cursor.offset = last.file_offset + last.record_len();
                        cursor.offset_known = true;
                    }
                    return CursorRead::Chunks(out);
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
                    Ok(chunks) if !chunks.is_empty() => CursorRead::Chunks(chunks),
                    Ok(_) | Err(_) => {
                        // The file cannot give what memory no longer has: end this viewer.
                        log::error!("run log {}: unreadable for a viewer", self.path.display());
                        CursorRead::End(self.outcome().unwrap_or_else(|| Arc::new(unreadable())))
                    }
                };
            }
            if let Some(end) = &st.end {
                return CursorRead::End(end.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return CursorRead::Idle;
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
}

fn unreadable() -> Outcome {
    Outcome {
        return_code: -1,
        error: Some("the run log could not be read".into()),
        timed_out: false,
        finished_at: chrono::Utc::now(),
    }
}
