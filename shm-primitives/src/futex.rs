//! Shared (cross-process) futex operations on words inside the segment.
//!
//! Never `FUTEX_PRIVATE_FLAG`: a private futex is keyed by the process's address space
//! and would wake nobody in another process.

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

// shm[impl shm.wake.shared-futex]
/// Sleeps while `*word == expected`, for at most `timeout`. Returns on wake, on
/// timeout, on a signal, or at once if the word already differs; callers re-check
/// their condition in a loop.
#[cfg(target_os = "linux")]
pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = timespec(timeout);
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

/// The low 32 bits of a 64-bit counter, as the u32 futex word the kernel compares.
fn low_half(word: &AtomicU64) -> *const u32 {
    const _: () = assert!(
        cfg!(target_endian = "little"),
        "the low half is the first 4 bytes"
    );
    word.as_ptr().cast::<u32>().cast_const()
}

/// Sleeps while the low 32 bits of `word` equal `expected`, for at most `timeout`.
/// The counter is never accessed as a u32 from Rust; only the kernel reads it so.
#[cfg(target_os = "linux")]
pub fn wait_low_half(word: &AtomicU64, expected: u32, timeout: Duration) {
    let ts = timespec(timeout);
    // SAFETY: the pointer is the first 4 bytes of a live, 8-aligned u64; FUTEX_WAIT
    // (shared) only reads it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            low_half(word),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every waiter on the low half of `word`.
#[cfg(target_os = "linux")]
pub fn wake_low_half(word: &AtomicU64) {
    // SAFETY: as above; FUTEX_WAKE does not dereference anything else.
    unsafe {
        libc::syscall(libc::SYS_futex, low_half(word), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Fallback for platforms without futexes: a short sleep.
#[cfg(not(target_os = "linux"))]
pub fn wait_low_half(_word: &AtomicU64, _expected: u32, timeout: Duration) {
    std::thread::sleep(timeout.min(Duration::from_millis(1)));
}

/// Fallback for platforms without futexes: nothing to wake.
#[cfg(not(target_os = "linux"))]
pub fn wake_low_half(_word: &AtomicU64) {}

#[cfg(target_os = "linux")]
fn timespec(timeout: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    }
}
