//! Following an event stream across dropped connections: the reconnection timing, the loop
//! that retries with a growing backoff until a connection succeeds or the outage lasts too long,
//! and the reading of one connection's events that remembers the id to send as
//! `Last-Event-ID` on the next one. What an event means is the caller's.
#![forbid(unsafe_code)]

use std::io::{self, Read};
use std::thread;
use std::time::{Duration, Instant};

use super::http::Timeouts;
use super::sse::{SseEvent, SseParser};

/// Reconnection timing.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Wait before the first reconnection; doubled after each failed attempt.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Give up when no connection succeeded for this long. A connection counts as
    /// successful when it delivered an event with a new id, or stayed open for
    /// `healthy_after`; a link that drops every connection before anything new arrives
    /// (an id-less `run` event or keepalives are not new) therefore still ends.
    pub give_up_after: Duration,
    pub healthy_after: Duration,
    pub timeouts: Timeouts,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            give_up_after: Duration::from_secs(60),
            healthy_after: Duration::from_secs(10),
            timeouts: Timeouts {
                connect: Duration::from_secs(10),
                write: Duration::from_secs(30),
                // The server sends a keepalive every HEARTBEAT_SECONDS (15 by default); this
                // much silence means a dead connection, which is then resumed.
                read: Duration::from_secs(90),
            },
        }
    }
}

/// How one connection ended.
pub enum Attempt<T> {
    /// The stream reached its end as the caller defines it.
    Finished(T),
    /// Worth another try. `progressed`: the connection was a successful one before it
    /// failed (see [`RetryPolicy::healthy_after`]).
    Failed { progressed: bool, reason: String },
}

impl<T> Attempt<T> {
    /// A failed attempt that made no progress.
    pub fn failed(reason: impl std::fmt::Display) -> Attempt<T> {
        Attempt::Failed {
            progressed: false,
            reason: reason.to_string(),
        }
    }
}

/// Runs `attempt` until it finishes or fails for good (`Err`), waiting a growing backoff
/// between failures; after `give_up_after` without a successful connection, ends with
/// `gave_up(how long, the last failure)`.
pub fn with_retries<T, E>(
    policy: &RetryPolicy,
    mut attempt: impl FnMut() -> Result<Attempt<T>, E>,
    gave_up: impl FnOnce(Duration, String) -> E,
) -> Result<T, E> {
    let mut backoff = policy.first_backoff;
    let mut outage_started = Instant::now();
    loop {
        let (progressed, reason) = match attempt()? {
            Attempt::Finished(finished) => return Ok(finished),
            Attempt::Failed { progressed, reason } => (progressed, reason),
        };
        if progressed {
            backoff = policy.first_backoff;
            outage_started = Instant::now();
        }
        let waited = outage_started.elapsed();
        if waited >= policy.give_up_after {
            return Err(gave_up(waited, reason));
        }
        log::info!("event stream interrupted ({reason}); reconnecting in {backoff:?}");
        thread::sleep(backoff.min(policy.give_up_after - waited));
        backoff = (backoff * 2).min(policy.max_backoff);
    }
}

/// The `Last-Event-ID` header to send on a new connection, if an id was seen.
pub fn resume_header(resume_id: &str) -> Option<(&'static str, String)> {
    (!resume_id.is_empty()).then(|| ("Last-Event-ID", resume_id.to_owned()))
}

/// Reads one connection's event stream, handing each event to `on_event` until it returns
/// `Some`. `resume_id` is the id after the last handled event: the parser starts from it (an
/// event without an id cannot reset it) and it moves on after each event handled.
pub fn follow_stream<T, E>(
    body: &mut dyn Read,
    resume_id: &mut String,
    healthy_after: Duration,
    mut on_event: impl FnMut(&SseEvent) -> Result<Option<T>, E>,
) -> Result<Attempt<T>, E> {
    let mut parser = SseParser::resuming(resume_id.clone());
    let mut buffer = vec![0u8; 64 * 1024];
    let opened = Instant::now();
    let id_at_start = resume_id.clone();
    loop {
        let failure = match body.read(&mut buffer) {
            Ok(0) => "the stream ended before the run's end".to_owned(),
            Ok(n) => {
                for event in parser.feed(&buffer[..n]) {
                    if let Some(finished) = on_event(&event)? {
                        return Ok(Attempt::Finished(finished));
                    }
                    *resume_id = event.last_event_id;
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => e.to_string(),
        };
        return Ok(Attempt::Failed {
            progressed: *resume_id != id_at_start || opened.elapsed() >= healthy_after,
            reason: failure,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_id_moves_only_past_handled_events() {
        let mut body: &[u8] =
            b"id: 1\ndata: a\n\nevent: run\ndata: {}\n\nid: 2\ndata: b\n\nid: 3\ndata: stop\n\n";
        let mut resume_id = String::new();
        let mut seen = Vec::new();
        let attempt = follow_stream(&mut body, &mut resume_id, Duration::from_secs(10), |e| {
            seen.push(e.data.clone());
            Ok::<_, ()>((e.data == "stop").then_some(()))
        })
        .unwrap();
        assert!(matches!(attempt, Attempt::Finished(())));
        assert_eq!(seen, ["a", "{}", "b", "stop"]);
        assert_eq!(resume_id, "2");
        assert_eq!(
            resume_header(&resume_id),
            Some(("Last-Event-ID", "2".to_owned()))
        );
        assert_eq!(resume_header(""), None);
    }

    /// Whether reading `body` to its end, handling every event, counted as progress.
    fn progressed(mut body: &[u8], resume_id: &mut String) -> bool {
        let attempt = follow_stream(&mut body, resume_id, Duration::from_secs(10), |_| {
            Ok::<Option<()>, ()>(None)
        });
        match attempt.unwrap() {
            Attempt::Failed { progressed, .. } => progressed,
            Attempt::Finished(()) => panic!("no event finishes"),
        }
    }

    #[test]
    fn a_stream_cut_short_is_a_retry_that_counts_as_progress_only_with_a_new_id() {
        let mut resume_id = "7".to_owned();
        assert!(!progressed(b"event: run\ndata: {}\n\n", &mut resume_id));
        assert_eq!(resume_id, "7");
        assert!(progressed(b"id: 8\ndata: x\n\n", &mut resume_id));
        assert_eq!(resume_id, "8");
    }

    #[test]
    fn retries_until_finished_or_given_up() {
        let policy = RetryPolicy {
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            give_up_after: Duration::from_millis(50),
            ..RetryPolicy::default()
        };
        let mut tries = 0;
        let result: Result<u32, String> = with_retries(
            &policy,
            || {
                tries += 1;
                Ok(if tries < 3 {
                    Attempt::failed("down")
                } else {
                    Attempt::Finished(tries)
                })
            },
            |_, reason| reason,
        );
        assert_eq!(result, Ok(3));
        let result: Result<(), String> = with_retries(
            &policy,
            || Ok(Attempt::failed("still down")),
            |_, reason| format!("gave up: {reason}"),
        );
        assert_eq!(result, Err("gave up: still down".to_owned()));
    }
}
