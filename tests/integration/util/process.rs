//! Process checks and waiting: whether a pid is alive, and polling a condition until it holds.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

/// `timeout` panics with `describe` of the last value.
pub fn poll_until<T>(
    timeout: Duration,
    mut fetch: impl FnMut() -> T,
    accept: impl Fn(&T) -> bool,
    describe: impl Fn(&T) -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let value = fetch();
        if accept(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{}", describe(&value));
        thread::sleep(Duration::from_millis(25));
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}
