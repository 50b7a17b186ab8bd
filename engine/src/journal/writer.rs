//! Background log writers: sealed batches are written by a few threads while the engine builds the next batch, so
//! log appends overlap with index work and several writes reach the device at once. Every bound is a named constant.
//!
//! On a file (a device with a raw fd) one thread keeps up to [`MAX_INFLIGHT_BATCHES`] writes in flight through
//! io_uring, as fio does; on other devices (the simulated one) writer threads call `write_at`.
//!
//! On a device that caches writes (a file through the page cache), every finished batch is followed by a writeback
//! hint ([`Device::start_writeback`]; in the ring, `sync_file_range`): the kernel writes the log back as it grows,
//! instead of piling up gigabytes of dirty pages that the next checkpoint's or flush's sync (which writers wait
//! behind) would have to write at once.
//!
//! Batches of large writes are written past the device's cache instead ([`Device::write_uncached_at`]; in the ring,
//! on [`Device::uncached_fd`]), with no hint after them.
//!
//! The io_uring writer registers the batch buffers with its ring once ([`REGISTERED_BATCH_BUFFERS`] of them, made
//! when the pipeline starts) and writes them with `WRITE_FIXED`: the kernel pins their pages once, instead of for
//! every write (which cost as much CPU as the rest of an O_DIRECT write's submission: fio's `--fixedbufs` takes
//! half the CPU per MiB on this machine's disk, benches/RESULTS.md).
//!
//! Until a write completes, its buffer stays readable through [`Pipeline::read_buffered`]. A flush or checkpoint
//! waits for every write in flight ([`Pipeline::drain`]) before it syncs. A failed write is reported by the next call
//! that waits for it, and the pool then fails.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::format::{BLOCK, BLOCK_SIZE};
use crate::io::{AlignedBuf, Device};
use crate::{Error, Result};

/// Batches written at once, at most: bounds the buffer memory of the log to this many batch buffers plus one
/// (16.5 MiB). Batches written past the page cache are in flight until the disk has them (about 2 ms each here), so
/// it takes this many to keep a disk of a few GB/s busy: 1 MiB writes over NBD at queue depth 4 ran at 2,607-3,213
/// MB/s with 8, 3,015-3,480 with 32 (`benches/nbd/cpu.sh`, three alternating rounds, benches/RESULTS.md).
pub(crate) const MAX_INFLIGHT_BATCHES: usize = 32;
/// Writer threads when the options do not say.
pub const DEFAULT_LOG_WRITER_THREADS: usize = 2;
/// Most writer threads a pool may ask for.
pub const MAX_LOG_WRITER_THREADS: usize = 8;

/// Batch buffers registered with the io_uring writer's ring: one for each batch in flight and one for the batch being
/// built, so that every batch is written from one (the pipeline never makes another while these are in use).
const REGISTERED_BATCH_BUFFERS: usize = MAX_INFLIGHT_BATCHES + 1;

/// A batch buffer: aligned for O_DIRECT, and its slot among the buffers registered with the io_uring writer's ring,
/// if it is one of them (the slot is the buffer's own, given once: no other buffer ever carries it).
#[derive(Debug)]
pub(crate) struct BatchBuf {
    buf: AlignedBuf,
    slot: Option<u16>,
}

impl BatchBuf {
    /// A buffer of `len` zero bytes, registered with no ring.
    pub(crate) fn plain(len: usize) -> Self {
        Self { buf: AlignedBuf::zeroed(len), slot: None }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        self.buf.as_slice()
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf.as_mut_slice()
    }
}

/// Where the registered buffers lie, for the ring (addresses, not references: the thread that registers them never
/// touches their bytes).
#[derive(Debug, Clone, Copy)]
struct BufferSpan {
    addr: usize,
    len: usize,
}

struct Job {
    id: u64,
    pba: u64,
    buf: Arc<BatchBuf>,
    len: usize,
    /// Written with [`Device::write_uncached_at`] (no writeback hint follows).
    uncached: bool,
}

struct Done {
    id: u64,
    result: Result<()>,
}

#[derive(Debug)]
struct Pending {
    id: u64,
    pba: u64,
    blocks: u64,
    buf: Arc<BatchBuf>,
    result: Option<Result<()>>,
}

/// Writes sealed batches, in the background or (with zero threads) at once.
pub(crate) struct Pipeline {
    dev: Arc<dyn Device>,
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    pending: VecDeque<Pending>,
    free: Vec<BatchBuf>,
    /// Registered buffers that could not go back to `free` (a writer still held a reference, or the write never
    /// reached a writer): kept until the writer threads, and the ring they are registered with, are gone, then freed.
    retired: Vec<Arc<BatchBuf>>,
    next_id: u64,
    threads: Vec<JoinHandle<()>>,
    buffer_bytes: usize,
    /// Writes submitted with `WRITE_FIXED` (from a registered buffer).
    fixed_writes: Arc<AtomicU64>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("threads", &self.threads.len())
            .field("in_flight", &self.pending.len())
            .finish()
    }
}

impl Pipeline {
    /// `threads` background writers (0: every write happens in the caller, deterministic I/O order for tests).
    pub(crate) fn new(dev: Arc<dyn Device>, threads: usize, buffer_bytes: usize) -> Self {
        let threads = threads.min(MAX_LOG_WRITER_THREADS);
        let (done_tx, done) = mpsc::channel::<Done>();
        let mut handles = Vec::new();
        let mut free = Vec::new();
        let fixed_writes = Arc::new(AtomicU64::new(0));
        let jobs = if threads == 0 {
            None
        } else {
            let (tx, rx) = mpsc::sync_channel::<Job>(MAX_INFLIGHT_BATCHES);
            let rx = Arc::new(Mutex::new(rx));
            let uring = dev.raw_fd().and_then(|fd| io_uring::IoUring::new(URING_ENTRIES).ok().map(|r| (fd, r)));
            if let Some((fd, ring)) = uring {
                let fd = Fds { cached: fd, uncached: dev.uncached_fd(), registered: false };
                // the buffers the ring will know, made before the thread that registers them
                let bufs: Vec<BatchBuf> = (0..REGISTERED_BATCH_BUFFERS as u16)
                    .map(|slot| BatchBuf { buf: AlignedBuf::zeroed(buffer_bytes), slot: Some(slot) })
                    .collect();
                let spans: Vec<BufferSpan> = bufs
                    .iter()
                    .map(|b| BufferSpan { addr: b.as_slice().as_ptr() as usize, len: buffer_bytes })
                    .collect();
                let (rx, done_tx, dev, counter) = (rx.clone(), done_tx.clone(), dev.clone(), fixed_writes.clone());
                let spawned = std::thread::Builder::new()
                    .name("blockmesh-log-uring".into())
                    .spawn(move || uring_jobs(&*dev, fd, ring, &spans, &counter, &rx, &done_tx));
                if let Ok(h) = spawned {
                    handles.push(h);
                    free = bufs;
                }
            }
            for i in 0..if handles.is_empty() { threads } else { 0 } {
                let rx = rx.clone();
                let done_tx: Sender<Done> = done_tx.clone();
                let dev = dev.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("blockmesh-log-{i}"))
                    .spawn(move || write_jobs(&*dev, &rx, &done_tx));
                match spawned {
                    Ok(h) => handles.push(h),
                    Err(_) => break, // fewer threads; with none, writes stay synchronous below
                }
            }
            (!handles.is_empty()).then_some(tx)
        };
        Self {
            dev,
            jobs,
            done,
            pending: VecDeque::new(),
            free,
            retired: Vec::new(),
            next_id: 0,
            threads: handles,
            buffer_bytes,
            fixed_writes,
        }
    }

    /// A buffer for the next batch: a free one, else a new one.
    pub(crate) fn buffer(&mut self) -> BatchBuf {
        self.free.pop().unwrap_or_else(|| BatchBuf::plain(self.buffer_bytes))
    }

    /// Writes submitted from a registered buffer so far (short writes continued count again).
    pub(crate) fn fixed_writes(&self) -> u64 {
        self.fixed_writes.load(Ordering::Relaxed)
    }

    /// Keep a buffer the ring may know until the ring is gone; let any other go.
    fn retire(&mut self, buf: Arc<BatchBuf>) {
        if buf.slot.is_some() {
            self.retired.push(buf);
        }
    }

    /// Write `buf[..len]` at block `pba` (in the background when there are writer threads), past the device's
    /// cache if `uncached` ([`Device::write_uncached_at`]); returns a buffer for the next batch.
    pub(crate) fn submit(&mut self, pba: u64, buf: BatchBuf, len: usize, uncached: bool) -> Result<BatchBuf> {
        let Some(jobs) = &self.jobs else {
            if uncached {
                self.dev.write_uncached_at(&buf.as_slice()[..len], pba * BLOCK_SIZE)?;
            } else {
                self.dev.write_at(&buf.as_slice()[..len], pba * BLOCK_SIZE)?;
                // only a hint: its failure is not the write's
                let _ = self.dev.start_writeback(pba * BLOCK_SIZE, len as u64);
            }
            return Ok(buf);
        };
        let id = self.next_id;
        self.next_id += 1;
        let buf = Arc::new(buf);
        if let Err(mpsc::SendError(job)) = jobs.send(Job { id, pba, buf: buf.clone(), len, uncached }) {
            drop(job);
            self.retire(buf);
            return Err(Error::io("write", pba * BLOCK_SIZE, len as u64, std::io::Error::other("log writer gone")));
        }
        self.pending.push_back(Pending { id, pba, blocks: (len / BLOCK) as u64, buf, result: None });
        while self.pending.len() >= MAX_INFLIGHT_BATCHES {
            self.wait_one()?;
        }
        self.reap(false)?;
        Ok(self.buffer())
    }

    /// Whether `batches` more submissions would all return without waiting: there are writer threads (without,
    /// each submission writes in the caller), and the writes in flight, finished or not, leave room for them.
    pub(crate) fn has_room(&self, batches: u64) -> bool {
        self.jobs.is_some() && self.pending.len() as u64 + batches < MAX_INFLIGHT_BATCHES as u64
    }

    /// Take completions; with `block`, wait for at least one. Finished writes at the front leave the queue.
    fn reap(&mut self, block: bool) -> Result<()> {
        let mut got = Vec::new();
        if block {
            match self.done.recv() {
                Ok(d) => got.push(d),
                Err(_) => return Err(Error::io("write", 0, 0, std::io::Error::other("log writers stopped"))),
            }
        }
        while let Ok(d) = self.done.try_recv() {
            got.push(d);
        }
        for d in got {
            if let Some(p) = self.pending.iter_mut().find(|p| p.id == d.id) {
                p.result = Some(d.result);
            }
        }
        while self.pending.front().is_some_and(|p| p.result.is_some()) {
            let Some(p) = self.pending.pop_front() else { break };
            // the writer let go of its reference before it reported the write done
            match Arc::try_unwrap(p.buf) {
                Ok(buf) => self.free.push(buf),
                Err(shared) => self.retire(shared),
            }
            if let Some(Err(e)) = p.result {
                return Err(e);
            }
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        let before = self.pending.len();
        while self.pending.len() == before && before > 0 {
            self.reap(true)?;
        }
        Ok(())
    }

    /// Wait until every submitted write has completed.
    pub(crate) fn drain(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.reap(true)?;
        }
        Ok(())
    }

    /// Copy block `pba` from a write still in flight; false if none holds it.
    pub(crate) fn read_buffered(&self, pba: u64, out: &mut [u8]) -> bool {
        for p in &self.pending {
            if pba >= p.pba && pba < p.pba + p.blocks {
                let at = (pba - p.pba) as usize * BLOCK;
                out.copy_from_slice(&p.buf.as_slice()[at..at + BLOCK]);
                return true;
            }
        }
        false
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.jobs = None; // the writers see the channel close and stop
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// Writeback hints (`sync_file_range`) in flight at once, at most; one more is skipped (it is only a hint).
const MAX_INFLIGHT_WRITEBACK_HINTS: usize = 4;
/// Ring size of the io_uring writer: room for every write and hint in flight, twice over.
const URING_ENTRIES: u32 = 2 * (MAX_INFLIGHT_BATCHES + MAX_INFLIGHT_WRITEBACK_HINTS) as u32;
/// `user_data` of writeback hints in the ring (batch ids count up from 0 and never reach it).
const HINT_ID: u64 = u64::MAX;

/// Ask the kernel to start writing a finished batch back ([`Device::start_writeback`], in the ring).
fn submit_writeback_hint(ring: &mut io_uring::IoUring, fd: std::os::fd::RawFd, job: &Job) -> bool {
    use io_uring::{opcode, types};
    let entry = opcode::SyncFileRange::new(types::Fd(fd), job.len as u32)
        .offset(job.pba * BLOCK_SIZE)
        .flags(libc::SYNC_FILE_RANGE_WRITE)
        .build()
        .user_data(HINT_ID);
    // SAFETY: a sync_file_range entry points at no memory of ours: only the descriptor, which stays open for as long
    // as the device (and its writer thread) lives.
    unsafe { ring.submission().push(&entry).is_ok() }
}

/// The descriptors of the io_uring writer: the device's, and the one its uncached writes go through, if any; and
/// whether the batch buffers are registered with its ring.
#[derive(Clone, Copy)]
struct Fds {
    cached: std::os::fd::RawFd,
    uncached: Option<std::os::fd::RawFd>,
    registered: bool,
}

impl Fds {
    fn of(&self, job: &Job) -> std::os::fd::RawFd {
        match self.uncached {
            Some(fd) if job.uncached => fd,
            _ => self.cached,
        }
    }
}

fn submit_write(ring: &mut io_uring::IoUring, fds: Fds, job: &Job, done_bytes: usize, fixed: &AtomicU64) -> bool {
    use io_uring::{opcode, types};
    let fd = types::Fd(fds.of(job));
    let rest = &job.buf.as_slice()[done_bytes..job.len];
    let offset = job.pba * BLOCK_SIZE + done_bytes as u64;
    let entry = match job.buf.slot {
        // a registered buffer: its pages were pinned once, when the ring took them
        Some(slot) if fds.registered => {
            fixed.fetch_add(1, Ordering::Relaxed);
            opcode::WriteFixed::new(fd, rest.as_ptr(), rest.len() as u32, slot).offset(offset).build()
        }
        _ => opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32).offset(offset).build(),
    };
    // SAFETY: the buffer belongs to `job`, which the caller keeps in its in-flight table (holding an Arc on the
    // buffer) until this entry's completion has been reaped; the writer never leaves while entries are in flight,
    // so the kernel only ever reads memory that is alive and unchanged (a sealed batch buffer is never written).
    // A fixed write names the slot the buffer itself was registered at, and lies inside it.
    unsafe { ring.submission().push(&entry.user_data(job.id)).is_ok() }
}

/// Register the batch buffers with the writer's ring; false if the kernel refuses (e.g. over `RLIMIT_MEMLOCK`):
/// the writer then writes them as plain buffers.
fn register_buffers(ring: &io_uring::IoUring, spans: &[BufferSpan]) -> bool {
    let iovecs: Vec<libc::iovec> =
        spans.iter().map(|s| libc::iovec { iov_base: s.addr as *mut libc::c_void, iov_len: s.len }).collect();
    // SAFETY: each span is the whole of a batch buffer the pipeline made for this ring (`Pipeline::new`) and never
    // frees before the writer threads are joined (buffers the ring may know go back to its free list or, failing
    // that, to `retired`; `Log` drops its pipeline before its own buffer), so the memory stays valid for as long as
    // the ring, which this thread owns and drops when it ends.
    !spans.is_empty() && unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok()
}

/// The io_uring writer: up to [`MAX_INFLIGHT_BATCHES`] writes in flight from one thread; short writes continue.
fn uring_jobs(
    dev: &dyn Device,
    mut fds: Fds,
    mut ring: io_uring::IoUring,
    spans: &[BufferSpan],
    fixed: &AtomicU64,
    rx: &Mutex<Receiver<Job>>,
    done: &Sender<Done>,
) {
    fds.registered = register_buffers(&ring, spans);
    use std::collections::HashMap;
    use std::sync::mpsc::TryRecvError;
    let mut inflight: HashMap<u64, (Job, usize)> = HashMap::new();
    let mut hints_inflight = 0usize;
    let hints = dev.caches_writes();
    let mut closed = false;
    let fail = |job: &Job, e: std::io::Error| Error::io("write", job.pba * BLOCK_SIZE, job.len as u64, e);
    loop {
        while inflight.len() < MAX_INFLIGHT_BATCHES && !closed {
            let next = if inflight.is_empty() {
                rx.lock().recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                rx.lock().try_recv()
            };
            match next {
                Ok(job) => {
                    if submit_write(&mut ring, fds, &job, 0, fixed) {
                        inflight.insert(job.id, (job, 0));
                    } else {
                        // no room in the ring (cannot happen with its size): write it here instead
                        let result = write_here(dev, &job, 0);
                        let _ = done.send(Done { id: job.id, result });
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => closed = true,
            }
        }
        if inflight.is_empty() {
            if closed {
                return; // hints still in flight touch no memory of ours
            }
            continue;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // the ring is unusable: finish what is in flight synchronously and report it
            for (_, (job, n)) in inflight.drain() {
                let result = write_here(dev, &job, n);
                let _ = done.send(Done { id: job.id, result });
            }
            continue;
        }
        let completions: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (id, res) in completions {
            if id == HINT_ID {
                // a failed hint changes nothing: the sync that follows reports what the device does
                hints_inflight = hints_inflight.saturating_sub(1);
                continue;
            }
            let Some((job, n)) = inflight.get_mut(&id) else { continue };
            let outcome = if res == -libc::EINVAL && job.uncached {
                // O_DIRECT refused (sectors larger than the alignment): write it here, through `write_uncached_at`,
                // which goes through the cache then, and submit every later batch on the cached descriptor
                fds.uncached = None;
                Some(write_here(dev, job, *n))
            } else if res < 0 {
                Some(Err(fail(job, std::io::Error::from_raw_os_error(-res))))
            } else if res == 0 {
                Some(Err(fail(job, std::io::Error::other("device wrote nothing"))))
            } else {
                *n += res as usize;
                if *n >= job.len {
                    Some(Ok(()))
                } else if submit_write(&mut ring, fds, job, *n, fixed) {
                    None // a short write: the rest is in flight now
                } else {
                    Some(Err(fail(job, std::io::Error::other("io_uring submission queue full"))))
                }
            };
            if let Some(result) = outcome {
                if let Some((job, _)) = inflight.remove(&id) {
                    let cached = !job.uncached || fds.uncached.is_none();
                    if hints && cached && result.is_ok() && hints_inflight < MAX_INFLIGHT_WRITEBACK_HINTS {
                        hints_inflight += usize::from(submit_writeback_hint(&mut ring, fds.cached, &job));
                    }
                    drop(job.buf);
                    let _ = done.send(Done { id, result });
                }
            }
        }
        if inflight.is_empty() && !ring.submission().is_empty() {
            // hints queued after the last write: send them now, not with the next batch
            let _ = ring.submit();
        }
    }
}

/// Write the rest of `job` from byte `from` in this thread, through the device's cache or past it as the job says.
fn write_here(dev: &dyn Device, job: &Job, from: usize) -> Result<()> {
    let (buf, offset) = (&job.buf.as_slice()[from..job.len], job.pba * BLOCK_SIZE + from as u64);
    if job.uncached {
        dev.write_uncached_at(buf, offset)
    } else {
        dev.write_at(buf, offset)
    }
}

fn write_jobs(dev: &dyn Device, rx: &Mutex<Receiver<Job>>, done: &Sender<Done>) {
    loop {
        let job = rx.lock().recv();
        let Ok(job) = job else { return };
        let result = write_here(dev, &job, 0);
        if result.is_ok() && !job.uncached {
            // only a hint: its failure is not the write's (the next sync reports what the device does)
            let _ = dev.start_writeback(job.pba * BLOCK_SIZE, job.len as u64);
        }
        drop(job.buf);
        if done.send(Done { id: job.id, result }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{FileDevice, SimDevice};

    /// A device that caches writes and records the writeback hints and the uncached writes it gets.
    #[derive(Debug)]
    struct Hinted {
        inner: Arc<SimDevice>,
        hints: Mutex<Vec<(u64, u64)>>,
        uncached: Mutex<Vec<(u64, u64)>>,
    }

    impl Device for Hinted {
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn sync(&self) -> Result<()> {
            self.inner.sync()
        }
        fn start_writeback(&self, offset: u64, len: u64) -> Result<()> {
            self.hints.lock().push((offset, len));
            Ok(())
        }
        fn caches_writes(&self) -> bool {
            true
        }
        fn write_uncached_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.uncached.lock().push((offset, buf.len() as u64));
            self.inner.write_at(buf, offset)
        }
    }

    fn hinted() -> Arc<Hinted> {
        Arc::new(Hinted {
            inner: SimDevice::new(16 << 20),
            hints: Mutex::new(Vec::new()),
            uncached: Mutex::new(Vec::new()),
        })
    }

    fn batch(fill: u8, blocks: usize) -> BatchBuf {
        let mut buf = BatchBuf::plain(blocks * BLOCK);
        buf.as_mut_slice().fill(fill);
        buf
    }

    #[test]
    fn writer_threads_hint_writeback_of_every_batch_they_wrote() {
        let dev = hinted();
        let mut p = Pipeline::new(dev.clone(), 1, 4 * BLOCK);
        for i in 0..6u64 {
            let blocks = 1 + i as usize % 4;
            drop(p.submit(10 + 4 * i, batch(i as u8 + 1, blocks), blocks * BLOCK, false).expect("submit"));
        }
        p.drain().expect("drain");
        let mut hints = dev.hints.lock().clone();
        hints.sort_unstable();
        let want: Vec<(u64, u64)> = (0..6u64).map(|i| ((10 + 4 * i) * BLOCK_SIZE, (1 + i % 4) * BLOCK_SIZE)).collect();
        assert_eq!(hints, want, "one hint per batch, over exactly its blocks");
        let mut back = vec![0u8; BLOCK];
        dev.read_at(&mut back, (10 + 4 * 5) * BLOCK_SIZE).expect("read");
        assert!(back.iter().all(|&b| b == 6));
    }

    /// Uncached batches go through `write_uncached_at` and get no writeback hint (nothing of theirs is cached);
    /// the others are plain writes with their hint: with writer threads and without.
    #[test]
    fn uncached_batches_skip_the_cache_and_its_hint() {
        for threads in [0, 1] {
            let dev = hinted();
            let mut p = Pipeline::new(dev.clone(), threads, 4 * BLOCK);
            for i in 0..8u64 {
                drop(p.submit(4 * i, batch(i as u8 + 1, 4), 4 * BLOCK, i % 2 == 1).expect("submit"));
            }
            p.drain().expect("drain");
            let (mut hints, mut uncached) = (dev.hints.lock().clone(), dev.uncached.lock().clone());
            hints.sort_unstable();
            uncached.sort_unstable();
            let at =
                |odd: u64| (0..4u64).map(move |k| ((8 * k + 4 * odd) * BLOCK_SIZE, 4 * BLOCK_SIZE)).collect::<Vec<_>>();
            assert_eq!(hints, at(0), "threads {threads}: a hint for each cached batch only");
            assert_eq!(uncached, at(1), "threads {threads}: the uncached batches, written past the cache");
            let mut back = vec![0u8; BLOCK];
            for i in 0..8u64 {
                dev.read_at(&mut back, 4 * i * BLOCK_SIZE).expect("read");
                assert!(back.iter().all(|&b| b == i as u8 + 1), "threads {threads}: batch {i} written");
            }
        }
    }

    #[test]
    fn writes_in_the_caller_hint_writeback_too() {
        let dev = hinted();
        let mut p = Pipeline::new(dev.clone(), 0, 4 * BLOCK);
        drop(p.submit(12, batch(3, 2), 2 * BLOCK, false).expect("submit"));
        assert_eq!(*dev.hints.lock(), [(12 * BLOCK_SIZE, 2 * BLOCK_SIZE)]);
    }

    #[test]
    fn uring_writer_with_writeback_hints_completes_every_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev: Arc<dyn Device> = Arc::new(FileDevice::create(&dir.path().join("dev"), 64 << 20).expect("create"));
        assert!(dev.caches_writes() && dev.raw_fd().is_some(), "the io_uring writer with hints is under test");
        let mut p = Pipeline::new(dev.clone(), 1, 8 * BLOCK);
        // more batches than writes and hints may be in flight, so the hint bound is reached
        let n = 4 * (MAX_INFLIGHT_BATCHES + MAX_INFLIGHT_WRITEBACK_HINTS) as u64;
        for i in 0..n {
            drop(p.submit(8 * i, batch((i % 250) as u8 + 1, 8), 8 * BLOCK, i % 2 == 0).expect("submit"));
        }
        p.drain().expect("drain");
        drop(p); // the writer thread leaves with hints possibly still in flight
        dev.sync().expect("sync");
        let mut back = vec![0u8; 8 * BLOCK];
        for i in 0..n {
            dev.read_at(&mut back, 8 * i * BLOCK_SIZE).expect("read");
            assert!(back.iter().all(|&b| b == (i % 250) as u8 + 1), "batch {i} reads back");
        }
    }

    #[test]
    fn the_uring_writer_writes_every_batch_from_its_registered_buffers() {
        // as the log uses the pipeline: each batch built in the buffer the last submission returned, many more
        // batches than there are buffers, cached and past the cache, some longer than others
        let dir = tempfile::tempdir().expect("tempdir");
        let dev: Arc<dyn Device> = Arc::new(FileDevice::create(&dir.path().join("dev"), 64 << 20).expect("create"));
        let mut p = Pipeline::new(dev.clone(), 1, 8 * BLOCK);
        let mut buf = p.buffer();
        assert!(buf.slot.is_some(), "the first buffer is a registered one");
        let n = 4 * REGISTERED_BATCH_BUFFERS as u64;
        let blocks = |i: u64| 1 + (i % 8) as usize;
        for i in 0..n {
            buf.as_mut_slice()[..blocks(i) * BLOCK].fill((i % 250) as u8 + 1);
            buf = p.submit(8 * i, buf, blocks(i) * BLOCK, i % 3 == 0).expect("submit");
            assert!(buf.slot.is_some(), "batch {i}: the next buffer is a registered one too");
        }
        p.drain().expect("drain");
        assert_eq!(p.fixed_writes(), n, "every batch went from a registered buffer");
        assert!(p.retired.is_empty(), "every buffer came back");
        drop(buf);
        drop(p);
        dev.sync().expect("sync");
        for i in 0..n {
            let mut back = vec![0u8; blocks(i) * BLOCK];
            dev.read_at(&mut back, 8 * i * BLOCK_SIZE).expect("read");
            assert!(back.iter().all(|&b| b == (i % 250) as u8 + 1), "batch {i} reads back");
        }
    }

    #[test]
    fn pipelines_without_io_uring_make_plain_buffers() {
        for threads in [0, 1] {
            let mut p = Pipeline::new(hinted(), threads, 4 * BLOCK);
            let buf = p.buffer();
            assert!(buf.slot.is_none(), "threads {threads}: no ring to register with");
            drop(p.submit(0, buf, 4 * BLOCK, false).expect("submit"));
            p.drain().expect("drain");
            assert_eq!(p.fixed_writes(), 0, "threads {threads}");
        }
    }
}
