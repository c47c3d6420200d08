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

/// Ring allreduce: reduce-scatter then allgather around the ring, 2(n-1) steps.
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
    // Reduce-scatter: at step s send block r-s, receive and reduce block r-s-1.
    for s in 0..n - 1 {
        let (sb, rb) = ((r + n - s) % n, (r + 2 * n - s - 1) % n);
        let (s_start, s_len) = block(p.count, n, sb);
        let (r_start, r_len) = block(p.count, n, rb);
        let sends: Vec<_> = segments(s_start, s_len, seg).collect();
        let recvs: Vec<_> = segments(r_start, r_len, seg).collect();
        for g in 0..sends.len().max(recvs.len()) {
            if let Some(&(start, len)) = sends.get(g) {
                let src = if s == 0 { b.input(start * e, len * e) } else { out(&b, start, len) };
                b.push(Step::Send { peer: right, src });
            }
            if let Some(&(start, len)) = recvs.get(g) {
                let slot = slots.take(len * e);
                b.push(Step::Recv { peer: left, dst: slot });
                let (dst, a) = (out(&b, start, len), b.input(start * e, len * e));
                b.push(Step::ReduceInto { dst, a, b: slot });
            }
        }
    }
    let (own_start, own_len) = block(p.count, n, (r + 1) % n);
    let own = out(&b, own_start, own_len);
    p.finish_avg(&mut b, own);
    // Allgather: at step s send block r+1-s, receive block r-s.
    for s in 0..n - 1 {
        let (sb, rb) = ((r + 1 + n - s) % n, (r + n - s) % n);
        let (s_start, s_len) = block(p.count, n, sb);
        let (r_start, r_len) = block(p.count, n, rb);
        let sends: Vec<_> = segments(s_start, s_len, seg).collect();
        let recvs: Vec<_> = segments(r_start, r_len, seg).collect();
        for g in 0..sends.len().max(recvs.len()) {
            if let Some(&(start, len)) = sends.get(g) {
                let src = out(&b, start, len);
                b.push(Step::Send { peer: right, src });
            }
            if let Some(&(start, len)) = recvs.get(g) {
                let dst = out(&b, start, len);
                b.push(Step::Recv { peer: left, dst });
            }
        }
    }
    b.build()
}

/// Ring reduce-scatter: the input holds n blocks of `count`; rank r keeps the reduced block r.
/// In place, the one buffer holds the n input blocks and the output is its block r.
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
            b.push(Step::ReduceInto { dst, a, b: slot });
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
