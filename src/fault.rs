//! Panics never lose a run: the panic hook (logs where, never what), the error text a run
//! concluded after a panic carries, and, in debug builds only, a test hook that panics at a
//! chosen point (`RUNBOOKD_TEST_PANIC=<point>`, read once at start; it fires the first time
//! that point is reached).
#![forbid(unsafe_code)]

use std::any::Any;

/// Environment variable naming the point where a debug build panics once.
#[cfg(debug_assertions)]
const TEST_PANIC_VAR: &str = "RUNBOOKD_TEST_PANIC";

/// Logs every panic through `log`: the thread and the source location, not the message (which
/// may carry user data such as paths or output).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "an unknown place".into());
        log::error!("internal error: thread {name:?} panicked at {location}");
    }));
    #[cfg(debug_assertions)]
    test_hook::init();
}

/// The message a panic was raised with.
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// The `error` of a run concluded because something panicked while it ran.
pub fn internal_error(message: &str) -> String {
    format!("runbookd: internal error while running: {message}")
}

/// Panics if this debug build was started with `RUNBOOKD_TEST_PANIC=<point>` and `point` is
/// reached for the first time. Does nothing in release builds.
#[inline]
pub fn test_point(point: &str) {
    #[cfg(debug_assertions)]
    test_hook::reached(point);
    #[cfg(not(debug_assertions))]
    let _ = point;
}

#[cfg(debug_assertions)]
mod test_hook {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    static POINT: OnceLock<Option<String>> = OnceLock::new();
    static FIRED: AtomicBool = AtomicBool::new(false);

    pub fn init() {
        POINT.get_or_init(|| {
            let point = std::env::var(super::TEST_PANIC_VAR)
                .ok()
                .filter(|p| !p.is_empty());
            if let Some(p) = &point {
                log::warn!("{} set: panicking once at {p:?}", super::TEST_PANIC_VAR);
            }
            point
        });
    }

    pub fn reached(point: &str) {
        let Some(Some(wanted)) = POINT.get() else {
            return;
        };
        if wanted == point && !FIRED.swap(true, Ordering::SeqCst) {
            panic!("test panic at {point}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_both_payload_kinds() {
        let caught = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(message(caught.as_ref()), "plain");
        let n = 7;
        let caught = std::panic::catch_unwind(|| panic!("formatted {n}")).unwrap_err();
        assert_eq!(message(caught.as_ref()), "formatted 7");
        assert_eq!(
            internal_error("x"),
            "runbookd: internal error while running: x"
        );
    }
}
