//! Volume handles: byte-addressed I/O on one thin volume.
//!
//! Offsets and lengths are multiples of 512 bytes; the engine maps 4 KiB blocks, so writes that cover part of a block
//! read, modify and rewrite it. Never-written ranges read as zeroes.

use std::sync::Arc;

use crate::format::{crc32, BLOCK, BLOCK_SIZE};
use crate::index::MappingKind;
use crate::io::SECTOR_SIZE;
use crate::pool::{flush, log_blocks_for, BlockSum, Inner, State, WriteRun, MAX_IO_BYTES};
use crate::{Error, Result};

/// What a handle points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// A writable volume.
    Volume(u64),
    /// A read-only snapshot.
    Snapshot(u64),
}

/// A handle on one volume, or one read-only snapshot, of a pool. Cheap to clone; after the volume is deleted or the
/// pool closed, calls fail.
#[derive(Debug, Clone)]
pub struct Volume {
    inner: Arc<Inner>,
    target: Target,
    name: String,
}

/// What a request does, for validation messages.
#[derive(Clone, Copy)]
enum Kind {
    Buffer,
    Range,
}

impl State {
    fn validate(&self, t: Target, name: &str, offset: u64, len: u64, kind: Kind) -> Result<u64> {
        let size = self.target(t, name)?.1;
        if len == 0 {
            return Err(Error::InvalidArgument("zero-length request".into()));
        }
        if matches!(kind, Kind::Buffer) && len > MAX_IO_BYTES {
            return Err(Error::InvalidArgument(format!(
                "request of {len} bytes is larger than the maximum of {MAX_IO_BYTES} bytes"
            )));
        }
        if offset % SECTOR_SIZE != 0 {
            return Err(Error::Unaligned { what: "offset", value: offset, align: SECTOR_SIZE });
        }
        if len % SECTOR_SIZE != 0 {
            return Err(Error::Unaligned { what: "length", value: len, align: SECTOR_SIZE });
        }
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(size),
            _ => Err(Error::OutOfRange {
                volume: name.to_string(),
                offset_bytes: offset,
                len_bytes: len,
                size_bytes: size,
            }),
        }
    }
}

impl Volume {
    pub(crate) fn new(inner: Arc<Inner>, target: Target, name: String) -> Self {
        Self { inner, target, name }
    }

    /// True for a snapshot, which refuses writes.
    pub fn is_read_only(&self) -> bool {
        matches!(self.target, Target::Snapshot(_))
    }

    /// The pool's state, or with `nowait` `None` if another thread holds it.
    fn lock(&self, nowait: bool) -> Option<parking_lot::MutexGuard<'_, State>> {
        if nowait {
            self.inner.state.try_lock()
        } else {
            Some(self.inner.state.lock())
        }
    }

    /// The id of a writable volume, or a read-only error.
    fn writable_id(&self) -> Result<u64> {
        match self.target {
            Target::Volume(id) => Ok(id),
            Target::Snapshot(_) => Err(Error::ReadOnly(self.name.clone())),
        }
    }

    /// What `[offset, offset + len)` holds: data, zeroes, trimmed or never written, as merged runs clipped to the
    /// range (for NBD block status).
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<crate::Extent>> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_open()?;
        st.validate(self.target, &self.name, offset, len, Kind::Range)?;
        let (root, _) = st.target(self.target, &self.name)?;
        let first = offset / BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE);
        let mut runs = st.index.allocation(dev, root, first, end)?;
        // clip to the byte range asked for
        for r in &mut runs {
            let lo = r.offset_bytes.max(offset);
            let hi = (r.offset_bytes + r.len_bytes).min(offset + len);
            r.offset_bytes = lo;
            r.len_bytes = hi - lo;
        }
        runs.retain(|r| r.len_bytes > 0);
        Ok(runs)
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume's size in bytes.
    pub fn size_bytes(&self) -> Result<u64> {
        let st = self.inner.state.lock();
        st.check_open()?;
        Ok(st.target(self.target, &self.name)?.1)
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let done = self.read_with(offset, buf, false)?;
        assert!(done, "a blocking read always completes");
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` only if that needs no waiting: the pool is not busy and every block is in
    /// memory or the page cache ([`crate::io::Device::read_at_nowait`]). `Ok(true)`: done, as [`Volume::read`];
    /// `Ok(false)`: it would have waited and `buf` holds unspecified bytes (call [`Volume::read`]). Errors are those
    /// of `read`. For servers that answer cached reads on their event loop; a tree node not yet loaded since the
    /// pool was opened is still read from the device.
    pub fn try_read_now(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.read_with(offset, buf, true)
    }

    fn read_with(&self, offset: u64, buf: &mut [u8], nowait: bool) -> Result<bool> {
        let dev = &*self.inner.dev;
        let len = buf.len() as u64;
        let Some(mut st) = self.lock(nowait) else { return Ok(false) };
        st.check_open()?;
        st.validate(self.target, &self.name, offset, len, Kind::Buffer)?;
        let (root, _) = st.target(self.target, &self.name)?;
        let first = offset / BLOCK_SIZE;
        let last = (offset + len - 1) / BLOCK_SIZE;
        let n = (last - first + 1) as usize;
        let aligned = offset % BLOCK_SIZE == 0 && len % BLOCK_SIZE == 0;
        let mut scratch = if aligned { Vec::new() } else { vec![0u8; n * BLOCK] };
        let target: &mut [u8] = if aligned { &mut *buf } else { &mut scratch };
        // (index in request, device block, expected crc)
        let mut from_device: Vec<(usize, u64, u32)> = Vec::new();
        for i in 0..n {
            let m = st.index.lookup(dev, root, first + i as u64)?;
            let out = &mut target[i * BLOCK..(i + 1) * BLOCK];
            if m.kind != MappingKind::Data {
                out.fill(0);
                continue;
            }
            let e = st.index.bt.get(m.vbn);
            if st.log.read_buffered(e.pba, out) {
                continue;
            }
            from_device.push((i, e.pba, e.crc));
        }
        // Read from the device without the pool lock, but with the reuse gate: no segment is reused meanwhile [I4].
        let _gate = if nowait {
            match self.inner.reuse_gate.try_read() {
                Some(g) => g,
                None => return Ok(false),
            }
        } else {
            self.inner.reuse_gate.read()
        };
        drop(st);
        let mut k = 0;
        while k < from_device.len() {
            let (i0, p0, _) = from_device[k];
            let mut run = 1;
            while k + run < from_device.len()
                && from_device[k + run].0 == i0 + run
                && from_device[k + run].1 == p0 + run as u64
            {
                run += 1;
            }
            let dst = &mut target[i0 * BLOCK..(i0 + run) * BLOCK];
            if nowait {
                if !dev.read_at_nowait(dst, p0 * BLOCK_SIZE)? {
                    return Ok(false);
                }
            } else {
                dev.read_at(dst, p0 * BLOCK_SIZE)?;
            }
            for (j, &(i, pba, crc)) in from_device[k..k + run].iter().enumerate() {
                let found = crc32(&dst[j * BLOCK..(j + 1) * BLOCK]);
                if found != crc {
                    return Err(Error::Checksum {
                        volume: self.name.clone(),
                        volume_offset_bytes: (first + i as u64) * BLOCK_SIZE,
                        device_offset_bytes: pba * BLOCK_SIZE,
                        expected: crc,
                        found,
                    });
                }
            }
            k += run;
        }
        if !aligned {
            let skip = (offset - first * BLOCK_SIZE) as usize;
            buf.copy_from_slice(&scratch[skip..skip + buf.len()]);
        }
        Ok(true)
    }

    /// Write `data` at `offset`. Acknowledged writes are durable after the next [`Volume::flush`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let done = self.write_with(offset, data, false, 0)?;
        assert!(done, "a blocking write always completes");
        Ok(())
    }

    /// Write `data` at `offset` only if that needs no waiting: the pool is not busy, the write covers whole blocks,
    /// the log has room for it without cleaning, its batches find the log writers with room
    /// ([`crate::journal::Log::can_seal_now`]), no checkpoint is due and the background thread is there to begin
    /// the one this write may make due (it looks every [`crate::BACKGROUND_CLEAN_TICK`]; the next blocking write
    /// begins it sooner). `Ok(true)`: done, as [`Volume::write`]; `Ok(false)`: nothing was written (call
    /// [`Volume::write`]). Errors are those of `write`. For servers that take short writes on their event loop:
    /// copying a few blocks into the open log batch costs less than the two thread hand-offs a blocking call takes.
    pub fn try_write_now(&self, offset: u64, data: &[u8]) -> Result<bool> {
        self.write_with(offset, data, true, 0)
    }

    /// [`Volume::try_write_now`] for one piece of a longer write of `write_bytes`, for servers that take a write
    /// piece by piece as its bytes arrive: the piece's log batches are written as the whole write's would be (past
    /// the device's cache when it is large, [`crate::PoolOptions::uncached_write_min_bytes`]).
    pub fn try_write_piece_now(&self, offset: u64, data: &[u8], write_bytes: u64) -> Result<bool> {
        self.write_with(offset, data, true, write_bytes)
    }

    /// `write_bytes`: the length of the whole write `data` belongs to, when it is one piece of it (else 0).
    fn write_with(&self, offset: u64, data: &[u8], nowait: bool, write_bytes: u64) -> Result<bool> {
        let dev = &*self.inner.dev;
        let gate = &self.inner.reuse_gate;
        let len = data.len() as u64;
        let id = self.writable_id()?;
        let aligned = offset % BLOCK_SIZE == 0 && len % BLOCK_SIZE == 0;
        if nowait && (!aligned || self.inner.checkpoint_finisher.lock().is_none()) {
            // a read-modify-write may read the device; without the background thread nobody else begins a
            // checkpoint this write makes due
            return Ok(false);
        }
        // The whole blocks' checksums (and zero tests), before the lock: concurrent writers overlap on this part.
        // Requests the validation below refuses get none (their range may not even be computable).
        let sums: Vec<BlockSum> = match offset.checked_add(len) {
            Some(_) if len > 0 && len <= MAX_IO_BYTES => whole_blocks(offset, data).map(BlockSum::of).collect(),
            _ => Vec::new(),
        };
        let Some(mut st) = self.lock(nowait) else { return Ok(false) };
        st.check_writable()?;
        st.validate(self.target, &self.name, offset, len, Kind::Buffer)?;
        let first = offset / BLOCK_SIZE;
        let last = (offset + len - 1) / BLOCK_SIZE;
        let log_blocks = log_blocks_for(last - first + 1);
        if nowait && !st.can_write_now(log_blocks) {
            return Ok(false);
        }
        st.ensure_room(dev, gate, log_blocks)?;
        let mut block_buf = vec![0u8; if aligned { 0 } else { BLOCK }];
        let mut sums = sums.into_iter();
        // a large write's batches skip the device's cache; the flag is down again before anything else appends
        let uncached = len.max(write_bytes) >= st.uncached_write_min_bytes;
        st.log.set_uncached(uncached);
        // where the last whole block went: the next one of the same leaf is mapped there without a walk
        let mut run = WriteRun::new(last);
        let logged = (first..=last).try_for_each(|b| {
            let base = b * BLOCK_SIZE;
            let lo = offset.max(base);
            let hi = (offset + len).min(base + BLOCK_SIZE);
            let src = &data[(lo - offset) as usize..(hi - offset) as usize];
            if hi - lo == BLOCK_SIZE {
                // every request that passed validation has its sums
                let sum = sums.next().unwrap_or_else(|| BlockSum::of(src));
                st.write_summed_block(dev, id, b, src, sum, &mut run)
            } else {
                run.forget();
                st.read_block(dev, id, b, &mut block_buf)?;
                block_buf[(lo - base) as usize..(hi - base) as usize].copy_from_slice(src);
                st.write_block(dev, id, b, &block_buf)
            }
        });
        st.log.set_uncached(false);
        logged?;
        if nowait {
            // a checkpoint this write made due is begun by the background thread, or by the next write, which
            // declines to run here while it is due
            st.checkpoint_left_due |= st.checkpoint_due();
            return Ok(true);
        }
        crate::pool::maybe_checkpoint_unlocked(&self.inner, st)?;
        Ok(true)
    }

    /// Write zeroes over `[offset, offset + len)`: whole blocks become zero mappings that take no data space.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.range_op(offset, len, MappingKind::Zero)
    }

    /// Discard `[offset, offset + len)`: whole blocks inside it read as zeroes afterwards and free their space;
    /// partial blocks at either end are left as they are (a discard is a hint).
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.range_op(offset, len, MappingKind::Trimmed)
    }

    fn range_op(&self, offset: u64, len: u64, kind: MappingKind) -> Result<()> {
        let dev = &*self.inner.dev;
        let gate = &self.inner.reuse_gate;
        let id = self.writable_id()?;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        st.validate(self.target, &self.name, offset, len, Kind::Range)?;
        let end = offset + len;
        let whole_lo = offset.div_ceil(BLOCK_SIZE);
        let whole_hi = end / BLOCK_SIZE;
        st.ensure_room_to_free(dev, gate, 8)?;
        if kind == MappingKind::Zero {
            if whole_lo > whole_hi {
                // inside one block
                st.zero_partial(dev, id, offset, end)?;
            } else {
                st.zero_partial(dev, id, offset, (whole_lo * BLOCK_SIZE).min(end))?;
                st.zero_partial(dev, id, (whole_hi * BLOCK_SIZE).max(offset), end)?;
            }
        }
        if whole_hi > whole_lo {
            let count = whole_hi - whole_lo;
            let op = match kind {
                MappingKind::Zero => crate::format::ops::Op::Zero { volume: id, block: whole_lo, count },
                _ => crate::format::ops::Op::Trim { volume: id, block: whole_lo, count },
            };
            st.log_apply(dev, op, None)?;
        }
        crate::pool::maybe_checkpoint_unlocked(&self.inner, st)
    }

    /// Make every write acknowledged so far (to any volume of the pool) durable.
    pub fn flush(&self) -> Result<()> {
        flush(&self.inner)
    }
}

/// The whole 4 KiB blocks of a write of `data` at `offset`, in order; partial blocks at either end are left out.
fn whole_blocks(offset: u64, data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let skip = ((BLOCK_SIZE - offset % BLOCK_SIZE) % BLOCK_SIZE) as usize;
    data.get(skip..).unwrap_or(&[]).chunks_exact(BLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_blocks_are_the_blocks_a_write_covers_entirely() {
        let data: Vec<u8> = (0..5 * BLOCK).map(|i| (i % 253) as u8).collect();
        for offset in [0u64, 1, 511, 512, 4095, 4096, 4097, 3 * 4096 - 512] {
            for len in [1usize, 512, 4095, 4096, 4097, 8192, 3 * BLOCK + 7, 5 * BLOCK] {
                let data = &data[..len];
                let end = offset + len as u64;
                let mut want: Vec<&[u8]> = Vec::new();
                for b in offset / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
                    let (lo, hi) = (offset.max(b * BLOCK_SIZE), end.min((b + 1) * BLOCK_SIZE));
                    if hi - lo == BLOCK_SIZE {
                        want.push(&data[(lo - offset) as usize..(hi - offset) as usize]);
                    }
                }
                let got: Vec<&[u8]> = whole_blocks(offset, data).collect();
                assert_eq!(got, want, "offset {offset} len {len}");
            }
        }
    }
}
