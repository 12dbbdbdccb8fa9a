//! Things a run needs, made ahead of need by a background thread while the runs are quiet
//! (none going and none ended within [`QUIET_AFTER`]): spare run files (`spare_files.rs`) and
//! run ids whose cgroup is already made (`run_ids.rs`). A burst of runs, or a loop of
//! back-to-back runs, takes them ready instead of making them on its requests' path, and the
//! thread does not share the processors with the burst or the loop. Only when fewer than a
//! quarter are left does it make more while runs go; when none is left, the caller makes its
//! own, as if there were no pool.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long the thread waits, once it may make more, before it makes the first: the answer of
/// the run that just ended is being written meanwhile.
const REFILL_DELAY: Duration = Duration::from_millis(5);

/// How long after the last run ended the runs count as quiet. A loop calling runbooks one
/// after another starts its next run within milliseconds (a `curl` process starts in about
/// 5 ms here); making its files between its runs would share the processors with it: on ext4
/// without a journal that was 0.2 to 0.4 ms more for each run of a loop, measured from outside.
pub const QUIET_AFTER: Duration = Duration::from_millis(250);

/// How often the thread asks whether runs are still going, while it waits for none to be.
const QUIET_POLL: Duration = Duration::from_millis(100);

/// How long the thread waits after it could not make one (a full or read-only directory).
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Whether the runs are quiet: the moment to make more.
pub type Quiet = Box<dyn Fn() -> bool + Send>;

/// The ready things of one kind and the condition their thread waits on.
#[derive(Debug)]
pub struct Pool<T> {
    free: Mutex<Vec<T>>,
    /// Set (under `free`'s lock) by [`Pool::close`]: nothing is added any more.
    closed: AtomicBool,
    /// How many are kept ready.
    target: usize,
    /// Signalled when one was taken and the thread may have to make more.
    taken: Condvar,
}

impl<T: Send + 'static> Pool<T> {
    /// A pool that keeps `target` ready once [`Pool::start_filling`] is called.
    pub fn new(target: usize) -> Pool<T> {
        Pool::with_ready(target, Vec::new())
    }

    /// The same, with `ready` ready already.
    pub fn with_ready(target: usize, ready: Vec<T>) -> Pool<T> {
        Pool {
            free: Mutex::new(ready),
            closed: AtomicBool::new(false),
            target,
            taken: Condvar::new(),
        }
    }

    fn free(&self) -> MutexGuard<'_, Vec<T>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many are ready.
    pub fn ready(&self) -> usize {
        self.free().len()
    }

    /// Fewer ready than this: more are made even while runs go.
    fn low_mark(&self) -> usize {
        self.target / 4
    }

    /// A ready one, now the caller's; None when none is ready.
    pub fn take(&self) -> Option<T> {
        let (taken, left) = {
            let mut free = self.free();
            let taken = free.pop();
            (taken, free.len())
        };
        // The thread waits for the first one taken from a full pool, and, while runs go, for
        // the pool to fall below a quarter; other takes need not wake it.
        if taken.is_some() && (left + 1 == self.target || left < self.low_mark()) {
            self.taken.notify_one();
        }
        taken
    }

    /// A copy of the ready ones.
    pub fn snapshot(&self) -> Vec<T>
    where
        T: Clone,
    {
        self.free().clone()
    }

    /// Every ready one, taken at once, and no more made (at shutdown: the caller undoes them;
    /// one the thread was making meanwhile it undoes itself).
    pub fn close(&self) -> Vec<T> {
        let mut free = self.free();
        self.closed.store(true, Ordering::SeqCst);
        let all = std::mem::take(&mut *free);
        drop(free);
        self.taken.notify_all();
        all
    }

    /// Starts the thread `name` that keeps the pool topped up with what `make` makes (None:
    /// nothing can be made now; `undo` undoes one made after [`Pool::close`]), at niceness
    /// `nice` when given (work ahead of need, which requests and runs come before), while
    /// `quiet` says the runs are quiet, or at once when fewer than a quarter are ready.
    /// Without that thread (it could not start) none is ever ready.
    pub fn start_filling(
        self: &Arc<Pool<T>>,
        name: &str,
        nice: Option<i32>,
        quiet: Quiet,
        make: impl FnMut() -> Option<T> + Send + 'static,
        undo: impl Fn(T) + Send + 'static,
    ) {
        let pool = self.clone();
        let started = std::thread::Builder::new()
            .name(name.into())
            .stack_size(64 * 1024)
            .spawn(move || {
                if let Some(nice) = nice {
                    if let Err(e) = crate::sys::set_own_nice(nice) {
                        log::debug!("a thread making things ahead keeps its niceness: {e}");
                    }
                }
                pool.keep_filled(&quiet, make, undo)
            });
        if let Err(e) = started {
            log::warn!("cannot start the thread {name}: {e}");
        }
    }

    /// Tops the pool up to its target, one at a time while the runs are quiet (or while fewer
    /// than a quarter are ready), until it is closed.
    fn keep_filled(&self, quiet: &Quiet, mut make: impl FnMut() -> Option<T>, undo: impl Fn(T)) {
        while !self.closed.load(Ordering::SeqCst) {
            drop(
                self.taken
                    .wait_while(self.free(), |free| {
                        free.len() >= self.target && !self.closed.load(Ordering::SeqCst)
                    })
                    .unwrap_or_else(|p| p.into_inner()),
            );
            std::thread::sleep(REFILL_DELAY);
            loop {
                let ready = self.ready();
                if ready >= self.target || self.closed.load(Ordering::SeqCst) {
                    break;
                }
                if ready >= self.low_mark() && !quiet() {
                    // Runs are going or just ended: wait for one to be taken or for a moment.
                    drop(
                        self.taken
                            .wait_timeout(self.free(), QUIET_POLL)
                            .unwrap_or_else(|p| p.into_inner()),
                    );
                    continue;
                }
                match make() {
                    Some(made) => {
                        let mut free = self.free();
                        if self.closed.load(Ordering::SeqCst) {
                            drop(free);
                            undo(made);
                            return;
                        }
                        free.push(made);
                    }
                    None => drop(
                        self.taken
                            .wait_timeout(self.free(), RETRY_PAUSE)
                            .unwrap_or_else(|p| p.into_inner()),
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::wait_for;
    use std::sync::atomic::AtomicUsize;

    fn counting_pool(target: usize, quiet: &Arc<AtomicBool>) -> Arc<Pool<usize>> {
        let pool = Arc::new(Pool::new(target));
        let asked = quiet.clone();
        let made = AtomicUsize::new(0);
        pool.start_filling(
            "test-ahead",
            None,
            Box::new(move || asked.load(Ordering::SeqCst)),
            move || Some(made.fetch_add(1, Ordering::SeqCst)),
            |_| {},
        );
        pool
    }

    #[test]
    fn while_runs_go_more_are_made_only_below_a_quarter() {
        let quiet = Arc::new(AtomicBool::new(false));
        let pool = counting_pool(40, &quiet);
        // Runs go from the start: only the quarter is made.
        wait_for("a quarter", || pool.ready() == 10);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(pool.ready(), 10, "no more while runs go");
        quiet.store(true, Ordering::SeqCst);
        wait_for("the rest once no run goes", || pool.ready() == 40);
        quiet.store(false, Ordering::SeqCst);
        for _ in 0..25 {
            pool.take().unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(pool.ready(), 15, "none made while runs go above a quarter");
        for _ in 0..6 {
            pool.take().unwrap();
        }
        wait_for("back to a quarter", || pool.ready() == 10);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(pool.ready(), 10);
        quiet.store(true, Ordering::SeqCst);
        wait_for("the target again", || pool.ready() == 40);
    }

    #[test]
    fn each_is_taken_once_and_the_pool_is_topped_up() {
        let quiet = Arc::new(AtomicBool::new(true));
        let pool = counting_pool(16, &quiet);
        wait_for("the first ones", || pool.ready() == 16);
        let taken: Vec<usize> = (0..19).filter_map(|_| pool.take()).collect();
        let distinct: std::collections::BTreeSet<_> = taken.iter().collect();
        assert_eq!(distinct.len(), taken.len(), "none is handed out twice");
        wait_for("the top-up", || pool.ready() == 16);
        let all = pool.close();
        assert_eq!(all.len(), 16);
        assert!(all.iter().all(|n| !taken.contains(n)));
        for _ in 0..5 {
            pool.take();
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(pool.ready(), 0, "none made once closed");
    }

    #[test]
    fn a_pool_that_cannot_make_any_hands_out_none() {
        let pool: Arc<Pool<usize>> = Arc::new(Pool::new(8));
        pool.start_filling("test-ahead-none", None, Box::new(|| true), || None, |_| {});
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(pool.take(), None);
    }

    #[test]
    fn one_made_while_the_pool_closes_is_undone() {
        // `make` blocks until the pool is closed: what it then makes must be undone, not kept.
        let pool: Arc<Pool<u32>> = Arc::new(Pool::new(4));
        let undone = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (gate_in, undone_in) = (gate.clone(), undone.clone());
        pool.start_filling(
            "test-ahead-close",
            None,
            Box::new(|| true),
            move || {
                let (open, cond) = &*gate_in;
                drop(
                    cond.wait_while(open.lock().unwrap(), |open| !*open)
                        .unwrap(),
                );
                Some(7)
            },
            move |_| {
                undone_in.fetch_add(1, Ordering::SeqCst);
            },
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(pool.close().is_empty());
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while undone.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "never undone");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pool.ready(), 0);
    }
}
