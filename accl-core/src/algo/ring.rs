//! Pipelined ring algorithms: allreduce, reduce_scatter, allgather.
//!
//! Every block is cut into segments; a segment received from the left neighbour is reduced and
//! forwarded while the next segment is still on the wire.

use super::schedule::{block, segments, Builder, Region, Schedule, Step};
use super::Plan;

/// Scratch slots the ring reduce-scatter rotates through: the pipeline depth.
const SLOTS: usize = 4;

/// Receive slots used round-robin. A slot is taken again `count` takes after it was last
/// taken; the builder then makes the new receive wait until the slot's previous readers are
/// done.
struct Slots {
    regions: Vec<Region>,
    next: usize,
}

impl Slots {
    fn new(b: &mut Builder, count: usize, len: usize) -> Slots {
        Slots { regions: (0..count).map(|_| b.scratch(len)).collect(), next: 0 }
    }

    fn take(&mut self, len: usize) -> Region {
        let mut r = self.regions[self.next % self.regions.len()];
        self.next += 1;
        r.len = len;
        r
    }
}

/// Ring allreduce: reduce-scatter then allgather around the ring, 2(n-1) steps.
///
/// Step k sends what step k-1 received (reduced, during the reduce-scatter), one segment at a
/// time. The steps are emitted as a wavefront: segment g of step k comes right after segment
/// g+1 of step k-1, so each segment is passed on while it is still in cache, and sends to a
/// peer go out in that order.
///
/// A reduce-scatter segment arrives in a scratch slot, and its partial sum is accumulated in
/// that slot (`slot = slot + input`) and sent on from there; only the last reduce-scatter step
/// writes its sum to the output, from where the allgather sends it on a segment later. A
/// rank's memory traffic is then one pass over its input and one over its output, as for a
/// copy: writing every partial sum to the output and reading it back a block later cost a
/// third more passes, and out of place each written line is first read. On the 2-core
/// development machine that took the 4-rank out-of-place busbw at 32 MiB from 77 % to
/// 93-100 % of sendrecv's (docs/performance.md).
///
/// Slots are taken round-robin, one per reduce-scatter segment received. A staged sum is read
/// by the next step's send of the same segment, and at most n-1 other slots are taken in
/// between (the steps after it in this wavefront position and the steps before it in the
/// next); n+2 slots therefore keep every staged sum until it is sent, and a receive never
/// waits for the send just before it in program order, which on a transport whose sends
/// complete only once received (the in-process one, RDMA) would stall every rank at once.
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
    let mut slots = Slots::new(&mut b, n + 2, seg * e);
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
    // The partial sum of each segment, staged in its slot by the previous reduce-scatter step.
    let mut staged: Vec<Option<Region>> = vec![None; most];
    for t in 0..most + steps - 1 {
        // The steps with a segment g = t - k in 0..most.
        for (k, (sends, recvs)) in plan.iter().enumerate().take(t.min(steps - 1) + 1).skip((t + 1).saturating_sub(most))
        {
            let g = t - k;
            if let Some(&(start, len)) = sends.get(g) {
                // Reduce-scatter steps after the first send what the step before staged.
                let src = match staged[g].take() {
                    Some(slot) => slot,
                    None if k == 0 => b.input(start * e, len * e),
                    None => out(&b, start, len),
                };
                b.push(Step::Send { peer: right, src });
            }
            let Some(&(start, len)) = recvs.get(g) else { continue };
            let dst = out(&b, start, len);
            if k < n - 1 {
                let slot = slots.take(len * e);
                let input = b.input(start * e, len * e);
                b.push(Step::Recv { peer: left, dst: slot });
                if k < n - 2 {
                    b.push(Step::ReduceInto { dst: slot, a: slot, b: input, streaming: false });
                    staged[g] = Some(slot);
                } else {
                    // The last reduce-scatter step leaves this rank's block fully reduced.
                    b.push(Step::ReduceInto { dst, a: input, b: slot, streaming: false });
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
    let mut slots = Slots::new(&mut b, SLOTS, seg * e);
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
