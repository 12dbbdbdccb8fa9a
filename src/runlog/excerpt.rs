//! The history excerpt of each stream: its first bytes and its last, bounded, kept as output
//! is appended (or rebuilt from the file after a restart), and cut at character boundaries
//! for the History entry.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use crate::chunker::{utf8_ceil, utf8_floor};

/// Head and tail of one stream kept for the history entry, bounded by `keep` bytes.
#[derive(Debug, Default)]
pub(super) struct Excerpt {
    head: Vec<u8>,
    tail: VecDeque<u8>,
}

/// The head and tail of a stream for history, with the count of bytes between them.
#[derive(Debug, Clone, Default)]
pub struct StreamExcerptBytes {
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
    pub omitted: u64,
}

/// Keeps the first `keep` bytes of a stream and its last `keep / 2`.
pub(super) fn keep_excerpt(keep: usize, ex: &mut Excerpt, data: &[u8]) {
    let head_room = keep.saturating_sub(ex.head.len());
    ex.head
        .extend_from_slice(&data[..head_room.min(data.len())]);
    let tail_keep = keep / 2;
    let take = data.len().min(tail_keep);
    ex.tail.extend(&data[data.len() - take..]);
    let excess = ex.tail.len().saturating_sub(tail_keep);
    ex.tail.drain(..excess);
}

impl Excerpt {
    /// What the history entry shows of a stream of `total` bytes: all of it if it fits in
    /// `excerpt_bytes`, else a head and a tail of half that size each, cut at character
    /// boundaries.
    pub(super) fn shown(&self, total: u64, excerpt_bytes: usize) -> StreamExcerptBytes {
        if total <= excerpt_bytes as u64 {
            return StreamExcerptBytes {
                head: self.head.clone(),
                tail: Vec::new(),
                omitted: 0,
            };
        }
        let half = excerpt_bytes / 2;
        let head_end = utf8_floor(&self.head, half);
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        let tail_start = utf8_ceil(&tail, 0);
        let shown = (head_end + tail.len() - tail_start) as u64;
        StreamExcerptBytes {
            head: self.head[..head_end].to_vec(),
            tail: tail[tail_start..].to_vec(),
            omitted: total.saturating_sub(shown),
        }
    }
}
