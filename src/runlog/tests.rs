//! The run log through its API: order across window and file, waiting, resuming, reopening,
//! the size cap and the history excerpts.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use super::cursor::Cursor;
use super::*;
use crate::test_dirs::fresh_dir;

fn temp_log(name: &str, excerpt: usize) -> RunLog {
    let dir = fresh_dir(&format!("runlog-{name}"));
    RunLog::create(&dir.join("run.log"), excerpt, u64::MAX).unwrap()
}

fn collect(log: &RunLog, cursor: &mut Cursor, max: usize) -> Vec<(u64, Stream, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        match log.read(cursor, max, Duration::from_millis(0)) {
            CursorRead::Chunks(chunks) => {
                out.extend(chunks.iter().map(|c| (c.seq, c.stream, c.data.clone())))
            }
            CursorRead::Idle | CursorRead::End(_) => return out,
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
        log.read(&mut cursor, 1024, Duration::ZERO),
        CursorRead::End(_)
    ));
    assert_eq!(log.totals().last_seq, 400);
}

#[test]
fn idle_then_live() {
    let log = Arc::new(temp_log("live", 1024));
    let mut cursor = log.cursor_at_start();
    assert!(matches!(
        log.read(&mut cursor, 1024, Duration::from_millis(10)),
        CursorRead::Idle
    ));
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            log.append(Stream::Stdout, b"late");
        })
    };
    match log.read(&mut cursor, 1024, Duration::from_secs(5)) {
        CursorRead::Chunks(c) => assert_eq!(c[0].data, b"late"),
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

#[test]
fn stored_chunks_are_the_same_from_the_window_and_from_the_file() {
    let collect_stored = |log: &RunLog, stream: Option<Stream>| {
        let mut got = Vec::new();
        log.for_each_stored(stream, |c| {
            got.push((c.seq, c.stream, c.data.clone()));
            Ok(true)
        })
        .unwrap();
        got
    };
    for (name, chunk_bytes) in [("small", 10usize), ("evicted", 10_000)] {
        let log = temp_log(name, 1024);
        for i in 0..100usize {
            let stream = if i % 3 == 0 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            log.append(
                stream,
                format!("{i:09}\n").repeat(chunk_bytes / 10).as_bytes(),
            );
        }
        log.finish(outcome(0));
        // A reopened log has no window: it reads the file.
        let from_file = RunLog::open_finished(log.path(), outcome(0), false).unwrap();
        for stream in [None, Some(Stream::Stdout), Some(Stream::Stderr)] {
            let live = collect_stored(&log, stream);
            assert_eq!(
                live,
                collect_stored(&from_file, stream),
                "{name} {stream:?}"
            );
            let expected = match stream {
                None => 100,
                Some(Stream::Stderr) => 34,
                Some(Stream::Stdout) => 66,
            };
            assert_eq!(live.len(), expected, "{name} {stream:?}");
        }
        // Stopping early stops the walk on either path.
        let mut seen = 0;
        log.for_each_stored(None, |_| {
            seen += 1;
            Ok(seen < 5)
        })
        .unwrap();
        assert_eq!(seen, 5, "{name}");
    }
}
