//! Background work: a thread pool whose threads only take CPU time that no other thread of
//! the process (or of the machine) wants, for work whose result is needed later and whose
//! running beside the critical path should not slow that path down.
//!
//! On Linux the pool's threads run under the `SCHED_IDLE` policy: the scheduler gives them a
//! core only while it has nothing else to run, e.g. while the sequential pass loads a plan
//! or factors a Gram matrix on fewer cores than there are. Elsewhere, or if the kernel
//! refuses (it never should: lowering one's own priority needs no privilege), they are plain
//! threads and the work simply shares the cores, as it would without this module.

use anyhow::{Context, Result};

/// A pool of `threads` background threads (see the module docs).
pub fn idle_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("onnxq-background-{i}"))
        .start_handler(|_| {
            lower_priority();
        })
        .build()
        .context("cannot start the background threads")
}

/// Moves the calling thread to the idle scheduling class (best effort): whether it did.
#[cfg(target_os = "linux")]
fn lower_priority() -> bool {
    use std::ffi::c_int;
    #[repr(C)]
    struct SchedParam {
        sched_priority: c_int,
    }
    /// `SCHED_IDLE` (linux/sched.h).
    const SCHED_IDLE: c_int = 5;
    extern "C" {
        fn sched_setscheduler(pid: c_int, policy: c_int, param: *const SchedParam) -> c_int;
    }
    let param = SchedParam { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread, `param` is a valid `sched_param` for the call's
    // duration; the call only changes this thread's scheduling policy. A failure leaves the
    // thread as it was, which is fine (module docs).
    unsafe { sched_setscheduler(0, SCHED_IDLE, &param) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_runs_work_and_returns_its_result() -> Result<()> {
        let pool = idle_pool(2)?;
        let sum: u64 = pool.install(|| {
            use rayon::prelude::*;
            (0..1000u64).into_par_iter().sum()
        });
        assert_eq!(sum, 499_500);
        assert_eq!(pool.current_num_threads(), 2);
        Ok(())
    }

    /// The pool's threads are in the idle class (Linux: policy 5 in /proc's `stat`), unless
    /// the kernel refuses the class to this process (then there is nothing to check).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_pool_threads_are_idle_class() -> Result<()> {
        let allowed = std::thread::spawn(lower_priority).join().map_err(|_| anyhow::anyhow!("thread panicked"))?;
        if !allowed {
            eprintln!("SCHED_IDLE refused here: not checked");
            return Ok(());
        }
        let pool = idle_pool(1)?;
        let policy = pool.install(|| -> Result<String> {
            let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
            // Field 41 (policy), counted after the parenthesized command name.
            let rest = stat.rsplit_once(')').context("stat format")?.1;
            rest.split_whitespace().nth(38).map(str::to_string).context("no policy field")
        })?;
        assert_eq!(policy, "5");
        Ok(())
    }
}
