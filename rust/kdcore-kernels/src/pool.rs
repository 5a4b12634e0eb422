//! The thread pool kdcore owns (never rayon's global pool, which the host
//! application may size or use for its own work).
//!
//! Size: `set_num_threads`, else `KDCORE_NUM_THREADS`, else the number of CPUs
//! this process may run on. Fork-safe: a forked child (a DataLoader worker,
//! say) inherits the pool's bookkeeping but not its threads, so the pool
//! remembers the pid that built it and a different pid builds a fresh one.
//! Fork handlers (`pthread_atfork`) take the pool's lock before a fork and
//! release it after, in parent and child, so a child never inherits the lock
//! held by a thread that does not exist there.

#[cfg(unix)]
use std::cell::RefCell;
use std::sync::{Arc, Mutex, MutexGuard, Once};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::KernelError;

struct PoolState {
    pool: Arc<ThreadPool>,
    threads: usize,
    pid: u32,
}

static POOL: Mutex<Option<PoolState>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<PoolState>> {
    static FORK_HANDLERS: Once = Once::new();
    FORK_HANDLERS.call_once(register_fork_handlers);
    lock_unregistered()
}

fn lock_unregistered() -> MutexGuard<'static, Option<PoolState>> {
    // A panic while holding the lock cannot leave the state half-written
    // (it is replaced whole), so a poisoned lock is still usable.
    POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(unix)]
thread_local! {
    /// The pool's lock, held by the forking thread from just before a fork
    /// until just after it (in the parent, and in the child, whose only
    /// thread is a copy of the forking one).
    static HELD_ACROSS_FORK: RefCell<Option<MutexGuard<'static, Option<PoolState>>>> =
        const { RefCell::new(None) };
}

#[cfg(unix)]
extern "C" fn before_fork() {
    let guard = lock_unregistered();
    let _ = HELD_ACROSS_FORK.try_with(|held| *held.borrow_mut() = Some(guard));
}

#[cfg(unix)]
extern "C" fn after_fork() {
    let _ = HELD_ACROSS_FORK.try_with(|held| drop(held.borrow_mut().take()));
}

#[cfg(unix)]
fn register_fork_handlers() {
    extern "C" {
        fn pthread_atfork(
            prepare: Option<extern "C" fn()>,
            parent: Option<extern "C" fn()>,
            child: Option<extern "C" fn()>,
        ) -> std::os::raw::c_int;
    }
    // SAFETY: `pthread_atfork` is the POSIX function of this signature
    // (libc, which std links on every unix target). The handlers are plain
    // `extern "C"` functions that never unwind: taking a lock that is
    // recovered from poisoning, and storing or dropping its guard in a
    // thread-local accessed with `try_with`.
    unsafe {
        pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork));
    }
}

#[cfg(not(unix))]
fn register_fork_handlers() {}

/// Thread count from `KDCORE_NUM_THREADS`, else the CPUs available to us.
pub fn default_num_threads() -> usize {
    std::env::var("KDCORE_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

fn build(threads: usize) -> Result<PoolState, KernelError> {
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kdcore-{i}"))
        .build()
        .map_err(|e| KernelError::Parameter {
            what: "num_threads",
            message: format!("could not start {threads} threads: {e}"),
        })?;
    Ok(PoolState {
        pool: Arc::new(pool),
        threads,
        pid: std::process::id(),
    })
}

/// The current pool, (re)built when missing or inherited through `fork`.
fn current() -> Result<Arc<ThreadPool>, KernelError> {
    let mut state = lock();
    let pid = std::process::id();
    match state.as_ref() {
        Some(s) if s.pid == pid => return Ok(Arc::clone(&s.pool)),
        Some(_) => {
            // Forked child: the parent's worker threads do not exist here, so
            // dropping the pool could wait on them. Leak it instead (once per
            // fork), and build a pool of the same size.
            let inherited = state.take().expect("checked above");
            let threads = inherited.threads;
            std::mem::forget(inherited);
            *state = Some(build(threads)?);
        }
        None => *state = Some(build(default_num_threads())?),
    }
    Ok(Arc::clone(&state.as_ref().expect("just built").pool))
}

/// Sets the number of worker threads (takes effect for the next kernel call).
pub fn set_num_threads(threads: usize) -> Result<(), KernelError> {
    if threads == 0 {
        return Err(KernelError::Parameter {
            what: "num_threads",
            message: "must be >= 1, got 0".to_string(),
        });
    }
    let fresh = build(threads)?;
    // Calls running on the old pool keep their Arc and finish there.
    *lock() = Some(fresh);
    Ok(())
}

/// The number of worker threads kernels use.
pub fn num_threads() -> usize {
    // A forked child rebuilds the pool with the same size, so the recorded
    // size holds there too.
    lock()
        .as_ref()
        .map_or_else(default_num_threads, |s| s.threads)
}

/// Runs `f` inside the pool; falls back to the calling thread if no pool can
/// be started (the kernels are correct either way).
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match current() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}
