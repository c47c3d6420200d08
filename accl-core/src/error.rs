//! The one error type of accl. Every variant names what was wrong: the rank, peer, size, dtype or
//! collective involved, so a failed job can be diagnosed from the message alone.

use std::time::Duration;

use crate::dtype::{DataType, ReduceOp};

/// Result alias used throughout accl.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in accl.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A buffer is shorter than the collective needs.
    #[error("{buffer} buffer too small: {needed} bytes needed for {count} x {dtype}, {got} given")]
    BufferTooSmall { buffer: &'static str, needed: usize, got: usize, count: usize, dtype: DataType },
    /// `count * size(dtype) * factor` does not fit in memory.
    #[error("count {count} of {dtype} overflows the address space")]
    CountOverflow { count: usize, dtype: DataType },
    /// A root or peer rank outside `0..nranks`, or a send/recv to oneself where not allowed.
    #[error("invalid {what} rank {rank}: communicator has {nranks} ranks")]
    InvalidRank { what: &'static str, rank: usize, nranks: usize },
    /// An operator that the data type does not support.
    #[error("reduction op {op} is not supported for {dtype}")]
    UnsupportedOp { op: ReduceOp, dtype: DataType },
    /// An argument that is wrong in another way.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An `ACCL_*` setting or a parsed string that could not be understood.
    #[error("invalid {name} {value:?}: {reason}")]
    InvalidConfig { name: String, value: String, reason: String },
    /// Rendezvous did not complete before the timeout.
    #[error("rendezvous timed out after {timeout:?}: ranks {missing:?} of {nranks} never arrived (root {root})")]
    RendezvousTimeout { missing: Vec<usize>, nranks: usize, root: String, timeout: Duration },
    /// A wait exceeded `ACCL_TIMEOUT`.
    #[error("rank {rank}: {collective} #{seq} timed out after {timeout:?} waiting for rank(s) {waiting_for:?}")]
    Timeout { rank: usize, collective: &'static str, seq: u64, waiting_for: Vec<usize>, timeout: Duration },
    /// A peer's connection broke: the process died, closed the communicator, or the network failed.
    #[error("rank {rank}: peer rank {peer} failed (lane {lane}): {reason}")]
    PeerFailed { rank: usize, peer: usize, lane: usize, reason: String },
    /// An RDMA completion error or a queue pair in the error state, on the lane to `peer`.
    #[error("rank {rank}: RDMA failure on the lane {lane} to peer rank {peer}: {status} (device {device}, GID {gid}, QPN {qpn})")]
    Completion { rank: usize, peer: usize, lane: usize, device: String, gid: String, qpn: u32, status: String },
    /// Another rank failed and told us why; `failed` is the rank it blames, when known.
    #[error("rank {rank}: rank {reporter} reported a failure{}: {reason}", failed.map(|f| format!(" of rank {f}")).unwrap_or_default())]
    RemoteFailure { rank: usize, reporter: usize, failed: Option<usize>, reason: String },
    /// A peer called a different collective (or the same one with other arguments).
    #[error("rank {rank}: mismatched collective with peer rank {peer}: expected {expected}, peer sent {got}")]
    Mismatch { rank: usize, peer: usize, expected: String, got: String },
    /// [`crate::AbortHandle::abort`] was called.
    #[error("rank {rank}: communicator aborted")]
    Aborted { rank: usize },
    /// The communicator failed earlier and cannot be used any more.
    #[error("communicator unusable after an earlier error: {0}")]
    Failed(String),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    /// The rank this error blames, if any: the dead, late or mismatched peer.
    pub fn blamed_rank(&self) -> Option<usize> {
        match self {
            Error::PeerFailed { peer, .. } | Error::Mismatch { peer, .. } | Error::Completion { peer, .. } => {
                Some(*peer)
            }
            Error::RemoteFailure { failed, reporter, .. } => Some(failed.unwrap_or(*reporter)),
            Error::Timeout { waiting_for, .. } => waiting_for.first().copied(),
            Error::RendezvousTimeout { missing, .. } => missing.first().copied(),
            _ => None,
        }
    }
}
