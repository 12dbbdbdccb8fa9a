//! The runbooks the benchmark executes, written into its own temporary `RUNBOOKS_DIR`, and
//! the exact output each is expected to produce.
#![forbid(unsafe_code)]

use std::path::Path;

use crate::error::BenchError;

/// One benchmark runbook.
pub struct Book {
    pub file: &'static str,
    /// Declared (required) environment variables.
    pub env: &'static [&'static str],
    pub script: &'static str,
}

/// A tiny run used to warm the server up before measuring its memory.
pub const WARM_UP: Book = Book {
    file: "WarmUp.md",
    env: &[],
    script: "echo warm",
};

/// A partial line, a pause, the rest of the line.
pub const GAP: Book = Book {
    file: "Gap.md",
    env: &[],
    script: "printf 'a'; sleep 1; printf 'b\\n'",
};

/// One million numbered lines.
pub const SEQ: Book = Book {
    file: "Seq.md",
    env: &[],
    script: "seq 1 1000000",
};

/// The line repeated by the bulk-output runbooks (61 characters and a newline).
pub const BULK_LINE: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n";

/// 100 MB of output.
pub const OUT_100M: Book = Book {
    file: "Out100M.md",
    env: &[],
    script: "yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx | head -c 100000000",
};

/// 1 GB of output.
pub const OUT_1G: Book = Book {
    file: "Out1G.md",
    env: &[],
    script:
        "yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx | head -c 1000000000",
};

/// Waits `DELAY` seconds (for viewers to attach), then prints 10 000 numbered lines.
pub const LINES_10K: Book = Book {
    file: "Lines10K.md",
    env: &["DELAY"],
    script: "sleep \"$DELAY\"\ni=1; while [ $i -le 10000 ]; do echo \"line $i\"; i=$((i+1)); done",
};

/// Waits `DELAY` seconds, then for 4 s prints its wall-clock time in microseconds every 20 ms.
pub const STAMPS: Book = Book {
    file: "Stamps.md",
    env: &["DELAY"],
    script: concat!(
        "#!/usr/bin/env python3\n",
        "import os\n",
        "import time\n",
        "time.sleep(float(os.environ[\"DELAY\"]))\n",
        "end = time.time() + 4\n",
        "while time.time() < end:\n",
        "    print(time.time_ns() // 1000, flush=True)\n",
        "    time.sleep(0.02)",
    ),
};

/// A 2-second streaming run: 20 ticks, 0.1 s apart.
pub const TICKS: Book = Book {
    file: "Ticks.md",
    env: &[],
    script: "i=0; while [ $i -lt 20 ]; do echo tick $i; sleep 0.1; i=$((i+1)); done",
};

/// The smallest useful run: the fixed cost of a run.
pub const ECHO: Book = Book {
    file: "Echo.md",
    env: &[],
    script: "echo hi",
};

/// The 2-second streaming script of issue 11: 20 lines, 0.1 s apart.
pub const LINES20: Book = Book {
    file: "Lines20.md",
    env: &[],
    script: "for i in $(seq 1 20); do echo line $i; sleep 0.1; done",
};

/// One line, then the wall-clock time in nanoseconds as the script's last act.
pub const EXIT_STAMP: Book = Book {
    file: "ExitStamp.md",
    env: &[],
    script: "echo start\ndate +%s%N",
};

const ALL: [&Book; 11] = [
    &WARM_UP,
    &GAP,
    &SEQ,
    &OUT_100M,
    &OUT_1G,
    &LINES_10K,
    &STAMPS,
    &TICKS,
    &ECHO,
    &LINES20,
    &EXIT_STAMP,
];

/// The runbook text of `book`.
fn markdown(book: &Book) -> String {
    let name = book.file.trim_end_matches(".md");
    let env: String = book
        .env
        .iter()
        .map(|var| format!("{var}: set by the benchmark\n"))
        .collect();
    format!(
        "# {name}\nA runbook of the runbookd benchmark.\n\n\
         # Environment Requirements\n```yaml\n{env}```\n\n\
         # File System Requirements\n```yaml\nInput:\n```\n\n\
         # Script\n```sh\n{}\n```\n\n# History\n",
        book.script
    )
}

/// Writes every benchmark runbook into `dir`.
pub fn write_all(dir: &Path) -> Result<(), BenchError> {
    for book in ALL {
        let path = dir.join(book.file);
        std::fs::write(&path, markdown(book))
            .map_err(BenchError::io(format!("write {}", path.display())))?;
    }
    Ok(())
}

/// What `seq 1 1000000` prints.
pub fn seq_output() -> Vec<u8> {
    let mut out = Vec::with_capacity(6_888_896);
    for i in 1..=1_000_000u32 {
        out.extend_from_slice(format!("{i}\n").as_bytes());
    }
    out
}

/// What `LINES_10K` prints.
pub fn lines_10k_output() -> Vec<u8> {
    (1..=10_000u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect()
}

/// What `TICKS` prints.
pub fn ticks_output() -> Vec<u8> {
    (0..20u32)
        .flat_map(|i| format!("tick {i}\n").into_bytes())
        .collect()
}

/// What `LINES20` prints.
pub fn lines20_output() -> Vec<u8> {
    (1..=20u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect()
}

/// Checks a stream piece by piece against an expected byte string, without storing it.
pub struct ExpectedBytes<'a> {
    expected: &'a [u8],
    received: usize,
    first_difference: Option<usize>,
}

impl<'a> ExpectedBytes<'a> {
    pub fn new(expected: &'a [u8]) -> ExpectedBytes<'a> {
        ExpectedBytes {
            expected,
            received: 0,
            first_difference: None,
        }
    }

    /// Takes the next received piece.
    pub fn feed(&mut self, piece: &[u8]) {
        if self.first_difference.is_none() {
            let start = self.received.min(self.expected.len());
            let end = (self.received + piece.len()).min(self.expected.len());
            let want = &self.expected[start..end];
            if want.len() < piece.len() {
                self.first_difference = Some(self.received + want.len());
            }
            if want != &piece[..want.len()] {
                // Slow path only on a difference: find where.
                let at = want.iter().zip(piece).position(|(a, b)| a != b);
                self.first_difference = Some(self.received + at.unwrap_or_default());
            }
        }
        self.received += piece.len();
    }

    pub fn received(&self) -> usize {
        self.received
    }

    /// Whether everything matched and nothing is missing.
    pub fn is_exact(&self) -> bool {
        self.first_difference.is_none() && self.received == self.expected.len()
    }

    /// A short description of the difference, if any.
    pub fn describe(&self) -> String {
        match self.first_difference {
            Some(at) => format!("first difference at byte {at} of {}", self.received),
            None if self.received != self.expected.len() => format!(
                "received {} of {} bytes",
                self.received,
                self.expected.len()
            ),
            None => "exact".into(),
        }
    }
}

/// Checks a stream that must be `line` repeated, cut at `total` bytes.
pub struct RepeatedLine {
    line: &'static [u8],
    total: u64,
    received: u64,
    first_difference: Option<u64>,
}

impl RepeatedLine {
    pub fn new(line: &'static str, total: u64) -> RepeatedLine {
        RepeatedLine {
            line: line.as_bytes(),
            total,
            received: 0,
            first_difference: None,
        }
    }

    /// Takes the next received piece.
    pub fn feed(&mut self, mut piece: &[u8]) {
        let period = self.line.len();
        let mut at = self.received;
        self.received += piece.len() as u64;
        if self.first_difference.is_some() {
            return;
        }
        while !piece.is_empty() {
            let phase = (at % period as u64) as usize;
            let take = (period - phase).min(piece.len());
            if piece[..take] != self.line[phase..phase + take] {
                self.first_difference = Some(at);
                return;
            }
            piece = &piece[take..];
            at += take as u64;
        }
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn is_exact(&self) -> bool {
        self.first_difference.is_none() && self.received == self.total
    }

    pub fn describe(&self) -> String {
        match self.first_difference {
            Some(at) => format!("first difference at byte {at}"),
            None if self.received != self.total => {
                format!("received {} of {} bytes", self.received, self.total)
            }
            None => "exact".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_outputs_have_the_documented_sizes() {
        assert_eq!(seq_output().len(), 6_888_896);
        assert_eq!(BULK_LINE.len(), 62);
        assert_eq!(ticks_output().len(), 10 * 7 + 10 * 8);
    }

    #[test]
    fn expected_bytes_checks_pieces() {
        let mut check = ExpectedBytes::new(b"hello world");
        check.feed(b"hel");
        check.feed(b"lo wor");
        assert!(!check.is_exact());
        check.feed(b"ld");
        assert!(check.is_exact());
        check.feed(b"!");
        assert!(!check.is_exact());
        let mut wrong = ExpectedBytes::new(b"abc");
        wrong.feed(b"abd");
        assert_eq!(wrong.describe(), "first difference at byte 2 of 3");
    }

    #[test]
    fn repeated_line_checks_across_pieces() {
        let mut check = RepeatedLine::new("ab\n", 7);
        check.feed(b"ab\na");
        check.feed(b"b\na");
        assert!(check.is_exact());
        let mut wrong = RepeatedLine::new("ab\n", 6);
        wrong.feed(b"ab\nab");
        wrong.feed(b"x");
        assert!(!wrong.is_exact());
        assert_eq!(wrong.describe(), "first difference at byte 5");
    }
}
