//! The transport interface the collective executor is written against, and its providers.
//!
//! The shape follows NCCL's net plugin API, so that a socket provider and an RDMA (verbs)
//! provider fit the same trait:
//!
//! * a rank [`Provider::listen`]s once and publishes the listener's opaque handle through the
//!   bootstrap;
//! * for every lane it sends on, it [`Provider::connect`]s to the peer's handle (non-blocking:
//!   poll the returned [`Connecting`]), while the peer [`Listener::accept`]s (non-blocking);
//! * data moves one way on a lane: a [`SendLane`] posts sends, the matching [`RecvLane`] posts
//!   receives, both complete in FIFO order and are driven by `progress` (the equivalent of
//!   `isend`/`irecv`/`test`);
//! * [`Provider::register`] registers memory (a no-op on TCP).
//!
//! Every message carries a [`HEADER_LEN`]-byte header that the receiving lane compares with the
//! header it expects, so mismatched collectives surface as [`LaneError::Mismatch`] instead of
//! corrupt data. Waiting is done by the executor over the lanes' [`WaitSource`]s, so the
//! provider never blocks on its own.

pub mod ib;
pub mod mem;
pub mod tcp;
#[cfg(feature = "verbs")]
pub mod verbs;

use std::fmt;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::Result;

/// Bytes of the header that leads every message on a lane.
pub const HEADER_LEN: usize = 32;

/// A message header, opaque to transports (see `crate::exec::header`).
pub type Header = [u8; HEADER_LEN];

/// What a connecting rank tells the accepting rank about a lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneSetup {
    /// Communicator identity, so a stray connection from another job is refused.
    pub comm_id: u64,
    /// The connecting (sending) rank.
    pub rank: usize,
    /// The accepting (receiving) rank.
    pub peer: usize,
    /// Lane index within the peer connection.
    pub lane: usize,
    /// IPv6 flow label the lane's packets carry (0: none requested).
    pub flow_label: u32,
    /// One connection carries both directions (only the lower rank connects); otherwise
    /// each direction has its own connection, made by its sender.
    pub duplex: bool,
}

/// The ends of a lane connection this rank holds: a simplex connection gives the connecting
/// rank a send end and the accepting rank a receive end; a duplex one gives each rank both.
pub struct LaneEnds {
    pub send: Option<Box<dyn SendLane>>,
    pub recv: Option<Box<dyn RecvLane>>,
}

/// Registered memory; transports that need no registration hand back a key of 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub addr: usize,
    pub len: usize,
    /// Local key (verbs lkey); 0 when unregistered.
    pub key: u32,
}

impl MemoryRegion {
    /// Whether `len` bytes at `addr` lie inside this region.
    pub fn covers(&self, addr: usize, len: usize) -> bool {
        addr >= self.addr && addr + len <= self.addr + self.len
    }
}

/// How the executor can sleep until a lane may make progress.
#[derive(Clone)]
pub enum WaitSource {
    /// A file descriptor to `poll` for `events` (`POLLIN`, `POLLOUT`, `POLLRDHUP`).
    Fd { fd: RawFd, events: i16 },
    /// An in-process doorbell rung whenever the lane's state changes.
    Bell(Arc<Doorbell>),
}

/// Errors a lane reports; the executor turns them into [`crate::Error`] with rank context.
#[derive(Debug)]
pub enum LaneError {
    /// The peer closed the lane or the connection broke.
    Closed(String),
    /// The received header differs from the expected one.
    Mismatch { expected: Header, got: Header },
    /// The peer sent a failure notice (see [`RecvLane::send_notice`]).
    Notice(Vec<u8>),
    /// An RDMA work request completed with an error, or the queue pair failed.
    Completion { device: String, gid: String, qpn: u32, status: String },
}

impl fmt::Display for LaneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaneError::Closed(why) => write!(f, "connection closed: {why}"),
            LaneError::Mismatch { .. } => f.write_str("header mismatch"),
            LaneError::Notice(_) => f.write_str("failure notice from peer"),
            LaneError::Completion { device, gid, qpn, status } => {
                write!(f, "{status} on device {device}, GID {gid}, QPN {qpn}")
            }
        }
    }
}

/// A transport provider: creates listeners and connections for one rank.
pub trait Provider: Send + Sync {
    /// Short name shown in logs and `accl-perf` headers (`tcp`, `mem`, `verbs`).
    fn name(&self) -> &'static str;
    /// Opens the listener this rank accepts its incoming lanes on.
    fn listen(&self) -> Result<Box<dyn Listener>>;
    /// Starts connecting a send lane to the listener behind `handle`; never blocks.
    fn connect(&self, handle: &[u8], setup: &LaneSetup) -> Result<Box<dyn Connecting>>;
    /// Whether every lane carries both directions (RDMA queue pairs); the communicator then
    /// connects each lane once, from the lower rank, whatever `ACCL_FLOW_LABEL` says.
    fn duplex_only(&self) -> bool {
        false
    }
    /// Registers memory for zero-copy transfers: returns the region asked for, with the
    /// transport's key. Socket transports need none.
    fn register(&self, addr: usize, len: usize) -> Result<MemoryRegion> {
        Ok(MemoryRegion { addr, len, key: 0 })
    }
    /// Releases a region [`Provider::register`] returned (no transfer may still use it).
    fn deregister(&self, _region: &MemoryRegion) {}
}

/// A listening endpoint; accepts the receive side of peers' lanes.
pub trait Listener: Send {
    /// Opaque bytes a peer passes to [`Provider::connect`] (for TCP: address and port).
    fn handle(&self) -> Vec<u8>;
    /// Accepts one lane if one is ready; never blocks.
    fn accept(&mut self) -> Result<Option<(LaneSetup, LaneEnds)>>;
    /// What to wait on for the next `accept`.
    fn wait_sources(&self) -> Vec<WaitSource>;
}

/// A connection in progress.
pub trait Connecting: Send {
    /// Advances the handshake; returns the lane once it is established. Never blocks.
    fn poll(&mut self) -> Result<Option<LaneEnds>>;
    /// What to wait on for the next `poll`.
    fn wait_source(&self) -> Option<WaitSource>;
}

/// The sending end of a lane. Sends complete in the order they were posted.
pub trait SendLane: Send {
    /// Queues `header` followed by `len` bytes at `data`.
    ///
    /// `mr`, when given, is registered memory that holds all of `data..data+len`.
    ///
    /// # Safety
    /// `data..data+len` must stay valid and unchanged until `progress` has counted this send as
    /// complete, [`SendLane::cancel`] has withdrawn it, or the lane is dropped.
    unsafe fn post(
        &mut self,
        header: &Header,
        data: *const u8,
        len: usize,
        mr: Option<&MemoryRegion>,
    ) -> Result<(), LaneError>;
    /// Moves data without blocking; returns how many posted sends completed since the last call.
    fn progress(&mut self) -> Result<usize, LaneError>;
    /// Sends posted and not yet complete.
    fn queued(&self) -> usize;
    /// Checks, without blocking, whether the receiver sent a failure notice or went away.
    /// A peer that closed cleanly while nothing is queued is not an error until the next post.
    fn check_peer(&mut self) -> Result<(), LaneError>;
    /// What to wait on (readable: notice; writable: room to send); `None`: nothing to wait for.
    fn wait_source(&self) -> Option<WaitSource>;
    /// Best effort, never blocks: on a duplex lane the notice of [`RecvLane::send_notice`]
    /// travels this way instead.
    fn send_notice(&mut self, _notice: &[u8]) {}
    /// Withdraws every posted send that has not completed: once it returns, neither this lane
    /// nor the peer touches their memory again, so a failed call can return its buffers to the
    /// caller. The lane carries no data afterwards. Transports that read posted memory only
    /// inside `progress` (sockets; verbs, which copies through its own slots, or sends from
    /// memory the caller registered and keeps mapped until it deregisters it) need nothing
    /// here; the in-process transport, whose receivers copy straight from the sender's
    /// buffers, does.
    fn cancel(&mut self) {}
    /// The IPv6 flow label this lane's packets carry (0 when none was set).
    fn flow_label(&self) -> u32 {
        0
    }
    /// The UDP source port of the lane's packets, where the transport decides it (RoCEv2).
    fn udp_sport(&self) -> Option<u16> {
        None
    }
    /// The TCP congestion control of the lane's socket (TCP only).
    fn congestion(&self) -> Option<String> {
        None
    }
    /// Called before the executor sleeps on the wait sources: arm whatever must be armed to
    /// raise them, and return true if progress is possible right away (then it does not sleep).
    fn prepare_wait(&mut self) -> bool {
        false
    }
}

/// The receiving end of a lane. Receives complete in the order they were posted.
pub trait RecvLane: Send {
    /// Queues a receive of a message whose header must equal `expect` and whose payload of
    /// exactly `len` bytes lands at `data`.
    ///
    /// # Safety
    /// `data..data+len` must stay valid and not be accessed by others until `progress` has
    /// counted this receive as complete, [`RecvLane::cancel`] has withdrawn it, or the lane is
    /// dropped.
    unsafe fn post(
        &mut self,
        expect: &Header,
        data: *mut u8,
        len: usize,
        mr: Option<&MemoryRegion>,
    ) -> Result<(), LaneError>;
    /// Moves data without blocking; returns how many posted receives completed since the last call.
    fn progress(&mut self) -> Result<usize, LaneError>;
    /// Receives posted and not yet complete.
    fn queued(&self) -> usize;
    /// Checks, without blocking, whether the sender is gone (only reported once no data that
    /// it sent before leaving is still unread).
    fn check_peer(&mut self) -> Result<(), LaneError>;
    /// A failure notice waiting at the front of the stream, if any (for a lane that broke:
    /// the peer may have said why before it went away).
    fn take_notice(&mut self) -> Option<Vec<u8>> {
        None
    }
    /// Best effort, never blocks: tells the sender that this rank failed, so that it fails too
    /// instead of waiting for its timeout (simplex lanes; duplex ones use the send end).
    fn send_notice(&mut self, _notice: &[u8]) {}
    /// Withdraws every posted receive that has not completed (see [`SendLane::cancel`]).
    fn cancel(&mut self) {}
    /// What to wait on; `None`: nothing to wait for.
    fn wait_source(&self) -> Option<WaitSource>;
    /// As [`SendLane::prepare_wait`].
    fn prepare_wait(&mut self) -> bool {
        false
    }
}

/// An in-process wake-up signal: a counter that changes whenever something happened.
#[derive(Default)]
pub struct Doorbell {
    rings: Mutex<u64>,
    cond: Condvar,
}

impl Doorbell {
    /// Creates a doorbell.
    pub fn new() -> Arc<Doorbell> {
        Arc::new(Doorbell::default())
    }

    /// Current ring count; pass it to [`Doorbell::wait`].
    pub fn count(&self) -> u64 {
        *self.rings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every waiter.
    pub fn ring(&self) {
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        *rings = rings.wrapping_add(1);
        self.cond.notify_all();
    }

    /// Sleeps until the count differs from `seen` or `timeout` passes.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.cond.wait_timeout_while(rings, timeout, |r| *r == seen).unwrap_or_else(|e| e.into_inner()));
    }

    /// For a loop that checks its state between waits: sleeps until a ring after the count
    /// `seen` holds from the previous call (at once the first time, when it holds `None`), then
    /// keeps the current count there. A ring between two waits is never lost.
    pub fn wait_for_change(&self, seen: &mut Option<u64>, timeout: Duration) {
        if let Some(seen) = *seen {
            self.wait(seen, timeout);
        }
        *seen = Some(self.count());
    }
}
