//! A bounded pool of I/O buffers, so large reads and writes do not allocate, fault in and zero fresh memory on every
//! request.

use parking_lot::Mutex;

/// Smallest buffer class: 4 KiB.
const MIN_CLASS_SHIFT: u32 = 12;
/// Number of size classes: 4 KiB, 8 KiB, ... 32 MiB.
const CLASSES: usize = 14;
/// Most memory the pool keeps idle, over all classes.
pub const MAX_POOLED_BYTES: usize = 64 << 20;

/// A buffer of `len` bytes on a fully initialised allocation of its class size.
#[derive(Debug)]
pub struct Buf {
    bytes: Vec<u8>,
    len: usize,
}

impl Buf {
    /// A fresh zeroed buffer outside any pool.
    pub fn zeroed(len: usize) -> Self {
        Self { bytes: vec![0; len], len }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }

    /// Shortens the buffer to its first `len` bytes (no longer than it is).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The pool; shared by every connection of a server.
#[derive(Debug)]
pub struct BufPool {
    inner: Mutex<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    classes: [Vec<Vec<u8>>; CLASSES],
    pooled_bytes: usize,
}

fn class_of(len: usize) -> Option<usize> {
    let size = len.max(1).next_power_of_two();
    let shift = size.trailing_zeros().max(MIN_CLASS_SHIFT);
    let class = (shift - MIN_CLASS_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

impl Default for BufPool {
    fn default() -> Self {
        Self::new()
    }
}

impl BufPool {
    pub fn new() -> Self {
        Self { inner: Mutex::new(PoolInner { classes: Default::default(), pooled_bytes: 0 }) }
    }

    /// A buffer of `len` bytes. Its contents are unspecified (old data of this process): callers overwrite it.
    pub fn take(&self, len: usize) -> Buf {
        let Some(class) = class_of(len) else { return Buf::zeroed(len) };
        if let Some(bytes) = {
            let mut inner = self.inner.lock();
            let got = inner.classes[class].pop();
            if let Some(b) = &got {
                inner.pooled_bytes -= b.len();
            }
            got
        } {
            return Buf { bytes, len };
        }
        Buf { bytes: vec![0; 1usize << (class as u32 + MIN_CLASS_SHIFT)], len }
    }

    /// Returns a buffer to the pool, or frees it when the pool is full.
    pub fn give(&self, buf: Buf) {
        let size = buf.bytes.len();
        let Some(class) = class_of(size) else { return };
        if size != 1usize << (class as u32 + MIN_CLASS_SHIFT) {
            return;
        }
        let mut inner = self.inner.lock();
        if inner.pooled_bytes + size <= MAX_POOLED_BYTES {
            inner.pooled_bytes += size;
            inner.classes[class].push(buf.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_class_and_bounded() {
        let pool = BufPool::new();
        let mut a = pool.take(5000);
        assert_eq!(a.len(), 5000);
        a.as_mut_slice().fill(7);
        pool.give(a);
        let b = pool.take(8192);
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_slice()[0], 7, "the 8 KiB class buffer was reused");
        pool.give(b);
        let many: Vec<Buf> = (0..40).map(|_| pool.take(4 << 20)).collect();
        for b in many {
            pool.give(b);
        }
        assert!(pool.inner.lock().pooled_bytes <= MAX_POOLED_BYTES);
        let huge = pool.take(64 << 20);
        assert_eq!(huge.len(), 64 << 20);
        pool.give(huge);
        assert!(pool.inner.lock().pooled_bytes <= MAX_POOLED_BYTES);
    }
}
