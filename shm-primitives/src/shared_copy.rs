//! Payload copies between private memory and memory another process may write at the
//! same time (`shm.untrusted.payload-copy`).
//!
//! A peer that breaks the protocol can write a slot while this process copies it. The
//! kernel and the hardware make that harmless (the copy reads some mix of old and new
//! bytes), but to the compiler a plain copy (`ptr::copy_nonoverlapping`) racing with a
//! write is undefined behaviour, and it may act on the assumption that the source does
//! not change: for instance, by reading a small copy's bytes from the source again
//! instead of from the destination, after the caller validated them (a double fetch).
//! Here every shared byte is read or written by exactly one relaxed atomic access, of
//! a whole aligned word where possible: the compiler must treat each load as a fresh
//! value, and a racing write is defined behaviour. On the architectures we run on a
//! relaxed word access is an ordinary move, so the price is the lost vectorisation.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

const WORD: usize = std::mem::size_of::<u64>();

/// How a span of `len` bytes starting at `addr` splits into bytes before the first
/// aligned word, whole aligned words, and bytes after them.
fn split(addr: *const u8, len: usize) -> (usize, usize) {
    // `align_offset` may answer "never" (usize::MAX): then every byte goes singly.
    let head = addr.align_offset(WORD).min(len);
    let words = (len - head) / WORD;
    (head, words)
}

/// Copies `dst.len()` bytes from shared memory at `src` into `dst`.
///
/// # Safety
/// The `dst.len()` bytes at `src` must be mapped and readable for the whole call. Any
/// process may write them meanwhile; within this process, only through atomics or this
/// module.
#[inline]
pub unsafe fn copy_from_shared(src: *const u8, dst: &mut [u8]) {
    // SAFETY: the caller's guarantee for `src`; `dst` is a live private slice of
    // exactly that length.
    unsafe { copy_from_shared_raw(src, dst.as_mut_ptr(), dst.len()) }
}

/// [`copy_from_shared`] into `len` bytes at `dst`, which may be uninitialised (a
/// vector's spare capacity).
///
/// # Safety
/// As for [`copy_from_shared`], and `dst` must be valid for `len` byte writes, private
/// to this call and not overlapping the source.
// shm[impl shm.untrusted.payload-copy]
#[inline]
pub unsafe fn copy_from_shared_raw(src: *const u8, dst: *mut u8, len: usize) {
    let (head, words) = split(src, len);
    let tail_at = head + words * WORD;
    for i in (0..head).chain(tail_at..len) {
        // SAFETY: byte `i` of both spans (the caller's guarantee); an `AtomicU8` has no
        // alignment requirement, and every access to shared bytes here is atomic.
        unsafe {
            let byte = AtomicU8::from_ptr(src.add(i).cast_mut()).load(Ordering::Relaxed);
            dst.add(i).write(byte);
        }
    }
    for i in 0..words {
        let at = head + i * WORD;
        // SAFETY: word `i` after the head lies inside both spans and is 8-aligned in
        // the source (the head ends at its first aligned address); the destination
        // may be unaligned, hence the unaligned write.
        unsafe {
            let word = AtomicU64::from_ptr(src.add(at).cast::<u64>().cast_mut());
            dst.add(at)
                .cast::<u64>()
                .write_unaligned(word.load(Ordering::Relaxed));
        }
    }
}

/// Copies `src` into shared memory at `dst`.
///
/// # Safety
/// The `src.len()` bytes at `dst` must be mapped and writable for the whole call. Any
/// process may read or write them meanwhile; within this process, only through
/// atomics or this module.
// shm[impl shm.untrusted.payload-copy]
#[inline]
pub unsafe fn copy_to_shared(src: &[u8], dst: *mut u8) {
    let len = src.len();
    let (head, words) = split(dst, len);
    let tail_at = head + words * WORD;
    for i in (0..head).chain(tail_at..len) {
        // SAFETY: byte `i` of the span (the caller's guarantee), written atomically.
        unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(src[i], Ordering::Relaxed);
    }
    for i in 0..words {
        let at = head + i * WORD;
        // SAFETY: word `i` after the head lies inside both spans and is 8-aligned in
        // the destination; the source may be unaligned, hence the unaligned read.
        unsafe {
            let value = src.as_ptr().add(at).cast::<u64>().read_unaligned();
            AtomicU64::from_ptr(dst.add(at).cast::<u64>()).store(value, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// Every offset and length around the word boundaries, both ways.
    #[test]
    fn copies_any_span_exactly_and_touch_nothing_else() {
        let words = if cfg!(miri) { 3 } else { 8 };
        let shared: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let base = shared.as_ptr().cast::<u8>().cast_mut();
        let span = words * WORD;
        for offset in 0..2 * WORD {
            for len in 0..=span - offset {
                for w in &shared {
                    w.store(u64::MAX, Ordering::Relaxed);
                }
                let src: Vec<u8> = (0..len).map(|i| (i * 7 + offset) as u8).collect();
                // SAFETY: offset + len <= span bytes of `shared`, touched only
                // atomically.
                unsafe { copy_to_shared(&src, base.add(offset)) };
                let mut all = vec![0u8; span];
                // SAFETY: as above, the whole span.
                unsafe { copy_from_shared(base, &mut all) };
                assert!(all[..offset].iter().all(|&b| b == 0xff));
                assert_eq!(&all[offset..offset + len], &src[..]);
                assert!(all[offset + len..].iter().all(|&b| b == 0xff));
                let mut back = vec![0u8; len];
                // SAFETY: as above.
                unsafe { copy_from_shared(base.add(offset), &mut back) };
                assert_eq!(back, src);
            }
        }
    }

    /// A writer scribbling on the bytes being copied is a defined race: under Miri,
    /// whose race detector reports a plain copy here as undefined behaviour, this
    /// passes; the copy reads each word whole, old or new.
    // shm[verify shm.untrusted.payload-copy]
    #[test]
    fn a_copy_racing_a_scribbler_is_defined_and_reads_whole_words() {
        let shared: Arc<Vec<AtomicU64>> = Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let scribbler = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round = round.wrapping_add(1);
                    let fill = [round as u8; 4 * WORD];
                    // SAFETY: the 32 bytes of `shared`, touched only atomically.
                    unsafe { copy_to_shared(&fill, shared.as_ptr().cast::<u8>().cast_mut()) };
                }
            })
        };
        let rounds = if cfg!(miri) { 20 } else { 10_000 };
        for _ in 0..rounds {
            let mut out = [0u8; 4 * WORD];
            // SAFETY: as above.
            unsafe { copy_from_shared(shared.as_ptr().cast::<u8>(), &mut out) };
            for word in out.chunks_exact(WORD) {
                assert!(word.iter().all(|&b| b == word[0]), "a torn word: {word:?}");
            }
        }
        stop.store(true, Ordering::Relaxed);
        scribbler.join().unwrap();
    }
}
