//! Shared (cross-process) futex operations on words inside the segment.
//!
//! Never `FUTEX_PRIVATE_FLAG`: a private futex is keyed by the process's address space
//! and would wake nobody in another process.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, for at most `timeout`. Returns on wake, on
/// timeout, on a signal, or at once if the word already differs; callers re-check
/// their condition in a loop.
#[cfg(target_os = "linux")]
pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: word points to a live, aligned u32 for the duration of the call; the
    // kernel only reads it. FUTEX_WAIT (shared) with a relative timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every waiter on `word`, in any process.
#[cfg(target_os = "linux")]
pub fn wake_all(word: &AtomicU32) {
    // SAFETY: word points to a live, aligned u32; FUTEX_WAKE does not dereference
    // anything else.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Fallback for platforms without futexes: a short sleep (callers loop with a
/// deadline).
#[cfg(not(target_os = "linux"))]
pub fn wait(_word: &AtomicU32, _expected: u32, timeout: Duration) {
    std::thread::sleep(timeout.min(Duration::from_millis(1)));
}

/// Fallback for platforms without futexes: nothing to wake.
#[cfg(not(target_os = "linux"))]
pub fn wake_all(_word: &AtomicU32) {}
