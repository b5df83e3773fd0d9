//! Background work: a thread pool whose threads take only CPU time that no other thread
//! wants, for work whose result is needed later and which should not slow the critical path
//! down while it runs beside it.
//!
//! On Linux the pool's threads run under the `SCHED_IDLE` policy: the scheduler gives them a
//! core only while it has nothing else to run, e.g. while the sequential pass loads a plan
//! or factors a Gram matrix on fewer cores than there are. Once the result is needed,
//! [`IdlePool::promote`] moves them back to the normal policy, so that a machine kept busy by
//! other processes cannot starve them while the caller waits. Leaving `SCHED_IDLE` needs
//! `RLIMIT_NICE` (or privilege), so the pool uses the idle class only when this process may
//! leave it (checked once, on a throwaway thread); otherwise, and off Linux, its threads are
//! plain ones and the work shares the cores as any other.

use anyhow::{Context, Result};
use std::sync::{Arc, Mutex};

/// A pool of background threads (module docs).
pub struct IdlePool {
    pool: rayon::ThreadPool,
    /// Whether the pool was promoted, and the kernel thread ids of the threads in the idle
    /// class (a thread that starts after the promotion does not enter it).
    idle: Arc<Mutex<(bool, Vec<i32>)>>,
}

impl IdlePool {
    /// A pool of `threads` threads, in the idle class when this process may leave it again.
    pub fn new(threads: usize) -> Result<IdlePool> {
        let idle = Arc::new(Mutex::new((false, Vec::new())));
        let use_idle = can_leave_idle_class();
        let ids = idle.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("onnxq-background-{i}"))
            .start_handler(move |_| {
                let mut ids = ids.lock().unwrap_or_else(|e| e.into_inner());
                if use_idle && !ids.0 && set_policy(0, Policy::Idle) {
                    ids.1.push(thread_id());
                }
            })
            .build()
            .context("cannot start the background threads")?;
        Ok(IdlePool { pool, idle })
    }

    /// Runs `f` in the pool (its parallel work on the pool's threads).
    pub fn install<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.pool.install(f)
    }

    /// Moves the pool's threads back to the normal policy (the result is needed now).
    pub fn promote(&self) {
        let mut ids = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        ids.0 = true;
        ids.1.retain(|&tid| !set_policy(tid, Policy::Normal));
    }

    /// How many of the pool's threads are in the idle class.
    pub fn idle_threads(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).1.len()
    }
}

#[derive(Clone, Copy)]
enum Policy {
    Idle,
    Normal,
}

/// Whether a thread of this process that enters the idle class may leave it again.
fn can_leave_idle_class() -> bool {
    std::thread::spawn(|| set_policy(0, Policy::Idle) && set_policy(0, Policy::Normal)).join().unwrap_or(false)
}

/// Sets the scheduling policy of thread `tid` (0: the calling thread): whether it took.
#[cfg(target_os = "linux")]
fn set_policy(tid: i32, policy: Policy) -> bool {
    use std::ffi::c_int;
    #[repr(C)]
    struct SchedParam {
        sched_priority: c_int,
    }
    /// `SCHED_OTHER` and `SCHED_IDLE` (linux/sched.h).
    const SCHED_OTHER: c_int = 0;
    const SCHED_IDLE: c_int = 5;
    extern "C" {
        fn sched_setscheduler(pid: c_int, policy: c_int, param: *const SchedParam) -> c_int;
    }
    let param = SchedParam { sched_priority: 0 };
    let policy = match policy {
        Policy::Idle => SCHED_IDLE,
        Policy::Normal => SCHED_OTHER,
    };
    // SAFETY: `param` is a valid `sched_param` for the call's duration; the call only changes
    // one thread's scheduling policy, and a failure leaves it as it was.
    unsafe { sched_setscheduler(tid, policy, &param) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn set_policy(_: i32, _: Policy) -> bool {
    false
}

/// The calling thread's kernel thread id.
#[cfg(target_os = "linux")]
fn thread_id() -> i32 {
    extern "C" {
        fn gettid() -> i32;
    }
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { gettid() }
}

#[cfg(not(target_os = "linux"))]
fn thread_id() -> i32 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_runs_work_and_returns_its_result() -> Result<()> {
        let pool = IdlePool::new(2)?;
        let sum: u64 = pool.install(|| {
            use rayon::prelude::*;
            (0..1000u64).into_par_iter().sum()
        });
        assert_eq!(sum, 499_500);
        Ok(())
    }

    /// Each pool thread's policy, from /proc (field 41 of `stat`, counted after the
    /// parenthesized command name).
    #[cfg(target_os = "linux")]
    fn policies(pool: &IdlePool) -> Result<Vec<String>> {
        pool.install(|| {
            rayon::broadcast(|_| -> Result<String> {
                let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
                let rest = stat.rsplit_once(')').context("stat format")?.1;
                rest.split_whitespace().nth(38).map(str::to_string).context("no policy field")
            })
            .into_iter()
            .collect()
        })
    }

    /// The pool's threads are in the idle class (policy 5) where this process may leave it,
    /// and back in the normal one (0) once promoted; elsewhere they are plain threads.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_pool_threads_are_idle_until_promoted() -> Result<()> {
        let pool = IdlePool::new(2)?;
        let expected = if can_leave_idle_class() { "5" } else { "0" };
        assert_eq!(policies(&pool)?, vec![expected; 2]);
        assert_eq!(pool.idle_threads(), if expected == "5" { 2 } else { 0 });
        pool.promote();
        assert_eq!(policies(&pool)?, vec!["0"; 2]);
        assert_eq!(pool.idle_threads(), 0);
        Ok(())
    }
}
