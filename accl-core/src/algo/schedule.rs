//! A schedule: the steps one rank performs for one collective call, as data.
//!
//! Algorithms emit steps in program order through [`Builder`]; the builder infers every
//! dependency from the byte regions the steps read and write (read-after-write,
//! write-after-read, write-after-write), so an algorithm only says *what* moves where. The
//! executor then runs steps as soon as their dependencies complete: a reduction of one segment
//! overlaps the transfer of the next. Sends and receives to one peer are posted in program order,
//! which is the order the peer's matching steps appear in its own schedule.

/// Which buffer a region lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Buf {
    /// The caller's send buffer (read only).
    Input,
    /// The caller's receive buffer. In-place calls address everything here.
    Output,
    /// Library-owned scratch memory.
    Scratch,
}

/// A byte range of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    pub buf: Buf,
    pub off: usize,
    pub len: usize,
}

impl Region {
    fn overlaps(&self, other: &Region) -> bool {
        self.buf == other.buf && self.off < other.off + other.len && other.off < self.off + self.len
    }
}

/// One step of a schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send `src` to `peer` as one message.
    Send { peer: usize, src: Region },
    /// Receive one message from `peer` into `dst`.
    Recv { peer: usize, dst: Region },
    /// `dst = op(dst, src)`.
    Reduce { dst: Region, src: Region },
    /// `dst = op(a, b)`; `a` may be `dst` itself. With `streaming`, `dst` is written with
    /// non-temporal stores (see [`crate::reduce::reduce_into_streaming`]): for a result that
    /// stays unread until it has long left the caches.
    ReduceInto { dst: Region, a: Region, b: Region, streaming: bool },
    /// `dst = src`.
    Copy { dst: Region, src: Region },
    /// `buf /= nranks` (the end of `Avg`).
    Divide { buf: Region },
}

impl Step {
    fn reads(&self) -> impl Iterator<Item = Region> {
        let r: [Option<Region>; 2] = match *self {
            Step::Send { src, .. } => [Some(src), None],
            Step::Recv { .. } => [None, None],
            Step::Reduce { dst, src } => [Some(dst), Some(src)],
            Step::ReduceInto { a, b, .. } => [Some(a), Some(b)],
            Step::Copy { src, .. } => [Some(src), None],
            Step::Divide { buf } => [Some(buf), None],
        };
        r.into_iter().flatten().filter(|r| r.len > 0)
    }

    /// The region the step writes, if any (empty regions count as none).
    pub fn writes(&self) -> Option<Region> {
        match *self {
            Step::Send { .. } => None,
            Step::Recv { dst, .. } => Some(dst),
            Step::Reduce { dst, .. } | Step::ReduceInto { dst, .. } | Step::Copy { dst, .. } => Some(dst),
            Step::Divide { buf } => Some(buf),
        }
        .filter(|r| r.len > 0)
    }

    /// The peer of a send or receive.
    pub fn peer(&self) -> Option<usize> {
        match *self {
            Step::Send { peer, .. } | Step::Recv { peer, .. } => Some(peer),
            _ => None,
        }
    }
}

/// A finished schedule with its dependency graph.
#[derive(Debug, Default)]
pub struct Schedule {
    pub steps: Vec<Step>,
    /// Number of steps each step waits for.
    pub dep_count: Vec<u32>,
    /// Steps that wait for each step.
    pub dependents: Vec<Vec<u32>>,
    /// Scratch bytes the schedule addresses.
    pub scratch_len: usize,
    /// Per peer: its sends and receives in program order (the order they are posted in).
    pub sends: Vec<Vec<u32>>,
    pub recvs: Vec<Vec<u32>>,
    /// Local steps that wait for nothing.
    pub initial: Vec<u32>,
}

/// Emits steps in program order and infers their dependencies.
pub struct Builder {
    steps: Vec<Step>,
    deps: Vec<Vec<u32>>,
    /// Per step: regions written (last writer wins) and read, for dependency inference.
    accesses: Vec<(u32, Region, bool)>,
    scratch_len: usize,
    in_place_shift: Option<usize>,
}

impl Builder {
    /// A builder. With `in_place_shift = Some(off)`, the input buffer is the output buffer
    /// starting at byte `off`, and [`Builder::input`] regions are addressed there so that the
    /// inferred dependencies see the aliasing.
    pub fn new(in_place_shift: Option<usize>) -> Builder {
        Builder { steps: Vec::new(), deps: Vec::new(), accesses: Vec::new(), scratch_len: 0, in_place_shift }
    }

    /// A region of the input buffer.
    pub fn input(&self, off: usize, len: usize) -> Region {
        match self.in_place_shift {
            Some(shift) => Region { buf: Buf::Output, off: off + shift, len },
            None => Region { buf: Buf::Input, off, len },
        }
    }

    /// A region of the output buffer.
    pub fn output(&self, off: usize, len: usize) -> Region {
        Region { buf: Buf::Output, off, len }
    }

    /// Reserves `len` bytes of scratch (64-byte aligned).
    pub fn scratch(&mut self, len: usize) -> Region {
        let off = self.scratch_len.next_multiple_of(64);
        self.scratch_len = off + len;
        Region { buf: Buf::Scratch, off, len }
    }

    /// Whether the call is in place.
    pub fn in_place(&self) -> bool {
        self.in_place_shift.is_some()
    }

    /// Appends a step; returns its index.
    pub fn push(&mut self, step: Step) -> u32 {
        self.push_after(step, &[])
    }

    /// Appends a step that also waits for `extra` steps (ordering that no region expresses,
    /// such as a barrier's rounds or a bounded window of exchanges).
    pub fn push_after(&mut self, step: Step, extra: &[u32]) -> u32 {
        if let Step::Copy { dst, src } = step {
            if dst == src {
                return self.push_after_nothing(extra);
            }
        }
        let id = self.steps.len() as u32;
        let mut deps: Vec<u32> = extra.to_vec();
        let writes = step.writes();
        for &(other, region, is_write) in &self.accesses {
            let conflict =
                step.reads().any(|r| is_write && r.overlaps(&region)) || writes.is_some_and(|w| w.overlaps(&region));
            if conflict {
                deps.push(other);
            }
        }
        deps.sort_unstable();
        deps.dedup();
        // A write supersedes earlier accesses it fully covers: later steps depend on it alone,
        // which keeps the access list (and dependency lists) short.
        if let Some(w) = writes {
            self.accesses.retain(|(_, r, _)| !(r.buf == w.buf && r.off >= w.off && r.off + r.len <= w.off + w.len));
            self.accesses.push((id, w, true));
        }
        for r in step.reads() {
            self.accesses.push((id, r, false));
        }
        self.steps.push(step);
        self.deps.push(deps);
        id
    }

    /// A copy onto itself is nothing to do; returns the latest of `extra` (or a no-op marker).
    fn push_after_nothing(&mut self, extra: &[u32]) -> u32 {
        let id = self.steps.len() as u32;
        let region = Region { buf: Buf::Scratch, off: 0, len: 0 };
        self.steps.push(Step::Copy { dst: region, src: region });
        self.deps.push(extra.to_vec());
        id
    }

    /// Finishes the schedule.
    pub fn build(self) -> Schedule {
        let n = self.steps.len();
        let mut dependents = vec![Vec::new(); n];
        let mut dep_count = vec![0u32; n];
        for (i, deps) in self.deps.iter().enumerate() {
            dep_count[i] = deps.len() as u32;
            for &d in deps {
                dependents[d as usize].push(i as u32);
            }
        }
        let peers = self.steps.iter().filter_map(Step::peer).max().map_or(0, |p| p + 1);
        let (mut sends, mut recvs) = (vec![Vec::new(); peers], vec![Vec::new(); peers]);
        let mut initial = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            match *step {
                Step::Send { peer, .. } => sends[peer].push(i as u32),
                Step::Recv { peer, .. } => recvs[peer].push(i as u32),
                _ if dep_count[i] == 0 => initial.push(i as u32),
                _ => {}
            }
        }
        Schedule { steps: self.steps, dep_count, dependents, scratch_len: self.scratch_len, sends, recvs, initial }
    }
}

/// Splits `count` elements into `parts` nearly equal blocks; returns (first element, elements).
pub fn block(count: usize, parts: usize, index: usize) -> (usize, usize) {
    let base = count / parts;
    let extra = count % parts;
    let start = index * base + index.min(extra);
    (start, base + usize::from(index < extra))
}

/// Cuts `len` elements starting at element `start` into pipeline segments of about
/// `seg_elems`; yields (first element, elements). Always yields at least one segment.
pub fn segments(start: usize, len: usize, seg_elems: usize) -> impl Iterator<Item = (usize, usize)> {
    let seg = seg_elems.max(1);
    let n = len.div_ceil(seg).max(1);
    (0..n).map(move |i| {
        let s = i * seg;
        (start + s, seg.min(len.saturating_sub(s)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_exactly() {
        for count in [0, 1, 7, 64, 1001] {
            for parts in 1..9 {
                let mut next = 0;
                for i in 0..parts {
                    let (s, n) = block(count, parts, i);
                    assert_eq!(s, next);
                    next += n;
                }
                assert_eq!(next, count);
            }
        }
    }

    #[test]
    fn dependencies_follow_regions() {
        let mut b = Builder::new(None);
        let slot = b.scratch(16);
        let out = b.output(0, 16);
        let recv = b.push(Step::Recv { peer: 1, dst: slot });
        let red = b.push(Step::ReduceInto { dst: out, a: b.input(0, 16), b: slot, streaming: false });
        let send = b.push(Step::Send { peer: 1, src: out });
        let recv2 = b.push(Step::Recv { peer: 1, dst: slot });
        let s = b.build();
        assert_eq!(s.dep_count[recv as usize], 0);
        assert_eq!(s.dependents[recv as usize], vec![red, recv2]);
        assert_eq!(s.dependents[red as usize], vec![send, recv2]);
    }
}
