//! Shared (cross-process) futex operations on words inside the segment.
//!
//! Never `FUTEX_PRIVATE_FLAG`: a private futex is keyed by the process's address space
//! and would wake nobody in another process.

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

use crate::freelist::Atom;

/// A word other processes can sleep on: a 64-bit counter whose low half the kernel
/// compares (the rings' counters and bells) or a 32-bit word (the header's host bell
/// and readiness word), each the segment's atomic or a stand-in in the loom models
/// (which run the ring, wait and header code over loom's atomics, where a real futex
/// cannot be used).
pub trait FutexWord: Atom {
    /// Sleeps while the (low 32 bits of the) word equal `expected`, for at most
    /// `timeout`: [`wait`] or [`wait_low_half`].
    fn futex_wait(&self, expected: u32, timeout: Duration);
    /// Wakes every waiter on the word: [`wake_all`] or [`wake_low_half`].
    fn futex_wake(&self);
    /// Moves the word (SeqCst increment) before a wake, so that a waiter whose
    /// snapshot is older does not go to sleep after the wake was sent.
    fn futex_bump(&self);
    /// A SeqCst fence in the memory model these words live in.
    fn seq_cst_fence() {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl FutexWord for AtomicU64 {
    #[inline]
    fn futex_wait(&self, expected: u32, timeout: Duration) {
        wait_low_half(self, expected, timeout);
    }

    #[inline]
    fn futex_wake(&self) {
        wake_low_half(self);
    }

    #[inline]
    fn futex_bump(&self) {
        self.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl FutexWord for AtomicU32 {
    #[inline]
    fn futex_wait(&self, expected: u32, timeout: Duration) {
        wait(self, expected, timeout);
    }

    #[inline]
    fn futex_wake(&self) {
        wake_all(self);
    }

    #[inline]
    fn futex_bump(&self) {
        self.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Sleeps while `*word == expected`, for at most `timeout`. Returns on wake, on
/// timeout, on a signal, or at once if the word already differs; callers re-check
/// their condition in a loop.
// shm[impl shm.wake.shared-futex]
pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    sys_wait(word.as_ptr().cast_const(), expected, timeout);
}

/// Wakes every waiter on `word`, in any process.
pub fn wake_all(word: &AtomicU32) {
    sys_wake(word.as_ptr().cast_const());
}

/// Sleeps while the low 32 bits of `word` equal `expected`, for at most `timeout`.
/// The counter is never accessed as a u32 from Rust; only the kernel reads it so.
pub fn wait_low_half(word: &AtomicU64, expected: u32, timeout: Duration) {
    sys_wait(low_half(word), expected, timeout);
}

/// Wakes every waiter on the low half of `word`.
pub fn wake_low_half(word: &AtomicU64) {
    sys_wake(low_half(word));
}

/// The low 32 bits of a 64-bit counter, as the u32 futex word the kernel compares.
fn low_half(word: &AtomicU64) -> *const u32 {
    const _: () = assert!(
        cfg!(target_endian = "little"),
        "the low half is the first 4 bytes"
    );
    word.as_ptr().cast::<u32>().cast_const()
}

#[cfg(target_os = "linux")]
fn sys_wait(word: *const u32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: every caller passes a pointer to a live, 4-aligned u32 inside a mapping
    // it borrows for the call; FUTEX_WAIT (shared) only reads it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

#[cfg(test)]
thread_local! {
    /// Wake system calls made by this thread (unit tests check that none are made
    /// while nobody is parked).
    pub(crate) static WAKE_CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(target_os = "linux")]
fn sys_wake(word: *const u32) {
    #[cfg(test)]
    WAKE_CALLS.with(|c| c.set(c.get() + 1));
    // SAFETY: as above; FUTEX_WAKE does not dereference anything else.
    unsafe {
        libc::syscall(libc::SYS_futex, word, libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Fallback for platforms without futexes: a short sleep (callers loop with a
/// deadline).
#[cfg(not(target_os = "linux"))]
fn sys_wait(_word: *const u32, _expected: u32, timeout: Duration) {
    std::thread::sleep(timeout.min(Duration::from_millis(1)));
}

/// Fallback for platforms without futexes: nothing to wake.
#[cfg(not(target_os = "linux"))]
fn sys_wake(_word: *const u32) {}
