//! The run's output as lines: for `GET /api/runs/{id}/logs` one entry per line per stream,
//! numbered from 1 in the order lines complete, each with the time its first byte arrived, its
//! stream and a level guessed from its words. Read from the log file in two passes (count, then
//! emit the wanted tail one line at a time), so memory stays bounded whatever the log's size;
//! and for `/events?tail=N`, the chunk where the N-th last line starts (`tail_start`).
#![forbid(unsafe_code)]

use std::io;

use crate::output_text::normalize;
use crate::runlog::{LogError, RunLog, Stream, FIRST_SEQ};

/// Longest line text kept; longer lines are cut (the rest is still in the download).
const MAX_LINE_CHARS: usize = 16 * 1024;

/// Which lines to return.
pub struct LineQuery {
    pub tail: usize,
    /// Only lines that started strictly after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub stream: Option<Stream>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub line: u64,
    pub time_ms: i64,
    pub stream: Stream,
    pub level: &'static str,
    pub text: String,
}

#[derive(Default)]
struct Partial {
    text: String,
    time_ms: i64,
    cut: bool,
}

/// What a first pass over the log found: how many lines match and how far it read. A second
/// pass (`for_each_line`) reads the same records, so it sees the same lines even while the run
/// goes on writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineCount {
    pub matching: u64,
    /// Sequence number of the last chunk read (0: none).
    last_seq: u64,
}

impl LineCount {
    /// Whether `tail` leaves some matching lines out.
    pub fn truncated(&self, tail: usize) -> bool {
        self.matching > tail as u64
    }
}

/// Counts the lines matching `query` (ignoring its `tail`), holding at most one partial line
/// per stream.
pub fn count_lines(log: &RunLog, query: &LineQuery) -> Result<LineCount, LogError> {
    let mut matching = 0u64;
    let last_seq = scan(log, query, None, |_| {
        matching += 1;
        Ok(())
    })?;
    Ok(LineCount { matching, last_seq })
}

/// Calls `sink` with each of the last `query.tail` matching lines of those `count` found, in
/// order, one line in memory at a time.
pub fn for_each_line(
    log: &RunLog,
    query: &LineQuery,
    count: &LineCount,
    mut sink: impl FnMut(LogLine) -> io::Result<()>,
) -> Result<(), LogError> {
    let skip = count.matching.saturating_sub(query.tail as u64);
    let mut index = 0u64;
    scan(log, query, Some(count.last_seq), |line| {
        index += 1;
        if index > skip && index <= count.matching {
            sink(line)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Sequence number of the chunk holding the start of the `lines`-th line from the end
/// (counting an unterminated last line), read from the log file in two passes.
pub fn tail_start(log: &RunLog, lines: u64) -> Result<u64, LogError> {
    // Pass 1: how many lines are there?
    let mut newlines = 0u64;
    let mut last_byte = b'\n';
    let mut last_seq = 0u64;
    log.for_each_stored(None, |chunk| {
        newlines += count_line_breaks(&chunk.data);
        if let Some(b) = chunk.data.last() {
            last_byte = *b;
        }
        last_seq = chunk.seq;
        Ok(true)
    })?;
    let total = newlines + u64::from(!matches!(last_byte, b'\n' | b'\r'));
    if lines >= total {
        return Ok(FIRST_SEQ);
    }
    // The wanted line starts after this many line breaks; pass 2 reads the same chunks.
    let skip = total - lines;
    let mut seen = 0u64;
    let mut found = FIRST_SEQ;
    log.for_each_stored(None, |chunk| {
        if chunk.seq > last_seq {
            return Ok(false);
        }
        let here = count_line_breaks(&chunk.data);
        if seen + here >= skip {
            // The skip-th break is in this chunk; the line starts after it, which is in this
            // chunk unless the break is the chunk's last byte.
            let ends_with_break = matches!(chunk.data.last(), Some(b'\n' | b'\r'));
            found = if seen + here == skip && ends_with_break {
                chunk.seq + 1
            } else {
                chunk.seq
            };
            return Ok(false);
        }
        seen += here;
        Ok(true)
    })?;
    Ok(found)
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

/// Returns the matching lines (at most `tail`, the last ones) and whether some were left out.
#[cfg(test)]
pub fn read_lines(log: &RunLog, query: &LineQuery) -> Result<(Vec<LogLine>, bool), LogError> {
    let count = count_lines(log, query)?;
    let mut lines = Vec::new();
    for_each_line(log, query, &count, |l| {
        lines.push(l);
        Ok(())
    })?;
    Ok((lines, count.truncated(query.tail)))
}

/// Walks the stored output as numbered lines, calling `sink` with each line that passes the
/// query's stream and time filters, up to the chunk `upto_seq` (None: all stored); returns the
/// sequence number of the last chunk read.
fn scan(
    log: &RunLog,
    query: &LineQuery,
    upto_seq: Option<u64>,
    mut sink: impl FnMut(LogLine) -> io::Result<()>,
) -> Result<u64, LogError> {
    let since_ms = query.since.map(|t| t.timestamp_millis());
    let mut partial: [Option<Partial>; 2] = [None, None];
    let mut next_line = 1u64;
    let mut last_seq = 0u64;
    let mut emit = |stream: Stream, p: Partial, next_line: &mut u64| -> io::Result<()> {
        let number = *next_line;
        *next_line += 1;
        if query.stream.is_some_and(|s| s != stream) || since_ms.is_some_and(|s| p.time_ms <= s) {
            return Ok(());
        }
        sink(LogLine {
            line: number,
            time_ms: p.time_ms,
            stream,
            level: level_of(&p.text, stream),
            text: p.text,
        })
    };
    log.for_each_stored(None, |chunk| {
        if upto_seq.is_some_and(|upto| chunk.seq > upto) {
            return Ok(false);
        }
        last_seq = chunk.seq;
        let slot = match chunk.stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        };
        let text = normalize(&chunk.data);
        let mut pieces = text.split('\n').peekable();
        while let Some(piece) = pieces.next() {
            let complete = pieces.peek().is_some();
            let p = partial[slot].get_or_insert_with(|| Partial {
                time_ms: chunk.time_ms,
                ..Partial::default()
            });
            if !p.cut {
                let room = MAX_LINE_CHARS.saturating_sub(p.text.len());
                if piece.len() > room {
                    let mut end = room;
                    while !piece.is_char_boundary(end) {
                        end -= 1;
                    }
                    p.text.push_str(&piece[..end]);
                    p.text.push('…');
                    p.cut = true;
                } else {
                    p.text.push_str(piece);
                }
            }
            if complete {
                if let Some(done) = partial[slot].take() {
                    emit(chunk.stream, done, &mut next_line)?;
                }
            } else if piece.is_empty() && partial[slot].as_ref().is_some_and(|p| p.text.is_empty())
            {
                // Nothing of the next line yet: do not date it from this chunk.
                partial[slot] = None;
            }
        }
        Ok(true)
    })?;
    // Unterminated last lines, in the order they started.
    let mut rest: Vec<(Stream, Partial)> = Vec::new();
    for (slot, stream) in [(0, Stream::Stdout), (1, Stream::Stderr)] {
        if let Some(p) = partial[slot].take() {
            rest.push((stream, p));
        }
    }
    rest.sort_by_key(|(_, p)| p.time_ms);
    for (stream, p) in rest {
        emit(stream, p, &mut next_line)?;
    }
    Ok(last_seq)
}

/// ERROR, WARNING (or WARN), DEBUG, INFO, the first of them found as a word (in that order of
/// precedence); otherwise INFO for stdout and WARNING for stderr.
pub fn level_of(text: &str, stream: Stream) -> &'static str {
    let mut found = [false; 4];
    for word in text.split(|c: char| !c.is_ascii_alphanumeric()) {
        if word.eq_ignore_ascii_case("error") {
            found[0] = true;
        } else if word.eq_ignore_ascii_case("warning") || word.eq_ignore_ascii_case("warn") {
            found[1] = true;
        } else if word.eq_ignore_ascii_case("debug") {
            found[2] = true;
        } else if word.eq_ignore_ascii_case("info") {
            found[3] = true;
        }
    }
    let levels = ["ERROR", "WARNING", "DEBUG", "INFO"];
    match found.iter().position(|f| *f) {
        Some(i) => levels[i],
        None if stream == Stream::Stderr => "WARNING",
        None => "INFO",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::fresh_dir;

    fn log_with(chunks: &[(Stream, &[u8])]) -> RunLog {
        let dir = fresh_dir("loglines");
        let log = RunLog::create(&dir.join("run.log"), 1024, u64::MAX).unwrap();
        for (s, d) in chunks {
            log.append(*s, d);
        }
        log
    }

    fn all() -> LineQuery {
        LineQuery {
            tail: 500,
            since: None,
            stream: None,
        }
    }

    #[test]
    fn lines_across_chunks_and_streams() {
        let log = log_with(&[
            (Stream::Stdout, b"one\ntw"),
            (Stream::Stderr, b"error: bad\n"),
            (Stream::Stdout, b"o\r\nthree"),
        ]);
        let (lines, cut) = read_lines(&log, &all()).unwrap();
        let texts: Vec<(u64, &str, &str)> = lines
            .iter()
            .map(|l| (l.line, l.text.as_str(), l.level))
            .collect();
        assert_eq!(
            texts,
            vec![
                (1, "one", "INFO"),
                (2, "error: bad", "ERROR"),
                (3, "two", "INFO"),
                (4, "three", "INFO"),
            ]
        );
        assert!(!cut);
    }

    #[test]
    fn tail_and_stream_filter() {
        let log = log_with(&[(Stream::Stdout, b"a\nb\nc\n"), (Stream::Stderr, b"x\n")]);
        let q = LineQuery {
            tail: 2,
            since: None,
            stream: Some(Stream::Stdout),
        };
        let (lines, cut) = read_lines(&log, &q).unwrap();
        assert_eq!(
            lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert!(cut);
        let q = LineQuery {
            tail: 10,
            since: None,
            stream: Some(Stream::Stderr),
        };
        let (lines, _) = read_lines(&log, &q).unwrap();
        assert_eq!(lines[0].line, 4);
        assert_eq!(lines[0].level, "WARNING");
    }

    #[test]
    fn second_pass_sees_what_the_first_counted_while_the_log_grows() {
        let log = log_with(&[(Stream::Stdout, b"a\nb\nc\npart")]);
        let q = LineQuery {
            tail: 2,
            since: None,
            stream: None,
        };
        let count = count_lines(&log, &q).unwrap();
        assert_eq!(count.matching, 4);
        assert!(count.truncated(2));
        log.append(Stream::Stdout, b"ial\nd\n");
        let mut seen = Vec::new();
        for_each_line(&log, &q, &count, |l| {
            seen.push((l.line, l.text));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(3, "c".to_string()), (4, "part".to_string())]);
    }

    #[test]
    fn levels() {
        assert_eq!(level_of("an Error and a warning", Stream::Stdout), "ERROR");
        assert_eq!(level_of("WARN: x", Stream::Stdout), "WARNING");
        assert_eq!(level_of("debugging", Stream::Stdout), "INFO");
        assert_eq!(level_of("[debug] x", Stream::Stderr), "DEBUG");
        assert_eq!(level_of("plain", Stream::Stderr), "WARNING");
        assert_eq!(level_of("info on stderr", Stream::Stderr), "INFO");
    }

    #[test]
    fn tail_finds_the_chunk_of_the_nth_last_line() {
        let log = log_with(&[]);
        log.append(Stream::Stdout, b"l1\nl2\n"); // seq 1
        log.append(Stream::Stdout, b"l3\n"); // seq 2
        log.append(Stream::Stderr, b"l4\nl5"); // seq 3, l5 unterminated
        assert_eq!(tail_start(&log, 1).unwrap(), 3);
        assert_eq!(tail_start(&log, 2).unwrap(), 3);
        assert_eq!(tail_start(&log, 3).unwrap(), 2);
        assert_eq!(tail_start(&log, 4).unwrap(), 1);
        assert_eq!(tail_start(&log, 100).unwrap(), 1);
    }
}
