//! Pipelined ring algorithms: allreduce, reduce_scatter, allgather.
//!
//! Every block is cut into segments; a segment received from the left neighbour is reduced and
//! forwarded while the next segment is still on the wire.

use super::schedule::{block, segments, Builder, Region, Schedule, Step};
use super::Plan;

/// Scratch slots a ring rotates through: the pipeline depth.
const SLOTS: usize = 4;

struct Slots {
    regions: Vec<Region>,
    next: usize,
}

impl Slots {
    fn new(b: &mut Builder, len: usize) -> Slots {
        Slots { regions: (0..SLOTS).map(|_| b.scratch(len)).collect(), next: 0 }
    }

    fn take(&mut self, len: usize) -> Region {
        let mut r = self.regions[self.next % SLOTS];
        self.next += 1;
        r.len = len;
        r
    }
}

/// Segments a two-rank ring lets each step run ahead of the step after it (see [`all_reduce`]).
const TWO_RANK_LAG: usize = 1;

/// Ring allreduce: reduce-scatter then allgather around the ring, 2(n-1) steps.
///
/// Step k sends what step k-1 received (reduced, during the reduce-scatter), one segment at a
/// time. The steps are emitted as a wavefront: segment g of step k comes `lag` segments after
/// segment g of step k-1, and sends to a peer go out in that order. With 3 or more ranks `lag`
/// is a whole block, so each step posts all its sends before the next step starts: the deep
/// post-ahead keeps a rank busy while a neighbour that shares its core is descheduled. With 2
/// ranks, a lag of one segment sends each reduced segment back while it is still in cache, and
/// the allgather's receive into the output follows the reduce-scatter's send of the same bytes
/// closely. On the 2-core development machine that took the 2-rank out-of-place busbw at 32 MiB
/// from 88 % to 98 % of sendrecv's (docs/performance.md).
///
/// With 3 or more ranks, a reduce-scatter sum is sent on (or, the last one, gathered) a whole
/// block after it is computed. For large messages the block has long left the caches by then,
/// so the sums are written with streaming stores, which skip reading the output's cache lines
/// before overwriting them (out of place; in place the sum overwrites the line it just read).
pub fn all_reduce(p: &Plan) -> Schedule {
    let (n, r, e) = (p.nranks, p.rank, p.elem);
    let mut b = p.builder(0);
    let out = |b: &Builder, s: usize, len: usize| b.output(s * e, len * e);
    if n == 1 {
        let (src, dst) = (b.input(0, p.count * e), out(&b, 0, p.count));
        b.push(Step::Copy { dst, src });
        p.finish_avg(&mut b, dst);
        return b.build();
    }
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let seg = p.seg_elems(block(p.count, n, 0).1);
    let mut slots = Slots::new(&mut b, seg * e);
    let segs = |blk: usize| {
        let (start, len) = block(p.count, n, blk);
        segments(start, len, seg).collect::<Vec<_>>()
    };
    // Per step, the segments sent and received. Reduce-scatter step s (< n-1) sends block r-s
    // and receives and reduces block r-s-1; allgather step s sends block r+1-s and receives
    // block r-s. Neighbours list the same blocks for the same step, so their orders match.
    let steps = 2 * (n - 1);
    let plan: Vec<_> = (0..steps)
        .map(|k| {
            let (sb, rb) = if k < n - 1 {
                ((r + n - k) % n, (r + 2 * n - k - 1) % n)
            } else {
                let s = k - (n - 1);
                ((r + 1 + n - s) % n, (r + n - s) % n)
            };
            (segs(sb), segs(rb))
        })
        .collect();
    let most = plan.iter().map(|(s, r)| s.len().max(r.len())).max().unwrap_or(0);
    let lag = if n == 2 { TWO_RANK_LAG } else { most };
    let streaming = n > 2 && p.streams(p.count * e);
    for t in 0..most + lag * (steps - 1) {
        // The steps with a segment g = t - k*lag in 0..most.
        let (first, last) = ((t + 1).saturating_sub(most).div_ceil(lag), (t / lag).min(steps - 1));
        for (k, (sends, recvs)) in plan.iter().enumerate().take(last + 1).skip(first) {
            let g = t - k * lag;
            if let Some(&(start, len)) = sends.get(g) {
                let src = if k == 0 { b.input(start * e, len * e) } else { out(&b, start, len) };
                b.push(Step::Send { peer: right, src });
            }
            let Some(&(start, len)) = recvs.get(g) else { continue };
            let dst = out(&b, start, len);
            if k < n - 1 {
                let slot = slots.take(len * e);
                b.push(Step::Recv { peer: left, dst: slot });
                b.push(Step::ReduceInto { dst, a: b.input(start * e, len * e), b: slot, streaming });
                if k == n - 2 {
                    // The last reduce-scatter step leaves this rank's block fully reduced.
                    p.finish_avg(&mut b, dst);
                }
            } else {
                b.push(Step::Recv { peer: left, dst });
            }
        }
    }
    b.build()
}

/// Ring reduce-scatter: the input holds n blocks of `count`; rank r keeps the reduced block r.
/// In place, the one buffer holds the n input blocks and the output is its block r.
///
/// Each step forwards the partial sums of the step before, a whole block after computing them;
/// for large messages they are written with streaming stores (see [`all_reduce`]).
pub fn reduce_scatter(p: &Plan) -> Schedule {
    let (n, r, e, count) = (p.nranks, p.rank, p.elem, p.count);
    let mut b = p.builder(0);
    let out_base = if p.in_place { r * count * e } else { 0 };
    let input = |b: &Builder, blk: usize, s: usize, len: usize| b.input((blk * count + s) * e, len * e);
    if n == 1 {
        let (src, dst) = (input(&b, 0, 0, count), b.output(out_base, count * e));
        b.push(Step::Copy { dst, src });
        p.finish_avg(&mut b, dst);
        return b.build();
    }
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let seg = p.seg_elems(count);
    let mut slots = Slots::new(&mut b, seg * e);
    let streaming = p.streams(n * count * e);
    // Partial sums live from their step to the next one's sends: one buffer per step parity.
    let accs = [b.scratch(count * e), b.scratch(count * e)];
    // Partial sums of the previous step, by segment, to forward at the next step.
    let mut carried: Vec<Region> = Vec::new();
    for s in 0..n - 1 {
        let (sb, rb) = ((r + 2 * n - s - 1) % n, (r + 2 * n - s - 2) % n);
        let last = s == n - 2;
        let mut next = Vec::new();
        for (g, (start, len)) in segments(0, count, seg).enumerate() {
            let src = if s == 0 { input(&b, sb, start, len) } else { carried[g] };
            b.push(Step::Send { peer: right, src });
            let slot = slots.take(len * e);
            b.push(Step::Recv { peer: left, dst: slot });
            let dst = if last {
                b.output(out_base + start * e, len * e)
            } else {
                Region { off: accs[s % 2].off + start * e, len: len * e, ..accs[s % 2] }
            };
            let a = input(&b, rb, start, len);
            b.push(Step::ReduceInto { dst, a, b: slot, streaming });
            next.push(dst);
        }
        carried = next;
    }
    let owned = b.output(out_base, count * e);
    p.finish_avg(&mut b, owned);
    b.build()
}

/// Ring allgather: rank r contributes `count` elements, everyone gets n blocks in rank order.
/// In place, the input is block r of the output buffer.
pub fn all_gather(p: &Plan) -> Schedule {
    let (n, r, e, count) = (p.nranks, p.rank, p.elem, p.count);
    let mut b = p.builder(r * count * e);
    let out = |b: &Builder, blk: usize, s: usize, len: usize| b.output((blk * count + s) * e, len * e);
    let (src, dst) = (b.input(0, count * e), out(&b, r, 0, count));
    b.push(Step::Copy { dst, src });
    if n == 1 {
        return b.build();
    }
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let seg = p.seg_elems(count);
    for s in 0..n - 1 {
        let (sb, rb) = ((r + n - s) % n, (r + 2 * n - s - 1) % n);
        for (start, len) in segments(0, count, seg) {
            let src = if s == 0 { b.input(start * e, len * e) } else { out(&b, sb, start, len) };
            b.push(Step::Send { peer: right, src });
            let dst = out(&b, rb, start, len);
            b.push(Step::Recv { peer: left, dst });
        }
    }
    b.build()
}
