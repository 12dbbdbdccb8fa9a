//! The run log's file format and its reader. Repeated per chunk (little endian): seq u64,
//! time_ms i64, stream u8 (1 stdout, 2 stderr), stream_offset u64, len u32, then `len` bytes.
//! A record is written with one `writev`; a partial record at the end (the server died while
//! writing it) ends the log. `replay` rebuilds a finished log's counters from the file.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};

use super::excerpt::{keep_excerpt, Excerpt};
use super::{Chunk, LogError, Stream, FIRST_SEQ, INDEX_EVERY};

pub(super) const HEADER_LEN: usize = 8 + 8 + 1 + 8 + 4;

impl Stream {
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
}

impl Chunk {
    /// Bytes of the chunk's record in the file.
    pub(super) fn record_len(&self) -> u64 {
        (HEADER_LEN + self.data.len()) as u64
    }
}

pub(super) fn encode_header(chunk: &Chunk) -> [u8; HEADER_LEN] {
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
pub(super) fn write_record(file: &mut File, header: &[u8], data: &[u8]) -> io::Result<()> {
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

/// A record's header as read from a log file.
pub(super) struct RecordHeader {
    pub(super) seq: u64,
    time_ms: i64,
    pub(super) stream: Stream,
    stream_offset: u64,
    /// Length of the data after the header.
    pub(super) len: usize,
    /// File offset of the record.
    pub(super) start: u64,
}

/// Sequential reader of records in `[start, end)` of a log file.
pub(super) struct RecordReader<'f> {
    file: &'f mut File,
    /// Where the next record starts.
    pub(super) offset: u64,
    end: u64,
}

impl<'f> RecordReader<'f> {
    pub(super) fn new(file: &'f mut File, start: u64, end: u64) -> Result<Self, LogError> {
        file.seek(SeekFrom::Start(start))?;
        Ok(RecordReader {
            file,
            offset: start,
            end,
        })
    }

    /// The next record's header; the file is then at its data, which the caller reads with
    /// [`RecordReader::read_data`] or skips with [`RecordReader::skip_data`].
    pub(super) fn read_header(&mut self) -> Result<Option<RecordHeader>, LogError> {
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

    pub(super) fn read_data(&mut self, header: &RecordHeader) -> Result<Vec<u8>, LogError> {
        let mut data = vec![0u8; header.len];
        self.file.read_exact(&mut data)?;
        Ok(data)
    }

    pub(super) fn skip_data(&mut self) -> Result<(), LogError> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        Ok(())
    }

    /// The next chunk (of `only` if given, skipping others without reading their bytes).
    pub(super) fn next_chunk(&mut self, only: Option<Stream>) -> Result<Option<Chunk>, LogError> {
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

/// What a pass over a finished log's file found.
pub(super) struct Replayed {
    pub(super) next_seq: u64,
    pub(super) stream_bytes: [u64; 2],
    /// The sparse (seq, file offset) index.
    pub(super) index: Vec<(u64, u64)>,
    /// Where the last whole record ends.
    pub(super) end_offset: u64,
    pub(super) excerpts: [Excerpt; 2],
}

/// Reads the records of `file` (of `len` bytes) up to the first that cannot be read: only
/// their headers, unless `excerpt_bytes` asks for the excerpts to be rebuilt from the bytes.
pub(super) fn replay(
    file: &mut File,
    len: u64,
    excerpt_bytes: usize,
) -> Result<Replayed, LogError> {
    let mut found = Replayed {
        next_seq: FIRST_SEQ,
        stream_bytes: [0; 2],
        index: vec![(FIRST_SEQ, 0)],
        end_offset: 0,
        excerpts: [Excerpt::default(), Excerpt::default()],
    };
    let mut records = RecordReader::new(file, 0, len)?;
    // A record that cannot be read ends the log (the server died while writing it).
    while let Ok(Some(header)) = records.read_header() {
        let data = if excerpt_bytes == 0 {
            records.skip_data().map(|()| Vec::new())
        } else {
            records.read_data(&header)
        };
        let Ok(data) = data else { break };
        let i = header.stream.index();
        keep_excerpt(excerpt_bytes, &mut found.excerpts[i], &data);
        if header.start >= found.index.last().map_or(0, |e| e.1) + INDEX_EVERY {
            found.index.push((header.seq, header.start));
        }
        found.stream_bytes[i] += header.len as u64;
        found.next_seq = header.seq.saturating_add(1);
        found.end_offset = records.offset;
    }
    Ok(found)
}
