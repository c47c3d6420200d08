//! Collective algorithms, written once as schedules that run unchanged on every transport.

pub mod schedule;

mod alltoall;
mod rhd;
mod ring;
mod tree;

use std::fmt;

use crate::dtype::ReduceOp;
pub use schedule::{Buf, Builder, Region, Schedule, Step};

/// The operations a communicator offers.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Collective {
    AllReduce = 1,
    Reduce = 2,
    Broadcast = 3,
    AllGather = 4,
    ReduceScatter = 5,
    AllToAll = 6,
    Barrier = 7,
    /// Point-to-point: `send`, `recv` and `send_recv`.
    SendRecv = 8,
}

impl Collective {
    /// Every collective, in wire-code order.
    pub const ALL: [Collective; 8] = [
        Collective::AllReduce,
        Collective::Reduce,
        Collective::Broadcast,
        Collective::AllGather,
        Collective::ReduceScatter,
        Collective::AllToAll,
        Collective::Barrier,
        Collective::SendRecv,
    ];

    /// The name used by `accl-perf` and in messages.
    pub const fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "allreduce",
            Collective::Reduce => "reduce",
            Collective::Broadcast => "broadcast",
            Collective::AllGather => "allgather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::AllToAll => "alltoall",
            Collective::Barrier => "barrier",
            Collective::SendRecv => "sendrecv",
        }
    }

    /// Parses a collective name (`all_reduce` and `all2all` spellings accepted).
    pub fn parse(name: &str) -> Option<Collective> {
        let n = name.to_ascii_lowercase().replace(['_', '-'], "");
        let n = if n == "all2all" { "alltoall".to_string() } else { n };
        Collective::ALL.into_iter().find(|c| c.name().replace('_', "") == n)
    }

    /// Decodes a wire code.
    pub fn from_code(code: u8) -> Option<Collective> {
        Collective::ALL.into_iter().find(|c| *c as u8 == code)
    }
}

impl fmt::Display for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An algorithm that implements one or more collectives.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Pipelined ring: bandwidth-optimal allreduce, allgather, reduce_scatter.
    Ring = 1,
    /// Recursive halving (reduce-scatter) then doubling (allgather): Rabenseifner's allreduce.
    HalvingDoubling = 2,
    /// Recursive doubling: exchange the whole buffer in log2(n) rounds; for small allreduce.
    RecursiveDoubling = 3,
    /// Pipelined binomial tree: reduce and broadcast with log2(n) latency.
    Tree = 4,
    /// Pipelined chain: reduce and broadcast at link bandwidth for large messages.
    Chain = 5,
    /// Pairwise exchange with a bounded window of peers: all2all.
    Pairwise = 6,
    /// Dissemination: barrier.
    Dissemination = 7,
    /// Direct messages: send/recv.
    Direct = 8,
}

impl Algorithm {
    /// Every algorithm.
    pub const ALL: [Algorithm; 8] = [
        Algorithm::Ring,
        Algorithm::HalvingDoubling,
        Algorithm::RecursiveDoubling,
        Algorithm::Tree,
        Algorithm::Chain,
        Algorithm::Pairwise,
        Algorithm::Dissemination,
        Algorithm::Direct,
    ];

    /// The name `ACCL_ALGO` uses.
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Ring => "ring",
            Algorithm::HalvingDoubling => "rhd",
            Algorithm::RecursiveDoubling => "rd",
            Algorithm::Tree => "tree",
            Algorithm::Chain => "chain",
            Algorithm::Pairwise => "pairwise",
            Algorithm::Dissemination => "dissemination",
            Algorithm::Direct => "direct",
        }
    }

    /// Parses an algorithm name.
    pub fn parse(name: &str) -> Option<Algorithm> {
        let n = name.trim().to_ascii_lowercase();
        let n = match n.as_str() {
            "rabenseifner" | "halving_doubling" | "halving-doubling" => "rhd",
            "recursive_doubling" | "recursive-doubling" => "rd",
            other => other,
        };
        Algorithm::ALL.into_iter().find(|a| a.name() == n)
    }

    /// Whether this algorithm implements `coll`.
    pub fn supports(self, coll: Collective) -> bool {
        use Algorithm::*;
        use Collective::*;
        matches!(
            (self, coll),
            (Ring | HalvingDoubling | RecursiveDoubling, AllReduce)
                | (Tree | Chain, Reduce | Broadcast)
                | (Ring, AllGather | ReduceScatter)
                | (Pairwise, AllToAll)
                | (Dissemination, Barrier)
                | (Direct, SendRecv)
        )
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Algorithm overrides from `ACCL_ALGO`: a comma-separated list of `algo` (applies to every
/// collective it implements) or `collective=algo` entries, e.g. `ring` or
/// `allreduce=rhd,broadcast=chain`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlgoChoice {
    overrides: Vec<(Option<Collective>, Algorithm)>,
}

impl AlgoChoice {
    /// Parses an `ACCL_ALGO` value.
    ///
    /// ```
    /// use accl_core::algo::{AlgoChoice, Algorithm, Collective};
    /// let c = AlgoChoice::parse("allreduce=rhd,chain").unwrap();
    /// assert_eq!(c.forced(Collective::AllReduce), Some(Algorithm::HalvingDoubling));
    /// assert_eq!(c.forced(Collective::Broadcast), Some(Algorithm::Chain));
    /// assert!(AlgoChoice::parse("allreduce=chain").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<AlgoChoice, String> {
        let mut overrides = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (coll, algo) = match item.split_once('=') {
                Some((c, a)) => {
                    let coll = Collective::parse(c).ok_or_else(|| format!("unknown collective {c:?}"))?;
                    (Some(coll), a)
                }
                None => (None, item),
            };
            let algo = Algorithm::parse(algo).ok_or_else(|| format!("unknown algorithm {algo:?}"))?;
            if let Some(c) = coll {
                if !algo.supports(c) {
                    return Err(format!("algorithm {algo} does not implement {c}"));
                }
            } else if !Collective::ALL.into_iter().any(|c| algo.supports(c)) {
                return Err(format!("algorithm {algo} implements nothing"));
            }
            overrides.push((coll, algo));
        }
        Ok(AlgoChoice { overrides })
    }

    /// The algorithm forced for `coll`, if any (a later entry wins).
    pub fn forced(&self, coll: Collective) -> Option<Algorithm> {
        self.overrides.iter().rev().find(|(c, a)| c.map_or(a.supports(coll), |c| c == coll)).map(|(_, a)| *a)
    }
}

/// Picks the algorithm for a call: the `ACCL_ALGO` override if any, else by size and ranks.
/// `bytes` is the size of one rank's buffer.
pub fn choose(coll: Collective, bytes: usize, nranks: usize, choice: &AlgoChoice) -> Algorithm {
    if let Some(a) = choice.forced(coll) {
        return a;
    }
    match coll {
        Collective::AllReduce => {
            if bytes <= 16 << 10 || nranks <= 2 && bytes <= 64 << 10 {
                Algorithm::RecursiveDoubling
            } else if bytes <= 4 << 20 && nranks.is_power_of_two() {
                // Measured on loopback TCP: halving-doubling beats the ring up to a few MiB.
                Algorithm::HalvingDoubling
            } else {
                Algorithm::Ring
            }
        }
        Collective::Reduce | Collective::Broadcast => {
            if bytes <= 64 << 10 || nranks <= 2 {
                Algorithm::Tree
            } else {
                Algorithm::Chain
            }
        }
        Collective::AllGather | Collective::ReduceScatter => Algorithm::Ring,
        Collective::AllToAll => Algorithm::Pairwise,
        Collective::Barrier => Algorithm::Dissemination,
        Collective::SendRecv => Algorithm::Direct,
    }
}

/// Everything a schedule depends on (also the key of the schedule cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Plan {
    pub coll: Collective,
    pub algo: Algorithm,
    pub rank: usize,
    pub nranks: usize,
    /// Elements per rank (see each collective's doc for what that means).
    pub count: usize,
    pub elem: usize,
    pub op: ReduceOp,
    /// Root of reduce/broadcast; destination of a send.
    pub root: usize,
    /// Source of a receive (point-to-point only).
    pub src: usize,
    pub in_place: bool,
    /// Pipeline segment size in bytes.
    pub segment: usize,
    /// Peers an all2all exchanges with at once.
    pub window: usize,
    /// Messages of at least this many bytes per rank stream their reduction results past the
    /// caches (see [`Step::ReduceInto`]); 0: never.
    pub stream_min: usize,
    /// Point-to-point: whether this rank sends and/or receives.
    pub p2p_send: bool,
    pub p2p_recv: bool,
}

/// The pipeline segment size (bytes) an algorithm uses unless `ACCL_SEGMENT_SIZE` says
/// otherwise. The ring allreduce passes every segment on while it is in cache, so it wants
/// segments that stay there between arrival and send while its neighbours sharing the core run
/// (64 KiB measured best on the 2-core development machine, against 128 and 256 KiB); the other
/// schedules gained from longer messages (256 KiB: fewer system calls per byte).
pub fn default_segment(coll: Collective, algo: Algorithm) -> usize {
    match (coll, algo) {
        (Collective::AllReduce, Algorithm::Ring) => 64 << 10,
        _ => 256 << 10,
    }
}

/// Most segments a schedule cuts one block into: bounds the number of steps, and so the time
/// to build a schedule (its dependency inference compares each step with the live accesses),
/// for very large messages, whose segments then grow beyond the configured size.
const MAX_SEGMENTS: usize = 256;

impl Plan {
    /// Pipeline segment length in elements, at most [`MAX_SEGMENTS`] segments per `elems`.
    fn seg_elems(&self, elems: usize) -> usize {
        (self.segment / self.elem).max(elems.div_ceil(MAX_SEGMENTS)).max(1)
    }

    /// Builds this rank's schedule.
    pub fn schedule(&self) -> Schedule {
        match (self.coll, self.algo) {
            (Collective::AllReduce, Algorithm::Ring) => ring::all_reduce(self),
            (Collective::AllReduce, Algorithm::HalvingDoubling) => rhd::all_reduce(self, true),
            (Collective::AllReduce, Algorithm::RecursiveDoubling) => rhd::all_reduce(self, false),
            (Collective::ReduceScatter, _) => ring::reduce_scatter(self),
            (Collective::AllGather, _) => ring::all_gather(self),
            (Collective::Broadcast, Algorithm::Chain) => tree::broadcast(self, true),
            (Collective::Broadcast, _) => tree::broadcast(self, false),
            (Collective::Reduce, Algorithm::Chain) => tree::reduce(self, true),
            (Collective::Reduce, _) => tree::reduce(self, false),
            (Collective::AllToAll, _) => alltoall::all_to_all(self),
            (Collective::Barrier, _) => alltoall::barrier(self),
            (Collective::SendRecv, _) => alltoall::send_recv(self),
            (coll, algo) => unreachable!("{algo} does not implement {coll}; choose() and AlgoChoice prevent this"),
        }
    }

    /// Whether reductions whose results are read again only much later (after more bytes
    /// than the caches hold have gone through them) should write them with streaming stores,
    /// for a message of `bytes` per rank.
    fn streams(&self, bytes: usize) -> bool {
        self.stream_min > 0 && bytes >= self.stream_min
    }

    /// A builder for this plan; in place, the input sits in the output at `input_offset`.
    fn builder(&self, input_offset: usize) -> Builder {
        Builder::new(self.in_place.then_some(input_offset))
    }

    /// `Divide` for `Avg`, nothing otherwise.
    fn finish_avg(&self, b: &mut Builder, region: Region) {
        if self.op == ReduceOp::Avg && region.len > 0 {
            b.push(Step::Divide { buf: region });
        }
    }
}

#[cfg(test)]
mod tests;
