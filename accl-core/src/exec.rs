//! The executor: runs a [`Schedule`] over a rank's lanes.
//!
//! Sends and receives become messages cut into chunks of `chunk_size` bytes, spread round-robin
//! over the peer's lanes, each chunk led by a [`Header`] that the receiver checks. Local steps
//! (reductions, copies) run as soon as their inputs are complete, interleaved with network
//! progress. Waiting spins for `spin`, then sleeps in `poll` (or on the in-process doorbell),
//! never longer than 50 ms at a time so that an abort is noticed; a wait that sees no progress
//! for `timeout` fails naming the ranks it was waiting for.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::algo::{Buf, Collective, Region, Schedule, Step};
use crate::dtype::{DataType, ReduceOp};
use crate::error::{Error, Result};
use crate::reduce::{self, Reducer};
use crate::transport::{Header, LaneError, MemoryRegion, RecvLane, SendLane, WaitSource, HEADER_LEN};

const HEADER_MAGIC: u16 = 0xACC1;
/// Longest single sleep, so that aborts and deadlines are noticed.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// What every message of one call carries, checked by the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallInfo {
    pub coll: Collective,
    pub algo: u8,
    pub dtype: DataType,
    pub op: ReduceOp,
    pub seq: u64,
    pub count: u64,
    pub root: u32,
}

impl CallInfo {
    /// The header of one chunk of `chunk_len` bytes.
    pub fn header(&self, chunk_len: usize) -> Header {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        h[2] = self.coll as u8;
        h[3] = self.dtype as u8;
        h[4] = self.op as u8;
        h[5] = self.algo;
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.count.to_le_bytes());
        h[24..28].copy_from_slice(&self.root.to_le_bytes());
        h[28..32].copy_from_slice(&(chunk_len as u32).to_le_bytes());
        h
    }
}

/// Renders a header for an error message.
pub fn describe_header(h: &Header) -> String {
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if u16_at(0) != HEADER_MAGIC {
        return format!("garbage (not an accl header: {:02x?})", &h[..8]);
    }
    let coll = Collective::from_code(h[2]).map_or_else(|| format!("collective#{}", h[2]), |c| c.name().to_string());
    let dtype = DataType::from_code(h[3]).map_or_else(|| format!("dtype#{}", h[3]), |d| d.name().to_string());
    let op = ReduceOp::from_code(h[4]).map_or_else(|| format!("op#{}", h[4]), |o| o.name().to_string());
    let algo = crate::algo::Algorithm::ALL
        .into_iter()
        .find(|a| *a as u8 == h[5])
        .map_or_else(|| format!("algo#{}", h[5]), |a| a.name().to_string());
    format!(
        "{coll} #{} count={} dtype={dtype} op={op} root={} algo={algo} chunk={}B",
        u64_at(8),
        u64_at(16),
        u32_at(24),
        u32_at(28)
    )
}

/// Shared abort flag of a communicator.
#[derive(Default)]
pub struct AbortState {
    pub flag: AtomicBool,
}

/// The lanes to and from one peer, with message counters that both sides advance in step.
#[derive(Default)]
pub struct PeerLanes {
    pub send: Vec<Box<dyn SendLane>>,
    pub recv: Vec<Box<dyn RecvLane>>,
    pub sent_msgs: u64,
    pub recv_msgs: u64,
    /// Per lane: the step each posted chunk belongs to, in posting order.
    send_fifo: Vec<VecDeque<u32>>,
    recv_fifo: Vec<VecDeque<u32>>,
}

impl PeerLanes {
    /// Wraps established lanes.
    pub fn new(send: Vec<Box<dyn SendLane>>, recv: Vec<Box<dyn RecvLane>>) -> PeerLanes {
        let (ns, nr) = (send.len(), recv.len());
        PeerLanes {
            send,
            recv,
            send_fifo: vec![VecDeque::new(); ns],
            recv_fifo: vec![VecDeque::new(); nr],
            ..PeerLanes::default()
        }
    }
}

/// Everything the executor needs besides the schedule.
pub struct Context<'a> {
    pub rank: usize,
    pub peers: &'a mut [PeerLanes],
    pub chunk_size: usize,
    pub spin: Duration,
    /// Give up the core after each local step (reduction, copy) that writes
    /// [`YIELD_MIN_BYTES`] or more (see [`Run::run_steps`]).
    pub yield_cpu: bool,
    pub timeout: Duration,
    pub abort: &'a AbortState,
    pub reducer: &'a Reducer,
    /// Memory the caller registered ([`crate::Communicator::register_memory`]): sends from it
    /// go without a copy where the transport can.
    pub registered: &'a [MemoryRegion],
}

/// Base pointers of the three buffers.
#[derive(Clone, Copy)]
pub struct Buffers {
    pub input: *const u8,
    pub output: *mut u8,
    pub scratch: *mut u8,
}

impl Buffers {
    fn ptr(&self, r: Region) -> *mut u8 {
        let base = match r.buf {
            Buf::Input => self.input as *mut u8,
            Buf::Output => self.output,
            Buf::Scratch => self.scratch,
        };
        // SAFETY: regions are within the buffers the caller validated.
        unsafe { base.add(r.off) }
    }
}

/// Splits a message of `len` bytes into chunks: (offset, length, lane).
fn chunks(len: usize, chunk: usize, lanes: usize, msg_index: u64) -> impl Iterator<Item = (usize, usize, usize)> {
    let n = len.div_ceil(chunk).max(1);
    (0..n).map(move |i| {
        let off = i * chunk;
        (off, chunk.min(len - off), ((msg_index as usize) + i) % lanes)
    })
}

struct Run<'s, 'c, 'a> {
    ctx: &'c mut Context<'a>,
    sched: &'s Schedule,
    bufs: Buffers,
    info: CallInfo,
    nranks: usize,
    remaining_deps: Vec<u32>,
    /// Chunks still in flight per network step.
    chunks_left: Vec<u32>,
    done_count: usize,
    ready_local: VecDeque<u32>,
    /// Per peer: how many of the schedule's sends and receives are posted.
    sends_posted: Vec<usize>,
    recvs_posted: Vec<usize>,
}

/// Bookkeeping vectors of a run, kept by the communicator so that a call allocates nothing.
#[derive(Default)]
pub struct ExecState {
    remaining_deps: Vec<u32>,
    chunks_left: Vec<u32>,
    ready_local: VecDeque<u32>,
    sends_posted: Vec<usize>,
    recvs_posted: Vec<usize>,
}

/// Runs `sched` to completion. On error the lanes may hold partial messages: the caller must
/// treat the communicator as failed.
///
/// # Safety
/// `bufs` must point at buffers large enough for every region of `sched`, valid for the whole
/// call, with `input` not written by anyone (unless it aliases `output` in place).
pub unsafe fn execute(
    ctx: &mut Context<'_>,
    sched: &Schedule,
    bufs: Buffers,
    info: CallInfo,
    state: &mut ExecState,
) -> Result<()> {
    let mut st = std::mem::take(state);
    st.remaining_deps.clear();
    st.remaining_deps.extend_from_slice(&sched.dep_count);
    st.chunks_left.clear();
    st.chunks_left.resize(sched.steps.len(), 0);
    st.ready_local.clear();
    st.ready_local.extend(sched.initial.iter().copied());
    st.sends_posted.clear();
    st.sends_posted.resize(sched.sends.len(), 0);
    st.recvs_posted.clear();
    st.recvs_posted.resize(sched.recvs.len(), 0);
    let nranks = ctx.peers.len();
    let mut run = Run {
        sched,
        bufs,
        info,
        nranks,
        remaining_deps: st.remaining_deps,
        chunks_left: st.chunks_left,
        done_count: 0,
        ready_local: st.ready_local,
        sends_posted: st.sends_posted,
        recvs_posted: st.recvs_posted,
        ctx,
    };
    let result = run.run();
    *state = ExecState {
        remaining_deps: run.remaining_deps,
        chunks_left: run.chunks_left,
        ready_local: run.ready_local,
        sends_posted: run.sends_posted,
        recvs_posted: run.recvs_posted,
    };
    result
}

/// The smallest reduction after which a rank on an oversubscribed host yields its core.
///
/// With more ranks than cores, a rank that has data keeps its core until it blocks or its
/// time slice ends, while a rank sharing that core may be the next stage of the same pipeline
/// (a ring neighbour). The other core then starves in bursts: on the 2-core development VM,
/// with ring neighbours on the same core, a 4-rank 32 MiB allreduce left the cores 14 % idle
/// and ran at 2/3 of its speed with neighbours on different cores. Yielding after each
/// pipeline segment's reduction evens that out (docs/performance.md). Small reductions, where
/// latency matters, never yield.
pub const YIELD_MIN_BYTES: usize = 16 << 10;

impl Run<'_, '_, '_> {
    fn run(&mut self) -> Result<()> {
        self.run_steps().map_err(|e| match e {
            Error::PeerFailed { peer, .. } | Error::Completion { peer, .. } => {
                prefer_notice(self.ctx.peers, self.ctx.rank, peer, e)
            }
            e => e,
        })
    }

    fn run_steps(&mut self) -> Result<()> {
        let total = self.sched.steps.len();
        let mut idle_since: Option<Instant> = None;
        let mut last_progress = Instant::now();
        let mut bell_seen = None;
        while self.done_count < total {
            if self.ctx.abort.flag.load(Ordering::Relaxed) {
                return Err(Error::Aborted { rank: self.ctx.rank });
            }
            let mut progressed = self.post_ready()?;
            progressed |= self.progress_lanes()?;
            if let Some(step) = self.ready_local.pop_front() {
                self.run_local(step);
                self.complete(step);
                progressed = true;
                if self.ctx.yield_cpu
                    && self.sched.steps[step as usize].writes().is_some_and(|w| w.len >= YIELD_MIN_BYTES)
                {
                    // Hand what the step made ready to the network, then let a rank that
                    // shares this core (perhaps the one waiting for it) run.
                    self.post_ready()?;
                    self.progress_lanes()?;
                    std::thread::yield_now();
                }
            }
            if progressed {
                idle_since = None;
                bell_seen = None;
                last_progress = Instant::now();
                continue;
            }
            let now = Instant::now();
            let idle = *idle_since.get_or_insert(now);
            if now.duration_since(idle) < self.ctx.spin {
                std::hint::spin_loop();
                std::thread::yield_now();
                continue;
            }
            let left = (last_progress + self.ctx.timeout).saturating_duration_since(now);
            if left.is_zero() {
                return Err(self.timeout_error());
            }
            self.sleep(left.min(MAX_SLEEP), &mut bell_seen)?;
        }
        Ok(())
    }

    /// Posts, per peer and in program order, the network steps whose inputs are ready.
    fn post_ready(&mut self) -> Result<bool> {
        let mut posted = false;
        let sched = self.sched;
        for (peer, steps) in sched.sends.iter().enumerate() {
            while let Some(&step) = steps.get(self.sends_posted[peer]) {
                if self.remaining_deps[step as usize] > 0 {
                    break;
                }
                self.post(step)?;
                self.sends_posted[peer] += 1;
                posted = true;
            }
        }
        for (peer, steps) in sched.recvs.iter().enumerate() {
            while let Some(&step) = steps.get(self.recvs_posted[peer]) {
                if self.remaining_deps[step as usize] > 0 {
                    break;
                }
                self.post(step)?;
                self.recvs_posted[peer] += 1;
                posted = true;
            }
        }
        Ok(posted)
    }

    /// Whether some of the schedule's (sends, receives) for `peer` are not posted yet.
    fn unposted(&self, peer: usize) -> (bool, bool) {
        let s = self.sched.sends.get(peer).is_some_and(|v| self.sends_posted[peer] < v.len());
        let r = self.sched.recvs.get(peer).is_some_and(|v| self.recvs_posted[peer] < v.len());
        (s, r)
    }

    fn post(&mut self, step: u32) -> Result<()> {
        let chunk_size = self.ctx.chunk_size;
        let rank = self.ctx.rank;
        match self.sched.steps[step as usize] {
            Step::Send { peer, src } => {
                let base = self.bufs.ptr(src) as *const u8;
                let registered = self.ctx.registered;
                let lanes = &mut self.ctx.peers[peer];
                let nl = lanes.send.len();
                let mut count = 0;
                for (off, len, lane) in chunks(src.len, chunk_size, nl, lanes.sent_msgs) {
                    let header = self.info.header(len);
                    // SAFETY: the region stays valid and unwritten until the send completes
                    // (schedule dependencies), and the call outlives the executor.
                    let mr = registered.iter().find(|m| m.covers(base as usize + off, len));
                    unsafe { lanes.send[lane].post(&header, base.add(off), len, mr) }
                        .map_err(|e| lane_error(rank, peer, lane, e))?;
                    lanes.send_fifo[lane].push_back(step);
                    count += 1;
                }
                lanes.sent_msgs += 1;
                self.chunks_left[step as usize] = count;
            }
            Step::Recv { peer, dst } => {
                let base = self.bufs.ptr(dst);
                let lanes = &mut self.ctx.peers[peer];
                let nl = lanes.recv.len();
                let mut count = 0;
                for (off, len, lane) in chunks(dst.len, chunk_size, nl, lanes.recv_msgs) {
                    let header = self.info.header(len);
                    // SAFETY: as for sends; nothing else touches the region until completion.
                    unsafe { lanes.recv[lane].post(&header, base.add(off), len, None) }
                        .map_err(|e| lane_error(rank, peer, lane, e))?;
                    lanes.recv_fifo[lane].push_back(step);
                    count += 1;
                }
                lanes.recv_msgs += 1;
                self.chunks_left[step as usize] = count;
            }
            _ => unreachable!("only network steps are posted"),
        }
        Ok(())
    }

    fn progress_lanes(&mut self) -> Result<bool> {
        let rank = self.ctx.rank;
        let mut finished = Vec::new();
        for (peer, lanes) in self.ctx.peers.iter_mut().enumerate() {
            for (i, lane) in lanes.send.iter_mut().enumerate() {
                if lane.queued() == 0 {
                    continue;
                }
                let n = lane.progress().map_err(|e| lane_error(rank, peer, i, e))?;
                for _ in 0..n {
                    finished.push(lanes.send_fifo[i].pop_front().expect("completion of a posted chunk"));
                }
            }
            for (i, lane) in lanes.recv.iter_mut().enumerate() {
                if lane.queued() == 0 {
                    continue;
                }
                let n = lane.progress().map_err(|e| match e {
                    LaneError::Mismatch { expected, got } => {
                        Error::Mismatch { rank, peer, expected: describe_header(&expected), got: describe_header(&got) }
                    }
                    e => lane_error(rank, peer, i, e),
                })?;
                for _ in 0..n {
                    finished.push(lanes.recv_fifo[i].pop_front().expect("completion of a posted chunk"));
                }
            }
        }
        let progressed = !finished.is_empty();
        for step in finished {
            let left = &mut self.chunks_left[step as usize];
            *left -= 1;
            if *left == 0 {
                self.complete(step);
            }
        }
        Ok(progressed)
    }

    fn complete(&mut self, step: u32) {
        self.done_count += 1;
        for &d in &self.sched.dependents[step as usize] {
            let left = &mut self.remaining_deps[d as usize];
            *left -= 1;
            if *left == 0 && self.sched.steps[d as usize].peer().is_none() {
                self.ready_local.push_back(d);
            }
        }
    }

    fn run_local(&mut self, step: u32) {
        let (dtype, op) = (self.info.dtype, self.info.op);
        // SAFETY (all slices below): regions lie within the validated buffers and the schedule's
        // dependencies guarantee no network operation or other step touches them meanwhile.
        let bytes = |r: Region| unsafe { std::slice::from_raw_parts(self.bufs.ptr(r), r.len) };
        let bytes_mut = |r: Region| unsafe { std::slice::from_raw_parts_mut(self.bufs.ptr(r), r.len) };
        match self.sched.steps[step as usize] {
            Step::Reduce { dst, src } => self.ctx.reducer.reduce_inplace(dtype, op, bytes_mut(dst), bytes(src)),
            Step::ReduceInto { dst, a, b, streaming } => {
                if self.bufs.ptr(dst) == self.bufs.ptr(a) {
                    self.ctx.reducer.reduce_inplace(dtype, op, bytes_mut(dst), bytes(b));
                } else {
                    self.ctx.reducer.reduce_into_with(dtype, op, bytes_mut(dst), bytes(a), bytes(b), streaming);
                }
            }
            Step::Copy { dst, src } => {
                if dst.len > 0 && self.bufs.ptr(dst) != self.bufs.ptr(src) {
                    // SAFETY: distinct, non-overlapping regions (the schedule never copies
                    // between overlapping ranges except onto itself).
                    unsafe { std::ptr::copy_nonoverlapping(self.bufs.ptr(src), self.bufs.ptr(dst), dst.len) };
                }
            }
            Step::Divide { buf } => reduce::divide(dtype, bytes_mut(buf), self.nranks),
            Step::Send { .. } | Step::Recv { .. } => {
                unreachable!("network steps are posted, not run")
            }
        }
    }

    /// Whether this call still needs anything from or for `peer`.
    fn needs(&self, peer: usize) -> bool {
        let lanes = &self.ctx.peers[peer];
        let (s, r) = self.unposted(peer);
        s || r || lanes.send.iter().any(|l| l.queued() > 0) || lanes.recv.iter().any(|l| l.queued() > 0)
    }

    /// Sleeps until a lane may progress, then checks every peer's health.
    fn sleep(&mut self, max: Duration, bell_seen: &mut Option<u64>) -> Result<()> {
        let mut ready_now = false;
        for lanes in self.ctx.peers.iter_mut() {
            for l in &mut lanes.send {
                ready_now |= l.prepare_wait();
            }
            for l in &mut lanes.recv {
                ready_now |= l.prepare_wait();
            }
        }
        if ready_now {
            return Ok(());
        }
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut owners: Vec<(usize, bool, usize)> = Vec::new();
        let mut bell = None;
        for (peer, lanes) in self.ctx.peers.iter().enumerate() {
            let sources = lanes
                .send
                .iter()
                .enumerate()
                .map(|(i, l)| (true, i, l.wait_source()))
                .chain(lanes.recv.iter().enumerate().map(|(i, l)| (false, i, l.wait_source())));
            for (is_send, lane, source) in sources {
                match source {
                    Some(WaitSource::Fd { fd, events }) => {
                        fds.push(libc::pollfd { fd, events, revents: 0 });
                        owners.push((peer, is_send, lane));
                    }
                    Some(WaitSource::Bell(b)) => bell = Some(b),
                    None => {}
                }
            }
        }
        match bell {
            Some(bell) => {
                bell.wait_for_change(bell_seen, max);
                self.check_all_peers()
            }
            None => {
                let ms = max.as_millis().max(1) as i32;
                // SAFETY: fds is a valid array of pollfd.
                let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
                if rc < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(Error::io(format!("rank {}: poll", self.ctx.rank), e));
                    }
                }
                for (pfd, &(peer, is_send, lane)) in fds.iter().zip(&owners) {
                    let hangup = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
                    let notice = is_send && pfd.revents & libc::POLLIN != 0;
                    if pfd.revents & hangup != 0 || notice {
                        self.check_peer(peer, is_send, lane)?;
                    }
                }
                Ok(())
            }
        }
    }

    fn check_all_peers(&mut self) -> Result<()> {
        for peer in 0..self.nranks {
            for lane in 0..self.ctx.peers[peer].send.len() {
                self.check_peer(peer, true, lane)?;
            }
            for lane in 0..self.ctx.peers[peer].recv.len() {
                self.check_peer(peer, false, lane)?;
            }
        }
        Ok(())
    }

    fn check_peer(&mut self, peer: usize, is_send: bool, lane: usize) -> Result<()> {
        let rank = self.ctx.rank;
        let lanes = &mut self.ctx.peers[peer];
        let (result, queued) = if is_send {
            (lanes.send[lane].check_peer(), lanes.send[lane].queued())
        } else {
            (lanes.recv[lane].check_peer(), lanes.recv[lane].queued())
        };
        match result {
            // A peer that finished and left is no error while nothing waits on this lane; a
            // later send fails at once, a later receive when it finds the end of the stream.
            Err(LaneError::Closed(_)) if queued == 0 => Ok(()),
            Err(e) => Err(lane_error(rank, peer, lane, e)),
            Ok(()) => Ok(()),
        }
    }

    fn timeout_error(&self) -> Error {
        let mut waiting: Vec<usize> = (0..self.nranks)
            .filter(|&p| self.unposted(p).1 || self.ctx.peers[p].recv.iter().any(|l| l.queued() > 0))
            .collect();
        if waiting.is_empty() {
            waiting = (0..self.nranks).filter(|&p| self.needs(p)).collect();
        }
        Error::Timeout {
            rank: self.ctx.rank,
            collective: self.info.coll.name(),
            seq: self.info.seq,
            waiting_for: waiting,
            timeout: self.ctx.timeout,
        }
    }
}

/// A lane to `peer` broke: if the peer said why before it went away, report that instead.
fn prefer_notice(peers: &mut [PeerLanes], rank: usize, peer: usize, err: Error) -> Error {
    for (lane, l) in peers[peer].send.iter_mut().enumerate() {
        if let Err(e @ LaneError::Notice(_)) = l.check_peer() {
            return lane_error(rank, peer, lane, e);
        }
    }
    for (lane, l) in peers[peer].recv.iter_mut().enumerate() {
        // The peer may have sent data before its notice: take in what receives are posted for
        // (the buffers are still the caller's), up to the notice or the end of what is there.
        loop {
            match l.progress() {
                Ok(0) => break,
                Ok(_) => {}
                Err(e @ LaneError::Notice(_)) => return lane_error(rank, peer, lane, e),
                Err(_) => break,
            }
        }
        if let Some(body) = l.take_notice() {
            return lane_error(rank, peer, lane, LaneError::Notice(body));
        }
    }
    err
}

/// Turns a lane error into an [`Error`] naming this rank, the peer and the lane.
pub fn lane_error(rank: usize, peer: usize, lane: usize, e: LaneError) -> Error {
    match e {
        LaneError::Closed(reason) => Error::PeerFailed { rank, peer, lane, reason },
        LaneError::Mismatch { expected, got } => {
            Error::Mismatch { rank, peer, expected: describe_header(&expected), got: describe_header(&got) }
        }
        LaneError::Notice(body) => decode_notice(rank, peer, &body),
        LaneError::Completion { device, gid, qpn, status } => {
            Error::Completion { rank, peer, lane, device, gid, qpn, status }
        }
    }
}

/// A failure notice: who reports, whom it blames, and why.
pub fn encode_notice(reporter: usize, failed: Option<usize>, reason: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + reason.len());
    v.extend_from_slice(&(reporter as u32).to_le_bytes());
    v.extend_from_slice(&failed.map_or(u32::MAX, |f| f as u32).to_le_bytes());
    v.extend_from_slice(reason.as_bytes());
    v
}

fn decode_notice(rank: usize, peer: usize, body: &[u8]) -> Error {
    if body.len() < 8 {
        return Error::RemoteFailure { rank, reporter: peer, failed: None, reason: "malformed failure notice".into() };
    }
    let reporter = u32::from_le_bytes(body[0..4].try_into().expect("4 bytes")) as usize;
    let failed = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes"));
    Error::RemoteFailure {
        rank,
        reporter,
        failed: (failed != u32::MAX).then_some(failed as usize),
        reason: String::from_utf8_lossy(&body[8..]).into_owned(),
    }
}
