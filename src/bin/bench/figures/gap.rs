//! `gap`: an SSE execute of `printf 'a'; sleep 1; printf 'b\n'`; the time between the wire
//! arrival of `a` and of `b` shows that a partial line is forwarded at once (goal ≥ 0.8 s).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use super::{note_server_stderr, Bench, Outcome};
use crate::api::{expect_success, read_run};
use crate::error::BenchError;
use crate::runbooks::GAP;
use crate::stats::{median, verdict};

const REPEATS: usize = 3;
const GOAL_SECONDS: f64 = 0.8;

pub fn run(bench: &Bench) -> Result<Outcome, BenchError> {
    let (server, api) = bench.start(&[])?;
    let mut gaps = Vec::new();
    for _ in 0..REPEATS {
        let mut connection = api.execute_sse(GAP.file, &[])?;
        let mut text = Vec::new();
        let mut a_at: Option<Instant> = None;
        let mut b_at: Option<Instant> = None;
        let end = read_run(
            &mut connection,
            Instant::now() + Duration::from_secs(30),
            |event| {
                text.extend_from_slice(event.data);
                if a_at.is_none() && event.data.contains(&b'a') {
                    a_at = Some(event.at);
                }
                if b_at.is_none() && event.data.contains(&b'b') {
                    b_at = Some(event.at);
                }
            },
        )?;
        expect_success(&end, "gap run")?;
        if text != b"ab\n" {
            return Err(BenchError::Mismatch(format!(
                "gap run printed {:?}",
                String::from_utf8_lossy(&text)
            )));
        }
        let (Some(a), Some(b)) = (a_at, b_at) else {
            return Err(BenchError::Mismatch("a or b never arrived".into()));
        };
        gaps.push(b.duration_since(a).as_secs_f64());
    }
    let med = median(&gaps);
    let min = gaps.iter().copied().fold(f64::INFINITY, f64::min);
    let met = min >= GOAL_SECONDS;
    let each: Vec<String> = gaps.iter().map(|g| format!("{g:.3}")).collect();
    println!(
        "gap: median {med:.3} s over {REPEATS} runs (each {} s), goal every gap >= {GOAL_SECONDS} s: {}",
        each.join(", "),
        verdict(met)
    );
    note_server_stderr(&server);
    Ok(Outcome {
        summary: format!("gap {med:.2} s"),
        goal_met: Some(met),
        rows: Vec::new(),
    })
}
