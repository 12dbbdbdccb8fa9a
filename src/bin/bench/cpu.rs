//! CPU time, to show where a figure's wall time goes on a machine with few cores: the server's
//! own threads and the scripts it reaped (`/proc/PID/stat`), and the clients this bench started
//! and waited for (`getrusage(RUSAGE_CHILDREN)`). When the processors are busy all along, wall
//! time cannot fall below the CPU time of everything that ran divided by their number.
#![forbid(unsafe_code)]

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeValLike;

use crate::error::BenchError;

/// Ticks per second of `/proc/PID/stat` times: `USER_HZ`, 100 on every Linux architecture
/// this runs on (part of the kernel's ABI, independent of its internal tick rate).
const USER_HZ: f64 = 100.0;

/// CPU seconds of the server so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerCpu {
    /// Its own threads.
    pub own: f64,
    /// Its children it has reaped: the scripts, with what they reaped in turn.
    pub scripts: f64,
}

impl std::ops::Sub for ServerCpu {
    type Output = ServerCpu;
    fn sub(self, earlier: ServerCpu) -> ServerCpu {
        ServerCpu {
            own: self.own - earlier.own,
            scripts: self.scripts - earlier.scripts,
        }
    }
}

/// Reads `utime`, `stime`, `cutime` and `cstime` of `pid`.
pub fn server_cpu(pid: u32) -> Result<ServerCpu, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(BenchError::io(format!("read {path}")))?;
    parse_stat(&text).ok_or_else(|| BenchError::Server(format!("unreadable {path}")))
}

fn parse_stat(text: &str) -> Option<ServerCpu> {
    // The command name (field 2) may hold spaces and parentheses: count from its end. Field 3
    // (state) is the first after it, so utime (field 14) is the 12th.
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<f64> = after_name
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [utime, stime, cutime, cstime] = fields[..] else {
        return None;
    };
    Some(ServerCpu {
        own: (utime + stime) / USER_HZ,
        scripts: (cutime + cstime) / USER_HZ,
    })
}

/// Waits until the server's own threads have used at most one tick of CPU time over
/// `IDLE_WINDOW` (work the previous round left, such as spare files made after a burst, is
/// done), at most `IDLE_WAIT_MAX`. How long it waited, in seconds.
pub fn wait_until_idle(pid: u32) -> Result<f64, BenchError> {
    let started = std::time::Instant::now();
    let mut before = server_cpu(pid)?.own;
    loop {
        std::thread::sleep(IDLE_WINDOW);
        let now = server_cpu(pid)?.own;
        if now - before <= 1.0 / USER_HZ + 1e-9 || started.elapsed() >= IDLE_WAIT_MAX {
            return Ok(started.elapsed().as_secs_f64());
        }
        before = now;
    }
}

/// The window over which the server must be idle in `wait_until_idle`.
const IDLE_WINDOW: std::time::Duration = std::time::Duration::from_millis(200);
/// Longest `wait_until_idle` waits.
const IDLE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(15);

/// CPU seconds of this bench's children that it has waited for (the clients).
pub fn waited_children_cpu() -> Result<f64, BenchError> {
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN)
        .map_err(|e| BenchError::Server(format!("getrusage: {e}")))?;
    let micros = usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
    Ok(micros as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_are_read_after_the_name() {
        let line = "4242 (run (a) b) S 1 4242 4242 0 -1 4194560 100 0 0 0 150 50 30 20 20 0 9 0";
        let cpu = parse_stat(line).unwrap();
        assert_eq!((cpu.own, cpu.scripts), (2.0, 0.5));
        assert!(parse_stat("12 (x) S 1 2").is_none());
    }

    #[test]
    fn this_process_has_a_readable_stat() {
        let cpu = server_cpu(std::process::id()).unwrap();
        assert!(cpu.own >= 0.0 && cpu.scripts >= 0.0);
        assert!(waited_children_cpu().unwrap() >= 0.0);
    }
}
