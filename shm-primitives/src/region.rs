//! Memory that holds a segment: a heap allocation for in-process use and tests, or a
//! `MAP_SHARED` file mapping for real processes. [`Region`] is the borrowed view both
//! hand out; every typed view in this crate is built from a `Region`.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every region: a page, so every section offset that is a multiple of a
/// page (or of a cache line) is aligned in memory too.
pub const REGION_ALIGN: usize = 4096;

/// A borrowed span of shared memory, valid for `'a`.
///
/// The bytes may be written concurrently by other processes, so a `Region` never hands
/// out `&[u8]`; callers reach it through atomics (see [`Region::atomic_u64`]) or raw
/// copies ([`Region::copy_out_to_vec`], [`Region::copy_in`]).
#[derive(Clone, Copy, Debug)]
pub struct Region<'a> {
    base: NonNull<u8>,
    len: usize,
    _owner: PhantomData<&'a ()>,
}

// SAFETY: a Region is a pointer and a length into memory that its owner keeps mapped
// for 'a; all access through it is atomic or raw-copy, which is safe to do from any
// thread.
unsafe impl Send for Region<'_> {}
// SAFETY: as above; shared access only goes through atomics or raw copies.
unsafe impl Sync for Region<'_> {}

impl<'a> Region<'a> {
    /// # Safety
    /// `base..base+len` must stay mapped, readable and writable for `'a`, and `base`
    /// must be aligned to [`REGION_ALIGN`].
    pub unsafe fn from_raw(base: NonNull<u8>, len: usize) -> Self {
        debug_assert_eq!(base.as_ptr() as usize % REGION_ALIGN, 0);
        Self {
            base,
            len,
            _owner: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address (for diagnostics and raw-pointer views).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// A pointer to `len` bytes at `offset`, or `None` when the span does not fit.
    pub fn span(&self, offset: usize, len: usize) -> Option<NonNull<u8>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset <= end <= self.len, so the result stays inside the mapping.
        Some(unsafe { NonNull::new_unchecked(self.base.as_ptr().add(offset)) })
    }

    /// A typed reference to a `repr(C)` structure made only of atomics, at `offset`.
    ///
    /// Returns `None` when it does not fit or is misaligned. A reference to atomics is
    /// sound even while other processes write the same bytes: every access is atomic.
    ///
    /// # Safety
    /// `T` must consist only of atomic integers (no padding that is read, no plain
    /// fields), so that any bit pattern is a valid `T` and all access is atomic.
    pub unsafe fn view<T>(&self, offset: usize) -> Option<&'a T> {
        let ptr = self.span(offset, std::mem::size_of::<T>())?;
        if ptr.as_ptr() as usize % std::mem::align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: in bounds and aligned (checked above); the caller promises T is all
        // atomics, so every bit pattern is valid and shared mutation is not a race.
        Some(unsafe { &*ptr.as_ptr().cast::<T>() })
    }

    /// A reference to the `AtomicU64` at `offset` (must be 8-aligned and in bounds).
    pub fn atomic_u64(&self, offset: usize) -> Option<&'a std::sync::atomic::AtomicU64> {
        // SAFETY: AtomicU64 is a single atomic integer.
        unsafe { self.view(offset) }
    }

    /// Replaces the contents of `out` with the `len` bytes at `offset`, without
    /// zero-filling first. Returns `false` (leaving `out` empty) when the span does not
    /// fit.
    pub fn copy_out_to_vec(&self, offset: usize, len: usize, out: &mut Vec<u8>) -> bool {
        out.clear();
        let Some(src) = self.span(offset, len) else {
            return false;
        };
        out.reserve(len);
        // SAFETY: the span is in bounds and mapped while `self` lives (a peer may
        // write it meanwhile: the copy is atomic, `shm.untrusted.payload-copy`); `out`
        // has capacity for `len` bytes after reserve, all initialised by the copy
        // before set_len.
        unsafe {
            crate::shared_copy::copy_from_shared_raw(src.as_ptr(), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        true
    }

    /// Copies `src` into the region at `offset`. Returns `false` (and copies nothing)
    /// when the span does not fit.
    pub fn copy_in(&self, offset: usize, src: &[u8]) -> bool {
        match self.span(offset, src.len()) {
            Some(dst) => {
                // SAFETY: in bounds (checked by span) and mapped while `self` lives;
                // a peer may touch the bytes meanwhile, and the copy is atomic.
                unsafe { crate::shared_copy::copy_to_shared(src, dst.as_ptr()) };
                true
            }
            None => false,
        }
    }
}

/// A zeroed, page-aligned heap allocation: a segment for one process (tests, Miri,
/// in-process guests).
#[derive(Debug)]
pub struct HeapRegion {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is owned by this value and only accessed through Region's
// atomic / raw-copy API.
unsafe impl Send for HeapRegion {}
// SAFETY: as above.
unsafe impl Sync for HeapRegion {}

impl HeapRegion {
    /// Allocates `len` zeroed bytes aligned to [`REGION_ALIGN`].
    pub fn new_zeroed(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), REGION_ALIGN)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "region too large"))?;
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Self { ptr, layout })
    }

    /// The region this allocation holds.
    pub fn region(&self) -> Region<'_> {
        // SAFETY: the allocation lives as long as &self, is aligned to REGION_ALIGN and
        // is at least layout.size() bytes.
        unsafe { Region::from_raw(self.ptr, self.layout.size()) }
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// A `MAP_SHARED` read-write mapping of a file, unmapped on drop.
#[derive(Debug)]
pub struct MmapRegion {
    ptr: NonNull<u8>,
    len: usize,
    /// Held open for the mapping's life: its open file description carries the
    /// liveness lock of whoever mapped it (`shm.live.host-lock`, `shm.live.guest-lock`).
    file: File,
}

// SAFETY: the mapping is owned by this value; access goes through Region.
unsafe impl Send for MmapRegion {}
// SAFETY: as above.
unsafe impl Sync for MmapRegion {}

impl MmapRegion {
    /// Maps the first `len` bytes of `file` read-write and `MAP_SHARED`, so stores are
    /// visible to every process mapping the same file.
    ///
    /// The caller must have checked that the file is at least `len` bytes long:
    /// touching a page past the end of the file raises SIGBUS.
    // shm[impl shm.file.mmap-posix]
    #[cfg(unix)]
    pub fn map(file: File, len: usize) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no Rust
        // object; the fd is valid for the duration of the call.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { ptr, len, file })
    }

    /// File mappings are not supported on this platform yet.
    // shm[impl shm.file.mmap-windows]
    #[cfg(not(unix))]
    pub fn map(_file: File, _len: usize) -> io::Result<Self> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "shmhub: file-backed segments are not supported on this platform yet",
        ))
    }

    /// Whether this build can map file-backed segments (POSIX `mmap`); `false` on
    /// platforms whose backend is not written yet (Windows).
    // shm[impl shm.file.mmap-windows]
    pub const fn supported() -> bool {
        cfg!(unix)
    }

    /// The mapped file (its descriptor shares the open file description that holds
    /// this process's liveness lock).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The region this mapping holds.
    pub fn region(&self) -> Region<'_> {
        // SAFETY: the mapping stays valid until drop; mmap returns page-aligned
        // addresses.
        unsafe { Region::from_raw(self.ptr, self.len) }
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: ptr/len describe exactly the mapping created in `map`, and no view
        // outlives self (views borrow from it).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The memory behind a segment.
#[derive(Debug, Clone)]
pub enum ShmBacking {
    /// A heap allocation shared by handles in one process.
    Heap(Arc<HeapRegion>),
    /// A shared file mapping.
    Mmap(Arc<MmapRegion>),
}

impl ShmBacking {
    /// The region this backing holds.
    pub fn region(&self) -> Region<'_> {
        match self {
            ShmBacking::Heap(h) => h.region(),
            ShmBacking::Mmap(m) => m.region(),
        }
    }

    /// The mapped file, for a file-backed segment.
    pub fn file(&self) -> Option<&File> {
        match self {
            ShmBacking::Heap(_) => None,
            ShmBacking::Mmap(m) => Some(m.file()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // shm[verify shm.file.mmap-windows]
    // shm[verify shm.file.mmap-posix]
    #[test]
    #[cfg_attr(miri, ignore = "file-backed mmap: not in Miri")]
    fn file_mappings_are_shared_where_supported() {
        assert_eq!(MmapRegion::supported(), cfg!(unix));
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        let a = MmapRegion::map(file.try_clone().unwrap(), 8192).unwrap();
        let b = MmapRegion::map(file, 8192).unwrap();
        // Two mappings of one file see each other's stores: MAP_SHARED.
        a.region()
            .atomic_u64(4096)
            .unwrap()
            .store(42, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            b.region()
                .atomic_u64(4096)
                .unwrap()
                .load(std::sync::atomic::Ordering::SeqCst),
            42
        );
        assert!(a.region().atomic_u64(8192).is_none(), "bounds are checked");
        assert!(a.region().atomic_u64(4).is_none(), "alignment is checked");
        let mut out = Vec::new();
        assert!(!a.region().copy_out_to_vec(8000, 500, &mut out));
        assert!(a.region().copy_out_to_vec(4096, 8, &mut out));
        assert_eq!(out, 42u64.to_le_bytes());
    }
}
