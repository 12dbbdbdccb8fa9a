//! Threads that are reused: each job (a connection, a run's supervision and pipes) gets a
//! thread of its own, as it may hold it for hours, but a thread whose job is done waits for the
//! next one instead of ending, so a job seldom pays for starting a thread (tens of
//! microseconds: a stack mapped, and unmapped at its end, which interrupts the other
//! processors). At most `max_idle` threads of a pool wait; the others end with their job.
#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

type Job = Box<dyn FnOnce() + Send>;

/// Hands each job to a waiting thread, or to a new one when none waits.
pub struct Workers {
    /// The name of the pool's threads.
    name: &'static str,
    /// Most threads kept waiting for a job.
    max_idle: usize,
    jobs: Sender<Job>,
    waiting: Receiver<Job>,
    /// Threads blocked on `waiting` and not yet given a job: each one counted here receives
    /// exactly one job sent.
    idle: Arc<AtomicUsize>,
    /// Niceness each thread of the pool takes when it starts (None: the process's).
    nice: Option<i32>,
}

impl Workers {
    /// A pool of threads named `name` keeping at most `max_idle` of them waiting.
    pub fn new(name: &'static str, max_idle: usize) -> Workers {
        let (jobs, waiting) = crossbeam_channel::unbounded();
        Workers {
            name,
            max_idle,
            jobs,
            waiting,
            idle: Arc::new(AtomicUsize::new(0)),
            nice: None,
        }
    }

    /// The same pool whose threads run at niceness `nice` (when given): a thread's niceness
    /// can be raised without privilege, and it stays with the thread for all its jobs.
    pub fn with_nice(mut self, nice: Option<i32>) -> Workers {
        self.nice = nice;
        self
    }

    /// Runs `job` on a waiting thread, or on a new one.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        // Claim an idle thread: from then on it is ours to send one job to.
        let claimed = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if claimed {
            if let Err(returned) = self.jobs.send(job) {
                // Cannot happen while `self` holds the receiver; run it on a new thread anyway.
                return self.start(returned.into_inner());
            }
            return Ok(());
        }
        self.start(job)
    }

    fn start(&self, first: Job) -> io::Result<()> {
        let waiting = self.waiting.clone();
        let idle = self.idle.clone();
        let max_idle = self.max_idle;
        let nice = self.nice;
        std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || {
                if let Some(nice) = nice {
                    if let Err(e) = crate::sys::set_own_nice(nice) {
                        log::debug!("a pool thread keeps its niceness: {e}");
                    }
                }
                let mut job = first;
                loop {
                    job();
                    // Stay for the next job, unless enough threads wait already.
                    let stays = idle
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            (n < max_idle).then_some(n + 1)
                        })
                        .is_ok();
                    if !stays {
                        return;
                    }
                    match waiting.recv() {
                        Ok(next) => job = next,
                        Err(_) => return,
                    }
                }
            })
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::wait_for;
    use std::sync::Mutex;
    use std::time::Duration;

    const MAX_IDLE: usize = 16;

    #[test]
    fn a_pool_with_a_niceness_runs_its_jobs_at_it() {
        let own = crate::sys::own_nice().unwrap();
        let wanted = (own + 3).min(19);
        let workers = Workers::new("test-nice", MAX_IDLE).with_nice(Some(wanted));
        let (tx, rx) = crossbeam_channel::bounded(2);
        for _ in 0..2 {
            let tx = tx.clone();
            workers
                .run(move || tx.send(crate::sys::own_nice().unwrap()).unwrap())
                .unwrap();
        }
        for _ in 0..2 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), wanted);
        }
        // The thread that asked is untouched.
        assert_eq!(crate::sys::own_nice().unwrap(), own);
    }

    #[test]
    fn a_thread_whose_job_ended_takes_the_next_one() {
        let workers = Workers::new("test", MAX_IDLE);
        let threads = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..5 {
            let seen = threads.clone();
            let before = workers.idle.load(Ordering::SeqCst);
            workers
                .run(move || seen.lock().unwrap().push(std::thread::current().id()))
                .unwrap();
            // Each job ends before the next is given: the same thread gets them all.
            wait_for("the thread to wait again", || {
                workers.idle.load(Ordering::SeqCst) == before.max(1)
            });
        }
        let threads = threads.lock().unwrap();
        assert_eq!(threads.len(), 5);
        assert!(threads.iter().all(|id| *id == threads[0]), "{threads:?}");
    }

    #[test]
    fn busy_threads_never_hold_up_a_job_and_few_stay_idle() {
        let workers = Workers::new("test", MAX_IDLE);
        let (release_tx, release_rx) = crossbeam_channel::unbounded::<()>();
        let started = Arc::new(AtomicUsize::new(0));
        let jobs = MAX_IDLE + 8;
        for _ in 0..jobs {
            let release = release_rx.clone();
            let started = started.clone();
            workers
                .run(move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    let _ = release.recv();
                })
                .unwrap();
        }
        // Every job runs at once although none has ended: each got a thread.
        wait_for("every job to start", || {
            started.load(Ordering::SeqCst) == jobs
        });
        drop(release_tx);
        wait_for("the threads to settle", || {
            workers.idle.load(Ordering::SeqCst) == MAX_IDLE
        });
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(workers.idle.load(Ordering::SeqCst), MAX_IDLE);
    }
}
