//! Deadlines that never overflow: a time derived from a setting or a request is added with
//! checked arithmetic, and a sum past what `Instant` can hold becomes "in a century".
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// Further than any deadline this server waits for.
const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + wait`, or as far as `Instant` reaches within a century when that overflows.
pub fn instant_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait.min(CENTURY))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_waits_do_not_overflow() {
        let far = instant_after(Duration::MAX);
        assert!(far > Instant::now());
        let soon = instant_after(Duration::from_millis(5));
        assert!(soon <= Instant::now() + Duration::from_millis(5));
    }
}
