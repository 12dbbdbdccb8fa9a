//! Memory of the server process from `/proc/PID/status`: current `VmRSS`, peak `VmHWM`
//! (resettable through `clear_refs`), and a sampler thread that records the largest `VmRSS`
//! seen every 20 ms.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::BenchError;

/// Sampling period.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// One `kB` field of `/proc/PID/status`.
pub fn status_kib(pid: u32, field: &str) -> Result<u64, BenchError> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(BenchError::io(format!("read {path}")))?;
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .ok_or_else(|| BenchError::Server(format!("no {field} in {path}")))
}

/// Resets the process's `VmHWM` to its current RSS (writing 5 to `clear_refs`).
pub fn reset_peak(pid: u32) -> Result<(), BenchError> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").map_err(BenchError::io(format!("write {path}")))
}

/// A running sampler.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling `VmRSS` of `pid`.
    pub fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(AtomicU64::new(0));
        let (s, p, n) = (stop.clone(), peak.clone(), samples.clone());
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Ok(kib) = status_kib(pid, "VmRSS") {
                        p.fetch_max(kib, Ordering::Relaxed);
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })
            .ok();
        Sampler {
            stop,
            peak,
            samples,
            thread,
        }
    }

    /// Stops sampling; returns (largest VmRSS in KiB, number of samples).
    pub fn finish(mut self) -> (u64, u64) {
        self.halt();
        (
            self.peak.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.halt();
    }
}
