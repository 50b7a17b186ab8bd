//! Background log writers: sealed batches are written by a few threads while the engine builds the next batch, so
//! log appends overlap with index work and several writes reach the device at once. Every bound is a named constant.
//!
//! On a file (a device with a raw fd) one thread keeps up to [`MAX_INFLIGHT_BATCHES`] writes in flight through
//! io_uring, as fio does; on other devices (the simulated one) writer threads call `write_at`.
//!
//! Until a write completes, its buffer stays readable through [`Pipeline::read_buffered`]. A flush or checkpoint
//! waits for every write in flight ([`Pipeline::drain`]) before it syncs. A failed write is reported by the next call
//! that waits for it, and the pool then fails.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::format::{BLOCK, BLOCK_SIZE};
use crate::io::{AlignedBuf, Device};
use crate::{Error, Result};

/// Batches written at once, at most: bounds the buffer memory of the log to this many batch buffers plus one.
pub(crate) const MAX_INFLIGHT_BATCHES: usize = 4;
/// Writer threads when the options do not say.
pub const DEFAULT_LOG_WRITER_THREADS: usize = 2;
/// Most writer threads a pool may ask for.
pub const MAX_LOG_WRITER_THREADS: usize = 8;

struct Job {
    id: u64,
    pba: u64,
    buf: Arc<AlignedBuf>,
    len: usize,
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
    buf: Arc<AlignedBuf>,
    result: Option<Result<()>>,
}

/// Writes sealed batches, in the background or (with zero threads) at once.
pub(crate) struct Pipeline {
    dev: Arc<dyn Device>,
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    pending: VecDeque<Pending>,
    free: Vec<AlignedBuf>,
    next_id: u64,
    threads: Vec<JoinHandle<()>>,
    buffer_bytes: usize,
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
        let jobs = if threads == 0 {
            None
        } else {
            let (tx, rx) = mpsc::sync_channel::<Job>(MAX_INFLIGHT_BATCHES);
            let rx = Arc::new(Mutex::new(rx));
            let uring = dev.raw_fd().and_then(|fd| io_uring::IoUring::new(URING_ENTRIES).ok().map(|r| (fd, r)));
            if let Some((fd, ring)) = uring {
                let (rx, done_tx, dev) = (rx.clone(), done_tx.clone(), dev.clone());
                let spawned = std::thread::Builder::new()
                    .name("blockmesh-log-uring".into())
                    .spawn(move || uring_jobs(&*dev, fd, ring, &rx, &done_tx));
                if let Ok(h) = spawned {
                    handles.push(h);
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
        Self { dev, jobs, done, pending: VecDeque::new(), free: Vec::new(), next_id: 0, threads: handles, buffer_bytes }
    }

    /// Write `buf[..len]` at block `pba` (in the background when there are writer threads); returns a buffer for
    /// the next batch.
    pub(crate) fn submit(&mut self, pba: u64, buf: AlignedBuf, len: usize) -> Result<AlignedBuf> {
        let Some(jobs) = &self.jobs else {
            self.dev.write_at(&buf.as_slice()[..len], pba * BLOCK_SIZE)?;
            return Ok(buf);
        };
        let id = self.next_id;
        self.next_id += 1;
        let buf = Arc::new(buf);
        jobs.send(Job { id, pba, buf: buf.clone(), len })
            .map_err(|_| Error::io("write", pba * BLOCK_SIZE, len as u64, std::io::Error::other("log writer gone")))?;
        self.pending.push_back(Pending { id, pba, blocks: (len / BLOCK) as u64, buf, result: None });
        while self.pending.len() >= MAX_INFLIGHT_BATCHES {
            self.wait_one()?;
        }
        self.reap(false)?;
        Ok(self.free.pop().unwrap_or_else(|| AlignedBuf::zeroed(self.buffer_bytes)))
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
            if let Some(Err(e)) = p.result {
                return Err(e);
            }
            if let Ok(buf) = Arc::try_unwrap(p.buf) {
                self.free.push(buf);
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

/// Ring size of the io_uring writer.
const URING_ENTRIES: u32 = 2 * MAX_INFLIGHT_BATCHES as u32;

fn submit_write(ring: &mut io_uring::IoUring, fd: std::os::fd::RawFd, job: &Job, done_bytes: usize) -> bool {
    use io_uring::{opcode, types};
    let rest = &job.buf.as_slice()[done_bytes..job.len];
    let entry = opcode::Write::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
        .offset(job.pba * BLOCK_SIZE + done_bytes as u64)
        .build()
        .user_data(job.id);
    // SAFETY: the buffer belongs to `job`, which the caller keeps in its in-flight table (holding an Arc on the
    // buffer) until this entry's completion has been reaped; the writer never leaves while entries are in flight,
    // so the kernel only ever reads memory that is alive and unchanged (a sealed batch buffer is never written).
    unsafe { ring.submission().push(&entry).is_ok() }
}

/// The io_uring writer: up to [`MAX_INFLIGHT_BATCHES`] writes in flight from one thread; short writes continue.
fn uring_jobs(
    dev: &dyn Device,
    fd: std::os::fd::RawFd,
    mut ring: io_uring::IoUring,
    rx: &Mutex<Receiver<Job>>,
    done: &Sender<Done>,
) {
    use std::collections::HashMap;
    use std::sync::mpsc::TryRecvError;
    let mut inflight: HashMap<u64, (Job, usize)> = HashMap::new();
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
                    if submit_write(&mut ring, fd, &job, 0) {
                        inflight.insert(job.id, (job, 0));
                    } else {
                        // no room in the ring (cannot happen with its size): write it here instead
                        let result = dev.write_at(&job.buf.as_slice()[..job.len], job.pba * BLOCK_SIZE);
                        let _ = done.send(Done { id: job.id, result });
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => closed = true,
            }
        }
        if inflight.is_empty() {
            if closed {
                return;
            }
            continue;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // the ring is unusable: finish what is in flight synchronously and report it
            for (_, (job, n)) in inflight.drain() {
                let result = dev.write_at(&job.buf.as_slice()[n..job.len], job.pba * BLOCK_SIZE + n as u64);
                let _ = done.send(Done { id: job.id, result });
            }
            continue;
        }
        let completions: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (id, res) in completions {
            let Some((job, n)) = inflight.get_mut(&id) else { continue };
            let outcome = if res < 0 {
                Some(Err(fail(job, std::io::Error::from_raw_os_error(-res))))
            } else if res == 0 {
                Some(Err(fail(job, std::io::Error::other("device wrote nothing"))))
            } else {
                *n += res as usize;
                if *n >= job.len {
                    Some(Ok(()))
                } else if submit_write(&mut ring, fd, job, *n) {
                    None // a short write: the rest is in flight now
                } else {
                    Some(Err(fail(job, std::io::Error::other("io_uring submission queue full"))))
                }
            };
            if let Some(result) = outcome {
                if let Some((job, _)) = inflight.remove(&id) {
                    drop(job.buf);
                    let _ = done.send(Done { id, result });
                }
            }
        }
    }
}

fn write_jobs(dev: &dyn Device, rx: &Mutex<Receiver<Job>>, done: &Sender<Done>) {
    loop {
        let job = rx.lock().recv();
        let Ok(job) = job else { return };
        let result = dev.write_at(&job.buf.as_slice()[..job.len], job.pba * BLOCK_SIZE);
        drop(job.buf);
        if done.send(Done { id: job.id, result }).is_err() {
            return;
        }
    }
}
