//! The in-memory window: the newest chunks of a run, bounded in bytes, from which live viewers
//! read without touching the file. Appends never wait for viewers: the oldest chunks simply
//! drop out, and a viewer behind them reads the file instead.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;

use super::Chunk;

/// Most bytes of recent chunks kept in memory per run.
const WINDOW_BYTES: usize = 256 * 1024;

#[derive(Default)]
pub(super) struct Window {
    chunks: VecDeque<Arc<Chunk>>,
    bytes: usize,
}

impl Window {
    /// Adds the newest chunk, dropping the oldest past `WINDOW_BYTES` (never the last one).
    pub(super) fn push(&mut self, chunk: Chunk) {
        self.bytes += chunk.data.len();
        self.chunks.push_back(Arc::new(chunk));
        while self.bytes > WINDOW_BYTES && self.chunks.len() > 1 {
            if let Some(old) = self.chunks.pop_front() {
                self.bytes -= old.data.len();
            }
        }
    }

    /// The chunks from `seq` on, at most about `max_bytes` of them (always one at least), if
    /// the window still holds `seq`.
    pub(super) fn chunks_from(&self, seq: u64, max_bytes: usize) -> Option<Vec<Arc<Chunk>>> {
        let first = self.chunks.front().filter(|front| front.seq <= seq)?.seq;
        let skip = usize::try_from(seq - first).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut bytes = 0;
        for chunk in self.chunks.iter().skip(skip) {
            if !out.is_empty() && bytes + chunk.data.len() > max_bytes {
                break;
            }
            bytes += chunk.data.len();
            out.push(chunk.clone());
        }
        Some(out)
    }
}
